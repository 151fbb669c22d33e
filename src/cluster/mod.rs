//! Cluster mode on Redis (`docs/cluster.md`): many relay processes serve the
//! same documents, and every client of a document, on whichever node, sees
//! one gap-free order, one history and everyone's presence.
//!
//! Redis sequences every operation (a Lua script: the next `seq`, `XADD` to
//! the document's stream, `PUBLISH` to its channel), so two nodes can never
//! hand out the same `seq`. Each node follows the documents it has sessions
//! on and hands every operation, in `seq` order with gaps filled from the
//! stream, to the document's owner core, which fans it out exactly as a
//! single node does (rings, `lagged`).
//!
//! The cores never talk to Redis: the [`bridge`] thread does, on its own
//! current-thread tokio runtime (redis-rs), and the cores reach it through
//! bounded flume channels. A core's side of them is a [`ClusterCore`]: its
//! requests wait in a bounded queue, and while that is full the core's
//! sessions are not read from (back-pressure), so nothing is buffered
//! without a bound; what the bridge sends a core ([`Event`]) goes through a
//! bounded channel too, and a notification that finds it full is dropped and
//! taken from the stream later, as any missed notification is.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::Waker;

use crate::protocol::Participant;
use crate::store::Epoch;

pub mod bridge;
mod keys;
mod scripts;

pub use bridge::{start, Bridge};

/// What a core asks of the bridge.
#[derive(Debug)]
pub enum Request {
    /// Follow a document (subscribe to its channel) and load it: answered by
    /// [`Event::Loaded`] to `core`.
    Load { document: Box<str>, core: usize },
    /// The core unloaded the document: stop following it.
    Unfollow { document: Box<str> },
    /// Sequence an operation: its frame is `OPERATION_PREFIX`, the seq, then
    /// `suffix`. Answered by [`Event::Appended`].
    Append {
        document: Box<str>,
        epoch: Epoch,
        origin: u64,
        suffix: Box<[u8]>,
        core: usize,
        session: u64,
        client_op_id: Option<Box<str>>,
    },
    /// Store a snapshot. Answered by [`Event::SnapshotStored`].
    Snapshot { document: Box<str>, epoch: Epoch, seq: u64, state: Box<str>, core: usize, session: u64 },
    /// A local session joins: list it in Redis and tell the other nodes
    /// (`announce`). With `reply`, answered by [`Event::Joined`] with every
    /// member Redis lists, so that the session's `joined_document` names
    /// everyone whose own join was answered before, on any node.
    Join { document: Box<str>, participant: Participant, announce: bool, reply: Option<JoinReply> },
    /// A local session left.
    Leave { document: Box<str>, connection_id: u64 },
    /// A local session's cursor, for the other nodes.
    Cursor { document: Box<str>, connection_id: u64, frame: Box<[u8]> },
}

/// Who waits for a [`Request::Join`], and what the join asked for.
#[derive(Debug, Clone)]
pub struct JoinReply {
    pub core: usize,
    pub session: u64,
    pub since: Option<u64>,
    pub epoch: Option<String>,
}

/// A document as Redis holds it, when a node loads it.
#[derive(Debug)]
pub struct Loaded {
    pub epoch: Epoch,
    pub seq: u64,
    /// The stream's operations ending at `seq`, oldest first (at most
    /// `documents.history_ops`), each in a buffer from
    /// `OutFrame::payload_buffer`.
    pub ops: Vec<Vec<u8>>,
    pub snapshot: Option<(u64, Box<str>)>,
    /// Sessions joined on other nodes.
    pub members: Vec<Participant>,
}

/// Why Redis did not take an operation or a snapshot.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// Redis did not answer (or answered an error): nothing was stored.
    Unavailable(String),
    /// The document's history in Redis has another epoch (Redis lost the
    /// document and it started again): nothing was stored.
    Epoch(Epoch),
    /// A snapshot of a seq the document has not reached.
    Ahead { seq: u64 },
}

/// A presence change from another node.
#[derive(Debug)]
pub enum Presence {
    Joined(Participant),
    /// A session left (or its node died): its participant data.
    Left(Participant),
    /// A cursor frame as the other node built it.
    Cursor(Box<[u8]>),
}

/// What the bridge sends a core. Events of one document come in order.
#[derive(Debug)]
pub enum Event {
    Loaded {
        document: Box<str>,
        result: Result<Loaded, String>,
    },
    /// The next operation of a document (`seq` is the last one sent plus 1).
    /// `frame` is its JSON in a buffer from `OutFrame::payload_buffer`, so
    /// the core frames it without copying it again.
    Op {
        document: Box<str>,
        epoch: Epoch,
        seq: u64,
        origin: u64,
        frame: Vec<u8>,
    },
    /// Operations up to `to` are gone from the stream before this node got
    /// them: the document skips to `to` (subscribers are told `lagged`).
    Gap {
        document: Box<str>,
        epoch: Epoch,
        to: u64,
    },
    /// The document's history in Redis has a new epoch (Redis lost it):
    /// the document starts again at seq 0; its operations follow.
    Reset {
        document: Box<str>,
        epoch: Epoch,
    },
    /// A session of another node joined, left or moved its cursor.
    Presence {
        document: Box<str>,
        origin: u64,
        change: Presence,
    },
    /// Everyone joined on other nodes, as Redis lists them (after Redis came
    /// back, or when presence notifications were missed): the core
    /// announces the difference.
    Members {
        document: Box<str>,
        members: Vec<Participant>,
    },
    /// A snapshot stored through any node.
    Snapshot {
        document: Box<str>,
        epoch: Epoch,
        seq: u64,
        state: Box<str>,
    },
    /// The answer to [`Request::Append`].
    Appended {
        session: u64,
        client_op_id: Option<Box<str>>,
        result: Result<u64, Refusal>,
    },
    /// The answer to [`Request::Snapshot`].
    SnapshotStored {
        session: u64,
        seq: u64,
        result: Result<(), Refusal>,
    },
    /// The answer to a [`Request::Join`] with a reply: the members of other
    /// nodes, or why Redis did not list the session.
    Joined {
        document: Box<str>,
        participant: Participant,
        reply: JoinReply,
        result: Result<Vec<Participant>, String>,
    },
}

/// A core's side of the bridge.
pub struct ClusterCore {
    pub index: usize,
    requests: flume::Sender<Request>,
    /// Requests the bridge's channel had no room for, in order; bounded by
    /// `cluster.queue` plus what one read of one session holds (readers
    /// stop while it is not empty).
    backlog: RefCell<VecDeque<Request>>,
    /// Readers waiting for the backlog to drain, and the drainer.
    waiting: RefCell<Vec<Waker>>,
    drainer: Cell<Option<Waker>>,
    /// A request taken from the backlog is on its way into the channel: new
    /// ones queue behind it.
    draining: Cell<bool>,
    pub events: flume::Receiver<Event>,
}

impl ClusterCore {
    pub fn new(index: usize, requests: flume::Sender<Request>, events: flume::Receiver<Event>) -> ClusterCore {
        ClusterCore {
            index,
            requests,
            backlog: RefCell::new(VecDeque::new()),
            waiting: RefCell::new(Vec::new()),
            drainer: Cell::new(None),
            draining: Cell::new(false),
            events,
        }
    }

    /// Queues a request for the bridge, in order behind any backlog.
    pub fn send(&self, request: Request) {
        let mut backlog = self.backlog.borrow_mut();
        if backlog.is_empty() && !self.draining.get() {
            match self.requests.try_send(request) {
                Ok(()) => return,
                Err(flume::TrySendError::Full(r)) => backlog.push_back(r),
                // The bridge is gone (shutdown): nothing to do.
                Err(flume::TrySendError::Disconnected(_)) => return,
            }
        } else {
            backlog.push_back(request);
        }
        if let Some(w) = self.drainer.take() {
            w.wake();
        }
    }

    /// Whether the core's sessions may be read from: no request waits for
    /// room in the bridge's channel. Registers `waker` otherwise.
    pub fn has_room(&self, waker: &Waker) -> bool {
        if self.backlog.borrow().is_empty() && !self.draining.get() {
            return true;
        }
        let mut waiting = self.waiting.borrow_mut();
        // A reader polled again while it waits is not listed twice.
        if !waiting.iter().any(|w| w.will_wake(waker)) {
            waiting.push(waker.clone());
        }
        false
    }

    /// Whether every request has gone into the bridge's channel.
    pub fn is_drained(&self) -> bool {
        self.backlog.borrow().is_empty() && !self.draining.get()
    }

    /// Moves the backlog into the bridge's channel as room appears, and
    /// wakes the readers that waited; runs for the life of the core.
    pub async fn drain_backlog(&self) {
        loop {
            std::future::poll_fn(|cx| {
                if self.backlog.borrow().is_empty() {
                    self.drainer.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            self.draining.set(true);
            loop {
                let Some(next) = self.backlog.borrow_mut().pop_front() else { break };
                if self.requests.send_async(next).await.is_err() {
                    self.backlog.borrow_mut().clear();
                }
            }
            self.draining.set(false);
            for w in self.waiting.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}
