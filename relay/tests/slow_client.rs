//! Slow clients do not grow the relay: the relay binary runs as its own process, stalled
//! clients hold connections open while 50 MB flow through a run, and the relay's resident
//! memory stays bounded; a stalled client that resumes reading gets everything, from replay.
//! Binary output in 64 KiB chunks, with stalled and replaying clients, stays within the
//! relay's byte budgets; and a relay that falls behind its Pub/Sub connection sheds live
//! announcements instead of queueing them, while its clients still get every entry once.

mod support;

use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_protocol::{EntryType, RedisConn, RunId, StreamName};
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

/// `n` clients of `url` that read the response head and then nothing.
async fn stalled_clients(url: &str, n: usize) -> Vec<reqwest::Response> {
    let mut stalled = Vec::new();
    for _ in 0..n {
        let resp = reqwest::get(url).await.unwrap();
        assert!(resp.status().is_success());
        stalled.push(resp);
    }
    stalled
}

/// A client of `url` that reads `n` entries in order; the counter says how far it got.
fn keeping_up(url: String, n: u64) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    let task = tokio::spawn(async move {
        let mut sse = SseClient::connect(&url, None).await;
        expect_in_order(&mut sse, n, "a client that keeps up", |seq, _| {
            seen.store(seq, Ordering::SeqCst)
        })
        .await;
    });
    (task, progress)
}

/// Reads `output` entries 1..=n, each once and in order, calling `each` with every `seq` and
/// entry.
async fn expect_in_order(
    sse: &mut SseClient,
    n: u64,
    who: &str,
    mut each: impl FnMut(u64, &serde_json::Value),
) {
    for seq in 1..=n {
        let ev = sse.expect_entry(who).await;
        assert_eq!(ev.event, "output", "{who}");
        let entry = ev.json();
        assert_eq!(entry["seq"], seq, "{who} sees every entry in order");
        each(seq, &entry);
    }
}

/// A Redis, a run `name` with variation `a`, the relay binary, and the URL of the run's output.
async fn one_run(name: &str) -> (RedisServer, RedisConn, RunId, RelayProcess, String) {
    let (redis, conn, run) = redis_with_run(name, &["a"]).await;
    let relay = start_relay(&redis.url());
    let url = format!("{}/api/runs/{name}/events?channels=output", relay.base);
    (redis, conn, run, relay, url)
}

/// Waits until a client has read entry `seq` (its progress counter).
async fn read_up_to(progress: &Arc<AtomicU64>, seq: u64) {
    wait_for("the client that keeps up", WAIT, || {
        let done = progress.load(Ordering::SeqCst);
        async move { (done >= seq).then_some(()) }
    })
    .await;
}

/// Publishes output chunks to variation `a`.
async fn publish_output(p: &mut Producer, conn: &mut RedisConn, run: &RunId, chunks: &[Vec<u8>]) {
    p.publish(
        conn,
        run,
        &StreamName::Output(var("a")),
        EntryType::Output,
        chunks,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn stalled_clients_do_not_grow_relay_memory() {
    let (_redis, mut conn, run, relay, url) = one_run("r-slow").await;

    // Twenty clients that read the response head and then nothing, one that keeps up.
    let mut stalled = stalled_clients(&url, 20).await;
    const N: u64 = 50_000;
    let (fast, progress) = keeping_up(url.clone(), N);
    let before = relay.memory_kib("VmRSS");

    // 50,000 entries of 1 KiB.
    let mut p = Producer::new("p");
    let chunk = vec![b'x'; 1023];
    let mut mid = 0;
    for batch in 0..(N / 500) {
        // Publish at the pace the fast client reads (at most 2,000 entries ahead): this test is
        // about slow clients, not about a producer that outruns the relay's CPU.
        let lead = if batch == N / 1000 { 0 } else { 2_000 };
        read_up_to(&progress, (batch * 500).saturating_sub(lead)).await;
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
        publish_output(&mut p, &mut conn, &run, &contents).await;
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
    let mut resumed = SseClient::from_response(stalled.pop().unwrap());
    expect_in_order(&mut resumed, N, "the resumed client", |_, _| {}).await;
    assert!(
        relay_metric(&relay.base, "agentrun_relay_slow_client_fallbacks_total").await >= 1,
        "the resumed client fell back to replay"
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

#[tokio::test]
async fn binary_output_with_stalled_and_replaying_clients_keeps_relay_memory_bounded() {
    use base64::Engine;
    let (_redis, mut conn, run, relay, url) = one_run("r-binary").await;

    // Live clients that read the response head and then nothing, one that keeps up.
    let mut stalled = stalled_clients(&url, 6).await;
    const N: u64 = 1000;
    let (fast, progress) = keeping_up(url.clone(), N);
    let base = relay.memory_kib("VmRSS");

    // 1,000 chunks of 64 KiB of binary output (64 MiB), at most 64 entries ahead of the
    // live client.
    let mut p = Producer::new("p");
    for batch in 0..N / 8 {
        read_up_to(&progress, (batch * 8).saturating_sub(64)).await;
        let contents: Vec<Vec<u8>> = (1..=8).map(|k| binary_chunk(batch * 8 + k)).collect();
        publish_output(&mut p, &mut conn, &run, &contents).await;
    }
    tokio::time::timeout(std::time::Duration::from_secs(180), fast)
        .await
        .expect("the live client keeps up")
        .unwrap();

    // Clients that replay the whole history: four that stall, one that reads all of it.
    stalled.extend(stalled_clients(&url, 4).await);
    let mut replaying = SseClient::connect(&url, None).await;
    expect_in_order(&mut replaying, N, "the replaying client", |seq, entry| {
        assert_eq!(entry["encoding"], "base64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(entry["content"].as_str().unwrap())
            .unwrap();
        assert!(bytes == binary_chunk(seq), "entry {seq} is byte-exact");
    })
    .await;
    // Every stalled replaying client has been sent something (it holds what it could not
    // send yet).
    let base_url = relay.base.clone();
    wait_for("the stalled replaying clients to start", WAIT, || {
        let base_url = base_url.clone();
        async move {
            let replayed = relay_metric(
                &base_url,
                "agentrun_relay_events_sent_total{source=\"replay\"}",
            )
            .await;
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
    let (redis, mut conn, run) = redis_with_run("r-shed", &["a"]).await;
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
