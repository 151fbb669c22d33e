//! The per-core shard: the sessions and documents one core owns, the core's
//! scratch buffers, its per-connection tasks, and the ticker that enforces
//! timeouts. Lives in an `Rc` on that core only: nothing here is locked.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use glommio::timer::sleep;
use tracing::debug;

use super::{ConnInfo, Mode, Phase, Session};
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::close;
use crate::config::Config;
use crate::document::DocumentHub;
use crate::registry::{ConnectionManager, CoreStats};
use crate::ws::{Kind, OutFrame};

/// Size of one read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Read buffers for the core's sessions. A reader takes one for a read and
/// gives it back once the bytes are handled, so handling never holds a
/// buffer another read could need: a nested read simply takes another.
#[derive(Default)]
pub struct ScratchPool(RefCell<Vec<Vec<u8>>>);

impl ScratchPool {
    pub(crate) fn take(&self) -> Vec<u8> {
        self.0.borrow_mut().pop().unwrap_or_else(|| vec![0; SCRATCH_BYTES])
    }

    pub(crate) fn give(&self, buf: Vec<u8>) {
        self.0.borrow_mut().push(buf);
    }
}

/// What a shard is built from.
pub struct ShardSetup {
    pub index: usize,
    pub config: Arc<Config>,
    pub registry: Arc<ConnectionManager>,
    pub auth: Arc<Authenticator>,
    pub clock: Arc<dyn Clock>,
    /// Drawn at start; makes `session_id`s unique across relays and restarts.
    pub session_nonce: u64,
}

/// Everything one core owns.
pub struct Shard {
    pub index: usize,
    pub config: Arc<Config>,
    pub registry: Arc<ConnectionManager>,
    pub auth: Arc<Authenticator>,
    pub clock: Arc<dyn Clock>,
    pub session_nonce: u64,
    pub(crate) scratch: ScratchPool,
    /// The documents this core owns, loaded on first join.
    documents: RefCell<HashMap<Box<str>, Rc<DocumentHub>>>,
    sessions: RefCell<HashMap<u64, Rc<Session>>>,
    /// Every per-connection task (handshakes and sessions), so shutdown can
    /// end the ones still running: glommio does not drop tasks left at exit.
    tasks: RefCell<HashMap<u64, glommio::task::JoinHandle<()>>>,
    next_task: Cell<u64>,
    shutting_down: Cell<bool>,
    /// The ticker, parked while the core has nothing to watch.
    ticker_waker: Cell<Option<Waker>>,
    /// Whoever waits for the last session to end (shutdown).
    drained_waker: Cell<Option<Waker>>,
}

impl Shard {
    pub fn new(setup: ShardSetup) -> Shard {
        Shard {
            index: setup.index,
            config: setup.config,
            registry: setup.registry,
            auth: setup.auth,
            clock: setup.clock,
            session_nonce: setup.session_nonce,
            scratch: ScratchPool::default(),
            documents: RefCell::new(HashMap::new()),
            sessions: RefCell::new(HashMap::new()),
            tasks: RefCell::new(HashMap::new()),
            next_task: Cell::new(0),
            shutting_down: Cell::new(false),
            ticker_waker: Cell::new(None),
            drained_waker: Cell::new(None),
        }
    }

    pub fn stats(&self) -> &CoreStats {
        self.registry.core(self.index)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// The hub of a document this core owns, created on first use.
    pub(crate) fn document(&self, id: &str) -> Rc<DocumentHub> {
        if let Some(hub) = self.documents.borrow().get(id) {
            return hub.clone();
        }
        let d = &self.config.documents;
        let hub = Rc::new(DocumentHub::new(id, d.ring_capacity, d.presence_ring_capacity, d.history_ops));
        self.documents.borrow_mut().insert(id.into(), hub.clone());
        self.stats().documents.add(1);
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
        self.stats().documents.sub(unloaded as u64);
    }

    /// Spawns a per-connection task that shutdown can cancel.
    pub fn spawn_tracked(self: &Rc<Self>, task: impl Future<Output = ()> + 'static) {
        let id = self.next_task.get();
        self.next_task.set(id + 1);
        let shard = self.clone();
        let handle = glommio::spawn_local(async move {
            task.await;
            shard.tasks.borrow_mut().remove(&id);
        })
        .detach();
        self.tasks.borrow_mut().insert(id, handle);
    }

    /// Starts a session for a validated connection on this core.
    pub fn adopt(self: &Rc<Self>, stream: TcpStream, info: ConnInfo, pending: Vec<u8>) {
        let session = Rc::new(Session::connect(info, stream));
        self.sessions.borrow_mut().insert(session.info.id, session.clone());
        self.stats().sessions.add(1);
        if let Some(w) = self.ticker_waker.take() {
            w.wake();
        }
        self.spawn_tracked(super::run(self.clone(), session, pending));
    }

    /// DISCONNECTED bookkeeping for a session that ends.
    pub(crate) fn end_session(&self, session: &Session) {
        if self.sessions.borrow_mut().remove(&session.info.id).is_none() {
            return;
        }
        self.stats().sessions.sub(1);
        self.registry.unregister(session.info.key);
        if session.info.ip_counted {
            self.registry.remove_ip(session.info.peer.ip());
        }
        if self.sessions.borrow().is_empty() {
            if let Some(w) = self.drained_waker.take() {
                w.wake();
            }
        }
    }

    /// Shutdown, first step: from now on new sessions are closed at once,
    /// and every session is sent Close 1001.
    pub fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        for session in sessions {
            session.begin_close(self, close::GOING_AWAY, "relay shutting down");
        }
    }

    /// Resolves once the core has no session left.
    pub async fn sessions_ended(&self) {
        poll_fn(|cx| {
            if self.sessions.borrow().is_empty() {
                Poll::Ready(())
            } else {
                self.drained_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// Fails every session still open (shutdown, after the grace period).
    pub fn abort_sessions(&self) {
        for session in self.sessions.borrow().values() {
            session.abort();
        }
    }

    /// Cancels every per-connection task still running and waits until each
    /// is gone (its future dropped, with whatever it owned).
    pub async fn cancel_tasks(&self) {
        let tasks: Vec<_> = self.tasks.borrow_mut().drain().map(|(_, t)| t).collect();
        for t in &tasks {
            t.cancel();
        }
        for t in tasks {
            t.await;
        }
    }

    /// Timeouts, checked a few times a second by one task per core instead of
    /// a timer per connection: the close handshake deadline, authentication,
    /// idle clients, pings. Parks entirely while the core has no sessions and
    /// no documents, so an idle relay uses no CPU.
    pub async fn ticker(self: Rc<Self>) {
        let limits = &self.config.limits;
        let close_timeout = Config::ms(limits.close_timeout_ms);
        let idle = Config::ms(limits.idle_timeout_ms);
        let ping = Config::ms(limits.ping_interval_ms);
        let auth_timeout = Config::ms(limits.auth_timeout_ms);
        let period =
            close_timeout.min(idle).min(ping).div_f32(4.0).clamp(Duration::from_millis(5), Duration::from_millis(250));
        loop {
            poll_fn(|cx| {
                if self.sessions.borrow().is_empty() && self.documents.borrow().is_empty() {
                    self.ticker_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            sleep(period).await;
            let now = Instant::now();
            self.unload_idle_documents(now);
            let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
            for session in sessions {
                match session.phase() {
                    Phase::Closing { since, .. } if now - since >= close_timeout => session.abort(),
                    Phase::Connected => {
                        let quiet = now - session.last_rx.get();
                        let unauthenticated =
                            session.info.mode == Mode::Document && !session.auth.borrow().is_authenticated();
                        if unauthenticated && now - session.connected_at >= auth_timeout {
                            session.begin_close(&self, close::AUTH_TIMEOUT, "authentication timeout");
                        } else if quiet >= idle {
                            session.begin_close(&self, close::GOING_AWAY, "idle timeout");
                        } else if quiet >= ping && now - session.last_ping.get() >= ping {
                            session.last_ping.set(now);
                            session.send(&self, Rc::new(OutFrame::new(Kind::Ping, b"")));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
