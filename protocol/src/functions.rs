//! agentrun's Redis functions: every script agentrun runs in Redis, in one library
//! (`agentrun.lua`) that the operator loads on every master (`FUNCTION LOAD REPLACE`).
//!
//! Why functions and not `EVAL`/`EVALSHA`: a user that may run scripts may run *any* script,
//! and one `while true do end` makes Redis answer `BUSY` to every run. With a library loaded by
//! the operator, run users, the relay and the archiver need only `FCALL`, which runs agentrun's
//! code and nothing else; nobody but the operator (or an administrator) may load code.
//!
//! Redis keeps functions in its data set: they are replicated to replicas, saved in RDB and
//! AOF files, and lost with the data of a server that restarts without persistence. The
//! operator loads the library again on a node that restarts or joins (`operator/src/
//! run_users.rs`); a caller that finds a function missing loads the library itself when its
//! user may ([`Call::invoke`]), and otherwise gets an error that says what to do.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ToRedisArgs, Value};

/// The library's source.
pub const LIBRARY: &str = include_str!("agentrun.lua");
/// The library's name (`#!lua name=...`).
pub const LIBRARY_NAME: &str = "agentrun";

/// Appends a batch of one producer's entries to a stream and announces each
/// ([`crate::publish`]).
pub const PUBLISH: &str = "agentrun_v1_publish";
/// Declares a variation of a run ([`crate::publish::add_variation`]).
pub const ADD_VARIATION: &str = "agentrun_v1_add_variation";
/// Recomputes a run's phase ([`crate::publish::settle_phase`]).
pub const SETTLE_PHASE: &str = "agentrun_v1_settle_phase";
/// Records a run's archive status ([`crate::archive::set_status`]).
pub const ARCHIVE_SET_STATUS: &str = "agentrun_v1_archive_set_status";
/// Expires a run's keys unless it waits for its archive
/// ([`crate::archive::expire_unless_archiving`]).
pub const EXPIRE_UNLESS_ARCHIVING: &str = "agentrun_v1_expire_unless_archiving";
/// Marks a run's archive complete and applies retention ([`crate::archive::complete`]).
pub const ARCHIVE_COMPLETE: &str = "agentrun_v1_archive_complete";
/// Keeps an archive request from looking idle while its archiver works on it.
pub const ARCHIVE_HEARTBEAT: &str = "agentrun_v1_archive_heartbeat";
/// Moves an archive request to the dead-letter stream.
pub const ARCHIVE_DEAD_LETTER: &str = "agentrun_v1_archive_dead_letter";
/// Moves dead letters back to the archive queue.
pub const ARCHIVE_REQUEUE: &str = "agentrun_v1_archive_requeue";

/// Every function the library registers.
pub const ALL: &[&str] = &[
    PUBLISH,
    ADD_VARIATION,
    SETTLE_PHASE,
    ARCHIVE_SET_STATUS,
    EXPIRE_UNLESS_ARCHIVING,
    ARCHIVE_COMPLETE,
    ARCHIVE_HEARTBEAT,
    ARCHIVE_DEAD_LETTER,
    ARCHIVE_REQUEUE,
];

/// Loads (or replaces) the library on the server behind `conn`. A replica refuses with
/// `READONLY`: it gets the library from its master.
pub async fn load_library<C: ConnectionLike>(conn: &mut C) -> Result<(), RedisError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<String>(conn)
        .await
        .map(|_| ())
}

/// The oldest Redis agentrun runs on (major, minor): Redis Functions and sharded Pub/Sub came
/// in 7.0.
pub const MIN_REDIS_VERSION: (u64, u64) = (7, 0);

/// Why a Redis server cannot run agentrun, saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error(
        "Redis {version} is too old: agentrun needs Redis 7.0 or newer (its atomic steps are Redis Functions, and on a Redis Cluster it needs sharded Pub/Sub); upgrade Redis, or install the chart's bundled Redis (redis.enabled=true)"
    )]
    TooOld { version: String },
    #[error(
        "this Redis does not know the FUNCTION command ({0}; renamed or disabled with rename-command?): agentrun's atomic steps are Redis Functions, which the operator loads with FUNCTION LOAD"
    )]
    NoFunctions(String),
    #[error(
        "the operator's Redis user may not load agentrun's functions ({0}): grant it `+function|load` (docs/security.md lists what each component's user needs)"
    )]
    NotAllowed(String),
    #[error("could not check the Redis server: {0}")]
    Redis(#[from] RedisError),
}

/// The lowest `redis_version` in an `INFO server` reply (one server's text, or a map of them
/// from a cluster client).
fn lowest_version(info: &Value) -> Option<(u64, u64, String)> {
    let texts: Vec<String> = match info {
        Value::Map(nodes) => nodes
            .iter()
            .filter_map(|(_, v)| String::from_redis_value(v.clone()).ok())
            .collect(),
        other => String::from_redis_value(other.clone())
            .ok()
            .into_iter()
            .collect(),
    };
    texts
        .iter()
        .filter_map(|text| {
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))?
                .trim()
                .to_owned();
            let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
            let (major, minor) = (parts.next()??, parts.next().flatten().unwrap_or(0));
            Some((major, minor, version))
        })
        .min()
}

/// What the operator does before it starts: checks that the server is Redis 7.0 or newer and
/// loads the library, with an error that says what to do when it cannot (a replica, which
/// gets the library from its master, passes).
pub async fn prepare_server<C: ConnectionLike>(conn: &mut C) -> Result<(), Unsupported> {
    let info: Value = redis::cmd("INFO").arg("server").query_async(conn).await?;
    if let Some((major, minor, version)) = lowest_version(&info)
        && (major, minor) < MIN_REDIS_VERSION
    {
        return Err(Unsupported::TooOld { version });
    }
    match load_library(conn).await {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("READONLY") => Ok(()),
        Err(e) if e.code() == Some("NOPERM") => Err(Unsupported::NotAllowed(e.to_string())),
        Err(e) if e.to_string().contains("unknown command") => {
            Err(Unsupported::NoFunctions(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether this error says that a function is not loaded.
pub fn is_missing_function(e: &RedisError) -> bool {
    e.detail().is_some_and(|d| d.contains("Function not found"))
}

/// The same for an error reply inside a pipeline.
pub fn is_missing_function_reply(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.details().is_some_and(|d| d.contains("Function not found")))
}

/// Loads the library after a call found a function missing. When this user may not load
/// code, the error says so and what to do.
pub async fn load_after_missing<C: ConnectionLike>(conn: &mut C) -> Result<(), RedisError> {
    load_library(conn).await.map_err(|e| {
        RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "agentrun's Redis functions are not loaded on this server",
            format!(
                "the operator loads library `{LIBRARY_NAME}` on every master when it starts \
                 and when a node restarts; this user could not load it itself ({e}). Start the \
                 operator, or load protocol/src/agentrun.lua with FUNCTION LOAD as an admin"
            ),
        ))
    })
}

/// One call of a library function: its keys first, then its arguments.
#[derive(Debug, Clone)]
pub struct Call {
    cmd: Cmd,
}

impl Call {
    pub fn new<K: AsRef<[u8]>>(function: &'static str, keys: impl IntoIterator<Item = K>) -> Self {
        let keys: Vec<K> = keys.into_iter().collect();
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function).arg(keys.len());
        for k in &keys {
            cmd.arg(k.as_ref());
        }
        Self { cmd }
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// The `FCALL` command.
    pub fn cmd(&self) -> &Cmd {
        &self.cmd
    }

    pub fn into_cmd(self) -> Cmd {
        self.cmd
    }

    /// Runs the call; when the function is missing, loads the library (if this user may) and
    /// runs it again.
    pub async fn invoke<T: FromRedisValue, C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> Result<T, RedisError> {
        match self.cmd.query_async(conn).await {
            Err(e) if is_missing_function(&e) => {
                load_after_missing(conn).await?;
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_version_of_every_node_is_the_one_checked() {
        let info = |v: &str| {
            Value::BulkString(
                format!("# Server\r\nredis_version:{v}\r\nredis_mode:cluster\r\n").into_bytes(),
            )
        };
        assert_eq!(
            lowest_version(&info("7.0.15")),
            Some((7, 0, "7.0.15".into()))
        );
        let nodes = Value::Map(vec![
            (Value::SimpleString("a:1".into()), info("7.2.4")),
            (Value::SimpleString("b:2".into()), info("6.2.14")),
        ]);
        assert_eq!(lowest_version(&nodes), Some((6, 2, "6.2.14".into())));
        assert_eq!(lowest_version(&Value::Nil), None);
    }

    #[test]
    fn the_library_registers_every_function_and_only_those() {
        assert!(LIBRARY.starts_with(&format!("#!lua name={LIBRARY_NAME}\n")));
        let registered: Vec<&str> = LIBRARY
            .lines()
            .filter_map(|l| l.strip_prefix("redis.register_function('"))
            .filter_map(|l| l.split('\'').next())
            .collect();
        assert_eq!(registered, ALL);
        for f in ALL {
            assert!(f.starts_with("agentrun_v1_"), "{f}");
        }
    }

    #[test]
    fn a_call_is_one_fcall_with_its_key_count() {
        let mut call = Call::new(PUBLISH, ["k1", "k2"]);
        call.arg(7).arg("x");
        let packed = String::from_utf8_lossy(&call.cmd().get_packed_command()).into_owned();
        let parts: Vec<&str> = packed
            .split("\r\n")
            .filter(|p| !p.starts_with('$'))
            .collect();
        assert_eq!(
            parts[1..7],
            ["FCALL", "agentrun_v1_publish", "2", "k1", "k2", "7"]
        );
    }
}
