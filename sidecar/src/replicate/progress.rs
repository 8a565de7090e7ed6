//! A snapshot of the replicator's state for the operator's status, metrics and tests.

use std::time::Instant;

use serde::Serialize;

use super::Checkpoint;

/// Published on a `watch` channel after every step of the replicator.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// Age in ms of the oldest change not yet on the target: the oldest dirty key, or the time
    /// since the current pass began while a pass is running (scan); the age of the oldest stream
    /// byte received but not applied, or the time since the snapshot began while it loads
    /// (sync); 0 when caught up.
    pub lag_ms: u64,
    /// Sync mode: bytes of the source's replication stream not yet applied to the target (the
    /// source's `master_repl_offset` minus the applied offset). Always 0 in scan mode.
    pub lag_bytes: u64,
    /// Keys waiting for a re-copy.
    pub dirty: usize,
    /// Keys copied per second since the replicator started (sync: snapshot keys while loading).
    pub rate: f64,
    /// Full re-passes forced by lost notifications, dirty-set overflow or a source flush.
    pub resyncs: u64,
    /// Sync mode: replicated commands the target answered with an error (each logged); the
    /// keys they touched may differ until rewritten.
    pub stream_errors: u64,
    /// Source flushes seen (each one flushes the target and rescans).
    pub flushes: u64,
    /// The last barrier ([`super::ScanReplicator::caught_up`]) whose notifications are all
    /// processed.
    pub(crate) barrier: u64,
    /// Sync mode: the source offset the target has applied, as this run's own stream has shown
    /// it since its last handshake; `None` while there is no stream (a lost link, a snapshot
    /// loading, a restart not yet confirmed by the source). Freshness beats wait on it, never on
    /// an offset carried over from a checkpoint.
    #[serde(skip)]
    pub(crate) streamed: Option<u64>,
    /// Scan mode: the last barrier every key notified before which is on the target.
    #[serde(skip)]
    pub(crate) written_through: u64,
    /// Resumable state: counts, `total` (DBSIZE at the start of the pass) and the cursor.
    pub checkpoint: Checkpoint,
    /// When the oldest change not yet on the target arrived, if one is waiting. `lag_ms` is
    /// as of the last publication; this keeps counting while the replicator is stuck (a stalled
    /// target) and publishes nothing.
    #[serde(skip)]
    pub behind_since: Option<Instant>,
}

impl Progress {
    /// The lag now: what was published, or longer if the oldest waiting change has waited
    /// longer since.
    pub fn lag_ms_now(&self) -> u64 {
        let waited = self.behind_since.map_or(0, |since| since.elapsed().as_millis() as u64);
        self.lag_ms.max(waited)
    }

    /// Backfill done and nothing waiting: the target equals the source as of the last
    /// notification processed (scan) or stream byte received (sync).
    pub fn caught_up(&self) -> bool {
        self.checkpoint.backfill_done() && self.dirty == 0 && self.lag_bytes == 0
    }
}
