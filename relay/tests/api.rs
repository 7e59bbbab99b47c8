//! The JSON API: runs, a run's state, control validation, health and metrics.

mod support;

use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{ControlAction, ControlMessage, RunState, StreamName};
use futures::StreamExt;
use support::*;

#[tokio::test]
async fn lists_runs_newest_first_with_their_state() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    for (i, name) in ["old", "mid", "new"].iter().enumerate() {
        agentrun_protocol::publish::register_run(
            &mut conn,
            &run_id(name),
            1000 + i as u64,
            &[("variations", "a,b".into()), ("name", format!("n-{name}"))],
        )
        .await
        .unwrap();
    }
    let mut p = Producer::new("p");
    finish(&mut conn, &mut p, &run_id("mid"), "a", RunState::Failed).await;
    let relay = Relay::start(&redis.url()).await;

    let list = run_list(&relay.base).await;
    let runs = list["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["run"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["new", "mid", "old"]);
    assert_eq!(runs[1]["phase"], "failed");
    assert_eq!(runs[1]["finished"], true);
    assert_eq!(runs[1]["variations"]["a"]["state"], "failed");
    assert_eq!(runs[1]["variations"]["b"], serde_json::Value::Null);
    assert_eq!(runs[0]["created"], 1002);
    assert_eq!(runs[0]["name"], "n-new");

    let one: serde_json::Value = reqwest::get(format!("{}/api/runs/mid", relay.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["phase"], "failed");
    let missing = reqwest::get(format!("{}/api/runs/absent", relay.base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = reqwest::get(format!("{}/api/runs/a%7Bb", relay.base))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn control_is_published_to_the_channel_and_the_audit_stream() {
    let (redis, mut conn, run) = redis_with_run("r-ctl", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let key = StreamName::Control.key(&run);
    let mut pubsub = redis.settings().pubsub().await.unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let mut live = pubsub.into_on_message();

    let client = reqwest::Client::new();
    let url = format!("{}/api/runs/r-ctl/control", relay.base);
    let bodies = [
        r#"{"action":"pause","variation":"a"}"#,
        r#"{"action":"resume"}"#,
        r#"{"action":"stdin","data":"yes"}"#,
    ];
    for body in bodies {
        let r = client.post(&url).body(body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{body}");
    }
    // Received on the channel, in order.
    let mut got = Vec::new();
    for _ in 0..3 {
        let msg = tokio::time::timeout(WAIT, live.next())
            .await
            .unwrap()
            .unwrap();
        let entry = agentrun_protocol::live::decode(msg.get_payload_bytes()).unwrap();
        got.push(ControlMessage::parse(&entry.content).unwrap());
    }
    assert_eq!(
        got.iter().map(|m| m.action).collect::<Vec<_>>(),
        vec![
            ControlAction::Pause,
            ControlAction::Resume,
            ControlAction::Stdin
        ]
    );
    assert_eq!(got[0].variation.as_deref(), Some("a"));
    // Kept in the stream for audit.
    let page = read_page(&mut conn, &key, 0, 10).await.unwrap();
    assert_eq!(page.entries.len(), 3);

    // Anything else is a 400 that says what to send.
    for (body, needle) in [
        (r#"{"action":"explode"}"#, "expected one of `pause`"),
        (r#"{"action":"stdin"}"#, "the text to write"),
        (r#"{"action":"stop","data":"x"}"#, "takes no"),
        ("not json", "control message is not valid"),
        (r#"{"action":"pause","variation":"Bad_Name"}"#, "DNS label"),
    ] {
        let r = client.post(&url).body(body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{body}: {text}");
    }
    let r = client
        .post(format!("{}/api/runs/nope/control", relay.base))
        .body(r#"{"action":"stop"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let metrics = metrics_text(&relay.base).await;
    assert!(
        metrics.contains("agentrun_relay_control_messages_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_control_request_retried_with_the_same_idempotency_key_is_applied_once() {
    let (redis, mut conn, run) = redis_with_run("r-idem", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/runs/r-idem/control", relay.base);
    let send = |key: &'static str| {
        client
            .post(&url)
            .header("idempotency-key", key)
            .body(r#"{"action":"stdin","variation":"a","data":"yes"}"#)
            .send()
    };
    // The first answer was lost on its way back; the client sends the same request again.
    let first = send("6f1c2a9e-stdin-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let retry = send("6f1c2a9e-stdin-1").await.unwrap();
    assert_eq!(retry.status(), 202, "a retry is accepted, not refused");
    let key = StreamName::Control.key(&run);
    let page = read_page(&mut conn, &key, 0, 10).await.unwrap();
    assert_eq!(
        page.entries.len(),
        1,
        "the line reaches the agent's stdin once"
    );
    // Another action (another key) is applied.
    assert_eq!(send("6f1c2a9e-stdin-2").await.unwrap().status(), 202);
    let page = read_page(&mut conn, &key, 0, 10).await.unwrap();
    assert_eq!(page.entries.len(), 2);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(&redis.url()).await;
    let get = |path: &str| reqwest::get(format!("{}{path}", relay.base));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "agentrun_relay_connections",
        "agentrun_relay_slow_client_fallbacks_total",
        "agentrun_relay_redis_reconnects_total",
        "agentrun_relay_watched_runs",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
    redis.kill();
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(
        body.contains(&format!("127.0.0.1:{}", redis.port())),
        "{body}"
    );
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
}

#[tokio::test]
async fn channels_are_released_when_the_last_client_leaves() {
    let (redis, _, _) = redis_with_run("r-refs", &["a", "b"]).await;
    // A short keep-alive makes the relay notice closed connections quickly.
    let mut config = agentrun_relay::Config::for_redis(redis.url());
    config.keepalive_seconds = 1;
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    let url = relay.events_url("r-refs", "");
    let mut one = SseClient::connect(&url, None).await;
    one.expect("open").await;
    let mut two = SseClient::connect(&url, None).await;
    two.expect("open").await;
    // status, metrics, output and logs of a and b: one subscription each, shared.
    assert_eq!(relay.state.hub().subscribed_channels().await, 6);
    drop(one);
    drop(two);
    let hub = relay.state.hub().clone();
    agentrun_protocol::testing::wait_for("subscriptions released", WAIT, || {
        let hub = hub.clone();
        async move { (hub.subscribed_channels().await == 0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_first_request_after_a_redis_restart_is_answered() {
    let (mut redis, _, _) = redis_with_run("r-back", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let client = reqwest::Client::new();
    let requests = [
        ("GET", "/readyz"),
        ("GET", "/api/runs"),
        ("GET", "/api/runs/r-back"),
        ("GET", "/api/runs/r-back/events?follow=false"),
        ("GET", "/api/runs/r-back/events?follow=false&from=now"),
        ("POST", "/api/runs/r-back/control"),
    ];
    for (method, path) in requests {
        // Redis restarts (with its data) while the relay is idle: the relay's connection has
        // dropped, which it learns only from the next command.
        redis.restart();
        let url = format!("{}{path}", relay.base);
        let r = match method {
            "GET" => client.get(&url).send().await.unwrap(),
            _ => client
                .post(&url)
                .body(r#"{"action":"pause"}"#)
                .send()
                .await
                .unwrap(),
        };
        let status = r.status();
        assert!(
            status.is_success(),
            "{method} {path} right after the restart: {status} {}",
            r.text().await.unwrap_or_default()
        );
    }
}

#[tokio::test]
async fn a_variations_output_downloads_as_the_agents_exact_bytes() {
    let (redis, mut conn, run) = redis_with_run("dl", &["alpha", "beta"]).await;
    // More entries than one page, bytes that are not UTF-8, and a gap entry in the middle.
    let chunks: Vec<Vec<u8>> = (0..300u32)
        .map(|i| {
            let mut c = format!("line {i}\n").into_bytes();
            if i % 7 == 0 {
                c.extend_from_slice(&[0xff, 0x00, 0xfe, b'\n']);
            }
            c
        })
        .collect();
    let mut p = Producer::new("p");
    let stream = StreamName::Output(var("alpha"));
    p.publish(
        &mut conn,
        &run,
        &stream,
        agentrun_protocol::EntryType::Output,
        &chunks[..150],
    )
    .await
    .unwrap();
    p.gap(&mut conn, &run, &stream).await;
    p.publish(
        &mut conn,
        &run,
        &stream,
        agentrun_protocol::EntryType::Output,
        &chunks[150..],
    )
    .await
    .unwrap();
    let relay = Relay::start(&redis.url()).await;

    let url = format!("{}/api/runs/{run}/variations/alpha/output", relay.base);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(
        headers["content-disposition"],
        format!("attachment; filename=\"{run}-alpha.txt\"").as_str()
    );
    assert_eq!(headers["x-agentrun-first-seq"], "1");
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        body.to_vec(),
        chunks.concat(),
        "every byte, in order, nothing else"
    );

    // A declared variation with no output yet is empty; an unknown one is named.
    let empty = reqwest::get(format!(
        "{}/api/runs/{run}/variations/beta/output",
        relay.base
    ))
    .await
    .unwrap();
    assert_eq!(
        (
            empty.status().as_u16(),
            empty.headers()["x-agentrun-first-seq"].to_str().unwrap()
        ),
        (200, "0")
    );
    assert!(empty.bytes().await.unwrap().is_empty());
    let unknown = reqwest::get(format!(
        "{}/api/runs/{run}/variations/gamma/output",
        relay.base
    ))
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let msg = unknown.text().await.unwrap();
    assert!(
        msg.contains("no variation gamma") && msg.contains("alpha, beta"),
        "{msg}"
    );
    let missing = reqwest::get(format!(
        "{}/api/runs/absent/variations/alpha/output",
        relay.base
    ))
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    relay.shutdown().await;
}
