//! What routed sessions share: each applied generation of `eden.yaml` turned into a [`Plan`]
//! (the strategy and the upstreams it names), and the write hold.
//!
//! Upstreams are built here, once per change, not per session: a session takes one `Arc<Plan>`
//! snapshot per batch and finds everything it needs in it. Addresses come from the command
//! line when given (`--source`, `--target`: the pod's view of the network), each server with TLS
//! settings of its own (`--source-ca-file`, `--target-server-name`...); the payload's target URI
//! fills in a target the flags do not name. Credentials
//! come from the payload's `credentials_file` (a mounted Secret: `password`, and `username`
//! beside it when present), read whenever a new generation is applied, so a rotated Secret is
//! picked up with the next change.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Confirmations, CurrentConfig, EdenConfig, UpstreamConfig};
use crate::freshness::{self, Covered};
use crate::hold::{self, CurrentHold, HoldState};
use crate::mirror::MirrorPool;
use crate::route::{Side, Strategy, TargetReads};
use crate::upstream::{Credentials, TlsSettings, Upstream};

/// One generation's routing.
#[derive(Debug)]
pub struct Plan {
    pub config: Option<Arc<EdenConfig>>,
    /// Client connections to the source: the client's AUTH passes through.
    pub source: Upstream,
    /// Eden's own connections to the source (mirrored writes after cutover): the source's
    /// credentials file when there is one, else the client's AUTH replayed.
    pub source_mirror: Upstream,
    /// Every connection to the target; `None` while the strategy names none.
    pub target: Option<Upstream>,
    /// Mirror connections the sessions of this plan share.
    pub mirrors: MirrorPool,
    /// How fresh the target is, while reads of source-owned keys may go to it under a lag
    /// guard (see [`crate::freshness`]).
    pub freshness: Option<TargetFreshness>,
}

/// The freshness record followed on one target, under one lag guard.
#[derive(Debug, Clone)]
pub struct TargetFreshness {
    uri: String,
    max_lag: Duration,
    covered: Covered,
}

impl TargetFreshness {
    /// The gate now: the covered instant, if within the lag guard and lately confirmed.
    fn target_reads(&self) -> TargetReads {
        let fresh = *self.covered.borrow();
        TargetReads::CoveredBefore(fresh.and_then(|fresh| fresh.covered_within(self.max_lag)))
    }
}

impl Plan {
    /// Where a session's own connection to `side` goes.
    pub fn upstream(&self, side: Side) -> Option<&Upstream> {
        match side {
            Side::Source => Some(&self.source),
            Side::Target => self.target.as_ref(),
        }
    }

    /// Where a mirror link to `side` goes.
    pub fn mirror_upstream(&self, side: Side) -> Option<&Upstream> {
        match side {
            Side::Source => Some(&self.source_mirror),
            Side::Target => self.target.as_ref(),
        }
    }
}

/// Settings for the target, which the payload may name.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The target's own TLS trust (`--target-ca-file`, `--target-server-name`...).
    pub target_tls: TlsSettings,
    pub connect_timeout: Duration,
    /// `--target`, which wins over the payload's target URI.
    pub target: Option<String>,
}

/// The current plan and hold, cheap to clone into every session.
#[derive(Debug, Clone)]
pub struct Routing {
    plan: watch::Receiver<Arc<Plan>>,
    hold: CurrentHold,
}

impl Routing {
    /// Follows `config`: plans are rebuilt on every applied generation; writes are held while
    /// paused or unconfirmed (`confirmations`, with a ConfigMap) and refused after `max_pause`.
    pub fn follow(
        source: Upstream,
        settings: UpstreamSettings,
        config: CurrentConfig,
        confirmations: Option<Confirmations>,
        max_pause: Duration,
    ) -> Routing {
        let hold = hold::follow(config.clone(), confirmations, max_pause);
        let initial = Plan {
            config: None,
            source_mirror: source.clone(),
            source,
            target: None,
            mirrors: MirrorPool::default(),
            freshness: None,
        };
        let (plans, plan) = watch::channel(Arc::new(initial));
        tokio::spawn(rebuild(plans, config, settings));
        Routing { plan, hold }
    }

    /// One consistent snapshot: the strategy to decide with and the plan it came from.
    pub fn snapshot(&self) -> (Strategy, Arc<Plan>) {
        let plan = self.plan.borrow().clone();
        let hold = *self.hold.borrow();
        let target_reads = plan.freshness.as_ref().map_or(TargetReads::Ungated, TargetFreshness::target_reads);
        (Strategy::new(plan.config.clone(), hold).with_target_reads(target_reads), plan)
    }

    /// Resolves once writes are no longer held (they flow, or are refused).
    pub async fn released(&mut self) {
        let _ = self.hold.wait_for(|state| !matches!(state, HoldState::Holding(_))).await;
    }

    /// The write gate as the Lease reports it.
    pub fn hold(&self) -> CurrentHold {
        self.hold.clone()
    }
}

async fn rebuild(plans: watch::Sender<Arc<Plan>>, mut config: CurrentConfig, settings: UpstreamSettings) {
    loop {
        let current = config.borrow_and_update().clone();
        if let Some(payload) = &current {
            let previous = plans.borrow().clone();
            let target_uri = payload.target.as_ref().map(|target| settings.target.as_deref().unwrap_or(&target.uri));
            let target = payload.target.as_ref().zip(target_uri).and_then(|(target, uri)| {
                match Upstream::new(uri, &settings.target_tls, settings.connect_timeout) {
                    Ok(upstream) => Some(upstream.with_credentials(credentials(target))),
                    Err(err) => {
                        tracing::error!(%err, "target unusable; everything stays on the source");
                        None
                    }
                }
            });
            let freshness = match (&target, target_uri, payload.max_lag_ms) {
                (Some(upstream), Some(uri), Some(max_lag)) if payload.read_percentage > 0 => {
                    let max_lag = Duration::from_millis(max_lag);
                    // The same target keeps its follower: no gap in what is known.
                    Some(match previous.freshness.as_ref().filter(|f| f.uri == uri) {
                        Some(followed) => TargetFreshness { max_lag, ..followed.clone() },
                        None => TargetFreshness {
                            uri: uri.to_string(),
                            max_lag,
                            covered: freshness::follow(upstream.clone()),
                        },
                    })
                }
                _ => None,
            };
            let plan = Plan {
                source_mirror: previous.source.clone().with_credentials(credentials(&payload.source)),
                target,
                source: previous.source.clone(),
                config: current.clone(),
                mirrors: MirrorPool::default(),
                freshness,
            };
            plans.send_replace(Arc::new(plan));
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

/// Reads a mounted Secret: `credentials_file` holds the password, a `username` file beside it
/// the user (ACL), when present. An unreadable file is logged and the client's AUTH is
/// replayed instead.
fn credentials(config: &UpstreamConfig) -> Option<Credentials> {
    let path = config.credentials_file.as_deref()?;
    match Credentials::from_file(path) {
        Ok(credentials) => Some(credentials),
        Err(err) => {
            tracing::error!(%err, file = %path.display(), "credentials unreadable; replaying the client's AUTH instead");
            None
        }
    }
}
