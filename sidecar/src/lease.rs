//! The sidecar's acknowledgement to the operator: one `coordination.k8s.io` Lease per sidecar
//! pod (DESIGN §6), written whenever what it reports changes and renewed every
//! [`RENEW_INTERVAL`] otherwise.
//!
//! The Lease says which generation this sidecar applied and what its write gate does. A write
//! the API server accepted is also what lets the sidecar confirm that generation (see
//! `config::confirm`): the reporter publishes each acknowledged generation ([`Self::acked`]).
//! The Lease declares, once and for the life of the process, how long a confirmation holds
//! ([`ANNOTATION_FENCED_AFTER`]): the operator treats a sidecar that has not acknowledged a
//! generation as fenced that long after the generation before it stopped being current, and
//! it reads the bound from the sidecar itself rather than assuming one.
//!
//! Liveness is for people only (`status.sidecars.live`): safety never depends on a Lease being
//! fresh. So the steady state costs one API write per sidecar every [`RENEW_INTERVAL`]; a
//! renewal that fails is retried every [`RETRY_INTERVAL`].
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
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::watch;

use crate::config::{ConfigStatus, CurrentConfig, writes_paused};
use crate::hold::{CurrentHold, HoldReason, HoldState};
use crate::metrics::ProxyMetrics;
use crate::route::Side;

pub const RENEW_INTERVAL: Duration = Duration::from_secs(30);
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a new pause waits for the writes routed before it to be answered before it is
/// reported as `pausing` rather than `paused` (see [`LeaseReporter::run`]).
const PAUSING_GRACE: Duration = Duration::from_millis(100);
/// A Lease not renewed for this long belongs to a sidecar that is gone or cut off.
pub const LEASE_DURATION: Duration = Duration::from_secs(90);

pub const ANNOTATION_GENERATION: &str = "eden.io/applied-generation";
pub const ANNOTATION_WRITES: &str = "eden.io/writes";
pub const ANNOTATION_CONFIG_ERROR: &str = "eden.io/config-error";
/// Milliseconds a confirmation of the strategy holds in this sidecar: the longest it can go on
/// writing under a generation after that generation stopped being current.
pub const ANNOTATION_FENCED_AFTER: &str = "eden.io/fenced-after-ms";
/// Writes mirrored to the source that failed or were dropped, since the sidecar started.
pub const ANNOTATION_LOST_SOURCE_WRITES: &str = "eden.io/lost-source-writes";
/// Writes mirrored to the target that failed or were dropped, since the sidecar started.
pub const ANNOTATION_LOST_TARGET_WRITES: &str = "eden.io/lost-target-writes";
pub const LABEL_MIGRATION: &str = "eden.io/migration";

const FIELD_MANAGER: &str = "eden-sidecar";

/// What one Lease write says: the applied generation, and the annotations that carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    generation: u64,
    annotations: BTreeMap<String, String>,
}

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
    fenced_after: Option<Duration>,
    acked: Arc<watch::Sender<u64>>,
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
        let acked = Arc::new(watch::Sender::new(0));
        LeaseReporter { api, pod, migration, config, status, hold: None, metrics: None, fenced_after: None, acked }
    }

    /// Declares that this sidecar stops writing `fenced_after` past its last confirmation.
    pub fn with_fencing(mut self, fenced_after: Duration) -> Self {
        self.fenced_after = Some(fenced_after);
        self
    }

    /// The latest generation a renewal wrote, once the API server accepted it.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
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

    /// Renews at once, then whenever what it reports changes (the applied configuration, a
    /// rejection, the gate, the count of lost writes), so the operator sees each within one
    /// round trip, and every [`RENEW_INTERVAL`] otherwise ([`RETRY_INTERVAL`] after a failure).
    /// A wake-up that changes nothing writes nothing: a new generation changes the
    /// configuration and the gate at once, and with 100 sidecars each extra write is 100 more
    /// for the API server in the middle of a cutover.
    pub async fn run(mut self) {
        let mut errors = self.status.errors();
        // What the API server last accepted, and when a renewal is due regardless.
        let mut written: Option<Report> = None;
        let mut due = tokio::time::Instant::now();
        loop {
            // A pause is reported as `paused` once the writes routed before it are answered,
            // which takes a round trip to the source: wait for that briefly rather than write
            // `pausing` now and `paused` a moment later.
            if let Some(metrics) = self.metrics.as_ref().filter(|_| self.writes() == "pausing") {
                let _ = tokio::time::timeout(PAUSING_GRACE, metrics.no_writes_in_flight()).await;
            }
            let report = self.report();
            if written.as_ref() != Some(&report) || tokio::time::Instant::now() >= due {
                match self.write(&report).await {
                    Ok(_) => {
                        written = Some(report);
                        due = tokio::time::Instant::now() + RENEW_INTERVAL;
                    }
                    Err(err) => {
                        tracing::warn!(%err, lease = %self.lease_name(), "could not renew Lease; retrying");
                        written = None;
                        due = tokio::time::Instant::now() + RETRY_INTERVAL;
                    }
                }
            }
            let (in_flight, pausing) = (self.metrics.clone(), self.writes() == "pausing");
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
            let settled = async move {
                match in_flight.filter(|_| pausing) {
                    Some(metrics) => metrics.no_writes_in_flight().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                changed = self.config.changed() => if changed.is_err() { return },
                _ = errors.changed() => {}
                changed = hold_changed => if changed.is_err() { return },
                () = lost_write => {}
                () = settled => {}
            }
        }
    }

    /// Writes the Lease as it should be now, and publishes the generation it acknowledged.
    pub async fn renew(&self) -> Result<Lease, kube::Error> {
        self.write(&self.report()).await
    }

    /// What the Lease reports now.
    fn report(&self) -> Report {
        let generation = self.status.applied_generation();
        let mut annotations = BTreeMap::from([
            (ANNOTATION_GENERATION.to_string(), generation.to_string()),
            (ANNOTATION_WRITES.to_string(), self.writes().to_string()),
            (ANNOTATION_LOST_SOURCE_WRITES.to_string(), self.lost_writes(Side::Source).to_string()),
            (ANNOTATION_LOST_TARGET_WRITES.to_string(), self.lost_writes(Side::Target).to_string()),
        ]);
        if let Some(error) = self.status.last_error() {
            annotations.insert(ANNOTATION_CONFIG_ERROR.to_string(), error);
        }
        if let Some(fenced_after) = self.fenced_after {
            annotations.insert(ANNOTATION_FENCED_AFTER.to_string(), fenced_after.as_millis().to_string());
        }
        Report { generation, annotations }
    }

    /// Writes the Lease with `report`, and publishes the generation it acknowledged.
    async fn write(&self, report: &Report) -> Result<Lease, kube::Error> {
        let Report { generation, annotations } = report.clone();
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
        // A merge patch, not server-side apply: the Lease is this sidecar's alone, and apply's
        // field management costs the API server several times as much per write, which a
        // cutover pays once per sidecar while every writer waits. An annotation this write does
        // not carry is removed explicitly.
        let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
        if !lease.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_CONFIG_ERROR)) {
            value["metadata"]["annotations"][ANNOTATION_CONFIG_ERROR] = serde_json::Value::Null;
        }
        let name = self.lease_name();
        let manager = Some(FIELD_MANAGER.to_string());
        let patch = PatchParams { field_manager: manager.clone(), ..Default::default() };
        let written = match self.api.patch(&name, &patch, &Patch::Merge(&value)).await {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.api.create(&PostParams { field_manager: manager, ..Default::default() }, &lease).await?
            }
            written => written?,
        };
        self.acked.send_if_modified(|acked| generation > std::mem::replace(acked, generation.max(*acked)));
        Ok(written)
    }

    /// The write gate as the operator reads it. A pause is reported only once no write routed
    /// before it is still on its way to the source (`pausing` until then): the operator drains
    /// replication to the source's offset after every sidecar says `paused`, and a write that
    /// reached the source after that would be lost when replication stops.
    fn writes(&self) -> &'static str {
        let in_flight = self.metrics.as_ref().is_some_and(|m| m.writes_in_flight() > 0);
        match &self.hold {
            Some(hold) => match *hold.borrow() {
                HoldState::Holding(HoldReason::Paused) if in_flight => "pausing",
                state => state.as_str(),
            },
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
