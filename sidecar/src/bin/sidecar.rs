//! `agentrun-sidecar serve|run|install-entrypoint`

use agentrun_protocol::durability::Durability;
use agentrun_protocol::{RunId, Variation};
use agentrun_sidecar::local::{LocalRun, run};
use agentrun_sidecar::server::{Sidecar, SidecarConfig};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Publishes an agent's output, logs and status to Redis and carries control messages back.
#[derive(Parser, Debug)]
#[command(name = "agentrun-sidecar", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: agentrun_protocol::process::LogArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the entrypoint of one agent container (the native sidecar in an agent pod).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Unix socket the entrypoint connects to.
        #[arg(
            long,
            env = "AGENTRUN_SOCKET",
            default_value = "/agentrun/agentrun.sock"
        )]
        socket: PathBuf,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, env = "AGENTRUN_METRICS_ADDR", default_value = "0.0.0.0:9464")]
        metrics_addr: SocketAddr,
        /// A directory only this container mounts, where the sidecar keeps the key it handed to
        /// the entrypoint, so that a restarted sidecar is joined again by the running entrypoint.
        #[arg(long, env = "AGENTRUN_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Run CMD locally and publish its output, with no Kubernetes; exits with CMD's exit code.
    Run {
        #[command(flatten)]
        common: Common,
        /// Serve /metrics, /healthz and /readyz on this address too.
        #[arg(long, env = "AGENTRUN_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Seconds between SIGTERM and SIGKILL when the agent is stopped.
        #[arg(long, default_value_t = 10)]
        stop_grace_seconds: u64,
        /// Do not copy the agent's output to this terminal.
        #[arg(long)]
        quiet: bool,
        /// The agent's command and arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Copy the agentrun-entrypoint binary into DIR (the tools init container does this).
    InstallEntrypoint { dir: PathBuf },
}

#[derive(Args, Debug)]
struct Common {
    #[command(flatten)]
    redis: agentrun_protocol::RedisArgs,
    /// The run's id in Redis.
    #[arg(long, env = "AGENTRUN_RUN_ID")]
    run_id: String,
    /// The variation this agent is.
    #[arg(long, env = "AGENTRUN_VARIATION", default_value = "default")]
    variation: String,
    /// Approximate cap on entries per stream (XADD MAXLEN ~).
    /// (`--stream-maxlen` is the older spelling.)
    #[arg(long, alias = "stream-maxlen", env = "AGENTRUN_STREAM_MAXLEN", default_value_t = agentrun_protocol::publish::DEFAULT_STREAM_MAX_LEN)]
    stream_max_len: u64,
    /// TTL in seconds put on the run's keys once it ends.
    #[arg(long, env = "AGENTRUN_RETENTION_SECONDS", default_value_t = 86_400)]
    retention_seconds: u64,
    /// Seconds to keep delivering on shutdown.
    #[arg(long, env = "AGENTRUN_DRAIN_TIMEOUT_SECONDS", default_value_t = 20)]
    drain_timeout_seconds: u64,
    /// MiB held for Redis before the agent is slowed down.
    #[arg(long, env = "AGENTRUN_BUFFER_MIB", default_value_t = 16)]
    buffer_mib: usize,
    /// Archive the run when it ends (runs without an operator; agentrun-archiver must be
    /// running): its keys get the retention TTL once the archive is complete.
    #[arg(long, env = "AGENTRUN_ARCHIVE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    archive: bool,
    /// Seconds between figures published to run:{RUN}:metrics (0: never).
    #[arg(long, env = "AGENTRUN_METRICS_INTERVAL_SECONDS", default_value_t = 5)]
    metrics_interval_seconds: u64,
    /// What Redis must confirm before the entrypoint's output is acknowledged (and forgotten
    /// by it): `none` (the master replied), `replicas=N[,timeout=MS]` (WAIT: N replicas have
    /// it), `aof[,replicas=N][,timeout=MS]` (WAITAOF: the master fsynced its AOF; Redis 7.2+).
    #[arg(long, env = "AGENTRUN_DURABILITY", default_value = "none", value_parser = parse_durability)]
    durability: Durability,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    s.parse()
}

impl Common {
    fn config(self, socket: PathBuf) -> anyhow::Result<SidecarConfig> {
        let redis = self.redis.settings()?;
        let run = RunId::new(self.run_id).context("--run-id")?;
        let variation = Variation::new(self.variation).context("--variation")?;
        let mut config = SidecarConfig::new(socket, redis, run, variation);
        config.stream_max_len = self.stream_max_len;
        config.retention = Duration::from_secs(self.retention_seconds);
        config.drain_timeout = Duration::from_secs(self.drain_timeout_seconds);
        config.buffer_bytes = self.buffer_mib.max(1) * 1024 * 1024;
        config.metrics_interval = Duration::from_secs(self.metrics_interval_seconds);
        config.archive = self.archive;
        config.durability = self.durability;
        Ok(config)
    }
}

fn main() {
    let cli = Cli::parse();
    cli.log.init("info");
    let runtime = agentrun_protocol::process::runtime("agentrun-sidecar");
    match runtime.block_on(run_command(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("agentrun-sidecar: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the command line's subcommand; the exit code is the agent's for `run`.
async fn run_command(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve {
            common,
            socket,
            metrics_addr,
            state_dir,
        } => {
            let mut config = common.config(socket)?;
            config.metrics_addr = Some(metrics_addr);
            config.state_dir = state_dir;
            let sidecar = Sidecar::start(config).await?;
            tracing::info!(metrics = ?sidecar.metrics_addr, "agentrun-sidecar serving");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: delivering what is held, then exiting"),
                _ = tokio::signal::ctrl_c() => {}
            }
            let report = sidecar.shutdown().await;
            Ok(i32::from(report.undelivered_bytes > 0))
        }
        Command::Run {
            common,
            metrics_addr,
            stop_grace_seconds,
            quiet,
            command,
        } => {
            // The agent runs as this user: it must not read the key from this process.
            if let Err(e) = agentrun_sidecar::auth::protect_memory() {
                tracing::warn!(error = %e, "cannot make this process non-dumpable");
            }
            let dir = tempfile_dir()?;
            let mut config = common.config(dir.join("agentrun.sock"))?;
            config.metrics_addr = metrics_addr;
            let code = run(LocalRun {
                sidecar: config,
                command,
                stop_grace: Duration::from_secs(stop_grace_seconds),
                tee: !quiet,
            })
            .await?;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(code)
        }
        Command::InstallEntrypoint { dir } => {
            let me = std::env::current_exe().context("cannot find this binary's path")?;
            let source = me.with_file_name("agentrun-entrypoint");
            if !source.exists() {
                bail!(
                    "{} is missing: the sidecar image must ship agentrun-entrypoint next to agentrun-sidecar",
                    source.display()
                );
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let target = dir.join("agentrun-entrypoint");
            let tmp = dir.join(".agentrun-entrypoint.tmp");
            std::fs::copy(&source, &tmp)
                .with_context(|| format!("cannot copy to {}", tmp.display()))?;
            std::fs::rename(&tmp, &target)?;
            println!("installed {}", target.display());
            Ok(0)
        }
    }
}

/// A private directory for the local run's socket and spool.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "agentrun-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
