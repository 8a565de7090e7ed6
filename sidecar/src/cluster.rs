//! Redis Cluster as its clients see it: the slot a key hashes to, and which primary serves each
//! slot, as the cluster describes itself (`CLUSTER SHARDS`, Redis 7.0 and later, or
//! `CLUSTER SLOTS` before it).

use std::ops::RangeInclusive;

use redis_protocol::resp2::types::BytesFrame;

/// The slots of every Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `CLUSTER KEYSLOT`: CRC16 (XMODEM) of the key, or of its `{tag}` when it has a non-empty one.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)])
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// One primary and the slots it serves, with its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub slots: Vec<RangeInclusive<u16>>,
    /// `host:port` as the cluster announces it to clients.
    pub primary: String,
    /// The replicas the cluster does not report failed, `host:port`.
    pub replicas: Vec<String>,
}

/// Which primary serves which slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub shards: Vec<Shard>,
}

/// A reply that does not describe a cluster the way Redis documents it.
#[derive(Debug, thiserror::Error)]
#[error("unexpected CLUSTER {command} reply: {reason}")]
pub struct TopologyError {
    command: &'static str,
    reason: String,
}

impl Topology {
    /// From `CLUSTER SHARDS` (RESP2): per shard, a flat map with `slots` (a flat list of range
    /// bounds) and `nodes` (each a flat map with `endpoint`, `ip`, `port` or `tls-port`, `role`
    /// and `health`). A shard without a primary (its slots lost) is left out, as are failed
    /// replicas (Redis 7.0 calls a replica `loading` until its primary has taken a write, so
    /// that is not a failure).
    pub fn from_shards(reply: &BytesFrame) -> Result<Topology, TopologyError> {
        let error = |reason: String| TopologyError { command: "SHARDS", reason };
        let mut shards = Vec::new();
        for shard in array(reply).ok_or_else(|| error("not an array".into()))? {
            let (mut slots, mut primary, mut replicas) = (Vec::new(), None, Vec::new());
            for (field, value) in pairs(shard).ok_or_else(|| error("a shard is not a map".into()))? {
                match field {
                    b"slots" => {
                        let bounds = array(value).ok_or_else(|| error("slots is not an array".into()))?;
                        for range in bounds.chunks(2) {
                            let [start, end] = range else { return Err(error("an odd slot range".into())) };
                            slots.push(
                                slot(start).ok_or_else(|| error(format!("slot {start:?}")))?
                                    ..=slot(end).ok_or_else(|| error(format!("slot {end:?}")))?,
                            );
                        }
                    }
                    b"nodes" => {
                        for node in array(value).ok_or_else(|| error("nodes is not an array".into()))? {
                            let node = Node::from_fields(node).ok_or_else(|| error(format!("node {node:?}")))?;
                            match (node.role, node.health) {
                                (b"master", _) => primary = Some(node.address),
                                (_, b"fail") => {}
                                _ => replicas.push(node.address),
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(primary) = primary.filter(|_| !slots.is_empty()) {
                shards.push(Shard { slots, primary, replicas });
            }
        }
        Ok(Topology { shards })
    }

    /// From `CLUSTER SLOTS`: per slot range `[start, end, primary, replica…]`, each node
    /// `[host, port, id, …]`. A primary serving several ranges is one shard.
    pub fn from_slots(reply: &BytesFrame) -> Result<Topology, TopologyError> {
        let error = |reason: String| TopologyError { command: "SLOTS", reason };
        let mut topology = Topology::default();
        for range in array(reply).ok_or_else(|| error("not an array".into()))? {
            let fields = array(range).ok_or_else(|| error("a range is not an array".into()))?;
            let [start, end, primary, replicas @ ..] = fields else {
                return Err(error(format!("range {fields:?}")));
            };
            let (start, end) = (slot(start), slot(end));
            let slots = start.zip(end).map(|(start, end)| start..=end).ok_or_else(|| error(format!("{fields:?}")))?;
            let primary = slots_node(primary).ok_or_else(|| error(format!("node {primary:?}")))?;
            let replicas = replicas.iter().map(|node| slots_node(node).ok_or_else(|| error(format!("node {node:?}"))));
            match topology.shards.iter_mut().find(|shard| shard.primary == primary) {
                Some(shard) => shard.slots.push(slots),
                None => {
                    let replicas = replicas.collect::<Result<_, _>>()?;
                    topology.shards.push(Shard { slots: vec![slots], primary, replicas });
                }
            }
        }
        Ok(topology)
    }

    /// How many of the [`SLOTS`] some primary serves.
    pub fn slots_covered(&self) -> u32 {
        let ranges = self.shards.iter().flat_map(|shard| &shard.slots);
        ranges.map(|range| u32::from(range.end().saturating_sub(*range.start())) + 1).sum()
    }
}

/// One node of a `CLUSTER SHARDS` shard.
struct Node<'a> {
    address: String,
    role: &'a [u8],
    health: &'a [u8],
}

impl<'a> Node<'a> {
    fn from_fields(node: &'a BytesFrame) -> Option<Node<'a>> {
        let (mut endpoint, mut ip, mut port, mut role, mut health) = (None, None, None, None, None);
        for (field, value) in pairs(node)? {
            match field {
                b"endpoint" => endpoint = text(value),
                b"ip" => ip = text(value),
                // A TLS cluster announces `tls-port` (and `port` only if it also serves plain).
                b"port" | b"tls-port" => port = port.or(integer(value)),
                b"role" => role = bytes(value),
                b"health" => health = bytes(value),
                _ => {}
            }
        }
        // `endpoint` is what the cluster tells clients to use; `?` or empty when unknown.
        let host = endpoint.filter(|host| !host.is_empty() && *host != "?").or(ip)?;
        Some(Node { address: format!("{host}:{}", port?), role: role?, health: health.unwrap_or(b"online") })
    }
}

/// A `CLUSTER SLOTS` node: `[host, port, …]`.
fn slots_node(node: &BytesFrame) -> Option<String> {
    let [host, port, ..] = array(node)? else { return None };
    Some(format!("{}:{}", text(host)?, integer(port)?))
}

fn array(frame: &BytesFrame) -> Option<&[BytesFrame]> {
    match frame {
        BytesFrame::Array(items) => Some(items),
        _ => None,
    }
}

/// A RESP2 map: an array of field, value, field, value….
fn pairs(frame: &BytesFrame) -> Option<impl Iterator<Item = (&[u8], &BytesFrame)>> {
    let items = array(frame)?;
    Some(items.chunks_exact(2).filter_map(|pair| Some((bytes(&pair[0])?, &pair[1]))))
}

fn bytes(frame: &BytesFrame) -> Option<&[u8]> {
    match frame {
        BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => Some(bytes),
        _ => None,
    }
}

fn text(frame: &BytesFrame) -> Option<&str> {
    std::str::from_utf8(bytes(frame)?).ok()
}

fn integer(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn slot(frame: &BytesFrame) -> Option<u16> {
    integer(frame).and_then(|n| u16::try_from(n).ok()).filter(|&slot| slot < SLOTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> BytesFrame {
        BytesFrame::BulkString(text.as_bytes().to_vec().into())
    }

    fn map(fields: Vec<(&str, BytesFrame)>) -> BytesFrame {
        BytesFrame::Array(fields.into_iter().flat_map(|(name, value)| [bulk(name), value]).collect())
    }

    fn node(port: i64, role: &str, health: &str) -> BytesFrame {
        map(vec![
            ("id", bulk("e0a0")),
            ("port", BytesFrame::Integer(port)),
            ("ip", bulk("10.0.0.1")),
            ("endpoint", bulk("redis-0.example")),
            ("role", bulk(role)),
            ("replication-offset", BytesFrame::Integer(72156)),
            ("health", bulk(health)),
        ])
    }

    #[test]
    fn slots_match_redis_cluster() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"somekey"), 11058);
        assert_eq!(hash_slot(b"user:1000"), 1649);
        assert_eq!(hash_slot(b"{user:1000}:cart"), hash_slot(b"user:1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"), "the tag ends at the first }}");
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"), "the first tag counts");
    }

    #[test]
    fn shards_give_each_primary_its_ranges_and_its_replicas_but_failed_ones() {
        let reply = BytesFrame::Array(vec![
            map(vec![
                (
                    "slots",
                    BytesFrame::Array(vec![BytesFrame::Integer(0), BytesFrame::Integer(99), bulk("200"), bulk("300")]),
                ),
                ("nodes", BytesFrame::Array(vec![node(7001, "replica", "loading"), node(7000, "master", "online")])),
            ]),
            map(vec![
                ("slots", BytesFrame::Array(vec![BytesFrame::Integer(100), BytesFrame::Integer(199)])),
                ("nodes", BytesFrame::Array(vec![node(7002, "master", "online"), node(7003, "replica", "fail")])),
            ]),
            // A shard whose primary is gone: its slots are nobody's.
            map(vec![
                ("slots", BytesFrame::Array(vec![BytesFrame::Integer(301), BytesFrame::Integer(16383)])),
                ("nodes", BytesFrame::Array(vec![node(7004, "replica", "fail")])),
            ]),
        ]);
        let topology = Topology::from_shards(&reply).unwrap();
        let expected = [
            Shard {
                slots: vec![0..=99, 200..=300],
                primary: "redis-0.example:7000".into(),
                replicas: vec!["redis-0.example:7001".into()],
            },
            Shard { slots: vec![100..=199], primary: "redis-0.example:7002".into(), replicas: vec![] },
        ];
        assert_eq!(topology.shards, expected);
        assert_eq!(topology.slots_covered(), 100 + 101 + 100);
    }

    #[test]
    fn an_unknown_endpoint_falls_back_to_the_ip() {
        let node = map(vec![
            ("port", BytesFrame::Integer(6379)),
            ("ip", bulk("10.0.0.7")),
            ("endpoint", bulk("?")),
            ("role", bulk("master")),
        ]);
        assert_eq!(Node::from_fields(&node).unwrap().address, "10.0.0.7:6379");
    }

    #[test]
    fn slots_group_a_primarys_ranges_into_one_shard() {
        let node = |port: i64| BytesFrame::Array(vec![bulk("127.0.0.1"), BytesFrame::Integer(port), bulk("id")]);
        let range = |start: i64, end: i64, nodes: Vec<BytesFrame>| {
            BytesFrame::Array([vec![BytesFrame::Integer(start), BytesFrame::Integer(end)], nodes].concat())
        };
        let reply = BytesFrame::Array(vec![
            range(0, 5460, vec![node(7000), node(7003)]),
            range(5461, 10922, vec![node(7001)]),
            range(10923, 16383, vec![node(7000), node(7003)]),
        ]);
        let topology = Topology::from_slots(&reply).unwrap();
        assert_eq!(topology.shards.len(), 2);
        assert_eq!(topology.shards[0].slots, [0..=5460, 10923..=16383]);
        assert_eq!(topology.shards[0].replicas, ["127.0.0.1:7003"]);
        assert_eq!(topology.slots_covered(), u32::from(SLOTS));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for reply in [
            bulk("not a cluster"),
            BytesFrame::Array(vec![bulk("x")]),
            BytesFrame::Array(vec![map(vec![("slots", BytesFrame::Array(vec![BytesFrame::Integer(1)]))])]),
            BytesFrame::Array(vec![map(vec![(
                "slots",
                BytesFrame::Array(vec![BytesFrame::Integer(0), BytesFrame::Integer(16384)]),
            )])]),
        ] {
            assert!(Topology::from_shards(&reply).is_err(), "{reply:?}");
            assert!(Topology::from_slots(&reply).is_err(), "{reply:?}");
        }
    }
}
