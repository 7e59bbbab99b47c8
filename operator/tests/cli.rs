//! The binary: `crd` prints what `crds/` holds, and every environment variable that the
//! install manifests give the operator is one its CLI reads.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn operator(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agentrun-operator"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs agentrun-operator");
    assert!(
        out.status.success(),
        "agentrun-operator {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The operator's container in manifests/install.yaml (the chart rendered).
fn operator_container() -> Value {
    let install = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install.yaml"),
    )
    .expect("install.yaml");
    let deployment: Value = serde_yaml::Deserializer::from_str(&install)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .find(|d: &Value| d["kind"] == "Deployment" && d["metadata"]["name"] == "agentrun-operator")
        .expect("the operator Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0].clone()
}

#[test]
fn crd_subcommand_prints_the_committed_crd() {
    let printed = operator(&["crd"]);
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/agentrun.dev_agentruns.yaml"),
    )
    .expect("crds/ file");
    assert!(
        printed == committed,
        "crds/agentrun.dev_agentruns.yaml differs from `agentrun-operator crd`"
    );
}

#[test]
fn the_default_sidecar_image_is_the_one_the_chart_installs() {
    let help = operator(&["run", "--help"]);
    let image = operator_container()["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "AGENTRUN_SIDECAR_IMAGE")
        .and_then(|e| e["value"].as_str())
        .expect("AGENTRUN_SIDECAR_IMAGE")
        .to_string();
    assert_eq!(image, agentrun_operator::config::DEFAULT_SIDECAR_IMAGE);
    assert!(
        help.contains(&format!("[default: {image}]")),
        "`agentrun-operator run --help` shows the default --sidecar-image {image}"
    );
}

#[test]
fn the_operator_deployment_only_sets_variables_the_cli_reads() {
    let help = operator(&["run", "--help"]);
    let container = &operator_container();
    assert_eq!(container["args"], serde_json::json!(["run"]));
    let names: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            help.contains(&format!("env: {name}=")) || help.contains(&format!("env: {name}]")),
            "the chart sets {name}, which `agentrun-operator run` does not read"
        );
    }
}
