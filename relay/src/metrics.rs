//! Prometheus metrics of the relay, served at `/metrics`.

use agentrun_protocol::telemetry::MetricRegistry;
use prometheus::{IntCounter, IntCounterVec, IntGauge};

#[derive(Clone)]
pub struct Metrics {
    registry: MetricRegistry,
    /// Open SSE connections.
    pub connections: IntGauge,
    /// Runs with at least one SSE client (each has its Redis channel subscriptions).
    pub watched_runs: IntGauge,
    /// Events written to SSE clients, by source (`live` fan-out or `replay` from a stream).
    pub events_sent: IntCounterVec,
    /// Times a client read too slowly, overran its bounded queue and was switched to replay.
    pub slow_client_fallbacks: IntCounter,
    /// Times the shared Pub/Sub connection was re-opened after Redis went away (on a cluster:
    /// a master's connection that dropped with runs subscribed on it).
    pub redis_reconnects: IntCounter,
    /// Control messages accepted and published.
    pub control_messages: IntCounter,
    /// Trimmed-history notices sent to clients.
    pub trimmed_notices: IntCounter,
    /// Reviews sent to the Kubernetes API server, by kind (`token`, `access`).
    pub auth_reviews: IntCounterVec,
    /// Authentication and authorization answers taken from the cache.
    pub auth_cache_hits: IntCounter,
    /// Times the tokens file was read again after a change, by result (`ok`, `error`).
    pub tokens_reloads: IntCounterVec,
    /// Announcements dropped because the relay fell behind; their runs' clients read them
    /// from the streams instead.
    pub live_shed: IntCounter,
    /// Bytes of announcements taken off the Pub/Sub connection, not yet handed to the feeds.
    pub pubsub_buffer_bytes: IntGauge,
    /// Bytes of replay pages held by all connections.
    pub replay_bytes: IntGauge,
    /// `reset` events sent: a client's position was not valid in the run's current history.
    pub resets: IntCounter,
    /// Redis Cluster: runs whose sharded subscription was made again, where their slot is
    /// now, after the slot moved or its node's connection dropped (their clients resynced).
    pub resubscribed_runs: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = MetricRegistry::new("agentrun_relay");
        let counter = |name: &str, help: &str| registry.counter(name, help);
        let gauge = |name: &str, help: &str| registry.gauge(name, help);
        let connections = gauge("connections", "Open SSE connections");
        let watched_runs = gauge(
            "watched_runs",
            "Runs with at least one SSE client on this relay",
        );
        let events_sent = registry.counter_vec(
            "events_sent_total",
            "Events written to SSE clients, by source (live or replay)",
            "source",
            &[],
        );
        let slow_client_fallbacks = counter(
            "slow_client_fallbacks_total",
            "Clients that overran their bounded live queue and were switched to replay from the stream",
        );
        let redis_reconnects = counter(
            "redis_reconnects_total",
            "Times the shared Pub/Sub connection was re-opened",
        );
        let control_messages = counter("control_messages_total", "Control messages published");
        let trimmed_notices = counter(
            "trimmed_notices_total",
            "Trimmed-history notices sent to clients",
        );
        let auth_reviews = registry.counter_vec("auth_reviews_total", "TokenReviews (kind=token) and SubjectAccessReviews (kind=access) sent to the Kubernetes API server", "kind", &["token", "access"]);
        let auth_cache_hits = counter(
            "auth_cache_hits_total",
            "Token and access review answers taken from the cache",
        );
        let tokens_reloads = registry.counter_vec(
            "tokens_reloads_total",
            "Times a changed tokens file was read again, by result (ok, error)",
            "result",
            &["ok", "error"],
        );
        let live_shed = counter(
            "live_shed_total",
            "Live announcements dropped because the relay fell behind; clients read them from the streams",
        );
        let pubsub_buffer_bytes = gauge(
            "pubsub_buffer_bytes",
            "Bytes of live announcements waiting to be handed to the feeds",
        );
        let replay_bytes = gauge(
            "replay_bytes",
            "Bytes of replay pages held by all SSE connections",
        );
        let resets = counter(
            "resets_total",
            "reset events sent: a client's position was not valid in the run's current history",
        );
        let resubscribed_runs = counter(
            "resubscribed_runs_total",
            "Redis Cluster: runs subscribed again where their slot is now, after it moved or its node's connection dropped",
        );
        Self {
            registry,
            connections,
            watched_runs,
            events_sent,
            slow_client_fallbacks,
            redis_reconnects,
            control_messages,
            trimmed_notices,
            auth_reviews,
            auth_cache_hits,
            tokens_reloads,
            live_shed,
            pubsub_buffer_bytes,
            replay_bytes,
            resets,
            resubscribed_runs,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
