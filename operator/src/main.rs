//! `agentrun-operator run` reconciles AgentRuns; `agentrun-operator crd` prints the CRD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentrun_operator::config::{self, PodFlags, Settings, SidecarTls};
use agentrun_operator::controller::{self, Clock, Context};
use agentrun_operator::crd;
use agentrun_operator::leader::LeaseLock;
use agentrun_operator::metrics::Metrics;
use agentrun_operator::server::{ServerState, app};
use agentrun_operator::store::{RedisStore, RunStore};
use agentrun_operator::{pod, preflight, telemetry};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Config};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "agentrun-operator",
    version,
    about = "Reconciles agentrun.dev AgentRuns into agent pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the kubeconfig (or the in-cluster config).
    Run(Box<RunArgs>),
    /// Print the AgentRun CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Parser)]
struct RunArgs {
    /// Kubeconfig file; without it `KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "AGENTRUN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Image with agentrun-sidecar and agentrun-entrypoint, put into every agent pod.
    #[arg(long, env = "AGENTRUN_SIDECAR_IMAGE", default_value = config::DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,
    /// Pull policy of the sidecar image.
    #[arg(long, env = "AGENTRUN_SIDECAR_IMAGE_PULL_POLICY")]
    sidecar_image_pull_policy: Option<String>,
    /// Pull Secrets for the sidecar image (names, comma separated) added to every agent pod;
    /// each must exist in every namespace that runs AgentRuns.
    #[arg(
        long,
        env = "AGENTRUN_SIDECAR_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    sidecar_image_pull_secrets: Vec<String>,
    /// Resources of the agentrun-tools and agentrun-sidecar containers, as a JSON
    /// ResourceRequirements (default: requests cpu 10m, memory 32Mi; limits memory 128Mi). Add
    /// a CPU limit for namespaces whose ResourceQuota covers limits.cpu.
    #[arg(long, env = "AGENTRUN_SIDECAR_RESOURCES")]
    sidecar_resources: Option<String>,
    /// Security context of the agentrun-tools and agentrun-sidecar containers, as a JSON
    /// SecurityContext used as it is (default: runAsNonRoot, runAsUser and runAsGroup 65532,
    /// readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL). On OpenShift
    /// leave runAsUser and runAsGroup out.
    #[arg(long, env = "AGENTRUN_SIDECAR_SECURITY_CONTEXT")]
    sidecar_security_context: Option<String>,
    /// fsGroup of agent pods (a group id), or `none` to leave it to the cluster (OpenShift
    /// assigns one from the namespace's range). A run's spec.podSecurityContext.fsGroup wins.
    #[arg(long, env = "AGENTRUN_POD_FS_GROUP", default_value = "65532")]
    pod_fs_group: String,
    /// The operator's own Redis connection.
    #[command(flatten)]
    redis: agentrun_protocol::RedisArgs,
    /// PEM CA bundle for the sidecars' rediss:// connection (default: --redis-ca-file). Its
    /// contents go into each run's Secret; restart the operator after rotating it.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CA_FILE")]
    sidecar_redis_ca_file: Option<PathBuf>,
    /// PEM client certificate for the sidecars (copied into each run's Secret; never defaults
    /// to the operator's own).
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CLIENT_CERT")]
    sidecar_redis_client_cert: Option<PathBuf>,
    /// PEM key of --sidecar-redis-client-cert.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_CLIENT_KEY")]
    sidecar_redis_client_key: Option<PathBuf>,
    /// Give each run its own Redis ACL user (needs ACL SETUSER rights); its password is
    /// derived from --run-credential-key, or from the Redis password when that is not given.
    #[arg(long, env = "AGENTRUN_PER_RUN_REDIS_USERS", default_value_t = true, action = clap::ArgAction::Set)]
    per_run_redis_users: bool,
    /// Grace period of agent pods, in seconds: the agent's stop plus the sidecar's final flush
    /// must fit in it.
    #[arg(
        long,
        env = "AGENTRUN_POD_TERMINATION_GRACE_SECONDS",
        default_value_t = 45
    )]
    pod_termination_grace_seconds: i64,
    /// Secret key for deriving per-run Redis passwords.
    #[arg(long, env = "AGENTRUN_RUN_CREDENTIAL_KEY", hide_env_values = true)]
    run_credential_key: Option<String>,
    /// Redis URL handed to the sidecars, when they reach Redis by another address.
    #[arg(long, env = "AGENTRUN_SIDECAR_REDIS_URL")]
    sidecar_redis_url: Option<String>,
    /// Public base URL of the relay (web UI); a run's page is `<url>/runs/<runId>`.
    #[arg(long, env = "AGENTRUN_RELAY_URL")]
    relay_url: Option<String>,
    /// Default cap on each stream of a run.
    #[arg(long, env = "AGENTRUN_STREAM_MAXLEN", default_value_t = 100_000)]
    stream_max_len: i64,
    /// What Redis must confirm before the sidecars acknowledge an agent's output: `none`,
    /// `replicas=N[,timeout=MS]` (WAIT) or `aof[,replicas=N][,timeout=MS]` (WAITAOF, Redis
    /// 7.2+); handed to every sidecar as `AGENTRUN_DURABILITY`.
    #[arg(long, env = "AGENTRUN_SIDECAR_DURABILITY", default_value = "none", value_parser = parse_durability)]
    sidecar_durability: agentrun_protocol::durability::Durability,
    /// Default seconds a run's Redis data is kept after it ended.
    #[arg(long, env = "AGENTRUN_RETENTION_SECONDS", default_value_t = 604_800)]
    retention_seconds: i64,
    /// Archive runs when they end (agentrun-archiver must be running): they are put on the
    /// archive queue, and their Redis keys get the retention TTL once the archive is complete.
    #[arg(long, env = "AGENTRUN_ARCHIVE", default_value_t = false, action = clap::ArgAction::Set)]
    archive: bool,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "AGENTRUN_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "AGENTRUN_POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "AGENTRUN_LEASE_NAME", default_value = "agentrun-operator")]
    lease_name: String,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "AGENTRUN_POD_NAME")]
    identity: Option<String>,
    /// Run without leader election (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Log JSON lines instead of text.
    #[arg(long, env = "AGENTRUN_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            use std::io::Write as _;
            let yaml = crd::crd_yaml()?;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(yaml.as_bytes());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("could not read the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context(
            "no Kubernetes config: pass --kubeconfig, set KUBECONFIG, or run in a cluster",
        )?,
    };
    Ok(Client::try_from(config)?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_json);
    let settings = settings(&args)?;
    let client = client(args.kubeconfig.as_ref()).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("could not listen on {} (--metrics-addr)", args.metrics_addr))?;
    let server = tokio::spawn(async move { axum::serve(listener, app(state)).await });

    // Refuse to start on a cluster that cannot run agent pods, without the permissions the
    // operator needs in its scope, or without the CRD.
    let scope = preflight::Scope::new(args.watch_namespace.as_deref());
    let lease_namespace = (!args.no_leader_election).then_some(args.lease_namespace.as_str());
    preflight::check(&client, &scope, lease_namespace)
        .await
        .map_err(anyhow::Error::msg)?;
    ready.store(true, Ordering::SeqCst);

    let redis = args
        .redis
        .settings()
        .context("--redis-url / AGENTRUN_REDIS_URL is not a valid Redis URL")?;
    let store: Arc<dyn RunStore> = match RedisStore::connect(
        &redis,
        args.stream_max_len.max(1) as u64,
    )
    .await
    {
        Ok(s) => Arc::new(s.with_archiving(args.archive)),
        Err(e) => {
            bail!(
                "could not connect to Redis at {}: {e}; check --redis-url and that Redis is running",
                redis.target()
            )
        }
    };

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("agentrun-operator-{}", std::process::id()));
    let (leading_tx, mut leading_rx) = watch::channel(true);
    let lease = Arc::new(LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        args.lease_name.clone(),
        identity.clone(),
        Duration::from_secs(15),
    ));
    if !args.no_leader_election {
        info!(identity = %identity, lease = %args.lease_name, "waiting to become the leader");
        let renewed = tokio::select! {
            at = lease.acquire() => at,
            _ = shutdown_signal() => return Ok(()),
        };
        let keeper = lease.clone();
        tokio::spawn(async move { keeper.keep(leading_tx, renewed).await });
    }

    let reporter = Reporter {
        controller: pod::MANAGED_BY.into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        settings,
        store,
        clock: Clock::System,
    });
    let runs = scope.agentruns(&client);
    let pods: Api<Pod> = match &scope {
        preflight::Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        preflight::Scope::Cluster => Api::all(client.clone()),
    };
    let lost_leadership = async move {
        while leading_rx.changed().await.is_ok() {
            if !*leading_rx.borrow() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => info!("shutting down"),
            _ = lost_leadership => {
                lost_flag.store(true, Ordering::SeqCst);
                warn!("stopping: this replica is no longer the leader");
            }
        }
    };
    info!("starting the AgentRun controller");
    Controller::new(runs, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(pod::RUN_LABEL))
        .graceful_shutdown_on(stop)
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(run = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    if !args.no_leader_election {
        lease.release().await;
    }
    server.abort();
    if lost.load(Ordering::SeqCst) {
        bail!(
            "lost the leader Lease; exiting so that Kubernetes restarts this replica as a standby"
        );
    }
    Ok(())
}

/// What the operator puts into agent pods, from the flags; every error names its flag.
fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
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
