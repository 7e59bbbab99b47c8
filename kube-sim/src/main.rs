//! `kube-sim`: a Kubernetes API server and kubelet for tests. See kube-sim/README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kube_sim::{AuthConfig, ImageMap, Options};

#[derive(Parser, Debug)]
#[command(
    name = "kube-sim",
    about = "A Kubernetes API server and kubelet for tests (never for production)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for kubectl and kube-rs here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Directory for pods' volumes and logs (default: a new temporary directory).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// YAML image map: `images: {NAME: /host/binary | {binary|prefix, files, user}}`.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Images missing from the image map fail with ErrImagePull/ImagePullBackOff.
    #[arg(long)]
    strict_images: bool,
    /// YAML users (bearer tokens) and extra permissions; requests with a token are
    /// authorized by RBAC and these rules, requests without one are the admin's.
    #[arg(long)]
    auth_config: Option<PathBuf>,
    /// Do not run pods (API server only).
    #[arg(long)]
    no_kubelet: bool,
    /// Do not use mount namespaces even as root (volumes are then not mounted).
    #[arg(long)]
    no_mount_namespaces: bool,
    /// Give each pod its own network namespace (needs root).
    #[arg(long)]
    pod_network: bool,
    /// With --pod-network: an address added to the host's loopback that pods can reach.
    #[arg(long)]
    host_address: Option<String>,
    /// Number of events watches can resume from before 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
    /// Serve https with a generated certificate (the kubeconfig carries its CA); kubectl
    /// sends a kubeconfig's token only to https servers.
    #[arg(long)]
    tls: bool,
    /// The Kubernetes version to report on /version (e.g. v1.28.5); PodSecurity's "latest".
    #[arg(long, default_value = kube_sim::apiserver::discovery::DEFAULT_VERSION)]
    server_version: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let images = match &args.images {
        Some(p) => ImageMap::load(p)?,
        None => ImageMap::default(),
    };
    let auth = match &args.auth_config {
        Some(p) => AuthConfig::load(p)?,
        None => AuthConfig::default(),
    };
    let opts = Options {
        listen: args.listen,
        kubeconfig_out: args.kubeconfig_out.clone(),
        state_dir: args.state_dir.clone(),
        images,
        strict_images: args.strict_images,
        auth,
        kubelet: !args.no_kubelet,
        tls: args.tls,
        mount_namespaces: if args.no_mount_namespaces {
            Some(false)
        } else {
            None
        },
        pod_network: args.pod_network,
        host_address: args.host_address.clone(),
        watch_history: args.watch_history,
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        server_version: args.server_version.clone(),
        ..Options::default()
    };
    let sim = kube_sim::start(opts).await.context("starting kube-sim")?;
    println!("{}", sim.url);
    tracing::info!(
        "kube-sim listening on {} (state in {})",
        sim.url,
        sim.state_dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("kube-sim stopping");
    sim.shutdown().await;
    Ok(())
}
