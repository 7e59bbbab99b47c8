//! `--auth token`: credentials (header, query, cookie), namespace visibility, cross-site
//! protection, limits, and that tokens never reach the logs.

mod support;

use agentrun_protocol::publish::register_run;
use agentrun_protocol::testing::RedisServer;
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
    let r = client
        .post(format!("{}/api/session", relay.base))
        .json(&serde_json::json!({ "token": "wrong" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{}/api/session", relay.base))
        .json(&serde_json::json!({ "token": ALL }))
        .send()
        .await
        .unwrap();
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
    let first = client
        .get(relay.events_url("run-a", ""))
        .bearer_auth(ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let r = client
        .get(relay.events_url("run-a", ""))
        .bearer_auth(ALL)
        .send()
        .await
        .unwrap();
    assert_429(&r, "sse per client");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "max-sse-per-client");
    // SSE in total: a second client fits, then the relay is full.
    let second = client
        .get(relay.events_url("run-a", ""))
        .bearer_auth(TEAM_A)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let r = client
        .get(relay.events_url("run-a", ""))
        .bearer_auth(ALL)
        .send()
        .await
        .unwrap();
    assert_429(&r, "sse in total");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["limit"], "max-sse-total");
    assert!(body["error"].as_str().unwrap().contains("limit reached"));
    // The first client's place frees when its connection closes.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    let third = loop {
        let r = client
            .get(relay.events_url("run-a", ""))
            .bearer_auth(ALL)
            .send()
            .await
            .unwrap();
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

/// Reads a child's log (tracing writes to stdout) on a thread (so the pipe never fills), ANSI colours removed.
fn lines(stderr: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut clean = String::new();
            let mut esc = false;
            for c in line.chars() {
                match (esc, c) {
                    (false, '\x1b') => esc = true,
                    (false, c) => clean.push(c),
                    (true, 'm') => esc = false,
                    (true, _) => {}
                }
            }
            if tx.send(clean).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects lines until one contains `needle`; panics after the deadline.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, log: &mut String, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no line with {needle:?} ({e}):\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if line.contains(needle) {
            return line;
        }
    }
}

/// Runs the relay binary, talks to it with tokens, and reads everything it logged.
#[tokio::test]
async fn tokens_never_appear_in_the_logs() {
    use std::process::{Command, Stdio};
    let redis = RedisServer::start();
    seed(&redis).await;
    let file = tokens_file(&format!("{ALL}\n{TEAM_A} team-a\n"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentrun-relay"))
        .args(["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"])
        .args(["--auth", "token", "--tokens-file"])
        .arg(&file)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(child.stdout.take().unwrap());
    let mut log = String::new();
    let line = wait_line(&rx, &mut log, "agentrun-relay serving");
    let at = line.find("listen=").unwrap() + "listen=".len();
    let addr = line[at..].split_whitespace().next().unwrap().to_owned();
    let base = format!("http://{addr}");
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
    // Every request above has been answered, so its log lines are written (stdout is
    // line-buffered); stop the relay and read to the end of its output.
    let _ = child.kill();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("the relay's output did not end: {e}"),
        }
    }
    let _ = child.wait();
    assert!(log.contains("control message published"), "{log}");
    for secret in [ALL, TEAM_A, "wrong-token-77", "secret-input-3141"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn no_auth_on_a_public_address_warns_loudly() {
    use std::process::{Command, Stdio};
    let redis = RedisServer::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentrun-relay"))
        .args(["--redis-url", &redis.url(), "--listen", "0.0.0.0:0"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("AGENTRUN_AUTH")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(child.stdout.take().unwrap());
    let mut log = String::new();
    wait_line(&rx, &mut log, "agentrun-relay serving");
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("AUTHENTICATION IS OFF"), "{log}");
}
