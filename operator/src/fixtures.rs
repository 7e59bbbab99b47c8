//! Test fixtures: builders for runs and pods, and the `ApiServerVerifier` that plays the API
//! server for reconcile scenario tests.

use std::sync::Arc;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::controller::{Clock, Context, FINALIZER};
use crate::crd::{AgentRun, AgentRunSpec, AgentRunStatus, Variation};
use crate::metrics::Metrics;
use crate::pod;
use crate::store::RecordingStore;

/// The API server's answer when Pod Security admission (`restricted`) refuses a pod.
pub const POD_SECURITY_REFUSAL: &str = r#"pods "hello-default" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false (container "x" must set securityContext.allowPrivilegeEscalation=false), runAsNonRoot != true (pod or container "agent" must set securityContext.runAsNonRoot=true)"#;
/// The API server's answer when a ResourceQuota on `limits.cpu` is used up.
pub const EXCEEDED_QUOTA: &str = r#"pods "hello-default" is forbidden: exceeded quota: q, requested: limits.cpu=500m, used: limits.cpu=0, limited: limits.cpu=100m"#;
/// The API server's answer when a ResourceQuota on `limits.cpu` meets a container without one.
pub const MUST_SPECIFY_LIMITS: &str =
    "failed quota: q: must specify limits.cpu for: agentrun-sidecar";

/// A `kind: Status` failure body, as the API server sends it.
pub fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "metadata": {},
        "code": code, "reason": reason, "message": message,
    })
}

/// The error kube returns for such an answer.
pub fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
    kube::Error::Api(Box::new(
        serde_json::from_value(status_body(code, reason, message)).expect("a Status"),
    ))
}

/// The fixed "now" of every test.
pub fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().expect("valid timestamp")
}

/// A time `secs` seconds before [`now`].
pub fn ago(secs: i64) -> Time {
    Time(now() - k8s_openapi::jiff::SignedDuration::from_secs(secs))
}

/// Settings with a fixed sidecar image.
pub fn settings() -> Settings {
    Settings {
        sidecar_image: "ghcr.io/agentrun/agentrun-sidecar:0.1.0".into(),
        redis_url: "redis://agentrun-redis:6379".into(),
        redis_password: Some("s3cret".into()),
        run_credential_key: Some("test-key".into()),
        relay_url: Some("https://agentrun.example.com".into()),
        ..Settings::default()
    }
}

impl AgentRun {
    /// A stored run `default/hello` running `sh -c 'echo hello'` in busybox.
    pub fn test() -> Self {
        let mut run = AgentRun::new(
            "hello",
            AgentRunSpec {
                image: "busybox:1.36".into(),
                command: vec!["sh".into(), "-c".into()],
                args: vec!["echo hello".into()],
                ..Default::default()
            },
        );
        run.meta_mut().namespace = Some("default".into());
        run.meta_mut().uid = Some("0f1e2d3c-aaaa-bbbb-cccc-000000000001".into());
        run.meta_mut().generation = Some(1);
        run.meta_mut().resource_version = Some("100".into());
        run.meta_mut().creation_timestamp = Some(ago(600));
        run
    }

    /// With the operator's finalizer.
    pub fn finalized(mut self) -> Self {
        self.finalizers_mut().push(FINALIZER.into());
        self
    }

    /// Being deleted.
    pub fn deleting(mut self) -> Self {
        self.meta_mut().deletion_timestamp = Some(ago(1));
        self
    }

    /// With named variations.
    pub fn with_variations(mut self, names: &[&str]) -> Self {
        self.spec.variations = names
            .iter()
            .map(|n| Variation {
                name: (*n).into(),
                ..Default::default()
            })
            .collect();
        self
    }

    /// With a status.
    pub fn with_status(mut self, status: AgentRunStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// The pod the operator builds for a variation, with a status.
pub fn pod_of(run: &AgentRun, variation: &str, status: PodStatus) -> Pod {
    let v = run
        .spec
        .resolved_variations()
        .into_iter()
        .find(|v| v.name == variation)
        .expect("variation exists");
    let mut pod = pod::build_pod(run, &v, &settings()).expect("pod builds");
    pod.status = Some(status);
    pod
}

fn agent_status(state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: pod::AGENT_CONTAINER.into(),
        image: "busybox:1.36".into(),
        image_id: String::new(),
        ready: false,
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    }
}

/// Pod status: agent running.
pub fn running() -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        container_statuses: Some(vec![agent_status(ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(ago(60)),
            }),
            ..Default::default()
        })]),
        ..Default::default()
    }
}

/// Pod status: agent exited.
pub fn exited(
    pod_phase: &str,
    code: i32,
    reason: Option<&str>,
    message: Option<&str>,
) -> PodStatus {
    PodStatus {
        phase: Some(pod_phase.into()),
        container_statuses: Some(vec![agent_status(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: reason.map(Into::into),
                message: message.map(Into::into),
                started_at: Some(ago(60)),
                finished_at: Some(ago(5)),
                ..Default::default()
            }),
            ..Default::default()
        })]),
        ..Default::default()
    }
}

/// Pod status: not schedulable.
pub fn unschedulable() -> PodStatus {
    PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// Pod status: a container waits with a reason (image pull errors and the like).
pub fn waiting(container: &str, init: bool, reason: &str, message: &str) -> PodStatus {
    let status = ContainerStatus {
        name: container.into(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(message.into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        init_container_statuses: init.then(|| vec![status.clone()]),
        container_statuses: (!init).then(|| vec![status]),
        ..Default::default()
    }
}

/// Pod status: evicted by the kubelet.
pub fn evicted() -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Evicted".into()),
        message: Some("The node was low on resource: memory.".into()),
        ..Default::default()
    }
}

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Pending = (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
);

/// Plays the API server: each `expect` call checks the next request and answers it.
pub struct ApiServerVerifier {
    handle: ApiServerHandle,
    /// A request that [`ApiServerVerifier::answer_while`] looked at and left for the next call.
    pending: Option<Pending>,
}

/// One request the verifier saw.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub body: Value,
}

impl ApiServerVerifier {
    fn new(handle: ApiServerHandle) -> Self {
        Self {
            handle,
            pending: None,
        }
    }

    async fn next(&mut self, what: &str) -> Pending {
        if let Some(pending) = self.pending.take() {
            return pending;
        }
        self.handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {what}, but the client sent nothing more"))
    }

    /// Reads the request's body and sends the answer that `respond` makes from it.
    async fn reply((request, send): Pending, respond: impl FnOnce(&Value) -> (u16, Value)) -> Seen {
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        let (status, response) = respond(&body);
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&response).expect("json")))
            .expect("response");
        send.send_response(response);
        Seen { method, uri, body }
    }

    /// Checks that the next request has `method` and a URI containing `uri`, answers with
    /// `status` and `response`, and returns what was sent.
    pub async fn expect(
        &mut self,
        method: Method,
        uri: &str,
        status: u16,
        response: Value,
    ) -> Seen {
        let next = self.next(&format!("{method} {uri}")).await;
        let seen = Self::reply(next, |_| (status, response)).await;
        assert_eq!(
            seen.method, method,
            "method of {} (expected {method} {uri}); body: {}",
            seen.uri, seen.body
        );
        assert!(
            seen.uri.contains(uri),
            "expected a URI containing {uri}, got {} {}",
            seen.method,
            seen.uri
        );
        seen
    }

    /// Checks the next request like [`ApiServerVerifier::expect`] and refuses it with a
    /// `kind: Status` body of `code` (and its usual reason) and `message`.
    pub async fn refuse(&mut self, method: Method, uri: &str, code: u16, message: &str) -> Seen {
        let reason = match code {
            403 => "Forbidden",
            404 => "NotFound",
            409 => "AlreadyExists",
            422 => "Invalid",
            _ => "InternalError",
        };
        self.expect(method, uri, code, status_body(code, reason, message))
            .await
    }

    /// Takes the next request and never answers it, like a hung API server (returns when the
    /// client goes away).
    pub async fn hold_next(&mut self) {
        let held = self.next("a request").await;
        self.handle.next_request().await;
        drop(held);
    }

    /// Takes every request and answers none (until the client goes away).
    pub async fn hold_all(mut self) {
        let mut held = Vec::new();
        while let Some(next) = match self.pending.take() {
            Some(p) => Some(p),
            None => self.handle.next_request().await,
        } {
            held.push(next);
        }
    }

    /// Answers the next request with what `respond` makes of its body when `matches` accepts
    /// its method and URI; otherwise leaves it for the next call and returns `None` (also when
    /// the client sent nothing more).
    pub async fn answer_while(
        &mut self,
        matches: impl Fn(&Method, &str) -> bool,
        respond: impl FnOnce(&Value) -> (u16, Value),
    ) -> Option<Seen> {
        let next = match self.pending.take() {
            Some(pending) => pending,
            None => self.handle.next_request().await?,
        };
        if !matches(next.0.method(), &next.0.uri().to_string()) {
            self.pending = Some(next);
            return None;
        }
        Some(Self::reply(next, respond).await)
    }

    /// Answers an event creation (events.k8s.io) and returns its body.
    pub async fn expect_event(&mut self, reason: &str) -> Value {
        let seen = self
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                201,
                json!({}),
            )
            .await;
        let mut body = seen.body;
        assert_eq!(body["reason"], reason, "event reason; event: {body}");
        body["metadata"] = Value::Null;
        body
    }

    /// Answers a pod list for the run with these pods.
    pub async fn expect_pod_list(&mut self, run: &AgentRun, pods: Vec<Pod>) {
        let seen = self
            .expect(Method::GET, "/api/v1/namespaces/default/pods?", 200, json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": pods
            }))
            .await;
        let selector = format!("labelSelector=agentrun.dev%2Frun%3D{}", run.name_any());
        assert!(
            seen.uri.contains(&selector),
            "pod list must select the run's pods: {}",
            seen.uri
        );
    }

    /// Answers the status patch of the run and returns the status that was sent.
    pub async fn expect_status_patch(&mut self, run: &AgentRun) -> AgentRunStatus {
        let uri = format!(
            "/apis/agentrun.dev/v1alpha1/namespaces/default/agentruns/{}/status?",
            run.name_any()
        );
        let answer = serde_json::to_value(run).expect("json");
        let seen = self.expect(Method::PATCH, &uri, 200, answer).await;
        assert!(
            seen.uri.contains("fieldManager=agentrun-operator") && seen.uri.contains("force=true"),
            "status is written with server-side apply: {}",
            seen.uri
        );
        assert_eq!(seen.body["apiVersion"], "agentrun.dev/v1alpha1");
        assert_eq!(seen.body["kind"], "AgentRun");
        serde_json::from_value(seen.body["status"].clone()).expect("status parses")
    }

    /// Asserts that the client sends nothing more (call after the reconcile finished and the
    /// context was dropped).
    pub async fn expect_nothing_more(mut self) {
        let next = match self.pending.take() {
            Some(pending) => Some(pending),
            None => self.handle.next_request().await,
        };
        if let Some((request, _)) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// Runs `client_side` with a client whose API server `script` plays, then checks that the client
/// sent nothing beyond the script (the client is dropped when `client_side` ends); returns what
/// `client_side` returned.
pub async fn against_script<S, SF, C, CF, T>(script: S, client_side: C) -> T
where
    S: FnOnce(ApiServerVerifier) -> SF,
    SF: Future<Output = ApiServerVerifier> + Send + 'static,
    C: FnOnce(Client) -> CF,
    CF: Future<Output = T>,
{
    let (client, api) = mock_client();
    let server = tokio::spawn(script(api));
    let out = client_side(client).await;
    server
        .await
        .expect("the scenario's expectations held")
        .expect_nothing_more()
        .await;
    out
}

/// A client talking to a fresh [`ApiServerVerifier`].
pub fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        Client::new(service, "default"),
        ApiServerVerifier::new(handle),
    )
}

impl Context {
    /// A context whose client talks to an [`ApiServerVerifier`], with a recording Redis store
    /// and a fixed clock.
    pub fn test() -> (Arc<Self>, ApiServerVerifier, Arc<RecordingStore>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let store = RecordingStore::shared();
        let ctx = Context {
            client: client.clone(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "agentrun-operator".into(),
                    instance: Some("test".into()),
                },
            ),
            metrics: Arc::new(Metrics::new()),
            settings: settings(),
            store: store.clone(),
            clock: Clock::Fixed(now()),
        };
        (Arc::new(ctx), ApiServerVerifier::new(handle), store)
    }
}
