//! `agentrun-operator run`, step by step: settings from the flags, the Kubernetes client, the
//! health server, the start-up checks, Redis, the leader Lease, then the controller until
//! SIGTERM or a lost Lease.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::args::{RunArgs, settings};
use crate::controller::{self, Clock, Context};
use crate::leader::LeaseLock;
use crate::metrics::Metrics;
use crate::server::{ServerState, app};
use crate::store::{RedisStore, RunStore};
use crate::{pod, preflight};
use agentrun_protocol::process::shutdown_signal;
use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Config};
use tokio::sync::watch;
use tracing::{info, warn};

/// Runs the operator until SIGTERM (then `Ok`) or until it loses the Lease (then an error, so
/// that Kubernetes restarts it as a standby).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.init_logging();
    let settings = settings(&args)?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let server = serve_health(&args, metrics.clone(), ready.clone()).await?;

    // Refuse to start on a cluster that cannot run agent pods, without the permissions the
    // operator needs in its scope, or without the CRD.
    let scope = preflight::Scope::new(args.watch_namespace.as_deref());
    let lease_namespace = (!args.no_leader_election).then_some(args.lease_namespace.as_str());
    preflight::check(&client, &scope, lease_namespace)
        .await
        .map_err(anyhow::Error::msg)?;
    ready.store(true, Ordering::SeqCst);

    let store = connect_store(&args).await?;
    let identity = identity(&args);
    let lease = Arc::new(LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        args.lease_name.clone(),
        identity.clone(),
        Duration::from_secs(15),
    ));
    let Some(leading) = lead(&args, &lease, &identity).await else {
        return Ok(()); // asked to stop while waiting for the Lease
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: pod::MANAGED_BY.into(),
                instance: Some(identity),
            },
        ),
        metrics,
        settings,
        store,
        clock: Clock::System,
    });
    let lost = Arc::new(AtomicBool::new(false));
    let pruning = tokio::spawn(prune_index(ctx.store.clone()));
    info!("starting the AgentRun controller");
    control(&client, &scope, ctx, stop(leading, lost.clone())).await;
    pruning.abort();
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

/// How often the leader drops runs whose keys are gone from the run index.
const INDEX_PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Runs younger than this stay in the run index even without their keys: a run is indexed
/// before its state hash is written.
const INDEX_PRUNE_GRACE: Duration = Duration::from_secs(3600);

/// Drops from the run index, at start and every [`INDEX_PRUNE_EVERY`], the runs whose keys
/// have expired (or were let go after archiving): without it the index would keep every run
/// ever started, and the relay's run list would read through them.
async fn prune_index(store: Arc<dyn RunStore>) {
    let mut tick = tokio::time::interval(INDEX_PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cut = agentrun_protocol::now_ms().saturating_sub(INDEX_PRUNE_GRACE.as_millis() as u64);
        match store.prune_index(cut).await {
            Ok(0) => {}
            Ok(n) => info!(
                dropped = n,
                "dropped runs whose keys are gone from the run index"
            ),
            Err(e) => warn!(error = %e, "could not prune the run index; trying again later"),
        }
    }
}

/// The client of the kubeconfig given, else of `KUBECONFIG`, `~/.kube/config` or the pod.
async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
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

/// Serves /metrics, /healthz and /readyz (ready once `ready` is set).
async fn serve_health(
    args: &RunArgs,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("could not listen on {} (--metrics-addr)", args.metrics_addr))?;
    let state = ServerState { metrics, ready };
    Ok(tokio::spawn(async move {
        axum::serve(listener, app(state)).await
    }))
}

/// Connects to Redis (which also loads agentrun's functions and starts watching its nodes).
async fn connect_store(args: &RunArgs) -> anyhow::Result<Arc<dyn RunStore>> {
    let redis = args
        .redis
        .settings()
        .context("--redis-url / AGENTRUN_REDIS_URL is not a valid Redis URL")?;
    let store = match RedisStore::connect(&redis, args.stream_max_len.max(1) as u64).await {
        Ok(s) => s.with_archiving(args.archive),
        Err(e) => bail!(
            "could not connect to Redis at {}: {e}; check --redis-url and that Redis is running",
            redis.target()
        ),
    };
    if let Err(e) = store.prepare_server().await {
        bail!("Redis at {} cannot run agentrun: {e}", redis.target());
    }
    Ok(Arc::new(store))
}

/// This replica's name in the Lease: the flag, else the pod's hostname.
fn identity(args: &RunArgs) -> String {
    args.identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("agentrun-operator-{}", std::process::id()))
}

/// Waits to become the leader (unless leader election is off) and keeps the Lease renewed;
/// the receiver turns false when the Lease is lost. `None`: asked to stop while waiting.
async fn lead(
    args: &RunArgs,
    lease: &Arc<LeaseLock>,
    identity: &str,
) -> Option<watch::Receiver<bool>> {
    let (leading_tx, leading_rx) = watch::channel(true);
    if !args.no_leader_election {
        info!(identity = %identity, lease = %args.lease_name, "waiting to become the leader");
        let renewed = tokio::select! {
            at = lease.acquire() => at,
            _ = shutdown_signal() => return None,
        };
        let keeper = lease.clone();
        tokio::spawn(async move { keeper.keep(leading_tx, renewed).await });
    }
    Some(leading_rx)
}

/// Resolves on SIGTERM, or when the Lease is lost (then `lost` is set).
async fn stop(mut leading: watch::Receiver<bool>, lost: Arc<AtomicBool>) {
    let lost_leadership = async move {
        while leading.changed().await.is_ok() {
            if !*leading.borrow() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = shutdown_signal() => info!("shutting down"),
        _ = lost_leadership => {
            lost.store(true, Ordering::SeqCst);
            warn!("stopping: this replica is no longer the leader");
        }
    }
}

/// Reconciles AgentRuns (and their pods) in `scope` until `stop` resolves.
async fn control(
    client: &Client,
    scope: &preflight::Scope,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let runs = scope.agentruns(client);
    let pods: Api<Pod> = match scope {
        preflight::Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        preflight::Scope::Cluster => Api::all(client.clone()),
    };
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
}
