//! Expiry exactness in both modes, against real redis-server processes: a key whose TTL the
//! application renews all the time (sessions, rate limiters) exists on the target with the
//! source's expiry for as long as the source has it, whatever happened to its TTL while the
//! copy ran; a key the source expires or deletes is gone from the target.

mod support_replicate;

use std::time::Duration;

use eden_e2e::RedisConfig;
use eden_sidecar::replicate::{Mode, POSITION_KEY, ReplicatorOptions, SyncOptions};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support_replicate::{Pair, assert_clean, caught_up, checkpoint_of, seed_strings};

/// Session keys renewed by the application.
const SESSIONS: usize = 20;
/// Their TTL, renewed every [`RENEW_EVERY`]: a key lives 400 ms unless renewed.
const SESSION_TTL_MS: u64 = 400;
const RENEW_EVERY: Duration = Duration::from_millis(50);
/// Keys besides, so the snapshot takes longer to load than a session key has to live.
const BULK_KEYS: usize = 300_000;
/// How far the target's expiry may stray from the source's.
const TOLERANCE_MS: i64 = 1_000;

fn session(i: usize) -> String {
    format!("session:{i}")
}

/// Renews every session key (`PEXPIRE 400`) every 50 ms until the task is aborted, as an
/// application keeping sessions alive does.
fn renew_sessions(mut source: MultiplexedConnection) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut p = redis::pipe();
            for i in 0..SESSIONS {
                p.pexpire(session(i), SESSION_TTL_MS as i64).ignore();
            }
            p.exec_async(&mut source).await.expect("renew");
            tokio::time::sleep(RENEW_EVERY).await;
        }
    })
}

/// The key's PTTL on both sides: (source, target); -2 when missing, -1 without expiry.
async fn pttls(source: &mut MultiplexedConnection, target: &mut MultiplexedConnection, key: &str) -> (i64, i64) {
    (source.pttl(key).await.unwrap(), target.pttl(key).await.unwrap())
}

fn diskless() -> Pair {
    Pair::with_source(
        RedisConfig::default().directive("repl-diskless-sync", "yes").directive("repl-diskless-sync-delay", "0"),
    )
}

/// Every session key is on the target with the source's expiry, sampled every 100 ms for 4 s.
async fn sessions_stay_with_the_source_expiry(source: &mut MultiplexedConnection, target: &mut MultiplexedConnection) {
    for _ in 0..40 {
        for i in 0..SESSIONS {
            let (on_source, on_target) = pttls(source, target, &session(i)).await;
            assert!(on_source > 0, "the source keeps {} alive: {on_source}", session(i));
            assert!(on_target > 0, "{} is missing on the target (PTTL {on_target})", session(i));
            assert!((on_source - on_target).abs() <= TOLERANCE_MS, "{}: {on_source} vs {on_target} ms", session(i));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn seed_sessions(source: &mut MultiplexedConnection) {
    let mut p = redis::pipe();
    for i in 0..SESSIONS {
        p.set(session(i), i).ignore();
    }
    p.exec_async(source).await.unwrap();
}

async fn renewed_keys_stay_with_the_source_expiry(mode: Mode) {
    let pair = diskless();
    let mut source = pair.source().await;
    seed_strings(&mut source, BULK_KEYS).await;
    seed_sessions(&mut source).await;
    let mut p = redis::pipe();
    p.set("lasting", "an hour")
        .pexpire("lasting", 3_600_000)
        .set("moving", "renamed during the copy")
        .pexpire("moving", 120_000)
        .set("deleted", "by the application during the copy")
        .pexpire("deleted", 120_000)
        .set("expiring", "not renewed: the source expires it during the copy")
        .pexpire("expiring", 300);
    p.exec_async(&mut source).await.unwrap();
    let renewals = renew_sessions(source.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut replicator = pair.replicator(mode, ReplicatorOptions::default(), None).await;
    let _: () = source.rename("moving", "moved").await.unwrap();
    let _: () = source.del("deleted").await.unwrap();
    caught_up(&mut replicator).await;

    let mut target = pair.target().await;
    sessions_stay_with_the_source_expiry(&mut source, &mut target).await;
    for key in ["lasting", "moved"] {
        let (on_source, on_target) = pttls(&mut source, &mut target, key).await;
        assert!(on_source > 0 && (on_source - on_target).abs() <= TOLERANCE_MS, "{key}: {on_source} vs {on_target} ms");
    }
    for key in ["moving", "deleted", "expiring"] {
        let (on_source, on_target) = pttls(&mut source, &mut target, key).await;
        assert_eq!((on_source, on_target), (-2, -2), "{mode:?}: {key} must be gone from both");
    }
    renewals.abort();
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_keeps_keys_whose_ttl_is_renewed_during_the_copy() {
    renewed_keys_stay_with_the_source_expiry(Mode::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_mode_keeps_keys_whose_ttl_is_renewed_during_the_copy() {
    renewed_keys_stay_with_the_source_expiry(Mode::Scan).await;
}

/// Sync mode stopped while the target still holds shifted expiries (the position record says
/// so) resumes from its record, holds again, and settles: every key ends with the source's
/// expiry, none lives on with the hold's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_stopped_during_the_hold_settles_after_its_restart() {
    let pair = diskless();
    let mut source = pair.source().await;
    seed_strings(&mut source, 20_000).await;
    seed_sessions(&mut source).await;
    let _: () = source.set_ex("lasting", "an hour", 3_600).await.unwrap();
    let renewals = renew_sessions(source.clone());

    let replicator = pair.sync(SyncOptions::default(), None).await;
    let mut target = pair.target().await;
    let mut record = String::new();
    for _ in 0..1_000 {
        record = target.get::<_, Option<String>>(POSITION_KEY).await.unwrap().unwrap_or_default();
        if record.ends_with(" held") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(record.ends_with(" held"), "the snapshot loaded with expiries held: {record:?}");
    let checkpoint = checkpoint_of(replicator);
    assert!(!checkpoint.backfill_done(), "a held target is not a finished copy");
    let held: i64 = redis::cmd("PEXPIRETIME").arg("lasting").query_async(&mut target).await.unwrap();
    assert!(held > 1 << 52, "the hold shifts expiries on the target: {held}");

    let mut replicator = pair.sync(SyncOptions::default(), Some(checkpoint)).await;
    caught_up(&mut replicator).await;
    let record: String = target.get(POSITION_KEY).await.unwrap();
    assert!(!record.ends_with(" held"), "{record}");
    let (on_source, on_target) = pttls(&mut source, &mut target, "lasting").await;
    assert!((on_source - on_target).abs() <= TOLERANCE_MS, "lasting: {on_source} vs {on_target} ms");
    sessions_stay_with_the_source_expiry(&mut source, &mut target).await;
    renewals.abort();
    caught_up(&mut replicator).await;
    assert_clean(&pair.verify().await);
}
