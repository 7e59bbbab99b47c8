//! The agent's stdin: lines from `stdin` control messages, written by a task of their own so
//! that an agent that does not read its stdin never holds up the entrypoint.
//!
//! What waits for the agent is bounded by a byte budget. A line that does not fit is refused
//! at once, and so are lines the agent can no longer get (it closed its stdin, or exited
//! before reading them); [`Refusals`] gathers them into status events that say which messages
//! (by their control stream seq) were refused and why. No line is ever dropped silently.

use agentrun_protocol::{RunState, StatusEvent};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::Notify;

/// Why a stdin message did not reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// The agent has not read what waits for it, and the budget is spent.
    NotReading,
    /// The agent closed its stdin.
    Closed,
    /// The agent exited before reading it.
    Exited,
}

/// A line that did not reach the agent: its control seq, its size, and why.
pub type Lost = (u64, usize, Why);

#[derive(Default)]
struct State {
    queue: VecDeque<(u64, Bytes)>,
    /// Bytes queued or being written.
    waiting: usize,
    writing: Option<(u64, usize)>,
    closed: bool,
    /// Lines taken that the writer could not write.
    lost: Vec<Lost>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Feeds lines to the agent's stdin.
pub struct StdinFeed {
    state: Arc<Mutex<State>>,
    /// Wakes the writer.
    wake: Arc<Notify>,
    /// Woken when the writer lost lines (the agent closed its stdin).
    lost: Arc<Notify>,
    budget: usize,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl StdinFeed {
    /// Starts the writer; `budget` bytes may wait for the agent at most.
    pub fn start(stdin: Option<ChildStdin>, budget: usize) -> Self {
        let state = Arc::new(Mutex::new(State {
            closed: stdin.is_none(),
            ..Default::default()
        }));
        let wake = Arc::new(Notify::new());
        let lost = Arc::new(Notify::new());
        let writer = stdin
            .map(|stdin| tokio::spawn(write(stdin, state.clone(), wake.clone(), lost.clone())));
        Self {
            state,
            wake,
            lost,
            budget,
            writer,
        }
    }

    /// Queues a line for the agent, or says why it cannot take it (and, for a budget that is
    /// spent, how many bytes wait). A line longer than the budget is taken when nothing waits.
    pub fn offer(&self, seq: u64, line: Bytes) -> Result<(), (Why, usize)> {
        let mut s = lock(&self.state);
        if s.closed {
            return Err((Why::Closed, s.waiting));
        }
        if s.waiting > 0 && s.waiting + line.len() > self.budget {
            return Err((Why::NotReading, s.waiting));
        }
        s.waiting += line.len();
        s.queue.push_back((seq, line));
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Woken when lines were lost; then call [`StdinFeed::take_lost`].
    pub fn lost_notify(&self) -> Arc<Notify> {
        self.lost.clone()
    }

    pub fn take_lost(&self) -> Vec<Lost> {
        std::mem::take(&mut lock(&self.state).lost)
    }

    /// The agent has exited: stops writing; what was not written is lost.
    pub fn finish(mut self) -> Vec<Lost> {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        let mut s = lock(&self.state);
        let mut lost = std::mem::take(&mut s.lost);
        if let Some((seq, len)) = s.writing.take() {
            lost.push((seq, len, Why::Exited));
        }
        lost.extend(
            s.queue
                .drain(..)
                .map(|(seq, b)| (seq, b.len(), Why::Exited)),
        );
        s.waiting = 0;
        s.closed = true;
        lost
    }
}

async fn write(
    mut stdin: ChildStdin,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    lost: Arc<Notify>,
) {
    loop {
        let next = {
            let mut s = lock(&state);
            let next = s.queue.pop_front();
            s.writing = next.as_ref().map(|(seq, b)| (*seq, b.len()));
            next
        };
        let Some((seq, line)) = next else {
            wake.notified().await;
            continue;
        };
        let written = stdin.write_all(&line).await.is_ok() && stdin.flush().await.is_ok();
        let mut s = lock(&state);
        s.writing = None;
        s.waiting -= line.len();
        if !written {
            s.closed = true;
            s.lost.push((seq, line.len(), Why::Closed));
            let rest: Vec<Lost> = s
                .queue
                .drain(..)
                .map(|(seq, b)| (seq, b.len(), Why::Closed))
                .collect();
            s.lost.extend(rest);
            s.waiting = 0;
            drop(s);
            lost.notify_one();
            return;
        }
    }
}

/// Refused stdin messages, gathered into one status event per reason.
#[derive(Default)]
pub struct Refusals {
    groups: BTreeMap<Why, Group>,
}

struct Group {
    seqs: Vec<u64>,
    bytes: u64,
    /// Why, in words (from the first refusal of the group).
    detail: String,
}

/// Ranges to list in one event at most.
const MAX_RANGES: usize = 50;

impl Refusals {
    pub fn add(&mut self, seq: u64, bytes: usize, why: Why, detail: impl FnOnce() -> String) {
        let group = self.groups.entry(why).or_insert_with(|| Group {
            seqs: Vec::new(),
            bytes: 0,
            detail: detail(),
        });
        group.seqs.push(seq);
        group.bytes += bytes as u64;
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// One event per reason for what was gathered, carrying the agent's current `state`.
    pub fn take_events(&mut self, state: RunState) -> Vec<StatusEvent> {
        std::mem::take(&mut self.groups)
            .into_values()
            .map(|g| {
                let message = format!(
                    "refused {} stdin message(s) (control seq {}; {} bytes): {}",
                    g.seqs.len(),
                    ranges(&g.seqs),
                    g.bytes,
                    g.detail
                );
                StatusEvent::new(None, state)
                    .reason("StdinRefused")
                    .message(message)
            })
            .collect()
    }
}

/// `1-3, 7, 9-10` for `[1, 2, 3, 7, 9, 10]` (at most [`MAX_RANGES`] ranges, then `…`).
fn ranges(seqs: &[u64]) -> String {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        if out.len() == MAX_RANGES {
            out.push("…".into());
            break;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_seqs_are_listed_as_ranges() {
        assert_eq!(ranges(&[9, 1, 2, 3, 7, 10]), "1-3, 7, 9-10");
        assert_eq!(ranges(&[4]), "4");
        let many: Vec<u64> = (0..200).map(|i| i * 2).collect();
        assert!(ranges(&many).ends_with(", …"));
    }

    #[test]
    fn refusals_are_reported_once_per_reason_with_counts() {
        let mut r = Refusals::default();
        r.add(5, 10, Why::NotReading, || {
            "the agent has not read its stdin".into()
        });
        r.add(6, 10, Why::NotReading, || {
            unreachable!("the first detail is kept")
        });
        r.add(9, 3, Why::Closed, || "the agent closed its stdin".into());
        let events = r.take_events(RunState::Paused);
        assert!(r.is_empty());
        let messages: Vec<_> = events.iter().map(|e| e.message.clone().unwrap()).collect();
        assert_eq!(
            messages,
            [
                "refused 2 stdin message(s) (control seq 5-6; 20 bytes): the agent has not read its stdin",
                "refused 1 stdin message(s) (control seq 9; 3 bytes): the agent closed its stdin",
            ]
        );
        assert!(events.iter().all(|e| e.state == RunState::Paused));
    }

    #[tokio::test]
    async fn an_agent_that_does_not_read_gets_what_fits_and_the_rest_is_refused() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let feed = StdinFeed::start(child.stdin.take(), 100_000);
        let line = Bytes::from(vec![b'x'; 1000]);
        let mut refused = Vec::new();
        for seq in 1..=1000 {
            if let Err((why, _)) = feed.offer(seq, line.clone()) {
                assert_eq!(why, Why::NotReading);
                refused.push(seq);
            }
        }
        // The pipe and the budget took a few hundred; nothing blocked.
        assert!(
            refused.len() > 500 && refused.len() < 990,
            "{}",
            refused.len()
        );
        let _ = child.kill().await;
        let _ = child.wait().await;
        let lost = feed.finish();
        assert!(lost.iter().all(|(seq, _, _)| !refused.contains(seq)));
    }
}
