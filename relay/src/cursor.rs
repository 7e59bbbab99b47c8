//! The SSE cursor: one opaque token from which a connection resumes every stream it carries.
//!
//! A cursor is the last `seq` delivered per stream, written as `s=12,m=3,o.a=40,l.a=7`
//! (`s` status, `m` metrics, `o.VAR` output of a variation, `l.VAR` its logs) and encoded as
//! unpadded base64url, prefixed by the format version (`1.`). Clients must treat it as
//! opaque. A stream that a cursor does not name is read from its first entry.

use agentrun_protocol::{StreamName, Variation};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::collections::BTreeMap;

const VERSION: &str = "1.";

/// Last delivered `seq` per stream.
pub type Cursors = BTreeMap<StreamName, u64>;

/// Why a cursor could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cursor {0:?} is not valid: pass back an `id` the relay sent (Last-Event-ID), or use from=earliest or from=now"
)]
pub struct BadCursor(pub String);

fn short(stream: &StreamName) -> Option<String> {
    Some(match stream {
        StreamName::Status => "s".to_owned(),
        StreamName::Metrics => "m".to_owned(),
        StreamName::Output(v) => format!("o.{v}"),
        StreamName::Logs(v) => format!("l.{v}"),
        StreamName::Control => return None,
    })
}

fn from_short(s: &str) -> Option<StreamName> {
    Some(match s {
        "s" => StreamName::Status,
        "m" => StreamName::Metrics,
        _ => match s.split_once('.')? {
            ("o", v) => StreamName::Output(Variation::new(v).ok()?),
            ("l", v) => StreamName::Logs(Variation::new(v).ok()?),
            _ => return None,
        },
    })
}

/// Encodes cursors into the opaque token sent as the SSE `id`.
pub fn encode(cursors: &Cursors) -> String {
    let mut text = String::with_capacity(cursors.len() * 12);
    for (stream, seq) in cursors {
        let Some(name) = short(stream) else { continue };
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(&name);
        text.push('=');
        text.push_str(&seq.to_string());
    }
    format!("{VERSION}{}", URL_SAFE_NO_PAD.encode(text))
}

/// Appends the token to `out` without allocating for the common, short cursors.
pub fn encode_into(cursors: &Cursors, out: &mut bytes::BytesMut) {
    use std::io::Write;
    let mut text = [0u8; 384];
    let mut w = std::io::Cursor::new(&mut text[..]);
    let mut ok = true;
    for (i, (stream, seq)) in cursors.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let r = match stream {
            StreamName::Status => write!(w, "{sep}s={seq}"),
            StreamName::Metrics => write!(w, "{sep}m={seq}"),
            StreamName::Output(v) => write!(w, "{sep}o.{v}={seq}"),
            StreamName::Logs(v) => write!(w, "{sep}l.{v}={seq}"),
            StreamName::Control => Ok(()),
        };
        if r.is_err() {
            ok = false;
            break;
        }
    }
    if !ok {
        out.extend_from_slice(encode(cursors).as_bytes());
        return;
    }
    let len = w.position() as usize;
    let mut b64 = [0u8; 512];
    match URL_SAFE_NO_PAD.encode_slice(&text[..len], &mut b64) {
        Ok(n) => {
            out.extend_from_slice(VERSION.as_bytes());
            out.extend_from_slice(&b64[..n]);
        }
        Err(_) => out.extend_from_slice(encode(cursors).as_bytes()),
    }
}

/// Decodes a token made by [`encode`].
pub fn decode(token: &str) -> Result<Cursors, BadCursor> {
    let bad = || BadCursor(token.chars().take(200).collect());
    let body = token.trim().strip_prefix(VERSION).ok_or_else(bad)?;
    let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut out = Cursors::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (name, seq) = part.split_once('=').ok_or_else(bad)?;
        let stream = from_short(name).ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        out.insert(stream, seq);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut c = Cursors::new();
        c.insert(StreamName::Status, 12);
        c.insert(StreamName::Metrics, 0);
        c.insert(StreamName::Output(Variation::new("a-1").unwrap()), 40);
        c.insert(StreamName::Logs(Variation::new("b").unwrap()), 7);
        let token = encode(&c);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        );
        assert_eq!(decode(&token).unwrap(), c);
        let mut buf = bytes::BytesMut::new();
        encode_into(&c, &mut buf);
        assert_eq!(&buf[..], token.as_bytes());
        let mut many = Cursors::new();
        for i in 0..40 {
            many.insert(
                StreamName::Output(Variation::new(format!("variation-{i}")).unwrap()),
                u64::MAX,
            );
        }
        let mut buf = bytes::BytesMut::new();
        encode_into(&many, &mut buf);
        assert_eq!(decode(std::str::from_utf8(&buf).unwrap()).unwrap(), many);
        assert_eq!(decode(&encode(&Cursors::new())).unwrap(), Cursors::new());
        for bad in [
            "",
            "2.abc",
            "1.!!!",
            "1.eD0x",
            &format!("1.{}", URL_SAFE_NO_PAD.encode("o.A=1")),
        ] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains("from=earliest"), "{e}");
        }
    }
}
