//! Prometheus figures of the sidecar and its readiness, which
//! [`agentrun_protocol::telemetry::serve_health`] serves on `/metrics`, `/healthz` and `/readyz`.

use agentrun_protocol::telemetry::{Health, MetricRegistry};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Metrics {
    pub registry: MetricRegistry,
    /// Bytes of agent output received, by stream (`output`, `logs`).
    pub bytes_in: IntCounterVec,
    /// Entries appended to Redis streams (re-sends that were skipped are not counted).
    pub entries_published: IntCounter,
    pub publish_errors: IntCounter,
    pub publish_seconds: Histogram,
    /// Time spent in `WAIT`/`WAITAOF` after a batch (`--durability` other than `none`).
    pub durability_wait_seconds: Histogram,
    /// Waits that did not reach the durability level in time (the batch is not acknowledged
    /// and is published and waited for again).
    pub durability_timeouts: IntCounter,
    /// Bytes waiting in the sidecar for Redis.
    pub buffered_bytes: IntGauge,
    /// 1 while Redis takes writes.
    pub redis_up: IntGauge,
    pub redis_reconnects: IntCounter,
    pub control_messages: IntCounter,
    /// Control messages taken for the entrypoint and not yet acknowledged by it.
    pub control_pending: IntGauge,
    /// Clients of the socket refused before they could become the peer, by reason.
    pub socket_refused: IntCounterVec,
    /// Spool files refused because a record did not verify.
    pub spools_refused: IntCounter,
    /// Output reported as dropped by the entrypoint (spool full).
    pub gap_bytes: IntCounter,
    /// The agent's CPU time and resident memory, as last reported by the entrypoint.
    pub agent_cpu_millis: IntGauge,
    pub agent_rss_bytes: IntGauge,
    pub ready: Arc<AtomicBool>,
}

impl Health for Metrics {
    fn metrics(&self) -> String {
        self.registry.render()
    }

    fn not_ready(&self) -> Option<&'static str> {
        let ready = self.ready.load(Ordering::Relaxed) && self.redis_up.get() == 1;
        (!ready).then_some("not ready: waiting for Redis")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let b = MetricRegistry::new("agentrun_sidecar");
        let publish_seconds = b.histogram(
            "publish_duration_seconds",
            "Time to publish one batch to Redis",
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        );
        let durability_wait_seconds = b.histogram(
            "durability_wait_seconds",
            "Time waiting for replicas or the AOF fsync after a batch (--durability)",
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ],
        );
        Self {
            durability_wait_seconds,
            durability_timeouts: b.counter(
                "durability_timeouts_total",
                "Waits for replicas or the AOF fsync that timed out; the batch was kept and retried",
            ),
            bytes_in: b.counter_vec("bytes_received_total", "Bytes of agent output received, by stream", "stream", &[]),
            entries_published: b.counter(
                "entries_published_total",
                "Entries appended to Redis streams",
            ),
            publish_errors: b.counter(
                "publish_errors_total",
                "Failed attempts to publish a batch to Redis",
            ),
            publish_seconds,
            buffered_bytes: b.gauge("buffered_bytes", "Bytes waiting in the sidecar for Redis"),
            redis_up: b.gauge("redis_up", "1 while Redis takes writes"),
            redis_reconnects: b.counter(
                "redis_reconnects_total",
                "Connections made to Redis after the first",
            ),
            control_messages: b.counter(
                "control_messages_total",
                "Control messages taken for the agent's entrypoint",
            ),
            control_pending: b.gauge(
                "control_pending",
                "Control messages taken for the entrypoint and not yet acknowledged by it",
            ),
            socket_refused: b.counter_vec("socket_clients_refused_total", "Clients of the socket refused without the entrypoint's key, by reason", "reason", &[]),
            spools_refused: b.counter(
                "spools_refused_total",
                "Spool files refused because a record did not verify with the pod's key",
            ),
            gap_bytes: b.counter(
                "gap_bytes_total",
                "Output bytes dropped because the spool was full",
            ),
            agent_cpu_millis: b.gauge(
                "agent_cpu_milliseconds",
                "CPU time the agent has used (user + system)",
            ),
            agent_rss_bytes: b.gauge(
                "agent_memory_bytes",
                "Resident memory of the agent's process",
            ),
            ready: Arc::new(AtomicBool::new(false)),
            registry: b,
        }
    }
}
