//! `--auth kubernetes` against kube-sim (TokenReview and SubjectAccessReview from its auth
//! config), through a proxy that counts the reviews the relay sends.

mod support;

use agentrun_protocol::publish::register_run;
use agentrun_protocol::testing::{RedisServer, free_port, wait_for};
use agentrun_relay::Config;
use agentrun_relay::auth::AuthMode;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::*;

const ALICE: &str = "alice-token-4f1c2b";
const BOB: &str = "bob-token-9d3e7a";
const CAROL: &str = "carol-token-0b6f11";

/// alice: get on every AgentRun of team-a, and on team-b's `shared` only; bob: get and
/// update in team-a and team-b; carol: nothing.
const AUTH: &str = r#"
users:
  - {token: alice-token-4f1c2b, username: alice, uid: "1001", groups: [viewers]}
  - {token: bob-token-9d3e7a, username: bob, uid: "1002"}
  - {token: carol-token-0b6f11, username: carol, uid: "1003"}
rules:
  - subjects: [alice]
    verbs: [get]
    apiGroups: [agentrun.dev]
    resources: [agentruns]
    namespaces: [team-a]
  - subjects: [alice]
    verbs: [get]
    apiGroups: [agentrun.dev]
    resources: [agentruns]
    namespaces: [team-b]
    resourceNames: [shared]
  - subjects: [bob]
    verbs: [get, update]
    apiGroups: [agentrun.dev]
    resources: [agentruns]
    namespaces: [team-a, team-b]
"#;

/// kube-sim behind a proxy that counts the reviews it forwards.
struct Cluster {
    sim: kube_sim::KubeSim,
    kubeconfig: PathBuf,
    token_reviews: Arc<AtomicUsize>,
    access_reviews: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let sim = kube_sim::start(kube_sim::Options {
            kubelet: false,
            auth: serde_yaml::from_str(AUTH).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        let token_reviews = Arc::new(AtomicUsize::new(0));
        let access_reviews = Arc::new(AtomicUsize::new(0));
        let proxy = proxy(
            sim.url.clone(),
            token_reviews.clone(),
            access_reviews.clone(),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kube_sim::kubeconfig_yaml(&proxy)).unwrap();
        Cluster {
            sim,
            kubeconfig,
            token_reviews,
            access_reviews,
            _dir: dir,
        }
    }

    fn reviews(&self) -> (usize, usize) {
        (
            self.token_reviews.load(Ordering::SeqCst),
            self.access_reviews.load(Ordering::SeqCst),
        )
    }
}

/// Forwards every request to `upstream`, counting TokenReviews and SubjectAccessReviews.
async fn proxy(upstream: String, tokens: Arc<AtomicUsize>, access: Arc<AtomicUsize>) -> String {
    use axum::response::IntoResponse;
    let client = reqwest::Client::new();
    let handler = move |req: axum::extract::Request| {
        let (client, upstream, tokens, access) = (
            client.clone(),
            upstream.clone(),
            tokens.clone(),
            access.clone(),
        );
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            if path.contains("/tokenreviews") {
                tokens.fetch_add(1, Ordering::SeqCst);
            } else if path.contains("/subjectaccessreviews") {
                access.fetch_add(1, Ordering::SeqCst);
            }
            let method = req.method().clone();
            let ct = req.headers().get("content-type").cloned();
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            let mut fwd = client
                .request(method, format!("{upstream}{path}"))
                .body(body);
            if let Some(ct) = ct {
                fwd = fwd.header("content-type", ct);
            }
            let resp = fwd.send().await.unwrap();
            let status = resp.status();
            let ct = resp.headers().get("content-type").cloned();
            let bytes = resp.bytes().await.unwrap();
            let mut out = (status, bytes).into_response();
            if let Some(ct) = ct {
                out.headers_mut().insert("content-type", ct);
            }
            out
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, axum::Router::new().fallback(handler)).await;
    });
    url
}

fn kube_config(redis_url: &str, kubeconfig: PathBuf, cache_seconds: u64) -> Config {
    let mut c = Config::for_redis(redis_url);
    c.auth = AuthMode::Kubernetes;
    c.kubeconfig = Some(kubeconfig);
    c.auth_cache_seconds = cache_seconds;
    c
}

/// Runs as the operator registers them: state hash with the AgentRun's namespace and name.
async fn seed(redis: &RedisServer) {
    let mut conn = redis.conn().await;
    for (run, target) in [
        ("k-alpha", Some(("team-a", "alpha"))),
        ("k-beta", Some(("team-b", "beta"))),
        ("k-shared", Some(("team-b", "shared"))),
        ("k-gamma", Some(("team-c", "gamma"))),
        ("k-local", None),
    ] {
        let mut fields = vec![("variations", "a".to_string())];
        if let Some((ns, name)) = target {
            fields.push(("namespace", ns.to_string()));
            fields.push(("name", name.to_string()));
        }
        register_run(
            &mut conn,
            &run_id(run),
            agentrun_protocol::now_ms(),
            &fields,
        )
        .await
        .unwrap();
    }
}

async fn get(client: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    client.get(url).bearer_auth(token).send().await.unwrap()
}

async fn list(client: &reqwest::Client, relay: &Relay, token: &str) -> Vec<String> {
    let r = get(client, &format!("{}/api/runs", relay.base), token).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let mut names: Vec<String> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

async fn control(
    client: &reqwest::Client,
    relay: &Relay,
    run: &str,
    token: &str,
) -> reqwest::Response {
    client
        .post(format!("{}/api/runs/{run}/control", relay.base))
        .bearer_auth(token)
        .body(r#"{"action":"pause"}"#)
        .send()
        .await
        .unwrap()
}

/// Status and body, with the run id replaced, to compare a hidden run with a missing one.
async fn answer(r: reqwest::Response, run: &str) -> (u16, String) {
    let status = r.status().as_u16();
    (status, r.text().await.unwrap().replace(run, "RUN"))
}

#[tokio::test]
async fn kubernetes_tokens_and_rbac_on_the_agentrun_decide_what_a_caller_sees_and_controls() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let cluster = Cluster::start().await;
    let relay = Relay::start_with(
        kube_config(&redis.url(), cluster.kubeconfig.clone(), 10),
        "127.0.0.1:0",
    )
    .await;
    let client = reqwest::Client::new();
    let runs = format!("{}/api/runs", relay.base);

    // No token, an unknown token: 401, saying how, and that the relay wants Kubernetes tokens.
    for req in [
        client.get(&runs),
        client.get(&runs).bearer_auth("not-a-token"),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["auth"], "kubernetes");
        assert!(
            body["error"].as_str().unwrap().contains("Kubernetes"),
            "{body}"
        );
    }
    let r = client
        .get(relay.events_url("k-alpha", "follow=false&access_token=not-a-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // alice: every run of team-a, and team-b's `shared`; never a local run.
    assert_eq!(list(&client, &relay, ALICE).await, ["k-alpha", "k-shared"]);
    // bob: team-a and team-b.
    assert_eq!(
        list(&client, &relay, BOB).await,
        ["k-alpha", "k-beta", "k-shared"]
    );
    // carol: nothing.
    assert_eq!(list(&client, &relay, CAROL).await, Vec::<String>::new());

    // alice reads a run and its events.
    let r = get(&client, &format!("{runs}/k-alpha"), ALICE).await;
    assert_eq!(r.status(), 200);
    let r = get(&client, &format!("{runs}/k-shared"), ALICE).await;
    assert_eq!(r.status(), 200);
    let mut producer = Producer::new("test");
    let mut conn = redis.conn().await;
    producer
        .output(&mut conn, &run_id("k-alpha"), "a", &["hello\n".into()])
        .await;
    let mut sse = SseClient::connect(
        &relay.events_url("k-alpha", &format!("access_token={ALICE}")),
        None,
    )
    .await;
    let ev = sse.expect_entry("alice's first entry").await;
    assert_eq!(ev.event, "output");
    assert_eq!(ev.json()["content"], "hello\n");
    producer
        .output(&mut conn, &run_id("k-alpha"), "a", &["live\n".into()])
        .await;
    assert_eq!(
        sse.expect_entry("a live entry").await.json()["content"],
        "live\n"
    );
    drop(sse);

    // alice may not control: 403 that names what is missing.
    let r = control(&client, &relay, "k-alpha", ALICE).await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("user alice may not update agentruns/alpha in namespace team-a"),
        "{msg}"
    );
    // bob may.
    let r = control(&client, &relay, "k-alpha", BOB).await;
    assert_eq!(r.status(), 202);
    let r = control(&client, &relay, "k-beta", BOB).await;
    assert_eq!(r.status(), 202);

    // A run the caller may not see answers exactly like a missing one: get, events, control.
    let absent_get = answer(
        get(&client, &format!("{runs}/k-none"), CAROL).await,
        "k-none",
    )
    .await;
    assert_eq!(absent_get.0, 404);
    let absent_events = answer(
        get(&client, &relay.events_url("k-none", "follow=false"), CAROL).await,
        "k-none",
    )
    .await;
    let absent_control = answer(control(&client, &relay, "k-none", CAROL).await, "k-none").await;
    for (who, run) in [
        (CAROL, "k-alpha"),
        (ALICE, "k-beta"),
        (ALICE, "k-gamma"),
        (BOB, "k-gamma"),
        (BOB, "k-local"),
    ] {
        let what = format!("{run} for {who}");
        assert_eq!(
            answer(get(&client, &format!("{runs}/{run}"), who).await, run).await,
            absent_get,
            "{what}"
        );
        assert_eq!(
            answer(
                get(&client, &relay.events_url(run, "follow=false"), who).await,
                run
            )
            .await,
            absent_events,
            "{what}"
        );
        assert_eq!(
            answer(control(&client, &relay, run, who).await, run).await,
            absent_control,
            "{what}"
        );
    }

    // The browser session: POST /api/session checks the token, the cookie then works.
    let r = relay.session(&client, "not-a-token").await;
    assert_eq!(r.status(), 401);
    let r = relay.session(&client, ALICE).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["auth"], "kubernetes");
    let r = client
        .get(&runs)
        .header("cookie", format!("agentrun_token={ALICE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    relay.shutdown().await;
    cluster.sim.shutdown().await;
}

#[tokio::test]
async fn review_answers_are_cached_for_the_configured_time() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let cluster = Cluster::start().await;
    let relay = Relay::start_with(
        kube_config(&redis.url(), cluster.kubeconfig.clone(), 300),
        "127.0.0.1:0",
    )
    .await;
    let client = reqwest::Client::new();
    let run = format!("{}/api/runs/k-alpha", relay.base);

    assert_eq!(get(&client, &run, ALICE).await.status(), 200);
    let (tokens, access) = cluster.reviews();
    assert_eq!(tokens, 1, "one TokenReview");
    assert!(access >= 1, "at least one SubjectAccessReview");
    // The same requests again: answered from the cache, the API server is not asked.
    for _ in 0..5 {
        assert_eq!(get(&client, &run, ALICE).await.status(), 200);
        assert_eq!(
            control(&client, &relay, "k-alpha", ALICE).await.status(),
            403
        );
    }
    let after_control = cluster.reviews();
    assert_eq!(after_control.0, 1, "no TokenReview more");
    assert_eq!(
        after_control.1,
        access + 1,
        "one SubjectAccessReview for 'update', then cached"
    );
    // A list asks once per namespace (and per run only where the namespace is not allowed
    // as a whole), then is cached too.
    let first = list(&client, &relay, ALICE).await;
    let after_list = cluster.reviews();
    assert_eq!(list(&client, &relay, ALICE).await, first);
    assert_eq!(cluster.reviews(), after_list);
    // The relay's own count agrees with the proxy's.
    let text = metrics_text_with(&client, &relay.base).await;
    assert_eq!(
        metric(&text, "agentrun_relay_auth_reviews_total{kind=\"token\"}"),
        after_list.0 as u64
    );
    assert_eq!(
        metric(&text, "agentrun_relay_auth_reviews_total{kind=\"access\"}"),
        after_list.1 as u64
    );
    assert!(metric(&text, "agentrun_relay_auth_cache_hits_total") >= 10);
    relay.shutdown().await;

    // With the cache off, every request asks again.
    let relay = Relay::start_with(
        kube_config(&redis.url(), cluster.kubeconfig.clone(), 0),
        "127.0.0.1:0",
    )
    .await;
    let run = format!("{}/api/runs/k-alpha", relay.base);
    let before = cluster.reviews();
    for _ in 0..3 {
        assert_eq!(get(&client, &run, ALICE).await.status(), 200);
    }
    let after = cluster.reviews();
    assert_eq!(after.0 - before.0, 3);
    assert_eq!(after.1 - before.1, 3);
    relay.shutdown().await;
    cluster.sim.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_api_server_is_503_not_401() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(&kubeconfig, kube_sim::kubeconfig_yaml(&nowhere)).unwrap();
    let relay = Relay::start_with(kube_config(&redis.url(), kubeconfig, 10), "127.0.0.1:0").await;
    let client = reqwest::Client::new();
    for url in [
        format!("{}/api/runs", relay.base),
        format!("{}/api/runs/k-alpha", relay.base),
        relay.events_url("k-alpha", "follow=false"),
    ] {
        let r = get(&client, &url, ALICE).await;
        assert_eq!(r.status(), 503, "{url}");
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body["error"].as_str().unwrap();
        assert!(
            msg.contains("Kubernetes API server") && msg.contains("127.0.0.1"),
            "{msg}"
        );
    }
    // Without a token there is nothing to ask: still 401.
    let r = client
        .get(format!("{}/api/runs", relay.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    relay.shutdown().await;
}

#[tokio::test]
async fn kubernetes_tokens_never_appear_in_the_logs() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let cluster = Cluster::start().await;
    let relay = RelayProcess::start(
        &["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"],
        &[
            "--auth",
            "kubernetes",
            "--kubeconfig",
            cluster.kubeconfig.to_str().unwrap(),
        ],
        "trace",
    );
    let base = relay.base.clone();
    let client = reqwest::Client::new();
    for token in [ALICE, BOB, CAROL, "wrong-token-55"] {
        let _ = get(&client, &format!("{base}/api/runs"), token).await;
        let _ = get(
            &client,
            &format!("{base}/api/runs/k-alpha/events?follow=false"),
            token,
        )
        .await
        .bytes()
        .await;
        let _ = client
            .post(format!("{base}/api/runs/k-alpha/control"))
            .bearer_auth(token)
            .body(r#"{"action":"pause"}"#)
            .send()
            .await;
    }
    wait_for("the reviews", WAIT, || async {
        (cluster.reviews().0 >= 4).then_some(())
    })
    .await;
    let log = relay.stop();
    assert!(log.contains("control message published"), "{log}");
    for secret in [ALICE, BOB, CAROL, "wrong-token-55"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
    cluster.sim.shutdown().await;
}
