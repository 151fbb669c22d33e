//! The writer task of a session: moves broadcasts from its document's rings
//! into its outbox (the one place the join gate is applied), and writes the
//! outbox with one non-blocking `sendmsg` over up to [`MAX_IOVECS`] frames.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use futures_lite::AsyncWrite;
use tracing::debug;

use super::{Outbox, Session, Shard, Subscription};
use crate::document::{Read, Ring};
use crate::protocol::encode;

/// Bytes of broadcasts moved into the write queue at a time: a slow client
/// holds at most this much beyond the ring's shared entries.
const REFILL_BYTES: usize = 64 * 1024;

/// Most frames handed to one `sendmsg`.
const MAX_IOVECS: usize = 64;

/// Moves a ring's entries from `cursor` on into `out`, skipping those that
/// `me` published, until the ring is read or `out` holds [`REFILL_BYTES`];
/// `on_lag` is told of a gap. Returns how many entries were queued.
fn take_from(
    ring: &Ring,
    cursor: &mut u64,
    me: u64,
    out: &mut Outbox,
    mut on_lag: impl FnMut(&mut Outbox, u64, u64),
) -> u64 {
    let mut queued = 0;
    while out.bytes < REFILL_BYTES {
        match ring.read(cursor) {
            (Read::Entry(_), Some(e)) => {
                if e.origin != me {
                    out.push(e.frame);
                    queued += 1;
                }
            }
            (Read::Lagged { from, to }, _) => on_lag(out, from, to),
            _ => break,
        }
    }
    queued
}

impl Session {
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
    async fn flush(&self, shard: &Shard) -> io::Result<()> {
        let stats = shard.stats();
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
            stats.write_syscalls.add(1);
            if written == 0 && self.out.borrow().bytes > 0 {
                continue;
            }
            let frames = self.out.borrow_mut().advance(written);
            stats.frames_out.add(frames);
        }
        self.wake_reader();
        Ok(())
    }

    /// The send path of broadcasts: moves frames from the document's rings
    /// into the write queue (shared `Rc`s, no copy), up to [`REFILL_BYTES`]
    /// queued, skipping the session's own broadcasts. Only a joined session
    /// has a subscription, and only an authenticated one can join: that is
    /// the gate. A cursor the ring has overtaken becomes a `lagged` notice at
    /// that point of the stream (operations) or is silently moved ahead
    /// (presence).
    fn refill(&self, shard: &Shard) {
        if !self.is_open() {
            return;
        }
        let mut sub = self.sub.borrow_mut();
        let Some(sub) = sub.as_mut() else { return };
        let me = self.info.id;
        let mut out = self.out.borrow_mut();
        let mut lagged = 0;
        // Operations: a gap becomes a `lagged` notice at that point.
        // A Yjs client is sent the whole document instead (it merges it).
        let yjs = self.info.mode == super::Mode::Yjs;
        let mut delivered = take_from(&sub.hub.ops, &mut sub.ops_cursor, me, &mut out, |out, from, to| {
            if yjs {
                if let Some(f) = super::yjs::resync_frame(shard, self) {
                    out.push(f);
                }
            } else {
                out.push(encode::lagged(from, to));
            }
            lagged += 1;
        });
        // Presence: overtaken updates are dropped.
        delivered += take_from(&sub.hub.presence, &mut sub.presence_cursor, me, &mut out, |_, _, _| {});
        // One counter update per refill, not per frame (the writer runs next;
        // it is the one that called refill, so no wake-up is needed).
        let stats = shard.stats();
        stats.lagged.add(lagged);
        stats.deliveries.add(delivered);
        stats.messages_out.add(delivered + lagged);
    }

    /// The writer task: drains the queue whenever it has frames, half-closes
    /// after our Close frame, and ends when the reader is done.
    pub(super) async fn write_loop(&self, shard: &Shard) {
        let mut shut_write = false;
        loop {
            poll_fn(|cx| {
                // While closing, broadcasts are no longer delivered (refill
                // skips them), so they must not count as work either.
                let broadcasts = self.is_open() && self.sub.borrow().as_ref().is_some_and(Subscription::pending);
                if self.out.borrow().bytes > 0 || self.reading_done.get() || broadcasts {
                    Poll::Ready(())
                } else {
                    self.writer_waker.set(cx.waker());
                    Poll::Pending
                }
            })
            .await;
            self.refill(shard);
            if let Err(e) = self.flush(shard).await {
                debug!(error = %e, "write failed");
                self.reading_done.set(true);
                self.abort();
                // The reader may be parked on back-pressure rather than on the socket.
                self.wake_reader();
                return;
            }
            if !self.is_open() && !shut_write && self.close_sent() {
                // Our Close is on the wire: send FIN too, so the peer sees the
                // end even if it never answers, and the reader sees its EOF.
                // SAFETY: shutdown(2) on the fd this session owns; non-blocking.
                unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
                shut_write = true;
            }
            if self.reading_done.get() && self.out.borrow().bytes == 0 {
                return;
            }
        }
    }
}
