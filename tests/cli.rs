//! The `docrelay` binary (README.md, "Run it" and "Configuration"): `print-config`,
//! `serve` with its flags and configuration file (the keys of `docs/protocol.md`,
//! "Limits"), start-up errors and warnings, and shutdown on SIGTERM and SIGINT
//! (`docs/protocol.md`, "Session lifecycle").

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_docrelay");

/// Generous bound for the relay to start or exit: it is not a speed test.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running `docrelay` process. Killed when dropped (a failing test never
/// leaves one behind). Its stderr is read on a thread so the pipe never fills.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        Proc::spawn_command(cmd)
    }

    fn spawn_command(mut cmd: Command) -> Proc {
        cmd.env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("docrelay starts");
        let (stderr, lines) = collect_stderr(&mut child);
        let mut out_pipe = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out_pipe.read_to_string(&mut text);
            text
        });
        Proc { child, lines, stderr, stdout: Some(stdout) }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the `listening on ADDR` line and returns ADDR.
    fn listening(&self) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        return addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no `listening on` line; stderr:\n{}", self.stderr()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("docrelay ended without a `listening on` line; stderr:\n{}", self.stderr())
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit; panics (and the guard kills it) if it
    /// is still running after [`PATIENCE`].
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads collect the last output.
                let deadline = Instant::now() + Duration::from_secs(5);
                while self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok() {}
                return status;
            }
            assert!(Instant::now() < deadline, "docrelay still running; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stdout; call after [`Proc::wait`].
    fn stdout(&mut self) -> String {
        self.stdout.take().expect("stdout read once").join().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a command that must fail at start: returns its stderr after checking
/// the exit status is non-zero and that it did not panic.
fn expect_start_failure(mut proc: Proc) -> String {
    let status = proc.wait();
    let stderr = proc.stderr();
    assert!(status.code().is_some_and(|c| c != 0), "expected a failing exit, got {status}; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "docrelay panicked:\n{stderr}");
    stderr
}

/// Stops a relay that started with SIGTERM and returns everything it wrote
/// to stderr, after checking that it exited 0.
fn stop(mut proc: Proc) -> String {
    proc.signal(libc::SIGTERM);
    let status = proc.wait();
    let stderr = proc.stderr();
    assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{stderr}");
    stderr
}

/// The WARN lines of a relay's log.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(" WARN ")).collect()
}

// ---------------------------------------------------------------------------
// print-config

#[test]
fn print_config_prints_the_defaults_as_commented_toml() {
    let mut proc = Proc::spawn(&["print-config"]);
    let status = proc.wait();
    assert!(status.success(), "{status}; stderr:\n{}", proc.stderr());
    let text = proc.stdout();
    let parsed = docrelay::Config::from_toml(&text, "stdout").unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(parsed, docrelay::Config::default());
    assert!(text.lines().any(|l| l.trim_start().starts_with('#')), "no comments in:\n{text}");
    // Every section of the contract is there, not just parsed from defaults.
    for section in ["[limits]", "[documents]", "[auth]", "[validation]", "[storage]", "[testing]"] {
        assert!(text.contains(section), "no {section} in:\n{text}");
    }
    for key in
        ["listen = \"127.0.0.1:9001\"", "cores = \"all\"", "max_head_bytes = 8192", "handshake_timeout_ms = 5000"]
    {
        assert!(text.contains(key), "no `{key}` in:\n{text}");
    }
}

// ---------------------------------------------------------------------------
// serve, and shutdown on a signal

/// `serve --listen 127.0.0.1:0` logs its address, serves sessions, and on
/// `sig` closes every session with 1001 and exits 0.
fn serve_then_stop_with(sig: libc::c_int) {
    let mut proc = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let addr = proc.listening();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    // Several documents, so that sessions live on different cores.
    let mut clients: Vec<Client> = (0..4).map(|i| connect(addr, &format!("/ws/documents/cli-{i}"))).collect();
    for ws in &mut clients {
        assert_pong(ws);
    }
    let health = raw_http(addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok"), "{health}");
    proc.signal(sig);
    for ws in &mut clients {
        let (code, _reason) = expect_close(ws);
        assert_eq!(code, 1001, "close code on shutdown");
        // Complete the close handshake (tungstenite queued the reply).
        let _ = ws.flush();
        while ws.read().is_ok() {}
    }
    let status = proc.wait();
    let stderr = proc.stderr();
    assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.matches("listening on").count(), 1, "one `listening on` line:\n{stderr}");
}

#[test]
fn serve_stops_on_sigterm_with_1001_and_exit_0() {
    serve_then_stop_with(libc::SIGTERM);
}

#[test]
fn serve_stops_on_sigint_with_1001_and_exit_0() {
    serve_then_stop_with(libc::SIGINT);
}

/// A client that never answers the relay's Close does not hold up the exit:
/// the relay gives up after `limits.shutdown_grace_ms` and still exits 0.
#[test]
fn shutdown_does_not_wait_forever_for_a_silent_client() {
    let dir = TempDir::new("grace");
    let path = dir.file(
        "relay.toml",
        "listen = \"127.0.0.1:0\"\n[limits]\nclose_timeout_ms = 200\nshutdown_grace_ms = 300\n\
         handshake_timeout_ms = 600000\n",
    );
    let mut proc = Proc::spawn(&["serve", "--config", &path]);
    let addr = proc.listening();
    // Handshakes in progress (far from their timeout) do not hold it up either.
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    stalled.write_all(b"GET /ws/documents/d HTTP/1.1\r\nHost: t\r\n").unwrap();
    let idle = std::net::TcpStream::connect(addr).unwrap();
    let (mut silent, mut pending) = raw_upgrade(addr, "/ws/documents/silent");
    raw_assert_pong(&mut silent, &mut pending);
    proc.signal(libc::SIGTERM);
    // It gets the Close, never answers it, and keeps the socket open.
    assert_eq!(raw_expect_close(&mut silent, &mut pending), Some(1001));
    let status = proc.wait();
    assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{}", proc.stderr());
    drop((silent, stalled, idle));
}

/// Once shutdown has begun, new connections are not upgraded any more.
#[test]
fn shutdown_stops_accepting() {
    let dir = TempDir::new("stop-accepting");
    // One core, and a silent client that keeps the relay in its shutdown
    // grace period while we try to connect.
    let path = dir.file(
        "relay.toml",
        "listen = \"127.0.0.1:0\"\ncores = [0]\n[limits]\nclose_timeout_ms = 800\nshutdown_grace_ms = 800\n",
    );
    let mut proc = Proc::spawn(&["serve", "--config", &path]);
    let addr = proc.listening();
    let (mut silent, mut pending) = raw_upgrade(addr, "/ws/documents/holder");
    raw_assert_pong(&mut silent, &mut pending);
    proc.signal(libc::SIGTERM);
    assert_eq!(raw_expect_close(&mut silent, &mut pending), Some(1001));
    // A new connection is refused, or (if it raced the listener's close)
    // dropped unanswered: it is never upgraded.
    if let Ok(mut late) = std::net::TcpStream::connect(addr) {
        late.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = late.write_all(upgrade_request("/ws/documents/late").as_bytes());
        let mut answer = Vec::new();
        let _ = late.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty(), "a connection made after shutdown began was answered: {answer:?}");
    }
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
    drop(silent);
}

/// "Stop accepting" closes the listening socket: once sessions are being
/// closed with 1001, a new connection is refused at once instead of being
/// taken in and left unanswered until the process exits. The outcome varies
/// from run to run, so the shutdown is repeated.
#[test]
fn shutdown_refuses_new_connections() {
    let dir = TempDir::new("refuse");
    let path = dir.file(
        "relay.toml",
        "listen = \"127.0.0.1:0\"\ncores = [0]\n[limits]\nclose_timeout_ms = 300\nshutdown_grace_ms = 300\n",
    );
    for run in 0..10 {
        let mut proc = Proc::spawn(&["serve", "--config", &path]);
        let addr = proc.listening();
        let (mut silent, mut pending) = raw_upgrade(addr, "/ws/documents/holder");
        raw_assert_pong(&mut silent, &mut pending);
        proc.signal(libc::SIGTERM);
        assert_eq!(raw_expect_close(&mut silent, &mut pending), Some(1001));
        let late = std::net::TcpStream::connect(addr);
        assert!(
            late.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "run {run}: a connection made after shutdown began was not refused: {late:?}"
        );
        assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
    }
}

/// A signal with no session open also ends the relay cleanly.
#[test]
fn serve_stops_on_sigterm_when_idle() {
    let mut proc = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--cores", "0"]);
    proc.listening();
    proc.signal(libc::SIGTERM);
    let status = proc.wait();
    assert_eq!(status.code(), Some(0), "exit status {status}; stderr:\n{}", proc.stderr());
}

// ---------------------------------------------------------------------------
// Configuration file and flags

#[test]
fn serve_with_a_config_file() {
    let dir = TempDir::new("file");
    let path = dir.file("relay.toml", "listen = \"127.0.0.1:0\"\ncores = [0]\n\n[limits]\nmax_head_bytes = 512\n");
    let mut proc = Proc::spawn(&["serve", "--config", &path]);
    let addr = proc.listening();
    let mut ws = connect(addr, "/ws/documents/from-file");
    assert_pong(&mut ws);
    // The file's values are in force: one core, and the smaller head limit.
    assert_eq!(metric_cores(addr), ["0"]);
    let big = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n", "p".repeat(600));
    let answer = raw_http(addr, big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    drop(ws);
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}

/// `--listen` takes a host name: `localhost:0` resolves to a loopback address.
#[test]
fn serve_listens_on_a_host_name() {
    let proc = Proc::spawn(&["serve", "--listen", "localhost:0", "--cores", "0"]);
    let addr = proc.listening();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let health = raw_http(addr, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok"), "{health}");
    stop(proc);
}

/// The same in the configuration file.
#[test]
fn config_file_listen_takes_a_host_name() {
    let dir = TempDir::new("listen-name");
    let path = dir.file("relay.toml", "listen = \"localhost:0\"\ncores = [0]\n");
    let proc = Proc::spawn(&["serve", "--config", &path]);
    let addr = proc.listening();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let mut ws = connect(addr, "/ws/documents/by-name");
    assert_pong(&mut ws);
    drop(ws);
    stop(proc);
}

#[test]
fn serve_with_cores_flag() {
    let mut proc = Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--cores", "0"]);
    let addr = proc.listening();
    let mut ws = connect(addr, "/ws/documents/core-zero");
    assert_pong(&mut ws);
    assert_eq!(metric_cores(addr), ["0"]);
    drop(ws);
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}

#[test]
fn flags_override_the_config_file() {
    // The file names a port that is taken, and a CPU that does not exist.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let dir = TempDir::new("override");
    let path = dir.file("relay.toml", &format!("listen = \"{taken_addr}\"\ncores = [4096]\n"));

    // The file alone is read (and fails on its values).
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &path, "--cores", "0"]));
    assert!(stderr.contains("already in use"), "{stderr}");
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &path, "--listen", "127.0.0.1:0"]));
    assert!(stderr.contains("4096"), "{stderr}");

    // With both flags the relay starts on the flags' values.
    let mut proc = Proc::spawn(&["serve", "--config", &path, "--listen", "127.0.0.1:0", "--cores", "0"]);
    let addr = proc.listening();
    assert_ne!(addr, taken_addr);
    let mut ws = connect(addr, "/ws/documents/override");
    assert_pong(&mut ws);
    assert_eq!(metric_cores(addr), ["0"]);
    drop(ws);
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}

#[test]
fn unknown_config_key_is_a_clear_error() {
    let dir = TempDir::new("unknown");
    let top = dir.file("top.toml", "lisen = \"127.0.0.1:0\"\n");
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &top]));
    assert!(stderr.contains("`lisen`") && stderr.contains("unknown"), "the error names the key:\n{stderr}");
    let nested = dir.file("nested.toml", "listen = \"127.0.0.1:0\"\n[limits]\nmax_mesage_bytes = 5\n");
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &nested]));
    assert!(stderr.contains("`max_mesage_bytes`") && stderr.contains("unknown"), "the error names the key:\n{stderr}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let dir = TempDir::new("missing");
    let path = dir.path().join("does-not-exist.toml");
    let path = path.to_str().unwrap();
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", path, "--listen", "127.0.0.1:0"]));
    assert!(stderr.contains("does-not-exist.toml"), "the error names the file:\n{stderr}");
}

/// A storage directory that cannot be used stops the start with an error
/// naming it; a second relay on a directory in use is refused (it would
/// corrupt the first one's log).
#[test]
fn unusable_or_shared_storage_dir_is_refused_at_start() {
    let dir = TempDir::new("storage");
    let not_a_dir = dir.file("plain-file", "x");
    let path =
        dir.file("bad.toml", &format!("listen = \"127.0.0.1:0\"\ncores = [0]\n[storage]\ndir = \"{not_a_dir}\"\n"));
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &path]));
    assert!(stderr.contains("storage.dir") && stderr.contains("plain-file"), "the error names the dir:\n{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");

    let log = dir.path().join("log");
    let path = dir
        .file("ok.toml", &format!("listen = \"127.0.0.1:0\"\ncores = [0]\n[storage]\ndir = \"{}\"\n", log.display()));
    let first = Proc::spawn(&["serve", "--config", &path]);
    first.listening();
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--config", &path]));
    assert!(stderr.contains("in use by another docrelay process"), "{stderr}");
    stop(first);
}

// ---------------------------------------------------------------------------
// Start-up warnings

/// A default start warns about `dev` authentication (the protocol requires
/// that warning) and about nothing else: in particular not about the
/// open-file limit, from which the connection limit is derived.
#[test]
fn default_start_warns_only_about_dev_auth() {
    let proc = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let addr = proc.listening();
    assert_pong(&mut connect(addr, "/ws/documents/warnings"));
    let stderr = stop(proc);
    let warned = warnings(&stderr);
    assert_eq!(warned.len(), 1, "one warning, about dev auth:\n{stderr}");
    assert!(warned[0].contains("auth.mode = \"dev\""), "{stderr}");
    assert!(!stderr.contains("ulimit") && !stderr.contains("open-file"), "{stderr}");
}

/// A configured `limits.max_connections` that the open-file limit cannot
/// hold is kept, with a warning that says so.
#[test]
fn max_connections_beyond_the_open_file_limit_warns_and_starts() {
    const WANTED: libc::rlim_t = 100_000_000;
    let mut files = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) }, 0);
    if files.rlim_max == libc::RLIM_INFINITY || files.rlim_max > WANTED {
        eprintln!(
            "skipped: the open-file hard limit here ({}) holds {WANTED} connections, so there is nothing to warn about",
            files.rlim_max
        );
        return;
    }
    let dir = TempDir::new("max-connections");
    let path = dir
        .file("relay.toml", &format!("listen = \"127.0.0.1:0\"\ncores = [0]\n[limits]\nmax_connections = {WANTED}\n"));
    let proc = Proc::spawn(&["serve", "--config", &path]);
    let addr = proc.listening();
    let mut ws = connect(addr, "/ws/documents/many");
    assert_pong(&mut ws);
    drop(ws);
    let stderr = stop(proc);
    assert!(
        warnings(&stderr).iter().any(|l| l.contains("max_connections")),
        "no warning about max_connections:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Start-up errors

#[test]
fn cpu_that_does_not_exist_is_an_error() {
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--cores", "4096"]));
    assert!(stderr.contains("CPU 4096"), "stderr mentions the CPU:\n{stderr}");
}

#[test]
fn unparsable_cores_is_an_error() {
    for cores in ["x", "0,x", "1-", ""] {
        let stderr = expect_start_failure(Proc::spawn(&["serve", "--listen", "127.0.0.1:0", "--cores", cores]));
        assert!(stderr.contains("cores"), "--cores {cores:?}: stderr mentions cores:\n{stderr}");
    }
}

#[test]
fn address_held_by_another_relay_is_in_use() {
    // The library relay's listeners use SO_REUSEPORT, the way a second
    // process could silently share the port.
    let relay = relay(config());
    let addr = relay.local_addr();
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--listen", &addr.to_string()]));
    assert!(stderr.contains("already in use"), "{stderr}");
    // The first relay still owns every connection.
    for i in 0..8 {
        let mut ws = connect(addr, &format!("/ws/documents/still-mine-{i}"));
        assert_pong(&mut ws);
    }
}

#[test]
fn address_held_by_a_plain_listener_is_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--listen", &addr.to_string()]));
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn too_little_locked_memory_is_a_clear_error() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -l 64 && exec \"$0\" serve --listen 127.0.0.1:0", BIN]);
    let stderr = expect_start_failure(Proc::spawn_command(cmd));
    assert!(stderr.contains("ulimit -l"), "{stderr}");
}

/// The limit the locked-memory error recommends is enough to start.
#[test]
fn the_recommended_locked_memory_limit_is_enough() {
    let need_kib = docrelay::runtime::MIN_MEMLOCK_BYTES / 1024;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("ulimit -l {need_kib} && exec \"$0\" serve --listen 127.0.0.1:0"), BIN]);
    let mut proc = Proc::spawn_command(cmd);
    let addr = proc.listening();
    let mut ws = connect(addr, "/ws/documents/memlock");
    assert_pong(&mut ws);
    proc.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut ws).0, 1001);
    let _ = ws.flush();
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}

/// A command that runs the relay without `CAP_IPC_LOCK` (as `nobody` when the
/// tests run as root), with a locked-memory limit of `kib`.
fn unprivileged(kib: u64, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (setrlimit, getuid, setgroups,
    // setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: kib * 1024, rlim_max: kib * 1024 };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Without `CAP_IPC_LOCK` every executor's rings count against the limit:
/// the relay asks for enough per executor, and starts with what it asks for.
#[test]
fn without_ipc_lock_locked_memory_is_needed_per_executor() {
    let per = docrelay::runtime::MEMLOCK_PER_EXECUTOR_BYTES / 1024;
    let started = Instant::now();
    let stderr = expect_start_failure(Proc::spawn_command(unprivileged(
        per / 2,
        &["serve", "--listen", "127.0.0.1:0", "--cores", "0"],
    )));
    assert!(stderr.contains(&format!("ulimit -l {per}")), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "the refusal took {:?}", started.elapsed());

    let mut proc = Proc::spawn_command(unprivileged(per, &["serve", "--listen", "127.0.0.1:0", "--cores", "0"]));
    let addr = proc.listening();
    let mut ws = connect(addr, "/ws/documents/memlock-unprivileged");
    assert_pong(&mut ws);
    proc.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut ws).0, 1001);
    let _ = ws.flush();
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}

#[test]
fn dev_auth_on_a_public_address_needs_allow_insecure() {
    let stderr = expect_start_failure(Proc::spawn(&["serve", "--listen", "0.0.0.0:0", "--cores", "0"]));
    assert!(stderr.contains("--allow-insecure"), "{stderr}");

    let mut proc = Proc::spawn(&["serve", "--listen", "0.0.0.0:0", "--cores", "0", "--allow-insecure"]);
    let addr = proc.listening();
    assert!(addr.ip().is_unspecified(), "{addr}");
    let mut ws = connect(SocketAddr::from(([127, 0, 0, 1], addr.port())), "/ws/documents/insecure");
    assert_pong(&mut ws);
    proc.signal(libc::SIGTERM);
    let (code, _) = expect_close(&mut ws);
    assert_eq!(code, 1001);
    let _ = ws.flush();
    let status = proc.wait();
    assert_eq!(status.code(), Some(0), "{status}; stderr:\n{}", proc.stderr());
}

#[test]
fn jwt_auth_may_listen_on_a_public_address() {
    let dir = TempDir::new("jwt");
    let path = dir.file("relay.toml", "cores = [0]\n[auth]\nmode = \"jwt\"\njwt_secret = \"s3cret\"\n");
    let mut proc = Proc::spawn(&["serve", "--config", &path, "--listen", "0.0.0.0:0"]);
    let addr = proc.listening();
    assert!(addr.ip().is_unspecified(), "{addr}");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait().code(), Some(0), "{}", proc.stderr());
}
