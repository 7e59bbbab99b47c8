//! The archiver against real Redis and real stores (a local folder, and an S3 API served by
//! `s3s-fs` on loopback): runs archived byte-exact whatever way they ended, reads from any
//! cursor, takeover after a SIGKILL, dead letters and their retry.

mod common;

use agentrun_archiver::ArchiveReader;
use agentrun_archiver::catalog::{self, CatalogFilter};
use agentrun_archiver::writer::{WriteOptions, archive_run};
use agentrun_protocol::archive::{
    self, ARCHIVE_DEAD_LETTER_KEY, ARCHIVE_QUEUE_KEY, ArchiveRequest, ArchiveStatus,
};
use agentrun_protocol::testing::{RedisServer, wait_for};
use agentrun_protocol::{Entry, RedisConn, RunId, StreamName, Variation};
use common::*;
use futures::TryStreamExt;
use std::collections::BTreeMap;
use std::time::Duration;

/// Reads every stream of the archive from cursor 0.
async fn archived(
    reader: &ArchiveReader,
    streams: impl Iterator<Item = StreamName>,
) -> BTreeMap<StreamName, Vec<Entry>> {
    let mut out = BTreeMap::new();
    for s in streams {
        let entries: Vec<Entry> = reader.read_from(&s, 0).try_collect().await.unwrap();
        out.insert(s, entries);
    }
    out
}

/// Waits until the run's archive is complete, and opens it.
async fn complete_archive(conn: &RedisConn, store: &Store, run: &RunId) -> ArchiveReader {
    wait_for_archive_status(conn, run, ArchiveStatus::Complete, Duration::from_secs(60)).await;
    ArchiveReader::open(&store.open(), run)
        .await
        .unwrap()
        .expect("a complete archive has a manifest")
}

/// Every ending, two variations, Redis keys expiring after the archive: the archive holds
/// every entry of every stream byte for byte, and is readable once Redis has forgotten the run.
async fn finished_runs_are_archived_byte_exact(store: Store) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let mut runs = Vec::new();
    for (i, ending) in [
        Ending::Succeeded,
        Ending::Failed,
        Ending::Stopped,
        Ending::TimedOut,
    ]
    .into_iter()
    .enumerate()
    {
        let run = run_id(&format!("{ending:?}").to_lowercase());
        let seed = Seed {
            variations: vec!["a", "b-2"],
            output_entries: 300 + i * 50,
            entry_bytes: 5000,
            ending,
        };
        seed_run(&mut conn, &run, &seed).await;
        let before = snapshot(&mut conn, &run, &seed.variations).await;
        // Archiving is on: the TTL a producer puts when the run ends waits for the archive.
        let keys = run.all_keys([Variation::new("a").unwrap()].iter());
        assert!(
            !archive::expire_unless_archiving(&mut conn, &run, &keys, 1)
                .await
                .unwrap()
        );
        assert_eq!(ttl(&mut conn, &run.state_key()).await, -1);
        let mut request = ArchiveRequest::new(run.clone(), 2, "test");
        request.variations = vec![Variation::new("a").unwrap()];
        archive::enqueue(&mut conn, &request).await.unwrap();
        runs.push((run, before, ending));
    }
    let _archiver = archiver(&redis, &store, "main", &[]);
    for (run, _, _) in &runs {
        wait_for_archive_status(&conn, run, ArchiveStatus::Complete, Duration::from_secs(60)).await;
    }
    // A request is acknowledged (and deleted) just after its run is marked complete.
    queue_drained(&conn).await;
    // The retention TTL is put once the archive is complete; then Redis forgets the run.
    for (run, _, _) in &runs {
        wait_for("the run's keys to expire", Duration::from_secs(20), || {
            let mut c = conn.clone();
            async move { (ttl(&mut c, &run.state_key()).await == -2).then_some(()) }
        })
        .await;
    }
    let opened = store.open();
    for (run, before, ending) in &runs {
        let reader = ArchiveReader::open(&opened, run)
            .await
            .unwrap()
            .expect("an archive");
        let after = archived(&reader, before.keys().cloned()).await;
        for (stream, entries) in before {
            assert!(!entries.is_empty(), "{stream:?} of {run} was seeded");
            assert_eq!(&after[stream], entries, "{stream:?} of {run} ({ending:?})");
        }
        let m = reader.manifest();
        let want_phase = match ending {
            Ending::Succeeded => "succeeded",
            Ending::Stopped => "stopped",
            _ => "failed",
        };
        assert_eq!(m.phase(), Some(want_phase));
        assert_eq!(m.variations, ["a", "b-2"]);
        assert_eq!(
            m.state.get("name").map(String::as_str),
            Some(format!("name-{run}").as_str())
        );
        assert!(
            !m.state.contains_key("archive"),
            "the archive's own fields are not archived"
        );
    }
    // The catalog lists every archived run, newest first, a page at a time and filtered.
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = catalog::list(&opened, &CatalogFilter::default(), after.as_deref(), 2)
            .await
            .unwrap();
        listed.extend(page.runs);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut want: Vec<&str> = runs.iter().map(|(r, _, _)| r.as_str()).collect();
    want.sort();
    let mut got: Vec<&str> = listed.iter().map(|e| e.run.as_str()).collect();
    got.sort();
    assert_eq!(got, want, "each archived run once");
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].created_ms >= w[1].created_ms)
    );
    let stopped = CatalogFilter {
        phase: Some("stopped".into()),
        ..Default::default()
    };
    let page = catalog::list(&opened, &stopped, None, 100).await.unwrap();
    let want_stopped: Vec<&str> = runs
        .iter()
        .filter(|(_, _, e)| matches!(e, Ending::Stopped))
        .map(|(r, _, _)| r.as_str())
        .collect();
    let got_stopped: Vec<&str> = page.runs.iter().map(|e| e.run.as_str()).collect();
    assert_eq!(got_stopped, want_stopped);

    // A lost catalog is rebuilt from the manifests by `agentrun-archiver catalog --rebuild`.
    let names: Vec<_> = opened
        .object_store()
        .list(Some(&opened.path(catalog::CATALOG_DIR)))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(names.len(), runs.len());
    for name in &names {
        opened.object_store().delete(name).await.unwrap();
    }
    assert!(
        catalog::list(&opened, &CatalogFilter::default(), None, 100)
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    let out = catalog_command(&store, &["--rebuild"]);
    let mut lines: Vec<&str> = out
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap())
        .collect();
    lines.sort();
    assert_eq!(lines, want, "{out}");
}

#[tokio::test]
async fn finished_runs_are_archived_byte_exact_to_a_folder() {
    finished_runs_are_archived_byte_exact(Store::fs()).await;
}

#[tokio::test]
async fn finished_runs_are_archived_byte_exact_to_s3() {
    finished_runs_are_archived_byte_exact(Store::s3().await).await;
}

/// Reading from any cursor returns exactly the entries after it, like `XRANGE` from the same
/// cursor, across block boundaries; a stream trimmed before it was archived says so.
#[tokio::test]
async fn reading_from_any_cursor_gives_exactly_the_entries_after_it() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let store = Store::fs();
    let run = run_id("cursor");
    let seed = Seed {
        output_entries: 1500,
        entry_bytes: 3000,
        ..Seed::default()
    };
    seed_run(&mut conn, &run, &seed).await;
    let output = StreamName::Output(Variation::default_name());
    // Trim the logs' first two entries, as MAXLEN would have.
    let _: u64 = redis::cmd("XTRIM")
        .arg(StreamName::Logs(Variation::default_name()).key(&run))
        .arg("MINID")
        .arg("0-3")
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = snapshot(&mut conn, &run, &["default"]).await;
    let opened = store.open();
    let request = ArchiveRequest::new(run.clone(), 0, "test");
    let done = archive_run(&conn, &opened, &request, &WriteOptions::default())
        .await
        .unwrap()
        .expect("the run is in Redis");
    assert!(done.written_now);
    let reader = ArchiveReader::open(&opened, &run).await.unwrap().unwrap();
    let all = &before[&output];
    let last = all.last().unwrap().seq;
    assert_eq!(reader.last_seq(&output), last);
    let blocks = {
        let m = reader.manifest().stream(&output).unwrap();
        assert!(m.data_bytes > 3 * 1024 * 1024, "several blocks: {m:?}");
        m.entries
    };
    assert_eq!(blocks, all.len() as u64);
    let mut cursors = vec![0, 1, 2, 348, 349, 350, 351, last - 1, last, last + 5];
    cursors.extend((0..20).map(|i| (i * 97 + 13) % last));
    for cursor in cursors {
        let want: Vec<&Entry> = all.iter().filter(|e| e.seq > cursor).collect();
        let streamed: Vec<Entry> = reader
            .read_from(&output, cursor)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            streamed.iter().collect::<Vec<_>>(),
            want,
            "read_from({cursor})"
        );
        let page = reader.read_page(&output, cursor, 100).await.unwrap();
        assert_eq!(
            page.entries.iter().collect::<Vec<_>>(),
            want.iter().take(100).copied().collect::<Vec<_>>(),
            "read_page({cursor}, 100)"
        );
        assert!(page.trimmed.is_none());
    }
    // The trimmed logs: the reader is told, like Redis replay tells it.
    let logs = StreamName::Logs(Variation::default_name());
    let page = reader.read_page(&logs, 0, 10).await.unwrap();
    let trimmed = page.trimmed.expect("entries 1 and 2 were trimmed");
    assert_eq!((trimmed.wanted, trimmed.first_available), (1, 3));
    assert_eq!(page.entries, before[&logs]);
    // A stream the run never had reads empty.
    let none = StreamName::Output(Variation::new("nope").unwrap());
    assert!(
        reader
            .read_page(&none, 0, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    // Archiving again changes nothing: the archive is written once.
    let again = archive_run(&conn, &opened, &request, &WriteOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert!(!again.written_now);
    assert_eq!(again.manifest, *reader.manifest());
}

/// The folders under a run's archive, less the manifest.
fn attempt_folders(store: &Store, run: &RunId) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(store.run_dir_on_disk(run))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The attempt folders of a run's archive that the store lists.
async fn listed_attempts(store: &Store, run: &RunId) -> Vec<String> {
    let opened = store.open();
    let prefix = opened.path(&format!("runs/{run}"));
    let listed: Vec<object_store::ObjectMeta> = opened
        .object_store()
        .list(Some(&prefix))
        .try_collect()
        .await
        .unwrap();
    let mut out: Vec<String> = listed
        .iter()
        .filter_map(|m| m.location.prefix_match(&prefix)?.next())
        .map(|p| p.as_ref().to_owned())
        .filter(|p| p != "manifest.json")
        .collect();
    out.sort();
    out.dedup();
    out
}

/// An archiver SIGKILLed mid-upload leaves its request pending; another takes it over with
/// XAUTOCLAIM, and the run ends up with one complete archive.
async fn an_archiver_killed_mid_upload_is_taken_over(store: Store) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id("killed");
    let seed = Seed {
        output_entries: 800,
        entry_bytes: 5000,
        ..Seed::default()
    };
    seed_and_enqueue(&mut conn, &run, &seed, 0).await;
    let before = snapshot(&mut conn, &run, &seed.variations).await;
    // 4 MB at 1 MB/s: the first archiver is mid-upload for seconds.
    let mut first = archiver(
        &redis,
        &store,
        "first",
        &[
            "--max-write-bytes-per-second",
            "1000000",
            "--claim-idle-seconds",
            "2",
        ],
    );
    wait_for_archive_status(
        &conn,
        &run,
        ArchiveStatus::Archiving,
        Duration::from_secs(30),
    )
    .await;
    let run_dir = store.run_dir_on_disk(&run);
    // Mid-upload: the small streams are written (their index is there), the output is not.
    wait_for(
        "the first archiver to be writing",
        Duration::from_secs(30),
        || {
            let d = run_dir.clone();
            async move {
                walk(&d)
                    .iter()
                    .any(|p| p.to_string_lossy().ends_with("status.index.json"))
                    .then_some(())
            }
        },
    )
    .await;
    let killed_attempts = attempt_folders(&store, &run);
    assert_eq!(killed_attempts.len(), 1);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !run_dir.join("manifest.json").exists(),
        "killed before its manifest"
    );

    let _second = archiver(&redis, &store, "second", &["--claim-idle-seconds", "2"]);
    let reader = complete_archive(&conn, &store, &run).await;
    assert_eq!(archived(&reader, before.keys().cloned()).await, before);
    // One archive: the manifest names the second archiver's attempt, and the killed one's
    // objects are gone.
    let winner = [reader.manifest().attempt.clone()];
    assert_ne!(winner.as_slice(), killed_attempts.as_slice());
    assert_eq!(listed_attempts(&store, &run).await, winner, "in the store");
    if matches!(store, Store::Fs { .. }) {
        // Unlisted staging files of the killed upload are gone from the disk too.
        assert_eq!(attempt_folders(&store, &run), winner, "on the disk");
    }
    queue_drained(&conn).await;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(ARCHIVE_QUEUE_KEY)
        .arg(archive::ARCHIVE_GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        matches!(&pending, redis::Value::Array(p) if p.first() == Some(&redis::Value::Int(0))),
        "{pending:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn an_archiver_killed_mid_upload_is_taken_over_on_a_folder() {
    an_archiver_killed_mid_upload_is_taken_over(Store::fs()).await;
}

#[tokio::test]
async fn an_archiver_killed_mid_upload_is_taken_over_on_s3() {
    an_archiver_killed_mid_upload_is_taken_over(Store::s3().await).await;
}

/// A store that refuses writes: after `--max-attempts` tries the request is on the
/// dead-letter stream with the reason, the run says `failed`, and its keys keep no TTL. Once
/// the store is back, `requeue-dead` gets it archived.
#[tokio::test]
async fn a_store_that_refuses_writes_dead_letters_the_run_until_it_is_requeued() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let store = Store::fs();
    // `runs` is a file: no folder can be made under it (root or not).
    let blocker = store.root_on_disk().join("runs");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let run = run_id("refused");
    let seed = Seed::default();
    seed_and_enqueue(&mut conn, &run, &seed, 5).await;
    let before = snapshot(&mut conn, &run, &seed.variations).await;
    let _archiver = archiver(&redis, &store, "main", &["--max-attempts", "3"]);
    wait_for_archive_status(&conn, &run, ArchiveStatus::Failed, Duration::from_secs(60)).await;
    assert_eq!(xlen(&mut conn, ARCHIVE_QUEUE_KEY).await, 0);
    let dead: redis::Value = redis::cmd("XRANGE")
        .arg(ARCHIVE_DEAD_LETTER_KEY)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let text = format!("{dead:?}");
    assert!(text.contains(run.as_str()), "{text}");
    assert!(
        text.contains("attempt 3 of 3"),
        "the reason says how often: {text}"
    );
    // What the operator copies into the AgentRun's status.archive.
    let details = archive::details(&mut conn, &run).await.unwrap().unwrap();
    let error = details.error.clone().unwrap_or_default();
    assert_eq!(details.status, ArchiveStatus::Failed);
    assert!(error.contains("object store"), "{error}");
    for key in run.all_keys([Variation::default_name()].iter()) {
        assert_eq!(
            ttl(&mut conn, &key).await,
            -1,
            "{key} must outlive a failed archive"
        );
    }

    std::fs::remove_file(&blocker).unwrap();
    let said = requeue_dead(&redis);
    assert!(said.contains(run.as_str()), "{said}");
    let reader = complete_archive(&conn, &store, &run).await;
    assert_eq!(xlen(&mut conn, ARCHIVE_DEAD_LETTER_KEY).await, 0);
    assert_eq!(archived(&reader, before.keys().cloned()).await, before);
    let details = archive::details(&mut conn, &run).await.unwrap().unwrap();
    assert_eq!(
        (details.status, details.error),
        (ArchiveStatus::Complete, None)
    );
    let archived_ms = details.archived_ms.expect("completion time");
    assert!(
        archived_ms.abs_diff(agentrun_protocol::now_ms()) < 120_000,
        "{archived_ms}"
    );
    let t = ttl(&mut conn, &run.state_key()).await;
    assert!((1..=5).contains(&t), "retention TTL once archived: {t}");
}
