//! Slow clients do not grow the relay: the relay binary runs as its own process, stalled
//! clients hold connections open while 50 MB flow through a run, and the relay's resident
//! memory stays bounded; a stalled client that resumes reading gets everything, from replay.

mod support;

use agentrun_protocol::testing::{RedisServer, free_port, wait_for};
use agentrun_protocol::{EntryType, StreamName};
use futures::StreamExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use support::*;

struct RelayProcess {
    child: Child,
    base: String,
}

impl RelayProcess {
    async fn start(redis_url: &str) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_agentrun-relay"))
            .args([
                "--redis-url",
                redis_url,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("RUST_LOG", "warn")
            // Few malloc arenas, as in the container image, so RSS reflects live memory.
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agentrun-relay");
        let base = format!("http://127.0.0.1:{port}");
        let url = format!("{base}/readyz");
        wait_for("the relay to be ready", WAIT, || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
        RelayProcess { child, base }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status of the relay");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn stalled_clients_do_not_grow_relay_memory() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("r-slow");
    register(&mut conn, &run, &["a"]).await;
    let relay = RelayProcess::start(&redis.url()).await;
    let url = format!("{}/api/runs/r-slow/events?channels=output", relay.base);

    // Twenty clients that read the response head and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let resp = reqwest::get(&url).await.unwrap();
        assert!(resp.status().is_success());
        stalled.push(resp);
    }
    // One client that keeps up.
    let fast_url = url.clone();
    const N: u64 = 50_000;
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    let fast = tokio::spawn(async move {
        let mut sse = SseClient::connect(&fast_url, None).await;
        let mut next = 1;
        while next <= N {
            let ev = sse.expect_entry("live output for the fast client").await;
            assert_eq!(
                ev.json()["seq"],
                next,
                "the fast client sees every entry in order"
            );
            seen.store(next, Ordering::SeqCst);
            next += 1;
        }
    });
    let before = relay.rss_kib();

    // 50,000 entries of 1 KiB.
    let mut p = Producer::new("p");
    let chunk = vec![b'x'; 1023];
    let mut mid = 0;
    for batch in 0..(N / 500) {
        // Publish at the pace the fast client reads (at most 2,000 entries ahead): this test is
        // about slow clients, not about a producer that outruns the relay's CPU.
        let lead = if batch == N / 1000 { 0 } else { 2_000 };
        let progress_now = progress.clone();
        wait_for("the fast client to keep up", WAIT, || {
            let p = progress_now.load(Ordering::SeqCst);
            async move { (p + lead >= batch * 500).then_some(()) }
        })
        .await;
        if batch == N / 1000 {
            // Measure once the relay has delivered the first half (not while it is busy).
            mid = relay.rss_kib();
        }
        let contents: Vec<Vec<u8>> = (0..500)
            .map(|i| {
                let mut c = format!("{:08}", batch * 500 + i).into_bytes();
                c.extend_from_slice(&chunk[8..]);
                c.push(b'\n');
                c
            })
            .collect();
        p.publish(
            &mut conn,
            &run,
            &StreamName::Output(var("a")),
            EntryType::Output,
            &contents,
        )
        .await
        .unwrap();
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), fast)
        .await
        .expect("the fast client keeps up")
        .unwrap();
    let after = relay.rss_kib();
    let grown = after.saturating_sub(before);
    eprintln!(
        "relay RSS: {before} KiB before, {mid} KiB after 25 MB, {after} KiB after 50 MB through 20 stalled clients"
    );
    // Buffering for each stalled client would be 20 x 50 MB. What the relay holds is bounded:
    // the per-run ring plus each connection's socket write buffer, whatever the volume.
    assert!(
        grown < 32 * 1024,
        "relay RSS grew by {grown} KiB ({before} -> {after}) with stalled clients"
    );
    assert!(
        after.saturating_sub(mid) < 12 * 1024,
        "relay RSS kept growing with the data volume: {mid} KiB after 25 MB, {after} KiB after 50 MB"
    );

    // A stalled client that resumes reading gets every entry once, in order (from replay).
    let resumed = stalled.pop().unwrap();
    let mut body = resumed.bytes_stream();
    let mut buf = Vec::new();
    let mut next = 1u64;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while next <= N {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("the resumed client catches up in time")
            .expect("stream open")
            .unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8(block).unwrap();
            if !text.contains("event: output") {
                continue;
            }
            let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            let j: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(j["seq"], next);
            next += 1;
        }
    }
    let metrics = reqwest::get(format!("{}/metrics", relay.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let fallbacks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentrun_relay_slow_client_fallbacks_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        fallbacks >= 1,
        "the resumed client fell back to replay: {metrics}"
    );
}
