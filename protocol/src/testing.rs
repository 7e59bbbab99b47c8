// Long file: the test harness for every crate (servers, Sentinel, Cluster, TLS files), kept in one module behind `test-support`.
//! Test harness: real `redis-server` processes on free loopback ports.
//!
//! Each [`RedisServer`] gets its own directory and port, runs with the append-only file on and
//! `appendfsync always` (so a `kill -9` loses nothing that Redis acknowledged), and can be
//! killed and restarted on the same port to test outages.

use crate::{RedisConn, RedisSettings};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    tls: bool,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 below 55000, so that a Redis Cluster bus port (port + 10000)
/// is valid too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 35_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port pair below 55000")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn redis_server_binary() -> PathBuf {
    for p in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "redis-server is not installed: run `apt-get install -y redis-server` (the tests start their own servers)"
    );
}

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--maxmemory", "10mb"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts a server on `port` with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut server = RedisServer {
            port,
            tls: extra.contains(&"--tls-port"),
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn_on_port(&mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut cmd = dying_with_test(redis_server_binary());
            if !self.tls {
                cmd.arg("--port").arg(self.port.to_string());
            }
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .arg("--dir")
                .arg(self.dir.path())
                .args(&self.extra_args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().expect("start redis-server");
            // Wait until it answers PING, or notice that it died (port taken after a restart).
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if self.ping() {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "redis-server on port {} did not answer within 20 s",
                        self.port
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if Instant::now() > deadline {
                panic!("redis-server could not start on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        if self.tls {
            // A TLS port that accepts connections is up; the handshake is the client's test.
            return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// Starts a replica of the server on `master_port` and waits until it is in sync.
    pub async fn start_replica_of(master_port: u16) -> Self {
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &master_port.to_string()]);
        wait_for("the replica to sync", Duration::from_secs(10), || async {
            info_replication(replica.port())
                .await
                .contains("master_link_status:up")
                .then_some(())
        })
        .await;
        replica
    }

    /// Starts a server that speaks only TLS, with certificates from `tls`; with
    /// `require_client_cert`, clients must present a certificate signed by the test CA.
    pub fn start_tls(tls: &TlsFiles, require_client_cert: bool) -> Self {
        let port = free_port();
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            tls.server_cert.display().to_string(),
            "--tls-key-file".to_owned(),
            tls.server_key.display().to_string(),
            "--tls-ca-cert-file".to_owned(),
            tls.ca.display().to_string(),
            "--tls-auth-clients".to_owned(),
            if require_client_cert { "yes" } else { "no" }.to_owned(),
        ];
        let mut server = RedisServer {
            port,
            tls: true,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args: args.to_vec(),
            child: None,
        };
        server.spawn_on_port();
        server
    }

    /// Settings for a TLS server: its URL plus the test CA.
    pub fn tls_settings(&self, tls: &TlsFiles) -> RedisSettings {
        let mut s = self.settings();
        s.ca_file = Some(tls.ca.clone());
        s
    }

    pub fn settings(&self) -> RedisSettings {
        RedisSettings::from_url(&self.url()).expect("valid url")
    }

    pub async fn conn(&self) -> RedisConn {
        self.settings()
            .connect()
            .await
            .expect("connect to test redis")
    }

    /// A connection as an ACL user (one made with `acl::set_user`).
    pub async fn conn_as(&self, user: &str, password: &str) -> RedisConn {
        self.settings()
            .with_credentials(Some(user.into()), Some(password.into()))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server with SIGKILL (an outage; its AOF keeps what it acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server --sentinel` monitoring one master as `mymaster` (quorum 1, down after 1 s),
/// killed with the test.
pub struct Sentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

/// The master name every test Sentinel monitors.
pub const SENTINEL_MASTER: &str = "mymaster";

impl Sentinel {
    pub fn start(master_port: u16) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = ChildGuard::spawn(
            dying_with_test(redis_server_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        Sentinel {
            port,
            _dir: dir,
            _child: child,
        }
    }

    /// `redis+sentinel://` settings for the monitored master.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings::from_url(&format!(
            "redis+sentinel://127.0.0.1:{}/{SENTINEL_MASTER}",
            self.port
        ))
        .expect("valid url")
    }

    /// Sends `SENTINEL args...` to this Sentinel.
    pub async fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut c = direct(self.port).await?;
        redis::cmd("SENTINEL")
            .arg(args)
            .query_async(&mut c)
            .await
            .ok()
    }

    /// Waits until the Sentinel knows the replica on `port` as connected and in sync.
    pub async fn wait_for_replica(&self, port: u16) {
        wait_for(
            "the sentinel to know the replica",
            Duration::from_secs(20),
            || async {
                let replicas: Vec<std::collections::HashMap<String, String>> =
                    self.command(&["REPLICAS", SENTINEL_MASTER]).await?;
                replicas
                    .iter()
                    .any(|r| {
                        r.get("port") == Some(&port.to_string())
                            && r.get("flags").map(String::as_str) == Some("slave")
                            && r.get("master-link-status").map(String::as_str) == Some("ok")
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Fails over to a replica and waits until the Sentinel names `new_master_port`.
    pub async fn failover_to(&self, new_master_port: u16) {
        wait_for(
            "SENTINEL FAILOVER to be accepted",
            Duration::from_secs(15),
            || async {
                let ok: String = self.command(&["FAILOVER", SENTINEL_MASTER]).await?;
                (ok == "OK").then_some(())
            },
        )
        .await;
        self.wait_for_master(new_master_port, Duration::from_secs(20))
            .await;
    }

    /// Waits until the Sentinel names the server on `port` as the master.
    pub async fn wait_for_master(&self, port: u16, within: Duration) {
        wait_for("the sentinel to report the new master", within, || async {
            let (_, master): (String, u16) = self
                .command(&["GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER])
                .await?;
            (master == port).then_some(())
        })
        .await;
    }
}

/// The bytes of every entry of stream `key`, counted page by page (for checks of streams too
/// big to hold).
pub async fn stream_bytes<C: redis::aio::ConnectionLike>(conn: &mut C, key: &str) -> u64 {
    let (mut after, mut total) = (0, 0);
    loop {
        let page = crate::replay::read_page(conn, key, after, 1000)
            .await
            .expect("XRANGE");
        let Some(last) = page.entries.last() else {
            return total;
        };
        after = last.seq;
        total += page
            .entries
            .iter()
            .map(|e| e.content.len() as u64)
            .sum::<u64>();
    }
}

/// What a benchmark ran on: "N cores, M GiB memory, load average A B C".
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!("{cores} cores, {memory_gib:.0} GiB memory, load average {load}")
}

/// A plain connection to one server on loopback (no agentrun settings involved).
pub async fn direct(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    client.get_multiplexed_async_connection().await.ok()
}

/// Asserts that one replica has every write made on `conn` so far (`WAIT 1`, 10 s at most):
/// for tests about where writes go after a failover, not about what a failover can lose.
pub async fn assert_replicated<C: redis::aio::ConnectionLike>(conn: &mut C) {
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica has the writes before the failover");
}

/// Waits until the server on `port` says it is a `master` or a `slave` (`INFO replication`).
pub async fn wait_for_role(port: u16, role: &str, within: Duration) {
    let line = format!("role:{role}");
    wait_for(
        &format!("the server on {port} to be {role}"),
        within,
        || async { info_replication(port).await.contains(&line).then_some(()) },
    )
    .await;
}

/// `INFO replication` of the server on `port` (empty when it does not answer).
pub async fn info_replication(port: u16) -> String {
    let Some(mut c) = direct(port).await else {
        return String::new();
    };
    redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut c)
        .await
        .unwrap_or_default()
}

/// What every node of a test cluster runs with.
const CLUSTER_NODE_ARGS: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-node-timeout",
    "2000",
    "--appendonly",
    "no",
];

/// A Redis Cluster of real `redis-server` processes on loopback: `masters` masters with
/// `replicas` replicas each, made with `redis-cli --cluster create` (or, for one master
/// without replicas, one node that takes every slot).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// The address the nodes tell clients about (`127.0.0.1` unless [`RedisCluster::start_on`]).
    pub host: String,
}

impl RedisCluster {
    pub async fn start(masters: usize, replicas: usize) -> Self {
        Self::start_on(masters, replicas, None).await
    }

    /// A cluster whose nodes also listen on `address` and announce it (`--cluster-announce-ip`)
    /// in `CLUSTER SLOTS` and redirections, for clients in other network namespaces (the pods of
    /// kube-sim) that reach this machine there.
    pub async fn start_on(masters: usize, replicas: usize, address: Option<&str>) -> Self {
        let count = masters * (1 + replicas);
        let host = address.unwrap_or("127.0.0.1").to_owned();
        let bind = format!("127.0.0.1 {host}");
        let mut args = CLUSTER_NODE_ARGS.to_vec();
        if address.is_some() {
            args.extend(["--bind", &bind, "--protected-mode", "no"]);
            args.extend(["--cluster-announce-ip", &host]);
        }
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| RedisServer::start_on(free_cluster_port(), &args))
            .collect();
        if masters == 1 && replicas == 0 {
            // `redis-cli --cluster create` wants three masters: one node takes every slot.
            let out = Command::new("redis-cli")
                .args(["-p", &nodes[0].port().to_string()])
                .args(["CLUSTER", "ADDSLOTSRANGE", "0", "16383"])
                .output()
                .expect("run redis-cli (apt-get install redis-tools)");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("OK"),
                "CLUSTER ADDSLOTSRANGE: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let cluster = RedisCluster { nodes, host };
            cluster.wait_until_ok().await;
            return cluster;
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("{host}:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes, host };
        cluster.wait_until_ok().await;
        cluster
    }

    /// A cluster of `masters` masters (no replicas) that speaks only TLS, to clients and on its
    /// bus, with the server certificate of `tls` (its names: `localhost`, `127.0.0.1`, the
    /// address the nodes announce); agentrun's functions are loaded on every master. Reach it
    /// with [`RedisCluster::tls_settings`].
    pub async fn start_tls(masters: usize, tls: &TlsFiles) -> Self {
        let (cert, key, ca) = (
            tls.server_cert.display().to_string(),
            tls.server_key.display().to_string(),
            tls.ca.display().to_string(),
        );
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                let port = free_cluster_port().to_string();
                let args = [
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-cert-file",
                    &cert,
                    "--tls-key-file",
                    &key,
                    "--tls-ca-cert-file",
                    &ca,
                    "--tls-auth-clients",
                    "no",
                ];
                let args = [&args[..], &CLUSTER_NODE_ARGS[..]].concat();
                RedisServer::start_on(port.parse().expect("a port"), &args)
            })
            .collect();
        let cli = |args: &[String]| {
            let out = Command::new("redis-cli")
                .args(["--tls", "--cacert", &ca])
                .args(args)
                .output()
                .expect("run redis-cli (apt-get install redis-tools)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let ports: Vec<String> = nodes.iter().map(|n| n.port().to_string()).collect();
        if masters == 1 {
            let out =
                cli(&["-p", &ports[0], "CLUSTER", "ADDSLOTSRANGE", "0", "16383"].map(String::from));
            assert!(out.contains("OK"), "CLUSTER ADDSLOTSRANGE: {out}");
        } else {
            let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
            args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
            args.push("--cluster-yes".into());
            let out = cli(&args);
            assert!(
                out.contains("[OK] All 16384 slots covered"),
                "redis-cli --cluster create: {out}"
            );
        }
        for port in &ports {
            wait_for(
                "every node to see the cluster ok",
                Duration::from_secs(30),
                || async {
                    cli(&["-p", port, "CLUSTER", "INFO"].map(String::from))
                        .contains("cluster_state:ok")
                        .then_some(())
                },
            )
            .await;
            let mut settings =
                RedisSettings::from_url(&format!("rediss://127.0.0.1:{port}")).expect("valid url");
            settings.ca_file = Some(tls.ca.clone());
            let mut conn = settings.connect().await.expect("a TLS node answers");
            crate::functions::load_library(&mut conn)
                .await
                .expect("FUNCTION LOAD on a master");
        }
        RedisCluster {
            nodes,
            host: "127.0.0.1".into(),
        }
    }

    /// `rediss+cluster://` settings, with every node as a seed and the test CA, for a cluster
    /// from [`RedisCluster::start_tls`].
    pub fn tls_settings(&self, tls: &TlsFiles) -> RedisSettings {
        let url = self
            .url()
            .replacen("redis+cluster://", "rediss+cluster://", 1);
        let mut settings = RedisSettings::from_url(&url).expect("valid url");
        settings.ca_file = Some(tls.ca.clone());
        settings
    }

    async fn wait_until_ok(&self) {
        for node in &self.nodes {
            wait_for(
                "every node to see the cluster ok",
                Duration::from_secs(30),
                || async move {
                    let mut c = direct(node.port()).await?;
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    info.contains("cluster_state:ok").then_some(())
                },
            )
            .await;
        }
    }

    /// `redis+cluster://` settings with every node as a seed.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings::from_url(&self.url()).expect("valid url")
    }

    /// The `redis+cluster://` URL with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}:{}", self.host, n.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let mut c = direct(self.any_port()).await.expect("node answers");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// Who serves which slots, as the node on `port` sees it (`CLUSTER SLOTS`).
    pub async fn slot_ranges(port: u16) -> Vec<SlotRange> {
        let mut c = direct(port).await.expect("node answers");
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .expect("CLUSTER SLOTS");
        let int = |v: &redis::Value| -> u16 {
            redis::FromRedisValue::from_redis_value_ref(v).expect("a number")
        };
        let port_of = |v: &redis::Value| match v {
            redis::Value::Array(node) => int(&node[1]),
            other => panic!("bad node in CLUSTER SLOTS: {other:?}"),
        };
        slots
            .iter()
            .map(|range| match range {
                redis::Value::Array(parts) => SlotRange {
                    start: int(&parts[0]),
                    end: int(&parts[1]),
                    master: port_of(&parts[2]),
                    replicas: parts[3..].iter().map(port_of).collect(),
                },
                other => panic!("bad CLUSTER SLOTS range: {other:?}"),
            })
            .collect()
    }

    /// The ports of the masters, in order.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = Self::slot_ranges(self.any_port())
            .await
            .iter()
            .map(|r| r.master)
            .collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// The master that serves `slot` and one of its replicas, once that replica is in sync (a
    /// new cluster is `ok` before its replicas have synced).
    pub async fn master_and_synced_replica(&self, slot: u16) -> (u16, u16) {
        let port = self.any_port();
        wait_for(
            "the slot's master to have a synced replica",
            Duration::from_secs(30),
            || async move {
                let ranges = Self::slot_ranges(port).await;
                let range = SlotRange::find(&ranges, slot)?;
                let replica = *range.replicas.first()?;
                info_replication(replica)
                    .await
                    .contains("master_link_status:up")
                    .then_some((range.master, replica))
            },
        )
        .await
    }

    /// Has `replica` take over its master's slots (`CLUSTER FAILOVER`, the graceful manual
    /// failover: the master stops writes until the replica has everything) and waits until
    /// the cluster names it the master of `slot`.
    pub async fn fail_over_to(&self, replica: u16, slot: u16) {
        let mut r = direct(replica).await.expect("replica answers");
        redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query_async::<()>(&mut r)
            .await
            .expect("CLUSTER FAILOVER");
        self.wait_for_master(slot, replica).await;
    }
}

impl RedisCluster {
    /// Loads agentrun's function library on every master, each on its own connection, as the
    /// operator does; returns the masters' ports.
    pub async fn load_library(&self) -> Vec<u16> {
        let masters = self.masters().await;
        for &port in &masters {
            let mut c = direct(port).await.expect("master answers");
            crate::functions::load_library(&mut c)
                .await
                .expect("FUNCTION LOAD on a master");
        }
        masters
    }

    /// One run per master, whose slot that master serves: master port -> run, from the ids
    /// `new_run` makes (a fresh one each call).
    pub async fn a_run_on_every_master(
        &self,
        mut new_run: impl FnMut() -> crate::RunId,
    ) -> std::collections::BTreeMap<u16, crate::RunId> {
        let ranges = Self::slot_ranges(self.any_port()).await;
        let masters = self.masters().await;
        let mut runs = std::collections::BTreeMap::new();
        while runs.len() < masters.len() {
            let run = new_run();
            let slot = crate::topology::key_slot(run.state_key().as_bytes());
            runs.entry(SlotRange::serving(&ranges, slot).master)
                .or_insert(run);
        }
        runs
    }

    /// The port of a node that runs (one was perhaps killed).
    pub fn any_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a node of the cluster runs")
            .port()
    }

    /// The node id of the server on `port` (`CLUSTER MYID`).
    pub async fn node_id(port: u16) -> String {
        let mut c = direct(port).await.expect("node answers");
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut c)
            .await
            .expect("CLUSTER MYID")
    }

    /// Moves `slot` to the master on `to` the way `redis-cli --cluster reshard` does: the
    /// target `IMPORTING`, the source `MIGRATING`, the keys moved with `MIGRATE` in batches of
    /// `batch` (`between` runs after each, so a test can act while the slot is half moved),
    /// then `SETSLOT ... NODE` on the target, the source and the other masters. Waits until
    /// every node names `to` the slot's master.
    pub async fn migrate_slot<F, Fut>(&self, slot: u16, to: u16, batch: usize, mut between: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let from = SlotRange::serving(&Self::slot_ranges(to).await, slot).master;
        assert_ne!(from, to, "slot {slot} is already served by {to}");
        let (from_id, to_id) = (Self::node_id(from).await, Self::node_id(to).await);
        let mut source = direct(from).await.expect("source answers");
        let mut target = direct(to).await.expect("target answers");
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        setslot("IMPORTING", &from_id)
            .query_async::<()>(&mut target)
            .await
            .expect("SETSLOT IMPORTING");
        setslot("MIGRATING", &to_id)
            .query_async::<()>(&mut source)
            .await
            .expect("SETSLOT MIGRATING");
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(batch)
                .query_async(&mut source)
                .await
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut source)
                .await
                .expect("MIGRATE");
            between().await;
        }
        setslot("NODE", &to_id)
            .query_async::<()>(&mut target)
            .await
            .expect("SETSLOT NODE on the target");
        setslot("NODE", &to_id)
            .query_async::<()>(&mut source)
            .await
            .expect("SETSLOT NODE on the source");
        for master in self.masters().await {
            if master != from && master != to {
                let mut c = direct(master).await.expect("master answers");
                let _: redis::RedisResult<()> = setslot("NODE", &to_id).query_async(&mut c).await;
            }
        }
        self.wait_for_master(slot, to).await;
    }

    /// Waits until every node that answers names `master` the master of `slot`.
    pub async fn wait_for_master(&self, slot: u16, master: u16) {
        let nodes: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port())
            .collect();
        wait_for(
            "every node to name the new master of the slot",
            Duration::from_secs(30),
            || {
                let nodes = nodes.clone();
                async move {
                    for port in nodes {
                        let ranges = Self::slot_ranges(port).await;
                        // A node that has not learned of the move yet may name no master.
                        if SlotRange::find(&ranges, slot).map(|r| r.master) != Some(master) {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await;
    }

    /// Kills (SIGKILL) the master of `slot` and waits until the cluster has promoted its
    /// replica (after `--cluster-node-timeout`, 2 s here). Returns (old master, new master).
    pub async fn kill_master_of(&mut self, slot: u16) -> (u16, u16) {
        let (old, replica) = self.master_and_synced_replica(slot).await;
        self.nodes
            .iter_mut()
            .find(|n| n.port() == old)
            .expect("the master is one of the cluster's nodes")
            .kill();
        self.wait_for_master(slot, replica).await;
        (old, replica)
    }
}

/// Slots `start..=end` of a cluster and the ports of the nodes that serve them.
#[derive(Debug, Clone)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master: u16,
    pub replicas: Vec<u16>,
}

impl SlotRange {
    /// The range that holds `slot`, if a node names one (during a move, it may not).
    pub fn find(ranges: &[SlotRange], slot: u16) -> Option<&SlotRange> {
        ranges.iter().find(|r| (r.start..=r.end).contains(&slot))
    }

    /// The range that holds `slot`, on a cluster at rest.
    pub fn serving(ranges: &[SlotRange], slot: u16) -> &SlotRange {
        Self::find(ranges, slot).expect("every slot is served")
    }
}

/// A command whose process is killed when the thread that starts it ends, whatever ends it: a
/// test that panics, times out or is killed by the test runner leaves no server behind. It
/// runs `program` through `setpriv --pdeathsig KILL` (util-linux), which execs it in place, so
/// the child's pid is the program's.
pub fn dying_with_test(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
    cmd
}

/// A child process that is killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.spawn().expect("start a test process"))
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate, all
/// generated for the test (PEM files in a temporary directory).
pub struct TlsFiles {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write pem");
            path
        };
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agentrun test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let params = CertificateParams::new(names).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client_cert, client_key) = leaf(vec!["agentrun-client".into()]);
        TlsFiles {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            _dir: dir,
        }
    }
}
