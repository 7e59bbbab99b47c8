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
//! Without arguments it runs two scenarios: 5,000 clients on one run, and 5,000 clients over
//! 100 runs (50 each).
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

    fn describe(&self) -> String {
        match self {
            Target::Server(_) => "one redis-server".into(),
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

/// One SSE client on a raw socket: counts deliveries and records latencies.
async fn client(
    addr: String,
    run: String,
    connected: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> std::io::Result<Vec<u32>> {
    let mut permit = Some(permit);
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(
        format!(
            "GET /api/runs/{run}/events?channels=output&from=now HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 4096];
    let mut latencies = Vec::new();
    let mut open = false;
    let marker = b"\"content\":\"t=";
    let mut stop = stop;
    loop {
        let n = tokio::select! {
            r = s.read(&mut tmp) => r?,
            _ = stop.changed() => break,
        };
        if n == 0 {
            break;
        }
        let now = micros();
        buf.extend_from_slice(&tmp[..n]);
        if !open {
            if let Some(pos) = buf.windows(11).position(|w| w == b"event: open") {
                open = true;
                permit.take();
                connected.fetch_add(1, Ordering::SeqCst);
                buf.drain(..pos + 11);
            } else {
                continue;
            }
        }
        let mut consumed = 0;
        let mut i = 0;
        while let Some(off) = buf[i..].windows(marker.len()).position(|w| w == marker) {
            let start = i + off + marker.len();
            let Some(end) = buf[start..].iter().position(|b| *b == b'"') else {
                break;
            };
            let sent: u64 = std::str::from_utf8(&buf[start..start + end])
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(now);
            latencies.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
            i = start + end;
            consumed = i;
        }
        if consumed > 0 {
            buf.drain(..consumed);
        } else if buf.len() > 64 * 1024 {
            let keep = buf.len() - 64;
            buf.drain(..keep);
        }
    }
    Ok(latencies)
}

/// Starts a relay process on a free port and waits until it is ready.
async fn start_relay(url: &str) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let relay: Child = Command::new(env!("CARGO_BIN_EXE_agentrun-relay"))
        .args(["--redis-url", url, "--listen", &addr])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agentrun-relay");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("http://{addr}/readyz"))
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

async fn run_scenario(target: &Target, sc: Scenario) -> Report {
    let mut relays = Vec::new();
    for _ in 0..sc.relays.max(1) {
        relays.push(start_relay(&target.url()).await);
    }
    let pids: Vec<String> = relays.iter().map(|(r, _)| r.id().to_string()).collect();
    let rss = || -> u64 { relays.iter().map(|(r, _)| rss_kib(r.id())).sum() };
    let relays_cpu = || -> f64 { pids.iter().map(|p| cpu_secs(p)).sum() };

    let settings = target.settings();
    let mut conn = settings.connect().await.expect("connect to Redis");
    let runs: Vec<RunId> = (0..sc.runs)
        .map(|i| RunId::new(format!("bench-{}-{i}", sc.runs)).unwrap())
        .collect();
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
    // Warm up: one connection per run, then measure the base.
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
        tasks.push(tokio::spawn(client(addr, run, connected, stop_rx, permit)));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected_kib = rss();

    // Publish: `rate` entries per second to every run.
    let publisher = Publisher::new(PublishOptions {
        publish_command: settings.publish_command(),
        ..Default::default()
    });
    let stream = StreamName::Output(Variation::new("a").unwrap());
    let ticks = sc.rate * sc.seconds;
    let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / sc.rate.max(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let send_started = Instant::now();
    let relay_cpu_before = relays_cpu();
    let bench_cpu_before = cpu_secs("self");
    let mut published = 0u64;
    for pseq in 1..=ticks {
        interval.tick().await;
        let mut futs = Vec::with_capacity(runs.len());
        for r in &runs {
            let mut c = conn.clone();
            let publisher = publisher.clone();
            let stream = stream.clone();
            let r = r.clone();
            futs.push(async move {
                let entry = NewEntry {
                    pseq,
                    ts: agentrun_protocol::now_ms(),
                    kind: EntryType::Output,
                    content: Bytes::from(format!("t={}", micros())),
                    meta: None,
                };
                publisher
                    .publish(
                        &mut c,
                        &r,
                        Batch {
                            stream: &stream,
                            producer: "bench",
                            entries: std::slice::from_ref(&entry),
                        },
                    )
                    .await
                    .map(|_| ())
            });
        }
        for r in futures::future::join_all(futs).await {
            r.expect("publish");
            published += 1;
        }
    }
    let send_secs = send_started.elapsed().as_secs_f64();
    let relay_cpu = relays_cpu() - relay_cpu_before;
    let client_cpu = cpu_secs("self") - bench_cpu_before;
    let expected = ticks * sc.clients as u64;
    // Let the last deliveries arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_end_kib = rss();
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
    };
    for (mut relay, _) in relays {
        let _ = relay.kill();
        let _ = relay.wait();
    }
    report
}

fn print(r: &Report) {
    let sc = &r.scenario;
    let per_conn = |rss: u64| (rss.saturating_sub(r.rss_base_kib)) as f64 / sc.clients as f64;
    println!(
        "| {} clients on {} run(s), {} relay(s) | {} entries/s per run, {} s | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.1} KiB | {:.1} KiB | {:.1} s |",
        sc.clients,
        sc.runs,
        sc.relays,
        sc.rate,
        sc.seconds,
        r.delivered as f64 / r.send_secs,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.expected.saturating_sub(r.delivered),
        per_conn(r.rss_connected_kib),
        per_conn(r.rss_end_kib),
        r.connect_secs,
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("  load average while running: {}", load.trim());
    eprintln!(
        "  published {} entries; expected {} deliveries, got {}; relay RSS (all relays) {} KiB base, {} KiB connected, {} KiB after publishing; CPU while publishing {:.1} s: relays {:.2} s, clients and Redis client {:.2} s",
        r.published,
        r.expected,
        r.delivered,
        r.rss_base_kib,
        r.rss_connected_kib,
        r.rss_end_kib,
        r.send_secs,
        r.relay_cpu,
        r.client_cpu
    );
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; ignore what is not ours.
    let scenarios = match arg(&args, "--clients") {
        Some(clients) => vec![Scenario {
            clients: clients as usize,
            runs: arg(&args, "--runs").unwrap_or(1) as usize,
            rate: arg(&args, "--rate").unwrap_or(10),
            seconds: arg(&args, "--seconds").unwrap_or(20),
            relays: arg(&args, "--relays").unwrap_or(1) as usize,
        }],
        None => vec![
            Scenario {
                clients: 5000,
                runs: 1,
                rate: 10,
                seconds: 20,
                relays: 1,
            },
            Scenario {
                clients: 5000,
                runs: 100,
                rate: 10,
                seconds: 20,
                relays: 1,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let target = match arg(&args, "--cluster") {
            Some(masters) => Target::Cluster(RedisCluster::start(masters as usize, 0).await),
            None => Target::Server(RedisServer::start()),
        };
        if let Target::Cluster(c) = &target {
            c.load_library().await;
        }
        println!("Redis: {}; machine: {}", target.describe(), agentrun_protocol::testing::machine());
        println!(
            "| scenario | load | events/s delivered | p50 ms | p99 ms | max ms | lost | relay KiB/conn idle | relay KiB/conn after load | connect time |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for sc in scenarios {
            let r = run_scenario(&target, sc).await;
            print(&r);
        }
    });
}
