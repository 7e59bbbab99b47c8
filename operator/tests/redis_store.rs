//! The operator's writes land in a real Redis under the protocol's names.

use agentrun_operator::store::{RedisStore, RunInfo, RunStore};
use agentrun_protocol::names::RUNS_INDEX_KEY;
use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{ControlAction, ControlMessage, RunId, RunState, StatusEvent, StreamName};
use redis::AsyncCommands;

#[tokio::test]
async fn register_status_control_and_expire() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.settings(), 1000)
        .await
        .expect("connects");
    let run_id = "default.hello.0f1e2d3c";
    let run = RunId::new(run_id).expect("valid id");
    store
        .register(&RunInfo {
            run_id: run_id.into(),
            namespace: "default".into(),
            name: "hello".into(),
            variations: vec!["default".into()],
            created_ms: 1_700_000_000_000,
        })
        .await
        .expect("registers");
    let pending = StatusEvent::new(Some("default"), RunState::Pending)
        .reason("Unschedulable")
        .message("0/3 nodes are available")
        .source("operator");
    store
        .publish_status(run_id, &pending)
        .await
        .expect("publishes");
    let failed = StatusEvent::new(Some("default"), RunState::Failed).reason("OOMKilled");
    store
        .publish_status(run_id, &failed)
        .await
        .expect("publishes");
    store
        .send_control(run_id, ControlAction::Pause)
        .await
        .expect("sends control");

    let mut conn = server.conn().await;
    let score: Option<f64> = conn.zscore(RUNS_INDEX_KEY, run_id).await.expect("zscore");
    assert_eq!(score, Some(1_700_000_000_000.0), "the run is in the index");
    let name: Option<String> = conn.hget(run.state_key(), "name").await.expect("hget");
    assert_eq!(name.as_deref(), Some("hello"));

    let status = read_page(&mut conn, &StreamName::Status.key(&run), 0, 10)
        .await
        .expect("reads status");
    let events: Vec<StatusEvent> = status
        .entries
        .iter()
        .map(|e| serde_json::from_slice(&e.content).expect("status JSON"))
        .collect();
    assert_eq!(events, vec![pending, failed.clone()]);
    assert_eq!(
        status.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2],
        "seq is contiguous"
    );
    let latest: Option<String> = conn.hget(run.state_key(), "default").await.expect("hget");
    assert_eq!(
        serde_json::from_str::<StatusEvent>(&latest.expect("state field")).expect("json"),
        failed,
        "the state hash holds the latest status"
    );

    let control = read_page(&mut conn, &StreamName::Control.key(&run), 0, 10)
        .await
        .expect("reads control");
    assert_eq!(control.entries.len(), 1);
    let msg = ControlMessage::parse(&control.entries[0].content).expect("control JSON");
    assert_eq!(msg.action, ControlAction::Pause);

    store
        .expire(run_id, &["default".into()], 120)
        .await
        .expect("expires");
    for key in [
        StreamName::Status.key(&run),
        StreamName::Control.key(&run),
        run.state_key(),
    ] {
        let ttl: i64 = conn.ttl(&key).await.expect("ttl");
        assert!((1..=120).contains(&ttl), "{key} has ttl {ttl}");
    }
}

#[tokio::test]
async fn an_invalid_run_id_is_a_clear_error() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.settings(), 1000)
        .await
        .expect("connects");
    let err = store
        .send_control("bad id {with braces}", ControlAction::Stop)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("bad id {with braces}"), "{err}");
}
