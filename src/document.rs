//! DocumentHub: everything about one document, on its owner core.
//!
//! Two rings of encoded broadcast frames, the document ring (operations) and
//! the presence ring (cursors, join and leave), each entry one frame shared by
//! every subscriber (`Rc`, on one thread: no lock, no atomic). A subscriber is
//! a pair of positions in those rings, not a queue: publishing costs one ring
//! slot and one wake-up per subscriber, whatever the subscribers' speed. A
//! subscriber overtaken by the ring is moved to the oldest entry still held and
//! told `lagged` (operations) or silently skips ahead (presence).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use serde_json::value::RawValue;

use crate::protocol::Participant;
use crate::ws::SharedFrame;

/// One broadcast in a ring: who sent it (they do not receive it) and its frame.
#[derive(Debug, Clone)]
pub struct Entry {
    pub origin: u64,
    pub frame: SharedFrame,
}

/// A fixed-capacity ring addressed by ever-growing positions.
#[derive(Debug)]
pub struct Ring {
    slots: RefCell<VecDeque<Entry>>,
    capacity: usize,
    /// Position of the next entry to be published; entries
    /// `[next - len, next)` are held.
    next: Cell<u64>,
}

/// What a subscriber's read of a ring found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Nothing new.
    Empty,
    /// The entry at the cursor (the cursor has advanced past it).
    Entry(u64),
    /// The cursor had fallen behind the oldest held entry; it was moved there.
    /// The positions `[from, to]` were missed.
    Lagged { from: u64, to: u64 },
}

impl Ring {
    pub fn new(capacity: usize, first: u64) -> Ring {
        // Slots grow with use up to `capacity`: most documents of a busy
        // relay hold a handful of entries, and idle memory per connection
        // counts (a 64-slot start cost ~400 bytes per joined connection).
        Ring { slots: RefCell::new(VecDeque::new()), capacity, next: Cell::new(first) }
    }

    /// Position the next published entry gets.
    pub fn head(&self) -> u64 {
        self.next.get()
    }

    /// Position of the oldest entry held.
    pub fn oldest(&self) -> u64 {
        self.next.get() - self.slots.borrow().len() as u64
    }

    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.borrow().is_empty()
    }

    /// Appends an entry, dropping the oldest when full; returns its position.
    pub fn publish(&self, entry: Entry) -> u64 {
        let mut slots = self.slots.borrow_mut();
        if slots.len() == self.capacity {
            slots.pop_front();
        }
        slots.push_back(entry);
        let pos = self.next.get();
        self.next.set(pos + 1);
        pos
    }

    /// Reads the entry at `*cursor` and advances the cursor, or reports a lag
    /// (moving the cursor to the oldest entry held).
    pub fn read(&self, cursor: &mut u64) -> (Read, Option<Entry>) {
        let oldest = self.oldest();
        if *cursor < oldest {
            let from = *cursor;
            *cursor = oldest;
            return (Read::Lagged { from, to: oldest - 1 }, None);
        }
        if *cursor >= self.next.get() {
            return (Read::Empty, None);
        }
        let slots = self.slots.borrow();
        let entry = slots[(*cursor - oldest) as usize].clone();
        let pos = *cursor;
        *cursor += 1;
        (Read::Entry(pos), Some(entry))
    }
}

/// A snapshot a client stored: the document's state at `seq`.
#[derive(Debug)]
pub struct Snapshot {
    pub seq: u64,
    pub state: Box<RawValue>,
}

/// One document on its owner core.
pub struct DocumentHub {
    pub id: Box<str>,
    /// Operations; positions are the operations' `seq`, starting at 1.
    pub ops: Ring,
    /// Cursor updates and join/leave.
    pub presence: Ring,
    /// The last `history_ops` operation frames, for `sync_request`.
    history: RefCell<VecDeque<SharedFrame>>,
    history_cap: usize,
    snapshot: RefCell<Option<Snapshot>>,
    /// Joined sessions: their participant data and a waker for their writer.
    subscribers: RefCell<Vec<(Participant, Rc<dyn Subscriber>)>>,
    /// Since when the document has had no subscribers (for unloading).
    pub(crate) empty_since: Cell<Option<Instant>>,
}

/// What a hub needs of a subscribed session: to be told there is more.
pub trait Subscriber {
    fn notify(&self);
}

/// What `sync_request` can answer.
#[derive(Debug)]
pub enum Sync<'a> {
    /// History covers `since`: no snapshot, the operations after it.
    History {
        ops: Vec<SharedFrame>,
    },
    /// The snapshot plus the operations after it.
    Snapshot {
        snapshot: std::cell::Ref<'a, Snapshot>,
        ops: Vec<SharedFrame>,
    },
    Unavailable,
}

impl std::fmt::Debug for DocumentHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentHub").field("id", &self.id).field("seq", &self.seq()).finish_non_exhaustive()
    }
}

impl DocumentHub {
    pub fn new(id: &str, ring_capacity: usize, presence_capacity: usize, history_ops: usize) -> DocumentHub {
        DocumentHub {
            id: id.into(),
            ops: Ring::new(ring_capacity, 1),
            presence: Ring::new(presence_capacity, 0),
            history: RefCell::new(VecDeque::new()),
            history_cap: history_ops,
            snapshot: RefCell::new(None),
            subscribers: RefCell::new(Vec::new()),
            empty_since: Cell::new(Some(Instant::now())),
        }
    }

    /// The seq of the last accepted operation (0 for a new document).
    pub fn seq(&self) -> u64 {
        self.ops.head() - 1
    }

    /// Calls `f` with the participants, in join order, without copying them.
    pub fn with_participants<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &Participant>) -> R) -> R {
        f(&mut self.subscribers.borrow().iter().map(|(p, _)| p))
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.borrow().len()
    }

    pub fn subscribe(&self, participant: Participant, subscriber: Rc<dyn Subscriber>) {
        self.subscribers.borrow_mut().push((participant, subscriber));
        self.empty_since.set(None);
    }

    pub fn unsubscribe(&self, connection_id: u64) {
        let mut subs = self.subscribers.borrow_mut();
        subs.retain(|(p, _)| p.connection_id != connection_id);
        if subs.is_empty() {
            self.empty_since.set(Some(Instant::now()));
        }
    }

    fn notify_all(&self) {
        // Wakers may not re-enter the hub: notify only schedules the writer.
        for (_, s) in self.subscribers.borrow().iter() {
            s.notify();
        }
    }

    /// Publishes an operation frame built for `seq` (which must be the next
    /// seq) and keeps it in the history.
    pub fn publish_op(&self, seq: u64, origin: u64, frame: SharedFrame) {
        assert_eq!(seq, self.ops.head(), "operation seq must grow by exactly 1");
        {
            let mut h = self.history.borrow_mut();
            if self.history_cap > 0 {
                if h.len() == self.history_cap {
                    h.pop_front();
                }
                h.push_back(frame.clone());
            }
        }
        self.ops.publish(Entry { origin, frame });
        self.notify_all();
    }

    pub fn publish_presence(&self, origin: u64, frame: SharedFrame) {
        self.presence.publish(Entry { origin, frame });
        self.notify_all();
    }

    /// Seq of the oldest operation in the history (`seq + 1` when empty).
    fn history_oldest(&self) -> u64 {
        self.seq() + 1 - self.history.borrow().len() as u64
    }

    fn history_after(&self, after: u64) -> Vec<SharedFrame> {
        let h = self.history.borrow();
        let skip = (after + 1).saturating_sub(self.history_oldest()) as usize;
        h.iter().skip(skip).cloned().collect()
    }

    /// Stores a snapshot unless an equal or newer one is held. The caller has
    /// checked `seq <= self.seq()`.
    pub fn store_snapshot(&self, seq: u64, state: Box<RawValue>) {
        let mut snap = self.snapshot.borrow_mut();
        if snap.as_ref().is_none_or(|s| seq > s.seq) {
            *snap = Some(Snapshot { seq, state });
        }
    }

    /// Answers `sync_request { since }` (`docs/protocol.md`, "Relay messages").
    pub fn sync(&self, since: u64) -> Sync<'_> {
        if since > self.seq() {
            return Sync::Unavailable;
        }
        if since + 1 >= self.history_oldest() {
            return Sync::History { ops: self.history_after(since) };
        }
        let snap = self.snapshot.borrow();
        match snap.as_ref().map(|s| s.seq) {
            Some(s) if s + 1 >= self.history_oldest() => {
                let ops = self.history_after(s);
                Sync::Snapshot { snapshot: std::cell::Ref::map(snap, |s| s.as_ref().unwrap()), ops }
            }
            _ => Sync::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{Kind, OutFrame};

    fn frame(n: u64) -> SharedFrame {
        Rc::new(OutFrame::new(Kind::Binary, n.to_string().as_bytes()))
    }

    #[test]
    fn ring_reads_in_order_and_reports_lag() {
        let r = Ring::new(4, 1);
        let mut cur = 1;
        assert_eq!(r.read(&mut cur).0, Read::Empty);
        for n in 1..=3 {
            r.publish(Entry { origin: 0, frame: frame(n) });
        }
        assert_eq!(r.read(&mut cur).0, Read::Entry(1));
        for n in 4..=9 {
            r.publish(Entry { origin: 0, frame: frame(n) });
        }
        // Held: 6..=9; the cursor at 2 missed 2..=5.
        assert_eq!(r.read(&mut cur).0, Read::Lagged { from: 2, to: 5 });
        assert_eq!(cur, 6);
        let (read, e) = r.read(&mut cur);
        assert_eq!(read, Read::Entry(6));
        assert_eq!(e.unwrap().frame.bytes(), frame(6).bytes());
    }

    #[test]
    fn sync_answers() {
        let hub = DocumentHub::new("d", 8, 4, 3);
        for seq in 1..=5 {
            hub.publish_op(seq, 0, frame(seq));
        }
        // History holds 3..=5.
        assert!(matches!(hub.sync(5), Sync::History { ops } if ops.is_empty()));
        assert!(matches!(hub.sync(2), Sync::History { ops } if ops.len() == 3));
        assert!(matches!(hub.sync(6), Sync::Unavailable));
        assert!(matches!(hub.sync(1), Sync::Unavailable));
        hub.store_snapshot(3, RawValue::from_string("{\"v\":3}".into()).unwrap());
        hub.store_snapshot(2, RawValue::from_string("{\"v\":2}".into()).unwrap());
        match hub.sync(0) {
            Sync::Snapshot { snapshot, ops } => {
                assert_eq!((snapshot.seq, snapshot.state.get()), (3, "{\"v\":3}"));
                assert_eq!(ops.len(), 2);
            }
            other => panic!("{other:?}"),
        };
    }

    #[test]
    #[should_panic(expected = "grow by exactly 1")]
    fn seq_continuity_is_asserted() {
        let hub = DocumentHub::new("d", 8, 4, 3);
        hub.publish_op(2, 0, frame(2));
    }
}
