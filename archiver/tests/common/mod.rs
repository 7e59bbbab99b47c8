//! Helpers for the archiver's own tests: real archiver processes. The shared helpers (a real
//! S3 server, seeded runs, Redis checks) are in `agentrun_archiver::testing`.
#![allow(dead_code)]

pub use agentrun_archiver::testing::*;
use agentrun_protocol::testing::{ChildGuard, RedisServer, dying_with_test};
use std::process::{Command, Stdio};

pub const ARCHIVER: &str = env!("CARGO_BIN_EXE_agentrun-archiver");

/// `agentrun-archiver` against `redis` and `store`, killed with the test.
pub fn archiver(redis: &RedisServer, store: &Store, consumer: &str, extra: &[&str]) -> ChildGuard {
    let mut cmd = dying_with_test(ARCHIVER);
    cmd.arg("--redis-url")
        .arg(redis.url())
        .arg("--store-url")
        .arg(store.url())
        .args(["--metrics-addr", "127.0.0.1:0", "--consumer", consumer])
        .args(["--backoff-ms", "50"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in store.env() {
        cmd.env(k, v);
    }
    ChildGuard::spawn(&mut cmd)
}

/// `agentrun-archiver requeue-dead`, to its end.
pub fn requeue_dead(redis: &RedisServer) -> String {
    let out = Command::new(ARCHIVER)
        .args(["requeue-dead", "--redis-url", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `agentrun-archiver catalog --store-url URL ARGS`, to its end: what it printed.
pub fn catalog_command(store: &Store, args: &[&str]) -> String {
    let mut cmd = Command::new(ARCHIVER);
    cmd.args(["catalog", "--store-url", &store.url()])
        .args(args);
    for (k, v) in store.env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
