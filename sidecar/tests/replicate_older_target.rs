//! A target older than the source refuses the source's DUMP payloads (a newer RDB version). Both
//! modes then rebuild each value with ordinary commands and still end at 0 differences; a stream,
//! which has no faithful command form, stops the run with an error naming the key.
//!
//! The older server is the real target behind a relay that raises the RDB version in every
//! RESTORE payload, with a matching CRC: exactly what a newer source's DUMP looks like to it.

mod support_replicate;

use bytes::{BufMut, BytesMut};
use crc::{CRC_64_REDIS, Crc};
use eden_sidecar::replicate::{Mode, Replicator, ReplicatorOptions};
use redis::AsyncCommands;
use redis_protocol::resp2::types::BytesFrame;
use support_replicate::{Pair, assert_clean, caught_up, relay, server};

/// The target behind a relay that rewrites RESTORE payloads on the way.
async fn older_server(upstream: String) -> String {
    relay(upstream, from_a_newer_server).await
}

/// A RESTORE whose payload claims RDB version 65535; any other command unchanged.
fn from_a_newer_server(frame: BytesFrame) -> BytesFrame {
    let BytesFrame::Array(mut args) = frame else { return frame };
    let is_restore =
        matches!(args.first(), Some(BytesFrame::BulkString(name)) if name.eq_ignore_ascii_case(b"RESTORE"));
    if let (true, Some(BytesFrame::BulkString(payload))) = (is_restore, args.get(3)) {
        let body = &payload[..payload.len() - 10];
        let mut newer = BytesMut::from(body);
        newer.put_u16_le(u16::MAX);
        let crc = Crc::<u64>::new(&CRC_64_REDIS).checksum(&newer);
        newer.put_u64_le(crc);
        args[3] = BytesFrame::BulkString(newer.freeze());
    }
    BytesFrame::Array(args)
}

/// Every type but streams, in the encodings a small and a larger value get (listpack and
/// quicklist/hashtable/skiplist, intset and plain set), with and without expiries.
async fn seed_rebuildable(pair: &Pair) {
    let mut con = pair.source().await;
    let many: Vec<String> = (0..300).map(|i| format!("element {i}")).collect();
    let mut p = redis::pipe();
    p.set("str", "hello")
        .set("int", 12345)
        .set(b"bin\x00\xffkey".as_slice(), b"\x00\x01\xfe\xff".as_slice())
        .set_ex("ttl:str", "soon", 300)
        .rpush("list", &["a", "b", "c", "a"])
        .rpush("list:long", &many)
        .hset_multiple("hash", &[("f1", "v1"), ("f2", "v2")])
        .pexpire("hash", 600_000)
        .hset_multiple("hash:long", &many.iter().map(|m| (m.as_str(), m.as_str())).collect::<Vec<_>>())
        .sadd("set", &["x", "y", "z"])
        .sadd("set:ints", &[1, 2, 3])
        .sadd("set:long", &many)
        .zadd_multiple("zset", &[(1.5, "one"), (-2.0, "two"), (f64::INFINITY, "inf")])
        .zadd_multiple(
            "zset:long",
            &many.iter().enumerate().map(|(i, m)| (i as f64 / 3.0, m.as_str())).collect::<Vec<_>>(),
        );
    p.exec_async(&mut con).await.expect("seed");
}

async fn start(pair: &Pair, target: &str, mode: Mode) -> Result<Replicator, String> {
    Replicator::start(&pair.source_as, &server(target), mode, ReplicatorOptions::default(), None)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_rebuild_what_an_older_target_cannot_restore() {
    for mode in [Mode::Sync, Mode::Scan] {
        let pair = Pair::start();
        seed_rebuildable(&pair).await;
        let older = older_server(pair.target.addr().to_string()).await;
        let mut replicator = start(&pair, &older, mode).await.unwrap();
        caught_up(&mut replicator).await;
        // Live writes still flow once the copy is done.
        let _: () = pair.source().await.rpush("list", "after").await.unwrap();
        caught_up(&mut replicator).await;
        replicator.stop().await.unwrap();
        let report = pair.verify().await;
        assert_eq!(report.checked, 13, "{mode}");
        assert_clean(&report);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_an_older_target_cannot_restore_stops_the_run_naming_the_key() {
    for mode in [Mode::Sync, Mode::Scan] {
        let pair = Pair::start();
        let xadd = redis::cmd("XADD").arg(&["events", "1-1", "k", "v"]).clone();
        let _: String = xadd.query_async(&mut pair.source().await).await.unwrap();
        let older = older_server(pair.target.addr().to_string()).await;
        let mut replicator = start(&pair, &older, mode).await.unwrap();
        let stopped = replicator.caught_up(std::time::Duration::from_secs(30)).await;
        let err = stopped.expect_err("the run stops").to_string();
        assert!(err.contains("key events") && err.contains("at least as new as the source"), "{mode}: {err}");
    }
}
