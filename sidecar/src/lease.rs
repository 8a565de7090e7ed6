//! The sidecar's acknowledgement to the operator: one `coordination.k8s.io` Lease per sidecar
//! pod (DESIGN §6), renewed every [`RENEW_INTERVAL`].
//!
//! The operator counts a sidecar as live while its Lease is fresh, and as having acknowledged a
//! strategy once the Lease's annotations show that generation applied. Renewal is a server-side
//! apply of the whole Lease, so the first renewal creates it and a deleted Lease comes back.
//!
//! The Lease also carries how many mirrored writes never landed, per side. After the flip the
//! source is kept current only by its mirrors, so each one lost is a write a rollback would
//! lose; with `data.type: none` the same holds for the target before the flip, and a cutover
//! would serve a stale value. The operator holds the rollback or the cutover while any are
//! reported. A sidecar that lost some keeps its Lease when it exits, so the count outlives
//! the pod.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};

use crate::config::{ConfigStatus, CurrentConfig, writes_paused};
use crate::hold::CurrentHold;
use crate::metrics::ProxyMetrics;
use crate::route::Side;

pub const RENEW_INTERVAL: Duration = Duration::from_secs(3);
/// A Lease not renewed for this long belongs to a dead sidecar.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);

pub const ANNOTATION_GENERATION: &str = "eden.io/applied-generation";
pub const ANNOTATION_WRITES: &str = "eden.io/writes";
pub const ANNOTATION_CONFIG_ERROR: &str = "eden.io/config-error";
/// Writes mirrored to the source that failed or were dropped, since the sidecar started.
pub const ANNOTATION_LOST_SOURCE_WRITES: &str = "eden.io/lost-source-writes";
/// Writes mirrored to the target that failed or were dropped, since the sidecar started.
pub const ANNOTATION_LOST_TARGET_WRITES: &str = "eden.io/lost-target-writes";
pub const LABEL_MIGRATION: &str = "eden.io/migration";

const FIELD_MANAGER: &str = "eden-sidecar";

/// Keeps this sidecar's Lease current.
#[derive(Clone)]
pub struct LeaseReporter {
    api: Api<Lease>,
    pod: String,
    migration: String,
    config: CurrentConfig,
    status: Arc<ConfigStatus>,
    hold: Option<CurrentHold>,
    metrics: Option<Arc<ProxyMetrics>>,
}

impl LeaseReporter {
    /// `api` is namespaced to the pod's namespace; `migration` is the Migration's name.
    pub fn new(
        api: Api<Lease>,
        pod: String,
        migration: String,
        config: CurrentConfig,
        status: Arc<ConfigStatus>,
    ) -> Self {
        LeaseReporter { api, pod, migration, config, status, hold: None, metrics: None }
    }

    /// Reports the sidecar's actual write hold (`flowing`, `paused` while holding, `expired`
    /// once the deadline passed without a flip) instead of what the payload asks for.
    pub fn with_hold(mut self, hold: CurrentHold) -> Self {
        self.hold = Some(hold);
        self
    }

    /// Reports the mirrored writes that never landed, per side, from the proxy's counters.
    pub fn with_mirror_losses(mut self, metrics: Arc<ProxyMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lost_writes(&self, side: Side) -> u64 {
        self.metrics.as_ref().map_or(0, |m| m.lost_mirror_writes(side))
    }

    /// The Lease's name: one per pod.
    pub fn lease_name(&self) -> String {
        format!("eden-sidecar-{}", self.pod)
    }

    /// Renews at once, then on every tick and whenever the applied configuration, the hold or
    /// the count of lost writes changes, so the operator sees each within one round trip.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(RENEW_INTERVAL);
        ticker.tick().await; // the first tick is immediate; the first renewal is below
        loop {
            if let Err(err) = self.renew().await {
                tracing::warn!(%err, lease = %self.lease_name(), "could not renew Lease; retrying");
            }
            let hold = &mut self.hold;
            let hold_changed = async move {
                match hold {
                    Some(hold) => hold.changed().await,
                    None => std::future::pending().await,
                }
            };
            let metrics = self.metrics.clone();
            let lost_write = async move {
                match metrics {
                    Some(metrics) => metrics.lost_mirror_write().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ticker.tick() => {}
                changed = self.config.changed() => if changed.is_err() { return },
                changed = hold_changed => if changed.is_err() { return },
                () = lost_write => {}
            }
        }
    }

    /// Writes the Lease as it should be now.
    pub async fn renew(&self) -> Result<Lease, kube::Error> {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_GENERATION.to_string(), self.status.applied_generation().to_string()),
            (ANNOTATION_WRITES.to_string(), self.writes().to_string()),
            (ANNOTATION_LOST_SOURCE_WRITES.to_string(), self.lost_writes(Side::Source).to_string()),
            (ANNOTATION_LOST_TARGET_WRITES.to_string(), self.lost_writes(Side::Target).to_string()),
        ]);
        if let Some(error) = self.status.last_error() {
            annotations.insert(ANNOTATION_CONFIG_ERROR.to_string(), error);
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.lease_name()),
                labels: Some(BTreeMap::from([(LABEL_MIGRATION.to_string(), self.migration.clone())])),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.pod.clone()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
        value["apiVersion"] = "coordination.k8s.io/v1".into();
        value["kind"] = "Lease".into();
        self.api.patch(&self.lease_name(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await
    }

    fn writes(&self) -> &'static str {
        match &self.hold {
            Some(hold) => hold.borrow().as_str(),
            None if writes_paused(&self.config) => "paused",
            None => "flowing",
        }
    }

    /// Deletes the Lease on a clean shutdown, so the operator stops counting this sidecar at
    /// once instead of after [`LEASE_DURATION`]. A sidecar that lost mirrored writes writes its
    /// final counts instead and leaves the Lease to expire: the operator must keep seeing those
    /// losses after the pod is gone.
    pub async fn release(&self) {
        let (source, target) = (self.lost_writes(Side::Source), self.lost_writes(Side::Target));
        if source + target > 0 {
            tracing::warn!(source, target, lease = %self.lease_name(), "keeping the Lease: mirrored writes were lost");
            if let Err(err) = self.renew().await {
                tracing::warn!(%err, lease = %self.lease_name(), "could not record the final count in the Lease");
            }
            return;
        }
        if let Err(err) = self.api.delete(&self.lease_name(), &DeleteParams::default()).await {
            tracing::warn!(%err, lease = %self.lease_name(), "could not release Lease");
        }
    }
}
