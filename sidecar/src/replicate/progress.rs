//! A snapshot of the replicator's state for the operator's status, metrics and tests.

use serde::Serialize;

use super::Checkpoint;

/// Published on a `watch` channel after every step of the replicator.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// Age in ms of the oldest change not yet on the target: the oldest dirty key, or the time
    /// since the current pass began while a pass is running; 0 when caught up.
    pub lag_ms: u64,
    /// Keys waiting for a re-copy.
    pub dirty: usize,
    /// Keys copied per second since the replicator started.
    pub rate: f64,
    /// Full re-passes forced by lost notifications, dirty-set overflow or a source flush.
    pub resyncs: u64,
    /// Source flushes seen (each one flushes the target and rescans).
    pub flushes: u64,
    /// The last barrier ([`super::ScanReplicator::caught_up`]) whose notifications are all
    /// processed.
    pub(crate) barrier: u64,
    /// Resumable state: counts, `total` (DBSIZE at the start of the pass) and the cursor.
    pub checkpoint: Checkpoint,
}

impl Progress {
    /// Backfill done and nothing waiting: the target equals the source as of the last
    /// notification processed.
    pub fn caught_up(&self) -> bool {
        self.checkpoint.backfill_done() && self.dirty == 0
    }
}
