//! The phase machine, tested as scenarios a user lives through and as invariants checked over
//! every phase and a grid of observations and specs.

use super::phase::{CutoverProgress, Decision, Effective, Observed, Replication, Writes, next};
use crate::crd::{
    DataCopy, EndpointSelector, FailureHandling, LocalObjectRef, MigrationSpec, Phase, WriteMode, WriteModeKind,
    WritePolicy,
};

fn spec() -> MigrationSpec {
    let endpoint = |name: &str| EndpointSelector { endpoint_ref: LocalObjectRef { name: name.into() } };
    MigrationSpec {
        source: endpoint("source"),
        target: endpoint("target"),
        strategy: Default::default(),
        data: Default::default(),
        failure_handling: Default::default(),
        cutover: Default::default(),
        paused: false,
        complete: false,
        gateway: None,
    }
}

fn with_reads(mut spec: MigrationSpec, read_percentage: i32) -> MigrationSpec {
    spec.strategy.read_percentage = read_percentage;
    spec
}

fn new_authoritative(mut spec: MigrationSpec) -> MigrationSpec {
    spec.strategy.write_mode = WriteMode {
        mode: WriteModeKind::DualWrite,
        policy: Some(WritePolicy::NewAuthoritative),
        write_percentage: None,
    };
    spec
}

fn ready_endpoints() -> Observed {
    Observed { source_ready: true, target_ready: true, ..Default::default() }
}

fn in_sync() -> Observed {
    Observed {
        replication: Some(Replication { backfill_done: true, lag_millis: 0, failed: false }),
        verification_differences: Some(0),
        sidecars_settled: true,
        ..ready_endpoints()
    }
}

fn reasons(decision: &Decision) -> Vec<&'static str> {
    decision.held.iter().map(|h| h.reason).collect()
}

fn writes(decision: &Decision) -> Writes {
    decision.effective.expect("a strategy to push").writes
}

#[test]
fn a_migration_waits_for_its_endpoints_then_syncs_then_is_ready() {
    let spec = with_reads(spec(), 25);

    let waiting = next(&spec, &Observed { source_ready: true, ..Default::default() }, Phase::Pending);
    assert_eq!(waiting.phase, Phase::Pending);
    assert_eq!(waiting.held[0].message, "waiting for the target Endpoint to be Ready");
    assert!(!waiting.replicate);

    let syncing = next(&spec, &ready_endpoints(), Phase::Pending);
    assert_eq!(syncing.phase, Phase::Syncing);
    assert!(syncing.replicate);
    assert_eq!(syncing.effective.unwrap().read_percentage, 0, "reads wait for the copy");
    assert!(reasons(&syncing).contains(&"ReadsHeld"));

    let copied_unverified = Observed { verification_differences: None, ..in_sync() };
    let unverified = next(&spec, &copied_unverified, Phase::Syncing);
    assert_eq!(unverified.phase, Phase::Syncing);
    assert!(reasons(&unverified).contains(&"VerificationPending"));

    let ready = next(&spec, &in_sync(), Phase::Syncing);
    assert_eq!(ready.phase, Phase::Ready);
    assert!(ready.ready_for_cutover);
    assert_eq!(
        ready.effective,
        Some(Effective {
            read_percentage: 25,
            shadow_read_percentage: 0,
            writes: Writes::Source { mirror_to_target: false }
        })
    );
    assert!(ready.held.is_empty(), "{:?}", ready.held);
}

#[test]
fn lag_above_the_guard_holds_cutover_and_target_reads() {
    let spec = with_reads(new_authoritative(spec()), 50);
    let lagging = Observed {
        replication: Some(Replication { backfill_done: true, lag_millis: 350, failed: false }),
        ..in_sync()
    };
    for current in [Phase::Syncing, Phase::Ready] {
        let decision = next(&spec, &lagging, current);
        assert_eq!(decision.phase, Phase::Syncing, "from {current:?}");
        assert_eq!(decision.held[0].message, "replication lag 350ms is above maxLagMillis 100");
        assert!(reasons(&decision).contains(&"CutoverHeld"));
        assert_eq!(decision.effective.unwrap().read_percentage, 0);
        assert!(!decision.ready_for_cutover);
    }
}

fn during_cutover(
    writes_held: bool,
    lag_millis: i64,
    flip_pushed: bool,
    flipped: bool,
    paused_for_millis: i64,
) -> Observed {
    Observed {
        replication: Some(Replication { backfill_done: true, lag_millis, failed: false }),
        cutover: CutoverProgress {
            fenced: true,
            writes_held,
            flip_pushed,
            flipped,
            paused_for_millis,
            waiting_for: None,
        },
        ..in_sync()
    }
}

#[test]
fn cutover_holds_writes_drains_stops_replication_then_flips() {
    let spec = new_authoritative(spec());
    let barrier = next(&spec, &in_sync(), Phase::Ready);
    assert_eq!(barrier.phase, Phase::CuttingOver);
    assert_eq!(
        writes(&barrier),
        Writes::Source { mirror_to_target: false },
        "writes flow until every sidecar is settled"
    );
    let waiting = Observed {
        cutover: CutoverProgress { waiting_for: Some("waiting for app-1".into()), ..Default::default() },
        ..in_sync()
    };
    let still = next(&spec, &waiting, Phase::CuttingOver);
    assert_eq!((still.phase, writes(&still)), (Phase::CuttingOver, Writes::Source { mirror_to_target: false }));
    assert_eq!(reasons(&still), ["SidecarsNotSettled"]);
    assert_eq!(still.held[0].message, "waiting for app-1");

    let fenced = Observed { cutover: CutoverProgress { fenced: true, ..Default::default() }, ..in_sync() };
    let pausing = next(&spec, &fenced, Phase::CuttingOver);
    assert_eq!(pausing.phase, Phase::CuttingOver);
    assert_eq!(writes(&pausing), Writes::Paused);
    assert!(pausing.replicate);

    let draining = next(&spec, &during_cutover(true, 40, false, false, 300), Phase::CuttingOver);
    assert_eq!((draining.phase, writes(&draining)), (Phase::CuttingOver, Writes::Paused));
    assert!(draining.replicate, "replication drains while every sidecar holds writes");

    let flip = next(&spec, &during_cutover(true, 0, false, false, 400), Phase::CuttingOver);
    assert_eq!(flip.phase, Phase::CuttingOver);
    assert_eq!(writes(&flip), Writes::Target { mirror_to_source: true }, "drained: the flip is pushed");
    assert!(!flip.replicate, "replication stops before the target takes writes");

    let awaiting_acks = next(&spec, &during_cutover(true, 900, true, false, 500), Phase::CuttingOver);
    assert_eq!(
        (awaiting_acks.phase, writes(&awaiting_acks)),
        (Phase::CuttingOver, Writes::Target { mirror_to_source: true })
    );
    assert!(!awaiting_acks.replicate, "a pushed flip is final, whatever replication reports");

    let cut_over = next(&spec, &during_cutover(true, 0, true, true, 600), Phase::CuttingOver);
    assert_eq!(cut_over.phase, Phase::CutOver);
    assert_eq!(writes(&cut_over), Writes::Target { mirror_to_source: true });
    assert!(!cut_over.replicate);
}

#[test]
fn a_cutover_that_holds_writes_too_long_aborts_and_writes_resume_on_the_source() {
    let spec = new_authoritative(spec());
    let before_flip = next(&spec, &during_cutover(true, 30, false, false, 2_001), Phase::CuttingOver);
    assert_eq!(before_flip.phase, Phase::Ready);
    assert_eq!(writes(&before_flip), Writes::Source { mirror_to_target: false });
    assert_eq!(reasons(&before_flip), ["CutoverAborted"]);
    assert!(!before_flip.fresh_copy, "nothing reached the target: replication resumes");

    let after_flip = next(&spec, &during_cutover(true, 0, true, false, 2_001), Phase::CuttingOver);
    assert_eq!(after_flip.phase, Phase::Syncing);
    assert_eq!(writes(&after_flip), Writes::Source { mirror_to_target: false });
    assert!(after_flip.fresh_copy, "some writes may have reached the target directly");
}

#[test]
fn rollback_after_cutover_is_lossless_or_held() {
    let back = spec();
    let flipped = Observed {
        cutover: CutoverProgress { flip_pushed: true, flipped: true, ..Default::default() },
        sidecars_settled: false,
        ..in_sync()
    };

    let rolling = next(&back, &flipped, Phase::CutOver);
    assert_eq!(rolling.phase, Phase::RollingBack);
    assert_eq!(writes(&rolling), Writes::Source { mirror_to_target: false });
    assert_eq!(rolling.effective.unwrap().read_percentage, 0);
    assert_eq!(next(&back, &flipped, Phase::RollingBack).phase, Phase::RollingBack, "until the sidecars ack");
    let acked = Observed { sidecars_settled: true, ..flipped.clone() };
    assert_eq!(next(&back, &acked, Phase::RollingBack).phase, Phase::RolledBack);

    let lossy = Observed { lost_source_writes: 3, ..flipped };
    let held = next(&back, &lossy, Phase::CutOver);
    assert_eq!(held.phase, Phase::CutOver, "writes stay on the target");
    assert_eq!(writes(&held), Writes::Target { mirror_to_source: true });
    assert_eq!(reasons(&held), ["RollbackNotLossless"]);
    assert!(held.held[0].message.starts_with("3 writes mirrored to the source never landed"));
    assert!(held.held[0].message.contains("eden.io/accept-lost-writes"), "says how to go on");

    let retry = next(&new_authoritative(spec()), &acked, Phase::RolledBack);
    assert_eq!(retry.phase, Phase::Syncing);
    assert!(retry.fresh_copy, "trying again starts from a fresh copy");
}

#[test]
fn complete_detaches_the_source_only_when_the_target_owns_every_key() {
    let flipped =
        Observed { cutover: CutoverProgress { flip_pushed: true, flipped: true, ..Default::default() }, ..in_sync() };
    let mut complete = new_authoritative(spec());
    complete.complete = true;
    let done = next(&complete, &flipped, Phase::CutOver);
    assert_eq!(done.phase, Phase::Completed);
    assert_eq!(
        done.effective,
        Some(Effective {
            read_percentage: 100,
            shadow_read_percentage: 0,
            writes: Writes::Target { mirror_to_source: false }
        })
    );

    complete.strategy.write_mode = WriteMode { mode: WriteModeKind::Cutover, policy: None, write_percentage: Some(60) };
    complete.data.type_ = DataCopy::None;
    let split = next(&complete, &flipped, Phase::CutOver);
    assert_eq!(split.phase, Phase::CutOver);
    assert_eq!(writes(&split), Writes::Split { percentage: 60 });
    assert_eq!(reasons(&split), ["CompleteHeld"]);
}

#[test]
fn a_split_is_held_while_replication_cannot_skip_target_owned_keys() {
    let mut split = spec();
    split.strategy.write_mode = WriteMode { mode: WriteModeKind::Cutover, policy: None, write_percentage: Some(60) };
    let before = next(&split, &in_sync(), Phase::Ready);
    assert_eq!(before.phase, Phase::Ready, "the cutover does not start");
    assert_eq!(reasons(&before), ["SplitHeld"]);
    assert_eq!(writes(&before), Writes::Source { mirror_to_target: false });

    let flipped =
        Observed { cutover: CutoverProgress { flip_pushed: true, flipped: true, ..Default::default() }, ..in_sync() };
    let after = next(&split, &flipped, Phase::CutOver);
    assert_eq!(after.phase, Phase::CutOver, "lowering the share after a cutover is not a rollback");
    assert_eq!(writes(&after), Writes::Target { mirror_to_source: true });
    assert!(!after.replicate, "no second writer to the target");
    assert_eq!(reasons(&after), ["SplitHeld"]);
}

#[test]
fn pause_freezes_everything_and_resume_continues_where_the_data_is() {
    let mut paused = new_authoritative(spec());
    paused.paused = true;
    let flipped =
        Observed { cutover: CutoverProgress { flip_pushed: true, flipped: true, ..Default::default() }, ..in_sync() };
    let frozen = next(&paused, &flipped, Phase::CutOver);
    assert_eq!(frozen.phase, Phase::Paused);
    assert_eq!(frozen.effective, None, "the sidecars keep their configuration");
    assert!(!frozen.replicate);

    let resumed = next(&new_authoritative(spec()), &flipped, Phase::Paused);
    assert_eq!(resumed.phase, Phase::CutOver, "target authority survives a pause");
    let resumed = next(&spec(), &in_sync(), Phase::Paused);
    assert_eq!(resumed.phase, Phase::Ready);
}

#[test]
fn a_replication_failure_follows_failure_handling() {
    let failing = Observed {
        replication: Some(Replication { backfill_done: false, lag_millis: 0, failed: true }),
        ..ready_endpoints()
    };
    for current in [Phase::Syncing, Phase::Ready, Phase::CuttingOver] {
        let rollback = next(&spec(), &failing, current);
        assert_eq!(rollback.phase, Phase::RollingBack, "from {current:?}");
        assert_eq!(writes(&rollback), Writes::Source { mirror_to_target: false }, "held writes are released");
    }
    let mut pause = spec();
    pause.failure_handling = FailureHandling::Pause;
    let failed = next(&pause, &failing, Phase::Syncing);
    assert_eq!(failed.phase, Phase::Failed);
    assert!(failed.replicate, "replication keeps retrying");
    let recovered = Observed {
        replication: Some(Replication { backfill_done: false, lag_millis: 0, failed: false }),
        ..ready_endpoints()
    };
    assert_eq!(next(&pause, &recovered, Phase::Failed).phase, Phase::Syncing);
}

#[test]
fn pure_dual_write_mirrors_from_the_sidecars_and_never_replicates() {
    let mut caches = with_reads(spec(), 30);
    caches.data.type_ = DataCopy::None;
    let decision = next(&caches, &ready_endpoints(), Phase::Pending);
    assert_eq!(decision.phase, Phase::Ready);
    assert!(!decision.replicate);
    assert_eq!(
        decision.effective,
        Some(Effective {
            read_percentage: 30,
            shadow_read_percentage: 0,
            writes: Writes::Source { mirror_to_target: true }
        })
    );
}

#[test]
fn pure_dual_write_holds_cutover_and_target_reads_over_lost_target_writes() {
    let mut caches = new_authoritative(with_reads(spec(), 30));
    caches.data.type_ = DataCopy::None;
    let lossy = Observed { lost_target_writes: 4, ..ready_endpoints() };
    let held = next(&caches, &lossy, Phase::Ready);
    assert_eq!(held.phase, Phase::Syncing, "the cutover does not start");
    assert!(!held.ready_for_cutover);
    assert_eq!(held.effective.unwrap().read_percentage, 0, "the stale target serves no reads");
    assert_eq!(writes(&held), Writes::Source { mirror_to_target: true }, "writes still reach both sides");
    assert!(reasons(&held).contains(&"TargetWritesLost"));
    let message = &held.held.iter().find(|h| h.reason == "TargetWritesLost").unwrap().message;
    assert!(message.starts_with("4 writes mirrored to the target never landed"), "{message}");
    assert!(message.contains("eden.io/accept-lost-target-writes"), "says how to go on");

    // Accepted (the observation counts only what the annotation does not cover): it goes on.
    assert_eq!(next(&caches, &ready_endpoints(), Phase::Ready).phase, Phase::CuttingOver);
}

/// Every combination of phase, observation and a representative set of specs keeps the
/// safety properties of DESIGN §3 and §4.
#[test]
fn invariants_hold_everywhere() {
    let phases = [
        Phase::Pending,
        Phase::Syncing,
        Phase::Ready,
        Phase::CuttingOver,
        Phase::CutOver,
        Phase::Completed,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::Paused,
        Phase::Failed,
    ];
    let replications = [
        None,
        Some(Replication { backfill_done: false, lag_millis: 0, failed: false }),
        Some(Replication { backfill_done: true, lag_millis: 0, failed: false }),
        Some(Replication { backfill_done: true, lag_millis: 500, failed: false }),
        Some(Replication { backfill_done: true, lag_millis: 0, failed: true }),
    ];
    let write_modes = [
        WriteMode::default(),
        WriteMode {
            mode: WriteModeKind::DualWrite,
            policy: Some(WritePolicy::NewAuthoritative),
            write_percentage: None,
        },
        WriteMode { mode: WriteModeKind::Cutover, policy: None, write_percentage: Some(50) },
        WriteMode { mode: WriteModeKind::Cutover, policy: None, write_percentage: Some(100) },
    ];
    let mut checked = 0;
    for current in phases {
        for (source_ready, target_ready) in [(true, true), (true, false), (false, true)] {
            for replication in replications {
                for verification_differences in [None, Some(0), Some(4)] {
                    for (lost_source_writes, lost_target_writes) in [(0, 0), (2, 0), (0, 2)] {
                        for (sidecars_settled, sidecar_reports_unreadable) in [
                            (true, None),
                            (false, None),
                            (true, Some("app-1: eden.io/lost-source-writes=\"x\"".to_string())),
                        ] {
                            for cutover in [
                                CutoverProgress::default(),
                                CutoverProgress { fenced: true, ..Default::default() },
                                CutoverProgress {
                                    fenced: true,
                                    writes_held: true,
                                    paused_for_millis: 100,
                                    ..Default::default()
                                },
                                CutoverProgress {
                                    fenced: true,
                                    writes_held: true,
                                    paused_for_millis: 5_000,
                                    ..Default::default()
                                },
                                CutoverProgress {
                                    fenced: true,
                                    waiting_for: None,
                                    writes_held: true,
                                    flip_pushed: true,
                                    flipped: false,
                                    paused_for_millis: 100,
                                },
                                CutoverProgress {
                                    fenced: true,
                                    waiting_for: None,
                                    writes_held: true,
                                    flip_pushed: true,
                                    flipped: false,
                                    paused_for_millis: 5_000,
                                },
                                CutoverProgress {
                                    fenced: true,
                                    waiting_for: None,
                                    writes_held: true,
                                    flip_pushed: true,
                                    flipped: true,
                                    paused_for_millis: 0,
                                },
                            ] {
                                let observed = Observed {
                                    source_ready,
                                    target_ready,
                                    replication,
                                    verification_differences,
                                    lost_source_writes,
                                    lost_target_writes,
                                    sidecars_settled,
                                    sidecar_reports_unreadable: sidecar_reports_unreadable.clone(),
                                    cutover,
                                };
                                for write_mode in &write_modes {
                                    for (paused, complete, data, reads) in [
                                        (false, false, DataCopy::Sync, 40),
                                        (true, false, DataCopy::Sync, 40),
                                        (false, true, DataCopy::Sync, 0),
                                        (false, false, DataCopy::None, 40),
                                        (false, false, DataCopy::Scan, 0),
                                    ] {
                                        let mut spec = with_reads(spec(), reads);
                                        spec.strategy.write_mode = write_mode.clone();
                                        (spec.paused, spec.complete, spec.data.type_) = (paused, complete, data);
                                        check_invariants(&spec, &observed, current);
                                        checked += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(checked, 10 * 3 * 5 * 3 * 3 * 3 * 7 * 4 * 5);
}

fn check_invariants(spec: &MigrationSpec, observed: &Observed, current: Phase) {
    let decision = next(spec, observed, current);
    let context = || format!("{current:?} -> {:?} with {observed:?} and {:?}", decision.phase, spec.strategy);
    let target_holds_writes = matches!(decision.phase, Phase::CutOver | Phase::Completed);

    if current == Phase::Completed {
        assert_eq!(decision.phase, Phase::Completed, "Completed is final: {}", context());
    }
    if spec.paused {
        assert!(decision.effective.is_none() || decision.phase == Phase::Completed, "{}", context());
        assert!(!decision.replicate, "a paused migration copies nothing: {}", context());
    }
    if spec.data.type_ == DataCopy::None {
        assert!(!decision.replicate, "no copy for data.type none: {}", context());
        if observed.lost_target_writes > 0 && current != Phase::CuttingOver {
            assert_ne!(decision.phase, Phase::CuttingOver, "no cutover over lost target writes: {}", context());
        }
    }
    if observed.sidecar_reports_unreadable.is_some() {
        assert!(
            !(current == Phase::CutOver && decision.phase == Phase::RollingBack),
            "no rollback over lost-write counts that cannot be read: {}",
            context()
        );
        assert!(
            current == Phase::CuttingOver || decision.phase != Phase::CuttingOver,
            "no cutover over lost-write counts that cannot be read: {}",
            context()
        );
    }
    if current == Phase::RollingBack && decision.phase == Phase::RolledBack {
        assert!(observed.sidecars_settled, "rolled back only once no sidecar can write to the target: {}", context());
    }
    let Some(effective) = decision.effective else { return };
    match effective.writes {
        Writes::Paused => {
            assert_eq!(decision.phase, Phase::CuttingOver, "writes are held only while cutting over: {}", context());
            assert!(observed.cutover.fenced, "writes pause only once every sidecar is settled: {}", context());
        }
        Writes::Target { .. } | Writes::Split { .. } => {
            assert!(target_holds_writes || decision.phase == Phase::CuttingOver, "{}", context());
            if decision.phase == Phase::CuttingOver {
                assert!(
                    observed.cutover.writes_held || observed.cutover.flip_pushed,
                    "writes move only once every sidecar holds them or is fenced: {}",
                    context()
                );
            }
        }
        Writes::Source { mirror_to_target } => {
            assert!(!target_holds_writes, "{}", context());
            // One writer per server: either replication or the sidecars' mirror feeds the target.
            assert!(!(mirror_to_target && decision.replicate), "two writers to the target: {}", context());
            assert_eq!(mirror_to_target, spec.data.type_ == DataCopy::None, "{}", context());
        }
    }
    if let Writes::Target { mirror_to_source: true } = effective.writes {
        assert!(!decision.replicate, "two writers to the source: {}", context());
    }
    if effective.read_percentage > 0 && !target_holds_writes && decision.phase != Phase::CuttingOver {
        assert!(decision.ready_for_cutover, "reads reach the target only when it is in sync: {}", context());
    }
    if decision.fresh_copy {
        assert_eq!(decision.phase, Phase::Syncing, "{}", context());
    }
    if current == Phase::CuttingOver && observed.cutover.flip_pushed {
        assert_ne!(
            decision.phase,
            Phase::Ready,
            "after the flip only a fresh copy makes the target exact: {}",
            context()
        );
    }
    if current == Phase::CutOver && decision.phase == Phase::RollingBack {
        assert_eq!(observed.lost_source_writes, 0, "a rollback never loses mirrored writes: {}", context());
    }
    if decision.phase == Phase::Ready || decision.phase == Phase::CuttingOver && current != Phase::CuttingOver {
        assert!(decision.ready_for_cutover, "{}", context());
    }
}
