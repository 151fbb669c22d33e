//! Property tests of the broadcast ring and its cursors (`docrelay::document::Ring`):
//! for any interleaving of publishes and reads by several cursors, with small
//! capacities, every reader sees the published entries in increasing order,
//! without a gap, except a gap announced by exactly one `Read::Lagged
//! { from, to }` that names precisely the entries it missed; never a
//! duplicate, never an entry out of order, never a lag that was not one.

use std::rc::Rc;

use docrelay::document::{Entry, Read, Ring};
use docrelay::ws::{Kind, OutFrame};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    /// Publishes this many entries.
    Publish(usize),
    /// Reader `index % readers` reads up to this many times.
    Read { index: usize, times: usize },
    /// A new reader joins at the ring's head (as a subscription does).
    Join,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..12).prop_map(Step::Publish),
        5 => (any::<usize>(), 1usize..8).prop_map(|(index, times)| Step::Read { index, times }),
        1 => Just(Step::Join),
    ]
}

/// One cursor and everything its reads returned.
struct Reader {
    cursor: u64,
    joined_at: u64,
    /// Where the next read should continue: one past the last position
    /// delivered or announced as missed.
    expect: u64,
    /// Positions delivered, and ranges announced as missed, in read order.
    delivered: Vec<u64>,
    missed: Vec<(u64, u64)>,
}

impl Reader {
    fn new(head: u64) -> Reader {
        Reader { cursor: head, joined_at: head, expect: head, delivered: Vec::new(), missed: Vec::new() }
    }

    /// One read, checked against what the ring must answer: the ring holds
    /// `[max(first, head - capacity), head)`.
    fn read(&mut self, ring: &Ring, first: u64, capacity: usize) -> Result<bool, TestCaseError> {
        let head = ring.head();
        let oldest = head.saturating_sub(capacity as u64).max(first);
        prop_assert_eq!(ring.oldest(), oldest);
        let at = self.cursor;
        prop_assert_eq!(at, self.expect, "the cursor moved between reads");
        match ring.read(&mut self.cursor) {
            (Read::Empty, None) => {
                prop_assert_eq!(at, head, "Empty with entries {}..{} unread", at, head);
                Ok(false)
            }
            (Read::Entry(pos), Some(entry)) => {
                prop_assert!(at >= oldest && at < head, "entry read at {} outside the held {}..{}", at, oldest, head);
                prop_assert_eq!(pos, at, "an entry out of order");
                prop_assert_eq!(entry.origin, pos, "the entry at {} is another one", pos);
                let text = pos.to_string();
                prop_assert_eq!(entry.frame.payload(), text.as_bytes());
                prop_assert_eq!(self.cursor, pos + 1);
                self.delivered.push(pos);
                self.expect = pos + 1;
                Ok(true)
            }
            (Read::Lagged { from, to }, None) => {
                prop_assert!(at < oldest, "a lag announced at {} while {} is still held", at, at);
                prop_assert_eq!((from, to), (at, oldest - 1), "the lag does not name exactly the missed entries");
                prop_assert_eq!(self.cursor, oldest);
                self.missed.push((from, to));
                self.expect = to + 1;
                Ok(true)
            }
            (read, entry) => Err(TestCaseError::fail(format!("{read:?} with an entry: {}", entry.is_some()))),
        }
    }

    /// Delivered and missed together cover `[joined_at, end)` once each, in order.
    fn check_complete(&self, end: u64) -> Result<(), TestCaseError> {
        let mut covered: Vec<u64> = self.delivered.clone();
        for &(from, to) in &self.missed {
            covered.extend(from..=to);
        }
        covered.sort_unstable();
        let want: Vec<u64> = (self.joined_at..end).collect();
        prop_assert_eq!(covered, want, "delivered or missed not exactly once each");
        prop_assert!(self.delivered.windows(2).all(|w| w[0] < w[1]), "delivered out of order or twice");
        Ok(())
    }
}

fn entry(pos: u64) -> Entry {
    Entry { origin: pos, frame: Rc::new(OutFrame::new(Kind::Binary, pos.to_string().as_bytes())) }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn readers_see_every_entry_once_in_order_or_an_exact_lag(
        capacity in 1usize..6,
        first in prop_oneof![Just(0u64), Just(1u64), 2u64..1_000_000],
        steps in prop::collection::vec(step(), 1..80),
        initial_readers in 1usize..4,
    ) {
        let ring = Ring::new(capacity, first);
        prop_assert_eq!((ring.head(), ring.oldest(), ring.len()), (first, first, 0));
        let mut readers: Vec<Reader> = (0..initial_readers).map(|_| Reader::new(first)).collect();
        for step in steps {
            match step {
                Step::Publish(n) => {
                    for _ in 0..n {
                        let pos = ring.head();
                        prop_assert_eq!(ring.publish(entry(pos)), pos);
                        prop_assert_eq!(ring.head(), pos + 1);
                        prop_assert!(ring.len() <= capacity);
                    }
                }
                Step::Read { index, times } => {
                    let i = index % readers.len();
                    for _ in 0..times {
                        if !readers[i].read(&ring, first, capacity)? {
                            break;
                        }
                    }
                }
                Step::Join => readers.push(Reader::new(ring.head())),
            }
        }
        // Every reader catches up; then what it got covers all it could.
        for r in &mut readers {
            let mut reads = 0;
            while r.read(&ring, first, capacity)? {
                reads += 1;
                prop_assert!(reads <= capacity + 1, "more reads than the ring holds");
            }
            r.check_complete(ring.head())?;
        }
    }

    /// A reader that reads whenever the ring is full never lags.
    #[test]
    fn a_reader_that_keeps_up_never_lags(
        capacity in 1usize..6,
        bursts in prop::collection::vec(1usize..6, 1..40),
    ) {
        let ring = Ring::new(capacity, 1);
        let mut r = Reader::new(1);
        for burst in bursts {
            for _ in 0..burst {
                if ring.head() - r.cursor == capacity as u64 {
                    r.read(&ring, 1, capacity)?;
                }
                ring.publish(entry(ring.head()));
            }
        }
        while r.read(&ring, 1, capacity)? {}
        prop_assert!(r.missed.is_empty(), "lagged: {:?}", r.missed);
        r.check_complete(ring.head())?;
    }
}
