//! The `kubectl eden` plugin (`src/bin/kubectl-eden.rs`). Its verbs are JSON merge patches of
//! a Migration: each says what the user wants, and the operator moves the data there, holding
//! (with the reason in its conditions) what the data cannot honour yet. [`status`] shows where
//! a Migration stands. Nothing here touches Redis or the sidecars.

pub mod status;

use serde_json::{Value, json};

use crate::crd::{Migration, Phase, WriteModeKind};
use crate::migration::phase::ANNOTATION_ACCEPT_LOST_WRITES;

/// What the user asks of a Migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Make the target authoritative: writes go to it, mirrored back to the source.
    Cutover,
    /// Make the source authoritative again and send it every read. `accept_lost_writes`: go on
    /// even though that many writes mirrored to the source never landed there.
    Rollback {
        accept_lost_writes: Option<u64>,
    },
    /// Detach the source: the point of no return, once cut over.
    Complete,
    Pause,
    Resume,
    /// Send this share of reads (0–100) to the target.
    SetRead {
        percentage: u8,
    },
}

/// Why a verb does not apply to a Migration as it stands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("Migration {0} is Completed: its source is detached, so there is nothing to move back or forth")]
    Completed(String),
    #[error(
        "complete detaches the source for good, so it applies only once Migration {name} is CutOver (it is {phase:?}); run `kubectl eden cutover {name}` first"
    )]
    NotCutOver { name: String, phase: Phase },
    #[error("a read share is a percentage: 0 to 100, not {0}")]
    NotAPercentage(u8),
}

/// The merge patch that asks `verb` of `migration`.
pub fn patch(migration: &Migration, verb: &Verb) -> Result<Value, Refusal> {
    let name = migration.metadata.name.clone().unwrap_or_default();
    let phase = migration.status.as_ref().and_then(|status| status.phase).unwrap_or_default();
    if phase == Phase::Completed && !matches!(verb, Verb::Pause | Verb::Resume) {
        return Err(Refusal::Completed(name));
    }
    let write_mode = |target_authoritative: bool| match migration.spec.strategy.write_mode.mode {
        WriteModeKind::DualWrite => {
            let policy = if target_authoritative { "newAuthoritative" } else { "oldAuthoritative" };
            json!({"mode": "dualWrite", "policy": policy})
        }
        WriteModeKind::Cutover => {
            json!({"mode": "cutover", "writePercentage": if target_authoritative { 100 } else { 0 }})
        }
    };
    Ok(match verb {
        Verb::Cutover => json!({"spec": {"strategy": {"writeMode": write_mode(true)}}}),
        Verb::Rollback { accept_lost_writes } => {
            let mut patch = json!({"spec": {"strategy": {"readPercentage": 0, "writeMode": write_mode(false)}}});
            if let Some(count) = accept_lost_writes {
                patch["metadata"] = json!({"annotations": {ANNOTATION_ACCEPT_LOST_WRITES: count.to_string()}});
            }
            patch
        }
        Verb::Complete if phase != Phase::CutOver => return Err(Refusal::NotCutOver { name, phase }),
        Verb::Complete => json!({"spec": {"complete": true}}),
        Verb::Pause => json!({"spec": {"paused": true}}),
        Verb::Resume => json!({"spec": {"paused": false}}),
        Verb::SetRead { percentage } if *percentage > 100 => return Err(Refusal::NotAPercentage(*percentage)),
        Verb::SetRead { percentage } => json!({"spec": {"strategy": {"readPercentage": percentage}}}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MigrationSpec, MigrationStatus};

    fn migration(write_mode: Value, phase: Phase) -> Migration {
        let spec: MigrationSpec = serde_json::from_value(json!({
            "source": {"endpointRef": {"name": "old"}},
            "target": {"endpointRef": {"name": "new"}},
            "strategy": {"readPercentage": 25, "writeMode": write_mode},
        }))
        .unwrap();
        let mut migration = Migration::new("cache", spec);
        migration.status = Some(MigrationStatus { phase: Some(phase), ..Default::default() });
        migration
    }

    #[test]
    fn cutover_and_rollback_flip_the_authoritative_side_in_either_write_mode() {
        let dual = migration(json!({"mode": "dualWrite", "policy": "oldAuthoritative"}), Phase::Ready);
        assert_eq!(
            patch(&dual, &Verb::Cutover).unwrap(),
            json!({"spec": {"strategy": {"writeMode": {"mode": "dualWrite", "policy": "newAuthoritative"}}}})
        );
        let rollback = patch(&dual, &Verb::Rollback { accept_lost_writes: None }).unwrap();
        assert_eq!(rollback["spec"]["strategy"]["writeMode"]["policy"], "oldAuthoritative");
        assert_eq!(rollback["spec"]["strategy"]["readPercentage"], 0, "every read back on the source");
        assert!(rollback.get("metadata").is_none());
        let split = migration(json!({"mode": "cutover", "writePercentage": 30}), Phase::CutOver);
        assert_eq!(patch(&split, &Verb::Cutover).unwrap()["spec"]["strategy"]["writeMode"]["writePercentage"], 100);
        let back = patch(&split, &Verb::Rollback { accept_lost_writes: Some(3) }).unwrap();
        assert_eq!(back["spec"]["strategy"]["writeMode"]["writePercentage"], 0);
        assert_eq!(back["metadata"]["annotations"][ANNOTATION_ACCEPT_LOST_WRITES], "3");
    }

    #[test]
    fn complete_waits_for_the_cutover_and_nothing_moves_a_completed_migration() {
        let dual = json!({"mode": "dualWrite", "policy": "newAuthoritative"});
        let ready = migration(dual.clone(), Phase::Ready);
        assert!(matches!(patch(&ready, &Verb::Complete), Err(Refusal::NotCutOver { phase: Phase::Ready, .. })));
        let cut_over = migration(dual.clone(), Phase::CutOver);
        assert_eq!(patch(&cut_over, &Verb::Complete).unwrap(), json!({"spec": {"complete": true}}));
        let completed = migration(dual, Phase::Completed);
        for verb in [Verb::Cutover, Verb::Rollback { accept_lost_writes: None }, Verb::Complete] {
            assert_eq!(patch(&completed, &verb), Err(Refusal::Completed("cache".into())), "{verb:?}");
        }
        assert_eq!(patch(&completed, &Verb::Pause).unwrap(), json!({"spec": {"paused": true}}));
        let set_read = Verb::SetRead { percentage: 50 };
        assert_eq!(patch(&completed, &set_read), Err(Refusal::Completed("cache".into())));
    }

    #[test]
    fn set_read_takes_a_percentage() {
        let ready = migration(json!({"mode": "dualWrite", "policy": "oldAuthoritative"}), Phase::Ready);
        let patched = patch(&ready, &Verb::SetRead { percentage: 25 }).unwrap();
        assert_eq!(patched, json!({"spec": {"strategy": {"readPercentage": 25}}}));
        assert_eq!(patch(&ready, &Verb::SetRead { percentage: 101 }), Err(Refusal::NotAPercentage(101)));
    }
}
