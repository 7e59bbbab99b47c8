//! The network between the sidecar and Redis stalls: the link is cut (packets vanish, no
//! connection is reset) and comes back. The sidecar runs in a network namespace of its own,
//! joined to the host by a veth pair, as a pod's network is; Redis listens on the host end.
//! Needs root (CI runs as root).

mod common;

use agentrun_protocol::RunId;
use agentrun_protocol::testing::{ChildGuard, RedisServer, dying_with_test, wait_for};
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A network namespace joined to the host by a veth pair with a /30 of its own.
struct PodNetwork {
    ns: String,
    host_link: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PodNetwork {
    fn new() -> PodNetwork {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespaces need root (CI runs as root)"
        );
        let tag: u32 = rand::random::<u32>() % 0xfff_fff;
        let ns = format!("ar-stall-{tag:06x}");
        let (host_link, pod_link) = (format!("arh{tag:06x}"), format!("arp{tag:06x}"));
        let (third, fourth) = ((tag >> 6) & 0xff, (tag & 63) * 4);
        let (host_ip, pod_ip) = (
            format!("10.200.{third}.{}", fourth + 1),
            format!("10.200.{third}.{}", fourth + 2),
        );
        ip(&["netns", "add", &ns]);
        let net = PodNetwork {
            ns,
            host_link,
            host_ip,
        };
        ip(&[
            "link",
            "add",
            &net.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &pod_link,
        ]);
        ip(&["link", "set", &pod_link, "netns", &net.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", net.host_ip),
            "dev",
            &net.host_link,
        ]);
        ip(&["link", "set", &net.host_link, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &net.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{pod_ip}/30"), "dev", &pod_link]);
        in_ns(&["link", "set", &pod_link, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        net
    }

    /// Cuts the link: packets are dropped both ways, connections are not reset.
    fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]);
    }

    fn restore(&self) {
        ip(&["link", "set", &self.host_link, "up"]);
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

async fn stream_lines(conn: &agentrun_protocol::RedisConn, run: &RunId) -> usize {
    let bytes = concat(&read_all(&mut conn.clone(), &output_key(run)).await);
    bytes.iter().filter(|b| **b == b'\n').count()
}

/// The link is cut for longer than the sidecar's Redis response timeout (10 s): commands time
/// out, the entrypoint spools, the agent keeps writing at its own pace, and once the link is
/// back every line is in the stream once, in order.
#[tokio::test]
async fn a_cut_link_between_sidecar_and_redis_loses_duplicates_and_blocks_nothing() {
    let net = PodNetwork::new();
    let redis = RedisServer::start_with(&[
        "--bind",
        "127.0.0.1",
        &net.host_ip,
        "--protected-mode",
        "no",
    ]);
    let run = run_id("net-stall");
    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "counter.py", COUNTER);
    let count = 1000;
    let mut sidecar = ChildGuard::spawn(
        dying_with_test("ip")
            .args(["netns", "exec", &net.ns, SIDECAR, "run", "--quiet"])
            .args(["--metrics-interval-seconds", "0", "--redis-url"])
            .arg(format!("redis://{}:{}", net.host_ip, redis.port()))
            .args(["--run-id", run.as_str(), "--"])
            .args(["python3", &agent, &count.to_string(), "0.02"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    let conn = redis.conn().await;
    wait_for("some lines through the pod network", DEADLINE, || {
        let c = conn.clone();
        let r = run.clone();
        async move { (stream_lines(&c, &r).await >= 50).then_some(()) }
    })
    .await;
    net.cut();
    tokio::time::sleep(Duration::from_secs(12)).await; // the outage itself
    net.restore();
    let status = wait_for("the agent to finish", DEADLINE * 2, || {
        let exited = sidecar.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    let times = check_lines(
        &concat(&read_all(&mut redis.conn().await, &output_key(&run)).await),
        count,
    );
    // The agent was never held up by the outage: its writes kept their pace.
    let longest = times.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    assert!(
        longest < 2.0,
        "the agent waited {longest:.2}s between two lines during the outage"
    );
}
