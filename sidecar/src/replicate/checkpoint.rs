//! The replicator's resumable state: which SCAN passes remain and where the current one stands.
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
    /// were lost).
    Prune { cursor: u64 },
}

/// Serializable progress of the backfill; store it (e.g. in the Migration status) and pass it to
/// [`super::ScanReplicator::resume`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Passes still to run, the current one first, with its cursor.
    pub passes: VecDeque<Pass>,
    pub copied: u64,
    pub deleted: u64,
    pub skipped: u64,
    /// DBSIZE of the source when the current pass began.
    pub total: u64,
}

impl Checkpoint {
    /// A fresh start: one backfill pass.
    pub(crate) fn fresh() -> Self {
        Checkpoint { passes: VecDeque::from([Pass::Backfill { cursor: 0 }]), ..Default::default() }
    }

    /// Queues a full re-copy and prune (after lost notifications), unless the same pair is
    /// already queued behind the current pass (so it starts later than now anyway).
    pub(crate) fn queue_full_pass(&mut self) {
        let full = [Pass::Recopy { cursor: 0 }, Pass::Prune { cursor: 0 }];
        let n = self.passes.len();
        let already_queued = n > 2 && self.passes.range(n - 2..).eq(full.iter());
        if !already_queued {
            self.passes.extend(full);
        }
    }

    /// Whether the backfill and any re-passes are complete.
    pub fn backfill_done(&self) -> bool {
        self.passes.is_empty()
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
