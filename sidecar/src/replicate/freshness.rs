//! How fresh the target is, written on the target for the sidecars to read (DESIGN §9,
//! "Freshness").
//!
//! While a replicator runs, it writes [`FRESHNESS_KEY`] on the target every
//! [`FRESHNESS_EVERY`]: `<beat> <lag_ms>`. `beat` differs in every write, and `lag_ms` is the
//! engine's lag when it wrote (`-` while the backfill runs): every source write older than that
//! was on the target then. A sidecar trusts only what it sees change, timed on its own clock
//! (`crate::freshness`): when the engine stops (its operator crashed, the run failed, the
//! migration moved on) the beat stops, and so do target reads, whether or not anything else
//! notices. The record expires by itself a while after the last write, so a stopped engine
//! leaves nothing behind for long; the verifier and scan mode's prune pass ignore it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Cmd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Progress;
use super::endpoint::Endpoint;

/// The record's key, in the database the target URI names.
pub const FRESHNESS_KEY: &str = "eden:freshness";
/// How often the record is written.
pub const FRESHNESS_EVERY: Duration = Duration::from_millis(50);
const EXPIRES_AFTER_MS: u64 = 10_000;

/// The record as written: what a sidecar parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessRecord {
    pub beat: u64,
    /// `None` while the target is not a copy yet (backfill running).
    pub lag_ms: Option<u64>,
}

impl FreshnessRecord {
    pub fn encode(&self) -> String {
        match self.lag_ms {
            Some(lag) => format!("{} {lag}", self.beat),
            None => format!("{} -", self.beat),
        }
    }

    pub fn decode(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (beat, lag) = text.split_once(' ')?;
        let lag_ms = match lag {
            "-" => None,
            lag => Some(lag.parse().ok()?),
        };
        Some(FreshnessRecord { beat: beat.parse().ok()?, lag_ms })
    }
}

/// Writes the record to `target` while `progress` has a sender (the engine runs); the task ends
/// with the engine, removing the record, or when aborted (the replicator removes it then). A failed write is retried at the next beat: the sidecars
/// see no beat meanwhile, which is what they should see.
pub(crate) fn keep(target: Endpoint, mut progress: watch::Receiver<Progress>) -> JoinHandle<()> {
    // Distinct from any earlier run's beats without coordination: the start time, then counted.
    let first = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(FRESHNESS_EVERY);
        for beat in first.. {
            ticker.tick().await;
            if progress.has_changed().is_err() {
                // The engine ended (failed): no record stays behind claiming anything.
                let mut del = Cmd::new();
                del.arg("DEL").arg(FRESHNESS_KEY);
                let _ = target.cmd::<()>("DEL", &del).await;
                return;
            }
            let lag_ms = {
                let progress = progress.borrow_and_update();
                progress.checkpoint.backfill_done().then(|| progress.lag_ms_now())
            };
            let record = FreshnessRecord { beat, lag_ms }.encode();
            let mut set = Cmd::new();
            set.arg("SET").arg(FRESHNESS_KEY).arg(record).arg("PX").arg(EXPIRES_AFTER_MS);
            if let Err(err) = target.cmd::<()>("SET", &set).await {
                tracing::debug!(%err, "could not write the freshness record; retrying at the next beat");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_not_a_record() {
        for record in [FreshnessRecord { beat: 7, lag_ms: Some(12) }, FreshnessRecord { beat: 8, lag_ms: None }] {
            assert_eq!(FreshnessRecord::decode(record.encode().as_bytes()), Some(record));
        }
        for garbage in ["", "7", "x 1", "7 lots", "7 -1"] {
            assert_eq!(FreshnessRecord::decode(garbage.as_bytes()), None, "{garbage:?}");
        }
    }
}
