//! `--durability`: the sidecar acknowledges the entrypoint's output only once Redis confirms
//! the level (`WAIT` replicas / `WAITAOF`), so what was acknowledged survives a failover to a
//! replica; with `none` (the default) it may not. Real `redis-server` masters and replicas,
//! the real `agentrun-sidecar run` binary.

mod common;

use agentrun_protocol::testing::{
    ChildGuard, RedisServer, direct, dying_with_test, free_port, info_replication, wait_for,
};
use common::pod::{http_get, metric_sum};
use common::{DEADLINE, SIDECAR, concat, exit_of, output_key, read_all, run_id};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

/// A TCP proxy on loopback that sends every new connection to the port currently in `target`:
/// the address the sidecar is given, so that the test can point it at a promoted replica.
struct Proxy {
    port: u16,
    target: Arc<AtomicU16>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = t.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut backend) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    }
                });
            }
        });
        Proxy { port, target }
    }

    fn point_at(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

fn replica_of(master: &RedisServer) -> RedisServer {
    let port = master.port().to_string();
    RedisServer::start_with(&["--appendonly", "no", "--replicaof", "127.0.0.1", &port])
}

/// Waits until the replica on `port` is connected to its master and in sync.
async fn wait_in_sync(port: u16) {
    wait_for("the replica to be in sync", DEADLINE, || async move {
        info_replication(port)
            .await
            .contains("master_link_status:up")
            .then_some(())
    })
    .await;
}

async fn pid_of(server: &RedisServer) -> String {
    let mut c = direct(server.port()).await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned()
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// `agentrun-sidecar run` on `url` with `--durability`, its metrics on a port of its own, and an
/// agent that waits until the file `go1` exists, writes `first`, waits until the file `go2`
/// exists, then writes `second`.
fn durable_run(
    url: &str,
    run: &agentrun_protocol::RunId,
    durability: &str,
    metrics_port: u16,
    dir: &Path,
    first: &str,
    second: &str,
) -> ChildGuard {
    let script = format!(
        "cd '{}'; while [ ! -e go1 ]; do sleep 0.02; done; printf '{first}'; \
         while [ ! -e go2 ]; do sleep 0.02; done; printf '{second}'",
        dir.display()
    );
    ChildGuard::spawn(
        dying_with_test(SIDECAR)
            .args([
                "run",
                "--quiet",
                "--metrics-interval-seconds",
                "0",
                "--metrics-addr",
            ])
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(["--redis-url", url, "--run-id", run.as_str()])
            .args(["--durability", durability])
            .args(["--", "sh", "-c", &script])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

async fn metric(port: u16, name: &str) -> u64 {
    http_get(port, "/metrics")
        .await
        .map(|m| metric_sum(&m, name))
        .unwrap_or(0)
}

async fn wait_for_metric(port: u16, name: &str, at_least: u64) {
    wait_for(&format!("{name} >= {at_least}"), DEADLINE, || async move {
        (metric(port, name).await >= at_least).then_some(())
    })
    .await;
}

/// Waits until the sidecar's start-up batches (its `SidecarStarted` and the agent's `Started`
/// status) have passed the durability wait: the sidecar mirrors a status into the state hash
/// only after that.
async fn wait_until_running(redis: &RedisServer, run: &agentrun_protocol::RunId) {
    let conn = redis.conn().await;
    wait_for("the agent's start to be confirmed", DEADLINE, || {
        let (mut conn, run) = (conn.clone(), run.clone());
        async move {
            let state: Option<String> = redis::cmd("HGET")
                .arg(run.state_key())
                .arg("var:default")
                .query_async(&mut conn)
                .await
                .ok()?;
            state?.contains("\"running\"").then_some(())
        }
    })
    .await;
}

/// Waits until the output stream on `redis` holds exactly `want`.
async fn wait_for_stream(redis: &RedisServer, run: &agentrun_protocol::RunId, want: &str) {
    let conn = redis.conn().await;
    let key = output_key(run);
    wait_for(&format!("{want:?} in the output stream"), DEADLINE, || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move { (concat(&read_all(&mut conn, &key).await) == want.as_bytes()).then_some(()) }
    })
    .await;
}

fn lines(tag: &str, n: usize) -> String {
    (1..=n).map(|i| format!("{tag} line {i}\n")).collect()
}

/// With `replicas=1` and the only replica stopped (SIGSTOP), the output reaches the master
/// but is not acknowledged: the run cannot finish, the sidecar counts the waits that timed out.
/// Once the replica runs again, the output is acknowledged and the stream holds it byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_1_holds_output_while_the_replica_is_stopped() {
    let master = RedisServer::start_with(&["--appendonly", "no"]);
    let replica = replica_of(&master);
    wait_in_sync(replica.port()).await;
    let replica_pid = pid_of(&replica).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("go2"), b"").unwrap();
    let run = run_id("durable-stopped");
    let metrics_port = free_port();
    let want = lines("held", 50);
    let mut child = durable_run(
        &master.url(),
        &run,
        "replicas=1,timeout=50",
        metrics_port,
        dir.path(),
        &want,
        "",
    );
    wait_until_running(&master, &run).await;
    assert_eq!(
        metric(metrics_port, "agentrun_sidecar_durability_timeouts_total").await,
        0,
        "with the replica up, every wait is met"
    );
    signal(&replica_pid, "-STOP");
    std::fs::write(dir.path().join("go1"), b"").unwrap();
    // The output is in the master, yet the waits time out and nothing is acknowledged: the
    // run (which ends only when the entrypoint has its acknowledgements) goes on.
    wait_for_stream(&master, &run, &want).await;
    let before = metric(metrics_port, "agentrun_sidecar_durability_timeouts_total").await;
    wait_for_metric(
        metrics_port,
        "agentrun_sidecar_durability_timeouts_total",
        before + 3,
    )
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run must not end before the replica confirmed its output"
    );
    assert!(
        metric(
            metrics_port,
            "agentrun_sidecar_durability_wait_seconds_count"
        )
        .await
            >= 3,
        "every wait is measured"
    );

    signal(&replica_pid, "-CONT");
    let (status, stderr) = exit_of(&mut child, "the run to end once the replica is back").await;
    assert!(status.success(), "{status}: {stderr}");
    let mut rconn = replica.conn().await;
    wait_for("the replica to hold the output", DEADLINE, || {
        let mut rconn = rconn.clone();
        let key = output_key(&run);
        let want = want.clone();
        async move {
            let have = concat(&read_all(&mut rconn, &key).await);
            (have == want.as_bytes()).then_some(())
        }
    })
    .await;
    assert_eq!(
        concat(&read_all(&mut rconn, &output_key(&run)).await),
        want.as_bytes()
    );
}

/// The failover sequence: a replica that falls behind (its replication is cut, as when it is
/// partitioned from the master), output acknowledged — or not — by the master, the master
/// killed, the replica promoted and the sidecar pointed at it. Returns the output stream on the
/// promoted replica, and what the agent wrote before and after the failover.
async fn failover_after_output(durability: &str) -> (Vec<u8>, String, String) {
    let master = RedisServer::start_with(&["--appendonly", "no"]);
    let mut master = Some(master);
    let replica = replica_of(master.as_ref().unwrap());
    wait_in_sync(replica.port()).await;
    let proxy = Proxy::start(master.as_ref().unwrap().port()).await;

    let dir = tempfile::tempdir().unwrap();
    let run = run_id("durable-failover");
    let metrics_port = free_port();
    let (first, second) = (lines("before", 40), lines("after", 40));
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let mut child = durable_run(
        &url,
        &run,
        durability,
        metrics_port,
        dir.path(),
        &first,
        &second,
    );
    wait_until_running(master.as_ref().unwrap(), &run).await;

    // The replica stops following the master: from here on it is behind.
    let mut rc = direct(replica.port()).await.unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut rc)
        .await
        .unwrap();
    std::fs::write(dir.path().join("go1"), b"").unwrap();
    wait_for_stream(master.as_ref().unwrap(), &run, &first).await;
    let key = output_key(&run);
    if durability == "none" {
        // Published means acknowledged: the master replied.
        wait_for_metric(metrics_port, "agentrun_sidecar_entries_published_total", 1).await;
    } else {
        // The master has it, its replica does not: not acknowledged.
        wait_for_metric(
            metrics_port,
            "agentrun_sidecar_durability_timeouts_total",
            1,
        )
        .await;
    }

    // Failover: the master dies, the replica that was behind becomes the master (it already
    // answers writes), the sidecar's address now leads to it, and it gets a replica of its own.
    master.take();
    proxy.point_at(replica.port());
    let new_replica = replica_of(&replica);
    wait_in_sync(new_replica.port()).await;
    std::fs::write(dir.path().join("go2"), b"").unwrap();

    let (status, stderr) = exit_of(&mut child, "the run to end after the failover").await;
    assert!(status.success(), "{status}: {stderr}");
    let mut conn = replica.conn().await;
    (concat(&read_all(&mut conn, &key).await), first, second)
}

/// `replicas=1`: what the sidecar acknowledged was on a replica, so a failover to that replica
/// loses nothing; what it had not acknowledged was still with the entrypoint and is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_1_loses_nothing_acknowledged_in_a_failover() {
    let (stream, first, second) = failover_after_output("replicas=1,timeout=50").await;
    assert_eq!(
        String::from_utf8_lossy(&stream),
        format!("{first}{second}"),
        "every byte, once, in order, on the promoted replica"
    );
}

/// The contrast, same sequence with `none`: the master acknowledged the first part, the
/// entrypoint forgot it, the replica never had it, so it is gone after the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_loses_acknowledged_output_in_the_same_failover() {
    let (stream, _first, second) = failover_after_output("none").await;
    assert_eq!(
        String::from_utf8_lossy(&stream),
        second,
        "with --durability none the acknowledged first part is lost"
    );
}

/// Redis 7.0 has no `WAITAOF`: `--durability aof` is refused at start with what to do.
#[tokio::test]
async fn aof_on_a_redis_without_waitaof_is_refused_at_start() {
    let redis = RedisServer::start();
    let mut c = direct(redis.port()).await.unwrap();
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    let version = version
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim()
        .to_owned();
    let run = run_id("durable-aof");
    let out = common::output_of(&mut common::sidecar_run_with(
        &redis,
        &run,
        &["--durability", "aof"],
        &["true"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.as_slice() >= [7, 2].as_slice() {
        // A Redis with WAITAOF (and the test servers' AOF on): accepted.
        assert!(out.status.success(), "{stderr}");
    } else {
        assert!(!out.status.success());
        assert!(
            stderr.contains("this Redis does not support WAITAOF; it needs Redis 7.2 or later, or use --durability replicas=N"),
            "{stderr}"
        );
    }
}

/// Bad values are refused naming the flag and the accepted forms (also from the environment).
#[test]
fn bad_durability_values_are_refused() {
    for bad in [
        "always",
        "replicas=0",
        "replicas=1,timeout=0",
        "aof,replicas=x",
    ] {
        let out = std::process::Command::new(SIDECAR)
            .args(["run", "--run-id", "r", "--durability", bad, "--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(stderr.contains("--durability"), "{bad}: {stderr}");
        assert!(
            stderr.contains("none | replicas=N[,timeout=MS] | aof[,replicas=N][,timeout=MS]"),
            "{bad}: {stderr}"
        );
    }
    let out = std::process::Command::new(SIDECAR)
        .args(["run", "--run-id", "r", "--", "true"])
        .env("AGENTRUN_DURABILITY", "replicas")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--durability"), "{stderr}");
}
