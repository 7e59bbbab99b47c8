//! Redis and the sidecar going away mid-run lose nothing and duplicate nothing.

mod common;

use agentrun_protocol::RunId;
use agentrun_protocol::testing::{RedisServer, wait_for};
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn output_lines(conn: &mut agentrun_protocol::RedisConn, run: &RunId) -> usize {
    let bytes = concat(&read_all(conn, &output_key(run)).await);
    bytes.iter().filter(|b| **b == b'\n').count()
}

#[tokio::test]
async fn redis_restart_mid_run_loses_and_duplicates_nothing() {
    let mut redis = RedisServer::start();
    let run = run_id("redis-restart");
    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "counter.py", COUNTER);
    let count = 400;
    let mut child = sidecar_run(
        &redis,
        &run,
        &["python3", &agent, &count.to_string(), "0.005"],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let conn = redis.conn().await;
    wait_for("some lines", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (output_lines(&mut c, &r).await >= 50).then_some(()) }
    })
    .await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await; // the outage itself
    redis.restart();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut conn = redis.conn().await;
    check_lines(
        &concat(&read_all(&mut conn, &output_key(&run)).await),
        count,
    );
}

/// Runs `sh -c SCRIPT` under the entrypoint with no sidecar listening, so everything goes to
/// the spool; `options` are extra entrypoint flags.
#[tokio::test]
async fn sidecar_killed_mid_run_loses_nothing_and_never_blocks_the_agent() {
    let redis = RedisServer::start();
    let run = run_id("sidecar-restart");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let agent = python_agent(dir.path(), "counter.py", COUNTER);
    let count = 500;
    let mut sidecar = serve(&redis, &run, &socket);
    let mut entrypoint = Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--no-tee",
            "--",
            "python3",
            &agent,
            &count.to_string(),
            "0.005",
        ])
        .spawn()
        .unwrap();
    let mut conn = redis.conn().await;
    wait_for("some lines", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (output_lines(&mut c, &r).await >= 50).then_some(()) }
    })
    .await;
    sidecar.kill().unwrap(); // SIGKILL: nothing is flushed
    sidecar.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await; // the agent keeps writing meanwhile
    let mut sidecar = serve(&redis, &run, &socket);
    let status = tokio::task::spawn_blocking(move || entrypoint.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let times = check_lines(
        &concat(&read_all(&mut conn, &output_key(&run)).await),
        count,
    );
    // The agent was never held up: no pause between two writes came near the outage.
    let longest = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(longest < 0.5, "the agent was blocked for {longest:.3}s");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sidecar.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(sidecar.wait().unwrap().success());
}

#[tokio::test]
async fn output_spooled_while_no_sidecar_is_there_is_published_later() {
    let redis = RedisServer::start();
    let run = run_id("orphan");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    // No sidecar at all while the agent runs: the entrypoint spools and exits.
    let out = entrypoint_without_sidecar(
        &socket,
        &[],
        "printf 'one\\ntwo\\n'; printf three >&2; exit 4",
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("which a sidecar of this pod publishes when it starts")
    );
    // A sidecar that starts later publishes the spool and removes it.
    let mut sidecar = serve(&redis, &run, &socket);
    let mut conn = redis.conn().await;
    wait_for("spooled output", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (concat(&read_all(&mut c, &output_key(&r)).await) == b"one\ntwo\n").then_some(()) }
    })
    .await;
    assert_eq!(
        concat(&read_all(&mut conn, &logs_key(&run)).await),
        b"three"
    );
    let last = statuses(&mut conn, &run)
        .await
        .into_iter()
        .rfind(|s| s.reason.as_deref() != Some("SidecarStarted"))
        .unwrap();
    assert_eq!(last.exit_code, Some(4));
    wait_for("spool removed", DEADLINE, || {
        let d = dir.path().to_path_buf();
        async move {
            let left = std::fs::read_dir(&d).unwrap().flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("agentrun-spool-")
            });
            (!left).then_some(())
        }
    })
    .await;
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}

#[tokio::test]
async fn a_full_spool_becomes_an_explicit_gap_never_a_silent_loss() {
    let redis = RedisServer::start();
    let run = run_id("gap");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    // 3 MiB of output, a 1 MiB spool, and no sidecar: about 2 MiB must be reported dropped.
    let out = entrypoint_without_sidecar(
        &socket,
        &["--spool-max-mib", "1"],
        "head -c 3145728 /dev/zero | tr '\\0' x; echo; echo end",
    );
    assert_eq!(out.status.code(), Some(0));
    let mut sidecar = serve(&redis, &run, &socket);
    let conn = redis.conn().await;
    let entries = wait_for("the spool with its gap", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            let entries = read_all(&mut c, &output_key(&r)).await;
            entries
                .iter()
                .any(|e| e.kind == agentrun_protocol::EntryType::Gap)
                .then_some(entries)
        }
    })
    .await;
    let kept: u64 = entries
        .iter()
        .filter(|e| e.kind == agentrun_protocol::EntryType::Output)
        .map(|e| e.content.len() as u64)
        .sum();
    let gap = entries
        .iter()
        .find(|e| e.kind == agentrun_protocol::EntryType::Gap)
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(gap.meta.as_deref().unwrap()).unwrap();
    let dropped = meta["droppedBytes"].as_u64().unwrap();
    assert_eq!(
        kept + dropped,
        3 * 1024 * 1024 + "\nend\n".len() as u64,
        "kept + dropped = written"
    );
    assert!(dropped > 1024 * 1024, "dropped {dropped}");
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}
