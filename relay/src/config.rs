//! The relay's settings: its flags and environment variables ([`Config`]), and the limits
//! every SSE connection gets from them ([`Limits`]).

use crate::auth;
use agentrun_protocol::RedisSettings;
use std::path::PathBuf;
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
    /// PEM certificate chain to serve HTTPS with (with --tls-key, e.g. tls.crt of a
    /// kubernetes.io/tls Secret). Browsers then speak HTTP/2 and follow any number of runs over
    /// one connection (HTTP/1.1 allows six per host). Read again when the file changes.
    #[arg(long, env = "AGENTRUN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, env = "AGENTRUN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds between keep-alive comments on idle SSE streams.
    #[arg(long, env = "AGENTRUN_KEEPALIVE_SECONDS", default_value_t = 15)]
    pub keepalive_seconds: u64,
    /// Live entries kept per watched run for clients that read slowly (an entry every client
    /// has taken is not kept); a client further behind catches up from the Redis stream.
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
    /// The archive store the archivers write to (a folder, file:///PATH, s3://BUCKET/PREFIX,
    /// gs://BUCKET/PREFIX or az://CONTAINER/PREFIX; credentials from the usual AWS_*,
    /// GOOGLE_* and AZURE_* variables, AWS_ENDPOINT_URL for another S3 server). With it, runs
    /// Redis no longer holds are served from their archive, and the run list includes them.
    #[arg(long, env = "AGENTRUN_ARCHIVE_URL")]
    pub archive_url: Option<String>,
    /// Control requests a client may send in a burst.
    #[arg(long, env = "AGENTRUN_CONTROL_BURST", default_value_t = 20.0)]
    pub control_burst: f64,
}

impl Config {
    /// Settings for tests and tools: everything at its default but the Redis URL.
    pub fn for_redis(url: impl Into<String>) -> Self {
        <Self as clap::Parser>::parse_from(["agentrun-relay", "--redis-url", &url.into()])
    }

    /// The HTTPS settings, when --tls-cert and --tls-key are given.
    pub fn tls(
        &self,
    ) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key).map(Some),
            _ => Ok(None),
        }
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
