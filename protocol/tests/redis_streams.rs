//! The publish and replay primitives against a real Redis.

use agentrun_protocol::live;
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
        let got = live::decode(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
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

/// Sequence numbers go on from the top the producers hash keeps for the stream, not from its
/// newest entry: a stream emptied by hand (`XTRIM MAXLEN 0`, `XDEL` of its newest entries)
/// keeps counting, so a number is never given to two entries and readers are told what went.
/// A kept top that is missing (a stream written before it was kept) or behind the stream
/// (changed by hand) gives way to the stream's newest entry.
#[tokio::test]
async fn a_stream_emptied_by_hand_keeps_counting() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t-emptied").unwrap();
    let stream = StreamName::Output(Variation::default_name());
    let key = stream.key(&run);
    let mut publishing = conn.clone();
    let mut publish = async |entries: Vec<NewEntry>| {
        publish_expecting(
            &mut publishing,
            &run,
            &stream,
            "p",
            &entries,
            Default::default(),
        )
        .await
    };
    assert_eq!(
        publish((1..=3).map(|i| entry(i, b"a")).collect())
            .await
            .last_seq,
        3
    );

    let _: () = redis::cmd("XDEL")
        .arg(&key)
        .arg("0-3")
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = publish(vec![entry(4, b"after xdel")]).await;
    assert_eq!((out.last_seq, out.appended), (4, 1));

    let _: () = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = publish(vec![entry(5, b"after xtrim"), entry(6, b"and one more")]).await;
    assert_eq!((out.last_seq, out.appended, out.applied_pseq), (6, 2, 6));

    let page = read_page(&mut conn, &key, 2, 100).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [5, 6]);
    assert_eq!(page.entries[0].content.as_ref(), b"after xtrim");
    let trimmed = page.trimmed.expect("the entries that went are reported");
    assert_eq!((trimmed.wanted, trimmed.first_available), (3, 5));

    let _: () = redis::cmd("HDEL")
        .arg(run.producers_key())
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(publish(vec![entry(7, b"no kept top")]).await.last_seq, 7);
    let _: () = redis::cmd("HSET")
        .arg(run.producers_key())
        .arg(&key)
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        publish(vec![entry(8, b"kept top behind")]).await.last_seq,
        8
    );
    let all = read_page(&mut conn, &key, 0, 100).await.unwrap();
    let seqs: Vec<u64> = all.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [5, 6, 7, 8]);
}

/// Sequence numbers are exact up to the largest a stream may hold (2^53, what a Lua number
/// counts exactly), in the ids, the entries, the announcements and the replies.
#[tokio::test]
async fn sequence_numbers_stay_exact_up_to_the_largest_a_stream_may_hold() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t-huge").unwrap();
    let stream = StreamName::Output(Variation::default_name());
    let key = stream.key(&run);
    // A stream whose top is just below the limit.
    let near = agentrun_protocol::replay::MAX_SEQ - 3;
    let _: () = redis::cmd("HSET")
        .arg(run.producers_key())
        .arg(&key)
        .arg(near)
        .query_async(&mut conn)
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let mut live = pubsub.on_message();
    let entries = [entry(1, b"a"), entry(2, b"b"), entry(3, b"c")];
    let out = publish_expecting(&mut conn, &run, &stream, "p", &entries, Default::default()).await;
    let max = agentrun_protocol::replay::MAX_SEQ;
    assert_eq!(out.last_seq, max);
    let page = read_page(&mut conn, &key, near, 10).await.unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [max - 2, max - 1, max]);
    // The `seq` field of the stored entries too.
    let stored: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<(&str, &str)> = stored
        .iter()
        .map(|(id, fields)| (id.as_str(), fields["seq"].as_str()))
        .collect();
    let want: Vec<(String, String)> = [max - 2, max - 1, max]
        .iter()
        .map(|s| (format!("0-{s}"), s.to_string()))
        .collect();
    let want: Vec<(&str, &str)> = want.iter().map(|(i, s)| (i.as_str(), s.as_str())).collect();
    assert_eq!(ids, want);
    for want in [max - 2, max - 1, max] {
        let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .unwrap();
        let got = live::decode_with_epoch(msg.get_payload_bytes()).unwrap().0;
        assert_eq!(got.seq, want);
    }
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

/// Publishes `entries` to `stream` as `producer`, telling the script what it last saw.
async fn publish_expecting(
    conn: &mut agentrun_protocol::RedisConn,
    run: &RunId,
    stream: &StreamName,
    producer: &str,
    entries: &[NewEntry],
    expected: agentrun_protocol::publish::Expected,
) -> agentrun_protocol::publish::PublishOutcome {
    Publisher::new(PublishOptions::default())
        .publish_many_checked(
            conn,
            run,
            &[Batch {
                stream,
                producer,
                entries,
            }],
            &[expected],
        )
        .await
        .unwrap()
        .remove(0)
}

#[tokio::test]
async fn a_rewound_stream_gets_the_run_a_new_epoch_once_and_readers_see_which() {
    use agentrun_protocol::replay::read_run_page;
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = RunId::new("t-epoch").unwrap();
    let output = StreamName::Output(Variation::default_name());
    let logs = StreamName::Logs(Variation::default_name());
    let mut pubsub = redis.settings().pubsub().await.unwrap();
    pubsub.subscribe(output.key(&run)).await.unwrap();
    let mut live = pubsub.into_on_message();

    // The first publish gives the run an epoch; announcements carry it.
    let first: Vec<NewEntry> = (1..=5).map(|i| entry(i, b"old")).collect();
    let out = publish_expecting(&mut conn, &run, &output, "p", &first, Default::default()).await;
    let e1 = out.epoch.expect("the run has an epoch");
    assert!(!out.rewound);
    let logs_out = publish_expecting(
        &mut conn,
        &run,
        &logs,
        "p",
        &[entry(1, b"log")],
        Default::default(),
    )
    .await;
    assert_eq!(logs_out.epoch, Some(e1));
    let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
        .await
        .unwrap()
        .unwrap();
    let (got, epoch) = live::decode_with_epoch(msg.get_payload_bytes()).unwrap();
    assert_eq!((got.seq, epoch), (1, Some(e1)));

    // Redis loses the last two entries of both streams, and what the producers hash
    // recorded for them: the producers' last pseq and the streams' tops (as an AOF that was
    // not synced would).
    let mut lose = redis::pipe();
    lose.cmd("XDEL").arg(output.key(&run)).arg("0-4").arg("0-5");
    lose.cmd("XSETID").arg(output.key(&run)).arg("0-3");
    lose.cmd("DEL").arg(logs.key(&run));
    let _: () = lose.query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(run.producers_key())
        .arg(format!("{}|p", output.key(&run)))
        .arg(3)
        .arg(output.key(&run))
        .arg(3)
        .arg(format!("{}|p", logs.key(&run)))
        .arg(0)
        .arg(logs.key(&run))
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A reader at seq 5 is past the end of the stream now.
    let page = read_run_page(&mut conn, &run, &output, 5, 10)
        .await
        .unwrap();
    assert_eq!((page.epoch, page.ends_before_cursor), (Some(e1), Some(3)));

    // The producer re-sends 4 and 5 (new content) expecting the top it was acknowledged.
    let again = [entry(4, b"new"), entry(5, b"new")];
    let out2 = publish_expecting(&mut conn, &run, &output, "p", &again, out.expected()).await;
    let e2 = out2.epoch.unwrap();
    assert!(out2.rewound, "the script noticed the lost entries");
    assert_ne!(e2, e1, "a new epoch");
    assert_eq!(out2.last_seq, 5);
    // The other rewound stream does not start yet another epoch: its last acknowledgement
    // is from the old one.
    let logs2 = publish_expecting(
        &mut conn,
        &run,
        &logs,
        "p",
        &[entry(1, b"log again")],
        logs_out.expected(),
    )
    .await;
    assert_eq!((logs2.epoch, logs2.rewound), (Some(e2), false));
    // A retry of an applied batch (its answer was lost) starts nothing either.
    let retry = publish_expecting(&mut conn, &run, &output, "p", &again, out.expected()).await;
    assert_eq!(
        (retry.epoch, retry.rewound, retry.appended),
        (Some(e2), false, 0)
    );
    // Readers see the new epoch with the new entries; live messages carry it.
    let page = read_run_page(&mut conn, &run, &output, 3, 10)
        .await
        .unwrap();
    assert_eq!(page.epoch, Some(e2));
    assert_eq!(page.page.entries.len(), 2);
    assert_eq!(&page.page.entries[0].content[..], b"new");
    let mut epochs = Vec::new();
    while epochs.len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .unwrap();
        epochs.push(live::decode_with_epoch(msg.get_payload_bytes()).unwrap().1);
    }
    assert_eq!(epochs[4..], [Some(e2), Some(e2)]);

    // A run whose state hash vanished (Redis restarted empty) gets a fresh epoch from its next
    // publish, and a producer that knew more says so.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let out3 = publish_expecting(
        &mut conn,
        &run,
        &output,
        "p",
        &[entry(6, b"x")],
        out2.expected(),
    )
    .await;
    assert!(out3.rewound);
    assert!(out3.epoch.is_some_and(|e| e != e2));
    // Cursors at the top of the range neither overflow nor read anything.
    let page = read_run_page(&mut conn, &run, &output, u64::MAX, 10)
        .await
        .unwrap();
    assert!(page.page.entries.is_empty());
    assert_eq!(page.ends_before_cursor, Some(1));
    assert!(
        read_page(&mut conn, &output.key(&run), u64::MAX, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}
