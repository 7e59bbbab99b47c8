//! The SSE cursor: one opaque token from which a connection resumes every stream it carries,
//! valid only for the run and the epoch it was taken in.
//!
//! Version 2 (what the relay sends): `2.` + unpadded base64url of
//! `TAG,EPOCH,S,M;VAR=O.L;VAR=O.L...`, where `TAG` is 8 hex digits naming the run (the start
//! of the SHA-256 of its id), `EPOCH` the run's epoch when the position was taken (empty: the
//! run had none), `S` and `M` the last `seq` delivered of the status and metrics streams, and
//! each `VAR=O.L` those of a variation's output and logs. An empty number is a stream the
//! connection did not carry. Example: `3fa2b1c0,9f8e7d6c5b4a3210,12,3;a=40.7;b=.2`.
//!
//! Version 1 (`1.` + base64url of `s=12,m=3,o.a=40,l.a=7`), sent before epochs, is still
//! accepted: it names no run and no epoch, so the relay can only check it against the
//! streams' ends (a position past a stream's end is reset), not against lost history.
//!
//! Invariants: decoding never yields a `seq` above [`MAX_SEQ`] (such a cursor is refused), nor
//! more streams than a feed can carry; encoding and decoding round-trip. Clients must treat
//! the token as opaque.

use agentrun_protocol::replay::MAX_SEQ;
use agentrun_protocol::{Epoch, RunId, StreamName, Variation};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::collections::BTreeMap;

const VERSION: &str = "2.";
const VERSION_1: &str = "1.";

/// Most streams a cursor may name: status, metrics, and output and logs of every variation a
/// feed carries.
const MAX_STREAMS: usize = 2 + 2 * crate::hub::MAX_FEED_VARIATIONS;

/// Last delivered `seq` per stream.
pub type Cursors = BTreeMap<StreamName, u64>;

/// The run and epoch a position belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub run_tag: u32,
    pub epoch: Option<Epoch>,
}

impl Origin {
    pub fn new(run: &RunId, epoch: Option<Epoch>) -> Self {
        Self {
            run_tag: run_tag(run),
            epoch,
        }
    }
}

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seqs: Cursors,
    /// `None` for a version-1 cursor, which cannot be checked against a run or an epoch.
    pub origin: Option<Origin>,
}

/// Why a cursor could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cursor {token:?} is not valid ({why}): pass back an `id` the relay sent (Last-Event-ID), or use from=earliest or from=now"
)]
pub struct BadCursor {
    token: String,
    why: String,
}

/// The first 32 bits of the SHA-256 of the run id.
pub fn run_tag(run: &RunId) -> u32 {
    let d = crate::kube_auth::digest(run.as_str());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Appends `value` as `digits` lowercase hex digits (zero-padded), without `core::fmt`: the
/// cursor is written for every event of every connection.
fn push_hex(w: &mut String, value: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        w.push(HEX[((value >> (i * 4)) & 0xf) as usize] as char);
    }
}

/// Appends `value` in decimal, without `core::fmt`.
fn push_decimal(w: &mut String, mut value: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    w.push_str(std::str::from_utf8(&buf[at..]).unwrap_or_default());
}

fn write_seq(w: &mut String, seq: Option<u64>) {
    if let Some(s) = seq {
        push_decimal(w, s);
    }
}

/// Writes the cursor's text (before base64) into `w`.
fn write_text(w: &mut String, origin: &Origin, cursors: &Cursors) {
    push_hex(w, u64::from(origin.run_tag), 8);
    w.push(',');
    if let Some(e) = origin.epoch {
        push_hex(w, e.as_u64(), 16);
    }
    w.push(',');
    write_seq(w, cursors.get(&StreamName::Status).copied());
    w.push(',');
    write_seq(w, cursors.get(&StreamName::Metrics).copied());
    // Outputs and logs are each sorted by variation: merge them.
    let of_pipe = |output: bool| {
        cursors
            .iter()
            .filter_map(move |(k, s)| match (k, output) {
                (StreamName::Output(v), true) | (StreamName::Logs(v), false) => Some((v, *s)),
                _ => None,
            })
            .peekable()
    };
    let (mut outs, mut logs) = (of_pipe(true), of_pipe(false));
    loop {
        let var: &Variation = match (outs.peek(), logs.peek()) {
            (None, None) => break,
            (Some((a, _)), None) => a,
            (None, Some((b, _))) => b,
            (Some((a, _)), Some((b, _))) => (*a).min(*b),
        };
        let o = outs.next_if(|(v, _)| *v == var).map(|(_, s)| s);
        let l = logs.next_if(|(v, _)| *v == var).map(|(_, s)| s);
        w.push(';');
        w.push_str(var.as_str());
        w.push('=');
        write_seq(w, o);
        w.push('.');
        write_seq(w, l);
    }
}

/// Encodes cursors into the opaque token sent as the SSE `id`.
pub fn encode(origin: &Origin, cursors: &Cursors) -> String {
    let mut text = String::new();
    write_text(&mut text, origin, cursors);
    format!("{VERSION}{}", URL_SAFE_NO_PAD.encode(text))
}

/// Appends the token to `out`, using `scratch` for the text (no allocation once it has grown).
pub fn encode_into(
    origin: &Origin,
    cursors: &Cursors,
    out: &mut bytes::BytesMut,
    scratch: &mut String,
) {
    scratch.clear();
    write_text(scratch, origin, cursors);
    out.extend_from_slice(VERSION.as_bytes());
    let start = out.len();
    let len = base64::encoded_len(scratch.len(), false).unwrap_or(0);
    out.resize(start + len, 0);
    let written = URL_SAFE_NO_PAD
        .encode_slice(scratch.as_bytes(), &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

fn parse_seq(
    text: &str,
    stream: &str,
    bad: &dyn Fn(String) -> BadCursor,
) -> Result<u64, BadCursor> {
    let seq: u64 = text
        .parse()
        .map_err(|_| bad(format!("{stream}: {text:?} is not a number")))?;
    if seq > MAX_SEQ {
        return Err(bad(format!(
            "it names position {seq} of {stream}, beyond the end of any stream (at most {MAX_SEQ})"
        )));
    }
    Ok(seq)
}

fn parse_opt_seq(
    text: &str,
    stream: StreamName,
    out: &mut Cursors,
    bad: &dyn Fn(String) -> BadCursor,
) -> Result<(), BadCursor> {
    if !text.is_empty() {
        let seq = parse_seq(text, &format!("{stream:?}"), bad)?;
        out.insert(stream, seq);
    }
    Ok(())
}

/// Decodes a token made by [`encode`] (or by a relay of version 1).
pub fn decode(token: &str) -> Result<Position, BadCursor> {
    let token = token.trim();
    let shown: String = token.chars().take(200).collect();
    let bad = |why: String| BadCursor {
        token: shown.clone(),
        why,
    };
    let (v1, body) = if let Some(b) = token.strip_prefix(VERSION) {
        (false, b)
    } else if let Some(b) = token.strip_prefix(VERSION_1) {
        (true, b)
    } else {
        return Err(bad("unknown version".into()));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| bad("not base64url".into()))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not text".into()))?;
    let position = if v1 {
        decode_v1(&text, &bad)?
    } else {
        decode_v2(&text, &bad)?
    };
    if position.seqs.len() > MAX_STREAMS {
        return Err(bad(format!(
            "it names {} streams, more than a run has (at most {MAX_STREAMS})",
            position.seqs.len()
        )));
    }
    Ok(position)
}

fn decode_v1(text: &str, bad: &dyn Fn(String) -> BadCursor) -> Result<Position, BadCursor> {
    let mut seqs = Cursors::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (name, seq) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not NAME=SEQ")))?;
        let stream = match name {
            "s" => StreamName::Status,
            "m" => StreamName::Metrics,
            _ => match name.split_once('.') {
                Some(("o", v)) => StreamName::Output(
                    Variation::new(v).map_err(|_| bad(format!("bad variation {v:?}")))?,
                ),
                Some(("l", v)) => StreamName::Logs(
                    Variation::new(v).map_err(|_| bad(format!("bad variation {v:?}")))?,
                ),
                _ => return Err(bad(format!("unknown stream {name:?}"))),
            },
        };
        let seq = parse_seq(seq, name, bad)?;
        seqs.insert(stream, seq);
    }
    Ok(Position { seqs, origin: None })
}

fn decode_v2(text: &str, bad: &dyn Fn(String) -> BadCursor) -> Result<Position, BadCursor> {
    let mut parts = text.split(';');
    let head = parts.next().unwrap_or_default();
    let fields: Vec<&str> = head.split(',').collect();
    let [tag, epoch, status, metrics] = fields.as_slice() else {
        return Err(bad("its head is not TAG,EPOCH,S,M".into()));
    };
    let run_tag = (tag.len() == 8)
        .then(|| u32::from_str_radix(tag, 16).ok())
        .flatten()
        .ok_or_else(|| bad(format!("bad run tag {tag:?}")))?;
    let epoch = if epoch.is_empty() {
        None
    } else {
        Some(Epoch::parse(epoch).ok_or_else(|| bad(format!("bad epoch {epoch:?}")))?)
    };
    let mut seqs = Cursors::new();
    parse_opt_seq(status, StreamName::Status, &mut seqs, bad)?;
    parse_opt_seq(metrics, StreamName::Metrics, &mut seqs, bad)?;
    for part in parts {
        let (name, pair) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not VAR=O.L")))?;
        let v = Variation::new(name).map_err(|_| bad(format!("bad variation {name:?}")))?;
        let (o, l) = pair
            .split_once('.')
            .ok_or_else(|| bad(format!("{part:?} is not VAR=O.L")))?;
        parse_opt_seq(o, StreamName::Output(v.clone()), &mut seqs, bad)?;
        parse_opt_seq(l, StreamName::Logs(v), &mut seqs, bad)?;
    }
    Ok(Position {
        seqs,
        origin: Some(Origin { run_tag, epoch }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Cursors {
        let mut c = Cursors::new();
        c.insert(StreamName::Status, 12);
        c.insert(StreamName::Metrics, 0);
        c.insert(StreamName::Output(Variation::new("a-1").unwrap()), 40);
        c.insert(StreamName::Logs(Variation::new("a-1").unwrap()), 3);
        c.insert(StreamName::Logs(Variation::new("b").unwrap()), 7);
        c.insert(StreamName::Output(Variation::new("c").unwrap()), 1);
        c
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let run = RunId::new("ns.hello.1a2b").unwrap();
        let origin = Origin::new(&run, Some(Epoch::from_u64(0x9f8e)));
        let c = sample();
        let token = encode(&origin, &c);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        );
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(&token[2..]).unwrap()).unwrap();
        assert_eq!(
            text,
            format!(
                "{:08x},0000000000009f8e,12,0;a-1=40.3;b=.7;c=1.",
                run_tag(&run)
            )
        );
        let back = decode(&token).unwrap();
        assert_eq!(back.seqs, c);
        assert_eq!(back.origin, Some(origin));
        let mut buf = bytes::BytesMut::new();
        let mut scratch = String::new();
        encode_into(&origin, &c, &mut buf, &mut scratch);
        assert_eq!(&buf[..], token.as_bytes());
        // No epoch, nothing carried.
        let bare = Origin::new(&run, None);
        assert_eq!(
            decode(&encode(&bare, &Cursors::new())).unwrap(),
            Position {
                seqs: Cursors::new(),
                origin: Some(bare)
            }
        );
        // The largest cursor a feed can have fits well within a request header.
        let mut many = Cursors::new();
        for i in 0..crate::hub::MAX_FEED_VARIATIONS {
            let v = Variation::new(format!("{:0>63}", i)).unwrap();
            many.insert(StreamName::Output(v.clone()), MAX_SEQ);
            many.insert(StreamName::Logs(v), MAX_SEQ);
        }
        let token = encode(&origin, &many);
        assert!(token.len() < 12 * 1024, "{}", token.len());
        assert_eq!(decode(&token).unwrap().seqs, many);
        for bad in [
            "",
            "3.abc",
            "2.!!!",
            "1.eD0x",
            &format!("1.{}", URL_SAFE_NO_PAD.encode("o.A=1")),
            &format!("2.{}", URL_SAFE_NO_PAD.encode("zz,,1,")),
            &format!("2.{}", URL_SAFE_NO_PAD.encode("0000000a,,1")),
            &format!("2.{}", URL_SAFE_NO_PAD.encode("0000000a,,1,;a=1")),
        ] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains("from=earliest"), "{e}");
        }
    }

    #[test]
    fn version_1_cursors_are_read_without_an_origin() {
        let token = format!("1.{}", URL_SAFE_NO_PAD.encode("s=12,m=0,o.a=40,l.b=7"));
        let p = decode(&token).unwrap();
        assert_eq!(p.origin, None);
        assert_eq!(p.seqs.len(), 4);
        assert_eq!(
            p.seqs[&StreamName::Output(Variation::new("a").unwrap())],
            40
        );
    }

    #[test]
    fn positions_no_stream_can_reach_are_refused() {
        for token in [
            format!("1.{}", URL_SAFE_NO_PAD.encode("o.a=18446744073709551615")),
            format!(
                "2.{}",
                URL_SAFE_NO_PAD.encode(format!("00000001,,{},", MAX_SEQ + 1))
            ),
        ] {
            let e = decode(&token).unwrap_err().to_string();
            assert!(e.contains("beyond the end of any stream"), "{e}");
        }
        assert!(
            decode(&format!(
                "1.{}",
                URL_SAFE_NO_PAD.encode(format!("s={MAX_SEQ}"))
            ))
            .is_ok()
        );
    }

    use proptest::prelude::*;

    fn run_id() -> impl Strategy<Value = RunId> {
        "[A-Za-z0-9._-]{1,200}".prop_map(|id| RunId::new(id).unwrap())
    }

    fn variation() -> impl Strategy<Value = Variation> {
        prop_oneof!["[a-z0-9]", "[a-z0-9][a-z0-9-]{0,61}[a-z0-9]"]
            .prop_map(|v| Variation::new(v).unwrap())
    }

    /// A position a stream can have: the edges (0, [`MAX_SEQ`]) more often than chance would
    /// give them.
    fn seq() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), Just(1), Just(MAX_SEQ), 0..=MAX_SEQ]
    }

    /// Cursors of a feed: status, metrics, and output and logs of some variations, each
    /// carried or not.
    fn cursors() -> impl Strategy<Value = Cursors> {
        (
            prop::option::of(seq()),
            prop::option::of(seq()),
            prop::collection::vec(
                (
                    variation(),
                    prop::option::of(seq()),
                    prop::option::of(seq()),
                ),
                0..6,
            ),
        )
            .prop_map(|(status, metrics, vars)| {
                let mut c = Cursors::new();
                if let Some(s) = status {
                    c.insert(StreamName::Status, s);
                }
                if let Some(s) = metrics {
                    c.insert(StreamName::Metrics, s);
                }
                for (v, o, l) in vars {
                    if let Some(o) = o {
                        c.insert(StreamName::Output(v.clone()), o);
                    }
                    if let Some(l) = l {
                        c.insert(StreamName::Logs(v), l);
                    }
                }
                c
            })
    }

    /// The cursor text as the relay wrote it with `format!` (the reference for the
    /// hand-written encoder).
    fn text_with_fmt(origin: &Origin, cursors: &Cursors) -> String {
        let seq = |s: Option<&u64>| s.map(|s| s.to_string()).unwrap_or_default();
        let mut w = format!("{:08x},", origin.run_tag);
        if let Some(e) = origin.epoch {
            w.push_str(&format!("{e}"));
        }
        w.push_str(&format!(
            ",{},{}",
            seq(cursors.get(&StreamName::Status)),
            seq(cursors.get(&StreamName::Metrics))
        ));
        let vars: std::collections::BTreeSet<&Variation> =
            cursors.keys().filter_map(|k| k.variation()).collect();
        for v in vars {
            w.push_str(&format!(
                ";{v}={}.{}",
                seq(cursors.get(&StreamName::Output(v.clone()))),
                seq(cursors.get(&StreamName::Logs(v.clone())))
            ));
        }
        w
    }

    fn origin() -> impl Strategy<Value = Origin> {
        (run_id(), prop::option::of(any::<u64>()))
            .prop_map(|(run, epoch)| Origin::new(&run, epoch.map(Epoch::from_u64)))
    }

    /// Text shaped like a cursor's (the separators and digits it is made of), to reach the
    /// decoder's branches more often than arbitrary text would.
    fn cursor_ish_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just(",".to_owned()),
                Just(";".to_owned()),
                Just("=".to_owned()),
                Just(".".to_owned()),
                Just("o.".to_owned()),
                Just("l.".to_owned()),
                Just("s=".to_owned()),
                "[0-9]{1,21}",
                "[0-9a-f]{8}",
                "[0-9a-fA-F+-]{16}",
                "[a-z0-9-]{1,4}",
                any::<String>(),
            ],
            0..16,
        )
        .prop_map(|parts| parts.concat())
    }

    /// Any token: arbitrary text, and versioned base64 of arbitrary or cursor-shaped text.
    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            ("[12]\\.", cursor_ish_text())
                .prop_map(|(v, text)| format!("{v}{}", URL_SAFE_NO_PAD.encode(text))),
            ("[123]\\.", prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(v, bytes)| format!("{v}{}", URL_SAFE_NO_PAD.encode(bytes))),
        ]
    }

    proptest! {
        /// Any token decodes or is refused with the message that says what to send instead,
        /// never a panic; what decodes keeps the invariants (no seq above `MAX_SEQ`, no more
        /// streams than a feed carries) and encodes to a token that decodes to the same.
        #[test]
        fn any_token_decodes_or_is_refused_never_a_panic(token in token()) {
            match decode(&token) {
                Ok(p) => {
                    prop_assert!(p.seqs.len() <= MAX_STREAMS);
                    prop_assert!(p.seqs.values().all(|s| *s <= MAX_SEQ));
                    if let Some(origin) = p.origin {
                        prop_assert_eq!(decode(&encode(&origin, &p.seqs)).unwrap(), p);
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("from=earliest"), "{}", e),
            }
        }

        /// Every position of every run and epoch (seqs from 0 to `MAX_SEQ`) round-trips, through
        /// [`encode`] and [`encode_into`] alike, into a token of URL- and header-safe bytes.
        #[test]
        fn every_position_round_trips(origin in origin(), c in cursors()) {
            let token = encode(&origin, &c);
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            let mut buf = bytes::BytesMut::from(&b"id: "[..]);
            let mut scratch = String::from("left over");
            encode_into(&origin, &c, &mut buf, &mut scratch);
            prop_assert_eq!(&buf[4..], token.as_bytes());
            prop_assert_eq!(
                decode(&format!(" {token}\t")).unwrap(),
                Position { seqs: c, origin: Some(origin) }
            );
        }

        /// A seq no stream can reach (above `MAX_SEQ`, up to `u64::MAX`) is written, but a
        /// cursor holding one is refused rather than trusted.
        #[test]
        fn a_position_no_stream_can_reach_is_refused(
            origin in origin(),
            c in cursors(),
            past in prop_oneof![Just(MAX_SEQ + 1), Just(u64::MAX), (MAX_SEQ + 1)..=u64::MAX],
            v in variation(),
        ) {
            let mut c = c;
            c.insert(StreamName::Logs(v), past);
            let e = decode(&encode(&origin, &c)).unwrap_err().to_string();
            prop_assert!(e.contains("beyond the end of any stream"), "{}", e);
        }

        /// A cursor taken on one run names that run (its tag) and not another, whatever the
        /// epochs: the relay tells them apart and starts the other run's streams over.
        #[test]
        fn a_cursor_of_one_run_is_not_taken_for_another(
            a in run_id(),
            b in run_id(),
            epoch in prop::option::of(any::<u64>()),
            c in cursors(),
        ) {
            prop_assume!(a != b);
            let epoch = epoch.map(Epoch::from_u64);
            let back = decode(&encode(&Origin::new(&a, epoch), &c)).unwrap();
            let origin = back.origin.unwrap();
            prop_assert_eq!(origin, Origin::new(&a, epoch));
            prop_assert_ne!(origin.run_tag, run_tag(&b));
            prop_assert_ne!(Some(origin), Some(Origin::new(&b, epoch)));
        }

        /// The cursor text written without `core::fmt` is byte for byte what the `format!`
        /// version the relay sent before wrote (clients hold such tokens and compare them).
        #[test]
        fn the_text_is_what_fmt_wrote(origin in origin(), c in cursors()) {
            let mut fast = String::new();
            write_text(&mut fast, &origin, &c);
            prop_assert_eq!(fast, text_with_fmt(&origin, &c));
        }

        #[test]
        fn decimals_and_hex_are_what_fmt_writes(v in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]) {
            let mut w = String::new();
            push_decimal(&mut w, v);
            prop_assert_eq!(&w, &v.to_string());
            w.clear();
            push_hex(&mut w, v, 16);
            prop_assert_eq!(&w, &format!("{v:016x}"));
            w.clear();
            push_hex(&mut w, v & 0xffff_ffff, 8);
            prop_assert_eq!(w, format!("{:08x}", v & 0xffff_ffff));
        }

        /// `parse_seq` takes exactly the numbers from 0 to `MAX_SEQ` and refuses all else, never
        /// panicking.
        #[test]
        fn parse_seq_takes_exactly_the_reachable_numbers(
            text in prop_oneof![any::<String>(), "[+-]?[0-9]{1,22}", Just(u64::MAX.to_string())],
        ) {
            let bad = |why: String| BadCursor { token: String::new(), why };
            let got = parse_seq(&text, "status", &bad).ok();
            let want = text.parse::<u64>().ok().filter(|s| *s <= MAX_SEQ);
            prop_assert_eq!(got, want);
        }
    }
}
