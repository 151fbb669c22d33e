//! The per-core shard: the sessions and documents one core owns, the core's
//! scratch buffers, its per-connection tasks, and the ticker that enforces
//! timeouts. Lives in an `Rc` on that core only: nothing here is locked.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::rc::{Rc, Weak};
use std::sync::atomic::AtomicU64;
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
use crate::cluster::ClusterCore;
use crate::config::Config;
use crate::document::{Capacity, DocumentHub, Restored, Snapshot};
use crate::registry::{ConnectionManager, CoreStats};
use crate::store::index::Index;
use crate::store::log::LogStore;
use crate::store::{HistoryStore, MemoryStore, StoreError, Ticket};
use crate::ws::{Kind, OutFrame, SharedFrame};

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
    /// With `storage.dir`: this core's part of the recovered log, and the
    /// relay-wide counter of segment numbers.
    pub log: Option<(Index, Arc<AtomicU64>)>,
    /// Cluster mode: this core's side of the Redis bridge.
    pub cluster: Option<ClusterCore>,
}

/// An accepted operation or snapshot waiting for its record to be stored
/// before it is published and acknowledged (`docs/storage.md`, "Acks").
pub(crate) struct Commit {
    pub(crate) ticket: Ticket,
    pub(crate) hub: Rc<DocumentHub>,
    pub(crate) session: Rc<Session>,
    pub(crate) what: Committed,
}

pub(crate) enum Committed {
    Op {
        seq: u64,
        frame: SharedFrame,
        client_op_id: Option<Box<str>>,
    },
    Snapshot {
        seq: u64,
        state: Box<serde_json::value::RawValue>,
    },
    /// A Yjs room's update (`session/yjs.rs`): passed on, without an ack.
    Update {
        room: Rc<super::yjs::Room>,
        seq: u64,
        frame: SharedFrame,
    },
}

/// A session waiting for its document to be loaded from the store.
pub(crate) struct JoinWaiter {
    pub(crate) session: Rc<Session>,
    pub(crate) since: Option<u64>,
    pub(crate) epoch: Option<String>,
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
    /// Where history is kept: the log with `storage.dir`, else memory.
    pub(crate) store: Rc<dyn HistoryStore>,
    pub(crate) log: Option<Rc<LogStore>>,
    /// Operations and snapshots waiting to be stored, in ticket order.
    commits: RefCell<VecDeque<Commit>>,
    commit_waker: Cell<Option<Waker>>,
    /// Documents being loaded from the store, and who waits for each.
    pub(crate) loading: RefCell<HashMap<Box<str>, Vec<JoinWaiter>>>,
    /// Cluster mode: this core's side of the Redis bridge.
    pub(crate) cluster: Option<ClusterCore>,
    /// Yjs rooms (`/yjs/{document}`) of this core.
    pub(crate) rooms: RefCell<HashMap<Box<str>, Rc<super::yjs::Room>>>,
    /// Yjs rooms being loaded from the store, and the sessions waiting.
    pub(crate) rooms_loading: RefCell<HashMap<Box<str>, Vec<Rc<Session>>>>,
    me: Weak<Shard>,
}

impl Shard {
    /// The shard of one core, in the `Rc` its tasks share.
    pub fn new(setup: ShardSetup) -> Rc<Shard> {
        let log = setup.log.map(|(index, next)| Rc::new(LogStore::new(setup.index, &setup.config, index, next)));
        let store: Rc<dyn HistoryStore> = match &log {
            Some(l) => l.clone(),
            None => Rc::new(MemoryStore::default()),
        };
        Rc::new_cyclic(|me| Shard {
            store,
            log,
            commits: RefCell::new(VecDeque::new()),
            commit_waker: Cell::new(None),
            loading: RefCell::new(HashMap::new()),
            cluster: setup.cluster,
            rooms: RefCell::new(HashMap::new()),
            rooms_loading: RefCell::new(HashMap::new()),
            me: me.clone(),
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
        })
    }

    pub fn stats(&self) -> &CoreStats {
        self.registry.core(self.index)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    pub(crate) fn capacity(&self) -> Capacity {
        let d = &self.config.documents;
        Capacity { ring: d.ring_capacity, presence: d.presence_ring_capacity, history: d.history_ops }
    }

    /// This shard, shared (for a task it spawns).
    pub(crate) fn rc(&self) -> Rc<Shard> {
        self.me.upgrade().expect("the shard outlives its tasks")
    }

    /// The ticker watches documents and rooms too: it runs again.
    pub(crate) fn wake_ticker(&self) {
        if let Some(w) = self.ticker_waker.take() {
            w.wake();
        }
    }

    pub(crate) fn loaded(&self, id: &str, hub: Rc<DocumentHub>) -> Rc<DocumentHub> {
        self.documents.borrow_mut().insert(id.into(), hub.clone());
        self.stats().documents.add(1);
        self.wake_ticker();
        debug!(document = id, core = self.index, seq = hub.seq(), epoch = %hub.epoch, "document loaded");
        hub
    }

    /// The hub of a document this core owns, if loaded; a document the store
    /// has no history of starts at once (a new epoch). `None`: the document
    /// is being loaded from the store, and `waiter` is joined once it is
    /// (or told why not).
    pub(crate) fn open_document(&self, id: &str, waiter: impl FnOnce() -> JoinWaiter) -> Option<Rc<DocumentHub>> {
        if let Some(hub) = self.documents.borrow().get(id) {
            return Some(hub.clone());
        }
        if self.cluster.is_none() && self.store.head(id).is_none() {
            return Some(self.loaded(id, Rc::new(DocumentHub::new(id, self.capacity()))));
        }
        let first = {
            let mut loading = self.loading.borrow_mut();
            let waiters = loading.entry(id.into()).or_default();
            waiters.push(waiter());
            waiters.len() == 1
        };
        if first {
            if let Some(cluster) = &self.cluster {
                // Answered by the bridge's `Loaded` (session/cluster.rs).
                cluster.send(crate::cluster::Request::Load { document: id.into(), core: self.index });
                return None;
            }
            let shard = self.rc();
            let id: Box<str> = id.into();
            shard.spawn_tracked(shard.clone().load(id));
        }
        None
    }

    /// Loads a document from the store, then joins everyone who waited.
    async fn load(self: Rc<Self>, id: Box<str>) {
        let result = self.read_document(&id).await;
        let waiters = self.loading.borrow_mut().remove(&id).unwrap_or_default();
        match result {
            Ok(hub) => {
                let hub = self.loaded(&id, Rc::new(hub));
                for w in waiters {
                    if super::handlers::finish_join(&self, &w.session, hub.clone(), w.since, w.epoch.as_deref()) {
                        w.session.join_done();
                    }
                }
            }
            Err(e) => {
                tracing::error!(document = %id, core = self.index, error = %e, "could not load a document's history");
                for w in waiters {
                    w.session.send_text(
                        &self,
                        crate::protocol::encode::error(
                            crate::protocol::ErrorCode::Unavailable,
                            &format!("the document's history could not be loaded: {e}"),
                        ),
                    );
                    w.session.join_done();
                }
            }
        }
    }

    async fn read_document(&self, id: &str) -> Result<DocumentHub, StoreError> {
        let Some(head) = self.store.head(id) else { return Ok(DocumentHub::new(id, self.capacity())) };
        let cap = self.capacity();
        let from = (head.seq + 1).saturating_sub(cap.history as u64).max(head.oldest).max(1);
        let ops = if cap.history == 0 { Vec::new() } else { self.store.read_range(id, from, head.seq).await? };
        let ops = ops.iter().map(|data| Rc::new(OutFrame::new(Kind::Binary, data))).collect();
        let snapshot = match self.store.latest_snapshot(id).await? {
            Some(s) => {
                let text = String::from_utf8(s.state.into_vec())
                    .map_err(|_| StoreError::Read("a stored snapshot is not UTF-8".into()))?;
                let state = serde_json::value::RawValue::from_string(text)
                    .map_err(|_| StoreError::Read("a stored snapshot is not JSON".into()))?;
                Some(Snapshot { seq: s.seq, state })
            }
            None => None,
        };
        Ok(DocumentHub::restore(id, cap, Restored { epoch: head.epoch, seq: head.seq, ops, snapshot }))
    }

    /// A loaded document of this core.
    pub(crate) fn document(&self, id: &str) -> Option<Rc<DocumentHub>> {
        self.documents.borrow().get(id).cloned()
    }

    /// Replaces a loaded document's hub (cluster mode: a new epoch).
    pub(crate) fn replace_document(&self, id: &str, hub: Rc<DocumentHub>) {
        self.documents.borrow_mut().insert(id.into(), hub);
    }

    /// Every session of this core.
    pub(crate) fn all_sessions(&self) -> Vec<Rc<Session>> {
        self.sessions.borrow().values().cloned().collect()
    }

    /// A session of this core, by connection id.
    pub(crate) fn session(&self, id: u64) -> Option<Rc<Session>> {
        self.sessions.borrow().get(&id).cloned()
    }

    /// Queues a commit until its record is stored.
    pub(crate) fn defer(&self, commit: Commit) {
        self.commits.borrow_mut().push_back(commit);
        if let Some(w) = self.commit_waker.take() {
            w.wake();
        }
    }

    /// Whether commits wait for their records (new ones must queue behind).
    pub(crate) fn commits_pending(&self) -> bool {
        !self.commits.borrow().is_empty()
    }

    /// Publishes and acknowledges what the store has stored, and refuses
    /// what it failed to store, in order; runs for the life of the core.
    pub async fn commit_loop(self: Rc<Self>) {
        loop {
            let ticket = poll_fn(|cx| match self.commits.borrow().front() {
                Some(c) => Poll::Ready(c.ticket),
                None => {
                    self.commit_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            let outcome = self.store.wait(ticket).await;
            let stored = self.store.stored();
            loop {
                let next = {
                    let mut commits = self.commits.borrow_mut();
                    match commits.front() {
                        Some(c) if c.ticket <= stored || outcome.is_err() && c.ticket <= self.store.failed() => {
                            commits.pop_front()
                        }
                        _ => None,
                    }
                };
                let Some(c) = next else { break };
                if c.ticket <= stored {
                    super::handlers::committed(&self, c);
                } else {
                    let why = outcome.as_ref().err().map_or_else(String::new, |e| e.to_string());
                    super::handlers::not_committed(&self, c, &why);
                }
            }
        }
    }

    /// Frees documents that have had no session for `documents.idle_unload_ms`
    /// and have nothing waiting to be stored.
    fn unload_idle_documents(&self, now: Instant) {
        let after = Config::ms(self.config.documents.idle_unload_ms);
        let before = self.documents.borrow().len();
        // Written, not only stored: with fsync = "never" a record counts as
        // stored before it is written, and a reload must find it.
        let written = self.store.written();
        let mut unloaded_ids = Vec::new();
        self.documents.borrow_mut().retain(|id, hub| {
            let keep = hub.subscriber_count() > 0
                || hub.storing()
                || hub.last_ticket.get() > written
                || hub.empty_since.get().is_none_or(|t| now - t < after);
            if !keep && self.cluster.is_some() {
                unloaded_ids.push(id.clone());
            }
            keep
        });
        if let Some(cluster) = &self.cluster {
            for document in unloaded_ids {
                cluster.send(crate::cluster::Request::Unfollow { document });
            }
        }
        let unloaded = before - self.documents.borrow().len();
        self.stats().documents.sub(unloaded as u64);
        super::yjs::tick(self, now, after);
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
                if self.sessions.borrow().is_empty()
                    && self.documents.borrow().is_empty()
                    && self.rooms.borrow().is_empty()
                {
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
                        } else if session.token_expired(now) {
                            session.begin_close(&self, close::AUTH_FAILED, "token expired");
                        } else if quiet >= idle {
                            session.begin_close(&self, close::GOING_AWAY, "idle timeout");
                        } else if quiet >= ping && now - session.last_ping.get() >= ping {
                            session.last_ping.set(now);
                            session.keepalive(&self);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
