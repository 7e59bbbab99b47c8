//! The flags of `agentrun-operator run`, and the settings they make; every error names its flag.

use crate::config::{self, PodFlags, Settings, SidecarTls};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The flags of `agentrun-operator run`.
#[derive(Debug, Parser)]
pub struct RunArgs {
    /// Kubeconfig file; without it `KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "AGENTRUN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Image with agentrun-sidecar and agentrun-entrypoint, put into every agent pod.
    #[arg(long, env = "AGENTRUN_SIDECAR_IMAGE", default_value = config::DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,
    /// Pull policy of the sidecar image.
    #[arg(long, env = "AGENTRUN_SIDECAR_IMAGE_PULL_POLICY")]
    pub sidecar_image_pull_policy: Option<String>,
    /// Pull Secrets for the sidecar image (names, comma separated) added to every agent pod;
    /// each must exist in every namespace that runs AgentRuns.
    #[arg(
        long,
        env = "AGENTRUN_SIDECAR_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Resources of the agentrun-tools and agentrun-sidecar containers, as a JSON
    /// ResourceRequirements (default: requests cpu 10m, memory 32Mi; limits memory 128Mi). Add
    /// a CPU limit for namespaces whose ResourceQuota covers limits.cpu.
    #[arg(long, env = "AGENTRUN_SIDECAR_RESOURCES")]
    pub sidecar_resources: Option<String>,
    /// Security context of the agentrun-tools and agentrun-sidecar containers, as a JSON
    /// SecurityContext used as it is (default: runAsNonRoot, runAsUser and runAsGroup 65532,
    /// readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL). On OpenShift
    /// leave runAsUser and runAsGroup out.
    #[arg(long, env = "AGENTRUN_SIDECAR_SECURITY_CONTEXT")]
    pub sidecar_security_context: Option<String>,
    /// fsGroup of agent pods (a group id), or `none` to leave it to the cluster (OpenShift
    /// assigns one from the namespace's range). A run's spec.podSecurityContext.fsGroup wins.
    #[arg(long, env = "AGENTRUN_POD_FS_GROUP", default_value = "65532")]
    pub pod_fs_group: String,
    /// The operator's own Redis connection.
    #[command(flatten)]
    pub redis: agentrun_protocol::RedisArgs,
    /// PEM CA bundle for the sidecars' rediss:// connection (default: --redis-ca-file). Its
    /// contents go into each run's Secret; restart the operator after rotating it.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CA_FILE")]
    pub sidecar_redis_ca_file: Option<PathBuf>,
    /// PEM client certificate for the sidecars (copied into each run's Secret; never defaults
    /// to the operator's own).
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CLIENT_CERT")]
    pub sidecar_redis_client_cert: Option<PathBuf>,
    /// PEM key of --sidecar-redis-client-cert.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CLIENT_KEY")]
    pub sidecar_redis_client_key: Option<PathBuf>,
    /// Give each run its own Redis ACL user (needs ACL SETUSER rights); its password is
    /// derived from --run-credential-key, or from the Redis password when that is not given.
    #[arg(long, env = "AGENTRUN_PER_RUN_REDIS_USERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_run_redis_users: bool,
    /// Grace period of agent pods, in seconds: the agent's stop plus the sidecar's final flush
    /// must fit in it.
    #[arg(
        long,
        env = "AGENTRUN_POD_TERMINATION_GRACE_SECONDS",
        default_value_t = 45
    )]
    pub pod_termination_grace_seconds: i64,
    /// Secret key for deriving per-run Redis passwords.
    #[arg(long, env = "AGENTRUN_RUN_CREDENTIAL_KEY", hide_env_values = true)]
    pub run_credential_key: Option<String>,
    /// Redis URL handed to the sidecars, when they reach Redis by another address.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_URL")]
    pub sidecar_redis_url: Option<String>,
    /// Public base URL of the relay (web UI); a run's page is `<url>/runs/<runId>`.
    #[arg(long, env = "AGENTRUN_RELAY_URL")]
    pub relay_url: Option<String>,
    /// Default cap on each stream of a run.
    #[arg(long, env = "AGENTRUN_STREAM_MAXLEN", default_value_t = agentrun_protocol::publish::DEFAULT_STREAM_MAX_LEN as i64)]
    pub stream_max_len: i64,
    /// What Redis must confirm before the sidecars acknowledge an agent's output: `none`,
    /// `replicas=N[,timeout=MS]` (WAIT) or `aof[,replicas=N][,timeout=MS]` (WAITAOF, Redis
    /// 7.2+); handed to every sidecar as `AGENTRUN_DURABILITY`.
    #[arg(long, env = "AGENTRUN_SIDECAR_DURABILITY", default_value = "none", value_parser = parse_durability)]
    pub sidecar_durability: agentrun_protocol::durability::Durability,
    /// Default seconds a run's Redis data is kept after it ended.
    #[arg(long, env = "AGENTRUN_RETENTION_SECONDS", default_value_t = 604_800)]
    pub retention_seconds: i64,
    /// Archive runs when they end (agentrun-archiver must be running): they are put on the
    /// archive queue, and their Redis keys get the retention TTL once the archive is complete.
    #[arg(long, env = "AGENTRUN_ARCHIVE", default_value_t = false, action = clap::ArgAction::Set)]
    pub archive: bool,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "AGENTRUN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "AGENTRUN_POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "AGENTRUN_LEASE_NAME", default_value = "agentrun-operator")]
    pub lease_name: String,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "AGENTRUN_POD_NAME")]
    pub identity: Option<String>,
    /// Run without leader election (a single replica only).
    #[arg(long)]
    pub no_leader_election: bool,
    #[command(flatten)]
    pub log: agentrun_protocol::process::LogArgs,
    /// Older spelling of `--log-format json`, kept so that existing installs keep their logs.
    #[arg(long, env = "AGENTRUN_LOG_JSON", hide = true)]
    pub log_json: bool,
}

impl RunArgs {
    /// Installs logging as the flags say.
    pub fn init_logging(&self) {
        let format = if self.log_json {
            agentrun_protocol::process::LogFormat::Json
        } else {
            self.log.log_format
        };
        agentrun_protocol::process::init_logging(format, "info,kube=warn");
    }
}

/// What the operator puts into agent pods, from the flags; every error names its flag.
pub fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
    let sidecar_tls = SidecarTls::load(
        args.sidecar_redis_ca_file
            .as_deref()
            .or(args.redis.ca_file.as_deref()),
        args.sidecar_redis_client_cert.as_deref(),
        args.sidecar_redis_client_key.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    Settings {
        sidecar_image: args.sidecar_image.clone(),
        sidecar_image_pull_policy: args.sidecar_image_pull_policy.clone(),
        redis_url: args
            .sidecar_redis_url
            .clone()
            .unwrap_or_else(|| args.redis.url.clone()),
        redis_username: args.redis.username.clone(),
        redis_password: args.redis.password.clone(),
        run_credential_key: run_credential_key(args),
        termination_grace_period_seconds: args.pod_termination_grace_seconds.max(1),
        relay_url: args.relay_url.clone(),
        default_stream_max_len: args.stream_max_len,
        sidecar_durability: args.sidecar_durability,
        default_retention_seconds: args.retention_seconds,
        sidecar_tls,
        archive: args.archive,
        ..Settings::default()
    }
    .with_pod_flags(&PodFlags {
        sidecar_image_pull_secrets: &args.sidecar_image_pull_secrets,
        sidecar_resources: args.sidecar_resources.as_deref(),
        sidecar_security_context: args.sidecar_security_context.as_deref(),
        pod_fs_group: &args.pod_fs_group,
    })
    .map_err(anyhow::Error::msg)
}

/// The key per-run Redis passwords are derived from, when per-run users are on.
fn run_credential_key(args: &RunArgs) -> Option<String> {
    if !args.per_run_redis_users {
        return None;
    }
    let key = args
        .run_credential_key
        .clone()
        .or_else(|| args.redis.password.clone())
        .filter(|k| !k.is_empty());
    if key.is_none() {
        tracing::warn!(
            "per-run Redis users are on but there is neither --run-credential-key nor a Redis password to derive their passwords from; the sidecars share the operator's Redis credentials"
        );
    }
    key
}

fn parse_durability(s: &str) -> Result<agentrun_protocol::durability::Durability, String> {
    s.parse::<agentrun_protocol::durability::Durability>()
        .map_err(|e| e.replacen("--durability", "--sidecar-durability", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_durability_is_checked_at_start() {
        let ok = parse_durability("aof,replicas=1").expect("valid");
        assert_eq!(ok.to_string(), "aof,replicas=1,timeout=1000");
        let err = parse_durability("replicas=0").unwrap_err();
        assert!(err.contains("--sidecar-durability"), "{err}");
        assert!(err.contains("replicas=N[,timeout=MS]"), "{err}");
    }
}
