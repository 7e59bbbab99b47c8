//! The whole agentrun stack for the scenarios: a cluster (kube-sim with pod networks, or the
//! cluster of `E2E_KUBECONFIG`), a real `redis-server`, the real `agentrun-operator` and
//! `agentrun-relay` binaries, and helpers to read AgentRuns, Redis and the relay's SSE stream.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentrun_protocol::testing::{RedisCluster, RedisServer, free_port};
use base64::Engine as _;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use serde_json::Value;

use crate::common::{Cluster, eventually};

/// The address kube-sim puts on the host's `lo` for pods to reach Redis (see e2e/README.md).
pub const SIM_HOST_ADDRESS: &str = "10.99.0.1";
/// The sidecar image the operator is told to use; kube-sim's image map runs the built binary.
pub const SIM_SIDECAR_IMAGE: &str = "ghcr.io/agentrun/agentrun-sidecar:0.1.0";

/// The agent script of an example manifest (`spec.args[0]`, run with `sh -c`).
pub fn example_script(rel: &str) -> String {
    let text = std::fs::read_to_string(workspace().join(rel)).expect("read example");
    let v: Value = serde_yaml::from_str(&text).expect("example YAML");
    assert_eq!(
        v["spec"]["command"],
        serde_json::json!(["sh", "-c"]),
        "{rel}: command"
    );
    v["spec"]["args"][0]
        .as_str()
        .expect("spec.args[0]")
        .to_string()
}

/// `target/debug` (or `$CARGO_TARGET_DIR/debug`): the directory of the binaries being tested.
pub fn bin_dir() -> PathBuf {
    // This test's executable is target/debug/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps")
        .to_path_buf()
}

/// The built binaries of the operator, sidecar (+ entrypoint) and relay; builds them once if one
/// is missing (`cargo nextest run -p agentrun-e2e` does not build other packages' binaries).
pub fn binaries() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = bin_dir();
            let names = [
                "agentrun-operator",
                "agentrun-sidecar",
                "agentrun-entrypoint",
                "agentrun-relay",
                "agentrun-archiver",
                "kubectl-agentrun",
            ];
            if names.iter().all(|n| dir.join(n).exists()) {
                return dir;
            }
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-p",
                    "agentrun-operator",
                    "-p",
                    "agentrun-sidecar",
                    "-p",
                    "agentrun-relay",
                    "-p",
                    "agentrun-archiver",
                    "-p",
                    "kubectl-agentrun",
                ])
                .current_dir(workspace())
                .status()
                .expect("run cargo build");
            assert!(
                status.success(),
                "cargo build -p agentrun-operator -p agentrun-sidecar -p agentrun-relay -p agentrun-archiver -p kubectl-agentrun failed"
            );
            for n in names {
                assert!(
                    dir.join(n).exists(),
                    "{} is missing after cargo build (is CARGO_TARGET_DIR the same as this test's?)",
                    dir.join(n).display()
                );
            }
            dir
        })
        .clone()
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// A child process killed (and reaped) on drop; its output goes to a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, bin: &Path, args: &[String], log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Redis of a [`Stack`]: one server, or a Redis Cluster.
pub enum Backend {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    /// The URL for the processes on this machine (operator, relay, tests).
    pub fn url(&self) -> String {
        match self {
            Backend::Server(s) => s.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    /// The URL for the pods, which reach this machine at `host`.
    pub fn pod_url(&self, host: &str) -> String {
        match self {
            Backend::Server(s) => format!("redis://{host}:{}", s.port()),
            // The nodes announce `host` already.
            Backend::Cluster(c) => c.url(),
        }
    }

    fn server(&mut self) -> &mut RedisServer {
        match self {
            Backend::Server(s) => s,
            Backend::Cluster(_) => {
                panic!("this scenario stops and starts one Redis server, not a cluster")
            }
        }
    }

    pub fn kill(&mut self) {
        self.server().kill();
    }

    pub fn restart(&mut self) {
        self.server().restart();
    }
}

/// How to start a [`Stack`]; the default is what [`Stack::start`] does.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// A Redis Cluster of three masters instead of one server.
    pub redis_cluster: bool,
    /// kube-sim's auth config: users (bearer tokens) whose requests RBAC authorizes.
    pub auth: kube_sim::AuthConfig,
    /// How the operator runs; it is started by `start_with` unless `no_operator`.
    pub operator: OperatorOptions,
    /// Leave the operator to the test (`start_operator_with`), e.g. after installing RBAC.
    pub no_operator: bool,
    /// Archive runs when they end: the operator with `--archive true` and a short retention,
    /// an `agentrun-archiver` writing to a folder store, and the relay reading it
    /// (`--archive-url`).
    pub archive: bool,
}

/// How [`Stack::start_operator`] runs the operator.
#[derive(Debug, Clone, Default)]
pub struct OperatorOptions {
    /// The kubeconfig the operator uses (None: the cluster's admin kubeconfig).
    pub kubeconfig: Option<PathBuf>,
    /// Leader election on, with its Lease in this namespace (None: `--no-leader-election`).
    pub lease_namespace: Option<String>,
    /// `--watch-namespace` (None: every namespace).
    pub watch_namespace: Option<String>,
    /// The agent pods' `terminationGracePeriodSeconds` (None: 8, short so that a deleted run's
    /// Redis user goes within a scenario's patience).
    pub pod_termination_grace_seconds: Option<u32>,
}

/// How [`Stack::restart_relay_with`] runs the relay (the default: what [`Stack::start`] does).
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Arguments added to the relay's (`--redis-url`, `--listen`, `--keepalive-seconds`),
    /// e.g. `--auth kubernetes --kubeconfig FILE`.
    pub args: Vec<String>,
}

/// Seconds a run's Redis data is kept after its archive is complete, in a stack that archives.
pub const ARCHIVE_RETENTION_SECONDS: u32 = 2;

/// Starts the relay on `url`'s address with `opts`' extra arguments (and the archive store,
/// when the stack has one).
fn spawn_relay(
    redis: &Backend,
    url: &str,
    archive: Option<&Path>,
    opts: &RelayOptions,
    log: PathBuf,
) -> Proc {
    let listen = url.strip_prefix("http://").expect("an http:// relay URL");
    let mut args: Vec<String> = vec![
        "--redis-url".into(),
        redis.url(),
        "--listen".into(),
        listen.into(),
        "--keepalive-seconds".into(),
        "1".into(),
    ];
    if let Some(store) = archive {
        args.extend(["--archive-url".into(), store.display().to_string()]);
    }
    args.extend(opts.args.iter().cloned());
    Proc::spawn("relay", &binaries().join("agentrun-relay"), &args, log)
}

/// `helm template RELEASE helm/agentrun --namespace NAMESPACE ARGS...` with the real helm (or
/// `$HELM`): the rendered YAML. `args` are further helm arguments (`--set k=v`,
/// `--include-crds`).
pub fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let chart = workspace().join("helm").join("agentrun");
    let out = Command::new(&helm)
        .args(["template", release])
        .arg(&chart)
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("run {helm} (install it with scripts/deps/helm.sh, or set HELM): {e}")
        });
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

pub struct Stack {
    // Dropped in this order: the operator and relay before Redis and the cluster.
    pub operator: Option<Proc>,
    pub relay: Proc,
    /// `agentrun-archiver`, in a stack that archives.
    pub archiver: Option<Proc>,
    /// The folder the archiver writes and the relay reads, in a stack that archives.
    pub archive_store: Option<PathBuf>,
    pub relay_url: String,
    pub metrics_addr: String,
    pub redis: Backend,
    pub host_address: String,
    pub sidecar_image: String,
    pub dir: tempfile::TempDir,
    pub cluster: Cluster,
    pub http: reqwest::Client,
    /// How `start_operator` runs the operator (kept across restarts).
    pub operator_options: OperatorOptions,
}

impl Stack {
    /// Starts everything and installs the CRDs with `kubectl apply -f crds/`.
    pub async fn start() -> Stack {
        Self::start_with(StackOptions::default()).await
    }

    /// [`Stack::start`] with options: kube-sim users, how the operator runs, or no operator.
    pub async fn start_with(opts: StackOptions) -> Stack {
        let bins = binaries();
        let dir = tempfile::tempdir().expect("temp dir");
        let real = std::env::var("E2E_KUBECONFIG").is_ok_and(|k| !k.is_empty());
        let (host_address, sidecar_image) = if real {
            (
                std::env::var("E2E_HOST_ADDRESS").expect(
                    "E2E_HOST_ADDRESS: an address of this machine the cluster's pods reach",
                ),
                std::env::var("E2E_SIDECAR_IMAGE")
                    .expect("E2E_SIDECAR_IMAGE: the sidecar image loaded into the cluster"),
            )
        } else {
            (SIM_HOST_ADDRESS.to_string(), SIM_SIDECAR_IMAGE.to_string())
        };
        let images = dir.path().join("images.yaml");
        // The sidecar image is distroless `nonroot` (docker/Dockerfile): user 65532:65532, with
        // agentrun-entrypoint beside agentrun-sidecar. Agent images (busybox) run as root.
        std::fs::write(
            &images,
            format!(
                "images:\n  ghcr.io/agentrun/agentrun-sidecar:\n    binary: {}\n    files: [{}]\n    user: \"65532:65532\"\n  busybox: {{user: \"0\"}}\n",
                bins.join("agentrun-sidecar").display(),
                bins.join("agentrun-entrypoint").display()
            ),
        )
        .expect("write image map");
        if !real {
            ensure_host_address(&host_address);
        }
        let cluster = Cluster::start_with(kube_sim::Options {
            images: kube_sim::ImageMap::load(&images).expect("image map"),
            pod_network: true,
            auth: opts.auth.clone(),
            // Not `host_address`: kube-sim's `ip addr add` fails when the address is already
            // there ("Address already assigned" from this iproute2; see ensure_host_address).
            host_address: None,
            ..Default::default()
        })
        .await;
        // Redis listens on the host address for the pods (and on loopback for the rest).
        let bind = format!("127.0.0.1 {host_address}");
        let redis = if opts.redis_cluster {
            Backend::Cluster(RedisCluster::start_on(3, 0, Some(&host_address)).await)
        } else {
            Backend::Server(RedisServer::start_with(&[
                "--bind",
                &bind,
                "--protected-mode",
                "no",
            ]))
        };

        let crds = workspace().join("crds");
        cluster.kubectl_ok(&["apply", "-f", crds.to_str().expect("utf-8")]);

        let archive_store = opts.archive.then(|| dir.path().join("archive"));
        let archiver = archive_store.as_deref().map(|store| {
            let args: Vec<String> = vec![
                "--redis-url".into(),
                redis.url(),
                "--store-url".into(),
                store.display().to_string(),
                "--metrics-addr".into(),
                format!("127.0.0.1:{}", free_port()),
                "--consumer".into(),
                "e2e-archiver".into(),
            ];
            Proc::spawn(
                "archiver",
                &bins.join("agentrun-archiver"),
                &args,
                dir.path().join("archiver.log"),
            )
        });
        let relay_url = format!("http://127.0.0.1:{}", free_port());
        let relay = spawn_relay(
            &redis,
            &relay_url,
            archive_store.as_deref(),
            &RelayOptions::default(),
            dir.path().join("relay.log"),
        );
        let mut stack = Stack {
            operator: None,
            relay,
            archiver,
            archive_store,
            relay_url,
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            redis,
            host_address,
            sidecar_image,
            dir,
            cluster,
            http: reqwest::Client::new(),
            operator_options: opts.operator.clone(),
        };
        if !opts.no_operator {
            stack.start_operator().await;
        }
        stack.wait_relay_ready().await;
        stack
    }

    /// Restarts the relay on the same address (the operator's `--relay-url`) as `opts` says,
    /// e.g. with `--auth kubernetes`, and waits for its /readyz.
    pub async fn restart_relay_with(&mut self, opts: RelayOptions) {
        self.relay.kill();
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        self.relay = spawn_relay(
            &self.redis,
            &self.relay_url,
            self.archive_store.as_deref(),
            &opts,
            self.dir.path().join(format!("relay-{n}.log")),
        );
        self.wait_relay_ready().await;
    }

    async fn wait_relay_ready(&self) {
        let url = format!("{}/readyz", self.relay_url);
        self.wait_ready(20, "the relay is ready", url).await;
    }

    /// Waits until GET `url` succeeds.
    async fn wait_ready(&self, secs: u64, what: &str, url: String) {
        let http = self.http.clone();
        self.eventually(secs, what, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// Starts (or restarts) the operator and waits for its /readyz.
    pub async fn start_operator(&mut self) {
        let opts = self.operator_options.clone();
        self.start_operator_with(opts).await;
    }

    /// Starts (or restarts) the operator as `opts` says (kept for later restarts) and waits for
    /// its /readyz.
    pub async fn start_operator_with(&mut self, opts: OperatorOptions) {
        self.spawn_operator_with(opts);
        let url = format!("http://{}/readyz", self.metrics_addr);
        self.wait_ready(30, "the operator is ready", url).await;
    }

    /// Starts the operator without waiting for it to be ready (it may refuse to start).
    pub fn spawn_operator_with(&mut self, opts: OperatorOptions) {
        self.operator_options = opts.clone();
        let kubeconfig = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| self.cluster.kubeconfig.clone());
        let election = match &opts.lease_namespace {
            Some(ns) => vec!["--lease-namespace".to_string(), ns.clone()],
            None => vec!["--no-leader-election".to_string()],
        };
        if let Some(mut old) = self.operator.take() {
            old.kill();
        }
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--metrics-addr".into(),
            self.metrics_addr.clone(),
            "--sidecar-image".into(),
            self.sidecar_image.clone(),
            "--redis-url".into(),
            self.redis.url(),
            "--sidecar-redis-url".into(),
            self.redis.pod_url(&self.host_address),
            "--relay-url".into(),
            self.relay_url.clone(),
            "--run-credential-key".into(),
            "e2e-run-credential-key".into(),
            "--retention-seconds".into(),
            if self.archive_store.is_some() {
                ARCHIVE_RETENTION_SECONDS.to_string()
            } else {
                "3600".into()
            },
            // Short, so that a deleted run's Redis user (kept for its pods' final flush
            // until their grace period is over) goes within the scenario's patience.
            "--pod-termination-grace-seconds".into(),
            opts.pod_termination_grace_seconds.unwrap_or(8).to_string(),
        ];
        args.extend(election);
        if self.archive_store.is_some() {
            args.extend(["--archive".to_string(), "true".to_string()]);
        }
        if let Some(ns) = &opts.watch_namespace {
            args.extend(["--watch-namespace".to_string(), ns.clone()]);
        }
        let op = Proc::spawn(
            "operator",
            &binaries().join("agentrun-operator"),
            &args,
            self.dir.path().join(format!("operator-{n}.log")),
        );
        self.operator = Some(op);
    }

    /// Like [`eventually`], but a timeout also prints the operator's and relay's last log lines.
    pub async fn eventually<T, F, Fut>(&self, secs: u64, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() >= deadline {
                self.dump().await;
                panic!("timed out after {secs}s waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints what helps to debug a failed scenario.
    pub async fn dump(&self) {
        if let Some(op) = &self.operator {
            eprintln!("--- operator log (tail) ---\n{}", op.tail());
        }
        eprintln!("--- relay log (tail) ---\n{}", self.relay.tail());
        if let Some(a) = &self.archiver {
            eprintln!("--- archiver log (tail) ---\n{}", a.tail());
        }
        let ars = self.cluster.kubectl(&[
            "get",
            "ar,pods,secrets",
            "-n",
            &self.cluster.namespace,
            "-o",
            "yaml",
        ]);
        eprintln!(
            "--- objects ---\n{}",
            String::from_utf8_lossy(&ars.stdout)
                .chars()
                .take(20000)
                .collect::<String>()
        );
    }

    pub fn ns(&self) -> &str {
        &self.cluster.namespace
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-n", self.ns()]);
        self.cluster.kubectl_ok(&a)
    }

    /// `kubectl apply -f` of a file under the workspace (e.g. `manifests/examples/hello.yaml`).
    pub fn apply_example(&self, rel: &str) -> String {
        let p = workspace().join(rel);
        self.kubectl_ok(&["apply", "-f", p.to_str().expect("utf-8")])
    }

    /// `kubectl apply -f` of YAML text.
    pub fn apply_yaml(&self, name: &str, yaml: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).expect("write manifest");
        self.kubectl_ok(&["apply", "-f", p.to_str().expect("utf-8")])
    }

    pub async fn agentruns(&self) -> Api<DynamicObject> {
        let ar = ApiResource {
            group: "agentrun.dev".into(),
            version: "v1alpha1".into(),
            api_version: "agentrun.dev/v1alpha1".into(),
            kind: "AgentRun".into(),
            plural: "agentruns".into(),
        };
        Api::namespaced_with(self.cluster.client().await, self.ns(), &ar)
    }

    /// The AgentRun as JSON, if it exists.
    pub async fn agentrun(&self, name: &str) -> Option<Value> {
        let api = self.agentruns().await;
        let o = api.get_opt(name).await.ok()??;
        serde_json::to_value(o).ok()
    }

    /// Waits until the run's phase is one of `phases`; returns the AgentRun.
    pub async fn wait_phase(&self, name: &str, phases: &[&str], secs: u64) -> Value {
        let api = self.agentruns().await;
        self.eventually(secs, &format!("{name} in phase {phases:?}"), || {
            let api = api.clone();
            async move {
                let o = api.get_opt(name).await.ok()??;
                let v = serde_json::to_value(o).ok()?;
                let p = v["status"]["phase"].as_str()?;
                phases.contains(&p).then_some(v)
            }
        })
        .await
    }

    /// Waits for `.status.runId`.
    pub async fn run_id(&self, name: &str) -> String {
        let api = self.agentruns().await;
        self.eventually(30, &format!("{name} has a runId"), || {
            let api = api.clone();
            async move {
                let o = api.get_opt(name).await.ok()??;
                let v = serde_json::to_value(o).ok()?;
                v["status"]["runId"].as_str().map(str::to_string)
            }
        })
        .await
    }

    /// The pods of the namespace as JSON.
    pub async fn pods(&self) -> Vec<Value> {
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.cluster.client().await, self.ns());
        match api.list(&Default::default()).await {
            Ok(l) => l
                .items
                .into_iter()
                .filter_map(|p| serde_json::to_value(p).ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Reads the run's events from the relay (`from=earliest`, following) until `event: end`.
    pub async fn sse(&self, run_id: &str, secs: u64) -> Sse {
        self.sse_query(run_id, "from=earliest", secs).await
    }

    pub async fn sse_query(&self, run_id: &str, query: &str, secs: u64) -> Sse {
        let url = format!("{}/api/runs/{run_id}/events?{query}", self.relay_url);
        let res = tokio::time::timeout(Duration::from_secs(secs), read_sse(&self.http, &url)).await;
        match res {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.dump().await;
                panic!("SSE {url}: {e}")
            }
            Err(_) => {
                self.dump().await;
                panic!("SSE {url}: no `event: end` within {secs}s")
            }
        }
    }

    /// `POST /api/runs/{run}/control`.
    pub async fn control(&self, run_id: &str, body: Value) -> (u16, String) {
        let url = format!("{}/api/runs/{run_id}/control", self.relay_url);
        let r = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("POST control");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis client")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// The keys of a run in Redis.
    pub async fn run_keys(&self, run_id: &str) -> Vec<String> {
        let mut c = self.redis_conn().await;
        redis::cmd("KEYS")
            .arg(format!("run:{{{run_id}}}:*"))
            .query_async(&mut c)
            .await
            .expect("KEYS")
    }
}

/// What the relay sent for a run.
#[derive(Debug, Default)]
pub struct Sse {
    /// `(event, data)` in order, `end` included.
    pub events: Vec<(String, Value)>,
}

impl Sse {
    /// Output bytes per variation, in stream order (`content`, base64-decoded when so marked).
    pub fn output(&self) -> BTreeMap<String, Vec<u8>> {
        self.channel_bytes("output")
    }

    pub fn channel_bytes(&self, channel: &str) -> BTreeMap<String, Vec<u8>> {
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (_, d) in &self.events {
            if d["channel"] != channel {
                continue;
            }
            let var = d["variation"].as_str().unwrap_or("").to_string();
            let content = d["content"].as_str().unwrap_or_default();
            let bytes = if d["encoding"] == "base64" {
                base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .expect("base64 content")
            } else {
                content.as_bytes().to_vec()
            };
            out.entry(var).or_default().extend(bytes);
        }
        out
    }

    /// Entries of a channel as `(variation, seq)`.
    pub fn seqs(&self, channel: &str) -> Vec<(String, u64)> {
        self.events
            .iter()
            .filter(|(_, d)| d["channel"] == channel)
            .map(|(_, d)| {
                (
                    d["variation"].as_str().unwrap_or("").to_string(),
                    d["seq"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    pub fn end(&self) -> Option<&Value> {
        self.events
            .iter()
            .rev()
            .find(|(e, _)| e == "end")
            .map(|(_, d)| d)
    }

    /// Status entries' contents (JSON when they are).
    pub fn statuses(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|(_, d)| d["channel"] == "status")
            .map(|(_, d)| {
                let c = d["content"].as_str().unwrap_or_default();
                serde_json::from_str(c).unwrap_or_else(|_| Value::String(c.to_string()))
            })
            .collect()
    }
}

/// Reads an SSE response of `url` until `event: end` (with `http`'s default headers, e.g. a token).
pub async fn read_sse(http: &reqwest::Client, url: &str) -> Result<Sse, String> {
    use futures::StreamExt as _;
    let res = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!("status {}", res.status()));
    }
    let mut body = res.bytes_stream();
    let mut parser = agentrun_protocol::sse::Parser::default();
    let mut sse = Sse::default();
    while let Some(chunk) = body.next().await {
        parser.push(&chunk.map_err(|e| e.to_string())?);
        while let Some(ev) = parser.next_event() {
            let value = serde_json::from_str(&ev.data).unwrap_or(Value::String(ev.data));
            let end = ev.event == "end";
            sse.events.push((ev.event, value));
            if end {
                return Ok(sse);
            }
        }
    }
    Err(format!(
        "the stream closed before `event: end` ({} events)",
        sse.events.len()
    ))
}

/// Puts `addr` on the host's `lo` (idempotent, safe in parallel test processes). kube-sim's own
/// `--host-address` tolerates only iproute2's "File exists", not "Address already assigned",
/// so a second kube-sim on the machine fails to start with it.
pub fn ensure_host_address(addr: &str) {
    let has = || {
        Command::new("ip")
            .args(["-4", "addr", "show", "dev", "lo"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("inet {addr}/")))
    };
    if has() {
        return;
    }
    let out = Command::new("ip")
        .args(["addr", "add", &format!("{addr}/32"), "dev", "lo"])
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success() || has(),
        "ip addr add {addr}/32 dev lo (the scenarios need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a shell script on the host the way the example's agent does, returning its stdout.
pub fn run_sh(script: &str) -> Vec<u8> {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh")
        .stdout
}

/// Unused import guard for `eventually` users of this module.
pub async fn poll<T, F, Fut>(secs: u64, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually(secs, what, f).await
}
