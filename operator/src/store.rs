//! What the operator writes to Redis: the run index, lifecycle facts on `run:{RUN}:status`,
//! control messages on `run:{RUN}:control` (pause, resume, stop) and the retention TTL.
//!
//! Behind a trait so that the reconciler can be tested without Redis; [`RedisStore`] is the real
//! one and uses the `agentrun-protocol` names and primitives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use agentrun_protocol::archive;
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

/// One thing the operator wrote to Redis (the test store records these).
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

/// The operator's writes to Redis.
pub trait RunStore: Send + Sync {
    /// Adds the run to the run index so the relay can list it (idempotent).
    fn register<'a>(&'a self, run: &'a RunInfo) -> BoxFuture<'a, Result<()>>;
    /// Appends a lifecycle fact to `run:{RUN}:status` and announces it.
    fn publish_status<'a>(
        &'a self,
        run_id: &'a str,
        event: &'a StatusEvent,
    ) -> BoxFuture<'a, Result<()>>;
    /// Sends a control message to every variation of the run.
    fn send_control<'a>(
        &'a self,
        run_id: &'a str,
        action: ControlAction,
    ) -> BoxFuture<'a, Result<()>>;
    /// Creates the run's own Redis user unless it exists.
    fn ensure_run_user<'a>(
        &'a self,
        run_id: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
    /// Deletes the run's Redis user (disconnecting its sidecars); no error when it is gone.
    fn delete_run_user<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Puts the retention TTL on every key of the run (unless the run waits for its archive:
    /// then the archiver puts it once the archive is complete).
    fn expire<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
    ) -> BoxFuture<'a, Result<()>>;
    /// Puts the run on the archive queue unless it is there already or archived (idempotent;
    /// `ttl_seconds` is put on its keys once archived). Only called with archiving on.
    fn archive<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    ) -> BoxFuture<'a, Result<()>>;
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
    fn ensure_run_user<'a>(
        &'a self,
        run_id: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let run = parse_run_id(run_id)?;
            self.users
                .ensure(&run, password)
                .await
                .map_err(|e| redis_err(run_id, e))
        })
    }

    fn delete_run_user<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let run = parse_run_id(run_id)?;
            self.users
                .delete(&run)
                .await
                .map_err(|e| redis_err(run_id, e))
        })
    }

    fn register<'a>(&'a self, info: &'a RunInfo) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
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
        })
    }

    fn publish_status<'a>(
        &'a self,
        run_id: &'a str,
        event: &'a StatusEvent,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
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
        })
    }

    fn send_control<'a>(
        &'a self,
        run_id: &'a str,
        action: ControlAction,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let msg = ControlMessage::new(action);
            self.append(
                run_id,
                StreamName::Control,
                EntryType::Control,
                msg.to_json(),
            )
            .await
        })
    }

    fn expire<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let run = parse_run_id(run_id)?;
            let vars: Vec<Variation> = variations
                .iter()
                .filter_map(|v| Variation::new(v.clone()).ok())
                .collect();
            let keys = run.all_keys(vars.iter());
            let mut conn = self.conn.clone();
            archive::expire_unless_archiving(&mut conn, &run, &keys, ttl_seconds)
                .await
                .map_err(|e| redis_err(run_id, e))?;
            // The index entry stays: its score (creation time) lets the relay trim old ids, and
            // it drops ids whose keys have expired.
            Ok(())
        })
    }

    fn archive<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let run = parse_run_id(run_id)?;
            let mut request = archive::ArchiveRequest::new(run, ttl_seconds, PRODUCER);
            request.variations = variations
                .iter()
                .filter_map(|v| Variation::new(v.clone()).ok())
                .collect();
            request.not_before_ms = not_before_ms;
            let mut conn = self.conn.clone();
            archive::enqueue_if_pending(&mut conn, &request)
                .await
                .map_err(|e| redis_err(run_id, e))?;
            Ok(())
        })
    }
}

/// A store that only records what it was asked to write (for the controller's unit tests).
#[derive(Default)]
pub struct RecordingStore {
    calls: std::sync::Mutex<Vec<StoreCall>>,
    fail: std::sync::atomic::AtomicBool,
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
    fn ensure_run_user<'a>(
        &'a self,
        run_id: &'a str,
        _password: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::EnsureUser {
                run_id: run_id.into(),
            })
        })
    }

    fn delete_run_user<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::DeleteUser {
                run_id: run_id.into(),
            })
        })
    }

    fn register<'a>(&'a self, run: &'a RunInfo) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.record(StoreCall::Register(run.clone())) })
    }

    fn publish_status<'a>(
        &'a self,
        run_id: &'a str,
        event: &'a StatusEvent,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::Status {
                run_id: run_id.into(),
                event: event.clone(),
            })
        })
    }

    fn send_control<'a>(
        &'a self,
        run_id: &'a str,
        action: ControlAction,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::Control {
                run_id: run_id.into(),
                action,
            })
        })
    }

    fn expire<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::Expire {
                run_id: run_id.into(),
                variations: variations.to_vec(),
                ttl_seconds,
            })
        })
    }

    fn archive<'a>(
        &'a self,
        run_id: &'a str,
        variations: &'a [String],
        ttl_seconds: u64,
        not_before_ms: Option<u64>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.record(StoreCall::Archive {
                run_id: run_id.into(),
                variations: variations.to_vec(),
                ttl_seconds,
                not_before_ms,
            })
        })
    }
}
