//! Counting a migration's sidecars from their Leases (DESIGN §6).
//!
//! A sidecar is live while its Lease was renewed within its own `leaseDurationSeconds`; it has
//! acknowledged a generation when its Lease says it applied that generation (or a later one).
//! The operator moves on only when every live sidecar has acknowledged.

use eden_sidecar::lease::{
    ANNOTATION_CONFIG_ERROR, ANNOTATION_GENERATION, ANNOTATION_LOST_SOURCE_WRITES, ANNOTATION_LOST_TARGET_WRITES,
    ANNOTATION_WRITES, LABEL_MIGRATION,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::ListParams;

use crate::crd::SidecarCounts;

/// What the live sidecars of one migration report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarReport {
    pub live: i32,
    /// Live sidecars that applied the configured generation.
    pub acknowledged: i32,
    /// Live sidecars that acknowledged and currently hold writes.
    pub holding_writes: i32,
    /// `pod: error` for each live sidecar that rejected a payload.
    pub config_errors: Vec<String>,
    /// Writes mirrored to the source that never landed, summed over every sidecar's Lease,
    /// live or not: a sidecar that exited keeps its Lease for exactly this.
    pub lost_source_writes: u64,
    /// The same for writes mirrored to the target.
    pub lost_target_writes: u64,
}

impl SidecarReport {
    /// Every live sidecar applied the configured generation. Vacuously true with no sidecars:
    /// a migration must not wait for pods that do not exist.
    pub fn all_acknowledged(&self) -> bool {
        self.acknowledged == self.live
    }

    pub fn counts(&self, configured_generation: i64) -> SidecarCounts {
        SidecarCounts {
            live: self.live,
            acknowledged: self.acknowledged,
            configured_generation,
            summary: format!("{}/{}", self.acknowledged, self.live),
        }
    }
}

/// Reads the report from `leases` as of `now`.
pub fn report(leases: &[Lease], configured_generation: i64, now: Timestamp) -> SidecarReport {
    let mut report = SidecarReport::default();
    for lease in leases {
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let count = |key: &str| annotation(key).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        report.lost_source_writes += count(ANNOTATION_LOST_SOURCE_WRITES);
        report.lost_target_writes += count(ANNOTATION_LOST_TARGET_WRITES);
        if !is_live(lease, now) {
            continue;
        }
        report.live += 1;
        let applied = annotation(ANNOTATION_GENERATION).and_then(|g| g.parse::<i64>().ok()).unwrap_or(0);
        if applied >= configured_generation {
            report.acknowledged += 1;
            if annotation(ANNOTATION_WRITES).is_some_and(|w| w == "paused") {
                report.holding_writes += 1;
            }
        }
        if let Some(error) = annotation(ANNOTATION_CONFIG_ERROR) {
            let pod = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).unwrap_or("unknown pod");
            report.config_errors.push(format!("{pod}: {error}"));
        }
    }
    report
}

fn is_live(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return false };
    let (Some(renewed), Some(duration)) = (&spec.renew_time, spec.lease_duration_seconds) else { return false };
    renewed.0 + SignedDuration::from_secs(i64::from(duration)) >= now
}

/// The Leases of `migration`'s sidecars in `leases`' namespace.
pub async fn list(leases: &Api<Lease>, migration: &str) -> Result<Vec<Lease>, kube::Error> {
    Ok(leases.list(&ListParams::default().labels(&format!("{LABEL_MIGRATION}={migration}"))).await?.items)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::api::ObjectMeta;

    use super::*;

    fn lease(pod: &str, renewed_seconds_ago: i64, generation: i64, writes: &str, error: Option<&str>) -> Lease {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let mut annotations = BTreeMap::from([
            (ANNOTATION_GENERATION.to_string(), generation.to_string()),
            (ANNOTATION_WRITES.to_string(), writes.to_string()),
            (ANNOTATION_LOST_SOURCE_WRITES.to_string(), pod.len().to_string()),
            (ANNOTATION_LOST_TARGET_WRITES.to_string(), (2 * pod.len()).to_string()),
        ]);
        if let Some(error) = error {
            annotations.insert(ANNOTATION_CONFIG_ERROR.to_string(), error.to_string());
        }
        Lease {
            metadata: ObjectMeta { annotations: Some(annotations), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(pod.into()),
                lease_duration_seconds: Some(10),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_seconds_ago))),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_fresh_leases_count_and_acks_need_the_configured_generation() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let leases = [
            lease("a", 1, 7, "paused", None),
            lease("b", 9, 8, "paused", None),
            lease("c", 2, 6, "flowing", Some("eden.yaml read_percentage is 150: a percentage, 0 to 100")),
            lease("dead", 11, 7, "paused", None),
        ];
        let report = report(&leases, 7, now);
        assert_eq!((report.live, report.acknowledged, report.holding_writes), (3, 2, 2));
        assert!(!report.all_acknowledged());
        assert_eq!(report.config_errors, ["c: eden.yaml read_percentage is 150: a percentage, 0 to 100"]);
        assert_eq!(report.counts(7).summary, "2/3");
        assert_eq!(report.lost_source_writes, 1 + 1 + 1 + 4, "losses count from every Lease, the dead one's too");
        assert_eq!(report.lost_target_writes, 2 * (1 + 1 + 1 + 4));
    }

    #[test]
    fn no_sidecars_means_nothing_to_wait_for() {
        let report = report(&[], 3, Timestamp::now());
        assert!(report.all_acknowledged());
        assert_eq!(report.counts(3).summary, "0/0");
    }
}
