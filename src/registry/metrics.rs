//! The `/metrics` text (Prometheus exposition format 0.0.4): relay-wide
//! families, then one sample per core for each per-core family.

use std::fmt::Write as _;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use super::{ClusterHealth, ConnectionManager, CoreStats, Refused, Rejection};
use crate::http;

/// A per-core family: name, type, help, and the statistic.
type PerCore = (&'static str, &'static str, &'static str, fn(&CoreStats) -> u64);

const PER_CORE: [PerCore; 13] = [
    ("docrelay_sessions", "gauge", "Connected sessions per core.", |c| c.sessions.get()),
    ("docrelay_documents", "gauge", "Documents loaded per core.", |c| c.documents.get()),
    ("docrelay_handoffs_total", "counter", "Connections adopted from another core.", |c| c.handoffs_in.get()),
    ("docrelay_messages_in_total", "counter", "WebSocket messages received.", |c| c.messages_in.get()),
    ("docrelay_messages_out_total", "counter", "Frames queued to clients.", |c| c.messages_out.get()),
    ("docrelay_operations_total", "counter", "Operations sequenced.", |c| c.operations.get()),
    ("docrelay_broadcasts_total", "counter", "Broadcast frames published to rings.", |c| c.broadcasts.get()),
    ("docrelay_deliveries_total", "counter", "Broadcast frames queued to subscribers.", |c| c.deliveries.get()),
    ("docrelay_lagged_total", "counter", "lagged notices sent to slow subscribers.", |c| c.lagged.get()),
    ("docrelay_frames_out_total", "counter", "WebSocket frames written.", |c| c.frames_out.get()),
    ("docrelay_write_syscalls_total", "counter", "Socket write system calls.", |c| c.write_syscalls.get()),
    ("docrelay_rate_limited_total", "counter", "Messages dropped by rate limits.", |c| c.rate_limited.get()),
    (
        "docrelay_storage_refusals_total",
        "counter",
        "Operations and snapshots refused with UNAVAILABLE (storage full or failing).",
        |c| c.store_refusals.get(),
    ),
];

/// The cluster's counters (cluster mode only): name, help, the counter.
type ClusterCounter = (&'static str, &'static str, fn(&ClusterHealth) -> &AtomicU64);

const CLUSTER_COUNTERS: [ClusterCounter; 5] = [
    ("docrelay_cluster_degraded_total", "Times the node lost Redis.", |c| &c.degradations),
    ("docrelay_cluster_redis_errors_total", "Redis commands that failed.", |c| &c.redis_errors),
    (
        "docrelay_cluster_unavailable_total",
        "Operations and snapshots refused with UNAVAILABLE because Redis did not take them.",
        |c| &c.unavailable,
    ),
    (
        "docrelay_cluster_gap_fills_total",
        "Operations read from a document's stream because their notification was missed.",
        |c| &c.gap_fills,
    ),
    (
        "docrelay_cluster_gap_lost_total",
        "Missed operations the stream no longer held (subscribers were told lagged).",
        |c| &c.gap_lost,
    ),
];

const REJECTIONS: [(&str, Rejection); 5] = [
    ("bad_request", Rejection::BadRequest),
    ("head_too_large", Rejection::HeadTooLarge),
    ("handshake_timeout", Rejection::HandshakeTimeout),
    ("validation", Rejection::Validation),
    ("validation_timeout", Rejection::ValidationTimeout),
];

const REFUSALS: [(&str, Refused); 2] = [("fd_limit", Refused::FdLimit), ("registry_full", Refused::RegistryFull)];

impl ConnectionManager {
    /// The whole `/metrics` response.
    pub fn metrics_response(&self) -> Vec<u8> {
        http::response_typed("200 OK", "text/plain; version=0.0.4; charset=utf-8", "", &self.metrics_text())
    }

    /// The exposition text of every family.
    pub fn metrics_text(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let one = |v: u64| std::iter::once((String::new(), v));
        family(
            "docrelay_active_connections",
            "gauge",
            "Connections upgraded and not yet closed.",
            &mut one(self.active() as u64),
        );
        family(
            "docrelay_peak_concurrent_connections",
            "gauge",
            "Most connections open at once since start.",
            &mut one(self.peak() as u64),
        );
        family("docrelay_connections_total", "counter", "Connections upgraded since start.", &mut one(self.total()));
        family("docrelay_http_requests_total", "counter", "HTTP request heads parsed.", &mut one(self.http_requests()));
        family(
            "docrelay_rejected_total",
            "counter",
            "Connections refused before CONNECTED, by reason.",
            &mut REJECTIONS.iter().map(|(label, r)| (format!("{{reason=\"{label}\"}}"), self.rejections(*r))),
        );
        family(
            "docrelay_connections_refused_total",
            "counter",
            "Connections answered 503 for lack of resources, by reason.",
            &mut REFUSALS.iter().map(|(label, r)| (format!("{{reason=\"{label}\"}}"), self.refusals(*r))),
        );
        family(
            "docrelay_auth_failures_total",
            "counter",
            "Failed authenticate messages.",
            &mut one(self.auth_failures()),
        );
        let c = &self.cluster;
        if c.enabled.load(Relaxed) {
            family(
                "docrelay_cluster_redis_up",
                "gauge",
                "1 while the node reaches Redis, 0 while it is degraded (/healthz answers 503).",
                &mut one(u64::from(c.degraded().is_none())),
            );
            for (name, help, read) in CLUSTER_COUNTERS {
                family(name, "counter", help, &mut one(read(c).load(Relaxed)));
            }
        }
        for (name, kind, help, read) in PER_CORE {
            let mut samples = self.cores().iter().enumerate().map(|(i, c)| (format!("{{core=\"{i}\"}}"), read(c)));
            family(name, kind, help, &mut samples);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_type_and_one_sample_per_core() {
        let m = ConnectionManager::new(3);
        m.core(2).operations.add(7);
        let text = m.metrics_text();
        for (name, ..) in PER_CORE {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            for core in 0..3 {
                assert!(text.contains(&format!("{name}{{core=\"{core}\"}} ")), "{name} core {core}");
            }
        }
        assert!(text.contains("docrelay_operations_total{core=\"2\"} 7\n"));
        assert!(text.contains("docrelay_active_connections 0\n"));
        assert!(text.contains("docrelay_peak_concurrent_connections 0\n"));
        m.count_refusal(Refused::FdLimit);
        m.count_refusal(Refused::FdLimit);
        let text = m.metrics_text();
        assert!(text.contains("# TYPE docrelay_connections_refused_total counter\n"));
        assert!(text.contains("docrelay_connections_refused_total{reason=\"fd_limit\"} 2\n"), "{text}");
        assert!(text.contains("docrelay_connections_refused_total{reason=\"registry_full\"} 0\n"));
    }
}
