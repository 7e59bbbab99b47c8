//! What the operator writes to Redis: the run index, lifecycle facts on `run:{RUN}:status`,
//! control messages on `run:{RUN}:control` (pause, resume, stop) and the retention TTL.
//!
//! Behind a trait so that the reconciler can be tested without Redis; [`RedisStore`] is the real
//! one and uses the `agentrun-protocol` names and primitives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use agentrun_protocol::archive::{self, ArchiveDetails};
use agentrun_protocol::publish::{register_run, set_state};
use agentrun_protocol::state_hash;
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RedisConn,
    RedisSettings, RunId, StatusEvent, StreamName, Variation,
};
use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::run_users::RunUsers;

/// Producer name of the operator in the streams it writes.
pub const PRODUCER: &str = "operator";

/// Facts about a run that the relay lists.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    pub namespace: String,
    pub name: String,
    pub variations: Vec<String>,
    pub created_ms: u64,
}

/// One write of the operator to Redis: what [`RunStore::write`] carries out (and the test
/// store records).
#[derive(Clone, Debug, PartialEq)]
pub enum StoreCall {
    Register(RunInfo),
    Status {
        run_id: String,
        event: StatusEvent,
    },
    Control {
        run_id: String,
        action: ControlAction,
    },
    Expire {
        run_id: String,
        variations: Vec<String>,
        ttl_seconds: u64,
    },
    EnsureUser {
        run_id: String,
        password: String,
    },
    DeleteUser {
        run_id: String,
    },
    Archive {
        run_id: String,
        variations: Vec<String>,
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    },
}

/// The operator's writes to Redis, and the one thing it reads back (the archive's progress).
/// A store carries out [`StoreCall`]s; the other write methods name them.
pub trait RunStore: Send + Sync {
    /// Carries out one write.
    fn write(&self, call: StoreCall) -> BoxFuture<'_, Result<()>>;

    /// What the run's state hash says about its archive (`None`: nothing, or its keys are
    /// gone).
    fn archive_details(&self, run_id: &str) -> BoxFuture<'_, Result<Option<ArchiveDetails>>>;

    /// Drops from the run index the runs created before `created_before_ms` whose keys are
    /// gone; returns how many it dropped.
    fn prune_index(
        &self,
        _created_before_ms: u64,
    ) -> BoxFuture<'_, std::result::Result<usize, redis::RedisError>> {
        Box::pin(std::future::ready(Ok(0)))
    }

    /// Adds the run to the run index so the relay can list it (idempotent).
    fn register(&self, run: &RunInfo) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::Register(run.clone()))
    }

    /// Appends a lifecycle fact to `run:{RUN}:status` and announces it.
    fn publish_status(&self, run_id: &str, event: &StatusEvent) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::Status {
            run_id: run_id.into(),
            event: event.clone(),
        })
    }

    /// Sends a control message to every variation of the run.
    fn send_control(&self, run_id: &str, action: ControlAction) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::Control {
            run_id: run_id.into(),
            action,
        })
    }

    /// Creates the run's own Redis user unless it exists.
    fn ensure_run_user(&self, run_id: &str, password: &str) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::EnsureUser {
            run_id: run_id.into(),
            password: password.into(),
        })
    }

    /// Deletes the run's Redis user (disconnecting its sidecars); no error when it is gone.
    fn delete_run_user(&self, run_id: &str) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::DeleteUser {
            run_id: run_id.into(),
        })
    }

    /// Puts the retention TTL on every key of the run (unless the run waits for its archive:
    /// then the archiver puts it once the archive is complete).
    fn expire(
        &self,
        run_id: &str,
        variations: &[String],
        ttl_seconds: u64,
    ) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::Expire {
            run_id: run_id.into(),
            variations: variations.to_vec(),
            ttl_seconds,
        })
    }

    /// Puts the run on the archive queue unless it is there already or archived (idempotent;
    /// `ttl_seconds` is put on its keys once archived). Only called with archiving on.
    fn archive(
        &self,
        run_id: &str,
        variations: &[String],
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    ) -> BoxFuture<'_, Result<()>> {
        self.write(StoreCall::Archive {
            run_id: run_id.into(),
            variations: variations.to_vec(),
            ttl_seconds,
            not_before_ms,
        })
    }
}

/// The real store.
pub struct RedisStore {
    conn: RedisConn,
    publisher: Publisher,
    last_pseq: AtomicU64,
    users: RunUsers,
    archive: bool,
}

impl RedisStore {
    /// Connects to Redis.
    pub async fn connect(settings: &RedisSettings, stream_max_len: u64) -> anyhow::Result<Self> {
        let conn = settings.connect().await?;
        let users = RunUsers::start(settings.clone(), conn.clone());
        Ok(Self {
            conn,
            publisher: Publisher::new(PublishOptions {
                max_len: Some(stream_max_len),
                publish_command: settings.publish_command(),
            }),
            last_pseq: AtomicU64::new(0),
            users,
            archive: false,
        })
    }

    /// Checks that the server runs agentrun (Redis 7.0 or newer) and loads agentrun's Redis
    /// functions; the error says what to do.
    pub async fn prepare_server(
        &self,
    ) -> std::result::Result<(), agentrun_protocol::functions::Unsupported> {
        let mut conn = self.conn.clone();
        agentrun_protocol::functions::prepare_server(&mut conn).await
    }

    /// Marks every run it registers for archiving (see `agentrun_protocol::archive`).
    pub fn with_archiving(mut self, archive: bool) -> Self {
        self.archive = archive;
        self
    }

    /// Producer sequence: increasing across restarts (milliseconds), unique within a process.
    fn next_pseq(&self) -> u64 {
        let now = agentrun_protocol::now_ms();
        let mut prev = self.last_pseq.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_pseq
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }

    async fn append(
        &self,
        run_id: &str,
        stream: StreamName,
        kind: EntryType,
        content: Vec<u8>,
    ) -> Result<()> {
        let run = parse_run_id(run_id)?;
        let entry = NewEntry::now(self.next_pseq(), kind, content);
        let mut conn = self.conn.clone();
        self.publisher
            .publish_one(&mut conn, &run, &stream, PRODUCER, &entry)
            .await
            .map_err(|e| redis_err(run_id, e))?;
        Ok(())
    }
}

fn parse_run_id(run_id: &str) -> Result<RunId> {
    RunId::new(run_id).map_err(|e| Error::Redis {
        run_id: run_id.into(),
        message: e.to_string(),
    })
}

fn redis_err(run_id: &str, e: impl std::fmt::Display) -> Error {
    Error::Redis {
        run_id: run_id.into(),
        message: e.to_string(),
    }
}

impl RunStore for RedisStore {
    fn prune_index(
        &self,
        created_before_ms: u64,
    ) -> BoxFuture<'_, std::result::Result<usize, redis::RedisError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            agentrun_protocol::publish::prune_run_index(&mut conn, created_before_ms).await
        })
    }

    fn write(&self, call: StoreCall) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match call {
                StoreCall::Register(info) => self.register_run(&info).await,
                StoreCall::Status { run_id, event } => self.append_status(&run_id, &event).await,
                StoreCall::Control { run_id, action } => {
                    let msg = ControlMessage::new(action);
                    let content = msg.to_json();
                    self.append(&run_id, StreamName::Control, EntryType::Control, content)
                        .await
                }
                StoreCall::EnsureUser { run_id, password } => {
                    let run = parse_run_id(&run_id)?;
                    let done = self.users.ensure(&run, &password).await;
                    done.map_err(|e| redis_err(&run_id, e))
                }
                StoreCall::DeleteUser { run_id } => {
                    let run = parse_run_id(&run_id)?;
                    let done = self.users.delete(&run).await;
                    done.map_err(|e| redis_err(&run_id, e))
                }
                StoreCall::Expire {
                    run_id,
                    variations,
                    ttl_seconds,
                } => self.expire_keys(&run_id, &variations, ttl_seconds).await,
                StoreCall::Archive {
                    run_id,
                    variations,
                    ttl_seconds,
                    not_before_ms,
                } => {
                    self.enqueue_archive(&run_id, &variations, ttl_seconds, not_before_ms)
                        .await
                }
            }
        })
    }

    fn archive_details(&self, run_id: &str) -> BoxFuture<'_, Result<Option<ArchiveDetails>>> {
        let run_id = run_id.to_owned();
        Box::pin(async move { self.read_archive_details(&run_id).await })
    }
}

impl RedisStore {
    async fn read_archive_details(&self, run_id: &str) -> Result<Option<ArchiveDetails>> {
        let run = parse_run_id(run_id)?;
        let mut conn = self.conn.clone();
        archive::details(&mut conn, &run)
            .await
            .map_err(|e| redis_err(run_id, e))
    }

    async fn register_run(&self, info: &RunInfo) -> Result<()> {
        let run = parse_run_id(&info.run_id)?;
        let mut conn = self.conn.clone();
        let fields = [
            (state_hash::NAMESPACE, info.namespace.clone()),
            (state_hash::NAME, info.name.clone()),
            (state_hash::VARIATIONS, info.variations.join(",")),
            (state_hash::SOURCE, PRODUCER.to_string()),
        ];
        register_run(&mut conn, &run, info.created_ms, &fields)
            .await
            .map_err(|e| redis_err(&info.run_id, e))?;
        if self.archive {
            archive::mark_pending(&mut conn, &run)
                .await
                .map_err(|e| redis_err(&info.run_id, e))?;
        }
        Ok(())
    }

    async fn append_status(&self, run_id: &str, event: &StatusEvent) -> Result<()> {
        self.append(
            run_id,
            StreamName::Status,
            EntryType::Status,
            event.to_json(),
        )
        .await?;
        let run = parse_run_id(run_id)?;
        // A variation's event is its `var:NAME`; a run-wide one sets the run's `phase`
        // (and `ended` once final), which tells readers the run is over.
        let json = String::from_utf8_lossy(&event.to_json()).into_owned();
        let mut fields: Vec<(String, String)> = Vec::new();
        match &event.variation {
            Some(v) => fields.push((state_hash::var_field(v), json)),
            None => {
                fields.push((state_hash::PHASE.into(), event.state.as_str().into()));
                fields.push((state_hash::RUN.into(), json));
                if event.state.is_final() {
                    fields.push((
                        state_hash::ENDED.into(),
                        agentrun_protocol::now_ms().to_string(),
                    ));
                }
            }
        }
        let refs: Vec<(&str, String)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut conn = self.conn.clone();
        set_state(&mut conn, &run, &refs)
            .await
            .map_err(|e| redis_err(run_id, e))
    }

    async fn expire_keys(
        &self,
        run_id: &str,
        variations: &[String],
        ttl_seconds: u64,
    ) -> Result<()> {
        let run = parse_run_id(run_id)?;
        let keys = run.all_keys(valid_variations(variations).iter());
        let mut conn = self.conn.clone();
        archive::expire_unless_archiving(&mut conn, &run, &keys, ttl_seconds)
            .await
            .map_err(|e| redis_err(run_id, e))?;
        // The index entry stays until the keys are gone; then the leader's pruning drops it
        // (`run::prune_index`).
        Ok(())
    }

    async fn enqueue_archive(
        &self,
        run_id: &str,
        variations: &[String],
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    ) -> Result<()> {
        let run = parse_run_id(run_id)?;
        let mut request = archive::ArchiveRequest::new(run, ttl_seconds, PRODUCER);
        request.variations = valid_variations(variations);
        request.not_before_ms = not_before_ms;
        let mut conn = self.conn.clone();
        archive::enqueue_if_pending(&mut conn, &request)
            .await
            .map_err(|e| redis_err(run_id, e))?;
        Ok(())
    }
}

/// The variation names that are valid (the CRD's validation already refused the others).
fn valid_variations(names: &[String]) -> Vec<Variation> {
    names
        .iter()
        .filter_map(|v| Variation::new(v.clone()).ok())
        .collect()
}

/// A store that only records what it was asked to write (for the controller's unit tests).
#[derive(Default)]
pub struct RecordingStore {
    calls: std::sync::Mutex<Vec<StoreCall>>,
    fail: std::sync::atomic::AtomicBool,
    archive: std::sync::Mutex<Option<ArchiveDetails>>,
}

impl RecordingStore {
    /// A shared recording store.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<StoreCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// What [`RunStore::archive_details`] answers from now on.
    pub fn set_archive(&self, details: Option<ArchiveDetails>) {
        if let Ok(mut a) = self.archive.lock() {
            *a = details;
        }
    }

    /// Makes every later call fail like an unreachable Redis.
    pub fn fail_from_now(&self) {
        self.fail.store(true, Ordering::SeqCst);
    }

    fn record(&self, call: StoreCall) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Redis {
                run_id: "test".into(),
                message: "connection refused (test store)".into(),
            });
        }
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
        Ok(())
    }
}

impl RunStore for RecordingStore {
    fn write(&self, call: StoreCall) -> BoxFuture<'_, Result<()>> {
        Box::pin(std::future::ready(self.record(call)))
    }

    fn archive_details(&self, _run_id: &str) -> BoxFuture<'_, Result<Option<ArchiveDetails>>> {
        let details = self.archive.lock().ok().and_then(|a| a.clone());
        Box::pin(std::future::ready(Ok(details)))
    }
}
