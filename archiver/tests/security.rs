//! The archive under the Redis users of `agentrun_protocol::acl`: the operator user queues a
//! finished run, and the real archiver does all its work as the archiver user, which can
//! touch nothing else.

mod common;

use agentrun_protocol::Variation;
use agentrun_protocol::acl::{
    archiver_user_rules, generate_password, operator_user_rules, set_user,
};
use agentrun_protocol::archive::{self, ArchiveRequest, ArchiveStatus};
use agentrun_protocol::testing::RedisServer;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn the_operator_user_queues_and_the_archiver_user_archives_and_nothing_more() {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let (operator_pw, archiver_pw) = (generate_password(), generate_password());
    set_user(
        &mut admin,
        "agentrun-operator",
        &operator_pw,
        &operator_user_rules(),
    )
    .await
    .unwrap();
    set_user(
        &mut admin,
        "agentrun-archiver",
        &archiver_pw,
        &archiver_user_rules(),
    )
    .await
    .unwrap();
    let run = run_id("acl");
    let seed = Seed::default();
    seed_run(&mut admin, &run, &seed).await;
    let before = snapshot(&mut admin, &run, &seed.variations).await;

    // The operator user: its expiry waits for the archive, and it queues the run.
    let mut operator = redis.conn_as("agentrun-operator", &operator_pw).await;
    let keys = run.all_keys([Variation::default_name()].iter());
    assert!(
        !archive::expire_unless_archiving(&mut operator, &run, &keys, 60)
            .await
            .unwrap()
    );
    let request = ArchiveRequest::new(run.clone(), 60, "operator");
    assert!(
        archive::enqueue_if_pending(&mut operator, &request)
            .await
            .unwrap()
    );
    assert!(
        !archive::enqueue_if_pending(&mut operator, &request)
            .await
            .unwrap(),
        "queued once"
    );

    // The real archiver, as the archiver user only.
    let store = Store::fs();
    let _archiver = archiver(
        &redis,
        &store,
        "acl",
        &[
            "--redis-username",
            "agentrun-archiver",
            "--redis-password",
            &archiver_pw,
        ],
    );
    wait_for_archive_status(
        &admin,
        &run,
        ArchiveStatus::Complete,
        Duration::from_secs(60),
    )
    .await;
    let reader = agentrun_archiver::ArchiveReader::open(&store.open(), &run)
        .await
        .unwrap()
        .unwrap();
    for (stream, entries) in &before {
        let got: Vec<_> = futures::TryStreamExt::try_collect(reader.read_from(stream, 0))
            .await
            .unwrap();
        assert_eq!(&got, entries, "{stream:?}");
    }
    let t = ttl(&mut admin, &run.state_key()).await;
    assert!(
        (1..=60).contains(&t),
        "the archiver put the retention TTL: {t}"
    );
    queue_drained(&admin).await;

    // And nothing beyond its work.
    let mut archiver_conn = redis.conn_as("agentrun-archiver", &archiver_pw).await;
    for (what, cmd) in [
        ("FLUSHALL", redis::cmd("FLUSHALL")),
        ("CONFIG SET", {
            let mut c = redis::cmd("CONFIG");
            c.arg("SET").arg("maxmemory").arg("1");
            c
        }),
        ("ACL SETUSER", {
            let mut c = redis::cmd("ACL");
            c.arg("SETUSER").arg("x");
            c
        }),
        ("SET outside agentrun's keys", {
            let mut c = redis::cmd("SET");
            c.arg("other").arg("1");
            c
        }),
        ("DEL of a run key", {
            let mut c = redis::cmd("DEL");
            c.arg(run.state_key());
            c
        }),
        ("PUBLISH", {
            let mut c = redis::cmd("PUBLISH");
            c.arg(format!("run:{{{run}}}:output:default")).arg("x");
            c
        }),
    ] {
        let r: Result<redis::Value, _> = cmd.query_async(&mut archiver_conn).await;
        let err = r.expect_err(&format!("{what} must be refused"));
        assert!(
            err.to_string().contains("NOPERM") || err.to_string().contains("no permissions"),
            "{what}: {err}"
        );
    }
}
