//! Test support: a relay on a loopback port, a small SSE client, and publishing helpers.
#![allow(dead_code)]

use agentrun_protocol::publish::{Batch, register_run, set_state};
use agentrun_protocol::testing::{ChildGuard, dying_with_test, wait_for};
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RedisConn, RunId, RunState, StatusEvent,
    StreamName, Variation,
};
use agentrun_relay::{AppState, Config};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(30);

/// A relay served in-process on 127.0.0.1 with a random port.
pub struct Relay {
    pub base: String,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(redis_url: &str) -> Self {
        Self::start_with(Config::for_redis(redis_url), "127.0.0.1:0").await
    }

    pub async fn start_with(config: Config, addr: &str) -> Self {
        let tls = config.tls().expect("the relay's TLS files load");
        let state = AppState::connect(&config).await.expect("relay connects");
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let port = listener.local_addr().unwrap().port();
        // Over TLS by the name the test certificates carry.
        let base = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = rx.await;
            };
            match tls {
                Some(tls) => agentrun_relay::serve_tls(listener, st, tls, stopped).await,
                None => agentrun_relay::serve(listener, st, stopped).await,
            }
            .expect("serve");
        });
        Relay {
            base,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Graceful shutdown: SSE streams end with `event: shutdown`; waits for the server.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("relay stops within the deadline")
                .expect("relay task");
        }
    }

    /// `POST /api/session` with `{"token": TOKEN}`.
    pub async fn session(&self, client: &reqwest::Client, token: &str) -> reqwest::Response {
        client
            .post(format!("{}/api/session", self.base))
            .json(&serde_json::json!({ "token": token }))
            .send()
            .await
            .unwrap()
    }

    pub fn events_url(&self, run: &str, query: &str) -> String {
        format!("{}/api/runs/{run}/events?{query}", self.base)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// An event as the relay sent it; [`EventJson::json`] reads its data.
pub type SseEvent = agentrun_protocol::sse::Event;

pub trait EventJson {
    fn json(&self) -> serde_json::Value;
}

impl EventJson for SseEvent {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// A Server-Sent Events reader over a streaming HTTP response (with the protocol's parser,
/// the one the kubectl plugin uses).
pub struct SseClient {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    parser: agentrun_protocol::sse::Parser,
    pub last_id: Option<String>,
    pub headers: reqwest::header::HeaderMap,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_as(url, last_event_id, None).await
    }

    /// Connects with a bearer token (or none).
    pub async fn connect_as(url: &str, last_event_id: Option<&str>, token: Option<&str>) -> Self {
        let client = reqwest::Client::new();
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("connect to the relay");
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            panic!("GET {url} answered {status}: {body}");
        }
        let mut sse = Self::from_response(resp);
        sse.last_id = last_event_id.map(str::to_owned);
        sse
    }

    /// Reads the events of a response already received.
    pub fn from_response(resp: reqwest::Response) -> Self {
        let headers = resp.headers().clone();
        SseClient {
            body: Box::pin(resp.bytes_stream()),
            parser: Default::default(),
            last_id: None,
            headers,
        }
    }

    /// The next event with data (comments and `retry:` blocks skipped); `None` at the end.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            let event = self.parser.next_event();
            if let Some(id) = &self.parser.last_id {
                self.last_id = Some(id.clone());
            }
            if event.is_some() {
                return event;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.parser.push(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event, or a panic naming `what` after the deadline.
    pub async fn expect(&mut self, what: &str) -> SseEvent {
        match tokio::time::timeout(WAIT, self.next()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    /// Skips `open` events.
    pub async fn expect_entry(&mut self, what: &str) -> SseEvent {
        loop {
            let ev = self.expect(what).await;
            if ev.event != "open" {
                return ev;
            }
        }
    }

    /// The `seq`s of the next entries, until `seen` holds `total`.
    pub async fn collect_seqs(&mut self, seen: &mut Vec<u64>, total: usize, what: &str) {
        while seen.len() < total {
            let seq = self.expect_entry(what).await.json()["seq"].as_u64();
            seen.push(seq.expect("an entry has a seq"));
        }
    }
}

/// Lines `TAG N\n` for N in `range`.
pub fn tagged_lines(range: std::ops::RangeInclusive<u64>, tag: &str) -> Vec<String> {
    range.map(|i| format!("{tag} {i}\n")).collect()
}

pub fn run_id(name: &str) -> RunId {
    RunId::new(name).unwrap()
}

pub fn var(name: &str) -> Variation {
    Variation::new(name).unwrap()
}

pub async fn register(conn: &mut RedisConn, run: &RunId, variations: &[&str]) {
    register_run(
        conn,
        run,
        agentrun_protocol::now_ms(),
        &[("variations", variations.join(","))],
    )
    .await
    .unwrap();
}

/// A Redis server, a connection to it, and run `name` registered with `variations`.
pub async fn redis_with_run(
    name: &str,
    variations: &[&str],
) -> (agentrun_protocol::testing::RedisServer, RedisConn, RunId) {
    let redis = agentrun_protocol::testing::RedisServer::start();
    let mut conn = redis.conn().await;
    let run = run_id(name);
    register(&mut conn, &run, variations).await;
    (redis, conn, run)
}

/// Publishes entries as one producer would, with its own producer sequence.
#[derive(Clone)]
pub struct Producer {
    pub publisher: Publisher,
    pub id: String,
    pub pseq: u64,
}

impl Producer {
    pub fn new(id: &str) -> Self {
        Self::with_options(id, PublishOptions::default())
    }

    pub fn with_options(id: &str, options: PublishOptions) -> Self {
        Producer {
            publisher: Publisher::new(options),
            id: id.to_owned(),
            pseq: 0,
        }
    }

    pub async fn publish(
        &mut self,
        conn: &mut RedisConn,
        run: &RunId,
        stream: &StreamName,
        kind: EntryType,
        contents: &[Vec<u8>],
    ) -> redis::RedisResult<u64> {
        let entries: Vec<NewEntry> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| NewEntry::now(self.pseq + 1 + i as u64, kind, c.clone()))
            .collect();
        let out = self
            .publisher
            .publish(
                conn,
                run,
                Batch {
                    stream,
                    producer: &self.id,
                    entries: &entries,
                },
            )
            .await?;
        self.pseq += contents.len() as u64;
        Ok(out.last_seq)
    }

    /// A gap entry on `stream` (10 bytes in 1 chunk dropped).
    pub async fn gap(&mut self, conn: &mut RedisConn, run: &RunId, stream: &StreamName) {
        self.publish(
            conn,
            run,
            stream,
            EntryType::Gap,
            &[br#"{"droppedBytes":10,"droppedChunks":1}"#.to_vec()],
        )
        .await
        .unwrap();
    }

    pub async fn output(
        &mut self,
        conn: &mut RedisConn,
        run: &RunId,
        v: &str,
        lines: &[String],
    ) -> u64 {
        let contents: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
        self.publish(
            conn,
            run,
            &StreamName::Output(var(v)),
            EntryType::Output,
            &contents,
        )
        .await
        .unwrap()
    }

    /// Like [`Producer::output`], trying again until Redis takes it (or [`WAIT`] runs out):
    /// for right after an outage or a failover, when writes fail for a moment.
    pub async fn output_when_redis_takes_it(
        &mut self,
        conn: &RedisConn,
        run: &RunId,
        v: &str,
        lines: &[String],
    ) {
        let contents: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
        let stream = StreamName::Output(var(v));
        let this = &*self;
        wait_for("Redis to take the output", WAIT, || {
            let (mut conn, mut again) = (conn.clone(), this.clone());
            let (run, stream, contents) = (run.clone(), stream.clone(), contents.clone());
            async move {
                again
                    .publish(&mut conn, &run, &stream, EntryType::Output, &contents)
                    .await
                    .ok()
            }
        })
        .await;
        self.pseq += contents.len() as u64;
    }

    pub async fn status(&mut self, conn: &mut RedisConn, run: &RunId, event: StatusEvent) {
        self.publish(
            conn,
            run,
            &StreamName::Status,
            EntryType::Status,
            &[event.to_json()],
        )
        .await
        .unwrap();
    }
}

/// Marks the run (and a variation) final the way the sidecar does: state hash, then status.
pub async fn finish(
    conn: &mut RedisConn,
    producer: &mut Producer,
    run: &RunId,
    v: &str,
    state: RunState,
) {
    let ev = StatusEvent::new(Some(v), state).source("test");
    set_state(
        conn,
        run,
        &[
            (
                &format!("var:{v}"),
                String::from_utf8(ev.to_json()).unwrap(),
            ),
            ("phase", state.as_str().to_owned()),
            ("ended", agentrun_protocol::now_ms().to_string()),
        ],
    )
    .await
    .unwrap();
    producer.status(conn, run, ev).await;
}

/// Reads a child's log (tracing writes to stdout) on a thread (so the pipe never fills), ANSI
/// colours removed.
fn lines(stdout: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
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

/// The relay binary in a child process, with its log collected; killed with the test.
pub struct RelayProcess {
    pub child: ChildGuard,
    pub base: String,
    rx: std::sync::mpsc::Receiver<String>,
    pub log: String,
}

impl RelayProcess {
    /// Starts `agentrun-relay ARGS EXTRA` at `RUST_LOG=log_level` (AGENTRUN_AUTH unset) and
    /// waits until it serves.
    pub fn start(args: &[&str], extra: &[&str], log_level: &str) -> Self {
        Self::start_with_env(args, extra, &[], log_level)
    }

    /// [`RelayProcess::start`] with more environment variables.
    pub fn start_with_env(
        args: &[&str],
        extra: &[&str],
        env: &[(String, String)],
        log_level: &str,
    ) -> Self {
        use std::process::Stdio;
        let mut child = ChildGuard::spawn(
            dying_with_test(env!("CARGO_BIN_EXE_agentrun-relay"))
                .args(args)
                .args(extra)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("RUST_LOG", log_level)
                .env("NO_COLOR", "1")
                // Few malloc arenas, as in the container image, so RSS reflects live memory.
                .env("MALLOC_ARENA_MAX", "2")
                .env_remove("AGENTRUN_AUTH")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        // Logs go to stderr, as in every agentrun binary.
        let rx = lines(child.stderr.take().unwrap());
        let mut relay = RelayProcess {
            child,
            base: String::new(),
            rx,
            log: String::new(),
        };
        let line = relay.wait_line("agentrun-relay serving");
        let at = line.find("listen=").unwrap() + "listen=".len();
        let addr = line[at..].split_whitespace().next().unwrap().to_owned();
        relay.base = format!("http://{addr}");
        relay
    }

    /// Collects lines until one contains `needle`; panics after the deadline.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no line with {needle:?} ({e}):\n{}", self.log));
            self.log.push_str(&line);
            self.log.push('\n');
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// A field of `/proc/PID/status` in KiB: `VmRSS` (resident now) or `VmHWM` (the peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status of the relay");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// Kills the relay and returns everything it logged. Requests answered before are
    /// logged already (stdout is line-buffered).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("the relay's output did not end: {e}"),
            }
        }
        let _ = self.child.wait();
        std::mem::take(&mut self.log)
    }
}

/// `target/debug/agentrun-sidecar`, built if needed (it is another package's binary).
pub fn sidecar_binary() -> std::path::PathBuf {
    use std::path::PathBuf;
    let relay_bin = PathBuf::from(env!("CARGO_BIN_EXE_agentrun-relay"));
    let dir = relay_bin.parent().expect("binary directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        // The workspace's binaries, with the workspace's features: the same build as
        // `cargo nextest run --workspace` and the e2e suite, so nothing is rebuilt back and
        // forth (`-p agentrun-sidecar` alone unifies features differently).
        .args(["build", "--workspace", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --workspace --bins");
    assert!(status.success(), "cargo build --workspace --bins failed");
    let path = dir.join("agentrun-sidecar");
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// The text inside an SSE id (a cursor): what follows `VERSION.`, base64url-decoded.
pub fn cursor_text(id: &str) -> String {
    use base64::Engine;
    let (_, body) = id.split_once('.').expect("a cursor is VERSION.BASE64");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .expect("cursor body is base64url");
    String::from_utf8(bytes).expect("cursor text is UTF-8")
}

/// A version-1 cursor (`1.` + base64url of `o.VAR=SEQ,...`), as relays before epochs made.
pub fn v1_cursor(text: &str) -> String {
    use base64::Engine;
    format!(
        "1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    )
}

/// `GET /api/runs` of the relay at `base` (no authentication), as JSON.
pub async fn run_list(base: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/api/runs"))
        .await
        .expect("GET /api/runs")
        .json()
        .await
        .expect("the run list is JSON")
}

/// The text of the relay's `/metrics` at `base`.
pub async fn metrics_text(base: &str) -> String {
    metrics_text_with(&reqwest::Client::new(), base).await
}

/// [`metrics_text`] asked with `client` (one that trusts the relay's certificate, or carries
/// credentials).
pub async fn metrics_text_with(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the body of /metrics")
}

/// The value of metric `name` on the relay at `base` (0 when absent).
pub async fn relay_metric(base: &str, name: &str) -> u64 {
    metric(&metrics_text(base).await, name)
}

/// Metric value from `/metrics` text (0 when absent).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Starts `agentrun-sidecar run` for `run` and `variation`, running `bash -c SCRIPT`, with
/// `extra` flags (its output ignored, its log on stderr), and waits until the relay knows the
/// run and the variation. The sidecar is killed with the test; an agent that would outlive it must end when its
/// output pipe closes or its parent (`$PPID`) is gone.
pub async fn sidecar_run(
    relay: &Relay,
    redis_url: &str,
    run: &str,
    variation: &str,
    extra: &[&str],
    script: &str,
) -> ChildGuard {
    use std::process::Stdio;
    let child = ChildGuard::spawn(
        dying_with_test(sidecar_binary())
            .args(["run", "--redis-url", redis_url, "--run-id", run])
            .args([
                "--variation",
                variation,
                "--quiet",
                "--metrics-interval-seconds",
                "0",
            ])
            .args(extra)
            .args(["--", "bash", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    // The run is registered first, its variation added next: wait for both.
    let state_url = format!("{}/api/runs/{run}", relay.base);
    wait_for(
        "the sidecar to register the run and its variation",
        WAIT,
        || {
            let url = state_url.clone();
            async move {
                let resp = reqwest::get(&url).await.ok()?;
                let summary: serde_json::Value = resp.json().await.ok()?;
                summary["variations"]
                    .as_object()?
                    .contains_key(variation)
                    .then_some(())
            }
        },
    )
    .await;
    child
}
