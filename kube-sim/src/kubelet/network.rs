//! Per-pod network namespaces: each pod gets its own namespace (its own loopback, so pods never
//! collide on ports) joined to the host by a veth pair; the pod's default route points at the
//! host side, so the pod reaches anything the host listens on at the veth address or at the
//! optional "host service address" that kube-sim adds to the host's loopback device.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::Command;

/// Namespace numbers handed out in this process (several kube-sims may share one process).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Pod network settings.
#[derive(Debug)]
pub struct Network {
    /// An address (like 10.99.0.1) added to the host's `lo`; test services bind it and pods
    /// reach it through their default route.
    pub host_address: Option<String>,
    prefix: u32,
}

/// One pod's network namespace.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    pub ip: String,
    host_if: String,
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Network {
    /// Sets up the host side. Each kube-sim uses its own range of namespace names so that
    /// several instances (parallel tests) do not collide.
    pub async fn new(host_address: Option<String>) -> Result<Network, String> {
        if let Some(a) = &host_address {
            let cidr = format!("{a}/32");
            if let Err(e) = ip(&["addr", "add", &cidr, "dev", "lo"]).await
                && !e.contains("File exists")
                && !e.contains("already assigned")
            {
                return Err(e);
            }
        }
        // One base per process (spread by process id), one counter for all kube-sims in it.
        static BASE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let prefix =
            *BASE.get_or_init(|| (std::process::id() % 64) * 256 + rand::random::<u32>() % 64);
        Ok(Network {
            host_address,
            prefix,
        })
    }

    pub async fn create(&self, _pod_uid: &str) -> Result<NetNs, String> {
        // A number another kube-sim (another test process) holds is skipped, never taken over.
        let mut last_err = String::new();
        for _ in 0..64 {
            let n = (self.prefix + NEXT.fetch_add(1, Ordering::SeqCst)) % 16_384;
            let name = format!("kube-sim-{n}");
            let host_if = format!("ksh{n}");
            if let Err(e) = ip(&["netns", "add", &name]).await {
                last_err = e;
                continue;
            }
            // From here on the number is ours; dropping `ns` removes what was made.
            let mut ns = NetNs {
                name,
                ip: String::new(),
                host_if,
            };
            match ns.wire(n).await {
                Ok(pod_ip) => {
                    ns.ip = pod_ip;
                    return Ok(ns);
                }
                Err(e) => last_err = e,
            }
        }
        Err(format!("no free pod network namespace: {last_err}"))
    }
}

impl NetNs {
    /// Creates the veth pair and addresses of namespace number `n`; returns the pod IP.
    async fn wire(&self, n: u32) -> Result<String, String> {
        let (third, fourth) = (n / 64, (n % 64) * 4);
        let host_ip = format!("10.200.{third}.{}", fourth + 1);
        let pod_ip = format!("10.200.{third}.{}", fourth + 2);
        let pod_if = format!("ksp{n}");
        let host_cidr = format!("{host_ip}/30");
        let pod_cidr = format!("{pod_ip}/30");
        let (name, host_if) = (self.name.as_str(), self.host_if.as_str());
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "link", "add", host_if, "type", "veth", "peer", "name", &pod_if,
            ],
            vec!["link", "set", &pod_if, "netns", name],
            vec!["addr", "add", &host_cidr, "dev", host_if],
            vec!["link", "set", host_if, "up"],
            vec!["-n", name, "addr", "add", &pod_cidr, "dev", &pod_if],
            vec!["-n", name, "link", "set", &pod_if, "up"],
            vec!["-n", name, "link", "set", "lo", "up"],
            vec!["-n", name, "route", "add", "default", "via", &host_ip],
        ];
        for step in steps {
            ip(&step).await?;
        }
        Ok(pod_ip)
    }

    /// Removes the namespace and its veth pair (also done on drop).
    pub async fn destroy(mut self) {
        let _ = ip(&["link", "del", &self.host_if]).await;
        let _ = ip(&["netns", "del", &self.name]).await;
        self.name.clear();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        // The runtime may be gone (a test ending): clean up synchronously.
        for args in [
            vec!["link", "del", self.host_if.as_str()],
            vec!["netns", "del", self.name.as_str()],
        ] {
            let _ = std::process::Command::new("ip")
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
