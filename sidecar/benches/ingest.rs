//! Ingest benchmark: agent → entrypoint → sidecar → Redis stream, and agent write → Pub/Sub
//! delivery latency. Run with `cargo bench -p agentrun-sidecar --bench ingest`.
//!
//! Starts its own `redis-server` (persistence off) on a free port, measures
//! `redis-benchmark -P 64` XADD on it as the baseline, then drives the real `agentrun-sidecar
//! run` binary. The agent is this same program, re-run with `AGENTRUN_BENCH_AGENT` set.
//!
//! `AGENTRUN_BENCH_ONLY=durability` measures the `--durability` levels instead (shorter runs):
//! `none`, `replicas=1` against a local replica, and `aof` where Redis has `WAITAOF` (7.2+),
//! else `none` on a master with `appendfsync always` as the closest figure.

use agentrun_protocol::live;
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{RunId, StreamName, Variation, now_ms};
use futures::StreamExt;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SIDECAR: &str = env!("CARGO_BIN_EXE_agentrun-sidecar");
const LINE: usize = 100;

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// The agent side: `flood N` writes N 100-byte lines flat out; `paced RATE SECONDS` writes
/// lines at RATE per second, each starting with the microsecond it was written.
fn agent(mode: &str, args: &[String]) {
    let mut out = std::io::stdout().lock();
    match mode {
        "flood" => {
            let n: usize = args[0].parse().unwrap_or(0);
            let mut line = vec![b'x'; LINE];
            line[LINE - 1] = b'\n';
            let mut block = Vec::with_capacity(LINE * 1000);
            for _ in 0..1000 {
                block.extend_from_slice(&line);
            }
            for _ in 0..n / 1000 {
                out.write_all(&block).unwrap();
            }
            out.flush().unwrap();
        }
        "paced" => {
            let rate: u64 = args[0].parse().unwrap_or(10_000);
            let secs: u64 = args[1].parse().unwrap_or(5);
            let start = Instant::now();
            let total = rate * secs;
            for i in 0..total {
                // Write line i at its scheduled time.
                let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut line = format!("{} ", now_us()).into_bytes();
                line.resize(LINE - 1, b'.');
                line.push(b'\n');
                out.write_all(&line).unwrap();
                out.flush().unwrap();
            }
        }
        _ => {}
    }
}

fn redis_benchmark_xadd(port: u16) -> Option<f64> {
    let value = "x".repeat(LINE);
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-P",
            "64",
            "-n",
            "1000000",
            "-q",
            "XADD",
            "bench:baseline",
            "*",
            "content",
        ])
        .arg(&value)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "XADD bench:baseline * content xxx...: 512345.67 requests per second, p50=..."
    let tail = text
        .rsplit(':')
        .find(|s| s.contains("requests per second"))?;
    tail.split_whitespace().next()?.parse().ok()
}

fn sidecar_run_durable(
    redis: &RedisServer,
    run: &RunId,
    durability: &str,
    agent_args: &[&str],
) -> Command {
    let me = std::env::current_exe().expect("bench path");
    let mut cmd = Command::new(SIDECAR);
    cmd.args([
        "run",
        "--quiet",
        "--metrics-interval-seconds",
        "0",
        "--stream-max-len",
        "1000000",
        "--redis-url",
    ])
    .arg(redis.url())
    .args(["--run-id", run.as_str(), "--durability", durability, "--"])
    .arg(me)
    .args(agent_args)
    .env("AGENTRUN_BENCH_AGENT", "1")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null());
    cmd
}

async fn stream_bytes(redis: &RedisServer, key: &str) -> u64 {
    agentrun_protocol::testing::stream_bytes(&mut redis.conn().await, key).await
}

fn percentile(sorted: &[u128], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn bench() {
    let redis = RedisServer::start_with(&["--appendonly", "no"]);
    println!("# agentrun ingest benchmark");
    println!("machine: {}", agentrun_protocol::testing::machine());

    let baseline = redis_benchmark_xadd(redis.port());
    match baseline {
        Some(b) => {
            println!("baseline: redis-benchmark -P 64 XADD (100-byte field): {b:.0} requests/s")
        }
        None => println!("baseline: redis-benchmark not available"),
    }

    let only = std::env::var("AGENTRUN_BENCH_ONLY").unwrap_or_default();
    if only == "durability" {
        drop(redis);
        durability_levels().await;
        return;
    }
    if only != "latency" {
        throughput(&redis, "none", 2_000_000, 3, baseline).await;
    }
    if only != "throughput" {
        latency(&redis, "none", 10).await;
    }
}

/// Ingest and latency for each durability level, each against Redis servers of its own.
async fn durability_levels() {
    let version = redis_version();
    println!(
        "redis-server {version}; durability levels (500,000 lines best of 2; 10,000 lines/s for 5 s)"
    );
    let (lines, attempts, seconds) = (500_000, 2, 5);
    {
        let master = RedisServer::start_with(&["--appendonly", "no"]);
        println!("## none (master without persistence)");
        throughput(&master, "none", lines, attempts, None).await;
        latency(&master, "none", seconds).await;
    }
    {
        let master = RedisServer::start_with(&["--appendonly", "no"]);
        let port = master.port().to_string();
        let replica =
            RedisServer::start_with(&["--appendonly", "no", "--replicaof", "127.0.0.1", &port]);
        agentrun_protocol::testing::wait_for("the replica", Duration::from_secs(30), || {
            let port = replica.port();
            async move {
                agentrun_protocol::testing::info_replication(port)
                    .await
                    .contains("master_link_status:up")
                    .then_some(())
            }
        })
        .await;
        println!("## replicas=1 (WAIT 1 1000, one local replica)");
        throughput(&master, "replicas=1", lines, attempts, None).await;
        latency(&master, "replicas=1", seconds).await;
    }
    {
        let master = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let major_minor: Vec<u32> = version
            .split('.')
            .take(2)
            .filter_map(|p| p.parse().ok())
            .collect();
        if major_minor.as_slice() >= [7, 2].as_slice() {
            println!("## aof (WAITAOF 1 0 1000, appendfsync everysec)");
            let mut c = master.conn().await;
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("appendfsync")
                .arg("everysec")
                .query_async(&mut c)
                .await
                .unwrap();
            throughput(&master, "aof", lines, attempts, None).await;
            latency(&master, "aof", seconds).await;
        } else {
            println!(
                "## aof: this Redis ({version}) has no WAITAOF; closest figure: none on a master with appendonly yes, appendfsync always"
            );
            throughput(&master, "none", lines, attempts, None).await;
            latency(&master, "none", seconds).await;
        }
    }
}

fn redis_version() -> String {
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("unknown")
        .to_owned()
}

async fn throughput(
    redis: &RedisServer,
    durability: &str,
    lines: usize,
    attempts: usize,
    baseline: Option<f64>,
) {
    let mut best = f64::MAX;
    for attempt in 0..attempts {
        let run = RunId::new(format!("bench-flood-{attempt}-{}", now_ms())).unwrap();
        let started = Instant::now();
        let status = sidecar_run_durable(redis, &run, durability, &["flood", &lines.to_string()])
            .status()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(status.success());
        let key = StreamName::Output(Variation::default_name()).key(&run);
        let bytes = stream_bytes(redis, &key).await;
        assert_eq!(
            bytes,
            (lines * LINE) as u64,
            "every byte must be in the stream"
        );
        best = best.min(secs);
    }
    let lines_per_s = lines as f64 / best;
    println!(
        "ingest: {lines} lines of {LINE} bytes, agent start to all in Redis: best of {attempts} {best:.2} s = {lines_per_s:.0} lines/s, {:.1} MB/s",
        (lines * LINE) as f64 / best / 1e6
    );
    if let Some(b) = baseline {
        println!("ingest / baseline: {:.2}", lines_per_s / b);
    }
}

async fn latency(redis: &RedisServer, durability: &str, seconds: u64) {
    // 10,000 lines/s for `seconds`: agent write → Pub/Sub delivery.
    let want = 10_000 * seconds as usize;
    let run = RunId::new(format!("bench-paced-{}", now_ms())).unwrap();
    let key = StreamName::Output(Variation::default_name()).key(&run);
    let mut pubsub = redis.settings().pubsub().await.unwrap();
    pubsub.subscribe(&key).await.unwrap();
    let mut live = pubsub.into_on_message();
    let mut child = tokio::process::Command::from(sidecar_run_durable(
        redis,
        &run,
        durability,
        &["paced", "10000", &seconds.to_string()],
    ))
    .spawn()
    .unwrap();
    let mut latencies: Vec<u128> = Vec::with_capacity(want);
    let collect = async {
        while let Some(msg) = live.next().await {
            let received = now_us();
            let entry = live::decode(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
            for line in entry
                .content
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
            {
                let stamp = line
                    .split(|b| *b == b' ')
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u128>().ok());
                if let Some(t) = stamp {
                    latencies.push(received.saturating_sub(t));
                }
            }
            if latencies.len() >= want {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .ok();
    let _ = child.wait().await;
    latencies.sort_unstable();
    println!(
        "latency at 10,000 lines/s ({} lines): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
    );
}

fn main() {
    if std::env::var_os("AGENTRUN_BENCH_AGENT").is_some() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let Some((mode, rest)) = args.split_first() {
            agent(mode, rest);
        }
        return;
    }
    // `cargo test --benches` runs benches in test mode: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(bench());
}
