//! ConnectionManager: every connection from the moment it is upgraded until it
//! is gone, visible from every core. This is the one piece of shared state on
//! the connection path; it uses sharded-slab (lock-free per shard) and relaxed
//! atomics, and is never touched on the fan-out path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use sharded_slab::Slab;

use crate::session::Phase;

/// One registered connection, as other cores may see it.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub document: Box<str>,
    core: AtomicUsize,
    phase: AtomicU8,
}

impl ConnEntry {
    pub fn core(&self) -> usize {
        self.core.load(Relaxed)
    }
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Relaxed))
    }
}

/// Counters kept per core, written only by that core (relaxed atomics, each
/// core's block on its own cache lines) and read by `/metrics` on any core.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CoreStats {
    pub sessions: AtomicUsize,
    pub handoffs_in: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub frames_out: AtomicU64,
    pub write_syscalls: AtomicU64,
    /// Documents loaded on this core.
    pub documents: AtomicUsize,
    /// Broadcast frames published into document and presence rings.
    pub broadcasts: AtomicU64,
    /// Broadcast frames written to subscribers (deliveries).
    pub deliveries: AtomicU64,
    /// `lagged` notices sent.
    pub lagged: AtomicU64,
    /// Operations accepted (sequenced).
    pub operations: AtomicU64,
    /// Operations and cursor updates dropped by rate limits.
    pub rate_limited: AtomicU64,
}

/// Why a handshake or validation ended a connection before CONNECTED, for
/// the `/metrics` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    BadRequest,
    HeadTooLarge,
    HandshakeTimeout,
    Validation,
    ValidationTimeout,
}

/// Handle to a registered connection; dropping it does not unregister (the
/// session does that explicitly in DISCONNECTED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnKey(usize);

/// The registry of connections and the relay-wide statistics.
#[derive(Debug)]
pub struct ConnectionManager {
    slab: Slab<ConnEntry>,
    next_id: AtomicU64,
    active: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicU64,
    http_requests: AtomicU64,
    auth_failures: AtomicU64,
    rejections: [AtomicU64; 5],
    per_ip: IpCounts,
    cores: Vec<CoreStats>,
}

impl ConnectionManager {
    pub fn new(cores: usize) -> ConnectionManager {
        ConnectionManager {
            slab: Slab::new(),
            next_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            rejections: Default::default(),
            per_ip: IpCounts::default(),
            cores: (0..cores).map(|_| CoreStats::default()).collect(),
        }
    }

    /// Registers a connection right after its upgrade (phase Connecting, i.e.
    /// VALIDATING), so the peak counts it. Returns its key and its id, or None
    /// when the slab is full (the relay then answers 503-like by closing).
    pub fn register(&self, peer: SocketAddr, document: &str, core: usize) -> Option<(ConnKey, u64)> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let entry = ConnEntry {
            id,
            peer,
            document: document.into(),
            core: AtomicUsize::new(core),
            phase: AtomicU8::new(Phase::Validating as u8),
        };
        let key = self.slab.insert(entry)?;
        let now = self.active.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(now, Relaxed);
        self.total.fetch_add(1, Relaxed);
        Some((ConnKey(key), id))
    }

    /// Removes a connection (DISCONNECTED) and drops the active count.
    pub fn unregister(&self, key: ConnKey) {
        if self.slab.remove(key.0) {
            self.active.fetch_sub(1, Relaxed);
        } else {
            debug_assert!(false, "unregistering an unknown connection");
        }
    }

    pub fn set_phase(&self, key: ConnKey, phase: Phase) {
        if let Some(e) = self.slab.get(key.0) {
            e.phase.store(phase as u8, Relaxed);
        }
    }

    pub fn set_core(&self, key: ConnKey, core: usize) {
        if let Some(e) = self.slab.get(key.0) {
            e.core.store(core, Relaxed);
        }
    }

    /// Connections registered and not yet gone.
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    pub fn core(&self, core: usize) -> &CoreStats {
        &self.cores[core]
    }
    pub fn cores(&self) -> &[CoreStats] {
        &self.cores
    }

    pub fn count_http_request(&self) {
        self.http_requests.fetch_add(1, Relaxed);
    }
    pub fn count_rejection(&self, why: Rejection) {
        self.rejections[why as usize].fetch_add(1, Relaxed);
    }
    pub fn rejections(&self, why: Rejection) -> u64 {
        self.rejections[why as usize].load(Relaxed)
    }
    pub fn count_auth_failure(&self) {
        self.auth_failures.fetch_add(1, Relaxed);
    }
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Relaxed)
    }
    pub fn http_requests(&self) -> u64 {
        self.http_requests.load(Relaxed)
    }

    /// Counts one more connection from `ip` unless it already has `max`.
    pub fn try_add_ip(&self, ip: IpAddr, max: usize) -> bool {
        self.per_ip.try_add(ip, max)
    }
    pub fn remove_ip(&self, ip: IpAddr) {
        self.per_ip.remove(ip)
    }
}

/// Connections per client IP, for `validation.max_connections_per_ip`.
/// Sharded mutexes: touched once at validation and once at disconnect, only
/// when that validator is on, never on the message path.
#[derive(Debug, Default)]
struct IpCounts {
    shards: [Mutex<HashMap<IpAddr, usize>>; 16],
}

impl IpCounts {
    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let h = match ip {
            IpAddr::V4(v) => crate::fnv1a_64(&v.octets()),
            IpAddr::V6(v) => crate::fnv1a_64(&v.octets()),
        };
        self.shards[(h % 16) as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut map = self.shard(ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, ip: IpAddr) {
        let mut map = self.shard(ip);
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_registration() {
        let m = ConnectionManager::new(2);
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let (a, ida) = m.register(peer, "d1", 0).unwrap();
        let (b, idb) = m.register(peer, "d2", 1).unwrap();
        assert_ne!(ida, idb);
        assert_eq!((m.active(), m.peak(), m.total()), (2, 2, 2));
        m.unregister(a);
        assert_eq!((m.active(), m.peak(), m.total()), (1, 2, 2));
        m.set_core(b, 0);
        assert_eq!(m.slab.get(b.0).unwrap().core(), 0);
        m.unregister(b);
        assert_eq!(m.active(), 0);
    }

    #[test]
    fn per_ip_limit() {
        let m = ConnectionManager::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(m.try_add_ip(ip, 2));
        assert!(m.try_add_ip(ip, 2));
        assert!(!m.try_add_ip(ip, 2));
        m.remove_ip(ip);
        assert!(m.try_add_ip(ip, 2));
    }
}
