//! The entrypoint's Unix socket: binding it, admitting a client only with the entrypoint's key
//! (bounded in time, size and number of waiting clients), and serving the connected
//! entrypoint: its frames go to [`super::ingest`], control messages go back to it.

use super::config::SidecarError;
use super::control;
use super::ingest::ingest;
use super::publisher::ToPublish;
use super::state::{Peer, SidecarState, lock};
use crate::frame::{Frame, MAX_HELLO};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How long a new connection has to present its `Hello` before it is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections that may wait for their `Hello` at once; a new one closes the oldest. The
/// entrypoint writes its `Hello` with its `connect`, so only a client that stalls waits.
pub const MAX_UNAUTHENTICATED: usize = 4;
/// Reason of the status event that reports a refused socket client.
pub const SOCKET_REFUSED_REASON: &str = "SocketClientRefused";

/// Binds the entrypoint's socket, open to every user of the pod.
///
/// On a real kubelet the agent container runs as whatever user its image or securityContext
/// says (root with no capabilities, any uid, OpenShift's random uid with gid 0), never as the
/// sidecar's user, and `connect()` needs write permission on the socket file. The socket lives
/// on the pod's own volume, which only the pod's containers see, so mode 0666 opens it to the
/// agent container and to nothing outside the pod.
pub(crate) fn bind_socket(path: &std::path::Path) -> Result<UnixListener, SidecarError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |source| SidecarError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(error)?;
    Ok(listener)
}

/// Why a client of the socket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// It sent no `Hello` in time.
    Slow,
    /// It closed the connection without a `Hello`.
    Silent,
    /// Its first frame was not a valid `Hello`.
    NotHello,
    /// Its `Hello` carried no key.
    NoKey,
    /// Its `Hello` carried a key that is not this sidecar's.
    WrongKey,
    /// Too many connections waited for their `Hello`; it was the oldest.
    Crowded,
}

impl Refusal {
    /// The `reason` label of `agentrun_sidecar_socket_clients_refused_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::Slow => "hello_timeout",
            Refusal::Silent => "no_hello",
            Refusal::NotHello => "not_a_hello",
            Refusal::NoKey => "no_key",
            Refusal::WrongKey => "wrong_key",
            Refusal::Crowded => "too_many_waiting",
        }
    }

    fn describe(self) -> String {
        match self {
            Refusal::Slow => format!("it sent no hello within {}s", HELLO_TIMEOUT.as_secs()),
            Refusal::Silent => "it closed the connection without a hello".into(),
            Refusal::NotHello => "its first frame was not a valid hello".into(),
            Refusal::NoKey => "its hello carried no key".into(),
            Refusal::WrongKey => "its hello carried a wrong key".into(),
            Refusal::Crowded => format!(
                "more than {MAX_UNAUTHENTICATED} connections were waiting to say hello at once; it was the oldest"
            ),
        }
    }
}

/// Waits for the connection's `Hello` (bounded in time and size, and closed early when newer
/// connections crowd it out) and checks its key.
async fn authenticate(
    shared: &SidecarState,
    read: &mut tokio::net::unix::OwnedReadHalf,
    mut evicted: oneshot::Receiver<()>,
) -> Result<Arc<str>, Refusal> {
    let hello = tokio::select! {
        hello = tokio::time::timeout(HELLO_TIMEOUT, Frame::read_limited(read, MAX_HELLO)) => hello,
        Ok(()) = &mut evicted => return Err(Refusal::Crowded),
    };
    match hello {
        Err(_) => Err(Refusal::Slow),
        Ok(Ok(None)) => Err(Refusal::Silent),
        Ok(Ok(Some(Frame::Hello { producer, key, .. }))) => {
            if shared.key.matches(key.as_ref()) {
                Ok(Arc::from(producer.as_str()))
            } else if key.is_none() {
                Err(Refusal::NoKey)
            } else {
                Err(Refusal::WrongKey)
            }
        }
        Ok(Ok(Some(_)) | Err(_)) => Err(Refusal::NotHello),
    }
}

/// Counts, logs (at most every few seconds) and, once per sidecar, reports a refused client.
async fn refused(shared: &SidecarState, items: &mpsc::Sender<ToPublish>, why: Refusal) {
    shared
        .metrics
        .socket_refused
        .with_label_values(&[why.label()])
        .inc();
    let (first, log) = {
        let mut r = lock(&shared.refusals);
        r.unlogged += 1;
        let now = tokio::time::Instant::now();
        let log = r
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10));
        let count = if log {
            r.last_log = Some(now);
            Some(std::mem::take(&mut r.unlogged))
        } else {
            None
        };
        (!std::mem::replace(&mut r.reported, true), count)
    };
    let message = format!(
        "a process in the agent container tried to use the sidecar's socket {} without the entrypoint's key ({}); it was refused: it receives no control messages and publishes nothing. If it was the agent's own entrypoint, it had no key: its log says why (kubectl logs POD -c agent)",
        shared.config.socket.display(),
        why.describe()
    );
    if let Some(count) = log {
        tracing::warn!(refused = count, reason = why.label(), "{message}");
    }
    if first {
        shared.notice(items, SOCKET_REFUSED_REASON, message).await;
    }
}

pub(crate) async fn handle_connection(
    shared: Arc<SidecarState>,
    stream: UnixStream,
    epoch: u64,
    evicted: oneshot::Receiver<()>,
    items: mpsc::Sender<ToPublish>,
    budget: Arc<Semaphore>,
) {
    let (mut read, mut write) = stream.into_split();
    let authenticated = authenticate(&shared, &mut read, evicted).await;
    shared.admitted(epoch);
    let producer = match authenticated {
        Ok(p) => p,
        Err(why) => return refused(&shared, &items, why).await,
    };
    let (writer, mut queue) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        while let Some(b) = queue.recv().await {
            if write.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let _ = writer.send(
        Frame::Health {
            redis_up: *shared.redis_up.borrow(),
        }
        .to_bytes(),
    );
    // The new peer gets every control message not acknowledged yet (the entrypoint applies
    // each seq once), under the queue's lock so that none is sent between the two.
    {
        let queue = lock(&shared.control);
        for (seq, msg) in queue.unacknowledged() {
            let _ = writer.send(
                Frame::Control {
                    seq,
                    msg: msg.clone(),
                }
                .to_bytes(),
            );
        }
        *lock(&shared.peer) = Some(Peer { epoch, writer });
    }
    tracing::info!(producer = %producer, "entrypoint connected");
    loop {
        match Frame::read(&mut read).await {
            Ok(Some(Frame::Usage {
                cpu_millis,
                rss_bytes,
            })) => {
                shared.metrics.agent_cpu_millis.set(cpu_millis as i64);
                shared.metrics.agent_rss_bytes.set(rss_bytes as i64);
            }
            Ok(Some(Frame::Done)) => {
                let _ = shared.entrypoint_done.send(true);
            }
            Ok(Some(Frame::ControlAck { seq })) => control::acknowledged(&shared, seq),
            Ok(Some(frame)) => {
                if let Some(item) = ingest(&shared, &producer, frame, Some(epoch), &budget).await
                    && items.send(item).await.is_err()
                {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "dropping the entrypoint connection");
                break;
            }
        }
    }
    {
        let mut p = lock(&shared.peer);
        if p.as_ref().is_some_and(|p| p.epoch == epoch) {
            *p = None;
        }
    }
    tracing::info!(producer = %producer, "entrypoint disconnected");
}

/// The socket's side of the shared state: connections waiting for their `Hello`.
impl SidecarState {
    /// Registers a new connection as waiting for its `Hello`; past [`MAX_UNAUTHENTICATED`]
    /// the oldest waiting one is closed. The receiver fires when this one is.
    pub(crate) fn admit(&self, epoch: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = lock(&self.unauthenticated);
        if waiting.len() >= MAX_UNAUTHENTICATED
            && let Some((_, oldest)) = waiting.pop_front()
        {
            let _ = oldest.send(());
        }
        waiting.push_back((epoch, tx));
        rx
    }

    /// The connection is no longer waiting for its `Hello`.
    pub(crate) fn admitted(&self, epoch: u64) {
        lock(&self.unauthenticated).retain(|(e, _)| *e != epoch);
    }
}
