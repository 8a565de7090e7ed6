//! The operator's Prometheus metrics, served on `/metrics` by [`crate::admin`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped` (asked, and told why not) or `untouched`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub namespace: String,
    pub migration: String,
}

pub struct Metrics {
    pub registry: Registry,
    reconciliations: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    admissions: Family<AdmissionLabels, Counter>,
    replication_lag: Family<MigrationLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        // `eden_operator_*` for the operator's own work; `eden_replication_*` (DESIGN §8) for the
        // migrations it replicates.
        let mut registry = Registry::with_prefix("eden");
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register("operator_reconciliations", "Reconciliations started", reconciliations.clone());
        registry.register("operator_reconcile_failures", "Reconciliations that returned an error", failures.clone());
        registry.register("operator_reconcile_duration_seconds", "Time spent in one reconciliation", duration.clone());
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "operator_webhook_admissions",
            "Pods the injection webhook answered for, by outcome",
            admissions.clone(),
        );
        let replication_lag = Family::<MigrationLabels, Gauge>::default();
        registry.register(
            "replication_lag_ms",
            "How far the target is behind the source, in milliseconds, for each Migration this replica replicates",
            replication_lag.clone(),
        );
        Metrics { registry, reconciliations, failures, duration, admissions, replication_lag }
    }
}

impl Metrics {
    pub fn reconciled(&self, controller: &'static str, took: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciliations.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.failures.get_or_create(&FailureLabels { controller, error }).inc();
    }

    /// Counts one pod the injection webhook answered for.
    pub fn admitted(&self, outcome: &'static str) {
        self.admissions.get_or_create(&AdmissionLabels { outcome }).inc();
    }

    /// Records a Migration's replication lag; `None` when it has no replication running here,
    /// which removes its series rather than leave a stale figure behind.
    pub fn replication_lag(&self, namespace: &str, migration: &str, lag_ms: Option<i64>) {
        let labels = MigrationLabels { namespace: namespace.into(), migration: migration.into() };
        match lag_ms {
            Some(lag) => {
                self.replication_lag.get_or_create(&labels).set(lag);
            }
            None => {
                self.replication_lag.remove(&labels);
            }
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
