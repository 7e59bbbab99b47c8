//! The committed manifests agree with the Rust types: `manifests/install.yaml` carries the
//! current CRD, and every example AgentRun parses and passes the CRD's CEL rules.

use std::path::{Path, PathBuf};

use agentrun_operator::crd::AgentRun;
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn docs(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn install_yaml_carries_the_current_crd() {
    let install = docs(&root().join("manifests/install.yaml"));
    let crd = install
        .iter()
        .find(|d| d["kind"] == "CustomResourceDefinition")
        .expect("install.yaml has the CRD");
    let current = serde_json::to_value(AgentRun::crd()).expect("json");
    assert!(
        *crd == current,
        "manifests/install.yaml has an old CRD: run scripts/check-chart.sh --update"
    );
    let kinds: Vec<&str> = install.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["Deployment", "StatefulSet", "ClusterRole", "Service"] {
        assert!(
            kinds.contains(&kind),
            "install.yaml lacks a {kind}: {kinds:?}"
        );
    }
}

/// Whether one of the RBAC `rules` allows `verb` on `resource` (`pods`, `agentruns/status`).
fn allows(rules: &Value, group: &str, resource: &str, verb: &str) -> bool {
    let has = |list: &Value, want: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
    };
    rules.as_array().into_iter().flatten().any(|r| {
        has(&r["apiGroups"], group) && has(&r["resources"], resource) && has(&r["verbs"], verb)
    })
}

#[test]
fn the_charts_rbac_grants_everything_the_start_up_check_asks_for() {
    use agentrun_operator::preflight::{Scope, required_permissions};
    let install = docs(&root().join("manifests/install.yaml"));
    let rules = |kind: &str, name: &str| {
        install
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("install.yaml has {kind} {name}"))["rules"]
            .clone()
    };
    let cluster = rules("ClusterRole", "agentrun-operator");
    let lease = rules("Role", "agentrun-operator-leader");
    let review = rules("ClusterRole", "agentrun-operator-self-review");
    assert!(allows(
        &review,
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "create"
    ));
    for p in required_permissions(&Scope::Cluster, Some("agentrun")) {
        let resource = match p.subresource {
            Some(sub) => format!("{}/{sub}", p.resource),
            None => p.resource.to_string(),
        };
        let granted = if p.resource == "leases" {
            &lease
        } else {
            &cluster
        };
        assert!(
            allows(granted, p.group, &resource, p.verb),
            "the chart does not grant what the operator checks at start-up: {p}"
        );
    }
}

#[test]
fn every_example_is_a_valid_agentrun() {
    let crd = serde_json::to_value(AgentRun::crd()).expect("json");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let dir = root().join("manifests/examples");
    let mut names = vec![];
    for entry in std::fs::read_dir(&dir).expect("examples folder") {
        let path = entry.expect("entry").path();
        for doc in docs(&path) {
            let run: AgentRun = serde_json::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{} is not an AgentRun: {e}", path.display()));
            if let Err(errors) = Validator::new().validate(schema, &doc, None) {
                panic!("{} breaks a CEL rule: {errors:?}", path.display());
            }
            names.push(run.metadata.name.unwrap_or_default());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "failing",
            "hello",
            "hello-restricted",
            "hello-variations",
            "markdown-streamer",
            "timeout"
        ]
    );
}
