//! Prometheus figures of the archiver and its readiness, which
//! [`agentrun_protocol::telemetry::serve_health`] serves on `/metrics`, `/healthz` and `/readyz`.

use agentrun_protocol::telemetry::{Health, MetricRegistry};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Metrics {
    pub registry: MetricRegistry,
    /// Runs whose archive this archiver completed (or found complete).
    pub runs_archived: IntCounter,
    /// Requests for runs Redis held nothing of.
    pub runs_empty: IntCounter,
    /// Failed attempts, by kind of failure (`redis`, `store`, `corrupt`...).
    pub attempt_failures: IntCounterVec,
    /// Requests sent to the dead-letter stream.
    pub dead_lettered: IntCounter,
    /// Requests taken over from another archiver with XAUTOCLAIM.
    pub claimed: IntCounter,
    pub entries_archived: IntCounter,
    /// Content bytes read from Redis into archives.
    pub content_bytes: IntCounter,
    /// Compressed bytes written to the store.
    pub stored_bytes: IntCounter,
    pub archive_seconds: Histogram,
    pub in_progress: IntGauge,
    /// Entries in the queue (waiting or being archived).
    pub queue_length: IntGauge,
    /// Entries delivered to an archiver and not yet acknowledged.
    pub queue_pending: IntGauge,
    /// Entries on the dead-letter stream.
    pub dead_letters: IntGauge,
    pub ready: Arc<AtomicBool>,
}

impl Health for Metrics {
    fn metrics(&self) -> String {
        self.registry.render()
    }

    fn not_ready(&self) -> Option<&'static str> {
        (!self.ready.load(Ordering::Relaxed))
            .then_some("not ready: waiting for Redis to create the archive queue's consumer group")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let b = MetricRegistry::new("agentrun_archiver");
        Self {
            runs_archived: b.counter("runs_archived_total", "Runs whose archive is complete"),
            runs_empty: b.counter(
                "runs_empty_total",
                "Archive requests for runs that Redis held nothing of",
            ),
            attempt_failures: b.counter_vec(
                "attempt_failures_total",
                "Failed attempts to archive a run, by kind",
                "kind",
                &[],
            ),
            dead_lettered: b.counter(
                "dead_lettered_total",
                "Archive requests sent to the dead-letter stream",
            ),
            claimed: b.counter(
                "claimed_total",
                "Archive requests taken over from a stopped archiver",
            ),
            entries_archived: b.counter("entries_archived_total", "Stream entries archived"),
            content_bytes: b.counter(
                "content_bytes_total",
                "Content bytes read from Redis into archives",
            ),
            stored_bytes: b.counter(
                "stored_bytes_total",
                "Compressed bytes written to the object store",
            ),
            archive_seconds: b.histogram(
                "archive_duration_seconds",
                "Time to archive one run",
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            in_progress: b.gauge("runs_in_progress", "Runs being archived by this archiver"),
            queue_length: b.gauge("queue_length", "Entries in the archive queue"),
            queue_pending: b.gauge(
                "queue_pending",
                "Archive requests delivered to an archiver and not yet done",
            ),
            dead_letters: b.gauge("dead_letters", "Entries on the dead-letter stream"),
            ready: Arc::new(AtomicBool::new(false)),
            registry: b,
        }
    }
}
