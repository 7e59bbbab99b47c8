//! Test support (feature `test-support`), shared by the archiver's tests and the relay's: a
//! real S3 server (`s3s-fs`, installed by `scripts/deps/s3s-fs.sh`) on loopback, a folder store,
//! and finished runs seeded through the protocol's own primitives.

use crate::ArchiveStore;
use agentrun_protocol::archive::{self, ArchiveRequest, ArchiveStatus};
use agentrun_protocol::publish::{Batch, register_run, set_state};
use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{ChildGuard, dying_with_test, free_port, wait_for};
use agentrun_protocol::{
    Entry, EntryType, NewEntry, PublishOptions, Publisher, RedisConn, RunId, RunState, StatusEvent,
    StreamName, Variation,
};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

pub fn run_id(tag: &str) -> RunId {
    RunId::new(format!("{tag}-{:08x}", rand::random::<u32>())).unwrap()
}

/// Where the archiver under test writes.
pub enum Store {
    /// A folder on the local filesystem.
    Fs { dir: tempfile::TempDir },
    /// A real S3 API: `s3s-fs` on a free loopback port, with a bucket.
    S3 {
        dir: tempfile::TempDir,
        port: u16,
        _server: ChildGuard,
    },
}

const S3_KEY: &str = "agentrun-test";
const S3_SECRET: &str = "agentrun-test-secret";
const S3_BUCKET: &str = "archive";

impl Store {
    pub fn fs() -> Self {
        Store::Fs {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts `s3s-fs` (installed by scripts/deps/s3s-fs.sh) and waits until it answers.
    pub async fn s3() -> Self {
        let binary = which_s3s_fs();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(S3_BUCKET)).unwrap();
        let port = free_port();
        let server = ChildGuard::spawn(
            dying_with_test(binary)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for("s3s-fs to listen", Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Store::S3 {
            dir,
            port,
            _server: server,
        }
    }

    /// The `--store-url` of the archiver.
    pub fn url(&self) -> String {
        match self {
            Store::Fs { dir } => dir.path().display().to_string(),
            Store::S3 { .. } => format!("s3://{S3_BUCKET}/prefix"),
        }
    }

    /// The environment the archiver needs for this store.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Store::Fs { .. } => Vec::new(),
            Store::S3 { port, .. } => vec![
                ("AWS_ACCESS_KEY_ID".into(), S3_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET.into()),
                ("AWS_REGION".into(), "us-east-1".into()),
                (
                    "AWS_ENDPOINT_URL".into(),
                    format!("http://127.0.0.1:{port}"),
                ),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
            ],
        }
    }

    /// The same store, opened in the test process.
    pub fn open(&self) -> ArchiveStore {
        match self {
            Store::Fs { dir } => ArchiveStore::from_url(dir.path().to_str().unwrap()).unwrap(),
            Store::S3 { port, .. } => {
                let s3 = AmazonS3Builder::new()
                    .with_bucket_name(S3_BUCKET)
                    .with_access_key_id(S3_KEY)
                    .with_secret_access_key(S3_SECRET)
                    .with_region("us-east-1")
                    .with_endpoint(format!("http://127.0.0.1:{port}"))
                    .with_allow_http(true)
                    .build()
                    .unwrap();
                ArchiveStore::new(Arc::new(s3), StorePath::from("prefix"))
            }
        }
    }

    /// The folder on disk that holds a run's objects.
    pub fn run_dir_on_disk(&self, run: &RunId) -> PathBuf {
        match self {
            Store::Fs { dir } => dir.path().join("runs").join(run.as_str()),
            Store::S3 { dir, .. } => dir
                .path()
                .join(S3_BUCKET)
                .join("prefix/runs")
                .join(run.as_str()),
        }
    }

    pub fn root_on_disk(&self) -> PathBuf {
        match self {
            Store::Fs { dir } => dir.path().to_owned(),
            Store::S3 { dir, .. } => dir.path().join(S3_BUCKET).join("prefix"),
        }
    }
}

fn which_s3s_fs() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    for p in [
        home.join(".cargo/bin/s3s-fs"),
        PathBuf::from("/usr/local/bin/s3s-fs"),
        PathBuf::from("/usr/local/cargo/bin/s3s-fs"),
    ] {
        if p.exists() {
            return p;
        }
    }
    panic!(
        "s3s-fs is not installed: run scripts/deps/s3s-fs.sh (cargo install s3s-fs --features binary)"
    )
}

/// Deterministic bytes that do not compress (xorshift), with some text and invalid UTF-8.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How a seeded run ends.
#[derive(Clone, Copy, Debug)]
pub enum Ending {
    Succeeded,
    Failed,
    Stopped,
    TimedOut,
}

/// What to put in a seeded run.
pub struct Seed {
    pub variations: Vec<&'static str>,
    /// Output entries per variation, and the size of each.
    pub output_entries: usize,
    pub entry_bytes: usize,
    pub ending: Ending,
}

impl Default for Seed {
    fn default() -> Self {
        Self {
            variations: vec!["default"],
            output_entries: 50,
            entry_bytes: 200,
            ending: Ending::Succeeded,
        }
    }
}

/// Writes a finished run the way its producers do (publish script, state hash) and marks it
/// for archiving (`archive: pending`), without enqueueing it.
pub async fn seed_run(conn: &mut RedisConn, run: &RunId, seed: &Seed) {
    let publisher = Publisher::new(PublishOptions {
        max_len: None,
        publish_command: "PUBLISH",
    });
    register_run(
        conn,
        run,
        agentrun_protocol::now_ms(),
        &[
            ("variations", seed.variations.join(",")),
            ("name", format!("name-{run}")),
            ("namespace", "default".into()),
        ],
    )
    .await
    .unwrap();
    archive::mark_pending(conn, run).await.unwrap();
    let (state, reason) = match seed.ending {
        Ending::Succeeded => (RunState::Succeeded, "Completed"),
        Ending::Failed => (RunState::Failed, "Error"),
        Ending::Stopped => (RunState::Stopped, "Stopped"),
        Ending::TimedOut => (RunState::Failed, "Timeout"),
    };
    let mut pseq = 0;
    let mut next = |kind, content: Vec<u8>, meta: Option<String>| {
        pseq += 1;
        NewEntry {
            pseq,
            ts: 1_700_000_000_000 + pseq,
            kind,
            content: Bytes::from(content),
            meta,
        }
    };
    for (vi, v) in seed.variations.iter().enumerate() {
        let variation = Variation::new(*v).unwrap();
        let mut output = Vec::new();
        for i in 0..seed.output_entries {
            let mut content = noise((vi * 100_000 + i) as u64, seed.entry_bytes);
            if i % 7 == 0 {
                content = format!("line {i} of {v}: héllo ✓\n").into_bytes();
            }
            output.push(next(EntryType::Output, content, None));
        }
        output.push(next(
            EntryType::Gap,
            Vec::new(),
            Some(r#"{"droppedBytes":10,"droppedChunks":1,"reason":"spool full"}"#.into()),
        ));
        let logs: Vec<NewEntry> = (0..5)
            .map(|i| {
                next(
                    EntryType::Logs,
                    format!("{{\"log\":{i}}}\n").into_bytes(),
                    None,
                )
            })
            .collect();
        let mut event = StatusEvent::new(Some(v), state).reason(reason);
        event.exit_code = Some(if matches!(seed.ending, Ending::Succeeded) {
            0
        } else {
            1
        });
        let status = vec![
            next(
                EntryType::Status,
                StatusEvent::new(Some(v), RunState::Running).to_json(),
                None,
            ),
            next(EntryType::Status, event.to_json(), None),
        ];
        for (stream, entries) in [
            (StreamName::Output(variation.clone()), output),
            (StreamName::Logs(variation.clone()), logs),
            (StreamName::Status, status),
        ] {
            for chunk in entries.chunks(200) {
                publish(conn, &publisher, run, &stream, &format!("p-{v}"), chunk).await;
            }
        }
        set_state(
            conn,
            run,
            &[(
                &format!("var:{v}"),
                String::from_utf8(event.to_json()).unwrap(),
            )],
        )
        .await
        .unwrap();
    }
    let control = vec![next(
        EntryType::Control,
        br#"{"action":"pause"}"#.to_vec(),
        None,
    )];
    let metrics = vec![next(EntryType::Metrics, br#"{"bytes":1}"#.to_vec(), None)];
    for (stream, entries) in [
        (StreamName::Control, control),
        (StreamName::Metrics, metrics),
    ] {
        publish(conn, &publisher, run, &stream, "operator", &entries).await;
    }
    let end = StatusEvent::new(None, state).reason(reason);
    let end = [next(EntryType::Status, end.to_json(), None)];
    publish(conn, &publisher, run, &StreamName::Status, "operator", &end).await;
    set_state(
        conn,
        run,
        &[
            ("phase", state.as_str().into()),
            ("ended", agentrun_protocol::now_ms().to_string()),
        ],
    )
    .await
    .unwrap();
}

async fn publish(
    conn: &mut RedisConn,
    publisher: &Publisher,
    run: &RunId,
    stream: &StreamName,
    producer: &str,
    entries: &[NewEntry],
) {
    publisher
        .publish(
            conn,
            run,
            Batch {
                stream,
                producer,
                entries,
            },
        )
        .await
        .unwrap();
}

/// Seeds a run and puts it on the archive queue with `retention` seconds.
pub async fn seed_and_enqueue(conn: &mut RedisConn, run: &RunId, seed: &Seed, retention: u64) {
    seed_run(conn, run, seed).await;
    let mut request = ArchiveRequest::new(run.clone(), retention, "test");
    request.variations = seed
        .variations
        .iter()
        .map(|v| Variation::new(*v).unwrap())
        .collect();
    archive::enqueue(conn, &request).await.unwrap();
}

/// Every stream of a run as Redis holds it: stream → entries.
pub async fn snapshot(
    conn: &mut RedisConn,
    run: &RunId,
    variations: &[&str],
) -> BTreeMap<StreamName, Vec<Entry>> {
    let mut streams = vec![StreamName::Status, StreamName::Control, StreamName::Metrics];
    for v in variations {
        let v = Variation::new(*v).unwrap();
        streams.push(StreamName::Output(v.clone()));
        streams.push(StreamName::Logs(v));
    }
    let mut out = BTreeMap::new();
    for s in streams {
        let mut entries = Vec::new();
        let mut after = 0;
        loop {
            let page = read_page(conn, &s.key(run), after, 500).await.unwrap();
            let Some(last) = page.entries.last() else {
                break;
            };
            after = last.seq;
            entries.extend(page.entries);
        }
        out.insert(s, entries);
    }
    out
}

/// Waits until the run's state hash says `status`.
pub async fn wait_for_archive_status(
    conn: &RedisConn,
    run: &RunId,
    status: ArchiveStatus,
    timeout: Duration,
) {
    wait_for(&format!("{run} to be {status}"), timeout, || {
        let mut c = conn.clone();
        async move { (archive::status(&mut c, run).await.ok()?? == status).then_some(()) }
    })
    .await;
}

/// Waits until every request has left the archive queue.
pub async fn queue_drained(conn: &RedisConn) {
    wait_for("the queue to be drained", Duration::from_secs(20), || {
        let mut c = conn.clone();
        async move { (xlen(&mut c, archive::ARCHIVE_QUEUE_KEY).await == 0).then_some(()) }
    })
    .await;
}

/// `TTL key` in seconds (-1: none, -2: no key).
pub async fn ttl(conn: &mut RedisConn, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query_async(conn).await.unwrap()
}

pub async fn xlen(conn: &mut RedisConn, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}
