//! Values past the big-value threshold, in both modes: copied in pieces into a temporary key and
//! renamed over their key, exact for every type, past the target's `proto-max-bulk-len`, and
//! with the writes made to them while they are copied.

mod support_replicate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eden_e2e::RedisConfig;
use eden_sidecar::replicate::{Mode, ReplacePolicy, ReplicateError, ReplicatorOptions};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support_replicate::{Pair, assert_clean, caught_up};

/// The threshold the tests copy with: small, so values of a few hundred kB are big.
const BIG: u64 = 64 << 10;

/// Every key [`seed_big_values`] writes and its type, compared whole after the copy.
const BIG_KEYS: [&str; 9] = ["leaderboard", "profile", "members", "ints", "packed", "queue", "events", "blob", "text"];

/// A source whose encoded blobs may be big: an intset of 60,000 integers and a listpack hash of
/// 10,000 fields are each one encoded value of more than [`BIG`] bytes, compressed or not.
fn big_blob_source() -> Pair {
    Pair::with_source(
        RedisConfig::default()
            .directive("set-max-intset-entries", "100000")
            .directive("hash-max-listpack-entries", "20000"),
    )
}

/// A multiplicative hash: values LZF cannot shrink much.
fn mix(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// `n` bytes that LZF cannot shrink.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    (0..n as u64).map(|i| (mix(i ^ seed << 40) >> 56) as u8).collect()
}

/// A sorted set of `n` members with fractional and negative scores, in pipelines.
async fn seed_zset(con: &mut MultiplexedConnection, key: &str, n: u32) {
    for start in (0..n).step_by(20_000) {
        let members: Vec<(f64, String)> =
            (start..(start + 20_000).min(n)).map(|i| (f64::from(i) * 0.37 - 1000.0, format!("player:{i}"))).collect();
        let _: () = con.zadd_multiple(key, &members).await.unwrap();
    }
}

/// One big value of every type the engine copies in pieces, in every encoding that can be big:
/// a 200k-member sorted set (skiplist) with infinite scores and an expiry, a hash and a set
/// (hashtable), an intset and a listpack hash (one encoded blob each), a list (quicklist), a
/// stream with a consumer group, an incompressible 5 MB string and a compressible 6 MB one
/// (LZF-compressed in the snapshot) with an expiry.
async fn seed_big_values(con: &mut MultiplexedConnection) {
    seed_zset(con, "leaderboard", 200_000).await;
    let mut p = redis::pipe();
    p.zadd("leaderboard", "top", "+inf").zadd("leaderboard", "bottom", "-inf").pexpire("leaderboard", 3_600_000);
    for start in (0..30_000u32).step_by(10_000) {
        let fields: Vec<(String, String)> =
            (start..start + 10_000).map(|i| (format!("field:{i}"), "v".repeat(i as usize % 40))).collect();
        p.hset_multiple("profile", &fields);
        p.sadd("members", (start..start + 10_000).map(|i| format!("member:{i}")).collect::<Vec<_>>());
        p.rpush("queue", (start..start + 10_000).map(|i| format!("job:{i}")).collect::<Vec<_>>());
    }
    p.sadd("ints", (0..60_000).map(|i| (mix(i) >> 33) as i64 - (1 << 30)).collect::<Vec<_>>());
    let packed: Vec<(String, String)> =
        (0..10_000).map(|i| (format!("{:x}", mix(i)), format!("{:x}", mix(i + 1)))).collect();
    p.hset_multiple("packed", &packed);
    for i in 1..=5_000u64 {
        p.cmd("XADD").arg("events").arg(format!("{i}-1")).arg("n").arg(format!("{:x}{:x}", mix(i), mix(i + 7)));
    }
    p.cmd("XGROUP").arg(&["CREATE", "events", "billing", "0"]);
    p.cmd("XREADGROUP").arg(&["GROUP", "billing", "alice", "COUNT", "120", "STREAMS", "events", ">"]);
    p.cmd("XACK").arg(&["events", "billing", "10-1", "11-1"]);
    p.cmd("XGROUP").arg(&["CREATECONSUMER", "events", "billing", "idle-bob"]);
    p.cmd("XDEL").arg(&["events", "500-1", "501-1"]);
    p.set("blob", noise(5 << 20, 1));
    p.set("text", "the quick brown fox jumps over the lazy dog ".repeat(150_000)).pexpire("text", 7_200_000);
    p.exec_async(con).await.unwrap();
    let encodings: Vec<String> = ["ints", "packed", "queue"]
        .iter()
        .fold(redis::pipe(), |mut p, key| {
            p.cmd("OBJECT").arg("ENCODING").arg(*key);
            p
        })
        .query_async(con)
        .await
        .unwrap();
    assert_eq!(encodings, ["intset", "listpack", "quicklist"], "the encodings this test means to cover");
}

/// Whole reads of a key, type by type, to compare the two servers with (the verifier compares
/// too; this reads every element at once, as no copy may lose one).
async fn whole(con: &mut MultiplexedConnection, key: &str) -> redis::Value {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(con).await.unwrap();
    let mut read = match kind.as_str() {
        "string" => redis::cmd("GET"),
        "list" => redis::cmd("LRANGE"),
        "set" => redis::cmd("SORT"),
        "hash" => redis::cmd("HGETALL"),
        "zset" => redis::cmd("ZRANGE"),
        "stream" => redis::cmd("XRANGE"),
        other => panic!("{key} is a {other}"),
    };
    read.arg(key);
    match kind.as_str() {
        "list" => read.arg(0).arg(-1),
        "set" => read.arg("ALPHA"),
        "zset" => read.arg(0).arg(-1).arg("WITHSCORES"),
        "stream" => read.arg("-").arg("+"),
        _ => &mut read,
    };
    let value: redis::Value = read.query_async(con).await.unwrap();
    let hash_fields = |value: redis::Value| match value {
        // HGETALL's order is the hash table's: compare as a sorted list of pairs.
        redis::Value::Array(items) => {
            let mut pairs: Vec<Vec<redis::Value>> = items.chunks(2).map(<[redis::Value]>::to_vec).collect();
            pairs.sort_by_key(|pair| format!("{pair:?}"));
            redis::Value::Array(pairs.into_iter().flatten().collect())
        }
        other => other,
    };
    if kind == "hash" { hash_fields(value) } else { value }
}

/// The target's calls of `command` so far (INFO commandstats).
async fn calls(con: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(con).await.unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// Each big key reads the same on both servers, keeps its expiry (±1 s), and no temporary key
/// is left behind.
async fn assert_copied(pair: &Pair, keys: &[&str]) {
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    for key in keys {
        assert!(whole(&mut source, key).await == whole(&mut target, key).await, "{key} differs");
        let (a, b): (i64, i64) = (source.pttl(key).await.unwrap(), target.pttl(key).await.unwrap());
        assert!((a < 0 && a == b) || a.abs_diff(b) <= 1000, "{key}: PTTL {a} on the source, {b} on the target");
    }
    let tmp: Vec<Vec<u8>> = target.keys("eden:tmp:*").await.unwrap();
    assert!(tmp.is_empty(), "temporary keys left: {tmp:?}");
    assert_clean(&pair.verify().await);
}

async fn every_type_copies_exactly_in_pieces(mode: Mode) {
    let pair = big_blob_source();
    seed_big_values(&mut pair.source().await).await;
    let options = ReplicatorOptions::new(ReplacePolicy::Replace).with_big_value_bytes(BIG);
    let mut replicator = pair.replicator(mode, options, None).await;
    caught_up(&mut replicator).await;
    assert_copied(&pair, &BIG_KEYS).await;
    // Every big key went through a temporary key, and the strings were appended in pieces.
    let renamed = calls(&mut pair.target().await, "rename").await;
    assert!(renamed >= BIG_KEYS.len() as u64, "{renamed} RENAMEs for {} big keys", BIG_KEYS.len());
    // The stream's state beyond its entries: counters, the group, its consumers and each
    // pending entry with its owner and delivery count (the idle time moves on by itself).
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    let stream = |reply: redis::Value| match reply {
        redis::Value::Array(fields) => fields
            .chunks(2)
            .filter(|pair| !matches!(&pair[0], redis::Value::BulkString(name) if name.starts_with(b"radix-tree")))
            .map(<[redis::Value]>::to_vec)
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let info = redis::cmd("XINFO").arg(&["STREAM", "events"]).clone();
    let on_source = stream(info.query_async(&mut source).await.unwrap());
    assert_eq!(on_source, stream(info.query_async(&mut target).await.unwrap()));
    let pending = redis::cmd("XPENDING").arg(&["events", "billing", "-", "+", "1000"]).clone();
    let entries = |reply: Vec<(String, String, u64, u64)>| {
        reply.into_iter().map(|(id, who, _, n)| (id, who, n)).collect::<Vec<_>>()
    };
    let on_source = entries(pending.query_async(&mut source).await.unwrap());
    assert_eq!(on_source.len(), 118);
    assert_eq!(on_source, entries(pending.query_async(&mut target).await.unwrap()));
    let consumers = redis::cmd("XINFO").arg(&["CONSUMERS", "events", "billing"]).clone();
    let names = |reply: Vec<redis::Value>| reply.len();
    assert_eq!(names(consumers.query_async(&mut target).await.unwrap()), 2, "a consumer with nothing pending too");
    assert!(calls(&mut pair.target().await, "append").await >= 2 * (5 << 20) / (256 << 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_copies_every_type_exactly_in_pieces() {
    every_type_copies_exactly_in_pieces(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_copies_every_type_exactly_in_pieces() {
    every_type_copies_exactly_in_pieces(Mode::Scan).await;
}

/// With the default threshold, values whose DUMP payload exceeds the target's
/// `proto-max-bulk-len` (set to its minimum, 1 MB) are copied: one RESTORE could not carry
/// them (the target refuses the argument and drops the connection).
async fn values_past_the_targets_bulk_limit_are_copied(mode: Mode) {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_zset(&mut source, "leaderboard", 150_000).await;
    let jobs: Vec<String> = (0..100_000).map(|i| format!("{:x}", mix(i))).collect();
    let _: () = source.rpush("queue", jobs).await.unwrap();
    let _: () = source.set("blob", noise(900 << 10, 2)).await.unwrap();
    for key in ["leaderboard", "queue"] {
        let dump: Vec<u8> = redis::cmd("DUMP").arg(key).query_async(&mut source).await.unwrap();
        assert!(dump.len() > 1 << 20, "{key}'s payload ({} bytes) is past the limit", dump.len());
    }
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "proto-max-bulk-len", "1mb"])
        .query_async(&mut pair.target().await)
        .await
        .unwrap();
    let mut replicator = pair.replicator(mode, ReplicatorOptions::new(ReplacePolicy::Replace), None).await;
    caught_up(&mut replicator).await;
    assert_copied(&pair, &["leaderboard", "queue", "blob"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_copies_values_past_the_targets_bulk_limit() {
    values_past_the_targets_bulk_limit_are_copied(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_copies_values_past_the_targets_bulk_limit() {
    values_past_the_targets_bulk_limit_are_copied(Mode::Scan).await;
}

/// Writers change a big sorted set and a big string all the while they are being copied in
/// pieces; once they stop and the replicator has caught up, both read the same on the target.
async fn writes_during_a_chunked_copy_are_kept(mode: Mode) {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_zset(&mut source, "leaderboard", 50_000).await;
    let _: () = source.set("blob", noise(1 << 20, 3)).await.unwrap();
    let (stop, writes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (mut con, stop, writes) = (source.clone(), stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut p = redis::pipe();
                p.zadd("leaderboard", format!("live:{i}"), i)
                    .zincr("leaderboard", format!("player:{}", i * 7919 % 50_000), 1)
                    .zrem("leaderboard", format!("player:{}", i * 104_729 % 50_000))
                    .append("blob", i.to_string())
                    .cmd("SETRANGE")
                    .arg("blob")
                    .arg(i * 4099 % (1 << 20))
                    .arg("edited");
                let _: () = p.exec_async(&mut con).await.unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let options = ReplicatorOptions::new(ReplacePolicy::Replace).with_big_value_bytes(BIG);
    let before = writes.load(Ordering::Relaxed);
    let mut replicator = pair.replicator(mode, options, None).await;
    let mut progress = replicator.progress();
    progress.wait_for(|p| p.checkpoint.backfill_done()).await.unwrap();
    let during = writes.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(during > 0, "writes overlapped the copy");
    caught_up(&mut replicator).await;
    assert_copied(&pair, &["leaderboard", "blob"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_keeps_writes_made_during_a_chunked_copy() {
    writes_during_a_chunked_copy_are_kept(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_keeps_writes_made_during_a_chunked_copy() {
    writes_during_a_chunked_copy_are_kept(Mode::Scan).await;
}

/// A source that refuses MEMORY USAGE (denied by an ACL, as some managed services do): scan mode
/// sizes values by type and length instead, and still walks the big ones in chunks rather than
/// DUMPing them whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_sizes_values_by_length_where_memory_usage_is_refused() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "-memory"]).query_async(&mut source).await.unwrap();
    seed_zset(&mut source, "leaderboard", 50_000).await;
    let _: () = source.set("blob", noise(1 << 20, 4)).await.unwrap();
    let _: () = source.set("small", "value").await.unwrap();
    let options = ReplicatorOptions::new(ReplacePolicy::Replace).with_big_value_bytes(BIG);
    let mut replicator = pair.replicator(Mode::Scan, options, None).await;
    caught_up(&mut replicator).await;
    assert_copied(&pair, &["leaderboard", "blob", "small"]).await;
    assert_eq!(calls(&mut pair.target().await, "rename").await, 2, "both big values went through a temporary key");
    assert_eq!(calls(&mut pair.target().await, "restore").await, 0, "nothing was DUMPed whole");
}

/// Under `skip` a big value the target already has stays the target's (its temporary copy is
/// dropped, and the key is recorded as kept); a big value it lacks is copied. Under `fail` the
/// same key stops the run, naming it.
async fn skip_and_fail_hold_for_big_values(mode: Mode) {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_zset(&mut source, "leaderboard", 20_000).await;
    let _: () = source.set("blob", noise(1 << 20, 5)).await.unwrap();
    let mut target = pair.target().await;
    let _: () = target.set("leaderboard", "the target's own").await.unwrap();

    let options = ReplicatorOptions::new(ReplacePolicy::Skip).with_big_value_bytes(BIG);
    let mut replicator = pair.replicator(mode, options, None).await;
    caught_up(&mut replicator).await;
    let kept: String = target.get("leaderboard").await.unwrap();
    assert_eq!(kept, "the target's own");
    assert!(replicator.kept_keys().expect("a skip run records its keeps").contains(0, b"leaderboard"));
    let (a, b): (Vec<u8>, Vec<u8>) = (source.get("blob").await.unwrap(), target.get("blob").await.unwrap());
    assert!(a == b, "the big value the target lacked is copied");
    let tmp: Vec<Vec<u8>> = target.keys("eden:tmp:*").await.unwrap();
    assert!(tmp.is_empty(), "temporary keys left: {tmp:?}");
    // Both went the big way: sync renames each without overwriting (RENAMENX), scan looks for
    // the key first and renames only the one the target lacks.
    let (command, expected) = if mode == Mode::Sync { ("renamenx", 2) } else { ("rename", 1) };
    assert_eq!(calls(&mut target, command).await, expected, "{command}");
    replicator.stop().await.unwrap();

    let _: () =
        redis::pipe().cmd("FLUSHALL").set("leaderboard", "the target's own").exec_async(&mut target).await.unwrap();
    let options = ReplicatorOptions::new(ReplacePolicy::Fail).with_big_value_bytes(BIG);
    let mut replicator = pair.replicator(mode, options, None).await;
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("the fail policy stops");
    assert!(matches!(err, ReplicateError::TargetKeyExists { ref key, .. } if key == "leaderboard"), "{err}");
    let kept: String = target.get("leaderboard").await.unwrap();
    assert_eq!(kept, "the target's own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_holds_skip_and_fail_for_big_values() {
    skip_and_fail_hold_for_big_values(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_holds_skip_and_fail_for_big_values() {
    skip_and_fail_hold_for_big_values(Mode::Scan).await;
}
