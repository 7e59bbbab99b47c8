//! `logs` as lines: `--prefix` labels each line with its variation, `--timestamps` with the
//! time its entry reached Redis, `--tail N` keeps only the last N lines of each variation's
//! history, `--since` drops what is older. Without any of them the output is passed through
//! byte for byte (see [`LineWriter::passthrough`]).
//!
//! Bounded: a line longer than [`MAX_LINE`] bytes is cut into pieces, and `--tail` keeps at
//! most N lines per variation and channel.

use std::collections::{HashMap, VecDeque};
use std::io::Write;

/// The longest line kept whole; longer ones are written in pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;

/// Where a line goes: the agent's stdout to stdout, its logs to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sink {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Default)]
pub struct LineOptions {
    pub prefix: bool,
    pub timestamps: bool,
    /// Keep only the last N lines of each variation's history (then follow, if asked).
    pub tail: Option<usize>,
    /// Drop entries older than this (Unix milliseconds).
    pub since_ms: Option<u64>,
}

type Key = (String, Sink);

/// A line in the making, and the time of the entry that started it.
#[derive(Default)]
struct Partial {
    bytes: Vec<u8>,
    ts: u64,
}

pub struct LineWriter {
    options: LineOptions,
    partial: HashMap<Key, Partial>,
    /// While the history is read for `--tail`: the last lines of each stream, in first-seen
    /// order of the streams.
    tail: Option<Vec<(Key, VecDeque<Vec<u8>>)>>,
}

impl LineWriter {
    pub fn new(options: LineOptions) -> Self {
        let tail = options.tail.map(|_| Vec::new());
        LineWriter {
            options,
            partial: HashMap::new(),
            tail,
        }
    }

    /// Whether bytes go out unchanged (no labels, no tail): the default.
    pub fn passthrough(&self) -> bool {
        !self.options.prefix && !self.options.timestamps && self.tail.is_none()
    }

    /// Whether an entry written at `ts` (Unix ms) is shown.
    pub fn wanted(&self, ts: u64) -> bool {
        self.options.since_ms.is_none_or(|since| ts >= since)
    }

    /// Takes an entry's bytes; writes the lines it completes.
    pub fn write(
        &mut self,
        variation: &str,
        sink: Sink,
        ts: u64,
        mut bytes: &[u8],
        out: &mut impl Write,
        err: &mut impl Write,
    ) -> std::io::Result<()> {
        let key = (variation.to_owned(), sink);
        while !bytes.is_empty() {
            let partial = self.partial.entry(key.clone()).or_default();
            if partial.bytes.is_empty() {
                partial.ts = ts;
            }
            let room = MAX_LINE - partial.bytes.len();
            let (take, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) if i < room => (i + 1, true),
                _ if bytes.len() >= room => (room, true),
                _ => (bytes.len(), false),
            };
            partial.bytes.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if complete {
                let line = std::mem::take(partial);
                self.line(&key, line, out, err)?;
            }
        }
        Ok(())
    }

    fn line(
        &mut self,
        key: &Key,
        line: Partial,
        out: &mut impl Write,
        err: &mut impl Write,
    ) -> std::io::Result<()> {
        let mut text = self.label(&key.0, line.ts);
        text.extend_from_slice(&line.bytes);
        if !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        if let (Some(tail), Some(n)) = (self.tail.as_mut(), self.options.tail) {
            let lines = match tail.iter().position(|(k, _)| k == key) {
                Some(i) => &mut tail[i].1,
                None => {
                    tail.push((key.clone(), VecDeque::new()));
                    &mut tail.last_mut().expect("just pushed").1
                }
            };
            lines.push_back(text);
            while lines.len() > n {
                lines.pop_front();
            }
            return Ok(());
        }
        match key.1 {
            Sink::Stdout => out.write_all(&text),
            Sink::Stderr => err.write_all(&text),
        }
    }

    fn label(&self, variation: &str, ts: u64) -> Vec<u8> {
        let mut label = String::new();
        if self.options.timestamps {
            let at = i64::try_from(ts)
                .ok()
                .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            label.push_str(&format!("{at:.3} "));
        }
        if self.options.prefix {
            label.push_str(&format!("[{variation}] "));
        }
        label.into_bytes()
    }

    /// The history has been read: writes the kept last lines, and from now on every line as it
    /// comes.
    pub fn end_tail(&mut self, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<()> {
        for ((_, sink), lines) in self.tail.take().unwrap_or_default() {
            for line in lines {
                match sink {
                    Sink::Stdout => out.write_all(&line)?,
                    Sink::Stderr => err.write_all(&line)?,
                }
            }
        }
        Ok(())
    }

    /// No more output comes: writes what is left of unfinished lines.
    pub fn finish(&mut self, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<()> {
        self.end_partial_lines(out, err)?;
        self.end_tail(out, err)
    }

    /// The run's history was reset (the relay sends it again from its first entry): the
    /// unfinished lines of the old history end where they are, so that no line joins the two.
    /// While the history is read for `--tail`, nothing of the old one was written yet: its
    /// kept lines are dropped, and the last lines of the new history are kept instead.
    pub fn reset(&mut self, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<()> {
        if let Some(tail) = self.tail.as_mut() {
            tail.clear();
            self.partial.clear();
            return Ok(());
        }
        self.end_partial_lines(out, err)
    }

    /// Writes what is left of unfinished lines, as lines.
    fn end_partial_lines(
        &mut self,
        out: &mut impl Write,
        err: &mut impl Write,
    ) -> std::io::Result<()> {
        let mut left: Vec<(Key, Partial)> = self
            .partial
            .drain()
            .filter(|(_, p)| !p.bytes.is_empty())
            .collect();
        left.sort_by(|a, b| a.0.0.cmp(&b.0.0));
        for (key, partial) in left {
            self.line(&key, partial, out, err)?;
        }
        Ok(())
    }
}

/// Parses `--since`: a duration such as `30s`, `5m`, `1h30m` or `2 hours`.
pub fn parse_since(s: &str) -> Result<std::time::Duration, String> {
    let d: jiff::SignedDuration = s
        .trim()
        .parse()
        .map_err(|e| format!("--since {s:?} is not a duration ({e}); use e.g. 30s, 5m, 1h30m"))?;
    std::time::Duration::try_from(d)
        .map_err(|_| format!("--since {s:?} is negative; use e.g. 30s, 5m, 1h30m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(options: LineOptions, writes: &[(&str, Sink, u64, &[u8])]) -> (String, String) {
        let mut w = LineWriter::new(options);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for (v, sink, ts, bytes) in writes {
            w.write(v, *sink, *ts, bytes, &mut out, &mut err).unwrap();
        }
        w.finish(&mut out, &mut err).unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn prefix_labels_every_line_of_each_variation_even_when_split_across_entries() {
        let prefix = LineOptions {
            prefix: true,
            ..Default::default()
        };
        let (out, err) = run(
            prefix,
            &[
                ("alpha", Sink::Stdout, 1, b"one\ntw"),
                ("beta", Sink::Stdout, 1, b"uno\n"),
                ("alpha", Sink::Stdout, 2, b"o\nthree"),
                ("beta", Sink::Stderr, 2, b"warn\n"),
            ],
        );
        assert_eq!(out, "[alpha] one\n[beta] uno\n[alpha] two\n[alpha] three\n");
        assert_eq!(err, "[beta] warn\n");
    }

    #[test]
    fn timestamps_are_those_of_the_entry_that_started_the_line() {
        let options = LineOptions {
            timestamps: true,
            ..Default::default()
        };
        let (out, _) = run(
            options,
            &[
                ("a", Sink::Stdout, 1_764_570_000_123, b"first "),
                ("a", Sink::Stdout, 1_764_570_001_000, b"line\nsecond\n"),
            ],
        );
        assert_eq!(
            out,
            "2025-12-01T06:20:00.123Z first line\n2025-12-01T06:20:01.000Z second\n"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines_of_each_variation() {
        let options = LineOptions {
            tail: Some(2),
            prefix: true,
            ..Default::default()
        };
        let mut w = LineWriter::new(options);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        w.write(
            "a",
            Sink::Stdout,
            1,
            b"1\n2\n3\n4\npart",
            &mut out,
            &mut err,
        )
        .unwrap();
        w.write("b", Sink::Stdout, 1, b"x\n", &mut out, &mut err)
            .unwrap();
        assert!(out.is_empty(), "nothing before the history is read");
        w.end_tail(&mut out, &mut err).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "[a] 3\n[a] 4\n[b] x\n");
        // Following: the unfinished line goes on and lines come as they complete.
        w.write("a", Sink::Stdout, 2, b"ial\n5\n", &mut out, &mut err)
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[a] 3\n[a] 4\n[b] x\n[a] partial\n[a] 5\n"
        );
    }

    #[test]
    fn a_reset_ends_unfinished_lines_and_restarts_the_tail() {
        let prefix = LineOptions {
            prefix: true,
            ..Default::default()
        };
        let mut w = LineWriter::new(prefix);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        w.write("a", Sink::Stdout, 1, b"old\nunfin", &mut out, &mut err)
            .unwrap();
        w.reset(&mut out, &mut err).unwrap();
        w.write("a", Sink::Stdout, 2, b"new\n", &mut out, &mut err)
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[a] old\n[a] unfin\n[a] new\n",
            "the old history's last line is not joined with the new history's first"
        );

        // While the history is read for --tail: the last lines are the new history's.
        let mut w = LineWriter::new(LineOptions {
            tail: Some(2),
            ..Default::default()
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        w.write("a", Sink::Stdout, 1, b"1\n2\n3\npart", &mut out, &mut err)
            .unwrap();
        w.reset(&mut out, &mut err).unwrap();
        w.write("a", Sink::Stdout, 2, b"x\n", &mut out, &mut err)
            .unwrap();
        w.end_tail(&mut out, &mut err).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "x\n");
    }

    #[test]
    fn a_huge_line_is_written_in_bounded_pieces() {
        let options = LineOptions {
            prefix: true,
            ..Default::default()
        };
        let huge = vec![b'x'; MAX_LINE * 2 + 10];
        let (out, _) = run(options, &[("a", Sink::Stdout, 1, &huge)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), "[a] ".len() + MAX_LINE);
        assert_eq!(lines[2], format!("[a] {}", "x".repeat(10)));
    }

    #[test]
    fn since_takes_short_and_long_durations_and_names_bad_ones() {
        assert_eq!(parse_since("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_since("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_since("2 hours").unwrap().as_secs(), 7200);
        let e = parse_since("yesterday").unwrap_err();
        assert!(
            e.contains("--since \"yesterday\"") && e.contains("5m"),
            "{e}"
        );
        let w = LineWriter::new(LineOptions {
            since_ms: Some(1000),
            ..Default::default()
        });
        assert!(!w.wanted(999) && w.wanted(1000));
    }
}
