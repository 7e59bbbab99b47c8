//! Control round trip: relay API -> Redis -> `agentrun-sidecar run` -> a running agent, and the
//! agent's reaction back through Redis and the relay's SSE stream.

mod support;

use agentrun_protocol::testing::{RedisServer, wait_for};
use std::time::Duration;
use support::*;

const AGENT: &str = r#"
exec 3<&0
( while read -r line <&3; do echo "got $line"; done ) &
i=0
while :; do i=$((i+1)); echo "tick $i"; sleep 0.05; done
"#;

async fn post(relay: &Relay, run: &str, body: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/runs/{run}/control", relay.base))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        202,
        "{body}: {}",
        r.text().await.unwrap_or_default()
    );
}

fn tick(ev: &SseEvent) -> Option<u64> {
    if ev.event != "output" {
        return None;
    }
    let j = ev.json();
    j["content"]
        .as_str()?
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.parse().ok())
        .next_back()
}

fn status_state(ev: &SseEvent) -> Option<String> {
    if ev.event != "status" {
        return None;
    }
    let content: serde_json::Value = serde_json::from_str(ev.json()["content"].as_str()?).ok()?;
    content["state"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn pause_resume_stdin_and_stop_reach_a_running_agent() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url()).await;
    let run = "r-sidecar";
    let mut child = sidecar_run(
        &relay,
        &redis.url(),
        run,
        "a",
        &["--stop-grace-seconds", "2"],
        AGENT,
    )
    .await;
    let mut sse = SseClient::connect(
        &relay.events_url(run, "channels=output,status&variation=a"),
        None,
    )
    .await;

    // Output flows.
    let mut last_tick = 0;
    while last_tick < 3 {
        let ev = sse.expect_entry("ticks").await;
        if let Some(t) = tick(&ev) {
            last_tick = t;
        }
    }

    // Pause: the sidecar reports it, and the ticks stop.
    post(&relay, run, r#"{"action":"pause"}"#).await;
    loop {
        let ev = sse.expect_entry("paused status").await;
        if let Some(t) = tick(&ev) {
            last_tick = t;
        }
        if status_state(&ev).as_deref() == Some("paused") {
            break;
        }
    }
    // Ticks written just before the signal may still be on their way; then silence.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), sse.next()).await {
        if let Some(t) = tick(&ev) {
            last_tick = t;
        }
    }
    if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(1), sse.next()).await {
        assert!(tick(&ev).is_none(), "output continued while paused: {ev:?}");
    }

    // Resume: ticks continue where they stopped.
    post(&relay, run, r#"{"action":"resume"}"#).await;
    loop {
        let ev = sse.expect_entry("ticks after resume").await;
        if let Some(t) = tick(&ev) {
            assert_eq!(t, last_tick + 1, "the agent continued, not restarted");
            break;
        }
    }

    // Stdin reaches the agent.
    post(&relay, run, r#"{"action":"stdin","data":"hello agent"}"#).await;
    loop {
        let ev = sse.expect_entry("the agent's answer").await;
        if ev.event == "output"
            && ev.json()["content"]
                .as_str()
                .unwrap_or("")
                .contains("got hello agent")
        {
            break;
        }
    }

    // Stop: the run ends as stopped and the stream ends with `end`.
    post(&relay, run, r#"{"action":"stop"}"#).await;
    loop {
        let ev = sse.expect_entry("end").await;
        if ev.event == "end" {
            assert_eq!(ev.json()["phase"], "stopped");
            break;
        }
    }
    let status = wait_for("the sidecar to exit", WAIT, || {
        let r = child.try_wait().ok().flatten();
        async move { r }
    })
    .await;
    assert!(!status.success(), "a stopped agent does not exit 0");
}
