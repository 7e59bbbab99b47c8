// Long file: every Redis topology (standalone, TLS, Sentinel, Cluster) parsed and connected in one place, so that they stay alike.
//! How to reach Redis: one URL plus optional credentials and TLS files.
//!
//! | URL | mode |
//! |---|---|
//! | `redis://[user:pass@]host:port[/db]` | standalone, plain TCP |
//! | `rediss://[user:pass@]host:port[/db]` | standalone, TLS |
//! | `redis+sentinel://[user:pass@]host:port[,host:port...]/MASTER` (or `rediss+sentinel://`) | Sentinel: the master named `MASTER` |
//! | `redis+cluster://[user:pass@]host:port[,host:port...]` (or `rediss+cluster://`) | Redis Cluster |
//!
//! A username or password given separately (flags, env, a Secret) wins over the URL's, so
//! the URL can be shared and the password kept in a Secret.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which kind of Redis deployment the URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    Standalone,
    /// Ask these Sentinels for the address of the master called `master`.
    Sentinel {
        master: String,
    },
    /// Redis Cluster with these seed nodes; sharded Pub/Sub is used.
    Cluster,
}

/// Redis connection settings shared by every agentrun component.
#[derive(Clone)]
pub struct RedisSettings {
    pub mode: RedisMode,
    /// `host:port` of each node (one for standalone).
    pub nodes: Vec<(String, u16)>,
    pub tls: bool,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM bundle of the CA that signed the server certificate (otherwise the system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that require mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// How long one command may take before it counts as failed.
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("mode", &self.mode)
            .field("nodes", &self.nodes)
            .field("tls", &self.tls)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// What is wrong with the Redis settings; every message names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "Redis URL {url:?} is not valid: {why}. Use redis://[user:password@]host:port[/db], rediss://... for TLS, redis+sentinel://host:port[,host:port]/MASTER or redis+cluster://host:port[,host:port]"
    )]
    Url { url: String, why: String },
    #[error("cannot read {what} file {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--redis-client-cert and --redis-client-key must be given together")]
    HalfClientCert,
    #[error("cannot connect to Redis at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: redis::RedisError,
    },
    #[error(
        "Pub/Sub subscriptions in Redis Cluster mode need sharded subscriptions, which this component does not support yet; point it at a standalone or Sentinel Redis"
    )]
    ClusterPubSub,
}

fn url_err(url: &str, why: impl Into<String>) -> SettingsError {
    SettingsError::Url {
        url: redact(url),
        why: why.into(),
    }
}

/// The URL with its password replaced, safe for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(hi * 16 + lo);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl RedisSettings {
    /// Parses a Redis URL (see the module docs for the forms).
    pub fn from_url(url: &str) -> Result<Self, SettingsError> {
        let url = url.trim();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| url_err(url, "it has no scheme"))?;
        let (mode_hint, tls) = match scheme {
            "redis" => ("", false),
            "rediss" => ("", true),
            "redis+sentinel" => ("sentinel", false),
            "rediss+sentinel" => ("sentinel", true),
            "redis+cluster" => ("cluster", false),
            "rediss+cluster" => ("cluster", true),
            other => return Err(url_err(url, format!("unknown scheme {other:?}"))),
        };
        let (userinfo, hostpart) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty()).then(|| percent_decode(u)),
                    (!p.is_empty()).then(|| percent_decode(p)),
                ),
                None => ((!ui.is_empty()).then(|| percent_decode(ui)), None),
            },
        };
        let hostpart = hostpart.split(['?', '#']).next().unwrap_or_default();
        let (hosts, path) = match hostpart.split_once('/') {
            Some((h, p)) => (h, p),
            None => (hostpart, ""),
        };
        let mut nodes = Vec::new();
        for h in hosts.split(',').filter(|h| !h.is_empty()) {
            let default_port = if mode_hint == "sentinel" { 26379 } else { 6379 };
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (
                    host.trim_start_matches('[').trim_end_matches(']'),
                    port.parse::<u16>()
                        .map_err(|_| url_err(url, format!("port {port:?} is not a number")))?,
                ),
                _ => (h, default_port),
            };
            if host.is_empty() {
                return Err(url_err(url, "a host name is empty"));
            }
            nodes.push((host.to_owned(), port));
        }
        if nodes.is_empty() {
            return Err(url_err(url, "it names no host"));
        }
        let mut db = 0;
        let mode = match mode_hint {
            "sentinel" => {
                if path.is_empty() {
                    return Err(url_err(url, "a Sentinel URL must end with /MASTER-NAME"));
                }
                RedisMode::Sentinel {
                    master: path.to_owned(),
                }
            }
            "cluster" => RedisMode::Cluster,
            _ => {
                if nodes.len() > 1 {
                    return Err(url_err(
                        url,
                        "several hosts need redis+sentinel:// or redis+cluster://",
                    ));
                }
                if !path.is_empty() {
                    db = path
                        .parse()
                        .map_err(|_| url_err(url, format!("database {path:?} is not a number")))?;
                }
                RedisMode::Standalone
            }
        };
        Ok(Self {
            mode,
            nodes,
            tls,
            db,
            username,
            password,
            ca_file: None,
            client_cert: None,
            client_key: None,
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
        })
    }

    /// Overrides the URL's credentials with separately given ones (empty values are ignored).
    pub fn with_credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        if let Some(u) = username.filter(|u| !u.is_empty()) {
            self.username = Some(u);
        }
        if let Some(p) = password.filter(|p| !p.is_empty()) {
            self.password = Some(p);
        }
        self
    }

    /// A short description for logs and errors, without credentials.
    pub fn target(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let scheme = if self.tls { "rediss" } else { "redis" };
        match &self.mode {
            RedisMode::Standalone => format!("{scheme}://{}/{}", hosts.join(","), self.db),
            RedisMode::Sentinel { master } => {
                format!("{scheme}+sentinel://{}/{master}", hosts.join(","))
            }
            RedisMode::Cluster => format!("{scheme}+cluster://{}", hosts.join(",")),
        }
    }

    /// A cluster client for the seed nodes, with the timeouts and TLS of these settings;
    /// `extra` adds what one use needs (RESP3 and a push channel for sharded Pub/Sub).
    fn cluster_client(
        &self,
        extra: impl FnOnce(redis::cluster::ClusterClientBuilder) -> redis::cluster::ClusterClientBuilder,
    ) -> Result<redis::cluster::ClusterClient, SettingsError> {
        let nodes = self
            .nodes
            .iter()
            .map(|(h, p)| self.node_info(h, *p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = extra(
            redis::cluster::ClusterClientBuilder::new(nodes)
                .response_timeout(self.response_timeout)
                .connection_timeout(self.connect_timeout),
        );
        install_crypto_provider();
        if let Some(certs) = self.tls_certificates()? {
            builder = builder.certs(certs);
        }
        builder
            .build()
            .map_err(|e| url_err(&self.target(), e.to_string()))
    }

    fn node_info(&self, host: &str, port: u16) -> Result<ConnectionInfo, SettingsError> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host_part = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let info = format!("{scheme}://{host_part}:{port}/{}", self.db)
            .into_connection_info()
            .map_err(|e| url_err(&self.target(), e.to_string()))?;
        // No CLIENT SETINFO on connect: ACL users are not granted it.
        let mut redis_info = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(u) = &self.username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = &self.password {
            redis_info = redis_info.set_password(p);
        }
        Ok(info.set_redis_settings(redis_info))
    }

    fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, SettingsError> {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| SettingsError::File {
                what,
                path: path.clone(),
                source,
            })
        };
        let root_cert = self
            .ca_file
            .as_ref()
            .map(|p| read("Redis CA", p))
            .transpose()?;
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read("Redis client certificate", c)?,
                client_key: read("Redis client key", k)?,
            }),
            (None, None) => None,
            _ => return Err(SettingsError::HalfClientCert),
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    fn client_for(&self, info: ConnectionInfo) -> Result<Client, SettingsError> {
        install_crypto_provider();
        let result = match self.tls_certificates()? {
            Some(certs) if self.tls => Client::build_with_tls(info, certs),
            _ => Client::open(info),
        };
        result.map_err(|e| url_err(&self.target(), e.to_string()))
    }

    /// A client for the node that takes writes (the master, for Sentinel).
    pub async fn client(&self) -> Result<Client, SettingsError> {
        match &self.mode {
            RedisMode::Standalone | RedisMode::Cluster => {
                let (h, p) = &self.nodes[0];
                self.client_for(self.node_info(h, *p)?)
            }
            RedisMode::Sentinel { master } => {
                let sentinels = self
                    .nodes
                    .iter()
                    .map(|(h, p)| self.node_info(h, *p))
                    .collect::<Result<Vec<_>, _>>()?;
                let node_info = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(sentinels[0].redis_settings().clone());
                let node_info = if self.tls {
                    node_info.set_tls_mode(redis::TlsMode::Secure)
                } else {
                    node_info
                };
                let mut sentinel = redis::sentinel::SentinelClient::build(
                    sentinels,
                    master.clone(),
                    Some(node_info),
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| url_err(&self.target(), e.to_string()))?;
                sentinel
                    .async_get_client()
                    .await
                    .map_err(|source| SettingsError::Connect {
                        target: self.target(),
                        source,
                    })
            }
        }
    }

    /// Connects for commands. The connection reconnects by itself after a failure; commands
    /// sent while Redis is away fail and are for the caller to retry.
    pub async fn connect(&self) -> Result<RedisConn, SettingsError> {
        let connect_err = |source| SettingsError::Connect {
            target: self.target(),
            source,
        };
        match &self.mode {
            RedisMode::Cluster => {
                let client = self.cluster_client(|b| b)?;
                let conn = client.get_async_connection().await.map_err(connect_err)?;
                Ok(RedisConn::Cluster(conn))
            }
            RedisMode::Standalone => {
                let client = self.client().await?;
                let conn = self.manager(client).await.map_err(connect_err)?;
                Ok(RedisConn::Single(conn))
            }
            RedisMode::Sentinel { .. } => {
                let client = self.client().await?;
                let addr = client.get_connection_info().addr().clone();
                let conn = self.manager(client).await.map_err(connect_err)?;
                Ok(RedisConn::Sentinel(SentinelConn {
                    settings: Arc::new(self.clone()),
                    state: Arc::new(Mutex::new(SentinelState {
                        conn,
                        addr,
                        generation: 0,
                        last_resolve: None,
                    })),
                    resolving: Arc::new(tokio::sync::Mutex::new(())),
                }))
            }
        }
    }

    async fn manager(&self, client: Client) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(client, config).await
    }

    /// Opens a dedicated Pub/Sub connection.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, SettingsError> {
        if self.mode == RedisMode::Cluster {
            return Err(SettingsError::ClusterPubSub);
        }
        let client = self.client().await?;
        tokio::time::timeout(self.connect_timeout, client.get_async_pubsub())
            .await
            .map_err(|_| SettingsError::Connect {
                target: self.target(),
                source: redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out opening a Pub/Sub connection",
                )),
            })?
            .map_err(|source| SettingsError::Connect {
                target: self.target(),
                source,
            })
    }

    /// A RESP3 connection to one node of a cluster (`host:port` as `CLUSTER SLOTS` names it),
    /// with the credentials, TLS and timeouts of these settings, for sharded Pub/Sub managed
    /// by the caller: every push the node sends (`smessage`, `ssubscribe` and `sunsubscribe`
    /// confirmations, the server's own `sunsubscribe` when the slot moves) and a
    /// `Disconnection` push when the connection drops go to `pushes`. The connection does not
    /// reconnect or resubscribe by itself.
    ///
    /// Send one channel per `SSUBSCRIBE`/`SUNSUBSCRIBE` command on it: the connection takes
    /// the command's first confirmation as its reply.
    pub async fn node_push_connection(
        &self,
        host: &str,
        port: u16,
        pushes: impl redis::aio::AsyncPushSender,
    ) -> Result<redis::aio::MultiplexedConnection, SettingsError> {
        let info = self.node_info(host, port)?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = self.client_for(info.set_redis_settings(resp3))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_push_sender(pushes);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|source| SettingsError::Connect {
                target: format!("{host}:{port} of {}", self.target()),
                source,
            })
    }

    /// Subscribes to one channel and returns its messages' payloads: `SUBSCRIBE` on a
    /// dedicated connection, or in Cluster mode `SSUBSCRIBE` (sharded Pub/Sub, what the
    /// publish function announces with there) on the master of the channel's slot. The
    /// stream ends when the subscription is lost: the connection dropped, or, in Cluster
    /// mode, the server unsubscribed it because the slot moved (a failover or resharding).
    /// Subscribe again then, and read the stream from the cursor to catch up.
    pub async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<futures::stream::BoxStream<'static, Vec<u8>>, SettingsError> {
        use futures::StreamExt;
        let connect_err = |source| SettingsError::Connect {
            target: self.target(),
            source,
        };
        if self.mode != RedisMode::Cluster {
            let mut pubsub = self.pubsub().await?;
            pubsub.subscribe(channel).await.map_err(connect_err)?;
            return Ok(pubsub
                .into_on_message()
                .map(|m| m.get_payload_bytes().to_vec())
                .boxed());
        }
        let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = self.cluster_client(|b| {
            b.use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
        })?;
        let mut conn = client.get_async_connection().await.map_err(connect_err)?;
        conn.ssubscribe(channel).await.map_err(connect_err)?;
        // The connection lives as long as the stream; both end on the first sign of a lost
        // subscription rather than trusting the client to move it.
        Ok(
            futures::stream::unfold((conn, pushes), |(conn, mut pushes)| async move {
                loop {
                    let push = pushes.recv().await?;
                    match push.kind {
                        redis::PushKind::SMessage => {
                            let payload = push.data.get(1).and_then(|v| match v {
                                Value::BulkString(b) => Some(b.clone()),
                                _ => None,
                            })?;
                            return Some((payload, (conn, pushes)));
                        }
                        redis::PushKind::SUnsubscribe | redis::PushKind::Disconnection => {
                            return None;
                        }
                        _ => {}
                    }
                }
            })
            .boxed(),
        )
    }

    /// The publish command for this mode: sharded Pub/Sub in Cluster mode.
    pub fn publish_command(&self) -> &'static str {
        if self.mode == RedisMode::Cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// Selects rustls's `ring` provider for the process (once), so that TLS works whichever
/// providers other crates enabled.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A command connection to standalone/Sentinel Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    /// Follows the master across failovers (see [`SentinelConn`]).
    Sentinel(SentinelConn),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// A connection to the master that a set of Sentinels names. A reconnecting connection alone
/// would stay with the address resolved at start, and after a failover that node is a
/// read-only replica (or gone). So when a command comes back with `READONLY` or a connection
/// error, the master is asked of the Sentinels again (at most once a second) and, if it
/// moved, the connection is rebuilt there. The failed command is returned to the caller to
/// retry, like any command sent while Redis is away. Clones share the current connection.
#[derive(Clone)]
pub struct SentinelConn {
    settings: Arc<RedisSettings>,
    state: Arc<Mutex<SentinelState>>,
    resolving: Arc<tokio::sync::Mutex<()>>,
}

impl RedisConn {
    /// The master a Sentinel connection currently talks to (`None` in other modes).
    pub fn current_master(&self) -> Option<(String, u16)> {
        let RedisConn::Sentinel(s) = self else {
            return None;
        };
        let state = s.state.lock().unwrap_or_else(|e| e.into_inner());
        match &state.addr {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Some((host.clone(), *port))
            }
            _ => None,
        }
    }
}

struct SentinelState {
    conn: ConnectionManager,
    addr: ConnectionAddr,
    /// Bumped on every rebuild, so clones that saw the same failure resolve only once.
    generation: u64,
    last_resolve: Option<Instant>,
}

/// The least time between two look-ups of the master, so that a burst of failing commands
/// (the master is down and the Sentinels have not failed over yet) does not flood them.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);

impl SentinelConn {
    fn current(&self) -> (u64, ConnectionManager) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.generation, state.conn.clone())
    }

    /// Asks the Sentinels for the master again and moves there if it changed.
    async fn re_resolve(&self, seen_generation: u64) {
        let _one_at_a_time = self.resolving.lock().await;
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.generation != seen_generation
                || state
                    .last_resolve
                    .is_some_and(|t| t.elapsed() < RESOLVE_INTERVAL)
            {
                return;
            }
            state.last_resolve = Some(Instant::now());
        }
        let target = self.settings.target();
        let client = match self.settings.client().await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot ask the Sentinels for the master");
                return;
            }
        };
        let addr = client.get_connection_info().addr().clone();
        if addr == self.state.lock().unwrap_or_else(|p| p.into_inner()).addr {
            // Same master: the connection reconnects there by itself.
            return;
        }
        match self.settings.manager(client).await {
            Ok(conn) => {
                tracing::info!(%target, master = %addr, "the Sentinels name a new master; moved there");
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state.conn = conn;
                state.addr = addr;
                state.generation += 1;
            }
            Err(e) => {
                tracing::warn!(%target, master = %addr, error = %e, "cannot connect to the new master");
            }
        }
    }
}

/// Whether an error means the connection no longer reaches the master.
fn lost_the_master(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || e.to_string().contains("READONLY")
}

fn replica_reply(values: &[Value]) -> bool {
    values.iter().any(|v| match v {
        Value::ServerError(e) => {
            e.code() == "READONLY" || e.details().is_some_and(|d| d.contains("READONLY"))
        }
        Value::Array(inner) => replica_reply(inner),
        _ => false,
    })
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.current();
                let result = conn.req_packed_command(cmd).await;
                let lost = match &result {
                    Err(e) => lost_the_master(e),
                    Ok(v) => replica_reply(std::slice::from_ref(v)),
                };
                if lost {
                    s.re_resolve(generation).await;
                }
                result
            }),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.current();
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                let lost = match &result {
                    Err(e) => lost_the_master(e),
                    Ok(v) => replica_reply(v),
                };
                if lost {
                    s.re_resolve(generation).await;
                }
                result
            }),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Sentinel(s) => s.settings.db,
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let s = RedisSettings::from_url("redis://127.0.0.1:6390/2").unwrap();
        assert_eq!(
            (s.mode.clone(), s.nodes.clone(), s.tls, s.db),
            (
                RedisMode::Standalone,
                vec![("127.0.0.1".into(), 6390)],
                false,
                2
            )
        );
        let s = RedisSettings::from_url("rediss://agent:p%40ss@redis.svc:6380").unwrap();
        assert!(s.tls);
        assert_eq!(s.username.as_deref(), Some("agent"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        let s = RedisSettings::from_url("redis+sentinel://a:26379,b/mymaster").unwrap();
        assert_eq!(
            s.mode,
            RedisMode::Sentinel {
                master: "mymaster".into()
            }
        );
        assert_eq!(s.nodes[1], ("b".into(), 26379));
        let s = RedisSettings::from_url("redis+cluster://a:7000,b:7001").unwrap();
        assert_eq!(s.mode, RedisMode::Cluster);
        assert_eq!(s.publish_command(), "SPUBLISH");
        let s = RedisSettings::from_url("redis://localhost").unwrap();
        assert_eq!(s.nodes[0].1, 6379);
    }

    #[test]
    fn bad_urls_say_what_to_do() {
        for bad in [
            "localhost:6379",
            "http://x",
            "redis://",
            "redis://h:port",
            "redis+sentinel://h",
            "redis://a,b",
            "redis://h/x",
        ] {
            let e = RedisSettings::from_url(bad).unwrap_err().to_string();
            assert!(
                e.contains("redis://[user:password@]host:port"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn credentials_are_never_printed() {
        let s = RedisSettings::from_url("redis://u:hunter2@h:1").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.target().contains("hunter2"));
        let e = RedisSettings::from_url("ftp://u:hunter2@h")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let s = s.with_credentials(Some("other".into()), Some(String::new()));
        assert_eq!(
            (s.username.as_deref(), s.password.as_deref()),
            (Some("other"), Some("hunter2"))
        );
    }
}
