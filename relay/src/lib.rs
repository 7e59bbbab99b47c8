//! agentrun-relay: streams runs from Redis to browsers and the kubectl plugin over
//! Server-Sent Events, with replay and resume, and forwards control messages to the agents.
//!
//! [`app`] builds the HTTP application from an [`AppState`]; `main.rs` only parses flags,
//! connects and serves. `docs/relay.md` describes the endpoints, the cursor and the events.

pub mod api;
pub mod auth;
pub mod budget;
pub mod cors;
pub mod cursor;
pub mod download;
pub mod events;
pub mod hub;
pub mod kube_auth;
pub mod limits;
pub mod metrics;
pub mod ring;
pub mod ui;

use agentrun_protocol::{PublishOptions, Publisher, RedisConn, RedisSettings};
use axum::Router;
use axum::routing::{get, post};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Settings of the relay (flags and environment variables of `agentrun-relay`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "agentrun-relay",
    version,
    about = "Streams agentrun runs from Redis to browsers over Server-Sent Events"
)]
pub struct Config {
    #[command(flatten)]
    pub redis: agentrun_protocol::RedisArgs,
    #[command(flatten)]
    pub log: agentrun_protocol::process::LogArgs,
    /// Address to serve HTTP on.
    #[arg(long, env = "AGENTRUN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Seconds between keep-alive comments on idle SSE streams.
    #[arg(long, env = "AGENTRUN_KEEPALIVE_SECONDS", default_value_t = 15)]
    pub keepalive_seconds: u64,
    /// Live entries kept per watched run for clients that read slowly; a client further
    /// behind catches up from the Redis stream.
    #[arg(long, env = "AGENTRUN_FEED_CAPACITY", default_value_t = 1024)]
    pub feed_capacity: usize,
    /// Bytes of live entries kept per watched run (each entry counts twice its size: its
    /// bytes and the SSE text made from them); a client further behind catches up from the
    /// Redis stream.
    #[arg(long, env = "AGENTRUN_FEED_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub feed_bytes: usize,
    /// Bytes of live announcements taken off the Pub/Sub connection and not yet handed to the
    /// feeds; beyond, the relay sheds them and their runs' clients read them from the streams.
    #[arg(long, env = "AGENTRUN_PUBSUB_BUFFER_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub pubsub_buffer_bytes: usize,
    /// Most entries read from a stream per replay page.
    #[arg(long, env = "AGENTRUN_REPLAY_PAGE", default_value_t = 500)]
    pub replay_page: usize,
    /// About how many bytes one replay page may hold (pages are sized from the largest entry
    /// seen so far in the replay, 64 KiB before the first).
    #[arg(long, env = "AGENTRUN_REPLAY_PAGE_BYTES", default_value_t = 256 * 1024)]
    pub replay_page_bytes: usize,
    /// Bytes of replay pages all connections together may hold; connections wait for room.
    #[arg(long, env = "AGENTRUN_REPLAY_MEMORY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub replay_memory_bytes: usize,
    /// Reconnection delay suggested to SSE clients (`retry:`), in milliseconds.
    #[arg(long, env = "AGENTRUN_SSE_RETRY_MS", default_value_t = 2000)]
    pub retry_ms: u64,
    /// Maximum length of the control stream (`XADD MAXLEN ~`).
    #[arg(long, env = "AGENTRUN_CONTROL_MAXLEN", default_value_t = 10_000)]
    pub control_maxlen: u64,
    /// Authentication: none (local demo: anyone who reaches the relay sees and controls every
    /// run), token (bearer tokens from --tokens-file) or kubernetes (Kubernetes tokens checked
    /// with TokenReview; runs by RBAC on their AgentRun: get to view, update to control).
    #[arg(long, env = "AGENTRUN_AUTH", value_enum, default_value = "none")]
    pub auth: auth::AuthMode,
    /// With --auth token: one bearer token per line, optionally followed by the namespaces it
    /// may see (none listed: all); `#` starts a comment. Read again when it changes.
    #[arg(long, env = "AGENTRUN_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// With --auth token: seconds between checks of --tokens-file for changes (0: only on
    /// SIGHUP, which always reads it again).
    #[arg(long, env = "AGENTRUN_TOKENS_RELOAD_SECONDS", default_value_t = 5)]
    pub tokens_reload_seconds: u64,
    /// With --auth token or kubernetes: seconds between checks that an open SSE stream's token
    /// still sees its run (removed from the tokens file, permission revoked: the stream ends).
    #[arg(long, env = "AGENTRUN_AUTH_RECHECK_SECONDS", default_value_t = 5)]
    pub auth_recheck_seconds: u64,
    /// With --auth kubernetes: kubeconfig file; without it KUBECONFIG, ~/.kube/config or the
    /// in-cluster config (the relay's ServiceAccount).
    #[arg(long, env = "AGENTRUN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With --auth kubernetes: seconds a TokenReview or SubjectAccessReview answer is reused
    /// (denials and unknown tokens: at most 5 s); 0: ask the API server every time.
    #[arg(long, env = "AGENTRUN_AUTH_CACHE_SECONDS", default_value_t = 10)]
    pub auth_cache_seconds: u64,
    /// With --auth kubernetes: most review answers kept in the cache.
    #[arg(long, env = "AGENTRUN_AUTH_CACHE_SIZE", default_value_t = 10_000)]
    pub auth_cache_size: usize,
    /// Origins (scheme://host[:port], comma-separated) allowed to POST besides the relay's own
    /// (the origins of --cors-origins are allowed too).
    #[arg(long, env = "AGENTRUN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Origins (scheme://host[:port], comma-separated) whose pages may call the API from the
    /// browser (CORS, without credentials: they send the token in the Authorization header).
    /// Empty: no CORS headers at all.
    #[arg(long, env = "AGENTRUN_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Server-wide cap on requests being handled at once (an open SSE stream counts only
    /// while it starts).
    #[arg(long, env = "AGENTRUN_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "AGENTRUN_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Open SSE connections per client (token, or IP address without auth); 0: no limit.
    #[arg(long, env = "AGENTRUN_MAX_SSE_PER_CLIENT", default_value_t = 0)]
    pub max_sse_per_client: usize,
    /// Open SSE connections on this relay.
    #[arg(long, env = "AGENTRUN_MAX_SSE_TOTAL", default_value_t = 20_000)]
    pub max_sse_total: usize,
    /// Control requests per client per second (token bucket).
    #[arg(long, env = "AGENTRUN_CONTROL_PER_SECOND", default_value_t = 5.0)]
    pub control_per_second: f64,
    /// Control requests a client may send in a burst.
    #[arg(long, env = "AGENTRUN_CONTROL_BURST", default_value_t = 20.0)]
    pub control_burst: f64,
}

impl Config {
    /// Settings for tests and tools: everything at its default but the Redis URL.
    pub fn for_redis(url: impl Into<String>) -> Self {
        <Self as clap::Parser>::parse_from(["agentrun-relay", "--redis-url", &url.into()])
    }

    pub fn redis_settings(&self) -> Result<RedisSettings, agentrun_protocol::SettingsError> {
        self.redis.settings()
    }
}

/// Limits applied to every SSE connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub keepalive: Duration,
    /// How often an open stream's access is checked again.
    pub auth_recheck: Duration,
    pub replay_page: usize,
    /// About how many bytes one replay page may hold.
    pub replay_page_bytes: usize,
    pub retry_ms: u64,
}

pub(crate) struct Inner {
    pub settings: RedisSettings,
    pub conn: RedisConn,
    pub hub: hub::Hub,
    pub metrics: metrics::Metrics,
    pub limits: Limits,
    /// Replay pages held by all connections together.
    pub replay_budget: Arc<budget::ByteBudget>,
    pub publisher: Publisher,
    pub producer_id: String,
    /// Control messages are published one at a time so producer sequences arrive in order.
    pub control_lock: tokio::sync::Mutex<()>,
    pub control_pseq: AtomicU64,
    /// Set once the relay is stopping; open streams are told through their feeds.
    pub shutting_down: AtomicBool,
    pub sent_live: prometheus::IntCounter,
    pub sent_replay: prometheus::IntCounter,
    pub auth: auth::Authenticator,
    pub allowed_origins: Vec<String>,
    pub cors_origins: Vec<String>,
    pub limiter: limits::Limiter,
}

/// Shared state of the relay's handlers; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

impl AppState {
    /// Connects to Redis (commands and the shared Pub/Sub connection).
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let metrics = metrics::Metrics::new();
        let auth = match config.auth {
            auth::AuthMode::None => auth::Authenticator::none(),
            auth::AuthMode::Token => {
                let path = config.tokens_file.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("--auth token needs --tokens-file FILE (AGENTRUN_TOKENS_FILE)")
                })?;
                let auth = auth::Authenticator::from_tokens_file(path)?;
                auth.spawn_reload(
                    path.to_owned(),
                    Duration::from_secs(config.tokens_reload_seconds),
                    metrics.clone(),
                );
                auth
            }
            auth::AuthMode::Kubernetes => auth::Authenticator::kubernetes(
                kube_auth::KubeAuth::new(
                    &kube_auth::KubeAuthSettings {
                        kubeconfig: config.kubeconfig.clone(),
                        cache_ttl: Duration::from_secs(config.auth_cache_seconds),
                        cache_size: config.auth_cache_size,
                    },
                    metrics.clone(),
                )
                .await?,
            ),
        };
        let cors_origins: Vec<String> = config
            .cors_origins
            .iter()
            .map(|o| cors::normalize(o))
            .filter(|o| !o.is_empty())
            .collect();
        let mut allowed_origins = config.allowed_origins.clone();
        allowed_origins.extend(cors_origins.iter().cloned());
        let settings = config.redis_settings()?;
        let mut conn = settings.connect().await?;
        // A TLS server that refuses the client certificate does so after the handshake: ask
        // once, so that a wrong setting fails here, with a message, rather than per request.
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "Redis at {} did not answer PING ({e}); check --redis-url, the credentials and, for rediss://, --redis-ca-file and --redis-client-cert/--redis-client-key",
                    settings.target()
                )
            })?;
        let hub = hub::Hub::start(
            settings.clone(),
            conn.clone(),
            hub::HubOptions {
                feed_capacity: config.feed_capacity,
                feed_bytes: config.feed_bytes,
                pubsub_buffer_bytes: config.pubsub_buffer_bytes,
                ..Default::default()
            },
            metrics.clone(),
        )
        .await?;
        // The relay's Redis user may not write state hashes: its control entries carry no
        // epoch (only sidecars read them).
        let publisher = Publisher::new(PublishOptions {
            max_len: Some(config.control_maxlen),
            publish_command: settings.publish_command(),
        })
        .without_run_state();
        Ok(Self {
            inner: Arc::new(Inner {
                sent_live: metrics.events_sent.with_label_values(&["live"]),
                sent_replay: metrics.events_sent.with_label_values(&["replay"]),
                settings,
                conn,
                hub,
                metrics,
                limits: Limits {
                    keepalive: Duration::from_secs(config.keepalive_seconds.max(1)),
                    auth_recheck: Duration::from_secs(config.auth_recheck_seconds.max(1)),
                    replay_page: config.replay_page.max(1),
                    replay_page_bytes: config.replay_page_bytes.max(1),
                    retry_ms: config.retry_ms,
                },
                replay_budget: budget::ByteBudget::new(config.replay_memory_bytes),
                publisher,
                producer_id: format!("relay-{:016x}", rand::random::<u64>()),
                control_lock: tokio::sync::Mutex::new(()),
                control_pseq: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                auth,
                allowed_origins,
                cors_origins,
                limiter: limits::Limiter::new(limits::LimitSettings {
                    max_in_flight: config.max_in_flight,
                    max_body_bytes: config.max_body_bytes,
                    max_sse_per_client: config.max_sse_per_client,
                    max_sse_total: config.max_sse_total,
                    control_per_second: config.control_per_second,
                    control_burst: config.control_burst,
                }),
            }),
        })
    }

    /// Runs `op` on the shared Redis connection, and once more when it failed because that
    /// connection had dropped (Redis restarted or failed over). The connection learns of a
    /// drop only from the next command, which fails and makes it reconnect; the second try
    /// waits for the new connection. So a request answers 503 only while Redis is really
    /// away, not because it was away before. `op` must be safe to repeat: a read, or a publish
    /// through the publish script (which skips an entry it already has).
    pub(crate) async fn redis<T, F, Fut>(&self, op: F) -> Result<T, api::ApiError>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match op(self.inner.conn.clone()).await {
            Err(e) if e.is_unrecoverable_error() => {
                tracing::debug!(error = %e, "the Redis connection had dropped; sending again");
                op(self.inner.conn.clone()).await
            }
            other => other,
        };
        result.map_err(|e| api::ApiError::redis(self, e))
    }

    /// [`AppState::redis`] for one command.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, api::ApiError> {
        self.redis(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Ends every open SSE stream with a resumable cursor (`event: shutdown`) and refuses
    /// new ones. Call before the server's graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.hub.shutdown();
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    pub fn hub(&self) -> &hub::Hub {
        &self.inner.hub
    }
}

/// The relay's HTTP application: API routes merged with the web UI.
///
/// The `/api` routes pass through [`cors::layer`] and [`auth::layer`]; `/metrics`, `/healthz`, `/readyz` and the
/// UI's static files do not (they hold no run data). Every route passes through
/// [`limits::layer`] (in-flight cap, body size).
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/runs", get(api::list_runs))
        .route("/api/runs/{run}", get(api::get_run))
        .route("/api/runs/{run}/events", get(events::events))
        .route("/api/runs/{run}/control", post(api::control))
        .route(
            "/api/runs/{run}/variations/{variation}/output",
            get(download::output),
        )
        .route(
            "/api/session",
            post(auth::create_session).delete(auth::delete_session),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::layer,
        ))
        // Outside authentication: preflight requests carry no credentials.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::layer,
        ));
    Router::new()
        .merge(api)
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .merge(crate::ui::router())
        .layer(axum::extract::DefaultBodyLimit::max(
            state.inner.limiter.settings.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::layer,
        ))
        .with_state(state)
}

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
