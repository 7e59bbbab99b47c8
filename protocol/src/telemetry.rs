//! Prometheus figures and health endpoints, served the same way by every agentrun process.
//!
//! - [`MetricRegistry`] makes metrics under one prefix (`agentrun_sidecar_…`), registers each
//!   once, and renders the text exposition format.
//! - [`health_router`] serves `/metrics`, `/healthz` (the process is alive) and `/readyz`
//!   (ready unless [`Health::not_ready`] says why not); [`serve_health`] binds it. The relay
//!   mounts the same three routes in its own application.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::net::SocketAddr;

/// The content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A registry whose metrics share one prefix: `agentrun_relay` makes `connections` into
/// `agentrun_relay_connections`.
///
/// Metric definitions are fixed in the code, so an invalid name or a name registered twice is
/// a programming error: these methods panic on it, and every component's tests build its
/// metrics.
#[derive(Clone)]
pub struct MetricRegistry {
    registry: Registry,
    prefix: &'static str,
}

impl MetricRegistry {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            registry: Registry::new(),
            prefix,
        }
    }

    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace(self.prefix)
    }

    /// Registers `metric` and hands it back.
    pub fn add<C: Collector + Clone + 'static>(&self, metric: C) -> C {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("metric registered once");
        metric
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(self.opts(name, help)).expect("valid metric"))
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::with_opts(self.opts(name, help)).expect("valid metric"))
    }

    /// A counter with one label; each of `values` shows from the start (at 0), so that a rate
    /// over them is defined before the first event.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> IntCounterVec {
        let metric =
            self.add(IntCounterVec::new(self.opts(name, help), &[label]).expect("valid metric"));
        for value in values {
            metric.with_label_values(&[value]);
        }
        metric
    }

    /// A gauge with one label; each of `values` shows from the start (at 0).
    pub fn gauge_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
        let metric =
            self.add(IntGaugeVec::new(self.opts(name, help), &[label]).expect("valid metric"));
        for value in values {
            metric.with_label_values(&[value]).set(0);
        }
        metric
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help)
            .namespace(self.prefix)
            .buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// What a process's health endpoints report.
pub trait Health: Clone + Send + Sync + 'static {
    /// The metrics, rendered.
    fn metrics(&self) -> String;
    /// Why the process is not ready (the body of a 503 from `/readyz`), or `None` when it is.
    fn not_ready(&self) -> Option<&'static str>;
}

/// `/metrics` in the text format, `/readyz` from [`Health::not_ready`].
pub async fn metrics<H: Health>(State(health): State<H>) -> impl IntoResponse {
    ([("content-type", METRICS_CONTENT_TYPE)], health.metrics())
}

/// `/healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `/readyz`: 200 `ready`, or 503 with the reason.
pub async fn readyz<H: Health>(State(health): State<H>) -> (StatusCode, &'static str) {
    match health.not_ready() {
        None => (StatusCode::OK, "ready"),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn health_router<H: Health>(health: H) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<H>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<H>))
        .with_state(health)
}

/// Serves [`health_router`] on `addr` in the background; returns the bound address (useful
/// with port 0).
pub async fn serve_health<H: Health>(addr: SocketAddr, health: H) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, health_router(health)).await {
            tracing::warn!(error = %e, "the health endpoints stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Fixed(MetricRegistry, Option<&'static str>);

    impl Health for Fixed {
        fn metrics(&self) -> String {
            self.0.render()
        }
        fn not_ready(&self) -> Option<&'static str> {
            self.1
        }
    }

    #[test]
    fn metrics_carry_the_prefix_and_labels_show_from_the_start() {
        let r = MetricRegistry::new("agentrun_test");
        r.counter("things_total", "Things").inc();
        r.counter_vec("tries_total", "Tries", "result", &["ok", "error"]);
        r.histogram("wait_seconds", "Waits", &[0.1, 1.0])
            .observe(0.5);
        let text = r.render();
        assert!(text.contains("agentrun_test_things_total 1"), "{text}");
        assert!(
            text.contains("agentrun_test_tries_total{result=\"error\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("agentrun_test_wait_seconds_bucket{le=\"1\"} 1"),
            "{text}"
        );
    }

    #[test]
    #[should_panic(expected = "metric registered once")]
    fn a_metric_registered_twice_is_a_programming_error() {
        let r = MetricRegistry::new("agentrun_test");
        r.counter("twice_total", "Once");
        r.counter("twice_total", "Twice");
    }

    #[tokio::test]
    async fn readyz_says_why_a_process_is_not_ready() {
        let registry = MetricRegistry::new("agentrun_test");
        registry.gauge("up", "Up").set(1);
        for (reason, status, body) in [
            (None, 200, "ready"),
            (Some("waiting for Redis"), 503, "waiting for Redis"),
        ] {
            let addr = serve_health(
                "127.0.0.1:0".parse().unwrap(),
                Fixed(registry.clone(), reason),
            )
            .await
            .unwrap();
            let (code, text) = get_text(addr, "/readyz").await;
            assert_eq!((code, text.as_str()), (status, body));
            let (code, text) = get_text(addr, "/metrics").await;
            assert_eq!(code, 200);
            assert!(text.contains("agentrun_test_up 1"), "{text}");
            assert_eq!(get_text(addr, "/healthz").await, (200, "ok".to_string()));
        }
    }

    /// A plain HTTP/1.0 GET; returns the status code and body.
    async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let code = raw[9..12].parse().unwrap();
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (code, body.to_string())
    }
}
