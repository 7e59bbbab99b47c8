//! Building agent pods (and the per-run Secret) from an AgentRun: pure functions.
//!
//! Security contexts: the pod gets `seccompProfile: RuntimeDefault` and the operator's
//! `fsGroup`, overlaid field by field with the run's `spec.podSecurityContext`; the agentrun
//! containers get the operator's sidecar security context as it is; the agent container gets
//! `allowPrivilegeEscalation: false` and `capabilities: {drop: [ALL]}`, overlaid field by field
//! with the run's `spec.securityContext`. The operator never forces a user on the agent.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    LocalObjectReference, Pod, PodSecurityContext, PodSpec, Probe, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::Settings;
use crate::crd::{AgentRun, ResolvedVariation};
use crate::error::{Error, Result};

/// Label with the AgentRun's name, on every pod and Secret it owns.
pub const RUN_LABEL: &str = "agentrun.dev/run";
/// Label with the variation name, on every agent pod.
pub const VARIATION_LABEL: &str = "agentrun.dev/variation";
/// Annotation with the run id used in Redis.
pub const RUN_ID_ANNOTATION: &str = "agentrun.dev/run-id";
/// `app.kubernetes.io/managed-by` value.
pub const MANAGED_BY: &str = "agentrun-operator";

/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";
/// Name of the init container that copies the entrypoint.
pub const TOOLS_CONTAINER: &str = "agentrun-tools";
/// Name of the native sidecar container.
pub const SIDECAR_CONTAINER: &str = "agentrun-sidecar";
/// Shared volume between the containers.
pub const VOLUME: &str = "agentrun";
/// Where the shared volume is mounted.
pub const MOUNT_PATH: &str = "/agentrun";
/// Unix socket of the sidecar.
pub const SOCKET_PATH: &str = "/agentrun/agentrun.sock";
/// Where the tools container copies the entrypoint.
pub const ENTRYPOINT_PATH: &str = "/agentrun/bin/agentrun-entrypoint";
/// Sidecar binary inside the sidecar image.
pub const SIDECAR_BINARY: &str = "/usr/local/bin/agentrun-sidecar";
/// Port of the sidecar's /metrics, /healthz, /readyz.
pub const SIDECAR_METRICS_PORT: i32 = 9464;
/// The sidecar's private state volume: only the sidecar container mounts it, so the agent
/// never sees the key the sidecar keeps there across its restarts.
pub const SIDECAR_STATE_VOLUME: &str = "agentrun-sidecar-state";
/// Where the sidecar finds it.
pub const SIDECAR_STATE_PATH: &str = "/var/run/agentrun-sidecar";
/// Volume (from the run's Secret) with the sidecar's Redis TLS files, when there are any.
pub const REDIS_TLS_VOLUME: &str = "agentrun-redis-tls";
/// Where the sidecar finds them.
pub const REDIS_TLS_PATH: &str = "/etc/agentrun/redis-tls";
/// Keys of the run's Secret holding the TLS files, and their file names in the volume.
pub const REDIS_TLS_FILES: [(&str, &str); 3] = [
    ("redis-ca.crt", "ca.crt"),
    ("redis-client.crt", "tls.crt"),
    ("redis-client.key", "tls.key"),
];

/// Run id used in Redis: unique per AgentRun incarnation (the uid changes when a run is deleted
/// and re-created), readable, and free of `{`, `}` and `:` so it can sit in a hash tag.
pub fn run_id(run: &AgentRun) -> Result<String> {
    let uid = run.uid().ok_or_else(|| Error::MissingField {
        object: object_name(run),
        field: "metadata.uid",
    })?;
    let short: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    Ok(format!(
        "{}.{}.{}",
        run.namespace().unwrap_or_else(|| "default".into()),
        run.name_any(),
        short
    ))
}

/// `namespace/name` of a run, for messages.
pub fn object_name(run: &AgentRun) -> String {
    format!(
        "AgentRun {}/{}",
        run.namespace().unwrap_or_default(),
        run.name_any()
    )
}

/// Name of the pod of a variation.
pub fn pod_name(run: &AgentRun, variation: &str) -> String {
    format!("{}-{variation}", run.name_any())
}

/// Name of the per-run Secret with the sidecar's Redis settings.
pub fn secret_name(run: &AgentRun) -> String {
    format!("{}-agentrun-redis", run.name_any())
}

/// Label selector of the pods of a run.
pub fn run_selector(run: &AgentRun) -> String {
    format!("{RUN_LABEL}={}", run.name_any())
}

/// The variation that a pod runs (from its label).
pub fn variation_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(VARIATION_LABEL))
        .map(String::as_str)
}

/// Whether the pod is controlled by this incarnation of the run.
pub fn is_owned_by(pod: &Pod, run: &AgentRun) -> bool {
    let Some(uid) = run.uid() else { return false };
    pod.owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

fn owner_meta(
    run: &AgentRun,
    name: String,
    extra_labels: BTreeMap<String, String>,
) -> Result<ObjectMeta> {
    let owner = run
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingField {
            object: object_name(run),
            field: "metadata.uid",
        })?;
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        ("app.kubernetes.io/name".to_string(), "agentrun".to_string()),
        (RUN_LABEL.to_string(), run.name_any()),
    ]);
    labels.extend(extra_labels);
    Ok(ObjectMeta {
        name: Some(name),
        namespace: run.namespace(),
        labels: Some(labels),
        annotations: Some(BTreeMap::from([(
            RUN_ID_ANNOTATION.to_string(),
            run_id(run)?,
        )])),
        owner_references: Some(vec![owner]),
        ..Default::default()
    })
}

/// The run's own Redis user and password, when per-run users are on.
pub fn run_credentials(run: &AgentRun, settings: &Settings) -> Result<Option<(String, String)>> {
    let Some(key) = &settings.run_credential_key else {
        return Ok(None);
    };
    let id = agentrun_protocol::RunId::new(run_id(run)?).map_err(|e| Error::InvalidSpec {
        object: object_name(run),
        field: "metadata.name",
        message: e.to_string(),
    })?;
    Ok(Some((
        agentrun_protocol::acl::run_username(&id),
        agentrun_protocol::acl::derive_run_password(key, &id),
    )))
}

/// The Secret holding the Redis settings of the run's sidecars, owned by the run.
///
/// It is written with server-side apply, so it carries every field the operator owns, and the
/// values go into `data`, never `stringData`: the API server folds `stringData` into `data`, so
/// a key the operator stopped sending under `stringData` would stay in `data` for good.
pub fn build_secret(run: &AgentRun, settings: &Settings) -> Result<Secret> {
    let mut data = BTreeMap::from([("AGENTRUN_REDIS_URL".to_string(), settings.redis_url.clone())]);
    if let Some((user, password)) = run_credentials(run, settings)? {
        data.insert("AGENTRUN_REDIS_USERNAME".into(), user);
        data.insert("AGENTRUN_REDIS_PASSWORD".into(), password);
    } else {
        if let Some(user) = &settings.redis_username {
            data.insert("AGENTRUN_REDIS_USERNAME".into(), user.clone());
        }
        if let Some(password) = &settings.redis_password {
            data.insert("AGENTRUN_REDIS_PASSWORD".into(), password.clone());
        }
    }
    let tls = &settings.sidecar_tls;
    if let Some(ca) = &tls.ca_pem {
        data.insert(REDIS_TLS_FILES[0].0.into(), ca.clone());
    }
    if let Some((cert, key)) = &tls.client_pem {
        data.insert(REDIS_TLS_FILES[1].0.into(), cert.clone());
        data.insert(REDIS_TLS_FILES[2].0.into(), key.clone());
    }
    Ok(Secret {
        metadata: owner_meta(run, secret_name(run), BTreeMap::new())?,
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An environment variable from a key of the run's Secret.
fn secret_env(run: &AgentRun, name: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name(run),
                key: name.into(),
                optional: Some(optional),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sidecar's Redis settings: named keys of the run's Secret (never the whole Secret as
/// `envFrom`, which would also put the TLS files into the environment), and the TLS files as a
/// read-only volume with the variables that point at them.
fn sidecar_redis(run: &AgentRun, settings: &Settings) -> (Vec<EnvVar>, Option<Volume>) {
    let mut env = vec![
        secret_env(run, "AGENTRUN_REDIS_URL", false),
        secret_env(run, "AGENTRUN_REDIS_USERNAME", true),
        secret_env(run, "AGENTRUN_REDIS_PASSWORD", true),
    ];
    let tls = &settings.sidecar_tls;
    if tls.is_empty() {
        return (env, None);
    }
    let mut items = Vec::new();
    let mut file = |(key, path): (&str, &str), var: &str| {
        items.push(KeyToPath {
            key: key.into(),
            path: path.into(),
            mode: None,
        });
        env.push(self::env(var, format!("{REDIS_TLS_PATH}/{path}")));
    };
    if tls.ca_pem.is_some() {
        file(REDIS_TLS_FILES[0], "AGENTRUN_REDIS_CA_FILE");
    }
    if tls.client_pem.is_some() {
        file(REDIS_TLS_FILES[1], "AGENTRUN_REDIS_CLIENT_CERT");
        file(REDIS_TLS_FILES[2], "AGENTRUN_REDIS_CLIENT_KEY");
    }
    let volume = Volume {
        name: REDIS_TLS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name(run)),
            items: Some(items),
            // Readable by the sidecar's group (fsGroup) only.
            default_mode: Some(0o440),
            optional: Some(false),
        }),
        ..Default::default()
    };
    (env, Some(volume))
}

/// `defaults` with every top-level field that `set` sets replaced by `set`'s (a field that
/// holds an object, such as `capabilities`, is replaced as a whole).
fn overlay<T: Serialize + DeserializeOwned>(
    what: &'static str,
    defaults: T,
    set: Option<&T>,
) -> Result<T> {
    let Some(set) = set else {
        return Ok(defaults);
    };
    let json = |v: &T| serde_json::to_value(v).map_err(|source| Error::Serialize { what, source });
    let mut merged = json(&defaults)?;
    if let (Value::Object(into), Value::Object(from)) = (&mut merged, json(set)?) {
        into.extend(from.into_iter().filter(|(_, v)| !v.is_null()));
    }
    serde_json::from_value(merged).map_err(|source| Error::Serialize { what, source })
}

/// The agent pod's security context: the operator's defaults, then the run's fields.
fn pod_security_context(run: &AgentRun, settings: &Settings) -> Result<PodSecurityContext> {
    let defaults = PodSecurityContext {
        fs_group: settings.pod_fs_group,
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    overlay(
        "spec.podSecurityContext",
        defaults,
        run.spec.pod_security_context.as_ref(),
    )
}

/// The agent container's security context: no privilege escalation and no capabilities unless
/// the run's `spec.securityContext` says otherwise; the user is the image's or the run's.
fn agent_security_context(run: &AgentRun) -> Result<SecurityContext> {
    overlay(
        "spec.securityContext",
        crate::config::no_privileges(),
        run.spec.security_context.as_ref(),
    )
}

/// The operator's pull Secrets for the sidecar image, then the run's, each name once.
fn image_pull_secrets(run: &AgentRun, settings: &Settings) -> Option<Vec<LocalObjectReference>> {
    let mut names: Vec<String> = Vec::new();
    let all = settings
        .sidecar_image_pull_secrets
        .iter()
        .chain(run.spec.image_pull_secrets.iter().map(|r| &r.name));
    for name in all {
        if !name.is_empty() && !names.contains(name) {
            names.push(name.clone());
        }
    }
    (!names.is_empty()).then(|| {
        names
            .into_iter()
            .map(|name| LocalObjectReference { name })
            .collect()
    })
}

fn mount() -> VolumeMount {
    VolumeMount {
        name: VOLUME.into(),
        mount_path: MOUNT_PATH.into(),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(SIDECAR_METRICS_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The pod of one variation: tools init container, native sidecar, agent with its command
/// rewritten to the entrypoint, shared `emptyDir` at `/agentrun`, and the sidecar's own
/// `emptyDir` at `/var/run/agentrun-sidecar` (its key for the entrypoint; never the agent's).
pub fn build_pod(
    run: &AgentRun,
    variation: &ResolvedVariation,
    settings: &Settings,
) -> Result<Pod> {
    let spec = &run.spec;
    if spec.command.is_empty() {
        return Err(Error::InvalidSpec {
            object: object_name(run),
            field: "spec.command",
            message: "must list the agent's command; the image's ENTRYPOINT is not used".into(),
        });
    }
    let user_labels: BTreeMap<String, String> = spec
        .pod_labels
        .iter()
        .filter(|(k, _)| !k.starts_with("agentrun.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut labels = user_labels;
    labels.insert(VARIATION_LABEL.into(), variation.name.clone());
    let mut metadata = owner_meta(run, pod_name(run, &variation.name), labels)?;
    if let Some(annotations) = metadata.annotations.as_mut() {
        for (k, v) in &spec.pod_annotations {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let run_id = run_id(run)?;
    let stream_max_len = spec
        .stream_max_len
        .unwrap_or(settings.default_stream_max_len);
    let retention = spec
        .retention_seconds
        .unwrap_or(settings.default_retention_seconds);

    let tools = Container {
        name: TOOLS_CONTAINER.into(),
        image: Some(settings.sidecar_image.clone()),
        image_pull_policy: settings.sidecar_image_pull_policy.clone(),
        command: Some(vec![
            SIDECAR_BINARY.into(),
            "install-entrypoint".into(),
            format!("{MOUNT_PATH}/bin"),
        ]),
        volume_mounts: Some(vec![mount()]),
        security_context: Some(settings.sidecar_security_context.clone()),
        resources: Some(settings.sidecar_resources.clone()),
        ..Default::default()
    };
    let (redis_env, tls_volume) = sidecar_redis(run, settings);
    let mut sidecar_mounts = vec![
        mount(),
        VolumeMount {
            name: SIDECAR_STATE_VOLUME.into(),
            mount_path: SIDECAR_STATE_PATH.into(),
            ..Default::default()
        },
    ];
    if tls_volume.is_some() {
        sidecar_mounts.push(VolumeMount {
            name: REDIS_TLS_VOLUME.into(),
            mount_path: REDIS_TLS_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let mut sidecar_env = vec![
        env("AGENTRUN_SOCKET", SOCKET_PATH),
        env("AGENTRUN_STATE_DIR", SIDECAR_STATE_PATH),
        env("AGENTRUN_RUN_ID", run_id.clone()),
        env("AGENTRUN_VARIATION", variation.name.clone()),
        env(
            "AGENTRUN_METRICS_ADDR",
            format!("0.0.0.0:{SIDECAR_METRICS_PORT}"),
        ),
        env("AGENTRUN_STREAM_MAXLEN", stream_max_len.to_string()),
        env("AGENTRUN_RETENTION_SECONDS", retention.to_string()),
        env(
            "AGENTRUN_DURABILITY",
            settings.sidecar_durability.to_string(),
        ),
    ];
    sidecar_env.extend(redis_env);
    let sidecar = Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(settings.sidecar_image.clone()),
        image_pull_policy: settings.sidecar_image_pull_policy.clone(),
        restart_policy: Some("Always".into()),
        command: Some(vec![SIDECAR_BINARY.into(), "serve".into()]),
        env: Some(sidecar_env),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("metrics".into()),
            container_port: SIDECAR_METRICS_PORT,
            ..Default::default()
        }]),
        startup_probe: Some(http_probe("/healthz", 1, 30)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        volume_mounts: Some(sidecar_mounts),
        security_context: Some(settings.sidecar_security_context.clone()),
        resources: Some(settings.sidecar_resources.clone()),
        ..Default::default()
    };
    let mut command = vec![
        ENTRYPOINT_PATH.to_string(),
        "--socket".into(),
        SOCKET_PATH.into(),
        "--".into(),
    ];
    command.extend(spec.command.iter().cloned());
    command.extend(variation.args.iter().cloned());
    let agent = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(variation.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(command),
        env: (!variation.env.is_empty()).then(|| variation.env.clone()),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        working_dir: spec.working_dir.clone(),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![mount()]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(agent_security_context(run)?),
        ..Default::default()
    };
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            init_containers: Some(vec![tools, sidecar]),
            containers: vec![agent],
            volumes: Some(
                [VOLUME, SIDECAR_STATE_VOLUME]
                    .into_iter()
                    .map(|name| Volume {
                        name: name.into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    })
                    .chain(tls_volume)
                    .collect(),
            ),
            service_account_name: spec.service_account_name.clone(),
            automount_service_account_token: Some(spec.service_account_name.is_some()),
            node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            affinity: spec.affinity.clone(),
            image_pull_secrets: image_pull_secrets(run, settings),
            runtime_class_name: spec.runtime_class_name.clone(),
            priority_class_name: spec.priority_class_name.clone(),
            termination_grace_period_seconds: Some(settings.termination_grace_period_seconds),
            enable_service_links: Some(false),
            security_context: Some(pod_security_context(run, settings)?),
            ..Default::default()
        }),
        status: None,
    })
}

/// Pod for each variation, in order.
pub fn build_pods(run: &AgentRun, settings: &Settings) -> Result<Vec<Pod>> {
    run.spec
        .resolved_variations()
        .iter()
        .map(|v| build_pod(run, v, settings))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AgentRun;
    use crate::fixtures::settings;
    use k8s_openapi::api::core::v1::Capabilities;

    /// Compares with a committed snapshot; `UPDATE_SNAPSHOTS=1` rewrites it.
    fn assert_snapshot(name: &str, value: &impl serde::Serialize) {
        let yaml = serde_yaml::to_string(value).expect("yaml");
        let path = format!("{}/src/snapshots/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &yaml).expect("write snapshot");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == yaml,
            "{path} differs from the built object (rerun with UPDATE_SNAPSHOTS=1 if the change is intended):\n{yaml}"
        );
    }

    #[test]
    fn hello_pod_snapshot() {
        let run = AgentRun::test();
        let pods = build_pods(&run, &settings()).expect("builds");
        assert_eq!(pods.len(), 1);
        assert_snapshot("pod-hello", &pods[0]);
        assert_snapshot(
            "secret-hello",
            &build_secret(&run, &settings()).expect("builds"),
        );
    }

    #[test]
    fn variation_pod_snapshot() {
        let mut run = AgentRun::test().with_variations(&["fast", "careful"]);
        run.spec.variations[1].args = Some(vec!["--careful".into()]);
        run.spec.variations[1].image = Some("busybox:1.37".into());
        run.spec
            .node_selector
            .insert("pool".into(), "agents".into());
        run.spec.pod_labels.insert("team".into(), "ml".into());
        run.spec
            .pod_labels
            .insert("agentrun.dev/run".into(), "spoofed".into());
        run.spec.service_account_name = Some("agent".into());
        run.spec.image_pull_policy = Some(crate::crd::ImagePullPolicy::Always);
        run.spec.stream_max_len = Some(5000);
        run.spec.security_context = Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(1000),
            ..Default::default()
        });
        run.spec.image_pull_secrets = vec![LocalObjectReference {
            name: "registry".into(),
        }];
        run.spec.runtime_class_name = Some("gvisor".into());
        run.spec.priority_class_name = Some("agents".into());
        let mut settings = settings();
        settings.sidecar_durability = "replicas=1,timeout=500".parse().expect("valid");
        let pods = build_pods(&run, &settings).expect("builds");
        assert_eq!(pods.len(), 2);
        assert_snapshot("pod-variation-careful", &pods[1]);
    }

    #[test]
    fn sidecar_tls_files_go_into_the_secret_and_a_read_only_volume() {
        let run = AgentRun::test();
        let mut settings = settings();
        settings.sidecar_tls = crate::config::SidecarTls {
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into()),
            client_pem: Some((
                "-----BEGIN CERTIFICATE-----\nCLIENT\n-----END CERTIFICATE-----\n".into(),
                "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n".into(),
            )),
        };
        let pod = build_pods(&run, &settings).expect("builds").remove(0);
        assert_snapshot("pod-hello-redis-tls", &pod);
        assert_snapshot(
            "secret-hello-redis-tls",
            &build_secret(&run, &settings).expect("builds"),
        );
        let spec = pod.spec.expect("spec");
        // Only the sidecar sees the files; the agent container has no such mount.
        let agent_mounts = spec.containers[0].volume_mounts.clone().unwrap_or_default();
        assert!(agent_mounts.iter().all(|m| m.name != REDIS_TLS_VOLUME));
        // Without TLS files there is no volume.
        let plain = build_pods(&run, &super::tests::settings())
            .expect("builds")
            .remove(0);
        let volumes = plain.spec.expect("spec").volumes.unwrap_or_default();
        assert!(
            volumes.iter().all(|v| v.name != REDIS_TLS_VOLUME),
            "{volumes:?}"
        );
    }

    #[test]
    fn pod_layout_follows_the_architecture() {
        let run = AgentRun::test();
        let pod = build_pods(&run, &settings()).expect("builds").remove(0);
        let spec = pod.spec.expect("spec");
        let init = spec.init_containers.expect("init containers");
        assert_eq!(init[0].name, TOOLS_CONTAINER);
        assert_eq!(
            init[0].command.as_deref().unwrap_or_default()[1..],
            ["install-entrypoint", "/agentrun/bin"]
        );
        assert_eq!(init[1].name, SIDECAR_CONTAINER);
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        assert!(init[1].readiness_probe.is_some());
        assert_eq!(
            spec.containers[0].command.as_deref().unwrap_or_default(),
            [
                ENTRYPOINT_PATH,
                "--socket",
                SOCKET_PATH,
                "--",
                "sh",
                "-c",
                "echo hello"
            ]
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let owner = &pod.metadata.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("AgentRun", Some(true))
        );
        assert_eq!(run_id(&run).expect("id"), "default.hello.0f1e2d3c");
        agentrun_protocol::RunId::new(run_id(&run).expect("id")).expect("a valid protocol run id");
    }

    #[test]
    fn the_sidecars_state_volume_is_mounted_in_the_sidecar_only() {
        let mut run = AgentRun::test();
        run.spec.security_context = Some(SecurityContext {
            run_as_user: Some(1000),
            ..Default::default()
        });
        let pod = build_pods(&run, &settings()).expect("builds").remove(0);
        let spec = pod.spec.expect("spec");
        assert!(
            spec.volumes
                .iter()
                .flatten()
                .any(|v| v.name == SIDECAR_STATE_VOLUME
                    && v.empty_dir.is_some()
                    && v.secret.is_none()),
            "an emptyDir of the pod's own: {:?}",
            spec.volumes
        );
        let mounts = |c: &Container| c.volume_mounts.clone().unwrap_or_default();
        let init = spec.init_containers.clone().expect("init containers");
        let sidecar = init
            .iter()
            .find(|c| c.name == SIDECAR_CONTAINER)
            .expect("sidecar");
        let mount = mounts(sidecar)
            .into_iter()
            .find(|m| m.name == SIDECAR_STATE_VOLUME)
            .expect("the sidecar mounts it");
        assert_eq!(mount.mount_path, SIDECAR_STATE_PATH);
        assert!(
            sidecar
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "AGENTRUN_STATE_DIR"
                    && e.value.as_deref() == Some(SIDECAR_STATE_PATH)),
            "the sidecar is told where it is"
        );
        // Neither the agent nor the tools container (which runs before the agent, but has no
        // business with the key) mounts it.
        for c in spec.containers.iter().chain(init.iter()) {
            if c.name != SIDECAR_CONTAINER {
                assert!(
                    mounts(c).iter().all(|m| m.name != SIDECAR_STATE_VOLUME
                        && !m.mount_path.starts_with(SIDECAR_STATE_PATH)),
                    "{} mounts the sidecar's state: {:?}",
                    c.name,
                    mounts(c)
                );
            }
        }
        assert_eq!(spec.containers[0].name, AGENT_CONTAINER);
    }

    #[test]
    fn runs_without_a_uid_are_refused_with_the_object_name() {
        let mut run = AgentRun::test();
        run.metadata.uid = None;
        let err = build_pods(&run, &settings())
            .expect_err("no uid")
            .to_string();
        assert!(
            err.contains("AgentRun default/hello") && err.contains("metadata.uid"),
            "{err}"
        );
    }

    /// Every way a pod breaks Pod Security `restricted` (which includes `baseline`), as the
    /// admission plugin checks it (k8s.io/pod-security-admission, level restricted, version
    /// latest), for the fields the operator can set.
    fn restricted_violations(pod: &Pod) -> Vec<String> {
        let spec = pod.spec.clone().expect("spec");
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let mut bad = Vec::new();
        for flag in [spec.host_network, spec.host_pid, spec.host_ipc] {
            if flag == Some(true) {
                bad.push("host namespaces".to_string());
            }
        }
        let allowed_volumes = |v: &Volume| {
            v.config_map.is_some()
                || v.csi.is_some()
                || v.downward_api.is_some()
                || v.empty_dir.is_some()
                || v.ephemeral.is_some()
                || v.persistent_volume_claim.is_some()
                || v.projected.is_some()
                || v.secret.is_some()
        };
        for v in spec.volumes.iter().flatten() {
            if !allowed_volumes(v) {
                bad.push(format!("volume {} has a restricted type", v.name));
            }
        }
        if pod_sc.run_as_user == Some(0) {
            bad.push("pod runAsUser 0".into());
        }
        let seccomp_ok = |p: &Option<SeccompProfile>| {
            p.as_ref()
                .is_some_and(|p| p.type_ == "RuntimeDefault" || p.type_ == "Localhost")
        };
        let containers: Vec<&Container> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .collect();
        for c in containers {
            let sc = c.security_context.clone().unwrap_or_default();
            let name = &c.name;
            if sc.privileged == Some(true) {
                bad.push(format!("{name}: privileged"));
            }
            if sc.allow_privilege_escalation != Some(false) {
                bad.push(format!("{name}: allowPrivilegeEscalation != false"));
            }
            let caps = sc.capabilities.clone().unwrap_or_default();
            if !caps.drop.iter().flatten().any(|d| d == "ALL") {
                bad.push(format!("{name}: capabilities.drop lacks ALL"));
            }
            if caps.add.iter().flatten().any(|a| a != "NET_BIND_SERVICE") {
                bad.push(format!("{name}: adds capabilities"));
            }
            let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root);
            if non_root != Some(true) {
                bad.push(format!("{name}: runAsNonRoot != true"));
            }
            if sc.run_as_user == Some(0) {
                bad.push(format!("{name}: runAsUser 0"));
            }
            if !(seccomp_ok(&sc.seccomp_profile)
                || (sc.seccomp_profile.is_none() && seccomp_ok(&pod_sc.seccomp_profile)))
            {
                bad.push(format!(
                    "{name}: seccompProfile not RuntimeDefault/Localhost"
                ));
            }
            if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
                bad.push(format!("{name}: hostPort"));
            }
        }
        bad
    }

    fn run_as_non_root() -> SecurityContext {
        SecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn the_default_pod_meets_pod_security_restricted_once_the_agent_runs_as_non_root() {
        let mut run = AgentRun::test();
        let pod = build_pods(&run, &settings()).expect("builds").remove(0);
        // The checker is not blind: the agent's user is the image's, which may be root.
        assert_eq!(restricted_violations(&pod), ["agent: runAsNonRoot != true"]);
        run.spec.security_context = Some(run_as_non_root());
        let pod = build_pods(&run, &settings()).expect("builds").remove(0);
        assert_eq!(restricted_violations(&pod), Vec::<String>::new());
        // The same at the pod level, and with the OpenShift settings (no user, no fsGroup).
        let mut run = AgentRun::test();
        run.spec.pod_security_context = Some(PodSecurityContext {
            run_as_non_root: Some(true),
            ..Default::default()
        });
        let mut openshift = settings();
        openshift.pod_fs_group = None;
        openshift.sidecar_security_context.run_as_user = None;
        openshift.sidecar_security_context.run_as_group = None;
        let pod = build_pods(&run, &openshift).expect("builds").remove(0);
        assert_eq!(restricted_violations(&pod), Vec::<String>::new());
        let spec = pod.spec.expect("spec");
        let pod_sc = spec.security_context.expect("pod security context");
        assert_eq!(pod_sc.fs_group, None, "OpenShift assigns the fsGroup");
        let init = spec.init_containers.expect("init containers");
        assert!(init.iter().all(|c| {
            let sc = c.security_context.clone().unwrap_or_default();
            sc.run_as_user.is_none() && sc.run_as_group.is_none()
        }));
    }

    #[test]
    fn every_pod_field_of_the_spec_reaches_the_pod() {
        use k8s_openapi::api::core::v1::{
            Affinity, EnvFromSource, NodeAffinity, NodeSelector, ResourceRequirements,
            SecretEnvSource, Toleration,
        };
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut run = AgentRun::test();
        let gpu = ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "nvidia.com/gpu".to_string(),
                Quantity("1".into()),
            )])),
            ..Default::default()
        };
        let toleration = Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        let affinity = Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let agent_sc = SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(1000),
            ..Default::default()
        };
        let pod_sc = PodSecurityContext {
            fs_group: Some(2000),
            supplemental_groups: Some(vec![3000]),
            ..Default::default()
        };
        let env_from = EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: "agent-keys".into(),
                optional: None,
            }),
            ..Default::default()
        };
        let spec = &mut run.spec;
        spec.resources = Some(gpu.clone());
        spec.security_context = Some(agent_sc);
        spec.pod_security_context = Some(pod_sc);
        spec.image_pull_secrets = vec![
            LocalObjectReference {
                name: "agent-registry".into(),
            },
            LocalObjectReference {
                name: "sidecar-registry".into(),
            },
        ];
        spec.runtime_class_name = Some("nvidia".into());
        spec.priority_class_name = Some("agents-high".into());
        spec.service_account_name = Some("agent".into());
        spec.node_selector = BTreeMap::from([("gpu".to_string(), "a100".to_string())]);
        spec.tolerations = vec![toleration.clone()];
        spec.affinity = Some(affinity.clone());
        spec.env_from = vec![env_from.clone()];
        spec.working_dir = Some("/work".into());
        spec.image_pull_policy = Some(crate::crd::ImagePullPolicy::Always);
        let mut settings = settings();
        settings.sidecar_image_pull_secrets = vec!["sidecar-registry".into()];
        let pod = build_pods(&run, &settings).expect("builds").remove(0);
        let spec = pod.spec.expect("spec");
        let agent = &spec.containers[0];
        assert_eq!(agent.resources, Some(gpu));
        assert_eq!(agent.env_from, Some(vec![env_from]));
        assert_eq!(agent.working_dir.as_deref(), Some("/work"));
        assert_eq!(agent.image_pull_policy.as_deref(), Some("Always"));
        let sc = agent
            .security_context
            .clone()
            .expect("agent security context");
        assert_eq!(
            (
                sc.run_as_non_root,
                sc.run_as_user,
                sc.allow_privilege_escalation
            ),
            (Some(true), Some(1000), Some(false)),
            "the run's fields and the defaults it did not set"
        );
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let pod_sc = spec.security_context.expect("pod security context");
        assert_eq!(pod_sc.fs_group, Some(2000), "the run's fsGroup wins");
        assert_eq!(pod_sc.supplemental_groups, Some(vec![3000]));
        assert_eq!(
            pod_sc.seccomp_profile.map(|p| p.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let secrets: Vec<String> = spec
            .image_pull_secrets
            .expect("pull secrets")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(secrets, ["sidecar-registry", "agent-registry"]);
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("agents-high"));
        assert_eq!(spec.service_account_name.as_deref(), Some("agent"));
        assert_eq!(spec.automount_service_account_token, Some(true));
        assert_eq!(
            spec.node_selector,
            Some(BTreeMap::from([("gpu".to_string(), "a100".to_string())]))
        );
        assert_eq!(spec.tolerations, Some(vec![toleration]));
        assert_eq!(spec.affinity, Some(affinity));
        // The agentrun containers keep the operator's settings, whatever the run says.
        for c in spec.init_containers.expect("init containers") {
            assert_eq!(
                c.security_context,
                Some(settings.sidecar_security_context.clone())
            );
            assert_eq!(c.resources, Some(settings.sidecar_resources.clone()));
        }
    }

    #[test]
    fn a_field_the_run_sets_replaces_that_default_as_a_whole() {
        let mut run = AgentRun::test();
        run.spec.security_context = Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_BIND_SERVICE".into()]),
                ..Default::default()
            }),
            ..Default::default()
        });
        run.spec.pod_security_context = Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "Localhost".into(),
                localhost_profile: Some("agent.json".into()),
            }),
            ..Default::default()
        });
        let pod = build_pods(&run, &settings()).expect("builds").remove(0);
        let spec = pod.spec.expect("spec");
        let agent = spec.containers[0].security_context.clone().expect("sc");
        assert_eq!(
            agent.capabilities,
            Some(Capabilities {
                add: Some(vec!["NET_BIND_SERVICE".into()]),
                drop: None
            })
        );
        assert_eq!(agent.allow_privilege_escalation, Some(false));
        let pod_sc = spec.security_context.expect("pod sc");
        assert_eq!(
            pod_sc
                .seccomp_profile
                .and_then(|p| p.localhost_profile)
                .as_deref(),
            Some("agent.json")
        );
        assert_eq!(pod_sc.fs_group, Some(crate::config::DEFAULT_UID));
    }
}
