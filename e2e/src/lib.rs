//! agentrun end-to-end test support, and `kube-sim`: a small Kubernetes API server with a
//! kubelet that runs pods as host processes, for machines where no real cluster can run.
//!
//! Start it in-process with [`start`], or as the `kube-sim` binary.

pub mod api;
pub mod auth;
pub mod cel;
pub mod discovery;
pub mod gc;
pub mod kubelet;
pub mod netns;
pub mod patch;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod store;
pub mod table;
pub mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

pub use auth::AuthConfig;
pub use kubelet::{ImageMap, Kubelet, KubeletConfig};
pub use store::Store;

/// How to run kube-sim.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub kubeconfig_out: Option<PathBuf>,
    /// Where pods' volumes and logs live; a fresh temporary directory when None.
    pub state_dir: Option<PathBuf>,
    pub images: ImageMap,
    pub strict_images: bool,
    pub auth: AuthConfig,
    /// Run the kubelet (schedule and run pods).
    pub kubelet: bool,
    /// Bind-mount volumes in per-container mount namespaces; None: when running as root.
    pub mount_namespaces: Option<bool>,
    /// Give each pod its own network namespace (needs root).
    pub pod_network: bool,
    /// An address added to the host's loopback that pods can reach (with `pod_network`).
    pub host_address: Option<String>,
    /// How many events watches can resume from before answering 410 Gone.
    pub watch_history: usize,
    pub bookmark_interval: Duration,
    pub restart_backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig_out: None,
            state_dir: None,
            images: ImageMap::default(),
            strict_images: false,
            auth: AuthConfig::default(),
            kubelet: true,
            mount_namespaces: None,
            pod_network: false,
            host_address: None,
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(5),
            restart_backoff: Duration::from_secs(1),
        }
    }
}

/// A running kube-sim.
pub struct KubeSim {
    pub addr: SocketAddr,
    pub url: String,
    pub store: Arc<Store>,
    pub kubelet: Option<Arc<Kubelet>>,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The state directory was made by kube-sim (no `--state-dir`) and goes on shutdown.
    owned_state_dir: bool,
    tasks: Vec<JoinHandle<()>>,
}

/// A kubeconfig that points kubectl and kube-rs at `url` (plain http).
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user: {{}}\n"
    )
}

/// Starts the API server (and the kubelet and garbage collector) on `opts.listen`.
pub async fn start(opts: Options) -> anyhow::Result<KubeSim> {
    let (state_dir, owned_state_dir) = match &opts.state_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "kube-sim-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )),
            true,
        ),
    };
    if opts.kubelet || !owned_state_dir {
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    }
    let store = Store::new(opts.watch_history);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let url = format!("http://{addr}");
    let mut tasks = Vec::new();
    let kubelet = if opts.kubelet {
        let mut cfg = KubeletConfig::new(state_dir.clone());
        cfg.images = opts.images.clone();
        cfg.strict_images = opts.strict_images;
        cfg.restart_backoff = opts.restart_backoff;
        if let Some(m) = opts.mount_namespaces {
            cfg.mount_namespaces = m;
        }
        if opts.pod_network {
            let net = netns::Network::new(opts.host_address.clone())
                .await
                .map_err(|e| anyhow::anyhow!("pod network: {e}"))?;
            cfg.network = Some(Arc::new(net));
        }
        let k = Kubelet::new(store.clone(), cfg);
        tasks.push(tokio::spawn(k.clone().run()));
        Some(k)
    } else {
        None
    };
    tasks.push(tokio::spawn(gc::run(store.clone())));
    let app = Arc::new(api::App {
        store: store.clone(),
        auth: opts.auth.clone(),
        kubelet: kubelet.clone(),
        addr: addr.to_string(),
        bookmark_interval: opts.bookmark_interval,
    });
    let router = axum::Router::new().fallback(api::handle).with_state(app);
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("kube-sim server: {e}");
        }
    }));
    let kubeconfig = match &opts.kubeconfig_out {
        Some(p) => {
            std::fs::write(p, kubeconfig_yaml(&url))
                .with_context(|| format!("writing kubeconfig {}", p.display()))?;
            Some(p.clone())
        }
        None => None,
    };
    Ok(KubeSim {
        owned_state_dir,
        addr,
        url,
        store,
        kubelet,
        kubeconfig,
        state_dir,
        tasks,
    })
}

impl KubeSim {
    /// Stops all pods and the server.
    pub async fn shutdown(mut self) {
        if let Some(k) = &self.kubelet {
            k.stop_all().await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if self.owned_state_dir {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
