//! /metrics, /healthz and /readyz served by the real router on a loopback port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentrun_operator::crd::RunPhase;
use agentrun_operator::metrics::Metrics;
use agentrun_operator::server::{ServerState, app};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let code = buf[9..12].parse().expect("status code");
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app(state)).await });

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "not ready before the CRD check: {body}");
    ready.store(true, Ordering::SeqCst);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    metrics.reconciled("ok");
    metrics.pods_created.inc();
    metrics.set_phase("default/a", Some(RunPhase::Running));
    metrics.set_phase("default/b", Some(RunPhase::Running));
    metrics.set_phase("default/b", Some(RunPhase::Succeeded));
    {
        let _timer = metrics.count_and_measure();
    }
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "agentrun_operator_reconciles_total{result=\"ok\"} 1",
        "agentrun_operator_pods_created_total 1",
        "agentrun_operator_runs{phase=\"Running\"} 1",
        "agentrun_operator_runs{phase=\"Succeeded\"} 1",
        "agentrun_operator_runs{phase=\"Failed\"} 0",
        "agentrun_operator_reconcile_duration_seconds_count 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    metrics.set_phase("default/a", None);
    let (_, body) = get(addr, "/metrics").await;
    assert!(
        body.contains("agentrun_operator_runs{phase=\"Running\"} 0"),
        "{body}"
    );
}
