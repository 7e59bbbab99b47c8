//! Volumes and the files the kubelet puts into containers: the bind mounts of a container's
//! `volumeMounts` (`emptyDir`, `secret`, `configMap`, `projected`; `subPath`, `readOnly`), the
//! files of secret and configMap volumes, and termination message files (made per container
//! instance, read back into `state.terminated.message`). Modes and ownership are the real
//! kubelet's: emptyDir 0777, secret and configMap files with `defaultMode` / `mode` (0644), and
//! with the pod's `fsGroup` everything group-owned by it, directories setgid
//! (`SetVolumeOwnership`); termination message files 0666.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Value, json};

use crate::apiserver::store::Store;
use crate::json::str_at;

/// The termination message file: host file, container path, and a host directory to stage
/// the overlay in (see [`termination_mount_script`]).
pub(super) struct TermMount {
    pub(super) src: PathBuf,
    pub(super) dst: String,
    pub(super) stage: PathBuf,
}

/// A bind mount: host source, container path, read-only.
pub(super) struct Mount {
    pub(super) src: PathBuf,
    pub(super) dst: String,
    pub(super) read_only: bool,
}

pub(super) fn mounts_of(spec: &Value, pod: &Value, dir: &Path) -> Vec<Mount> {
    let volumes = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in spec["volumeMounts"].as_array().into_iter().flatten() {
        let name = str_at(m, "/name");
        let Some(vol) = volumes.iter().find(|v| v["name"] == name.as_str()) else {
            continue;
        };
        let mut src = dir.join("volumes").join(&name);
        let _ = std::fs::create_dir_all(&src);
        // The kubelet mounts these read-only whatever the volumeMount says.
        let api_data = vol.get("secret").is_some()
            || vol.get("configMap").is_some()
            || vol.get("projected").is_some();
        if api_data {
            // Contents are written by `write_volume_files` before each start.
        } else if vol.get("emptyDir").is_none() {
            tracing::warn!(
                "volume {name}: only emptyDir, secret and configMap volumes are supported; using an empty directory"
            );
        }
        if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
            let volume_mode = std::fs::metadata(&src).map(|m| m.permissions().mode() & 0o7777);
            src = src.join(sub);
            if !src.exists() {
                let _ = std::fs::create_dir_all(&src);
                // The kubelet makes a subPath with its volume's mode (SafeMakeDir).
                if let Ok(mode) = volume_mode {
                    set_mode(&src, mode);
                }
            }
        }
        out.push(Mount {
            src,
            dst: str_at(m, "/mountPath"),
            read_only: m["readOnly"] == true || api_data,
        });
    }
    out
}

/// The pod's `fsGroup`.
fn fs_group(pod: &Value) -> Option<u32> {
    pod.pointer("/spec/securityContext/fsGroup")
        .and_then(Value::as_i64)
        .map(|g| g as u32)
}

fn set_mode(path: &Path, mode: u32) {
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        tracing::warn!("chmod {mode:o} {}: {e}", path.display());
    }
}

/// What `SetVolumeOwnership` does to one file of a volume with an `fsGroup`: group-owned by
/// it, group read (and write unless the volume is read-only), directories also group search
/// and setgid, so that what is created in them belongs to the group too.
fn set_ownership(path: &Path, fs_group: u32, read_only: bool) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_symlink() {
        return;
    }
    if let Err(e) = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(fs_group))) {
        tracing::debug!("chown :{fs_group} {}: {e}", path.display());
    }
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2110;
    }
    set_mode(path, (meta.permissions().mode() & 0o7777) | mask);
}

/// Sets up a pod's directory volumes as the kubelet does before its containers start:
/// `emptyDir` (and the unsupported types that stand in as empty directories) mode 0777, with
/// the pod's `fsGroup` group-owned by it with the setgid bit.
pub fn setup_volumes(pod: &Value, dir: &Path) {
    for vol in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if ["secret", "configMap", "projected"]
            .iter()
            .any(|k| vol.get(*k).is_some())
        {
            continue;
        }
        let path = dir.join("volumes").join(str_at(vol, "/name"));
        if path.exists() {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(&path) {
            tracing::warn!("creating {}: {e}", path.display());
            continue;
        }
        set_mode(&path, 0o777);
        if let Some(g) = fs_group(pod) {
            set_ownership(&path, g, false);
        }
    }
}

/// A secret or configMap volume's file mode: the item's `mode`, else the source's
/// `defaultMode`, else 0644.
fn file_mode(item: Option<&Value>, default_mode: Option<u32>) -> u32 {
    item.and_then(|i| i["mode"].as_u64())
        .map(|m| m as u32)
        .or(default_mode)
        .unwrap_or(0o644)
        & 0o7777
}

/// Writes the files of secret and configMap volumes into the pod directory, with their modes
/// and the pod's `fsGroup`. The volume directory is like the kubelet's tmpfs (mode 1777).
pub fn write_volume_files(store: &Store, pod: &Value, dir: &Path) -> Result<(), String> {
    let ns = str_at(pod, "/metadata/namespace");
    let fs_group = fs_group(pod);
    for vol in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(vol, "/name");
        let target = dir.join("volumes").join(&name);
        let default_mode = ["secret", "configMap", "projected"]
            .iter()
            .find_map(|k| vol[*k]["defaultMode"].as_u64())
            .map(|m| m as u32);
        let sources: Vec<(&str, Value)> = if let Some(sv) = vol.get("secret") {
            vec![(
                "secrets",
                json!({"name": sv["secretName"], "items": sv["items"], "optional": sv["optional"]}),
            )]
        } else if let Some(cv) = vol.get("configMap") {
            vec![("configmaps", cv.clone())]
        } else if let Some(p) = vol.get("projected") {
            p["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|src| {
                    src.get("secret")
                        .map(|x| ("secrets", x.clone()))
                        .or_else(|| src.get("configMap").map(|x| ("configmaps", x.clone())))
                })
                .collect()
        } else {
            continue;
        };
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        set_mode(&target, 0o1777);
        if let Some(g) = fs_group {
            set_ownership(&target, g, true);
        }
        for (plural, src) in sources {
            let obj_name = src["name"].as_str().unwrap_or_default();
            let Some(obj) = store.get(&(String::new(), plural.into()), &ns, obj_name) else {
                if src["optional"] == true {
                    continue;
                }
                return Err(format!(
                    "MountVolume.SetUp failed for volume \"{name}\": {} \"{obj_name}\" not found",
                    plural.trim_end_matches('s')
                ));
            };
            let data = obj["data"].as_object().cloned().unwrap_or_default();
            let items: Vec<(String, String, u32)> = match src["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        let mode = file_mode(Some(i), default_mode);
                        (str_at(i, "/key"), str_at(i, "/path"), mode)
                    })
                    .collect(),
                None => data
                    .keys()
                    .map(|k| (k.clone(), k.clone(), file_mode(None, default_mode)))
                    .collect(),
            };
            for (k, path, mode) in items {
                let Some(raw) = data.get(&k).and_then(Value::as_str) else {
                    continue;
                };
                let bytes = if plural == "secrets" {
                    base64::engine::general_purpose::STANDARD
                        .decode(raw)
                        .map_err(|e| format!("secret {obj_name} key {k}: {e}"))?
                } else {
                    raw.as_bytes().to_vec()
                };
                let file = target.join(&path);
                if let Some(parent) = file.parent().filter(|p| !p.exists()) {
                    let _ = std::fs::create_dir_all(parent);
                    if let Some(g) = fs_group {
                        set_ownership(parent, g, true);
                    }
                }
                // Written aside and renamed, like the kubelet's atomic writer (the file before
                // may be read-only, and a reader never sees half a file).
                let tmp = file.with_file_name(format!(
                    ".{}.tmp",
                    file.file_name().unwrap_or_default().to_string_lossy()
                ));
                std::fs::write(&tmp, bytes)
                    .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
                set_mode(&tmp, mode);
                if let Some(g) = fs_group {
                    set_ownership(&tmp, g, true);
                }
                std::fs::rename(&tmp, &file)
                    .map_err(|e| format!("writing {}: {e}", file.display()))?;
            }
        }
    }
    Ok(())
}

/// A fresh, empty termination message file for a container instance (in the pod's state
/// directory), to be bind-mounted at its `terminationMessagePath`; None when it cannot be made.
pub(super) fn termination_file(pod_dir: &Path, name: &str, spec: &Value) -> Option<TermMount> {
    let dir = pod_dir.join("termination");
    let src = dir.join(name);
    // Writable by whatever user the container runs as, as the kubelet makes it (0666).
    let made = std::fs::create_dir_all(dir.join(format!("{name}.stage")))
        .and_then(|_| std::fs::write(&src, b""))
        .and_then(|_| std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o666)));
    match made {
        Ok(()) => Some(TermMount {
            dst: spec["terminationMessagePath"]
                .as_str()
                .filter(|p| !p.is_empty())
                .unwrap_or("/dev/termination-log")
                .to_string(),
            stage: dir.join(format!("{name}.stage")),
            src,
        }),
        Err(e) => {
            tracing::warn!("termination message file {}: {e}", src.display());
            None
        }
    }
}

/// The most of a termination message file the kubelet reads (its end), like the real one's.
pub const MAX_TERMINATION_MESSAGE: usize = 4096;
/// `FallbackToLogsOnError`: at most this many last lines of the log...
pub const FALLBACK_LOG_LINES: usize = 80;
/// ...and at most this many bytes of them.
pub const FALLBACK_LOG_BYTES: usize = 2048;

/// The last `max` bytes of a file (from a UTF-8 character boundary).
fn tail_bytes(path: &Path, max: usize) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    let mut start = data.len().saturating_sub(max);
    while start < data.len() && (data[start] & 0xC0) == 0x80 {
        start += 1;
    }
    Some(String::from_utf8_lossy(&data[start..]).into_owned())
}

/// A container's `state.terminated.message`, as the real kubelet makes it: the end of the
/// termination message file (at most 4096 bytes); with `FallbackToLogsOnError`, when that is
/// empty and the container failed, the end of its log (80 lines, at most 2048 bytes).
pub fn termination_message(
    file: Option<&Path>,
    policy: &str,
    exit_code: i32,
    log: &Path,
) -> Option<String> {
    if let Some(m) = file
        .and_then(|f| tail_bytes(f, MAX_TERMINATION_MESSAGE))
        .filter(|m| !m.is_empty())
    {
        return Some(m);
    }
    if policy != "FallbackToLogsOnError" || exit_code == 0 {
        return None;
    }
    let text = tail_bytes(log, FALLBACK_LOG_BYTES * 64)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let last = lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].concat();
    let mut start = last.len().saturating_sub(FALLBACK_LOG_BYTES);
    while !last.is_char_boundary(start) {
        start += 1;
    }
    Some(last[start..].to_string()).filter(|m| !m.is_empty())
}
