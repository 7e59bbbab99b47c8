//! The user's path on a Redis Cluster: the operator, the agent pods' sidecars and the relay all
//! pointed at a cluster of three masters (real `redis-server` processes that announce the
//! address the pods reach this machine at). A run's keys and channels share its `{RUN}` hash
//! tag, so each run lives on one master; the operator makes the run's Redis user and loads
//! agentrun's functions on every master.

mod common;
#[path = "common/stack.rs"]
mod stack;

use stack::{Stack, StackOptions, example_script, run_sh};

#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_runs_stream_byte_exact_from_kubectl_apply_to_the_relay() {
    let s = Stack::start_with(StackOptions {
        redis_cluster: true,
        ..Default::default()
    })
    .await;
    s.apply_example("manifests/examples/hello.yaml");
    s.apply_example("manifests/examples/variations.yaml");
    let expected =
        tokio::task::spawn_blocking(|| run_sh(&example_script("manifests/examples/hello.yaml")));

    for (name, done_count) in [("hello", "1/1"), ("hello-variations", "3/3")] {
        let done = s
            .wait_phase(name, &["Succeeded", "Failed", "Stopped"], 60)
            .await;
        assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
        assert_eq!(done["status"]["variationsDone"], done_count, "{done:#}");
        // The run's end is published once every pod, sidecar included, has ended.
        s.eventually(30, "the run's streams to close", || async {
            let ar = s.agentrun(name).await?;
            (ar["status"]["streamsClosed"] == true).then_some(())
        })
        .await;
    }

    // Each run's keys are on the master that serves its slot, and only there.
    let stack::Backend::Cluster(cluster) = &s.redis else {
        unreachable!("the stack was started on a cluster")
    };
    for name in ["hello", "hello-variations"] {
        let state_key = format!("run:{{{}}}:state", s.run_id(name).await);
        let slot = cluster.slot_of(&state_key).await;
        let ranges =
            agentrun_protocol::testing::RedisCluster::slot_ranges(cluster.nodes[0].port()).await;
        let owner = agentrun_protocol::testing::SlotRange::serving(&ranges, slot).master;
        for node in &cluster.nodes {
            let mut c = agentrun_protocol::testing::direct(node.port())
                .await
                .unwrap();
            let n: u64 = redis::cmd("CLUSTER")
                .arg("COUNTKEYSINSLOT")
                .arg(slot)
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(
                n > 0,
                node.port() == owner,
                "keys of slot {slot} ({state_key}) on node {}",
                node.port()
            );
        }
    }

    let hello = s.sse(&s.run_id("hello").await, 20).await;
    assert_eq!(
        hello.output()["default"],
        expected.await.unwrap(),
        "the agent's bytes, through the sidecar, the cluster and the relay"
    );
    assert!(hello.end().is_some(), "the run's end reached the viewer");

    let variations = s.sse(&s.run_id("hello-variations").await, 20).await;
    let out = variations.output();
    let text = |v: &str| String::from_utf8_lossy(out.get(v).map(Vec::as_slice).unwrap_or(b""));
    let steps = |style: &str| {
        let mut t = format!("style: {style}\n");
        for i in 1..=5 {
            t.push_str(&format!("[{style}] step {i}\n"));
        }
        t
    };
    assert_eq!(text("plain"), steps("plain"));
    assert_eq!(text("shouty"), steps("SHOUTY"));
    assert_eq!(
        text("custom-args"),
        "this variation replaces the args\ndone\n"
    );
    assert!(variations.end().is_some());
}
