//! The image map (`--images FILE`): which host executable an image stands for. kube-sim pulls
//! no images; a mapped image is a binary (the entrypoint) or a prefix put before the
//! container's command, and an image not in the map runs the container's command on the host.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

/// How an image maps to something runnable on the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageEntry {
    /// The image is one binary: it is the entrypoint, and replaces `command[0]` when the
    /// container sets `command`.
    Binary(String),
    /// `{binary: PATH}` (same as the plain string) or `{prefix: [..]}`: prepended to the
    /// container's command and args.
    Spec {
        #[serde(default)]
        binary: Option<String>,
        #[serde(default)]
        prefix: Option<Vec<String>>,
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

    /// What to run on the host for a container of `image`, when the image map says: its binary
    /// (which replaces `command[0]`) or its prefix, followed by `command` and `args`. None when
    /// the image is not in the map or its entry names neither.
    pub(super) fn mapped_argv(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
    ) -> Option<Vec<String>> {
        match self.lookup(image)? {
            ImageEntry::Binary(b)
            | ImageEntry::Spec {
                binary: Some(b), ..
            } => {
                let mut v = vec![b.clone()];
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
