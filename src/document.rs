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
use crate::store::{Epoch, Ticket};
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

    /// Drops every entry and goes on at position `next`: readers behind it
    /// are told they lagged.
    pub fn skip_to(&self, next: u64) {
        if next > self.next.get() {
            self.slots.borrow_mut().clear();
            self.next.set(next);
        }
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
    /// The identity of this history (`docs/protocol.md`, "Epochs").
    pub epoch: Epoch,
    /// The same, as sent on the wire.
    pub epoch_text: Box<str>,
    /// Seq given to the newest accepted operation; above `seq()` while its
    /// record is being stored (it is published once stored).
    assigned: Cell<u64>,
    /// Ticket of the last record appended to the store for this document.
    pub last_ticket: Cell<Ticket>,
    /// Operations; positions are the operations' `seq`, starting at 1.
    pub ops: Ring,
    /// Cursor updates and join/leave.
    pub presence: Ring,
    /// The last `history_ops` operation frames, for `sync_request`.
    history: RefCell<VecDeque<SharedFrame>>,
    history_cap: usize,
    snapshot: RefCell<Option<Snapshot>>,
    /// Joined sessions: their participant data and a waker for their
    /// writer, in `connection_id` order (the order they connected).
    subscribers: RefCell<Vec<(Participant, Rc<dyn Subscriber>)>>,
    /// Since when the document has had no subscribers (for unloading).
    pub(crate) empty_since: Cell<Option<Instant>>,
    /// Cluster mode: the sessions joined on other nodes, in
    /// `connection_id` order.
    remote: RefCell<Vec<Participant>>,
}

/// What a hub needs of a subscribed session: to be told there is more.
pub trait Subscriber {
    fn notify(&self);
}

/// What `sync_request` can answer: one page of it.
#[derive(Debug)]
pub enum Sync<'a> {
    /// History covers `since`: no snapshot, the operations after it.
    History { ops: Page },
    /// The snapshot plus the operations after it.
    Snapshot { snapshot: std::cell::Ref<'a, Snapshot>, ops: Page },
    /// `since` is ahead of the document.
    Ahead,
    /// The history no longer covers `since`, and no snapshot helps.
    Gone,
}

/// Operations of one `sync_response`: the next ones in order, as many as fit
/// in the page's byte budget but at least one; `more` when some were left.
#[derive(Debug)]
pub struct Page {
    pub ops: Vec<SharedFrame>,
    pub more: bool,
}

impl std::fmt::Debug for DocumentHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentHub").field("id", &self.id).field("seq", &self.seq()).finish_non_exhaustive()
    }
}

/// A document's history as a store gave it back: where the hub resumes.
#[derive(Debug)]
pub struct Restored {
    pub epoch: Epoch,
    /// Seq of the last stored operation.
    pub seq: u64,
    /// The stored operations ending at `seq`, oldest first.
    pub ops: Vec<SharedFrame>,
    pub snapshot: Option<Snapshot>,
}

/// Sizes of a hub's rings and history.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub ring: usize,
    pub presence: usize,
    pub history: usize,
}

impl DocumentHub {
    /// A document whose history starts now, with a new epoch.
    pub fn new(id: &str, cap: Capacity) -> DocumentHub {
        DocumentHub::restore(id, cap, Restored { epoch: Epoch::random(), seq: 0, ops: Vec::new(), snapshot: None })
    }

    /// A document resuming a stored history: the next operation gets
    /// `seq + 1`; sync serves the stored operations and snapshot.
    pub fn restore(id: &str, cap: Capacity, from: Restored) -> DocumentHub {
        let keep = from.ops.len().min(cap.history);
        let history: VecDeque<SharedFrame> = from.ops.into_iter().rev().take(keep).rev().collect();
        DocumentHub {
            id: id.into(),
            epoch: from.epoch,
            epoch_text: from.epoch.to_string().into(),
            assigned: Cell::new(from.seq),
            last_ticket: Cell::new(0),
            ops: Ring::new(cap.ring, from.seq + 1),
            presence: Ring::new(cap.presence, 0),
            history: RefCell::new(history),
            history_cap: cap.history,
            snapshot: RefCell::new(from.snapshot),
            subscribers: RefCell::new(Vec::new()),
            empty_since: Cell::new(Some(Instant::now())),
            remote: RefCell::new(Vec::new()),
        }
    }

    /// Gives the next operation its seq (published later, once stored).
    pub fn assign_seq(&self) -> u64 {
        let seq = self.assigned.get() + 1;
        self.assigned.set(seq);
        seq
    }

    /// The last seq assigned (published, or waiting to be stored).
    pub fn assigned(&self) -> u64 {
        self.assigned.get()
    }

    /// Takes back the seq just assigned (its record was refused at once).
    pub fn unassign_last(&self, seq: u64) {
        assert_eq!(seq, self.assigned.get(), "only the last assigned seq can be taken back");
        self.assigned.set(seq - 1);
    }

    /// Forgets every assigned seq not yet published (their records failed).
    pub fn unassign(&self) {
        self.assigned.set(self.seq());
    }

    /// Whether operations are assigned and not yet published.
    pub fn storing(&self) -> bool {
        self.assigned.get() > self.seq()
    }

    /// The seq of the last accepted operation (0 for a new document).
    pub fn seq(&self) -> u64 {
        self.ops.head() - 1
    }

    /// Calls `f` with a page of participants, without copying them: at most
    /// `max` whose `connection_id` is above `after` (from the first with
    /// `None`), in `connection_id` order, and the `connection_id` to ask
    /// from for the next page (`None`: no participants after these).
    pub fn with_participants<R>(
        &self,
        after: Option<u64>,
        max: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = &Participant>, Option<u64>) -> R,
    ) -> R {
        let subs = self.subscribers.borrow();
        let remote = self.remote.borrow();
        if remote.is_empty() {
            let from = after.map_or(0, |a| subs.partition_point(|(p, _)| p.connection_id <= a));
            let page = &subs[from..(from + max).min(subs.len())];
            let next = if from + page.len() < subs.len() { page.last().map(|(p, _)| p.connection_id) } else { None };
            return f(&mut page.iter().map(|(p, _)| p), next);
        }
        // Cluster mode: both lists, merged in `connection_id` order.
        let mut all: Vec<&Participant> = subs.iter().map(|(p, _)| p).chain(remote.iter()).collect();
        all.sort_by_key(|p| p.connection_id);
        let from = after.map_or(0, |a| all.partition_point(|p| p.connection_id <= a));
        let page = &all[from..(from + max).min(all.len())];
        let next = if from + page.len() < all.len() { page.last().map(|p| p.connection_id) } else { None };
        f(&mut page.iter().copied(), next)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.borrow().len()
    }

    /// Participants on this node and (cluster mode) on the others.
    pub fn participant_count(&self) -> usize {
        self.subscribers.borrow().len() + self.remote.borrow().len()
    }

    /// Cluster mode: a session joined on another node. False if it was
    /// known already.
    pub fn add_remote(&self, p: Participant) -> bool {
        let mut r = self.remote.borrow_mut();
        match r.binary_search_by_key(&p.connection_id, |x| x.connection_id) {
            Ok(_) => false,
            Err(at) => {
                r.insert(at, p);
                true
            }
        }
    }

    /// Cluster mode: a session of another node left. False if it was not
    /// known.
    pub fn remove_remote(&self, connection_id: u64) -> bool {
        let mut r = self.remote.borrow_mut();
        match r.binary_search_by_key(&connection_id, |x| x.connection_id) {
            Ok(at) => {
                r.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Cluster mode: the sessions of other nodes.
    pub fn remote_participants(&self) -> Vec<Participant> {
        self.remote.borrow().clone()
    }

    /// The local subscribers' participant data.
    pub fn local_participants(&self) -> Vec<Participant> {
        self.subscribers.borrow().iter().map(|(p, _)| p.clone()).collect()
    }

    /// Cluster mode: the operations up to `seq` can no longer be had (the
    /// stream dropped them before this node got them): the document goes on
    /// after `seq`, its history starts again there, and subscribers that had
    /// not read up to it are told `lagged`.
    pub fn skip_to(&self, seq: u64) {
        if seq <= self.seq() {
            return;
        }
        self.ops.skip_to(seq + 1);
        self.history.borrow_mut().clear();
        self.assigned.set(seq);
        self.notify_all();
    }

    pub fn subscribe(&self, participant: Participant, subscriber: Rc<dyn Subscriber>) {
        let mut subs = self.subscribers.borrow_mut();
        let at = subs.partition_point(|(p, _)| p.connection_id < participant.connection_id);
        subs.insert(at, (participant, subscriber));
        self.empty_since.set(None);
    }

    pub fn unsubscribe(&self, connection_id: u64) {
        let mut subs = self.subscribers.borrow_mut();
        if let Ok(at) = subs.binary_search_by_key(&connection_id, |(p, _)| p.connection_id) {
            subs.remove(at);
        }
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

    /// The operations after `after`, up to `max_bytes` of their frames'
    /// payloads (at least one).
    fn history_after(&self, after: u64, max_bytes: usize) -> Page {
        let h = self.history.borrow();
        let skip = (after + 1).saturating_sub(self.history_oldest()) as usize;
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        for op in h.iter().skip(skip) {
            let len = op.payload().len();
            if !ops.is_empty() && bytes + len > max_bytes {
                return Page { ops, more: true };
            }
            bytes += len;
            ops.push(op.clone());
        }
        Page { ops, more: false }
    }

    /// Whether a snapshot at `seq` would replace the one held.
    pub fn newer_snapshot(&self, seq: u64) -> bool {
        self.snapshot.borrow().as_ref().is_none_or(|s| seq > s.seq)
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
    pub fn sync(&self, since: u64, max_bytes: usize) -> Sync<'_> {
        if since > self.seq() {
            return Sync::Ahead;
        }
        if since + 1 >= self.history_oldest() {
            return Sync::History { ops: self.history_after(since, max_bytes) };
        }
        let snap = self.snapshot.borrow();
        match snap.as_ref().map(|s| s.seq) {
            Some(s) if s + 1 >= self.history_oldest() => {
                let ops = self.history_after(s, max_bytes);
                Sync::Snapshot { snapshot: std::cell::Ref::map(snap, |s| s.as_ref().unwrap()), ops }
            }
            _ => Sync::Gone,
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
        let hub = DocumentHub::new("d", Capacity { ring: 8, presence: 4, history: 3 });
        for seq in 1..=5 {
            hub.publish_op(seq, 0, frame(seq));
        }
        // History holds 3..=5.
        let all = usize::MAX;
        assert!(matches!(hub.sync(5, all), Sync::History { ops } if ops.ops.is_empty() && !ops.more));
        assert!(matches!(hub.sync(2, all), Sync::History { ops } if ops.ops.len() == 3 && !ops.more));
        assert!(matches!(hub.sync(6, all), Sync::Ahead));
        assert!(matches!(hub.sync(1, all), Sync::Gone));
        hub.store_snapshot(3, RawValue::from_string("{\"v\":3}".into()).unwrap());
        hub.store_snapshot(2, RawValue::from_string("{\"v\":2}".into()).unwrap());
        match hub.sync(0, all) {
            Sync::Snapshot { snapshot, ops } => {
                assert_eq!((snapshot.seq, snapshot.state.get()), (3, "{\"v\":3}"));
                assert_eq!(ops.ops.len(), 2);
            }
            other => panic!("{other:?}"),
        };
    }

    #[test]
    fn sync_pages_hold_at_most_their_budget_and_at_least_one_operation() {
        let hub = DocumentHub::new("d", Capacity { ring: 8, presence: 4, history: 10 });
        for seq in 1..=5 {
            hub.publish_op(seq, 0, frame(seq));
        }
        // Each frame's payload is one byte ("1".."5").
        let seqs = |p: &Page| p.ops.iter().map(|f| f.payload().to_vec()).collect::<Vec<_>>();
        let Sync::History { ops } = hub.sync(0, 2) else { panic!() };
        assert_eq!((seqs(&ops), ops.more), (vec![b"1".to_vec(), b"2".to_vec()], true));
        let Sync::History { ops } = hub.sync(2, 0) else { panic!() };
        assert_eq!((seqs(&ops), ops.more), (vec![b"3".to_vec()], true));
        let Sync::History { ops } = hub.sync(3, 2) else { panic!() };
        assert_eq!((seqs(&ops), ops.more), (vec![b"4".to_vec(), b"5".to_vec()], false));
    }

    #[test]
    fn a_restored_hub_resumes_after_its_stored_seq() {
        let cap = Capacity { ring: 8, presence: 4, history: 2 };
        let ops = (5..=7).map(frame).collect();
        let hub = DocumentHub::restore("d", cap, Restored { epoch: Epoch(3), seq: 7, ops, snapshot: None });
        assert_eq!((hub.seq(), hub.epoch_text.as_ref()), (7, "0000000000000003"));
        assert!(matches!(hub.sync(5, usize::MAX), Sync::History { ops } if ops.ops.len() == 2));
        assert!(matches!(hub.sync(4, usize::MAX), Sync::Gone));
        assert_eq!(hub.assign_seq(), 8);
        assert!(hub.storing());
        hub.unassign();
        assert_eq!(hub.assign_seq(), 8);
        hub.publish_op(8, 0, frame(8));
        assert!(!hub.storing());
    }

    #[test]
    #[should_panic(expected = "grow by exactly 1")]
    fn seq_continuity_is_asserted() {
        let hub = DocumentHub::new("d", Capacity { ring: 8, presence: 4, history: 3 });
        hub.publish_op(2, 0, frame(2));
    }
}
