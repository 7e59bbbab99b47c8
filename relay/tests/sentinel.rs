//! The relay behind Redis Sentinel: when the master dies and Sentinel promotes its replica,
//! the relay finds the new master by itself, subscribes there again, and its clients get every
//! entry once, in order: those published before the failover, and those published on the new
//! master (live, or replayed from the stream if they came before the relay had subscribed).

mod support;

use agentrun_protocol::testing::{
    RedisServer, SENTINEL_MASTER, Sentinel, assert_replicated, wait_for_role,
};
use agentrun_relay::Config;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_nothing_and_repeats_nothing() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port()).await;
    let sentinel = Sentinel::start(master.port());
    sentinel.wait_for_replica(replica.port()).await;

    let url = format!(
        "redis+sentinel://127.0.0.1:{}/{SENTINEL_MASTER}",
        sentinel.port
    );
    let mut conn = sentinel
        .settings()
        .connect()
        .await
        .expect("connect through Sentinel");
    let run = run_id("r-sentinel");
    register(&mut conn, &run, &["a"]).await;
    let relay = Relay::start_with(Config::for_redis(&url), "127.0.0.1:0").await;
    let mut sse =
        SseClient::connect(&relay.events_url("r-sentinel", "channels=output"), None).await;
    sse.expect("open").await;

    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=50, "before"))
        .await;
    let mut seen = Vec::new();
    sse.collect_seqs(&mut seen, 50, "before the failover").await;
    // What the master acknowledged has reached the replica (replication is asynchronous; this
    // test is about where the relay reads after a failover, not what a failover can lose).
    assert_replicated(&mut conn).await;

    // The master dies; Sentinel finds it down and promotes the replica.
    master.kill();
    sentinel
        .wait_for_master(replica.port(), Duration::from_secs(30))
        .await;
    wait_for_role(replica.port(), "master", Duration::from_secs(30)).await;

    // The producer writes on the new master (its connection follows Sentinel too).
    p.output_when_redis_takes_it(&conn, &run, "a", &tagged_lines(51..=150, "after"))
        .await;
    sse.collect_seqs(&mut seen, 150, "after the failover").await;
    assert_eq!(seen, (1..=150u64).collect::<Vec<_>>());
    let reconnects = relay_metric(&relay.base, "agentrun_relay_redis_reconnects_total").await;
    assert!(
        reconnects >= 1,
        "the relay's subscription moved to the new master"
    );
    relay.shutdown().await;
}
