//! A session: one WebSocket connection on its document's owner core.
//!
//! The lifecycle (PROTOCOL.md section 2) is an explicit state machine:
//! `UPGRADING → VALIDATING → CONNECTED → CLOSING → DISCONNECTED`, with the
//! validation failure edge `VALIDATING → DISCONNECTED`. Every transition goes
//! through [`Phase::can_become`]; anything else is a bug and is refused.
//!
//! Each session runs two tasks on its core. The reader reads into the core's
//! shared scratch buffer and handles complete frames synchronously; the writer
//! drains the session's queue of shared encoded frames with as few system calls
//! as possible (one `sendmsg` over every queued frame). Timeouts (idle, ping,
//! close handshake) are enforced by the core's ticker, not by a timer per read.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use tracing::{debug, Instrument};

use crate::document::{DocumentHub, Read, Subscriber};
use crate::registry::ConnKey;
use crate::runtime::CoreCtx;
use crate::ws::{close, Event, Flow, FrameReader, Kind, OutFrame, SharedFrame};

/// Where a connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    Upgrading = 0,
    Validating = 1,
    Connected = 2,
    Closing = 3,
    Disconnected = 4,
}

impl Phase {
    /// The allowed transitions, and only those.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Upgrading, Validating)
                | (Upgrading, Disconnected)
                | (Validating, Connected)
                | (Validating, Disconnected)
                | (Connected, Closing)
                | (Connected, Disconnected)
                | (Closing, Disconnected)
        )
    }

    pub(crate) fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Upgrading,
            1 => Phase::Validating,
            2 => Phase::Connected,
            3 => Phase::Closing,
            _ => Phase::Disconnected,
        }
    }
}

/// A lifecycle whose transitions are checked.
#[derive(Debug)]
pub struct Lifecycle(Cell<Phase>);

/// An attempted transition the state machine does not allow (a relay bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid session transition {from:?} -> {to:?}")]
pub struct InvalidTransition {
    pub from: Phase,
    pub to: Phase,
}

impl Lifecycle {
    pub fn new(phase: Phase) -> Lifecycle {
        Lifecycle(Cell::new(phase))
    }
    pub fn get(&self) -> Phase {
        self.0.get()
    }
    /// Moves to `to` if the state machine allows it.
    pub fn advance(&self, to: Phase) -> Result<(), InvalidTransition> {
        let from = self.0.get();
        if !from.can_become(to) {
            debug_assert!(false, "invalid session transition {from:?} -> {to:?}");
            return Err(InvalidTransition { from, to });
        }
        self.0.set(to);
        Ok(())
    }
}

/// What a session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/ws/documents/{id}`: the relay protocol.
    Document,
    /// `[testing] echo_path`: every message echoed back (conformance tests).
    Echo,
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
}

/// What a session is allowed to do, after the seed's SessionState. Lives on
/// the session's core only (no lock): the reader changes it, the writer reads
/// it on the send path.
#[derive(Debug, Default)]
pub struct SessionState {
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    pub session_id: Option<String>,
    pub color: String,
    /// Set by a successful `authenticate`.
    pub authenticated: bool,
    /// Set by `join_document`, cleared by `leave_document`.
    pub document_joined: bool,
    /// `user_id` as a JSON string, escaped once for every broadcast.
    pub(crate) user_id_json: String,
}

impl SessionState {
    /// Authenticated means the flag AND a user id.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated && self.user_id.is_some()
    }

    /// Whether broadcasts may be delivered: authenticated AND joined.
    pub fn gate_open(&self) -> bool {
        self.is_authenticated() && self.document_joined
    }
}

/// A joined session's place in its document's rings.
pub(crate) struct Subscription {
    pub(crate) hub: Rc<DocumentHub>,
    pub(crate) ops_cursor: u64,
    pub(crate) presence_cursor: u64,
}

impl Subscription {
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

/// Bytes of broadcasts moved into the write queue at a time: a slow client
/// holds at most this much beyond the ring's shared entries.
const REFILL_BYTES: usize = 64 * 1024;

/// Frames queued for one client, front first.
#[derive(Debug, Default)]
struct Outbox {
    frames: VecDeque<SharedFrame>,
    /// Bytes of the front frame already written.
    offset: usize,
    /// Unwritten bytes in the queue.
    bytes: usize,
}

impl Outbox {
    /// Marks `n` bytes written; returns how many frames were completed.
    fn advance(&mut self, mut n: usize) -> u64 {
        let mut done = 0;
        self.bytes -= n;
        while n > 0 {
            let front = self.frames.front().expect("advanced past the queue").bytes().len() - self.offset;
            if n >= front {
                n -= front;
                self.offset = 0;
                self.frames.pop_front();
                done += 1;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        if self.frames.is_empty() && self.frames.capacity() > 64 {
            self.frames = VecDeque::new();
        }
        done
    }
}

/// Most frames handed to one `sendmsg`.
const MAX_IOVECS: usize = 64;

/// One connection on its owner core, shared by its reader, writer and the
/// core's ticker.
pub(crate) struct Conn {
    pub(crate) info: ConnInfo,
    fd: RawFd,
    stream: RefCell<TcpStream>,
    pub(crate) lifecycle: Lifecycle,
    frames: RefCell<FrameReader>,
    out: RefCell<Outbox>,
    pub(crate) writer_waker: Rc<WakerSlot>,
    reader_waker: Cell<Option<Waker>>,
    pub(crate) state: RefCell<SessionState>,
    pub(crate) sub: RefCell<Option<Subscription>>,
    pub(crate) rates: crate::protocol::Rates,
    pub(crate) connected_at: Instant,
    /// A Close frame is queued; nothing more is sent after it.
    close_queued: Cell<bool>,
    /// The reader is done; the writer flushes and ends.
    reading_done: Cell<bool>,
    pub(crate) last_rx: Cell<Instant>,
    pub(crate) last_ping: Cell<Instant>,
    pub(crate) closing_since: Cell<Option<Instant>>,
}

impl Conn {
    pub(crate) fn new(info: ConnInfo, stream: TcpStream, max_message: usize) -> Conn {
        let now = Instant::now();
        Conn {
            info,
            fd: stream.as_raw_fd(),
            stream: RefCell::new(stream),
            lifecycle: Lifecycle::new(Phase::Validating),
            frames: RefCell::new(FrameReader::new(max_message)),
            out: RefCell::new(Outbox::default()),
            writer_waker: Rc::new(WakerSlot::default()),
            reader_waker: Cell::new(None),
            state: RefCell::new(SessionState::default()),
            sub: RefCell::new(None),
            rates: crate::protocol::Rates::default(),
            connected_at: now,
            close_queued: Cell::new(false),
            reading_done: Cell::new(false),
            last_rx: Cell::new(now),
            last_ping: Cell::new(now),
            closing_since: Cell::new(None),
        }
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
    pub(crate) fn send(&self, ctx: &CoreCtx, frame: SharedFrame) -> bool {
        if self.close_queued.get() {
            return false;
        }
        // Replies to the client's own requests are bounded by reading: the
        // reader stops while the queue is over the limit. What overflows is
        // many small frames queued faster than the client reads (e.g. pongs
        // for a flood of pings). A single frame larger than the limit (a big
        // sync_response, a big echo) is let through: it cannot be made smaller.
        let queued = self.out.borrow().bytes;
        let len = frame.bytes().len();
        let limit = ctx.config.limits.max_send_buffer_bytes;
        if queued > 0 && len <= limit && queued + len > 2 * limit {
            self.begin_close(ctx, close::POLICY, "send buffer overflow");
            return false;
        }
        self.push(ctx, frame);
        true
    }

    /// Appends to the queue without checks (a Close must always get in) and
    /// counts it in `messages_out`.
    fn push(&self, ctx: &CoreCtx, frame: SharedFrame) {
        self.enqueue(frame);
        ctx.stats().messages_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.wake_writer();
    }

    /// Appends to the queue only: the fan-out path counts once per refill.
    fn enqueue(&self, frame: SharedFrame) {
        let mut out = self.out.borrow_mut();
        out.bytes += frame.bytes().len();
        out.frames.push_back(frame);
    }

    /// Queues a direct reply as a Text frame.
    pub(crate) fn send_text(&self, ctx: &CoreCtx, json: Vec<u8>) -> bool {
        self.send(ctx, Rc::new(OutFrame::finish(Kind::Text, json)))
    }

    /// Starts the closing handshake from the relay's side: queue Close, move
    /// to CLOSING; the ticker fails the connection if the peer does not answer
    /// within `limits.close_timeout_ms`.
    pub(crate) fn begin_close(&self, ctx: &CoreCtx, code: u16, reason: &str) {
        if self.close_queued.get() {
            return;
        }
        self.close_queued.set(true);
        self.push(ctx, Rc::new(OutFrame::close(code, reason)));
        self.enter_closing();
    }

    fn enter_closing(&self) {
        if self.lifecycle.get() == Phase::Connected {
            let _ = self.lifecycle.advance(Phase::Closing);
            self.closing_since.set(Some(Instant::now()));
        }
    }

    /// Ends the connection now: both directions of the socket are shut, which
    /// wakes the reader and the writer with an error or end of stream.
    pub(crate) fn abort(&self) {
        // SAFETY: shutdown(2) on a socket fd this connection owns (it stays
        // open until the Conn is dropped); it does not block.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }

    /// Handles the bytes of one read. Returns false when reading should stop.
    fn process(&self, ctx: &CoreCtx, input: &mut [u8]) -> bool {
        self.last_rx.set(Instant::now());
        if self.reading_done.get() {
            return false;
        }
        let mut stop = false;
        let result = self.frames.borrow_mut().feed(input, |event| {
            match event {
                Event::Message { binary, data } => {
                    // After our Close, data is read and dropped (RFC 6455 7.1.1).
                    if !self.close_queued.get() {
                        ctx.stats().messages_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match self.info.mode {
                            Mode::Echo => {
                                let kind = if binary { Kind::Binary } else { Kind::Text };
                                self.send(ctx, Rc::new(OutFrame::new(kind, data)));
                            }
                            Mode::Document => crate::protocol::handle(ctx, self, data),
                        }
                    }
                }
                Event::Ping(payload) => {
                    if !self.close_queued.get() {
                        self.send(ctx, Rc::new(OutFrame::new(Kind::Pong, payload)));
                    }
                }
                Event::Pong(_) => {}
                Event::Close(peer) => {
                    if !self.close_queued.get() {
                        // Echo the peer's code (RFC 6455 5.5.1); none if it sent none.
                        let frame = match peer {
                            Some((code, _)) => OutFrame::close(code, ""),
                            None => OutFrame::new(Kind::Close, b""),
                        };
                        self.close_queued.set(true);
                        self.push(ctx, Rc::new(frame));
                        self.enter_closing();
                    }
                    stop = true;
                    return Flow::Stop;
                }
            }
            Flow::Continue
        });
        match result {
            Ok(_) => !stop,
            Err(e) => {
                debug!(code = e.code, reason = e.reason, "protocol error");
                if self.close_queued.get() {
                    // Already closing: the peer's garbage ends the wait.
                    return false;
                }
                self.begin_close(ctx, e.code, e.reason);
                // The frame stream is unusable now; wait for the peer to close.
                self.reading_done.set(true);
                false
            }
        }
    }

    /// Reads and handles frames until the connection is done.
    async fn read_loop(&self, ctx: &CoreCtx) {
        loop {
            // Back-pressure: a client that does not read its replies is not
            // read from either, so its queue stays bounded.
            poll_fn(|cx| {
                let drained = self.out.borrow().bytes < ctx.config.limits.max_send_buffer_bytes;
                if drained || self.close_queued.get() || self.reading_done.get() {
                    Poll::Ready(())
                } else {
                    self.reader_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            let more = poll_fn(|cx| {
                let mut scratch = ctx.scratch.borrow_mut();
                let read = Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut scratch[..]);
                match read {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(false),
                    Poll::Ready(Ok(n)) => Poll::Ready(self.process(ctx, &mut scratch[..n])),
                }
            })
            .await;
            if more {
                // Let the writers (ours and the document's other subscribers)
                // run before the next read: a client that sends a burst must
                // not starve the readers of its own operations.
                futures_lite::future::yield_now().await;
                continue;
            }
            if self.reading_done.get() && self.close_queued.get() {
                // We failed the connection: linger until the peer closes or
                // the close timeout, discarding what it still sends.
                self.drain_until_eof(ctx).await;
            }
            return;
        }
    }

    /// After failing the connection: discard input until the peer's Close
    /// reply, its end of stream, or the close timeout (the ticker).
    async fn drain_until_eof(&self, ctx: &CoreCtx) {
        loop {
            let done = poll_fn(|cx| {
                let mut scratch = ctx.scratch.borrow_mut();
                match Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut scratch[..]) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(crate::ws::starts_frames_with_close(&scratch[..n])),
                    Poll::Ready(_) => Poll::Ready(true),
                }
            })
            .await;
            if done {
                return;
            }
        }
    }

    /// One non-blocking `sendmsg` over the queued frames. `Ok(None)`: the
    /// socket buffer is full.
    fn try_write(&self) -> io::Result<Option<usize>> {
        let out = self.out.borrow();
        let mut iov: [libc::iovec; MAX_IOVECS] =
            [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS];
        let mut count = 0;
        for (i, frame) in out.frames.iter().take(MAX_IOVECS).enumerate() {
            let bytes = if i == 0 { &frame.bytes()[out.offset..] } else { frame.bytes() };
            iov[i] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
            count += 1;
        }
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = count as _;
        // SAFETY: the iovecs point into frames held by `out`, which stays
        // borrowed (so alive and unmodified) for the duration of the call; the
        // kernel only reads them. MSG_DONTWAIT keeps the call non-blocking on
        // this blocking-mode socket; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
        let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            io::ErrorKind::Interrupted => Ok(Some(0)),
            _ => Err(err),
        }
    }

    /// Writes everything queued, waiting for the socket when it is full.
    async fn flush(&self, ctx: &CoreCtx) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        while self.out.borrow().bytes > 0 {
            let written = match self.try_write()? {
                Some(n) => n,
                None => {
                    // Full socket buffer: let glommio wait for writability and
                    // write the front frame's rest when it comes.
                    poll_fn(|cx| {
                        let out = self.out.borrow();
                        let front = &out.frames.front().expect("queue is not empty").bytes()[out.offset..];
                        Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, front)
                    })
                    .await?
                }
            };
            ctx.stats().write_syscalls.fetch_add(1, Relaxed);
            if written == 0 && self.out.borrow().bytes > 0 {
                continue;
            }
            let frames = self.out.borrow_mut().advance(written);
            ctx.stats().frames_out.fetch_add(frames, Relaxed);
        }
        self.wake_reader();
        Ok(())
    }

    /// The send path of broadcasts, and the one place the gate is applied:
    /// moves frames from the document's rings into the write queue (shared
    /// `Rc`s, no copy), up to [`REFILL_BYTES`] queued, skipping the session's
    /// own broadcasts. A cursor the ring has overtaken becomes a `lagged`
    /// notice at that point of the stream (operations) or is silently moved
    /// ahead (presence).
    fn refill(&self, ctx: &CoreCtx) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.close_queued.get() {
            return;
        }
        let mut sub = self.sub.borrow_mut();
        let Some(sub) = sub.as_mut() else { return };
        if !self.state.borrow().gate_open() {
            // Not delivered, and not kept either.
            sub.ops_cursor = sub.hub.ops.head();
            sub.presence_cursor = sub.hub.presence.head();
            return;
        }
        let me = self.info.id;
        let (mut delivered, mut lagged) = (0, 0);
        while self.out.borrow().bytes < REFILL_BYTES {
            match sub.hub.ops.read(&mut sub.ops_cursor) {
                (Read::Entry(_), Some(e)) => {
                    if e.origin != me {
                        self.enqueue(e.frame);
                        delivered += 1;
                    }
                }
                (Read::Lagged { from, to }, _) => {
                    ctx.stats().lagged.fetch_add(1, Relaxed);
                    self.enqueue(crate::protocol::lagged(from, to));
                    lagged += 1;
                }
                _ => break,
            }
        }
        while self.out.borrow().bytes < REFILL_BYTES {
            match sub.hub.presence.read(&mut sub.presence_cursor) {
                (Read::Entry(_), Some(e)) => {
                    if e.origin != me {
                        self.enqueue(e.frame);
                        delivered += 1;
                    }
                }
                (Read::Lagged { .. }, _) => {} // overtaken presence is dropped
                _ => break,
            }
        }
        // One counter update per refill, not per frame (the writer runs next;
        // it is the one that called refill, so no wake-up is needed).
        ctx.stats().deliveries.fetch_add(delivered, Relaxed);
        ctx.stats().messages_out.fetch_add(delivered + lagged, Relaxed);
    }

    /// The writer task: drains the queue whenever it has frames, half-closes
    /// after our Close frame, and ends when the reader is done.
    async fn write_loop(&self, ctx: &CoreCtx) {
        let mut shut_write = false;
        loop {
            poll_fn(|cx| {
                // While closing, broadcasts are no longer delivered (refill
                // skips them), so they must not count as work either.
                let broadcasts =
                    !self.close_queued.get() && self.sub.borrow().as_ref().is_some_and(Subscription::pending);
                if self.out.borrow().bytes > 0 || self.reading_done.get() || broadcasts {
                    Poll::Ready(())
                } else {
                    self.writer_waker.set(cx.waker());
                    Poll::Pending
                }
            })
            .await;
            self.refill(ctx);
            if let Err(e) = self.flush(ctx).await {
                debug!(error = %e, "write failed");
                self.reading_done.set(true);
                self.abort();
                // The reader may be parked on back-pressure rather than on the socket.
                self.wake_reader();
                return;
            }
            if self.close_queued.get() && !shut_write {
                // Our Close is on the wire: send FIN too, so the peer sees the
                // end even if it never answers, and the reader sees its EOF.
                // SAFETY: shutdown(2) on the fd this connection owns; non-blocking.
                unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
                shut_write = true;
            }
            if self.reading_done.get() && self.out.borrow().bytes == 0 {
                return;
            }
        }
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
    ctx: &'a CoreCtx,
    conn: &'a Conn,
}

impl Drop for Disconnect<'_> {
    fn drop(&mut self) {
        let conn = self.conn;
        conn.reading_done.set(true);
        // A joined session leaves its document (user_left to the others).
        crate::protocol::leave(self.ctx, conn);
        if conn.lifecycle.get() != Phase::Disconnected {
            let _ = conn.lifecycle.advance(Phase::Disconnected);
        }
        self.ctx.end_session(conn);
        self.ctx.stats().sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        debug!("disconnected");
    }
}

/// Runs a session on its owner core from CONNECTED to DISCONNECTED.
/// `pending` holds bytes that arrived behind the upgrade request.
pub(crate) async fn run(ctx: Rc<CoreCtx>, conn: Rc<Conn>, mut pending: Vec<u8>) {
    let span = tracing::info_span!("conn", id = conn.info.id, document = %conn.info.document, core = ctx.index);
    async {
        if conn.lifecycle.advance(Phase::Connected).is_err() {
            ctx.end_session(&conn);
            return;
        }
        ctx.registry.set_phase(conn.info.key, Phase::Connected);
        ctx.stats().sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _disconnect = Disconnect { ctx: &ctx, conn: &conn };
        debug!("connected");
        let mut writer = CancelOnDrop(
            glommio::spawn_local({
                let (ctx, conn) = (ctx.clone(), conn.clone());
                async move { conn.write_loop(&ctx).await }
            })
            .detach(),
        );
        let keep_reading = pending.is_empty() || conn.process(&ctx, &mut pending);
        drop(pending);
        if ctx.shutting_down.get() {
            conn.begin_close(&ctx, close::GOING_AWAY, "relay shutting down");
        }
        if keep_reading {
            conn.read_loop(&ctx).await;
        }
        conn.reading_done.set(true);
        conn.enter_closing();
        conn.wake_writer();
        (&mut writer.0).await;
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions() {
        use Phase::*;
        let all = [Upgrading, Validating, Connected, Closing, Disconnected];
        let allowed: Vec<(Phase, Phase)> =
            all.iter().flat_map(|&a| all.iter().map(move |&b| (a, b))).filter(|(a, b)| a.can_become(*b)).collect();
        assert_eq!(
            allowed,
            vec![
                (Upgrading, Validating),
                (Upgrading, Disconnected),
                (Validating, Connected),
                (Validating, Disconnected),
                (Connected, Closing),
                (Connected, Disconnected),
                (Closing, Disconnected)
            ]
        );
        for p in all {
            assert_eq!(Phase::from_u8(p as u8), p);
        }
    }

    #[test]
    fn outbox_advances_across_frames() {
        let mut out = Outbox::default();
        for n in [3usize, 5] {
            let f = Rc::new(OutFrame::new(Kind::Binary, &vec![0; n]));
            out.bytes += f.bytes().len();
            out.frames.push_back(f);
        }
        assert_eq!(out.bytes, 12);
        out.advance(4);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (2, 4, 8));
        out.advance(2);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (1, 1, 6));
        out.advance(6);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (0, 0, 0));
    }
}
