//! The `AgentRun` custom resource (`agentrun.dev/v1alpha1`).
//!
//! The `///` comments on the spec and status types become the OpenAPI descriptions that users
//! read with `kubectl explain agentrun.spec`: they are written for users.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, PodSecurityContext,
    ResourceRequirements, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every agentrun resource.
pub const GROUP: &str = "agentrun.dev";
/// Name of the variation that a run without `spec.variations` gets.
pub const DEFAULT_VARIATION: &str = "default";
/// Longest allowed `metadata.name` of an AgentRun, so that `<run>-<variation>` is a valid
/// DNS label and label value (63 characters).
pub const MAX_RUN_NAME_LEN: usize = 42;
/// Longest allowed variation name.
pub const MAX_VARIATION_NAME_LEN: usize = 20;
/// Most variations one run may have.
pub const MAX_VARIATIONS: usize = 64;

/// What to run: the agent's image and command, its variations, and limits (timeout, TTL,
/// retention of its Redis data). `image`, `command` and `args` cannot change after creation.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "agentrun.dev",
    version = "v1alpha1",
    kind = "AgentRun",
    doc = "An AgentRun runs one AI agent task as one pod per variation and streams its output to Redis, to watch it live in a browser.",
    plural = "agentruns",
    singular = "agentrun",
    shortname = "ar",
    category = "agentrun",
    namespaced,
    status = "AgentRunStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase of the run"),
    printcolumn(name = "Variations", type_ = "string", json_path = ".status.variationsDone", description = "Finished variations / all variations"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration", description = "Time from start to completion"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", priority = "1", description = "Page of the run in the agentrun web UI"),
    printcolumn(name = "Archive", type_ = "string", json_path = ".status.archive.state", priority = "1", description = "Where the run's output is on its way to the archive"),
    validation = Rule::new("size(self.metadata.name) <= 42").message("metadata.name must be at most 42 characters, so that pod names <run>-<variation> stay valid; choose a shorter name"),
)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.parallelism) || self.parallelism <= (has(self.variations) && size(self.variations) > 0 ? size(self.variations) : 1)").message("spec.parallelism must not exceed the number of variations; lower it or add variations"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentRunSpec {
    /// Container image of the agent, for example `ghcr.io/acme/agent:1.2`. A variation may
    /// override it with its own `image`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.image is immutable; delete and re-create the AgentRun to change it"))]
    pub image: String,

    /// Command that starts the agent, as a list (the image's ENTRYPOINT is not used, because
    /// the operator cannot read it without a registry lookup). agentrun wraps it so that every
    /// byte the agent writes to stdout and stderr is streamed.
    #[schemars(length(min = 1, max = 64), inner(length(max = 4096)))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.command is immutable; delete and re-create the AgentRun to change it"))]
    pub command: Vec<String>,

    /// Arguments passed to `command`. A variation may replace them with its own `args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 16384)))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.args is immutable; delete and re-create the AgentRun to change it"))]
    pub args: Vec<String>,

    /// Environment variables of the agent container. A variation's `env` is added to these and
    /// wins on equal names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Sources (ConfigMaps, Secrets) to populate the agent container's environment from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,

    /// Working directory of the agent container. Defaults to the image's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,

    /// Compute resources of the agent container: CPU, memory, and extended resources such as
    /// `nvidia.com/gpu` (set GPUs under `limits`). In a namespace whose ResourceQuota covers
    /// `limits.cpu` or `limits.memory`, set those limits here (the agentrun containers get
    /// theirs from the operator's settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Security context of the agent container. The operator's defaults are
    /// `allowPrivilegeEscalation: false` and `capabilities: {drop: [ALL]}`; each field set here
    /// replaces the default of that field. The agent runs as its image's user unless
    /// `runAsUser` says otherwise. In a namespace that enforces Pod Security `restricted`, set
    /// `runAsNonRoot: true` (and `runAsUser`, when the image's user is root or not numeric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,

    /// When to pull the agent image: `Always`, `IfNotPresent` or `Never`. Defaults to the
    /// Kubernetes default for the image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// ServiceAccount the agent pods run as. Defaults to the namespace's `default` account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    /// Pod-level security context of the agent pods. The operator's defaults are
    /// `seccompProfile: {type: RuntimeDefault}` and the operator's `fsGroup` (65532 unless the
    /// operator was installed with another, or none for OpenShift); each field set here
    /// replaces the default of that field, for example `runAsNonRoot: true` for every
    /// container, or an `fsGroup` from the namespace's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,

    /// Secrets (of type `kubernetes.io/dockerconfigjson`, in the run's namespace) used to pull
    /// the agent image from a private registry. They are added to the operator's own pull
    /// Secrets for the sidecar image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// RuntimeClass of the agent pods, for example `nvidia` for GPU nodes or `gvisor` for a
    /// sandbox. The RuntimeClass must exist in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,

    /// PriorityClass of the agent pods, which decides who is preempted when the cluster is full.
    /// The PriorityClass must exist in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Node labels that a node must have to run the agent pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the agent pods, to run them on tainted nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity and anti-affinity rules of the agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Extra labels put on every agent pod. Labels starting with `agentrun.dev/` are reserved
    /// and ignored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations put on every agent pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Named variants of the same task: one pod runs per variation, so that their outputs can
    /// be compared side by side. Each may override `args`, `env` and `image`. A run without
    /// variations has a single one called `default`. Names must be unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("spec.variations: each variation name may appear only once; rename the duplicate"),
    )]
    pub variations: Vec<Variation>,

    /// How many variation pods may run at the same time. Defaults to all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: Option<i32>,

    /// Longest time in seconds that the run may take from its start. When it is over, the
    /// agents are stopped and the run fails with reason `Timeout`. No limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<i64>,

    /// Seconds after the run finished (Succeeded, Failed or Stopped) after which the AgentRun and
    /// its pods are deleted, like a Job's TTL. The run's history in Redis is kept for
    /// `retentionSeconds`. Kept forever when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Pauses the agents while true (they are sent a pause control message; resumed when set
    /// back to false). Same as `kubectl agentrun pause`, but declarative.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,

    /// Most entries kept in each of the run's Redis streams (older entries are trimmed, and a
    /// viewer who resumes from before the trim point is told so). Defaults to the operator's
    /// setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100))]
    pub stream_max_len: Option<i64>,

    /// Seconds that the run's Redis data (output, logs, status) is kept after the run ended or
    /// the AgentRun was deleted. Defaults to the operator's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60))]
    pub retention_seconds: Option<i64>,
}

/// One variant of the task; it runs in its own pod named `<run>-<variation name>`.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Variation {
    /// Name of the variation: lower-case letters, digits and `-`, starting and ending with a
    /// letter or digit, at most 20 characters.
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Arguments for this variation; replace the run's `args` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,

    /// Environment variables added to the run's `env`; these win on equal names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Container image for this variation; replaces the run's `image` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

/// When the kubelet pulls the agent image.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Lifecycle phase of a run or of one variation.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RunPhase {
    /// Accepted; pods are not running yet (being scheduled, pulling images, waiting for
    /// parallelism). The `Ready` condition and the variation's `reason` say why.
    #[default]
    Pending,
    /// At least one agent is running.
    Running,
    /// Every agent exited with code 0.
    Succeeded,
    /// At least one agent failed (non-zero exit, OOMKilled, evicted, timeout).
    Failed,
    /// The run was stopped by a user before the agents finished.
    Stopped,
}

impl RunPhase {
    /// Every phase, in order (for metrics).
    pub const ALL: [RunPhase; 5] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Stopped,
    ];

    /// Whether the phase is final.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }

    /// The phase as written in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Stopped => "Stopped",
        }
    }
}

/// Observed state of an AgentRun, written by the operator.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentRunStatus {
    /// Lifecycle phase of the whole run: Pending, Running, Succeeded, Failed or Stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,

    /// Standard Kubernetes conditions: `Ready` (agents are running or finished well),
    /// `Complete` (the run reached a final phase) and `SpecValid` (the operator could use the
    /// spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// State of each variation's pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variations: Vec<VariationStatus>,

    /// Finished variations over all variations, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variations_done: Option<String>,

    /// When the first agent pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the run reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Time from `startTime` to `completionTime`, for example `3m12s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,

    /// The `metadata.generation` that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Id of this run in Redis (its keys are `run:{<runId>}:...`). Unique per AgentRun
    /// incarnation: a deleted and re-created run gets a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,

    /// Page of the run in the agentrun web UI (from the operator's `--relay-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// Whether the operator last told the agents to pause (true) or to resume (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,

    /// True once the run's end was published to its viewers: the run had finished and every
    /// agent pod had ended, sidecar included, so nothing more can reach the run's streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams_closed: Option<bool>,

    /// Where the run's output is on its way to the archive (with archiving on): its Redis keys
    /// are kept until the archive is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveInfo>,
}

/// The run's archive, as the archivers report it in Redis.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveInfo {
    /// `pending` (waits for the run's end), `queued`, `archiving`, `complete` (readable from
    /// the archive; the Redis keys now carry the retention TTL) or `failed` (on the
    /// dead-letter stream; `agentrun-archiver requeue-dead` tries again).
    pub state: String,
    /// Why the last attempt failed (while `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the archive was completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_time: Option<Time>,
}

/// Observed state of one variation.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VariationStatus {
    /// Name of the variation.
    pub name: String,
    /// Name of the variation's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Phase of this variation.
    #[serde(default)]
    pub phase: RunPhase,
    /// Exit code of the agent, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the agent container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the agent container finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// Last machine-readable reason, for example `Unschedulable`, `ImagePullBackOff`,
    /// `OOMKilled`, `Evicted`, `Timeout`, `Completed`, `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail for `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The variation of a run with the run's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedVariation {
    pub name: String,
    pub image: String,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
}

impl AgentRunSpec {
    /// The variations to run, with run-level defaults applied: a run without variations has one
    /// called `default`.
    pub fn resolved_variations(&self) -> Vec<ResolvedVariation> {
        if self.variations.is_empty() {
            return vec![ResolvedVariation {
                name: DEFAULT_VARIATION.to_string(),
                image: self.image.clone(),
                args: self.args.clone(),
                env: self.env.clone(),
            }];
        }
        self.variations
            .iter()
            .map(|v| {
                let mut env: Vec<EnvVar> = self
                    .env
                    .iter()
                    .filter(|e| !v.env.iter().any(|o| o.name == e.name))
                    .cloned()
                    .collect();
                env.extend(v.env.iter().cloned());
                ResolvedVariation {
                    name: v.name.clone(),
                    image: v.image.clone().unwrap_or_else(|| self.image.clone()),
                    args: v.args.clone().unwrap_or_else(|| self.args.clone()),
                    env,
                }
            })
            .collect()
    }

    /// How many variation pods may run at once.
    pub fn effective_parallelism(&self) -> usize {
        let total = self.variations.len().max(1);
        match self.parallelism {
            Some(p) if p >= 1 => (p as usize).min(total),
            _ => total,
        }
    }
}

/// The CRD as YAML, exactly as `agentrun-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&AgentRun::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::cel::{Validator, validate_cel, validate_cel_update};
    use serde_json::{Value, json};

    fn messages(run: &Value, old: Option<&Value>) -> Vec<String> {
        let crd = serde_json::to_value(AgentRun::crd()).expect("json");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        match Validator::new().validate(schema, run, old) {
            Ok(()) => vec![],
            Err(errors) => errors
                .into_vec()
                .into_iter()
                .map(|e| e.to_string())
                .collect(),
        }
    }

    fn run_json(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentRun",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        })
    }

    #[test]
    fn crds_folder_matches_the_rust_types() {
        let generated = crd_yaml().expect("crd serializes");
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        for path in [
            "crds/agentrun.dev_agentruns.yaml",
            "helm/agentrun/crds/agentrun.dev_agentruns.yaml",
        ] {
            let full = format!("{root}/{path}");
            let committed = std::fs::read_to_string(&full).unwrap_or_default();
            assert!(
                committed == generated,
                "{path} is out of date with operator/src/crd.rs: run `cargo run -p agentrun-operator -- crd > {path}`"
            );
        }
    }

    #[test]
    fn a_good_run_passes_every_rule() {
        let run = run_json(
            "hello",
            json!({
                "image": "busybox", "command": ["sh", "-c", "echo hi"],
                "variations": [{"name": "a"}, {"name": "b"}], "parallelism": 2
            }),
        );
        assert_eq!(messages(&run, None), Vec::<String>::new());
        let typed: AgentRun = serde_json::from_value(run).expect("parses");
        validate_cel(&typed).expect("typed run passes");
    }

    #[test]
    fn duplicate_variation_names_are_rejected_with_the_field() {
        let run = run_json(
            "hello",
            json!({
                "image": "busybox", "command": ["true"],
                "variations": [{"name": "a"}, {"name": "a"}]
            }),
        );
        let msgs = messages(&run, None);
        assert!(
            msgs.iter()
                .any(|m| m.contains("spec.variations: each variation name may appear only once")),
            "{msgs:?}"
        );
    }

    #[test]
    fn parallelism_above_the_variations_is_rejected() {
        let run = run_json(
            "hello",
            json!({"image": "busybox", "command": ["true"], "parallelism": 2}),
        );
        let msgs = messages(&run, None);
        assert!(
            msgs.iter()
                .any(|m| m.contains("spec.parallelism must not exceed the number of variations")),
            "{msgs:?}"
        );
    }

    #[test]
    fn long_names_are_rejected() {
        let run = run_json(
            &"x".repeat(43),
            json!({"image": "busybox", "command": ["true"]}),
        );
        let msgs = messages(&run, None);
        assert!(
            msgs.iter()
                .any(|m| m.contains("metadata.name must be at most 42 characters")),
            "{msgs:?}"
        );
        let ok = run_json(
            &"x".repeat(42),
            json!({"image": "busybox", "command": ["true"]}),
        );
        assert_eq!(messages(&ok, None), Vec::<String>::new());
    }

    #[test]
    fn image_and_command_are_immutable_but_paused_is_not() {
        let old: AgentRun = serde_json::from_value(run_json(
            "hello",
            json!({"image": "busybox", "command": ["true"]}),
        ))
        .expect("parses");
        let mut new = old.clone();
        new.spec.image = "alpine".into();
        new.spec.command = vec!["false".into()];
        let errors = validate_cel_update(&new, &old).expect_err("must be refused");
        let text = errors
            .into_vec()
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("spec.image is immutable"), "{text}");
        assert!(text.contains("spec.command is immutable"), "{text}");
        let mut paused = old.clone();
        paused.spec.paused = true;
        paused.spec.ttl_seconds_after_finished = Some(60);
        validate_cel_update(&paused, &old).expect("pausing is allowed");
    }

    #[test]
    fn schema_has_the_documented_bounds_and_columns() {
        let crd = serde_json::to_value(AgentRun::crd()).expect("json");
        let version = &crd["spec"]["versions"][0];
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], json!(["command", "image"]));
        assert_eq!(spec["properties"]["variations"]["maxItems"], 64);
        let name = &spec["properties"]["variations"]["items"]["properties"]["name"];
        assert_eq!(name["maxLength"], 20);
        assert_eq!(name["pattern"], "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
        assert_eq!(
            spec["properties"]["timeoutSeconds"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(version["subresources"]["status"], json!({}));
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Variations", "Age", "Duration", "URL", "Archive"]
        );
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["ar"]));
    }

    #[test]
    fn the_pod_fields_are_in_the_schema_for_kubectl_explain() {
        let crd = serde_json::to_value(AgentRun::crd()).expect("json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for field in [
            "imagePullSecrets",
            "securityContext",
            "podSecurityContext",
            "runtimeClassName",
            "priorityClassName",
            "serviceAccountName",
            "nodeSelector",
            "tolerations",
            "affinity",
            "resources",
        ] {
            let description = spec[field]["description"].as_str().unwrap_or_default();
            assert!(
                description.len() > 20,
                "{field} is documented: {description:?}"
            );
        }
        assert!(
            spec["securityContext"]["description"]
                .as_str()
                .unwrap_or_default()
                .contains("runAsNonRoot: true")
        );
        assert_eq!(
            spec["securityContext"]["properties"]["runAsNonRoot"]["type"],
            "boolean"
        );
        assert_eq!(
            spec["podSecurityContext"]["properties"]["fsGroup"]["type"],
            "integer"
        );
        // New fields may be set on an existing run without breaking the CEL rules.
        let old: AgentRun = serde_json::from_value(run_json(
            "hello",
            json!({"image": "busybox", "command": ["true"]}),
        ))
        .expect("parses");
        let mut new = old.clone();
        new.spec.runtime_class_name = Some("gvisor".into());
        validate_cel_update(&new, &old).expect("a mutable field");
    }

    #[test]
    fn variations_inherit_and_override() {
        let spec: AgentRunSpec = serde_json::from_value(json!({
            "image": "base", "command": ["run"], "args": ["--x"],
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "1"}],
            "variations": [
                {"name": "plain"},
                {"name": "custom", "image": "other", "args": ["--y"], "env": [{"name": "B", "value": "2"}]}
            ]
        }))
        .expect("parses");
        let v = spec.resolved_variations();
        assert_eq!(
            (v[0].image.as_str(), v[0].args.clone()),
            ("base", vec!["--x".to_string()])
        );
        assert_eq!(
            (v[1].image.as_str(), v[1].args.clone()),
            ("other", vec!["--y".to_string()])
        );
        let env: Vec<(String, Option<String>)> = v[1]
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert_eq!(
            env,
            vec![
                ("A".into(), Some("1".into())),
                ("B".into(), Some("2".into()))
            ]
        );
        let single = AgentRunSpec {
            image: "i".into(),
            command: vec!["c".into()],
            ..Default::default()
        };
        assert_eq!(single.resolved_variations()[0].name, DEFAULT_VARIATION);
        assert_eq!(single.effective_parallelism(), 1);
    }
}
