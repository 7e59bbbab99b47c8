//! The operator's own settings (from flags and environment), shared by the pod builder and the
//! reconciler.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// What the operator puts into every agent pod and run.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Image with `agentrun-sidecar` and `agentrun-entrypoint`.
    pub sidecar_image: String,
    /// Pull policy of the sidecar image (`IfNotPresent` unless told).
    pub sidecar_image_pull_policy: Option<String>,
    /// Resources of the sidecar container.
    pub sidecar_resources: ResourceRequirements,
    /// Redis URL handed to the sidecars (through a per-run Secret).
    pub redis_url: String,
    /// Redis ACL user handed to the sidecars, if any.
    pub redis_username: Option<String>,
    /// Redis password handed to the sidecars, if any.
    pub redis_password: Option<String>,
    /// Key from which each run's Redis ACL password is derived; when set, every run gets its
    /// own Redis user limited to its keys and channels (`None`: the sidecars share
    /// `redis_username`/`redis_password`).
    pub run_credential_key: Option<String>,
    /// Public base URL of the relay (web UI); the run page is `<url>/runs/<runId>`.
    pub relay_url: Option<String>,
    /// Default `streamMaxLen` for runs that do not set it.
    pub default_stream_max_len: i64,
    /// Default `retentionSeconds` for runs that do not set it.
    pub default_retention_seconds: i64,
    /// Grace period of agent pods: the agent's stop plus the sidecar's final flush must fit.
    pub termination_grace_period_seconds: i64,
    /// TLS files for the sidecars' `rediss://` connection (put into the run's Secret and
    /// mounted into the sidecar container).
    pub sidecar_tls: SidecarTls,
}

/// PEM contents handed to the sidecars: a CA bundle and a client certificate with its key.
/// Agent pods live in the runs' namespaces, where the operator's own Secrets cannot be mounted,
/// so the operator copies the contents into each run's Secret.
#[derive(Clone, Default, PartialEq)]
pub struct SidecarTls {
    /// CA bundle that signed the Redis server certificate.
    pub ca_pem: Option<String>,
    /// Client certificate and key, for a Redis that requires mutual TLS.
    pub client_pem: Option<(String, String)>,
}

impl std::fmt::Debug for SidecarTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field(
                "client_pem",
                &self.client_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The largest PEM file accepted (a Secret holds at most 1 MiB in all).
pub const MAX_PEM_BYTES: u64 = 256 * 1024;

impl SidecarTls {
    /// Reads the files named by the `--sidecar-redis-*` flags; every error names the flag and
    /// the file.
    pub fn load(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let ca_pem = ca
            .map(|p| read_pem("--sidecar-redis-ca-file", p, "CERTIFICATE"))
            .transpose()?;
        let client_pem = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read_pem("--sidecar-redis-client-cert", c, "CERTIFICATE")?,
                read_pem("--sidecar-redis-client-key", k, "PRIVATE KEY")?,
            )),
            (None, None) => None,
            _ => {
                return Err(
                    "--sidecar-redis-client-cert and --sidecar-redis-client-key go together: give both or neither".into(),
                );
            }
        };
        Ok(Self { ca_pem, client_pem })
    }

    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client_pem.is_none()
    }
}

/// A PEM file of at most [`MAX_PEM_BYTES`] with at least one `-----BEGIN ...{label}-----` block.
fn read_pem(flag: &str, path: &std::path::Path, label: &str) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{flag}: cannot read {} as PEM text: {e}", path.display()))?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{flag}: {} is larger than {MAX_PEM_BYTES} bytes; a run's Secret must stay small",
            path.display()
        ));
    }
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !has_block {
        return Err(format!(
            "{flag}: {} holds no PEM {label} block (-----BEGIN ...{label}-----)",
            path.display()
        ));
    }
    Ok(text)
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sidecar_image: "ghcr.io/agentrun/agentrun-sidecar:latest".into(),
            sidecar_image_pull_policy: None,
            sidecar_resources: default_sidecar_resources(),
            redis_url: "redis://redis:6379".into(),
            redis_username: None,
            redis_password: None,
            run_credential_key: None,
            relay_url: None,
            default_stream_max_len: 100_000,
            default_retention_seconds: 7 * 24 * 3600,
            termination_grace_period_seconds: 45,
            sidecar_tls: SidecarTls::default(),
        }
    }
}

/// Requests and limits that fit the sidecar's bounded buffers.
pub fn default_sidecar_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("10m")),
            ("memory".to_string(), q("32Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("128Mi"))])),
        ..Default::default()
    }
}

impl Settings {
    /// The run's page on the relay, if the relay URL is known.
    pub fn run_url(&self, run_id: &str) -> Option<String> {
        self.relay_url
            .as_deref()
            .map(|base| format!("{}/runs/{run_id}", base.trim_end_matches('/')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    fn file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn sidecar_tls_files_are_read_and_checked() {
        let dir =
            std::env::temp_dir().join(format!("agentrun-operator-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let _cleanup = Cleanup(dir.clone());
        let dir = &dir;
        let ca = file(dir, "ca.crt", CERT);
        let crt = file(dir, "tls.crt", CERT);
        let key = file(dir, "tls.key", KEY);
        let ec_key = file(
            dir,
            "ec.key",
            "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
        );
        let tls = SidecarTls::load(Some(&ca), Some(&crt), Some(&key)).expect("loads");
        assert_eq!(tls.ca_pem.as_deref(), Some(CERT));
        assert_eq!(tls.client_pem, Some((CERT.to_string(), KEY.to_string())));
        assert!(
            !format!("{tls:?}").contains("MIIE"),
            "the key is not in Debug output"
        );
        assert!(SidecarTls::load(None, Some(&crt), Some(&ec_key)).is_ok());
        assert!(
            SidecarTls::load(None, None, None)
                .expect("empty")
                .is_empty()
        );

        let err = SidecarTls::load(Some(&key), None, None).expect_err("a key is no CA");
        assert!(
            err.contains("--sidecar-redis-ca-file") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let err = SidecarTls::load(None, Some(&crt), None).expect_err("half");
        assert!(err.contains("give both or neither"), "{err}");
        let missing = dir.join("nope.crt");
        let err = SidecarTls::load(Some(&missing), None, None).expect_err("missing");
        assert!(
            err.contains("nope.crt") && err.contains("cannot read"),
            "{err}"
        );
        let big = file(dir, "big.crt", &CERT.repeat(20_000));
        let err = SidecarTls::load(Some(&big), None, None).expect_err("too big");
        assert!(err.contains("larger than"), "{err}");
    }
}
