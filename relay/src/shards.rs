//! Sharded Pub/Sub on a Redis Cluster, for the [`hub`](crate::hub).
//!
//! On a cluster a run's channels are sharded channels in the run's slot (the `{RUN}` hash
//! tag), announced with `SPUBLISH` by the master that serves the slot. The hub subscribes each
//! watched run's channels with `SSUBSCRIBE` on that master, over one RESP3 connection per
//! master ([`RedisSettings::node_push_connection`]), and sends one channel per command, so no
//! command ever holds channels of several slots.
//!
//! The redis crate's cluster connection is not used for subscriptions: after a reconnect or a
//! new slot map it resubscribes every channel a node serves in one `SSUBSCRIBE` (refused with
//! `CROSSSLOT` as soon as they are in several slots), silently, and without unsubscribing where
//! the channels were, which could leave a run subscribed twice (on a former master that is now
//! a replica, and on the new master) and deliver its entries twice. Here each run's channels
//! are on exactly one connection, known, and a run whose subscription is lost is
//! resubscribed where its slot is now and its clients are told to catch up from the streams:
//!
//! - a slot that moves (resharding, `CLUSTER SETSLOT ... NODE`, or a failover): the node that
//!   served it ends the subscriptions with a `sunsubscribe` push;
//! - a node connection that drops (a master killed): a `Disconnection` push;
//! - a `SSUBSCRIBE` answered with `MOVED`: the slot map is stale.
//!
//! The hub's repair loop then calls `Shards::resubscribe`; once it succeeds, the run's
//! feed gets [`FeedItem::Resync`](crate::hub::FeedItem::Resync), and its clients read what
//! they missed from the streams (subscribe first, then read: nothing lost; entries already
//! sent are skipped by `seq`: nothing duplicated).

use agentrun_protocol::topology::{
    NodeAddr, SlotOwner, key_slot, master_of, masters_in_cluster_slots,
};
use agentrun_protocol::{RedisConn, RedisSettings, RunId};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// One connection to one node: its address and a number that tells a connection from the
/// one that replaced it.
pub(crate) type Link = (NodeAddr, u64);

/// A push from a node connection, tagged with the connection.
pub(crate) type Push = (Link, PushInfo);

/// How long one subscribe, unsubscribe or slot-map read may take; a run it fails for is left
/// to the repair loop, which tries again.
const ATTEMPT: Duration = Duration::from_secs(2);

/// How many `MOVED` redirections one resubscription follows.
const MAX_REDIRECTS: usize = 3;

/// What one subscription command did.
enum Attempt {
    Done,
    /// The slot is served elsewhere (`MOVED`).
    Moved(NodeAddr),
    /// The node cannot be reached.
    Unreachable,
    Failed,
}

/// The sharded subscriptions of one relay process.
pub(crate) struct Shards {
    settings: RedisSettings,
    /// The cluster command connection, for `CLUSTER SLOTS`.
    conn: RedisConn,
    pushes: UnboundedSender<Push>,
    owners: Vec<SlotOwner>,
    nodes: HashMap<NodeAddr, (u64, MultiplexedConnection)>,
    next_id: u64,
    /// The connection each subscribed run's channels are on.
    runs: HashMap<RunId, Link>,
}

impl Shards {
    pub(crate) fn new(
        settings: RedisSettings,
        conn: RedisConn,
        pushes: UnboundedSender<Push>,
    ) -> Self {
        Self {
            settings,
            conn,
            pushes,
            owners: Vec::new(),
            nodes: HashMap::new(),
            next_id: 0,
            runs: HashMap::new(),
        }
    }

    /// Reads the slot map again (`CLUSTER SLOTS`, through the cluster connection, which asks
    /// a node that answers). `false` when no node answered.
    pub(crate) async fn refresh(&mut self) -> bool {
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(
            ATTEMPT,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn),
        )
        .await;
        let fallback = self
            .settings
            .nodes
            .first()
            .map(|(h, _)| h.clone())
            .unwrap_or_default();
        match reply {
            Ok(Ok(reply)) => {
                let owners = masters_in_cluster_slots(&reply, &fallback);
                if owners.is_empty() {
                    return false;
                }
                self.owners = owners;
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the cluster's slot map");
                false
            }
            Err(_) => false,
        }
    }

    fn owner_of(&self, channel: &str) -> Option<NodeAddr> {
        master_of(&self.owners, key_slot(channel.as_bytes())).cloned()
    }

    /// Whether `run`'s channels are subscribed on `link`.
    pub(crate) fn is_on(&self, run: &RunId, link: &Link) -> bool {
        self.runs.get(run) == Some(link)
    }

    /// Forgets a run that no client watches any more.
    pub(crate) fn forget(&mut self, run: &RunId) {
        self.runs.remove(run);
    }

    /// A node connection dropped: forgets it and returns the runs that were subscribed on it.
    pub(crate) fn link_down(&mut self, link: &Link) -> Vec<RunId> {
        if self.nodes.get(&link.0).is_some_and(|(id, _)| *id == link.1) {
            self.nodes.remove(&link.0);
        }
        let lost: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, l)| *l == link)
            .map(|(r, _)| r.clone())
            .collect();
        for run in &lost {
            self.runs.remove(run);
        }
        lost
    }

    /// The connection to `node`, opened if needed.
    async fn link(&mut self, node: &NodeAddr) -> Option<(u64, MultiplexedConnection)> {
        if let Some(existing) = self.nodes.get(node) {
            return Some(existing.clone());
        }
        self.next_id += 1;
        let link: Link = (node.clone(), self.next_id);
        let tx = self.pushes.clone();
        let tag = link.clone();
        let opened = tokio::time::timeout(
            ATTEMPT,
            self.settings
                .node_push_connection(&node.0, node.1, move |push: PushInfo| {
                    tx.send((tag.clone(), push))
                }),
        )
        .await;
        match opened {
            Ok(Ok(conn)) => {
                tracing::debug!(node = %format!("{}:{}", node.0, node.1), "opened a sharded Pub/Sub connection");
                self.nodes.insert(node.clone(), (link.1, conn.clone()));
                Some((link.1, conn))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot open a sharded Pub/Sub connection");
                None
            }
            Err(_) => None,
        }
    }

    /// Sends `command` (`SSUBSCRIBE` or `SUNSUBSCRIBE`) for each channel, one per command, in
    /// one pipeline, to `node`.
    async fn attempt(
        &mut self,
        node: &NodeAddr,
        command: &str,
        channels: &[String],
    ) -> (Attempt, u64) {
        let Some((id, mut conn)) = self.link(node).await else {
            return (Attempt::Unreachable, 0);
        };
        let mut pipe = redis::pipe();
        for c in channels {
            pipe.cmd(command).arg(c);
        }
        let replies =
            match tokio::time::timeout(ATTEMPT, conn.req_packed_commands(&pipe, 0, channels.len()))
                .await
            {
                Ok(Ok(replies)) => replies,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, command, "a sharded Pub/Sub command failed");
                    let attempt = if e.is_unrecoverable_error() || e.is_connection_dropped() {
                        Attempt::Unreachable
                    } else {
                        Attempt::Failed
                    };
                    return (attempt, id);
                }
                Err(_) => return (Attempt::Failed, id),
            };
        let confirmation = if command == "SSUBSCRIBE" {
            PushKind::SSubscribe
        } else {
            PushKind::SUnsubscribe
        };
        for reply in replies {
            match reply {
                Value::Push { kind, .. } if kind == confirmation => {}
                Value::ServerError(e) if e.code() == "MOVED" => {
                    return match e.details().and_then(moved_to) {
                        Some(to) => (Attempt::Moved(to), id),
                        None => (Attempt::Failed, id),
                    };
                }
                other => {
                    // An error, or another push taken for the reply (a `sunsubscribe` the
                    // server sent at the same moment): try again later.
                    tracing::debug!(reply = ?other, command, "unexpected reply to a sharded Pub/Sub command");
                    return (Attempt::Failed, id);
                }
            }
        }
        (Attempt::Done, id)
    }

    /// Subscribes more channels of `run` (a new feed, or a new variation) where the run's
    /// channels are, or at its slot's master. `false`: not done; the caller has the run
    /// repaired.
    pub(crate) async fn subscribe(&mut self, run: &RunId, channels: &[String]) -> bool {
        let Some(first) = channels.first() else {
            return true;
        };
        let mut node = match self.runs.get(run) {
            Some((node, _)) => node.clone(),
            None => {
                if self.owners.is_empty() {
                    self.refresh().await;
                }
                match self.owner_of(first) {
                    Some(node) => node,
                    None => return false,
                }
            }
        };
        let assigned = self.runs.contains_key(run);
        for _ in 0..=MAX_REDIRECTS {
            match self.attempt(&node, "SSUBSCRIBE", channels).await {
                (Attempt::Done, id) => {
                    self.runs.insert(run.clone(), (node, id));
                    return true;
                }
                // A run with nothing subscribed yet simply goes where the slot is; one with
                // channels elsewhere is moved as a whole by the repair.
                (Attempt::Moved(to), _) if !assigned => node = to,
                _ => return false,
            }
        }
        false
    }

    /// Unsubscribes channels of `run`; `last`: the run has no channel left subscribed.
    pub(crate) async fn unsubscribe(&mut self, run: &RunId, channels: &[String], last: bool) {
        let Some((node, id)) = self.runs.get(run).cloned() else {
            return;
        };
        if self
            .nodes
            .get(&node)
            .is_some_and(|(current, _)| *current == id)
        {
            let _ = self.attempt(&node, "SUNSUBSCRIBE", channels).await;
        }
        if last {
            self.runs.remove(run);
        }
    }

    /// Moves every channel of `run` (`channels`) to the master that serves the run's slot
    /// now: unsubscribes them where they were if that connection still stands, then
    /// subscribes them on the master, following `MOVED`. `false`: not yet (the master is not
    /// reachable, or not known yet); try again later. Nodes found unreachable are added to
    /// `unreachable` and not tried again by the caller's other runs in the same round.
    pub(crate) async fn resubscribe(
        &mut self,
        run: &RunId,
        channels: &[String],
        unreachable: &mut HashSet<NodeAddr>,
    ) -> bool {
        let Some(mut target) = channels.first().and_then(|c| self.owner_of(c)) else {
            return false;
        };
        if let Some((old, id)) = self.runs.get(run).cloned()
            && old != target
            && self
                .nodes
                .get(&old)
                .is_some_and(|(current, _)| *current == id)
        {
            // Off the old node first, so that the run is never subscribed twice (`MOVED`: that
            // node serves the slot no more, and dropped its subscriptions when it stopped).
            if !matches!(
                self.attempt(&old, "SUNSUBSCRIBE", channels).await.0,
                Attempt::Done | Attempt::Moved(_)
            ) {
                return false;
            }
        }
        self.runs.remove(run);
        for _ in 0..=MAX_REDIRECTS {
            if unreachable.contains(&target) {
                return false;
            }
            match self.attempt(&target, "SSUBSCRIBE", channels).await {
                (Attempt::Done, id) => {
                    self.runs.insert(run.clone(), (target, id));
                    return true;
                }
                (Attempt::Moved(to), _) => target = to,
                (Attempt::Unreachable, _) => {
                    unreachable.insert(target);
                    return false;
                }
                (Attempt::Failed, _) => return false,
            }
        }
        false
    }
}

/// The node of a `MOVED` error's details (`SLOT HOST:PORT`).
fn moved_to(details: &str) -> Option<NodeAddr> {
    let addr = details.split_whitespace().nth(1)?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_names_the_node_that_serves_the_slot() {
        assert_eq!(
            moved_to("3999 127.0.0.1:6381"),
            Some(("127.0.0.1".into(), 6381))
        );
        assert_eq!(moved_to("3999 [::1]:6381"), Some(("::1".into(), 6381)));
        assert_eq!(moved_to("3999"), None);
        assert_eq!(moved_to("3999 host:port"), None);
    }
}
