//! Shared helpers of the e2e suite: the cluster (kube-sim in-process, or the real cluster
//! named by `E2E_KUBECONFIG`) and deadlines come from `kube_sim::testing`; the agentrun stack
//! is in `stack.rs`, the browser driver in `browser.rs`.

#![allow(unused_imports)]

pub use kube_sim::testing::{Cluster, eventually};
