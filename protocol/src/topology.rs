//! The data nodes behind a set of Redis settings: every master and every replica.
//!
//! Redis replicates data but not ACL users: a user made on a master is unknown to its
//! replicas (and a promoted replica refuses it) and to the other masters of a cluster. What
//! must exist on every node (the per-run users) is made on each node this module lists:
//! standalone, the server and the replicas its `INFO replication` names; Sentinel, the current
//! master and its replicas; Cluster, every node of `CLUSTER NODES` that is not failed.

use crate::settings::{RedisConn, RedisMode, RedisSettings, SettingsError};

/// One Redis server: `host:port`.
pub type NodeAddr = (String, u16);

/// Replicas named by an `INFO replication` answer (`slaveN:ip=...,port=...,state=online,...`).
pub fn replicas_in_info(info: &str) -> Vec<NodeAddr> {
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("ip="))
        .filter_map(|l| {
            let fields = l.split_once(':')?.1;
            let mut ip = None;
            let mut port = None;
            for kv in fields.split(',') {
                match kv.split_once('=') {
                    Some(("ip", v)) => ip = Some(v.to_owned()),
                    Some(("port", v)) => port = v.parse().ok(),
                    _ => {}
                }
            }
            Some((ip?, port?))
        })
        .collect()
}

/// Nodes of a `CLUSTER NODES` answer that serve data (masters and replicas, not failed, not
/// in handshake, with an address).
pub fn nodes_in_cluster_nodes(text: &str) -> Vec<NodeAddr> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let _id = parts.next()?;
            let addr = parts.next()?;
            let flags = parts.next()?;
            if flags
                .split(',')
                .any(|f| matches!(f, "fail" | "handshake" | "noaddr"))
            {
                return None;
            }
            let hostport = addr.split('@').next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port: u16 = port.parse().ok()?;
            (port != 0).then(|| (host.to_owned(), port))
        })
        .collect()
}

/// Every data node behind `settings`, through `conn` (a connection made from them).
pub async fn data_nodes(
    settings: &RedisSettings,
    conn: &mut RedisConn,
) -> Result<Vec<NodeAddr>, redis::RedisError> {
    let mut nodes = match settings.mode {
        RedisMode::Cluster => {
            let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
            nodes_in_cluster_nodes(&text)
        }
        RedisMode::Standalone | RedisMode::Sentinel { .. } => {
            let master = match (&settings.mode, conn.current_master()) {
                (RedisMode::Sentinel { .. }, Some(addr)) => addr,
                _ => settings.nodes.first().cloned().unwrap_or_default(),
            };
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(conn)
                .await?;
            let mut nodes = vec![master];
            nodes.extend(replicas_in_info(&info));
            nodes
        }
    };
    nodes.sort();
    nodes.dedup();
    Ok(nodes)
}

/// The hash slot of a key or sharded channel in a Redis Cluster: CRC16 (XMODEM) of its hash
/// tag (the text between the first `{` and the next `}`, when not empty) or of the whole name,
/// modulo 16384. Every key and channel of a run has the tag `{RUN}`, so one slot.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Slots `start..=end` and the master that serves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotOwner {
    pub start: u16,
    pub end: u16,
    pub master: NodeAddr,
}

/// The masters of a `CLUSTER SLOTS` answer, by slot range. A master whose address the node
/// did not know (an empty host) is named with `fallback_host`, as Redis documents.
pub fn masters_in_cluster_slots(reply: &redis::Value, fallback_host: &str) -> Vec<SlotOwner> {
    use redis::Value;
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let int = |v: &Value| -> Option<u16> {
        match v {
            Value::Int(i) => u16::try_from(*i).ok(),
            other => text(other)?.parse().ok(),
        }
    };
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let Value::Array(master) = parts.get(2)? else {
                return None;
            };
            let host = text(master.first()?)?;
            let host = if host.is_empty() || host == "?" {
                fallback_host.to_owned()
            } else {
                host
            };
            Some(SlotOwner {
                start: int(parts.first()?)?,
                end: int(parts.get(1)?)?,
                master: (host, int(master.get(1)?)?),
            })
        })
        .collect()
}

/// The master that serves `slot`, if the map has one.
pub fn master_of(owners: &[SlotOwner], slot: u16) -> Option<&NodeAddr> {
    owners
        .iter()
        .find(|o| (o.start..=o.end).contains(&slot))
        .map(|o| &o.master)
}

impl RedisSettings {
    /// The same credentials and TLS settings, for one node on its own (standalone).
    pub fn for_node(&self, (host, port): &NodeAddr) -> RedisSettings {
        let mut s = self.clone();
        s.mode = RedisMode::Standalone;
        s.nodes = vec![(host.clone(), *port)];
        s
    }

    /// Connects to one node of these settings directly.
    pub async fn connect_node(&self, node: &NodeAddr) -> Result<RedisConn, SettingsError> {
        self.for_node(node).connect().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_come_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=10.0.0.2,port=6380,state=online,offset=42,lag=0\r\n\
            slave1:ip=10.0.0.3,port=6381,state=wait_bgsave,offset=0,lag=1\r\n\
            master_failover_state:no-failover\r\n";
        assert_eq!(
            replicas_in_info(info),
            vec![("10.0.0.2".into(), 6380), ("10.0.0.3".into(), 6381)]
        );
        assert!(replicas_in_info("role:slave\r\nmaster_host:x\r\n").is_empty());
    }

    #[test]
    fn key_slots_match_redis_cluster_keyslot() {
        // Values of `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"run:{r1}:status"), 2121);
        assert_eq!(key_slot(b"r1"), 2121);
        assert_eq!(key_slot(b"run:{r1}:output:a"), key_slot(b"run:{r1}:state"));
        // An empty tag does not count: the whole name is hashed.
        assert_eq!(key_slot(b"a{}b"), 13694);
    }

    #[test]
    fn cluster_slots_name_each_range_master() {
        use redis::Value;
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::BulkString(h.as_bytes().to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let owners = masters_in_cluster_slots(&reply, "seed");
        assert_eq!(
            owners,
            vec![
                SlotOwner {
                    start: 0,
                    end: 5460,
                    master: ("10.0.0.1".into(), 7000)
                },
                SlotOwner {
                    start: 5461,
                    end: 16383,
                    master: ("seed".into(), 7001)
                },
            ]
        );
        assert_eq!(master_of(&owners, 6000), Some(&("seed".into(), 7001)));
        assert_eq!(master_of(&[], 1), None);
    }

    #[test]
    fn cluster_nodes_skip_failed_and_handshaking_ones() {
        let text = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:30002@40002 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:30004@40004 slave a1 0 0 1 connected
d4 127.0.0.1:30005@40005 slave,fail b2 0 0 2 disconnected
e5 :0@0 master,noaddr - 0 0 0 disconnected
f6 127.0.0.1:30006@40006 handshake - 0 0 0 connected
g7 [::1]:30007@40007 slave b2 0 0 2 connected
";
        assert_eq!(
            nodes_in_cluster_nodes(text),
            vec![
                ("127.0.0.1".into(), 30001),
                ("127.0.0.1".into(), 30002),
                ("127.0.0.1".into(), 30004),
                ("::1".into(), 30007),
            ]
        );
    }
}
