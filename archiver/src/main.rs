//! `agentrun-archiver --redis-url URL --store-url URL` archives finished runs;
//! `agentrun-archiver requeue-dead` puts dead letters back on the queue;
//! `agentrun-archiver catalog` lists archived runs (and `--rebuild`s the list).

use agentrun_archiver::ArchiveStore;
use agentrun_archiver::catalog::{self, CatalogFilter};
use agentrun_archiver::metrics::Metrics;
use agentrun_archiver::queue::{Archiver, QueueConfig, default_consumer, requeue_dead};
use agentrun_archiver::writer::WriteOptions;
use agentrun_protocol::RunId;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::time::Duration;

/// Copies finished runs from Redis to object storage (a folder, s3://, gs:// or az://).
#[derive(Parser, Debug)]
#[command(
    name = "agentrun-archiver",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    serve: Serve,
    #[command(flatten)]
    log: agentrun_protocol::process::LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Move dead letters (every run's, or the named runs') back to the archive queue.
    RequeueDead {
        #[command(flatten)]
        redis: agentrun_protocol::RedisArgs,
        /// Runs to requeue (default: every dead letter).
        runs: Vec<String>,
    },
    /// List archived runs, newest first (one line each: created, phase, namespace, run), or
    /// rebuild the list from the archives' manifests.
    Catalog {
        /// The archive store (as for archiving).
        #[arg(long, env = "AGENTRUN_ARCHIVE_STORE_URL")]
        store_url: String,
        /// Add every complete archive to the list first (archives made before the list
        /// existed, or a list that was lost).
        #[arg(long)]
        rebuild: bool,
        /// Only runs of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only runs that ended in this phase (succeeded, failed, stopped).
        #[arg(long)]
        phase: Option<String>,
        /// Only runs whose id holds this text (the AgentRun's name).
        #[arg(long)]
        name: Option<String>,
        /// Most runs listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Args, Debug)]
struct Serve {
    #[command(flatten)]
    redis: Option<agentrun_protocol::RedisArgs>,
    /// Where archives go: a folder (or file:///PATH), s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or
    /// az://CONTAINER/PREFIX; cloud credentials come from the usual environment variables.
    #[arg(long, env = "AGENTRUN_ARCHIVE_STORE_URL")]
    store_url: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "AGENTRUN_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    metrics_addr: SocketAddr,
    /// Consumer name in the archivers' group (default: $HOSTNAME, the pod name).
    #[arg(long, env = "AGENTRUN_ARCHIVER_CONSUMER")]
    consumer: Option<String>,
    /// Runs archived at the same time.
    #[arg(long, env = "AGENTRUN_ARCHIVER_CONCURRENCY", default_value_t = 2)]
    concurrency: usize,
    /// Seconds a request may sit idle at another archiver before it is taken over.
    #[arg(
        long,
        env = "AGENTRUN_ARCHIVER_CLAIM_IDLE_SECONDS",
        default_value_t = 60
    )]
    claim_idle_seconds: u64,
    /// Attempts per run before it goes to the dead-letter stream.
    #[arg(long, env = "AGENTRUN_ARCHIVER_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// Milliseconds to wait after the first failed attempt (doubled after each, up to a minute).
    #[arg(long, env = "AGENTRUN_ARCHIVER_BACKOFF_MS", default_value_t = 1000)]
    backoff_ms: u64,
    /// Upper bound on bytes written to the store per second, per run (0: none).
    #[arg(
        long,
        env = "AGENTRUN_ARCHIVER_MAX_WRITE_BYTES_PER_SECOND",
        default_value_t = 0
    )]
    max_write_bytes_per_second: u64,
    /// On SIGTERM, seconds a run being archived may take to finish (it is otherwise left to
    /// the next archiver).
    #[arg(long, env = "AGENTRUN_DRAIN_TIMEOUT_SECONDS", default_value_t = 20)]
    drain_timeout_seconds: u64,
}

fn main() {
    let cli = Cli::parse();
    cli.log.init("info");
    let runtime = agentrun_protocol::process::runtime("agentrun-archiver");
    if let Err(e) = runtime.block_on(run_command(cli)) {
        eprintln!("agentrun-archiver: {e:#}");
        std::process::exit(2);
    }
}

/// Archives until SIGTERM, or runs `requeue-dead` or `catalog`.
async fn run_command(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::RequeueDead { redis, runs }) = cli.command {
        let mut conn = redis.settings()?.connect().await?;
        let runs: Vec<RunId> = runs.into_iter().map(RunId::new).collect::<Result<_, _>>()?;
        let mut moved = Vec::new();
        if runs.is_empty() {
            moved = requeue_dead(&mut conn, None).await?;
        }
        for run in &runs {
            moved.extend(requeue_dead(&mut conn, Some(run)).await?);
        }
        println!(
            "requeued {} dead letter(s): {}",
            moved.len(),
            moved.join(", ")
        );
        return Ok(());
    }
    if let Some(Command::Catalog {
        store_url,
        rebuild,
        namespace,
        phase,
        name,
        limit,
    }) = cli.command
    {
        let store = ArchiveStore::from_url(&store_url)?;
        if rebuild {
            let n = catalog::rebuild(&store).await?;
            eprintln!("the catalog lists {n} archived run(s)");
        }
        let filter = CatalogFilter {
            namespace,
            phase,
            name,
        };
        let page = catalog::list(&store, &filter, None, limit.max(1)).await?;
        for e in page.runs {
            let ns = if e.namespace.is_empty() {
                "-"
            } else {
                &e.namespace
            };
            println!("{}\t{}\t{}\t{}", e.created_ms, e.phase, ns, e.run);
        }
        return Ok(());
    }
    let serve = cli.serve;
    let redis = serve
        .redis
        .context("--redis-url (or AGENTRUN_REDIS_URL) is required")?;
    let store_url = serve.store_url.context(
        "--store-url (or AGENTRUN_ARCHIVE_STORE_URL) is required: a folder, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX",
    )?;
    let settings = redis.settings()?;
    let store = ArchiveStore::from_url(&store_url)?;
    let conn = settings.connect().await?;
    let metrics = Metrics::default();
    let addr = agentrun_protocol::telemetry::serve_health(serve.metrics_addr, metrics.clone())
        .await
        .with_context(|| {
            format!(
                "cannot serve metrics on {}; pick another --metrics-addr",
                serve.metrics_addr
            )
        })?;
    let config = QueueConfig {
        consumer: serve.consumer.unwrap_or_else(default_consumer),
        workers: serve.concurrency.max(1),
        claim_idle: Duration::from_secs(serve.claim_idle_seconds.max(1)),
        max_attempts: serve.max_attempts.max(1),
        backoff: Duration::from_millis(serve.backoff_ms),
        drain_timeout: Duration::from_secs(serve.drain_timeout_seconds),
        write: WriteOptions {
            max_write_bytes_per_second: (serve.max_write_bytes_per_second > 0)
                .then_some(serve.max_write_bytes_per_second),
            ..WriteOptions::default()
        },
        ..QueueConfig::default()
    };
    tracing::info!(
        redis = %settings.target(),
        store = %store_url,
        consumer = %config.consumer,
        metrics = %addr,
        "agentrun-archiver serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let archiver = Archiver::new(settings, conn, store, config, metrics);
    let work = tokio::spawn(archiver.run(stop_rx));
    agentrun_protocol::process::shutdown_signal().await;
    tracing::info!("finishing the runs being archived, then exiting");
    let _ = stop_tx.send(true);
    let _ = work.await;
    tracing::info!("agentrun-archiver stopped");
    Ok(())
}
