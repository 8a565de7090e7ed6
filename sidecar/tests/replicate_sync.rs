//! Sync-mode replication scenarios against real redis-server processes: Eden is the source's
//! replica, and each scenario ends with the verifier reporting zero differences.

mod support_replicate;

use std::time::Duration;

use eden_e2e::{RedisConfig, RedisServer, TestPki};
use eden_sidecar::replicate::{
    EXPIRY_GRACE_MS, FRESHNESS_KEY, Mode, POSITION_KEY, ReplacePolicy, ReplicateError, Replicator, ReplicatorOptions,
    SyncOptions, Verifier, VerifyOptions,
};
use eden_sidecar::upstream::{Server, TlsSettings, Upstream};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support_replicate::{
    Pair, assert_clean, caught_up, checkpoint_of, data_keys, seed_big_hash, seed_every_type, seed_strings,
    spawn_writers,
};

/// A source that sends its snapshot at once, without a socket-free disk write (diskless).
fn diskless() -> RedisConfig {
    RedisConfig::default().directive("repl-diskless-sync", "yes").directive("repl-diskless-sync-delay", "0")
}

/// A source that writes its snapshot to disk first and sends it with a length (`$<len>`).
fn disk_based() -> RedisConfig {
    RedisConfig::default().directive("repl-diskless-sync", "no")
}

/// A diskless source with `keys` strings, and a replicator that copied them and follows the
/// stream.
async fn following(keys: usize) -> (Pair, MultiplexedConnection, Replicator) {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_strings(&mut source, keys).await;
    let mut replicator = pair.sync(SyncOptions::default(), None).await;
    caught_up(&mut replicator).await;
    (pair, source, replicator)
}

async fn info_stat(con: &mut MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query_async(con).await.unwrap();
    let prefix = format!("{field}:");
    info.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap()
}

/// Every type and encoding, with and without TTLs, a function library, a key in another
/// database, and a million-field hash all arrive through the snapshot; writes after it arrive
/// through the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_a_million_element_key_through_the_snapshot() {
    let pair = Pair::with_source(disk_based());
    let mut source = pair.source().await;
    seed_every_type(&mut source).await;
    seed_big_hash(&mut source, "big", 1_000_000).await;
    let mut p = redis::pipe();
    p.set("long", "abcdefgh".repeat(100)) // LZF-compressed in the RDB
        .sadd("intset", &[1, 2, 300_000])
        .sadd("bigset", (0..200).collect::<Vec<_>>())
        .zadd_multiple("bigzset", &(0..200).map(|i| (f64::from(i) / 3.0, i)).collect::<Vec<_>>())
        .rpush("biglist", (0..20_000).collect::<Vec<_>>())
        .set_ex("ttl:int", 42, 600)
        .cmd("FUNCTION")
        .arg("LOAD")
        .arg("#!lua name=edenlib\nredis.register_function('eden_echo', function(keys, args) return args[1] end)")
        .cmd("SELECT")
        .arg(3)
        .set("in-db-3", "three")
        .cmd("SELECT")
        .arg(0);
    p.exec_async(&mut source).await.unwrap();

    let mut replicator = pair.sync(SyncOptions::default(), None).await;
    caught_up(&mut replicator).await;
    let progress = replicator.progress().borrow().clone();
    assert_eq!(progress.checkpoint.total, 16, "RESIZEDB counts every key of every database");
    assert_eq!(progress.checkpoint.copied, 16);
    assert!(progress.checkpoint.backfill_done() && progress.lag_bytes == 0, "{progress:?}");

    let _: () = source.set("after-snapshot", 1).await.unwrap();
    let _: () = source.hset("big", "f-new", 1).await.unwrap();
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);

    let mut target = pair.target().await;
    let echoed: String = redis::cmd("FCALL").arg("eden_echo").arg(0).arg("hi").query_async(&mut target).await.unwrap();
    assert_eq!(echoed, "hi");
    let _: () = redis::cmd("SELECT").arg(3).query_async(&mut target).await.unwrap();
    let three: String = target.get("in-db-3").await.unwrap();
    assert_eq!(three, "three");
    let recorded: String = {
        let _: () = redis::cmd("SELECT").arg(0).query_async(&mut target).await.unwrap();
        target.get(POSITION_KEY).await.unwrap()
    };
    let checkpoint = replicator.progress().borrow().checkpoint.sync.clone().unwrap();
    assert!(recorded.starts_with(&checkpoint.replid), "{recorded} vs {checkpoint:?}");
}

/// Strings in each RDB encoding (raw, integer, LZF-compressed), with and without an expiry, in
/// two databases and among keys of other types, arrive through MSET and SET, in batches small
/// enough that databases change inside one. Under `replace` they overwrite what the target had,
/// whatever its type, and drop its old expiry, as RESTORE REPLACE does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_of_every_encoding_load_and_replace_what_the_target_had() {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_every_type(&mut source).await;
    seed_strings(&mut source, 2_500).await;
    seed_strings_of_every_encoding(&mut source).await;
    let mut target = pair.target().await;
    let mut p = redis::pipe();
    p.set_ex("raw", "the target's, expiring", 900) // loses its expiry
        .rpush("int", &["a list", "where the source has a string"])
        .set("ttl:raw", "the target's, not expiring") // gains the source's expiry
        .cmd("SELECT")
        .arg(2)
        .hset("in-db-2", "a", "hash")
        .cmd("SELECT")
        .arg(0);
    p.exec_async(&mut target).await.unwrap();

    let mut replicator = pair.sync(SyncOptions { batch_keys: 100, ..Default::default() }, None).await;
    caught_up(&mut replicator).await;
    let progress = replicator.progress().borrow().clone();
    assert_eq!((progress.checkpoint.copied, progress.checkpoint.skipped), (progress.checkpoint.total, 0));
    assert_clean(&pair.verify().await);
    let ttl: i64 = target.pttl("raw").await.unwrap();
    assert_eq!(ttl, -1, "the target's old expiry is gone");
    let (source_at, target_at): (i64, i64) = (
        redis::cmd("PEXPIRETIME").arg("ttl:raw").query_async(&mut source).await.unwrap(),
        redis::cmd("PEXPIRETIME").arg("ttl:raw").query_async(&mut target).await.unwrap(),
    );
    assert_eq!(source_at + EXPIRY_GRACE_MS as i64, target_at, "the absolute expiry is copied, a grace later");
    let _: () = redis::cmd("SELECT").arg(2).query_async(&mut target).await.unwrap();
    let in_db_2: (String, i64, String, i64) = redis::pipe()
        .get("in-db-2")
        .pttl("in-db-2")
        .get("ttl:in-db-2")
        .pttl("ttl:in-db-2")
        .query_async(&mut target)
        .await
        .unwrap();
    assert_eq!((&in_db_2.0[..], in_db_2.1, &in_db_2.2[..]), ("two", -1, "two, expiring"));
    assert!(in_db_2.3 > 0, "{in_db_2:?}");
}

/// `skip` keeps the keys the target already has, strings (loaded with SET NX) as well as other
/// types (RESTORE's BUSYKEY), counts them, and copies the rest; a verifier given the keys the
/// replicator kept counts them apart and finds nothing else, and one without finds exactly
/// them. `fail` stops at such a key, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_and_fail_leave_existing_keys_alone() {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_strings_of_every_encoding(&mut source).await;
    let _: () = source.rpush("list", &["a", "b"]).await.unwrap();
    let mut target = pair.target().await;
    let mut p = redis::pipe();
    p.set("raw", "the target's").set("ttl:lzf", "the target's, not expiring").set("list", "a string");
    p.exec_async(&mut target).await.unwrap();

    let options = SyncOptions { replace: ReplacePolicy::Skip, ..Default::default() };
    let mut replicator = pair.sync(options, None).await;
    caught_up(&mut replicator).await;
    let progress = replicator.progress().borrow().clone();
    assert_eq!(progress.checkpoint.skipped, 3);
    assert_eq!(progress.checkpoint.copied, progress.checkpoint.total - 3);
    let kept: (String, i64) = redis::pipe().get("raw").pttl("ttl:lzf").query_async(&mut target).await.unwrap();
    assert_eq!(kept, ("the target's".to_string(), -1));
    let report = pair.verify_with(VerifyOptions { kept: replicator.kept_keys(), ..Default::default() }).await;
    assert_clean(&report);
    assert_eq!(report.kept, 3);
    let report = pair.verify().await;
    let mut differing: Vec<&str> = report.samples.iter().map(|d| d.key.as_str()).collect();
    differing.sort();
    differing.dedup();
    assert_eq!(differing, ["list", "raw", "ttl:lzf"], "{report:#?}");
    replicator.stop().await.unwrap();

    let mut p = redis::pipe();
    p.cmd("FLUSHALL").set("ttl:lzf", "the target's");
    p.exec_async(&mut target).await.unwrap();
    let options = SyncOptions { replace: ReplacePolicy::Fail, ..Default::default() };
    let mut replicator = pair.sync(options, None).await;
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("the fail policy stops");
    assert!(matches!(err, ReplicateError::TargetKeyExists { ref key, .. } if key == "ttl:lzf"), "{err}");
}

/// Under `skip`, a restart that needs a full copy (here: the target's position record is gone)
/// stops with an error instead of flushing the target, whose own keys `skip` keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_needing_a_full_copy_under_skip_stops_instead_of_flushing() {
    let pair = Pair::with_source(diskless());
    let (_, mut target, options, replicator) = skip_run_caught_up(&pair).await;
    let checkpoint = checkpoint_of(replicator);
    let _: () = target.del(POSITION_KEY).await.unwrap();

    let mut replicator = pair.sync(options, Some(checkpoint)).await;
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("no flush under skip");
    assert!(matches!(err, ReplicateError::FullCopyWouldFlush { .. }), "{err}");
    assert!(err.to_string().contains("empty the target"), "{err}");
    let kept: String = target.get("target-only").await.unwrap();
    assert_eq!(kept, "kept");
}

/// Strings the RDB stores in each of its encodings, with and without expiries, and two in
/// database 2.
async fn seed_strings_of_every_encoding(source: &mut MultiplexedConnection) {
    let mut p = redis::pipe();
    p.set("raw", "hello")
        .set("int", 12345)
        .set("negative-int", -7)
        .set("wide-int", 4_000_000_000_i64) // beyond 32 bits: stored as text
        .set("lzf", "abcdefgh".repeat(100)) // compressed
        .set_ex("ttl:raw", "soon", 600)
        .pset_ex("ttl:int", 42, 600_000)
        .set_ex("ttl:lzf", "xyz".repeat(300), 600)
        .cmd("SELECT")
        .arg(2)
        .set("in-db-2", "two")
        .set_ex("ttl:in-db-2", "two, expiring", 600)
        .cmd("SELECT")
        .arg(0);
    p.exec_async(source).await.unwrap();
}

/// Writers hammer hot keys while the snapshot loads and after; when they stop and the lag is
/// 0, the servers are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_during_the_snapshot_converge() {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_strings(&mut source, 50_000).await;
    let writers = spawn_writers(&source, 4, 400, 50_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut replicator = pair.sync(SyncOptions { batch_keys: 200, ..Default::default() }, None).await;
    let mut progress = replicator.progress();
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(progress.borrow_and_update().checkpoint.copied > 0, "writes overlapped the load");
    // Let the one-second keys expire so their expiry DELs are part of the stream.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    caught_up(&mut replicator).await;
    assert_eq!(replicator.progress().borrow().stream_errors, 0);
    assert_clean(&pair.verify().await);
}

/// Killed while the snapshot loads, the replicator restarts with a full copy into a flushed
/// target; killed again while following the stream under writes, it continues the stream
/// (PSYNC continue, no second snapshot) without applying any write twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_it_resumes_and_ends_equal() {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_strings(&mut source, 50_000).await;

    let replicator = pair.sync(SyncOptions { batch_keys: 100, ..Default::default() }, None).await;
    let mut progress = replicator.progress();
    progress.wait_for(|p| p.checkpoint.copied >= 2_000).await.unwrap();
    let checkpoint = checkpoint_of(replicator);
    assert!(!checkpoint.backfill_done(), "killed mid-snapshot");
    // While it is down, a key it already copied is deleted: only a flush removes it.
    let _: () = source.del("key:0").await.unwrap();

    let mut replicator = pair.sync(SyncOptions::default(), Some(checkpoint)).await;
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);

    let partial_before = info_stat(&mut source, "stats", "sync_partial_ok").await;
    let writers = spawn_writers(&source, 2, 300, 50_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let checkpoint = checkpoint_of(replicator);
    for writer in writers {
        writer.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // one-second keys gone on both sides
    let mut replicator = pair.sync(SyncOptions::default(), Some(checkpoint)).await;
    caught_up(&mut replicator).await;
    assert_eq!(info_stat(&mut source, "stats", "sync_partial_ok").await, partial_before + 1, "PSYNC continued");
    assert_clean(&pair.verify().await);
}

/// A restart whose target has stalled (stopped: connections open, nothing answers) must not
/// look caught up on the strength of its checkpoint: its lag counts from the start until the
/// stream flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_against_a_stalled_target_counts_its_lag() {
    let (pair, _source, replicator) = following(100).await;
    let checkpoint = checkpoint_of(replicator);
    assert!(checkpoint.backfill_done());

    pair.target.freeze().unwrap();
    let mut replicator = pair.sync(SyncOptions::default(), Some(checkpoint)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = replicator.progress().borrow().clone();
    assert!(stalled.lag_ms_now() >= 500, "{stalled:?}");

    pair.target.thaw().unwrap();
    caught_up(&mut replicator).await;
    assert_eq!(replicator.progress().borrow().lag_ms_now(), 0);
    assert_clean(&pair.verify().await);
}

/// The source drops Eden's replication link while writers run (`CLIENT KILL TYPE replica`, as a
/// failover or a proxy restart would); the replicator reconnects by itself, continues the stream
/// with PSYNC, and ends equal. The target's connection dropping is ridden out the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_reconnected_and_the_stream_continues() {
    let (pair, mut source, mut replicator) = following(10_000).await;

    let partial_before = info_stat(&mut source, "stats", "sync_partial_ok").await;
    let writers = spawn_writers(&source, 2, 300, 10_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed: i64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "replica"]).query_async(&mut source).await.unwrap();
    assert_eq!(killed, 1, "Eden's replication link");
    let mut target = pair.target().await;
    let killed: i64 =
        redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"]).query_async(&mut target).await.unwrap();
    assert!(killed >= 1, "Eden's connection to the target");
    for writer in writers {
        writer.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // one-second keys gone on both sides
    caught_up(&mut replicator).await;
    assert!(info_stat(&mut source, "stats", "sync_partial_ok").await > partial_before, "PSYNC continued");
    assert_eq!(info_stat(&mut source, "stats", "sync_full").await, 1, "no second full copy");
    assert_clean(&pair.verify().await);
}

/// FLUSHDB and FLUSHALL on the source arrive in the stream and empty the target too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_flushes_are_replicated() {
    let pair = Pair::with_source(diskless());
    let mut source = pair.source().await;
    seed_strings(&mut source, 2_000).await;
    let mut replicator = pair.sync(SyncOptions::default(), None).await;
    caught_up(&mut replicator).await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut source).await.unwrap();
    let _: () = source.set("after-flush", 1).await.unwrap();
    caught_up(&mut replicator).await;
    let mut target = pair.target().await;
    let mut keys: Vec<String> = target.keys("*").await.unwrap();
    keys.retain(|key| key != FRESHNESS_KEY);
    assert_eq!(keys.len(), 2, "the new key and the position record: {keys:?}");
    assert_clean(&pair.verify().await);

    let _: () = redis::cmd("FLUSHALL").query_async(&mut source).await.unwrap();
    caught_up(&mut replicator).await;
    let exists: bool = target.exists("after-flush").await.unwrap();
    assert!(!exists);
    assert_clean(&pair.verify().await);
}

/// Under `skip`, a flush in the stream stops replication just before it: what came before is
/// applied, the target's own key survives, and a restart from the checkpoint stops there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_flush_under_skip_stops_before_reaching_the_target() {
    let pair = Pair::with_source(diskless());
    let (mut source, mut target, options, mut replicator) = skip_run_caught_up(&pair).await;
    let mut p = redis::pipe();
    p.set("before-flush", 1).cmd("FLUSHALL").set("after-flush", 1);
    let _: () = p.query_async(&mut source).await.unwrap();

    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("a flush stops the run");
    assert!(matches!(err, ReplicateError::SourceFlushed { .. }), "{err}");
    assert!(err.to_string().contains("`FLUSHALL`"), "{err}");
    let applied: (bool, bool, bool) = redis::pipe()
        .exists("before-flush")
        .exists("after-flush")
        .exists("target-only")
        .query_async(&mut target)
        .await
        .unwrap();
    assert_eq!(applied, (true, false, true), "before-flush, after-flush, target-only");
    assert_eq!(data_keys(&mut target).await, 1_003, "the copies, before-flush, target-only and the position record");

    let mut replicator = pair.sync(options, Some(checkpoint_of(replicator))).await;
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("the flush is still next");
    assert!(matches!(err, ReplicateError::SourceFlushed { .. }), "{err}");
    assert_eq!(data_keys(&mut target).await, 1_003);
}

/// A `skip` run that has copied 1,000 strings onto a target with a key of its own,
/// `target-only`; with connections to the source and the target.
async fn skip_run_caught_up(pair: &Pair) -> (MultiplexedConnection, MultiplexedConnection, SyncOptions, Replicator) {
    let mut source = pair.source().await;
    seed_strings(&mut source, 1_000).await;
    let mut target = pair.target().await;
    let _: () = target.set("target-only", "kept").await.unwrap();
    let options = SyncOptions { replace: ReplacePolicy::Skip, ..Default::default() };
    let mut replicator = pair.sync(options.clone(), None).await;
    caught_up(&mut replicator).await;
    (source, target, options, replicator)
}

/// Both modes and the verifier reach `rediss://` servers whose certificates come from two
/// different CAs, each trusted for its own server only, and name neither the address Eden dials
/// (127.0.0.1) but each its own `serverName`, which Eden verifies them against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_and_the_verifier_work_over_tls_with_a_ca_and_a_server_name_for_each_server() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let names = ["source.redis.test", "target.redis.test"];
    let [source_pki, target_pki] = names.map(|name| TestPki::new(&[name]).unwrap());
    let server = |pki: &TestPki, dir: &tempfile::TempDir| {
        let files = pki.write_to(dir.path()).unwrap();
        RedisServer::with_config(diskless().tls(&files.ca, &files.cert, &files.key)).unwrap()
    };
    let mut pair = Pair::of(server(&source_pki, &dirs[0]), server(&target_pki, &dirs[1]));
    let trust = |pki: &TestPki, name: &str| TlsSettings {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        server_name: Some(name.to_string()),
        ..Default::default()
    };
    pair.source_as.tls = trust(&source_pki, names[0]);
    pair.target_as.tls = trust(&target_pki, names[1]);
    let stream = Upstream::to(&pair.source_as, Duration::from_secs(5)).unwrap().connect().await.unwrap();
    let (info, config) = (redis::RedisConnectionInfo::default(), redis::AsyncConnectionConfig::new());
    let (mut source, driver) = MultiplexedConnection::new_with_config(&info, stream, config).await.unwrap();
    tokio::spawn(driver);
    seed_every_type(&mut source).await;
    for mode in [Mode::Sync, Mode::Scan] {
        let options = ReplicatorOptions::new(ReplacePolicy::Replace);
        let mut replicator = pair.replicator(mode, options, None).await;
        let _: () = source.set(format!("written-during-{mode}"), 1).await.unwrap();
        caught_up(&mut replicator).await;
        replicator.stop().await.unwrap();
        assert_clean(&pair.verify().await);
    }
    let refused = |source_as: &Server, target_as: &Server, mode| {
        let (source_as, target_as) = (source_as.clone(), target_as.clone());
        async move {
            let err = Replicator::start(&source_as, &target_as, mode, ReplicatorOptions::default(), None)
                .await
                .err()
                .expect("the target's certificate is refused");
            assert!(err.to_string().contains("target") && err.to_string().contains("TLS"), "{err}");
            let err = Verifier::connect(&source_as, &target_as, VerifyOptions::default()).await.err().unwrap();
            assert!(err.to_string().contains("target") && err.to_string().contains("TLS"), "{err}");
        }
    };
    // One CA for both, as the operator used to apply: the target's certificate is refused.
    let one_ca = Server { tls: trust(&source_pki, names[1]), ..pair.target_as.clone() };
    // The right CA without the server name: the certificate does not name 127.0.0.1.
    let no_name =
        Server { tls: TlsSettings { server_name: None, ..pair.target_as.tls.clone() }, ..pair.target_as.clone() };
    for mode in [Mode::Sync, Mode::Scan] {
        refused(&pair.source_as, &one_ca, mode).await;
        refused(&pair.source_as, &no_name, mode).await;
    }
}

/// The last checkpoint of a replicator that is then dropped (killed).
/// A library the target has already (the sidecars load libraries on both sides) does not stop
/// the source's FUNCTION LOAD from reaching it: the target ends with the source's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_library_the_target_has_is_replaced_by_the_sources() {
    let (pair, mut source, mut replicator) = following(100).await;
    let library =
        |answer: u32| format!("#!lua name=eden\nredis.register_function('answer', function() return {answer} end)");
    let load = |code: String| redis::cmd("FUNCTION").arg("LOAD").arg(code).clone();
    let mut target = pair.target().await;
    let _: String = load(library(1)).query_async(&mut target).await.unwrap();
    let _: String = load(library(2)).query_async(&mut source).await.unwrap();
    caught_up(&mut replicator).await;
    assert_eq!(replicator.progress().borrow().stream_errors, 0);
    let answer: u32 = redis::cmd("FCALL").arg(&["answer", "0"]).query_async(&mut target).await.unwrap();
    assert_eq!(answer, 2);
}
