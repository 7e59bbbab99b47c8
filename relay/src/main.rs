use agentrun_protocol::process::shutdown_signal;
use agentrun_relay::{AppState, Config};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.log.init("info");
    let tls = config.tls()?;
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
    let scheme = if tls.is_some() {
        "https (HTTP/2 and HTTP/1.1)"
    } else {
        "http (HTTP/1.1)"
    };
    tracing::info!(listen = %addr, scheme, auth = ?config.auth, redis = %config.redis_settings()?.target(), archive = config.archive_url.as_deref().unwrap_or("none"), "agentrun-relay serving");
    let shutdown = async {
        shutdown_signal().await;
        tracing::info!("ending SSE streams with a resumable cursor");
    };
    match tls {
        Some(tls) => agentrun_relay::serve_tls(listener, state, tls, shutdown).await?,
        None => agentrun_relay::serve(listener, state, shutdown).await?,
    }
    tracing::info!("agentrun-relay stopped");
    Ok(())
}
