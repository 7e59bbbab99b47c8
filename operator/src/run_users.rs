//! The runs' Redis users and agentrun's Redis functions, on every data node.
//!
//! Redis keeps ACL users in memory, per server, and replicates data but not users. A run's
//! user is therefore made on every master and replica that [`data_nodes`] lists (so that a
//! replica promoted by Sentinel or by a cluster failover already knows it), and made again on
//! a node that restarts (its `run_id` changes) or joins. The watcher looks every second.
//!
//! Functions are data: a master replicates them to its replicas, but a master that restarts
//! without persistence has none, and in Redis Cluster each shard needs its own copy. The
//! watcher loads the library on every node it sees start or join (a replica refuses with
//! `READONLY` and gets it from its master).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentrun_protocol::topology::{NodeAddr, data_nodes};
use agentrun_protocol::{RedisConn, RedisSettings, RunId};
use agentrun_protocol::{acl, functions};
use tokio::sync::Mutex;

/// How often nodes are listed and their restarts looked for.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

struct Node {
    conn: RedisConn,
    /// The server's `run_id` when its users were last made.
    server: Option<String>,
}

/// Users of the runs this operator knows, and the nodes they live on.
#[derive(Clone)]
pub struct RunUsers {
    settings: RedisSettings,
    conn: RedisConn,
    /// Run id → password of every unfinished run with a user.
    known: Arc<std::sync::Mutex<HashMap<String, String>>>,
    nodes: Arc<Mutex<HashMap<NodeAddr, Node>>>,
}

/// What went wrong on which nodes.
#[derive(Debug)]
pub struct NodeErrors(pub Vec<(NodeAddr, String)>);

impl std::fmt::Display for NodeErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, ((host, port), e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{host}:{port}: {e}")?;
        }
        Ok(())
    }
}

impl RunUsers {
    /// Starts watching the nodes behind `settings` (through `conn`, made from them).
    pub fn start(settings: RedisSettings, conn: RedisConn) -> Self {
        let users = RunUsers {
            settings,
            conn,
            known: Default::default(),
            nodes: Default::default(),
        };
        tokio::spawn(users.clone().watch());
        users
    }

    /// Makes (or updates) a run's user on every data node.
    pub async fn ensure(&self, run: &RunId, password: &str) -> Result<(), NodeErrors> {
        if let Ok(mut k) = self.known.lock() {
            k.insert(run.as_str().to_owned(), password.to_owned());
        }
        self.on_every_node(|mut conn| {
            let (run, password) = (run.clone(), password.to_owned());
            async move {
                acl::ensure_run_user(&mut conn, &run, &password)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await
    }

    /// Deletes a run's user from every data node.
    pub async fn delete(&self, run: &RunId) -> Result<(), NodeErrors> {
        if let Ok(mut k) = self.known.lock() {
            k.remove(run.as_str());
        }
        self.on_every_node(|mut conn| {
            let run = run.clone();
            async move {
                acl::delete_run_user(&mut conn, &run)
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await
    }

    async fn on_every_node<F, Fut>(&self, f: F) -> Result<(), NodeErrors>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let addrs = self.refresh().await.map_err(|e| {
            NodeErrors(vec![(
                (self.settings.target(), 0),
                format!("cannot list the nodes: {e}"),
            )])
        })?;
        let mut errors = Vec::new();
        for addr in addrs {
            let conn = self.nodes.lock().await.get(&addr).map(|n| n.conn.clone());
            let result = match conn {
                Some(conn) => f(conn).await,
                None => Err("not connected".to_owned()),
            };
            if let Err(e) = result {
                errors.push((addr, e));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(NodeErrors(errors))
        }
    }

    /// Lists the data nodes and connects to new ones; forgets nodes that are gone.
    async fn refresh(&self) -> Result<Vec<NodeAddr>, String> {
        let mut conn = self.conn.clone();
        let addrs = data_nodes(&self.settings, &mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut nodes = self.nodes.lock().await;
        nodes.retain(|a, _| addrs.contains(a));
        for addr in &addrs {
            if nodes.contains_key(addr) {
                continue;
            }
            match self.settings.connect_node(addr).await {
                Ok(conn) => {
                    nodes.insert(addr.clone(), Node { conn, server: None });
                }
                Err(e) => {
                    tracing::warn!(node = %format!("{}:{}", addr.0, addr.1), error = %e, "cannot connect to a Redis node to make the runs' users there")
                }
            }
        }
        Ok(addrs)
    }

    /// Loads the functions and makes every known user again on nodes that restarted or joined.
    async fn watch(self) {
        // The first tick is at once: a new operator loads the functions before it starts a run.
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh().await {
                tracing::debug!(error = %e, "cannot list the Redis nodes");
                continue;
            }
            let mut nodes = self.nodes.lock().await;
            for (addr, node) in nodes.iter_mut() {
                let info: Result<String, _> = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut node.conn)
                    .await;
                let Ok(info) = info else { continue };
                let server = info
                    .lines()
                    .find_map(|l| l.strip_prefix("run_id:"))
                    .map(|s| s.trim().to_owned());
                if server.is_none() || server == node.server {
                    continue;
                }
                let functions_loaded = match functions::load_library(&mut node.conn).await {
                    Ok(()) => true,
                    Err(e) if e.code() == Some("READONLY") => true,
                    Err(e) => {
                        tracing::warn!(node = %format!("{}:{}", addr.0, addr.1), error = %e, "could not load agentrun's Redis functions on a node");
                        false
                    }
                };
                let users: Vec<(String, String)> = self
                    .known
                    .lock()
                    .map(|k| k.iter().map(|(r, p)| (r.clone(), p.clone())).collect())
                    .unwrap_or_default();
                if node.server.is_some() || !users.is_empty() {
                    tracing::info!(node = %format!("{}:{}", addr.0, addr.1), users = users.len(), "a Redis node restarted or joined; making the runs' users there");
                }
                let mut all_made = functions_loaded;
                for (run_id, password) in users {
                    let Ok(run) = RunId::new(run_id.clone()) else {
                        continue;
                    };
                    if let Err(e) = acl::ensure_run_user(&mut node.conn, &run, &password).await {
                        all_made = false;
                        tracing::warn!(run_id = %run_id, error = %e, "could not make the run's Redis user on a node");
                    }
                }
                if all_made {
                    node.server = server;
                }
            }
        }
    }
}
