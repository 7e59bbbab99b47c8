//! The relay against a Redis that speaks only TLS and requires client certificates.

mod support;

use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{RedisServer, TlsFiles};
use agentrun_protocol::{ControlAction, ControlMessage, RunState, StreamName};
use agentrun_relay::{AppState, Config};
use support::*;

fn tls_config(redis: &RedisServer, ca: &std::path::Path, tls: &TlsFiles) -> Config {
    let mut c = Config::for_redis(redis.url());
    assert!(c.redis.url.starts_with("rediss://"));
    c.redis.ca_file = Some(ca.to_owned());
    c.redis.client_cert = Some(tls.client_cert.clone());
    c.redis.client_key = Some(tls.client_key.clone());
    c
}

#[tokio::test]
async fn replay_live_and_control_work_over_mutual_tls() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls, true);
    let mut settings = redis.tls_settings(&tls);
    settings.client_cert = Some(tls.client_cert.clone());
    settings.client_key = Some(tls.client_key.clone());
    let mut conn = settings.connect().await.unwrap();
    let run = run_id("tls-run");
    register(&mut conn, &run, &["a"]).await;
    let mut producer = Producer::new("test");
    producer
        .output(&mut conn, &run, "a", &["one\n".into(), "two\n".into()])
        .await;

    let relay = Relay::start_with(tls_config(&redis, &tls.ca, &tls), "127.0.0.1:0").await;
    let r = reqwest::get(format!("{}/readyz", relay.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Replay, then live.
    let mut sse = SseClient::connect(&relay.events_url("tls-run", "channels=output"), None).await;
    for want in ["one\n", "two\n"] {
        let ev = sse.expect_entry(want).await;
        assert_eq!(ev.json()["content"], want);
    }
    producer
        .output(&mut conn, &run, "a", &["three\n".into()])
        .await;
    assert_eq!(sse.expect_entry("three").await.json()["content"], "three\n");

    // Control is published over the same TLS connection.
    let r = reqwest::Client::new()
        .post(format!("{}/api/runs/tls-run/control", relay.base))
        .body(r#"{"action":"pause"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let page = read_page(&mut conn, &StreamName::Control.key(&run), 0, 10)
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(
        ControlMessage::parse(&page.entries[0].content)
            .unwrap()
            .action,
        ControlAction::Pause
    );

    // The run ends: the stream ends with it.
    finish(&mut conn, &mut producer, &run, "a", RunState::Succeeded).await;
    loop {
        let ev = sse.expect("end").await;
        if ev.event == "end" {
            assert_eq!(ev.json()["phase"], "succeeded");
            break;
        }
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn a_wrong_ca_or_a_missing_client_certificate_fails_with_a_clear_error() {
    let tls = TlsFiles::generate();
    let other = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls, true);

    // A CA that did not sign the server's certificate.
    let err = AppState::connect(&tls_config(&redis, &other.ca, &tls))
        .await
        .err()
        .expect("a wrong CA must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains(&redis.port().to_string()), "{msg}");
    assert!(
        msg.to_ascii_lowercase().contains("certificate")
            || msg.to_ascii_lowercase().contains("tls"),
        "{msg}"
    );

    // No client certificate, to a server that requires one.
    let mut c = Config::for_redis(redis.url());
    c.redis.ca_file = Some(tls.ca.clone());
    let err = AppState::connect(&c)
        .await
        .err()
        .expect("no client certificate must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains(&redis.port().to_string()), "{msg}");

    // A CA file that does not exist names the file.
    let mut c = tls_config(&redis, &tls.ca, &tls);
    c.redis.ca_file = Some("/nonexistent/ca.pem".into());
    let err = AppState::connect(&c)
        .await
        .err()
        .expect("a missing CA file must fail");
    assert!(
        format!("{err:#}").contains("/nonexistent/ca.pem"),
        "{err:#}"
    );
}

#[test]
fn client_certificate_flags_go_together() {
    use clap::Parser;
    let err = Config::try_parse_from([
        "agentrun-relay",
        "--redis-url",
        "rediss://localhost:6380",
        "--redis-client-cert",
        "/c.pem",
    ])
    .expect_err("a certificate without its key is refused");
    assert!(err.to_string().contains("--redis-client-key"), "{err}");
    let c = Config::try_parse_from([
        "agentrun-relay",
        "--redis-url",
        "rediss://localhost:6380",
        "--redis-client-cert",
        "/c.pem",
        "--redis-client-key",
        "/c.key",
    ])
    .unwrap();
    let s = c.redis_settings().unwrap();
    assert_eq!(
        s.client_cert.as_deref(),
        Some(std::path::Path::new("/c.pem"))
    );
    assert_eq!(
        s.client_key.as_deref(),
        Some(std::path::Path::new("/c.key"))
    );
}
