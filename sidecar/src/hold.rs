//! The write gate (DESIGN §6 and §9, "Fencing"): whether this sidecar may send writes anywhere
//! right now, derived from the configuration in force, its confirmation and a clock.
//!
//! Writes wait in the sidecar instead of reaching either server for one of two reasons:
//! - **the cutover pause**: the payload says `writes: paused`, so replication can drain to
//!   lag 0 before the operator flips writes to the target;
//! - **an unconfirmed strategy**: with `--configmap`, a sidecar writes under a generation only
//!   while it holds a confirmation of it (a read of the ConfigMap made after its Lease
//!   acknowledged that generation, showing it still current, no older than `--fence-after-ms`;
//!   see `config::confirm`). A sidecar cut off from the API server cannot know that the
//!   operator has not moved writes meanwhile, so it stops writing: that is what lets the
//!   operator treat a silent sidecar as fenced after a bounded time, without comparing clocks.
//!
//! A hold that lasts longer than `max_pause` turns into a refusal: writes are answered with a
//! `-ERR eden: …` at once instead of waiting, and never sent to a side that may no longer own
//! them. (Before fencing, an expired pause sent writes to the source; but the operator may flip
//! at any moment after a sidecar's last look at the ConfigMap, so those writes could land on a
//! source that replication no longer reads, and be lost.) The clock starts when writes first
//! stop flowing, so a flip that arrives during a pause (paused → unconfirmed → flowing) keeps
//! the deadline of the pause. Sessions read the state per batch; a session with a held write
//! waits for it to change (see `session::routed`), so held writes keep their order per
//! connection.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Confirmations, CurrentConfig, WritesState};

/// Why writes are not flowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// The payload says `writes: paused`: the cutover pause.
    Paused,
    /// The sidecar holds no valid confirmation that the generation it applied is current.
    Unconfirmed,
}

/// Whether writes flow, wait, or are refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HoldState {
    #[default]
    Flowing,
    /// Writes wait until the state changes.
    Holding(HoldReason),
    /// Held for longer than the bound: writes are answered with an error.
    Refusing(HoldReason),
}

impl HoldState {
    /// The Lease's `eden.io/writes` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Flowing => "flowing",
            HoldState::Holding(HoldReason::Paused) => "paused",
            HoldState::Holding(HoldReason::Unconfirmed) => "unconfirmed",
            HoldState::Refusing(_) => "refusing",
        }
    }

    /// The reply a refused write gets.
    pub fn refusal(reason: HoldReason) -> &'static [u8] {
        match reason {
            HoldReason::Paused => {
                b"-ERR eden: writes were held for a cutover longer than this sidecar's --max-write-pause-ms \
                  without a decision from the operator; refused, so that none reaches a server that may no \
                  longer own it\r\n"
            }
            HoldReason::Unconfirmed => {
                b"-ERR eden: this sidecar cannot confirm that its migration strategy is current (the \
                  Kubernetes API does not answer, or the ConfigMap is missing or invalid); writes refused, so \
                  that none reaches a server that may no longer own it\r\n"
            }
        }
    }
}

/// The gate as sessions and the Lease see it.
pub type CurrentHold = watch::Receiver<HoldState>;

/// Follows `config` (and, with a ConfigMap, its `confirmations`) and publishes the gate's
/// state, until every receiver is gone. Without confirmations (a mounted file, no API to
/// confirm with) only the pause holds writes.
pub fn follow(mut config: CurrentConfig, mut confirmations: Option<Confirmations>, max_pause: Duration) -> CurrentHold {
    let (state, current) = watch::channel(HoldState::Flowing);
    tokio::spawn(async move {
        // When writes stopped flowing; the refusal deadline counts from here.
        let mut held_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let applied = config.borrow_and_update().as_ref().map(|c| (c.generation, c.writes));
            // The instant the confirmation lapses, if one holds now. It covers the applied
            // generation even when that is newer than the one it confirmed: its bound counts
            // from a read sent before anything above the confirmed generation was written, and
            // the operator fences from no earlier than that (DESIGN §9, "Fencing", S2). So a
            // flip delivered by the watch releases held writes at once, without waiting for its
            // own acknowledgement and read.
            let confirmed_until = match &mut confirmations {
                None => None,
                Some(confirmations) => {
                    let confirmation = *confirmations.borrow_and_update();
                    confirmation
                        .filter(|c| applied.is_some_and(|(generation, _)| c.generation <= generation) && now < c.until)
                        .map(|c| c.until)
                }
            };
            let reason = match applied {
                Some((_, WritesState::Paused)) => Some(HoldReason::Paused),
                _ if confirmations.is_some() && confirmed_until.is_none() => Some(HoldReason::Unconfirmed),
                _ => None,
            };
            let (next, wake) = match reason {
                None => {
                    held_since = None;
                    (HoldState::Flowing, confirmed_until)
                }
                Some(reason) => {
                    let since = *held_since.get_or_insert(now);
                    if now < since + max_pause {
                        let wake = [Some(since + max_pause), confirmed_until].into_iter().flatten().min();
                        (HoldState::Holding(reason), wake)
                    } else {
                        (HoldState::Refusing(reason), confirmed_until)
                    }
                }
            };
            let changed = state.send_if_modified(|current| std::mem::replace(current, next) != next);
            if changed {
                tracing::info!(writes = next.as_str(), ?max_pause, "write gate changed");
            }
            let confirmation_changed = async {
                match &mut confirmations {
                    Some(confirmations) => confirmations.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                alive = confirmation_changed => if !alive { confirmations = None },
                () = sleep_until(wake) => {}
                () = state.closed() => return,
            }
        }
    });
    current
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Applier, Confirmation};

    fn payload(generation: u64, writes: &str) -> String {
        format!("generation: {generation}\nmigration: a/b\nsource: {{uri: 'redis://s:1'}}\nwrites: {writes}\n")
    }

    async fn next(hold: &mut CurrentHold) -> HoldState {
        tokio::time::timeout(Duration::from_secs(60), hold.changed()).await.unwrap().unwrap();
        *hold.borrow_and_update()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_until_flowing_then_refuses_past_the_deadline() {
        let (applier, config) = Applier::new();
        let mut hold = follow(config, None, Duration::from_millis(200));
        assert_eq!(*hold.borrow(), HoldState::Flowing);
        applier.offer(&payload(1, "paused"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Paused));
        applier.offer(&payload(2, "flowing"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Flowing, "the flip releases");

        applier.offer(&payload(3, "paused"), "test");
        let started = Instant::now();
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Paused));
        applier.offer(&payload(4, "paused"), "test");
        assert_eq!(
            next(&mut hold).await,
            HoldState::Refusing(HoldReason::Paused),
            "a new paused generation keeps the deadline"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        applier.offer(&payload(5, "flowing"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Flowing, "a decision ends a refusal");
    }

    #[tokio::test(start_paused = true)]
    async fn writes_flow_only_while_the_applied_generation_is_confirmed() {
        let (applier, config) = Applier::new();
        let (confirm, confirmations) = watch::channel(None);
        let mut hold = follow(config, Some(confirmations), Duration::from_secs(5));
        applier.offer(&payload(1, "flowing"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Unconfirmed), "applied is not confirmed");

        let valid = Duration::from_secs(30);
        confirm.send_replace(Some(Confirmation { generation: 1, until: Instant::now() + valid }));
        assert_eq!(next(&mut hold).await, HoldState::Flowing);

        // A newer generation flows under the older confirmation, until that lapses: the bound
        // counts from the read, whatever was applied since.
        tokio::time::sleep(Duration::from_secs(10)).await;
        applier.offer(&payload(2, "flowing"), "test");
        let confirmed_at = Instant::now();
        confirm.send_replace(Some(Confirmation { generation: 2, until: confirmed_at + valid }));
        applier.offer(&payload(3, "flowing"), "test");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*hold.borrow_and_update(), HoldState::Flowing, "generation 3 flows under the confirmation of 2");

        // No confirmation for longer than it is valid: held, then refused after max_pause.
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Unconfirmed));
        assert_eq!(confirmed_at.elapsed(), valid, "fenced exactly when the confirmation lapses");
        assert_eq!(next(&mut hold).await, HoldState::Refusing(HoldReason::Unconfirmed));
        assert_eq!(confirmed_at.elapsed(), valid + Duration::from_secs(5));

        // A confirmation that comes back ends the refusal.
        confirm.send_replace(Some(Confirmation { generation: 3, until: Instant::now() + valid }));
        assert_eq!(next(&mut hold).await, HoldState::Flowing);

        // A confirmation of a generation above the applied one (impossible by the confirmer's
        // construction) confirms nothing.
        confirm.send_replace(Some(Confirmation { generation: 4, until: Instant::now() + valid }));
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Unconfirmed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flip_during_a_pause_releases_at_once_under_a_valid_confirmation() {
        let (applier, config) = Applier::new();
        let (confirm, confirmations) = watch::channel(None);
        let mut hold = follow(config, Some(confirmations), Duration::from_secs(2));
        applier.offer(&payload(1, "paused"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Paused));
        confirm.send_replace(Some(Confirmation { generation: 1, until: Instant::now() + Duration::from_secs(30) }));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let flipped_at = Instant::now();
        applier.offer(&payload(2, "flowing"), "test");
        assert_eq!(next(&mut hold).await, HoldState::Flowing);
        assert_eq!(flipped_at.elapsed(), Duration::ZERO, "released without a read of its own");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flip_during_a_pause_keeps_its_deadline_until_confirmed() {
        let (applier, config) = Applier::new();
        let (confirm, confirmations) = watch::channel(None);
        let mut hold = follow(config, Some(confirmations), Duration::from_secs(2));
        let valid = Duration::from_secs(30);
        applier.offer(&payload(1, "paused"), "test");
        let paused_at = Instant::now();
        assert_eq!(next(&mut hold).await, HoldState::Holding(HoldReason::Paused));
        // The last confirmation lapses during the pause (the API server went quiet).
        confirm.send_replace(Some(Confirmation { generation: 1, until: Instant::now() + Duration::from_secs(1) }));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        applier.offer(&payload(2, "flowing"), "test");
        assert_eq!(
            next(&mut hold).await,
            HoldState::Holding(HoldReason::Unconfirmed),
            "the flip waits for its confirmation"
        );
        assert_eq!(next(&mut hold).await, HoldState::Refusing(HoldReason::Unconfirmed));
        assert_eq!(paused_at.elapsed(), Duration::from_secs(2), "one deadline from the first held moment");
        confirm.send_replace(Some(Confirmation { generation: 2, until: Instant::now() + valid }));
        assert_eq!(next(&mut hold).await, HoldState::Flowing);
    }
}
