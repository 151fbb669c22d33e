//! The relay's time source for rate limits. The relay reads the monotonic
//! clock; tests inject a [`ManualClock`] and move it forward by hand, so a
//! rate-limit window can be crossed without sleeping. Also [`unique_u64`],
//! the identifiers drawn from the time and a random key.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A value unlike any other drawn, in this process or another, with
/// overwhelming probability: the wall-clock time, the process id and a
/// counter, hashed with a random key. For session nonces and epochs, not for
/// secrets.
pub fn unique_u64() -> u64 {
    use std::hash::BuildHasher;
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    let nth = DRAWN.fetch_add(1, Relaxed);
    std::collections::hash_map::RandomState::new().hash_one((std::time::SystemTime::now(), std::process::id(), nth))
}

/// A source of `Instant`s. Called on the message path: keep it cheap.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug)]
pub struct ManualClock {
    origin: Instant,
    offset_ns: AtomicU64,
}

impl ManualClock {
    /// A clock standing at the moment it was made.
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock { origin: Instant::now(), offset_ns: AtomicU64::new(0) })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ns.fetch_add(by.as_nanos() as u64, Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + Duration::from_nanos(self.offset_ns.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now() - t0, Duration::from_millis(1500));
    }
}
