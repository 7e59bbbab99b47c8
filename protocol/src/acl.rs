//! Redis ACL users, one per kind of credential, so that each component can touch only what it
//! needs (see `docs/security.md`).
//!
//! - **run user** (`agentrun-run-RUN`): the sidecars of one run. Keys and channels limited to
//!   `run:{RUN}:*`; only the commands the sidecar sends. Created by the operator when the run
//!   starts, with a random password kept in a Secret owned by the AgentRun; deleted on cleanup
//!   (which also disconnects it).
//! - **relay user**: reads every run's streams and state and the run index, subscribes to
//!   every run's channels, and may append to and publish on **control** streams and channels
//!   only (through a selector); no writes to output, logs or status, no admin commands.
//! - **operator user**: manages run users (`ACL SETUSER`/`DELUSER`, which is as powerful as
//!   an admin: keep its password as safe as Redis's own), registers runs, publishes status
//!   and control, applies retention and puts finished runs on the archive queue.
//! - **archiver user**: reads every run, writes the archive fields of its state hash and its
//!   TTLs, consumes the archive queue and the dead-letter stream.

use crate::archive::{ARCHIVE_DEAD_LETTER_KEY, ARCHIVE_QUEUE_KEY};
use crate::names::{RUNS_INDEX_KEY, RunId};
use redis::RedisError;
use redis::aio::ConnectionLike;

/// Commands every component needs to connect (authentication, handshake, health). A Redis
/// Cluster client also asks any node for the slot map (`CLUSTER SLOTS`, read-only topology,
/// no data) when it connects and after a `MOVED` (a failover or resharding), and sends
/// `ASKING` before following an `ASK` redirection while a slot migrates; without them a
/// component cannot even connect to a cluster with its own user.
const CONNECT: &[&str] = &["+ping", "+hello", "+auth", "+cluster|slots", "+asking"];

/// What the sidecar sends, directly or from inside agentrun's Redis functions (Redis checks
/// every command a function runs against the caller's user). `FCALL` runs only functions
/// the operator loaded: no user but the operator's may load code (see [`crate::functions`]).
const SIDECAR_COMMANDS: &[&str] = &[
    "+fcall",
    "+xadd",
    "+xrange",
    "+xrevrange",
    "+hget",
    "+hset",
    "+hsetnx",
    "+expire",
    "+publish",
    "+spublish",
    "+subscribe",
    "+ssubscribe",
    "+unsubscribe",
    "+sunsubscribe",
    "+wait",
];

/// `resetkeys`, the key patterns, `resetchannels`, the channel patterns, `-@all`, then the
/// connection commands and `commands`: the shape of every component's rules.
fn rules(keys: &[String], channels: &[String], commands: &[&[&str]]) -> Vec<String> {
    let mut rules = vec!["resetkeys".to_owned()];
    rules.extend(keys.iter().cloned());
    rules.push("resetchannels".to_owned());
    rules.extend(channels.iter().cloned());
    rules.push("-@all".to_owned());
    rules.extend(
        std::iter::once(CONNECT)
            .chain(commands.iter().copied())
            .flatten()
            .map(|c| (*c).to_owned()),
    );
    rules
}

/// The ACL user name of a run's sidecars.
pub fn run_username(run: &RunId) -> String {
    format!("agentrun-run-{run}")
}

/// A random password: 32 bytes, hex.
pub fn generate_password() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The rules of a run's user (after `reset`, `on` and the password).
pub fn run_user_rules(run: &RunId) -> Vec<String> {
    rules(
        &[format!("~{}*", run.prefix())],
        &[format!("&{}*", run.prefix())],
        &[SIDECAR_COMMANDS],
    )
}

/// The rules of the relay's user.
pub fn relay_user_rules() -> Vec<String> {
    let mut rules = rules(
        &["%R~run:*".to_owned(), format!("%R~{RUNS_INDEX_KEY}")],
        &["&run:*".to_owned()],
        &[&[
            "+xrange",
            "+xrevrange",
            "+xlen",
            "+hget",
            "+hgetall",
            "+hmget",
            "+exists",
            "+zrange",
            "+zrevrange",
            "+zrangebyscore",
            "+zrevrangebyscore",
            "+zcard",
            "+zscore",
            "+subscribe",
            "+ssubscribe",
            "+unsubscribe",
            "+sunsubscribe",
        ]],
    );
    // Control messages go through the publish function: only on control streams and
    // channels, and the control stream's own producers hash (not the one of output, logs and
    // status, where a write would make the function skip a sidecar's entries). Neither
    // `run:{*}:control` nor `run:{*}:control-producers` can match an output stream of a
    // variation named "control" (`run:{R}:output:control`), since run ids hold no braces.
    rules.push(
        "(~run:{*}:control ~run:{*}:control-producers &run:{*}:control +fcall +xadd +xrevrange +hget +hset +publish +spublish)"
            .to_owned(),
    );
    rules
}

/// The rules of the operator's user.
pub fn operator_user_rules() -> Vec<String> {
    rules(
        &[
            "~run:*".to_owned(),
            format!("~{RUNS_INDEX_KEY}"),
            // It puts finished runs on the archive queue (XADD).
            format!("~{ARCHIVE_QUEUE_KEY}"),
        ],
        &["&run:*".to_owned()],
        &[
            SIDECAR_COMMANDS,
            &[
                // It loads agentrun's Redis functions on every master.
                "+function|load",
                "+acl|setuser",
                "+acl|deluser",
                "+acl|getuser",
                "+info",
                "+hgetall",
                "+zadd",
                "+zrem",
                "+zrangebyscore",
                "+zscore",
                "+del",
                "+hdel",
                "+exists",
                "+ttl",
            ],
        ],
    )
}

/// The rules of the archiver's user: read every run's streams and state, write the state
/// hash's archive fields and the TTLs (through agentrun's functions), and consume the archive queue
/// and the dead-letter stream. No channels, no admin commands.
pub fn archiver_user_rules() -> Vec<String> {
    rules(
        &[
            "~run:*".to_owned(),
            format!("~{ARCHIVE_QUEUE_KEY}"),
            format!("~{ARCHIVE_DEAD_LETTER_KEY}"),
        ],
        &[],
        &[&[
            "+fcall",
            "+xrange",
            "+xrevrange",
            "+xlen",
            "+xadd",
            "+xdel",
            "+xack",
            "+xreadgroup",
            "+xautoclaim",
            "+xclaim",
            "+xpending",
            "+xgroup|create",
            "+hget",
            "+hgetall",
            "+hset",
            "+hsetnx",
            "+hdel",
            "+exists",
            "+expire",
        ]],
    )
}

/// Creates (or replaces) a user with these rules and this password.
pub async fn set_user<C: ConnectionLike>(
    conn: &mut C,
    name: &str,
    password: &str,
    rules: &[String],
) -> Result<(), RedisError> {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(name)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"));
    for r in rules {
        cmd.arg(r);
    }
    cmd.query_async::<()>(conn).await
}

/// Creates the user of a run's sidecars; returns its name.
pub async fn create_run_user<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    password: &str,
) -> Result<String, RedisError> {
    let name = run_username(run);
    set_user(conn, &name, password, &run_user_rules(run)).await?;
    Ok(name)
}

/// Deletes the user of a run's sidecars (and so disconnects them). Deleting a user that does
/// not exist is not an error.
pub async fn delete_run_user<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
) -> Result<(), RedisError> {
    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(run_username(run))
        .query_async::<u64>(conn)
        .await
        .map(|_| ())
}

/// The password of a run's user, derived from a key only the operator holds:
/// HMAC-SHA256(key, "agentrun-run:" + RUN), hex. Deriving it (rather than storing a random
/// one) lets any operator replica, before or after a restart, produce the same password
/// without reading anything back; knowing one run's password reveals nothing about another's.
pub fn derive_run_password(key: &str, run: &RunId) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let tag = ring::hmac::sign(&key, format!("agentrun-run:{run}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates the run's user unless it exists (an existing user, and the sidecars logged in as
/// it, are left alone).
pub async fn ensure_run_user<C: ConnectionLike>(
    conn: &mut C,
    run: &RunId,
    password: &str,
) -> Result<String, RedisError> {
    let name = run_username(run);
    let existing: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&name)
        .query_async(conn)
        .await?;
    if matches!(existing, redis::Value::Nil) {
        set_user(conn, &name, password, &run_user_rules(run)).await?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_passwords_are_stable_per_key_and_run() {
        let a = RunId::new("a").unwrap();
        let b = RunId::new("b").unwrap();
        assert_eq!(derive_run_password("k", &a), derive_run_password("k", &a));
        assert_ne!(derive_run_password("k", &a), derive_run_password("k", &b));
        assert_ne!(
            derive_run_password("k", &a),
            derive_run_password("other", &a)
        );
        assert_eq!(derive_run_password("k", &a).len(), 64);
    }
}
