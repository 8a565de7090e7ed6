//! How fresh the target is, written on the target for the sidecars to read (DESIGN §9,
//! "Freshness").
//!
//! While a replicator runs it *beats*: every [`BEAT_EVERY`] it takes a mark on the source (sync
//! mode: the source's `master_repl_offset`; scan mode: a notification barrier), waits until the
//! engine has put everything before the mark on the target, and only then writes the record
//! [`FRESHNESS_KEY`] = `<run> <seq>`: this run's identity and the beat's number, one more than
//! the last beat the target acknowledged. A beat therefore claims that every write the source
//! had acknowledged when its mark was taken is on the target, and its mark was taken after the
//! previous beat was written. Nothing in the record is a time: a sidecar times what it sees on
//! its own clock (`crate::freshness`).
//!
//! Each number is written once. A beat after an acknowledged one is written `XX` (only over the
//! record), so a write still travelling from a stopped run, or from this one, cannot recreate a
//! record that was removed; the first beat of a run, and the first after a beat that failed, is
//! written plainly and skips a number, so it never reads as the successor of what came before.
//! When the engine stops, the beats stop and the record expires a while after the last one; the
//! verifier and scan mode's prune pass ignore it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Cmd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Progress;
use super::endpoint::Endpoint;
use super::error::ReplicateError;
use super::scan::Barriers;
use super::sync::link::master_offset_in;

/// The record's key, in the database the target URI names.
pub const FRESHNESS_KEY: &str = "eden:freshness";
/// How often a beat is attempted.
pub const BEAT_EVERY: Duration = Duration::from_millis(20);
/// How long a sidecar goes on trusting the target after the last read that saw the record it
/// follows. The engine removes the record and waits twice this long before it empties the
/// target (a restart's full resync), so that no sidecar still trusts it then.
pub const TRUSTED_FOR: Duration = Duration::from_millis(200);
/// How long a beat waits for the engine to pass its mark before taking a new one.
const PASS_WITHIN: Duration = Duration::from_secs(1);
const EXPIRES_AFTER_MS: u64 = 10_000;

/// The record as written: what a sidecar parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessRecord {
    /// Distinct for every run of an engine, without coordination: its start time in ns.
    pub run: u64,
    pub seq: u64,
}

impl FreshnessRecord {
    pub fn encode(&self) -> String {
        format!("{} {}", self.run, self.seq)
    }

    pub fn decode(text: &[u8]) -> Option<Self> {
        let (run, seq) = std::str::from_utf8(text).ok()?.split_once(' ')?;
        Some(FreshnessRecord { run: run.parse().ok()?, seq: seq.parse().ok()? })
    }

    /// Whether this beat is the one written right after `earlier`, by the same run: its mark
    /// was taken after `earlier` was on the target.
    pub fn follows(&self, earlier: &FreshnessRecord) -> bool {
        self.run == earlier.run && earlier.seq.checked_add(1) == Some(self.seq)
    }
}

/// Where a beat takes its mark, and how it knows the engine has passed it.
pub(crate) enum Marks {
    /// The source's `master_repl_offset`, passed once this run's own stream has applied it.
    Offset(Box<Endpoint>),
    /// A barrier on the notification channel, passed once every key notified before it is on
    /// the target.
    Barrier(Arc<Barriers>),
}

impl Marks {
    /// A mark after every write the source has acknowledged so far.
    async fn take(&self) -> Result<u64, ReplicateError> {
        match self {
            Marks::Offset(source) => {
                let mut info = Cmd::new();
                info.arg("INFO").arg("replication");
                let info: String = source.cmd("INFO", &info).await?;
                master_offset_in(&info).ok_or_else(|| ReplicateError::Reply {
                    server: source.label().clone(),
                    command: "INFO",
                    reply: "no master_repl_offset".into(),
                })
            }
            Marks::Barrier(barriers) => barriers.publish().await,
        }
    }

    /// Whether the target holds everything before `mark`, and is a whole copy.
    fn passed(&self, mark: u64, progress: &Progress) -> bool {
        progress.checkpoint.backfill_done()
            && match self {
                Marks::Offset(_) => progress.streamed.is_some_and(|applied| applied >= mark),
                Marks::Barrier(_) => progress.written_through >= mark,
            }
    }
}

/// Removes the record from `target`; one left behind expires by itself.
pub(crate) async fn remove(target: &Endpoint) {
    if target.cmd::<()>("DEL", redis::cmd("DEL").arg(FRESHNESS_KEY)).await.is_err() {
        tracing::debug!("could not remove the freshness record; it expires by itself");
    }
}

/// Beats on `target` while `progress` has a sender (the engine runs); the task ends with the
/// engine, removing the record, or when aborted (the replicator removes it then).
pub(crate) fn keep(target: Endpoint, marks: Marks, mut progress: watch::Receiver<Progress>) -> JoinHandle<()> {
    let run = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(BEAT_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The next beat's number, and whether the last one written was acknowledged.
        let (mut seq, mut acknowledged) = (0, false);
        loop {
            ticker.tick().await;
            if progress.has_changed().is_err() {
                // The engine ended (failed): no record stays behind claiming anything.
                remove(&target).await;
                return;
            }
            if !progress.borrow().checkpoint.backfill_done() {
                continue;
            }
            let mark = match marks.take().await {
                Ok(mark) => mark,
                Err(err) => {
                    tracing::debug!(%err, "could not take a freshness mark on the source");
                    continue;
                }
            };
            match tokio::time::timeout(PASS_WITHIN, progress.wait_for(|p| marks.passed(mark, p))).await {
                Ok(Ok(_)) => {}
                Ok(Err(_ended)) => continue,
                Err(_behind) => continue,
            }
            let mut set = redis::cmd("SET");
            set.arg(FRESHNESS_KEY).arg(FreshnessRecord { run, seq }.encode()).arg("PX").arg(EXPIRES_AFTER_MS);
            if acknowledged {
                set.arg("XX");
            }
            // `Some` when written; `None` when `XX` found no record (it was removed).
            let written: Result<Option<String>, _> = target.cmd("SET", &set).await;
            acknowledged = matches!(written, Ok(Some(_)));
            if let Err(err) = &written {
                tracing::debug!(%err, "could not write the freshness record; beating again");
            }
            seq += if acknowledged { 1 } else { 2 };
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_not_a_record() {
        let record = FreshnessRecord { run: 1_700_000_000_000_000_000, seq: 12 };
        assert_eq!(FreshnessRecord::decode(record.encode().as_bytes()), Some(record));
        for garbage in ["", "7", "x 1", "7 lots", "7 -1", "7 -"] {
            assert_eq!(FreshnessRecord::decode(garbage.as_bytes()), None, "{garbage:?}");
        }
    }

    #[test]
    fn only_the_next_number_of_the_same_run_follows() {
        let beat = |run, seq| FreshnessRecord { run, seq };
        assert!(beat(1, 8).follows(&beat(1, 7)));
        assert!(!beat(1, 9).follows(&beat(1, 7)), "a number skipped after a failed beat");
        assert!(!beat(1, 7).follows(&beat(1, 7)));
        assert!(!beat(2, 8).follows(&beat(1, 7)), "another run");
        assert!(!beat(1, 0).follows(&beat(1, u64::MAX)));
    }
}
