//! Replay benchmark: one SSE client reads a 100 MB run from its first entry to its `end`,
//! first while Redis holds the run, then after Redis has let it go and the relay reads it from
//! its archive (`--archive-url`). Run with `cargo bench -p agentrun-relay --bench replay`.
//!
//! Starts its own `redis-server` (persistence off) and the `agentrun-relay` binary of this
//! build, publishes the run with the protocol's publish function in two shapes (64 KiB chunks,
//! as the entrypoint cuts a fast writer's output, and 1 KiB entries, as a slower agent's
//! lines arrive), archives it with the archiver's own `archive_run` into a temporary folder,
//! deletes every Redis key of the run, and reads it again. Each read checks that the client
//! got every byte, and the same bytes from Redis and from the archive. Events/s and MB/s are
//! what one client receives (it parses every event with the protocol's SSE parser, as the
//! kubectl plugin does).

#[path = "../tests/support/mod.rs"]
mod support;

use agentrun_archiver::ArchiveStore;
use agentrun_archiver::writer::{WriteOptions, archive_run};
use agentrun_protocol::archive::ArchiveRequest;
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{PublishOptions, RunId, RunState, StreamName, Variation};
use std::time::Instant;
use support::{Producer, RelayProcess, SseClient, finish, register};

const TOTAL: usize = 100 * 1000 * 1000;

/// Entry `i` of a run whose entries are `size` bytes: log-like lines, different every entry.
fn entry(i: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 80);
    let mut n = 0;
    while out.len() < size {
        out.extend_from_slice(format!("entry {i} line {n} reading src/main.rs ok\n").as_bytes());
        n += 1;
    }
    out.truncate(size);
    out
}

struct Read {
    events: usize,
    bytes: usize,
    secs: f64,
    digest: u64,
}

/// Reads the run's output from the start to `end` with one client.
async fn replay(base: &str, run: &RunId) -> Read {
    let url = format!("{base}/api/runs/{run}/events?channels=output");
    let started = Instant::now();
    let mut sse = SseClient::connect(&url, None).await;
    let (mut events, mut bytes, mut digest) = (0usize, 0usize, 0xcbf29ce484222325u64);
    loop {
        let Some(ev) = sse.next().await else {
            panic!("the stream of {run} closed before its end event")
        };
        match ev.event.as_str() {
            "output" => {
                let env: serde_json::Value = serde_json::from_str(&ev.data).expect("JSON");
                let content = env["content"].as_str().expect("text content");
                events += 1;
                bytes += content.len();
                // FNV-1a over the bytes, to compare the two reads.
                for b in content.bytes() {
                    digest = (digest ^ u64::from(b)).wrapping_mul(0x100000001b3);
                }
            }
            "end" => break,
            _ => {}
        }
    }
    Read {
        events,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        digest,
    }
}

fn row(shape: &str, source: &str, r: &Read) {
    println!(
        "| {shape} | {source} | {} | {:.1} | {:.2} | {:.0} | {:.0} |",
        r.events,
        r.bytes as f64 / 1e6,
        r.secs,
        r.events as f64 / r.secs,
        r.bytes as f64 / 1e6 / r.secs
    );
}

async fn shape(redis: &RedisServer, name: &str, size: usize) {
    let mut conn = redis.conn().await;
    let run = RunId::new(format!("replay-{size}-{:08x}", rand::random::<u32>())).expect("id");
    register(&mut conn, &run, &["default"]).await;
    // No length cap: the whole 100 MB stays in the stream.
    let mut producer = Producer::with_options(
        "bench",
        PublishOptions {
            max_len: None,
            publish_command: "PUBLISH",
        },
    );
    let stream = StreamName::Output(Variation::default_name());
    let count = TOTAL / size;
    let mut i = 0;
    while i < count {
        let batch: Vec<Vec<u8>> = (i..(i + 64).min(count)).map(|k| entry(k, size)).collect();
        i += batch.len();
        producer
            .publish(
                &mut conn,
                &run,
                &stream,
                agentrun_protocol::EntryType::Output,
                &batch,
            )
            .await
            .expect("publish");
    }
    finish(
        &mut conn,
        &mut producer,
        &run,
        "default",
        RunState::Succeeded,
    )
    .await;

    let dir = tempfile::tempdir().expect("temp dir");
    let store_url = dir.path().to_str().expect("path").to_owned();
    let relay = RelayProcess::start(
        &["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"],
        &["--archive-url", &store_url],
        // The start line ("agentrun-relay serving") is an info line.
        "info",
    );
    let live = replay(&relay.base, &run).await;
    assert_eq!(live.bytes, count * size, "every byte from Redis");
    row(name, "Redis", &live);

    let store = ArchiveStore::from_url(&store_url).expect("store");
    archive_run(
        &conn,
        &store,
        &ArchiveRequest::new(run.clone(), 0, "bench"),
        &WriteOptions::default(),
    )
    .await
    .expect("archive")
    .expect("the run is in Redis");
    let keys = run.all_keys([Variation::default_name()].iter());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let archived = replay(&relay.base, &run).await;
    assert_eq!(
        (archived.events, archived.bytes, archived.digest),
        (live.events, live.bytes, live.digest),
        "the archive replays what Redis did"
    );
    row(name, "archive", &archived);
    relay.stop();
}

fn main() {
    // `cargo test --benches` runs benches in test mode: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let redis = RedisServer::start_with(&["--appendonly", "no", "--maxmemory", "0"]);
        println!("| entries | read from | events | MB | seconds | events/s | MB/s |");
        println!("|---|---|---|---|---|---|---|");
        shape(&redis, "64 KiB", 64 * 1024).await;
        shape(&redis, "1 KiB", 1024).await;
    });
}
