//! `docrelay-baseline`: the conventional design the relay is benchmarked against.
//!
//! This is the architecture the seed "WebSocket Session Lifecycle" describes,
//! written as well as that architecture allows, so that a benchmark measures the
//! design and not a careless implementation of it:
//!
//! - a multi-threaded tokio runtime (work stealing, `--threads N` workers);
//! - tokio-tungstenite for the handshake and the framing;
//! - per document, two `tokio::sync::broadcast` channels: operations (1024
//!   entries) and presence (256 entries), looked up in a global
//!   `Mutex<HashMap>` when a session joins;
//! - per connection, a `SessionState` behind `Arc<Mutex<...>>`, a receive loop
//!   (this connection's task) and a spawned send task that owns the socket's
//!   write half and `tokio::select!`s over a direct-reply `mpsc` channel
//!   (capacity 32, sent as Text) and the two broadcast receivers (sent as
//!   Binary), locking the state to check the gate (authenticated and joined).
//!
//! What "as well as the design allows" means here:
//! - every broadcast is encoded once, into `Bytes`; subscribers get a
//!   reference-counted clone, never a copy or a re-serialisation, and the
//!   client's `payload` is relayed byte for byte (`RawValue`);
//! - the send task writes everything already queued with `feed` and flushes
//!   once per batch, not once per message;
//! - the gate is read under the state lock once per batch, not per message;
//! - per-connection pieces of every broadcast (`connection_id`, escaped
//!   `user_id`, colour) are encoded once at authentication;
//! - `TCP_NODELAY`, a listen backlog of 4096, and a read buffer sized for small
//!   JSON messages.
//!
//! The protocol is the subset of relay protocol (docs/protocol.md: "Endpoints", "Client messages", "Relay messages", "Authentication") a benchmark
//! exercises: `authenticate` (dev mode only), `join_document`,
//! `leave_document`, `operation`, `cursor`, `ping`, with the same JSON on the
//! wire as the relay and the same error checks in the same order. There is no
//! history (`sync_request`, `snapshot` and `join_document`'s `since` get an
//! error), no `/healthz` or `/metrics`, no validators, rate limits or idle
//! timeouts.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, Uri};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

/// Entries in a document's operations channel (the relay's `ring_capacity`).
const OPS_CAPACITY: usize = 1024;
/// Entries in a document's presence channel (`presence_ring_capacity`).
const PRESENCE_CAPACITY: usize = 256;
/// Direct replies queued for one connection (the seed's `response_tx`).
const DIRECT_CAPACITY: usize = 32;
/// Most messages the send task feeds before it flushes. Bounds the time one
/// connection's batch holds its worker; tungstenite also writes to the socket
/// on its own whenever its write buffer passes 128 KiB.
const MAX_BATCH: usize = 1024;
/// Largest accepted client message (the relay's `max_message_bytes`).
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// tungstenite's read buffer. Its default (128 KiB) is zero-filled up to that
/// size before every socket read, a large memset per read for the ~100-byte
/// messages of this protocol; 16 KiB still takes a burst of ~100 of them per
/// read. Larger messages grow the buffer as needed.
const READ_BUFFER_BYTES: usize = 16 * 1024;
const LISTEN_BACKLOG: u32 = 4096;
/// The relay's `handshake_timeout_ms`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The relay's `auth_timeout_ms`: no successful `authenticate` by then, close 4008.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing session waits for the peer's Close, and how long
/// shutdown waits for sessions to finish.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

const CLOSE_AUTH_FAILED: u16 = 4001;
const CLOSE_AUTH_TIMEOUT: u16 = 4008;

#[derive(Parser)]
#[command(name = "docrelay-baseline", about = "Conventional tokio + tungstenite relay, the benchmark baseline")]
struct Cli {
    /// Address to listen on (port 0: any free port, logged at start).
    #[arg(long, default_value = "127.0.0.1:9101")]
    listen: SocketAddr,
    /// Worker threads of the tokio runtime (default: available parallelism).
    #[arg(long)]
    threads: Option<NonZeroUsize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    docrelay::init_logging();
    let threads = cli.threads.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("docrelay-baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(cli.listen, threads));
    // Sessions still open after the shutdown grace are dropped, not awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("docrelay-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts until SIGINT or SIGTERM, then closes every session with 1001 and
/// returns once they are gone (or after [`CLOSE_TIMEOUT`]).
async fn serve(listen: SocketAddr, threads: usize) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered before the listener exists, so no signal is missed.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = bind(listen)?;
    info!(threads, "listening on {}", listener.local_addr()?);
    let app = Arc::new(AppState::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection(app.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // instead of spinning on the error.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(listener);
    info!("shutting down: closing sessions with 1001");
    app.close_all();
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while app.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!("stopped");
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Locks a std mutex, ignoring poisoning: every critical section here leaves
/// its data consistent even if a thread panicked inside it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Shared state: documents and the connection registry
// ---------------------------------------------------------------------------

/// Everything shared by all connections (the seed's `AppState`).
#[derive(Default)]
struct AppState {
    /// Documents by id, created by the first join and kept for the life of
    /// the process (a document's `seq` must not restart while clients hold it).
    documents: Mutex<HashMap<Box<str>, Arc<Document>>>,
    /// Live connections (the seed's `ConnectionManager`): registered right
    /// after the upgrade, before authentication. Holds each one's direct
    /// channel so that shutdown can send it a Close.
    connections: Mutex<HashMap<u64, mpsc::Sender<Direct>>>,
    next_connection_id: AtomicU64,
}

impl AppState {
    fn document(&self, id: &str) -> Arc<Document> {
        let mut documents = lock(&self.documents);
        if let Some(doc) = documents.get(id) {
            return doc.clone();
        }
        let doc = Arc::new(Document::new());
        documents.insert(id.into(), doc.clone());
        doc
    }

    fn register(&self, direct: mpsc::Sender<Direct>) -> u64 {
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.connections).insert(id, direct);
        id
    }

    fn unregister(&self, id: u64) {
        lock(&self.connections).remove(&id);
    }

    fn connection_count(&self) -> usize {
        lock(&self.connections).len()
    }

    /// Asks every session to close with 1001 (going away).
    fn close_all(&self) {
        for direct in lock(&self.connections).values() {
            let frame = CloseFrame { code: CloseCode::Away, reason: Utf8Bytes::from_static("relay shutting down") };
            // A session whose queue is full is stuck on a dead peer; the
            // process ends after the grace period anyway.
            let _ = direct.try_send(Direct::Close(frame));
        }
    }
}

/// One broadcast, encoded once and shared by every subscriber: cloning it
/// (which `broadcast::Receiver::recv` does per subscriber) is one atomic
/// increment on the `Bytes`.
#[derive(Clone)]
struct Broadcast {
    /// The connection that caused it; its own send task skips it.
    origin: u64,
    /// The operation's `seq` (0 on the presence channel), so that a lagged
    /// receiver can say which operations it missed.
    seq: u64,
    /// The complete JSON message, sent as a Binary frame.
    frame: Bytes,
}

/// A document: its two broadcast channels, its sequence and its members.
struct Document {
    ops: broadcast::Sender<Broadcast>,
    presence: broadcast::Sender<Broadcast>,
    /// One lock for sequencing and membership. Taking the next `seq` and
    /// sending on `ops` happen under it, so broadcast order is `seq` order
    /// however many sessions send at once; a join reads `seq` and subscribes
    /// under it, so the joiner receives exactly the operations after the `seq`
    /// its `joined_document` reports.
    inner: Mutex<DocInner>,
}

struct DocInner {
    /// The last assigned `seq` (0: none yet).
    seq: u64,
    /// Joined sessions by connection id, each as its encoded `participants`
    /// entry.
    participants: BTreeMap<u64, Arc<str>>,
}

/// What a join returns to the joining session.
struct Joined {
    seq: u64,
    ops: broadcast::Receiver<Broadcast>,
    presence: broadcast::Receiver<Broadcast>,
    participants: Vec<Arc<str>>,
}

impl Document {
    fn new() -> Document {
        Document {
            ops: broadcast::channel(OPS_CAPACITY).0,
            presence: broadcast::channel(PRESENCE_CAPACITY).0,
            inner: Mutex::new(DocInner { seq: 0, participants: BTreeMap::new() }),
        }
    }

    fn join(&self, connection_id: u64, participant: Arc<str>) -> Joined {
        let mut inner = lock(&self.inner);
        inner.participants.insert(connection_id, participant);
        Joined {
            seq: inner.seq,
            ops: self.ops.subscribe(),
            presence: self.presence.subscribe(),
            participants: inner.participants.values().cloned().collect(),
        }
    }

    fn leave(&self, connection_id: u64) {
        lock(&self.inner).participants.remove(&connection_id);
    }

    /// Assigns the next `seq` and broadcasts
    /// `{"type":"operation","seq":N` + `tail` + `payload` + `}`. The buffer is
    /// allocated before the lock; under it are only the copy and the send.
    fn publish_operation(&self, origin: u64, tail: &[u8], payload: &[u8]) -> u64 {
        const HEAD: &[u8] = br#"{"type":"operation","seq":"#;
        let mut frame = Vec::with_capacity(HEAD.len() + 20 + tail.len() + payload.len() + 1);
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        let seq = inner.seq;
        frame.extend_from_slice(HEAD);
        let _ = write!(frame, "{seq}");
        frame.extend_from_slice(tail);
        frame.extend_from_slice(payload);
        frame.push(b'}');
        // Err only when nobody is subscribed, and the sender always is.
        let _ = self.ops.send(Broadcast { origin, seq, frame: Bytes::from(frame) });
        seq
    }

    /// Broadcasts on the presence channel. No ordering with operations is
    /// promised, so no document lock.
    fn publish_presence(&self, origin: u64, frame: Vec<u8>) {
        let _ = self.presence.send(Broadcast { origin, seq: 0, frame: Bytes::from(frame) });
    }
}

// ---------------------------------------------------------------------------
// Per connection: the session state, the upgrade, the receive loop
// ---------------------------------------------------------------------------

/// What a session may do, shared by its receive loop (which changes it) and
/// its send task (which reads it to gate broadcasts), as in the seed.
///
/// A `std::sync::Mutex`, not tokio's: every critical section is a few field
/// reads or writes and never spans an `.await`, which is the case tokio's
/// documentation recommends the std mutex for; tokio's async mutex would add
/// a semaphore acquire to every gate check.
#[allow(dead_code)] // The identity fields are kept for fidelity to the seed.
struct SessionState {
    connection_id: u64,
    document_id: Arc<str>,
    user_id: Option<String>,
    user_name: Option<String>,
    session_id: Option<String>,
    color: String,
    /// Set by a successful `authenticate`.
    authenticated: bool,
    /// Set by `join_document`, cleared by `leave_document`.
    document_joined: bool,
}

impl SessionState {
    /// Authenticated means the flag AND a user id.
    fn is_authenticated(&self) -> bool {
        self.authenticated && self.user_id.is_some()
    }

    /// Whether broadcasts may be delivered.
    fn gate_open(&self) -> bool {
        self.is_authenticated() && self.document_joined
    }
}

/// What the receive loop (and shutdown) hands the send task, in order.
enum Direct {
    /// A direct reply, sent as a Text frame.
    Text(Utf8Bytes),
    /// `joined_document`, and the broadcast receivers to serve from now on.
    /// They travel with the reply so that the reply goes out before the first
    /// broadcast it announces.
    Joined { reply: Utf8Bytes, seq: u64, ops: broadcast::Receiver<Broadcast>, presence: broadcast::Receiver<Broadcast> },
    /// `left_document`: drop the receivers.
    Left(Utf8Bytes),
    /// Send this Close and stop sending.
    Close(CloseFrame),
}

type Ws = WebSocketStream<TcpStream>;

/// The document a request addresses, as the handshake callback saw it.
struct Route {
    document_id: Arc<str>,
    /// The `color` query parameter, validated and normalised.
    color: Option<String>,
}

/// One connection: the upgrade, then the receive loop on this task and the
/// send task beside it.
async fn connection(app: Arc<AppState>, stream: TcpStream, peer: SocketAddr) {
    // Small messages must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let mut route = None;
    // The callback's signature (and its large error type) is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| match route_for(request.uri()) {
        Ok(r) => {
            route = Some(r);
            Ok(response)
        }
        Err((status, body)) => Err(reject(status, body)),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let ws = match timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%peer, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "handshake timed out");
            return;
        }
    };
    let Some(Route { document_id, color }) = route else { return };

    let (direct_tx, direct_rx) = mpsc::channel(DIRECT_CAPACITY);
    let connection_id = app.register(direct_tx.clone());
    debug!(%peer, connection_id, document = %document_id, "connected");
    let state = Arc::new(Mutex::new(SessionState {
        connection_id,
        document_id: document_id.clone(),
        user_id: None,
        user_name: None,
        session_id: None,
        color: String::new(),
        authenticated: false,
        document_joined: false,
    }));
    let (sink, mut stream) = ws.split();
    let mut sender = tokio::spawn(
        SendTask { sink, state: state.clone(), connection_id, ops: None, presence: None, last_seq: 0, gate: None }
            .run(direct_rx),
    );

    let mut session = Session {
        app,
        connection_id,
        document_id,
        color_param: color,
        state,
        direct: direct_tx,
        identity: None,
        document: None,
    };
    session.run(&mut stream).await;
    session.finish();
    // Dropping the session drops the last direct sender: the send task
    // flushes and ends. Give it a moment, then cut it off.
    drop(session);
    if timeout(CLOSE_TIMEOUT, &mut sender).await.is_err() {
        sender.abort();
    }
    debug!(connection_id, "disconnected");
}

/// `/ws/documents/{id}` with a valid id; else the status to refuse with.
fn route_for(uri: &Uri) -> Result<Route, (StatusCode, &'static str)> {
    let Some(id) = uri.path().strip_prefix("/ws/documents/") else {
        return Err((StatusCode::NOT_FOUND, "not found"));
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-');
    if id.is_empty() || id.len() > 128 || !id.bytes().all(valid) {
        return Err((StatusCode::BAD_REQUEST, "bad document id"));
    }
    Ok(Route { document_id: id.into(), color: color_param(uri.query()) })
}

/// The `color` query parameter: `%23RRGGBB`, `#RRGGBB` or `RRGGBB`, as `#rrggbb`.
fn color_param(query: Option<&str>) -> Option<String> {
    let value = query?.split('&').find_map(|pair| pair.strip_prefix("color="))?;
    let hex = value.strip_prefix("%23").or_else(|| value.strip_prefix('#')).unwrap_or(value);
    (hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("#{}", hex.to_ascii_lowercase()))
}

fn reject(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    response
}

/// A session id unique across connections and restarts.
fn session_id(connection_id: u64) -> String {
    use std::hash::BuildHasher;
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nonce = *NONCE.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(std::process::id()));
    format!("{nonce:016x}-{connection_id:x}")
}

// The message layer is the relay's own (docrelay::protocol): both servers
// parse the same contract the same way, so the comparison is of designs, not
// of parsers.
use docrelay::auth::palette_color;
use docrelay::protocol::{check_state, parse, ClientType as Kind, Envelope, ErrorCode};

/// A field check (step 4 of the check order, docs/protocol.md "Client messages").
fn field<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>, name: &str) -> Result<Option<T>, String> {
    raw.map(|r| serde_json::from_str(r.get()).map_err(|_| format!("field `{name}` has the wrong type"))).transpose()
}

/// Who a session is, with the per-connection parts of its broadcasts encoded
/// once, at authentication.
struct Identity {
    /// `,"connection_id":C,"user_id":"u","payload":`: every operation
    /// broadcast after its `seq`.
    op_tail: Box<[u8]>,
    /// `{"type":"cursor","connection_id":C,"user_id":"u","color":"#…","payload":`.
    cursor_head: Box<[u8]>,
    /// `{"connection_id":C,"user_id":"u","user_name":"n","color":"#…"}`: this
    /// session in `participants`; `user_joined` has the same fields.
    participant: Arc<str>,
    /// `{"type":"user_left","connection_id":C,"user_id":"u"}`.
    user_left: Box<[u8]>,
}

/// What the receive loop does after a message.
enum Flow {
    Continue,
    /// The send task is gone: nothing more can be answered.
    Stop,
    /// Close the session with this code and reason.
    Close(u16, &'static str),
}

/// The receive side of one connection. It is the only writer of the shared
/// `SessionState`, so it keeps its own copy of what it needs (identity,
/// document) and takes the lock only to change the state.
struct Session {
    app: Arc<AppState>,
    connection_id: u64,
    document_id: Arc<str>,
    color_param: Option<String>,
    state: Arc<Mutex<SessionState>>,
    direct: mpsc::Sender<Direct>,
    /// Set once authenticated.
    identity: Option<Identity>,
    /// Set while joined.
    document: Option<Arc<Document>>,
}

impl Session {
    /// Reads and handles client messages until the connection ends; after the
    /// session itself sends a Close, waits for the peer's (at most
    /// [`CLOSE_TIMEOUT`]).
    async fn run(&mut self, stream: &mut SplitStream<Ws>) {
        let auth_deadline = Instant::now() + AUTH_TIMEOUT;
        let close = loop {
            let next = if self.identity.is_some() {
                stream.next().await
            } else {
                match timeout_at(auth_deadline, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => break (CLOSE_AUTH_TIMEOUT, "authentication timeout"),
                }
            };
            // `None` after a Close handshake (tungstenite answers the peer's
            // Close and Pings itself) or an error: the connection is over.
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    debug!(connection_id = self.connection_id, "read failed: {e}");
                    return;
                }
                None => return,
            };
            let flow = match &message {
                Message::Text(text) => self.handle(text.as_str()).await,
                Message::Binary(data) => match std::str::from_utf8(data) {
                    Ok(text) => self.handle(text).await,
                    Err(_) => self.error(ErrorCode::BadMessage, "message is not UTF-8").await,
                },
                _ => Flow::Continue,
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => return,
                Flow::Close(code, reason) => break (code, reason),
            }
        };
        let frame = CloseFrame { code: CloseCode::from(close.0), reason: Utf8Bytes::from_static(close.1) };
        if self.direct.send(Direct::Close(frame)).await.is_ok() {
            let _ = timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = stream.next().await {} }).await;
        }
    }

    /// Leaves the document if joined (`user_left`) and unregisters.
    fn finish(&mut self) {
        self.leave();
        self.app.unregister(self.connection_id);
    }

    /// Handles one client message (docs/protocol.md, "Client messages": checks in order).
    async fn handle(&mut self, text: &str) -> Flow {
        let (kind, envelope) = match parse(text.as_bytes()) {
            Ok(parsed) => parsed,
            Err((code, message)) => return self.error(code, message).await,
        };
        let authenticated = self.identity.is_some();
        let joined = self.document.is_some();
        if let Some((code, message)) = check_state(kind, authenticated, joined) {
            return self.error(code, message).await;
        }
        let result = match kind {
            Kind::Ping => Ok(self.reply(Utf8Bytes::from_static(r#"{"type":"pong"}"#)).await),
            Kind::Authenticate => self.authenticate(&envelope).await,
            Kind::JoinDocument => self.join(&envelope).await,
            Kind::LeaveDocument => Ok(self.leave_document().await),
            Kind::Operation => self.operation(&envelope).await,
            Kind::Cursor => self.cursor(&envelope),
            Kind::SyncRequest | Kind::Snapshot => {
                return self.error(ErrorCode::UnknownType, "the baseline keeps no history: not supported").await
            }
            Kind::ListParticipants => {
                return self.error(ErrorCode::UnknownType, "the baseline does not page participants").await
            }
        };
        match result {
            Ok(flow) => flow,
            Err(message) => self.error(ErrorCode::BadMessage, &message).await,
        }
    }

    async fn send(&self, direct: Direct) -> Flow {
        match self.direct.send(direct).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    async fn reply(&self, text: impl Into<Utf8Bytes>) -> Flow {
        self.send(Direct::Text(text.into())).await
    }

    async fn error(&self, code: ErrorCode, message: &str) -> Flow {
        let reply = serde_json::json!({"type": "error", "code": code.as_str(), "message": message});
        self.reply(reply.to_string()).await
    }

    /// Dev mode: any non-empty token is accepted; it is the user id and name.
    async fn authenticate(&mut self, envelope: &Envelope<'_>) -> Result<Flow, String> {
        let Some(token) = field::<String>(envelope.token, "token")? else {
            return Err("missing field `token`".into());
        };
        if token.is_empty() {
            let reply =
                r#"{"type":"auth_result","success":false,"error":{"code":"AUTH_FAILED","message":"empty token"}}"#;
            if let Flow::Stop = self.reply(Utf8Bytes::from_static(reply)).await {
                return Ok(Flow::Stop);
            }
            return Ok(Flow::Close(CLOSE_AUTH_FAILED, "authentication failed"));
        }
        let (user_id, user_name) = (token.clone(), token);
        let color = self.color_param.clone().unwrap_or_else(|| palette_color(&user_id).to_owned());
        let session_id = session_id(self.connection_id);
        let c = self.connection_id;
        let reply = serde_json::json!({
            "type": "auth_result", "success": true, "user_id": &user_id, "user_name": &user_name,
            "session_id": &session_id, "connection_id": c, "color": &color,
        });
        let uid = serde_json::Value::from(user_id.as_str()).to_string();
        let participant =
            serde_json::json!({"connection_id": c, "user_id": &user_id, "user_name": &user_name, "color": &color});
        self.identity = Some(Identity {
            op_tail: format!(r#","connection_id":{c},"user_id":{uid},"payload":"#).into_bytes().into(),
            cursor_head: format!(
                r#"{{"type":"cursor","connection_id":{c},"user_id":{uid},"color":"{color}","payload":"#
            )
            .into_bytes()
            .into(),
            participant: participant.to_string().into(),
            user_left: format!(r#"{{"type":"user_left","connection_id":{c},"user_id":{uid}}}"#).into_bytes().into(),
        });
        {
            let mut state = lock(&self.state);
            state.user_id = Some(user_id);
            state.user_name = Some(user_name);
            state.session_id = Some(session_id);
            state.color = color;
            state.authenticated = true;
        }
        Ok(self.reply(reply.to_string()).await)
    }

    async fn join(&mut self, envelope: &Envelope<'_>) -> Result<Flow, String> {
        let since = field::<u64>(envelope.since, "since")?;
        let Some(identity) = &self.identity else { return Ok(Flow::Continue) };
        let document = self.app.document(&self.document_id);
        let participant = identity.participant.clone();
        let joined = document.join(self.connection_id, participant.clone());
        // The gate opens before the receivers reach the send task.
        lock(&self.state).document_joined = true;

        let mut reply = String::with_capacity(96 + joined.participants.iter().map(|p| p.len() + 1).sum::<usize>());
        let document_id = serde_json::Value::from(&*self.document_id);
        let _ = write!(
            reply,
            r#"{{"type":"joined_document","document_id":{document_id},"seq":{},"participants":["#,
            joined.seq
        );
        for (i, p) in joined.participants.iter().enumerate() {
            if i > 0 {
                reply.push(',');
            }
            reply.push_str(p);
        }
        reply.push_str("]}");
        let flow = self
            .send(Direct::Joined { reply: reply.into(), seq: joined.seq, ops: joined.ops, presence: joined.presence })
            .await;
        // `user_joined` has the participant's fields: splice the type in.
        let user_joined = format!(r#"{{"type":"user_joined",{}"#, &participant[1..]);
        document.publish_presence(self.connection_id, user_joined.into_bytes());
        self.document = Some(document);
        if let Flow::Stop = flow {
            return Ok(Flow::Stop);
        }
        if since.is_some() {
            return Ok(self.error(ErrorCode::HistoryUnavailable, "the baseline keeps no history").await);
        }
        Ok(Flow::Continue)
    }

    /// Leaves the document if joined: closes the gate, drops the membership
    /// and broadcasts `user_left`.
    fn leave(&mut self) {
        let Some(document) = self.document.take() else { return };
        lock(&self.state).document_joined = false;
        document.leave(self.connection_id);
        if let Some(identity) = &self.identity {
            document.publish_presence(self.connection_id, identity.user_left.to_vec());
        }
    }

    async fn leave_document(&mut self) -> Flow {
        self.leave();
        let document_id = serde_json::Value::from(&*self.document_id);
        self.send(Direct::Left(format!(r#"{{"type":"left_document","document_id":{document_id}}}"#).into())).await
    }

    /// Sequences and broadcasts an operation, then acknowledges it.
    async fn operation(&mut self, envelope: &Envelope<'_>) -> Result<Flow, String> {
        let Some(payload) = envelope.payload else { return Err("missing field `payload`".into()) };
        if let Some(id) = envelope.client_op_id {
            if !matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) {
                return Err("field `client_op_id` must be a string or a number".into());
            }
        }
        let (Some(identity), Some(document)) = (&self.identity, &self.document) else { return Ok(Flow::Continue) };
        let seq = document.publish_operation(self.connection_id, &identity.op_tail, payload.get().as_bytes());
        let mut ack = String::with_capacity(48 + envelope.client_op_id.map_or(0, |id| id.get().len()));
        let _ = write!(ack, r#"{{"type":"ack","seq":{seq}"#);
        if let Some(id) = envelope.client_op_id {
            ack.push_str(r#","client_op_id":"#);
            ack.push_str(id.get());
        }
        ack.push('}');
        Ok(self.reply(ack).await)
    }

    /// Broadcasts a cursor on the presence channel (no reply).
    fn cursor(&self, envelope: &Envelope<'_>) -> Result<Flow, String> {
        let Some(payload) = envelope.payload else { return Err("missing field `payload`".into()) };
        let (Some(identity), Some(document)) = (&self.identity, &self.document) else { return Ok(Flow::Continue) };
        let payload = payload.get().as_bytes();
        let mut frame = Vec::with_capacity(identity.cursor_head.len() + payload.len() + 1);
        frame.extend_from_slice(&identity.cursor_head);
        frame.extend_from_slice(payload);
        frame.push(b'}');
        document.publish_presence(self.connection_id, frame);
        Ok(Flow::Continue)
    }
}

// ---------------------------------------------------------------------------
// Per connection: the send task
// ---------------------------------------------------------------------------

/// One receive from a broadcast channel, blocking or not.
enum Recv {
    Item(Broadcast),
    Lagged(u64),
    Closed,
}

impl From<Result<Broadcast, RecvError>> for Recv {
    fn from(r: Result<Broadcast, RecvError>) -> Recv {
        match r {
            Ok(item) => Recv::Item(item),
            Err(RecvError::Lagged(n)) => Recv::Lagged(n),
            Err(RecvError::Closed) => Recv::Closed,
        }
    }
}

/// Waits on a receiver that may not exist yet (before the join).
async fn recv(rx: &mut Option<broadcast::Receiver<Broadcast>>) -> Recv {
    match rx {
        Some(rx) => rx.recv().await.into(),
        None => std::future::pending().await,
    }
}

/// Takes what a receiver already holds, if anything.
fn try_recv(rx: &mut Option<broadcast::Receiver<Broadcast>>) -> Option<Recv> {
    match rx.as_mut()?.try_recv() {
        Ok(item) => Some(Recv::Item(item)),
        Err(TryRecvError::Empty) => None,
        Err(TryRecvError::Lagged(n)) => Some(Recv::Lagged(n)),
        Err(TryRecvError::Closed) => Some(Recv::Closed),
    }
}

/// Something for the send task to act on.
enum Event {
    /// A direct message; `None` once every sender is gone (session over).
    Direct(Option<Direct>),
    Op(Recv),
    Presence(Recv),
}

/// The send task: owns the write half, serves the direct channel and, once
/// joined, the document's two broadcast receivers (the seed's `send_task`).
struct SendTask {
    sink: SplitSink<Ws, Message>,
    state: Arc<Mutex<SessionState>>,
    connection_id: u64,
    ops: Option<broadcast::Receiver<Broadcast>>,
    presence: Option<broadcast::Receiver<Broadcast>>,
    /// The `seq` of the last operation this receiver saw (its own included):
    /// a lag of `n` then missed `last_seq + 1 ..= last_seq + n`, since the
    /// channel carries every seq once, in order.
    last_seq: u64,
    /// The gate as read at the start of the current batch.
    gate: Option<bool>,
}

/// Whether the send task goes on after an event.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

impl SendTask {
    async fn run(mut self, mut direct: mpsc::Receiver<Direct>) {
        if let Err(e) = self.serve(&mut direct).await {
            debug!(connection_id = self.connection_id, "write failed: {e}");
        }
    }

    /// Waits for the first message, feeds it and everything else already
    /// queued (up to [`MAX_BATCH`]), then flushes once.
    async fn serve(
        &mut self,
        direct: &mut mpsc::Receiver<Direct>,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        loop {
            let first = tokio::select! {
                // Replies first: they are few and someone is waiting on them.
                biased;
                d = direct.recv() => Event::Direct(d),
                r = recv(&mut self.ops), if self.ops.is_some() => Event::Op(r),
                r = recv(&mut self.presence), if self.presence.is_some() => Event::Presence(r),
            };
            self.gate = None;
            let mut next = self.dispatch(first).await?;
            let mut fed = 1;
            while next == Next::Continue && fed < MAX_BATCH {
                let event = match direct.try_recv() {
                    Ok(d) => Event::Direct(Some(d)),
                    Err(mpsc::error::TryRecvError::Disconnected) => Event::Direct(None),
                    Err(mpsc::error::TryRecvError::Empty) => match try_recv(&mut self.ops) {
                        Some(r) => Event::Op(r),
                        None => match try_recv(&mut self.presence) {
                            Some(r) => Event::Presence(r),
                            None => break,
                        },
                    },
                };
                next = self.dispatch(event).await?;
                fed += 1;
            }
            self.sink.flush().await?;
            if next == Next::Stop {
                return Ok(());
            }
        }
    }

    /// The gate (authenticated AND joined), read under the state lock once
    /// per batch: a batch is what was queued at one moment.
    fn gate_open(&mut self) -> bool {
        *self.gate.get_or_insert_with(|| lock(&self.state).gate_open())
    }

    async fn dispatch(&mut self, event: Event) -> Result<Next, tokio_tungstenite::tungstenite::Error> {
        match event {
            Event::Direct(None) => return Ok(Next::Stop),
            Event::Direct(Some(Direct::Text(text))) => self.sink.feed(Message::Text(text)).await?,
            Event::Direct(Some(Direct::Joined { reply, seq, ops, presence })) => {
                self.sink.feed(Message::Text(reply)).await?;
                self.ops = Some(ops);
                self.presence = Some(presence);
                self.last_seq = seq;
                self.gate = None;
            }
            Event::Direct(Some(Direct::Left(reply))) => {
                self.ops = None;
                self.presence = None;
                self.gate = None;
                self.sink.feed(Message::Text(reply)).await?;
            }
            Event::Direct(Some(Direct::Close(frame))) => {
                // Nothing may follow a Close; the receive loop finishes the
                // handshake.
                self.sink.feed(Message::Close(Some(frame))).await?;
                return Ok(Next::Stop);
            }
            Event::Op(Recv::Item(op)) => {
                self.last_seq = op.seq;
                if op.origin != self.connection_id && self.gate_open() {
                    self.sink.feed(Message::Binary(op.frame)).await?;
                }
            }
            Event::Op(Recv::Lagged(n)) => {
                let (from, to) = (self.last_seq + 1, self.last_seq + n);
                self.last_seq = to;
                if self.gate_open() {
                    let notice = format!(r#"{{"type":"lagged","missed_from":{from},"missed_to":{to}}}"#);
                    self.sink.feed(Message::Text(notice.into())).await?;
                }
            }
            Event::Presence(Recv::Item(p)) => {
                if p.origin != self.connection_id && self.gate_open() {
                    self.sink.feed(Message::Binary(p.frame)).await?;
                }
            }
            // Overtaken presence updates are dropped silently (docs/protocol.md, "Ordering, lag and recovery").
            Event::Presence(Recv::Lagged(_)) => {}
            // The document's senders live as long as the process.
            Event::Op(Recv::Closed) => self.ops = None,
            Event::Presence(Recv::Closed) => self.presence = None,
        }
        Ok(Next::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let route = |s: &str| route_for(&s.parse::<Uri>().unwrap()).map(|r| r.document_id).map_err(|e| e.0);
        assert_eq!(route("/ws/documents/d-1.x~y:z_").as_deref(), Ok("d-1.x~y:z_"));
        assert_eq!(route("/ws/documents/d1?token=x").as_deref(), Ok("d1"));
        assert_eq!(route("/ws/documents/").unwrap_err(), StatusCode::BAD_REQUEST);
        assert_eq!(route("/ws/documents/a%20b").unwrap_err(), StatusCode::BAD_REQUEST);
        assert_eq!(route("/ws/documents/a/b").unwrap_err(), StatusCode::BAD_REQUEST);
        assert_eq!(route(&format!("/ws/documents/{}", "a".repeat(129))).unwrap_err(), StatusCode::BAD_REQUEST);
        assert_eq!(route("/ws/other").unwrap_err(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn operations_are_sequenced_in_broadcast_order() {
        let doc = Document::new();
        let mut rx = doc.join(1, "{}".into()).ops;
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let doc = &doc;
                scope.spawn(move || {
                    for _ in 0..200 {
                        doc.publish_operation(t, br#","connection_id":1,"user_id":"u","payload":"#, b"{}");
                    }
                });
            }
        });
        for seq in 1..=800 {
            let item = rx.try_recv().unwrap();
            assert_eq!(item.seq, seq);
            let v: serde_json::Value = serde_json::from_slice(&item.frame).unwrap();
            assert_eq!(v["seq"], seq);
        }
    }
}
