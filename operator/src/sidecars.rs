//! A migration's sidecars as their Leases report them (DESIGN §6), and which of them may still
//! be writing under an older strategy (DESIGN §9, "Fencing").
//!
//! The operator moves writes only when every sidecar that could still be writing under an
//! older generation has either acknowledged the new one or is provably fenced. A sidecar writes
//! under generation `a` only while a read of the ConfigMap showing `a`, sent after its Lease
//! acknowledged `a`, is younger than the bound its Lease declares (`eden.io/fenced-after-ms`).
//! Every such read happened before the ConfigMap first showed a later generation; this process
//! records, on its own monotonic clock, when it first knew of each generation ([`FenceClock`]:
//! the response to its own write, or its first read of one written before it started). So a
//! sidecar whose Lease shows `a` cannot be writing under `a` once that moment plus the bound
//! has passed here, and it cannot be writing under anything later without a Lease that says
//! so. Nothing compares this process's clock with a sidecar's: durations are measured where
//! they are used, as client-go's leader election does. A Lease's `renewTime` only feeds the
//! `live` count people read; liveness is judged the same way, by how long this process has seen
//! a Lease unchanged.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use eden_sidecar::lease::{
    ANNOTATION_CONFIG_ERROR, ANNOTATION_FENCED_AFTER, ANNOTATION_GENERATION, ANNOTATION_LOST_SOURCE_WRITES,
    ANNOTATION_LOST_TARGET_WRITES, ANNOTATION_WRITES, LABEL_MIGRATION, LEASE_DURATION,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use crate::crd::SidecarCounts;

/// What this operator process has seen of one migration, timed by its own monotonic clock.
#[derive(Debug, Default)]
pub struct FenceClock {
    /// When this process first knew each ConfigMap generation to be written.
    generations: BTreeMap<u64, Instant>,
    /// Each Lease's `resourceVersion` and when this process first saw it.
    leases: HashMap<String, (String, Instant)>,
}

impl FenceClock {
    /// Records that `generation` was in the ConfigMap at `at` (or before).
    pub fn generation_seen(&mut self, generation: u64, at: Instant) {
        self.generations.entry(generation).or_insert(at);
    }

    /// The highest generation this process knew to be written.
    pub fn latest(&self) -> u64 {
        self.generations.last_key_value().map_or(0, |(generation, _)| *generation)
    }

    /// The earliest moment this process knew the ConfigMap had moved past `generation`.
    fn superseded_since(&self, generation: u64) -> Option<Instant> {
        self.generations.range(generation + 1..).map(|(_, at)| *at).min()
    }

    /// Whether `lease` changed within [`LEASE_DURATION`] of `now`, as this process saw it.
    fn live(&mut self, lease: &Lease, now: Instant) -> bool {
        let version = lease.resource_version().unwrap_or_default();
        let seen = self.leases.entry(lease.name_any()).or_insert_with(|| (version.clone(), now));
        if seen.0 != version {
            *seen = (version, now);
        }
        now.duration_since(seen.1) < LEASE_DURATION
    }
}

/// How long after its strategy was superseded a sidecar that declared `fenced_after` is known,
/// here, to have stopped writing: its own bound, plus 5% for clocks that run at different
/// rates and 250 ms for scheduling.
pub fn fence_delay(fenced_after: Duration) -> Duration {
    fenced_after + fenced_after / 20 + Duration::from_millis(250)
}

/// One sidecar, as its Lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    pub pod: String,
    /// The generation it applied; `None` when the annotation cannot be read.
    pub applied: Option<u64>,
    /// Its write gate: `flowing`, `paused`, `unconfirmed` or `refusing`.
    pub writes: String,
    /// The bound it declared; `None` for a sidecar that does not fence itself.
    pub fenced_after: Option<Duration>,
    pub live: bool,
}

/// Where one sidecar stands with respect to a generation the operator wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It applied that generation (or a later one), and holds writes if asked to.
    Acknowledged,
    /// It cannot be writing under anything older.
    Fenced,
    /// Neither yet; it will be fenced in `left`, if it fences itself at all.
    Waiting { left: Option<Duration> },
}

impl Sidecar {
    /// Where this sidecar stands with respect to `generation`, which `clock` has seen; with
    /// `hold`, acknowledging means also holding writes (the cutover pause).
    pub fn standing(&self, generation: u64, hold: bool, clock: &FenceClock, now: Instant) -> Standing {
        // An unreadable generation may be anything below: judge it by the latest one.
        let applied = self.applied.unwrap_or(generation.saturating_sub(1));
        if applied >= generation && !(hold && self.writes == "flowing") {
            return Standing::Acknowledged;
        }
        // Holding or not, a sidecar under `generation` writes only as it says: only older
        // generations are the fence's business.
        let older = applied.min(generation.saturating_sub(1));
        let (Some(fenced_after), Some(since)) = (self.fenced_after, clock.superseded_since(older)) else {
            return Standing::Waiting { left: None };
        };
        match (since + fence_delay(fenced_after)).checked_duration_since(now) {
            Some(left) if !left.is_zero() => Standing::Waiting { left: Some(left) },
            _ => Standing::Fenced,
        }
    }
}

/// What a migration's sidecars report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarReport {
    /// Every sidecar with a Lease, live or not: one cut off from the API server is not live,
    /// and may still be writing.
    pub sidecars: Vec<Sidecar>,
    /// `pod: error` for each live sidecar that rejected a payload.
    pub config_errors: Vec<String>,
    /// Writes mirrored to the source that never landed, summed over every sidecar's Lease,
    /// live or not: a sidecar that exited keeps its Lease for exactly this.
    pub lost_source_writes: u64,
    /// The same for writes mirrored to the target.
    pub lost_target_writes: u64,
    /// `pod: annotation=value` for each count that cannot be read: the gates that depend on
    /// counts stay closed while any is.
    pub unreadable: Vec<String>,
}

/// Every sidecar's standing with respect to one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    pub generation: u64,
    pub acknowledged: Vec<String>,
    pub fenced: Vec<String>,
    pub waiting: Vec<(String, Option<Duration>)>,
}

impl Settlement {
    /// No sidecar can be writing under an older generation. Vacuously true with no sidecars:
    /// a migration must not wait for pods that do not exist.
    pub fn settled(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Who the operator waits for, for conditions.
    pub fn describe_waiting(&self) -> String {
        let pods: Vec<String> = self
            .waiting
            .iter()
            .map(|(pod, left)| match left {
                Some(left) => format!("{pod} (fenced in {}s)", left.as_secs().max(1)),
                None => format!("{pod} (fences itself only if it declares {ANNOTATION_FENCED_AFTER}: needs an acknowledgement, or its Lease deleted once its pod is gone)"),
            })
            .collect();
        format!(
            "waiting for {} sidecar(s) to acknowledge generation {} or be fenced: {}",
            self.waiting.len(),
            self.generation,
            pods.join(", ")
        )
    }
}

impl SidecarReport {
    /// Where every sidecar stands with respect to `generation`.
    pub fn settle(&self, generation: u64, hold: bool, clock: &FenceClock, now: Instant) -> Settlement {
        let mut settlement = Settlement { generation, ..Default::default() };
        for sidecar in &self.sidecars {
            let pod = sidecar.pod.clone();
            match sidecar.standing(generation, hold, clock, now) {
                Standing::Acknowledged => settlement.acknowledged.push(pod),
                Standing::Fenced => settlement.fenced.push(pod),
                Standing::Waiting { left } => settlement.waiting.push((pod, left)),
            }
        }
        settlement
    }

    /// The highest generation any sidecar applied: the next one written must be above it.
    pub fn max_applied(&self) -> u64 {
        self.sidecars.iter().filter_map(|s| s.applied).max().unwrap_or(0)
    }

    pub fn live(&self) -> i32 {
        self.sidecars.iter().filter(|s| s.live).count() as i32
    }

    pub fn counts(&self, settlement: &Settlement) -> SidecarCounts {
        let acknowledged = settlement.acknowledged.len() as i32;
        SidecarCounts {
            live: self.live(),
            acknowledged,
            fenced: settlement.fenced.len() as i32,
            configured_generation: settlement.generation as i64,
            summary: format!("{acknowledged}/{}", self.sidecars.len()),
        }
    }
}

/// Reads the report from `leases`, judging liveness with `clock` at `now`.
pub fn report(leases: &[Lease], clock: &mut FenceClock, now: Instant) -> SidecarReport {
    let mut report = SidecarReport::default();
    for lease in leases {
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let pod = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_else(|| lease.name_any());
        let mut count = |key: &str| match annotation(key).map(|n| n.parse::<u64>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                report.unreadable.push(format!("{pod}: {key}={:?}", annotation(key).unwrap()));
                0
            }
        };
        let (lost_source, lost_target) = (count(ANNOTATION_LOST_SOURCE_WRITES), count(ANNOTATION_LOST_TARGET_WRITES));
        report.lost_source_writes += lost_source;
        report.lost_target_writes += lost_target;
        let live = clock.live(lease, now);
        if live && let Some(error) = annotation(ANNOTATION_CONFIG_ERROR) {
            report.config_errors.push(format!("{pod}: {error}"));
        }
        report.sidecars.push(Sidecar {
            applied: annotation(ANNOTATION_GENERATION).and_then(|g| g.parse().ok()),
            writes: annotation(ANNOTATION_WRITES).cloned().unwrap_or_default(),
            fenced_after: annotation(ANNOTATION_FENCED_AFTER).and_then(|ms| ms.parse().ok()).map(Duration::from_millis),
            live,
            pod,
        });
    }
    report
}

/// The Leases of `migration`'s sidecars in `leases`' namespace.
pub async fn list(leases: &Api<Lease>, migration: &str) -> Result<Vec<Lease>, kube::Error> {
    Ok(leases.list(&ListParams::default().labels(&format!("{LABEL_MIGRATION}={migration}"))).await?.items)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    use super::*;

    fn lease(pod: &str, generation: &str, writes: &str, fenced_after_ms: Option<u64>) -> Lease {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_GENERATION.to_string(), generation.to_string()),
            (ANNOTATION_WRITES.to_string(), writes.to_string()),
            (ANNOTATION_LOST_SOURCE_WRITES.to_string(), pod.len().to_string()),
            (ANNOTATION_LOST_TARGET_WRITES.to_string(), (2 * pod.len()).to_string()),
        ]);
        if let Some(ms) = fenced_after_ms {
            annotations.insert(ANNOTATION_FENCED_AFTER.to_string(), ms.to_string());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(format!("eden-sidecar-{pod}")),
                resource_version: Some("1".into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some(pod.into()), ..Default::default() }),
        }
    }

    const FENCE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_sidecar_that_does_not_acknowledge_is_fenced_its_own_bound_after_its_generation_was_superseded() {
        let mut clock = FenceClock::default();
        clock.generation_seen(6, Instant::now());
        tokio::time::advance(Duration::from_secs(100)).await;
        let pushed = Instant::now();
        clock.generation_seen(7, pushed);
        let leases = [
            lease("acked", "7", "flowing", Some(30_000)),
            lease("behind", "6", "flowing", Some(30_000)),
            lease("silent", "6", "flowing", None),
            lease("garbled", "sev3n", "flowing", Some(30_000)),
        ];
        let report = report(&leases, &mut clock, Instant::now());
        let settle = |clock: &FenceClock| report.settle(7, false, clock, Instant::now());

        let now = settle(&clock);
        assert_eq!(now.acknowledged, ["acked"]);
        assert_eq!(
            now.waiting,
            [
                ("behind".into(), Some(fence_delay(FENCE))),
                ("silent".into(), None),
                ("garbled".into(), Some(fence_delay(FENCE)))
            ]
        );
        assert!(!now.settled());

        // One tick before the bound, still waiting; at the bound, fenced. The one that
        // declares no bound is never fenced: only its acknowledgement settles it.
        tokio::time::advance(fence_delay(FENCE) - Duration::from_millis(1)).await;
        assert_eq!(settle(&clock).fenced, Vec::<String>::new());
        tokio::time::advance(Duration::from_millis(1)).await;
        let later = settle(&clock);
        assert_eq!(later.fenced, ["behind", "garbled"]);
        assert_eq!(later.waiting, [("silent".into(), None)]);
        assert!(later.describe_waiting().contains("silent"), "{}", later.describe_waiting());
        assert_eq!(pushed.elapsed(), fence_delay(FENCE));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_runs_from_when_this_process_first_knew_of_a_later_generation() {
        // A restarted operator knows nothing older than what it reads now: a sidecar two
        // generations behind is fenced only the full bound after this process started.
        let mut clock = FenceClock::default();
        let started = Instant::now();
        clock.generation_seen(9, started);
        let behind = lease("behind", "4", "flowing", Some(30_000));
        let report = report(&[behind], &mut clock, started);
        assert!(
            matches!(report.settle(9, false, &clock, started).waiting[..], [(_, Some(left))] if left == fence_delay(FENCE))
        );
        tokio::time::advance(fence_delay(FENCE)).await;
        assert_eq!(report.settle(9, false, &clock, Instant::now()).fenced, ["behind"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_acknowledged_only_by_sidecars_that_hold_writes() {
        let mut clock = FenceClock::default();
        clock.generation_seen(3, Instant::now());
        let leases = [
            lease("holds", "3", "paused", Some(30_000)),
            lease("refuses", "3", "refusing", Some(30_000)),
            lease("flows", "3", "flowing", Some(30_000)),
        ];
        let report = report(&leases, &mut clock, Instant::now());
        let settlement = report.settle(3, true, &clock, Instant::now());
        assert_eq!(settlement.acknowledged, ["holds", "refuses"]);
        assert_eq!(settlement.waiting.len(), 1, "a sidecar that applied the pause but writes is not holding");
        assert_eq!(report.settle(3, false, &clock, Instant::now()).acknowledged.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_is_how_long_this_process_saw_a_lease_unchanged_and_unreadable_counts_are_named() {
        let mut clock = FenceClock::default();
        let mut garbled = lease("a", "1", "flowing", Some(30_000));
        garbled.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_LOST_SOURCE_WRITES.into(), "many".into());
        let renewing = lease("bb", "1", "flowing", Some(30_000));
        let first = report(&[garbled.clone(), renewing.clone()], &mut clock, Instant::now());
        assert_eq!(first.live(), 2, "a Lease first seen now is live");
        assert_eq!(first.unreadable, [r#"a: eden.io/lost-source-writes="many""#]);
        assert_eq!(first.lost_source_writes, 2, "the readable counts still add up");
        assert_eq!(first.lost_target_writes, 2 + 4);

        tokio::time::advance(LEASE_DURATION).await;
        let mut renewed = renewing;
        renewed.metadata.resource_version = Some("2".into());
        let later = report(&[garbled, renewed], &mut clock, Instant::now());
        assert_eq!(later.sidecars.iter().map(|s| s.live).collect::<Vec<_>>(), [false, true]);
        assert_eq!(later.counts(&later.settle(1, false, &clock, Instant::now())).summary, "2/2");
    }

    #[test]
    fn no_sidecars_means_nothing_to_wait_for() {
        let report = report(&[], &mut FenceClock::default(), Instant::now());
        assert!(report.settle(3, true, &FenceClock::default(), Instant::now()).settled());
        assert_eq!(report.max_applied(), 0);
    }
}
