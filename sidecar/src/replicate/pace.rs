//! Rate limits, so a copy or a verification does not starve the application's own traffic on a
//! busy server: operations per second against each server ([`OpsLimits`], the replicator's) and
//! keys per second (the verifier's).

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How many commands per second the replicator may send to each server; `None` is no limit.
///
/// An operation is one command: in scan mode every SCAN, GETRANGE, DUMP, SET, RESTORE or chunk
/// command (a pipeline or MULTI of n commands is n operations), in sync mode every RESTORE of the snapshot and every
/// command of the stream applied to the target. Sync mode reads the source as one replication
/// stream, with no per-key commands to pace, so it takes no source limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpsLimits {
    pub source: Option<NonZeroU32>,
    pub target: Option<NonZeroU32>,
}

/// An average-rate limit shared by every task that talks to one server.
#[derive(Debug)]
pub(crate) struct Pace {
    per_second: Option<NonZeroU32>,
    /// The first operation's time: the wait before it (a handshake, the source's fork for a
    /// snapshot) is no credit for a burst.
    started: OnceLock<Instant>,
    done: AtomicU64,
}

impl Pace {
    /// `None` means no limit.
    pub(crate) fn new(per_second: Option<NonZeroU32>) -> Self {
        Pace { per_second, started: OnceLock::new(), done: AtomicU64::new(0) }
    }

    /// Records `n` operations and sleeps until the average rate since the first is back under
    /// the limit. An average rather than a token bucket: a pause (a slow server, a big key)
    /// lets the next batches catch up, which is what a copy that must finish wants.
    pub(crate) async fn spend(&self, n: usize) {
        let Some(limit) = self.per_second else { return };
        let done = self.done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let due = Duration::from_secs_f64(done as f64 / f64::from(limit.get()));
        if let Some(wait) = due.checked_sub(self.started.get_or_init(Instant::now).elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spending_past_the_limit_waits_for_the_average_to_come_back() {
        let pace = Pace::new(NonZeroU32::new(1000));
        let started = tokio::time::Instant::now();
        pace.spend(500).await;
        pace.spend(1500).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2), "2000 operations at 1000/s");
        let unlimited = Pace::new(None);
        unlimited.spend(1_000_000).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn time_before_the_first_operation_is_no_credit() {
        let pace = Pace::new(NonZeroU32::new(1000));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = tokio::time::Instant::now();
        pace.spend(2000).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2), "2000 operations at 1000/s, however long it waited");
    }
}
