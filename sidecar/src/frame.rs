//! Frames exchanged by the entrypoint and the sidecar over the Unix socket, and stored in
//! spool files (the same encoding in both places, so a spool is replayed by reading frames).
//!
//! Encoding: a 4-byte big-endian length (of what follows), a 1-byte tag, then the body.

use agentrun_protocol::{ControlMessage, StatusEvent};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame accepted; anything bigger is a corrupt stream.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

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

/// One frame. `fseq` numbers every frame an entrypoint produces (across all pipes), so the
/// sidecar can acknowledge "everything up to N"; `pseq` is the producer sequence of the target
/// stream, which Redis uses to drop re-sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// First frame of a connection from an entrypoint.
    Hello { producer: String, pid: u32 },
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
    /// Sidecar to entrypoint: apply a control message.
    Control(ControlMessage),
    /// The agent's resource use (a live figure: never spooled nor acknowledged).
    Usage { cpu_millis: u64, rss_bytes: u64 },
    /// Sidecar to entrypoint: whether Redis is reachable (when not, the entrypoint spools
    /// instead of waiting).
    Health { redis_up: bool },
}

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit; the stream is corrupt")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
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

    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello { producer, pid } => {
                out.put_u8(1);
                out.put_u32(*pid);
                out.put_slice(producer.as_bytes());
            }
            Frame::Data {
                fseq,
                pipe,
                pseq,
                ts,
                bytes,
            } => {
                out.put_u8(2);
                out.put_u64(*fseq);
                out.put_u8(pipe.code());
                out.put_u64(*pseq);
                out.put_u64(*ts);
                out.put_slice(bytes);
            }
            Frame::Event {
                fseq,
                pseq,
                ts,
                event,
            } => {
                out.put_u8(3);
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
                out.put_u8(4);
                out.put_u64(*fseq);
                out.put_u8(pipe.code());
                out.put_u64(*pseq);
                out.put_u64(*ts);
                out.put_u64(*dropped_bytes);
                out.put_u64(*dropped_chunks);
            }
            Frame::Done => out.put_u8(5),
            Frame::Ack { fseq } => {
                out.put_u8(6);
                out.put_u64(*fseq);
            }
            Frame::Control(msg) => {
                out.put_u8(7);
                out.put_slice(&msg.to_json());
            }
            Frame::Health { redis_up } => {
                out.put_u8(8);
                out.put_u8(u8::from(*redis_up));
            }
            Frame::Usage {
                cpu_millis,
                rss_bytes,
            } => {
                out.put_u8(9);
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
        let tag = body.get_u8();
        let need = |b: &Bytes, n: usize| {
            if b.len() < n {
                Err(Malformed("frame too short"))
            } else {
                Ok(())
            }
        };
        Ok(match tag {
            1 => {
                need(&body, 4)?;
                let pid = body.get_u32();
                let producer = String::from_utf8(body.to_vec())
                    .map_err(|_| Malformed("producer is not UTF-8"))?;
                Frame::Hello { producer, pid }
            }
            2 => {
                need(&body, 25)?;
                let fseq = body.get_u64();
                let pipe = Pipe::from_code(body.get_u8()).ok_or(Malformed("unknown pipe"))?;
                let pseq = body.get_u64();
                let ts = body.get_u64();
                Frame::Data {
                    fseq,
                    pipe,
                    pseq,
                    ts,
                    bytes: body,
                }
            }
            3 => {
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
            4 => {
                need(&body, 41)?;
                let fseq = body.get_u64();
                let pipe = Pipe::from_code(body.get_u8()).ok_or(Malformed("unknown pipe"))?;
                Frame::Gap {
                    fseq,
                    pipe,
                    pseq: body.get_u64(),
                    ts: body.get_u64(),
                    dropped_bytes: body.get_u64(),
                    dropped_chunks: body.get_u64(),
                }
            }
            5 => Frame::Done,
            6 => {
                need(&body, 8)?;
                Frame::Ack {
                    fseq: body.get_u64(),
                }
            }
            7 => Frame::Control(
                serde_json::from_slice(&body).map_err(|_| Malformed("bad control message"))?,
            ),
            8 => {
                need(&body, 1)?;
                Frame::Health {
                    redis_up: body.get_u8() != 0,
                }
            }
            9 => {
                need(&body, 16)?;
                Frame::Usage {
                    cpu_millis: body.get_u64(),
                    rss_bytes: body.get_u64(),
                }
            }
            _ => return Err(Malformed("unknown frame tag")),
        })
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (or a truncated last frame, which
    /// is what a crash in the middle of a write leaves behind).
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_protocol::{ControlAction, RunState};

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Hello {
                producer: "ep-1".into(),
                pid: 7,
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
            Frame::Control(ControlMessage::new(ControlAction::Pause)),
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
}
