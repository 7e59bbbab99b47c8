//! Security contexts, applied as a real kubelet and container runtime (containerd, runc) apply
//! them: the user, group and supplementary groups a container runs as (`runAsUser`,
//! `runAsGroup`, the pod's `fsGroup` and `supplementalGroups`, the image's user), its
//! capabilities (the runtime's default set for root, `capabilities.add` / `drop`,
//! `privileged`), no_new_privs (`allowPrivilegeEscalation: false`), `readOnlyRootFilesystem`,
//! and the kubelet's `runAsNonRoot` refusals with its messages. [`Identity::setpriv_args`]
//! turns the result into the `setpriv` options that apply it to a host process.
//!
//! An image's passwd and group files are not there to read: the image map's `user` stands for
//! the image's `USER` and what its passwd says of that user (`UID:GID`; a name is looked up in
//! the host's `/etc/passwd` and `/etc/group`); any other uid is unknown to the image, so it runs
//! with gid 0 and no groups of its own, as containerd does for a uid missing from the image's
//! passwd.

use serde_json::Value;

/// The capabilities a container runtime gives root when the pod says nothing (containerd's
/// and Docker's default set).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability, in the kernel's order (what `ALL` adds or drops).
const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What a container process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary group, the image user's groups, the pod's `fsGroup`
    /// and `supplementalGroups`.
    pub groups: Vec<u32>,
    /// The bounding set (root has it effective and permitted, other users nothing); None:
    /// every capability there is (`privileged`).
    pub capabilities: Option<Vec<&'static str>>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    pub read_only_root: bool,
    /// `HOME` when the container's env sets none (the user's home in the image's passwd).
    pub home: String,
}

/// A security-context field of the container, else of the pod (`DetermineEffectiveSecurityContext`
/// for the fields both have).
fn effective<'a>(pod: &'a Value, spec: &'a Value, field: &str) -> Option<&'a Value> {
    spec.pointer(&format!("/securityContext/{field}"))
        .filter(|v| !v.is_null())
        .or_else(|| {
            pod.pointer(&format!("/spec/securityContext/{field}"))
                .filter(|v| !v.is_null())
        })
}

fn id_field(pod: &Value, spec: &Value, field: &str) -> Option<i64> {
    effective(pod, spec, field).and_then(Value::as_i64)
}

/// The kubelet's pod description in messages: `NAME_NAMESPACE(UID)`, quoted as Go's `%q`.
fn pod_desc(pod: &Value) -> String {
    let s = |p: &str| pod.pointer(p).and_then(Value::as_str).unwrap_or_default();
    format!(
        "{:?}",
        format!(
            "{}_{}({})",
            s("/metadata/name"),
            s("/metadata/namespace"),
            s("/metadata/uid")
        )
    )
}

/// The kubelet's view of an image's user (`getImageUser`): a uid when the user part of `USER`
/// is numeric, else a user name; an image without `USER` runs as root.
fn image_user_view(image_user: &str) -> (Option<i64>, &str) {
    let user = image_user.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return (Some(0), "");
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), ""),
        Err(_) => (None, user),
    }
}

/// `runAsNonRoot`, checked as the kubelet checks it before creating a container
/// (`verifyRunAsNonRoot`); the error is its message (`CreateContainerConfigError`).
pub fn verify_run_as_non_root(pod: &Value, spec: &Value, image_user: &str) -> Result<(), String> {
    if effective(pod, spec, "runAsNonRoot") != Some(&Value::Bool(true)) {
        return Ok(());
    }
    let (pod_d, container) = (pod_desc(pod), spec["name"].as_str().unwrap_or_default());
    if let Some(uid) = id_field(pod, spec, "runAsUser") {
        if uid == 0 {
            return Err(format!(
                "container's runAsUser breaks non-root policy (pod: {pod_d}, container: {container})"
            ));
        }
        return Ok(());
    }
    match image_user_view(image_user) {
        (None, name) => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root (pod: {pod_d}, container: {container})"
        )),
        (Some(0), _) => Err(format!(
            "container has runAsNonRoot and image will run as root (pod: {pod_d}, container: {container})"
        )),
        (Some(uid), _) if !(0..=i64::from(i32::MAX)).contains(&uid) => Err(format!(
            "container has runAsNonRoot and image has an invalid user id ({uid}). (Must be 1-({max})): must be between 0 and {max}, inclusive (pod: {pod_d}, container: {container})",
            max = i32::MAX
        )),
        _ => Ok(()),
    }
}

/// The image's user as its passwd and group files describe it.
struct ImageUser {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: Option<String>,
}

fn lookup_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(format!(
            "unable to find group {name}: no matching entries in group file"
        )),
    }
}

fn image_user(image_user: &str) -> Result<ImageUser, String> {
    let (user, group) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let mut u = if user.is_empty() {
        ImageUser {
            uid: 0,
            gid: 0,
            groups: vec![],
            home: None,
        }
    } else if let Ok(uid) = user.parse::<u32>() {
        ImageUser {
            uid,
            gid: 0,
            groups: vec![],
            home: None,
        }
    } else {
        let found = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| {
                format!("unable to find user {user}: no matching entries in passwd file")
            })?;
        let groups = std::ffi::CString::new(user)
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, found.gid).ok())
            .unwrap_or_default();
        ImageUser {
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
            groups: groups
                .into_iter()
                .map(|g| g.as_raw())
                .filter(|g| *g != found.gid.as_raw())
                .collect(),
            home: Some(found.dir.to_string_lossy().into_owned()),
        }
    };
    if let Some(g) = group.filter(|g| !g.is_empty()) {
        u.gid = lookup_group(g)?;
    }
    Ok(u)
}

/// The bounding set from `privileged` and `capabilities` (containerd's order: add `ALL`, drop
/// `ALL`, then each add, then each drop; names without `CAP_`). None: every capability.
fn capabilities(spec: &Value) -> Result<Option<Vec<&'static str>>, String> {
    let sc = &spec["securityContext"];
    if sc["privileged"] == true {
        return Ok(None);
    }
    let list = |k: &str| -> Vec<String> {
        sc["capabilities"][k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_ascii_uppercase)
            .collect()
    };
    let (add, drop) = (list("add"), list("drop"));
    let mut set: Vec<&'static str> = DEFAULT_CAPABILITIES.to_vec();
    if add.iter().any(|c| c == "ALL") {
        set = ALL_CAPABILITIES.to_vec();
    }
    if drop.iter().any(|c| c == "ALL") {
        set.clear();
    }
    let known = |c: &str| -> Result<&'static str, String> {
        ALL_CAPABILITIES
            .iter()
            .find(|k| **k == c)
            .copied()
            .ok_or_else(|| format!("invalid capability: CAP_{c}"))
    };
    for c in add.iter().filter(|c| *c != "ALL") {
        let c = known(c)?;
        if !set.contains(&c) {
            set.push(c);
        }
    }
    for c in drop.iter().filter(|c| *c != "ALL") {
        let c = known(c)?;
        set.retain(|x| *x != c);
    }
    set.sort_by_key(|c| ALL_CAPABILITIES.iter().position(|k| k == c));
    Ok(Some(set))
}

/// What a container runs as: the error is the runtime's (`CreateContainerError`), e.g. an
/// image user that is not in the passwd file or an unknown capability.
pub fn identity(pod: &Value, spec: &Value, image_user_str: &str) -> Result<Identity, String> {
    let image = image_user(image_user_str)?;
    let run_as_user = id_field(pod, spec, "runAsUser").map(|u| u as u32);
    let run_as_group = id_field(pod, spec, "runAsGroup").map(|g| g as u32);
    // A uid other than the image user's is not in the image's passwd: gid 0, no groups.
    let known = run_as_user.is_none_or(|u| u == image.uid);
    let uid = run_as_user.unwrap_or(image.uid);
    let gid = run_as_group.unwrap_or(if known { image.gid } else { 0 });
    let mut groups = vec![gid];
    if known {
        groups.extend(&image.groups);
    }
    let pod_sc = pod.pointer("/spec/securityContext");
    if let Some(fs) = pod_sc.and_then(|s| s["fsGroup"].as_i64()) {
        groups.push(fs as u32);
    }
    for g in pod_sc
        .and_then(|s| s["supplementalGroups"].as_array())
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
    {
        groups.push(g as u32);
    }
    let mut seen = std::collections::HashSet::new();
    groups.retain(|g| seen.insert(*g));
    let home = match (uid, known) {
        (0, _) => "/root".to_string(),
        (_, true) => image.home.unwrap_or_else(|| "/".into()),
        _ => "/".into(),
    };
    let sc = &spec["securityContext"];
    Ok(Identity {
        uid,
        gid,
        groups,
        capabilities: capabilities(spec).map_err(|e| {
            format!("failed to generate container spec: failed to set capabilities: {e}")
        })?,
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
        read_only_root: sc["readOnlyRootFilesystem"] == true,
        home,
    })
}

impl Identity {
    /// `setpriv` options (before `--`) that give a root process this identity: user, group,
    /// supplementary groups, no inheritable capabilities, the bounding set (which root's exec
    /// turns into its effective set; other users' execs have none), no_new_privs.
    pub fn setpriv_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--reuid".into(),
            self.uid.to_string(),
            "--regid".into(),
            self.gid.to_string(),
            "--groups".into(),
            self.groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            "--inh-caps".into(),
            "-all".into(),
        ];
        if let Some(caps) = &self.capabilities {
            let mut set = String::from("-all");
            for c in caps {
                set.push_str(",+");
                set.push_str(&c.to_ascii_lowercase());
            }
            a.extend(["--bounding-set".into(), set]);
        }
        if self.no_new_privs {
            a.push("--no-new-privs".into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(sc: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": {"securityContext": sc}})
    }

    #[test]
    fn root_images_get_the_runtimes_default_capabilities() {
        let id = identity(&pod(json!({})), &json!({"name": "c"}), "0").expect("identity");
        assert_eq!((id.uid, id.gid, id.groups.clone()), (0, 0, vec![0]));
        let caps = id.capabilities.expect("bounded");
        assert_eq!(caps.len(), 14);
        assert!(caps.contains(&"NET_BIND_SERVICE") && !caps.contains(&"SYS_ADMIN"));
        assert_eq!(id.home, "/root");
    }

    #[test]
    fn run_as_user_without_group_gets_gid_0_and_the_pods_groups() {
        let p = pod(
            json!({"runAsUser": 1000680000, "fsGroup": 1000680000, "supplementalGroups": [5, 5]}),
        );
        let id = identity(&p, &json!({"name": "c"}), "65532:65532").expect("identity");
        assert_eq!((id.uid, id.gid), (1000680000, 0));
        assert_eq!(id.groups, vec![0, 1000680000, 5]);
        assert_eq!(id.home, "/");
        // The image's own uid keeps the image's group.
        let p = pod(json!({"runAsUser": 65532}));
        let id = identity(&p, &json!({"name": "c"}), "65532:65532").expect("identity");
        assert_eq!((id.uid, id.gid), (65532, 65532));
    }

    #[test]
    fn capabilities_follow_containerds_add_and_drop_order() {
        let spec = |caps: Value| json!({"name": "c", "securityContext": {"capabilities": caps}});
        let caps = |s: Value| capabilities(&s).expect("valid").expect("bounded");
        assert!(caps(spec(json!({"drop": ["ALL"]}))).is_empty());
        assert_eq!(
            caps(spec(json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}))),
            vec!["NET_BIND_SERVICE"]
        );
        assert_eq!(
            caps(spec(json!({"add": ["NET_ADMIN"], "drop": ["NET_ADMIN"]}))).len(),
            14
        );
        assert_eq!(
            capabilities(&spec(json!({"add": ["CAP_NET_ADMIN"]}))),
            Err("invalid capability: CAP_CAP_NET_ADMIN".into())
        );
        let p = json!({"name": "c", "securityContext": {"privileged": true}});
        assert_eq!(capabilities(&p), Ok(None));
    }

    #[test]
    fn run_as_non_root_refusals_carry_the_kubelets_messages() {
        let spec = json!({"name": "agent", "securityContext": {"runAsNonRoot": true}});
        let p = pod(json!({}));
        assert_eq!(
            verify_run_as_non_root(&p, &spec, "0"),
            Err("container has runAsNonRoot and image will run as root (pod: \"p_ns(u-1)\", container: agent)".into())
        );
        assert_eq!(
            verify_run_as_non_root(&p, &spec, ""),
            Err("container has runAsNonRoot and image will run as root (pod: \"p_ns(u-1)\", container: agent)".into())
        );
        assert_eq!(
            verify_run_as_non_root(&p, &spec, "nobody:nogroup"),
            Err("container has runAsNonRoot and image has non-numeric user (nobody), cannot verify user is non-root (pod: \"p_ns(u-1)\", container: agent)".into())
        );
        assert_eq!(verify_run_as_non_root(&p, &spec, "65532:65532"), Ok(()));
        let p = pod(json!({"runAsUser": 0}));
        assert_eq!(
            verify_run_as_non_root(&p, &spec, "65532"),
            Err("container's runAsUser breaks non-root policy (pod: \"p_ns(u-1)\", container: agent)".into())
        );
        let p = pod(json!({"runAsUser": 1000}));
        assert_eq!(verify_run_as_non_root(&p, &spec, "nobody"), Ok(()));
        // Not asked for: anything goes.
        assert_eq!(
            verify_run_as_non_root(&p, &json!({"name": "c"}), "0"),
            Ok(())
        );
    }

    #[test]
    fn setpriv_args_apply_user_groups_capabilities_and_no_new_privs() {
        let spec = json!({"name": "c", "securityContext": {"allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "CHOWN"]}}});
        let id = identity(
            &pod(json!({"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000})),
            &spec,
            "0",
        )
        .expect("identity");
        assert_eq!(
            id.setpriv_args().join(" "),
            "--reuid 1000 --regid 3000 --groups 3000,2000 --inh-caps -all --bounding-set -all,+chown,+net_bind_service --no-new-privs"
        );
    }
}
