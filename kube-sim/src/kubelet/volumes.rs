//! Volumes and the files the kubelet puts into containers: the bind mounts of a container's
//! `volumeMounts` (`emptyDir`, `secret`, `configMap`, `projected`; `subPath`, `readOnly`), the
//! files of secret and configMap volumes, and termination message files (made per container
//! instance, read back into `state.terminated.message`).

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
        if vol.get("secret").is_some()
            || vol.get("configMap").is_some()
            || vol.get("projected").is_some()
        {
            // Contents are written by `write_volume_files` before each start.
        } else if vol.get("emptyDir").is_none() {
            tracing::warn!(
                "volume {name}: only emptyDir, secret and configMap volumes are supported; using an empty directory"
            );
        }
        if let Some(sub) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
            src = src.join(sub);
            let _ = std::fs::create_dir_all(&src);
        }
        out.push(Mount {
            src,
            dst: str_at(m, "/mountPath"),
            read_only: m["readOnly"] == true,
        });
    }
    out
}

/// Writes the files of secret and configMap volumes into the pod directory.
pub fn write_volume_files(store: &Store, pod: &Value, dir: &Path) -> Result<(), String> {
    let ns = str_at(pod, "/metadata/namespace");
    for vol in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = str_at(vol, "/name");
        let target = dir.join("volumes").join(&name);
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
            let items: Vec<(String, String)> = match src["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| (str_at(i, "/key"), str_at(i, "/path")))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (k, path) in items {
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
                if let Some(parent) = file.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                std::fs::write(&file, bytes)
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
    let made = std::fs::create_dir_all(dir.join(format!("{name}.stage")))
        .and_then(|_| std::fs::write(&src, b""));
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
