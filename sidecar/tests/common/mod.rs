//! Shared helpers for the sidecar's integration tests: real Redis, real binaries.
#![allow(dead_code)]

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
    let mut cmd = Command::new(SIDECAR);
    cmd.args([
        "run",
        "--quiet",
        "--metrics-interval-seconds",
        "0",
        "--redis-url",
    ])
    .arg(redis.url())
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

/// The entrypoint with no sidecar at `socket`: it spools, waits 1 s and exits.
pub fn entrypoint_without_sidecar(
    socket: &std::path::Path,
    options: &[&str],
    script: &str,
) -> std::process::Output {
    std::process::Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(socket)
        .args(["--no-tee", "--drain-timeout-seconds", "1"])
        .args(options)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap()
}

/// `agentrun-sidecar serve` on `socket`.
pub fn serve(redis: &RedisServer, run: &RunId, socket: &std::path::Path) -> ChildGuard {
    serve_with(redis, run, socket, &[])
}

/// `agentrun-sidecar serve` on `socket` with `extra` options.
pub fn serve_with(
    redis: &RedisServer,
    run: &RunId,
    socket: &std::path::Path,
    extra: &[&str],
) -> ChildGuard {
    ChildGuard::spawn(
        agentrun_protocol::testing::dying_with_test(SIDECAR)
            .args([
                "serve",
                "--metrics-interval-seconds",
                "0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--redis-url",
            ])
            .arg(redis.url())
            .args([
                "--run-id",
                run.as_str(),
                "--variation",
                "default",
                "--socket",
            ])
            .arg(socket)
            .args(extra)
            .env("RUST_LOG", "warn"),
    )
}
