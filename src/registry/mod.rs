//! ConnectionManager: every connection from the moment it is upgraded until it
//! is gone, visible from every core. This is the one piece of shared state on
//! the connection path; it uses sharded-slab (lock-free per shard) and relaxed
//! atomics, and is never touched on the fan-out path.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use sharded_slab::Slab;

use crate::http::HttpError;
use crate::placement::fnv1a_64;

mod metrics;

/// One registered connection, as any core may see it.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub document: Box<str>,
}

/// A statistic written by one thread only (its core) and read by any (for
/// `/metrics`). Updates are a relaxed load and store, not a read-modify-write:
/// no locked instruction on the hot path, and a reader on another core sees
/// every published value whole.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning core may call this (one writer).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Subtracts `n` (gauges). Only the owning core may call this.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    /// The last published value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Counters kept per core, written only by that core and read by `/metrics`
/// on any core; each core's block sits on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CoreStats {
    /// Connected sessions (gauge).
    pub sessions: Counter,
    pub handoffs_in: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub frames_out: Counter,
    pub write_syscalls: Counter,
    /// Documents loaded on this core (gauge).
    pub documents: Counter,
    /// Broadcast frames published into document and presence rings.
    pub broadcasts: Counter,
    /// Broadcast frames written to subscribers (deliveries).
    pub deliveries: Counter,
    /// `lagged` notices sent.
    pub lagged: Counter,
    /// Operations accepted (sequenced).
    pub operations: Counter,
    /// Operations and cursor updates dropped by rate limits.
    pub rate_limited: Counter,
    /// Operations and snapshots refused because storage could not take them.
    pub store_refusals: Counter,
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

impl Rejection {
    /// The statistic an HTTP error counts under.
    pub fn of_http(e: &HttpError) -> Rejection {
        match e {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => Rejection::HeadTooLarge,
            _ => Rejection::BadRequest,
        }
    }
}

/// Why the relay turned a connection away for lack of resources, for
/// `docrelay_connections_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No file descriptor free: at accept (answered with the core's spare
    /// descriptor), or for the hand-off to the document's core. Answered
    /// 503, before any 101.
    FdLimit,
    /// No registry slot for the connection: answered 503 instead of 101.
    RegistryFull,
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
    refusals: [AtomicU64; 2],
    per_ip: IpCounts,
    cores: Vec<CoreStats>,
    /// Cluster mode: the bridge's view of Redis (`docs/cluster.md`).
    pub cluster: ClusterHealth,
}

/// How the cluster bridge finds Redis, for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterHealth {
    /// Cluster mode is on (the families below are reported).
    pub enabled: std::sync::atomic::AtomicBool,
    /// Why the node is degraded (Redis unreachable); `None`: healthy.
    degraded: std::sync::Mutex<Option<String>>,
    /// Redis commands that failed.
    pub redis_errors: AtomicU64,
    /// Times the node went from healthy to degraded.
    pub degradations: AtomicU64,
    /// Operations refused with UNAVAILABLE because Redis did not answer.
    pub unavailable: AtomicU64,
    /// Operations a node took from a document's stream because their
    /// notification did not arrive (a gap filled).
    pub gap_fills: AtomicU64,
    /// Operations a node's stream no longer held when it looked for them.
    pub gap_lost: AtomicU64,
}

impl ClusterHealth {
    /// Marks the node degraded (`Some(why)`) or healthy again; returns true
    /// when this changed it.
    pub fn set_degraded(&self, why: Option<String>) -> bool {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        let changed = d.is_some() != why.is_some();
        if changed && why.is_some() {
            self.degradations.fetch_add(1, Relaxed);
        }
        *d = why;
        changed
    }

    /// Why the node is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
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
            refusals: Default::default(),
            per_ip: IpCounts::default(),
            cores: (0..cores).map(|_| CoreStats::default()).collect(),
            cluster: ClusterHealth::default(),
        }
    }

    /// Makes connection ids start above `base` (cluster mode: each node's ids
    /// live in their own range, so they are unique across nodes). Called
    /// before the first connection.
    pub fn set_id_base(&self, base: u64) {
        self.next_id.store(base + 1, Relaxed);
    }

    /// The `/healthz` answer: `200 ok`, or `503` with the reason while the
    /// node is degraded (cluster mode, Redis unreachable).
    pub fn health_response(&self) -> Vec<u8> {
        match self.cluster.degraded() {
            None => crate::http::health(),
            Some(why) => {
                crate::http::response("503 Service Unavailable", "Retry-After: 1\r\n", &format!("degraded: {why}"))
            }
        }
    }

    /// Registers a connection right after its upgrade (VALIDATING), so the
    /// peak counts it. Returns its key and its id, or None when the slab is
    /// full (the connection is then closed).
    pub fn register(&self, peer: SocketAddr, document: &str) -> Option<(ConnKey, u64)> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let entry = ConnEntry { id, peer, document: document.into() };
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

    /// A registered connection, while it is registered.
    pub fn entry(&self, key: ConnKey) -> Option<impl std::ops::Deref<Target = ConnEntry> + '_> {
        self.slab.get(key.0)
    }

    /// Connections registered and not yet gone
    /// (`docrelay_active_connections`).
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }
    /// Most connections registered at once (`docrelay_peak_concurrent_connections`).
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
    pub fn count_refusal(&self, why: Refused) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }
    pub fn refusals(&self, why: Refused) -> u64 {
        self.refusals[why as usize].load(Relaxed)
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
            IpAddr::V4(v) => fnv1a_64(&v.octets()),
            IpAddr::V6(v) => fnv1a_64(&v.octets()),
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
        let (a, ida) = m.register(peer, "d1").unwrap();
        let (b, idb) = m.register(peer, "d2").unwrap();
        assert_ne!(ida, idb);
        assert_eq!((m.active(), m.peak(), m.total()), (2, 2, 2));
        m.unregister(a);
        assert_eq!((m.active(), m.peak(), m.total()), (1, 2, 2));
        let entry = m.entry(b).unwrap();
        assert_eq!((entry.id, entry.peer, &*entry.document), (idb, peer, "d2"));
        drop(entry);
        assert!(m.entry(a).is_none());
        m.unregister(b);
        assert_eq!(m.active(), 0);
    }

    #[test]
    fn counters_add_and_subtract() {
        let c = Counter::default();
        c.add(5);
        c.sub(2);
        assert_eq!(c.get(), 3);
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
