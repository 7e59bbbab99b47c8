//! Runs Redis no longer holds, served from their archive (`--archive-url`): against a real
//! Redis and the relay binary, with a folder store and with a real S3 server (`s3s-fs`) on
//! loopback. Runs are published, finished and archived with the archiver's own writer, then
//! their Redis keys are deleted; the relay must serve them as it served the live run.

mod support;

use agentrun_archiver::testing::Store;
use agentrun_archiver::writer::{WriteOptions, archive_run};
use agentrun_protocol::archive::ArchiveRequest;
use agentrun_protocol::publish::register_run;
use agentrun_protocol::testing::RedisServer;
use agentrun_protocol::{RedisConn, RunId, RunState, StreamName};
use std::collections::{BTreeMap, BTreeSet};
use support::*;

const ALL: &str = "token-all-5b1c";
const TEAM_A: &str = "token-team-a-77e2";

/// The relay binary with `--archive-url` for `store` and tokens: ALL sees every namespace,
/// TEAM_A only `team-a`.
fn relay(redis: &RedisServer, store: &Store, tokens: &tempfile::NamedTempFile) -> RelayProcess {
    let url = store.url();
    RelayProcess::start_with_env(
        &["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"],
        &[
            "--archive-url",
            &url,
            "--auth",
            "token",
            "--tokens-file",
            tokens.path().to_str().unwrap(),
        ],
        &store.env(),
        "info",
    )
}

fn tokens() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{ALL}\n{TEAM_A} team-a\n")).unwrap();
    file
}

/// Registers a run created at `created` ms in `namespace`, with variations `a` and `b`.
async fn register_at(conn: &mut RedisConn, run: &RunId, created: u64, namespace: &str) {
    let name = run
        .as_str()
        .split('.')
        .nth(1)
        .unwrap_or(run.as_str())
        .to_owned();
    register_run(
        conn,
        run,
        created,
        &[
            ("variations", "a,b".to_owned()),
            ("namespace", namespace.to_owned()),
            ("name", name),
        ],
    )
    .await
    .unwrap();
}

/// Archives a run with the archiver's writer, then deletes every Redis key it had.
async fn archive_and_forget(conn: &mut RedisConn, store: &Store, run: &RunId) {
    archive_only(conn, store, run).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("run:{{{run}}}:*"))
        .query_async(conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(conn)
        .await
        .unwrap();
}

/// Archives a run with the archiver's writer, keeping it in Redis.
async fn archive_only(conn: &mut RedisConn, store: &Store, run: &RunId) {
    let request = ArchiveRequest::new(run.clone(), 0, "test");
    let done = archive_run(conn, &store.open(), &request, &WriteOptions::default())
        .await
        .unwrap();
    assert!(done.is_some(), "{run} was archived");
}

async fn get(client: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    client.get(url).bearer_auth(token).send().await.unwrap()
}

/// The whole body of a finite response, keep-alive comments left out.
async fn body(resp: reqwest::Response) -> String {
    assert!(resp.status().is_success(), "{}", resp.status());
    let text = resp.text().await.unwrap();
    text.replace(": keep-alive\n\n", "")
}

/// Events of an SSE text.
fn events(text: &str) -> Vec<SseEvent> {
    let mut parser = agentrun_protocol::sse::Parser::default();
    parser.push(text.as_bytes());
    std::iter::from_fn(|| parser.next_event()).collect()
}

/// Entries of SSE events, per stream: (channel, variation) → [(seq, data)].
fn per_stream(events: &[SseEvent]) -> BTreeMap<(String, String), Vec<(u64, String)>> {
    let mut out: BTreeMap<(String, String), Vec<(u64, String)>> = BTreeMap::new();
    for e in events {
        if matches!(
            e.event.as_str(),
            "open" | "end" | "reset" | "trimmed" | "shutdown"
        ) {
            continue;
        }
        let v = e.json();
        let key = (
            v["channel"].as_str().unwrap().to_owned(),
            v["variation"].as_str().unwrap_or("").to_owned(),
        );
        out.entry(key)
            .or_default()
            .push((v["seq"].as_u64().unwrap(), e.data.clone()));
    }
    out
}

/// A run published in two halves: a cursor is taken from a live SSE read after the first
/// half, while the run is running. Returns that cursor and the events read up to it.
async fn publish_with_live_cursor(
    conn: &mut RedisConn,
    relay: &RelayProcess,
    run: &RunId,
) -> (String, Vec<SseEvent>) {
    register_at(conn, run, agentrun_protocol::now_ms(), "default").await;
    let mut p = Producer::new("agent");
    // Entries of up to 60 KiB, some binary, so the archive holds several blocks.
    let big = |i: u64| -> Vec<u8> {
        let mut v = format!("line {i}: ✓ héllo\n").into_bytes();
        if i.is_multiple_of(5) {
            v.extend((0..60_000).map(|j| (j * 7 + i as usize) as u8));
            v.push(b'\n');
        }
        v
    };
    for v in ["a", "b"] {
        let contents: Vec<Vec<u8>> = (1..=60).map(big).collect();
        p.publish(
            conn,
            run,
            &StreamName::Output(var(v)),
            agentrun_protocol::EntryType::Output,
            &contents,
        )
        .await
        .unwrap();
    }
    p.status(
        conn,
        run,
        agentrun_protocol::StatusEvent::new(None, RunState::Running),
    )
    .await;
    // A live read, following, until it has every entry so far.
    let url = format!("{}?access_token={ALL}", relay_events(relay, run, ""));
    let mut sse = SseClient::connect(&url, None).await;
    let mut seen = Vec::new();
    let mut outputs = 0;
    while outputs < 120 {
        let e = sse.expect("the first half, live").await;
        if e.event == "output" {
            outputs += 1;
        }
        seen.push(e);
    }
    let cursor = sse.last_id.clone().unwrap();
    drop(sse);
    for v in ["a", "b"] {
        let contents: Vec<Vec<u8>> = (61..=150).map(big).collect();
        p.publish(
            conn,
            run,
            &StreamName::Output(var(v)),
            agentrun_protocol::EntryType::Output,
            &contents,
        )
        .await
        .unwrap();
        p.gap(conn, run, &StreamName::Output(var(v))).await;
        p.publish(
            conn,
            run,
            &StreamName::Logs(var(v)),
            agentrun_protocol::EntryType::Logs,
            &[b"{\"msg\":\"log\"}\n".to_vec()],
        )
        .await
        .unwrap();
    }
    finish(conn, &mut p, run, "a", RunState::Succeeded).await;
    finish(conn, &mut p, run, "b", RunState::Succeeded).await;
    (cursor, seen)
}

fn relay_events(relay: &RelayProcess, run: &RunId, query: &str) -> String {
    format!("{}/api/runs/{run}/events{query}", relay.base)
}

/// Everything the relay says about a run that the archive must say the same way.
struct Views {
    sse: String,
    summary: serde_json::Value,
    download: Vec<u8>,
    ranges: Vec<serde_json::Value>,
    search: Vec<String>,
}

async fn views(client: &reqwest::Client, relay: &RelayProcess, run: &RunId) -> Views {
    let base = &relay.base;
    let sse = body(get(client, &relay_events(relay, run, "?follow=false"), ALL).await).await;
    let summary: serde_json::Value = get(client, &format!("{base}/api/runs/{run}"), ALL)
        .await
        .json()
        .await
        .unwrap();
    let download = get(
        client,
        &format!("{base}/api/runs/{run}/variations/a/output"),
        ALL,
    )
    .await
    .bytes()
    .await
    .unwrap()
    .to_vec();
    let mut ranges = Vec::new();
    for q in ["after=0&limit=7", "after=40&limit=30", "line=100", ""] {
        let r = get(
            client,
            &format!("{base}/api/runs/{run}/variations/b/output/range?{q}"),
            ALL,
        )
        .await;
        assert_eq!(r.status(), 200, "range {q}");
        ranges.push(r.json().await.unwrap());
    }
    let mut search = Vec::new();
    for q in [
        "q=line%2012",
        "q=h%C3%A9llo&limit=5",
        "q=%5Eline%201%5B0-9%5D:&regex=true",
    ] {
        let r = get(
            client,
            &format!("{base}/api/runs/{run}/variations/a/output/search?{q}"),
            ALL,
        )
        .await;
        assert_eq!(r.status(), 200, "search {q}");
        search.push(r.text().await.unwrap());
    }
    Views {
        sse,
        summary,
        download,
        ranges,
        search,
    }
}

/// A finished run, archived and gone from Redis, reads the same as it did live: SSE byte for
/// byte with the same end, a cursor from the live run resumes with no gap and no duplicate,
/// the summary (plus `archived`), the download, ranges and search; access as for the live run.
async fn archived_run_reads_as_it_did_live(store: Store) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let tokens = tokens();
    let relay = relay(&redis, &store, &tokens);
    let client = reqwest::Client::new();
    let run = RunId::new(format!("default.hist.{:08x}", rand::random::<u32>())).unwrap();
    let (cursor, seen) = publish_with_live_cursor(&mut conn, &relay, &run).await;

    let live = views(&client, &relay, &run).await;
    assert_eq!(live.summary["archived"], false);
    // The team-a token may not see a run of `default`, live...
    let denied = get(&client, &format!("{}/api/runs/{run}", relay.base), TEAM_A).await;
    assert_eq!(denied.status(), 404);

    archive_and_forget(&mut conn, &store, &run).await;
    let archived = views(&client, &relay, &run).await;

    assert_eq!(archived.sse, live.sse, "SSE byte for byte");
    let ev = events(&archived.sse);
    let end = ev.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(end.json()["finished"], true);
    assert_eq!(end.json()["phase"], "succeeded");
    let mut want = live.summary.clone();
    want["archived"] = true.into();
    assert_eq!(archived.summary, want);
    assert_eq!(archived.download, live.download, "download byte for byte");
    assert!(archived.download.len() > 1_500_000, "several blocks");
    assert_eq!(archived.ranges, live.ranges, "ranges");
    assert_eq!(archived.search, live.search, "search");
    assert!(
        archived.search[0].contains("\"line\""),
        "{}",
        archived.search[0]
    );

    // The cursor from the live read resumes in the archive: with what was seen before it,
    // every stream exactly once, in order.
    let resumed = body(
        client
            .get(relay_events(&relay, &run, "?follow=true"))
            .bearer_auth(ALL)
            .header("last-event-id", &cursor)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let resumed = events(&resumed);
    assert!(resumed.iter().all(|e| e.event != "reset"), "no reset");
    assert_eq!(resumed.last().unwrap().event, "end");
    let mut joined = per_stream(&seen);
    for (k, entries) in per_stream(&resumed) {
        joined.entry(k).or_default().extend(entries);
    }
    assert_eq!(joined, per_stream(&ev), "no gap and no duplicate");
    // `from=now`: nothing but the end.
    let now =
        events(&body(get(&client, &relay_events(&relay, &run, "?from=now"), ALL).await).await);
    assert_eq!(
        now.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["open", "end"]
    );
    // A variation the run does not have.
    let r = get(&client, &relay_events(&relay, &run, "?variation=zz"), ALL).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("has no variation"));

    // ...nor archived, on any endpoint; the list leaves it out for them too.
    for path in [
        format!("/api/runs/{run}"),
        format!("/api/runs/{run}/events?follow=false"),
        format!("/api/runs/{run}/variations/a/output"),
        format!("/api/runs/{run}/variations/a/output/range"),
        format!("/api/runs/{run}/variations/a/output/search?q=line"),
    ] {
        let r = get(&client, &format!("{}{path}", relay.base), TEAM_A).await;
        assert_eq!(r.status(), 404, "{path} for team-a");
    }
    let listed: serde_json::Value = get(&client, &format!("{}/api/runs", relay.base), TEAM_A)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["runs"], serde_json::json!([]));
    let listed: serde_json::Value = get(&client, &format!("{}/api/runs", relay.base), ALL)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["runs"][0]["run"], run.as_str());
    assert_eq!(listed["runs"][0]["archived"], true);

    // A run neither live nor archived: a 404 that says so.
    let r = get(
        &client,
        &format!("{}/api/runs/default.nowhere.00000000", relay.base),
        ALL,
    )
    .await;
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("neither in Redis nor in the archive"),
        "{text}"
    );
    relay.stop();
}

#[tokio::test]
async fn an_archived_run_reads_as_it_did_live_from_a_folder() {
    archived_run_reads_as_it_did_live(Store::fs()).await;
}

#[tokio::test]
async fn an_archived_run_reads_as_it_did_live_from_s3() {
    archived_run_reads_as_it_did_live(Store::s3().await).await;
}

/// Every page of `GET /api/runs?QUERY`, following `next`: the run ids in order.
async fn all_pages(client: &reqwest::Client, base: &str, query: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let mut url = format!("{base}/api/runs?{query}");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let page: serde_json::Value = get(client, &url, ALL).await.json().await.unwrap();
        for r in page["runs"].as_array().unwrap() {
            runs.push(r["run"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return runs,
        }
    }
    panic!("more than 100 pages");
}

/// The run list covers live and archived runs: newest first, each run once (live wins when
/// both have it), filtered by namespace, phase and name, paged with `next`.
async fn the_list_merges_live_and_archived_runs(store: Store) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let tokens = tokens();
    let relay = relay(&redis, &store, &tokens);
    let client = reqwest::Client::new();
    let base = relay.base.clone();
    let t0 = 1_760_000_000_000u64;
    // (run, created, namespace, final phase or running, where)
    #[derive(Clone, Copy, PartialEq)]
    enum Where {
        Live,
        Archived,
        Both,
    }
    let runs = [
        (
            "team-a.alpha.00000001",
            t0 + 9,
            "team-a",
            Some(RunState::Succeeded),
            Where::Archived,
        ),
        ("team-a.beta.00000002", t0 + 8, "team-a", None, Where::Live),
        (
            "default.gamma.00000003",
            t0 + 7,
            "default",
            Some(RunState::Failed),
            Where::Archived,
        ),
        // Created in the same millisecond as gamma.
        (
            "default.delta.00000004",
            t0 + 7,
            "default",
            Some(RunState::Failed),
            Where::Live,
        ),
        (
            "default.eps.00000005",
            t0 + 7,
            "default",
            Some(RunState::Succeeded),
            Where::Archived,
        ),
        (
            "team-a.zeta.00000006",
            t0 + 5,
            "team-a",
            Some(RunState::Stopped),
            Where::Both,
        ),
        (
            "default.eta.00000007",
            t0 + 4,
            "default",
            Some(RunState::Succeeded),
            Where::Archived,
        ),
        (
            "default.theta.00000008",
            t0 + 3,
            "default",
            Some(RunState::Succeeded),
            Where::Live,
        ),
        (
            "team-a.iota.00000009",
            t0 + 2,
            "team-a",
            Some(RunState::Failed),
            Where::Archived,
        ),
    ];
    for (id, created, ns, phase, place) in runs {
        let run = RunId::new(id).unwrap();
        register_at(&mut conn, &run, created, ns).await;
        let mut p = Producer::new("agent");
        p.output(&mut conn, &run, "a", &tagged_lines(1..=3, id))
            .await;
        if let Some(phase) = phase {
            finish(&mut conn, &mut p, &run, "a", phase).await;
        }
        match place {
            Where::Live => {}
            Where::Archived => archive_and_forget(&mut conn, &store, &run).await,
            Where::Both => archive_only(&mut conn, &store, &run).await,
        }
    }
    let ids = |f: &dyn Fn(&str, &str, Option<RunState>) -> bool| -> Vec<String> {
        // Newest first, then run id descending.
        let mut v: Vec<(u64, &str)> = runs
            .iter()
            .filter(|(id, _, ns, phase, _)| f(id, ns, *phase))
            .map(|(id, c, ..)| (*c, *id))
            .collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, id)| id.to_owned()).collect()
    };
    let everything = ids(&|_, _, _| true);
    for limit in [1, 2, 3, 100] {
        assert_eq!(
            all_pages(&client, &base, &format!("limit={limit}")).await,
            everything,
            "limit {limit}"
        );
    }
    assert_eq!(
        all_pages(&client, &base, "limit=2&namespace=team-a").await,
        ids(&|_, ns, _| ns == "team-a")
    );
    assert_eq!(
        all_pages(&client, &base, "limit=2&phase=failed").await,
        ids(&|_, _, p| p == Some(RunState::Failed))
    );
    assert_eq!(
        all_pages(&client, &base, "limit=1&name=ta&phase=Succeeded").await,
        ids(&|id, _, p| id.contains("ta") && p == Some(RunState::Succeeded))
    );
    // Live or archived, as they are now; the run in both is the live one.
    let page: serde_json::Value = get(&client, &format!("{base}/api/runs"), ALL)
        .await
        .json()
        .await
        .unwrap();
    assert!(page["next"].is_null());
    let flags: BTreeSet<(String, bool)> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["run"].as_str().unwrap().to_owned(),
                r["archived"].as_bool().unwrap(),
            )
        })
        .collect();
    for (id, _, _, _, place) in runs {
        assert!(
            flags.contains(&(id.to_owned(), place == Where::Archived)),
            "{id} in {flags:?}"
        );
    }
    // The team-a token lists only team-a's runs, live and archived.
    let page: serde_json::Value = get(&client, &format!("{base}/api/runs"), TEAM_A)
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids(&|_, ns, _| ns == "team-a"));
    // Bad values: a 400 that names the parameter.
    for (q, name) in [
        ("phase=done", "`phase`"),
        ("namespace=Bad_NS", "`namespace`"),
        ("after=not-a-token", "`after`"),
        ("limit=ten", "`limit`"),
    ] {
        let r = get(&client, &format!("{base}/api/runs?{q}"), ALL).await;
        assert_eq!(r.status(), 400, "{q}");
        let text = r.text().await.unwrap();
        assert!(text.contains(name), "{q}: {text}");
    }
    relay.stop();
}

#[tokio::test]
async fn the_list_merges_live_and_archived_runs_from_a_folder() {
    the_list_merges_live_and_archived_runs(Store::fs()).await;
}

#[tokio::test]
async fn the_list_merges_live_and_archived_runs_from_s3() {
    the_list_merges_live_and_archived_runs(Store::s3().await).await;
}

#[tokio::test]
async fn an_archive_url_that_names_nothing_usable_stops_the_relay_with_a_message() {
    let redis = RedisServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentrun-relay"))
        .args(["--redis-url", &redis.url(), "--listen", "127.0.0.1:0"])
        .args(["--archive-url", "ftp://host/archive"])
        .env_remove("AGENTRUN_AUTH")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--archive-url"), "{err}");
    assert!(err.contains("s3://"), "{err}");
}
