//! The relay's shared state ([`AppState`]): made once at start ([`AppState::connect`]) and
//! handed to every handler.

use crate::config::{Config, Limits};
use crate::error::ApiError;
use crate::{auth, budget, cors, hub, kube_auth, limits, metrics};
use agentrun_protocol::{PublishOptions, Publisher, RedisConn, RedisSettings};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// What every handler shares: Redis, the hub, the limits, authentication, metrics.
pub struct RelayState {
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
    /// Checkpoints of output streams' line numbers (ranges, search).
    pub line_index: crate::output::LineIndex,
    /// The archive of runs Redis no longer holds (`--archive-url`), if any.
    pub archive: Option<Arc<crate::archive::Archive>>,
}

/// Shared state of the relay's handlers; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<RelayState>);

impl std::ops::Deref for AppState {
    type Target = RelayState;

    fn deref(&self) -> &RelayState {
        &self.0
    }
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
        // A store URL that names nothing usable fails here, not on the first archived run.
        let archive = config
            .archive_url
            .as_deref()
            .map(|url| {
                crate::archive::Archive::from_url(url).map(Arc::new).map_err(|e| {
                    anyhow::anyhow!(
                        "--archive-url {url:?} (AGENTRUN_ARCHIVE_URL) is not a usable archive store: {e}"
                    )
                })
            })
            .transpose()?;
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
        Ok(Self(Arc::new(RelayState {
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
            line_index: crate::output::LineIndex::default(),
            archive,
            limiter: limits::Limiter::new(limits::LimitSettings {
                max_in_flight: config.max_in_flight,
                max_body_bytes: config.max_body_bytes,
                max_sse_per_client: config.max_sse_per_client,
                max_sse_total: config.max_sse_total,
                control_per_second: config.control_per_second,
                control_burst: config.control_burst,
            }),
        })))
    }

    /// Runs `op` on the shared Redis connection, and once more when it failed because that
    /// connection had dropped (Redis restarted or failed over). The connection learns of a
    /// drop only from the next command, which fails and makes it reconnect; the second try
    /// waits for the new connection. So a request answers 503 only while Redis is really
    /// away, not because it was away before. `op` must be safe to repeat: a read, or a publish
    /// through the publish function (which skips an entry it already has).
    pub(crate) async fn redis<T, F, Fut>(&self, op: F) -> Result<T, ApiError>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match op(self.conn.clone()).await {
            Err(e) if e.is_unrecoverable_error() => {
                tracing::debug!(error = %e, "the Redis connection had dropped; sending again");
                op(self.conn.clone()).await
            }
            other => other,
        };
        result.map_err(|e| self.redis_error(e))
    }

    /// A 503 that says Redis did not answer, naming where the relay looks for it.
    pub(crate) fn redis_error(&self, e: impl std::fmt::Display) -> ApiError {
        ApiError::redis(self.settings.target(), e)
    }

    /// [`AppState::redis`] for one command.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, ApiError> {
        self.redis(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Ends every open SSE stream with a resumable cursor (`event: shutdown`) and refuses
    /// new ones. Call before the server's graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.hub.shutdown();
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    pub fn hub(&self) -> &hub::Hub {
        &self.hub
    }
}
