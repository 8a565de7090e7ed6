//! The cutover hold (DESIGN §6): while the payload says `writes: paused`, new writes wait in
//! the sidecar instead of reaching either server, so replication can drain to lag 0 before the
//! operator flips writes to the target.
//!
//! The hold is one state for the whole sidecar, derived from the configuration and a clock:
//! it starts when a paused payload arrives, ends when a payload says `flowing` again (the flip,
//! or an abort), and expires at the deadline if neither comes. After expiry, writes go to the
//! source even though the payload still says paused: the operator aborts the cutover at its own
//! deadline, and a sidecar that lost touch with it must not hold clients forever. Sessions read
//! the state per batch; a session with a held write waits for it to change (see
//! `session::routed`), so held writes keep their order per connection.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{CurrentConfig, WritesState};

/// Whether writes are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HoldState {
    #[default]
    Flowing,
    /// `writes: paused` and the deadline has not passed.
    Holding,
    /// `writes: paused` for longer than the deadline: writes go to the source.
    Expired,
}

impl HoldState {
    /// The Lease's `eden.io/writes` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Flowing => "flowing",
            HoldState::Holding => "paused",
            HoldState::Expired => "expired",
        }
    }
}

/// The hold as sessions and the Lease see it.
pub type CurrentHold = watch::Receiver<HoldState>;

/// Follows `config` and publishes the hold state, until every receiver is gone. A pause lasts
/// at most `max_pause` from the moment this sidecar first saw it; a new paused generation
/// does not restart the clock.
pub fn follow(mut config: CurrentConfig, max_pause: Duration) -> CurrentHold {
    let (state, current) = watch::channel(HoldState::Flowing);
    tokio::spawn(async move {
        let mut deadline: Option<Instant> = None;
        loop {
            let paused = config.borrow_and_update().as_ref().is_some_and(|c| c.writes == WritesState::Paused);
            let next = match (paused, deadline) {
                (false, _) => {
                    deadline = None;
                    HoldState::Flowing
                }
                (true, None) => {
                    deadline = Some(Instant::now() + max_pause);
                    HoldState::Holding
                }
                (true, Some(at)) if Instant::now() < at => HoldState::Holding,
                (true, Some(_)) => HoldState::Expired,
            };
            let changed = state.send_if_modified(|current| std::mem::replace(current, next) != next);
            if changed {
                tracing::info!(hold = next.as_str(), ?max_pause, "write hold changed");
            }
            let expiry = async {
                match deadline.filter(|_| next == HoldState::Holding) {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                () = expiry => {}
                () = state.closed() => return,
            }
        }
    });
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Applier;

    fn payload(generation: u64, writes: &str) -> String {
        format!("generation: {generation}\nmigration: a/b\nsource: {{uri: 'redis://s:1'}}\nwrites: {writes}\n")
    }

    async fn next(hold: &mut CurrentHold) -> HoldState {
        tokio::time::timeout(Duration::from_secs(5), hold.changed()).await.unwrap().unwrap();
        *hold.borrow_and_update()
    }

    #[tokio::test]
    async fn a_pause_holds_until_flowing_or_the_deadline() {
        let (applier, config) = Applier::new();
        let mut hold = follow(config, Duration::from_millis(200));
        assert_eq!(*hold.borrow(), HoldState::Flowing);
        applier.offer(&payload(1, "paused"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Holding);
        applier.offer(&payload(2, "flowing"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Flowing, "the flip releases");

        applier.offer(&payload(3, "paused"), "test");
        let started = Instant::now();
        assert_eq!(next(&mut hold).await, HoldState::Holding);
        applier.offer(&payload(4, "paused"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Expired, "a new paused generation keeps the deadline");
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
    }
}
