//! The life of one core: its executor's main task, accept, the handshake
//! (UPGRADING and VALIDATING), the hand-off of a validated connection to the
//! core that owns its document, and shutdown.
//!
//! After validation a connection whose document belongs to another core is
//! sent there as a duplicated file descriptor plus the bytes already read
//! past the request head, over that core's bounded flume channel. The
//! duplicate (like the registry entry) is taken before the 101: a relay
//! without room answers 503 rather than drop an upgraded connection.
//!
//! Each core keeps a spare descriptor so that even at the open-file limit a
//! new client is accepted and answered 503 instead of waiting in the
//! backlog ([`accept_loop`]).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::sleep;
use tracing::{debug, warn};

use crate::assets;
use crate::close;
use crate::config::Config;
use crate::http::{self, HttpError, Route};
use crate::placement::owner_core;
use crate::registry::{ConnKey, ConnectionManager, Refused, Rejection};
use crate::session::shard::ShardSetup;
use crate::session::{CancelOnDrop, ConnInfo, Mode, Shard};
use crate::validate::{self, ConnectionValidator, ValidationRequest, Verdict, Verdicts};
use crate::ws::OutFrame;

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

/// What a core is started with.
pub(crate) struct CoreSetup {
    pub(crate) shard: ShardSetup,
    /// This core's listening socket (bound in `start`).
    pub(crate) listener: OwnedFd,
    /// The `metrics.listen` socket, on the one core that serves it.
    pub(crate) metrics_listener: Option<OwnedFd>,
    /// Shared by every core of the relay.
    pub(crate) fd_pressure: Arc<FdPressure>,
    pub(crate) peers: Vec<flume::Sender<CoreMsg>>,
    pub(crate) rx: flume::Receiver<CoreMsg>,
    pub(crate) validator: Option<Arc<dyn ConnectionValidator>>,
    /// Tells `start` whether this core started.
    pub(crate) ready: Ready,
}

/// Reports to `start` whether a core started: `Ok(index)` once it accepts,
/// `Err(index)` when dropped before that (its executor could not be created,
/// e.g. for lack of locked memory), so that `start` never waits for a core
/// that is gone.
pub(crate) struct Ready {
    tx: std::sync::mpsc::Sender<Result<usize, usize>>,
    index: usize,
    sent: bool,
}

impl Ready {
    pub(crate) fn new(tx: std::sync::mpsc::Sender<Result<usize, usize>>, index: usize) -> Ready {
        Ready { tx, index, sent: false }
    }

    fn started(&mut self) {
        self.sent = true;
        let _ = self.tx.send(Ok(self.index));
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if !self.sent {
            let _ = self.tx.send(Err(self.index));
        }
    }
}

/// The connection path of one core, beside its shard.
struct Core {
    shard: Rc<Shard>,
    validator: Option<Arc<dyn ConnectionValidator>>,
    verdicts: Rc<Verdicts>,
    peers: Vec<flume::Sender<CoreMsg>>,
    /// A descriptor kept open (on `/dev/null`) so that a client arriving
    /// when no descriptor is free can still be accepted, told 503 and
    /// closed, instead of waiting unanswered in the backlog. None while it is
    /// given up for that, or could not be reopened.
    spare: RefCell<Option<std::fs::File>>,
    /// The 503 for those clients, built once.
    fd_limit_answer: Vec<u8>,
    fd_pressure: Arc<FdPressure>,
    /// Rate limits of the warnings about failed accepts and hand-offs.
    accept_warnings: Throttle,
    handoff_warnings: Throttle,
}

/// When a core of the relay last found no descriptor free. The cores share
/// one table of descriptors: the slot one core frees by closing its spare
/// can be taken by another core's accept. While the relay is at the limit
/// (a core found no descriptor free in the last [`FdPressure::WINDOW`]),
/// every core therefore takes a connection only if one more descriptor is
/// free beside it, and answers 503 otherwise.
pub(crate) struct FdPressure {
    base: Instant,
    /// Milliseconds after `base`, plus 1, of the last time; 0: never.
    last: AtomicU64,
}

impl FdPressure {
    const WINDOW: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> FdPressure {
        FdPressure { base: Instant::now(), last: AtomicU64::new(0) }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// A core found no descriptor free.
    fn note(&self) {
        self.last.store(self.now(), SeqCst);
    }

    /// Whether a core found no descriptor free lately.
    fn recent(&self) -> bool {
        let last = self.last.load(SeqCst);
        last != 0 && self.now().saturating_sub(last) < Self::WINDOW.as_millis() as u64
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// The main address: WebSocket, `/healthz`, and `/metrics` unless
    /// `metrics.listen` is set.
    Main,
    /// `metrics.listen`: `/metrics` and `/healthz` only.
    Metrics,
}

/// A warning logged at most once per [`Throttle::EVERY`] per core, with how
/// many times its cause happened since the last one: at the open-file
/// limit a failed accept would otherwise be logged for every attempt.
#[derive(Default)]
struct Throttle {
    last: Cell<Option<Instant>>,
    count: Cell<u64>,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    /// Counts one occurrence; Some(occurrences since the last report, this
    /// one included) when a report is due now.
    fn tick(&self) -> Option<u64> {
        self.count.set(self.count.get() + 1);
        let now = Instant::now();
        if self.last.get().is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return None;
        }
        self.last.set(Some(now));
        Some(self.count.replace(0))
    }
}

/// How often a core at the open-file limit looks whether a client waits.
const FD_LIMIT_POLL: Duration = Duration::from_millis(5);

/// Back-off after an accept that failed for another reason (out of memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Core {
    fn config(&self) -> &Config {
        &self.shard.config
    }

    fn registry(&self) -> &ConnectionManager {
        &self.shard.registry
    }

    /// Reopens the spare descriptor if it is not open; whether it is now.
    fn keep_spare(&self) -> bool {
        let mut spare = self.spare.borrow_mut();
        if spare.is_none() {
            *spare = std::fs::File::open("/dev/null").ok();
        }
        spare.is_some()
    }

    /// Whether a connection just accepted may be served: the spare is (or
    /// could be re)opened beside it, and while the relay is at the limit
    /// one more descriptor is free too ([`FdPressure`]). Otherwise it holds
    /// the last free descriptor and is answered 503.
    fn has_room(&self) -> bool {
        if !self.keep_spare() {
            return false;
        }
        // Opened and closed at once: only while the relay is at the limit.
        !self.fd_pressure.recent() || std::fs::File::open("/dev/null").is_ok()
    }

    /// Answers a client that holds the last free descriptor with 503 and
    /// closes it at once, without yielding, so that no other task takes the
    /// descriptor meanwhile; then the spare is reopened in its place. What
    /// the client already sent is read first, so that the close is a FIN and
    /// not a reset that could destroy the answer.
    fn refuse_at_fd_limit(&self, stream: TcpStream) {
        let fd = stream.as_raw_fd();
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            // SAFETY: recv(2) into a buffer we own, on the socket `stream`
            // owns and keeps open; MSG_DONTWAIT: it never blocks.
            let n = unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
        }
        let answer = &self.fd_limit_answer;
        // SAFETY: send(2) from a buffer we own on the same socket; it never
        // blocks (MSG_DONTWAIT; a new socket's buffer holds the short
        // answer) and raises no SIGPIPE (MSG_NOSIGNAL). shutdown(2) then
        // sends the FIN at once, whoever else (io_uring) still holds the socket.
        unsafe {
            libc::send(fd, answer.as_ptr().cast(), answer.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            libc::shutdown(fd, libc::SHUT_WR);
        }
        drop(stream);
        self.registry().count_refusal(Refused::FdLimit);
        self.keep_spare();
        if let Some(refused) = self.accept_warnings.tick() {
            warn!(
                core = self.shard.index,
                refused,
                "accept failed: too many open files (ulimit -n); new connections are answered 503 \
                 (refused counts them since the last report; reported at most every 10 s)"
            );
        }
    }

    /// Adopts a connection handed over by another core.
    fn adopt_handoff(&self, h: Handoff) {
        self.shard.stats().handoffs_in.add(1);
        // SAFETY: the fd was duplicated for this hand-off and its ownership
        // moved here with the message; nothing else uses it.
        let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
        self.shard.adopt(stream, h.info, h.pending);
    }
}

pub(crate) async fn core_main(mut setup: CoreSetup) {
    let index = setup.shard.index;
    let listen_fd = setup.listener;
    let listen_raw = listen_fd.as_raw_fd();
    // SAFETY: a bound, listening socket whose ownership moves to glommio.
    let listener = unsafe { TcpListener::from_raw_fd(listen_fd.into_raw_fd()) };
    let metrics_raw = setup.metrics_listener.as_ref().map(|fd| fd.as_raw_fd());
    // SAFETY: as above, for the metrics listener.
    let metrics_listener = setup.metrics_listener.map(|fd| unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) });
    let shard = Shard::new(setup.shard);
    let spare = std::fs::File::open("/dev/null");
    if let Err(e) = &spare {
        warn!(core = index, error = %e, "cannot open a spare descriptor: clients at the open-file limit will wait");
    }
    let core = Rc::new(Core {
        verdicts: Rc::new(Verdicts::new(shard.config.limits.validation_queue)),
        shard: shard.clone(),
        validator: setup.validator,
        peers: setup.peers,
        spare: RefCell::new(spare.ok()),
        fd_limit_answer: http::fd_limit(),
        fd_pressure: setup.fd_pressure,
        accept_warnings: Throttle::default(),
        handoff_warnings: Throttle::default(),
    });
    let collector = CancelOnDrop(glommio::spawn_local(core.verdicts.clone().run()).detach());
    let ticker = CancelOnDrop(glommio::spawn_local(shard.clone().ticker()).detach());
    // The log's flusher and the commit loop run in a task queue of their own
    // whose latency matters: glommio then preempts the sessions' queue at
    // least every millisecond and looks for I/O completions, so a finished
    // fdatasync is seen (and its acks sent) without waiting until every busy
    // session has run (by default up to 100 ms).
    let storage_queue = glommio::executor().create_task_queue(
        glommio::Shares::Static(1000),
        glommio::Latency::Matters(Duration::from_millis(1)),
        "docrelay-storage",
    );
    let spawn_storage = |task: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>| {
        glommio::spawn_local_into(task, storage_queue).expect("a task queue just created accepts tasks").detach()
    };
    let commits = CancelOnDrop(spawn_storage(Box::pin(shard.clone().commit_loop())));
    let flusher = shard.log.clone().map(|log| spawn_storage(Box::pin(log.run())));
    // Cluster mode: what the Redis bridge sends this core, and the requests
    // that wait for room in its channel.
    let cluster_tasks = shard.cluster.is_some().then(|| {
        let events = spawn_storage(Box::pin(shard.clone().cluster_loop()));
        let drain = shard.clone();
        let backlog = glommio::spawn_local(async move {
            if let Some(c) = &drain.cluster {
                c.drain_backlog().await;
            }
        })
        .detach();
        (CancelOnDrop(events), CancelOnDrop(backlog))
    });
    let acceptor = glommio::spawn_local(accept_loop(core.clone(), listener, listen_raw, Listener::Main)).detach();
    let metrics_acceptor = metrics_listener.zip(metrics_raw).map(|(listener, raw)| {
        glommio::spawn_local(accept_loop(core.clone(), listener, raw, Listener::Metrics)).detach()
    });
    setup.ready.started();

    while let Ok(msg) = setup.rx.recv_async().await {
        match msg {
            CoreMsg::Adopt(h) => core.adopt_handoff(h),
            CoreMsg::Shutdown => break,
        }
    }

    // Shutdown: stop accepting. shutdown(2) on a listening socket makes the
    // kernel stop accepting on it and fails an accept already submitted to
    // io_uring, which cancelling the task alone would leave to complete with
    // a connection nobody handles.
    // SAFETY: shutdown(2) on the listener fd, still open (glommio's listener
    // lives in the acceptor task until it is cancelled and awaited below);
    // non-blocking.
    unsafe { libc::shutdown(listen_raw, libc::SHUT_RDWR) };
    acceptor.cancel();
    acceptor.await;
    if let (Some(raw), Some(acceptor)) = (metrics_raw, metrics_acceptor) {
        // SAFETY: as above, on the metrics listener, open until its
        // acceptor is cancelled and awaited here.
        unsafe { libc::shutdown(raw, libc::SHUT_RDWR) };
        acceptor.cancel();
        acceptor.await;
    }
    // Close every session with 1001; connections handed to us meanwhile are
    // closed the same way, as they are adopted. Wait until the last session
    // has ended, at most `shutdown_grace_ms`.
    shard.begin_shutdown();
    let grace = Instant::now() + Config::ms(shard.config.limits.shutdown_grace_ms);
    if !drain_until(&core, &setup.rx, grace).await {
        // Sessions stuck on a dead peer: fail them, and wait (boundedly) for
        // their tasks to see it.
        shard.abort_sessions();
        let close = Instant::now() + Config::ms(shard.config.limits.close_timeout_ms);
        drain_until(&core, &setup.rx, close).await;
    }
    // End whatever still runs (handshakes, validations, sessions that did
    // not finish): glommio leaks tasks still pending when the executor
    // returns, and their sockets with them. Each is awaited until dropped.
    shard.cancel_tasks().await;
    // Whatever was accepted is written before the core exits.
    if let (Some(log), Some(flusher)) = (&shard.log, flusher) {
        log.close();
        flusher.await;
    }
    for mut task in [collector, ticker, commits] {
        task.0.cancel();
        (&mut task.0).await;
    }
    if let Some((events, backlog)) = cluster_tasks {
        // The sessions' leaves still waiting for the bridge get a moment
        // to reach it (the bridge also unlists this node's sessions as it
        // stops).
        let deadline = Instant::now() + Duration::from_secs(1);
        while shard.cluster.as_ref().is_some_and(|c| !c.is_drained()) && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        for mut task in [events, backlog] {
            task.0.cancel();
            (&mut task.0).await;
        }
    }
    // Publishers now get PublishError::Closed.
    core.verdicts.close();
    // Hand-offs that arrived too late: their fds close as they drop.
    while let Ok(msg) = setup.rx.try_recv() {
        if let CoreMsg::Adopt(h) = msg {
            unregister(core.registry(), h.info.key, h.info.peer, h.info.ip_counted);
        }
    }
    debug!(core = index, "core stopped");
}

/// Adopts hand-offs until the core has no session left (true) or `deadline`
/// passes (false). Waits on the sessions' completion, never polls.
async fn drain_until(core: &Core, rx: &flume::Receiver<CoreMsg>, deadline: Instant) -> bool {
    enum Event {
        Ended,
        Msg(Option<CoreMsg>),
        Deadline,
    }
    // Every core holds a sender to itself, so the channel stays open; should
    // it ever close, only the sessions are waited for.
    let mut open = true;
    loop {
        let ended = async {
            core.shard.sessions_ended().await;
            Event::Ended
        };
        let msg = async {
            if !open {
                std::future::pending::<()>().await;
            }
            Event::Msg(rx.recv_async().await.ok())
        };
        let timeout = async {
            sleep(deadline.saturating_duration_since(Instant::now())).await;
            Event::Deadline
        };
        match ended.or(msg).or(timeout).await {
            Event::Ended => return true,
            Event::Deadline => return false,
            Event::Msg(Some(CoreMsg::Adopt(h))) => core.adopt_handoff(h),
            Event::Msg(Some(CoreMsg::Shutdown)) => {} // already shutting down
            Event::Msg(None) => open = false,
        }
    }
}

/// Accepts on one listener (`listen_fd` is its descriptor) until cancelled.
///
/// At the open-file limit the kernel fails every accept at once, whether a
/// client waits or not, and a waiting client would hang in the backlog. So
/// the core then looks (every [`FD_LIMIT_POLL`]) whether a client waits,
/// gives up its spare descriptor, accepts the client into it and answers it
/// 503 ([`Core::refuse_at_fd_limit`]), and reopens the spare.
async fn accept_loop(core: Rc<Core>, listener: TcpListener, listen_fd: RawFd, kind: Listener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if core.has_room() {
                    core.shard.spawn_tracked(handshake(core.clone(), stream, kind));
                } else {
                    // The client took the slot of the spare, and no other
                    // descriptor is free.
                    core.refuse_at_fd_limit(stream);
                }
            }
            Err(_) if core.shard.is_shutting_down() => return,
            Err(e) if is_fd_limit(&e) => {
                core.fd_pressure.note();
                while !has_waiting_client(listen_fd) {
                    sleep(FD_LIMIT_POLL).await;
                }
                // Noted again: the other cores must see it before the slot
                // of the spare is free (see `FdPressure`).
                core.fd_pressure.note();
                if core.spare.borrow_mut().take().is_none() {
                    // No spare to give up (another core took the slot it
                    // freed): get one back as soon as a descriptor frees up.
                    if let Some(failed) = core.accept_warnings.tick() {
                        warn!(core = core.shard.index, error = %e, failed, "accept failed, and no spare descriptor to answer 503 with");
                    }
                    sleep(FD_LIMIT_POLL).await;
                    core.keep_spare();
                }
            }
            Err(e) => {
                // Out of memory or buffers: back off instead of spinning.
                if let Some(failed) = core.accept_warnings.tick() {
                    warn!(core = core.shard.index, error = %e, failed, "accept failed (reported at most every 10 s)");
                }
                sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// EMFILE or ENFILE: no descriptor free for the process or the system.
fn is_fd_limit(e: &glommio::GlommioError<()>) -> bool {
    matches!(e, glommio::GlommioError::IoError(io) if matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

/// Whether a connection waits to be accepted on the listener `fd`.
fn has_waiting_client(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own, with timeout 0: it never blocks.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
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
async fn answer_and_close(config: &Config, mut stream: TcpStream, answer: &[u8]) {
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
    drain.or(sleep(Config::ms(config.limits.close_timeout_ms))).await;
}

/// UPGRADING and VALIDATING for one accepted connection, then its hand-off.
async fn handshake(core: Rc<Core>, mut stream: TcpStream, kind: Listener) {
    let config = core.config();
    let limits = &config.limits;
    let registry = core.registry();
    let Ok(peer) = stream.peer_addr() else { return };
    let mut buf = Vec::new();
    let timeout = async {
        sleep(Config::ms(limits.handshake_timeout_ms)).await;
        None
    };
    let read = async { Some(read_head(&mut stream, &mut buf, limits.max_head_bytes).await) }.or(timeout).await;
    match read {
        None => {
            registry.count_rejection(Rejection::HandshakeTimeout);
            return; // closed, nothing else
        }
        Some(HeadRead::Closed) => return,
        Some(HeadRead::Invalid(e)) => {
            registry.count_rejection(Rejection::of_http(&e));
            answer_and_close(config, stream, &e.response()).await;
            return;
        }
        Some(HeadRead::Complete) => {}
    }
    registry.count_http_request();
    let (mut small, mut big) = ([httparse::EMPTY_HEADER; http::MAX_HEADERS], Vec::new());
    let head = match http::parse_head_any(&buf, &mut small, &mut big, limits.max_head_bytes) {
        Ok(Some(h)) => h,
        _ => return, // parsed complete a moment ago
    };
    let endpoints = match kind {
        Listener::Main => http::Endpoints {
            websocket: true,
            metrics: config.metrics.listen.is_empty(),
            echo_path: &config.testing.echo_path,
            demo: config.http.demo_enabled(config.auth.mode),
        },
        Listener::Metrics => http::Endpoints::METRICS_ONLY,
    };
    let route = match http::route(&head, &endpoints) {
        Ok(r) => r,
        Err(e) => {
            registry.count_rejection(Rejection::of_http(&e));
            answer_and_close(config, stream, &e.response()).await;
            return;
        }
    };
    let plain = |response: Vec<u8>, head_only: bool| if head_only { http::head_only(response) } else { response };
    let (document, accept, mode) = match route {
        Route::Health { head } => {
            return answer_and_close(config, stream, &plain(registry.health_response(), head)).await
        }
        Route::Metrics { head } => {
            return answer_and_close(config, stream, &plain(registry.metrics_response(), head)).await
        }
        Route::Asset { asset, head: head_only } => {
            let answer = assets::response(asset, head.headers_named("if-none-match"));
            return answer_and_close(config, stream, &plain(answer, head_only)).await;
        }
        Route::Document { id, accept } => (id, accept, Mode::Document),
        Route::Echo { accept } => (head.path, accept, Mode::Echo),
        Route::Yjs { id, accept } => (id, accept, Mode::Yjs),
    };
    // Everything the connection needs beyond its socket is taken before the
    // 101, so that a relay without room says so (503) while the connection
    // is still plain HTTP, instead of dropping it after its 101. First, for
    // a document of another core, the descriptor of its hand-off: a
    // duplicate of ours, which travels to the owner core while our copy
    // closes.
    let index = core.shard.index;
    let owner = match mode {
        Mode::Echo => index,
        Mode::Document => owner_core(document, core.peers.len()),
        // A room is placed by its store key, as recovery places its records.
        Mode::Yjs => owner_core(&crate::store::index::yjs_key(document), core.peers.len()),
    };
    let handoff_fd = if owner == index {
        None
    } else {
        // SAFETY: dup(2) of the socket fd `stream` owns and keeps open.
        let dup = unsafe { libc::dup(stream.as_raw_fd()) };
        if dup < 0 {
            let error = std::io::Error::last_os_error();
            registry.count_refusal(Refused::FdLimit);
            if let Some(refused) = core.handoff_warnings.tick() {
                warn!(
                    %error,
                    refused,
                    "cannot hand off connection: answered 503 (refused counts them since the last report; \
                     reported at most every 10 s)"
                );
            }
            answer_and_close(config, stream, &core.fd_limit_answer).await;
            return;
        }
        // SAFETY: `dup` is a fresh, valid fd that nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(dup) })
    };
    // Then its registry entry (VALIDATING, so the peak counts it).
    let Some((key, id)) = registry.register(peer, document) else {
        registry.count_refusal(Refused::RegistryFull);
        let answer = HttpError::Unavailable("the relay has no room for another connection; try again later");
        answer_and_close(config, stream, &answer.response()).await;
        return;
    };
    let registration = Registration { registry, key, peer, ip_counted: Cell::new(false), armed: true };
    if stream.write_all(&http::switching_protocols(&accept)).await.is_err() {
        return; // `registration` unregisters
    }
    let color = http::query_param(head.query, "color").and_then(http::parse_color);
    let request =
        ValidationRequest { headers: head.headers, path: head.path, query: head.query, peer, document_id: document };
    let pending = buf[head.len..].to_vec();
    let mut identity = None;
    let outcome = match mode {
        Mode::Echo => Ok(()),
        Mode::Document => validate_connection(&core, &request, &registration).await,
        // A Yjs room's client authenticates with its `token` query parameter,
        // here, before the session is CONNECTED.
        Mode::Yjs => match validate_connection(&core, &request, &registration).await {
            Ok(()) => {
                let token = http::query_param(head.query, "token").map(http::percent_decode).unwrap_or_default();
                match core.shard.auth.authenticate(&token, document) {
                    Ok(who) => {
                        identity = Some(who);
                        Ok(())
                    }
                    Err(e) => {
                        registry.count_auth_failure();
                        debug!(id, code = e.code(), detail = %e.detail(), "yjs: authentication failed");
                        let reason = match e {
                            crate::auth::AuthError::Failed { .. } => "authentication failed",
                            crate::auth::AuthError::Forbidden(_) => "forbidden",
                        };
                        Err((e.close_code(), reason.to_string(), Rejection::Validation))
                    }
                }
            }
            Err(e) => Err(e),
        },
    };
    let info = ConnInfo {
        id,
        key,
        peer,
        document: document.into(),
        mode,
        color,
        ip_counted: registration.ip_counted.get(),
        identity,
    };
    drop(buf);
    if let Err((code, reason, why)) = outcome {
        registry.count_rejection(why);
        debug!(id, code, reason = %reason, "validation failed");
        answer_and_close(config, stream, OutFrame::close(code, &reason).bytes()).await;
        return; // `registration` unregisters
    }
    let Some(fd) = handoff_fd else {
        registration.disarm();
        core.shard.adopt(stream, info, pending);
        return;
    };
    drop(stream);
    match core.peers[owner].send_async(CoreMsg::Adopt(Handoff { fd, info, pending })).await {
        Ok(()) => registration.disarm(),
        // The owner has stopped (shutdown): the client is told so, and
        // `registration` unregisters.
        Err(flume::SendError(msg)) => {
            if let CoreMsg::Adopt(h) = msg {
                // SAFETY: the fd came back with the message that was not
                // sent; nothing else owns it.
                let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
                let close = OutFrame::close(close::GOING_AWAY, "relay shutting down");
                answer_and_close(config, stream, close.bytes()).await;
            }
        }
    }
}

fn unregister(registry: &ConnectionManager, key: ConnKey, peer: SocketAddr, ip_counted: bool) {
    registry.unregister(key);
    if ip_counted {
        registry.remove_ip(peer.ip());
    }
}

/// A connection's registry entry between the upgrade and its adoption by a
/// session: unregistered on drop (refusal, failed hand-off, or the handshake
/// task cancelled at shutdown) unless a session took it over.
struct Registration<'a> {
    registry: &'a ConnectionManager,
    key: ConnKey,
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
            unregister(self.registry, self.key, self.peer, self.ip_counted.get());
        }
    }
}

/// VALIDATING: the built-in validators, then the application's, whose verdict
/// is awaited without blocking the core. Err carries the close code, reason
/// and the statistic to count.
async fn validate_connection(
    core: &Core,
    request: &ValidationRequest<'_>,
    registration: &Registration<'_>,
) -> Result<(), (u16, String, Rejection)> {
    match validate::builtin(core.config(), core.registry(), request) {
        Ok(counted) => registration.ip_counted.set(counted),
        Err(r) => return Err((r.code, r.reason.to_string(), Rejection::Validation)),
    }
    let Some(validator) = core.validator.clone() else {
        return Ok(());
    };
    let verdict = core.verdicts.start(validator.as_ref(), request);
    let ticket = verdict.ticket;
    let timeout = async {
        sleep(Config::ms(core.config().limits.validation_timeout_ms)).await;
        None
    };
    match async { Some(verdict.await) }.or(timeout).await {
        Some(Verdict::Accept) => Ok(()),
        Some(Verdict::Reject { code, reason }) => Err((code, reason, Rejection::Validation)),
        Some(Verdict::Pending) => Err((close::VALIDATION_FAILED, "validation failed".into(), Rejection::Validation)),
        None => {
            core.verdicts.cancel(ticket);
            Err((close::INTERNAL, "validation timed out".into(), Rejection::ValidationTimeout))
        }
    }
}
