//! One pinned glommio executor per configured CPU, and the life of a
//! connection on them: accept, HTTP head, 101, validation, and hand-off to the
//! core that owns the connection's document.
//!
//! Every core listens on the same port (SO_REUSEPORT), so the kernel spreads
//! new connections. After validation a connection whose document belongs to
//! another core is sent there as a duplicated file descriptor plus the bytes
//! already read past the request head, over that core's bounded flume channel.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::sleep;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use crate::auth::Authenticator;
use crate::config::{AuthMode, Config};
use crate::document::DocumentHub;
use crate::http::{self, HttpError, Route};
use crate::registry::{ConnectionManager, CoreStats, Rejection};
use crate::session::{self, CancelOnDrop, Conn, ConnInfo, Mode, Phase};
use crate::validate::{self, ConnectionValidator, ValidationRequest, Verdict, Verdicts};
use crate::ws::{close, OutFrame};

/// Locked memory glommio's io_uring rings need, per the measurements in
/// DEVELOPERS.md; checked at start for a clear error instead of a failure deep
/// inside the executor.
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

/// Registered io_uring buffer memory per executor: the relay does no file DMA.
const IO_MEMORY: usize = 64 * 1024;

/// io_uring submission depth per ring. Linux sizes a ring's cancellation hash
/// table from it (2^(log2(CQ entries) - 5) buckets, at most 256), and glommio
/// cancels and re-arms its preemption timer on the main ring on every loop
/// iteration; each cancel walks one bucket of the ring's pending polls, which
/// hold one entry per idle connection. At glommio's default depth (128: 8
/// buckets) that walk was 9% of the core's CPU with 5,000 connections; 4096
/// gives the full 256 buckets (rooms scenario: relay CPU 28% -> 22%).
const RING_DEPTH: usize = 4096;

/// Per-core read buffer shared by all sessions of the core.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: address already in use (another process, or one using SO_REUSEPORT, holds it)")]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
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
}

/// How a relay is started, beyond its configuration.
#[derive(Default, Clone)]
pub struct RelayOptions {
    /// Allow `dev` authentication on a non-loopback address.
    pub allow_insecure: bool,
    /// An application validator, run after the built-in ones.
    pub validator: Option<Arc<dyn ConnectionValidator>>,
}

/// Messages to a core.
pub(crate) enum CoreMsg {
    /// A validated connection whose document this core owns.
    Adopt(Handoff),
    /// Stop accepting, close every session with 1001, and exit.
    Shutdown,
}

/// A connection on its way to its owner core.
pub(crate) struct Handoff {
    fd: OwnedFd,
    info: ConnInfo,
    /// Bytes already read past the request head.
    pending: Vec<u8>,
}

/// The FNV-1a 64-bit hash (PROTOCOL.md section 9 places documents with it).
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The core index (not CPU id) that owns a document.
pub fn owner_core(document_id: &str, cores: usize) -> usize {
    (fnv1a_64(document_id.as_bytes()) % cores as u64) as usize
}

/// A running relay. Dropping it shuts the relay down and waits for it.
pub struct RelayHandle {
    addr: SocketAddr,
    control: Vec<flume::Sender<CoreMsg>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    registry: Arc<ConnectionManager>,
    cpus: Vec<usize>,
}

impl RelayHandle {
    /// The address the relay accepts on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
pub fn start(config: Config, options: RelayOptions) -> Result<RelayHandle, StartError> {
    config.validate()?;
    let cpus = config.cores.resolve()?;
    check_memlock()?;
    raise_nofile_limit(config.limits.max_connections);
    if config.auth.mode == AuthMode::Dev {
        if !config.listen.ip().is_loopback() && !options.allow_insecure {
            return Err(StartError::InsecureDevAuth { addr: config.listen });
        }
        warn!("auth.mode = \"dev\": any non-empty token is accepted; do not use in production");
    }
    let auth = Arc::new(crate::auth::Authenticator::from_config(&config)?);
    let session_nonce = {
        use std::hash::BuildHasher;
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nth = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::collections::hash_map::RandomState::new().hash_one((std::time::SystemTime::now(), std::process::id(), nth))
    };
    let cores = cpus.len();
    let (addr, mut listeners) = bind_listeners(config.listen, cores)?;
    listeners.reverse();
    let registry = Arc::new(ConnectionManager::new(cores));
    let config = Arc::new(config);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..cores).map(|_| flume::bounded::<CoreMsg>(config.limits.handoff_queue)).unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), std::io::Error>)>();

    let mut threads = Vec::with_capacity(cores);
    let mut handle_err = None;
    for (index, (cpu, rx)) in cpus.iter().copied().zip(receivers).enumerate() {
        let setup = CoreSetup {
            index,
            listener: listeners.pop().expect("one listener per core"),
            config: config.clone(),
            registry: registry.clone(),
            peers: senders.clone(),
            rx,
            validator: options.validator.clone(),
            auth: auth.clone(),
            session_nonce,
            ready: ready_tx.clone(),
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

    let mut handle = RelayHandle { addr, control: senders, threads, registry, cpus: cpus.clone() };
    if let Some(e) = handle_err {
        return Err(e);
    }
    // Wait until every core listens (or one fails).
    let mut ready = 0;
    while ready < cores {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok((_, Ok(()))) => ready += 1,
            Ok((index, Err(e))) => {
                let err = if e.kind() == std::io::ErrorKind::AddrInUse {
                    StartError::AddressInUse { addr }
                } else {
                    StartError::Listen { addr, source: e }
                };
                let _ = index;
                return Err(err);
            }
            Err(_) => {
                // A core thread ended without reporting: the executor failed to start.
                let message = handle
                    .threads
                    .drain(..)
                    .filter_map(|t| t.join().err().map(|e| e.to_string()))
                    .next()
                    .unwrap_or_else(|| "executor did not start".into());
                let message = if message.contains("Cannot allocate memory") || message.contains("ENOMEM") {
                    format!("{message} (io_uring needs locked memory: raise `ulimit -l`)")
                } else {
                    message
                };
                return Err(StartError::Executor { cpu: cpus[ready.min(cpus.len() - 1)], message });
            }
        }
    }
    info!(cores = cores, cpus = ?cpus, "listening on {addr}");
    handle.addr = addr;
    Ok(handle)
}

/// Raises the soft limit on open files to the hard limit (each connection is
/// one descriptor), and warns when even that is below `max_connections`.
fn raise_nofile_limit(max_connections: usize) {
    // SAFETY: getrlimit/setrlimit(2) on this process with a struct we own.
    let lim = unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim
    };
    if lim.rlim_cur != libc::RLIM_INFINITY && (lim.rlim_cur as usize) < max_connections + 64 {
        warn!(
            open_files = lim.rlim_cur,
            max_connections, "the open-file limit (ulimit -n) is below limits.max_connections; raise it"
        );
    }
}

/// Refuses to start when io_uring would not get the locked memory it needs.
fn check_memlock() -> Result<(), StartError> {
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < MIN_MEMLOCK_BYTES {
        return Err(StartError::Memlock { have_kib: lim.rlim_cur / 1024, need_kib: MIN_MEMLOCK_BYTES / 1024 });
    }
    Ok(())
}

/// Binds one listener per core on the same port. The listeners use
/// SO_REUSEPORT (so the kernel spreads connections over the cores), which
/// would also let another process using it share the port silently: a
/// configured port is therefore first bound once without it, which fails if
/// anyone holds the address. Port 0 needs no such check; the first listener
/// picks the port and holds it while the others join, so nothing can take it
/// in between.
fn bind_listeners(addr: SocketAddr, cores: usize) -> Result<(SocketAddr, Vec<OwnedFd>), StartError> {
    let in_use = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::AddrInUse => StartError::AddressInUse { addr },
        _ => StartError::Listen { addr, source: e },
    };
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(in_use)?);
    }
    let (first, bound) = bind_listener(addr).map_err(in_use)?;
    let mut fds = vec![first];
    for _ in 1..cores {
        fds.push(bind_listener(bound).map_err(in_use)?.0);
    }
    Ok((bound, fds))
}

struct CoreSetup {
    index: usize,
    /// This core's listening socket (bound in `start`).
    listener: OwnedFd,
    config: Arc<Config>,
    registry: Arc<ConnectionManager>,
    peers: Vec<flume::Sender<CoreMsg>>,
    rx: flume::Receiver<CoreMsg>,
    validator: Option<Arc<dyn ConnectionValidator>>,
    auth: Arc<Authenticator>,
    session_nonce: u64,
    ready: std::sync::mpsc::Sender<(usize, Result<(), std::io::Error>)>,
}

/// Everything one core owns. Lives in an `Rc` on that core only.
pub(crate) struct CoreCtx {
    pub(crate) index: usize,
    pub(crate) config: Arc<Config>,
    pub(crate) registry: Arc<ConnectionManager>,
    validator: Option<Arc<dyn ConnectionValidator>>,
    pub(crate) auth: Arc<Authenticator>,
    /// Drawn at start; makes `session_id`s unique across relays and restarts.
    pub(crate) session_nonce: u64,
    verdicts: Rc<Verdicts>,
    /// The documents this core owns, loaded on first join.
    documents: RefCell<HashMap<Box<str>, Rc<DocumentHub>>>,
    peers: Vec<flume::Sender<CoreMsg>>,
    /// Read buffer shared by the core's sessions (only borrowed inside a poll).
    pub(crate) scratch: RefCell<Vec<u8>>,
    sessions: RefCell<HashMap<u64, Rc<Conn>>>,
    /// Every per-connection task (handshakes and sessions), so shutdown can
    /// end the ones still running: glommio does not drop tasks left at exit.
    tasks: RefCell<HashMap<u64, glommio::task::JoinHandle<()>>>,
    next_task: Cell<u64>,
    pub(crate) shutting_down: Cell<bool>,
    ticker_waker: Cell<Option<Waker>>,
}

impl CoreCtx {
    pub(crate) fn stats(&self) -> &CoreStats {
        self.registry.core(self.index)
    }

    fn cores(&self) -> usize {
        self.peers.len()
    }

    /// DISCONNECTED bookkeeping for a session that ends.
    pub(crate) fn end_session(&self, conn: &Conn) {
        self.sessions.borrow_mut().remove(&conn.info.id);
        self.registry.unregister(conn.info.key);
        if conn.info.ip_counted {
            self.registry.remove_ip(conn.info.peer.ip());
        }
    }

    /// The hub of a document this core owns, created on first use.
    pub(crate) fn document(&self, id: &str) -> Rc<DocumentHub> {
        if let Some(hub) = self.documents.borrow().get(id) {
            return hub.clone();
        }
        let d = &self.config.documents;
        let hub = Rc::new(DocumentHub::new(id, d.ring_capacity, d.presence_ring_capacity, d.history_ops));
        self.documents.borrow_mut().insert(id.into(), hub.clone());
        self.stats().documents.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(document = id, core = self.index, "document loaded");
        hub
    }

    /// Frees documents that have had no session for `documents.idle_unload_ms`.
    fn unload_idle_documents(&self, now: Instant) {
        let after = Config::ms(self.config.documents.idle_unload_ms);
        let before = self.documents.borrow().len();
        self.documents
            .borrow_mut()
            .retain(|_, hub| hub.subscriber_count() > 0 || hub.empty_since.get().is_none_or(|t| now - t < after));
        let unloaded = before - self.documents.borrow().len();
        if unloaded > 0 {
            self.stats().documents.fetch_sub(unloaded, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Spawns a per-connection task that shutdown can cancel.
    fn spawn_tracked(self: &Rc<Self>, task: impl std::future::Future<Output = ()> + 'static) {
        let id = self.next_task.get();
        self.next_task.set(id + 1);
        let ctx = self.clone();
        let handle = glommio::spawn_local(async move {
            task.await;
            ctx.tasks.borrow_mut().remove(&id);
        })
        .detach();
        self.tasks.borrow_mut().insert(id, handle);
    }

    /// Starts a session for a validated connection on this core.
    fn adopt(self: &Rc<Self>, stream: TcpStream, info: ConnInfo, pending: Vec<u8>) {
        self.registry.set_core(info.key, self.index);
        let conn = Rc::new(Conn::new(info, stream, self.config.limits.max_message_bytes));
        self.sessions.borrow_mut().insert(conn.info.id, conn.clone());
        if let Some(w) = self.ticker_waker.take() {
            w.wake();
        }
        self.spawn_tracked(session::run(self.clone(), conn, pending));
    }
}

/// Pending connections the kernel queues per core before `accept`.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr` that shares the port with the other cores
/// (SO_REUSEPORT). Returns its fd, which stays ours so that shutdown can stop
/// the kernel from accepting on it.
fn bind_listener(addr: SocketAddr) -> std::io::Result<(OwnedFd, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_cloexec(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per connection.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let bound = socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    // SAFETY: into_raw_fd gives up the socket's ownership of a valid fd,
    // which the OwnedFd takes over.
    Ok((unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) }, bound))
}

async fn core_main(setup: CoreSetup) {
    let listen_fd = setup.listener;
    let listen_raw = listen_fd.as_raw_fd();
    // SAFETY: a bound, listening socket whose ownership moves to glommio.
    let listener = unsafe { TcpListener::from_raw_fd(listen_fd.into_raw_fd()) };
    let ctx = Rc::new(CoreCtx {
        index: setup.index,
        verdicts: Rc::new(Verdicts::new(setup.config.limits.validation_queue)),
        config: setup.config,
        registry: setup.registry,
        validator: setup.validator,
        auth: setup.auth,
        session_nonce: setup.session_nonce,
        documents: RefCell::new(HashMap::new()),
        peers: setup.peers,
        scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
        sessions: RefCell::new(HashMap::new()),
        tasks: RefCell::new(HashMap::new()),
        next_task: Cell::new(0),
        shutting_down: Cell::new(false),
        ticker_waker: Cell::new(None),
    });
    let collector = CancelOnDrop(glommio::spawn_local(ctx.verdicts.clone().run()).detach());
    let ticker = CancelOnDrop(glommio::spawn_local(ticker(ctx.clone())).detach());
    let acceptor = glommio::spawn_local(accept_loop(ctx.clone(), listener)).detach();
    let _ = setup.ready.send((setup.index, Ok(())));

    while let Ok(msg) = setup.rx.recv_async().await {
        match msg {
            CoreMsg::Adopt(h) => {
                ctx.stats().handoffs_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // SAFETY: the fd was duplicated for this hand-off and its
                // ownership moved here with the message; nothing else uses it.
                let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
                ctx.adopt(stream, h.info, h.pending);
            }
            CoreMsg::Shutdown => break,
        }
    }

    // Shutdown: stop accepting, close every session with 1001, wait for them.
    ctx.shutting_down.set(true);
    // shutdown(2) on a listening socket makes the kernel stop accepting on it
    // and fails an accept already submitted to io_uring, which cancelling the
    // task alone would leave to complete with a connection nobody handles.
    // SAFETY: shutdown(2) on the listener fd, still open (glommio's listener
    // lives in the acceptor task until it is cancelled below); non-blocking.
    unsafe { libc::shutdown(listen_raw, libc::SHUT_RDWR) };
    acceptor.cancel();
    let sessions: Vec<Rc<Conn>> = ctx.sessions.borrow().values().cloned().collect();
    for conn in sessions {
        conn.begin_close(&ctx, close::GOING_AWAY, "relay shutting down");
    }
    let deadline = Instant::now() + Config::ms(ctx.config.limits.shutdown_grace_ms);
    while !ctx.sessions.borrow().is_empty() && Instant::now() < deadline {
        // Connections handed to us meanwhile are closed the same way.
        while let Ok(CoreMsg::Adopt(h)) = setup.rx.try_recv() {
            // SAFETY: as above, the hand-off owns this fd.
            let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
            ctx.adopt(stream, h.info, h.pending);
        }
        sleep(Duration::from_millis(10)).await;
    }
    let left: Vec<Rc<Conn>> = ctx.sessions.borrow().values().cloned().collect();
    for conn in left {
        conn.abort();
    }
    // Let aborted sessions finish, then end whatever still runs (handshakes,
    // validations, sessions stuck on a dead peer): glommio leaks tasks that
    // are still pending when the executor returns, and their sockets with them.
    sleep(Duration::from_millis(10)).await;
    let tasks: Vec<_> = ctx.tasks.borrow_mut().drain().map(|(_, t)| t).collect();
    for t in tasks {
        t.cancel();
    }
    drop((collector, ticker));
    // Publishers now get PublishError::Closed.
    ctx.verdicts.close();
    // Hand-offs that arrived too late: their fds close as they drop.
    while let Ok(msg) = setup.rx.try_recv() {
        if let CoreMsg::Adopt(h) = msg {
            ctx.registry.unregister(h.info.key);
            if h.info.ip_counted {
                ctx.registry.remove_ip(h.info.peer.ip());
            }
        }
    }
    // One more turn of the executor drops the cancelled tasks.
    sleep(Duration::from_millis(1)).await;
    debug!(core = ctx.index, "core stopped");
}

async fn accept_loop(ctx: Rc<CoreCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                ctx.spawn_tracked(handshake(ctx.clone(), stream));
            }
            Err(_) if ctx.shutting_down.get() => return,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, core = ctx.index, "accept failed");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Timeouts, checked a few times a second by one task per core instead of a
/// timer per connection: the close handshake deadline, idle clients, pings.
/// Sleeps entirely while the core has no sessions, so an idle relay uses no CPU.
async fn ticker(ctx: Rc<CoreCtx>) {
    let limits = &ctx.config.limits;
    let close_timeout = Config::ms(limits.close_timeout_ms);
    let idle = Config::ms(limits.idle_timeout_ms);
    let ping = Config::ms(limits.ping_interval_ms);
    let auth_timeout = Config::ms(limits.auth_timeout_ms);
    let period =
        close_timeout.min(idle).min(ping).div_f32(4.0).clamp(Duration::from_millis(5), Duration::from_millis(250));
    loop {
        poll_fn(|cx| {
            if ctx.sessions.borrow().is_empty() && ctx.documents.borrow().is_empty() {
                ctx.ticker_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        sleep(period).await;
        let now = Instant::now();
        ctx.unload_idle_documents(now);
        let sessions: Vec<Rc<Conn>> = ctx.sessions.borrow().values().cloned().collect();
        for conn in sessions {
            match conn.lifecycle.get() {
                Phase::Closing if conn.closing_since.get().is_some_and(|t| now - t >= close_timeout) => {
                    conn.abort();
                }
                Phase::Connected => {
                    let quiet = now - conn.last_rx.get();
                    let unauthenticated = conn.info.mode == Mode::Document && !conn.state.borrow().is_authenticated();
                    if unauthenticated && now - conn.connected_at >= auth_timeout {
                        conn.begin_close(&ctx, crate::protocol::AUTH_TIMEOUT, "authentication timeout");
                    } else if quiet >= idle {
                        conn.begin_close(&ctx, close::GOING_AWAY, "idle timeout");
                    } else if quiet >= ping && now - conn.last_ping.get() >= ping {
                        conn.last_ping.set(now);
                        conn.send(&ctx, Rc::new(OutFrame::new(crate::ws::Kind::Ping, b"")));
                    }
                }
                _ => {}
            }
        }
    }
}

/// What a handshake produced.
enum HeadRead {
    Complete,
    Closed,
    Invalid(HttpError),
}

/// First size of the buffer a request head is read into.
const HEAD_BUFFER_START: usize = 1024;

/// Reads until the request head is complete, too large, or malformed.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, max_head: usize) -> HeadRead {
    // Room for the head plus a first frame pipelined behind it, grown as
    // needed: most heads fit the first KiB, and a storm of handshakes in
    // flight would otherwise hold `cap` bytes each.
    let cap = max_head + 1024;
    buf.resize(HEAD_BUFFER_START.min(cap), 0);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize((buf.len() * 2).min(cap), 0);
        }
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(n) => n,
        };
        filled += n;
        let (mut small, mut big) = ([httparse::EMPTY_HEADER; http::MAX_HEADERS], Vec::new());
        match http::parse_head_any(&buf[..filled], &mut small, &mut big, max_head) {
            Ok(Some(_)) => {
                buf.truncate(filled);
                return HeadRead::Complete;
            }
            Ok(None) if filled < cap => continue,
            Ok(None) => return HeadRead::Invalid(HttpError::HeadTooLarge),
            Err(e) => return HeadRead::Invalid(e),
        }
    }
}

/// Writes a last answer, then half-closes and drains what the peer still
/// sends (bounded), so the kernel does not reset the connection while our
/// answer is in flight.
async fn answer_and_close(ctx: &CoreCtx, mut stream: TcpStream, answer: &[u8]) {
    if stream.write_all(answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let drain = async {
        let mut sink = [0u8; 1024];
        let mut budget = 64 * 1024;
        while let Ok(n @ 1..) = stream.read(&mut sink).await {
            budget -= n.min(budget);
            if budget == 0 {
                break;
            }
        }
    };
    drain.or(sleep(Config::ms(ctx.config.limits.close_timeout_ms))).await;
}

/// UPGRADING and VALIDATING for one accepted connection, then its hand-off.
async fn handshake(ctx: Rc<CoreCtx>, mut stream: TcpStream) {
    let limits = &ctx.config.limits;
    let Ok(peer) = stream.peer_addr() else { return };
    let mut buf = Vec::new();
    let timeout = async {
        sleep(Config::ms(limits.handshake_timeout_ms)).await;
        None
    };
    let read = async { Some(read_head(&mut stream, &mut buf, limits.max_head_bytes).await) }.or(timeout).await;
    match read {
        None => {
            ctx.registry.count_rejection(Rejection::HandshakeTimeout);
            return; // closed, nothing else
        }
        Some(HeadRead::Closed) => return,
        Some(HeadRead::Invalid(e)) => {
            ctx.registry.count_rejection(e.rejection());
            answer_and_close(&ctx, stream, &e.response()).await;
            return;
        }
        Some(HeadRead::Complete) => {}
    }
    ctx.registry.count_http_request();
    let (mut small, mut big) = ([httparse::EMPTY_HEADER; http::MAX_HEADERS], Vec::new());
    let head = match http::parse_head_any(&buf, &mut small, &mut big, limits.max_head_bytes) {
        Ok(Some(h)) => h,
        _ => return, // parsed complete a moment ago
    };
    let route = match http::route(&head, &ctx.config.testing.echo_path) {
        Ok(r) => r,
        Err(e) => {
            ctx.registry.count_rejection(e.rejection());
            answer_and_close(&ctx, stream, &e.response()).await;
            return;
        }
    };
    let (document, accept, mode) = match route {
        Route::Health => return answer_and_close(&ctx, stream, &http::health()).await,
        Route::Metrics => return answer_and_close(&ctx, stream, &http::metrics(&ctx.registry)).await,
        Route::Document { id, accept } => (id, accept, Mode::Document),
        Route::Echo { accept } => (head.path, accept, Mode::Echo),
    };
    if stream.write_all(&http::switching_protocols(&accept)).await.is_err() {
        return;
    }
    // UPGRADING is done: register (VALIDATING) so the peak counts it.
    let Some((key, id)) = ctx.registry.register(peer, document, ctx.index) else {
        return;
    };
    let registration = Registration { registry: &ctx.registry, key, peer, ip_counted: Cell::new(false), armed: true };
    let color = http::query_param(head.query, "color").and_then(http::parse_color);
    let request =
        ValidationRequest { headers: head.headers, path: head.path, query: head.query, peer, document_id: document };
    let pending = buf[head.len..].to_vec();
    let outcome = match mode {
        Mode::Echo => Ok(()),
        Mode::Document => validate_connection(&ctx, &request, &registration).await,
    };
    let info =
        ConnInfo { id, key, peer, document: document.into(), mode, color, ip_counted: registration.ip_counted.get() };
    drop(buf);
    if let Err((code, reason, why)) = outcome {
        ctx.registry.count_rejection(why);
        ctx.registry.set_phase(key, Phase::Disconnected);
        debug!(id, code, reason = %reason, "validation failed");
        answer_and_close(&ctx, stream, OutFrame::close(code, &reason).bytes()).await;
        return; // `registration` unregisters
    }
    let owner = match mode {
        Mode::Echo => ctx.index,
        Mode::Document => owner_core(&info.document, ctx.cores()),
    };
    if owner == ctx.index {
        registration.disarm();
        ctx.adopt(stream, info, pending);
        return;
    }
    // Move to the owner core: a duplicate of the fd travels; our copy closes.
    // SAFETY: dup(2) of the socket fd we own; the new fd is owned by OwnedFd.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot hand off connection");
        return;
    }
    // SAFETY: `dup` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    drop(stream);
    // If the owner has stopped (shutdown), the message and its fd are
    // dropped, which closes the connection, and `registration` unregisters.
    if ctx.peers[owner].send_async(CoreMsg::Adopt(Handoff { fd, info, pending })).await.is_ok() {
        registration.disarm();
    }
}

/// A connection's registry entry between the upgrade and its adoption by a
/// session: unregistered on drop (refusal, failed hand-off, or the handshake
/// task cancelled at shutdown) unless a session took it over.
struct Registration<'a> {
    registry: &'a ConnectionManager,
    key: crate::registry::ConnKey,
    peer: SocketAddr,
    ip_counted: Cell<bool>,
    armed: bool,
}

impl Registration<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.registry.unregister(self.key);
            if self.ip_counted.get() {
                self.registry.remove_ip(self.peer.ip());
            }
        }
    }
}

/// VALIDATING: the built-in validators, then the application's, whose verdict
/// is awaited without blocking the core. Err carries the close code, reason
/// and the statistic to count.
async fn validate_connection(
    ctx: &CoreCtx,
    request: &ValidationRequest<'_>,
    registration: &Registration<'_>,
) -> Result<(), (u16, String, Rejection)> {
    match validate::builtin(&ctx.config, &ctx.registry, request) {
        Ok(counted) => registration.ip_counted.set(counted),
        Err(r) => return Err((r.code, r.reason.to_string(), Rejection::Validation)),
    }
    let Some(validator) = ctx.validator.clone() else {
        return Ok(());
    };
    let verdict = ctx.verdicts.start(validator.as_ref(), request);
    let ticket = verdict.ticket;
    let timeout = async {
        sleep(Config::ms(ctx.config.limits.validation_timeout_ms)).await;
        None
    };
    match async { Some(verdict.await) }.or(timeout).await {
        Some(Verdict::Accept) => Ok(()),
        Some(Verdict::Reject { code, reason }) => Err((code, reason, Rejection::Validation)),
        Some(Verdict::Pending) => Err((4000, "validation failed".into(), Rejection::Validation)),
        None => {
            ctx.verdicts.cancel(ticket);
            Err((close::INTERNAL, "validation timed out".into(), Rejection::ValidationTimeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }
}
