//! The protocol on a real Redis Cluster (3 masters, 3 replicas): the publish function and its
//! missing-library fallback through the cluster client, and sharded subscriptions across a
//! failover (see docs/scaling.md).

use agentrun_protocol::testing::{RedisCluster, SlotRange, direct, wait_for};
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RunId, StreamName, Variation, live,
};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

fn publisher() -> Publisher {
    Publisher::new(PublishOptions {
        publish_command: "SPUBLISH",
        ..PublishOptions::default()
    })
}

fn entry(pseq: u64) -> NewEntry {
    NewEntry {
        pseq,
        ts: 1000 + pseq,
        kind: EntryType::Output,
        content: Bytes::from(format!("entry {pseq}")),
        meta: None,
    }
}

fn output() -> StreamName {
    StreamName::Output(Variation::default_name())
}

async fn has_library(port: u16) -> bool {
    let Some(mut c) = direct(port).await else {
        return false;
    };
    let libs: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(agentrun_protocol::functions::LIBRARY_NAME)
        .query_async(&mut c)
        .await
        .unwrap();
    matches!(libs, redis::Value::Array(a) if !a.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_library_is_loaded_on_every_master_by_the_first_publish_through_the_cluster_client()
 {
    let cluster = RedisCluster::start(3, 1).await;
    let masters = cluster.masters().await;
    for &m in &masters {
        assert!(!has_library(m).await, "a new node has no functions");
    }
    let mut conn = cluster.settings().connect().await.unwrap();
    let ranges = RedisCluster::slot_ranges(masters[0]).await;
    let mut published_on = std::collections::BTreeSet::new();
    let mut i = 0;
    while published_on.len() < masters.len() {
        i += 1;
        let run = RunId::new(format!("fallback-{i}")).unwrap();
        let master = SlotRange::serving(&ranges, cluster.slot_of(&run.state_key()).await).master;
        if published_on.contains(&master) {
            continue;
        }
        let out = publisher()
            .publish_one(&mut conn, &run, &output(), "p", &entry(1))
            .await
            .unwrap_or_else(|e| panic!("publish on the master {master}: {e}"));
        assert_eq!((out.last_seq, out.appended), (1, 1));
        published_on.insert(master);
        if published_on.len() == 1 {
            // FUNCTION LOAD through the cluster client goes to every master.
            for &m in &masters {
                assert!(has_library(m).await, "master {m} has the library");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_subscription_hears_every_announcement_and_ends_when_its_slot_moves() {
    let cluster = RedisCluster::start(3, 1).await;
    let settings = cluster.settings();
    let mut conn = settings.connect().await.unwrap();
    let run = RunId::new(format!("sharded-{:08x}", rand::random::<u32>())).unwrap();
    let key = output().key(&run);
    let slot = cluster.slot_of(&key).await;
    let (_, replica) = cluster.master_and_synced_replica(slot).await;

    let mut messages = settings.subscribe(&key).await.unwrap();
    let batch: Vec<NewEntry> = (1..=3).map(entry).collect();
    publisher()
        .publish(
            &mut conn,
            &run,
            agentrun_protocol::publish::Batch {
                stream: &output(),
                producer: "p",
                entries: &batch,
            },
        )
        .await
        .unwrap();
    for want in &batch {
        let payload = tokio::time::timeout(DEADLINE, messages.next())
            .await
            .expect("an announcement")
            .expect("the subscription is open");
        let got = live::decode(&payload).unwrap();
        assert_eq!((got.seq, &got.content), (want.pseq, &want.content));
    }

    // The slot moves to the replica: the old master drops the subscription and says so.
    cluster.fail_over_to(replica, slot).await;
    let ended = tokio::time::timeout(DEADLINE, messages.next())
        .await
        .expect("the subscription ends when its slot moves");
    assert!(ended.is_none(), "no message was published: {ended:?}");

    // Subscribing again reaches the new master.
    let mut messages = settings.subscribe(&key).await.unwrap();
    let out = wait_for("a publish on the new master", DEADLINE, || {
        let mut conn = conn.clone();
        let run = run.clone();
        async move {
            publisher()
                .publish_one(&mut conn, &run, &output(), "p", &entry(4))
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(out.last_seq, 4);
    let payload = tokio::time::timeout(DEADLINE, messages.next())
        .await
        .expect("an announcement from the new master")
        .expect("the subscription is open");
    assert_eq!(live::decode(&payload).unwrap().seq, 4);
}
