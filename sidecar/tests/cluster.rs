//! The sidecar and the protocol on a real Redis Cluster (3 masters, 3 replicas): runs on every
//! master arrive byte-exact and announced in order on their sharded channels, a run's own ACL
//! user is all the sidecar needs, and a master failover while a sidecar streams loses and
//! duplicates nothing (see docs/scaling.md).

mod common;

use agentrun_protocol::acl::{create_run_user, generate_password};
use agentrun_protocol::testing::{ChildGuard, RedisCluster, direct, wait_for};
use agentrun_protocol::{RunId, StreamName, live, replay};
use common::*;
use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// One run id whose slot each master serves: master port -> run.
async fn a_run_on_every_master(cluster: &RedisCluster, tag: &str) -> BTreeMap<u16, RunId> {
    cluster.a_run_on_every_master(|| run_id(tag)).await
}

/// `agentrun-sidecar run` against the cluster, killed with the test.
fn start_sidecar(
    url: &str,
    run: &RunId,
    options: &[&str],
    env: &[(&str, &str)],
    agent: &[&str],
) -> ChildGuard {
    let mut cmd = sidecar_run_at(url, run, options, agent);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard::spawn(&mut cmd)
}

/// Runs the sidecar to its end; panics unless the agent's exit code 0 is reported.
async fn run_sidecar(
    url: &str,
    run: &RunId,
    env: &[(&str, &str)],
    options: &[&str],
    agent: &[&str],
) {
    let mut child = start_sidecar(url, run, options, env, agent);
    let (status, stderr) = exit_of(&mut child, "the sidecar to finish").await;
    assert_eq!(status.code(), Some(0), "sidecar of {run}: {stderr}");
}

/// Writes a file's bytes to stdout in chunks of varying size, pausing now and then.
const CAT_AGENT: &str = r#"
import os, sys, time, random
data = open(sys.argv[1], 'rb').read()
rng = random.Random(7)
i = 0
while i < len(data):
    n = rng.choice([1, 7, 100, 4096, 65536])
    os.write(1, data[i:i+n]); i += n
    if rng.random() < 0.05: time.sleep(0.005)
"#;

/// A cluster connection (RESP3) that receives sharded Pub/Sub messages.
async fn sharded_subscriber(
    cluster: &RedisCluster,
) -> (
    redis::cluster_async::ClusterConnection,
    tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port()))
        .collect();
    let client = redis::cluster::ClusterClientBuilder::new(nodes)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()
        .unwrap();
    (client.get_async_connection().await.unwrap(), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_every_master_arrive_byte_exact_and_are_announced_in_order_on_sharded_channels() {
    let cluster = RedisCluster::start(3, 1).await;
    let masters = cluster.load_library().await;
    assert_eq!(masters.len(), 3);
    let runs = a_run_on_every_master(&cluster, "shard").await;
    assert_eq!(runs.keys().copied().collect::<Vec<_>>(), masters);

    let (mut sub, mut pushes) = sharded_subscriber(&cluster).await;
    for run in runs.values() {
        sub.ssubscribe(output_key(run)).await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "cat.py", CAT_AGENT);
    let url = cluster.url();
    let mut wanted = HashMap::new();
    for (i, run) in runs.values().enumerate() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8)
            .collect();
        let file = dir.path().join(format!("data-{i}"));
        std::fs::write(&file, &data).unwrap();
        run_sidecar(
            &url,
            run,
            &[],
            &[],
            &["python3", &agent, file.to_str().unwrap()],
        )
        .await;
        wanted.insert(output_key(run), data);
    }

    let mut conn = cluster.settings().connect().await.unwrap();
    for run in runs.values() {
        // The run index lives in a slot of its own; the run's state in the run's slot.
        let created: Option<u64> = redis::cmd("ZSCORE")
            .arg(agentrun_protocol::names::RUNS_INDEX_KEY)
            .arg(run.as_str())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(created.is_some(), "{run} is in the run index");
        let phase: Option<String> = redis::cmd("HGET")
            .arg(run.state_key())
            .arg("phase")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(phase.as_deref(), Some("succeeded"), "{run}'s phase");
    }
    let mut streams = HashMap::new();
    for (key, data) in &wanted {
        let entries = read_all(&mut conn, key).await;
        assert!(concat(&entries) == *data, "{key} is not byte-exact");
        streams.insert(key.clone(), entries);
    }

    // Every announcement arrives, in stream order, on the run's sharded channel.
    let mut heard: HashMap<String, Vec<agentrun_protocol::Entry>> = HashMap::new();
    let complete = |heard: &HashMap<String, Vec<agentrun_protocol::Entry>>| {
        streams
            .iter()
            .all(|(k, e)| heard.get(k).map_or(0, Vec::len) == e.len())
    };
    let deadline = Instant::now() + DEADLINE;
    while !complete(&heard) {
        let push = tokio::time::timeout_at(deadline.into(), pushes.recv())
            .await
            .expect("every announcement within the deadline")
            .expect("the subscription stays open");
        if push.kind != redis::PushKind::SMessage {
            continue;
        }
        let channel: String = redis::FromRedisValue::from_redis_value_ref(&push.data[0]).unwrap();
        let payload: Vec<u8> = redis::FromRedisValue::from_redis_value_ref(&push.data[1]).unwrap();
        heard
            .entry(channel)
            .or_default()
            .push(live::decode(&payload).unwrap());
    }
    for (key, entries) in &streams {
        let got = &heard[key];
        assert_eq!(
            got.len(),
            entries.len(),
            "{key}: one announcement per entry"
        );
        for (live, stored) in got.iter().zip(entries) {
            assert_eq!(
                (live.seq, live.kind, &live.content),
                (stored.seq, stored.kind, &stored.content),
                "{key}: announcements in stream order, same bytes"
            );
        }
    }
}

/// The reply is an ACL refusal (`NOPERM`).
fn assert_refused<T: std::fmt::Debug>(what: &str, result: redis::RedisResult<T>) {
    match result {
        Err(e) if e.to_string().to_ascii_uppercase().contains("NOPERM") => {}
        other => panic!("{what} on another run must be refused with NOPERM: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_sidecar_needs_only_its_run_user_and_reaches_no_other_run() {
    let cluster = RedisCluster::start(3, 1).await;
    cluster.load_library().await;
    let runs: Vec<RunId> = a_run_on_every_master(&cluster, "user")
        .await
        .into_values()
        .collect();
    let (mine, other) = (&runs[0], &runs[1]);
    // ACL users are not replicated: the operator makes them on every node.
    let password = generate_password();
    let mut user = String::new();
    for node in &cluster.nodes {
        let mut c = direct(node.port()).await.unwrap();
        user = create_run_user(&mut c, mine, &password).await.unwrap();
        create_run_user(&mut c, other, &generate_password())
            .await
            .unwrap();
    }

    run_sidecar(
        &cluster.url(),
        mine,
        &[("AGENTRUN_REDIS_PASSWORD", &password)],
        &["--redis-username", &user],
        &["sh", "-c", "printf 'as my run user\\n'"],
    )
    .await;
    let mut admin = cluster.settings().connect().await.unwrap();
    assert_eq!(
        concat(&read_all(&mut admin, &output_key(mine)).await),
        b"as my run user\n"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(output_key(mine))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl > 0, "retention applied with the run user's rights");

    // The same user cannot touch the other run's keys or channel, on whichever master they are.
    let mut as_mine = cluster
        .settings()
        .with_credentials(Some(user.clone()), Some(password.clone()))
        .connect()
        .await
        .unwrap();
    let publisher = agentrun_protocol::Publisher::new(agentrun_protocol::PublishOptions {
        publish_command: "SPUBLISH",
        ..Default::default()
    });
    let entry = agentrun_protocol::NewEntry {
        pseq: 1,
        ts: agentrun_protocol::now_ms(),
        kind: agentrun_protocol::EntryType::Output,
        content: bytes::Bytes::from_static(b"forged"),
        meta: None,
    };
    let forged = publisher
        .publish_one(
            &mut as_mine,
            other,
            &StreamName::Output(agentrun_protocol::Variation::default_name()),
            "forger",
            &entry,
        )
        .await;
    assert!(forged.is_err(), "published on another run: {forged:?}");
    let xadd: Result<String, _> = redis::cmd("XADD")
        .arg(output_key(other))
        .arg("*")
        .arg("content")
        .arg("x")
        .query_async(&mut as_mine)
        .await;
    assert_refused("XADD", xadd);
    let hset: Result<i64, _> = redis::cmd("HSET")
        .arg(other.state_key())
        .arg("phase")
        .arg("failed")
        .query_async(&mut as_mine)
        .await;
    assert_refused("HSET", hset);
    let spublish: Result<i64, _> = redis::cmd("SPUBLISH")
        .arg(output_key(other))
        .arg("x")
        .query_async(&mut as_mine)
        .await;
    assert_refused("SPUBLISH", spublish);
    assert!(
        read_all(&mut admin, &output_key(other)).await.is_empty(),
        "the other run's stream is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_while_the_sidecar_streams_loses_and_duplicates_nothing() {
    let cluster = RedisCluster::start(3, 1).await;
    cluster.load_library().await;
    let run = run_id("failover");
    let slot = cluster.slot_of(&run.state_key()).await;
    let (old_master, replica) = cluster.master_and_synced_replica(slot).await;

    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "counter.py", COUNTER);
    let count = 1500;
    let mut sidecar = start_sidecar(
        &cluster.url(),
        &run,
        &[],
        &[],
        &["python3", &agent, &count.to_string(), "0.003"],
    );

    // Watch the stream grow: the longest time it stood still is how long the sidecar was
    // blocked (the agent writes a line every 3 ms).
    let key = output_key(&run);
    let mut watcher_conn = cluster.settings().connect().await.unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (key, done) = (key.clone(), done.clone());
        async move {
            let (mut last, mut since, mut longest) = (0, Instant::now(), Duration::ZERO);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(seq) = replay::last_seq(&mut watcher_conn, &key).await
                    && seq > last
                {
                    if last > 0 {
                        longest = longest.max(since.elapsed());
                    }
                    (last, since) = (seq, Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            longest
        }
    });

    let mut conn = cluster.settings().connect().await.unwrap();
    let before = wait_for("the run to stream", DEADLINE, || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            let seq = replay::last_seq(&mut conn, &key).await.ok()?;
            (seq >= 20).then_some(seq)
        }
    })
    .await;
    let failover_started = Instant::now();
    cluster.fail_over_to(replica, slot).await;
    let failover_took = failover_started.elapsed();
    let at_takeover = replay::last_seq(&mut conn, &key).await.unwrap();

    let (status, stderr) = exit_of(&mut sidecar, "the sidecar to finish").await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let blocked = watcher.await.unwrap();
    let entries = read_all(&mut conn, &key).await;
    assert!(
        before < at_takeover && at_takeover < entries.len() as u64,
        "the failover happened while the sidecar streamed: {before} entries before it, {at_takeover} when the replica took over, {} in the end",
        entries.len()
    );
    let mut new_master = direct(replica).await.unwrap();
    let on_new_master = replay::last_seq(&mut new_master, &key).await.unwrap();
    assert_eq!(
        on_new_master,
        entries.len() as u64,
        "the stream is on the new master"
    );
    check_lines(&concat(&entries), count);
    eprintln!(
        "failover of master {old_master} to {replica} took {failover_took:?}; the stream stood still for at most {blocked:?}; {} entries, 0 lost, 0 duplicated",
        entries.len()
    );
    assert!(blocked < Duration::from_secs(15), "blocked {blocked:?}");
}

/// Publishes one control message on the run's control stream and sharded channel, as the relay
/// does on a cluster.
async fn send_control(
    conn: &mut agentrun_protocol::RedisConn,
    run: &RunId,
    msg: agentrun_protocol::ControlMessage,
) {
    let publisher = agentrun_protocol::Publisher::new(agentrun_protocol::PublishOptions {
        publish_command: "SPUBLISH",
        ..Default::default()
    })
    .without_run_state();
    let entry = agentrun_protocol::NewEntry {
        pseq: 1,
        ts: agentrun_protocol::now_ms(),
        kind: agentrun_protocol::EntryType::Control,
        content: bytes::Bytes::from(msg.to_json()),
        meta: None,
    };
    publisher
        .publish_one(conn, run, &StreamName::Control, "test-relay", &entry)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_reaches_the_agent_over_sharded_pubsub_after_a_failover_too() {
    let cluster = RedisCluster::start(3, 1).await;
    cluster.load_library().await;
    let run = run_id("control");
    let slot = cluster.slot_of(&run.state_key()).await;
    let (_, replica) = cluster.master_and_synced_replica(slot).await;
    let mut sidecar = start_sidecar(
        &cluster.url(),
        &run,
        &["--stop-grace-seconds", "5"],
        &[],
        &["sh", "-c", "echo started; exec sleep 60"],
    );
    let mut conn = cluster.settings().connect().await.unwrap();
    let key = output_key(&run);
    wait_for("the agent to start", DEADLINE, || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move { (concat(&read_all(&mut conn, &key).await) == b"started\n").then_some(()) }
    })
    .await;

    // The run's master hands its slot to its replica: the sidecar's subscription moves too.
    cluster.fail_over_to(replica, slot).await;

    let asked = Instant::now();
    send_control(
        &mut conn,
        &run,
        agentrun_protocol::ControlMessage::new(agentrun_protocol::ControlAction::Stop),
    )
    .await;
    let (status, stderr) = exit_of(&mut sidecar, "the agent to stop").await;
    assert_eq!(status.code(), Some(143), "SIGTERM → 128+15; {stderr}");
    eprintln!(
        "stop reached the agent {:?} after it was sent",
        asked.elapsed()
    );
    let last = statuses(&mut conn, &run).await.pop().unwrap();
    assert_eq!(last.state, agentrun_protocol::RunState::Stopped);
}
