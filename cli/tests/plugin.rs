//! The `kubectl-agentrun` binary against a real relay and a real Redis.

use agentrun_protocol::publish::{Batch, register_run, set_state};
use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{RedisServer, dying_with_test, wait_for};
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RedisConn,
    RunId, RunState, StatusEvent, StreamName, Variation,
};
use agentrun_relay::auth::AuthMode;
use agentrun_relay::{AppState, Config};
use bytes::Bytes;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(redis_url: &str, addr: &str) -> (Self, String) {
        Self::start_with(Config::for_redis(redis_url), addr).await
    }

    async fn start_with(config: Config, addr: &str) -> (Self, String) {
        let state = AppState::connect(&config).await.unwrap();
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

/// The plugin against the relay at `base`, killed with the test (`logs -f` runs until the run
/// ends).
fn plugin(base: &str) -> Command {
    let mut c = Command::from(dying_with_test(env!("CARGO_BIN_EXE_kubectl-agentrun")));
    c.kill_on_drop(true)
        .env("AGENTRUN_RELAY_URL", base)
        .env_remove("AGENTRUN_TOKEN")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
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
    /// The time (Unix ms) given to the entries written next.
    ts: u64,
}

impl Writer {
    async fn new(redis: &RedisServer, run: &str) -> Self {
        Self::with_variations(redis, run, "a").await
    }

    async fn with_variations(redis: &RedisServer, run: &str, variations: &str) -> Self {
        let mut conn = redis.conn().await;
        let run = RunId::new(run).unwrap();
        register_run(&mut conn, &run, 1, &[("variations", variations.into())])
            .await
            .unwrap();
        Writer {
            conn,
            run,
            publisher: Publisher::new(PublishOptions::default()),
            pseq: 0,
            ts: 1,
        }
    }

    async fn output_of(&mut self, variation: &str, chunks: &[&[u8]]) {
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        self.write(
            StreamName::Output(Variation::new(variation).unwrap()),
            EntryType::Output,
            &chunks,
        )
        .await;
    }

    async fn write(&mut self, stream: StreamName, kind: EntryType, chunks: &[Vec<u8>]) {
        let entries: Vec<NewEntry> = chunks
            .iter()
            .map(|c| {
                self.pseq += 1;
                NewEntry {
                    pseq: self.pseq,
                    ts: self.ts,
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

/// Runs the plugin to its end.
async fn run(c: &mut Command) -> Output {
    finished(c.spawn().unwrap()).await
}

/// Asserts the exit code (showing stderr when it differs); returns stderr.
fn exit(out: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    err
}

async fn finished(child: tokio::process::Child) -> Output {
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the plugin exits in time")
        .unwrap()
}

/// `logs RUN -f EXTRA` while the relay (started with `config`) restarts in the middle of the
/// run: the output is exact, once each, and the exit code says how the run ended.
async fn follow_across_a_relay_restart(
    redis: &RedisServer,
    run: &str,
    config: Config,
    extra: &[&str],
    end: RunState,
    code: i32,
) {
    let mut w = Writer::new(redis, run).await;
    let (relay, base) = Relay::start_with(config.clone(), "127.0.0.1:0").await;
    let addr = base.trim_start_matches("http://").to_owned();

    let mut expected = Vec::new();
    let first: Vec<Vec<u8>> = (1..=500).map(chunk).collect();
    w.output(&first).await;
    expected.extend(first.concat());

    let child = plugin(&base)
        .args(["logs", run, "-f"])
        .args(extra)
        .spawn()
        .unwrap();
    // Wait until the plugin is connected and has read the history.
    wait_connected(&base).await;

    // The relay restarts while the run keeps writing.
    relay.stop().await;
    let during: Vec<Vec<u8>> = (501..=1000).map(chunk).collect();
    w.output(&during).await;
    expected.extend(during.concat());
    let (relay, _) = Relay::start_with(config, &addr).await;
    let after: Vec<Vec<u8>> = (1001..=1500).map(chunk).collect();
    w.output(&after).await;
    expected.extend(after.concat());
    w.finish(end).await;

    let out = finished(child).await;
    assert_eq!(
        out.status.code(),
        Some(code),
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
async fn logs_follow_survives_a_relay_restart_and_exits_with_the_run_result() {
    let redis = RedisServer::start();
    let config = Config::for_redis(redis.url());
    follow_across_a_relay_restart(&redis, "cli-follow", config, &[], RunState::Succeeded, 0).await;
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
    let out = run(plugin(&base).args(["logs", "cli-snap"])).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"one\ntwo\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a log line"));

    // -o json prints envelopes with their cursor; --from resumes after it.
    let out =
        run(plugin(&base).args(["logs", "cli-snap", "-o", "json", "--channels", "output"])).await;
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines.iter().find(|l| l["seq"] == 1).expect("first entry");
    let cursor = first["id"].as_str().unwrap();
    let out =
        run(plugin(&base).args(["logs", "cli-snap", "--channels", "output", "--from", cursor]))
            .await;
    assert_eq!(out.stdout, b"two\n");

    // Unknown runs are an error that names the way out.
    let out = run(plugin(&base).args(["logs", "nope", "-f"])).await;
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
        let out = run(plugin(&base).arg(cmd).arg("cli-ctl").args(extra)).await;
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

    let out = run(plugin(&base).args(["pause", "nope"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    let out = run(plugin(&base).args(["open", "cli-ctl"])).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("{base}/runs/cli-ctl")
    );

    // Without a relay URL and without an AgentRun to read it from: a clear error.
    let out = run(plugin(&base)
        .env_remove("AGENTRUN_RELAY_URL")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .args(["logs", "cli-ctl"]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENTRUN_RELAY_URL"));
    relay.stop().await;
}

async fn wait_connected(base: &str) {
    let metrics_url = format!("{base}/metrics");
    wait_for("the plugin to connect", WAIT, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            text.contains("agentrun_relay_connections 1").then_some(())
        }
    })
    .await;
}

async fn control_actions(w: &mut Writer) -> Vec<ControlAction> {
    let page = read_page(&mut w.conn, &StreamName::Control.key(&w.run), 0, 100)
        .await
        .unwrap();
    page.entries
        .iter()
        .map(|e| ControlMessage::parse(&e.content).unwrap().action)
        .collect()
}

const TOKEN: &str = "plugin-token-6a2f91";

#[tokio::test]
async fn a_relay_with_tokens_gets_the_token_from_flag_file_or_env_and_says_how_without_one() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let token_file = dir.path().join("my-token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    let mut config = Config::for_redis(redis.url());
    config.auth = AuthMode::Token;
    config.tokens_file = Some(tokens);
    let (relay, base) = Relay::start_with(config.clone(), "127.0.0.1:0").await;
    let mut w = Writer::new(&redis, "cli-auth").await;

    // No token: exit 2 and a message that says how to pass one.
    for args in [
        vec!["logs", "cli-auth", "-f"],
        vec!["logs", "cli-auth"],
        vec!["stop", "cli-auth"],
    ] {
        let out = run(plugin(&base).args(&args)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for want in ["--token", "--token-file", "AGENTRUN_TOKEN", "401"] {
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
    // A wrong token: exit 2, says it was refused and where it came from, never prints it.
    let out = run(plugin(&base).args(["pause", "cli-auth", "--token", "wrong-token-4242"])).await;
    let err = exit(&out, 2);
    assert!(
        err.contains("did not accept the token from --token"),
        "{err}"
    );
    assert!(!err.contains("wrong-token-4242"), "{err}");

    // Control with each source of the token.
    let out = run(plugin(&base).args(["pause", "cli-auth", "--token", TOKEN])).await;
    exit(&out, 0);
    let out = run(plugin(&base)
        .args(["resume", "cli-auth", "--token-file"])
        .arg(&token_file))
    .await;
    exit(&out, 0);
    let out = run(plugin(&base)
        .env("AGENTRUN_TOKEN", TOKEN)
        .args(["stop", "cli-auth"]))
    .await;
    exit(&out, 0);
    assert_eq!(
        control_actions(&mut w).await,
        [
            ControlAction::Pause,
            ControlAction::Resume,
            ControlAction::Stop
        ]
    );

    relay.stop().await;

    // logs -f with the token, across a relay restart (the reconnect sends it too).
    follow_across_a_relay_restart(
        &redis,
        "cli-auth-follow",
        config,
        &["--token", TOKEN],
        RunState::Stopped,
        3,
    )
    .await;
}

#[tokio::test]
async fn with_a_kubernetes_relay_the_kubeconfig_token_is_used() {
    let redis = RedisServer::start();
    let sim = kube_sim::start(kube_sim::Options {
        kubelet: false,
        auth: serde_yaml::from_str(
            r#"
users:
  - {token: kube-alice-77, username: alice}
  - {token: kube-bob-88, username: bob}
rules:
  - {subjects: [alice], verbs: [get], apiGroups: [agentrun.dev], resources: [agentruns], namespaces: [team-a]}
  - {subjects: [bob], verbs: [get, update], apiGroups: [agentrun.dev], resources: [agentruns], namespaces: [team-a]}
"#,
        )
        .unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay_kubeconfig = dir.path().join("relay");
    std::fs::write(&relay_kubeconfig, kube_sim::kubeconfig_yaml(&sim.url)).unwrap();
    let mut config = Config::for_redis(redis.url());
    config.auth = AuthMode::Kubernetes;
    config.kubeconfig = Some(relay_kubeconfig);
    let (relay, base) = Relay::start_with(config, "127.0.0.1:0").await;
    let mut conn = redis.conn().await;
    register_run(
        &mut conn,
        &RunId::new("cli-kube").unwrap(),
        1,
        &[
            ("variations", "a".into()),
            ("namespace", "team-a".into()),
            ("name", "job".into()),
        ],
    )
    .await
    .unwrap();
    // A user's kubeconfig: the current context's user has a token.
    let user_kubeconfig = |token: &str| {
        let path = dir.path().join(format!("user-{token}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: mine\nclusters:\n- name: c\n  cluster: {{server: {}}}\ncontexts:\n- name: other\n  context: {{cluster: c, user: nobody}}\n- name: mine\n  context: {{cluster: c, user: me}}\nusers:\n- name: nobody\n  user: {{token: not-this-one}}\n- name: me\n  user: {{token: {token}}}\n",
                sim.url
            ),
        )
        .unwrap();
        path
    };

    let out = run(plugin(&base)
        .env("KUBECONFIG", user_kubeconfig("kube-bob-88"))
        .args(["stop", "cli-kube"]))
    .await;
    exit(&out, 0);
    // alice may view but not update: the relay's 403 reaches the user.
    let out = run(plugin(&base)
        .env("KUBECONFIG", user_kubeconfig("kube-alice-77"))
        .args(["pause", "cli-kube"]))
    .await;
    let err = exit(&out, 2);
    assert!(
        err.contains("user alice may not update agentruns/job in namespace team-a"),
        "{err}"
    );
    assert!(!err.contains("kube-alice-77"), "{err}");
    let out = run(plugin(&base)
        .env("KUBECONFIG", user_kubeconfig("kube-alice-77"))
        .args(["logs", "cli-kube"]))
    .await;
    exit(&out, 0);
    // No token anywhere: the message says how.
    let out = run(plugin(&base).args(["stop", "cli-kube"])).await;
    assert!(exit(&out, 2).contains("AGENTRUN_TOKEN"));
    relay.stop().await;
    sim.shutdown().await;
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn logs_follow_says_when_the_history_is_reset_and_goes_on() {
    let redis = RedisServer::start();
    let mut w = Writer::new(&redis, "cli-reset").await;
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    let child = plugin(&base)
        .args(["logs", "cli-reset", "-f"])
        .spawn()
        .unwrap();
    wait_connected(&base).await;
    w.output(&[b"old 1\n".to_vec(), b"old 2\n".to_vec()]).await;
    let metrics_url = format!("{base}/metrics");
    wait_for("the plugin to get the first entries live", WAIT, || {
        let url = metrics_url.clone();
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            (metric(&text, "agentrun_relay_events_sent_total{source=\"live\"}") >= 2).then_some(())
        }
    })
    .await;

    // Redis loses the stream (and the producers hash its record of it: the producer's last
    // pseq and the stream's top), and it is written again.
    let key = StreamName::Output(Variation::new("a").unwrap()).key(&w.run);
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(&key)
        .cmd("HDEL")
        .arg(w.run.producers_key())
        .arg(format!("{key}|w"))
        .arg(&key)
        .query_async(&mut w.conn)
        .await
        .unwrap();
    w.pseq = 0;
    w.output(&[b"new 1\n".to_vec(), b"new 2\n".to_vec()]).await;
    w.finish(RunState::Succeeded).await;

    let out = finished(child).await;
    let err = exit(&out, 0);
    assert!(err.contains("history was reset"), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "old 1\nold 2\nnew 1\nnew 2\n",
        "the new history follows the notice, once"
    );
    relay.stop().await;
}

/// A proxy to `upstream` that passes the first request on but never returns its answer
/// (the connection closes as the answer arrives); later connections pass both ways.
async fn proxy_losing_the_first_answer(upstream: String) -> (String, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                if first {
                    let (mut cr, cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut byte = [0u8; 1];
                    let _ = sr.read(&mut byte).await;
                    up.abort();
                    drop(cw);
                } else {
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (base, connections)
}

#[tokio::test]
async fn a_control_whose_answer_is_lost_is_sent_again_with_the_same_key_and_applied_once() {
    let redis = RedisServer::start();
    let mut w = Writer::new(&redis, "cli-lost").await;
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    let (proxy, connections) =
        proxy_losing_the_first_answer(base.trim_start_matches("http://").to_owned()).await;
    let out = run(plugin(&proxy).args(["stop", "cli-lost"])).await;
    exit(&out, 0);
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the plugin sent the request again"
    );
    assert_eq!(
        control_actions(&mut w).await,
        vec![ControlAction::Stop],
        "the stop reached the run once"
    );
    relay.stop().await;
}

/// The lines of `out` that start with `label`.
fn labelled<'a>(out: &'a str, label: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(label)).collect()
}

#[tokio::test]
async fn logs_prefix_timestamps_tail_and_since_label_and_cut_the_output() {
    let redis = RedisServer::start();
    let (relay, base) = Relay::start(&redis.url(), "127.0.0.1:0").await;
    let mut w = Writer::with_variations(&redis, "cli-lines", "alpha,beta").await;
    // An old entry (1970), then recent ones; alpha's second line is split across entries.
    w.output_of("alpha", &[b"one\ntw"]).await;
    w.ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    w.output_of("alpha", &[b"o\n"]).await;
    w.output_of("beta", &[b"uno\ndos\n"]).await;

    // --prefix: every line says whose it is, also the one split across entries.
    let out = run(plugin(&base).args(["logs", "cli-lines", "--prefix"])).await;
    exit(&out, 0);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(labelled(&text, "[alpha] "), ["[alpha] one", "[alpha] two"]);
    assert_eq!(labelled(&text, "[beta] "), ["[beta] uno", "[beta] dos"]);
    assert_eq!(text.lines().count(), 4, "{text}");

    // --timestamps: the time the entry was written, RFC 3339 in UTC.
    let out =
        run(plugin(&base).args(["logs", "cli-lines", "--variation", "beta", "--timestamps"])).await;
    exit(&out, 0);
    let text = String::from_utf8(out.stdout).unwrap();
    let stamp = jiff::Timestamp::from_millisecond(w.ts as i64).unwrap();
    assert_eq!(text, format!("{stamp:.3} uno\n{stamp:.3} dos\n"));

    // --tail 1: the last line of each variation.
    let out = run(plugin(&base).args(["logs", "cli-lines", "--tail", "1", "--prefix"])).await;
    exit(&out, 0);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(labelled(&text, "[alpha] "), ["[alpha] two"]);
    assert_eq!(labelled(&text, "[beta] "), ["[beta] dos"]);

    // --since: entries older than that are left out (the 1970 one).
    let out =
        run(plugin(&base).args(["logs", "cli-lines", "--variation", "alpha", "--since", "1h"]))
            .await;
    exit(&out, 0);
    assert_eq!(out.stdout, b"o\n");
    let out = run(plugin(&base).args(["logs", "cli-lines", "--since", "lately"])).await;
    assert!(exit(&out, 2).contains("--since \"lately\" is not a duration"));

    // --tail with --follow: the last line of the history, then what comes.
    let mut child = plugin(&base)
        .args([
            "logs",
            "cli-lines",
            "--variation",
            "beta",
            "--tail",
            "1",
            "-f",
        ])
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut first),
    )
    .await
    .expect("the tail in time")
    .unwrap();
    assert_eq!(first, "dos\n");
    w.output_of("beta", &[b"tres\n"]).await;
    w.finish(RunState::Succeeded).await;
    let mut rest = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut rest),
    )
    .await
    .expect("the rest in time")
    .unwrap();
    assert_eq!(rest, b"tres\n");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    relay.stop().await;
}

/// Archives a run with the archiver's writer, then deletes every Redis key it had.
async fn archive_and_forget(
    conn: &mut RedisConn,
    store: &agentrun_archiver::testing::Store,
    run: &RunId,
) {
    use agentrun_archiver::writer::{WriteOptions, archive_run};
    let request = agentrun_protocol::archive::ArchiveRequest::new(run.clone(), 0, "test");
    let done = archive_run(conn, &store.open(), &request, &WriteOptions::default())
        .await
        .unwrap();
    assert!(done.is_some());
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("run:{{{run}}}:*"))
        .query_async(conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(conn)
        .await
        .unwrap();
}

/// A run whose Redis data is gone is read from the archive: `logs` by run id and by AgentRun
/// name (the AgentRun deleted too), byte for byte; `list` and `get` show it with live runs.
#[tokio::test]
async fn logs_list_and_get_show_archived_runs() {
    let redis = RedisServer::start();
    let store = agentrun_archiver::testing::Store::fs();
    let mut config = Config::for_redis(redis.url());
    config.archive_url = Some(store.url());
    let (relay, base) = Relay::start_with(config, "127.0.0.1:0").await;

    let id = "default.hello.0a1b2c3d";
    let mut w = Writer::new(&redis, id).await;
    set_state(
        &mut w.conn,
        &w.run,
        &[("name", "hello".into()), ("namespace", "default".into())],
    )
    .await
    .unwrap();
    let chunks: Vec<Vec<u8>> = (1..=300).map(chunk).collect();
    w.output(&chunks).await;
    w.finish(RunState::Succeeded).await;
    let want: Vec<u8> = chunks.concat();
    let live_run = run(plugin(&base).args(["logs", id, "--channels", "output"])).await;
    exit(&live_run, 0);
    assert_eq!(live_run.stdout, want);
    archive_and_forget(&mut w.conn, &store, &w.run).await;
    let mut live = Writer::new(&redis, "cli-live").await;
    live.output(&[b"live\n".to_vec()]).await;

    // By run id, and by the AgentRun's name (there is no AgentRun: kubectl is not asked).
    let out = run(plugin(&base).args(["logs", id, "--channels", "output"])).await;
    exit(&out, 0);
    assert_eq!(out.stdout, want, "byte for byte from the archive");
    let out = run(plugin(&base).args(["logs", "hello", "-n", "default", "-f"])).await;
    let err = exit(&out, 0);
    assert!(
        err.contains(&format!("AgentRun hello is run {id}")),
        "{err}"
    );
    assert_eq!(out.stdout, want);
    let out = run(plugin(&base).args(["logs", "hello", "-n", "other"])).await;
    let err = exit(&out, 2);
    assert!(err.contains("not found"), "{err}");

    // list: a table of both, and JSON with filters.
    let out = run(plugin(&base).args(["list"])).await;
    exit(&out, 0);
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("RUN"), "{table}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with(id) && r.contains("succeeded") && r.ends_with("archive")),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with("cli-live") && r.ends_with("live")),
        "{table}"
    );
    let out =
        run(plugin(&base).args(["list", "--phase", "succeeded", "-o", "json", "--limit", "5"]))
            .await;
    exit(&out, 0);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["run"], id);
    assert_eq!(listed[0]["archived"], true);
    let out =
        run(plugin(&base).args(["list", "-n", "default", "--name", "hel", "--limit", "1"])).await;
    exit(&out, 0);
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
    let out = run(plugin(&base).args(["list", "--phase", "done"])).await;
    let err = exit(&out, 2);
    assert!(err.contains("`phase`"), "{err}");

    // get: one run, live or archived.
    let out = run(plugin(&base).args(["get", "hello", "-o", "json"])).await;
    exit(&out, 0);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["run"], id);
    assert_eq!(got["archived"], true);
    assert_eq!(got["phase"], "succeeded");
    let out = run(plugin(&base).args(["get", "cli-live"])).await;
    exit(&out, 0);
    assert!(String::from_utf8(out.stdout).unwrap().contains("live"));
    relay.stop().await;
}
