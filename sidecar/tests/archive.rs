//! `agentrun-sidecar run --archive`: a run without an operator is put on the archive queue
//! when it ends, and no TTL is put on its keys until the archiver has archived it.

mod common;

use agentrun_protocol::archive::{ARCHIVE_QUEUE_KEY, ArchiveRequest, ArchiveStatus, status};
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{RedisConn, RunId, Variation};
use common::*;
use std::collections::HashMap;

async fn ttls(conn: &mut RedisConn, run: &RunId) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for key in run.all_keys([Variation::default_name()].iter()) {
        let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(conn).await.unwrap();
        out.push((key, ttl));
    }
    out
}

#[tokio::test]
async fn an_archived_run_is_queued_when_it_ends_and_keeps_its_keys_until_archived() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("archived");
    let out = output_of(&mut sidecar_run_with(
        &redis,
        &run,
        &["--archive", "--retention-seconds", "120"],
        &["sh", "-c", "echo hello"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        status(&mut conn, &run).await.unwrap(),
        Some(ArchiveStatus::Queued)
    );
    let queued: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(ARCHIVE_QUEUE_KEY)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued.len(), 1, "queued once: {queued:?}");
    let request = ArchiveRequest::from_fields(&queued[0].1).unwrap();
    assert_eq!(request.run, run);
    assert_eq!(request.retention_seconds, 120);
    assert_eq!(request.source, "sidecar");
    for (key, ttl) in ttls(&mut conn, &run).await {
        assert!(
            ttl != 0 && ttl < 0,
            "{key} has a TTL ({ttl}) before its archive"
        );
    }
}

#[tokio::test]
async fn without_archiving_the_run_expires_as_before() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("plain");
    let out = output_of(&mut sidecar_run_with(
        &redis,
        &run,
        &["--retention-seconds", "120"],
        &["sh", "-c", "echo hello"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&mut conn, &run).await.unwrap(), None);
    let queued: u64 = redis::cmd("XLEN")
        .arg(ARCHIVE_QUEUE_KEY)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued, 0);
    let ttls = ttls(&mut conn, &run).await;
    let state = &ttls[0];
    assert!((1..=120).contains(&state.1), "{ttls:?}");
}
