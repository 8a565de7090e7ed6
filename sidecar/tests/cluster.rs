//! Redis Cluster's shape as Eden reads it, against a real cluster (3 primaries, 3 replicas):
//! the slot of a key as the cluster computes it, and its topology from both descriptions.

use std::time::Duration;

use eden_e2e::RedisCluster;
use eden_sidecar::cluster::{SLOTS, Topology, hash_slot};
use eden_sidecar::conversation::Conversation;
use eden_sidecar::upstream::{Server, TlsSettings, Upstream};
use redis_protocol::resp2::types::BytesFrame;
use support::eventually;

mod support;

async fn conversation(url: &str) -> Conversation {
    let server = Server::parse(url, TlsSettings::default()).unwrap();
    Conversation::open(&Upstream::to(&server, Duration::from_secs(5)).unwrap()).await.unwrap()
}

#[tokio::test]
async fn slots_and_topology_are_the_clusters_own() {
    let cluster = RedisCluster::start(3, 1).unwrap();
    let mut node = conversation(&cluster.url()).await;

    // Keys with and without hash tags, empty tags, nested braces and non-UTF-8 bytes.
    let keys = (0..2000u32).map(|i| match i % 4 {
        0 => format!("key:{i}").into_bytes(),
        1 => format!("{{user:{}}}:cart:{i}", i / 7).into_bytes(),
        2 => format!("a{{}}{{b{i}}}{{{{c}}").into_bytes(),
        _ => [b"\xff\x00".as_slice(), &i.to_be_bytes()].concat(),
    });
    for key in keys {
        let BytesFrame::Integer(slot) = node.ask(&[b"CLUSTER", b"KEYSLOT", &key]).await.unwrap() else { panic!() };
        assert_eq!(i64::from(hash_slot(&key)), slot, "{:?}", String::from_utf8_lossy(&key));
    }

    let reply = node.ask(&[b"CLUSTER", b"SHARDS"]).await.unwrap();
    eprintln!("{reply:?}");
    let shards = Topology::from_shards(&node.ask(&[b"CLUSTER", b"SHARDS"]).await.unwrap()).unwrap();
    let mut expected: Vec<_> = cluster.primaries().iter().map(|node| node.addr().to_string()).collect();
    expected.sort();
    let primaries = |topology: &Topology| {
        let mut primaries: Vec<_> = topology.shards.iter().map(|shard| shard.primary.clone()).collect();
        primaries.sort();
        primaries
    };
    assert_eq!(primaries(&shards), expected);
    assert_eq!(shards.slots_covered(), u32::from(SLOTS));
    assert!(shards.shards.iter().all(|shard| shard.replicas.len() == 1), "{shards:?}");

    // CLUSTER SLOTS leaves out a replica that has not replicated anything yet: one write each.
    for shard in &shards.shards {
        let key =
            (0..).map(|i| format!("k{i}")).find(|key| shard.slots[0].contains(&hash_slot(key.as_bytes()))).unwrap();
        let mut primary = conversation(&format!("redis://{}", shard.primary)).await;
        primary.ask(&[b"SET", key.as_bytes(), b"v"]).await.unwrap();
        assert_eq!(primary.ask(&[b"WAIT", b"1", b"5000"]).await.unwrap(), BytesFrame::Integer(1));
    }
    let slots = || async {
        let reply = conversation(&cluster.url()).await.ask(&[b"CLUSTER", b"SLOTS"]).await.unwrap();
        Topology::from_slots(&reply).unwrap()
    };
    // Learnt by gossip, each node's view of its replicas' offsets.
    eventually("every replica listed", || async { slots().await.shards.iter().all(|s| s.replicas.len() == 1) }).await;
    let slots = slots().await;
    assert_eq!(primaries(&slots), expected);
    assert_eq!(slots.slots_covered(), u32::from(SLOTS));
    for shard in &slots.shards {
        let described = shards.shards.iter().find(|other| other.primary == shard.primary).unwrap();
        assert_eq!((&shard.slots, &shard.replicas), (&described.slots, &described.replicas));
    }
}
