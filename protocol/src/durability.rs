//! How safe an entry must be before the sidecar acknowledges it to the entrypoint
//! (`agentrun-sidecar --durability`, `AGENTRUN_DURABILITY`; the operator's
//! `--sidecar-durability` hands it to every sidecar).
//!
//! The entrypoint forgets a frame once it is acknowledged. With `none` that happens as soon as
//! the Redis master replied, so a master that loses its recent writes (no persistence, AOF
//! `everysec`, a failover to a replica that was behind) loses acknowledged output. The other
//! levels wait, after each published pipeline, until Redis says the writes are on `N`
//! replicas (`WAIT`) or in the master's fsynced append-only file (`WAITAOF`, Redis 7.2+);
//! until then nothing is acknowledged and the frames stay with the entrypoint.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The longest wait accepted: below the Redis client's 10 s response timeout.
pub const MAX_TIMEOUT_MS: u64 = 5_000;
/// The wait when none is given.
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;

/// The accepted forms, for error messages and `--help`.
pub const FORMS: &str = "none | replicas=N[,timeout=MS] | aof[,replicas=N][,timeout=MS] \
     (N at least 1 for replicas=, 0 or more with aof; MS from 1 to 5000, default 1000)";

/// The message for a Redis without `WAITAOF`.
pub const NO_WAITAOF: &str = "--durability aof: this Redis does not support WAITAOF; it needs \
     Redis 7.2 or later, or use --durability replicas=N";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge once the master replied (the default).
    #[default]
    None,
    /// `WAIT replicas timeout`: acknowledge once `replicas` replicas have the writes.
    Replicas { replicas: u32, timeout: Duration },
    /// `WAITAOF 1 replicas timeout`: acknowledge once the master has fsynced its AOF (and
    /// `replicas` replicas theirs).
    Aof { replicas: u32, timeout: Duration },
}

impl Durability {
    pub fn is_none(&self) -> bool {
        matches!(self, Durability::None)
    }

    /// How long one wait may take.
    pub fn timeout(&self) -> Duration {
        match self {
            Durability::None => Duration::ZERO,
            Durability::Replicas { timeout, .. } | Durability::Aof { timeout, .. } => *timeout,
        }
    }

    /// The command that waits for this level, or `None` for `none`.
    pub fn command(&self) -> Option<redis::Cmd> {
        match *self {
            Durability::None => None,
            Durability::Replicas { replicas, timeout } => {
                let mut cmd = redis::cmd("WAIT");
                cmd.arg(replicas).arg(timeout.as_millis() as u64);
                Some(cmd)
            }
            Durability::Aof { replicas, timeout } => {
                let mut cmd = redis::cmd("WAITAOF");
                cmd.arg(1).arg(replicas).arg(timeout.as_millis() as u64);
                Some(cmd)
            }
        }
    }

    /// Whether the answer to [`command`](Self::command) reaches this level.
    pub fn reached(&self, answer: &redis::Value) -> Result<bool, String> {
        let int = |v: &redis::Value| match v {
            redis::Value::Int(n) => Ok(*n),
            other => Err(format!("unexpected answer {other:?}")),
        };
        match (self, answer) {
            (Durability::None, _) => Ok(true),
            (Durability::Replicas { replicas, .. }, v) => Ok(int(v)? >= i64::from(*replicas)),
            (Durability::Aof { replicas, .. }, redis::Value::Array(a)) if a.len() == 2 => {
                Ok(int(&a[0])? >= 1 && int(&a[1])? >= i64::from(*replicas))
            }
            (_, other) => Err(format!("unexpected answer to WAITAOF: {other:?}")),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::None => write!(f, "none"),
            Durability::Replicas { replicas, timeout } => {
                write!(f, "replicas={replicas},timeout={}", timeout.as_millis())
            }
            Durability::Aof { replicas, timeout } => {
                write!(f, "aof,replicas={replicas},timeout={}", timeout.as_millis())
            }
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("--durability {s:?} is not valid ({why}); accepted forms: {FORMS}");
        let s_trim = s.trim();
        if s_trim == "none" {
            return Ok(Durability::None);
        }
        let mut parts = s_trim.split(',').map(str::trim);
        let first = parts.next().unwrap_or_default();
        let (aof, mut replicas) = match first {
            "aof" => (true, Some(0u32)),
            _ => match first.strip_prefix("replicas=") {
                Some(n) => (false, Some(parse_replicas(n).map_err(|w| bad(&w))?)),
                None => return Err(bad("it must start with none, replicas= or aof")),
            },
        };
        let mut timeout = None;
        let mut seen_replicas = !aof;
        for part in parts {
            if let Some(n) = part.strip_prefix("replicas=") {
                if seen_replicas {
                    return Err(bad("replicas= is given twice"));
                }
                seen_replicas = true;
                replicas = Some(parse_replicas(n).map_err(|w| bad(&w))?);
            } else if let Some(ms) = part.strip_prefix("timeout=") {
                if timeout.is_some() {
                    return Err(bad("timeout= is given twice"));
                }
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| bad(&format!("timeout {ms:?} is not a number of milliseconds")))?;
                if ms == 0 || ms > MAX_TIMEOUT_MS {
                    return Err(bad(&format!(
                        "timeout must be from 1 to {MAX_TIMEOUT_MS} ms"
                    )));
                }
                timeout = Some(Duration::from_millis(ms));
            } else {
                return Err(bad(&format!("unknown part {part:?}")));
            }
        }
        let replicas = replicas.unwrap_or(0);
        let timeout = timeout.unwrap_or(Duration::from_millis(DEFAULT_TIMEOUT_MS));
        if aof {
            Ok(Durability::Aof { replicas, timeout })
        } else if replicas == 0 {
            Err(bad("replicas= must be at least 1"))
        } else {
            Ok(Durability::Replicas { replicas, timeout })
        }
    }
}

fn parse_replicas(n: &str) -> Result<u32, String> {
    n.parse::<u32>()
        .ok()
        .filter(|n| *n <= 100)
        .ok_or_else(|| format!("replicas {n:?} is not a number from 0 to 100"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let ms = Duration::from_millis;
        assert_eq!("none".parse(), Ok(Durability::None));
        assert_eq!(
            "replicas=1".parse(),
            Ok(Durability::Replicas {
                replicas: 1,
                timeout: ms(1000)
            })
        );
        assert_eq!(
            "replicas=2,timeout=250".parse(),
            Ok(Durability::Replicas {
                replicas: 2,
                timeout: ms(250)
            })
        );
        assert_eq!(
            "aof".parse(),
            Ok(Durability::Aof {
                replicas: 0,
                timeout: ms(1000)
            })
        );
        assert_eq!(
            "aof,replicas=1,timeout=50".parse(),
            Ok(Durability::Aof {
                replicas: 1,
                timeout: ms(50)
            })
        );
        assert_eq!(
            "aof,timeout=50".parse(),
            Ok(Durability::Aof {
                replicas: 0,
                timeout: ms(50)
            })
        );
        for d in [
            "none",
            "replicas=3,timeout=20",
            "aof,replicas=1,timeout=5000",
        ] {
            let parsed: Durability = d.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<Durability>(), Ok(parsed));
        }
    }

    #[test]
    fn refuses_bad_values_naming_the_flag_and_the_forms() {
        for bad in [
            "",
            "all",
            "replicas",
            "replicas=0",
            "replicas=-1",
            "replicas=x",
            "replicas=1,timeout=0",
            "replicas=1,timeout=99999",
            "replicas=1,timeout=1,timeout=2",
            "aof,replicas=1,replicas=2",
            "replicas=1,replicas=2",
            "aof,fsync=always",
            "none,replicas=1",
        ] {
            let err = bad.parse::<Durability>().unwrap_err();
            assert!(err.contains("--durability"), "{bad}: {err}");
            assert!(
                err.contains("replicas=N[,timeout=MS]") && err.contains("aof[,replicas=N]"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn reads_the_answers() {
        use redis::Value::{Array, Int};
        let r: Durability = "replicas=1".parse().unwrap();
        assert_eq!(r.reached(&Int(0)), Ok(false));
        assert_eq!(r.reached(&Int(2)), Ok(true));
        let a: Durability = "aof,replicas=1".parse().unwrap();
        assert_eq!(a.reached(&Array(vec![Int(1), Int(0)])), Ok(false));
        assert_eq!(a.reached(&Array(vec![Int(0), Int(1)])), Ok(false));
        assert_eq!(a.reached(&Array(vec![Int(1), Int(1)])), Ok(true));
        assert!(a.reached(&Int(1)).is_err());
    }
}
