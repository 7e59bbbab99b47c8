//! The image map (`--images FILE`): which host executable an image stands for and the user it
//! runs as. A mapped image is a binary (the entrypoint, "pulled" into the state directory where
//! any user can run it, with the files it ships beside it) or a prefix put before the
//! container's command; an image not in the map runs the container's command on the host.
//! Images run as their `user` (default root, like most images).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The user of an image that declares none: root, like most images.
pub const DEFAULT_IMAGE_USER: &str = "0";

/// How an image maps to something runnable on the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageEntry {
    /// The image is one binary: it is the entrypoint, and replaces `command[0]` when the
    /// container sets `command`.
    Binary(String),
    /// `{binary: PATH}` (same as the plain string) or `{prefix: [..]}`: prepended to the
    /// container's command and args. `user` is the image's default user (its `USER`:
    /// `UID`, `UID:GID` or a name from the host's `/etc/passwd`, which stands in for the
    /// image's); `files` are shipped in the image next to `binary` (pulled with it).
    Spec {
        #[serde(default)]
        binary: Option<String>,
        #[serde(default)]
        prefix: Option<Vec<String>>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        files: Vec<String>,
    },
}

/// The `--images FILE` document: `images: {NAME: ENTRY}` with NAME an image without tag.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageMap {
    #[serde(default)]
    pub images: HashMap<String, ImageEntry>,
}

impl ImageMap {
    pub fn load(path: &Path) -> anyhow::Result<ImageMap> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading image map {}: {e}", path.display()))?;
        serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing image map {}: {e}", path.display()))
    }

    /// Image name without tag or digest, normalized like Docker Hub names.
    pub fn base_name(image: &str) -> String {
        let no_digest = image.split('@').next().unwrap_or(image);
        let (head, last) = match no_digest.rsplit_once('/') {
            Some((h, l)) => (Some(h), l),
            None => (None, no_digest),
        };
        let last = last.split(':').next().unwrap_or(last);
        let full = match head {
            Some(h) => format!("{h}/{last}"),
            None => last.to_string(),
        };
        full.strip_prefix("docker.io/library/")
            .or_else(|| full.strip_prefix("docker.io/"))
            .map(String::from)
            .unwrap_or(full)
    }

    pub(super) fn lookup(&self, image: &str) -> Option<&ImageEntry> {
        let base = Self::base_name(image);
        self.images.get(&base).or_else(|| {
            self.images
                .iter()
                .find(|(k, _)| Self::base_name(k) == base)
                .map(|(_, v)| v)
        })
    }

    /// The user an image runs as when the pod says nothing: its `user`, else root.
    pub(super) fn user(&self, image: &str) -> String {
        match self.lookup(image) {
            Some(ImageEntry::Spec { user: Some(u), .. }) => u.clone(),
            _ => DEFAULT_IMAGE_USER.to_string(),
        }
    }

    /// The host files of a binary image: its binary, then the files it ships beside it.
    pub(super) fn files(&self, image: &str) -> Option<Vec<&str>> {
        match self.lookup(image)? {
            ImageEntry::Binary(b) => Some(vec![b.as_str()]),
            ImageEntry::Spec {
                binary: Some(b),
                files,
                ..
            } => Some(
                std::iter::once(b.as_str())
                    .chain(files.iter().map(String::as_str))
                    .collect(),
            ),
            ImageEntry::Spec { .. } => None,
        }
    }

    /// What to run on the host for a container of `image`, when the image map says: its binary
    /// (`pulled`: where the pull put it, which replaces `command[0]`) or its prefix, followed by
    /// `command` and `args`. None when the image is not in the map or its entry names neither.
    pub(super) fn mapped_argv(
        &self,
        image: &str,
        pulled: Option<&Path>,
        command: &[String],
        args: &[String],
    ) -> Option<Vec<String>> {
        match self.lookup(image)? {
            ImageEntry::Binary(b)
            | ImageEntry::Spec {
                binary: Some(b), ..
            } => {
                let b = pulled.map_or_else(|| b.clone(), |p| p.to_string_lossy().into_owned());
                let mut v = vec![b];
                v.extend(command.iter().skip(1).cloned());
                v.extend(args.iter().cloned());
                Some(v)
            }
            ImageEntry::Spec {
                prefix: Some(p), ..
            } => {
                let mut v = p.clone();
                v.extend(command.iter().cloned());
                v.extend(args.iter().cloned());
                Some(v)
            }
            ImageEntry::Spec { .. } => None,
        }
    }
}

/// "Pulls" a binary image: its files go into `dir` (a directory of the state directory that
/// every user can search, as a container runtime's image store is to its containers), hard
/// linked when the source is readable and executable by everyone, else copied with mode 0755,
/// so that a container running as any user can execute them (build outputs often live under a
/// 0700 home directory). Returns the pulled binary (the first file).
pub(super) fn pull(files: &[&str], dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let mut pulled = Vec::new();
    for src in files {
        let src = Path::new(src);
        let name = src
            .file_name()
            .ok_or_else(|| format!("{}: not a file", src.display()))?;
        let dst = dir.join(name);
        let tmp = dir.join(format!(".{}.pulling", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        let mode = std::fs::metadata(src)
            .map_err(|e| format!("{}: {e}", src.display()))?
            .permissions()
            .mode();
        let linked = mode & 0o005 == 0o005 && std::fs::hard_link(src, &tmp).is_ok();
        if !linked {
            std::fs::copy(src, &tmp).map_err(|e| format!("copying {}: {e}", src.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        // A rename: a container still running the previous pull keeps its file.
        std::fs::rename(&tmp, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        pulled.push(dst);
    }
    pulled
        .into_iter()
        .next()
        .ok_or_else(|| "the image has no binary".into())
}

/// The directory name of a pulled image (its name without tag, `/` and `:` made `_`).
pub(super) fn pulled_dir_name(image: &str) -> String {
    ImageMap::base_name(image)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(
            ImageMap::base_name("ghcr.io/agentrun/sidecar:v1"),
            "ghcr.io/agentrun/sidecar"
        );
        assert_eq!(
            ImageMap::base_name("localhost:5000/x@sha256:abc"),
            "localhost:5000/x"
        );
        assert_eq!(
            ImageMap::base_name("docker.io/library/busybox:1.36"),
            "busybox"
        );
        assert_eq!(ImageMap::base_name("busybox"), "busybox");
    }
}
