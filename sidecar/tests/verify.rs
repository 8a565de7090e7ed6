//! The verifier finds nothing when the servers are equal, and finds each kind of difference when
//! one is introduced — so a clean report means something.

mod support_replicate;

use eden_sidecar::replicate::{DifferenceKind, Verifier, VerifyOptions};
use redis::AsyncCommands;
use support_replicate::{Pair, assert_clean, caught_up, seed_every_type};

#[tokio::test]
async fn every_type_copies_and_each_kind_of_difference_is_detected() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    seed_every_type(&mut source).await;
    let mut replicator = pair.replicate(Default::default()).await;
    caught_up(&mut replicator).await;
    replicator.stop().await.expect("stops cleanly");
    let report = pair.verify().await;
    assert_clean(&report);
    assert_eq!(report.checked, 8);
    let ttl: i64 = target.pttl("ttl:str").await.unwrap();
    assert!((298_000..=300_000).contains(&ttl), "absolute TTL carried over: {ttl}");

    // One difference of each kind.
    let _: () = target.del("str").await.unwrap();
    let _: () = target.set("only-on-target", 1).await.unwrap();
    let _: () = target.del("set").await.unwrap();
    let _: () = target.set("set", "now a string").await.unwrap();
    let _: () = target.hset("hash", "f2", "changed").await.unwrap();
    let _: () = target.pexpire("zset", 50_000).await.unwrap();
    let verifier = Verifier::connect(&pair.source_as, &pair.target_as, VerifyOptions::default()).await.unwrap();
    let report = verifier.run().await.unwrap();
    assert_eq!(
        (report.missing, report.extra, report.type_mismatch, report.value_mismatch, report.ttl_mismatch),
        (1, 1, 1, 1, 1),
        "{report:#?}"
    );
    let kinds: Vec<DifferenceKind> = report.samples.iter().map(|d| d.kind).collect();
    assert!(kinds.contains(&DifferenceKind::ValueMismatch) && kinds.contains(&DifferenceKind::Extra));

    // A value difference inside a list and a stream is found by the semantic comparison too.
    let _: () = target.lset("list", 2, "C").await.unwrap();
    let _: () = redis::cmd("XADD").arg("stream").arg("3-1").arg("k").arg("x").query_async(&mut source).await.unwrap();
    let report = verifier.recheck(&report).await.unwrap();
    assert_eq!(report.differences(), 5, "recheck sees the same five keys: {report:#?}");
    let report = verifier.run().await.unwrap();
    assert_eq!(report.value_mismatch, 3, "hash, list and stream differ: {report:#?}");

    // Repair the target by hand; a recheck of just the differing keys comes back clean.
    let _: () = redis::cmd("FLUSHDB").query_async(&mut target).await.unwrap();
    let mut replicator = pair.replicate(Default::default()).await;
    caught_up(&mut replicator).await;
    assert_clean(&verifier.recheck(&report).await.unwrap());
}

/// The servers are read one after the other, so a key about to expire may already be gone from
/// the second: within the TTL tolerance that is no difference, beyond it it still is.
#[tokio::test]
async fn keys_due_to_expire_within_the_ttl_tolerance_may_be_missing_on_one_side() {
    let pair = Pair::start();
    let (mut source, mut target) = (pair.source().await, pair.target().await);
    let _: () = source.pset_ex("expiring-on-source", 1, 800).await.unwrap();
    let _: () = target.pset_ex("expiring-on-target", 1, 800).await.unwrap();
    let _: () = source.pset_ex("lasting-on-source", 1, 60_000).await.unwrap();
    let _: () = target.pset_ex("lasting-on-target", 1, 60_000).await.unwrap();
    let report = pair.verify().await;
    assert_eq!((report.missing, report.extra), (1, 1), "{report:#?}");
    let mut keys: Vec<&str> = report.samples.iter().map(|d| d.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["lasting-on-source", "lasting-on-target"]);
}
