//! The key that tells the entrypoint apart from the agent.
//!
//! The agent runs as the entrypoint's user, so file permissions cannot keep it off the
//! sidecar's socket (mode 0666: the agent's user is arbitrary) or the shared volume. What it
//! never gets is a key that the sidecar hands to the entrypoint before the agent exists:
//!
//! 1. At start the sidecar loads its key from its private state directory (a volume mounted in
//!    the sidecar container only). When there is none, it generates one, writes the hand-off
//!    file [`HANDOFF_FILE`] next to the socket (mode 0644, atomically: the agent container's
//!    user is arbitrary and must read it), then persists the key in the state directory
//!    ([`STATE_KEY_FILE`], mode 0600). A restarted sidecar finds its key and never writes a
//!    hand-off file again. All this happens before the socket and the health endpoint exist,
//!    so the kubelet (which waits for the sidecar's startup probe) starts the agent container
//!    only once the hand-off file is there.
//! 2. The entrypoint, before it starts the agent, reads the hand-off file and removes it, and
//!    makes itself non-dumpable so that the agent (same uid) cannot read the key from its
//!    memory (`/proc/PID/mem`, `ptrace`).
//! 3. The entrypoint's `Hello` carries the key; the sidecar takes a connection only with the
//!    right key (compared in constant time). Every frame the entrypoint writes to a spool
//!    carries a MAC ([`Key::spool_mac`]) that the sidecar checks when it adopts the spool.

use ring::hmac;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bytes in a key.
pub const KEY_LEN: usize = 32;
/// Bytes of the MAC that follows every spooled frame.
pub const MAC_LEN: usize = 16;
/// The hand-off file, next to the socket.
pub const HANDOFF_FILE: &str = "agentrun-entrypoint.key";
/// The key in the sidecar's state directory.
pub const STATE_KEY_FILE: &str = "sidecar.key";
/// Mode of the hand-off file: the agent container's user, whatever it is, reads it.
const HANDOFF_MODE: u32 = 0o644;
/// Mode of the key in the state directory: the sidecar's user only.
const STATE_KEY_MODE: u32 = 0o600;
/// Domain separation for the spool MAC.
const SPOOL_MAC_CONTEXT: &[u8] = b"agentrun-spool-v1\0";

/// A key shared by one sidecar and its entrypoint; or none (a producer that never got one:
/// nothing it sends is accepted). Never printed.
#[derive(Clone)]
pub struct Key {
    bytes: Option<[u8; KEY_LEN]>,
    mac: hmac::Key,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.bytes.is_some() {
            "Key(..)"
        } else {
            "Key(none)"
        })
    }
}

impl Key {
    /// A new random key from the operating system's generator.
    pub fn generate() -> std::io::Result<Key> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| std::io::Error::other("the system's random generator failed"))?;
        Ok(Key::from_bytes(bytes))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key {
            bytes: Some(bytes),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        }
    }

    /// No key: the spool MAC is computed with an empty key (the format stays the same), and
    /// the `Hello` carries none. A sidecar accepts neither.
    pub fn none() -> Key {
        Key {
            bytes: None,
            mac: hmac::Key::new(hmac::HMAC_SHA256, &[]),
        }
    }

    pub fn is_none(&self) -> bool {
        self.bytes.is_none()
    }

    /// The key's bytes, for the `Hello` frame.
    pub fn bytes(&self) -> Option<&[u8; KEY_LEN]> {
        self.bytes.as_ref()
    }

    /// Whether `presented` is this key (constant time; no key matches nothing).
    pub fn matches(&self, presented: Option<&[u8; KEY_LEN]>) -> bool {
        match (&self.bytes, presented) {
            (Some(mine), Some(theirs)) => constant_time_eq(mine, theirs),
            _ => false,
        }
    }

    /// The MAC of a spooled frame: HMAC-SHA256 over the producer, the frame's byte offset in
    /// its spool file and its encoded bytes, truncated to [`MAC_LEN`]. Binding the producer and
    /// the offset means that a frame copied into another spool, or moved within one, does not
    /// verify.
    pub fn spool_mac(&self, producer: &str, offset: u64, frame: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(SPOOL_MAC_CONTEXT);
        ctx.update(&(producer.len() as u64).to_be_bytes());
        ctx.update(producer.as_bytes());
        ctx.update(&offset.to_be_bytes());
        ctx.update(frame);
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }

    /// Whether `mac` is the MAC of this spooled frame (constant time).
    pub fn verify_spool_mac(&self, producer: &str, offset: u64, frame: &[u8], mac: &[u8]) -> bool {
        mac.len() == MAC_LEN && constant_time_eq(&self.spool_mac(producer, offset, frame), mac)
    }
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a key (64 hexadecimal digits)")]
    Malformed { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot remove {path} after reading it: {source}; the agent would find the key there, so it is not used"
    )]
    NotRemovable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The text of a key file: the key in hexadecimal and a newline.
fn encode(key: &[u8; KEY_LEN]) -> String {
    let mut s: String = key.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

fn decode(text: &[u8]) -> Option<[u8; KEY_LEN]> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text.len() != KEY_LEN * 2 {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (i, pair) in text.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(key)
}

/// Writes a key file atomically (a temporary file, then a rename) with `mode`, whatever the
/// process's umask.
fn write_key_file(path: &Path, key: &Key, mode: u32) -> Result<(), KeyFileError> {
    let error = |source| KeyFileError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    let bytes = key
        .bytes()
        .ok_or_else(|| error(std::io::Error::other("there is no key to write")))?;
    let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(encode(bytes).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(error)
}

/// Reads a key file of at most a few bytes.
fn read_key_file(path: &Path) -> Result<(Key, std::fs::Metadata), KeyFileError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyFileError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(KeyFileError::Unreadable {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let unreadable = |source| KeyFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(unreadable)?;
    let mut text = Vec::with_capacity(KEY_LEN * 2 + 1);
    file.take(KEY_LEN as u64 * 2 + 2)
        .read_to_end(&mut text)
        .map_err(unreadable)?;
    let key = decode(&text).ok_or_else(|| KeyFileError::Malformed {
        path: path.to_path_buf(),
    })?;
    Ok((Key::from_bytes(key), meta))
}

/// Where the sidecar's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Found in the state directory: this sidecar restarted; no hand-off file was written.
    Restored,
    /// Made now and handed off next to the socket (and persisted when there is a state
    /// directory).
    HandedOff,
}

/// The sidecar's key: loaded from `state_dir`, or generated, handed off at `handoff` and then
/// persisted in `state_dir` (in that order, so that a crash in between only makes the next
/// start hand off a new key). Without a state directory the key lives in memory only, and a
/// restarted sidecar hands off a new one that the running entrypoint does not have.
pub fn sidecar_key(
    state_dir: Option<&Path>,
    handoff: &Path,
) -> Result<(Key, KeyOrigin), KeyFileError> {
    if let Some(dir) = state_dir {
        match read_key_file(&dir.join(STATE_KEY_FILE)) {
            Ok((key, _)) => return Ok((key, KeyOrigin::Restored)),
            Err(KeyFileError::Missing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let key = Key::generate().map_err(|source| KeyFileError::Unwritable {
        path: handoff.to_path_buf(),
        source,
    })?;
    write_key_file(handoff, &key, HANDOFF_MODE)?;
    if let Some(dir) = state_dir {
        write_key_file(&dir.join(STATE_KEY_FILE), &key, STATE_KEY_MODE)?;
    }
    Ok((key, KeyOrigin::HandedOff))
}

/// Writes the hand-off file for `key` (what the sidecar does at its first start).
pub fn write_handoff(path: &Path, key: &Key) -> Result<(), KeyFileError> {
    write_key_file(path, key, HANDOFF_MODE)
}

/// Persists `key` in a sidecar state directory.
pub fn persist_key(state_dir: &Path, key: &Key) -> Result<(), KeyFileError> {
    write_key_file(&state_dir.join(STATE_KEY_FILE), key, STATE_KEY_MODE)
}

/// Reads the key persisted in a sidecar state directory.
pub fn load_key(state_dir: &Path) -> Result<Key, KeyFileError> {
    read_key_file(&state_dir.join(STATE_KEY_FILE)).map(|(k, _)| k)
}

/// A key taken from the hand-off file.
#[derive(Debug, Clone)]
pub struct Handoff {
    pub key: Key,
    /// Who wrote it: the sidecar's user. The entrypoint sends its key only to a socket served
    /// by that user.
    pub sidecar_uid: u32,
}

/// Reads the hand-off file and removes it (the entrypoint does this before the agent exists).
/// A file that cannot be removed is not used: the agent would find the key there.
pub fn take_handoff(path: &Path) -> Result<Handoff, KeyFileError> {
    let (key, meta) = read_key_file(path)?;
    std::fs::remove_file(path).map_err(|source| KeyFileError::NotRemovable {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Handoff {
        key,
        sidecar_uid: meta.uid(),
    })
}

/// Makes this process non-dumpable: another process of the same user (the agent) can then
/// neither `ptrace` it nor read its memory or environment under `/proc`. A program started
/// from it gets the normal setting again at `execve`.
pub fn protect_memory() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_start_hands_off_and_persists_and_a_restart_only_restores() {
        let volume = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let handoff = volume.path().join(HANDOFF_FILE);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let (key, origin) = sidecar_key(Some(state.path()), &handoff).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(origin, KeyOrigin::HandedOff);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&handoff),
            0o644,
            "readable by the agent container's user"
        );
        assert_eq!(mode(&state.path().join(STATE_KEY_FILE)), 0o600);
        let taken = take_handoff(&handoff).unwrap();
        assert!(key.matches(taken.key.bytes()));
        assert_eq!(taken.sidecar_uid, nix::unistd::geteuid().as_raw());
        assert!(!handoff.exists(), "the entrypoint removes it");

        let (again, origin) = sidecar_key(Some(state.path()), &handoff).unwrap();
        assert_eq!(origin, KeyOrigin::Restored);
        assert!(again.matches(key.bytes()));
        assert!(
            !handoff.exists(),
            "a restarted sidecar never hands off again"
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(volume.path()).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 1);
    }

    #[test]
    fn without_a_state_directory_every_start_hands_off_a_new_key() {
        let volume = tempfile::tempdir().unwrap();
        let handoff = volume.path().join(HANDOFF_FILE);
        let (first, _) = sidecar_key(None, &handoff).unwrap();
        let (second, origin) = sidecar_key(None, &handoff).unwrap();
        assert_eq!(origin, KeyOrigin::HandedOff);
        assert!(!first.matches(second.bytes()));
        assert!(second.matches(take_handoff(&handoff).unwrap().key.bytes()));
    }

    #[test]
    fn key_files_that_are_missing_or_malformed_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HANDOFF_FILE);
        let err = take_handoff(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Missing { .. }), "{err}");
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(65), &"0".repeat(200)] {
            std::fs::write(&path, bad).unwrap();
            let err = take_handoff(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Malformed { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains(HANDOFF_FILE));
        }
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join(STATE_KEY_FILE), "nonsense").unwrap();
        assert!(sidecar_key(Some(state.path()), &path).is_err());
    }

    #[test]
    fn keys_match_only_themselves_and_no_key_matches_nothing() {
        let a = Key::generate().unwrap();
        let b = Key::generate().unwrap();
        assert!(a.matches(a.bytes()));
        assert!(!a.matches(b.bytes()));
        assert!(!a.matches(None));
        assert!(!Key::none().matches(None));
        assert!(!Key::none().matches(a.bytes()));
        assert_eq!(format!("{a:?}"), "Key(..)");
    }

    #[test]
    fn a_spool_mac_binds_the_key_the_producer_the_offset_and_the_bytes() {
        let key = Key::generate().unwrap();
        let mac = key.spool_mac("ep-1", 40, b"frame");
        assert!(key.verify_spool_mac("ep-1", 40, b"frame", &mac));
        assert!(!key.verify_spool_mac("ep-2", 40, b"frame", &mac));
        assert!(!key.verify_spool_mac("ep-1", 41, b"frame", &mac));
        assert!(!key.verify_spool_mac("ep-1", 40, b"frams", &mac));
        assert!(!key.verify_spool_mac("ep-1", 40, b"frame", &mac[..15]));
        let other = Key::generate().unwrap();
        assert!(!other.verify_spool_mac("ep-1", 40, b"frame", &mac));
        // Without a key the MAC is still there (the format is the same), but anyone can make
        // it: a sidecar, which always has a key, never accepts it.
        let none = Key::none().spool_mac("ep-1", 0, b"frame");
        assert!(!key.verify_spool_mac("ep-1", 0, b"frame", &none));
    }
}
