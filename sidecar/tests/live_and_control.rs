//! Live delivery on Pub/Sub, and control messages reaching the agent.

mod common;

use agentrun_protocol::live;
use agentrun_protocol::publish::Batch;
use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RunId, RunState,
    StreamName, now_ms,
};
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_write_with_no_newline_is_delivered_live() {
    let redis = RedisServer::start();
    let run = run_id("live");
    let mut pubsub = redis.settings().pubsub().await.unwrap();
    pubsub.subscribe(output_key(&run)).await.unwrap();
    let mut live = pubsub.into_on_message();

    // The agent writes a token with no newline, then stays alive for a long time.
    let mut child = tokio::process::Command::from(sidecar_run(
        &redis,
        &run,
        &["sh", "-c", "printf token; sleep 30"],
    ))
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let started = Instant::now();
    let msg = tokio::time::timeout(DEADLINE, live.next())
        .await
        .expect("a live message")
        .unwrap();
    let entry = live::decode(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
    assert_eq!(entry.content.as_ref(), b"token");
    assert_eq!(entry.seq, 1);
    // It came while the agent was still running, not when its output closed.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent must still be running"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    child.kill().await.unwrap();
}

async fn send_control(redis: &RedisServer, run: &RunId, msg: ControlMessage, pseq: u64) {
    let mut conn = redis.conn().await;
    let entry = NewEntry {
        pseq,
        ts: now_ms(),
        kind: EntryType::Control,
        content: Bytes::from(msg.to_json()),
        meta: None,
    };
    Publisher::new(PublishOptions::default())
        .publish(
            &mut conn,
            run,
            Batch {
                stream: &StreamName::Control,
                producer: "test",
                entries: &[entry],
            },
        )
        .await
        .unwrap();
}

const TICKER: &str = r#"
import sys, time, threading
def echo():
    for line in sys.stdin:
        print("got:" + line.strip(), flush=True)
threading.Thread(target=echo, daemon=True).start()
i = 0
while True:
    print("tick", i, flush=True)
    i += 1
    time.sleep(0.02)
"#;

#[tokio::test]
async fn pause_resume_stdin_and_stop_reach_the_agent() {
    let redis = RedisServer::start();
    let run = run_id("control");
    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "ticker.py", TICKER);
    let cmd = sidecar_run_with(
        &redis,
        &run,
        &["--stop-grace-seconds", "5"],
        &["python3", "-u", &agent],
    );
    let child = tokio::process::Command::from(cmd)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut conn = redis.conn().await;
    let out_key = output_key(&run);

    let text = |entries: &[agentrun_protocol::Entry]| -> String {
        entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.content).into_owned())
            .collect()
    };
    let ticks = |s: &str| s.matches("tick").count();

    wait_for("first ticks", DEADLINE, || {
        let mut c = conn.clone();
        let k = out_key.clone();
        async move { (ticks(&text(&read_all(&mut c, &k).await)) >= 3).then_some(()) }
    })
    .await;

    send_control(&redis, &run, ControlMessage::new(ControlAction::Pause), 1).await;
    wait_for("paused status", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            statuses(&mut c, &r)
                .await
                .iter()
                .any(|s| s.state == RunState::Paused)
                .then_some(())
        }
    })
    .await;
    // While paused, the agent writes nothing. (Give the last in-flight chunk a moment to land.)
    let settle = ticks(&text(&read_all(&mut conn, &out_key).await));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ticks(&text(&read_all(&mut conn, &out_key).await));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ticks(&text(&read_all(&mut conn, &out_key).await));
    assert!(before >= settle);
    assert_eq!(before, after, "output must stop while paused");

    send_control(&redis, &run, ControlMessage::new(ControlAction::Resume), 2).await;
    wait_for("output after resume", DEADLINE, || {
        let mut c = conn.clone();
        let k = out_key.clone();
        async move { (ticks(&text(&read_all(&mut c, &k).await)) > after + 3).then_some(()) }
    })
    .await;

    let mut stdin = ControlMessage::new(ControlAction::Stdin);
    stdin.data = Some("hello agent".into());
    send_control(&redis, &run, stdin, 3).await;
    wait_for("stdin echo", DEADLINE, || {
        let mut c = conn.clone();
        let k = out_key.clone();
        async move {
            text(&read_all(&mut c, &k).await)
                .contains("got:hello agent")
                .then_some(())
        }
    })
    .await;

    send_control(&redis, &run, ControlMessage::new(ControlAction::Stop), 4).await;
    let status = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("agent stops")
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(143), "SIGTERM → 128+15");
    let last = statuses(&mut conn, &run).await.pop().unwrap();
    assert_eq!(last.state, RunState::Stopped);
    let phase: String = redis::cmd("HGET")
        .arg(run.state_key())
        .arg("phase")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(phase, "stopped");
}

#[tokio::test]
async fn serve_exposes_metrics_health_and_readiness() {
    let redis = RedisServer::start();
    let run = run_id("metrics");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let port = agentrun_protocol::testing::free_port();
    let mut sidecar = std::process::Command::new(SIDECAR)
        .args([
            "serve",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--redis-url",
        ])
        .arg(redis.url())
        .args(["--run-id", run.as_str(), "--socket"])
        .arg(&socket)
        .spawn()
        .unwrap();
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let ready = wait_for("readiness", DEADLINE, || async {
        get("/readyz")
            .await
            .filter(|b| b.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(ready.contains("ready"));
    assert!(get("/healthz").await.unwrap().starts_with("HTTP/1.1 200"));
    // Output through the socket shows up in the figures.
    let status = tokio::process::Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(&socket)
        .args(["--no-tee", "--", "printf", "12345"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let metrics = get("/metrics").await.unwrap();
    assert!(
        metrics.contains("agentrun_sidecar_bytes_received_total{stream=\"output\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains("agentrun_sidecar_redis_up 1"));
    // When Redis goes away, readiness says so.
    drop(redis);
    wait_for("not ready", DEADLINE, || async {
        get("/readyz")
            .await
            .filter(|b| b.starts_with("HTTP/1.1 503"))
    })
    .await;
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}

#[tokio::test]
async fn a_stop_request_leaves_the_termination_message_for_kubernetes() {
    let redis = RedisServer::start();
    let run = run_id("termlog");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let termination_log = dir.path().join("termination-log");
    std::fs::write(&termination_log, b"").unwrap();
    let mut sidecar = std::process::Command::new(SIDECAR)
        .args(["serve", "--metrics-addr", "127.0.0.1:0", "--redis-url"])
        .arg(redis.url())
        .args(["--run-id", run.as_str(), "--socket"])
        .arg(&socket)
        .spawn()
        .unwrap();
    wait_for_socket(&socket).await;
    let agent = tokio::process::Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(&socket)
        .arg("--termination-log")
        .arg(&termination_log)
        .args(["--no-tee", "--", "sh", "-c", "echo ready; sleep 60"])
        .spawn()
        .unwrap();
    let mut conn = redis.conn().await;
    wait_for("the agent runs", DEADLINE, || {
        let mut c = conn.clone();
        let k = output_key(&run);
        async move { (!read_all(&mut c, &k).await.is_empty()).then_some(()) }
    })
    .await;
    send_control(&redis, &run, ControlMessage::new(ControlAction::Stop), 1).await;
    let status = tokio::time::timeout(DEADLINE, agent.wait_with_output())
        .await
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(143));
    assert_eq!(
        std::fs::read_to_string(&termination_log).unwrap(),
        "agentrun: stopped"
    );
    let last = statuses(&mut conn, &run).await.pop().unwrap();
    assert_eq!(
        (last.state, last.reason.as_deref()),
        (RunState::Stopped, Some("Stopped"))
    );
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}
