//! kube-sim: a small Kubernetes API server with a kubelet that runs pods as host processes,
//! for machines where no real cluster can run (test tooling only; see kube-sim/README.md).
//!
//! Start it in-process with [`start`] and [`Options`], or as the `kube-sim` binary.
//!
//! | module | what it owns |
//! |---|---|
//! | [`apiserver`] | the API server: REST and watch, store, admission, patches and server-side apply, CRD schemas, RBAC, garbage collection, TLS |
//! | [`kubelet`] | the one node: scheduling, pods as host processes (images, env, volumes, probes), pod networks |
//! | [`time`] | timestamps as API objects write them, kubectl's ages |
//! | [`json`] | reading API objects as JSON |
//! | `testing` | (feature `testing`) a cluster per test, kubectl and kube-rs helpers |

pub mod apiserver;
pub mod json;
pub mod kubelet;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

pub use apiserver::auth::AuthConfig;
pub use apiserver::store::Store;
use apiserver::{App, PodLogs, auth, gc, rbac, tls};
pub use kubelet::{ImageMap, Kubelet, KubeletConfig};

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
    /// Serve https with a generated certificate (kubeconfigs carry its CA); kubectl sends
    /// bearer tokens only to TLS servers.
    pub tls: bool,
    /// The version `/version` reports (`v1.28.5`); its minor is PodSecurity's `latest`.
    pub server_version: String,
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
            tls: false,
            server_version: apiserver::discovery::DEFAULT_VERSION.into(),
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
    /// With `tls`: the PEM of the CA that signed kube-sim's certificate.
    pub ca_pem: Option<String>,
    pub state_dir: PathBuf,
    /// Requests refused with 403 Forbidden (`METHOD URI: message`), in order.
    pub denials: Arc<rbac::DenialLog>,
    /// The state directory was made by kube-sim (no `--state-dir`) and goes on shutdown.
    owned_state_dir: bool,
    tasks: Vec<JoinHandle<()>>,
}

/// A kubeconfig that points kubectl and kube-rs at `url` (plain http), with no credentials:
/// kube-sim's admin, who may do anything.
pub fn kubeconfig_yaml(url: &str) -> String {
    kubeconfig_doc(url, None, None)
}

/// A kubeconfig for `url`; `ca_pem` trusts kube-sim's certificate (with `tls`), `user` is
/// `(name, bearer token)` of an auth-config user (None: the admin, no credentials).
pub fn kubeconfig_doc(url: &str, ca_pem: Option<&str>, user: Option<(&str, &str)>) -> String {
    use base64::Engine as _;
    let ca = ca_pem
        .map(|pem| {
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        })
        .unwrap_or_default();
    let (name, creds) = match user {
        Some((name, token)) => (name, format!("\n    token: {token:?}")),
        None => ("kube-sim", " {}".to_string()),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\n{ca}contexts:\n- name: {name:?}\n  context:\n    cluster: kube-sim\n    user: {name:?}\n    namespace: default\ncurrent-context: {name:?}\nusers:\n- name: {name:?}\n  user:{creds}\n"
    )
}

/// Starts the API server (and the kubelet and garbage collector) on `opts.listen`.
pub async fn start(opts: Options) -> anyhow::Result<KubeSim> {
    opts.auth
        .check()
        .map_err(|e| anyhow::anyhow!("auth config: {e}"))?;
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
    let version = apiserver::discovery::ServerVersion::parse(&opts.server_version)
        .map_err(|e| anyhow::anyhow!(e))?;
    let store = Store::new(opts.watch_history);
    store.set_server_version(version);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let certs = if opts.tls {
        Some(tls::Certs::generate().context("TLS certificate")?)
    } else {
        None
    };
    let url = match &certs {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let ca_pem = certs.as_ref().map(|c| c.ca_pem.clone());
    // Over TLS kubectl prompts for a password when a kubeconfig user has no credentials, so
    // the admin gets a token there (in `system:masters`, which bypasses authorization).
    let mut auth = opts.auth.clone();
    let admin_token = certs.as_ref().map(|_| {
        let token = format!("kube-sim-admin-{:016x}", rand::random::<u64>());
        auth.users.push(auth::User {
            token: token.clone(),
            username: "kube-sim-admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into()],
        });
        token
    });
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
            let net = kubelet::network::Network::new(opts.host_address.clone())
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
    tasks.push(tokio::spawn(apiserver::quota::run(store.clone())));
    let denials = Arc::new(rbac::DenialLog::default());
    let app = Arc::new(App {
        store: store.clone(),
        auth,
        pod_logs: kubelet.clone().map(|k| k as Arc<dyn PodLogs>),
        addr: addr.to_string(),
        bookmark_interval: opts.bookmark_interval,
        denials: denials.clone(),
    });
    let router = apiserver::router(app);
    tasks.push(tokio::spawn(async move {
        match certs {
            Some(c) => c.serve(listener, router).await,
            None => {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!("kube-sim server: {e}");
                }
            }
        }
    }));
    let kubeconfig = match &opts.kubeconfig_out {
        Some(p) => {
            let admin = admin_token.as_deref().map(|t| ("kube-sim", t));
            std::fs::write(p, kubeconfig_doc(&url, ca_pem.as_deref(), admin))
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
        ca_pem,
        state_dir,
        denials,
        tasks,
    })
}

impl KubeSim {
    /// A kubeconfig for this server that authenticates as an auth-config user with its token.
    pub fn kubeconfig_with_token(&self, user: &str, token: &str) -> String {
        kubeconfig_doc(&self.url, self.ca_pem.as_deref(), Some((user, token)))
    }

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
