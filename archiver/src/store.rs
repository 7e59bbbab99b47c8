//! Where archives are kept: an [`ObjectStore`] and a root folder in it, from one URL.
//!
//! - a path or `file:///path`: a folder on the local filesystem (created if missing);
//! - `s3://BUCKET/PREFIX`: Amazon S3 or an S3-compatible server, configured from the usual
//!   `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_REGION`, `AWS_ENDPOINT_URL` for other servers, `AWS_ALLOW_HTTP=true` for plain
//!   HTTP, or a web identity / instance profile);
//! - `gs://BUCKET/PREFIX`: Google Cloud Storage (`GOOGLE_SERVICE_ACCOUNT`,
//!   `GOOGLE_APPLICATION_CREDENTIALS` or workload identity);
//! - `az://CONTAINER/PREFIX` (also `azure://`, `abfs://`, `abfss://`): Azure Blob Storage
//!   (`AZURE_STORAGE_ACCOUNT_NAME` with `AZURE_STORAGE_ACCOUNT_KEY`, a SAS or workload
//!   identity).
//!
//! Every store used for archives must support create-only puts (`PutMode::Create`): the
//! manifest is written that way, which is what keeps one archive per run when two archivers
//! race. The local filesystem, S3 (`If-None-Match`), GCS and Azure all do.

use crate::error::ArchiveError;
use crate::format::{Manifest, manifest_path};
use agentrun_protocol::RunId;
use object_store::local::LocalFileSystem;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreScheme};
use std::path::PathBuf;
use std::sync::Arc;

/// An object store and the folder in it that holds the archives.
#[derive(Clone, Debug)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// The folder on disk, for a local store (its upload staging files are not listed, so
    /// they are removed through the filesystem).
    local_root: Option<PathBuf>,
    url: String,
}

impl ArchiveStore {
    /// Opens the store a URL names (see the module documentation).
    pub fn from_url(url: &str) -> Result<Self, ArchiveError> {
        let err = |reason: String| ArchiveError::StoreUrl {
            url: url.to_owned(),
            reason,
        };
        if !url.contains("://") {
            return Self::local(PathBuf::from(url), url);
        }
        let parsed = url::Url::parse(url).map_err(|e| err(e.to_string()))?;
        let (scheme, root) = ObjectStoreScheme::parse(&parsed).map_err(|e| {
            err(format!(
                "{e}; use a path, file:///PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
            ))
        })?;
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                return Self::local(PathBuf::from(parsed.path()), url);
            }
            ObjectStoreScheme::AmazonS3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| err(format!("{e}; check the AWS_* environment variables")))?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| err(format!("{e}; check the GOOGLE_* environment variables")))?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| err(format!("{e}; check the AZURE_* environment variables")))?,
            ),
            other => {
                return Err(err(format!(
                    "{other:?} stores are not supported for archives; use a path, s3://, gs:// or az://"
                )));
            }
        };
        Ok(Self {
            store,
            root,
            local_root: None,
            url: url.to_owned(),
        })
    }

    fn local(dir: PathBuf, url: &str) -> Result<Self, ArchiveError> {
        let err = |reason: String| ArchiveError::StoreUrl {
            url: url.to_owned(),
            reason,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(format!("cannot create the folder {}: {e}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| err(format!("cannot resolve {}: {e}", dir.display())))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| err(e.to_string()))?
            .with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(store),
            root: Path::default(),
            local_root: Some(dir),
            url: url.to_owned(),
        })
    }

    /// A store over an existing [`ObjectStore`] (tests, or callers that build their own).
    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> Self {
        Self {
            url: format!("{store}/{root}"),
            store,
            root,
            local_root: None,
        }
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Whether listing returns names in lexical order (S3, GCS and Azure do; a folder on disk
    /// does not).
    pub fn lists_in_order(&self) -> bool {
        self.local_root.is_none()
    }

    /// The URL it was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object at `relative` (`/`-separated, under the root).
    pub fn path(&self, relative: &str) -> Path {
        Path::from_iter(
            self.root.parts().chain(
                relative
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .map(PathPart::from),
            ),
        )
    }

    /// The folder on disk of `relative`, for a local store.
    pub(crate) fn local_dir(&self, relative: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|r| r.join(relative))
    }

    /// Removes what an abandoned upload left on a local disk under `relative` (a folder).
    pub(crate) async fn remove_local_dir(&self, relative: &str) {
        if let Some(root) = &self.local_root {
            let _ = tokio::fs::remove_dir_all(root.join(relative)).await;
        }
    }
}

/// Reads the manifest of a run's archive, if it has one.
pub async fn read_manifest(
    store: &ArchiveStore,
    run: &RunId,
) -> Result<Option<Manifest>, ArchiveError> {
    match store
        .object_store()
        .get(&store.path(&manifest_path(run)))
        .await
    {
        Ok(got) => {
            let bytes = got.bytes().await?;
            let manifest: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| ArchiveError::Corrupt(format!("manifest of {run}: {e}")))?;
            Ok(Some(manifest))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_path_is_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::from_url(dir.path().to_str().unwrap()).unwrap();
        assert!(store.local_root.is_some());
        assert_eq!(
            store.path("runs/a/manifest.json").as_ref(),
            "runs/a/manifest.json"
        );
        let url = format!("file://{}", dir.path().join("sub").display());
        assert!(ArchiveStore::from_url(&url).unwrap().local_root.is_some());
    }

    #[test]
    fn cloud_urls_keep_their_prefix() {
        let store = ArchiveStore::from_url("s3://bucket/some/prefix").unwrap();
        assert_eq!(
            store.path("runs/r/manifest.json").as_ref(),
            "some/prefix/runs/r/manifest.json"
        );
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_choices() {
        let err = ArchiveStore::from_url("ftp://host/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://"), "{err}");
    }
}
