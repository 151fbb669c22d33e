//! The reader task of a session: reads into a buffer of the core's scratch
//! pool, parses frames with the session's own [`FrameReader`] (owned by this
//! task alone, so nothing else can reach it), and handles each complete
//! message synchronously. No buffer of the core is borrowed while a message is
//! handled: a handler may do anything, reading included.

use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use futures_lite::AsyncRead;
use tracing::debug;

use super::{handlers, Held, Initiator, Mode, Session, Shard};
use crate::ws::{self, Event, Flow, FrameReader, Kind, OutFrame};

impl Session {
    /// Handles the bytes of one read. Returns false when reading should stop.
    fn process(&self, shard: &Shard, frames: &mut FrameReader, input: &mut [u8]) -> bool {
        self.last_rx.set(Instant::now());
        if self.reading_done.get() {
            return false;
        }
        let mut stop = false;
        let result = frames.feed(input, |event| {
            match event {
                // After our Close, data is read and dropped (RFC 6455 7.1.1).
                Event::Text(_) | Event::Binary(_) | Event::Ping(_) if !self.is_open() => {}
                Event::Text(text) => {
                    shard.stats().messages_in.add(1);
                    match self.info.mode {
                        Mode::Echo => {
                            self.send(shard, Rc::new(OutFrame::new(Kind::Text, text.as_bytes())));
                        }
                        Mode::Document if self.joining.get() => {
                            self.held.borrow_mut().push_back(Held::Text(text.into()))
                        }
                        Mode::Document => handlers::handle_text(shard, self, text),
                        Mode::Yjs => {
                            self.begin_close(shard, crate::close::UNSUPPORTED, "y-websocket messages are binary");
                            stop = true;
                            return Flow::Stop;
                        }
                    }
                }
                Event::Binary(data) => {
                    shard.stats().messages_in.add(1);
                    match self.info.mode {
                        Mode::Echo => {
                            self.send(shard, Rc::new(OutFrame::new(Kind::Binary, data)));
                        }
                        Mode::Document | Mode::Yjs if self.joining.get() => {
                            self.held.borrow_mut().push_back(Held::Binary(data.into()))
                        }
                        Mode::Document => handlers::handle_binary(shard, self, data),
                        Mode::Yjs => super::yjs::handle(shard, self, data),
                    }
                }
                Event::Ping(payload) => {
                    self.send(shard, Rc::new(OutFrame::new(Kind::Pong, payload)));
                }
                Event::Pong(_) => {}
                Event::Close(peer) => {
                    // Echo the peer's code (RFC 6455 5.5.1); none if it sent none.
                    let frame = match peer {
                        Some((code, _)) => OutFrame::close(code, ""),
                        None => OutFrame::new(Kind::Close, b""),
                    };
                    self.close_with(shard, frame, Initiator::Peer);
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
                if !self.is_open() {
                    // Already closing: the peer's garbage ends the wait.
                    return false;
                }
                self.begin_close(shard, e.code, e.reason);
                // The frame stream is unusable now; wait for the peer to close.
                self.reading_done.set(true);
                false
            }
        }
    }

    /// Reads and handles frames until the connection is done, starting with
    /// `pending` (bytes that arrived behind the upgrade request).
    pub(super) async fn read_loop(&self, shard: &Shard, mut pending: Vec<u8>) {
        let mut frames = FrameReader::new(shard.config.limits.max_message_bytes);
        if !pending.is_empty() && !self.process(shard, &mut frames, &mut pending) {
            return self.linger_if_failed(shard).await;
        }
        drop(pending);
        self.handle_held(shard).await;
        loop {
            // Back-pressure: a client that does not read its replies is not
            // read from either, so its queue stays bounded.
            // In cluster mode, too, while the core's requests wait for room
            // in the Redis bridge's channel (cluster.queue).
            poll_fn(|cx| {
                let drained = self.out.borrow().bytes < shard.config.limits.max_send_buffer_bytes
                    && shard.cluster.as_ref().is_none_or(|c| c.has_room(cx.waker()));
                if drained || !self.is_open() || self.reading_done.get() {
                    Poll::Ready(())
                } else {
                    self.reader_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            let more = self
                .read_scratch(shard, |bytes| match bytes {
                    Some(bytes) => self.process(shard, &mut frames, bytes),
                    None => false,
                })
                .await;
            if !more {
                return self.linger_if_failed(shard).await;
            }
            self.handle_held(shard).await;
            // Let the writers (ours and the document's other subscribers)
            // run before the next read: a client that sends a burst must
            // not starve the readers of its own operations.
            futures_lite::future::yield_now().await;
        }
    }

    /// Waits while a join loads its document, then handles the messages held
    /// meanwhile, in order (one of them may start another wait). What is
    /// held is bounded by one read: nothing more is read while a join waits.
    async fn handle_held(&self, shard: &Shard) {
        loop {
            poll_fn(|cx| {
                if !self.joining.get() || self.reading_done.get() {
                    Poll::Ready(())
                } else {
                    self.reader_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            if self.joining.get() {
                return; // reading is done
            }
            let Some(held) = self.held.borrow_mut().pop_front() else { return };
            if self.is_open() {
                match held {
                    Held::Text(text) => handlers::handle_text(shard, self, &text),
                    Held::Binary(data) if self.info.mode == Mode::Yjs => super::yjs::handle(shard, self, &data),
                    Held::Binary(data) => handlers::handle_binary(shard, self, &data),
                }
            }
        }
    }

    /// One read into a buffer of the core's scratch pool, handed to `with`
    /// (`None`: end of stream or an error); the buffer goes back to the pool
    /// before the read resolves, whatever `with` did.
    async fn read_scratch<T>(&self, shard: &Shard, with: impl FnOnce(Option<&mut [u8]>) -> T) -> T {
        let mut with = Some(with);
        poll_fn(|cx| {
            let mut buf = shard.scratch.take();
            let read = Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut buf[..]);
            let outcome = match read {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(with.take().expect("resolved once")(Some(&mut buf[..n]))),
                Poll::Ready(_) => Poll::Ready(with.take().expect("resolved once")(None)),
            };
            shard.scratch.give(buf);
            outcome
        })
        .await
    }

    /// After the relay failed the connection: linger until the peer closes
    /// or the close timeout, discarding what it still sends.
    async fn linger_if_failed(&self, shard: &Shard) {
        if self.reading_done.get() && !self.is_open() {
            self.drain_until_eof(shard).await;
        }
    }

    /// Discards input until the peer's Close reply, its end of stream, or the
    /// close timeout (the ticker).
    async fn drain_until_eof(&self, shard: &Shard) {
        loop {
            let done = self.read_scratch(shard, |bytes| bytes.is_none_or(|b| ws::starts_frames_with_close(b))).await;
            if done {
                return;
            }
        }
    }
}
