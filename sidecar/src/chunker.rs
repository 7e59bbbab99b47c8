//! Cuts an agent's output into chunks: at line ends, at [`MAX_CHUNK`], or when the agent goes
//! quiet (the caller calls [`Chunker::flush_idle`] after a short idle time), so that token by
//! token output with no newline still streams live. Cuts never split a UTF-8 character when
//! that can be helped, so text reaches clients as text. No byte is added, dropped or moved.

use bytes::{Bytes, BytesMut};

/// Largest chunk: 64 KiB.
pub const MAX_CHUNK: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Chunker {
    buf: BytesMut,
    /// An incomplete UTF-8 sequence has already waited one idle period.
    tail_waited: bool,
}

/// The largest `cut <= limit` that does not end in the middle of a UTF-8 sequence; `limit`
/// itself when the bytes there are not UTF-8 anyway.
fn char_boundary(buf: &[u8], limit: usize) -> usize {
    let limit = limit.min(buf.len());
    let mut i = limit;
    let mut steps = 0;
    while i > 0 && steps < 4 {
        let b = buf[i - 1];
        if b & 0b1100_0000 == 0b1000_0000 {
            i -= 1;
            steps += 1;
            continue;
        }
        let len = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return limit,
        };
        // The sequence that starts at i-1 needs `len` bytes.
        return if i - 1 + len > limit { i - 1 } else { limit };
    }
    limit
}

impl Chunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes waiting for a line end, more data, or the idle flush.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Adds output; returns the chunks that are complete now.
    pub fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if data.is_empty() {
            return out;
        }
        self.tail_waited = false;
        self.buf.extend_from_slice(data);
        while self.buf.len() >= MAX_CHUNK {
            let mut cut = char_boundary(&self.buf, MAX_CHUNK);
            if cut == 0 {
                cut = MAX_CHUNK;
            }
            out.push(self.buf.split_to(cut).freeze());
        }
        if let Some(nl) = self.buf.iter().rposition(|b| *b == b'\n') {
            out.push(self.buf.split_to(nl + 1).freeze());
        }
        out
    }

    /// Called when no output came for the idle time: sends the partial line. A trailing
    /// incomplete UTF-8 character waits for one more idle period before it is sent as is.
    pub fn flush_idle(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let cut = char_boundary(&self.buf, self.buf.len());
        if cut == 0 {
            if !self.tail_waited {
                self.tail_waited = true;
                return None;
            }
            self.tail_waited = false;
            return Some(self.buf.split().freeze());
        }
        Some(self.buf.split_to(cut).freeze())
    }

    /// End of output: everything that is left.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cuts_at_the_last_newline_and_holds_the_partial_line() {
        let mut c = Chunker::new();
        assert_eq!(c.push(b"a\nb\nc"), vec![Bytes::from_static(b"a\nb\n")]);
        assert_eq!(c.pending(), 1);
        assert_eq!(c.flush_idle(), Some(Bytes::from_static(b"c")));
        assert_eq!(c.flush_idle(), None);
    }

    #[test]
    fn never_exceeds_the_maximum_and_keeps_characters_whole() {
        let mut c = Chunker::new();
        let mut data = vec![b'x'; MAX_CHUNK - 1];
        data.extend_from_slice("é".as_bytes()); // straddles the limit
        data.extend_from_slice(b"tail");
        let chunks = c.push(&data);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), MAX_CHUNK - 1);
        assert_eq!(c.finish().unwrap().as_ref(), "étail".as_bytes());
    }

    #[test]
    fn an_incomplete_character_waits_one_idle_period() {
        let mut c = Chunker::new();
        assert!(c.push(&[b'a', 0xe2, 0x82]).is_empty());
        assert_eq!(c.flush_idle(), Some(Bytes::from_static(b"a")));
        assert_eq!(c.flush_idle(), None);
        assert!(c.push(&[0xac]).is_empty());
        assert_eq!(c.flush_idle().unwrap().as_ref(), "€".as_bytes());
        // A lone invalid byte goes out after the second idle period.
        c.push(&[0xf0]);
        assert_eq!(c.flush_idle(), None);
        assert_eq!(c.flush_idle(), Some(Bytes::from_static(&[0xf0])));
    }

    proptest! {
        #[test]
        fn chunks_concatenate_to_the_input(writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..40), idle_mask: u64) {
            let mut c = Chunker::new();
            let mut got = Vec::new();
            let mut want = Vec::new();
            for (i, w) in writes.iter().enumerate() {
                want.extend_from_slice(w);
                for ch in c.push(w) {
                    prop_assert!(!ch.is_empty() && ch.len() <= MAX_CHUNK);
                    got.extend_from_slice(&ch);
                }
                if idle_mask & (1 << (i % 64)) != 0
                    && let Some(ch) = c.flush_idle()
                {
                    got.extend_from_slice(&ch);
                }
            }
            if let Some(ch) = c.finish() { got.extend_from_slice(&ch); }
            prop_assert_eq!(got, want);
        }
    }
}
