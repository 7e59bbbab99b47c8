//! Ingest on a Redis Cluster, one shard against three: many runs at once, each a real
//! `agentrun-sidecar run` whose agent writes 100-byte lines flat out, against a cluster of one
//! master and against one of three (no replicas, persistence off, loopback). Reports lines/s
//! in all and, per master, the Redis CPU it spent (`INFO cpu`, user + sys), the keys it holds
//! and the publish calls it ran, so that the division of the work shows even where the cores
//! cannot grow. Run with `cargo bench -p agentrun-sidecar --bench shards`
//! (`AGENTRUN_BENCH_RUNS`, `AGENTRUN_BENCH_LINES`: runs and lines per run, default 12 and
//! 200,000).

use agentrun_protocol::testing::{RedisCluster, SlotRange, direct, stream_bytes};
use agentrun_protocol::topology::key_slot;
use agentrun_protocol::{RunId, StreamName, Variation};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Instant;

const SIDECAR: &str = env!("CARGO_BIN_EXE_agentrun-sidecar");
const LINE: usize = 100;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `INFO` field `name` (a number) of the server on `port`.
async fn info_number(port: u16, section: &str, name: &str) -> f64 {
    let mut c = direct(port).await.expect("node answers");
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut c)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds the server on `port` has used (user + sys, main thread and children).
async fn cpu_seconds(port: u16) -> f64 {
    info_number(port, "cpu", "used_cpu_user").await + info_number(port, "cpu", "used_cpu_sys").await
}

/// Calls of `FCALL` the server on `port` has run.
async fn fcalls(port: u16) -> u64 {
    let mut c = direct(port).await.expect("node answers");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

async fn keys(port: u16) -> u64 {
    let mut c = direct(port).await.expect("node answers");
    redis::cmd("DBSIZE")
        .query_async(&mut c)
        .await
        .expect("DBSIZE")
}

/// `runs` run ids spread evenly over the masters: master port -> its runs.
async fn runs_per_master(
    cluster: &RedisCluster,
    runs: usize,
    tag: &str,
) -> BTreeMap<u16, Vec<RunId>> {
    let ranges = RedisCluster::slot_ranges(cluster.any_port()).await;
    let masters = cluster.masters().await;
    let per = runs.div_ceil(masters.len());
    let mut out: BTreeMap<u16, Vec<RunId>> = masters.iter().map(|&m| (m, Vec::new())).collect();
    let mut i = 0u64;
    while out.values().map(Vec::len).sum::<usize>() < runs {
        i += 1;
        let run = RunId::new(format!("{tag}-{i}")).unwrap();
        let master = SlotRange::serving(&ranges, key_slot(run.state_key().as_bytes())).master;
        let list = out.get_mut(&master).unwrap();
        if list.len() < per {
            list.push(run);
        }
    }
    out
}

async fn measure(masters: usize, runs: usize, lines: usize) {
    let cluster = RedisCluster::start(masters, 0).await;
    cluster.load_library().await;
    let url = cluster.url();
    let placement = runs_per_master(&cluster, runs, &format!("shards{masters}")).await;
    let ports: Vec<u16> = placement.keys().copied().collect();
    let mut cpu_before = Vec::new();
    let mut fcall_before = Vec::new();
    for &p in &ports {
        cpu_before.push(cpu_seconds(p).await);
        fcall_before.push(fcalls(p).await);
    }
    let line = "x".repeat(LINE - 1);
    let agent = format!("yes {line} | head -n {lines}");
    let started = Instant::now();
    let mut children = Vec::new();
    for run in placement.values().flatten() {
        let child = agentrun_protocol::testing::dying_with_test(SIDECAR)
            .args(["run", "--quiet", "--metrics-interval-seconds", "0"])
            .args(["--stream-max-len", "10000000", "--redis-url", &url])
            .args(["--run-id", run.as_str(), "--", "sh", "-c", &agent])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start agentrun-sidecar");
        children.push(child);
    }
    for mut child in children {
        assert!(child.wait().expect("sidecar").success(), "a sidecar failed");
    }
    let secs = started.elapsed().as_secs_f64();
    let mut conn = cluster.settings().connect().await.unwrap();
    for run in placement.values().flatten() {
        let key = StreamName::Output(Variation::default_name()).key(run);
        assert_eq!(
            stream_bytes(&mut conn, &key).await,
            (lines * LINE) as u64,
            "every byte of {run} is in its stream"
        );
    }
    let total = runs * lines;
    println!(
        "## {masters} shard(s): {runs} runs x {lines} lines of {LINE} bytes at once: {secs:.2} s = {:.0} lines/s in all",
        total as f64 / secs
    );
    let mut busiest: f64 = 0.0;
    for (i, (&port, on)) in placement.iter().enumerate() {
        let cpu = cpu_seconds(port).await - cpu_before[i];
        busiest = busiest.max(cpu);
        println!(
            "   master {port}: {} runs, {} keys, {} publish calls, Redis CPU {cpu:.2} s ({:.0}% of the wall time)",
            on.len(),
            keys(port).await,
            fcalls(port).await - fcall_before[i],
            100.0 * cpu / secs
        );
    }
    println!(
        "   Redis capacity (lines per CPU-second of the busiest master, what it could ingest with a core of its own): {:.0} lines/s",
        total as f64 / busiest
    );
}

fn main() {
    // `cargo test --benches` runs benches in test mode: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let runs = env_or("AGENTRUN_BENCH_RUNS", 12);
    let lines = env_or("AGENTRUN_BENCH_LINES", 200_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        println!("# agentrun ingest on Redis Cluster, one shard vs three");
        println!("machine: {}", agentrun_protocol::testing::machine());
        measure(1, runs, lines).await;
        measure(3, runs, lines).await;
    });
}
