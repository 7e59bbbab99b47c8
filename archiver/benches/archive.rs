//! Archive benchmark: a 100 MB run from Redis to the filesystem store, and back out of the
//! archive. Run with `cargo bench -p agentrun-archiver --bench archive`.
//!
//! Starts its own `redis-server` (persistence off) on a free port, publishes a run of 100 MB
//! of output (64 KiB chunks, as the entrypoint cuts a fast writer's output) with the
//! protocol's publish script, then times `writer::archive_run` (read every stream with
//! XRANGE pages, compress, upload, index, manifest) into a temporary folder, best of three,
//! and reads the whole output back through `ArchiveReader::read_from`, checking the bytes.
//! Two kinds of output: log-like text (what agents print) and random bytes (incompressible,
//! the worst case for the compressor and the disk).

#[path = "../tests/common/mod.rs"]
mod common;

use agentrun_archiver::writer::{WriteOptions, archive_run};
use agentrun_archiver::{ArchiveReader, ArchiveStore};
use agentrun_protocol::archive::ArchiveRequest;
use agentrun_protocol::publish::{Batch, register_run};
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RunId, StreamName, Variation, now_ms,
};
use bytes::Bytes;
use futures::TryStreamExt;
use std::time::Instant;

const TOTAL: usize = 100 * 1000 * 1000;
const CHUNK: usize = 64 * 1024;

/// `len` bytes of log-like text: timestamps, levels, counters and words, one line at a time.
fn text(seed: usize, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "reading",
        "file",
        "src/main.rs",
        "tests",
        "passed",
        "compiling",
        "agent",
        "tool",
        "call",
        "result",
        "tokens",
        "ok",
    ];
    let mut out = Vec::with_capacity(len + 200);
    let mut i = (seed as u64).wrapping_mul(7919);
    while out.len() < len {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let line = format!(
            "2026-12-01T06:{:02}:{:02}.{:03}Z INFO step={} {} {} {} latency_ms={}\n",
            (i >> 8) % 60,
            (i >> 16) % 60,
            (i >> 24) % 1000,
            i % 100_000,
            WORDS[((i >> 32) % 12) as usize],
            WORDS[((i >> 36) % 12) as usize],
            WORDS[((i >> 40) % 12) as usize],
            (i >> 44) % 5000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

/// `len` random bytes (the tests' incompressible noise).
fn random(seed: usize, len: usize) -> Vec<u8> {
    common::noise(seed as u64, len)
}

async fn seed(redis: &RedisServer, run: &RunId, make: fn(usize, usize) -> Vec<u8>) {
    let mut conn = redis.conn().await;
    register_run(
        &mut conn,
        run,
        now_ms(),
        &[(agentrun_protocol::state_hash::VARIATIONS, "default".into())],
    )
    .await
    .expect("register");
    let publisher = Publisher::new(PublishOptions {
        max_len: None,
        publish_command: "PUBLISH",
    });
    let stream = StreamName::Output(Variation::default_name());
    let chunks: Vec<usize> = (0..TOTAL / CHUNK).collect();
    let mut pseq = 0;
    for batch in chunks.chunks(16) {
        let entries: Vec<NewEntry> = batch
            .iter()
            .map(|i| {
                pseq += 1;
                NewEntry {
                    pseq,
                    ts: now_ms(),
                    kind: EntryType::Output,
                    content: Bytes::from(make(*i, CHUNK)),
                    meta: None,
                }
            })
            .collect();
        publisher
            .publish(
                &mut conn,
                run,
                Batch {
                    stream: &stream,
                    producer: "bench",
                    entries: &entries,
                },
            )
            .await
            .expect("publish");
    }
}

async fn bench_kind(redis: &RedisServer, kind: &str, make: fn(usize, usize) -> Vec<u8>) {
    let run = RunId::new(format!("bench-{kind}-{:08x}", rand::random::<u32>())).expect("id");
    seed(redis, &run, make).await;
    let conn = redis.conn().await;
    let request = ArchiveRequest::new(run.clone(), 0, "bench");
    let mut best = f64::MAX;
    let mut stored = 0;
    let mut content = 0;
    let mut keep = None;
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ArchiveStore::from_url(dir.path().to_str().expect("path")).expect("store");
        let started = Instant::now();
        let done = archive_run(&conn, &store, &request, &WriteOptions::default())
            .await
            .expect("archive")
            .expect("the run is in Redis");
        best = best.min(started.elapsed().as_secs_f64());
        stored = done.data_bytes;
        content = done.content_bytes;
        keep = Some((dir, store));
    }
    println!(
        "archive, {kind}: {:.1} MB of content in {:.3} s = {:.0} MB/s from Redis to the filesystem store; stored {:.1} MB ({:.1}x smaller)",
        content as f64 / 1e6,
        best,
        content as f64 / 1e6 / best,
        stored as f64 / 1e6,
        content as f64 / stored.max(1) as f64
    );
    let (_dir, store) = keep.expect("archived");
    let reader = ArchiveReader::open(&store, &run)
        .await
        .expect("open")
        .expect("manifest");
    let output = StreamName::Output(Variation::default_name());
    let started = Instant::now();
    let entries: Vec<_> = reader
        .read_from(&output, 0)
        .try_collect()
        .await
        .expect("read");
    let secs = started.elapsed().as_secs_f64();
    let bytes: usize = entries.iter().map(|e| e.content.len()).sum();
    assert_eq!(bytes as u64, content, "every byte reads back");
    for (i, e) in entries.iter().enumerate().step_by(97) {
        assert_eq!(
            e.content.as_ref(),
            make(i, CHUNK).as_slice(),
            "entry {i} byte-exact"
        );
    }
    println!(
        "read back, {kind}: {} entries, {:.1} MB in {:.3} s = {:.0} MB/s, {:.0} entries/s",
        entries.len(),
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e6 / secs,
        entries.len() as f64 / secs
    );
}

async fn bench() {
    let redis = RedisServer::start_with(&["--appendonly", "no", "--maxmemory", "0"]);
    bench_kind(&redis, "text", text).await;
    bench_kind(&redis, "random", random).await;
}

fn main() {
    // `cargo test --benches` runs benches in test mode: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(bench());
}
