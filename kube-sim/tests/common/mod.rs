//! Shared helpers of kube-sim's tests: the cluster, kubectl and deadline helpers of
//! `kube_sim::testing`, and this crate's fixtures.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

pub mod pods;

pub use kube_sim::testing::{Cluster, eventually, kubectl_bin};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}
