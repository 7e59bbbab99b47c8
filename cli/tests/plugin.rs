//! The `kubectl-agentrun` binary against a real relay and a real Redis.

use agentrun_protocol::publish::{Batch, register_run, set_state};
use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RedisConn,
    RunId, RunState, StatusEvent, StreamName, Variation,
};
use agentrun_relay::{AppState, Config};
use bytes::Bytes;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(redis_url: &str, addr: &str) -> (Self, String) {
        let state = AppState::connect(&Config::for_redis(redis_url))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the relay");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agentrun_relay::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        (
            Relay {
                stop: Some(stop),
                task,
            },
            base,
        )
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn plugin(base: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-agentrun"));
    c.env("AGENTRUN_RELAY_URL", base)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

struct Writer {
    conn: RedisConn,
    run: RunId,
    publisher: Publisher,
    pseq: u64,
}

impl Writer {
    async fn new(redis: &RedisServer, run: &str) -> Self {
        let mut conn = redis.conn().await;
        let run = RunId::new(run).unwrap();
        register_run(&mut conn, &run, 1, &[("variations", "a".into())])
            .await
            .unwrap();
        Writer {
            conn,
            run,
            publisher: Publisher::new(PublishOptions::default()),
            pseq: 0,
        }
    }

    async fn write(&mut self, stream: StreamName, kind: EntryType, chunks: &[Vec<u8>]) {
        let entries: Vec<NewEntry> = chunks
            .iter()
            .map(|c| {
                self.pseq += 1;
                NewEntry {
                    pseq: self.pseq,
                    ts: 1,
                    kind,
                    content: Bytes::from(c.clone()),
                    meta: None,
                }
            })
            .collect();
        self.publisher
            .publish(
                &mut self.conn,
                &self.run,
                Batch {
                    stream: &stream,
                    producer: "w",
                    entries: &entries,
                },
            )
            .await
            .unwrap();
    }

    async fn output(&mut self, chunks: &[Vec<u8>]) {
        self.write(
            StreamName::Output(Variation::new("a").unwrap()),
            EntryType::Output,
            chunks,
        )
        .await;
    }

    async fn finish(&mut self, state: RunState) {
        let ev = StatusEvent::new(Some("a"), state);
        set_state(
            &mut self.conn,
            &self.run,
            &[
                ("var:a", String::from_utf8(ev.to_json()).unwrap()),
                ("phase", state.as_str().to_owned()),
            ],
        )
        .await
        .unwrap();
        self.write(StreamName::Status, EntryType::Status, &[ev.to_json()])
            .await;
    }
}

/// Chunk `i`: text with a number, and every tenth chunk invalid UTF-8 (sent as base64).
fn chunk(i: u32) -> Vec<u8> {
    let mut c = format!("chunk {i} ").into_bytes();
    if i.is_multiple_of(10) {
        c.extend_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
    }
    c.push(b'\n');
    c
}

async fn finished(child: tokio::process::Child) -> Output {
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the plugin exits in time")
        .unwrap()
}

#[tokio::test]
async fn logs_follow_survives_a_relay_restart_and_exits_with_the_run_result() {
    let redis = RedisServer::start();
    let mut w = Writer::new(&redis, "cli-follow").await;
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    let addr = base.trim_start_matches("http://").to_owned();

    let mut expected = Vec::new();
    let first: Vec<Vec<u8>> = (1..=500).map(chunk).collect();
    w.output(&first).await;
    expected.extend(first.concat());

    let child = plugin(&base)
        .args(["logs", "cli-follow", "-f"])
        .spawn()
        .unwrap();
    // Wait until the plugin is connected and has read the history.
    let metrics_url = format!("{base}/metrics");
    wait_for("the plugin to connect", WAIT, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            text.contains("agentrun_relay_connections 1").then_some(())
        }
    })
    .await;

    // The relay restarts while the run keeps writing.
    relay.stop().await;
    let during: Vec<Vec<u8>> = (501..=1000).map(chunk).collect();
    w.output(&during).await;
    expected.extend(during.concat());
    let (relay, _) = Relay::start(&redis.url(), &addr).await;
    let after: Vec<Vec<u8>> = (1001..=1500).map(chunk).collect();
    w.output(&after).await;
    expected.extend(after.concat());
    w.finish(RunState::Succeeded).await;

    let out = finished(child).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == expected,
        "stdout must be the output bytes exactly, once each"
    );
    relay.stop().await;
}

#[tokio::test]
async fn exit_codes_tell_failed_and_stopped_runs_and_snapshots_exit_zero() {
    let redis = RedisServer::start();
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    for (name, state, code) in [
        ("cli-failed", RunState::Failed, 1),
        ("cli-stopped", RunState::Stopped, 3),
    ] {
        let mut w = Writer::new(&redis, name).await;
        w.output(&[b"hello\n".to_vec()]).await;
        let child = plugin(&base)
            .args(["logs", name, "--follow", "--variation", "a"])
            .spawn()
            .unwrap();
        w.finish(state).await;
        let out = finished(child).await;
        assert_eq!(out.status.code(), Some(code), "{name}");
        assert_eq!(out.stdout, b"hello\n");
    }

    // Without -f: the history so far, then exit 0 while the run goes on.
    let mut w = Writer::new(&redis, "cli-snap").await;
    w.output(&[b"one\n".to_vec(), b"two\n".to_vec()]).await;
    w.write(
        StreamName::Logs(Variation::new("a").unwrap()),
        EntryType::Logs,
        &[b"a log line\n".to_vec()],
    )
    .await;
    let out = finished(plugin(&base).args(["logs", "cli-snap"]).spawn().unwrap()).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"one\ntwo\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a log line"));

    // -o json prints envelopes with their cursor; --from resumes after it.
    let out = finished(
        plugin(&base)
            .args(["logs", "cli-snap", "-o", "json", "--channels", "output"])
            .spawn()
            .unwrap(),
    )
    .await;
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines.iter().find(|l| l["seq"] == 1).expect("first entry");
    let cursor = first["id"].as_str().unwrap();
    let out = finished(
        plugin(&base)
            .args(["logs", "cli-snap", "--channels", "output", "--from", cursor])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(out.stdout, b"two\n");

    // Unknown runs are an error that names the way out.
    let out = finished(plugin(&base).args(["logs", "nope", "-f"]).spawn().unwrap()).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    relay.stop().await;
}

#[tokio::test]
async fn pause_resume_stop_publish_control_messages_and_open_prints_the_page() {
    let redis = RedisServer::start();
    let mut w = Writer::new(&redis, "cli-ctl").await;
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    for (cmd, extra) in [
        ("pause", vec!["--variation", "a"]),
        ("resume", vec![]),
        ("stop", vec![]),
    ] {
        let out = finished(
            plugin(&base)
                .arg(cmd)
                .arg("cli-ctl")
                .args(extra)
                .spawn()
                .unwrap(),
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let page = read_page(&mut w.conn, &StreamName::Control.key(&w.run), 0, 10)
        .await
        .unwrap();
    let msgs: Vec<ControlMessage> = page
        .entries
        .iter()
        .map(|e| ControlMessage::parse(&e.content).unwrap())
        .collect();
    assert_eq!(
        msgs.iter().map(|m| m.action).collect::<Vec<_>>(),
        vec![
            ControlAction::Pause,
            ControlAction::Resume,
            ControlAction::Stop
        ]
    );
    assert_eq!(msgs[0].variation.as_deref(), Some("a"));

    let out = finished(plugin(&base).args(["pause", "nope"]).spawn().unwrap()).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    let out = finished(plugin(&base).args(["open", "cli-ctl"]).spawn().unwrap()).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{base}/runs/cli-ctl")
    );

    // Without a relay URL and without an AgentRun to read it from: a clear error.
    let out = finished(
        plugin(&base)
            .env_remove("AGENTRUN_RELAY_URL")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .args(["logs", "cli-ctl"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENTRUN_RELAY_URL"));
    relay.stop().await;
}
