//! The frames queued for one client, front first, and how much of the front
//! one is already written.

use std::collections::VecDeque;

use crate::ws::SharedFrame;

/// A queue that keeps up to this many slots across bursts; a larger one
/// (after an unusual burst) is given back once it empties.
const KEEP_SLOTS: usize = 256;

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) frames: VecDeque<SharedFrame>,
    /// Bytes of the front frame already written.
    pub(crate) offset: usize,
    /// Unwritten bytes in the queue.
    pub(crate) bytes: usize,
}

impl Outbox {
    pub(crate) fn push(&mut self, frame: SharedFrame) {
        self.bytes += frame.bytes().len();
        self.frames.push_back(frame);
    }

    /// Marks `n` bytes written; returns how many frames were completed.
    ///
    /// An emptied queue keeps its slots (up to [`KEEP_SLOTS`]), so a
    /// subscriber that drains every burst does not reallocate per burst; it
    /// is freed only when it grew beyond that.
    pub(crate) fn advance(&mut self, mut n: usize) -> u64 {
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
        if self.frames.is_empty() && self.frames.capacity() > KEEP_SLOTS {
            self.frames = VecDeque::new();
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{Kind, OutFrame};
    use std::rc::Rc;

    #[test]
    fn advances_across_frames() {
        let mut out = Outbox::default();
        for n in [3usize, 5] {
            out.push(Rc::new(OutFrame::new(Kind::Binary, &vec![0; n])));
        }
        assert_eq!(out.bytes, 12);
        out.advance(4);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (2, 4, 8));
        out.advance(2);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (1, 1, 6));
        out.advance(6);
        assert_eq!((out.frames.len(), out.offset, out.bytes), (0, 0, 0));
    }

    #[test]
    fn a_drained_queue_keeps_its_slots_unless_it_grew_large() {
        let frame = Rc::new(OutFrame::new(Kind::Binary, b"x"));
        let mut out = Outbox::default();
        for _ in 0..100 {
            out.push(frame.clone());
        }
        let cap = out.frames.capacity();
        out.advance(out.bytes);
        assert_eq!(out.frames.capacity(), cap, "a normal burst keeps its slots");
        for _ in 0..1000 {
            out.push(frame.clone());
        }
        out.advance(out.bytes);
        assert_eq!(out.frames.capacity(), 0, "an unusual burst gives its slots back");
    }
}
