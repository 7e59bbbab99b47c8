//! SSE against a real Redis and a real relay on a loopback port, read with an SSE client.

mod support;

use agentrun_protocol::{PublishOptions, RunState, StatusEvent, StreamName};
use support::*;

#[tokio::test]
async fn replays_history_then_streams_live_then_ends() {
    let (redis, mut conn, run) = redis_with_run("r-replay", &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=10, "line"))
        .await;
    // Binary output survives as base64.
    p.publish(
        &mut conn,
        &run,
        &StreamName::Output(var("a")),
        agentrun_protocol::EntryType::Output,
        &[vec![0xff, 0x00, 0x41]],
    )
    .await
    .unwrap();

    let relay = Relay::start(&redis.url()).await;
    let mut sse = SseClient::connect(
        &relay.events_url("r-replay", "channels=output,status"),
        None,
    )
    .await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    let open = sse.expect("open").await;
    assert_eq!(open.event, "open");
    assert_eq!(open.json()["variations"], serde_json::json!(["a"]));
    for i in 1..=10u64 {
        let ev = sse.expect_entry("replayed output").await;
        assert_eq!(ev.event, "output");
        let j = ev.json();
        assert_eq!(j["seq"], i);
        assert_eq!(j["content"], format!("line {i}\n"));
        assert_eq!(j["variation"], "a");
        assert!(ev.id.is_some());
    }
    let bin = sse.expect_entry("binary output").await.json();
    assert_eq!(bin["encoding"], "base64");
    assert_eq!(bin["content"], "/wBB");

    // Live entries follow.
    p.output(&mut conn, &run, "a", &tagged_lines(12..=14, "live"))
        .await;
    for i in 12..=14u64 {
        let j = sse.expect_entry("live output").await.json();
        assert_eq!(j["seq"], i);
        assert_eq!(j["content"], format!("live {i}\n"));
    }

    // A new variation announced on the status stream is picked up (output before its status).
    p.output(&mut conn, &run, "b", &tagged_lines(1..=2, "bee"))
        .await;
    p.status(
        &mut conn,
        &run,
        StatusEvent::new(Some("b"), RunState::Running),
    )
    .await;
    // Its sidecar declares it in the run's state hash too (asking for a variation by name
    // needs that once no client follows the run).
    agentrun_protocol::publish::add_variation(&mut conn, &run, &var("b"))
        .await
        .unwrap();
    let mut got_b = Vec::new();
    let mut got_status = false;
    while got_b.len() < 2 || !got_status {
        let ev = sse.expect_entry("variation b").await;
        let j = ev.json();
        match ev.event.as_str() {
            "status" => got_status = true,
            "output" => {
                assert_eq!(j["variation"], "b");
                got_b.push(j["content"].as_str().unwrap().to_owned());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(got_b, vec!["bee 1\n", "bee 2\n"]);

    // The run ends: `end`, then the stream closes.
    finish(&mut conn, &mut p, &run, "a", RunState::Succeeded).await;
    loop {
        let ev = sse.expect_entry("end").await;
        if ev.event == "end" {
            let j = ev.json();
            assert_eq!(j["phase"], "succeeded");
            assert_eq!(j["finished"], true);
            break;
        }
        assert_eq!(ev.event, "status");
    }
    assert!(
        tokio::time::timeout(WAIT, sse.next())
            .await
            .unwrap()
            .is_none(),
        "the stream must close after end"
    );

    // A connection to an ended run gets the history, then `end`, at once.
    let mut sse = SseClient::connect(
        &relay.events_url("r-replay", "channels=output&variation=b"),
        None,
    )
    .await;
    let mut seen = Vec::new();
    loop {
        let ev = sse.expect_entry("history of b").await;
        if ev.event == "end" {
            break;
        }
        seen.push(ev.json()["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![1, 2]);
}

#[tokio::test]
async fn resumes_mid_stream_without_gap_or_duplicate() {
    let (redis, _, run) = redis_with_run("r-resume", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;

    const N: u64 = 5000;
    let writer = {
        let mut conn = redis.conn().await;
        let run = run.clone();
        tokio::spawn(async move {
            let mut p = Producer::new("writer");
            let mut i = 1;
            while i <= N {
                let end = (i + 49).min(N);
                p.output(&mut conn, &run, "a", &tagged_lines(i..=end, "o"))
                    .await;
                let logs: Vec<Vec<u8>> = (i..=end).map(|k| format!("l {k}").into_bytes()).collect();
                p.publish(
                    &mut conn,
                    &run,
                    &StreamName::Logs(var("a")),
                    agentrun_protocol::EntryType::Logs,
                    &logs,
                )
                .await
                .unwrap();
                i = end + 1;
                tokio::task::yield_now().await;
            }
            finish(&mut conn, &mut p, &run, "a", RunState::Succeeded).await;
        })
    };

    let url = relay.events_url("r-resume", "channels=output,logs");
    let mut output = Vec::new();
    let mut logs = Vec::new();
    let mut last_id: Option<String> = None;
    let mut reconnects = 0;
    'outer: loop {
        let mut sse = SseClient::connect(&url, last_id.as_deref()).await;
        // Read a varying number of events, then drop the connection mid-stream.
        let budget = 300 + reconnects * 137;
        for _ in 0..budget {
            let ev = sse.expect_entry("entries").await;
            last_id = ev.id.clone();
            match ev.event.as_str() {
                "end" => break 'outer,
                "output" => output.push(ev.json()["seq"].as_u64().unwrap()),
                "logs" => logs.push(ev.json()["seq"].as_u64().unwrap()),
                other => panic!("unexpected event {other}"),
            }
        }
        reconnects += 1;
    }
    writer.await.unwrap();
    assert!(
        reconnects >= 5,
        "the test must resume several times, did {reconnects}"
    );
    let want: Vec<u64> = (1..=N).collect();
    assert_eq!(output, want, "output: every entry once, in order");
    assert_eq!(logs, want, "logs: every entry once, in order");
}

#[tokio::test]
async fn from_now_and_from_cursor() {
    let (redis, mut conn, run) = redis_with_run("r-from", &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=5, "old"))
        .await;
    let relay = Relay::start(&redis.url()).await;

    let mut sse = SseClient::connect(
        &relay.events_url("r-from", "channels=output&from=now"),
        None,
    )
    .await;
    let open = sse.expect("open").await;
    p.output(&mut conn, &run, "a", &tagged_lines(6..=7, "new"))
        .await;
    assert_eq!(sse.expect_entry("new").await.json()["seq"], 6);
    assert_eq!(sse.expect_entry("new").await.json()["seq"], 7);

    // The open event's id resumes from where that connection started.
    let from = open.id.unwrap();
    let mut sse = SseClient::connect(
        &relay.events_url("r-from", &format!("channels=output&from={from}")),
        None,
    )
    .await;
    assert_eq!(sse.expect_entry("resumed").await.json()["seq"], 6);

    // Bad parameters are refused with a message that says what to do.
    let client = reqwest::Client::new();
    for (q, needle) in [
        ("channels=bogus", "use any of output"),
        ("from=garbage", "from=earliest"),
        ("variation=Bad_Name", "DNS label"),
    ] {
        let r = client
            .get(relay.events_url("r-from", q))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body = r.text().await.unwrap();
        assert!(body.contains(needle), "{q}: {body}");
    }
    let r = client
        .get(relay.events_url("nope", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("GET /api/runs"));
}

#[tokio::test]
async fn trimmed_history_is_announced() {
    let (redis, mut conn, run) = redis_with_run("r-trim", &["a"]).await;
    let mut p = Producer::with_options(
        "p",
        PublishOptions {
            max_len: Some(10),
            ..Default::default()
        },
    );
    p.output(&mut conn, &run, "a", &tagged_lines(1..=5, "x"))
        .await;
    let relay = Relay::start(&redis.url()).await;
    let url = relay.events_url("r-trim", "channels=output");
    let mut sse = SseClient::connect(&url, None).await;
    let mut id = None;
    for _ in 0..5 {
        id = sse.expect_entry("first five").await.id;
    }
    drop(sse);
    // While the client is away, 500 more entries trim the stream to about 10.
    p.output(&mut conn, &run, "a", &tagged_lines(6..=505, "x"))
        .await;
    let mut sse = SseClient::connect(&url, id.as_deref()).await;
    let ev = sse.expect_entry("trimmed notice").await;
    assert_eq!(ev.event, "trimmed");
    let j = ev.json();
    assert_eq!(j["wanted"], 6);
    let first = j["firstAvailable"].as_u64().unwrap();
    assert!(first > 6 && first <= 496, "{j}");
    assert_eq!(j["missed"], first - 6);
    assert_eq!(j["channel"], "output");
    let next = sse.expect_entry("first available").await.json();
    assert_eq!(next["seq"], first);
}

#[tokio::test]
async fn redis_restart_mid_stream_loses_nothing() {
    let (mut redis, mut conn, run) = redis_with_run("r-outage", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let mut sse = SseClient::connect(&relay.events_url("r-outage", "channels=output"), None).await;
    sse.expect("open").await;

    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=100, "before"))
        .await;
    let mut seen = Vec::new();
    sse.collect_seqs(&mut seen, 100, "before the outage").await;

    redis.restart();
    // Publish once Redis is back (the command connection reconnects by itself).
    let mut published = 100;
    p.output_when_redis_takes_it(&conn, &run, "a", &tagged_lines(101..=300, "after"))
        .await;
    published += 200;
    // Entries published right after the restart, perhaps before the relay re-subscribed,
    // arrive too: either live or replayed from the stream.
    sse.collect_seqs(&mut seen, published, "after the restart")
        .await;
    assert_eq!(seen, (1..=300u64).collect::<Vec<_>>());
    let text = metrics_text(&relay.base).await;
    assert!(
        text.contains("agentrun_relay_redis_reconnects_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn graceful_shutdown_ends_streams_with_a_resumable_cursor() {
    let (redis, mut conn, run) = redis_with_run("r-shutdown", &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=3, "x"))
        .await;
    let relay = Relay::start(&redis.url()).await;
    let mut sse =
        SseClient::connect(&relay.events_url("r-shutdown", "channels=output"), None).await;
    for _ in 0..3 {
        sse.expect_entry("history").await;
    }
    relay.shutdown().await;
    let ev = sse.expect_entry("shutdown").await;
    assert_eq!(ev.event, "shutdown");
    assert!(
        tokio::time::timeout(WAIT, sse.next())
            .await
            .unwrap()
            .is_none()
    );

    p.output(&mut conn, &run, "a", &tagged_lines(4..=6, "x"))
        .await;
    let relay = Relay::start(&redis.url()).await;
    let mut sse = SseClient::connect(
        &relay.events_url("r-shutdown", "channels=output"),
        ev.id.as_deref(),
    )
    .await;
    for want in 4..=6u64 {
        assert_eq!(sse.expect_entry("after restart").await.json()["seq"], want);
    }
}
