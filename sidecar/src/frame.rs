//! Frames exchanged by the entrypoint and the sidecar over the Unix socket, and stored in
//! spool files (the same encoding in both places, so a spool is replayed by reading frames).
//!
//! Encoding: a 4-byte big-endian length (of what follows), a 1-byte tag, then the body. The
//! decoder is strict: a frame of a fixed size must have exactly that size, a `Hello` carries a
//! key of exactly [`KEY_LEN`] bytes or none, and a producer id is short and plain.

use crate::auth::KEY_LEN;
use agentrun_protocol::{ControlMessage, StatusEvent};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame accepted; anything bigger is a corrupt stream.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
// Every control message the relay and the sidecar accept fits in one frame to the entrypoint
// (its JSON, serialised again, is never larger than what was accepted, plus tag and seq).
const _: () = assert!(agentrun_protocol::MAX_CONTROL_BYTES + 9 <= MAX_FRAME);
/// Longest producer id.
pub const MAX_PRODUCER: usize = 64;
/// Largest `Hello` (what a client may send before it is authenticated).
pub const MAX_HELLO: usize = 1 + 4 + 1 + KEY_LEN + MAX_PRODUCER;

/// A producer id that is unique per process: `PREFIX-<16 hex digits>` (`ep-…` for an
/// entrypoint, `sidecar-…` for the sidecar's own entries).
pub fn new_producer_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Whether `id` may name a producer: 1 to [`MAX_PRODUCER`] characters from `A-Z a-z 0-9 . _ -`
/// (it becomes part of a spool file's name and of the Redis producer field).
pub fn valid_producer(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_PRODUCER
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Which of the agent's output pipes a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pipe {
    Stdout,
    Stderr,
}

impl Pipe {
    fn code(self) -> u8 {
        match self {
            Pipe::Stdout => 0,
            Pipe::Stderr => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Pipe::Stdout),
            1 => Some(Pipe::Stderr),
            _ => None,
        }
    }
}

/// The byte that starts each kind of frame's body (the wire format: never renumber).
mod tag {
    pub const HELLO: u8 = 1;
    pub const DATA: u8 = 2;
    pub const EVENT: u8 = 3;
    pub const GAP: u8 = 4;
    pub const DONE: u8 = 5;
    pub const ACK: u8 = 6;
    pub const CONTROL: u8 = 7;
    pub const HEALTH: u8 = 8;
    pub const USAGE: u8 = 9;
    pub const CONTROL_ACK: u8 = 10;
}

/// One frame. `fseq` numbers every frame an entrypoint produces (across all pipes), so the
/// sidecar can acknowledge "everything up to N"; `pseq` is the producer sequence of the target
/// stream, which Redis uses to drop re-sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// First frame of a connection from an entrypoint, with the key the sidecar handed it
    /// (none when it got none: the sidecar then refuses the connection).
    Hello {
        producer: String,
        pid: u32,
        key: Option<[u8; KEY_LEN]>,
    },
    /// A chunk of agent output.
    Data {
        fseq: u64,
        pipe: Pipe,
        pseq: u64,
        ts: u64,
        bytes: Bytes,
    },
    /// A lifecycle fact for the status stream.
    Event {
        fseq: u64,
        pseq: u64,
        ts: u64,
        event: StatusEvent,
    },
    /// Output that had to be dropped because the spool was full.
    Gap {
        fseq: u64,
        pipe: Pipe,
        pseq: u64,
        ts: u64,
        dropped_bytes: u64,
        dropped_chunks: u64,
    },
    /// The entrypoint has sent everything; the agent has exited.
    Done,
    /// Sidecar to entrypoint: every frame up to and including `fseq` is safe in Redis.
    Ack { fseq: u64 },
    /// Sidecar to entrypoint: apply a control message; `seq` is its seq in the control stream.
    Control { seq: u64, msg: ControlMessage },
    /// Entrypoint to sidecar: every control message up to `seq` has been applied, or refused
    /// and reported.
    ControlAck { seq: u64 },
    /// The agent's resource use (a live figure: never spooled nor acknowledged).
    Usage { cpu_millis: u64, rss_bytes: u64 },
    /// Sidecar to entrypoint: whether Redis is reachable (when not, the entrypoint spools
    /// instead of waiting).
    Health { redis_up: bool },
}

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes exceeds the limit; the stream is corrupt")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error(
        "the frame at byte {offset} is not authentic: its MAC does not match this pod's key (the file was not written by this pod's entrypoint, or was changed)"
    )]
    Unauthentic { offset: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Frame {
    /// The frame sequence of frames that must be acknowledged.
    pub fn fseq(&self) -> Option<u64> {
        match self {
            Frame::Data { fseq, .. } | Frame::Event { fseq, .. } | Frame::Gap { fseq, .. } => {
                Some(*fseq)
            }
            _ => None,
        }
    }

    /// Bytes this frame accounts for in buffers (its encoded size).
    pub fn weight(&self) -> usize {
        match self {
            Frame::Data { bytes, .. } => bytes.len() + 32,
            _ => 128,
        }
    }

    /// The byte that starts the frame's body.
    fn tag(&self) -> u8 {
        match self {
            Frame::Hello { .. } => tag::HELLO,
            Frame::Data { .. } => tag::DATA,
            Frame::Event { .. } => tag::EVENT,
            Frame::Gap { .. } => tag::GAP,
            Frame::Done => tag::DONE,
            Frame::Ack { .. } => tag::ACK,
            Frame::Control { .. } => tag::CONTROL,
            Frame::Health { .. } => tag::HEALTH,
            Frame::Usage { .. } => tag::USAGE,
            Frame::ControlAck { .. } => tag::CONTROL_ACK,
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        out.put_u8(self.tag());
        match self {
            Frame::Hello { producer, pid, key } => {
                out.put_u32(*pid);
                match key {
                    Some(key) => {
                        out.put_u8(KEY_LEN as u8);
                        out.put_slice(key);
                    }
                    None => out.put_u8(0),
                }
                out.put_slice(producer.as_bytes());
            }
            Frame::Data {
                fseq,
                pipe,
                pseq,
                ts,
                bytes,
            } => {
                put_output_head(out, (*fseq, *pipe, *pseq, *ts));
                out.put_slice(bytes);
            }
            Frame::Event {
                fseq,
                pseq,
                ts,
                event,
            } => {
                out.put_u64(*fseq);
                out.put_u64(*pseq);
                out.put_u64(*ts);
                out.put_slice(&event.to_json());
            }
            Frame::Gap {
                fseq,
                pipe,
                pseq,
                ts,
                dropped_bytes,
                dropped_chunks,
            } => {
                put_output_head(out, (*fseq, *pipe, *pseq, *ts));
                out.put_u64(*dropped_bytes);
                out.put_u64(*dropped_chunks);
            }
            Frame::Done => {}
            Frame::Ack { fseq } => {
                out.put_u64(*fseq);
            }
            Frame::Control { seq, msg } => {
                out.put_u64(*seq);
                out.put_slice(&msg.to_json());
            }
            Frame::ControlAck { seq } => {
                out.put_u64(*seq);
            }
            Frame::Health { redis_up } => {
                out.put_u8(u8::from(*redis_up));
            }
            Frame::Usage {
                cpu_millis,
                rss_bytes,
            } => {
                out.put_u64(*cpu_millis);
                out.put_u64(*rss_bytes);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.weight() + 8);
        self.encode(&mut b);
        b.freeze()
    }

    /// Decodes the body of one frame (without the length prefix).
    pub fn decode(mut body: Bytes) -> Result<Frame, FrameError> {
        use FrameError::Malformed;
        if body.is_empty() {
            return Err(Malformed("empty frame"));
        }
        let kind = body.get_u8();
        let need = |b: &Bytes, n: usize| {
            if b.len() < n {
                Err(Malformed("frame too short"))
            } else {
                Ok(())
            }
        };
        let exact = |b: &Bytes, n: usize| {
            if b.len() != n {
                Err(Malformed("frame of the wrong size"))
            } else {
                Ok(())
            }
        };
        Ok(match kind {
            tag::HELLO => {
                need(&body, 5)?;
                let pid = body.get_u32();
                let key = match body.get_u8() as usize {
                    0 => None,
                    KEY_LEN => {
                        need(&body, KEY_LEN)?;
                        let mut key = [0u8; KEY_LEN];
                        body.copy_to_slice(&mut key);
                        Some(key)
                    }
                    _ => return Err(Malformed("a hello's key has the wrong length")),
                };
                let producer = std::str::from_utf8(&body)
                    .ok()
                    .filter(|p| valid_producer(p))
                    .ok_or(Malformed("a hello's producer id is not valid"))?
                    .to_owned();
                Frame::Hello { producer, pid, key }
            }
            tag::DATA => {
                need(&body, OUTPUT_HEAD_LEN)?;
                let (fseq, pipe, pseq, ts) = get_output_head(&mut body)?;
                Frame::Data {
                    fseq,
                    pipe,
                    pseq,
                    ts,
                    bytes: body,
                }
            }
            tag::EVENT => {
                need(&body, 24)?;
                let fseq = body.get_u64();
                let pseq = body.get_u64();
                let ts = body.get_u64();
                let event =
                    serde_json::from_slice(&body).map_err(|_| Malformed("bad status event"))?;
                Frame::Event {
                    fseq,
                    pseq,
                    ts,
                    event,
                }
            }
            tag::GAP => {
                exact(&body, OUTPUT_HEAD_LEN + 16)?;
                let (fseq, pipe, pseq, ts) = get_output_head(&mut body)?;
                Frame::Gap {
                    fseq,
                    pipe,
                    pseq,
                    ts,
                    dropped_bytes: body.get_u64(),
                    dropped_chunks: body.get_u64(),
                }
            }
            tag::DONE => {
                exact(&body, 0)?;
                Frame::Done
            }
            tag::ACK => {
                exact(&body, 8)?;
                Frame::Ack {
                    fseq: body.get_u64(),
                }
            }
            tag::CONTROL => {
                need(&body, 8)?;
                let seq = body.get_u64();
                let msg =
                    serde_json::from_slice(&body).map_err(|_| Malformed("bad control message"))?;
                Frame::Control { seq, msg }
            }
            tag::HEALTH => {
                exact(&body, 1)?;
                Frame::Health {
                    redis_up: match body.get_u8() {
                        0 => false,
                        1 => true,
                        _ => return Err(Malformed("bad health flag")),
                    },
                }
            }
            tag::USAGE => {
                exact(&body, 16)?;
                Frame::Usage {
                    cpu_millis: body.get_u64(),
                    rss_bytes: body.get_u64(),
                }
            }
            tag::CONTROL_ACK => {
                exact(&body, 8)?;
                Frame::ControlAck {
                    seq: body.get_u64(),
                }
            }
            _ => return Err(Malformed("unknown frame tag")),
        })
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (or a truncated last frame, which
    /// is what a crash in the middle of a write leaves behind).
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        Self::read_limited(r, MAX_FRAME).await
    }

    /// [`Frame::read`], refusing a frame longer than `max` before anything is allocated for it.
    pub async fn read_limited<R: AsyncRead + Unpin>(
        r: &mut R,
        max: usize,
    ) -> Result<Option<Frame>, FrameError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max.min(MAX_FRAME) {
            return Err(FrameError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        match r.read_exact(&mut body).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Frame::decode(Bytes::from(body)).map(Some)
    }
}

/// Bytes of the head of a data or gap frame's body: frame sequence, pipe, producer sequence,
/// time.
const OUTPUT_HEAD_LEN: usize = 8 + 1 + 8 + 8;

/// Writes the head of a data or gap frame.
fn put_output_head(out: &mut BytesMut, (fseq, pipe, pseq, ts): (u64, Pipe, u64, u64)) {
    out.put_u64(fseq);
    out.put_u8(pipe.code());
    out.put_u64(pseq);
    out.put_u64(ts);
}

/// Reads the head of a data or gap frame (the caller checked there are [`OUTPUT_HEAD_LEN`]
/// bytes).
fn get_output_head(body: &mut Bytes) -> Result<(u64, Pipe, u64, u64), FrameError> {
    let fseq = body.get_u64();
    let pipe = Pipe::from_code(body.get_u8()).ok_or(FrameError::Malformed("unknown pipe"))?;
    Ok((fseq, pipe, body.get_u64(), body.get_u64()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agentrun_protocol::{ControlAction, RunState};

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Hello {
                producer: "ep-1".into(),
                pid: 7,
                key: None,
            },
            Frame::Hello {
                producer: "ep-2".into(),
                pid: 8,
                key: Some([7; KEY_LEN]),
            },
            Frame::Data {
                fseq: 1,
                pipe: Pipe::Stderr,
                pseq: 2,
                ts: 3,
                bytes: Bytes::from_static(b"\xffhi\n"),
            },
            Frame::Event {
                fseq: 2,
                pseq: 1,
                ts: 4,
                event: StatusEvent::new(None, RunState::Running),
            },
            Frame::Gap {
                fseq: 3,
                pipe: Pipe::Stdout,
                pseq: 3,
                ts: 5,
                dropped_bytes: 10,
                dropped_chunks: 2,
            },
            Frame::Done,
            Frame::Ack { fseq: 3 },
            Frame::Control {
                seq: 12,
                msg: ControlMessage::new(ControlAction::Pause),
            },
            Frame::ControlAck { seq: 12 },
            Frame::Health { redis_up: true },
            Frame::Usage {
                cpu_millis: 1500,
                rss_bytes: 4096,
            },
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        // A torn last frame reads as the end of the stream.
        buf.extend_from_slice(&[0, 0, 0, 40, 2, 1]);
        let mut r = &buf[..];
        let mut back = Vec::new();
        while let Some(f) = Frame::read(&mut r).await.unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let bytes = (MAX_FRAME as u32 + 1).to_be_bytes();
        let mut r = &bytes[..];
        assert!(matches!(
            Frame::read(&mut r).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    fn hello_body(key_len: u8, key: &[u8], producer: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(1);
        b.put_u32(1);
        b.put_u8(key_len);
        b.put_slice(key);
        b.put_slice(producer);
        b.freeze()
    }

    #[test]
    fn a_hello_has_a_whole_key_or_none_and_a_plain_producer() {
        assert!(Frame::decode(hello_body(0, &[], b"ep-1")).is_ok());
        assert!(Frame::decode(hello_body(32, &[1; 32], b"ep-1")).is_ok());
        for (len, key, producer) in [
            (16u8, &[1u8; 16][..], &b"ep-1"[..]),
            (32, &[1; 31], b""),
            (0, &[], b""),
            (0, &[], b"../../etc/passwd"),
            (0, &[], b"ep\0"),
            (0, &[], &[b'a'; MAX_PRODUCER + 1]),
            (0, &[], b"\xff"),
        ] {
            assert!(
                Frame::decode(hello_body(len, key, producer)).is_err(),
                "{len} {key:?} {producer:?}"
            );
        }
    }

    #[test]
    fn frames_of_a_fixed_size_must_have_exactly_that_size() {
        for frame in [
            Frame::Done,
            Frame::Ack { fseq: 1 },
            Frame::ControlAck { seq: 1 },
            Frame::Health { redis_up: true },
            Frame::Usage {
                cpu_millis: 1,
                rss_bytes: 2,
            },
            Frame::Gap {
                fseq: 1,
                pipe: Pipe::Stdout,
                pseq: 1,
                ts: 1,
                dropped_bytes: 1,
                dropped_chunks: 1,
            },
        ] {
            let mut body = BytesMut::from(&frame.to_bytes()[4..]);
            assert_eq!(Frame::decode(body.clone().freeze()).unwrap(), frame);
            body.put_u8(0);
            assert!(
                Frame::decode(body.clone().freeze()).is_err(),
                "{frame:?} + 1 byte"
            );
            body.truncate(body.len() - 2);
            assert!(Frame::decode(body.freeze()).is_err(), "{frame:?} - 1 byte");
        }
    }

    #[tokio::test]
    async fn a_limited_read_refuses_a_long_frame_before_reading_it() {
        let frame = Frame::Hello {
            producer: "ep-1".into(),
            pid: 1,
            key: Some([0; KEY_LEN]),
        }
        .to_bytes();
        let mut r = &frame[..];
        assert!(
            Frame::read_limited(&mut r, MAX_HELLO)
                .await
                .unwrap()
                .is_some()
        );
        let long = (MAX_HELLO as u32 + 1).to_be_bytes();
        let mut r = &long[..];
        assert!(matches!(
            Frame::read_limited(&mut r, MAX_HELLO).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    // Property-based fuzzing of everything that reads frames: the socket (from a client that
    // is not authenticated yet, as well as from the peer) and spool files.

    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A reader that hands out its bytes in the given pieces (one piece per read at most),
    /// like a socket that delivers a stream split at arbitrary points.
    struct Pieces {
        pieces: std::collections::VecDeque<Bytes>,
    }

    impl Pieces {
        fn new(bytes: &[u8], cuts: &[usize]) -> Self {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(bytes.len());
            let mut pieces = std::collections::VecDeque::new();
            let mut at = 0;
            for c in cuts {
                if c > at {
                    pieces.push_back(Bytes::copy_from_slice(&bytes[at..c]));
                    at = c;
                }
            }
            Self { pieces }
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(piece) = self.pieces.front_mut() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece.split_to(n));
                if piece.is_empty() {
                    self.pieces.pop_front();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Reads frames until the end of the stream or an error; an in-memory reader never waits,
    /// so this cannot hang unless `read` loops by itself.
    fn read_all<R: AsyncRead + Unpin>(
        mut r: R,
        max: usize,
    ) -> (Vec<Frame>, Result<(), FrameError>) {
        futures::executor::block_on(async {
            let mut frames = Vec::new();
            loop {
                match Frame::read_limited(&mut r, max).await {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => return (frames, Ok(())),
                    Err(e) => return (frames, Err(e)),
                }
            }
        })
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[ -~]{0,40}"]
    }

    fn status_event() -> impl Strategy<Value = StatusEvent> {
        let state = prop::sample::select(vec![
            RunState::Pending,
            RunState::Starting,
            RunState::Running,
            RunState::Paused,
            RunState::Succeeded,
            RunState::Failed,
            RunState::Stopped,
        ]);
        (
            prop::option::of(text()),
            state,
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(any::<i32>()),
            prop::option::of(any::<i32>()),
            prop::option::of(text()),
        )
            .prop_map(
                |(variation, state, reason, message, exit_code, signal, source)| StatusEvent {
                    variation,
                    state,
                    reason,
                    message,
                    exit_code,
                    signal,
                    source,
                },
            )
    }

    /// A control message as the relay lets it through (`ControlMessage::parse`).
    pub(crate) fn control_message() -> impl Strategy<Value = ControlMessage> {
        let action = prop::sample::select(vec![
            ControlAction::Pause,
            ControlAction::Resume,
            ControlAction::Stop,
            ControlAction::Stdin,
        ]);
        (action, prop::option::of(text()), text()).prop_map(|(action, variation, data)| {
            ControlMessage {
                action,
                variation,
                data: (action == ControlAction::Stdin).then_some(data),
            }
        })
    }

    fn pipe() -> impl Strategy<Value = Pipe> {
        prop::sample::select(vec![Pipe::Stdout, Pipe::Stderr])
    }

    /// A number, with the edges (0, u64::MAX) more often than chance would give them.
    fn num() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), Just(u64::MAX), any::<u64>()]
    }

    /// Any valid frame, of every variant.
    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                "[A-Za-z0-9._-]{1,64}",
                any::<u32>(),
                prop::option::of(any::<[u8; KEY_LEN]>())
            )
                .prop_map(|(producer, pid, key)| Frame::Hello { producer, pid, key }),
            (
                num(),
                pipe(),
                num(),
                num(),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(fseq, pipe, pseq, ts, bytes)| Frame::Data {
                    fseq,
                    pipe,
                    pseq,
                    ts,
                    bytes: Bytes::from(bytes),
                }),
            (num(), num(), num(), status_event()).prop_map(|(fseq, pseq, ts, event)| {
                Frame::Event {
                    fseq,
                    pseq,
                    ts,
                    event,
                }
            }),
            (num(), pipe(), num(), num(), num(), num()).prop_map(
                |(fseq, pipe, pseq, ts, dropped_bytes, dropped_chunks)| Frame::Gap {
                    fseq,
                    pipe,
                    pseq,
                    ts,
                    dropped_bytes,
                    dropped_chunks,
                }
            ),
            Just(Frame::Done),
            num().prop_map(|fseq| Frame::Ack { fseq }),
            (num(), control_message()).prop_map(|(seq, msg)| Frame::Control { seq, msg }),
            num().prop_map(|seq| Frame::ControlAck { seq }),
            (num(), num()).prop_map(|(cpu_millis, rss_bytes)| Frame::Usage {
                cpu_millis,
                rss_bytes
            }),
            any::<bool>().prop_map(|redis_up| Frame::Health { redis_up }),
        ]
    }

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for f in frames {
            f.encode(&mut buf);
        }
        buf
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any body (biased towards the known tags, so every branch is reached) decodes to a
        /// frame or is a `FrameError`, never a panic; what decodes encodes back to the same
        /// body, except for the two parts that are not canonical (JSON text and a Hello key).
        #[test]
        fn any_body_decodes_or_is_refused_never_a_panic(
            tag in prop_oneof![0u8..=11, any::<u8>()],
            rest in prop::collection::vec(any::<u8>(), 0..96),
        ) {
            let mut body = vec![tag];
            body.extend_from_slice(&rest);
            match Frame::decode(Bytes::from(body.clone())) {
                Ok(frame) if !matches!(frame, Frame::Event { .. } | Frame::Control { .. }) => {
                    prop_assert_eq!(&frame.to_bytes()[4..], &body[..], "{:?}", frame);
                }
                Ok(_) => {}
                Err(e) => prop_assert!(matches!(e, FrameError::Malformed(_)), "{e}"),
            }
        }

        /// Arbitrary bytes read as a stream give frames, then the end or an error: never a
        /// panic, never a hang, and never a frame over the limit.
        #[test]
        fn any_byte_stream_reads_as_frames_then_an_end_or_an_error(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            max in prop_oneof![Just(MAX_FRAME), Just(MAX_HELLO), 0usize..64],
        ) {
            let (frames, end) = read_all(Pieces::new(&bytes, &cuts), max);
            prop_assert!(frames.len() <= bytes.len() / 5);
            if let Err(FrameError::TooLarge(n)) = end {
                prop_assert!(n > max);
            }
        }

        /// Every valid frame, of every variant, encodes to its length prefix and body, and
        /// decodes (from the body, or read from a stream) back to itself.
        #[test]
        fn every_frame_round_trips(frame in frame()) {
            let bytes = frame.to_bytes();
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            prop_assert_eq!(len, bytes.len() - 4);
            prop_assert_eq!(&Frame::decode(bytes.slice(4..)).unwrap(), &frame);
            let (back, end) = read_all(&bytes[..], MAX_FRAME);
            prop_assert!(end.is_ok());
            prop_assert_eq!(back, vec![frame]);
        }

        /// A stream of frames split at arbitrary points (as a socket delivers it) reads back
        /// exactly the frames written, then a clean end.
        #[test]
        fn frames_split_at_arbitrary_points_read_back_the_same(
            frames in prop::collection::vec(frame(), 0..8),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let buf = encode_all(&frames);
            let (back, end) = read_all(Pieces::new(&buf, &cuts), MAX_FRAME);
            prop_assert!(end.is_ok(), "{:?}", end);
            prop_assert_eq!(back, frames);
        }

        /// A stream cut short anywhere (a crash in the middle of a write) reads back the frames
        /// that were whole, then the end: never an error, a panic or a hang.
        #[test]
        fn a_truncated_stream_reads_the_whole_frames_then_ends(
            frames in prop::collection::vec(frame(), 1..6),
            cut in any::<usize>(),
            pieces in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let buf = encode_all(&frames);
            let cut = cut % buf.len();
            let (back, end) = read_all(Pieces::new(&buf[..cut], &pieces), MAX_FRAME);
            prop_assert!(end.is_ok(), "{:?}", end);
            // The frames that end at or before the cut, and no other.
            let mut whole = 0;
            let mut at = 0;
            for f in &frames {
                at += f.to_bytes().len();
                if at > cut {
                    break;
                }
                whole += 1;
            }
            prop_assert_eq!(&back[..], &frames[..whole]);
        }

        /// A length prefix above the limit is refused from the prefix alone: nothing of the
        /// body is read (or allocated: lengths up to 4 GiB would otherwise be).
        #[test]
        fn a_length_above_the_limit_is_refused_before_the_body_is_read(
            max in prop_oneof![Just(MAX_FRAME), Just(MAX_HELLO), 0usize..1024],
            over in prop_oneof![Just(u32::MAX), any::<u32>()],
            rest in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let len = (max as u64 + 1).max(over as u64) as u32;
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&rest);
            let mut r = &bytes[..];
            let got = futures::executor::block_on(Frame::read_limited(&mut r, max));
            prop_assert!(matches!(got, Err(FrameError::TooLarge(n)) if n == len as usize));
            prop_assert_eq!(r.len(), rest.len());
        }

        /// `valid_producer` accepts exactly 1 to 64 characters of `A-Z a-z 0-9 . _ -`, and a
        /// Hello decodes exactly when its producer id is valid.
        #[test]
        fn a_producer_id_is_valid_exactly_when_short_and_plain(
            id in prop_oneof!["[A-Za-z0-9._-]{0,70}", any::<String>(), "[A-Za-z0-9/.\0 ]{1,8}"],
        ) {
            let expected = (1..=MAX_PRODUCER).contains(&id.len())
                && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            prop_assert_eq!(valid_producer(&id), expected);
            prop_assert_eq!(Frame::decode(hello_body(0, &[], id.as_bytes())).is_ok(), expected);
        }
    }
}
