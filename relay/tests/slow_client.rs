//! Slow clients do not grow the relay: the relay binary runs as its own process, stalled
//! clients hold connections open while 50 MB flow through a run, and the relay's resident
//! memory stays bounded; a stalled client that resumes reading gets everything, from replay.
//! Binary output in 64 KiB chunks, with stalled and replaying clients, stays within the
//! relay's byte budgets; and a relay that falls behind its Pub/Sub connection sheds live
//! announcements instead of queueing them, while its clients still get every entry once.

mod support;

use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_protocol::{EntryType, StreamName};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use support::*;

/// The relay binary on a free port, with the default limits.
fn start_relay(redis_url: &str) -> RelayProcess {
    RelayProcess::start(
        &["--redis-url", redis_url, "--listen", "127.0.0.1:0"],
        &[],
        "info",
    )
}

#[tokio::test]
async fn stalled_clients_do_not_grow_relay_memory() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("r-slow");
    register(&mut conn, &run, &["a"]).await;
    let relay = start_relay(&redis.url());
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
    let before = relay.memory_kib("VmRSS");

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
            mid = relay.memory_kib("VmRSS");
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
    let after = relay.memory_kib("VmRSS");
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

/// 64 KiB of bytes that are not UTF-8 (sent as base64), different for each `i`.
fn binary_chunk(i: u64) -> Vec<u8> {
    let mut c: Vec<u8> = (0..64 * 1024u64)
        .map(|j| ((i * 31 + j * 7) % 251) as u8)
        .collect();
    c[0] = 0xff;
    c[1..9].copy_from_slice(&i.to_be_bytes());
    c
}

/// Reads one SSE `output` entry of a raw response body; `None` at the end of the stream.
async fn next_output(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut Vec<u8>,
) -> Option<serde_json::Value> {
    loop {
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8(block).unwrap();
            if !text.contains("event: output") {
                continue;
            }
            let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            return Some(serde_json::from_str(data).unwrap());
        }
        buf.extend_from_slice(&body.next().await?.ok()?);
    }
}

#[tokio::test]
async fn binary_output_with_stalled_and_replaying_clients_keeps_relay_memory_bounded() {
    use base64::Engine;
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("r-binary");
    register(&mut conn, &run, &["a"]).await;
    let relay = start_relay(&redis.url());
    let url = format!("{}/api/runs/r-binary/events?channels=output", relay.base);

    // Live clients that read the response head and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let resp = reqwest::get(&url).await.unwrap();
        assert!(resp.status().is_success());
        stalled.push(resp);
    }
    // One live client that keeps up.
    const N: u64 = 1000;
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    let fast_url = url.clone();
    let fast = tokio::spawn(async move {
        let resp = reqwest::get(&fast_url).await.unwrap();
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        for want in 1..=N {
            let j = next_output(&mut body, &mut buf).await.expect("stream open");
            assert_eq!(j["seq"], want, "the live client sees every entry in order");
            seen.store(want, Ordering::SeqCst);
        }
    });
    let base = relay.memory_kib("VmRSS");

    // 1,000 chunks of 64 KiB of binary output (64 MiB), at most 64 entries ahead of the
    // live client.
    let mut p = Producer::new("p");
    for batch in 0..N / 8 {
        let progress_now = progress.clone();
        wait_for("the live client to keep up", WAIT, || {
            let done = progress_now.load(Ordering::SeqCst);
            async move { (done + 64 >= batch * 8).then_some(()) }
        })
        .await;
        let contents: Vec<Vec<u8>> = (1..=8).map(|k| binary_chunk(batch * 8 + k)).collect();
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
    tokio::time::timeout(std::time::Duration::from_secs(180), fast)
        .await
        .expect("the live client keeps up")
        .unwrap();

    // Clients that replay the whole history: four that stall, one that reads all of it.
    for _ in 0..4 {
        let resp = reqwest::get(&url).await.unwrap();
        assert!(resp.status().is_success());
        stalled.push(resp);
    }
    let resp = reqwest::get(&url).await.unwrap();
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    for want in 1..=N {
        let j = next_output(&mut body, &mut buf)
            .await
            .expect("the replaying client's stream stays open");
        assert_eq!(
            j["seq"], want,
            "the replaying client sees every entry in order"
        );
        assert_eq!(j["encoding"], "base64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(j["content"].as_str().unwrap())
            .unwrap();
        assert!(bytes == binary_chunk(want), "entry {want} is byte-exact");
    }
    // Every stalled replaying client has been sent something (it holds what it could not
    // send yet).
    let metrics_url = format!("{}/metrics", relay.base);
    wait_for("the stalled replaying clients to start", WAIT, || {
        let metrics_url = metrics_url.clone();
        async move {
            let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
            let replayed = metric(&text, "agentrun_relay_events_sent_total{source=\"replay\"}");
            (replayed > N + 4).then_some(())
        }
    })
    .await;
    let peak = relay.memory_kib("VmHWM");
    let grown = peak.saturating_sub(base);
    eprintln!(
        "relay RSS: {base} KiB at the start, peak {peak} KiB with 64 MiB of binary output, 6 stalled live and 5 replaying clients"
    );
    // The budgets this test relies on (docs/relay.md, "Memory"): the run's ring holds at
    // most --feed-bytes (8 MiB), replay pages of all connections at most
    // --replay-memory-bytes, each page about --replay-page-bytes (256 KiB); a connection's own
    // buffer is one flush (32 KiB) plus one event.
    assert!(
        grown < 64 * 1024,
        "relay peak RSS grew by {grown} KiB ({base} -> {peak}) for 64 MiB of output"
    );
    drop(stalled);
}

#[tokio::test]
async fn a_stalled_live_consumer_sheds_and_clients_still_get_every_entry_once() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("r-shed");
    register(&mut conn, &run, &["a"]).await;
    let mut config = agentrun_relay::Config::for_redis(redis.url());
    config.pubsub_buffer_bytes = 64 * 1024;
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    let mut sse = SseClient::connect(&relay.events_url("r-shed", "channels=output"), None).await;
    sse.expect("open").await;
    let line = |i: u64| format!("{i:08} {}\n", "x".repeat(1000));
    let mut p = Producer::new("p");
    let first: Vec<String> = (1..=10).map(line).collect();
    p.output(&mut conn, &run, "a", &first).await;
    for want in 1..=10u64 {
        assert_eq!(sse.expect_entry("live entries").await.json()["seq"], want);
    }

    // The relay stops handing announcements to its feeds (as one starved of CPU would) while
    // 400 KiB are announced: far more than its 64 KiB intake.
    relay.state.hub().pause_live_dispatch(true);
    for batch in 0..8u64 {
        let lines: Vec<String> = (11 + batch * 50..11 + (batch + 1) * 50).map(line).collect();
        p.output(&mut conn, &run, "a", &lines).await;
    }
    let metrics = relay.state.metrics().clone();
    wait_for("the relay to shed announcements", WAIT, || {
        let text = metrics.render();
        async move { (metric(&text, "agentrun_relay_live_shed_total") > 0).then_some(()) }
    })
    .await;
    let held = metric(&metrics.render(), "agentrun_relay_pubsub_buffer_bytes");
    assert!(held <= 64 * 1024, "the intake holds {held} bytes");

    // Once it catches up, the client gets every entry once, in order (the shed ones from the
    // stream), and live entries flow again.
    relay.state.hub().pause_live_dispatch(false);
    for want in 11..=410u64 {
        let ev = sse.expect_entry("every entry after the stall").await;
        assert_eq!(ev.json()["seq"], want, "{ev:?}");
    }
    p.output(&mut conn, &run, "a", &[line(411)]).await;
    assert_eq!(sse.expect_entry("live again").await.json()["seq"], 411);
}
