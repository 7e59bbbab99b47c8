//! `agentrun-entrypoint [--socket PATH] -- CMD [ARGS...]`

use agentrun_sidecar::auth;
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
    /// The one-time key the sidecar left for this entrypoint (default: next to the socket,
    /// agentrun-entrypoint.key); read and removed before the agent starts.
    #[arg(long, env = "AGENTRUN_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// KiB of stdin messages that may wait for the agent to read them; past it they are
    /// refused and reported on the run's status.
    #[arg(long, env = "AGENTRUN_STDIN_BUFFER_KIB", default_value_t = 1024)]
    stdin_buffer_kib: usize,
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
    // Before anything else: the agent, started later as this user, must not be able to read
    // this process's memory, and must not find the key on the volume.
    if let Err(e) = auth::protect_memory() {
        eprintln!(
            "agentrun-entrypoint: cannot make this process non-dumpable ({e}); the agent, which runs as the same user, could read the sidecar's key from its memory"
        );
    }
    let key_file = args.key_file.clone().unwrap_or_else(|| {
        args.socket
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(auth::HANDOFF_FILE)
    });
    let handoff = match auth::take_handoff(&key_file) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!(
                "agentrun-entrypoint: NO KEY FROM THE SIDECAR: {e}. Going on without one: the sidecar will refuse this entrypoint, so the agent's output will not be published and control messages will not reach it (the run's status says SocketClientRefused). The sidecar leaves the key once, at its first start, before the agent container starts: was this container restarted, started before the sidecar, or given another --key-file?"
            );
            None
        }
    };
    let mut config = EntrypointConfig::new(args.socket, args.command);
    if let Some(h) = handoff {
        config.key = h.key;
        config.sidecar_uid = Some(h.sidecar_uid);
    }
    config.stdin_budget = args.stdin_buffer_kib.max(1) * 1024;
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
