//! `agentrun-entrypoint [--socket PATH] -- CMD [ARGS...]`

use agentrun_sidecar::entrypoint::{EntrypointConfig, run};
use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Runs CMD, captures its output byte-exact and hands it to the agentrun sidecar; applies
/// pause, resume, stop and stdin from the sidecar; exits with CMD's exit code.
#[derive(Parser, Debug)]
#[command(name = "agentrun-entrypoint", version)]
struct Args {
    /// The sidecar's Unix socket.
    #[arg(
        long,
        env = "AGENTRUN_SOCKET",
        default_value = "/agentrun/agentrun.sock"
    )]
    socket: PathBuf,
    /// Directory for the spool used while the sidecar is away (default: the socket's).
    #[arg(long, env = "AGENTRUN_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when the agent is stopped.
    #[arg(long, env = "AGENTRUN_STOP_GRACE_SECONDS", default_value_t = 10)]
    stop_grace_seconds: u64,
    /// Seconds to wait, after the agent exits, for the sidecar to take the rest.
    #[arg(long, env = "AGENTRUN_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    drain_timeout_seconds: u64,
    /// Largest spool in MiB; past it output is dropped and reported as a gap.
    #[arg(long, env = "AGENTRUN_SPOOL_MAX_MIB", default_value_t = 1024)]
    spool_max_mib: u64,
    /// File for the container's termination message (written only if it exists).
    #[arg(
        long,
        env = "AGENTRUN_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    termination_log: PathBuf,
    /// Do not copy the agent's output to this process's stdout/stderr.
    #[arg(long)]
    no_tee: bool,
    /// The agent's command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    let mut config = EntrypointConfig::new(args.socket, args.command);
    if let Some(dir) = args.spool_dir {
        config.spool_dir = dir;
    }
    config.stop_grace = Duration::from_secs(args.stop_grace_seconds);
    config.drain_timeout = Duration::from_secs(args.drain_timeout_seconds);
    config.spool_max_bytes = args.spool_max_mib * 1024 * 1024;
    config.tee = !args.no_tee;
    config.termination_log = args.termination_log;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentrun-entrypoint: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(config));
    std::process::exit(code);
}
