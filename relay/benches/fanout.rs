//! Fan-out benchmark of the relay (not a timed test).
//!
//! Starts a real Redis and the release `agentrun-relay` binary as its own process, opens N
//! SSE connections spread over R runs, publishes timestamped entries at a fixed rate per run
//! for a while, and reports events/s delivered, delivery latency (publish call -> client
//! read) p50/p99/max, lost events, and the relay's resident memory per connection.
//!
//! ```text
//! bash -c 'ulimit -n 20000 && cargo bench -p agentrun-relay --bench fanout'
//! cargo bench -p agentrun-relay --bench fanout -- --clients 5000 --runs 1 --rate 10 --seconds 20
//! ```
//! Without arguments it runs the scenarios of docs/benchmarks.md ("Relay fan-out") one after
//! the other; each can be run alone:
//!
//! ```text
//! # 10,000 viewers of one run at 2 entries/s
//! fanout -- --clients 10000 --runs 1 --rate 2 --seconds 20
//! # many runs with a few viewers each (the publisher: several connections, pipelined)
//! fanout -- --clients 10000 --runs 1000 --rate 2 --seconds 20
//! fanout -- --clients 4000 --runs 2000 --rate 20 --seconds 20 --publishers 4
//! # idle connections: relay memory per connection, nothing published
//! fanout -- --clients 19000 --runs 1 --idle
//! # token streaming: agent write -> viewer read through the real sidecar and entrypoint
//! fanout -- --tokens --clients 100 --rate 500 --seconds 10
//! ```
//!
//! The publisher runs on a runtime of its own (one thread), so that the clients' reads do not
//! hold it back, and spreads the runs over `--publishers` connections, each publishing its
//! runs' entries of a tick as one pipeline. What it actually published is reported ("entries/s
//! published"), beside what was asked. `--batch N` publishes N entries per run in each call
//! (`rate / N` calls per second and run), as a producer that sends what it has gathered.
//!
//! `--tokens` starts the release `agentrun-sidecar` (next to the relay binary: build both with
//! `cargo bench -p agentrun-relay -p agentrun-sidecar --no-run`) running this bench program as the agent, which
//! writes `--rate` lines per second, each carrying the microsecond it was written; latency is
//! *agent write -> client read*, through the entrypoint's pipe, the sidecar, Redis and the relay.
//!
//! `--tls` serves the relay over HTTPS (a self-signed certificate for `localhost`) and has each
//! client speak HTTP/1.1 over a TLS connection of its own; `--h2` the same with HTTP/2 (ALPN),
//! one stream per connection. Without either, clients speak plain HTTP/1.1 on raw sockets.
//!
//! `AGENTRUN_RELAY_BIN=PATH` runs another relay binary (to compare builds with the same bench).
//!
//! `--relays N` starts N relay processes and spreads the clients over them (client i on relay
//! i mod N), as a Service does; `--cluster M` runs Redis as a Redis Cluster of M masters
//! (sharded Pub/Sub) instead of one server:
//!
//! ```text
//! cargo bench -p agentrun-relay --bench fanout -- --clients 5000 --runs 100 --cluster 3 --relays 2
//! ```

use agentrun_protocol::publish::{Batch, register_run};
use agentrun_protocol::testing::{RedisCluster, RedisServer, free_port};
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RedisSettings, RunId, StreamName, Variation,
};
use bytes::Bytes;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct Scenario {
    clients: usize,
    runs: usize,
    /// Entries per second published to each run.
    rate: u64,
    seconds: u64,
    /// Relay processes the clients are spread over.
    relays: usize,
    /// Connections the publisher spreads the runs over.
    publishers: usize,
    /// Entries each publish carries per run (`rate / batch` publishes per second and run), as
    /// a producer that sends what it has every `batch / rate` seconds.
    batch: u64,
    /// Connect the clients and publish nothing: relay memory of idle connections.
    idle: bool,
    /// One run fed by the real sidecar, whose agent writes `rate` lines per second.
    tokens: bool,
    /// How the clients talk to the relay.
    transport: Transport,
}

/// The clients' connections to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Plain HTTP/1.1 (what an ingress or a Service in front of the relay speaks to it).
    Plain,
    /// HTTP/1.1 over the relay's TLS (`--tls-cert`), one connection per client.
    Tls,
    /// HTTP/2 over the relay's TLS, one connection per client, one stream on each.
    H2,
}

impl Transport {
    fn describe(self) -> &'static str {
        match self {
            Transport::Plain => "",
            Transport::Tls => ", HTTP/1.1 over TLS",
            Transport::H2 => ", HTTP/2 over TLS",
        }
    }
}

impl Scenario {
    fn describe(&self) -> String {
        if self.tokens {
            return format!(
                "tokens: {} viewers of 1 run, agent writes {} lines/s (sidecar)",
                self.clients, self.rate
            );
        }
        if self.idle {
            return format!(
                "{} idle clients on {} run(s){}",
                self.clients,
                self.runs,
                self.transport.describe()
            );
        }
        format!(
            "{} clients on {} run(s), {} relay(s){}",
            self.clients,
            self.runs,
            self.relays,
            self.transport.describe()
        )
    }
}

/// The Redis the bench runs against: one server, or a cluster.
enum Target {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Target {
    fn url(&self) -> String {
        match self {
            Target::Server(r) => r.url(),
            Target::Cluster(c) => c.url(),
        }
    }

    fn settings(&self) -> RedisSettings {
        RedisSettings::from_url(&self.url()).expect("valid url")
    }

    /// The Redis servers' process ids.
    fn pids(&self) -> Vec<String> {
        let servers = match self {
            Target::Server(s) => std::slice::from_ref(s),
            Target::Cluster(c) => &c.nodes[..],
        };
        servers
            .iter()
            .filter_map(|s| s.pid())
            .map(|p| p.to_string())
            .collect()
    }

    fn describe(&self) -> String {
        match self {
            Target::Server(_) => "one redis-server (AOF, fsync every second)".into(),
            Target::Cluster(c) => format!("a Redis Cluster of {} masters", c.nodes.len()),
        }
    }
}

struct Report {
    scenario: Scenario,
    connect_secs: f64,
    rss_base_kib: u64,
    rss_connected_kib: u64,
    rss_end_kib: u64,
    published: u64,
    expected: u64,
    delivered: u64,
    send_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU seconds used while publishing, by the relay and by this process (the clients).
    relay_cpu: f64,
    client_cpu: f64,
    /// CPU seconds Redis used meanwhile.
    redis_cpu: f64,
    /// Load average (1 minute) when the scenario ended.
    load: String,
}

fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process (from /proc/PID/stat; clock ticks of 10 ms).
fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What marks a timestamp in an entry's content: `T@MICROS@`.
const STAMP: &[u8] = b"T@";

/// Reads what a client receives: finds the stream's `open` event, then counts deliveries and
/// records latencies (every `T@MICROS@` is one delivery).
#[derive(Default)]
struct Stamps {
    buf: Vec<u8>,
    open: bool,
    latencies: Vec<u32>,
}

impl Stamps {
    /// Takes bytes read at `now` (µs); returns true when they held the `open` event.
    fn feed(&mut self, data: &[u8], now: u64) -> bool {
        self.buf.extend_from_slice(data);
        let mut opened = false;
        if !self.open {
            let Some(pos) = self.buf.windows(11).position(|w| w == b"event: open") else {
                return false;
            };
            self.open = true;
            opened = true;
            self.buf.drain(..pos + 11);
        }
        let buf = &self.buf;
        let mut consumed = 0;
        let mut i = 0;
        while let Some(off) = buf[i..].windows(STAMP.len()).position(|w| w == STAMP) {
            let start = i + off + STAMP.len();
            let Some(end) = buf[start..].iter().position(|b| *b == b'@') else {
                break;
            };
            let sent: u64 = std::str::from_utf8(&buf[start..start + end])
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(now);
            self.latencies
                .push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
            i = start + end;
            consumed = i;
        }
        if consumed > 0 {
            self.buf.drain(..consumed);
        } else if self.buf.len() > 64 * 1024 {
            let keep = self.buf.len() - 64;
            self.buf.drain(..keep);
        }
        if self.buf.capacity() > 16 * 1024 && self.buf.len() < 1024 {
            self.buf.shrink_to(1024);
        }
        opened
    }
}

/// What a client needs: where the relay is, how to reach it, when to stop.
struct ClientSetup {
    addr: String,
    run: String,
    transport: Transport,
    /// The relay's certificate (PEM), for the TLS transports.
    ca: Option<Arc<Vec<u8>>>,
    connected: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// One SSE client: counts deliveries and records latencies.
async fn client(setup: ClientSetup) -> std::io::Result<Vec<u32>> {
    match setup.transport {
        Transport::Plain => raw_client(setup).await,
        Transport::Tls | Transport::H2 => https_client(setup).await,
    }
}

/// A plain HTTP/1.1 client on a raw socket.
async fn raw_client(setup: ClientSetup) -> std::io::Result<Vec<u32>> {
    let ClientSetup {
        addr,
        run,
        connected,
        mut stop,
        permit,
        ..
    } = setup;
    let mut permit = Some(permit);
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(
        format!(
            "GET /api/runs/{run}/events?channels=output&from=now HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut tmp = vec![0u8; 4096];
    let mut stamps = Stamps::default();
    loop {
        let n = tokio::select! {
            r = s.read(&mut tmp) => r?,
            _ = stop.changed() => break,
        };
        if n == 0 {
            break;
        }
        if stamps.feed(&tmp[..n], micros()) {
            permit.take();
            connected.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(stamps.latencies)
}

/// An HTTPS client that trusts `ca` and finds `localhost` at `addr`.
fn https(addr: &str, ca: &[u8]) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(ca).expect("the relay's certificate");
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .https_only(true)
        .resolve("localhost", addr.parse().expect("the relay's address"))
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default()
}

/// A client over the relay's TLS, with a connection of its own: HTTP/1.1 or HTTP/2 as its
/// transport says (ALPN).
async fn https_client(setup: ClientSetup) -> std::io::Result<Vec<u32>> {
    let ClientSetup {
        addr,
        run,
        transport,
        ca,
        connected,
        mut stop,
        permit,
    } = setup;
    let mut permit = Some(permit);
    let builder = https(&addr, ca.as_deref().expect("the relay's certificate"));
    let builder = match transport {
        Transport::H2 => builder,
        _ => builder.http1_only(),
    };
    let http = builder.build().map_err(std::io::Error::other)?;
    let mut resp = http
        .get(format!(
            "https://localhost:{}/api/runs/{run}/events?channels=output&from=now",
            port_of(&addr)
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .map_err(std::io::Error::other)?;
    let want = match transport {
        Transport::H2 => reqwest::Version::HTTP_2,
        _ => reqwest::Version::HTTP_11,
    };
    if resp.version() != want {
        return Err(std::io::Error::other(format!(
            "the relay answered {:?}, not {want:?}",
            resp.version()
        )));
    }
    let mut stamps = Stamps::default();
    loop {
        let chunk = tokio::select! {
            r = resp.chunk() => r.map_err(std::io::Error::other)?,
            _ = stop.changed() => break,
        };
        let Some(chunk) = chunk else { break };
        if stamps.feed(&chunk, micros()) {
            permit.take();
            connected.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(stamps.latencies)
}

/// The relay binary: this package's release build, or `AGENTRUN_RELAY_BIN`.
fn relay_binary() -> std::path::PathBuf {
    std::env::var_os("AGENTRUN_RELAY_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_agentrun-relay").into())
}

/// The sidecar binary next to the relay's (same profile), for `--tokens`.
fn sidecar_binary() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_BIN_EXE_agentrun-relay"))
        .with_file_name("agentrun-sidecar");
    if !path.exists() {
        eprintln!(
            "{} is missing: --tokens runs the real sidecar; build it first with `cargo bench -p agentrun-relay -p agentrun-sidecar --no-run`",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

/// A certificate for `localhost` and its key, for the TLS transports.
struct Cert {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pem: Arc<Vec<u8>>,
}

fn localhost_cert() -> Cert {
    let dir = tempfile::tempdir().expect("temporary directory");
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .expect("a self-signed certificate");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let pem = generated.cert.pem().into_bytes();
    std::fs::write(&cert, &pem).expect("write the certificate");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write the key");
    Cert {
        _dir: dir,
        cert,
        key,
        pem: Arc::new(pem),
    }
}

/// Starts a relay process on a free port (HTTPS with `cert`) and waits until it is ready.
async fn start_relay(url: &str, cert: Option<&Cert>) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(relay_binary());
    command.args(["--redis-url", url, "--listen", &addr]);
    if let Some(c) = cert {
        command.arg("--tls-cert").arg(&c.cert);
        command.arg("--tls-key").arg(&c.key);
    }
    let relay: Child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agentrun-relay");
    let (http, ready) = match cert {
        Some(c) => (
            https(&addr, &c.pem).build().expect("an HTTPS client"),
            format!("https://localhost:{}/readyz", port_of(&addr)),
        ),
        None => (reqwest::Client::new(), format!("http://{addr}/readyz")),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(&ready)
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "relay did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (relay, addr)
}

/// Publishes `rate` entries per second to every run for `seconds`, from `publishers`
/// connections (each with its share of the runs, one pipeline per tick, their ticks spread over
/// the period); returns how many were published. Runs on the publisher's own runtime.
async fn publish(
    settings: RedisSettings,
    runs: Vec<RunId>,
    rate: u64,
    seconds: u64,
    publishers: usize,
    batch: u64,
) -> u64 {
    let publisher = Publisher::new(PublishOptions {
        publish_command: settings.publish_command(),
        ..Default::default()
    });
    let stream = StreamName::Output(Variation::new("a").unwrap());
    let ticks = rate * seconds;
    let period = Duration::from_micros(1_000_000 / rate.max(1));
    let publishers = publishers.clamp(1, runs.len().max(1));
    let batch = batch.clamp(1, rate.max(1));
    let (ticks, period) = (ticks / batch, period * batch as u32);
    let mut conns = Vec::new();
    for _ in 0..publishers {
        conns.push(settings.connect().await.expect("connect to Redis"));
    }
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (k, conn) in conns.into_iter().enumerate() {
        let mine: Vec<RunId> = runs.iter().skip(k).step_by(publishers).cloned().collect();
        let (publisher, stream) = (publisher.clone(), stream.clone());
        let first = started + period * k as u32 / publishers as u32;
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval_at(first, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut published = 0u64;
            for tick in 0..ticks {
                interval.tick().await;
                let futs = mine.iter().map(|r| {
                    let (mut c, publisher, stream) = (conn.clone(), &publisher, &stream);
                    async move {
                        let entries: Vec<NewEntry> = (1..=batch)
                            .map(|i| NewEntry {
                                pseq: tick * batch + i,
                                ts: agentrun_protocol::now_ms(),
                                kind: EntryType::Output,
                                content: Bytes::from(format!("T@{}@", micros())),
                                meta: None,
                            })
                            .collect();
                        publisher
                            .publish(
                                &mut c,
                                r,
                                Batch {
                                    stream,
                                    producer: "bench",
                                    entries: &entries,
                                },
                            )
                            .await
                    }
                });
                for r in futures::future::join_all(futs).await {
                    r.expect("publish");
                    published += batch;
                }
            }
            published
        }));
    }
    let mut published = 0;
    for t in tasks {
        published += t.await.expect("publisher task");
    }
    published
}

/// The agent of `--tokens` (this program, run by the sidecar): waits until `go` exists, then
/// writes `rate` lines per second for `seconds`, each `T@MICROS@` and a few words.
fn agent(args: &[String]) {
    use std::io::Write;
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(500);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let go = args.get(2).cloned().unwrap_or_default();
    while !std::path::Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    for i in 0..rate * secs {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let _ = writeln!(out, "T@{}@ the next few tokens", micros());
        let _ = out.flush();
    }
}

/// Starts `agentrun-sidecar run` for `run` with this program as its agent (see [`agent`]).
fn start_sidecar(url: &str, run: &RunId, rate: u64, seconds: u64, go: &std::path::Path) -> Child {
    Command::new(sidecar_binary())
        .args(["run", "--redis-url", url, "--run-id", run.as_str()])
        // No metrics entries: only the agent's lines are timed.
        .args(["--quiet", "--metrics-interval-seconds", "0", "--"])
        .arg(std::env::current_exe().expect("bench path"))
        .args([rate.to_string(), seconds.to_string()])
        .arg(go)
        .env("AGENTRUN_BENCH_AGENT", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start agentrun-sidecar")
}

async fn run_scenario(
    target: &Target,
    sc: Scenario,
    publisher_rt: &tokio::runtime::Handle,
) -> Report {
    let cert = (sc.transport != Transport::Plain).then(localhost_cert);
    let mut relays = Vec::new();
    for _ in 0..sc.relays.max(1) {
        relays.push(start_relay(&target.url(), cert.as_ref()).await);
    }
    let pids: Vec<String> = relays.iter().map(|(r, _)| r.id().to_string()).collect();
    let rss = || -> u64 { relays.iter().map(|(r, _)| rss_kib(r.id())).sum() };
    let relays_cpu = || -> f64 { pids.iter().map(|p| cpu_secs(p)).sum() };
    let redis_pids = target.pids();
    let redis_cpu = || -> f64 { redis_pids.iter().map(|p| cpu_secs(p)).sum() };

    let settings = target.settings();
    let mut conn = settings.connect().await.expect("connect to Redis");
    let tag = micros();
    let runs: Vec<RunId> = (0..sc.runs)
        .map(|i| RunId::new(format!("bench-{tag}-{}-{i}", sc.runs)).unwrap())
        .collect();
    // `--tokens`: the sidecar registers its run; its agent waits for `go`.
    let go = std::env::temp_dir().join(format!("agentrun-fanout-go-{}-{tag}", std::process::id()));
    let mut sidecar = None;
    if sc.tokens {
        sidecar = Some(start_sidecar(
            &target.url(),
            &runs[0],
            sc.rate,
            sc.seconds,
            &go,
        ));
        let http = reqwest::Client::new();
        let url = format!("http://{}/api/runs/{}", relays[0].1, runs[0]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .is_some_and(|v| v["variations"].as_object().is_some_and(|o| !o.is_empty())),
                _ => false,
            };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar did not register its run"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        for r in &runs {
            register_run(
                &mut conn,
                r,
                agentrun_protocol::now_ms(),
                &[(agentrun_protocol::state_hash::VARIATIONS, "a".into())],
            )
            .await
            .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_base_kib = rss();

    let connected = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(sc.clients);
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..sc.clients {
        let run = runs[i % runs.len()].as_str().to_owned();
        let addr = relays[i % relays.len()].1.clone();
        let connected = connected.clone();
        let stop_rx = stop_rx.clone();
        // At most 256 connections in their handshake at once.
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(client(ClientSetup {
            addr,
            run,
            transport: sc.transport,
            ca: cert.as_ref().map(|c| c.pem.clone()),
            connected,
            stop: stop_rx,
            permit,
        })));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while connected.load(Ordering::SeqCst) < sc.clients {
        assert!(
            Instant::now() < deadline,
            "only {} of {} clients connected",
            connected.load(Ordering::SeqCst),
            sc.clients
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_connected_kib = rss();

    let send_started = Instant::now();
    let relay_cpu_before = relays_cpu();
    let bench_cpu_before = cpu_secs("self");
    let redis_cpu_before = redis_cpu();
    let (published, expected) = if sc.idle {
        tokio::time::sleep(Duration::from_secs(sc.seconds.min(5))).await;
        (0, 0)
    } else if let Some(child) = &mut sidecar {
        std::fs::write(&go, b"go").expect("write the agent's go file");
        let deadline = Instant::now() + Duration::from_secs(sc.seconds + 60);
        while child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "the sidecar did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines = sc.rate * sc.seconds;
        (lines, lines * sc.clients as u64)
    } else {
        let published = publisher_rt
            .spawn(publish(
                settings.clone(),
                runs.clone(),
                sc.rate,
                sc.seconds,
                sc.publishers,
                sc.batch,
            ))
            .await
            .expect("publisher");
        (published, published * (sc.clients / sc.runs) as u64)
    };
    let send_secs = send_started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&go);
    // Let the last deliveries arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let relay_cpu = relays_cpu() - relay_cpu_before;
    let client_cpu = cpu_secs("self") - bench_cpu_before;
    let redis_cpu = redis_cpu() - redis_cpu_before;
    let rss_end_kib = rss();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = stop_tx.send(true);
    let mut all: Vec<u32> = Vec::with_capacity(expected as usize);
    for t in tasks {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(Ok(l))) = tokio::time::timeout(left.max(Duration::from_secs(1)), t).await {
            all.extend(l);
        }
    }
    let delivered = all.len() as u64;
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let idx = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[idx] as f64 / 1000.0
    };
    let report = Report {
        scenario: sc,
        connect_secs,
        rss_base_kib,
        rss_connected_kib,
        rss_end_kib,
        published,
        expected,
        delivered,
        send_secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        relay_cpu,
        client_cpu,
        redis_cpu,
        load: load.split_whitespace().next().unwrap_or("?").to_owned(),
    };
    if let Some(mut s) = sidecar {
        let _ = s.kill();
        let _ = s.wait();
    }
    for (mut relay, _) in relays {
        let _ = relay.kill();
        let _ = relay.wait();
    }
    report
}

fn print(r: &Report) {
    let sc = &r.scenario;
    let per_conn = |rss: u64| (rss.saturating_sub(r.rss_base_kib)) as f64 / sc.clients as f64;
    let us_per_delivery = if r.delivered > 0 {
        format!("{:.1}", r.relay_cpu * 1e6 / r.delivered as f64)
    } else {
        "-".into()
    };
    println!(
        "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} of {} | {:.1} | {:.1} | {} | {} | {:.1} s |",
        sc.describe(),
        if sc.idle {
            "none".to_owned()
        } else {
            match sc.batch {
                1 => format!("{} entries/s per run, {} s", sc.rate, sc.seconds),
                b => format!(
                    "{} entries/s per run, {b} per publish, {} s",
                    sc.rate, sc.seconds
                ),
            }
        },
        r.published as f64 / r.send_secs,
        r.delivered as f64 / r.send_secs,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.expected.saturating_sub(r.delivered),
        r.expected,
        per_conn(r.rss_connected_kib),
        per_conn(r.rss_end_kib),
        us_per_delivery,
        r.load,
        r.connect_secs,
    );
    eprintln!(
        "  published {} entries in {:.1} s; expected {} deliveries, got {}; relay RSS (all relays) {} KiB base, {} KiB connected, {} KiB at the end; CPU: relays {:.2} s, this process (clients, publisher) {:.2} s, Redis {:.2} s",
        r.published,
        r.send_secs,
        r.expected,
        r.delivered,
        r.rss_base_kib,
        r.rss_connected_kib,
        r.rss_end_kib,
        r.relay_cpu,
        r.client_cpu,
        r.redis_cpu
    );
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn has(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

fn main() {
    if std::env::var_os("AGENTRUN_BENCH_AGENT").is_some() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        agent(&args);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let base = Scenario {
        clients: 0,
        runs: 1,
        rate: 2,
        seconds: 20,
        relays: 1,
        publishers: 4,
        batch: 1,
        idle: false,
        tokens: false,
        transport: Transport::Plain,
    };
    // `cargo bench` passes --bench; ignore what is not ours.
    let scenarios = match arg(&args, "--clients") {
        Some(clients) => vec![Scenario {
            clients: clients as usize,
            runs: arg(&args, "--runs").unwrap_or(1) as usize,
            rate: arg(&args, "--rate").unwrap_or(10),
            seconds: arg(&args, "--seconds").unwrap_or(20),
            relays: arg(&args, "--relays").unwrap_or(1) as usize,
            publishers: arg(&args, "--publishers").unwrap_or(4) as usize,
            batch: arg(&args, "--batch").unwrap_or(1),
            idle: has(&args, "--idle"),
            tokens: has(&args, "--tokens"),
            transport: if has(&args, "--h2") {
                Transport::H2
            } else if has(&args, "--tls") {
                Transport::Tls
            } else {
                Transport::Plain
            },
        }],
        None => vec![
            Scenario {
                clients: 10_000,
                ..base.clone()
            },
            Scenario {
                clients: 10_000,
                runs: 1000,
                ..base.clone()
            },
            Scenario {
                clients: 4000,
                runs: 2000,
                rate: 20,
                ..base.clone()
            },
            Scenario {
                clients: 19_000,
                idle: true,
                ..base.clone()
            },
            Scenario {
                clients: 100,
                rate: 500,
                seconds: 10,
                tokens: true,
                ..base.clone()
            },
        ],
    };
    let need = scenarios
        .iter()
        .map(|s| s.clients as u64)
        .max()
        .unwrap_or(0)
        + 200;
    let limit = fd_limit();
    if limit < need {
        eprintln!(
            "the open-file limit is {limit}; this benchmark needs {need}: run it as `bash -c 'ulimit -n 20000 && cargo bench -p agentrun-relay --bench fanout'`"
        );
        std::process::exit(2);
    }
    if scenarios.iter().any(|s| s.tokens) {
        sidecar_binary();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The publisher's own thread: the clients' reads do not hold it back.
    let publisher_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("publisher runtime");
    rt.block_on(async {
        let target = match arg(&args, "--cluster") {
            Some(masters) => Target::Cluster(RedisCluster::start(masters as usize, 0).await),
            // Persisted as the chart runs it (AOF, fsync every second), not as the tests do
            // (fsync on every write, so that a kill -9 loses nothing acknowledged).
            None => Target::Server(RedisServer::start_with(&["--appendfsync", "everysec"])),
        };
        if let Target::Cluster(c) = &target {
            c.load_library().await;
        }
        println!(
            "Redis: {}; machine: {}; relay: {}",
            target.describe(),
            agentrun_protocol::testing::machine(),
            relay_binary().display()
        );
        println!(
            "| scenario | load | entries/s published | events/s delivered | p50 ms | p99 ms | max ms | lost | relay KiB/conn connected | relay KiB/conn at the end | relay CPU µs/delivery | load avg | connect time |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for sc in scenarios {
            let r = run_scenario(&target, sc, publisher_rt.handle()).await;
            print(&r);
        }
    });
}
