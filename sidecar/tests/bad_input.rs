//! Bad input gets a clear error or bounded memory, never a hang.

mod common;

use agentrun_protocol::testing::{RedisServer, free_port};
use agentrun_protocol::{EntryType, RunState};
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_with_url(url: &str) -> std::process::Output {
    let mut cmd = Command::new(SIDECAR);
    cmd.args([
        "run",
        "--redis-url",
        url,
        "--run-id",
        "r1",
        "--",
        "echo",
        "hi",
    ]);
    output_of(&mut cmd)
}

#[test]
fn a_bad_redis_url_is_named_with_the_fix() {
    let out = run_with_url("localhost:6379");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"localhost:6379\"") && err.contains("redis://[user:password@]host:port"),
        "{err}"
    );
}

#[test]
fn bad_names_are_refused_with_the_flag_named() {
    let mut cmd = Command::new(SIDECAR);
    cmd.args([
        "run",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--run-id",
        "r1",
        "--variation",
        "Not_Valid",
        "--",
        "true",
    ]);
    let out = output_of(&mut cmd);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--variation") && err.contains("DNS label"),
        "{err}"
    );
}

#[test]
fn an_unreachable_redis_fails_fast_with_a_clear_error() {
    let port = free_port();
    let started = Instant::now();
    let out = run_with_url(&format!("redis://127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("cannot reach Redis"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "must not hang: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_missing_command_is_reported_in_the_terminal_and_in_the_status() {
    let redis = RedisServer::start();
    let run = run_id("missing");
    let out = output_of(&mut sidecar_run(
        &redis,
        &run,
        &["/no/such/agent", "--flag"],
    ));
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/agent") && err.contains("PATH"),
        "{err}"
    );
    let mut conn = redis.conn().await;
    let last = statuses(&mut conn, &run).await.pop().unwrap();
    assert_eq!(
        (last.state, last.reason.as_deref(), last.exit_code),
        (RunState::Failed, Some("StartError"), Some(127))
    );
    assert!(last.message.unwrap().contains("/no/such/agent"));
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn an_agent_writing_100_mb_flat_out_keeps_memory_bounded_and_loses_nothing() {
    let redis = RedisServer::start_with(&["--appendonly", "no"]);
    let run = run_id("flood");
    let total: u64 = 100_000_000;
    let script = format!(
        "yes 012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678 | head -c {total}"
    );
    let mut child = sidecar_run(&redis, &run, &["sh", "-c", &script])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        peak < 160 * 1024,
        "sidecar RSS peaked at {peak} KiB for 100 MB of output"
    );
    let mut conn = redis.conn().await;
    let entries = read_all(&mut conn, &output_key(&run)).await;
    assert!(
        entries.iter().all(|e| e.kind == EntryType::Output),
        "no gap: nothing was dropped"
    );
    let bytes: u64 = entries.iter().map(|e| e.content.len() as u64).sum();
    assert_eq!(bytes, total);
    assert!(entries.iter().all(|e| e.content.len() <= 64 * 1024));
}
