//! A keys-per-second limit, so a verification or copy pass does not starve the application's
//! own traffic on a busy server.

use std::time::{Duration, Instant};

pub(crate) struct Pace {
    per_second: Option<u32>,
    started: Instant,
    done: u64,
}

impl Pace {
    /// `None` means no limit.
    pub(crate) fn new(per_second: Option<u32>) -> Self {
        Pace { per_second, started: Instant::now(), done: 0 }
    }

    /// Records `n` keys handled and sleeps until the average rate is back under the limit.
    pub(crate) async fn spend(&mut self, n: usize) {
        self.done += n as u64;
        if let Some(limit) = self.per_second.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(self.done as f64 / f64::from(limit));
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
