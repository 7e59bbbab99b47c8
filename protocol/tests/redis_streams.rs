//! The publish and replay primitives against a real Redis.

use agentrun_protocol::entry::LiveMessage;
use agentrun_protocol::publish::{Batch, register_run};
use agentrun_protocol::replay::{last_seq, read_page};
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RunId, StreamName, Variation,
};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

fn entry(pseq: u64, content: &[u8]) -> NewEntry {
    NewEntry {
        pseq,
        ts: 1000 + pseq,
        kind: EntryType::Output,
        content: Bytes::copy_from_slice(content),
        meta: None,
    }
}

#[tokio::test]
async fn publish_appends_announces_and_deduplicates() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t1").unwrap();
    let stream = StreamName::Output(Variation::default_name());
    let key = stream.key(&run);

    let mut pubsub = redis.settings().pubsub().await.unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let mut live = pubsub.into_on_message();

    let publisher = Publisher::new(PublishOptions::default());
    let first = [entry(1, b"a\n"), entry(2, b"\xff\x00binary"), entry(3, b"")];
    let out = publisher
        .publish(
            &mut conn,
            &run,
            Batch {
                stream: &stream,
                producer: "p1",
                entries: &first,
            },
        )
        .await
        .unwrap();
    assert_eq!((out.last_seq, out.appended, out.applied_pseq), (3, 3, 3));

    // A re-send of 2..=4 only appends 4.
    let resend = [entry(2, b"\xff\x00binary"), entry(3, b""), entry(4, b"d")];
    let out = publisher
        .publish(
            &mut conn,
            &run,
            Batch {
                stream: &stream,
                producer: "p1",
                entries: &resend,
            },
        )
        .await
        .unwrap();
    assert_eq!((out.last_seq, out.appended), (4, 1));

    // Another producer on the same stream continues the stream's own sequence.
    let other = [entry(1, b"from p2")];
    let out = publisher
        .publish(
            &mut conn,
            &run,
            Batch {
                stream: &stream,
                producer: "p2",
                entries: &other,
            },
        )
        .await
        .unwrap();
    assert_eq!(out.last_seq, 5);

    let page = read_page(&mut conn, &key, 0, 100).await.unwrap();
    let contents: Vec<&[u8]> = page.entries.iter().map(|e| e.content.as_ref()).collect();
    assert_eq!(
        contents,
        vec![&b"a\n"[..], b"\xff\x00binary", b"", b"d", b"from p2"]
    );
    assert_eq!(
        page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(page.trimmed.is_none());
    assert_eq!(last_seq(&mut conn, &key).await.unwrap(), 5);

    // Pages continue from a cursor.
    let page = read_page(&mut conn, &key, 3, 1).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].seq, 4);

    // Live messages carry the same entries, in order, once each.
    for want in 1..=5u64 {
        let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .unwrap();
        let got = LiveMessage::decode(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
        assert_eq!(got.seq, want);
    }
}

#[tokio::test]
async fn trimmed_history_is_reported() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t2").unwrap();
    let stream = StreamName::Status;
    let publisher = Publisher::new(PublishOptions {
        max_len: Some(10),
        ..Default::default()
    });
    let entries: Vec<NewEntry> = (1..=500).map(|i| entry(i, b"x")).collect();
    publisher
        .publish(
            &mut conn,
            &run,
            Batch {
                stream: &stream,
                producer: "p",
                entries: &entries,
            },
        )
        .await
        .unwrap();
    let page = read_page(&mut conn, &stream.key(&run), 5, 1000)
        .await
        .unwrap();
    let trimmed = page.trimmed.expect("trim must be reported");
    assert_eq!(trimmed.wanted, 6);
    assert!(
        trimmed.first_available > 6 && trimmed.first_available <= 491,
        "{trimmed:?}"
    );
    assert_eq!(page.entries.last().unwrap().seq, 500);
}

#[tokio::test]
async fn runs_are_registered_once() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t3").unwrap();
    register_run(&mut conn, &run, 111, &[("name", "hello".into())])
        .await
        .unwrap();
    register_run(&mut conn, &run, 222, &[]).await.unwrap();
    let score: u64 = redis::cmd("ZSCORE")
        .arg("agentrun:runs")
        .arg("t3")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(score, 111);
    let name: String = redis::cmd("HGET")
        .arg(run.state_key())
        .arg("name")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "hello");
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    let port = agentrun_protocol::testing::free_port();
    let settings =
        agentrun_protocol::RedisSettings::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), settings.connect())
        .await
        .expect("no hang")
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

#[tokio::test]
async fn the_phase_is_settled_from_every_declared_variation() {
    use agentrun_protocol::publish::{add_variation, set_state, settle_phase};
    use agentrun_protocol::{RunState, StatusEvent};
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("multi").unwrap();
    let (a, b) = (Variation::new("a").unwrap(), Variation::new("b").unwrap());
    add_variation(&mut conn, &run, &a).await.unwrap();
    add_variation(&mut conn, &run, &b).await.unwrap();
    add_variation(&mut conn, &run, &a).await.unwrap();
    let declared: String = redis::cmd("HGET")
        .arg(run.state_key())
        .arg("variations")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(declared, "a,b");
    let set = |v: &str, s: RunState| {
        (
            format!("var:{v}"),
            String::from_utf8(StatusEvent::new(Some(v), s).to_json()).unwrap(),
        )
    };
    async fn apply(
        conn: &mut agentrun_protocol::RedisConn,
        run: &RunId,
        field: (String, String),
    ) -> Option<RunState> {
        set_state(conn, run, &[(field.0.as_str(), field.1)])
            .await
            .unwrap();
        settle_phase(conn, run, 42).await.unwrap()
    }
    assert_eq!(
        apply(&mut conn, &run, set("a", RunState::Running)).await,
        Some(RunState::Running)
    );
    // One variation done is not the run done.
    assert_eq!(
        apply(&mut conn, &run, set("a", RunState::Succeeded)).await,
        Some(RunState::Pending)
    );
    assert_eq!(
        apply(&mut conn, &run, set("b", RunState::Paused)).await,
        Some(RunState::Paused)
    );
    assert_eq!(
        apply(&mut conn, &run, set("b", RunState::Failed)).await,
        Some(RunState::Failed)
    );
    let ended: u64 = redis::cmd("HGET")
        .arg(run.state_key())
        .arg("ended")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ended, 42);
    assert_eq!(
        apply(&mut conn, &run, set("b", RunState::Stopped)).await,
        Some(RunState::Stopped)
    );
    assert_eq!(
        apply(&mut conn, &run, set("b", RunState::Succeeded)).await,
        Some(RunState::Succeeded)
    );
}
