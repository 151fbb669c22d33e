//! Per-connection rate limits (`limits.max_ops_per_sec`,
//! `limits.max_cursor_per_sec`): fixed one-second windows, read from the
//! shard's clock so that tests can cross a window without sleeping.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The windows of one session.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    pub(crate) ops: Window,
    pub(crate) cursors: Window,
}

#[derive(Debug, Default)]
pub(crate) struct Window {
    start: Cell<Option<Instant>>,
    count: Cell<u32>,
    /// Since when the client has been over its limit without a break.
    over_since: Cell<Option<Instant>>,
}

/// What a rate check decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rate {
    Allow,
    Drop,
    /// Over the limit for longer than the grace: close 1008.
    Close,
}

impl Window {
    /// Counts one message at `now` against `limit` per second (0: no limit).
    pub(crate) fn check(&self, now: Instant, limit: u32, grace: Duration) -> Rate {
        if limit == 0 {
            return Rate::Allow;
        }
        let second = Duration::from_secs(1);
        match self.start.get() {
            Some(t) if now - t < second => {}
            Some(t) => {
                // A window passed; was the previous one over the limit?
                if self.count.get() <= limit || now - t >= 2 * second {
                    self.over_since.set(None);
                }
                self.start.set(Some(now));
                self.count.set(0);
            }
            None => self.start.set(Some(now)),
        }
        self.count.set(self.count.get() + 1);
        if self.count.get() <= limit {
            return Rate::Allow;
        }
        let since = *self.over_since.get().get_or_insert(now);
        self.over_since.set(Some(since));
        if now - since >= grace {
            Rate::Close
        } else {
            Rate::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_allow_drop_and_close() {
        let w = Window::default();
        let t0 = Instant::now();
        let grace = Duration::from_millis(1500);
        assert_eq!(w.check(t0, 2, grace), Rate::Allow);
        assert_eq!(w.check(t0, 2, grace), Rate::Allow);
        assert_eq!(w.check(t0, 2, grace), Rate::Drop);
        // The next window starts fresh, but the client stays "over" while it
        // keeps exceeding the limit in consecutive windows.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(w.check(t1, 2, grace), Rate::Allow);
        assert_eq!(w.check(t1, 2, grace), Rate::Allow);
        assert_eq!(w.check(t1, 2, grace), Rate::Drop);
        let t2 = t0 + Duration::from_millis(2000);
        for _ in 0..2 {
            assert_eq!(w.check(t2, 2, grace), Rate::Allow);
        }
        assert_eq!(w.check(t2, 2, grace), Rate::Close);
        // A calm window resets the grace.
        let w = Window::default();
        assert_eq!(w.check(t0, 1, grace), Rate::Allow);
        assert_eq!(w.check(t0, 1, grace), Rate::Drop);
        assert_eq!(w.check(t0 + Duration::from_secs(3), 1, grace), Rate::Allow);
        assert_eq!(w.check(t0 + Duration::from_secs(3), 1, grace), Rate::Drop);
        assert_eq!(Window::default().check(t0, 0, grace), Rate::Allow);
    }
}
