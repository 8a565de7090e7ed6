//! Confirming that the strategy in force is still the current one (DESIGN §9, "Fencing").
//!
//! The watch delivers new generations quickly, but a watch that has gone quiet looks the same
//! as a ConfigMap that has not changed. So every `every` the sidecar reads the ConfigMap with
//! a consistent GET (no `resourceVersion`: served as of the API server's latest write) and, when
//! it shows the generation applied here, publishes a [`Confirmation`] of that generation
//! valid until the moment the read was *sent* plus `valid_for`. The write gate (`hold`) lets
//! writes through only under a valid confirmation: of the applied generation, or of an earlier
//! one (what bounds this sidecar is when it last read, not what it read).
//!
//! A read counts only if it was sent after this sidecar's Lease acknowledged that generation
//! (`acked`, set by the Lease reporter once the API server accepted the write). That ordering
//! is what the operator's side of the argument rests on: a sidecar that writes under a
//! generation has, before the read that allowed it, recorded that generation in its Lease, so
//! a Lease listed later shows it. A newer generation seen by the read is offered to the
//! applier (the watch may lag), and confirmed by a later read once acknowledged.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Applier, EdenConfig, PAYLOAD_KEY};

/// This sidecar's proof that generation `generation` is current, until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    pub generation: u64,
    pub until: Instant,
}

/// The latest confirmation, as the write gate sees it.
pub type Confirmations = watch::Receiver<Option<Confirmation>>;

/// Reads the ConfigMap `name` every `every`, confirming what `applier` applied.
pub struct Confirmer {
    pub api: Api<ConfigMap>,
    pub name: String,
    pub applier: Applier,
    /// The generation the Lease last acknowledged (see [`crate::lease::LeaseReporter::acked`]).
    pub acked: watch::Receiver<u64>,
    pub every: Duration,
    pub valid_for: Duration,
}

/// What one read of the ConfigMap showed, relative to the applied generation.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Current(u64),
    /// A later generation, as text for the applier.
    Newer(String),
    Unusable(String),
}

impl Confirmer {
    /// Starts confirming; the task ends when every receiver is gone.
    pub fn start(self) -> Confirmations {
        let (confirm, confirmations) = watch::channel(None);
        tokio::spawn(self.run(confirm));
        confirmations
    }

    async fn run(mut self, confirm: watch::Sender<Option<Confirmation>>) {
        let origin = format!("configmap/{}", self.name);
        let mut unusable: Option<String> = None;
        loop {
            let sent = Instant::now();
            let acked = *self.acked.borrow_and_update();
            let applied = self.applier.status().applied_generation();
            let seen = match tokio::time::timeout(self.every, self.api.get_opt(&self.name)).await {
                Ok(Ok(config_map)) => see(config_map.as_ref(), applied),
                Ok(Err(err)) => Seen::Unusable(format!("reading it failed: {err}")),
                Err(_) => Seen::Unusable(format!("no answer within {:?}", self.every)),
            };
            match seen {
                Seen::Current(generation) if acked >= generation => {
                    confirm.send_replace(Some(Confirmation { generation, until: sent + self.valid_for }));
                    if unusable.take().is_some() {
                        tracing::info!(origin, generation, "strategy confirmed again");
                    }
                }
                // Applied but not acknowledged yet: the Lease reporter's write wakes us below.
                Seen::Current(_) => {}
                Seen::Newer(text) => {
                    self.applier.offer(&text, &origin);
                }
                Seen::Unusable(why) => {
                    if unusable.as_ref() != Some(&why) {
                        tracing::warn!(origin, why, valid_for = ?self.valid_for,
                            "cannot confirm the strategy; writes stop when the last confirmation lapses");
                    }
                    unusable = Some(why);
                }
            }
            if confirm.is_closed() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(self.every) => {}
                changed = self.acked.changed() => if changed.is_err() { return },
            }
        }
    }
}

fn see(config_map: Option<&ConfigMap>, applied: u64) -> Seen {
    let Some(config_map) = config_map else { return Seen::Unusable("the ConfigMap does not exist".into()) };
    let Some(text) = config_map.data.as_ref().and_then(|data| data.get(PAYLOAD_KEY)) else {
        return Seen::Unusable(format!("the ConfigMap has no {PAYLOAD_KEY}"));
    };
    match EdenConfig::from_yaml(text) {
        Ok(config) if config.generation == applied => Seen::Current(applied),
        Ok(config) if config.generation > applied => Seen::Newer(text.clone()),
        Ok(config) => Seen::Unusable(format!(
            "its generation {} is below the one applied here, {applied}; generations only go forward",
            config.generation
        )),
        Err(err) => Seen::Unusable(err.to_string()),
    }
}
