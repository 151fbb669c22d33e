//! The process: host checks, listeners, one pinned glommio executor per
//! configured CPU, and the relay's handle (`docs/architecture.md`).
//!
//! Every core listens on the same port (SO_REUSEPORT), so the kernel spreads
//! new connections; [`core`] is the life of one core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::clock::{Clock, SystemClock};
use crate::config::{AuthMode, Config};
use crate::registry::ConnectionManager;
use crate::session::shard::ShardSetup;
use crate::validate::ConnectionValidator;

mod core;
mod host;
mod listen;

use self::core::{core_main, CoreMsg, CoreSetup, FdPressure};
pub use host::{MEMLOCK_PER_EXECUTOR_BYTES, MIN_MEMLOCK_BYTES};

/// Registered io_uring buffer memory per executor (locked memory, so kept
/// small): the log's writes use it when they fit, larger ones the heap.
const IO_MEMORY: usize = 64 * 1024;

/// io_uring submission depth per ring. Linux sizes a ring's cancellation hash
/// table from it (2^(log2(CQ entries) - 5) buckets, at most 256), and glommio
/// cancels and re-arms its preemption timer on the main ring on every loop
/// iteration; each cancel walks one bucket of the ring's pending polls, which
/// hold one entry per idle connection. At glommio's default depth (128: 8
/// buckets) that walk was 9% of the core's CPU with 5,000 connections; 4096
/// gives the full 256 buckets (rooms scenario: relay CPU 28% -> 22%).
const RING_DEPTH: usize = 4096;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: address already in use (another process, or one using SO_REUSEPORT, holds it)")]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for /metrics (metrics.listen) on {addr}: {source}")]
    MetricsListen { addr: SocketAddr, source: std::io::Error },
    #[error(
        "locked memory limit (ulimit -l) is {have_kib} KiB; docrelay needs at least {need_kib} KiB for io_uring. \
         Raise it with `ulimit -l {need_kib}` (or LimitMEMLOCK= in a systemd unit, --ulimit memlock= in Docker)"
    )]
    Memlock { have_kib: u64, need_kib: u64 },
    #[error(
        "auth.mode = \"dev\" accepts any token; refusing to listen on non-loopback address {addr}. \
         Use auth.mode = \"jwt\", a loopback address, or --allow-insecure"
    )]
    InsecureDevAuth { addr: SocketAddr },
    #[error("cannot start the executor for CPU {cpu}: {message}")]
    Executor { cpu: usize, message: String },
    #[error(transparent)]
    Storage(#[from] crate::store::recover::RecoverError),
    #[error("cluster mode: {0}")]
    Cluster(String),
}

/// How a relay is started, beyond its configuration.
#[derive(Default, Clone)]
pub struct RelayOptions {
    /// Allow `dev` authentication on a non-loopback address.
    pub allow_insecure: bool,
    /// An application validator, run after the built-in ones.
    pub validator: Option<Arc<dyn ConnectionValidator>>,
    /// The time source of rate limits; `None`: the system's monotonic clock.
    /// Tests pass a [`crate::clock::ManualClock`].
    pub clock: Option<Arc<dyn Clock>>,
}

/// A running relay. Dropping it shuts the relay down and waits for it.
pub struct RelayHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    control: Vec<flume::Sender<CoreMsg>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    registry: Arc<ConnectionManager>,
    cpus: Vec<usize>,
    /// The storage directory's lock, held while the relay runs.
    _storage_lock: Option<std::fs::File>,
    /// Cluster mode: the Redis bridge, stopped after the cores.
    bridge: Option<crate::cluster::Bridge>,
}

impl RelayHandle {
    /// The address the relay accepts on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address `/metrics` is served on when `metrics.listen` is set (the
    /// real port when 0 was configured); None: on [`RelayHandle::local_addr`].
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The connection registry and statistics.
    pub fn registry(&self) -> &ConnectionManager {
        &self.registry
    }

    /// The CPUs the executors are pinned to, in core-index order.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Asks every core to stop accepting and close its sessions with 1001.
    /// Returns at once; [`RelayHandle::join`] waits for the end.
    pub fn shutdown(&self) {
        for tx in &self.control {
            // Blocking send from a non-executor thread: the cores keep
            // draining their channels, so this completes.
            let _ = tx.send(CoreMsg::Shutdown);
        }
    }

    /// Waits until every core has exited.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            if let Err(e) = t.join() {
                warn!(error = %e, "core exited with an error");
            }
        }
        if let Some(b) = self.bridge.take() {
            b.stop();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            self.join_threads();
        }
    }
}

/// Entry point: checks the configuration and the host, starts one executor
/// per core, and returns once every core accepts connections.
pub fn start(mut config: Config, options: RelayOptions) -> Result<RelayHandle, StartError> {
    config.validate()?;
    let cpus = config.cores.resolve()?;
    host::check_memlock(cpus.len())?;
    config.limits.max_connections = Some(host::connection_limit(config.limits.max_connections));
    if config.auth.mode == AuthMode::Dev {
        if !config.listen.ip().is_loopback() && !options.allow_insecure {
            return Err(StartError::InsecureDevAuth { addr: config.listen });
        }
        warn!("auth.mode = \"dev\": any non-empty token is accepted; do not use in production");
    }
    let auth = Arc::new(Authenticator::from_config(&config)?);
    let clock: Arc<dyn Clock> = options.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
    let session_nonce = crate::clock::unique_u64();
    let cores = cpus.len();
    let (mut logs, storage_lock) = if config.storage.dir.is_empty() {
        (Vec::new(), None)
    } else {
        // Absolute from here on: glommio opens the directory for its syncs
        // with openat(-1, dir), which fails for a relative path (every write
        // then failed with EBADF).
        let dir = std::path::absolute(&config.storage.dir)
            .map_err(|e| crate::config::ConfigError::Invalid(format!("storage.dir {}: {e}", config.storage.dir)))?;
        config.storage.dir = dir.to_string_lossy().into_owned();
        host::ignore_file_size_signal();
        let s = &config.storage;
        let r = crate::store::recover::recover(
            std::path::Path::new(&s.dir),
            cores,
            config.documents.history_ops,
            s.segment_bytes,
        )?;
        let next = Arc::new(std::sync::atomic::AtomicU64::new(r.next_segment));
        (r.cores.into_iter().map(|ix| Some((ix, next.clone()))).collect(), Some(r.lock))
    };
    logs.resize_with(cores, || None);
    let mut logs = logs.into_iter();
    let (addr, mut listeners) = listen::bind_listeners(config.listen, cores)?;
    listeners.reverse();
    // `metrics.listen`: one listener, served by core 0.
    let (metrics_addr, mut metrics_listener) = match config.metrics.address()? {
        Some(at) => {
            let (bound, fd) = listen::bind_metrics_listener(at)?;
            (Some(bound), Some(fd))
        }
        None => (None, None),
    };
    let registry = Arc::new(ConnectionManager::new(cores));
    // Cluster mode: Redis must answer before the relay serves anyone; this
    // node's connection ids get their own range.
    let mut bridge = if config.cluster.enabled() {
        let b = crate::cluster::start(&config, cores, registry.clone()).map_err(StartError::Cluster)?;
        registry.set_id_base(b.number << 32);
        Some(b)
    } else {
        None
    };
    let config = Arc::new(config);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..cores).map(|_| flume::bounded::<CoreMsg>(config.limits.handoff_queue)).unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, usize>>();
    let fd_pressure = Arc::new(FdPressure::new());

    let mut threads = Vec::with_capacity(cores);
    let mut handle_err = None;
    for (index, (cpu, rx)) in cpus.iter().copied().zip(receivers).enumerate() {
        let setup = CoreSetup {
            shard: ShardSetup {
                index,
                config: config.clone(),
                registry: registry.clone(),
                auth: auth.clone(),
                clock: clock.clone(),
                session_nonce,
                log: logs.next().flatten(),
                cluster: bridge.as_mut().map(|b| b.core(index)),
            },
            listener: listeners.pop().expect("one listener per core"),
            metrics_listener: metrics_listener.take(),
            fd_pressure: fd_pressure.clone(),
            peers: senders.clone(),
            rx,
            validator: options.validator.clone(),
            ready: core::Ready::new(ready_tx.clone(), index),
        };
        let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("docrelay-core{index}"))
            .io_memory(IO_MEMORY)
            .ring_depth(RING_DEPTH)
            .spawn(move || core_main(setup));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                handle_err = Some(StartError::Executor { cpu, message: e.to_string() });
                break;
            }
        }
    }
    drop(ready_tx);

    let mut handle = RelayHandle {
        addr,
        metrics_addr,
        control: senders,
        threads,
        registry,
        cpus: cpus.clone(),
        _storage_lock: storage_lock,
        bridge,
    };
    if let Some(e) = handle_err {
        return Err(e);
    }
    // Wait until every core listens. A core that does not report ended
    // without starting (its executor failed): stop the others, and report
    // the first failure with its CPU.
    for _ in 0..cores {
        if !matches!(ready_rx.recv_timeout(Duration::from_secs(30)), Ok(Ok(_))) {
            handle.shutdown();
            let failed = handle
                .threads
                .drain(..)
                .zip(cpus.iter().copied())
                .filter_map(|(t, cpu)| t.join().err().map(|e| (cpu, e.to_string())))
                .next();
            let (cpu, message) = failed.unwrap_or((cpus[0], "executor did not start in 30 s".into()));
            let message = if message.contains("Cannot allocate memory") || message.contains("ENOMEM") {
                format!("{message} (io_uring needs locked memory: raise `ulimit -l`)")
            } else {
                message
            };
            return Err(StartError::Executor { cpu, message });
        }
    }
    info!(cores = cores, cpus = ?cpus, max_connections = config.limits.max_connections.unwrap_or_default(), "listening on {addr}");
    if let Some(at) = metrics_addr {
        info!("metrics listening on {at}");
    }
    if config.http.demo_enabled(config.auth.mode) {
        info!("demo: open http://{addr}/demo in two windows (the client is at http://{addr}/docrelay.js)");
    }
    handle.addr = addr;
    Ok(handle)
}
