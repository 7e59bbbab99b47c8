//! Sentinel mode against real processes: a master, one replica and one Sentinel on loopback.
//! After `SENTINEL FAILOVER` the old master becomes a read-only replica; a `RedisConn` from
//! `connect()` must find the new master by itself.

use agentrun_protocol::RedisSettings;
use agentrun_protocol::testing::{RedisServer, Sentinel, direct, info_replication, wait_for};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_master_after_a_sentinel_failover() {
    let master = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    wait_for("the replica to sync", Duration::from_secs(10), || async {
        info_replication(replica.port())
            .await
            .contains("master_link_status:up")
            .then_some(())
    })
    .await;

    let sentinel = Sentinel::start(master.port());
    // The Sentinel must know the replica, connected and in sync, before it can fail over.
    wait_for(
        "the sentinel to know the replica",
        Duration::from_secs(10),
        || async {
            let replicas: Vec<HashMap<String, String>> =
                sentinel.command(&["REPLICAS", "mymaster"]).await?;
            replicas
                .iter()
                .any(|r| {
                    r.get("port") == Some(&replica.port().to_string())
                        && r.get("flags").map(String::as_str) == Some("slave")
                        && r.get("master-link-status").map(String::as_str) == Some("ok")
                })
                .then_some(())
        },
    )
    .await;

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
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica has the writes before the failover");

    let mut clone = conn.clone();

    wait_for(
        "SENTINEL FAILOVER to be accepted",
        Duration::from_secs(15),
        || async {
            let ok: String = sentinel.command(&["FAILOVER", "mymaster"]).await?;
            (ok == "OK").then_some(())
        },
    )
    .await;
    wait_for(
        "the sentinel to report the replica as the new master",
        Duration::from_secs(20),
        || async {
            let (_, port): (String, u16) = sentinel
                .command(&["GET-MASTER-ADDR-BY-NAME", "mymaster"])
                .await?;
            (port == replica.port()).then_some(())
        },
    )
    .await;

    // Until the Sentinel demotes the old master it still takes writes (and loses them: Redis
    // replication is asynchronous); the question is what happens once it is a replica.
    wait_for(
        "the old master to become a replica",
        Duration::from_secs(40),
        || async {
            info_replication(master.port())
                .await
                .contains("role:slave")
                .then_some(())
        },
    )
    .await;

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
