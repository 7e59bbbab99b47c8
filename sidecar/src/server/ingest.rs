//! Frames from the entrypoint (or from an adopted spool) become entries for the publisher:
//! stdout to the output stream, stderr to the logs stream, gaps as gap entries with their
//! counts, status events with the variation and source filled in.

use super::publisher::ToPublish;
use super::state::SidecarState;
use crate::frame::{Frame, Pipe};
use agentrun_protocol::{EntryType, NewEntry, StreamName, Variation};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Turns a frame from an entrypoint into work for the publisher, once the frame's share of the
/// buffer budget is free (that wait is the back-pressure on the entrypoint).
pub(crate) async fn ingest(
    shared: &Arc<SidecarState>,
    producer: &Arc<str>,
    frame: Frame,
    epoch: Option<u64>,
    budget: &Arc<Semaphore>,
) -> Option<ToPublish> {
    let var = &shared.config.variation;
    let weight = frame.weight().min(shared.config.buffer_bytes) as u32;
    let fseq = frame.fseq()?;
    let (stream, entry, status) = match frame {
        Frame::Data {
            pipe,
            pseq,
            ts,
            bytes,
            ..
        } => {
            let stream = stream_of(pipe, var);
            let (kind, label) = match pipe {
                Pipe::Stdout => (EntryType::Output, "output"),
                Pipe::Stderr => (EntryType::Logs, "logs"),
            };
            shared
                .metrics
                .bytes_in
                .with_label_values(&[label])
                .inc_by(bytes.len() as u64);
            (
                stream,
                NewEntry {
                    pseq,
                    ts,
                    kind,
                    content: bytes,
                    meta: None,
                },
                None,
            )
        }
        Frame::Gap {
            pipe,
            pseq,
            ts,
            dropped_bytes,
            dropped_chunks,
            ..
        } => {
            let stream = stream_of(pipe, var);
            shared.metrics.gap_bytes.inc_by(dropped_bytes);
            let meta = serde_json::json!({"droppedBytes": dropped_bytes, "droppedChunks": dropped_chunks, "reason": "spool full"});
            let content = format!(
                "[agentrun: {dropped_bytes} bytes of output were dropped because the spool was full]"
            );
            (
                stream,
                NewEntry {
                    pseq,
                    ts,
                    kind: EntryType::Gap,
                    content: Bytes::from(content),
                    meta: Some(meta.to_string()),
                },
                None,
            )
        }
        Frame::Event {
            pseq,
            ts,
            mut event,
            ..
        } => {
            event.variation = Some(var.as_str().to_owned());
            event.source = Some("sidecar".into());
            shared.saw_state(event.state);
            let content = Bytes::from(event.to_json());
            (
                StreamName::Status,
                NewEntry {
                    pseq,
                    ts,
                    kind: EntryType::Status,
                    content,
                    meta: None,
                },
                Some(event),
            )
        }
        _ => return None,
    };
    let permit = budget.clone().acquire_many_owned(weight).await.ok()?;
    shared.metrics.buffered_bytes.add(i64::from(weight));
    Some(ToPublish::Entry {
        stream,
        producer: producer.clone(),
        entry: Box::new(entry),
        ack: epoch.map(|e| (e, fseq)),
        status,
        permit: Some((permit, weight)),
    })
}

/// The stream a pipe's bytes go to: stdout to the output stream, stderr to the logs stream.
fn stream_of(pipe: Pipe, variation: &Variation) -> StreamName {
    match pipe {
        Pipe::Stdout => StreamName::Output(variation.clone()),
        Pipe::Stderr => StreamName::Logs(variation.clone()),
    }
}
