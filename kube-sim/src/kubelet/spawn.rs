//! The host process of a container: its argv wrapped in `ip netns exec` (the pod's network
//! namespace) and `unshare --mount` with a shell script that bind-mounts the volumes and the
//! termination message file (an overlay where its directory must not change on the host),
//! remounts `/` read-only for `readOnlyRootFilesystem`, and finally execs the container's
//! command through `setpriv` with its user, groups, capabilities and no_new_privs (mounting
//! needs root, so that comes last); env, working directory, log file, own process group.

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::process::{Child, Command};

use super::network::NetNs;
use super::security::Identity;
use super::volumes::{Mount, TermMount};

/// The path of `setpriv`, which applies a container's identity.
pub(super) const SETPRIV: &str = "/usr/bin/setpriv";

/// What a container is isolated by: its own mount namespace (with a read-only root for
/// `readOnlyRootFilesystem`), the pod's network namespace, and the identity it runs as (None:
/// kube-sim's own, when it cannot change users).
pub(super) struct Isolation<'a> {
    pub(super) mount_ns: bool,
    pub(super) read_only_root: bool,
    pub(super) net: Option<&'a NetNs>,
    pub(super) identity: Option<&'a Identity>,
}

/// `setpriv OPTIONS --`: what goes before a command to run it as `identity`.
pub(super) fn setpriv_prefix(identity: &Identity) -> Vec<String> {
    let mut v = vec![SETPRIV.to_string()];
    v.extend(identity.setpriv_args());
    v.push("--".into());
    v
}

pub(super) fn spawn(
    argv: &[String],
    env: &[(String, String)],
    spec: &Value,
    (mounts, term): (&[Mount], Option<&TermMount>),
    log: &Path,
    iso: &Isolation<'_>,
) -> Result<Child, String> {
    let (mount_ns, net) = (iso.mount_ns, iso.net);
    if argv.is_empty() {
        return Err("empty command".into());
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening log {}: {e}", log.display()))?;
    let err_file = file.try_clone().map_err(|e| format!("log file: {e}"))?;
    let workdir = spec["workingDir"].as_str().filter(|w| !w.is_empty());
    let mut full: Vec<String> = Vec::new();
    if let Some(n) = net {
        full.extend(["ip".into(), "netns".into(), "exec".into(), n.name.clone()]);
    }
    if mount_ns {
        let mut script = String::new();
        // The termination message file goes first, unless it is inside a volume.
        let in_volume = term.is_some_and(|t| {
            mounts.iter().any(|m| {
                Path::new(&t.dst).starts_with(&m.dst) && Path::new(&t.dst) != Path::new(&m.dst)
            })
        });
        // A host where this cannot be mounted (e.g. no overlayfs) runs the container without
        // the file: its termination message is then empty (or taken from the log).
        let term_script = |t: &TermMount| {
            let steps = if in_volume {
                let d = shell_quote(&t.dst);
                let src = shell_quote(&t.src.to_string_lossy());
                format!("touch {d} && mount --bind {src} {d} && ")
            } else {
                termination_mount_script(&t.src, &t.dst, &t.stage)
            };
            format!("{{ {{ {steps}true; }} 2>/dev/null || true; }} && ")
        };
        if let Some(t) = term.filter(|_| !in_volume) {
            script.push_str(&term_script(t));
        }
        for m in mounts {
            let (src, dst) = (shell_quote(&m.src.to_string_lossy()), shell_quote(&m.dst));
            script.push_str(&format!("mkdir -p {dst} && mount --bind {src} {dst} && "));
            if m.read_only {
                script.push_str(&format!("mount -o remount,bind,ro {dst} && "));
            }
        }
        if let Some(t) = term.filter(|_| in_volume) {
            script.push_str(&term_script(t));
        }
        if let Some(w) = workdir {
            script.push_str(&format!("mkdir -p {q} && cd {q} && ", q = shell_quote(w)));
        }
        // The root filesystem of this namespace only; volumes and the termination message
        // file are mounts of their own and stay writable (the host's mounts below `/`, such
        // as `/dev` and `/proc`, do too, as a runtime's are).
        if iso.read_only_root {
            script.push_str("mount -o remount,bind,ro / && ");
        }
        // A runtime's umask (runc's default).
        script.push_str("umask 0022 && exec ");
        if let Some(id) = iso.identity {
            let prefix = setpriv_prefix(id);
            script.push_str(
                &prefix
                    .iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            script.push(' ');
        }
        script.push_str("\"$@\"");
        full.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                &script,
                "sh",
            ]
            .iter()
            .map(|x| x.to_string()),
        );
    }
    if let Some(id) = iso.identity.filter(|_| !mount_ns) {
        full.extend(setpriv_prefix(id));
    }
    full.extend(argv.iter().cloned());
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err_file))
        .process_group(0)
        .kill_on_drop(true);
    if !mount_ns {
        match workdir {
            Some(w) if Path::new(w).is_dir() => {
                cmd.current_dir(w);
            }
            _ => {
                cmd.current_dir("/");
            }
        }
    } else {
        cmd.current_dir("/");
    }
    cmd.spawn()
        .map_err(|e| format!("starting {:?}: {e}", argv[0]))
}

/// Shell steps that bind-mount the host file `src` at `dst` in the container's mount
/// namespace. When `dst` does not exist its directory gets an overlay in the namespace (upper
/// layer on a tmpfs at `stage`, the host's mounts below it moved over), so creating the mount
/// target leaves nothing on the host, not even in `/dev`.
fn termination_mount_script(src: &Path, dst: &str, stage: &Path) -> String {
    let q = |s: &str| shell_quote(s);
    let (srcq, dstq) = (q(&src.to_string_lossy()), q(dst));
    let dst_path = Path::new(dst);
    let parent = dst_path.parent().map(|p| p.to_string_lossy().into_owned());
    match parent {
        _ if dst_path.is_file() => format!("mount --bind {srcq} {dstq} && "),
        Some(dir) if Path::new(&dir).is_dir() && dir != "/" => {
            let st = |sub: &str| q(&stage.join(sub).to_string_lossy());
            let options = format!(
                "lowerdir={dir},upperdir={},workdir={}",
                stage.join("upper").to_string_lossy(),
                stage.join("work").to_string_lossy()
            );
            let mut script = format!(
                "mount -t tmpfs kube-sim {s} && mkdir -p {u} {w} {m} && mount -t overlay overlay -o {o} {m} && ",
                s = q(&stage.to_string_lossy()),
                u = st("upper"),
                w = st("work"),
                m = st("merged"),
                o = q(&options),
            );
            for sub in submounts(&dir) {
                let rel = sub[dir.trim_end_matches('/').len() + 1..].to_string();
                script.push_str(&format!(
                    "mount --rbind {} {} && ",
                    q(&sub),
                    q(&stage.join("merged").join(rel).to_string_lossy())
                ));
            }
            script.push_str(&format!(
                "mount --move {} {} && touch {dstq} && mount --bind {srcq} {dstq} && ",
                st("merged"),
                q(&dir)
            ));
            script
        }
        // No such directory on the host: it is made there (left behind, like volume targets).
        _ => format!(
            "mkdir -p \"$(dirname {dstq})\" && touch {dstq} && mount --bind {srcq} {dstq} && "
        ),
    }
}

/// Mount points below `dir` on the host (the top-most ones), from `/proc/self/mountinfo`.
fn submounts(dir: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort();
    points.dedup();
    let all = points.clone();
    points.retain(|p| {
        !all.iter()
            .any(|q| q != p && p.starts_with(&format!("{q}/")))
    });
    points
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
