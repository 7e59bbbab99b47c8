//! Cursors and epochs: a cursor is only valid within its run's epoch, and a changed epoch is
//! always said (`event: reset`), never guessed. Redis losing acknowledged entries, a cursor
//! from another run, a forged cursor and sequence numbers that go backwards each end in an
//! explicit reset or a refusal, never in silently skipped or repeated entries.

mod support;

use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{EntryType, StreamName};
use support::*;

/// Reads events until `end`, returning them (the `open` event skipped).
async fn until_end(sse: &mut SseClient) -> Vec<SseEvent> {
    let mut out = Vec::new();
    loop {
        let ev = sse.expect_entry("events up to end").await;
        let end = ev.event == "end";
        out.push(ev);
        if end {
            return out;
        }
    }
}

fn seqs(events: &[SseEvent], event: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.event == event)
        .map(|e| e.json()["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_redis_restart_without_persistence_mid_run_ends_in_a_reset_then_every_later_line_once() {
    // No AOF and no snapshots: a restart comes back empty, as a crashed cache-only Redis does.
    let mut redis = RedisServer::start_with(&["--appendonly", "no"]);
    let relay = Relay::start(&redis.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    // The agent waits for the gate, and gives up when the sidecar is gone (a failed test).
    let agent = format!(
        r#"for i in $(seq 1 23); do echo "line $i"; done
while [ ! -e {gate} ]; do kill -0 $PPID 2>/dev/null || exit 1; sleep 0.02; done
for i in $(seq 24 60); do echo "line $i"; sleep 0.01; done"#,
        gate = gate.display()
    );
    let run = "r-epoch-restart";
    let mut child = sidecar_run(&relay, &redis.url(), run, "a", &[], &agent).await;
    let mut sse = SseClient::connect(&relay.events_url(run, "channels=output"), None).await;

    // The follower has lines 1 to 23, acknowledged by Redis.
    let mut text = String::new();
    while !text.contains("line 23\n") {
        let ev = sse.expect_entry("lines 1 to 23").await;
        assert_eq!(ev.event, "output", "{ev:?}");
        text.push_str(ev.json()["content"].as_str().unwrap());
    }
    // Redis restarts empty; then the agent writes lines 24 to 60.
    redis.restart();
    std::fs::write(&gate, b"go").unwrap();

    let mut before_reset = Vec::new();
    let mut after_reset: Option<String> = None;
    loop {
        let ev = sse.expect_entry("the rest of the run").await;
        match ev.event.as_str() {
            "reset" => {
                let j = ev.json();
                assert_ne!(j["oldEpoch"], j["newEpoch"], "{j}");
                assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
                after_reset = Some(String::new());
            }
            "output" => {
                let content = ev.json()["content"].as_str().unwrap().to_owned();
                match after_reset.as_mut() {
                    Some(t) => t.push_str(&content),
                    None => before_reset.push(content),
                }
            }
            "end" => break,
            other => panic!("unexpected event {other}: {ev:?}"),
        }
    }
    let after = after_reset.expect("the follower was told that the history was reset");
    let expected: String = tagged_lines(24..=60, "line").concat();
    assert_eq!(
        after, expected,
        "after the reset: every line written after the restart, once, in order"
    );
    assert!(
        before_reset.concat().is_empty(),
        "nothing from the new history reached the follower before the reset: {before_reset:?}"
    );
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn a_cursor_at_u64_max_is_refused_and_one_past_the_end_is_reset() {
    let (redis, mut conn, run) = redis_with_run("r-max", &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=5, "x"))
        .await;
    let relay = Relay::start(&redis.url()).await;
    let url = relay.events_url("r-max", "channels=output&variation=a&follow=false");

    let forged = v1_cursor("o.a=18446744073709551615");
    let r = reqwest::Client::new()
        .get(&url)
        .header("last-event-id", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a cursor no stream can reach is refused");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("cursor") && body.contains("from=earliest"),
        "{body}"
    );

    // A cursor past the end of the stream (history this relay never had): reset, then the
    // stream from its first entry.
    let mut sse = SseClient::connect(&url, Some(&v1_cursor("o.a=100"))).await;
    let events = until_end(&mut sse).await;
    assert_eq!(events[0].event, "reset", "{events:?}");
    assert_eq!(seqs(&events, "output"), vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_cursor_from_another_run_starts_from_the_first_entry_with_a_reset() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let (a, b) = (run_id("r-first"), run_id("r-second"));
    register(&mut conn, &a, &["a"]).await;
    register(&mut conn, &b, &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &a, "a", &tagged_lines(1..=10, "first"))
        .await;
    p.output(&mut conn, &b, "a", &tagged_lines(1..=6, "second"))
        .await;
    let relay = Relay::start(&redis.url()).await;

    let mut sse = SseClient::connect(
        &relay.events_url("r-first", "channels=output&follow=false"),
        None,
    )
    .await;
    let events = until_end(&mut sse).await;
    assert_eq!(seqs(&events, "output").len(), 10);
    let cursor_of_a = events.last().unwrap().id.clone().unwrap();

    let mut sse = SseClient::connect(
        &relay.events_url("r-second", "channels=output&follow=false"),
        Some(&cursor_of_a),
    )
    .await;
    let events = until_end(&mut sse).await;
    assert_eq!(events[0].event, "reset", "{events:?}");
    assert_eq!(
        seqs(&events, "output"),
        vec![1, 2, 3, 4, 5, 6],
        "run B from its first entry, not from run A's position"
    );
}

#[tokio::test]
async fn seq_numbers_going_backwards_on_the_live_feed_send_a_reset() {
    let (redis, mut conn, run) = redis_with_run("r-backwards", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let mut sse = SseClient::connect(
        &relay.events_url("r-backwards", "channels=output&variation=a"),
        None,
    )
    .await;
    sse.expect("open").await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=10, "old"))
        .await;
    for want in 1..=10u64 {
        assert_eq!(sse.expect_entry("old entries").await.json()["seq"], want);
    }

    // The stream loses its history, and the producers hash the top it kept for it, and is
    // written again from seq 1 (a publisher that does not check the stream's top, after a
    // Redis that lost writes).
    let key = StreamName::Output(var("a")).key(&run);
    let mut lose = redis::pipe();
    lose.cmd("DEL").arg(&key);
    lose.cmd("HDEL").arg(run.producers_key()).arg(&key);
    let _: () = lose.query_async(&mut conn).await.unwrap();
    let mut again = Producer::new("p-again");
    again
        .publish(
            &mut conn,
            &run,
            &StreamName::Output(var("a")),
            EntryType::Output,
            &[
                b"new 1\n".to_vec(),
                b"new 2\n".to_vec(),
                b"new 3\n".to_vec(),
            ],
        )
        .await
        .unwrap();

    let ev = sse.expect_entry("a reset").await;
    assert_eq!(ev.event, "reset", "{ev:?}");
    let mut got = Vec::new();
    while got.len() < 3 {
        let ev = sse.expect_entry("the new history").await;
        assert_eq!(ev.event, "output", "{ev:?}");
        let j = ev.json();
        got.push((
            j["seq"].as_u64().unwrap(),
            j["content"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (1, "new 1\n".to_owned()),
            (2, "new 2\n".to_owned()),
            (3, "new 3\n".to_owned())
        ]
    );
}
