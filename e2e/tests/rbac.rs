//! The operator under the Helm chart's least-privilege RBAC: the chart's ServiceAccounts,
//! (Cluster)Roles and bindings (rendered by the real `helm template`) are applied to kube-sim,
//! which enforces RBAC for requests with a token; the real operator runs with a kubeconfig
//! holding its ServiceAccount's token. A run must succeed with no request refused, and with one
//! rule taken out of the ClusterRole the operator must be refused and the run must not finish.
//!
//! The relay in `--auth kubernetes` mode likewise runs with its ServiceAccount's token under the
//! chart's ClusterRole (TokenReview, SubjectAccessReview), and users see and control runs by
//! Roles on AgentRuns; without the SubjectAccessReview grant it answers 503.

mod common;
#[path = "common/stack.rs"]
mod stack;

use serde::Deserialize as _;
use serde_json::Value;
use stack::{OperatorOptions, RelayOptions, Stack, StackOptions, workspace};

/// The release namespace the chart is rendered for (the operator's Lease lives here).
const RELEASE_NS: &str = "agentrun-system";
const OPERATOR_TOKEN: &str = "agentrun-operator-sa-token";
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "Role",
    "ClusterRoleBinding",
    "RoleBinding",
];

/// The chart's RBAC objects, rendered by `helm template` for release `agentrun` in
/// [`RELEASE_NS`] with further helm arguments `args` (e.g. `--set relay.auth.mode=kubernetes`).
fn chart_rbac(args: &[&str]) -> Vec<Value> {
    let rendered = stack::helm_template("agentrun", RELEASE_NS, args);
    serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| RBAC_KINDS.iter().any(|k| v["kind"] == *k))
        .collect()
}

fn is_component(doc: &Value, component: &str) -> bool {
    doc.pointer("/metadata/labels/app.kubernetes.io~1component") == Some(&component.into())
}

fn is_operators(doc: &Value) -> bool {
    is_component(doc, "operator")
}

/// The operator's ServiceAccount as an API user: `system:serviceaccount:NS:NAME`.
fn operator_user(docs: &[Value]) -> String {
    service_account_user(docs, "operator")
}

/// The ServiceAccount of a component of the chart as an API user.
fn service_account_user(docs: &[Value], component: &str) -> String {
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount" && is_component(d, component))
        .unwrap_or_else(|| panic!("the chart has the {component}'s ServiceAccount"));
    format!(
        "system:serviceaccount:{RELEASE_NS}:{}",
        sa["metadata"]["name"].as_str().expect("name")
    )
}

/// Stands for the scenario's namespace in `--set operator.watchNamespace=...` (it is known
/// only once the stack runs).
const WATCHED: &str = "agentrun-watched-namespace";

/// kube-sim (with the operator's token in its auth config), Redis and the relay; the chart's
/// RBAC applied by the admin; the operator started with its ServiceAccount's kubeconfig.
async fn stack_under_chart_rbac(docs: &[Value], lease: bool) -> Stack {
    stack_under_chart_rbac_with_users(docs, lease, &[]).await
}

/// [`stack_under_chart_rbac`] with more users (token, user name) in kube-sim's auth config.
async fn stack_under_chart_rbac_with_users(
    docs: &[Value],
    lease: bool,
    users: &[(&str, &str)],
) -> Stack {
    stack_under_chart_rbac_with(docs, lease, users, true).await
}

/// [`stack_under_chart_rbac_with_users`]; with `ready` false the operator is only started, not
/// waited for (it may refuse to start).
async fn stack_under_chart_rbac_with(
    docs: &[Value],
    lease: bool,
    users: &[(&str, &str)],
    ready: bool,
) -> Stack {
    let user = operator_user(docs);
    let mut config = format!("users:\n- {{token: {OPERATOR_TOKEN}, username: \"{user}\"}}\n");
    for (token, name) in users {
        config.push_str(&format!("- {{token: {token}, username: \"{name}\"}}\n"));
    }
    let auth: kube_sim::AuthConfig = serde_yaml::from_str(&config).expect("auth config");
    let mut s = Stack::start_with(StackOptions {
        auth,
        no_operator: true,
        ..Default::default()
    })
    .await;
    let mut yaml =
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {RELEASE_NS}\n---\n");
    for d in docs {
        yaml.push_str(&serde_yaml::to_string(d).expect("yaml"));
        yaml.push_str("---\n");
    }
    // A chart rendered with `operator.watchNamespace=WATCHED` watches the scenario's namespace.
    let watch_namespace = yaml.contains(WATCHED).then(|| s.ns().to_string());
    let yaml = yaml.replace(WATCHED, s.ns());
    let file = s.dir.path().join("chart-rbac.yaml");
    std::fs::write(&file, yaml).expect("write RBAC");
    let applied = s
        .cluster
        .kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(
        applied.contains("clusterrole.rbac.authorization.k8s.io/agentrun-operator created"),
        "{applied}"
    );
    let kubeconfig = write_kubeconfig(&s, "operator", &user, OPERATOR_TOKEN);
    let options = OperatorOptions {
        kubeconfig: Some(kubeconfig),
        lease_namespace: lease.then(|| RELEASE_NS.to_string()),
        watch_namespace,
        ..Default::default()
    };
    if ready {
        s.start_operator_with(options).await;
    } else {
        s.spawn_operator_with(options);
    }
    s
}

/// Writes `NAME.kubeconfig` for kube-sim's `user` with `token`; returns its path.
fn write_kubeconfig(s: &Stack, name: &str, user: &str, token: &str) -> std::path::PathBuf {
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    let path = s.dir.path().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, sim.kubeconfig_with_token(user, token)).expect("write kubeconfig");
    path
}

/// Whether the scenarios run on the cluster of `E2E_KUBECONFIG`, where the tokens these
/// scenarios use (from kube-sim's auth config) do not exist; says so when they do.
fn on_a_real_cluster() -> bool {
    let real = std::env::var("E2E_KUBECONFIG").is_ok_and(|k| !k.is_empty());
    if real {
        eprintln!("the tokens come from kube-sim's auth config; nothing to test here");
    }
    real
}

fn operator_log(s: &Stack) -> String {
    let op = s.operator.as_ref().expect("operator");
    std::fs::read_to_string(&op.log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_under_the_charts_rbac_runs_hello_with_nothing_forbidden() {
    if on_a_real_cluster() {
        return;
    }
    let docs = chart_rbac(&[]);
    let user = operator_user(&docs);
    // Leader election on too: the chart's Role grants the Lease.
    let s = stack_under_chart_rbac(&docs, true).await;
    s.apply_example("manifests/examples/hello.yaml");
    let run_id = s.run_id("hello").await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let sse = s.sse(&run_id, 20).await;
    let out = String::from_utf8_lossy(&sse.output()["default"]).into_owned();
    assert!(out.starts_with("Hello from agentrun:"), "{out:?}");

    // The operator holds its Lease in the release namespace.
    let lease = s.cluster.kubectl_ok(&[
        "get",
        "lease",
        "agentrun-operator",
        "-n",
        RELEASE_NS,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert!(!lease.trim().is_empty(), "the Lease has a holder");

    // Deleting the run: the operator cleans up and removes its finalizer.
    s.kubectl_ok(&["delete", "ar", "hello", "--wait=false"]);
    s.eventually(30, "the AgentRun is gone", || async {
        s.agentrun("hello").await.is_none().then_some(())
    })
    .await;

    // A timeout (the operator deletes the agent's pod) and the TTL after it (the operator
    // deletes the AgentRun) work under the chart's RBAC too.
    s.apply_yaml(
        "short.yaml",
        "apiVersion: agentrun.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: short\nspec:\n  image: busybox:1.36\n  command: [sh, -c]\n  args: ['while true; do echo working; sleep 0.2; done']\n  timeoutSeconds: 2\n  ttlSecondsAfterFinished: 3\n",
    );
    let timed_out = s
        .wait_phase("short", &["Succeeded", "Failed", "Stopped"], 30)
        .await;
    assert_eq!(
        timed_out["status"]["variations"][0]["reason"], "Timeout",
        "{timed_out:#}"
    );
    s.eventually(30, "the TTL deletes the timed-out run", || async {
        s.agentrun("short").await.is_none().then_some(())
    })
    .await;

    // Nothing the operator asked for was refused.
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    assert_eq!(sim.denials.all(), Vec::<String>::new(), "requests refused");
    let log = operator_log(&s);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator ({user}) was refused something:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_watching_one_namespace_under_the_charts_rbac_runs_only_there() {
    if on_a_real_cluster() {
        return;
    }
    let docs = chart_rbac(&["--set", &format!("operator.watchNamespace={WATCHED}")]);
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "RoleBinding" && is_operators(d)),
        "watchNamespace binds the operator's role in one namespace: {docs:#?}"
    );
    let s = stack_under_chart_rbac(&docs, true).await;
    // A run in another namespace, which this operator must leave alone.
    let other = format!("{}-other", s.ns());
    let file = s.dir.path().join("other-namespace.yaml");
    std::fs::write(
        &file,
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {other}\n"),
    )
    .expect("write namespace");
    s.cluster
        .kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    let hello = workspace().join("manifests/examples/hello.yaml");
    s.cluster
        .kubectl_ok(&["apply", "-n", &other, "-f", hello.to_str().expect("utf-8")]);
    s.apply_example("manifests/examples/hello.yaml");
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 60)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let elsewhere: Value = serde_json::from_str(
        &s.cluster
            .kubectl_ok(&["get", "agentrun", "hello", "-n", &other, "-o", "json"]),
    )
    .expect("json");
    assert!(
        elsewhere["status"].is_null() && elsewhere["metadata"]["finalizers"].is_null(),
        "a run outside the watched namespace is not touched: {elsewhere:#}"
    );
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    let refused = sim.denials.all();
    assert!(
        refused.is_empty(),
        "nothing the operator asked was refused: {refused:#?}"
    );
    let log = operator_log(&s);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_missing_one_chart_rule_refuses_to_start_and_names_it() {
    if on_a_real_cluster() {
        return;
    }
    let mut docs = chart_rbac(&[]);
    // Take `patch` on agentruns/status out of the operator's ClusterRole.
    let role = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterRole" && is_operators(d))
        .expect("the operator's ClusterRole");
    let mut removed = 0;
    for rule in role["rules"].as_array_mut().expect("rules") {
        let status = rule["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == "agentruns/status"));
        if let (true, Some(verbs)) = (status, rule["verbs"].as_array_mut()) {
            let before = verbs.len();
            verbs.retain(|v| v != "patch");
            removed += before - verbs.len();
        }
    }
    assert_eq!(
        removed, 1,
        "the chart grants patch on agentruns/status once: {role:#}"
    );
    let mut s = stack_under_chart_rbac_with(&docs, false, &[], false).await;
    let op = s.operator.as_mut().expect("operator");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = op.child.try_wait().expect("the operator's status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the operator still runs after 60s without a permission it needs:\n{}",
            operator_log(&s)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "the operator exits non-zero");
    let log = operator_log(&s);
    assert!(
        log.contains("patch agentruns.agentrun.dev/status"),
        "the operator names the missing permission:\n{log}"
    );
    for granted in ["create pods", "watch agentruns"] {
        assert!(
            !log.contains(granted),
            "only what is missing is named, not {granted:?}:\n{log}"
        );
    }
}

const RELAY_TOKEN: &str = "agentrun-relay-sa-token";
const ALICE_TOKEN: &str = "alice-token";
const BOB_TOKEN: &str = "bob-token";
const CAROL_TOKEN: &str = "carol-token";

/// A Role `role` with `verbs` on the namespace's AgentRuns, bound to the user `user`.
fn agentrun_role(role: &str, verbs: &str, user: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {role}\nrules:\n  - {{apiGroups: [agentrun.dev], resources: [agentruns], verbs: [{verbs}]}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {role}-{user}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {role}}}\nsubjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n---\n"
    )
}

/// Alice may view the runs of the namespace (`get`), Bob may view and control them (`get`,
/// `update`); Carol is granted nothing.
fn user_rbac() -> String {
    agentrun_role("agentrun-viewer", "get", "alice")
        + &agentrun_role("agentrun-controller", "get, update", "bob")
}

/// A run that ticks for a minute at most, long enough to be paused, resumed and stopped.
const TICKER: &str = r#"apiVersion: agentrun.dev/v1alpha1
kind: AgentRun
metadata:
  name: ticker
spec:
  image: busybox:1.36
  command: [sh, -c]
  args: ['i=0; while [ $i -lt 600 ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done']
  timeoutSeconds: 60
"#;

/// The chart rendered with `relay.auth.mode=kubernetes`: its RBAC objects.
fn chart_rbac_with_kube_auth_relay() -> Vec<Value> {
    let docs = chart_rbac(&["--set", "relay.auth.mode=kubernetes"]);
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "ClusterRole" && is_component(d, "relay")),
        "the chart grants the relay its reviews: {docs:#?}"
    );
    docs
}

/// [`stack_under_chart_rbac`] with the relay's ServiceAccount, Alice, Bob and Carol in
/// kube-sim's auth config and the relay restarted with `--auth kubernetes` and a kubeconfig
/// holding its ServiceAccount's token; returns the relay's user name too.
async fn stack_with_kube_auth_relay(docs: &[Value]) -> (Stack, String) {
    let relay_user = service_account_user(docs, "relay");
    let users = [
        (RELAY_TOKEN, relay_user.as_str()),
        (ALICE_TOKEN, "alice"),
        (BOB_TOKEN, "bob"),
        (CAROL_TOKEN, "carol"),
    ];
    let mut s = stack_under_chart_rbac_with_users(docs, false, &users).await;
    let kubeconfig = write_kubeconfig(&s, "relay", &relay_user, RELAY_TOKEN);
    s.restart_relay_with(RelayOptions {
        args: vec![
            "--auth".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ],
    })
    .await;
    (s, relay_user)
}

/// A caller of the relay's HTTP API, with a bearer token or none.
struct Caller {
    http: reqwest::Client,
    base: String,
}

impl Caller {
    fn new(s: &Stack, token: Option<&str>) -> Caller {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        Caller {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .expect("HTTP client"),
            base: s.relay_url.clone(),
        }
    }

    /// Status and body (JSON when it is) of a request to the relay.
    async fn answer(r: reqwest::RequestBuilder) -> (u16, Value) {
        let r = r.send().await.expect("the relay answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn control(&self, run_id: &str, action: &str) -> (u16, Value) {
        let url = format!("{}/api/runs/{run_id}/control", self.base);
        Self::answer(
            self.http
                .post(url)
                .json(&serde_json::json!({ "action": action })),
        )
        .await
    }

    /// The names of the runs `GET /api/runs` shows.
    async fn run_names(&self) -> Vec<String> {
        let (code, body) = self.get("/api/runs").await;
        assert_eq!(code, 200, "{body}");
        body["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until the run's default variation is in `state` (`GET /api/runs/{run}`).
    async fn wait_state(&self, s: &Stack, run_id: &str, state: &str) {
        s.eventually(20, &format!("the relay shows the run {state}"), || async {
            let (code, body) = self.get(&format!("/api/runs/{run_id}")).await;
            (code == 200 && body["variations"]["default"]["state"] == state).then_some(())
        })
        .await;
    }
}

/// kube-sim's refusals of requests by `user`.
fn denials_of(s: &Stack, user: &str) -> Vec<String> {
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    let who = format!("User \"{user}\"");
    sim.denials
        .all()
        .into_iter()
        .filter(|d| d.contains(&who))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_in_kubernetes_mode_under_the_charts_rbac_authorizes_by_agentrun_rbac() {
    if on_a_real_cluster() {
        return;
    }
    let docs = chart_rbac_with_kube_auth_relay();
    let (s, relay_user) = stack_with_kube_auth_relay(&docs).await;
    s.apply_yaml("user-rbac.yaml", &user_rbac());
    s.apply_example("manifests/examples/hello.yaml");
    s.apply_yaml("ticker.yaml", TICKER);
    let hello = s.run_id("hello").await;
    let ticker = s.run_id("ticker").await;
    let (alice, bob, carol, anonymous) = (
        Caller::new(&s, Some(ALICE_TOKEN)),
        Caller::new(&s, Some(BOB_TOKEN)),
        Caller::new(&s, Some(CAROL_TOKEN)),
        Caller::new(&s, None),
    );

    // No token: 401, whatever is asked.
    for path in ["/api/runs".to_string(), format!("/api/runs/{hello}")] {
        let (code, body) = anonymous.get(&path).await;
        assert_eq!(code, 401, "{path}: {body}");
    }
    assert_eq!(anonymous.control(&ticker, "stop").await.0, 401);

    // Alice (get on the namespace's AgentRuns) lists both runs and reads hello's output.
    s.eventually(20, "alice lists both runs", || async {
        let mut names = alice.run_names().await;
        names.sort();
        (names == ["hello", "ticker"]).then_some(())
    })
    .await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 30)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    let url = format!("{}/api/runs/{hello}/events?from=earliest", s.relay_url);
    let sse = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stack::read_sse(&alice.http, &url),
    )
    .await
    .expect("alice's stream ends within 20 s")
    .expect("alice reads hello's events");
    assert_eq!(
        String::from_utf8_lossy(&sse.output()["default"]),
        "Hello from agentrun: this output streams live to your browser. \n"
    );
    // ...but may not control a run: 403, saying what is missing.
    let (code, body) = alice.control(&ticker, "stop").await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        format!(
            "user alice may not update agentruns/ticker in namespace {} (group agentrun.dev): controlling a run needs 'update' on its AgentRun",
            s.ns()
        )
    );

    // Carol (nothing granted) sees no run, and a run she may not see answers like a missing one.
    assert_eq!(carol.run_names().await, Vec::<String>::new());
    let missing = "no-such-run-0";
    let like_missing = |theirs: (u16, Value), absent: (u16, Value), run: &str, what: &str| {
        assert_eq!(theirs.0, 404, "{what}: {}", theirs.1);
        assert_eq!(absent.0, 404, "{what} of a missing run: {}", absent.1);
        let expected = absent.1.to_string().replace(missing, run);
        assert_eq!(theirs.1.to_string(), expected, "{what}");
    };
    for run in [&hello, &ticker] {
        like_missing(
            carol.get(&format!("/api/runs/{run}")).await,
            carol.get(&format!("/api/runs/{missing}")).await,
            run,
            "GET of the run",
        );
    }
    like_missing(
        carol.control(&ticker, "stop").await,
        carol.control(missing, "stop").await,
        &ticker,
        "control",
    );

    // Bob (get, update) pauses, resumes and stops the ticker.
    s.wait_phase("ticker", &["Running"], 20).await;
    bob.wait_state(&s, &ticker, "running").await;
    for (action, state) in [("pause", "paused"), ("resume", "running")] {
        let (code, body) = bob.control(&ticker, action).await;
        assert_eq!(code, 202, "{action}: {body}");
        assert_eq!(body["action"], action, "{body}");
        bob.wait_state(&s, &ticker, state).await;
    }
    let (code, body) = bob.control(&ticker, "stop").await;
    assert_eq!(code, 202, "stop: {body}");
    let stopped = s
        .wait_phase("ticker", &["Succeeded", "Failed", "Stopped"], 20)
        .await;
    assert_eq!(stopped["status"]["phase"], "Stopped", "{stopped:#}");

    // The relay's own reviews went through the chart's RBAC, and nothing was refused.
    assert_eq!(denials_of(&s, &relay_user), Vec::<String>::new());
    let sim = s.cluster.sim.as_ref().expect("kube-sim");
    assert_eq!(sim.denials.all(), Vec::<String>::new(), "requests refused");
    let log = std::fs::read_to_string(&s.relay.log).unwrap_or_default();
    assert!(!log.contains("refused"), "the relay was refused:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_without_the_charts_subjectaccessreview_grant_answers_503() {
    if on_a_real_cluster() {
        return;
    }
    let mut docs = chart_rbac_with_kube_auth_relay();
    // Take the subjectaccessreviews rule out of the relay's ClusterRole.
    let role = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterRole" && is_component(d, "relay"))
        .expect("the relay's ClusterRole");
    let rules = role["rules"].as_array_mut().expect("rules");
    let before = rules.len();
    rules.retain(|r| {
        !r["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == "subjectaccessreviews"))
    });
    assert_eq!(before - rules.len(), 1, "one rule: {role:#}");
    let (s, relay_user) = stack_with_kube_auth_relay(&docs).await;
    s.apply_yaml("user-rbac.yaml", &user_rbac());
    s.apply_example("manifests/examples/hello.yaml");
    let hello = s.run_id("hello").await;
    let done = s
        .wait_phase("hello", &["Succeeded", "Failed", "Stopped"], 30)
        .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");

    // Alice's token is still reviewed (TokenReview is granted), but whether she may see the
    // run cannot be asked: 503, saying what the relay lacks.
    let alice = Caller::new(&s, Some(ALICE_TOKEN));
    let server = &s.cluster.sim.as_ref().expect("kube-sim").url;
    let expected = format!(
        "the Kubernetes API server at {}/ refused the relay's own request (403 subjectaccessreviews.authorization.k8s.io is forbidden: User \"{relay_user}\" cannot create resource \"subjectaccessreviews\" in API group \"authorization.k8s.io\" at the cluster scope): the relay's ServiceAccount needs 'create' on subjectaccessreviews.authorization.k8s.io",
        server.trim_end_matches('/')
    );
    for path in ["/api/runs".to_string(), format!("/api/runs/{hello}")] {
        let (code, body) = alice.get(&path).await;
        assert_eq!(code, 503, "{path}: {body}");
        assert_eq!(body["error"], expected, "{path}");
    }
    // No token is still 401: nothing to ask.
    assert_eq!(Caller::new(&s, None).get("/api/runs").await.0, 401);

    // kube-sim refused the relay's SubjectAccessReviews (and only those).
    let refused = denials_of(&s, &relay_user);
    assert!(!refused.is_empty(), "kube-sim refused the relay");
    for d in &refused {
        assert!(
            d.starts_with("POST /apis/authorization.k8s.io/v1/subjectaccessreviews: "),
            "{refused:#?}"
        );
    }
}
