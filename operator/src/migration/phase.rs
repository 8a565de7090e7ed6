//! The migration phase machine (DESIGN §3) as data plus one pure function.
//!
//! [`next`] takes what the user asked for ([`MigrationSpec`]), what the operator observed
//! ([`Observed`]) and the current [`Phase`], and returns the [`Decision`]: the phase to be in,
//! the strategy the sidecars may actually apply, and why anything the user asked for is held.
//! It performs no I/O, so every transition is tested exhaustively without a server; the
//! reconciler carries decisions out.
//!
//! The rule that shapes everything: the spec says what the user wants, the phase says where
//! the data is. A request the data cannot honour yet (reads from a target that is not in
//! sync, cutover with lag) is held, never dropped, and the decision says why.

use crate::crd::{DataCopy, FailureHandling, MigrationSpec, Phase, WriteModeKind, WritePolicy};

/// Migration annotation: how many lost writes (see [`Observed::lost_source_writes`]) the user
/// accepts losing in a rollback. An explicit, recorded decision rather than a spec field,
/// because it is about one incident, not the desired state.
pub const ANNOTATION_ACCEPT_LOST_WRITES: &str = "eden.io/accept-lost-writes";
/// Migration annotation: how many lost writes to the target (see
/// [`Observed::lost_target_writes`]) the user accepts in a cutover with `data.type: none`.
pub const ANNOTATION_ACCEPT_LOST_TARGET_WRITES: &str = "eden.io/accept-lost-target-writes";

/// What the operator saw this reconciliation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub source_ready: bool,
    pub target_ready: bool,
    /// The replication engine's view; `None` until it has started.
    pub replication: Option<Replication>,
    /// Differences found by the last verification of the current data, if one ran.
    pub verification_differences: Option<i64>,
    /// Writes mirrored from the target back to the source that never landed there (the
    /// sidecars' Leases), less those the user accepted losing.
    pub lost_source_writes: i64,
    /// Writes mirrored from the source to the target that never landed there, less those the
    /// user accepted losing. Only `data.type: none` mirrors to the target.
    pub lost_target_writes: i64,
    /// Every sidecar applied the ConfigMap generation the operator last wrote, or is fenced:
    /// none can still be writing under an older one (DESIGN §9, "Fencing").
    pub sidecars_settled: bool,
    /// Lost-write counts in Leases that cannot be read (`pod: annotation=value`): the gates
    /// that depend on them stay closed.
    pub sidecar_reports_unreadable: Option<String>,
    pub cutover: CutoverProgress,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Replication {
    pub backfill_done: bool,
    pub lag_millis: i64,
    /// Replication stopped with an error it cannot recover from by itself.
    pub failed: bool,
}

/// Where the cutover protocol (DESIGN §6, §9 "Fencing") stands: a barrier generation settles
/// which sidecars may still write, writes pause, every sidecar holds them, replication drains
/// to lag 0 and stops, flip to the target, every sidecar acknowledges and releases the held
/// writes to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CutoverProgress {
    /// Every sidecar acknowledged the cutover's barrier generation or is fenced (or writes
    /// are paused already): pausing now waits only for sidecars that answer.
    pub fenced: bool,
    /// Who the cutover waits for, while it does.
    pub waiting_for: Option<String>,
    /// Every sidecar acknowledged `writes: paused` and holds new writes, or is fenced.
    pub writes_held: bool,
    /// The ConfigMap carries the flip. From here on the target may receive writes directly.
    pub flip_pushed: bool,
    /// Every sidecar acknowledged the flip, or is fenced.
    pub flipped: bool,
    /// Milliseconds since writes were paused, while they are.
    pub paused_for_millis: i64,
}

/// Who receives writes and whose reply the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// The source is authoritative. The target is written only by replication, or by the
    /// sidecars' mirror when `data.type: none` (never both: one writer per server).
    Source { mirror_to_target: bool },
    /// Writes are held in the sidecars while replication drains.
    Paused,
    /// The target is authoritative. Writes are mirrored back to the source until `complete`
    /// detaches it, so a rollback loses nothing.
    Target { mirror_to_source: bool },
    /// Split by key hash: `percentage` of keys are owned by the target, the rest by the source.
    /// Writes to target-owned keys are mirrored back to the source (rollback stays lossless),
    /// so replication must carry only source-owned keys, or mirrored writes would reach the
    /// target twice.
    Split { percentage: i32 },
}

/// What the sidecars may do: the user's strategy, clamped by what the data allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub read_percentage: i32,
    pub shadow_read_percentage: i32,
    pub writes: Writes,
}

/// Why part of the spec is not in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// `PascalCase`, for conditions and Events.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub phase: Phase,
    /// The strategy to push to the sidecars; `None` leaves them as they are (paused).
    pub effective: Option<Effective>,
    /// Replication should be running.
    pub replicate: bool,
    /// The target diverged from the source (a rollback, or a cutover aborted after the flip):
    /// replication must start over with a full copy rather than resume.
    pub fresh_copy: bool,
    pub ready_for_cutover: bool,
    pub held: Vec<Held>,
}

/// The next phase and what to push, given the current phase.
pub fn next(spec: &MigrationSpec, observed: &Observed, current: Phase) -> Decision {
    let mut held = Vec::new();
    let in_sync = in_sync(spec, observed, &mut held);
    let phase = next_phase(spec, observed, current, in_sync, &mut held);
    let effective = (phase != Phase::Paused).then(|| effective(spec, observed, phase, &mut held));
    if phase == Phase::CutOver && split_needs_key_filter(spec) {
        held.push(split_held());
    }
    let flipping = phase == Phase::CuttingOver && flip_due(spec, observed);
    Decision {
        phase,
        effective,
        replicate: spec.data.type_ != DataCopy::None
            && match phase {
                Phase::Syncing | Phase::Ready | Phase::Failed => true,
                // Replication stops before the flip: writes the sidecars then mirror to the
                // source must not come back to the target through the source's stream.
                Phase::CuttingOver => !flipping,
                // Source-owned keys still change on the source and must reach the target.
                Phase::CutOver => matches!(effective.map(|e| e.writes), Some(Writes::Split { .. })),
                _ => false,
            },
        fresh_copy: phase == Phase::Syncing
            && (current == Phase::RolledBack || (current == Phase::CuttingOver && observed.cutover.flip_pushed)),
        ready_for_cutover: in_sync && matches!(phase, Phase::Ready | Phase::CuttingOver),
        held,
    }
}

/// Whether the cutover has reached the flip: every sidecar holds writes and nothing is left
/// to replicate (or the flip was already pushed, which is final).
fn flip_due(spec: &MigrationSpec, observed: &Observed) -> bool {
    let drained = spec.data.type_ == DataCopy::None
        || observed.replication.is_some_and(|r| r.backfill_done && r.lag_millis == 0 && !r.failed);
    observed.cutover.flip_pushed || (observed.cutover.writes_held && drained)
}

fn next_phase(spec: &MigrationSpec, observed: &Observed, current: Phase, in_sync: bool, held: &mut Vec<Held>) -> Phase {
    use Phase::*;
    if spec.paused {
        return if current == Completed { Completed } else { Paused };
    }
    let wants_target = wants_target_authority(spec);
    // Resuming continues from where the data is, not from where the pause began.
    let current = match current {
        Paused if observed.cutover.flipped => CutOver,
        Paused => Syncing,
        other => other,
    };
    match current {
        Completed => Completed,
        CutOver if spec.complete => {
            if let Writes::Split { percentage } = target_writes(spec, CutOver) {
                held.push(Held {
                    reason: "CompleteHeld",
                    message: format!("complete needs every key on the target; writePercentage is {percentage}"),
                });
                CutOver
            } else {
                Completed
            }
        }
        CutOver if wants_target => CutOver,
        CutOver if let Some(unreadable) = &observed.sidecar_reports_unreadable => {
            held.push(unreadable_counts(unreadable));
            CutOver
        }
        CutOver if observed.lost_source_writes > 0 => {
            held.push(Held {
                reason: "RollbackNotLossless",
                message: format!(
                    "{} writes mirrored to the source never landed there; rolling back now would lose them. \
                     To roll back anyway, annotate the Migration {ANNOTATION_ACCEPT_LOST_WRITES}=<that count or more>",
                    observed.lost_source_writes
                ),
            });
            CutOver
        }
        CutOver => RollingBack,
        RollingBack if observed.sidecars_settled => RolledBack,
        RollingBack => RollingBack,
        // Trying again after a rollback starts from a fresh copy: the target has diverged.
        RolledBack if wants_target => Syncing,
        RolledBack => RolledBack,
        Pending | Syncing | Ready | CuttingOver | Failed => {
            if observed.replication.is_some_and(|r| r.failed) {
                return match spec.failure_handling {
                    FailureHandling::RollbackAll => RollingBack,
                    FailureHandling::Pause => Failed,
                };
            }
            if current == Pending && !(observed.source_ready && observed.target_ready) {
                held.push(endpoints_not_ready(observed));
                return Pending;
            }
            if current == CuttingOver {
                if observed.cutover.flipped {
                    return CutOver;
                }
                if let Some(waiting) = observed.cutover.waiting_for.clone() {
                    held.push(Held { reason: "SidecarsNotSettled", message: waiting });
                }
                if observed.cutover.paused_for_millis > spec.cutover.max_write_pause_millis {
                    held.push(Held {
                        reason: "CutoverAborted",
                        message: format!(
                            "writes were held {}ms, over maxWritePauseMillis {}; they resumed on the source",
                            observed.cutover.paused_for_millis, spec.cutover.max_write_pause_millis
                        ),
                    });
                    // After the flip some writes may have reached the target directly (and the
                    // source through the mirror): only a fresh copy makes the target exact again.
                    return if in_sync && !observed.cutover.flip_pushed { Ready } else { Syncing };
                }
                if observed.cutover.flip_pushed {
                    return CuttingOver;
                }
            }
            if !in_sync {
                if wants_target {
                    held.push(Held { reason: "CutoverHeld", message: "the target is not in sync yet".into() });
                }
                Syncing
            } else if wants_target && split_needs_key_filter(spec) {
                held.push(split_held());
                Ready
            } else if wants_target && let Some(unreadable) = &observed.sidecar_reports_unreadable {
                held.push(unreadable_counts(unreadable));
                Ready
            } else if wants_target {
                CuttingOver
            } else {
                Ready
            }
        }
        Paused => unreachable!("resolved above"),
    }
}

/// A split (`writePercentage` 1–99) lets the sidecars write target-owned keys to the target
/// directly while replication keeps copying the source. Replication would then have to skip
/// target-owned keys (the source receives them too, mirrored), or they would reach the target
/// twice; the engine cannot skip keys yet, so with a copy running the split is held.
fn split_needs_key_filter(spec: &MigrationSpec) -> bool {
    let mode = &spec.strategy.write_mode;
    spec.data.type_ != DataCopy::None
        && mode.mode == WriteModeKind::Cutover
        && mode.write_percentage.is_some_and(|p| (1..100).contains(&p))
}

fn split_held() -> Held {
    Held {
        reason: "SplitHeld",
        message: "writePercentage between 1 and 99 needs replication to skip target-owned keys, which it cannot \
                  do yet; use 0 or 100, or data.type none"
            .into(),
    }
}

fn wants_target_authority(spec: &MigrationSpec) -> bool {
    let mode = &spec.strategy.write_mode;
    match mode.mode {
        WriteModeKind::DualWrite => mode.policy == Some(WritePolicy::NewAuthoritative),
        WriteModeKind::Cutover => mode.write_percentage.unwrap_or(100) > 0,
    }
}

/// Whether the target holds the source's data closely enough to serve it, and if not, why.
fn in_sync(spec: &MigrationSpec, observed: &Observed, held: &mut Vec<Held>) -> bool {
    if spec.data.type_ == DataCopy::None {
        // Pure dual-write: the target fills as keys are written and the old ones expire. A
        // write whose mirror never landed left an older value there, which it would serve.
        if observed.lost_target_writes > 0 {
            held.push(Held {
                reason: "TargetWritesLost",
                message: format!(
                    "{} writes mirrored to the target never landed there, so it holds older values for \
                     those keys. To go on anyway, annotate the Migration {ANNOTATION_ACCEPT_LOST_TARGET_WRITES}=<that \
                     count or more>",
                    observed.lost_target_writes
                ),
            });
            return false;
        }
        return observed.target_ready;
    }
    let Some(replication) = observed.replication.filter(|r| r.backfill_done) else {
        return false;
    };
    if replication.lag_millis > spec.cutover.max_lag_millis {
        held.push(Held {
            reason: "LagAboveGuard",
            message: format!(
                "replication lag {}ms is above maxLagMillis {}",
                replication.lag_millis, spec.cutover.max_lag_millis
            ),
        });
        return false;
    }
    if !spec.cutover.require_verification {
        return true;
    }
    let (reason, message) = match observed.verification_differences {
        Some(0) => return true,
        Some(differences) => ("VerificationFailed", format!("the last verification found {differences} differences")),
        None => ("VerificationPending", "waiting for a verification of the copied data".to_string()),
    };
    held.push(Held { reason, message });
    false
}

fn unreadable_counts(unreadable: &str) -> Held {
    Held {
        reason: "SidecarReportUnreadable",
        message: format!(
            "lost-write counts in sidecar Leases cannot be read ({unreadable}); moving writes could lose what they count"
        ),
    }
}

fn endpoints_not_ready(observed: &Observed) -> Held {
    let waiting: Vec<&str> = [(observed.source_ready, "source"), (observed.target_ready, "target")]
        .into_iter()
        .filter_map(|(ready, name)| (!ready).then_some(name))
        .collect();
    Held {
        reason: "EndpointsNotReady",
        message: format!("waiting for the {} Endpoint to be Ready", waiting.join(" and ")),
    }
}

/// How writes go once the target is authoritative in `phase` (CutOver or Completed).
fn target_writes(spec: &MigrationSpec, phase: Phase) -> Writes {
    let mode = &spec.strategy.write_mode;
    match (mode.mode, mode.write_percentage) {
        (WriteModeKind::Cutover, Some(percentage)) if percentage < 100 && !split_needs_key_filter(spec) => {
            Writes::Split { percentage }
        }
        _ => Writes::Target { mirror_to_source: phase == Phase::CutOver },
    }
}

/// The strategy the sidecars may apply in `phase`.
fn effective(spec: &MigrationSpec, observed: &Observed, phase: Phase, held: &mut Vec<Held>) -> Effective {
    let strategy = &spec.strategy;
    let requested = (strategy.read_percentage, strategy.shadow_read_percentage);
    let (reads, writes) = match phase {
        Phase::Ready => (requested, Writes::Source { mirror_to_target: spec.data.type_ == DataCopy::None }),
        Phase::CuttingOver if flip_due(spec, observed) => (requested, target_writes(spec, Phase::CutOver)),
        // Before the pause, every sidecar either answers the barrier or is fenced: a sidecar
        // cut off from the API server then costs time before writes pause, not during.
        Phase::CuttingOver if !observed.cutover.fenced => {
            (requested, Writes::Source { mirror_to_target: spec.data.type_ == DataCopy::None })
        }
        Phase::CuttingOver => (requested, Writes::Paused),
        Phase::CutOver => (requested, target_writes(spec, phase)),
        // The source is detached: everything is served by the target.
        Phase::Completed => ((100, 0), target_writes(spec, phase)),
        Phase::Syncing => {
            if requested != (0, 0) {
                held.push(Held {
                    reason: "ReadsHeld",
                    message: format!(
                        "readPercentage {} and shadowReadPercentage {} wait until the target is in sync",
                        strategy.read_percentage, strategy.shadow_read_percentage
                    ),
                });
            }
            ((0, 0), Writes::Source { mirror_to_target: spec.data.type_ == DataCopy::None })
        }
        Phase::Pending | Phase::Failed | Phase::RollingBack | Phase::RolledBack | Phase::Paused => {
            ((0, 0), Writes::Source { mirror_to_target: spec.data.type_ == DataCopy::None })
        }
    };
    Effective { read_percentage: reads.0, shadow_read_percentage: reads.1, writes }
}
