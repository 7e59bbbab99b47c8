// Long file: tests only: one mocked API-server conversation per reconcile scenario.
//! Reconcile scenarios against a mocked API server (the controller-rs `ApiServerVerifier`
//! pattern): each test lists, in order, the requests the reconciler must make, and fails on any
//! request beyond them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentrun_protocol::{ControlAction, RunState};
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::*;
use crate::crd::{AgentRun, AgentRunStatus, ArchiveInfo, RunPhase};
use crate::fixtures::*;
use crate::metrics::Metrics;
use crate::status::reasons;
use crate::store::{RecordingStore, StoreCall};
use agentrun_protocol::archive::{ArchiveDetails, ArchiveStatus};

struct Outcome {
    result: Result<Action>,
    store: Arc<RecordingStore>,
    metrics: Arc<Metrics>,
    ctx_for_policy: Arc<Context>,
}

/// Runs one reconcile of `guard` while `script` plays the API server.
async fn scenario<F, Fut>(guard: DeserializeGuard<AgentRun>, redis_down: bool, script: F) -> Outcome
where
    F: FnOnce(ApiServerVerifier) -> Fut,
    Fut: Future<Output = ApiServerVerifier> + Send + 'static,
{
    scenario_with(guard, redis_down, |_| {}, script).await
}

/// [`scenario`] with the operator's settings changed by `settings`.
async fn scenario_with<F, Fut>(
    guard: DeserializeGuard<AgentRun>,
    redis_down: bool,
    settings: impl FnOnce(&mut Settings),
    script: F,
) -> Outcome
where
    F: FnOnce(ApiServerVerifier) -> Fut,
    Fut: Future<Output = ApiServerVerifier> + Send + 'static,
{
    let prepare = move |store: &RecordingStore| {
        if redis_down {
            store.fail_from_now();
        }
    };
    scenario_with_store(guard, settings, prepare, script).await
}

/// [`scenario_with`] with the Redis the store stands for prepared by `store`.
async fn scenario_with_store<F, Fut>(
    guard: DeserializeGuard<AgentRun>,
    settings: impl FnOnce(&mut Settings),
    store_setup: impl FnOnce(&RecordingStore),
    script: F,
) -> Outcome
where
    F: FnOnce(ApiServerVerifier) -> Fut,
    Fut: Future<Output = ApiServerVerifier> + Send + 'static,
{
    let (ctx, verifier, store) = Context::test();
    let mut ctx = Arc::try_unwrap(ctx).ok().expect("a fresh test context");
    settings(&mut ctx.settings);
    let ctx = Arc::new(ctx);
    store_setup(&store);
    let server = tokio::spawn(script(verifier));
    let reconciler = tokio::spawn(reconcile(Arc::new(guard), ctx.clone()));
    let verifier = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the scenario finished in time (the reconciler made fewer requests than expected?)")
        .expect("the scenario's expectations held");
    let metrics = ctx.metrics.clone();
    drop(ctx);
    // Any request beyond the script fails the test (and releases the reconciler).
    let stray = tokio::spawn(verifier.expect_nothing_more());
    let result = tokio::time::timeout(Duration::from_secs(10), reconciler)
        .await
        .expect("the reconcile finished in time")
        .expect("the reconcile did not panic");
    tokio::time::timeout(Duration::from_secs(10), stray)
        .await
        .expect("the client was released")
        .expect("no request beyond the scenario");
    let (ctx_for_policy, _, _) = Context::test();
    Outcome {
        result,
        store,
        metrics,
        ctx_for_policy,
    }
}

fn ok(run: AgentRun) -> DeserializeGuard<AgentRun> {
    DeserializeGuard(Ok(run))
}

fn statuses(store: &RecordingStore) -> Vec<(Option<String>, RunState, Option<String>)> {
    store
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            StoreCall::Status { event, .. } => Some((event.variation, event.state, event.reason)),
            _ => None,
        })
        .collect()
}

fn condition<'a>(
    status: &'a AgentRunStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {status:#?}"))
}

/// The note of an event as sent.
fn note_of(event: &Value) -> &str {
    event["note"].as_str().unwrap_or_default()
}

/// The condition types of a status as sent, in order.
fn condition_types(status: &Value) -> Vec<&str> {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect()
}

/// The decoded `data` of a Secret body that the operator sent.
fn secret_data(body: &Value) -> std::collections::BTreeMap<String, String> {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(body.clone()).expect("a Secret");
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8")))
        .collect()
}

/// The status a first reconcile writes, for runs that are further along.
fn started(run: &AgentRun) -> AgentRunStatus {
    let run_id = pod::run_id(run).expect("id");
    AgentRunStatus {
        url: settings().run_url(&run_id),
        run_id: Some(run_id),
        start_time: Some(ago(30)),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_run_first_gets_the_finalizer() {
    let run = AgentRun::test();
    let answer = serde_json::to_value(run.clone().finalized()).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        let seen = api
            .expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
                200,
                answer,
            )
            .await;
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert!(
        out.store.calls().is_empty(),
        "nothing goes to Redis before the finalizer is in place"
    );
}

#[tokio::test]
async fn the_first_reconcile_creates_the_secret_the_pod_and_the_status() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        let secret = api
            .expect(
                Method::PATCH,
                "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
                200,
                json!({}),
            )
            .await;
        // Server-side apply of the whole Secret, values in `data`: a key under `stringData`
        // would stay in `data` after the operator stopped sending it.
        assert!(secret.body.get("stringData").is_none(), "{}", secret.body);
        assert_eq!(secret.body["type"], "Opaque");
        let data = secret_data(&secret.body);
        assert_eq!(data["AGENTRUN_REDIS_URL"], "redis://agentrun-redis:6379");
        // The run gets its own Redis user, with a password derived from the operator's key
        // (never the operator's own password).
        let id = agentrun_protocol::RunId::new("default.hello.0f1e2d3c").expect("run id");
        assert_eq!(
            data["AGENTRUN_REDIS_USERNAME"],
            "agentrun-run-default.hello.0f1e2d3c"
        );
        assert_eq!(
            data["AGENTRUN_REDIS_PASSWORD"],
            agentrun_protocol::acl::derive_run_password("test-key", &id)
        );
        assert_ne!(data["AGENTRUN_REDIS_PASSWORD"], "s3cret");
        assert_eq!(data.len(), 3, "{data:?}");
        assert_eq!(
            secret.body["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert!(
            secret.uri.contains("fieldManager=agentrun-operator"),
            "{}",
            secret.uri
        );
        let pod = api
            .expect(
                Method::POST,
                "/api/v1/namespaces/default/pods?",
                201,
                json!({}),
            )
            .await;
        assert_eq!(pod.body["metadata"]["name"], "hello-default");
        assert_eq!(
            pod.body["spec"]["containers"][0]["command"][0],
            "/agentrun/bin/agentrun-entrypoint"
        );
        let event = api.expect_event("PodCreated").await;
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["action"], "CreatePod");
        assert_eq!(event["regarding"]["name"], "hello");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Pending));
        assert_eq!(status.run_id.as_deref(), Some("default.hello.0f1e2d3c"));
        assert_eq!(
            status.url.as_deref(),
            Some("https://agentrun.example.com/runs/default.hello.0f1e2d3c")
        );
        assert_eq!(status.start_time, Some(Time(now())));
        assert_eq!(
            status.variations[0].pod_name.as_deref(),
            Some("hello-default")
        );
        assert_eq!(status.variations[0].reason.as_deref(), Some("PodCreated"));
        assert_eq!(status.observed_generation, Some(1));
        let created = condition(&status, "PodsCreated");
        assert_eq!(
            (created.status.as_str(), created.reason.as_str()),
            ("True", "PodsCreated")
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::requeue(USER_RESYNC));
    let calls = out.store.calls();
    assert!(
        matches!(&calls[0], StoreCall::Register(info) if info.run_id == "default.hello.0f1e2d3c" && info.variations == ["default"]),
        "the run is registered for the relay first: {calls:?}"
    );
    assert_eq!(
        statuses(&out.store),
        vec![
            (
                Some("default".into()),
                RunState::Pending,
                Some("PodCreated".into())
            ),
            (None, RunState::Pending, Some("PodCreated".into())),
        ]
    );
    assert_eq!(out.metrics.pods_created.get(), 1);
}

#[tokio::test]
async fn reconciling_again_creates_no_duplicate_and_writes_nothing_when_unchanged() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", running())];
    let (r, p) = (run.clone(), pods.clone());
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, p).await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Running));
        api
    })
    .await;
    out.result.expect("ok");
    // Feed the written status back: the next reconcile only reads.
    let mut again = run.clone();
    let variations = again.spec.resolved_variations();
    let written = status::derive(&status::Observation {
        variations: &variations,
        pods: &pods,
        previous: &started(&base),
        generation: Some(1),
        timeout_seconds: None,
        now: now(),
    });
    again.status = Some(written);
    let r = again.clone();
    let out = scenario(ok(again), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::requeue(USER_RESYNC));
    assert!(
        statuses(&out.store).is_empty(),
        "no change, nothing published"
    );
}

#[tokio::test]
async fn a_status_apply_sends_every_field_the_operator_owns() {
    // Server-side apply removes what its field manager stops sending: every reconcile that
    // writes the status sends all of it, not only what changed.
    let base = AgentRun::test().finalized();
    let mut prev = started(&base);
    prev.paused = Some(false);
    let run = base.clone().with_status(prev);
    let pods = vec![pod_of(&run, "default", running())];
    let r = run.clone();
    scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        let answer = serde_json::to_value(&r).expect("json");
        let seen = api
            .expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello/status?",
                200,
                answer,
            )
            .await;
        assert!(
            seen.uri.contains("fieldManager=agentrun-operator") && seen.uri.contains("force=true")
        );
        let mut keys: Vec<&str> = seen.body["status"]
            .as_object()
            .expect("status")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "conditions",
                "observedGeneration",
                "paused",
                "phase",
                "runId",
                "startTime",
                "url",
                "variations",
                "variationsDone"
            ]
        );
        let types = condition_types(&seen.body["status"]);
        assert_eq!(types, ["Ready", "Complete", "SpecValid"]);
        let variation = &seen.body["status"]["variations"][0];
        assert_eq!(
            (
                variation["podName"].as_str(),
                variation["startTime"].as_str()
            ),
            (Some("hello-default"), Some("2026-01-01T11:59:00Z"))
        );
        api
    })
    .await
    .result
    .expect("ok");
}

#[tokio::test]
async fn parallelism_limits_the_pods_created() {
    let mut run = AgentRun::test()
        .finalized()
        .with_variations(&["a", "b", "c"]);
    run.spec.parallelism = Some(1);
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::PATCH,
            "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
            200,
            json!({}),
        )
        .await;
        let pod = api
            .expect(
                Method::POST,
                "/api/v1/namespaces/default/pods?",
                201,
                json!({}),
            )
            .await;
        assert_eq!(pod.body["metadata"]["name"], "hello-a");
        api.expect_event("PodCreated").await;
        let status = api.expect_status_patch(&r).await;
        let reasons: Vec<_> = status
            .variations
            .iter()
            .map(|v| v.reason.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            reasons,
            [
                "PodCreated",
                reasons::WAITING_FOR_PARALLELISM,
                reasons::WAITING_FOR_PARALLELISM
            ]
        );
        assert_eq!(status.variations_done.as_deref(), Some("0/3"));
        api
    })
    .await;
    out.result.expect("ok");
}

#[tokio::test]
async fn an_existing_pod_from_a_race_is_not_an_error() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::PATCH,
            "/api/v1/namespaces/default/secrets/hello-agentrun-redis?",
            200,
            json!({}),
        )
        .await;
        api.expect(Method::POST, "/api/v1/namespaces/default/pods?", 409, json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
            "message": "pods \"hello-default\" already exists", "code": 409
        }))
        .await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(
            status.variations[0].reason.as_deref(),
            Some(reasons::POD_NAME_TAKEN)
        );
        assert_eq!(
            status.variations[0].pod_name, None,
            "a pod that may not be ours is not claimed"
        );
        api
    })
    .await;
    assert_eq!(
        out.result.expect("a 409 on create is not an error"),
        Action::requeue(Duration::from_secs(10)),
        "look again soon for the old pod to go"
    );
    assert_eq!(out.metrics.pods_created.get(), 0);
}

const SECRET_URI: &str = "/api/v1/namespaces/default/secrets/hello-agentrun-redis?";
const PODS_URI: &str = "/api/v1/namespaces/default/pods?";

/// Plays a reconcile up to a refused pod: the pod list, the Secret apply, and the pod's
/// creation answered 403 with `message`.
async fn refuse_the_pod(api: &mut ApiServerVerifier, run: &AgentRun, message: &str) {
    api.expect_pod_list(run, vec![]).await;
    api.expect(Method::PATCH, SECRET_URI, 200, json!({})).await;
    api.refuse(Method::POST, PODS_URI, 403, message).await;
}

#[tokio::test]
async fn a_pod_security_refusal_fails_the_run_with_the_api_servers_message() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        refuse_the_pod(&mut api, &r, POD_SECURITY_REFUSAL).await;
        let refused = api.expect_event("PodSecurity").await;
        assert_eq!(
            (refused["type"].as_str(), refused["action"].as_str()),
            (Some("Warning"), Some("CreatePod"))
        );
        let note = note_of(&refused);
        assert!(
            note.starts_with(
                "variation default: pods \"hello-default\" is forbidden: violates PodSecurity"
            ),
            "{note}"
        );
        let failed = api.expect_event("Failed").await;
        assert!(note_of(&failed).contains("violates PodSecurity"));
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Failed));
        let v = &status.variations[0];
        assert_eq!(
            (v.phase, v.reason.as_deref(), v.pod_name.as_deref()),
            (RunPhase::Failed, Some("PodSecurity"), None)
        );
        assert!(
            v.message
                .as_deref()
                .unwrap_or_default()
                .contains(POD_SECURITY_REFUSAL)
        );
        assert!(
            v.message
                .as_deref()
                .unwrap_or_default()
                .contains("spec.securityContext.runAsNonRoot: true")
        );
        for type_ in ["PodsCreated", "Ready"] {
            let c = condition(&status, type_);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "PodSecurity"),
                "{type_}"
            );
            assert!(
                c.message.contains(POD_SECURITY_REFUSAL),
                "{type_}: {}",
                c.message
            );
        }
        assert_eq!(condition(&status, "Complete").status, "True");
        assert_eq!(status.start_time, None, "no agent started");
        api
    })
    .await;
    assert_eq!(
        out.result.expect("a refusal is reported, not an error"),
        Action::await_change(),
        "a permanent refusal is not retried"
    );
    assert_eq!(out.metrics.pods_created.get(), 0);
    assert!(statuses(&out.store).contains(&(
        Some("default".into()),
        RunState::Failed,
        Some("PodSecurity".into())
    )));
}

#[tokio::test]
async fn a_quota_refusal_keeps_the_run_pending_and_is_retried_and_reported_once() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        refuse_the_pod(&mut api, &r, EXCEEDED_QUOTA).await;
        let event = api.expect_event("QuotaExceeded").await;
        assert_eq!(event["type"], "Warning");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Pending));
        let v = &status.variations[0];
        assert_eq!(
            (v.phase, v.reason.as_deref()),
            (RunPhase::Pending, Some("QuotaExceeded"))
        );
        let c = condition(&status, "PodsCreated");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "QuotaExceeded")
        );
        assert!(
            c.message.contains("limited: limits.cpu=100m"),
            "{}",
            c.message
        );
        let ready = condition(&status, "Ready");
        assert_eq!(ready.reason, "QuotaExceeded");
        let _ = written_tx.send(status);
        api
    })
    .await;
    let requeue = out.result.expect("a refusal is reported, not an error");
    assert!(
        requeue == Action::requeue(crate::refusal::CREATE_RETRY)
            || requeue == Action::requeue(USER_RESYNC),
        "retried after a pause: {requeue:?}"
    );
    // The next try is refused the same way: nothing new to write or report.
    let written = written_rx.await.expect("the status was written");
    let again = run.clone().with_status(written.clone());
    let r = again.clone();
    scenario(ok(again), false, |mut api| async move {
        refuse_the_pod(&mut api, &r, EXCEEDED_QUOTA).await;
        api
    })
    .await
    .result
    .expect("ok");
    // A different refusal (the quota now asks for limits) is news again.
    let again = run.clone().with_status(written);
    let r = again.clone();
    scenario(ok(again), false, |mut api| async move {
        refuse_the_pod(&mut api, &r, MUST_SPECIFY_LIMITS).await;
        let event = api.expect_event("QuotaExceeded").await;
        assert!(note_of(&event).contains(MUST_SPECIFY_LIMITS));
        let status = api.expect_status_patch(&r).await;
        assert!(
            condition(&status, "PodsCreated")
                .message
                .contains(MUST_SPECIFY_LIMITS)
        );
        api
    })
    .await
    .result
    .expect("ok");
}

#[tokio::test]
async fn a_status_read_before_the_pod_was_created_does_not_keep_its_refusal() {
    // The first try was refused by a quota; a later one created the pod. A reconcile that
    // starts from the status written after the refusal (a cache not yet updated) sees the pod
    // and must say the pods are created, not keep the old refusal.
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    scenario(ok(run.clone()), false, |mut api| async move {
        refuse_the_pod(&mut api, &r, EXCEEDED_QUOTA).await;
        api.expect_event("QuotaExceeded").await;
        let _ = written_tx.send(api.expect_status_patch(&r).await);
        api
    })
    .await
    .result
    .expect("a refusal is reported, not an error");
    let stale = run.with_status(written_rx.await.expect("the refusal was written"));
    let pods = vec![pod_of(&stale, "default", running())];
    let r = stale.clone();
    scenario(ok(stale), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        let status = api.expect_status_patch(&r).await;
        let c = condition(&status, "PodsCreated");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "PodsCreated")
        );
        api
    })
    .await
    .result
    .expect("ok");
}

#[tokio::test]
async fn a_refused_secret_is_reported_and_no_pod_is_created() {
    let run = AgentRun::test().finalized();
    let r = run.clone();
    let denied = r#"secrets "hello-agentrun-redis" is forbidden: User "system:serviceaccount:agentrun:agentrun-operator" cannot patch resource "secrets" in API group "" in the namespace "default""#;
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.refuse(Method::PATCH, SECRET_URI, 403, denied).await;
        let event = api.expect_event("SecretFailed").await;
        assert_eq!(event["action"], "ApplySecret");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Pending));
        let c = condition(&status, "PodsCreated");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "SecretFailed")
        );
        assert!(
            c.message.contains(denied) && c.message.contains("Secret default/hello-agentrun-redis"),
            "{}",
            c.message
        );
        api
    })
    .await;
    out.result.expect("a refusal is reported, not an error");
    assert_eq!(out.metrics.pods_created.get(), 0);
}

#[tokio::test]
async fn pending_reasons_reach_redis() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", unschedulable())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        let status = api.expect_status_patch(&r).await;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unschedulable")
        );
        api
    })
    .await;
    out.result.expect("ok");
    let calls = out.store.calls();
    let event = calls
        .iter()
        .find_map(|c| match c {
            StoreCall::Status { event, .. } if event.variation.is_some() => Some(event.clone()),
            _ => None,
        })
        .expect("a status event");
    assert_eq!(event.state, RunState::Pending);
    assert_eq!(event.reason.as_deref(), Some("Unschedulable"));
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("Insufficient memory")
    );
    assert_eq!(event.source.as_deref(), Some("operator"));
}

#[tokio::test]
async fn a_timeout_stops_the_agents_and_fails_the_run() {
    let mut base = AgentRun::test().finalized();
    base.spec.timeout_seconds = Some(60);
    let mut status = started(&base);
    status.start_time = Some(ago(61));
    let run = base.clone().with_status(status);
    let pods = vec![pod_of(&run, "default", running())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect(Method::DELETE, "/api/v1/namespaces/default/pods/hello-default?", 200, json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hello-default", "namespace": "default"}
        }))
        .await;
        let timeout = api.expect_event("Timeout").await;
        assert_eq!(timeout["type"], "Warning");
        assert!(note_of(&timeout).contains("timeoutSeconds (60s)"));
        api.expect_event("Failed").await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Failed));
        assert_eq!(status.completion_time, Some(Time(now())));
        let complete = status.conditions.iter().find(|c| c.type_ == "Complete").expect("Complete");
        assert_eq!((complete.status.as_str(), complete.reason.as_str()), ("True", "Timeout"));
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert!(statuses(&out.store).contains(&(
        Some("default".into()),
        RunState::Failed,
        Some(reasons::TIMEOUT.into())
    )));
}

/// The agent exited 0 and its pod still runs: the native sidecar publishes what it holds.
fn agent_done_sidecar_running() -> k8s_openapi::api::core::v1::PodStatus {
    let mut status = exited("Running", 0, Some("Completed"), None);
    status.init_container_statuses = Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
        name: pod::SIDECAR_CONTAINER.into(),
        state: Some(k8s_openapi::api::core::v1::ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    status
}

#[tokio::test]
async fn the_runs_end_reaches_viewers_only_after_every_sidecar_has_ended() {
    // Viewers stop reading at the run's final status event, so it must not be published
    // while a sidecar may still publish output it spooled or held.
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", agent_done_sidecar_running())];
    let r = run.clone();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let out = scenario(ok(run.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect_event("Succeeded").await;
        let _ = written_tx.send(api.expect_status_patch(&r).await);
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    let written = written_rx.await.expect("the status was written");
    assert_eq!(written.phase, Some(RunPhase::Succeeded));
    assert_eq!(written.streams_closed, None, "a sidecar still runs");
    assert_eq!(
        statuses(&out.store),
        [(
            Some("default".into()),
            RunState::Succeeded,
            Some(reasons::COMPLETED.into())
        )],
        "the variation's end is published, the run's is not"
    );

    // The sidecar has exited and the pod is Succeeded: now the run's end goes out, once.
    let ended = run.with_status(written);
    let pods = vec![pod_of(
        &ended,
        "default",
        exited("Succeeded", 0, Some("Completed"), None),
    )];
    let (r, p) = (ended.clone(), pods.clone());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let out = scenario(ok(ended.clone()), false, |mut api| async move {
        api.expect_pod_list(&r, p).await;
        let _ = closed_tx.send(api.expect_status_patch(&r).await);
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert_eq!(
        statuses(&out.store),
        [(None, RunState::Succeeded, Some(reasons::SUCCEEDED.into()))]
    );
    let closed = closed_rx.await.expect("the status was written");
    assert_eq!(closed.streams_closed, Some(true));

    let again = ended.with_status(closed);
    let r = again.clone();
    let out = scenario(ok(again), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert!(statuses(&out.store).is_empty(), "published once");
}

#[tokio::test]
async fn a_run_end_that_redis_refused_is_published_on_a_retry() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(
        &run,
        "default",
        exited("Succeeded", 0, Some("Completed"), None),
    )];
    let r = run.clone();
    let (written_tx, written_rx) = tokio::sync::oneshot::channel();
    let out = scenario(ok(run), true, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect_event("Succeeded").await;
        let _ = written_tx.send(api.expect_status_patch(&r).await);
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::requeue(ERROR_REQUEUE));
    let written = written_rx.await.expect("the status was written");
    assert_eq!(
        (written.phase, written.streams_closed),
        (Some(RunPhase::Succeeded), None)
    );
}

fn finished(run: &AgentRun, completed_secs_ago: i64) -> AgentRunStatus {
    AgentRunStatus {
        phase: Some(RunPhase::Succeeded),
        completion_time: Some(ago(completed_secs_ago)),
        observed_generation: Some(1),
        streams_closed: Some(true),
        ..started(run)
    }
}

#[tokio::test]
async fn the_ttl_deletes_a_finished_run() {
    let mut base = AgentRun::test().finalized();
    base.spec.ttl_seconds_after_finished = Some(30);
    let run = base.clone().with_status(finished(&base, 31));
    let r = run.clone();
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api.expect(
            Method::DELETE,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
}

#[tokio::test]
async fn before_the_ttl_the_run_is_requeued_for_it() {
    let mut base = AgentRun::test().finalized();
    base.spec.ttl_seconds_after_finished = Some(3600);
    let run = base.clone().with_status(finished(&base, 600));
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, vec![]).await;
        api
    })
    .await;
    assert_eq!(
        out.result.expect("ok"),
        Action::requeue(Duration::from_secs(3000))
    );
}

#[tokio::test]
async fn paused_sends_pause_once_and_records_it() {
    let mut base = AgentRun::test().finalized();
    base.spec.paused = true;
    let run = base.clone().with_status(started(&base));
    let pods = vec![pod_of(&run, "default", running())];
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_pod_list(&r, pods).await;
        api.expect_event("Paused").await;
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.paused, Some(true));
        api
    })
    .await;
    out.result.expect("ok");
    let controls: Vec<_> = out
        .store
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            StoreCall::Control { run_id, action } => Some((run_id, action)),
            _ => None,
        })
        .collect();
    assert_eq!(
        controls,
        vec![("default.hello.0f1e2d3c".to_string(), ControlAction::Pause)]
    );
}

/// What the store sees when an unfinished run goes: `stop`, then the default retention TTL.
fn stopped_and_expired(run_id: &str, variations: &[&str]) -> Vec<StoreCall> {
    vec![
        StoreCall::Control {
            run_id: run_id.into(),
            action: ControlAction::Stop,
        },
        StoreCall::Expire {
            run_id: run_id.into(),
            variations: variations.iter().map(|v| (*v).into()).collect(),
            ttl_seconds: 604_800,
        },
    ]
}

#[tokio::test]
async fn cleanup_stops_agents_expires_redis_data_and_removes_the_finalizer() {
    let base = AgentRun::test().finalized().deleting();
    let mut status = started(&base);
    status.phase = Some(RunPhase::Running);
    let run = base.clone().with_status(status);
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        let event = api.expect_event("Deleting").await;
        assert!(note_of(&event).contains("604800s"));
        let seen = api
            .expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
                200,
                answer,
            )
            .await;
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    // The run's Redis user outlives its stopping pods (their final flush needs it); it is
    // deleted after their grace period.
    assert_eq!(
        out.store.calls(),
        stopped_and_expired("default.hello.0f1e2d3c", &["default"])
    );
}

#[tokio::test]
async fn cleanup_copes_with_apply_never_having_run() {
    let mut run = AgentRun::test()
        .finalized()
        .deleting()
        .with_variations(&["a", "b"]);
    run.spec.retention_seconds = Some(3600);
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect_event("Deleting").await;
        api.expect(
            Method::PATCH,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    out.result.expect("ok");
    assert_eq!(
        out.store.calls(),
        vec![StoreCall::Expire {
            run_id: "default.hello.0f1e2d3c".into(),
            variations: vec!["a".into(), "b".into()],
            ttl_seconds: 3600,
        },]
    );
}

#[tokio::test]
async fn cleanup_does_not_hang_on_an_unreachable_redis() {
    let base = AgentRun::test().finalized().deleting();
    let run = base.clone().with_status(started(&base));
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario(ok(run), true, |mut api| async move {
        api.expect_event("Deleting").await;
        api.expect(
            Method::PATCH,
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
            200,
            answer,
        )
        .await;
        api
    })
    .await;
    out.result.expect("deletion goes on without Redis");
}

#[tokio::test]
async fn api_errors_go_to_the_error_policy() {
    let run = AgentRun::test().finalized();
    let guard = Arc::new(ok(run.clone()));
    let out = scenario(ok(run), false, |mut api| async move {
        api.expect(Method::GET, "/api/v1/namespaces/default/pods?", 500, json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcdserver: request timed out", "code": 500
        }))
        .await;
        api
    })
    .await;
    let err = out.result.expect_err("a failed list is an error");
    assert!(
        err.to_string().contains("etcdserver: request timed out")
            || format!("{err:?}").contains("etcdserver"),
        "{err:?}"
    );
    assert_eq!(
        error_policy(guard, &err, out.ctx_for_policy),
        Action::requeue(ERROR_REQUEUE)
    );
    assert!(
        out.metrics
            .render()
            .contains("agentrun_operator_reconciles_total{result=\"finalizer_error\"} 1")
    );
}

#[tokio::test]
async fn an_invalid_spec_becomes_a_condition_not_a_crash_loop() {
    let mut run = AgentRun::test().finalized().with_variations(&["a", "a"]);
    run.spec.parallelism = Some(1);
    let r = run.clone();
    let out = scenario(ok(run), false, |mut api| async move {
        let event = api.expect_event("InvalidSpec").await;
        assert_eq!(event["type"], "Warning");
        let status = api.expect_status_patch(&r).await;
        assert_eq!(status.phase, Some(RunPhase::Failed));
        let valid = status
            .conditions
            .iter()
            .find(|c| c.type_ == "SpecValid")
            .expect("SpecValid");
        assert_eq!(valid.status, "False");
        assert!(
            valid
                .message
                .contains("AgentRun default/hello: spec.variations[1].name \"a\" is used twice"),
            "{}",
            valid.message
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_skipped_keeping_its_status() {
    let guard: DeserializeGuard<AgentRun> = DeserializeGuard(Err(InvalidObject {
        error: "spec.command: invalid type: string \"echo\", expected a sequence".into(),
        metadata: kube::core::ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("default".into()),
            generation: Some(3),
            ..Default::default()
        },
    }));
    // What an earlier, well-formed generation had: a status apply that left these out would
    // remove them on a real API server.
    let stored = json!({
        "runId": "default.broken.12345678",
        "url": "https://agentrun.example.com/runs/default.broken.12345678",
        "phase": "Running",
        "startTime": "2026-01-01T11:59:00Z",
        "variationsDone": "0/1",
        "variations": [{"name": "default", "podName": "broken-default", "phase": "Running", "reason": "Running"}],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Running", "message": "the run is Running", "lastTransitionTime": "2026-01-01T11:59:00Z"},
            {"type": "SpecValid", "status": "True", "reason": "SpecValid", "message": "the spec was turned into pods", "lastTransitionTime": "2026-01-01T11:58:00Z"},
        ],
    });
    let object = json!({
        "apiVersion": "agentrun.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"command": "echo"}, "status": stored,
    });
    let out = scenario(guard, false, |mut api| async move {
        let event = api.expect_event("InvalidSpec").await;
        assert!(note_of(&event).contains("expected a sequence"));
        let path = "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/broken/status";
        api.expect(Method::GET, path, 200, object.clone()).await;
        let seen = api
            .expect(Method::PATCH, &format!("{path}?"), 200, object)
            .await;
        assert!(
            seen.uri.contains("fieldManager=agentrun-operator"),
            "{}",
            seen.uri
        );
        let status = &seen.body["status"];
        assert_eq!(status["phase"], "Failed");
        for kept in ["runId", "url", "startTime", "variationsDone", "variations"] {
            assert_eq!(
                status[kept], stored[kept],
                "{kept} is sent again: {status:#}"
            );
        }
        let types = condition_types(status);
        assert_eq!(types, ["Ready", "SpecValid"]);
        let valid = &status["conditions"][1];
        assert_eq!(
            (
                valid["status"].as_str(),
                valid["observedGeneration"].as_i64()
            ),
            (Some("False"), Some(3))
        );
        assert_eq!(valid["lastTransitionTime"], "2026-01-01T12:00:00Z");
        let message: &Value = &valid["message"];
        assert!(
            message
                .as_str()
                .unwrap_or_default()
                .contains("kubectl edit agentrun broken -n default")
        );
        api
    })
    .await;
    assert_eq!(
        out.result.expect("a malformed object is not an error"),
        Action::await_change()
    );
    assert!(out.metrics.render().contains("result=\"malformed\"} 1"));
}

#[tokio::test]
async fn a_malformed_object_being_deleted_is_released_not_kept_by_its_finalizer() {
    // `kubectl delete` of an object that no longer parses (a CRD changed under it) must not
    // hang: its Redis data is handled as for any run and the finalizer goes.
    let guard: DeserializeGuard<AgentRun> = DeserializeGuard(Err(InvalidObject {
        error: "spec.command: invalid type: string \"echo\", expected a sequence".into(),
        metadata: kube::core::ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("default".into()),
            uid: Some("12345678-aaaa-bbbb-cccc-000000000000".into()),
            finalizers: Some(vec!["example.com/other".into(), FINALIZER.into()]),
            deletion_timestamp: Some(Time(now())),
            ..Default::default()
        },
    }));
    let object = json!({
        "apiVersion": "agentrun.dev/v1alpha1", "kind": "AgentRun",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"command": "echo"},
        "status": {
            "runId": "default.broken.12345678",
            "phase": "Running",
            "variations": [{"name": "a"}, {"name": "b"}],
        },
    });
    let out = scenario(guard, false, |mut api| async move {
        let path = "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/broken";
        api.expect(Method::GET, path, 200, object.clone()).await;
        api.expect_event("Deleting").await;
        let seen = api
            .expect(Method::PATCH, &format!("{path}?"), 200, object)
            .await;
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
        api
    })
    .await;
    assert_eq!(out.result.expect("released"), Action::await_change());
    assert_eq!(
        out.store.calls(),
        stopped_and_expired("default.broken.12345678", &["a", "b"])
    );
}

#[test]
fn a_malformed_status_is_replaced_by_phase_and_condition_only() {
    let condition = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: "SpecValid".into(),
        status: "False".into(),
        reason: "InvalidSpec".into(),
        message: "m".into(),
        observed_generation: Some(1),
        last_transition_time: Time(now()),
    };
    let status = malformed_status(Some(&json!({"phase": 7})), condition.clone());
    assert_eq!(status.phase, Some(RunPhase::Failed));
    assert_eq!(status.conditions, vec![condition.clone()]);
    assert_eq!(malformed_status(None, condition).variations, vec![]);
}

#[test]
fn status_events_only_for_changes() {
    let base = AgentRun::test();
    let prev = AgentRunStatus::default();
    let next = AgentRunStatus {
        phase: Some(RunPhase::Running),
        variations: vec![crate::crd::VariationStatus {
            name: "default".into(),
            phase: RunPhase::Running,
            reason: Some("Running".into()),
            ..Default::default()
        }],
        ..started(&base)
    };
    assert_eq!(status_events(&prev, &next).len(), 2);
    assert!(status_events(&next, &next).is_empty());
}

#[tokio::test]
async fn with_archiving_a_closed_run_goes_on_the_archive_queue_and_its_expiry_waits() {
    let base = AgentRun::test().finalized();
    let run = base.clone().with_status(finished(&base, 10));
    let pods = vec![pod_of(
        &run,
        "default",
        exited("Succeeded", 0, Some("Completed"), None),
    )];
    let r = run.clone();
    let out = scenario_with(
        ok(run),
        false,
        |s| s.archive = true,
        |mut api| async move {
            api.expect_pod_list(&r, pods).await;
            api
        },
    )
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    assert_eq!(
        out.store.calls(),
        [StoreCall::Archive {
            run_id: "default.hello.0f1e2d3c".into(),
            variations: vec!["default".into()],
            ttl_seconds: 604_800,
            not_before_ms: None,
        }],
        "asked on every look (the store enqueues once)"
    );
}

#[tokio::test]
async fn with_archiving_a_run_deleted_while_running_is_archived_after_its_grace_period() {
    let base = AgentRun::test().finalized().deleting();
    let mut status = started(&base);
    status.phase = Some(RunPhase::Running);
    let run = base.clone().with_status(status);
    let answer = serde_json::to_value(&run).expect("json");
    let out = scenario_with(
        ok(run),
        false,
        |s| s.archive = true,
        |mut api| async move {
            api.expect_event("Deleting").await;
            api.expect(
                Method::PATCH,
                "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/hello?",
                200,
                answer,
            )
            .await;
            api
        },
    )
    .await;
    assert_eq!(out.result.expect("ok"), Action::await_change());
    let calls = out.store.calls();
    let Some(StoreCall::Archive {
        not_before_ms: Some(not_before),
        ttl_seconds: 604_800,
        ..
    }) = calls.get(1)
    else {
        panic!("stop, then archive with a delay: {calls:?}");
    };
    let grace_ms = (Settings::default().termination_grace_period_seconds as u64 + 5) * 1000;
    assert!(*not_before >= agentrun_protocol::now_ms() + grace_ms - 60_000);
    assert!(
        matches!(calls.get(2), Some(StoreCall::Expire { .. })),
        "the expiry is still asked for (the store skips it until the archive is complete): {calls:?}"
    );
}

/// Archive progress as the archivers write it in the run's state hash.
fn archive_at(status: ArchiveStatus, error: Option<&str>) -> ArchiveDetails {
    ArchiveDetails {
        status,
        error: error.map(str::to_owned),
        archived_ms: (status == ArchiveStatus::Complete).then_some(1_764_547_200_000),
    }
}

/// Reconciles a closed, finished run with archiving on while Redis says `details`.
async fn reconcile_archiving(
    prev_archive: Option<ArchiveInfo>,
    details: ArchiveDetails,
    expect_event: Option<&'static str>,
) -> (Outcome, Option<AgentRunStatus>) {
    let base = AgentRun::test().finalized();
    let mut status = finished(&base, 10);
    status.archive = prev_archive;
    let run = base.clone().with_status(status);
    let pods = vec![pod_of(
        &run,
        "default",
        exited("Succeeded", 0, Some("Completed"), None),
    )];
    let r = run.clone();
    let written = Arc::new(std::sync::Mutex::new(None));
    let w = written.clone();
    let out = scenario_with_store(
        ok(run),
        |s| s.archive = true,
        |store| store.set_archive(Some(details)),
        |mut api| async move {
            api.expect_pod_list(&r, pods).await;
            if let Some(reason) = expect_event {
                api.expect_event(reason).await;
            }
            *w.lock().unwrap() = Some(api.expect_status_patch(&r).await);
            api
        },
    )
    .await;
    let written = written.lock().unwrap().take();
    (out, written)
}

#[tokio::test]
async fn with_archiving_the_status_follows_the_archive_until_it_is_complete() {
    let (out, written) =
        reconcile_archiving(None, archive_at(ArchiveStatus::Archiving, None), None).await;
    let archive = written.expect("status written").archive.expect("archive");
    assert_eq!(
        (archive.state.as_str(), archive.archived_time.clone()),
        ("archiving", None)
    );
    assert_eq!(
        out.result.expect("ok"),
        Action::requeue(crate::controller::ARCHIVE_POLL),
        "looked at again while the archive is on its way"
    );

    let before = Some(archive);
    let (out, written) = reconcile_archiving(
        before,
        archive_at(ArchiveStatus::Complete, None),
        Some("Archived"),
    )
    .await;
    let archive = written.expect("status written").archive.expect("archive");
    assert_eq!(archive.state, "complete");
    assert_eq!(
        archive.archived_time.map(|t| t.0.as_millisecond()),
        Some(1_764_547_200_000)
    );
    assert_eq!(
        out.result.expect("ok"),
        Action::await_change(),
        "nothing more to follow"
    );
}

#[tokio::test]
async fn with_archiving_a_failed_archive_is_a_warning_with_the_reason_and_looked_at_now_and_then() {
    let reason = "the store refused the write: 403 Forbidden";
    let (out, written) = reconcile_archiving(
        Some(ArchiveInfo {
            state: "archiving".into(),
            ..Default::default()
        }),
        archive_at(ArchiveStatus::Failed, Some(reason)),
        Some("ArchiveFailed"),
    )
    .await;
    let archive = written.expect("status written").archive.expect("archive");
    assert_eq!(
        (archive.state.as_str(), archive.message.as_deref()),
        ("failed", Some(reason))
    );
    assert_eq!(
        out.result.expect("ok"),
        Action::requeue(crate::controller::RESYNC),
        "a requeued dead letter shows up"
    );
}
