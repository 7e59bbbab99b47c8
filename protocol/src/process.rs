//! What every agentrun binary does the same way as a process: logging and shutdown.
//!
//! - **Logs** go to stderr, filtered by `RUST_LOG` (default `info`, plus whatever the binary
//!   quiets), as text or as JSON lines: `--log-format text|json` or `AGENTRUN_LOG_FORMAT`, the
//!   same flag with the same meaning in the operator, the sidecar, the relay and the archiver.
//! - **Shutdown** starts on `SIGTERM` (what the kubelet sends) or Ctrl-C: [`shutdown_signal`].

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines as `text` or `json` (one object per line), on stderr; `RUST_LOG` filters.
    #[arg(long, env = "AGENTRUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber (see [`init_logging`]).
    pub fn init(&self, default_filter: &str) {
        init_logging(self.log_format, default_filter);
    }
}

/// Installs the global subscriber: stderr, `RUST_LOG` or `default_filter` (e.g. `info` or
/// `info,kube=warn`), text or JSON. A second call (tests) leaves the first in place.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The format `AGENTRUN_LOG_FORMAT` asks for, for a binary without flags of its own (the
/// entrypoint); anything but `json` is text.
pub fn log_format_from_env() -> LogFormat {
    match std::env::var("AGENTRUN_LOG_FORMAT") {
        Ok(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// The runtime of a binary whose work is I/O: two worker threads (pods get little CPU).
/// A runtime that cannot start ends the process with a message naming `binary`.
pub fn runtime(binary: &str) -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{binary}: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Resolves on `SIGTERM` or Ctrl-C (`SIGINT`), whichever comes first. When `SIGTERM` cannot
/// be watched, only Ctrl-C ends it.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn the_log_format_flag_takes_text_or_json_and_names_them_otherwise() {
        assert_eq!(
            Cli::try_parse_from(["x"]).unwrap().log.log_format,
            LogFormat::Text
        );
        let json = Cli::try_parse_from(["x", "--log-format", "json"]).unwrap();
        assert_eq!(json.log.log_format, LogFormat::Json);
        let err = Cli::try_parse_from(["x", "--log-format", "yaml"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("text") && err.contains("json"), "{err}");
    }
}
