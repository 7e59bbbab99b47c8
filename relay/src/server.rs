//! Serving the application over HTTP/1.1, or over TLS with HTTP/2 for browsers, and its
//! graceful end.

mod direct;

use crate::app;
use crate::state::AppState;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes a connection buffers for a client that reads slowly, per HTTP/1.1 connection and
/// per HTTP/2 stream.
const WRITE_BUFFER: usize = 16 * 1024;

/// Serves the app over plain HTTP/1.1 on a bound listener until `shutdown` resolves, then
/// ends the SSE streams with a resumable cursor and waits for connections to close.
///
/// HTTP/1.1 only (proxies and ingress controllers speak HTTP/1.1 to backends). Served with
/// hyper directly rather than `axum::serve` to keep per-connection memory small: no HTTP/2
/// detection layer, and a write buffer capped at 16 KiB for clients that read slowly; and a
/// connection that opens with a request for an SSE stream is served without hyper's buffers
/// at all (see [`direct`]).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, None, shutdown).await
}

/// Like [`serve`], over TLS: HTTP/2 for clients that offer it with ALPN (every browser),
/// HTTP/1.1 for the others (a stream request first on the connection is served without
/// hyper's buffers there too). A failed handshake closes that connection only.
pub async fn serve_tls(
    listener: TcpListener,
    state: AppState,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(
        listener,
        state,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        shutdown,
    )
    .await
}

async fn serve_with(
    listener: TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let protocols = Arc::new(Protocols::new(app(state.clone())));
    let graceful = GracefulShutdown::new();
    // Handshakes still in progress when the shutdown starts are dropped.
    let (closing, _) = tokio::sync::watch::channel(());
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
        // Watched from the accept on: a connection still in its TLS handshake when the
        // shutdown starts ends gracefully right after it.
        let watcher = graceful.watcher();
        match &tls {
            None => {
                let (protocols, mut closing) = (protocols.clone(), closing.subscribe());
                tokio::spawn(async move {
                    // A client that has not sent its first request when the shutdown starts
                    // is let go.
                    let first = tokio::select! {
                        first = direct::read_first(&stream) => first,
                        _ = closing.changed() => return,
                    };
                    protocols
                        .http1_after_head(first, stream, direct::Link::Plain, peer, watcher)
                        .await;
                });
            }
            Some(acceptor) => {
                let (acceptor, protocols) = (acceptor.clone(), protocols.clone());
                let mut closing = closing.subscribe();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let handshake = tokio::select! {
                        done = handshake => done,
                        _ = closing.changed() => return,
                    };
                    match handshake {
                        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                            protocols.http2_connection(tls, peer, watcher).await
                        }
                        Ok(Ok(mut tls)) => {
                            // HTTP/1.1: a stream request is answered without hyper, as on
                            // a plain connection.
                            let first = tokio::select! {
                                first = direct::read_first_tls(&mut tls) => first,
                                _ = closing.changed() => return,
                            };
                            let link = |tls| direct::Link::Tls(Box::new(tls));
                            protocols
                                .http1_after_head(first, tls, link, peer, watcher)
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = closing.send(());
    state.begin_shutdown();
    graceful.shutdown().await;
    Ok(())
}

/// The application and the HTTP/1.1 and HTTP/2 connection settings.
#[derive(Clone)]
struct Protocols {
    app: axum::Router,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(app: axum::Router) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .max_buf_size(WRITE_BUFFER)
            .timer(TokioTimer::new())
            .header_read_timeout(direct::HEAD_TIMEOUT);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_send_buf_size(WRITE_BUFFER)
            // Dead peers (a laptop that went to sleep) are found and their streams freed.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        Self { app, http1, http2 }
    }

    /// The app, with the peer address that handlers see (the per-client limits without auth).
    fn service(&self, peer: SocketAddr) -> WithPeer {
        WithPeer {
            app: self.app.clone(),
            peer,
        }
    }

    /// Serves an HTTP/1.1 connection to its end.
    async fn http1_connection<S>(&self, io: S, peer: SocketAddr, graceful: Watcher)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self
            .http1
            .serve_connection(TokioIo::new(io), self.service(peer));
        if let Err(e) = graceful.watch(conn).await {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }

    /// Serves an HTTP/1.1 connection whose first request head was read: a stream request is
    /// answered on `link(io)` without hyper; anything else is hyper's, starting with the bytes
    /// already read.
    async fn http1_after_head<S>(
        &self,
        first: direct::First,
        io: S,
        link: fn(S) -> direct::Link,
        peer: SocketAddr,
        graceful: Watcher,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match first {
            direct::First::Stream(request) => {
                direct::answer(link(io), request, peer, self.app.clone()).await;
                drop(graceful);
            }
            direct::First::Other(read) => {
                let io = direct::Rewind::new(read, io);
                self.http1_connection(io, peer, graceful).await
            }
            direct::First::Gone => {}
        }
    }

    /// Serves an HTTP/2 connection to its end.
    async fn http2_connection(
        &self,
        io: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        graceful: Watcher,
    ) {
        let conn = self
            .http2
            .serve_connection(TokioIo::new(io), self.service(peer));
        if let Err(e) = graceful.watch(conn).await {
            tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
        }
    }
}

/// The application with the peer's address put in each request's extensions, as
/// `axum::serve` does with `into_make_service_with_connect_info`.
#[derive(Clone)]
struct WithPeer {
    app: axum::Router,
    peer: SocketAddr,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        // A router is always ready; calling a clone is what `axum::serve` does too.
        tower::Service::call(&mut self.app.clone(), req)
    }
}
