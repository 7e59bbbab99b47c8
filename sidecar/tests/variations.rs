//! Several variations of one run, each run by its own `agentrun-sidecar run`: the run ends
//! only when every variation has ended.

mod common;

use agentrun_protocol::testing::{RedisServer, wait_for};
use common::*;
use std::collections::HashMap;
use std::process::Command;

fn run_variation(
    redis: &RedisServer,
    run: &agentrun_protocol::RunId,
    variation: &str,
    script: &str,
) -> std::process::Child {
    Command::new(SIDECAR)
        .args([
            "run",
            "--quiet",
            "--metrics-interval-seconds",
            "0",
            "--redis-url",
        ])
        .arg(redis.url())
        .args([
            "--run-id",
            run.as_str(),
            "--variation",
            variation,
            "--",
            "sh",
            "-c",
            script,
        ])
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn the_run_ends_when_its_last_variation_ends() {
    let redis = RedisServer::start();
    let run = run_id("vars");
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut slow = run_variation(
        &redis,
        &run,
        "slow",
        &format!(
            "while [ ! -e {} ]; do sleep 0.02; done; echo slow done; exit 2",
            go.display()
        ),
    );
    let mut conn = redis.conn().await;
    wait_for("slow registered", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            let state: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(r.state_key())
                .query_async(&mut c)
                .await
                .ok()?;
            state
                .get("var:slow")
                .filter(|s| s.contains("running"))
                .map(|_| ())
        }
    })
    .await;
    let fast = run_variation(&redis, &run, "fast", "echo fast done")
        .wait_with_output()
        .unwrap();
    assert!(fast.status.success());
    let state: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(run.state_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(state["variations"], "slow,fast");
    assert_eq!(
        state["phase"], "running",
        "one variation done is not the run done: {state:?}"
    );
    assert!(!state.contains_key("ended"));
    let ttl: i64 = redis::cmd("TTL")
        .arg(run.state_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "the run's shared keys get no TTL while it runs");

    std::fs::write(&go, b"").unwrap();
    assert_eq!(slow.wait().unwrap().code(), Some(2));
    let state: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(run.state_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(state["phase"], "failed");
    assert!(state.contains_key("ended"));
    let ttl: i64 = redis::cmd("TTL")
        .arg(run.state_key())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "retention applies once the run has ended");
}
