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
