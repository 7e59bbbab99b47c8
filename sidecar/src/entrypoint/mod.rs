//! `agentrun-entrypoint`: runs the agent's command, captures its output byte-exact, and hands
//! it to the sidecar; applies control messages to the agent.

pub mod outbox;
pub mod stdin;

use crate::auth::Key;
use crate::chunker::Chunker;
use crate::frame::Pipe;
use agentrun_protocol::{ControlAction, ControlMessage, RunState, StatusEvent};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use outbox::{FinishReport, Outbox, OutboxConfig};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use stdin::{Refusals, StdinFeed, Why};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct EntrypointConfig {
    /// The sidecar's Unix socket.
    pub socket: PathBuf,
    /// Where to spool while the sidecar is away (next to the socket by default).
    pub spool_dir: PathBuf,
    /// The agent's command and arguments.
    pub command: Vec<OsString>,
    /// After `stop`, how long the agent has between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// After the agent exits, how long to wait for the sidecar to take the rest.
    pub drain_timeout: Duration,
    /// A partial line is sent after this much quiet.
    pub idle_flush: Duration,
    pub window_bytes: usize,
    pub spool_max_bytes: u64,
    /// Also copy the agent's output to our own stdout/stderr (so `kubectl logs` works).
    pub tee: bool,
    /// Producer id (random per process when not given).
    pub producer: Option<String>,
    /// Where Kubernetes reads the container's termination message; when the agent was stopped
    /// on request, `agentrun: stopped` is written there (only if the file exists).
    pub termination_log: PathBuf,
    /// The key the sidecar handed over (none: the sidecar refuses this entrypoint).
    pub key: Key,
    /// The sidecar's user: the key goes only to a socket that user serves.
    pub sidecar_uid: Option<u32>,
    /// Bytes of `stdin` messages that may wait for the agent to read them; past it they are
    /// refused and reported.
    pub stdin_budget: usize,
}

/// Termination message line that tells the operator the agent was stopped on request.
pub const STOPPED_TERMINATION_MESSAGE: &str = "agentrun: stopped";
/// Start of the termination message line that tells the operator that output did not reach
/// the sidecar before the entrypoint exited (followed by why and where it is).
pub const UNDELIVERED_TERMINATION_PREFIX: &str = "agentrun: output not delivered: ";

impl EntrypointConfig {
    pub fn new(socket: PathBuf, command: Vec<OsString>) -> Self {
        let spool_dir = socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        Self {
            socket,
            spool_dir,
            command,
            stop_grace: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            idle_flush: Duration::from_millis(20),
            window_bytes: 8 * 1024 * 1024,
            spool_max_bytes: 1024 * 1024 * 1024,
            tee: true,
            producer: None,
            termination_log: PathBuf::from("/dev/termination-log"),
            key: Key::none(),
            sidecar_uid: None,
            stdin_budget: 1024 * 1024,
        }
    }
}

/// Exit code for a command that could not be started (as a shell reports it).
pub const EXIT_CANNOT_START: i32 = 127;

/// Runs the agent to completion and returns the exit code to exit with.
pub async fn run(config: EntrypointConfig) -> i32 {
    let producer = config
        .producer
        .clone()
        .unwrap_or_else(|| crate::frame::new_producer_id("ep"));
    let (outbox, mut control_rx) = Outbox::start(OutboxConfig {
        socket: config.socket.clone(),
        spool_dir: config.spool_dir.clone(),
        producer,
        window_bytes: config.window_bytes,
        spool_max_bytes: config.spool_max_bytes,
        reconnect_every: Duration::from_millis(100),
        key: config.key.clone(),
        sidecar_uid: config.sidecar_uid,
    });

    let Some((program, args)) = config.command.split_first() else {
        eprintln!(
            "agentrun-entrypoint: no command given: use agentrun-entrypoint [--socket PATH] -- CMD [ARGS...]"
        );
        return 2;
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "cannot start {:?}: {e} (is it installed in the image and on PATH?)",
                program
            );
            eprintln!("agentrun-entrypoint: {msg}");
            let mut event = StatusEvent::new(None, RunState::Failed)
                .reason("StartError")
                .message(msg);
            event.exit_code = Some(EXIT_CANNOT_START);
            control_rx.close();
            outbox.event(event).await;
            let undelivered = report(outbox.finish(config.drain_timeout).await);
            write_termination_message(&config.termination_log, false, undelivered.as_deref());
            return EXIT_CANNOT_START;
        }
    };
    let pgid = Pid::from_raw(child.id().unwrap_or(0) as i32);
    let mut started = StatusEvent::new(None, RunState::Running).reason("Started");
    started.message = Some(format!("agent started (pid {pgid})"));
    outbox.event(started).await;

    let (exited_tx, exited_rx) = watch::channel(false);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(pump(
            out,
            Pipe::Stdout,
            outbox.clone(),
            config.tee.then(tokio::io::stdout),
            config.idle_flush,
            exited_rx.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(pump(
            err,
            Pipe::Stderr,
            outbox.clone(),
            config.tee.then(tokio::io::stderr),
            config.idle_flush,
            exited_rx.clone(),
        )));
    }

    // stdin: control messages write lines to the agent, within a budget; what cannot be
    // written is refused and reported (in one status event a second at most).
    let feed = StdinFeed::start(child.stdin.take(), config.stdin_budget);
    let stdin_lost = feed.lost_notify();
    let mut refusals = Refusals::default();
    let mut report_tick = tokio::time::interval(Duration::from_secs(1));
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;

    let stop_requested = Arc::new(AtomicBool::new(false));
    let mut terminated = false;
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();

    let child_pid = pgid.as_raw() as u32;
    let mut usage_tick = tokio::time::interval(Duration::from_secs(2));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = usage_tick.tick() => {
                if let Some((cpu, rss)) = process_usage(child_pid) {
                    outbox.usage(cpu, rss);
                }
            }
            Some((seq, msg)) = control_rx.recv() => {
                let mut applied = Applied {
                    seq,
                    pgid,
                    outbox: &outbox,
                    feed: &feed,
                    refusals: &mut refusals,
                    paused: &mut paused,
                    stop_requested: &stop_requested,
                    grace: config.stop_grace,
                    budget: config.stdin_budget,
                };
                applied.apply(msg).await;
                outbox.control_done(seq);
            }
            _ = stdin_lost.notified() => {
                for (seq, bytes, why) in feed.take_lost() {
                    refusals.add(seq, bytes, why, || lost_detail(why));
                }
            }
            _ = report_tick.tick(), if !refusals.is_empty() => {
                report_refusals(&mut refusals, &outbox, paused).await;
            }
            Some(_) = recv_signal(&mut terminate) => {
                terminated = true;
                let _ = killpg(pgid, Signal::SIGCONT);
                let _ = killpg(pgid, Signal::SIGTERM);
            }
            Some(_) = recv_signal(&mut interrupt) => {
                let _ = killpg(pgid, Signal::SIGINT);
            }
        }
    };
    // Let the readers drain what the agent wrote; children that keep the pipes open get a
    // short grace before the readers stop waiting for them.
    let _ = exited_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    // Control that comes from now on is not applied: say so for what waits, and for stdin
    // that never reached the agent.
    control_rx.close();
    while let Ok((seq, msg)) = control_rx.try_recv() {
        eprintln!(
            "agentrun-entrypoint: control message {seq} ({}) arrived after the agent exited; it was not applied",
            msg.action
        );
        if msg.action == ControlAction::Stdin {
            let bytes = msg.data.as_deref().map_or(0, str::len) + 1;
            refusals.add(seq, bytes, Why::Exited, || lost_detail(Why::Exited));
        }
        outbox.control_done(seq);
    }
    for (seq, bytes, why) in feed.finish() {
        refusals.add(seq, bytes, why, || lost_detail(why));
    }
    if !refusals.is_empty() {
        report_refusals(&mut refusals, &outbox, paused).await;
    }

    let (code, event) = match status {
        Ok(status) => exit_event(status, stop_requested.load(Ordering::SeqCst), terminated),
        Err(e) => {
            let ev = StatusEvent::new(None, RunState::Failed)
                .reason("Error")
                .message(format!("waiting for the agent failed: {e}"));
            (1, ev)
        }
    };
    let stopped = event.state == RunState::Stopped && event.reason.as_deref() == Some("Stopped");
    if stopped {
        // Written before the last event so that it is there even if the drain below is cut
        // short by the pod's grace period.
        write_termination_message(&config.termination_log, true, None);
    }
    outbox.event(event).await;
    let undelivered = report(outbox.finish(config.drain_timeout).await);
    if undelivered.is_some() {
        write_termination_message(&config.termination_log, stopped, undelivered.as_deref());
    }
    code
}

/// The container's termination message: one line per fact the operator reads.
pub fn termination_message(stopped: bool, undelivered: Option<&str>) -> String {
    let mut lines = Vec::new();
    if stopped {
        lines.push(STOPPED_TERMINATION_MESSAGE.to_string());
    }
    if let Some(why) = undelivered {
        lines.push(format!("{UNDELIVERED_TERMINATION_PREFIX}{why}"));
    }
    lines.join("\n")
}

/// Writes the termination message to the file the kubelet created (never creates it: outside
/// Kubernetes there is none).
fn write_termination_message(path: &std::path::Path, stopped: bool, undelivered: Option<&str>) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
    {
        let _ = f.write_all(termination_message(stopped, undelivered).as_bytes());
    }
}

/// CPU time (ms, user + system) and resident memory (bytes) of a process, from /proc.
pub fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(((utime + stime) * 1000 / ticks.max(1), rss_pages * page))
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Tells the log what happened to output the sidecar did not take; returns that, for the
/// termination message, when something was not delivered.
fn report(r: FinishReport) -> Option<String> {
    let text = match r {
        FinishReport::Delivered => return None,
        FinishReport::Spooled {
            path,
            frames,
            no_sidecar: Some(error),
        } => format!(
            "no sidecar ever answered on the socket ({error}); {frames} frame(s) of output are in the spool {}, which a sidecar of this pod publishes when it starts",
            path.display()
        ),
        FinishReport::Spooled {
            path,
            frames,
            no_sidecar: None,
        } => format!(
            "the sidecar did not take {frames} frame(s) before the drain timeout; they are in the spool {}, which the sidecar publishes once it can (it adopts spools whose entrypoint has exited)",
            path.display()
        ),
        FinishReport::Lost { frames, error } => {
            format!("{frames} frame(s) could be neither delivered nor spooled: {error}")
        }
    };
    eprintln!("agentrun-entrypoint: {text}");
    Some(text)
}

/// The exit code to exit with and the final status event.
pub fn exit_event(
    status: std::process::ExitStatus,
    stop_requested: bool,
    terminated: bool,
) -> (i32, StatusEvent) {
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (1, None),
    };
    let mut ev = if stop_requested {
        StatusEvent::new(None, RunState::Stopped)
            .reason("Stopped")
            .message("the agent was stopped on request")
    } else if terminated {
        StatusEvent::new(None, RunState::Stopped)
            .reason("Terminated")
            .message("the agent was terminated: its container got SIGTERM (the pod is being deleted or the run timed out)")
    } else if code == 0 {
        StatusEvent::new(None, RunState::Succeeded).reason("Completed")
    } else if let Some(s) = signal {
        let name = Signal::try_from(s)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| s.to_string());
        StatusEvent::new(None, RunState::Failed)
            .reason("Signaled")
            .message(format!("the agent was killed by {name}"))
    } else {
        StatusEvent::new(None, RunState::Failed)
            .reason("Error")
            .message(format!("the agent exited with code {code}"))
    };
    ev.exit_code = Some(code);
    ev.signal = signal;
    (code, ev)
}

/// Why stdin that was taken did not reach the agent.
fn lost_detail(why: Why) -> String {
    match why {
        Why::Closed => "the agent closed its stdin".into(),
        Why::Exited | Why::NotReading => "the agent exited before reading it".into(),
    }
}

/// Publishes (and logs) what was refused since the last report.
async fn report_refusals(refusals: &mut Refusals, outbox: &Outbox, paused: bool) {
    let state = if paused {
        RunState::Paused
    } else {
        RunState::Running
    };
    for event in refusals.take_events(state) {
        if let Some(m) = &event.message {
            eprintln!("agentrun-entrypoint: {m}");
        }
        outbox.event(event).await;
    }
}

/// One control message being applied to the agent.
struct Applied<'a> {
    seq: u64,
    pgid: Pid,
    outbox: &'a Outbox,
    feed: &'a StdinFeed,
    refusals: &'a mut Refusals,
    paused: &'a mut bool,
    stop_requested: &'a Arc<AtomicBool>,
    grace: Duration,
    budget: usize,
}

impl Applied<'_> {
    async fn apply(&mut self, msg: ControlMessage) {
        let pgid = self.pgid;
        match msg.action {
            ControlAction::Pause => {
                if killpg(pgid, Signal::SIGSTOP).is_ok() {
                    *self.paused = true;
                    self.outbox
                        .event(StatusEvent::new(None, RunState::Paused).reason("Paused"))
                        .await;
                }
            }
            ControlAction::Resume => {
                if killpg(pgid, Signal::SIGCONT).is_ok() {
                    *self.paused = false;
                    self.outbox
                        .event(StatusEvent::new(None, RunState::Running).reason("Resumed"))
                        .await;
                }
            }
            ControlAction::Stop => {
                if self.stop_requested.swap(true, Ordering::SeqCst) {
                    return;
                }
                let _ = killpg(pgid, Signal::SIGCONT);
                let _ = killpg(pgid, Signal::SIGTERM);
                let grace = self.grace;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = killpg(pgid, Signal::SIGKILL);
                });
            }
            ControlAction::Stdin => {
                let mut line = msg.data.unwrap_or_default();
                line.push('\n');
                let bytes = line.len();
                if let Err((why, waiting)) = self.feed.offer(self.seq, bytes::Bytes::from(line)) {
                    let budget = self.budget;
                    self.refusals.add(self.seq, bytes, why, || match why {
                        Why::NotReading => format!(
                            "the agent has not read its stdin: {waiting} bytes already wait for it, and the entrypoint holds at most {budget} (--stdin-buffer-kib)"
                        ),
                        other => lost_detail(other),
                    });
                }
            }
        }
    }
}

/// Reads one of the agent's pipes, copies it to our own stream, and sends it in chunks.
async fn pump<R, W>(
    mut pipe: R,
    which: Pipe,
    outbox: Outbox,
    mut tee: Option<W>,
    idle: Duration,
    mut exited: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunker = Chunker::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let idle_timer = async {
            if chunker.pending() > 0 {
                tokio::time::sleep(idle).await
            } else {
                std::future::pending().await
            }
        };
        let exit_timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = pipe.read(&mut buf) => {
                let n: usize = n.unwrap_or_default();
                if n == 0 { break; }
                if let Some(t) = tee.as_mut()
                    && (t.write_all(&buf[..n]).await.is_err() || t.flush().await.is_err())
                {
                    tee = None;
                }
                for chunk in chunker.push(&buf[..n]) {
                    outbox.data(which, chunk).await;
                }
            }
            _ = idle_timer => {
                if let Some(chunk) = chunker.flush_idle() {
                    outbox.data(which, chunk).await;
                }
            }
            Ok(()) = exited.changed(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            _ = exit_timer => break,
        }
    }
    if let Some(chunk) = chunker.finish() {
        outbox.data(which, chunk).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_live_process_is_read_from_proc() {
        let (cpu, rss) = process_usage(std::process::id()).expect("own /proc entry");
        assert!(rss > 1024 * 1024, "rss {rss}");
        assert!(cpu < 3_600_000);
        assert!(process_usage(u32::MAX).is_none());
    }

    #[test]
    fn the_termination_message_has_one_line_per_fact() {
        assert_eq!(termination_message(true, None), "agentrun: stopped");
        assert_eq!(
            termination_message(false, Some("why")),
            "agentrun: output not delivered: why"
        );
        assert_eq!(
            termination_message(true, Some("why")),
            "agentrun: stopped\nagentrun: output not delivered: why"
        );
    }

    #[test]
    fn exit_statuses_map_to_final_events() {
        use std::os::unix::process::ExitStatusExt;
        let (code, ev) = exit_event(std::process::ExitStatus::from_raw(0), false, false);
        assert_eq!(
            (code, ev.state, ev.reason.as_deref()),
            (0, RunState::Succeeded, Some("Completed"))
        );
        let (code, ev) = exit_event(std::process::ExitStatus::from_raw(3 << 8), false, false);
        assert_eq!(
            (code, ev.state, ev.exit_code),
            (3, RunState::Failed, Some(3))
        );
        let (code, ev) = exit_event(std::process::ExitStatus::from_raw(9), false, false);
        assert_eq!(
            (code, ev.signal, ev.reason.as_deref()),
            (137, Some(9), Some("Signaled"))
        );
        assert!(ev.message.unwrap().contains("SIGKILL"));
        let (code, ev) = exit_event(std::process::ExitStatus::from_raw(15), true, false);
        assert_eq!((code, ev.state), (143, RunState::Stopped));
        let (code, ev) = exit_event(std::process::ExitStatus::from_raw(15), false, true);
        assert_eq!(
            (code, ev.state, ev.reason.as_deref()),
            (143, RunState::Stopped, Some("Terminated"))
        );
    }
}
