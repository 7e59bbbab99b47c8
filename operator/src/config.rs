//! The operator's own settings (from flags and environment), shared by the pod builder and the
//! reconciler, and the parsers of the flags that carry Kubernetes objects as JSON (every error
//! names the flag; an unknown field is an error, not silently dropped).

use k8s_openapi::api::core::v1::{Capabilities, ResourceRequirements, SecurityContext};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;

/// Registry and name of the sidecar image, as `docker/Dockerfile` documents and the Helm chart
/// installs it.
pub const SIDECAR_IMAGE_NAME: &str = "ghcr.io/agentrun/agentrun-sidecar";
/// The sidecar image of this operator's release: [`SIDECAR_IMAGE_NAME`] tagged with the
/// workspace version (the chart's `appVersion`).
pub const DEFAULT_SIDECAR_IMAGE: &str = concat!(
    "ghcr.io/agentrun/agentrun-sidecar:",
    env!("CARGO_PKG_VERSION")
);
/// The non-root user and group of the agentrun images (distroless `nonroot`), and the default
/// `fsGroup` of agent pods.
pub const DEFAULT_UID: i64 = 65532;

/// What the operator puts into every agent pod and run.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Image with `agentrun-sidecar` and `agentrun-entrypoint`.
    pub sidecar_image: String,
    /// Pull policy of the sidecar image (`IfNotPresent` unless told).
    pub sidecar_image_pull_policy: Option<String>,
    /// Pull Secrets (names, in each run's namespace) for the sidecar image; every agent pod gets
    /// them besides the run's own `imagePullSecrets`.
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Resources of the `agentrun-tools` and `agentrun-sidecar` containers.
    pub sidecar_resources: ResourceRequirements,
    /// Security context of the `agentrun-tools` and `agentrun-sidecar` containers, used as it
    /// is (not merged with anything).
    pub sidecar_security_context: SecurityContext,
    /// `fsGroup` of agent pods (the shared `/agentrun` volume is group-owned by it); `None`
    /// leaves it to the cluster (OpenShift's restricted-v2 SCC assigns one from the namespace's
    /// range). A run's `spec.podSecurityContext.fsGroup` wins.
    pub pod_fs_group: Option<i64>,
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
    /// What Redis must confirm before a sidecar acknowledges output (`AGENTRUN_DURABILITY`).
    pub sidecar_durability: agentrun_protocol::durability::Durability,
    /// Default `retentionSeconds` for runs that do not set it.
    pub default_retention_seconds: i64,
    /// Grace period of agent pods: the agent's stop plus the sidecar's final flush must fit.
    pub termination_grace_period_seconds: i64,
    /// TLS files for the sidecars' `rediss://` connection (put into the run's Secret and
    /// mounted into the sidecar container).
    pub sidecar_tls: SidecarTls,
    /// Runs are archived by `agentrun-archiver` when they end, and their Redis keys get the
    /// retention TTL only once the archive is complete.
    pub archive: bool,
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
            sidecar_image: DEFAULT_SIDECAR_IMAGE.into(),
            sidecar_image_pull_policy: None,
            sidecar_image_pull_secrets: Vec::new(),
            sidecar_resources: default_sidecar_resources(),
            sidecar_security_context: default_sidecar_security_context(),
            pod_fs_group: Some(DEFAULT_UID),
            redis_url: "redis://redis:6379".into(),
            redis_username: None,
            redis_password: None,
            run_credential_key: None,
            relay_url: None,
            default_stream_max_len: 100_000,
            sidecar_durability: agentrun_protocol::durability::Durability::None,
            default_retention_seconds: 7 * 24 * 3600,
            termination_grace_period_seconds: 45,
            sidecar_tls: SidecarTls::default(),
            archive: false,
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

/// No privilege escalation and no capabilities: what every container of an agent pod gets by
/// default (the agent's user stays its image's).
pub fn no_privileges() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities: what the
/// agentrun containers need, and what Pod Security `restricted` asks for.
pub fn default_sidecar_security_context() -> SecurityContext {
    SecurityContext {
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(DEFAULT_UID),
        run_as_group: Some(DEFAULT_UID),
        ..no_privileges()
    }
}

/// Parses a `--pod-fs-group` value: a group id, or `none` (also an empty value) for no
/// `fsGroup`.
pub fn parse_fs_group(text: &str) -> Result<Option<i64>, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match text.parse::<i64>() {
        Ok(gid) if gid >= 0 => Ok(Some(gid)),
        _ => Err(format!(
            "--pod-fs-group (AGENTRUN_POD_FS_GROUP) is {text:?}: give a group id (0 or more) or `none` to leave fsGroup to the cluster"
        )),
    }
}

/// A flag that carries a Kubernetes object as JSON: its name (with its variable) and the
/// object's kind.
pub type JsonFlag = (&'static str, &'static str);
/// `--sidecar-resources`.
pub const RESOURCES_FLAG: JsonFlag = (
    "--sidecar-resources (AGENTRUN_SIDECAR_RESOURCES)",
    "ResourceRequirements",
);
/// `--sidecar-security-context`.
pub const SECURITY_CONTEXT_FLAG: JsonFlag = (
    "--sidecar-security-context (AGENTRUN_SIDECAR_SECURITY_CONTEXT)",
    "SecurityContext",
);

/// Parses a flag that carries a Kubernetes object as JSON (`{}` or an empty value: the
/// type's empty value). A field the type does not have is an error naming it, because a
/// misspelt `runAsNonRoot` dropped in silence would weaken the pods.
pub fn parse_json_flag<T: DeserializeOwned + Serialize>(
    (flag, kind): JsonFlag,
    text: &str,
) -> Result<T, String> {
    let text = text.trim();
    let input: Value = if text.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_str(text)
            .map_err(|e| format!("{flag} is not JSON ({e}); give a {kind} object, e.g. {{}}"))?
    };
    let parsed: T = serde_json::from_value(input.clone())
        .map_err(|e| format!("{flag} is not a valid {kind}: {e}"))?;
    let back = serde_json::to_value(&parsed)
        .map_err(|e| format!("{flag}: cannot serialize the {kind}: {e}"))?;
    let mut unknown = Vec::new();
    unknown_fields(&input, &back, String::new(), &mut unknown);
    if !unknown.is_empty() {
        return Err(format!(
            "{flag} has fields that a {kind} does not have: {}; check their spelling (camelCase, as in Kubernetes YAML)",
            unknown.join(", ")
        ));
    }
    Ok(parsed)
}

/// Paths of the non-null fields of `input` that are missing from `parsed` (the same object
/// after a round trip through its Rust type).
fn unknown_fields(input: &Value, parsed: &Value, path: String, out: &mut Vec<String>) {
    match (input, parsed) {
        (Value::Object(given), Value::Object(kept)) => {
            for (key, value) in given {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key) {
                    Some(k) => unknown_fields(value, k, here, out),
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(given), Value::Array(kept)) => {
            for (i, (g, k)) in given.iter().zip(kept).enumerate() {
                unknown_fields(g, k, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The flags of `agentrun-operator run` that shape agent pods, as given.
#[derive(Clone, Debug, Default)]
pub struct PodFlags<'a> {
    /// `--sidecar-image-pull-secrets`: names, already split at commas.
    pub sidecar_image_pull_secrets: &'a [String],
    /// `--sidecar-resources`: a JSON ResourceRequirements.
    pub sidecar_resources: Option<&'a str>,
    /// `--sidecar-security-context`: a JSON SecurityContext.
    pub sidecar_security_context: Option<&'a str>,
    /// `--pod-fs-group`: a group id or `none`.
    pub pod_fs_group: &'a str,
}

impl Settings {
    /// These settings with the pod flags applied (unset JSON flags keep the defaults); every
    /// error names its flag.
    pub fn with_pod_flags(mut self, flags: &PodFlags<'_>) -> Result<Self, String> {
        self.sidecar_image_pull_secrets = flags
            .sidecar_image_pull_secrets
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(json) = flags.sidecar_resources {
            self.sidecar_resources = parse_json_flag(RESOURCES_FLAG, json)?;
        }
        if let Some(json) = flags.sidecar_security_context {
            self.sidecar_security_context = parse_json_flag(SECURITY_CONTEXT_FLAG, json)?;
        }
        self.pod_fs_group = parse_fs_group(flags.pod_fs_group)?;
        Ok(self)
    }

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

    fn flags<'a>(
        resources: Option<&'a str>,
        security: Option<&'a str>,
        fs_group: &'a str,
    ) -> PodFlags<'a> {
        PodFlags {
            sidecar_resources: resources,
            sidecar_security_context: security,
            pod_fs_group: fs_group,
            ..Default::default()
        }
    }

    #[test]
    fn pod_flags_replace_the_defaults_they_are_given() {
        let pull = ["regcred".to_string(), " ".to_string(), "other ".to_string()];
        let settings = Settings::default()
            .with_pod_flags(&PodFlags {
                sidecar_image_pull_secrets: &pull,
                sidecar_resources: Some(
                    r#"{"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": 1, "memory": "128Mi"}}"#,
                ),
                sidecar_security_context: Some(
                    r#"{"runAsNonRoot": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "runAsUser": null}"#,
                ),
                pod_fs_group: "none",
            })
            .expect("valid flags");
        assert_eq!(settings.sidecar_image_pull_secrets, ["regcred", "other"]);
        let limits = settings.sidecar_resources.limits.expect("limits");
        assert_eq!(limits["cpu"], Quantity("1".into()));
        let sc = settings.sidecar_security_context;
        assert_eq!((sc.run_as_non_root, sc.run_as_user), (Some(true), None));
        assert_eq!(settings.pod_fs_group, None);
        let unchanged = Settings::default()
            .with_pod_flags(&flags(None, None, "65532"))
            .expect("defaults");
        assert_eq!(unchanged, Settings::default());
        assert_eq!(
            Settings::default()
                .with_pod_flags(&flags(None, None, "1000680000"))
                .expect("a number")
                .pod_fs_group,
            Some(1_000_680_000)
        );
    }

    #[test]
    fn bad_pod_flags_are_refused_naming_the_flag_and_the_field() {
        let err = Settings::default()
            .with_pod_flags(&flags(None, Some(r#"{"runAsNonroot": true}"#), "65532"))
            .expect_err("a misspelt field");
        assert!(
            err.contains("--sidecar-security-context") && err.contains("runAsNonroot"),
            "{err}"
        );
        let err = Settings::default()
            .with_pod_flags(&flags(
                Some(r#"{"limits": {"cpu": "1"}, "limit": {}}"#),
                None,
                "65532",
            ))
            .expect_err("an unknown field");
        assert!(
            err.contains("--sidecar-resources") && err.contains("limit"),
            "{err}"
        );
        let err = Settings::default()
            .with_pod_flags(&flags(Some("cpu=1"), None, "65532"))
            .expect_err("not JSON");
        assert!(err.contains("is not JSON"), "{err}");
        let err = Settings::default()
            .with_pod_flags(&flags(None, Some(r#"{"runAsUser": "root"}"#), "65532"))
            .expect_err("a wrong type");
        assert!(err.contains("not a valid SecurityContext"), "{err}");
        let err = Settings::default()
            .with_pod_flags(&flags(None, None, "-1"))
            .expect_err("a negative group");
        assert!(
            err.contains("--pod-fs-group") && err.contains("none"),
            "{err}"
        );
    }

    #[test]
    fn the_default_sidecar_image_is_this_release() {
        assert_eq!(
            DEFAULT_SIDECAR_IMAGE,
            format!("{SIDECAR_IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(Settings::default().sidecar_image, DEFAULT_SIDECAR_IMAGE);
    }
}
