//! agentrun's own CRD (`crds/`) on the cluster, driven by the real kubectl: it installs, shows
//! its printer columns, and its schema and CEL rules reject bad AgentRuns naming the field.

mod common;

use common::Cluster;

fn agentrun(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: agentrun.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

/// The project's own CRD (`crds/`) installs, shows its printer columns, and its schema and CEL
/// rules reject bad AgentRuns with messages that name the field.
#[tokio::test(flavor = "multi_thread")]
async fn the_agentrun_crd_installs_and_validates() {
    let c = Cluster::start().await;
    let ns = c.namespace.clone();
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    c.kubectl_ok(&["apply", "-f", crds.to_str().expect("path")]);
    c.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/agentruns.agentrun.dev",
        "--timeout=30s",
    ]);
    let ok = c.write(
        "ok.yaml",
        &agentrun("hello", "  image: busybox:1.36\n  command: [sh, -c, 'echo hello']\n  variations:\n  - name: a\n  - name: b\n  parallelism: 2\n"),
    );
    c.kubectl_ok(&["apply", "-n", &ns, "-f", ok.to_str().expect("path")]);
    let header = c.kubectl_ok(&["get", "ar", "-n", &ns]);
    let cols: Vec<&str> = header
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        cols,
        ["NAME", "PHASE", "VARIATIONS", "AGE", "DURATION"],
        "{header}"
    );
    let wide = c.kubectl_ok(&["get", "ar", "-n", &ns, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap_or_default().contains("URL"),
        "priority 1 column in -o wide: {wide}"
    );

    let long_name = "a".repeat(43);
    let cases: Vec<(String, String, Vec<&str>)> = vec![
        (
            "no-command".into(),
            "  image: busybox\n".into(),
            vec!["spec.command: Required value"],
        ),
        (
            "bad-variation".into(),
            "  image: busybox\n  command: [x]\n  variations:\n  - name: Not_Valid\n".into(),
            vec!["spec.variations[0].name", "should match"],
        ),
        (
            "dup-variation".into(),
            "  image: busybox\n  command: [x]\n  variations:\n  - name: a\n  - name: a\n".into(),
            vec![
                "spec.variations",
                "each variation name may appear only once",
            ],
        ),
        (
            "too-parallel".into(),
            "  image: busybox\n  command: [x]\n  parallelism: 3\n".into(),
            vec!["parallelism must not exceed the number of variations"],
        ),
        (
            long_name.clone(),
            "  image: busybox\n  command: [x]\n".into(),
            vec!["metadata.name must be at most 42 characters"],
        ),
    ];
    for (name, spec, needles) in cases {
        let f = c.write("bad.yaml", &agentrun(&name, &spec));
        let out = c.kubectl(&["apply", "-n", &ns, "-f", f.to_str().expect("path")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        for n in needles {
            assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
        }
    }
    // Transition rule: the image cannot change after creation.
    let changed = c.write(
        "changed.yaml",
        &agentrun("hello", "  image: busybox:1.37\n  command: [sh, -c, 'echo hello']\n  variations:\n  - name: a\n  - name: b\n  parallelism: 2\n"),
    );
    let out = c.kubectl(&["apply", "-n", &ns, "-f", changed.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.image") && err.contains("immutable"),
        "{err}"
    );
}
