//! A run's epoch: which incarnation of the run's history a position belongs to.
//!
//! Sequence numbers are only meaningful together with the history they count. When Redis
//! loses acknowledged writes (no persistence, `appendfsync everysec`, a failover to a replica
//! that was behind), a stream's top goes back and the next entries get sequence numbers that
//! readers have already seen, with other content. The publish function notices this when the
//! producer tells it the top it was last acknowledged (see [`crate::publish::Expected`]) and
//! then gives the run a new epoch before appending; every live message and every replay read
//! carries the epoch. Invariant: **a position (a `seq`) is only valid within its epoch, and
//! a changed epoch is always said to readers, never guessed.**
//!
//! An epoch is 64 random bits, written as 16 lowercase hex digits in the run's state hash
//! (field `epoch`). A run written only by producers that predate epochs has none.

use std::fmt;

/// A run's epoch (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// A fresh random epoch, to propose to the publish function.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Reads the 16-hex-digit form; anything else is not an epoch.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Self)
    }

    pub fn from_u64(value: u64) -> Self {
        Self(value)
    }

    /// The number whose 16 hex digits are the epoch's text.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_round_trip_through_their_text_and_nothing_else_parses() {
        for _ in 0..100 {
            let e = Epoch::random();
            assert_eq!(e.to_string().len(), 16);
            assert_eq!(Epoch::parse(&e.to_string()), Some(e));
        }
        assert_eq!(Epoch::from_u64(1).to_string(), "0000000000000001");
        for bad in [
            "",
            "1",
            "0123456789abcdefg",
            "0123456789abcdeg",
            "+123456789abcdef",
        ] {
            assert_eq!(Epoch::parse(bad), None, "{bad:?}");
        }
    }
}
