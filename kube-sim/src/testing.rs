//! Test helpers (feature `testing`), shared by kube-sim's tests and agentrun's e2e suite: a
//! cluster (kube-sim in-process, or the real cluster named by `E2E_KUBECONFIG`), a fresh
//! namespace per test, kubectl, kube-rs, and deadlines.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use kube::Client;

use crate::{KubeSim, Options};

/// The cluster of one test, with a fresh namespace. Dropping it drops the in-process kube-sim,
/// or deletes the namespace on a real cluster.
pub struct Cluster {
    /// None on the real cluster of `E2E_KUBECONFIG`.
    pub sim: Option<KubeSim>,
    pub kubeconfig: PathBuf,
    pub namespace: String,
    /// The test's temporary directory (kubeconfig, kube-sim's state, kubectl's cache, files).
    pub dir: tempfile::TempDir,
}

/// The kubectl to test with (`KUBECTL`, default `kubectl` on PATH).
pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

impl Cluster {
    /// kube-sim with default options, or the cluster of `E2E_KUBECONFIG`.
    pub async fn start() -> Cluster {
        Self::start_with(Options::default()).await
    }

    /// kube-sim with `opts` (its kubeconfig and state directory are the test's), or the
    /// cluster of `E2E_KUBECONFIG`.
    pub async fn start_with(opts: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        // Searchable by every user (not listable): containers run as other users and execute
        // the images kube-sim pulls into its state directory below it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("chmod temp dir");
        }
        let (sim, kubeconfig) = match std::env::var("E2E_KUBECONFIG") {
            Ok(k) if !k.is_empty() => (None, PathBuf::from(k)),
            _ => {
                let kc = dir.path().join("kubeconfig");
                let opts = Options {
                    kubeconfig_out: Some(kc.clone()),
                    state_dir: Some(dir.path().join("state")),
                    ..opts
                };
                let sim = crate::start(opts).await.expect("start kube-sim");
                (Some(sim), kc)
            }
        };
        let namespace = format!("t-{:08x}", rand::random::<u32>());
        let c = Cluster {
            sim,
            kubeconfig,
            namespace,
            dir,
        };
        // `kubectl apply`, not `kubectl create namespace`: kubectl's generators send protobuf,
        // which kube-sim does not decode (see kube-sim/README.md).
        let ns_file = c.write(
            "namespace.yaml",
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
                c.namespace
            ),
        );
        let out = c.kubectl(&["apply", "-f", ns_file.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "create namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    pub fn is_sim(&self) -> bool {
        self.sim.is_some()
    }

    /// Runs kubectl against the cluster (with a per-test discovery cache).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let cache = self.dir.path().join("kube-cache");
        std::process::Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and returns stdout, failing the test on a non-zero exit.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {:?} failed: {}{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn client(&self) -> Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kube config");
        Client::try_from(cfg).expect("kube client")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.sim.is_none() {
            let _ = self.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
        }
    }
}

/// Polls `f` until it returns Some, failing the test after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
