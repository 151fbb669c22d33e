//! A session: one WebSocket connection on its document's owner core
//! (`docs/protocol.md`, "Session lifecycle").
//!
//! The lifecycle is an explicit state machine ([`Phase`]):
//! `UPGRADING → VALIDATING → CONNECTED → CLOSING → DISCONNECTED`, with the
//! validation failure edge `VALIDATING → DISCONNECTED`. Every transition is
//! checked; one the machine does not allow is logged as a bug and fails the
//! connection, in every build.
//!
//! Each session runs two tasks on its core. The reader ([`reader`]) reads
//! into a buffer of the core's scratch pool and handles complete frames
//! synchronously ([`handlers`]); the writer ([`writer`]) drains the session's
//! queue of shared encoded frames with as few system calls as possible (one
//! `sendmsg` over every queued frame). Timeouts (idle, ping, close handshake)
//! are enforced by the core's ticker ([`shard`]), not by a timer per read.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::Waker;
use std::time::Instant;

use glommio::net::TcpStream;
use tracing::{debug, error, Instrument};

use crate::close;
use crate::document::{DocumentHub, Subscriber};
use crate::registry::ConnKey;
use crate::ws::{Kind, OutFrame, SharedFrame};

mod cluster;
mod handlers;
mod outbox;
mod rates;
mod reader;
pub mod shard;
pub mod state;
mod writer;
mod yjs;

use outbox::Outbox;
pub use shard::Shard;
pub use state::{Auth, Initiator, InvalidTransition, Lifecycle, Phase, User};

/// What a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/ws/documents/{id}`: the relay protocol.
    Document,
    /// `[testing] echo_path`: every message echoed back (conformance tests).
    Echo,
    /// `/yjs/{id}`: the y-websocket protocol on a Yjs room (`docs/yjs.md`).
    Yjs,
}

/// Facts about a connection fixed at the upgrade.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub key: ConnKey,
    pub peer: SocketAddr,
    pub document: Box<str>,
    pub mode: Mode,
    /// The `color` query parameter, already validated and normalised.
    pub color: Option<String>,
    /// Whether this connection counts against `max_connections_per_ip`.
    pub ip_counted: bool,
    /// A Yjs room's connection: who its `token` query parameter named,
    /// checked while VALIDATING (the y-websocket provider has no
    /// authenticate message).
    pub identity: Option<crate::auth::Identity>,
}

/// A joined session's place in its document's rings. A session is joined
/// exactly while it has one; only an authenticated session can get one.
pub(crate) struct Subscription {
    pub(crate) hub: Rc<DocumentHub>,
    pub(crate) ops_cursor: u64,
    pub(crate) presence_cursor: u64,
}

impl Subscription {
    /// Starts at the rings' heads: broadcasts from now on.
    fn new(hub: Rc<DocumentHub>) -> Subscription {
        let (ops_cursor, presence_cursor) = (hub.ops.head(), hub.presence.head());
        Subscription { hub, ops_cursor, presence_cursor }
    }

    fn pending(&self) -> bool {
        self.ops_cursor < self.hub.ops.head() || self.presence_cursor < self.hub.presence.head()
    }
}

/// The writer's waker, shared with the document hub so a publish can wake it.
#[derive(Default)]
pub(crate) struct WakerSlot(Cell<Option<Waker>>);

impl WakerSlot {
    fn set(&self, w: &Waker) {
        self.0.set(Some(w.clone()));
    }
    fn wake(&self) {
        if let Some(w) = self.0.take() {
            w.wake();
        }
    }
}

impl Subscriber for WakerSlot {
    fn notify(&self) {
        self.wake();
    }
}

/// One connection on its owner core, shared by its reader, its writer and
/// the core's ticker.
pub struct Session {
    pub info: ConnInfo,
    fd: RawFd,
    stream: RefCell<TcpStream>,
    lifecycle: Lifecycle,
    out: RefCell<Outbox>,
    writer_waker: Rc<WakerSlot>,
    reader_waker: Cell<Option<Waker>>,
    auth: RefCell<Auth>,
    sub: RefCell<Option<Subscription>>,
    rates: rates::Rates,
    connected_at: Instant,
    /// The reader is done; the writer flushes and ends.
    reading_done: Cell<bool>,
    last_rx: Cell<Instant>,
    last_ping: Cell<Instant>,
    /// A join waits for its document to load from the store: messages read
    /// meanwhile are held (in order) and handled after it.
    joining: Cell<bool>,
    held: RefCell<std::collections::VecDeque<Held>>,
    /// A Yjs client: a state vector it has at least (what it said it had,
    /// or the room's when it was last resynced), so that a resync after it
    /// fell behind is a diff.
    yjs_known: RefCell<Option<yrs::StateVector>>,
}

/// A message read while a join was loading its document.
enum Held {
    Text(String),
    Binary(Vec<u8>),
}

impl Session {
    /// A session for a connection that passed validation: CONNECTED.
    pub(crate) fn connect(info: ConnInfo, stream: TcpStream) -> Session {
        let now = Instant::now();
        let session = Session {
            info,
            fd: stream.as_raw_fd(),
            stream: RefCell::new(stream),
            lifecycle: Lifecycle::new(Phase::Validating),
            out: RefCell::new(Outbox::default()),
            writer_waker: Rc::new(WakerSlot::default()),
            reader_waker: Cell::new(None),
            auth: RefCell::new(Auth::Pending),
            sub: RefCell::new(None),
            rates: rates::Rates::default(),
            connected_at: now,
            reading_done: Cell::new(false),
            last_rx: Cell::new(now),
            last_ping: Cell::new(now),
            joining: Cell::new(false),
            held: RefCell::new(std::collections::VecDeque::new()),
            yjs_known: RefCell::new(None),
        };
        session.transition(Phase::Connected);
        session
    }

    /// The session's phase.
    pub fn phase(&self) -> Phase {
        self.lifecycle.get()
    }

    /// Whether a Close frame of ours (first or an echo) is queued or sent.
    fn close_sent(&self) -> bool {
        matches!(self.phase(), Phase::Closing { by: Initiator::Relay | Initiator::Peer, .. })
    }

    /// Whether frames other than Close may still be queued.
    fn is_open(&self) -> bool {
        self.phase() == Phase::Connected
    }

    /// Moves to `to`; a transition the state machine refuses is a relay bug:
    /// it is logged and the connection is failed, in every build.
    fn transition(&self, to: Phase) {
        if let Err(e) = self.lifecycle.advance(to) {
            error!(id = self.info.id, error = %e, "refused session transition; failing the connection");
            self.abort();
        }
    }

    /// Whether the session's token has expired by `now` (its `exp` plus the
    /// leeway passed; `docs/protocol.md`, "Authentication").
    fn token_expired(&self, now: Instant) -> bool {
        self.auth.borrow().user().and_then(|u| u.expires_at).is_some_and(|at| now >= at)
    }

    /// A join is waiting for its document to load.
    fn join_pending(&self) {
        self.joining.set(true);
    }

    /// The join finished (joined, or refused): the reader goes on.
    fn join_done(&self) {
        self.joining.set(false);
        self.wake_reader();
    }

    fn wake_writer(&self) {
        self.writer_waker.wake();
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader_waker.take() {
            w.wake();
        }
    }

    /// Queues a frame for this client. Returns false when nothing more may be
    /// sent (closing) or the queue overflowed (the session is then closed 1008).
    pub(crate) fn send(&self, shard: &Shard, frame: SharedFrame) -> bool {
        if !self.is_open() {
            return false;
        }
        // Replies to the client's own requests are bounded by reading: the
        // reader stops while the queue is over the limit. What overflows is
        // many small frames queued faster than the client reads (e.g. pongs
        // for a flood of pings). A single frame larger than the limit (a big
        // sync_response, a big echo) is let through: it cannot be made smaller.
        let queued = self.out.borrow().bytes;
        let len = frame.bytes().len();
        let limit = shard.config.limits.max_send_buffer_bytes;
        if queued > 0 && len <= limit && queued + len > 2 * limit {
            self.begin_close(shard, close::POLICY, "send buffer overflow");
            return false;
        }
        self.push(shard, frame);
        true
    }

    /// Queues the keepalive Ping (at most one per `limits.ping_interval_ms`).
    /// It is not checked against the queue's limit: behind one large reply
    /// (a `sync_response` page) that a client is reading steadily, a Ping
    /// counted as overflow closed the client in the middle of that reply.
    pub(crate) fn keepalive(&self, shard: &Shard) {
        if self.is_open() {
            self.push(shard, Rc::new(OutFrame::new(Kind::Ping, b"")));
        }
    }

    /// Appends to the queue without checks (a Close must always get in) and
    /// counts it in `messages_out`.
    fn push(&self, shard: &Shard, frame: SharedFrame) {
        self.out.borrow_mut().push(frame);
        shard.stats().messages_out.add(1);
        self.wake_writer();
    }

    /// Queues a direct reply (a payload buffer from `protocol::encode`) as a
    /// Text frame.
    pub(crate) fn send_text(&self, shard: &Shard, json: Vec<u8>) -> bool {
        self.send(shard, Rc::new(OutFrame::finish(Kind::Text, json)))
    }

    /// Starts the closing handshake from the relay's side: queue Close, move
    /// to CLOSING; the ticker fails the connection if the peer does not answer
    /// within `limits.close_timeout_ms`.
    pub(crate) fn begin_close(&self, shard: &Shard, code: u16, reason: &str) {
        self.close_with(shard, OutFrame::close(code, reason), Initiator::Relay);
    }

    /// Queues a Close frame and enters CLOSING, unless already past CONNECTED.
    fn close_with(&self, shard: &Shard, frame: OutFrame, by: Initiator) {
        if !self.is_open() {
            return;
        }
        self.push(shard, Rc::new(frame));
        self.enter_closing(by);
    }

    /// CONNECTED → CLOSING without a frame of our own (the peer's stream ended).
    fn enter_closing(&self, by: Initiator) {
        if self.is_open() {
            self.transition(Phase::Closing { since: Instant::now(), by });
        }
    }

    /// Ends the connection now: both directions of the socket are shut, which
    /// wakes the reader and the writer with an error or end of stream.
    pub(crate) fn abort(&self) {
        // SAFETY: shutdown(2) on a socket fd this session owns (it stays
        // open until the Session is dropped); it does not block.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }
}

/// Cancels a task when dropped (glommio's JoinHandle only detaches).
pub(crate) struct CancelOnDrop(pub(crate) glommio::task::JoinHandle<()>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// DISCONNECTED bookkeeping, run however the session ends: normally, or by
/// its task being cancelled at shutdown.
struct Disconnect<'a> {
    shard: &'a Shard,
    session: &'a Session,
}

impl Drop for Disconnect<'_> {
    fn drop(&mut self) {
        let session = self.session;
        session.reading_done.set(true);
        // A joined session leaves its document (user_left to the others).
        match session.info.mode {
            Mode::Yjs => yjs::leave(self.shard, session),
            _ => handlers::leave(self.shard, session),
        }
        session.transition(Phase::Disconnected);
        self.shard.end_session(session);
        debug!("disconnected");
    }
}

/// Runs a CONNECTED session on its owner core until DISCONNECTED.
/// `pending` holds bytes that arrived behind the upgrade request.
pub(crate) async fn run(shard: Rc<Shard>, session: Rc<Session>, pending: Vec<u8>) {
    let span = tracing::info_span!("conn", id = session.info.id, document = %session.info.document, core = shard.index);
    async {
        let _disconnect = Disconnect { shard: &shard, session: &session };
        debug!("connected");
        let mut writer = CancelOnDrop(
            glommio::spawn_local({
                let (shard, session) = (shard.clone(), session.clone());
                async move { session.write_loop(&shard).await }
            })
            .detach(),
        );
        if shard.is_shutting_down() {
            session.begin_close(&shard, close::GOING_AWAY, "relay shutting down");
        } else if session.info.mode == Mode::Yjs {
            yjs::start(&shard, &session);
        }
        session.read_loop(&shard, pending).await;
        session.reading_done.set(true);
        session.enter_closing(Initiator::Transport);
        session.wake_writer();
        (&mut writer.0).await;
    }
    .instrument(span)
    .await
}
