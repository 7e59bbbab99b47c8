//! Sentinel mode against real processes: a master, one replica and one Sentinel on loopback.
//! After `SENTINEL FAILOVER` the old master becomes a read-only replica; a `RedisConn` from
//! `connect()` must find the new master by itself.

use agentrun_protocol::RedisSettings;
use agentrun_protocol::testing::{RedisServer, Sentinel, assert_replicated, direct, wait_for_role};
use redis::AsyncCommands;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_master_after_a_sentinel_failover() {
    let master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port()).await;

    let sentinel = Sentinel::start(master.port());
    // The Sentinel must know the replica, connected and in sync, before it can fail over.
    sentinel.wait_for_replica(replica.port()).await;

    let settings = RedisSettings::from_url(&format!(
        "redis+sentinel://127.0.0.1:{}/mymaster",
        sentinel.port
    ))
    .unwrap();
    let mut conn = settings
        .connect()
        .await
        .expect("connect through the sentinel");
    let id: String = conn.xadd("s", "*", &[("k", "before")]).await.unwrap();
    assert!(!id.is_empty());
    let () = conn.set("key", "before").await.unwrap();
    // Replication is asynchronous: the failover may only be asked for once the replica has
    // these writes (this test is about where writes go, not about what a failover can lose).
    assert_replicated(&mut conn).await;

    let mut clone = conn.clone();

    sentinel.failover_to(replica.port()).await;

    // Until the Sentinel demotes the old master it still takes writes (and loses them: Redis
    // replication is asynchronous); the question is what happens once it is a replica.
    wait_for_role(master.port(), "slave", Duration::from_secs(40)).await;

    // The same connection: writes fail for a moment at most, then reach the new master.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let value = format!("after-{attempt}");
        match conn.set::<_, _, ()>("key", &value).await {
            Ok(()) => {
                let mut new_master = direct(replica.port()).await.expect("new master");
                let seen: String = new_master.get("key").await.unwrap();
                assert_eq!(seen, value, "the write must land on the new master");
                break;
            }
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "writes through the RedisConn still fail 15 s after the failover ({attempt} tries): {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id: String = conn.xadd("s", "*", &[("k", "after")]).await.unwrap();
    assert!(!id.is_empty());
    let mut new_master = direct(replica.port()).await.expect("new master");
    let len: usize = new_master.xlen("s").await.unwrap();
    assert_eq!(len, 2, "the stream on the new master has both entries");

    // A clone made before the failover shares the re-resolved master.
    let () = clone.set("key2", "x").await.unwrap();

    // A fresh Pub/Sub connection goes to the new master too.
    let mut pubsub = settings.pubsub().await.expect("pubsub after failover");
    pubsub.subscribe("ch").await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg(&["LIST", "TYPE", "pubsub"])
        .query_async(&mut direct(replica.port()).await.unwrap())
        .await
        .unwrap();
    assert!(
        clients.contains("sub=1"),
        "the new master holds the subscription: {clients}"
    );
}
