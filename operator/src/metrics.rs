//! The operator's Prometheus metrics, served on `/metrics` by [`crate::admin`].

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

pub struct Metrics {
    pub registry: Registry,
    reconciliations: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    admissions: Family<AdmissionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eden_operator");
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register("reconciliations", "Reconciliations started", reconciliations.clone());
        registry.register("reconcile_failures", "Reconciliations that returned an error", failures.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconciliation", duration.clone());
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "webhook_admissions",
            "Pods the injection webhook answered for, by outcome",
            admissions.clone(),
        );
        Metrics { registry, reconciliations, failures, duration, admissions }
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

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
