//! Prometheus figures of the sidecar, and the small HTTP server for `/metrics`, `/healthz` and
//! `/readyz`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Bytes of agent output received, by stream (`output`, `logs`).
    pub bytes_in: IntCounterVec,
    /// Entries appended to Redis streams (re-sends that were skipped are not counted).
    pub entries_published: IntCounter,
    pub publish_errors: IntCounter,
    pub publish_seconds: Histogram,
    /// Bytes waiting in the sidecar for Redis.
    pub buffered_bytes: IntGauge,
    /// 1 while Redis takes writes.
    pub redis_up: IntGauge,
    pub redis_reconnects: IntCounter,
    pub control_messages: IntCounter,
    /// Output reported as dropped by the entrypoint (spool full).
    pub gap_bytes: IntCounter,
    /// The agent's CPU time and resident memory, as last reported by the entrypoint.
    pub agent_cpu_millis: IntGauge,
    pub agent_rss_bytes: IntGauge,
    pub ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("agentrun_sidecar".into()), None).unwrap_or_default();
        let bytes_in = IntCounterVec::new(
            Opts::new(
                "bytes_received_total",
                "Bytes of agent output received, by stream",
            ),
            &["stream"],
        )
        .expect("metric");
        let entries_published = IntCounter::new(
            "entries_published_total",
            "Entries appended to Redis streams",
        )
        .expect("metric");
        let publish_errors = IntCounter::new(
            "publish_errors_total",
            "Failed attempts to publish a batch to Redis",
        )
        .expect("metric");
        let publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "publish_duration_seconds",
                "Time to publish one batch to Redis",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .expect("metric");
        let buffered_bytes =
            IntGauge::new("buffered_bytes", "Bytes waiting in the sidecar for Redis")
                .expect("metric");
        let redis_up = IntGauge::new("redis_up", "1 while Redis takes writes").expect("metric");
        let redis_reconnects = IntCounter::new(
            "redis_reconnects_total",
            "Connections made to Redis after the first",
        )
        .expect("metric");
        let control_messages = IntCounter::new(
            "control_messages_total",
            "Control messages forwarded to the agent",
        )
        .expect("metric");
        let gap_bytes = IntCounter::new(
            "gap_bytes_total",
            "Output bytes dropped because the spool was full",
        )
        .expect("metric");
        let agent_cpu_millis = IntGauge::new(
            "agent_cpu_milliseconds",
            "CPU time the agent has used (user + system)",
        )
        .expect("metric");
        let agent_rss_bytes = IntGauge::new(
            "agent_memory_bytes",
            "Resident memory of the agent's process",
        )
        .expect("metric");
        for m in [
            Box::new(agent_cpu_millis.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(agent_rss_bytes.clone()),
            Box::new(bytes_in.clone()),
            Box::new(entries_published.clone()),
            Box::new(publish_errors.clone()),
            Box::new(publish_seconds.clone()),
            Box::new(buffered_bytes.clone()),
            Box::new(redis_up.clone()),
            Box::new(redis_reconnects.clone()),
            Box::new(control_messages.clone()),
            Box::new(gap_bytes.clone()),
        ] {
            let _ = registry.register(m);
        }
        Self {
            registry,
            bytes_in,
            entries_published,
            publish_errors,
            publish_seconds,
            buffered_bytes,
            redis_up,
            redis_reconnects,
            control_messages,
            gap_bytes,
            agent_cpu_millis,
            agent_rss_bytes,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Metrics>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Metrics>| async move {
                if m.ready.load(Ordering::Relaxed) && m.redis_up.get() == 1 {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for Redis",
                    )
                }
            }),
        )
        .with_state(metrics)
}

/// Serves the router on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(metrics)).await;
    });
    Ok(local)
}
