// Long file: the Pod Security Standards, one check per control as upstream lists them, and their tests.
//! Pod Security Admission (k8s.io/pod-security-admission), from the namespace's labels
//! `pod-security.kubernetes.io/{enforce,warn,audit}[-version]`:
//! - `enforce` refuses a pod that violates the level: 403 `pods "x" is forbidden: violates
//!   PodSecurity "restricted:latest": allowPrivilegeEscalation != false (container "x" must
//!   set securityContext.allowPrivilegeEscalation=false), ...`;
//! - `warn` admits it with a `Warning` (`would violate PodSecurity "...": ...`), for pods and
//!   for the pod templates of workloads (Deployments, Jobs, ...); without a `warn` label it is
//!   the `enforce` level;
//! - `audit` has no audit log here: kube-sim logs the violation;
//! - changing a namespace's `enforce` level warns about the pods already there that violate it.
//!
//! The checks, their order, versions and messages are the real ones (`policy/check_*.go`):
//! baseline checks first, then restricted ones, each sorted by check ID; a restricted check
//! replaces the baseline check it overrides. `latest` and versions beyond the server's are the
//! server's own version (`--server-version`). Nothing is exempt.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::apiserver::errors::{ApiError, FieldError};

const PREFIX: &str = "pod-security.kubernetes.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

/// A level at a policy version (None: `latest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelVersion {
    pub level: Level,
    pub version: Option<u32>,
}

impl std::fmt::Display for LevelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            None => write!(f, "{}:latest", self.level.name()),
            Some(v) => write!(f, "{}:v1.{v}", self.level.name()),
        }
    }
}

/// A namespace's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub enforce: LevelVersion,
    pub audit: LevelVersion,
    pub warn: LevelVersion,
}

impl Policy {
    pub fn fully_privileged(&self) -> bool {
        [self.enforce, self.audit, self.warn]
            .iter()
            .all(|lv| lv.level == Level::Privileged)
    }
}

/// The policy of a namespace with `labels`, and the label errors (an invalid level counts as
/// `restricted`, an invalid version as `latest`, as the real plugin fails closed).
pub fn policy(labels: Option<&Map<String, Value>>) -> (Policy, Vec<FieldError>) {
    let privileged = LevelVersion {
        level: Level::Privileged,
        version: None,
    };
    let mut p = Policy {
        enforce: privileged,
        audit: privileged,
        warn: privileged,
    };
    let mut errs = Vec::new();
    let Some(labels) = labels else {
        return (p, errs);
    };
    let get = |mode: &str| {
        labels
            .get(&format!("{PREFIX}{mode}"))
            .and_then(Value::as_str)
    };
    let mut enforce_set = false;
    let mut warn_level_set = false;
    let mut warn_version_set = false;
    for (mode, target) in [
        ("enforce", &mut p.enforce),
        ("audit", &mut p.audit),
        ("warn", &mut p.warn),
    ] {
        if let Some(level) = get(mode) {
            match level {
                "privileged" => target.level = Level::Privileged,
                "baseline" => target.level = Level::Baseline,
                "restricted" => target.level = Level::Restricted,
                _ => {
                    target.level = Level::Restricted;
                    errs.push(label_error(
                        mode,
                        level,
                        "must be one of privileged, baseline, restricted",
                    ));
                }
            }
            let valid = matches!(level, "privileged" | "baseline" | "restricted");
            match mode {
                "enforce" => enforce_set = valid,
                "warn" => warn_level_set = true,
                _ => {}
            }
        }
        let version_label = format!("{mode}-version");
        if let Some(v) = get(&version_label) {
            if mode == "warn" {
                warn_version_set = true;
            }
            match parse_version(v) {
                Some(parsed) => target.version = parsed,
                None => errs.push(label_error(
                    &version_label,
                    v,
                    "must be \"latest\" or \"v1.x\"",
                )),
            }
        }
    }
    // The warn level defaults to an explicitly set, stricter enforce level.
    if !warn_level_set && enforce_set && p.enforce.level > p.warn.level {
        p.warn.level = p.enforce.level;
        if !warn_version_set {
            p.warn.version = p.enforce.version;
        }
    }
    (p, errs)
}

fn label_error(mode: &str, value: &str, why: &str) -> FieldError {
    FieldError::invalid(
        &format!("metadata.labels[{PREFIX}{mode}]"),
        &Value::String(value.to_string()),
        why,
    )
}

/// `latest` (Some(None)), `v1.N` (Some(Some(N))), or None when invalid.
fn parse_version(v: &str) -> Option<Option<u32>> {
    if v.is_empty() || v == "latest" {
        return Some(None);
    }
    let minor = v.strip_prefix("v1.")?;
    if minor.is_empty()
        || !minor.bytes().all(|b| b.is_ascii_digit())
        || (minor.len() > 1 && minor.starts_with('0'))
    {
        return None;
    }
    minor.parse().ok().map(Some)
}

/// The violations of `lv` by a pod with `meta` and `spec`: `(reason, detail)` per failed
/// check, in the real order. `server_minor` is what `latest` (and any newer version) means.
fn violations(
    lv: LevelVersion,
    meta: &Value,
    spec: &Value,
    server_minor: u32,
) -> Vec<(String, String)> {
    if lv.level == Level::Privileged {
        return Vec::new();
    }
    let version = lv.version.unwrap_or(server_minor).min(server_minor);
    let pod = Pod {
        meta,
        spec,
        version,
    };
    let restricted = lv.level == Level::Restricted;
    let applies = |c: &Check| version >= c.since && (c.level == Level::Baseline || restricted);
    let overridden: BTreeSet<&str> = CHECKS
        .iter()
        .filter(|c| c.level == Level::Restricted && applies(c))
        .flat_map(|c| c.overrides.iter().copied())
        .collect();
    CHECKS
        .iter()
        .filter(|c| applies(c) && !overridden.contains(c.id))
        .filter_map(|c| (c.check)(&pod))
        .collect()
}

/// The violations as the messages write them: `reason (detail), reason (detail)`; None when
/// the pod complies.
pub fn evaluate(lv: LevelVersion, meta: &Value, spec: &Value, server_minor: u32) -> Option<String> {
    let v = violations(lv, meta, spec, server_minor);
    (!v.is_empty()).then(|| {
        v.into_iter()
            .map(|(r, d)| {
                if d.is_empty() {
                    r
                } else {
                    format!("{r} ({d})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The violated checks' reasons only (`host namespaces, privileged`).
fn reasons(lv: LevelVersion, meta: &Value, spec: &Value, server_minor: u32) -> Option<String> {
    let v = violations(lv, meta, spec, server_minor);
    (!v.is_empty()).then(|| v.into_iter().map(|(r, _)| r).collect::<Vec<_>>().join(", "))
}

/// The outcome of checking a pod (or a workload's pod template).
#[derive(Debug, Default)]
pub struct Outcome {
    pub warnings: Vec<String>,
    /// The audit annotation kube-sim logs in place of an audit log.
    pub audit: Option<String>,
}

/// Checks a pod against its namespace's policy (`enforce`: refuse it; else only warn and
/// audit, as for workloads). `labels` are the namespace's.
pub fn admit(
    labels: Option<&Map<String, Value>>,
    meta: &Value,
    spec: &Value,
    enforce: bool,
    server_minor: u32,
    name: &str,
) -> Result<Outcome, ApiError> {
    let (p, _errs) = policy(labels);
    let mut out = Outcome::default();
    if p.fully_privileged()
        || (!enforce && p.warn.level == Level::Privileged && p.audit.level == Level::Privileged)
    {
        return Ok(out);
    }
    if enforce && let Some(v) = evaluate(p.enforce, meta, spec, server_minor) {
        return Err(ApiError::forbidden(
            "",
            "pods",
            name,
            &format!("violates PodSecurity \"{}\": {v}", p.enforce),
        ));
    }
    if let Some(v) = evaluate(p.audit, meta, spec, server_minor) {
        out.audit = Some(format!("would violate PodSecurity \"{}\": {v}", p.audit));
    }
    if let Some(v) = evaluate(p.warn, meta, spec, server_minor) {
        out.warnings
            .push(format!("would violate PodSecurity \"{}\": {v}", p.warn));
    }
    Ok(out)
}

/// The warnings a change of a namespace's labels from `old` to `new` gives: invalid labels
/// are refused (422), a new, stricter `enforce` level warns about the existing `pods` that
/// violate it (`existing pods in namespace "x" violate the new PodSecurity enforce level
/// "restricted:latest"`, then `pod-a (and 2 other pods): <reasons>`).
pub fn namespace_change(
    name: &str,
    old: Option<&Map<String, Value>>,
    new: Option<&Map<String, Value>>,
    pods: &[Value],
    server_minor: u32,
) -> Result<Vec<String>, ApiError> {
    let (new_p, new_errs) = policy(new);
    let (old_p, old_errs) = policy(old);
    let creating = old.is_none();
    if !new_errs.is_empty() && (creating || old_errs.is_empty() || old_errs != new_errs) {
        return Err(ApiError::invalid("Namespace", "", name, &new_errs));
    }
    if creating
        || new_p.enforce == old_p.enforce
        || new_p.enforce.level == Level::Privileged
        || (new_p.enforce.version == old_p.enforce.version
            && new_p.enforce.level <= old_p.enforce.level)
    {
        return Ok(Vec::new());
    }
    // reason -> (first pod name, count)
    let mut found: Vec<(String, String, usize)> = Vec::new();
    for pod in pods {
        let Some(reasons) = reasons(new_p.enforce, &pod["metadata"], &pod["spec"], server_minor)
        else {
            continue;
        };
        let pod_name = crate::json::str_at(pod, "/metadata/name");
        match found.iter_mut().find(|(r, _, _)| *r == reasons) {
            Some((_, first, n)) => {
                *n += 1;
                if pod_name < *first {
                    *first = pod_name;
                }
            }
            None => found.push((reasons, pod_name, 1)),
        }
    }
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let mut pod_warnings: Vec<String> = found
        .into_iter()
        .map(|(r, first, n)| match n {
            1 => format!("{first}: {r}"),
            2 => format!("{first} (and 1 other pod): {r}"),
            _ => format!("{first} (and {} other pods): {r}", n - 1),
        })
        .collect();
    pod_warnings.sort();
    let mut out = vec![format!(
        "existing pods in namespace {name:?} violate the new PodSecurity enforce level \"{}\"",
        new_p.enforce
    )];
    out.extend(pod_warnings);
    Ok(out)
}

/// The pod template of a workload (Deployment, Job, CronJob, ...): `(metadata, spec)`.
pub fn pod_template(group: &str, plural: &str, obj: &Value) -> Option<(Value, Value)> {
    let ptr = match (group, plural) {
        ("apps", "deployments" | "replicasets" | "statefulsets" | "daemonsets")
        | ("batch", "jobs")
        | ("", "replicationcontrollers") => "/spec/template",
        ("batch", "cronjobs") => "/spec/jobTemplate/spec/template",
        ("", "podtemplates") => "/template",
        _ => return None,
    };
    let t = obj.pointer(ptr)?;
    Some((
        t.get("metadata").cloned().unwrap_or(Value::Null),
        t.get("spec").cloned().unwrap_or(Value::Null),
    ))
}

struct Pod<'a> {
    meta: &'a Value,
    spec: &'a Value,
    version: u32,
}

impl Pod<'_> {
    /// Init containers, containers and ephemeral containers, in that order.
    fn containers(&self) -> impl Iterator<Item = &Value> {
        ["initContainers", "containers", "ephemeralContainers"]
            .into_iter()
            .flat_map(|l| {
                self.spec
                    .get(l)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
    }

    fn pod_sc(&self, field: &str) -> Option<&Value> {
        self.spec.get("securityContext")?.get(field)
    }

    fn annotations(&self) -> Vec<(&String, &str)> {
        self.meta
            .get("annotations")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s)))
            .collect()
    }

    fn windows(&self) -> bool {
        self.version >= 25
            && self.spec.pointer("/os/name").and_then(Value::as_str) == Some("windows")
    }
}

fn sc<'a>(c: &'a Value, field: &str) -> Option<&'a Value> {
    c.get("securityContext")?
        .get(field)
        .filter(|v| !v.is_null())
}

fn cname(c: &Value) -> String {
    c["name"].as_str().unwrap_or_default().to_string()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 { one.into() } else { many.into() }
}

fn join_quote<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| format!("\"{}\"", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The names of the `items` (containers or volumes) in which `found` finds something, and
/// everything it found, sorted and each once.
fn offenders<'a>(
    items: impl Iterator<Item = &'a Value>,
    found: impl Fn(&Value) -> Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut all = BTreeSet::new();
    for item in items {
        let values = found(item);
        if !values.is_empty() {
            names.push(cname(item));
            all.extend(values);
        }
    }
    (names, all.into_iter().collect())
}

/// The names of the pod's containers for which `bad` holds.
fn containers_where(p: &Pod<'_>, mut bad: impl FnMut(&Value) -> bool) -> Vec<String> {
    p.containers().filter(|c| bad(c)).map(cname).collect()
}

/// The violation `title` when any container `breaks` the rule: `containers "a", "b" {rule}`.
fn containers_breaking(
    p: &Pod<'_>,
    title: &str,
    rule: &str,
    breaks: impl FnMut(&Value) -> bool,
) -> Violation {
    let bad = containers_where(p, breaks);
    (!bad.is_empty()).then(|| (title.into(), format!("{} {rule}", containers_phrase(&bad))))
}

/// `container "a"` / `containers "a", "b"`.
fn containers_phrase(names: &[String]) -> String {
    format!(
        "{} {}",
        plural(names.len(), "container", "containers"),
        join_quote(names)
    )
}

/// `pod and containers "a", "b"` (the setters of a bad value).
fn setters(pod: bool, names: &[String]) -> String {
    let mut s = Vec::new();
    if pod {
        s.push("pod".to_string());
    }
    if !names.is_empty() {
        s.push(containers_phrase(names));
    }
    s.join(" and ")
}

type Violation = Option<(String, String)>;

struct Check {
    id: &'static str,
    level: Level,
    /// The first policy version (1.x) the check applies to.
    since: u32,
    /// The baseline checks it replaces at the restricted level.
    overrides: &'static [&'static str],
    check: fn(&Pod<'_>) -> Violation,
}

/// Every check, sorted by level then ID: the order of the messages.
const CHECKS: &[Check] = &[
    Check {
        id: "appArmorProfile",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: app_armor,
    },
    Check {
        id: "capabilities_baseline",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: capabilities_baseline,
    },
    Check {
        id: "hostNamespaces",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: host_namespaces,
    },
    Check {
        id: "hostPathVolumes",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: host_path_volumes,
    },
    Check {
        id: "hostPorts",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: host_ports,
    },
    Check {
        id: "hostProbesAndHostLifecycle",
        level: Level::Baseline,
        since: 34,
        overrides: &[],
        check: host_probes,
    },
    Check {
        id: "privileged",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: privileged,
    },
    Check {
        id: "procMount",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: proc_mount,
    },
    Check {
        id: "seLinuxOptions",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: se_linux,
    },
    Check {
        id: "seccompProfile_baseline",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: seccomp_baseline,
    },
    Check {
        id: "sysctls",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: sysctls,
    },
    Check {
        id: "windowsHostProcess",
        level: Level::Baseline,
        since: 0,
        overrides: &[],
        check: windows_host_process,
    },
    Check {
        id: "allowPrivilegeEscalation",
        level: Level::Restricted,
        since: 8,
        overrides: &[],
        check: allow_privilege_escalation,
    },
    Check {
        id: "capabilities_restricted",
        level: Level::Restricted,
        since: 22,
        overrides: &["capabilities_baseline"],
        check: capabilities_restricted,
    },
    Check {
        id: "restrictedVolumes",
        level: Level::Restricted,
        since: 0,
        overrides: &["hostPathVolumes"],
        check: restricted_volumes,
    },
    Check {
        id: "runAsNonRoot",
        level: Level::Restricted,
        since: 0,
        overrides: &[],
        check: run_as_non_root,
    },
    Check {
        id: "runAsUser",
        level: Level::Restricted,
        since: 23,
        overrides: &[],
        check: run_as_user,
    },
    Check {
        id: "seccompProfile_restricted",
        level: Level::Restricted,
        since: 19,
        overrides: &["seccompProfile_baseline"],
        check: seccomp_restricted,
    },
];

fn app_armor(p: &Pod<'_>) -> Violation {
    let allowed_annotation =
        |v: &str| v.is_empty() || v == "runtime/default" || v.starts_with("localhost/");
    let mut annotations: Vec<String> = p
        .annotations()
        .into_iter()
        .filter(|(k, v)| {
            k.starts_with("container.apparmor.security.beta.kubernetes.io/")
                && !allowed_annotation(v)
        })
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    annotations.sort();
    // Any type but RuntimeDefault and Localhost (Unconfined) is forbidden.
    let unconfined = |v: Option<&Value>| {
        v.and_then(|a| a.get("type"))
            .and_then(Value::as_str)
            .filter(|t| *t != "RuntimeDefault" && *t != "Localhost")
            .map(String::from)
    };
    let mut bad_values = BTreeSet::new();
    let pod_bad = unconfined(p.pod_sc("appArmorProfile"));
    if let Some(v) = &pod_bad {
        bad_values.insert(v.clone());
    }
    let mut bad = Vec::new();
    for c in p.containers() {
        if let Some(v) = unconfined(sc(c, "appArmorProfile")) {
            bad.push(cname(c));
            bad_values.insert(v);
        }
    }
    let mut who = Vec::new();
    if pod_bad.is_some() || !bad.is_empty() {
        who.push(setters(pod_bad.is_some(), &bad));
    }
    let mut values: Vec<String> = bad_values.into_iter().collect();
    if !annotations.is_empty() {
        who.push(plural(annotations.len(), "annotation", "annotations"));
        values.extend(annotations);
    }
    (!who.is_empty()).then(|| {
        (
            plural(
                values.len(),
                "forbidden AppArmor profile",
                "forbidden AppArmor profiles",
            ),
            format!(
                "{} must not set AppArmor profile type to {}",
                who.join(" and "),
                join_quote(&values)
            ),
        )
    })
}

const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

fn added_capabilities(c: &Value) -> Vec<String> {
    c.pointer("/securityContext/capabilities/add")
        .map(crate::json::string_list)
        .unwrap_or_default()
}

fn capabilities_baseline(p: &Pod<'_>) -> Violation {
    let (bad, caps) = offenders(p.containers(), |c| {
        added_capabilities(c)
            .into_iter()
            .filter(|cap| !BASELINE_CAPABILITIES.contains(&cap.as_str()))
            .collect()
    });
    (!bad.is_empty()).then(|| {
        (
            "non-default capabilities".into(),
            format!(
                "{} must not include {} in securityContext.capabilities.add",
                containers_phrase(&bad),
                join_quote(&caps)
            ),
        )
    })
}

fn host_namespaces(p: &Pod<'_>) -> Violation {
    let on = |f: &str| p.spec.get(f).and_then(Value::as_bool) == Some(true);
    let set: Vec<&str> = ["hostIPC", "hostNetwork", "hostPID"]
        .into_iter()
        .filter(|f| on(f))
        .collect();
    (!set.is_empty()).then(|| ("host namespaces".into(), set.join(", ")))
}

fn volumes<'a>(p: &'a Pod<'_>) -> impl Iterator<Item = &'a Value> {
    p.spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn host_path_volumes(p: &Pod<'_>) -> Violation {
    let bad: Vec<String> = volumes(p)
        .filter(|v| v.get("hostPath").is_some_and(|h| !h.is_null()))
        .map(cname)
        .collect();
    (!bad.is_empty()).then(|| {
        (
            "hostPath volumes".into(),
            format!(
                "{} {}",
                plural(bad.len(), "volume", "volumes"),
                join_quote(&bad)
            ),
        )
    })
}

fn host_ports(p: &Pod<'_>) -> Violation {
    let (bad, ports) = offenders(p.containers(), |c| {
        c.get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|port| port.get("hostPort").and_then(Value::as_i64))
            .filter(|hp| *hp != 0)
            .map(|hp| hp.to_string())
            .collect()
    });
    (!bad.is_empty()).then(|| {
        (
            "hostPort".into(),
            format!(
                "{} {} {} {}",
                containers_phrase(&bad),
                plural(bad.len(), "uses", "use"),
                plural(ports.len(), "hostPort", "hostPorts"),
                ports.join(", ")
            ),
        )
    })
}

fn host_probes(p: &Pod<'_>) -> Violation {
    let mut bad = BTreeSet::new();
    let mut hosts = BTreeSet::new();
    for c in p.containers() {
        let handlers = [
            "/livenessProbe",
            "/readinessProbe",
            "/startupProbe",
            "/lifecycle/postStart",
            "/lifecycle/preStop",
        ];
        for h in handlers {
            for kind in ["httpGet", "tcpSocket"] {
                if let Some(host) = c
                    .pointer(&format!("{h}/{kind}/host"))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    bad.insert(cname(c));
                    hosts.insert(host.to_string());
                }
            }
        }
    }
    (!bad.is_empty()).then(|| {
        let bad: Vec<String> = bad.into_iter().collect();
        let hosts: Vec<String> = hosts.into_iter().collect();
        (
            "probe or lifecycle host".into(),
            format!(
                "{} {} {} {}",
                containers_phrase(&bad),
                plural(bad.len(), "uses", "use"),
                plural(
                    hosts.len(),
                    "probe or lifecycle host",
                    "probe or lifecycle hosts"
                ),
                join_quote(&hosts)
            ),
        )
    })
}

fn privileged(p: &Pod<'_>) -> Violation {
    let rule = "must not set securityContext.privileged=true";
    containers_breaking(p, "privileged", rule, |c| {
        sc(c, "privileged").and_then(Value::as_bool) == Some(true)
    })
}

fn proc_mount(p: &Pod<'_>) -> Violation {
    let (bad, types) = offenders(p.containers(), |c| {
        sc(c, "procMount")
            .and_then(Value::as_str)
            .filter(|t| *t != "Default")
            .map(String::from)
            .into_iter()
            .collect()
    });
    (!bad.is_empty()).then(|| {
        (
            "procMount".into(),
            format!(
                "{} must not set securityContext.procMount to {}",
                containers_phrase(&bad),
                join_quote(&types)
            ),
        )
    })
}

fn se_linux(p: &Pod<'_>) -> Violation {
    let mut allowed = vec!["", "container_t", "container_init_t", "container_kvm_t"];
    if p.version >= 31 {
        allowed.push("container_engine_t");
    }
    let mut bad_types = BTreeSet::new();
    let (mut set_user, mut set_role) = (false, false);
    let mut valid = |o: Option<&Value>| -> bool {
        let Some(o) = o.filter(|o| o.is_object()) else {
            return true;
        };
        let s = |f: &str| {
            o.get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut ok = true;
        if !allowed.contains(&s("type").as_str()) {
            ok = false;
            bad_types.insert(s("type"));
        }
        if !s("user").is_empty() {
            ok = false;
            set_user = true;
        }
        if !s("role").is_empty() {
            ok = false;
            set_role = true;
        }
        ok
    };
    let pod_bad = !valid(p.pod_sc("seLinuxOptions"));
    let bad = containers_where(p, |c| !valid(sc(c, "seLinuxOptions")));
    if !pod_bad && bad.is_empty() {
        return None;
    }
    let mut data = Vec::new();
    if !bad_types.is_empty() {
        let types: Vec<String> = bad_types.into_iter().collect();
        data.push(format!(
            "{} {}",
            plural(types.len(), "type", "types"),
            join_quote(&types)
        ));
    }
    if set_user {
        data.push("user may not be set".into());
    }
    if set_role {
        data.push("role may not be set".into());
    }
    Some((
        "seLinuxOptions".into(),
        format!(
            "{} set forbidden securityContext.seLinuxOptions: {}",
            setters(pod_bad, &bad),
            data.join("; ")
        ),
    ))
}

fn seccomp_type(v: Option<&Value>) -> Option<String> {
    v.filter(|v| v.is_object()).map(|v| {
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    })
}

fn valid_seccomp(t: &str) -> bool {
    t == "RuntimeDefault" || t == "Localhost"
}

fn seccomp_baseline(p: &Pod<'_>) -> Violation {
    if p.version < 19 {
        let ok = |v: &str| {
            v == "runtime/default" || v == "docker/default" || v.starts_with("localhost/")
        };
        let mut bad = BTreeSet::new();
        let names: Vec<String> = p.containers().map(cname).collect();
        for (k, v) in p.annotations() {
            let relevant = k == "seccomp.security.alpha.kubernetes.io/pod"
                || k.strip_prefix("container.seccomp.security.alpha.kubernetes.io/")
                    .is_some_and(|n| names.iter().any(|c| c == n));
            if relevant && !ok(v) {
                bad.insert(format!("{k}={v:?}"));
            }
        }
        return (!bad.is_empty()).then(|| {
            let bad: Vec<String> = bad.into_iter().collect();
            (
                "seccompProfile".into(),
                format!(
                    "forbidden {} {}",
                    plural(bad.len(), "annotation", "annotations"),
                    bad.join(", ")
                ),
            )
        });
    }
    let mut values = BTreeSet::new();
    let pod_bad = match seccomp_type(p.pod_sc("seccompProfile")) {
        Some(t) if !valid_seccomp(&t) => {
            values.insert(t);
            true
        }
        _ => false,
    };
    let mut bad = Vec::new();
    for c in p.containers() {
        if let Some(t) = seccomp_type(sc(c, "seccompProfile"))
            && !valid_seccomp(&t)
        {
            bad.push(cname(c));
            values.insert(t);
        }
    }
    (pod_bad || !bad.is_empty()).then(|| {
        let values: Vec<String> = values.into_iter().collect();
        (
            "seccompProfile".into(),
            format!(
                "{} must not set securityContext.seccompProfile.type to {}",
                setters(pod_bad, &bad),
                join_quote(&values)
            ),
        )
    })
}

fn sysctls(p: &Pod<'_>) -> Violation {
    let mut allowed = vec![
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_unprivileged_port_start",
    ];
    if p.version >= 27 {
        allowed.push("net.ipv4.ip_local_reserved_ports");
    }
    if p.version >= 29 {
        allowed.extend([
            "net.ipv4.tcp_keepalive_time",
            "net.ipv4.tcp_fin_timeout",
            "net.ipv4.tcp_keepalive_intvl",
            "net.ipv4.tcp_keepalive_probes",
        ]);
    }
    if p.version >= 32 {
        allowed.extend(["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"]);
    }
    let bad: Vec<String> = p
        .pod_sc("sysctls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(cname)
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    (!bad.is_empty()).then(|| ("forbidden sysctls".into(), bad.join(", ")))
}

fn windows_host_process(p: &Pod<'_>) -> Violation {
    let host = |v: Option<&Value>| {
        v.and_then(|w| w.get("hostProcess"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    let pod_bad = host(p.pod_sc("windowsOptions"));
    let bad = containers_where(p, |c| host(sc(c, "windowsOptions")));
    (pod_bad || !bad.is_empty()).then(|| {
        (
            "hostProcess".into(),
            format!(
                "{} must not set securityContext.windowsOptions.hostProcess=true",
                setters(pod_bad, &bad)
            ),
        )
    })
}

fn allow_privilege_escalation(p: &Pod<'_>) -> Violation {
    if p.windows() {
        return None;
    }
    let title = "allowPrivilegeEscalation != false";
    let rule = "must set securityContext.allowPrivilegeEscalation=false";
    containers_breaking(p, title, rule, |c| {
        sc(c, "allowPrivilegeEscalation").and_then(Value::as_bool) != Some(false)
    })
}

fn capabilities_restricted(p: &Pod<'_>) -> Violation {
    if p.windows() {
        return None;
    }
    let mut missing_drop = Vec::new();
    let mut adding = Vec::new();
    let mut caps = BTreeSet::new();
    for c in p.containers() {
        let Some(capabilities) = sc(c, "capabilities") else {
            missing_drop.push(cname(c));
            continue;
        };
        let drop = capabilities
            .get("drop")
            .map(crate::json::string_list)
            .unwrap_or_default();
        if !drop.iter().any(|d| d == "ALL") {
            missing_drop.push(cname(c));
        }
        let extra: Vec<String> = added_capabilities(c)
            .into_iter()
            .filter(|cap| cap != "NET_BIND_SERVICE")
            .collect();
        if !extra.is_empty() {
            adding.push(cname(c));
            caps.extend(extra);
        }
    }
    let mut details = Vec::new();
    if !missing_drop.is_empty() {
        details.push(format!(
            "{} must set securityContext.capabilities.drop=[\"ALL\"]",
            containers_phrase(&missing_drop)
        ));
    }
    if !adding.is_empty() {
        let caps: Vec<String> = caps.into_iter().collect();
        details.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_phrase(&adding),
            join_quote(&caps)
        ));
    }
    (!details.is_empty()).then(|| ("unrestricted capabilities".into(), details.join("; ")))
}

fn restricted_volumes(p: &Pod<'_>) -> Violation {
    const ALLOWED: &[&str] = &[
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    const RESTRICTED: &[(&str, &str)] = &[
        ("hostPath", "hostPath"),
        ("gcePersistentDisk", "gcePersistentDisk"),
        ("awsElasticBlockStore", "awsElasticBlockStore"),
        ("gitRepo", "gitRepo"),
        ("nfs", "nfs"),
        ("iscsi", "iscsi"),
        ("glusterfs", "glusterfs"),
        ("rbd", "rbd"),
        ("flexVolume", "flexVolume"),
        ("cinder", "cinder"),
        ("cephfs", "cephfs"),
        ("flocker", "flocker"),
        ("fc", "fc"),
        ("azureFile", "azureFile"),
        ("vsphereVolume", "vsphereVolume"),
        ("quobyte", "quobyte"),
        ("azureDisk", "azureDisk"),
        ("photonPersistentDisk", "photonPersistentDisk"),
        ("portworxVolume", "portworxVolume"),
        ("scaleIO", "scaleIO"),
        ("storageos", "storageos"),
    ];
    let set = |v: &Value, k: &str| v.get(k).is_some_and(|x| !x.is_null());
    let (bad, types) = offenders(volumes(p), |v| {
        if ALLOWED.iter().any(|k| set(v, k)) {
            return Vec::new();
        }
        let t = RESTRICTED
            .iter()
            .find(|(k, _)| set(v, k))
            .map_or("unknown", |(_, t)| *t);
        vec![t.to_string()]
    });
    (!bad.is_empty()).then(|| {
        (
            "restricted volume types".into(),
            format!(
                "{} {} {} {} {}",
                plural(bad.len(), "volume", "volumes"),
                join_quote(&bad),
                plural(bad.len(), "uses", "use"),
                plural(
                    types.len(),
                    "restricted volume type",
                    "restricted volume types"
                ),
                join_quote(&types)
            ),
        )
    })
}

fn run_as_non_root(p: &Pod<'_>) -> Violation {
    let mut bad_setters = Vec::new();
    let mut pod_true = false;
    match p.pod_sc("runAsNonRoot").and_then(Value::as_bool) {
        Some(false) => bad_setters.push("pod".to_string()),
        Some(true) => pod_true = true,
        None => {}
    }
    let mut explicit = Vec::new();
    let mut implicit = Vec::new();
    for c in p.containers() {
        match sc(c, "runAsNonRoot").and_then(Value::as_bool) {
            Some(false) => explicit.push(cname(c)),
            Some(true) => {}
            None if !pod_true => implicit.push(cname(c)),
            None => {}
        }
    }
    if !explicit.is_empty() {
        bad_setters.push(containers_phrase(&explicit));
    }
    if !bad_setters.is_empty() {
        return Some((
            "runAsNonRoot != true".into(),
            format!(
                "{} must not set securityContext.runAsNonRoot=false",
                bad_setters.join(" and ")
            ),
        ));
    }
    (!implicit.is_empty()).then(|| {
        (
            "runAsNonRoot != true".into(),
            format!(
                "pod or {} must set securityContext.runAsNonRoot=true",
                containers_phrase(&implicit)
            ),
        )
    })
}

fn run_as_user(p: &Pod<'_>) -> Violation {
    let root = |v: Option<&Value>| v.and_then(Value::as_i64) == Some(0);
    let pod_bad = root(p.pod_sc("runAsUser"));
    let bad = containers_where(p, |c| root(sc(c, "runAsUser")));
    (pod_bad || !bad.is_empty()).then(|| {
        (
            "runAsUser=0".into(),
            format!("{} must not set runAsUser=0", setters(pod_bad, &bad)),
        )
    })
}

fn seccomp_restricted(p: &Pod<'_>) -> Violation {
    if p.windows() {
        return None;
    }
    let mut values = BTreeSet::new();
    let mut pod_bad = false;
    let mut pod_set = false;
    if let Some(t) = seccomp_type(p.pod_sc("seccompProfile")) {
        if valid_seccomp(&t) {
            pod_set = true;
        } else {
            pod_bad = true;
            values.insert(t);
        }
    }
    let mut explicit = Vec::new();
    let mut implicit = Vec::new();
    for c in p.containers() {
        match seccomp_type(sc(c, "seccompProfile")) {
            Some(t) if !valid_seccomp(&t) => {
                explicit.push(cname(c));
                values.insert(t);
            }
            Some(_) => {}
            None if !pod_set => implicit.push(cname(c)),
            None => {}
        }
    }
    if pod_bad || !explicit.is_empty() {
        let values: Vec<String> = values.into_iter().collect();
        return Some((
            "seccompProfile".into(),
            format!(
                "{} must not set securityContext.seccompProfile.type to {}",
                setters(pod_bad, &explicit),
                join_quote(&values)
            ),
        ));
    }
    (!implicit.is_empty()).then(|| {
        (
            "seccompProfile".into(),
            format!(
                "pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"",
                containers_phrase(&implicit)
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn restricted() -> LevelVersion {
        LevelVersion {
            level: Level::Restricted,
            version: None,
        }
    }

    #[test]
    fn a_plain_pod_violates_restricted_in_the_real_order() {
        let spec = json!({"containers": [{"name": "x", "image": "busybox"}]});
        assert_eq!(
            evaluate(restricted(), &json!({}), &spec, 33).as_deref(),
            Some(
                "allowPrivilegeEscalation != false (container \"x\" must set securityContext.allowPrivilegeEscalation=false), \
                 unrestricted capabilities (container \"x\" must set securityContext.capabilities.drop=[\"ALL\"]), \
                 runAsNonRoot != true (pod or container \"x\" must set securityContext.runAsNonRoot=true), \
                 seccompProfile (pod or container \"x\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")"
            )
        );
        let ok = json!({"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "x", "image": "busybox", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]});
        assert_eq!(evaluate(restricted(), &json!({}), &ok, 33), None);
    }

    #[test]
    fn baseline_refuses_host_access_and_privilege() {
        let baseline = LevelVersion {
            level: Level::Baseline,
            version: None,
        };
        let spec = json!({"hostNetwork": true, "hostPID": true,
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "containers": [{"name": "a", "image": "x", "ports": [{"containerPort": 80, "hostPort": 8080}],
                "securityContext": {"privileged": true, "capabilities": {"add": ["NET_ADMIN", "CHOWN"]}}}]});
        assert_eq!(
            evaluate(baseline, &json!({}), &spec, 33).as_deref(),
            Some(
                "non-default capabilities (container \"a\" must not include \"NET_ADMIN\" in securityContext.capabilities.add), \
                 host namespaces (hostNetwork, hostPID), hostPath volumes (volume \"root\"), \
                 hostPort (container \"a\" uses hostPort 8080), privileged (container \"a\" must not set securityContext.privileged=true)"
            )
        );
    }

    #[test]
    fn app_armor_profiles_read_like_the_real_checks() {
        let baseline = LevelVersion {
            level: Level::Baseline,
            version: None,
        };
        let spec = json!({"securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "foo", "image": "x",
                "securityContext": {"appArmorProfile": {"type": "Unconfined"}}}]});
        assert_eq!(
            evaluate(baseline, &json!({}), &spec, 33).as_deref(),
            Some(
                "forbidden AppArmor profile (container \"foo\" must not set AppArmor profile type to \"Unconfined\")"
            )
        );
    }

    #[test]
    fn namespace_labels_make_the_policy() {
        let labels = json!({"pod-security.kubernetes.io/enforce": "baseline",
                            "pod-security.kubernetes.io/enforce-version": "v1.28"});
        let (p, errs) = policy(labels.as_object());
        assert!(errs.is_empty());
        assert_eq!(p.enforce.to_string(), "baseline:v1.28");
        assert_eq!(p.warn.to_string(), "baseline:v1.28");
        assert_eq!(p.audit.to_string(), "privileged:latest");
        let labels = json!({"pod-security.kubernetes.io/enforce": "strict"});
        let (p, errs) = policy(labels.as_object());
        assert_eq!(p.enforce.level, Level::Restricted);
        assert_eq!(
            errs[0].to_string(),
            "metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: \"strict\": must be one of privileged, baseline, restricted"
        );
    }
}
