//! The operator's writes land in a real Redis under the protocol's names.

use agentrun_operator::store::{RedisStore, RunInfo, RunStore};
use agentrun_protocol::RedisSettings;
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
    let latest: Option<String> = conn
        .hget(run.state_key(), "var:default")
        .await
        .expect("hget");
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

#[tokio::test]
async fn run_wide_status_sets_the_phase_and_run_users_come_and_go() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.settings(), 1000)
        .await
        .expect("connects");
    let run_id = "default.phase.0123abcd";
    let run = RunId::new(run_id).expect("run id");
    let mut conn = server.conn().await;
    store
        .publish_status(
            run_id,
            &StatusEvent::new(None, RunState::Running).source("operator"),
        )
        .await
        .expect("publishes");
    let phase: Option<String> = conn.hget(run.state_key(), "phase").await.expect("hget");
    assert_eq!(phase.as_deref(), Some("running"));
    let ended: Option<String> = conn.hget(run.state_key(), "ended").await.expect("hget");
    assert_eq!(ended, None);
    store
        .publish_status(
            run_id,
            &StatusEvent::new(None, RunState::Succeeded).source("operator"),
        )
        .await
        .expect("publishes");
    let phase: Option<String> = conn.hget(run.state_key(), "phase").await.expect("hget");
    assert_eq!(phase.as_deref(), Some("succeeded"));
    let ended: Option<String> = conn.hget(run.state_key(), "ended").await.expect("hget");
    assert!(ended.is_some(), "a final phase records when the run ended");

    let password = agentrun_protocol::acl::derive_run_password("key", &run);
    store
        .ensure_run_user(run_id, &password)
        .await
        .expect("creates the user");
    store
        .ensure_run_user(run_id, &password)
        .await
        .expect("idempotent");
    let user = agentrun_protocol::acl::run_username(&run);
    let mut as_run = server
        .settings()
        .with_credentials(Some(user.clone()), Some(password.clone()))
        .connect()
        .await
        .expect("the run user logs in");
    let _: Option<String> = redis::cmd("HGET")
        .arg(run.state_key())
        .arg("phase")
        .query_async(&mut as_run)
        .await
        .expect("reads its own run");
    store
        .delete_run_user(run_id)
        .await
        .expect("deletes the user");
    store.delete_run_user(run_id).await.expect("idempotent");
    let gone = server
        .settings()
        .with_credentials(Some(user), Some(password))
        .connect()
        .await;
    assert!(gone.is_err(), "a deleted run user cannot log in");
}

/// Whether the server on `port` knows `user`.
async fn knows_user(port: u16, user: &str) -> bool {
    let Some(mut c) = agentrun_protocol::testing::direct(port).await else {
        return false;
    };
    let found: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(&mut c)
        .await
        .unwrap_or(redis::Value::Nil);
    found != redis::Value::Nil
}

/// Waits until each of `ports` knows (or, with `known` false, no longer knows) `user`.
async fn wait_user_on(ports: &[u16], user: &str, known: bool) {
    for &port in ports {
        agentrun_protocol::testing::wait_for(
            &format!("user {user} known={known} on port {port}"),
            std::time::Duration::from_secs(20),
            || async move { (knows_user(port, user).await == known).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_user_is_on_every_replica_so_a_sentinel_failover_keeps_its_sidecars_in() {
    use agentrun_protocol::testing::Sentinel;
    let master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port()).await;
    let sentinel = Sentinel::start(master.port());
    sentinel.wait_for_replica(replica.port()).await;
    let store = RedisStore::connect(&sentinel.settings(), 1000)
        .await
        .expect("connects through the sentinel");
    let run = RunId::new("default.failover.0a0b0c0d").expect("valid id");
    let user = agentrun_protocol::acl::run_username(&run);
    store
        .ensure_run_user(run.as_str(), "run-password")
        .await
        .expect("makes the user on master and replica");
    assert!(knows_user(master.port(), &user).await);
    assert!(
        knows_user(replica.port(), &user).await,
        "the replica knows the run's user before any failover"
    );

    sentinel.failover_to(replica.port()).await;
    // The run's sidecar logs in to the new master with its own user and writes its stream.
    let mut settings = RedisSettings::from_url(&replica.url()).expect("url");
    settings.username = Some(user.clone());
    settings.password = Some("run-password".into());
    let mut sidecar = settings.connect().await.expect("the run's user logs in");
    let written = agentrun_protocol::Publisher::new(Default::default())
        .publish(
            &mut sidecar,
            &run,
            agentrun_protocol::publish::Batch {
                stream: &StreamName::Output(agentrun_protocol::Variation::default_name()),
                producer: "sidecar",
                entries: &[agentrun_protocol::NewEntry {
                    pseq: 1,
                    ts: 1,
                    kind: agentrun_protocol::EntryType::Output,
                    content: bytes::Bytes::from_static(b"after the failover\n"),
                    meta: None,
                }],
            },
        )
        .await;
    assert!(
        written.is_ok(),
        "the run's user writes its stream on the new master: {written:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_restarts_gets_the_runs_users_again() {
    let master = RedisServer::start();
    let mut replica = RedisServer::start_replica_of(master.port()).await;
    let store = RedisStore::connect(&master.settings(), 1000)
        .await
        .expect("connects");
    let run = RunId::new("default.restart.0a0b0c0d").expect("valid id");
    let user = agentrun_protocol::acl::run_username(&run);
    store
        .ensure_run_user(run.as_str(), "pw")
        .await
        .expect("makes the user");
    wait_user_on(&[master.port(), replica.port()], &user, true).await;
    // Redis keeps users in memory only: a restarted replica forgets them...
    replica.restart();
    // ...and the operator makes them again on its own, without a reconcile.
    wait_user_on(&[replica.port()], &user, true).await;
    store.delete_run_user(run.as_str()).await.expect("deletes");
    wait_user_on(&[master.port(), replica.port()], &user, false).await;
}

/// Whether the server on `port` has agentrun's function library.
async fn has_functions(port: u16) -> bool {
    let Some(mut c) = agentrun_protocol::testing::direct(port).await else {
        return false;
    };
    let listed: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(agentrun_protocol::functions::LIBRARY_NAME)
        .query_async(&mut c)
        .await
        .unwrap_or(redis::Value::Nil);
    format!("{listed:?}").contains(agentrun_protocol::functions::PUBLISH)
}

async fn wait_functions_on(ports: &[u16]) {
    for &port in ports {
        agentrun_protocol::testing::wait_for(
            &format!("agentrun's functions on port {port}"),
            std::time::Duration::from_secs(20),
            || async move { has_functions(port).await.then_some(()) },
        )
        .await;
    }
}

/// Run users may call agentrun's functions but not load them: the operator loads them when
/// it starts, and again on a master that restarted without persistence (and lost them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_loads_the_functions_and_loads_them_again_after_a_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "no"]);
    assert!(!has_functions(server.port()).await, "a new server has none");
    let _store = RedisStore::connect(&server.settings(), 1000)
        .await
        .expect("connects");
    wait_functions_on(&[server.port()]).await;
    // Without AOF or RDB the restarted server starts with no functions at all.
    server.restart();
    wait_functions_on(&[server.port()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_user_is_on_every_node_of_a_redis_cluster() {
    let cluster = agentrun_protocol::testing::RedisCluster::start(3, 1).await;
    let store = RedisStore::connect(&cluster.settings(), 1000)
        .await
        .expect("connects to the cluster");
    store
        .prepare_server()
        .await
        .expect("every node of the cluster runs agentrun");
    let run = RunId::new("default.cluster.0a0b0c0d").expect("valid id");
    let user = agentrun_protocol::acl::run_username(&run);
    store
        .ensure_run_user(run.as_str(), "pw")
        .await
        .expect("makes the user on every node");
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port()).collect();
    for &port in &ports {
        assert!(knows_user(port, &user).await, "node {port} knows {user}");
    }
    // Each shard needs its own copy of the functions.
    wait_functions_on(&ports).await;
    store.delete_run_user(run.as_str()).await.expect("deletes");
    wait_user_on(&ports, &user, false).await;
}

/// Before it starts, the operator checks the server and loads the functions; a server it
/// cannot use is refused with what to do, not a stream of warnings later.
#[tokio::test]
async fn a_redis_without_functions_or_a_user_that_may_not_load_them_is_refused_with_what_to_do() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.settings(), 1000).await.unwrap();
    store
        .prepare_server()
        .await
        .expect("Redis 7 with an admin user");
    assert!(has_functions(server.port()).await, "loaded at once");

    let renamed = RedisServer::start_with(&["--rename-command", "FUNCTION", ""]);
    let store = RedisStore::connect(&renamed.settings(), 1000)
        .await
        .unwrap();
    let e = store
        .prepare_server()
        .await
        .expect_err("no FUNCTION")
        .to_string();
    assert!(
        e.contains("does not know the FUNCTION command") && e.contains("rename-command"),
        "{e}"
    );

    let mut admin = server.conn().await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "weak",
            "on",
            ">weak-pw",
            "~*",
            "&*",
            "+@all",
            "-function",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let weak = server
        .settings()
        .with_credentials(Some("weak".into()), Some("weak-pw".into()));
    let store = RedisStore::connect(&weak, 1000).await.unwrap();
    let e = store
        .prepare_server()
        .await
        .expect_err("no +function")
        .to_string();
    assert!(
        e.contains("+function|load") && e.contains("docs/security.md"),
        "{e}"
    );
}
