use agentrun_relay::{AppState, Config};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let state = AppState::connect(&config).await?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e}; pick another --listen address",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    if config.auth == agentrun_relay::auth::AuthMode::None && !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %addr,
            "AUTHENTICATION IS OFF (--auth none) on a non-loopback address: anyone who reaches this port can read every run and send control messages; use --auth token --tokens-file FILE, or --listen 127.0.0.1:8080 for a local demo"
        );
    }
    tracing::info!(listen = %addr, auth = ?config.auth, redis = %config.redis_settings()?.target(), "agentrun-relay serving");
    agentrun_relay::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("agentrun-relay stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: ending SSE streams with a resumable cursor");
}
