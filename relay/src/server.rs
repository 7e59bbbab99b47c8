//! Serving the application over HTTP/1.1, and its graceful end.

use crate::app;
use crate::state::AppState;
use std::time::Duration;

/// Serves the app on a bound listener until `shutdown` resolves, then ends the SSE streams
/// with a resumable cursor and waits for connections to close.
///
/// HTTP/1.1 only (proxies and ingress controllers speak HTTP/1.1 to backends). Served with
/// hyper directly rather than `axum::serve` to keep per-connection memory small: no HTTP/2
/// detection layer, and a write buffer capped at 16 KiB for clients that read slowly.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let app = app(state.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_buf_size(16 * 1024)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection (raise the open-file limit if this says 'Too many open files')");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Handlers see the peer address (the per-client limits without auth).
        let svc = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        );
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    state.begin_shutdown();
    graceful.shutdown().await;
    Ok(())
}
