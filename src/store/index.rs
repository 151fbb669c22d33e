//! Where each document's live records are, and how many live records each
//! segment still holds. Recovery builds it from the segments; the log keeps
//! it current as records are stored. A record is *live* while recovery
//! would need it: one of the last `window` operations of its document, or
//! its document's latest snapshot. A segment without live records is
//! deleted (compaction).
//!
//! A Yjs room's history ([`yjs_key`]) is *merged*: its snapshot is the room's
//! whole state as one update, and every update after that snapshot is live
//! however many there are (recovery applies them all); an update up to the
//! snapshot's seq is dead. The room bounds them by writing a new snapshot.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::record::Kind;
use super::Epoch;

/// The store key of the Yjs room `room` (`/yjs/{room}`): a namespace of its
/// own, since no document id holds a `/`. Rooms are placed on cores by it.
pub fn yjs_key(room: &str) -> String {
    format!("{YJS_PREFIX}{room}")
}

const YJS_PREFIX: &str = "yjs/";

/// The room of a Yjs room's store key.
pub fn yjs_room_of(key: &str) -> Option<&str> {
    key.strip_prefix(YJS_PREFIX)
}

/// Whether a store key is a Yjs room's (merged history).
pub fn is_merged(document: &str) -> bool {
    document.starts_with(YJS_PREFIX)
}

/// Where a record is: its segment, its offset there, its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// A document's live records.
#[derive(Debug, Clone)]
pub struct DocIndex {
    pub epoch: Epoch,
    /// Seq of the last operation stored.
    pub seq: u64,
    /// The operations `seq + 1 - ops.len() ..= seq`, contiguous.
    pub ops: VecDeque<Loc>,
    pub snapshot: Option<(u64, Loc)>,
}

impl DocIndex {
    /// Seq of the oldest operation that can be read back.
    pub fn oldest(&self) -> u64 {
        self.seq + 1 - self.ops.len() as u64
    }

    /// Every live record.
    pub fn locs(&self) -> impl Iterator<Item = Loc> + '_ {
        self.ops.iter().copied().chain(self.snapshot.map(|(_, l)| l))
    }
}

/// Per segment: its writer core, and its live and written records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    pub core: usize,
    pub live: u64,
    /// Records written to it (counted by the writer, and by recovery's scan).
    pub records: u64,
}

/// The index of a set of documents and the segments holding them.
#[derive(Debug, Default)]
pub struct Index {
    /// Operations kept per document (at least 1: the last one carries the
    /// document's seq and epoch across restarts).
    window: usize,
    pub docs: HashMap<Box<str>, DocIndex>,
    pub segments: BTreeMap<u64, SegmentInfo>,
}

impl Index {
    pub fn new(window: usize) -> Index {
        Index { window: window.max(1), docs: HashMap::new(), segments: BTreeMap::new() }
    }

    fn release(segments: &mut BTreeMap<u64, SegmentInfo>, loc: Loc) {
        if let Some(s) = segments.get_mut(&loc.segment) {
            s.live = s.live.saturating_sub(1);
        }
    }

    /// Adds a stored record. Records of a document are added in the order
    /// they were written; a record for a seq already held (a copy made by
    /// migration) replaces the older copy.
    pub fn add(&mut self, document: &str, kind: Kind, epoch: Epoch, seq: u64, loc: Loc) {
        let segments = &mut self.segments;
        segments.entry(loc.segment).or_default().live += 1;
        let merged = is_merged(document);
        let window = if merged { usize::MAX } else { self.window };
        let doc = match self.docs.get_mut(document) {
            Some(d) => d,
            None => {
                let d = DocIndex { epoch, seq: 0, ops: VecDeque::new(), snapshot: None };
                self.docs.entry(document.into()).or_insert(d)
            }
        };
        match kind {
            Kind::Op => {
                if seq == doc.seq + 1 {
                    doc.ops.push_back(loc);
                    doc.seq = seq;
                    doc.epoch = epoch;
                } else if seq > doc.seq {
                    // A gap (records lost to damage): what came before can
                    // no longer be served as contiguous history.
                    for old in doc.ops.drain(..) {
                        Self::release(segments, old);
                    }
                    doc.ops.push_back(loc);
                    doc.seq = seq;
                    doc.epoch = epoch;
                } else if seq >= doc.oldest() && !doc.ops.is_empty() {
                    let i = (seq - doc.oldest()) as usize;
                    let old = std::mem::replace(&mut doc.ops[i], loc);
                    Self::release(segments, old);
                } else {
                    Self::release(segments, loc);
                }
                while doc.ops.len() > window {
                    let old = doc.ops.pop_front().expect("longer than the window");
                    Self::release(segments, old);
                }
            }
            Kind::Snapshot => match doc.snapshot {
                Some((s, old)) if seq >= s => {
                    doc.snapshot = Some((seq, loc));
                    Self::release(segments, old);
                }
                Some(_) => Self::release(segments, loc),
                None => {
                    doc.snapshot = Some((seq, loc));
                    if doc.ops.is_empty() && doc.seq == 0 {
                        doc.epoch = epoch;
                    }
                }
            },
        }
        // A merged history needs only the updates after its snapshot.
        if let (true, Some((s, _))) = (merged, doc.snapshot) {
            while !doc.ops.is_empty() && doc.oldest() <= s {
                let old = doc.ops.pop_front().expect("not empty");
                Self::release(segments, old);
            }
        }
        // A snapshot ahead of every operation left (they were lost to
        // damage): the document resumes after the snapshot, never before.
        if let Some((s, _)) = doc.snapshot {
            if s > doc.seq {
                for old in doc.ops.drain(..) {
                    Self::release(segments, old);
                }
                doc.seq = s;
            }
        }
    }

    /// Segments with no live record, other than `keep`.
    pub fn dead_segments(&self, keep: Option<u64>) -> Vec<u64> {
        self.segments.iter().filter(|(n, s)| s.live == 0 && Some(**n) != keep).map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, offset: u64) -> Loc {
        Loc { segment, offset, len: 10 }
    }

    #[test]
    fn operations_beyond_the_window_and_old_snapshots_die() {
        let mut ix = Index::new(2);
        for seq in 1..=3 {
            ix.add("d", Kind::Op, Epoch(1), seq, loc(seq, 0));
        }
        assert_eq!(ix.dead_segments(None), vec![1]);
        ix.add("d", Kind::Snapshot, Epoch(1), 2, loc(4, 0));
        ix.add("d", Kind::Snapshot, Epoch(1), 3, loc(5, 0));
        assert_eq!(ix.dead_segments(None), vec![1, 4]);
        assert_eq!(ix.segments[&2].live, 1);
        let d = &ix.docs["d"];
        assert_eq!((d.seq, d.oldest(), d.snapshot.map(|s| s.0)), (3, 2, Some(3)));
    }

    #[test]
    fn a_copy_replaces_the_original_and_a_gap_restarts_the_history() {
        let mut ix = Index::new(10);
        for seq in 1..=3 {
            ix.add("d", Kind::Op, Epoch(1), seq, loc(1, seq));
        }
        ix.add("d", Kind::Op, Epoch(1), 2, loc(2, 0));
        assert_eq!(ix.docs["d"].ops[1], loc(2, 0));
        assert_eq!(ix.segments[&1].live, 2);
        ix.add("d", Kind::Op, Epoch(1), 7, loc(3, 0));
        let d = &ix.docs["d"];
        assert_eq!((d.seq, d.oldest()), (7, 7));
        assert_eq!(ix.dead_segments(None), vec![1, 2]);
    }

    #[test]
    fn a_snapshot_ahead_of_the_operations_left_sets_the_seq() {
        let mut ix = Index::new(10);
        ix.add("d", Kind::Op, Epoch(1), 1, loc(1, 0));
        ix.add("d", Kind::Snapshot, Epoch(1), 5, loc(1, 1));
        let d = &ix.docs["d"];
        assert_eq!((d.seq, d.oldest()), (5, 6));
    }

    #[test]
    fn a_merged_history_keeps_every_update_after_its_snapshot_and_none_before() {
        let mut ix = Index::new(2);
        let room = yjs_key("r");
        for seq in 1..=5 {
            ix.add(&room, Kind::Op, Epoch(1), seq, loc(seq, 0));
        }
        // No window: all five live.
        assert!(ix.dead_segments(None).is_empty());
        ix.add(&room, Kind::Snapshot, Epoch(1), 3, loc(6, 0));
        assert_eq!(ix.dead_segments(None), vec![1, 2, 3]);
        ix.add(&room, Kind::Op, Epoch(1), 6, loc(7, 0));
        let d = &ix.docs[room.as_str()];
        assert_eq!((d.seq, d.oldest(), d.snapshot.map(|s| s.0)), (6, 4, Some(3)));
        // A snapshot of everything leaves no update live, and keeps the seq.
        ix.add(&room, Kind::Snapshot, Epoch(1), 6, loc(8, 0));
        let d = &ix.docs[room.as_str()];
        assert_eq!((d.seq, d.oldest(), d.ops.len()), (6, 7, 0));
        assert_eq!(ix.dead_segments(None), vec![1, 2, 3, 4, 5, 6, 7]);
        // The same id as a document is another history, with the window.
        assert!(!is_merged("r") && is_merged(&room));
    }

    #[test]
    fn the_last_operation_is_always_live() {
        let mut ix = Index::new(0);
        ix.add("d", Kind::Op, Epoch(1), 1, loc(1, 0));
        ix.add("d", Kind::Op, Epoch(1), 2, loc(2, 0));
        assert_eq!(ix.dead_segments(None), vec![1]);
        assert_eq!(ix.docs["d"].seq, 2);
    }
}
