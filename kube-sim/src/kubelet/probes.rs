//! Probes: startup, readiness and liveness, with `httpGet` and `tcpSocket` (connecting to the
//! pod IP from the host) and `exec` (run in the container's mount and network namespaces with
//! `nsenter`, as the container's user with its capabilities); their timing and thresholds, and
//! what their results do to a container.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::Command;

use super::runner::PodRunner;
use super::security::Identity;
use super::spawn::setpriv_prefix;
use crate::json::str_at;

/// Counters of one probe (startup, readiness, liveness) of one container.
#[derive(Debug, Clone, Default)]
pub(super) struct ProbeState {
    pub(super) next: Option<Instant>,
    pub(super) successes: u32,
    pub(super) failures: u32,
}

pub(super) const STARTUP: usize = 0;
pub(super) const READINESS: usize = 1;
pub(super) const LIVENESS: usize = 2;
pub(super) const PROBE_FIELDS: [&str; 3] = ["startupProbe", "readinessProbe", "livenessProbe"];

impl PodRunner {
    /// Runs the probes that are due, and acts on their results.
    pub(super) async fn probe_all(&mut self) {
        let mount_ns = self.kubelet.cfg.mount_namespaces;
        let net = self.net.as_ref().map(|n| n.name.clone());
        let pod_ip = self.pod_ip.clone();
        let now = Instant::now();
        let grace = Duration::from_secs(
            self.pod
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30),
        );
        for c in self.inits.iter_mut().chain(self.mains.iter_mut()) {
            if !c.running() || (c.init && !c.sidecar) {
                continue;
            }
            if let Some(t) = c.kill_at {
                if now >= t
                    && let Some(pid) = c.pid
                {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                continue;
            }
            for k in [STARTUP, READINESS, LIVENESS] {
                if k != STARTUP && !c.started {
                    continue;
                }
                if k == STARTUP && c.started {
                    continue;
                }
                let Some(probe) = c.spec.get(PROBE_FIELDS[k]).cloned() else {
                    continue;
                };
                if c.probes[k].next.is_none_or(|t| now < t) {
                    continue;
                }
                let period = probe["periodSeconds"].as_u64().unwrap_or(10).max(1);
                c.probes[k].next = Some(now + Duration::from_secs(period));
                let ns = (c.pid, mount_ns, net.as_deref());
                let ok = run_probe(&probe, &c.spec, &pod_ip, ns, c.identity.as_ref()).await;
                let st = &mut c.probes[k];
                if ok {
                    st.successes += 1;
                    st.failures = 0;
                } else {
                    st.failures += 1;
                    st.successes = 0;
                }
                let failure_threshold = probe["failureThreshold"].as_u64().unwrap_or(3) as u32;
                let success_threshold = probe["successThreshold"].as_u64().unwrap_or(1) as u32;
                match k {
                    STARTUP if ok => {
                        c.started = true;
                        c.ready = c.spec.get("readinessProbe").is_none();
                    }
                    READINESS if ok && st.successes >= success_threshold => c.ready = true,
                    READINESS if !ok && st.failures >= failure_threshold => c.ready = false,
                    _ => {}
                }
                if !ok {
                    let kind = ["Startup", "Readiness", "Liveness"][k];
                    self.events
                        .push(("Warning", "Unhealthy", format!("{kind} probe failed")));
                }
                match k {
                    STARTUP | LIVENESS if !ok && st.failures >= failure_threshold => {
                        tracing::info!(
                            "pod {}/{}: container {} failed its {} probe; killing it",
                            self.ns,
                            self.name,
                            c.name,
                            PROBE_FIELDS[k]
                        );
                        if let Some(pid) = c.pid {
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                        }
                        c.kill_at = Some(now + grace);
                        let kind = ["Startup", "Readiness", "Liveness"][k];
                        self.events.push((
                            "Normal",
                            "Killing",
                            format!(
                                "Container {} failed {} probe, will be restarted",
                                c.name,
                                kind.to_lowercase()
                            ),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Runs one probe: httpGet and tcpSocket connect to the pod IP from the host; exec runs the
/// command inside the container's namespaces (those of process `pid`: mount, network), as
/// its identity.
async fn run_probe(
    probe: &Value,
    spec: &Value,
    pod_ip: &str,
    (pid, mount_ns, net): (Option<i32>, bool, Option<&str>),
    identity: Option<&Identity>,
) -> bool {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    let port_of = |action: &Value| -> Option<u16> {
        match &action["port"] {
            Value::Number(n) => n.as_u64().map(|p| p as u16),
            Value::String(name) => name.parse().ok().or_else(|| {
                spec["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"] == name.as_str())?["containerPort"]
                    .as_u64()
                    .map(|p| p as u16)
            }),
            _ => None,
        }
    };
    let attempt = async {
        if let Some(h) = probe.get("httpGet") {
            let port = port_of(h)?;
            let host = h["host"].as_str().unwrap_or(pod_ip).to_string();
            let path = h["path"].as_str().unwrap_or("/");
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n"
            );
            for hd in h["httpHeaders"].as_array().into_iter().flatten() {
                req.push_str(&format!(
                    "{}: {}\r\n",
                    str_at(hd, "/name"),
                    str_at(hd, "/value")
                ));
            }
            req.push_str("\r\n");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(req.as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 12 {
                let n = stream.read(&mut buf[got..]).await.ok()?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            let line = String::from_utf8_lossy(&buf[..got]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(t) = probe.get("tcpSocket") {
            let port = port_of(t)?;
            let host = t["host"].as_str().unwrap_or(pod_ip).to_string();
            Some(
                tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .is_ok(),
            )
        } else if let Some(e) = probe.get("exec") {
            let cmd: Vec<String> = e["command"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            if cmd.is_empty() {
                return Some(false);
            }
            let mut full: Vec<String> = Vec::new();
            if let Some(pid) = pid.filter(|_| mount_ns || net.is_some()) {
                full.extend(["nsenter".into(), "-t".into(), pid.to_string()]);
                if mount_ns {
                    full.push("-m".into());
                }
                if net.is_some() {
                    full.push("-n".into());
                }
                full.push("--".into());
            }
            if let Some(id) = identity {
                full.extend(setpriv_prefix(id));
            }
            full.extend(cmd);
            let status = Command::new(&full[0])
                .args(&full[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .ok()?;
            Some(status.success())
        } else {
            tracing::warn!(
                "kube-sim runs httpGet, tcpSocket and exec probes only; treating {probe} as passing"
            );
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
