//! Shared helpers for the sidecar's integration tests: real Redis, real binaries.
#![allow(dead_code)]

pub mod pod;

use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{ChildGuard, RedisServer};
use agentrun_protocol::{Entry, EntryType, RedisConn, RunId, StatusEvent, StreamName, Variation};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const SIDECAR: &str = env!("CARGO_BIN_EXE_agentrun-sidecar");
pub const ENTRYPOINT: &str = env!("CARGO_BIN_EXE_agentrun-entrypoint");

pub fn run_id(tag: &str) -> RunId {
    RunId::new(format!("{tag}-{:08x}", rand::random::<u32>())).unwrap()
}

/// `agentrun-sidecar run` for an agent command, with a fresh run id.
pub fn sidecar_run(redis: &RedisServer, run: &RunId, agent: &[&str]) -> Command {
    sidecar_run_with(redis, run, &[], agent)
}

/// `agentrun-sidecar run` with extra options (before the `--`).
pub fn sidecar_run_with(
    redis: &RedisServer,
    run: &RunId,
    options: &[&str],
    agent: &[&str],
) -> Command {
    sidecar_run_at(&redis.url(), run, options, agent)
}

/// `agentrun-sidecar run` against the Redis at `url` (a server or a cluster), killed with
/// the test.
pub fn sidecar_run_at(url: &str, run: &RunId, options: &[&str], agent: &[&str]) -> Command {
    let mut cmd = agentrun_protocol::testing::dying_with_test(SIDECAR);
    cmd.args([
        "run",
        "--quiet",
        "--metrics-interval-seconds",
        "0",
        "--redis-url",
        url,
    ])
    .args(["--run-id", run.as_str(), "--variation", "default"])
    .args(options)
    .arg("--")
    .args(agent)
    .env("RUST_LOG", "warn");
    cmd
}

pub fn output_of(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .expect("run agentrun-sidecar")
}

/// Every entry of a stream, in order.
pub async fn read_all(conn: &mut RedisConn, key: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = read_page(conn, key, after, 500).await.unwrap();
        assert!(page.trimmed.is_none(), "unexpected trim in {key}");
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        out.extend(page.entries);
    }
    out
}

pub fn output_key(run: &RunId) -> String {
    StreamName::Output(Variation::default_name()).key(run)
}

pub fn logs_key(run: &RunId) -> String {
    StreamName::Logs(Variation::default_name()).key(run)
}

/// The bytes of a stream's data entries, checking order and contiguity on the way.
pub fn concat(entries: &[Entry]) -> Vec<u8> {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq must be contiguous from 1");
    }
    entries
        .iter()
        .filter(|e| matches!(e.kind, EntryType::Output | EntryType::Logs))
        .flat_map(|e| e.content.iter().copied())
        .collect()
}

pub async fn statuses(conn: &mut RedisConn, run: &RunId) -> Vec<StatusEvent> {
    read_all(conn, &StreamName::Status.key(run))
        .await
        .iter()
        .map(|e| serde_json::from_slice(&e.content).unwrap())
        .collect()
}

/// Writes a Python agent script to a file and returns its path as a string.
pub fn python_agent(dir: &Path, name: &str, source: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path.to_string_lossy().into_owned()
}

/// Writes `count` numbered lines, one every `interval`, each with the time it was written.
pub const COUNTER: &str = r#"
import sys, time
count, interval = int(sys.argv[1]), float(sys.argv[2])
for i in range(count):
    sys.stdout.write("line %d t=%.4f\n" % (i, time.time()))
    sys.stdout.flush()
    time.sleep(interval)
"#;

/// Parses the stream back into (line number, time written) and checks 0..count, each once.
pub fn check_lines(bytes: &[u8], count: usize) -> Vec<f64> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let mut times = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let (n, t) = line
            .strip_prefix("line ")
            .and_then(|l| l.split_once(" t="))
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert_eq!(
            n.parse::<usize>().unwrap(),
            i,
            "lines must arrive in order, once each"
        );
        times.push(t.parse().unwrap());
    }
    assert_eq!(times.len(), count, "every line must arrive");
    times
}

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The state directory `serve` gives the sidecar of `socket` (private to the sidecar in a pod;
/// next to the socket in these tests).
pub fn state_dir(socket: &Path) -> std::path::PathBuf {
    socket.parent().unwrap().join("sidecar-state")
}

/// What a sidecar of `socket` does at its first start, for an entrypoint that runs before any
/// sidecar is there (which a pod never does): a key in the sidecar's state directory and the
/// hand-off file next to the socket. When the state directory has a key already, it is handed
/// off again (a second entrypoint for the same sidecar, which a pod never has either).
pub fn provision_key(socket: &Path) {
    use agentrun_sidecar::auth;
    let state = state_dir(socket);
    std::fs::create_dir_all(&state).unwrap();
    let key = auth::load_key(&state).unwrap_or_else(|_| {
        let key = auth::Key::generate().unwrap();
        auth::persist_key(&state, &key).unwrap();
        key
    });
    auth::write_handoff(&socket.parent().unwrap().join(auth::HANDOFF_FILE), &key).unwrap();
}

/// The entrypoint with no sidecar at `socket`: it spools, waits 1 s and exits.
pub fn entrypoint_without_sidecar(
    socket: &std::path::Path,
    options: &[&str],
    script: &str,
) -> std::process::Output {
    provision_key(socket);
    std::process::Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(socket)
        .args(["--no-tee", "--drain-timeout-seconds", "1"])
        .args(options)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap()
}

/// `agentrun-sidecar serve` on `socket`, with its state directory ([`state_dir`]); returns
/// once its socket is there (what the kubelet's startup probe waits for before it starts the
/// agent container).
pub fn serve(redis: &RedisServer, run: &RunId, socket: &std::path::Path) -> ChildGuard {
    serve_on(redis, run, socket, 0)
}

/// [`serve`] with its metrics on `metrics_port` (0: any).
pub fn serve_on(
    redis: &RedisServer,
    run: &RunId,
    socket: &std::path::Path,
    metrics_port: u16,
) -> ChildGuard {
    serve_with(redis, run, socket, metrics_port, &[])
}

/// [`serve_on`] with `extra` options.
pub fn serve_with(
    redis: &RedisServer,
    run: &RunId,
    socket: &std::path::Path,
    metrics_port: u16,
    extra: &[&str],
) -> ChildGuard {
    let child = ChildGuard::spawn(
        agentrun_protocol::testing::dying_with_test(SIDECAR)
            .args(["serve", "--metrics-interval-seconds", "0", "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--redis-url")
            .arg(redis.url())
            .args([
                "--run-id",
                run.as_str(),
                "--variation",
                "default",
                "--socket",
            ])
            .arg(socket)
            .arg("--state-dir")
            .arg(state_dir(socket))
            .args(extra)
            .env("RUST_LOG", "warn"),
    );
    let deadline = std::time::Instant::now() + DEADLINE;
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket at {} after {DEADLINE:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Publishes control messages on the run's control stream, as the relay does (one batch, from
/// a producer of their own); returns the stream seq of each.
pub async fn send_controls(
    redis: &RedisServer,
    run: &RunId,
    msgs: &[agentrun_protocol::ControlMessage],
) -> Vec<u64> {
    use agentrun_protocol::{NewEntry, PublishOptions, Publisher, now_ms};
    let mut conn = redis.conn().await;
    let producer = format!("test-{:08x}", rand::random::<u32>());
    let entries: Vec<NewEntry> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| NewEntry {
            pseq: i as u64 + 1,
            ts: now_ms(),
            kind: EntryType::Control,
            content: bytes::Bytes::from(m.to_json()),
            meta: None,
        })
        .collect();
    let mut seqs = Vec::new();
    for chunk in entries.chunks(200) {
        let before = agentrun_protocol::replay::last_seq(&mut conn, &StreamName::Control.key(run))
            .await
            .unwrap();
        Publisher::new(PublishOptions::default())
            .publish(
                &mut conn,
                run,
                agentrun_protocol::publish::Batch {
                    stream: &StreamName::Control,
                    producer: &producer,
                    entries: chunk,
                },
            )
            .await
            .unwrap();
        seqs.extend((1..=chunk.len() as u64).map(|i| before + i));
    }
    seqs
}

/// The `control:VAR` marker of the default variation in the run's state hash (0 when unset).
pub async fn control_marker(conn: &mut RedisConn, run: &RunId) -> u64 {
    redis::cmd("HGET")
        .arg(run.state_key())
        .arg("control:default")
        .query_async::<Option<u64>>(conn)
        .await
        .unwrap()
        .unwrap_or(0)
}

/// Waits until a sidecar's socket is there (what the kubelet's startup probe waits for before
/// it starts the agent container).
pub async fn wait_for_socket(socket: &Path) {
    agentrun_protocol::testing::wait_for("the sidecar's socket", DEADLINE, || {
        let there = socket.exists();
        async move { there.then_some(()) }
    })
    .await;
}

/// Waits until `child` exits (it must within [`DEADLINE`]); its exit status, and what it wrote
/// to its stderr when that is piped.
pub async fn exit_of(child: &mut ChildGuard, what: &str) -> (std::process::ExitStatus, String) {
    let status = agentrun_protocol::testing::wait_for(what, DEADLINE, || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    (status, stderr)
}

/// Sends `stop` and waits for the agent's entrypoint to exit.
pub async fn stop_agent(
    redis: &RedisServer,
    run: &RunId,
    agent: &mut ChildGuard,
) -> (std::process::ExitStatus, String) {
    let stop = agentrun_protocol::ControlMessage::new(agentrun_protocol::ControlAction::Stop);
    send_controls(redis, run, &[stop]).await;
    exit_of(agent, "the agent to stop").await
}

/// Waits until the default variation's output stream holds exactly `want`; it must never hold
/// anything else on the way.
pub async fn wait_for_output(redis: &RedisServer, run: &RunId, want: &[u8]) {
    let conn = redis.conn().await;
    let key = output_key(run);
    agentrun_protocol::testing::wait_for(
        &format!("{:?} in the output stream", String::from_utf8_lossy(want)),
        DEADLINE,
        || {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                let bytes = concat(&read_all(&mut conn, &key).await);
                assert!(
                    want.starts_with(&bytes),
                    "the stream holds bytes the agent did not write: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                (bytes == want).then_some(())
            }
        },
    )
    .await;
}
