//! `--auth token`: credentials (header, query, cookie), namespace visibility, cross-site
//! protection, limits, and that tokens never reach the logs.

mod support;

use agentrun_protocol::publish::register_run;
use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_relay::Config;
use agentrun_relay::auth::AuthMode;
use std::path::PathBuf;
use std::time::Duration;
use support::*;

const ALL: &str = "tok-all-5f2c9e";
const TEAM_A: &str = "tok-a-81d3aa";

fn tokens_file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "agentrun-relay-tokens-{}-{:016x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish()
}

fn token_config(redis_url: &str) -> Config {
    let mut c = Config::for_redis(redis_url);
    c.auth = AuthMode::Token;
    c.tokens_file = Some(tokens_file(&format!(
        "# test tokens\n{ALL}\n{TEAM_A} team-a   # only team-a\n"
    )));
    c
}

async fn seed(redis: &RedisServer) {
    let mut conn = redis.conn().await;
    for (name, ns) in [
        ("run-a", Some("team-a")),
        ("run-b", Some("team-b")),
        ("run-local", None),
    ] {
        let mut fields = vec![("variations", "a".to_string())];
        if let Some(ns) = ns {
            fields.push(("namespace", ns.to_string()));
        }
        register_run(
            &mut conn,
            &run_id(name),
            agentrun_protocol::now_ms(),
            &fields,
        )
        .await
        .unwrap();
    }
}

async fn list(client: &reqwest::Client, relay: &Relay, token: &str) -> Vec<String> {
    let v: serde_json::Value = client
        .get(format!("{}/api/runs", relay.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<String> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn token_mode_requires_a_token_from_header_query_or_cookie() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let relay = Relay::start_with(token_config(&redis.url()), "127.0.0.1:0").await;
    let client = reqwest::Client::new();
    let runs = format!("{}/api/runs", relay.base);

    // No token, a wrong token: 401 with a JSON body that says how, and WWW-Authenticate.
    for req in [client.get(&runs), client.get(&runs).bearer_auth("nope")] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer")
        );
    }
    for path in ["/api/runs/run-a", "/api/runs/run-a/events?follow=false"] {
        let r = client
            .get(format!("{}{path}", relay.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = client
        .post(format!("{}/api/runs/run-a/control", relay.base))
        .body(r#"{"action":"stop"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Open without a token: health, readiness, metrics, the UI's files.
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let r = client
            .get(format!("{}{path}", relay.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // Header.
    let r = client.get(&runs).bearer_auth(ALL).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Query (EventSource cannot set headers).
    let r = client
        .get(relay.events_url("run-a", &format!("follow=false&access_token={ALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("event: end"));

    // Cookie from POST /api/session.
    let r = relay.session(&client, "wrong").await;
    assert_eq!(r.status(), 401);
    let r = relay.session(&client, ALL).await;
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();
    assert_eq!(pair, format!("agentrun_token={ALL}"));
    let r = client
        .get(&runs)
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(relay.events_url("run-a", "follow=false"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Behind a TLS proxy the cookie is Secure.
    let r = client
        .post(format!("{}/api/session", relay.base))
        .header("x-forwarded-proto", "https")
        .bearer_auth(ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let secure = r.headers()["set-cookie"].to_str().unwrap();
    assert!(secure.ends_with("; Secure"), "{secure}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    // DELETE /api/session clears it.
    let r = client
        .delete(format!("{}/api/session", relay.base))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn namespaces_limit_what_a_token_sees_and_hidden_runs_look_absent() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let relay = Relay::start_with(token_config(&redis.url()), "127.0.0.1:0").await;
    let client = reqwest::Client::new();

    assert_eq!(
        list(&client, &relay, ALL).await,
        ["run-a", "run-b", "run-local"]
    );
    assert_eq!(list(&client, &relay, TEAM_A).await, ["run-a"]);

    // Visible: get, events, control.
    let get = |run: &str, token: &str| {
        client
            .get(format!("{}/api/runs/{run}", relay.base))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get("run-a", TEAM_A).await.unwrap().status(), 200);
    // Hidden runs answer exactly like absent ones (up to the run id in the message).
    async fn answer(r: reqwest::Response, run: &str) -> (u16, String) {
        let status = r.status().as_u16();
        (status, r.text().await.unwrap().replace(run, "RUN"))
    }
    let absent = answer(get("run-zz", TEAM_A).await.unwrap(), "run-zz").await;
    assert_eq!(absent.0, 404);
    for hidden in ["run-b", "run-local"] {
        assert_eq!(
            answer(get(hidden, TEAM_A).await.unwrap(), hidden).await,
            absent
        );
        let ev = client
            .get(relay.events_url(hidden, "follow=false"))
            .bearer_auth(TEAM_A)
            .send()
            .await
            .unwrap();
        assert_eq!(answer(ev, hidden).await, absent, "events of {hidden}");
        let ctl = client
            .post(format!("{}/api/runs/{hidden}/control", relay.base))
            .bearer_auth(TEAM_A)
            .body(r#"{"action":"pause"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(answer(ctl, hidden).await, absent, "control of {hidden}");
    }
    let ctl = client
        .post(format!("{}/api/runs/run-a/control", relay.base))
        .bearer_auth(TEAM_A)
        .body(r#"{"action":"pause"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ctl.status(), 202);
    relay.shutdown().await;
}

#[tokio::test]
async fn cross_site_control_is_refused_and_there_is_no_cors() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let relay = Relay::start_with(token_config(&redis.url()), "127.0.0.1:0").await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/runs/run-a/control", relay.base);
    let body = r#"{"action":"resume"}"#;

    // Another site's Origin: 403, even with a valid token.
    let r = client
        .post(&url)
        .bearer_auth(ALL)
        .header("origin", "https://evil.example")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("cross-site"));
    let r = client
        .post(format!("{}/api/session", relay.base))
        .header("origin", "https://evil.example")
        .json(&serde_json::json!({ "token": ALL }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The relay's own origin is fine.
    let r = client
        .post(&url)
        .bearer_auth(ALL)
        .header("origin", &relay.base)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // A cookie alone never authorizes a control POST; with X-Agentrun-Request it does.
    let cookie = format!("agentrun_token={ALL}");
    let r = client
        .post(&url)
        .header("cookie", &cookie)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("x-agentrun-request"));
    let r = client
        .post(format!("{url}?access_token={ALL}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .post(&url)
        .header("cookie", &cookie)
        .header("x-agentrun-request", "1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // No CORS headers, for any origin.
    for req in [
        client
            .get(format!("{}/api/runs", relay.base))
            .bearer_auth(ALL),
        client.request(reqwest::Method::OPTIONS, &url),
    ] {
        let r = req
            .header("origin", "https://evil.example")
            .send()
            .await
            .unwrap();
        assert!(
            !r.headers()
                .keys()
                .any(|k| k.as_str().starts_with("access-control-")),
            "{:?}",
            r.headers()
        );
    }
    relay.shutdown().await;
}

fn assert_429(r: &reqwest::Response, what: &str) {
    assert_eq!(r.status(), 429, "{what}");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{what}");
}

#[tokio::test]
async fn each_limit_answers_429_with_retry_after() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let mut config = token_config(&redis.url());
    config.max_sse_per_client = 1;
    config.max_sse_total = 2;
    config.control_per_second = 0.01;
    config.control_burst = 2.0;
    config.max_body_bytes = 200;
    config.max_in_flight = 1;
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    let client = reqwest::Client::new();

    // SSE per client.
    let first = open_sse(&client, &relay, ALL).await;
    assert_eq!(first.status(), 200);
    let r = open_sse(&client, &relay, ALL).await;
    assert_429(&r, "sse per client");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "max-sse-per-client");
    // SSE in total: a second client fits, then the relay is full.
    let second = open_sse(&client, &relay, TEAM_A).await;
    assert_eq!(second.status(), 200);
    let r = open_sse(&client, &relay, ALL).await;
    assert_429(&r, "sse in total");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "max-sse-total");
    assert!(body["error"].as_str().unwrap().contains("limit reached"));
    // The first client's place frees when its connection closes.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    let third = loop {
        let r = open_sse(&client, &relay, ALL).await;
        if r.status() == 200 {
            break r;
        }
        assert_429(&r, "sse while the first closes");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(third);
    drop(second);

    // Control per second: a burst of 2, then 429.
    let url = format!("{}/api/runs/run-a/control", relay.base);
    for _ in 0..2 {
        let r = client
            .post(&url)
            .bearer_auth(TEAM_A)
            .body(r#"{"action":"resume"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let r = client
        .post(&url)
        .bearer_auth(TEAM_A)
        .body(r#"{"action":"resume"}"#)
        .send()
        .await
        .unwrap();
    assert_429(&r, "control");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "control-per-second");

    // Body size: 413 that names the limit.
    let r = client
        .post(&url)
        .bearer_auth(ALL)
        .body(format!(
            r#"{{"action":"stdin","data":"{}"}}"#,
            "x".repeat(1000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("max-body-bytes"));

    // In flight: a request whose body is still arriving holds the only place.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(b"{\"action\":".to_vec())).unwrap();
    let slow = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(&url)
                .bearer_auth(ALL)
                .body(reqwest::Body::wrap_stream(rx))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = client
            .get(format!("{}/healthz", relay.base))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert_429(&r, "in flight");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["limit"], "max-in-flight");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight cap never hit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.unbounded_send(Ok(b"\"stop\"}".to_vec())).unwrap();
    drop(tx);
    let status = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    // ALL's bucket still has its burst.
    assert_eq!(status, 202);
    relay.shutdown().await;
}

/// Runs the relay binary, talks to it with tokens, and reads everything it logged.
#[tokio::test]
async fn tokens_never_appear_in_the_logs() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let file = tokens_file(&format!("{ALL}\n{TEAM_A} team-a\n"));
    let relay = RelayProcess::start(
        &["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"],
        &["--auth", "token", "--tokens-file", file.to_str().unwrap()],
        "trace",
    );
    let base = relay.base.clone();
    let client = reqwest::Client::new();
    for token in [ALL, TEAM_A, "wrong-token-77"] {
        let _ = client
            .get(format!("{base}/api/runs"))
            .bearer_auth(token)
            .send()
            .await;
        let _ = client
            .get(format!(
                "{base}/api/runs/run-a/events?follow=false&access_token={token}"
            ))
            .send()
            .await
            .map(|r| r.bytes());
        let _ = client
            .post(format!("{base}/api/session"))
            .json(&serde_json::json!({ "token": token }))
            .send()
            .await;
        let _ = client
            .post(format!("{base}/api/runs/run-a/control"))
            .bearer_auth(token)
            .body(r#"{"action":"stdin","data":"secret-input-3141"}"#)
            .send()
            .await;
    }
    let log = relay.stop();
    assert!(log.contains("control message published"), "{log}");
    for secret in [ALL, TEAM_A, "wrong-token-77", "secret-input-3141"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn no_auth_on_a_public_address_warns_loudly() {
    let redis = RedisServer::start();
    let relay = RelayProcess::start(
        &["--redis-url", &redis.url(), "--listen", "0.0.0.0:0"],
        &[],
        "info",
    );
    let log = relay.stop();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("AUTHENTICATION IS OFF"), "{log}");
}

fn cors_headers(r: &reqwest::Response) -> Vec<(String, String)> {
    r.headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("access-control-"))
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn cors_origins_get_cors_headers_and_other_origins_do_not() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let mut config = token_config(&redis.url());
    config.cors_origins = vec!["https://ui.example".into(), "http://localhost:3000/".into()];
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    let client = reqwest::Client::new();
    let runs = format!("{}/api/runs", relay.base);
    let control = format!("{}/api/runs/run-a/control", relay.base);

    // A listed origin: its own origin back, no credentials, and the headers a client reads.
    for origin in ["https://ui.example", "http://localhost:3000"] {
        let r = client
            .get(&runs)
            .bearer_auth(ALL)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], origin);
        assert!(h.get("access-control-allow-credentials").is_none());
        assert!(
            h["access-control-expose-headers"]
                .to_str()
                .unwrap()
                .contains("Retry-After")
        );
        assert_eq!(h["vary"], "Origin");
    }
    // Errors carry them too, so the page can read why (401 here).
    let from_ui = |req: reqwest::RequestBuilder| async move {
        let r = req
            .header("origin", "https://ui.example")
            .send()
            .await
            .unwrap();
        let allowed = r.headers().get("access-control-allow-origin").cloned();
        (r.status().as_u16(), allowed)
    };
    let ui_allowed = Some(reqwest::header::HeaderValue::from_static(
        "https://ui.example",
    ));
    assert_eq!(from_ui(client.get(&runs)).await, (401, ui_allowed.clone()));
    // The SSE stream too (EventSource with ?access_token=).
    let sse = relay.events_url("run-a", &format!("follow=false&access_token={ALL}"));
    assert_eq!(from_ui(client.get(sse)).await, (200, ui_allowed.clone()));

    // Preflight: answered before authentication, with the methods and headers allowed.
    let r = client
        .request(reqwest::Method::OPTIONS, &control)
        .header("origin", "https://ui.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-agentrun-request",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://ui.example");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for want in [
        "authorization",
        "content-type",
        "x-agentrun-request",
        "last-event-id",
    ] {
        assert!(allowed.contains(want), "{allowed}");
    }
    assert!(h.get("access-control-max-age").is_some());
    assert!(h.get("access-control-allow-credentials").is_none());
    // The actual cross-origin POST of a listed origin passes the Origin check.
    let post = client
        .post(&control)
        .bearer_auth(ALL)
        .body(r#"{"action":"resume"}"#);
    assert_eq!(from_ui(post).await, (202, ui_allowed));

    // Other origins: no CORS header on anything, preflight refused, POST refused.
    for origin in ["https://evil.example", "https://ui.example.evil", "null"] {
        let r = client
            .get(&runs)
            .bearer_auth(ALL)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(cors_headers(&r), vec![], "{origin}");
        let r = client
            .request(reqwest::Method::OPTIONS, &control)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
        assert_eq!(cors_headers(&r), vec![], "{origin}");
        assert!(r.text().await.unwrap().contains("--cors-origins"));
        let r = client
            .post(&control)
            .bearer_auth(ALL)
            .header("origin", origin)
            .body(r#"{"action":"resume"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
        assert_eq!(cors_headers(&r), vec![], "{origin}");
    }
    // Routes outside /api (health, metrics, the UI) never get CORS headers.
    let r = client
        .get(format!("{}/metrics", relay.base))
        .header("origin", "https://ui.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cors_headers(&r), vec![]);
    relay.shutdown().await;
}

/// A tokens file mounted the way the kubelet mounts a Secret: `DIR/tokens` ->
/// `DIR/..data/tokens`, `..data` a symlink to a versioned directory swapped atomically.
struct SecretMount {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretMount {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("..data/tokens", dir.path().join("tokens")).unwrap();
        let mut m = SecretMount { dir, version: 0 };
        m.update(text);
        m
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    fn update(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let vdir = self.dir.path().join(&version);
        std::fs::create_dir(&vdir).unwrap();
        std::fs::write(vdir.join("tokens"), text).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

async fn status_with(client: &reqwest::Client, relay: &Relay, token: &str) -> u16 {
    client
        .get(format!("{}/api/runs", relay.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_status(client: &reqwest::Client, relay: &Relay, token: &str, want: u16) {
    wait_for(&format!("{token} to answer {want}"), WAIT, || async move {
        (status_with(client, relay, token).await == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_changed_tokens_file_is_used_without_a_restart() {
    const OLD: &str = "tok-old-19ab";
    const KEEP: &str = "tok-keep-2c7d";
    const NEW: &str = "tok-new-3e5f";
    let redis = RedisServer::start();
    seed(&redis).await;
    let mut mount = SecretMount::new(&format!("{OLD}\n{KEEP} team-a\n"));
    let mut config = Config::for_redis(redis.url());
    config.auth = AuthMode::Token;
    config.tokens_file = Some(mount.path());
    config.tokens_reload_seconds = 1;
    config.auth_recheck_seconds = 1;
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    let client = reqwest::Client::new();
    assert_eq!(status_with(&client, &relay, OLD).await, 200);
    assert_eq!(status_with(&client, &relay, NEW).await, 401);
    // A browser session made with the old token.
    let r = relay.session(&client, OLD).await;
    assert_eq!(r.status(), 200);
    let cookie = format!("agentrun_token={OLD}");
    // Open streams of OLD and of KEEP.
    let mut old_stream = SseClient::connect(
        &relay.events_url("run-a", &format!("access_token={OLD}")),
        None,
    )
    .await;
    let mut keep_stream = SseClient::connect(
        &relay.events_url("run-a", &format!("access_token={KEEP}")),
        None,
    )
    .await;
    assert_eq!(old_stream.expect("open").await.event, "open");
    assert_eq!(keep_stream.expect("open").await.event, "open");

    // The Secret changes: OLD removed, NEW added, KEEP now sees every namespace.
    mount.update(&format!("{KEEP}\n{NEW} team-b\n"));
    wait_status(&client, &relay, NEW, 200).await;
    // OLD's open stream ends (without `end`: its EventSource reconnects and gets 401).
    match tokio::time::timeout(WAIT, old_stream.next()).await {
        Ok(None) => {}
        Ok(Some(ev)) => panic!("the removed token's stream goes on: {ev:?}"),
        Err(_) => panic!("the removed token's stream was not ended"),
    }
    // KEEP's stream goes on.
    let mut producer = Producer::new("test");
    let mut conn = redis.conn().await;
    producer
        .output(&mut conn, &run_id("run-a"), "a", &["still here\n".into()])
        .await;
    let ev = keep_stream.expect_entry("an entry for KEEP").await;
    assert_eq!(ev.json()["content"], "still here\n");
    assert_eq!(status_with(&client, &relay, OLD).await, 401);
    let r = client
        .get(format!("{}/api/runs", relay.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a session of a removed token ends");
    let r = client
        .get(relay.events_url("run-b", &format!("follow=false&access_token={OLD}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(list(&client, &relay, NEW).await, ["run-b"]);
    assert_eq!(
        list(&client, &relay, KEEP).await,
        ["run-a", "run-b", "run-local"]
    );

    // A broken version keeps the tokens in use, and says so.
    let errors = |relay: &Relay| {
        relay
            .state
            .metrics()
            .tokens_reloads
            .with_label_values(&["error"])
            .get()
    };
    mount.update("bad;token\n");
    wait_for("the broken file to be noticed", WAIT, || async {
        (errors(&relay) >= 1).then_some(())
    })
    .await;
    assert_eq!(status_with(&client, &relay, NEW).await, 200);
    assert_eq!(status_with(&client, &relay, KEEP).await, 200);
    // So does a file that goes away.
    std::fs::remove_file(
        mount
            .dir
            .path()
            .join(format!("..v{}", mount.version))
            .join("tokens"),
    )
    .unwrap();
    wait_for("the missing file to be noticed", WAIT, || async {
        (errors(&relay) >= 2).then_some(())
    })
    .await;
    assert_eq!(status_with(&client, &relay, NEW).await, 200);
    // Fixed again: the fixed version is used.
    mount.update(&format!("{OLD}\n"));
    wait_status(&client, &relay, NEW, 401).await;
    assert_eq!(status_with(&client, &relay, OLD).await, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn sighup_reads_the_tokens_file_again() {
    const FIRST: &str = "tok-first-7a1b";
    const SECOND: &str = "tok-second-8c2d";
    let redis = RedisServer::start();
    seed(&redis).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{FIRST}\n")).unwrap();
    // Polling off: only the signal makes the relay read the file again.
    let mut relay = RelayProcess::start(
        &["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"],
        &[
            "--auth",
            "token",
            "--tokens-file",
            file.to_str().unwrap(),
            "--tokens-reload-seconds",
            "0",
        ],
        "info",
    );
    let client = reqwest::Client::new();
    let runs = format!("{}/api/runs", relay.base);
    let status = |token: &'static str| {
        let client = client.clone();
        let url = runs.clone();
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(FIRST).await, 200);
    std::fs::write(&file, format!("{SECOND}\n")).unwrap();
    assert_eq!(
        status(SECOND).await,
        401,
        "not read again without the signal"
    );
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    relay.wait_line("tokens file read again");
    assert_eq!(status(SECOND).await, 200);
    assert_eq!(status(FIRST).await, 401);
    let log = relay.stop();
    for secret in [FIRST, SECOND] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}

/// Opens run-a's event stream with `token` (the response is returned as it is).
async fn open_sse(client: &reqwest::Client, relay: &Relay, token: &str) -> reqwest::Response {
    client
        .get(relay.events_url("run-a", ""))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Channels of `run` that the relay has subscribed on Redis (`PUBSUB CHANNELS`), sorted.
async fn subscribed(redis: &RedisServer, run: &str) -> Vec<String> {
    let mut conn = redis.conn().await;
    let mut channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("run:{{{run}}}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    channels.sort();
    channels
}

#[tokio::test]
async fn a_token_for_another_namespace_cannot_add_variations_or_subscriptions_to_a_run() {
    let redis = RedisServer::start();
    seed(&redis).await;
    let relay = Relay::start_with(token_config(&redis.url()), "127.0.0.1:0").await;
    let client = reqwest::Client::new();

    // A viewer allowed to see run-b follows its output.
    let mut viewer = SseClient::connect_as(
        &relay.events_url("run-b", "channels=output"),
        None,
        Some(ALL),
    )
    .await;
    viewer.expect("open").await;
    let before = subscribed(&redis, "run-b").await;
    assert!(!before.is_empty(), "the viewer's feed is subscribed");

    // A token for team-a only asks for made-up variations of team-b's run: each is refused
    // like a missing run, and none of them reaches Redis or the viewer.
    for i in 0..60 {
        let r = client
            .get(relay.events_url("run-b", &format!("variation=fake-{i}")))
            .bearer_auth(TEAM_A)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "request {i}");
    }
    // A caller who may see the run, asking for a variation it does not have, is told so.
    let r = client
        .get(relay.events_url("run-b", "variation=nope"))
        .bearer_auth(ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("nope") && body.contains("variation"),
        "the answer names the variation: {body}"
    );
    assert_eq!(
        subscribed(&redis, "run-b").await,
        before,
        "refused requests left Redis subscriptions behind"
    );
    let mut conn = redis.conn().await;
    let (_, fake_subscribers): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("run:{run-b}:output:fake-0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fake_subscribers, 0);

    // The viewer's stream is untouched: its next event is the run's next entry, and its
    // cursor names only the run's real streams.
    let mut p = Producer::new("p");
    p.output(&mut conn, &run_id("run-b"), "a", &["hello\n".to_owned()])
        .await;
    let ev = viewer.expect_entry("the viewer's next entry").await;
    assert_eq!(ev.event, "output");
    assert_eq!(ev.json()["seq"], 1);
    let cursor = cursor_text(ev.id.as_deref().unwrap());
    assert!(
        !cursor.contains("fake") && !cursor.contains("nope"),
        "the viewer's cursor grew with variations it never asked for: {cursor}"
    );
    relay.shutdown().await;
}
