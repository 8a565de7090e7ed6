//! Leader election on a `coordination.k8s.io` Lease, so two operator replicas are safe: only
//! the leader reconciles and runs replication (DESIGN §5).
//!
//! Every write is a replace conditioned on the Lease's `resourceVersion`, so two candidates
//! racing for an expired Lease cannot both win: the API server accepts one and answers the
//! other 409 Conflict. A leader that cannot renew within the lease duration assumes it lost
//! and steps down before anyone else may take over, so there is never a moment with two
//! leaders that both believe it.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Timing of an election. Kubernetes' own components use 15 s / 10 s / 2 s.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a leader's claim lasts without renewal.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down; less than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often candidates and the leader act.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: impl Into<String>, identity: impl Into<String>, timing: Timing) -> Self {
        LeaderElector { api, name: name.into(), identity: identity.into(), timing }
    }

    /// Campaigns and publishes on `leading` whether this replica leads, until every receiver
    /// is gone.
    pub async fn run(self, leading: watch::Sender<bool>) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            let outcome = self.try_acquire_or_renew().await;
            match outcome {
                Ok(true) => last_renewed = Some(Instant::now()),
                Ok(false) => last_renewed = None,
                Err(err) => tracing::warn!(%err, lease = %self.name, "leader election: API error; retrying"),
            }
            let leads = last_renewed.is_some_and(|at| at.elapsed() < self.timing.renew_deadline);
            if leading.send_replace(leads) != leads {
                tracing::info!(identity = %self.identity, leads, "leadership changed");
            }
            if leading.is_closed() {
                return;
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Gives the Lease up on a clean shutdown, so another replica takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
    }

    /// One round: Ok(true) when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(self.claim(now, now, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = match (&spec.holder_identity, &spec.renew_time, spec.lease_duration_seconds) {
            (Some(_), Some(renewed), Some(seconds)) => renewed.0 + SignedDuration::from_secs(i64::from(seconds)) < now,
            // Released or never held.
            _ => true,
        };
        if !ours && !expired {
            return Ok(false);
        }
        let acquired = if ours { spec.acquire_time.map_or(now, |t| t.0) } else { now };
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(self.claim(acquired, now, transitions));
        // `lease` carries the resourceVersion we read: a concurrent writer makes this a 409.
        conflict_is_false(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }

    fn claim(&self, acquired: Timestamp, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// A 409 Conflict means another candidate wrote first: not an error, just not us.
fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}
