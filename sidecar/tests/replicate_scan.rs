//! Scan-mode replication scenarios against real redis-server processes, each ending with the
//! verifier reporting zero differences.

mod support_replicate;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eden_sidecar::replicate::{
    Checkpoint, Mode, ReplacePolicy, ReplicateError, Replicator, ReplicatorOptions, ScanOptions, VerifyOptions,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis_protocol::resp2::types::BytesFrame;
use support_replicate::{
    Pair, assert_clean, caught_up, data_keys, relay, seed_big_hash, seed_strings, server, spawn_writers,
};

/// Writers hammer hot keys with every kind of write while a 50k-key backfill runs; once they stop
/// and the replicator has caught up, the servers are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_during_backfill_converge() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 50_000).await;
    let mut replicator = pair.replicate(ScanOptions { batch: 200, ..Default::default() }).await;
    let writers = spawn_writers(&source, 4, 400, 50_000);
    let mut progress = replicator.progress();
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(progress.borrow_and_update().checkpoint.copied > 0, "writes overlapped the backfill");
    // Let the one-second keys expire so their expiry notifications are part of the run.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);
}

/// A hash with a million fields is copied in chunks through a temporary key and verifies equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_element_hash_copies_in_chunks() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_big_hash(&mut source, "big", 1_000_000).await;
    let mut replicator = pair.replicate(ScanOptions { chunk: 5000, ..Default::default() }).await;
    caught_up(&mut replicator).await;
    let mut target = pair.target().await;
    let len: usize = target.hlen("big").await.unwrap();
    assert_eq!(len, 1_000_000);
    let tmp: bool = target.exists("eden:tmp:big").await.unwrap();
    assert!(!tmp, "the temporary key was renamed over the real one");
    assert_clean(&pair.verify().await);
}

/// A big stream is copied in chunks too: entries with their IDs, then its last ID and counters,
/// consumer groups, consumers and every pending entry with its owner and delivery count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_stream_copies_in_chunks_with_its_groups_and_pending_entries() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    let mut p = redis::pipe();
    for i in 1..=2_000 {
        p.cmd("XADD").arg("events").arg(format!("{i}-0")).arg("n").arg(i).ignore();
    }
    p.cmd("XDEL").arg("events").arg("5-0").ignore();
    p.cmd("XGROUP").arg(&["CREATE", "events", "billing", "0"]).ignore();
    p.cmd("XGROUP").arg(&["CREATE", "events", "audit", "$"]).ignore();
    p.cmd("XGROUP").arg(&["CREATECONSUMER", "events", "audit", "idle-bob"]).ignore();
    for (consumer, count) in [("alice", 120), ("carol", 30)] {
        let read = ["GROUP", "billing", consumer, "COUNT", &count.to_string(), "STREAMS", "events", ">"];
        p.cmd("XREADGROUP").arg(&read).ignore();
    }
    p.cmd("XACK").arg(&["events", "billing", "10-0", "11-0"]).ignore();
    p.exec_async(&mut source).await.unwrap();

    let options = ScanOptions { big_key_bytes: 1, chunk: 64, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    caught_up(&mut replicator).await;
    let mut target = pair.target().await;
    for probe in [redis::cmd("XPENDING").arg(&["events", "billing"]), redis::cmd("XINFO").arg(&["STREAM", "events"])] {
        let (on_source, on_target): (redis::Value, redis::Value) =
            (probe.query_async(&mut source).await.unwrap(), probe.query_async(&mut target).await.unwrap());
        assert_eq!(on_source, on_target, "{:?}", probe.args_iter().collect::<Vec<_>>());
    }
    // Each pending entry: ID, owner and delivery count (its idle time moves on by itself).
    let pending = redis::cmd("XPENDING").arg(&["events", "billing", "-", "+", "1000"]).clone();
    let entries = |reply: Vec<(String, String, u64, u64)>| {
        reply.into_iter().map(|(id, who, _, n)| (id, who, n)).collect::<Vec<_>>()
    };
    let on_source = entries(pending.query_async(&mut source).await.unwrap());
    assert_eq!(on_source.len(), 148);
    assert_eq!(on_source, entries(pending.query_async(&mut target).await.unwrap()));
    let consumers: Vec<redis::Value> =
        redis::cmd("XINFO").arg(&["CONSUMERS", "events", "audit"]).query_async(&mut target).await.unwrap();
    assert_eq!(consumers.len(), 1, "a consumer with nothing pending is copied too");
    assert_clean(&pair.verify().await);
}

/// A replicator dropped mid-backfill resumes from its checkpoint and still ends exact, even
/// though keys it had already copied changed while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_checkpoint_after_being_killed() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 20_000).await;
    let replicator = pair.replicate(ScanOptions { batch: 100, ..Default::default() }).await;
    let mut progress = replicator.progress();
    progress.wait_for(|p| p.checkpoint.copied >= 3_000).await.unwrap();
    let checkpoint = progress.borrow().checkpoint.clone();
    drop(replicator);
    assert!(!checkpoint.backfill_done());

    // While down: change, delete and add keys, some surely already copied.
    let mut p = redis::pipe();
    for i in 0..20_000 {
        match i % 100 {
            0 => p.set(format!("key:{i}"), "changed").ignore(),
            1 => p.del(format!("key:{i}")).ignore(),
            _ => continue,
        };
    }
    p.set("added-while-down", 1).ignore();
    p.exec_async(&mut source).await.unwrap();

    let json = checkpoint.to_json();
    let checkpoint = Checkpoint::from_json(&json).unwrap();
    let mut replicator = pair.replicator(Mode::Scan, Default::default(), Some(checkpoint)).await;
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);
}

/// A `skip` run resumed from its checkpoint re-copies everything but prunes nothing: a key only
/// the target has may be one it had before, which `skip` keeps. Under `replace` the same resume
/// prunes what the source deleted while the replicator was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_skip_run_keeps_keys_only_the_target_has() {
    for policy in [ReplacePolicy::Skip, ReplacePolicy::Replace] {
        let pair = Pair::start();
        let (mut source, mut target) = (pair.source().await, pair.target().await);
        seed_strings(&mut source, 5_000).await;
        let _: () = target.set("target-only", "kept").await.unwrap();
        let _: () = target.set("key:1", "the target's own").await.unwrap();
        let replicator = pair.replicate(ScanOptions { batch: 100, replace: policy, ..Default::default() }).await;
        let mut progress = replicator.progress();
        progress.wait_for(|p| p.checkpoint.copied >= 1_000).await.unwrap();
        let checkpoint = progress.borrow().checkpoint.clone();
        drop(replicator);
        let _: () = source.del("key:0").await.unwrap();
        let options = ReplicatorOptions::new(policy);
        let mut replicator = pair.replicator(Mode::Scan, options, Some(checkpoint)).await;
        let progress = caught_up_progress(&mut replicator).await;
        assert!(progress.checkpoint.backfill_done(), "{policy:?}: the full pass ran");
        let kept: Option<String> = target.get("target-only").await.unwrap();
        let deleted: bool = target.exists("key:0").await.unwrap();
        let conflict: String = target.get("key:1").await.unwrap();
        match policy {
            ReplacePolicy::Skip => {
                assert_eq!(kept.as_deref(), Some("kept"), "not ours to prune");
                assert_eq!(conflict, "the target's own", "the re-copy keeps what skip kept");
            }
            _ => assert!(kept.is_none() && !deleted, "replace prunes what the source lacks"),
        }
    }
}

/// FLUSHDB on the source is noticed; the target is flushed and ends with only the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_flush_is_replicated() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 2_000).await;
    let mut replicator = pair.replicate(Default::default()).await;
    caught_up(&mut replicator).await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut source).await.unwrap();
    let _: () = source.set("after-flush", 1).await.unwrap();
    caught_up(&mut replicator).await;
    assert_eq!(replicator.progress().borrow().flushes, 1);
    assert_eq!(data_keys(&mut pair.target().await).await, 1);
    assert_clean(&pair.verify().await);
}

/// Under `skip` and `fail`, a FLUSHDB on the source stops replication with an error instead of
/// flushing the target, which has keys of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_flush_under_skip_or_fail_stops_instead_of_flushing_the_target() {
    for policy in [ReplacePolicy::Skip, ReplacePolicy::Fail] {
        let pair = Pair::start();
        let (mut source, mut target) = (pair.source().await, pair.target().await);
        seed_strings(&mut source, 1_000).await;
        let _: () = target.set("target-only", "kept").await.unwrap();
        let mut replicator = pair.replicate(ScanOptions { replace: policy, ..Default::default() }).await;
        caught_up(&mut replicator).await;
        let _: () = redis::cmd("FLUSHDB").query_async(&mut source).await.unwrap();
        let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("a flush stops the run");
        assert!(matches!(err, ReplicateError::SourceFlushed { .. }), "{policy:?}: {err}");
        assert_eq!(data_keys(&mut target).await, 1_001, "{policy:?}: the target keeps the copies and its own key");
    }
}

/// Every copy connection killed on both servers mid-run: the loop reopens them and carries on
/// where it was, with no full re-copy, and the live writes made meanwhile all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_copy_connections_are_reopened_without_a_full_pass() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    seed_strings(&mut source, 20_000).await;
    let mut replicator = pair.replicate(ScanOptions { batch: 100, ..Default::default() }).await;
    let mut progress = replicator.progress();
    progress.wait_for(|p| p.checkpoint.copied >= 5_000).await.unwrap();
    // Writing while the connections drop, so that the batches lost with them hold dirty keys.
    let writers = spawn_writers(&source, 2, 2_000, 20_000);
    within(progress.wait_for(|p| p.dirty > 0), "a dirty key").await.unwrap();
    let connections_before = info_stat(&mut target, "total_connections_received").await;
    for con in [&mut source, &mut target] {
        // Normal clients only: the keyspace subscription is a pubsub client and stays.
        let killed: u64 =
            redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"]).query_async(con).await.unwrap();
        assert!(killed >= 2, "the replicator's connections were killed: {killed}");
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let progress = caught_up_progress(&mut replicator).await;
    assert_eq!(progress.resyncs, 0, "no full pass was queued");
    // One pass over about 25,000 keys, 100 per SCAN step, takes about 250 steps; two would take 500.
    let scans = calls(&mut source, "scan").await;
    assert!(scans < 400, "the keyspace was scanned once, not again: {scans} SCAN calls");
    assert!(info_stat(&mut target, "total_connections_received").await > connections_before, "it reconnected");
    assert_clean(&pair.verify().await);
}

/// Notifications lost mid-run (the subscription killed) mean a full re-copy, in which the source
/// is the truth for every key but those `skip` kept: they stay the target's, unless the
/// application writes them on the source. The verifier, given what the replicator kept, counts
/// the one still kept apart and finds the servers otherwise equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recopy_after_lost_notifications_keeps_what_skip_kept() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    seed_strings(&mut source, 2_000).await;
    let _: () = target.set("key:7", "the target's own").await.unwrap();
    let _: () = target.set("key:8", "the target's own").await.unwrap();
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Skip, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    caught_up(&mut replicator).await;
    let _: () = source.set("key:8", "written by the application").await.unwrap();
    let _: () = source.set("key:9", "written by the application").await.unwrap();
    caught_up(&mut replicator).await;

    let killed: u64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "pubsub"]).query_async(&mut source).await.unwrap();
    assert_eq!(killed, 1, "the keyspace subscription");
    let mut progress = replicator.progress();
    within(progress.wait_for(|p| p.resyncs >= 1), "a full re-copy queued").await.unwrap();
    let progress = caught_up_progress(&mut replicator).await;
    assert!(progress.checkpoint.backfill_done(), "the re-copy ran");
    let values: (String, String, String) =
        redis::pipe().get("key:7").get("key:8").get("key:9").query_async(&mut target).await.unwrap();
    let app = "written by the application".to_string();
    assert_eq!(values, ("the target's own".to_string(), app.clone(), app));
    let report = pair.verify_with(VerifyOptions { kept: replicator.kept_keys(), ..Default::default() }).await;
    assert_clean(&report);
    assert_eq!(report.kept, 1, "key:7; key:8 was written since");
}

/// A target that restarts empty loses what was copied to it: the replicator, which rides out the
/// lost connections, sees its new run_id and copies everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_restarts_empty_is_copied_again() {
    let mut pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 5_000).await;
    let mut replicator = pair.replicate(ScanOptions { batch: 100, ..Default::default() }).await;
    caught_up(&mut replicator).await;
    pair.target.restart().unwrap();
    let _: () = source.set("after-restart", 1).await.unwrap();

    let mut progress = replicator.progress();
    within(progress.wait_for(|p| p.resyncs >= 1), "a full re-copy queued").await.unwrap();
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);
}

/// A source that restarts has forgotten the CONFIG SET that turned keyspace notifications on:
/// the replicator turns them on again, so writes made after the restart still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_gets_its_notifications_turned_on_again() {
    let mut pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 1_000).await;
    let mut replicator = pair.replicate(Default::default()).await;
    caught_up(&mut replicator).await;
    pair.source.restart().unwrap();
    let mut source = pair.source().await;
    let mut progress = replicator.progress();
    within(progress.wait_for(|p| p.resyncs >= 1), "a full re-copy queued").await.unwrap();
    caught_up(&mut replicator).await;

    let _: () = source.set("after-restart", 1).await.unwrap();
    caught_up(&mut replicator).await;
    let mut target = pair.target().await;
    let copied: Option<u32> = target.get("after-restart").await.unwrap();
    assert_eq!(copied, Some(1));
    assert_clean(&pair.verify().await);
}

/// `future`'s output, or a panic naming `what` after 30 s: a test fails, it does not hang.
async fn within<F: std::future::Future>(future: F, what: &str) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), future).await.unwrap_or_else(|_| panic!("no {what} within 30s"))
}

async fn info_stat(con: &mut MultiplexedConnection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(con).await.unwrap();
    let line = info.lines().find_map(|line| line.strip_prefix(&format!("{field}:"))).unwrap();
    line.trim().parse().unwrap()
}

/// `skip` keeps a key that already exists on the target, whatever its type, and counts it (the
/// source's expiry does not land on it either); `fail` stops naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_policies_skip_and_fail() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    let _: () = source.set_ex("shared", "from source", 300).await.unwrap();
    let _: () = source.set("shared:hash", "from source").await.unwrap();
    let _: () = source.set("only-source", 1).await.unwrap();
    let _: () = target.set("shared", "from target").await.unwrap();
    let _: () = target.hset("shared:hash", "f", "from target").await.unwrap();

    let mut replicator = pair.replicate(ScanOptions { replace: ReplacePolicy::Skip, ..Default::default() }).await;
    let progress = caught_up_progress(&mut replicator).await;
    assert_eq!((progress.checkpoint.copied, progress.checkpoint.skipped), (1, 2));
    let kept: String = target.get("shared").await.unwrap();
    assert_eq!(kept, "from target");
    assert_eq!(expire_time(&mut target, "shared").await, -1, "no expiry added to the kept key");
    let kept: String = target.hget("shared:hash", "f").await.unwrap();
    assert_eq!(kept, "from target");
    let copied: String = target.get("only-source").await.unwrap();
    assert_eq!(copied, "1");
    drop(replicator);

    let _: () = target.del(&["only-source", "shared:hash"]).await.unwrap();
    let mut replicator = pair.replicate(ScanOptions { replace: ReplacePolicy::Fail, ..Default::default() }).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match replicator.caught_up(Duration::from_secs(1)).await {
            Err(err) => break err,
            Ok(_) if Instant::now() < deadline => continue,
            Ok(p) => panic!("fail policy did not stop: {p:?}"),
        }
    };
    assert!(matches!(err, ReplicateError::TargetKeyExists { ref key, .. } if key == "shared"), "{err}");
    assert!(err.to_string().contains("shared"));
}

/// `fail` on a live source: keys written during the backfill reach the target through the dirty
/// set before SCAN gets to them, and SCAN then finds keys the replicator wrote itself. None of them
/// is a conflict: the backfill ends without error, nothing is skipped, and the servers are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_policy_ignores_keys_it_wrote_itself_during_a_live_backfill() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 20_000).await;
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Fail, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    let rounds = write_until_backfilled(&replicator, &source, 20_000).await;
    let progress = caught_up_progress(&mut replicator).await;
    assert!(rounds >= 20, "writes overlapped the backfill ({rounds} rounds)");
    assert_eq!(progress.checkpoint.skipped, 0);
    assert_clean(&pair.verify().await);
}

/// The same live backfill under `fail` still stops on a key the target had before it started,
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_policy_still_stops_on_a_preexisting_key_during_a_live_backfill() {
    let (pair, source, mut target) = live_pair(&["preexisting"]).await;
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Fail, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    write_until_backfilled(&replicator, &source, 20_000).await;
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("fail policy stops");
    assert!(matches!(err, ReplicateError::TargetKeyExists { ref key, .. } if key == "preexisting"), "{err}");
    let kept: String = target.get("preexisting").await.unwrap();
    assert_eq!(kept, "from target");
}

/// A key the target had before, which the application writes (or deletes) on the source while
/// the backfill runs, is held to the policy whichever way the backfill meets it first, as a
/// dirty key or through SCAN: `fail` stops on the write, `skip` keeps the target's copy of the
/// deleted key. (With 20,000 keys in steps of 100, SCAN nearly always comes to them last.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preexisting_keys_the_application_changes_during_the_backfill_keep_their_policy() {
    let (pair, mut source, mut target) = live_pair(&["preexisting"]).await;
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Fail, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    let _: () = source.set("preexisting", "written during the backfill").await.unwrap();
    let err = replicator.caught_up(Duration::from_secs(30)).await.expect_err("fail policy stops");
    assert!(matches!(err, ReplicateError::TargetKeyExists { ref key, .. } if key == "preexisting"), "{err}");
    let kept: String = target.get("preexisting").await.unwrap();
    assert_eq!(kept, "from target");
    drop(replicator);

    let _: () = redis::cmd("FLUSHALL").query_async(&mut target).await.unwrap();
    let _: () = target.set("preexisting", "from target").await.unwrap();
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Skip, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    let _: () = source.del("preexisting").await.unwrap();
    let progress = caught_up_progress(&mut replicator).await;
    let kept: String = target.get("preexisting").await.unwrap();
    assert_eq!(kept, "from target", "not ours to delete");
    assert_eq!(progress.checkpoint.skipped, 1);
    let _: () = target.del("preexisting").await.unwrap();
    assert_clean(&pair.verify().await);
}

/// `skip` on a live source counts exactly the keys the target had before it started, not the
/// keys the replicator wrote itself, and keeps them; everything else ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_policy_counts_only_preexisting_keys_during_a_live_backfill() {
    let (pair, source, mut target) = live_pair(&["preexisting:0", "preexisting:1", "preexisting:2"]).await;
    let options = ScanOptions { batch: 100, replace: ReplacePolicy::Skip, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    let rounds = write_until_backfilled(&replicator, &source, 20_000).await;
    let progress = caught_up_progress(&mut replicator).await;
    assert!(rounds >= 20, "writes overlapped the backfill ({rounds} rounds)");
    assert_eq!(progress.checkpoint.skipped, 3);
    for i in 0..3 {
        let kept: String = target.get(format!("preexisting:{i}")).await.unwrap();
        assert_eq!(kept, "from target");
        let _: () = target.set(format!("preexisting:{i}"), "from source").await.unwrap();
    }
    assert_clean(&pair.verify().await);
}

/// SCAN may return a key more than once. A relay in front of the source makes it return every
/// step twice (each new cursor is swapped for the one before it, once): under `fail` the second
/// copies are no conflict, under `skip` nothing is counted, and the servers end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scan_returns_twice_are_no_conflicts() {
    for policy in [ReplacePolicy::Fail, ReplacePolicy::Skip] {
        let pair = Pair::start();
        let mut source = pair.source().await;
        seed_strings(&mut source, 2_000).await;
        let repeats = Arc::new(Mutex::new((Bytes::from_static(b"0"), HashSet::new())));
        let seen = repeats.clone();
        let url = relay(pair.source.addr().to_string(), move |command| {
            let BytesFrame::Array(mut args) = command else { return command };
            if let [BytesFrame::BulkString(name), BytesFrame::BulkString(cursor), ..] = args.as_mut_slice()
                && name.eq_ignore_ascii_case(b"SCAN")
            {
                let (previous, repeated) = &mut *seen.lock().unwrap();
                if cursor.as_ref() != b"0" && repeated.insert(cursor.clone()) {
                    *cursor = previous.clone();
                } else {
                    *previous = cursor.clone();
                }
            }
            BytesFrame::Array(args)
        })
        .await;
        let options = ReplicatorOptions {
            scan: ScanOptions { batch: 100, replace: policy, ..Default::default() },
            ..Default::default()
        };
        let mut replicator =
            Replicator::start(&server(&url), &pair.target_as, Mode::Scan, options, None).await.unwrap();
        let progress = caught_up_progress(&mut replicator).await;
        assert!(repeats.lock().unwrap().1.len() >= 10, "{policy:?}: SCAN steps were repeated");
        assert_eq!(progress.checkpoint.skipped, 0, "{policy:?}");
        assert_clean(&pair.verify().await);
    }
}

/// A pair whose source holds 20,000 strings, and where both servers hold each of `preexisting`,
/// with different values ("from source", "from target").
async fn live_pair(preexisting: &[&str]) -> (Pair, MultiplexedConnection, MultiplexedConnection) {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    seed_strings(&mut source, 20_000).await;
    for key in preexisting {
        let _: () = source.set(key, "from source").await.unwrap();
        let _: () = target.set(key, "from target").await.unwrap();
    }
    (pair, source, target)
}

/// Writes all over `key:<i>` (i below `keys`) while the replicator's backfill runs, so many keys
/// are changed before SCAN reaches them: SET and INCR (they become dirty and are copied first),
/// DEL, and brand-new keys. Stops once the backfill is done or the replicator has stopped; returns
/// the number of rounds written.
async fn write_until_backfilled(replicator: &Replicator, source: &MultiplexedConnection, keys: u64) -> u64 {
    let (mut progress, mut con) = (replicator.progress(), source.clone());
    let mut round = 0;
    while progress.has_changed().is_ok() && !progress.borrow_and_update().checkpoint.backfill_done() {
        let key = |n: u64| format!("key:{}", (round * 7919 + n * 4001) % keys);
        let mut p = redis::pipe();
        p.set(key(0), round).incr(key(1), 1).del(key(2)).set(format!("new:{round}"), round);
        p.exec_async(&mut con).await.expect("write");
        round += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    round
}

/// The databases in the URIs are the ones copied from and into: keys of source database 3 land
/// in target database 5 (the value path has connections of its own that must select them too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_between_the_databases_the_uris_name() {
    let pair = Pair::start();
    let db = |server: &eden_e2e::RedisServer, n: u8| format!("{}/{n}", server.url());
    let open = |url: String| async move {
        redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
    };
    let (mut source, mut other) = (open(db(&pair.source, 3)).await, pair.source().await);
    seed_strings(&mut source, 2_500).await;
    let _: () = other.set("db0-only", 1).await.unwrap();
    let (source_url, target_url) = (db(&pair.source, 3), db(&pair.target, 5));
    let mut replicator =
        Replicator::start(&server(&source_url), &server(&target_url), Mode::Scan, Default::default(), None)
            .await
            .unwrap();
    caught_up_progress(&mut replicator).await;
    let _: () = source.set("key:7", "live").await.unwrap();
    caught_up_progress(&mut replicator).await;
    let mut target = open(db(&pair.target, 5)).await;
    assert_eq!(data_keys(&mut target).await, 2_500);
    let live: String = target.get("key:7").await.unwrap();
    assert_eq!(live, "live");
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut pair.target().await).await.unwrap();
    assert_eq!(size, 0, "nothing lands in the target's database 0");
}

/// Strings move as GETRANGE and SET: every kind of value (binary, integer-encoded, empty) arrives with
/// its absolute expiry, and under `replace` a target key of another type, or with an expiry of
/// its own, is overwritten with nothing of the old key left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_copy_with_their_expiries() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    let in_ten_minutes = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 600_000;
    let mut p = redis::pipe();
    p.set("plain", "hello")
        .set("int", 12345)
        .set("empty", "")
        .set(b"bin\x00\xffkey".as_slice(), b"\x00\x01\xfe\xff".as_slice())
        .set_ex("ttl:relative", "soon", 300)
        .cmd("SET")
        .arg("ttl:absolute")
        .arg("later")
        .arg("PXAT")
        .arg(in_ten_minutes)
        .set("hash-on-target", "a string")
        .set("expiring-on-target", "for good");
    p.exec_async(&mut source).await.unwrap();
    let _: () = target.hset("hash-on-target", "f", "v").await.unwrap();
    let _: () = target.set_ex("expiring-on-target", "old", 300).await.unwrap();

    let mut replicator = pair.replicate(Default::default()).await;
    let progress = caught_up_progress(&mut replicator).await;
    assert_eq!(progress.checkpoint.copied, 8);
    let keys: [&[u8]; 8] = [
        b"plain",
        b"int",
        b"empty",
        b"bin\x00\xffkey",
        b"ttl:relative",
        b"ttl:absolute",
        b"hash-on-target",
        b"expiring-on-target",
    ];
    for key in keys {
        let (on_source, on_target): (Vec<u8>, Vec<u8>) =
            (source.get(key).await.unwrap(), target.get(key).await.unwrap());
        assert_eq!(on_source, on_target, "{}", key.escape_ascii());
        let (on_source, on_target) = (expire_time(&mut source, key).await, expire_time(&mut target, key).await);
        assert_eq!(on_source, on_target, "{}", key.escape_ascii());
    }
    assert_eq!(expire_time(&mut target, b"ttl:absolute").await, in_ten_minutes as i64);
    assert_eq!(expire_time(&mut target, b"expiring-on-target").await, -1);
    assert_clean(&pair.verify().await);
}

/// A key that is a string when SCAN finds it and a hash by the time it is read (a relay in front
/// of the source makes that write just before it passes the read on): it is read again as what
/// it now is, and ends on the target as the hash it became.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_retyped_mid_copy_ends_as_what_it_became() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 500).await;
    let _: () = source.set("shifty", "a string").await.unwrap();
    let retyped = Arc::new(AtomicBool::new(false));
    let (direct, flag) = (pair.source.url(), retyped.clone());
    let url = relay(pair.source.addr().to_string(), move |command| {
        if is_command(&command, b"GETRANGE", b"shifty") && !flag.swap(true, Ordering::SeqCst) {
            let mut con = redis::Client::open(direct.as_str()).unwrap().get_connection().unwrap();
            redis::pipe().atomic().del("shifty").hset("shifty", "f", "v").exec(&mut con).unwrap();
        }
        command
    })
    .await;
    let mut replicator =
        Replicator::start(&server(&url), &pair.target_as, Mode::Scan, Default::default(), None).await.unwrap();
    caught_up_progress(&mut replicator).await;
    assert!(retyped.load(Ordering::SeqCst), "the read of the string went through the relay");
    let mut target = pair.target().await;
    let kind: String = redis::cmd("TYPE").arg("shifty").query_async(&mut target).await.unwrap();
    assert_eq!(kind, "hash");
    let value: String = target.hget("shifty", "f").await.unwrap();
    assert_eq!(value, "v");
    assert_clean(&pair.verify().await);
}

/// A string over the big-value threshold is not taken from its first read, which stops at the
/// threshold: it moves as one DUMP payload (as before strings had a path of their own) and
/// arrives whole, with its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_string_copies_with_its_expiry() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    let value: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let _: () = source.set_ex("big", value.as_slice(), 600).await.unwrap();
    let _: () = source.set("small", "x").await.unwrap();
    let options = ScanOptions { big_key_bytes: 1 << 20, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    caught_up_progress(&mut replicator).await;
    let mut target = pair.target().await;
    let copied: Vec<u8> = target.get("big").await.unwrap();
    assert!(copied == value, "the big string arrived whole ({} of {} bytes)", copied.len(), value.len());
    assert_eq!(expire_time(&mut target, b"big").await, expire_time(&mut source, b"big").await);
    assert_clean(&pair.verify().await);
}

/// PEXPIRETIME: absolute Unix milliseconds, -1 without an expiry, -2 for no key.
async fn expire_time(con: &mut MultiplexedConnection, key: impl redis::ToRedisArgs) -> i64 {
    redis::cmd("PEXPIRETIME").arg(key).query_async(con).await.unwrap()
}

/// Whether a command the relay passes on is `name key ...`.
fn is_command(command: &BytesFrame, name: &[u8], key: &[u8]) -> bool {
    matches!(command, BytesFrame::Array(args) if matches!(
        args.as_slice(),
        [BytesFrame::BulkString(n), BytesFrame::BulkString(k), ..] if n.eq_ignore_ascii_case(name) && k == key
    ))
}

async fn caught_up_progress(replicator: &mut Replicator) -> eden_sidecar::replicate::Progress {
    replicator.caught_up(Duration::from_secs(30)).await.unwrap().expect("caught up")
}

/// With a small batch budget, strings over their share of it and every other value are DUMPed in
/// MULTIs that each fit it (a value bigger than the budget alone in its own), some of them at
/// write time, and everything still arrives whole with its expiry. The source's command counts
/// show the split: strings of 20 KiB and more leave the string read, and each key bigger than
/// the budget took an EXEC of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_budget_splits_the_reads_and_copies_exactly() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    let value = |len: usize, seed: usize| -> Vec<u8> { (0..len).map(|i| ((i + seed) % 251) as u8).collect() };
    let strings = [(1 << 10, 30), (20 << 10, 20), (200 << 10, 10), (2 << 20, 1)];
    let mut p = redis::pipe();
    let mut expiring = Vec::new();
    for (len, count) in strings {
        for n in 0..count {
            let key = format!("s:{len}:{n}");
            if n % 3 == 0 {
                p.set_ex(&key, value(len, n), 600).ignore();
                expiring.push(key);
            } else {
                p.set(&key, value(len, n)).ignore();
            }
        }
    }
    for n in 0..2 {
        p.hset_multiple(format!("h:{n}"), &[("f1", "v1"), ("f2", "v2")])
            .rpush(format!("l:{n}"), &["a", "b", "a"])
            .sadd(format!("set:{n}"), &["x", "y"])
            .zadd_multiple(format!("z:{n}"), &[(1.5, "one"), (-2.0, "two")])
            .ignore();
    }
    p.pexpire("h:0", 600_000).pexpire("z:1", 600_000).ignore();
    p.exec_async(&mut source).await.unwrap();
    expiring.extend(["h:0".to_string(), "z:1".to_string()]);
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut source).await.unwrap();

    let options = ScanOptions { batch: 100, batch_bytes: 64 << 10, ..Default::default() };
    let mut replicator = pair.replicate(options).await;
    caught_up(&mut replicator).await;
    let (dumps, execs) = (calls(&mut source, "dump").await, calls(&mut source, "exec").await);
    // 31 strings of 20 KiB and more, 8 collections; 11 values over the budget each alone in a
    // MULTI, beside the string read's.
    assert!(dumps >= 39, "{dumps} DUMPs");
    assert!(execs >= 12, "{execs} EXECs");
    for key in &expiring {
        let (on_source, on_target) = (expire_time(&mut source, key).await, expire_time(&mut target, key).await);
        assert!(on_source > 0, "{key}");
        assert_eq!(on_source, on_target, "{key}");
    }
    assert_clean(&pair.verify().await);
}

/// A batch's three keys share a budget of 15000 bytes, so strings are read up to 5000 bytes:
/// GETRANGE 0 5000 returns up to 5001, so one of 5000 bytes is taken as it is, and ones of 5001
/// and 5002 bytes (cut to the same 5001) are DUMPed and arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_at_the_string_read_cap_are_taken_whole_and_longer_ones_dumped() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    for len in [5000, 5001, 5002] {
        let _: () = source.set(format!("s:{len}"), vec![b'v'; len]).await.unwrap();
    }
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut source).await.unwrap();
    let mut replicator = pair.replicate(ScanOptions { batch_bytes: 15_000, ..Default::default() }).await;
    caught_up(&mut replicator).await;
    assert_eq!(calls(&mut source, "dump").await, 2, "the strings longer than the cap");
    for len in [5000, 5001, 5002] {
        let copied: Vec<u8> = target.get(format!("s:{len}")).await.unwrap();
        assert_eq!(copied.len(), len);
    }
    assert_clean(&pair.verify().await);
}

/// How many times the server ran `command` since its stats were last reset (`INFO commandstats`).
async fn calls(con: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(con).await.unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}
