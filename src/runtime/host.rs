//! Checks of the host the relay runs on, made once at start: locked memory
//! for io_uring, and the open-file limit that bounds connections.

use tracing::warn;

use super::StartError;

/// Locked memory glommio's io_uring rings need (measured); checked at start
/// for a clear error instead of a failure deep inside the executor. A
/// process with `CAP_IPC_LOCK` (root) is not charged for its rings: this is
/// its floor.
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

/// Locked memory per executor for a process without `CAP_IPC_LOCK`, whose
/// rings are charged to its limit: one executor needed 1,280 KiB and two
/// 2,560 KiB (Linux 6.18, measured as an unprivileged user); this leaves a
/// margin. More lets glommio also register its I/O buffers.
pub const MEMLOCK_PER_EXECUTOR_BYTES: u64 = 2 << 20;

/// Whether this process holds `CAP_IPC_LOCK` (bit 14 of `CapEff` in
/// /proc/self/status).
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| v.trim().to_string()))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// Descriptors the relay keeps for itself beside its connections: listeners,
/// io_uring rings, eventfds, log and configuration files, hand-offs in flight.
pub const RESERVED_FILES: usize = 256;

/// Refuses to start when io_uring would not get the locked memory it needs
/// for `executors` executors.
pub fn check_memlock(executors: usize) -> Result<(), StartError> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    let need = if has_ipc_lock() { MIN_MEMLOCK_BYTES } else { MEMLOCK_PER_EXECUTOR_BYTES * executors as u64 };
    if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need {
        return Err(StartError::Memlock { have_kib: lim.rlim_cur / 1024, need_kib: need / 1024 });
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (each connection is
/// one descriptor) and returns it; `None` when unlimited or unreadable.
fn raise_nofile_limit() -> Option<usize> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit(2) on this process, reading a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as usize)
}

/// The connection limit the relay runs with: the configured one, or (when
/// none is set) what the open-file limit holds beside [`RESERVED_FILES`].
/// Warns only when a configured value cannot be met.
pub fn connection_limit(configured: Option<usize>) -> usize {
    let files = raise_nofile_limit();
    let fits = files.map(|f| f.saturating_sub(RESERVED_FILES).max(1));
    match (configured, fits) {
        (Some(n), Some(fits)) if n > fits => {
            warn!(
                max_connections = n,
                open_files = files.unwrap_or(0),
                "limits.max_connections is more than the open-file limit (ulimit -n) can hold: \
                 accepts will fail before it is reached; raise the limit or lower max_connections to {fits}"
            );
            n
        }
        (Some(n), _) => n,
        (None, Some(fits)) => fits,
        (None, None) => 1 << 20,
    }
}

/// With storage, a write past `ulimit -f` must fail with EFBIG (the log
/// then refuses operations, as on a full disk) instead of killing the
/// process with SIGXFSZ.
pub(super) fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler
    // code; it is async-signal-safe and affects only SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}
