//! The replicator's resumable state: which SCAN passes remain and where the current one stands
//! (scan mode), or where the target stands in the source's replication stream (sync mode).
//!
//! A restarted replicator missed every notification sent while it was down, so resuming is only
//! exact with a second look at the keys already copied. The choice here: finish the interrupted
//! pass from its cursor (keys not yet visited are copied with the new subscription already in
//! place), then run one full re-copy pass and one prune pass over the target. That costs at most
//! one extra pass, never copies a stale value last, and needs no per-key memory.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One SCAN over a server, resumable from its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pass", rename_all = "lowercase")]
pub enum Pass {
    /// The first SCAN of the source, copying every key under the configured
    /// [`super::ReplacePolicy`].
    Backfill { cursor: u64 },
    /// SCAN the source and copy every key again, always replacing (after lost notifications the
    /// source is the truth for every key).
    Recopy { cursor: u64 },
    /// SCAN the target and delete keys the source no longer has (deletes whose notifications
    /// were lost). Only under `replace`: under `skip` and `fail` a key only the target has may
    /// be one it had before, which those policies exist to keep.
    Prune { cursor: u64 },
}

/// Serializable progress of the backfill; store it (e.g. in the Migration status) and pass it to
/// [`super::Replicator::start`]. One shape for both modes: a scan checkpoint has no `sync`, a sync
/// checkpoint has no `passes`, and checkpoints written before `sync` existed still parse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Checkpoint {
    /// Passes still to run, the current one first, with its cursor.
    pub passes: VecDeque<Pass>,
    pub copied: u64,
    pub deleted: u64,
    pub skipped: u64,
    /// DBSIZE of the source when the current pass began; in sync mode, the key count the
    /// snapshot announced.
    pub total: u64,
    /// Sync mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncPosition>,
}

/// Where a sync-mode target stands in the source's replication stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPosition {
    /// The source's replication ID the offset belongs to.
    pub replid: String,
    /// Stream offset the target has applied through (the snapshot's offset plus every stream
    /// byte applied since).
    pub offset: u64,
    /// The snapshot is still loading (the target holds a partial copy, so a restart needs a
    /// full resync), or the target still holds expiries shifted by the expiry hold: either way
    /// the backfill is not done.
    pub loading: bool,
}

impl Checkpoint {
    /// A fresh start: one backfill pass.
    pub(crate) fn fresh() -> Self {
        Checkpoint { passes: VecDeque::from([Pass::Backfill { cursor: 0 }]), ..Default::default() }
    }

    /// Queues a full re-copy and, when `prune`, a prune (after lost notifications), unless the
    /// same passes are already queued behind the current pass (so they start later than now
    /// anyway).
    pub(crate) fn queue_full_pass(&mut self, prune: bool) {
        let full: &[Pass] = if prune {
            &[Pass::Recopy { cursor: 0 }, Pass::Prune { cursor: 0 }]
        } else {
            &[Pass::Recopy { cursor: 0 }]
        };
        let n = self.passes.len();
        let already_queued = n > full.len() && self.passes.range(n - full.len()..).eq(full.iter());
        if !already_queued {
            self.passes.extend(full);
        }
    }

    /// Whether the backfill (scan passes, or the sync snapshot) is complete.
    pub fn backfill_done(&self) -> bool {
        self.passes.is_empty() && !self.sync.as_ref().is_some_and(|s| s.loading)
    }

    /// Serializes to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint is plain data")
    }

    /// Parses a checkpoint written by [`Checkpoint::to_json`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_checkpoints_from_before_sync_mode_still_parse() {
        let old = r#"{"passes":[{"pass":"backfill","cursor":42}],"copied":3,"deleted":0,"skipped":1,"total":9}"#;
        let checkpoint = Checkpoint::from_json(old).unwrap();
        assert_eq!(checkpoint.passes, [Pass::Backfill { cursor: 42 }]);
        assert_eq!((checkpoint.copied, checkpoint.total, checkpoint.sync.as_ref()), (3, 9, None));
        assert!(!checkpoint.to_json().contains("sync"), "scan checkpoints keep their shape");

        let sync = Checkpoint {
            sync: Some(SyncPosition { replid: "abc".into(), offset: 7, loading: true }),
            ..Default::default()
        };
        assert!(!sync.backfill_done(), "a loading snapshot is not a finished backfill");
        assert_eq!(Checkpoint::from_json(&sync.to_json()).unwrap(), sync);
    }
}
