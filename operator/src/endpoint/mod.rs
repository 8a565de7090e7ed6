//! The Endpoint reconciler: probes each Redis server (PING + INFO, with the Endpoint's
//! credentials and TLS settings) every [`PROBE_INTERVAL`], writes what it saw to status, and
//! records an Event whenever readiness changes.

mod connection;
mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use connection::{CredentialsError, resolve};
pub use probe::{ProbeError, ProbeReport, forget_sync_position, probe};

use crate::conditions;
use crate::context::{Context, FIELD_MANAGER};
use crate::crd::{Endpoint, EndpointStatus};

/// How often a Ready endpoint is probed again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How soon a failing endpoint is probed again: faster, so recovery shows quickly.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
const CONTROLLER: &str = "endpoint";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of Endpoint {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
    #[error("Endpoint {0} has no namespace; Endpoints are namespaced")]
    NotNamespaced(String),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::WriteStatus { .. } => "write_status",
            Error::NotNamespaced(_) => "not_namespaced",
        }
    }
}

/// Runs the Endpoint controller until the stream of watch events ends.
pub async fn run(ctx: Arc<Context>) {
    let endpoints: Api<Endpoint> = Api::all(ctx.client.clone());
    let (reader, writer) = reflector::store();
    // Only spec edits wake the reconciler; otherwise it runs on its own schedule (PROBE_INTERVAL,
    // RETRY_INTERVAL). Each probe writes status (the probe's time and latency), so a reconciler
    // woken by its own writes would probe and write in a loop, as fast as the API server answers.
    let triggers = watcher(endpoints, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(triggers, reader)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(endpoint = %endpoint.name_any(), namespace = endpoint.namespace()))]
pub async fn reconcile(endpoint: Arc<Endpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = endpoint.name_any();
    let namespace = endpoint.namespace().ok_or_else(|| Error::NotNamespaced(name.clone()))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    let outcome = match resolve(&endpoint.spec, &secrets).await {
        Ok(server) => probe(&server).await.map_err(|err| err.to_string()),
        Err(err) => Err(err.to_string()),
    };

    let previous = endpoint.status.clone().unwrap_or_default();
    let was_ready = conditions::is_true(&previous.conditions, "Ready");
    let generation = endpoint.meta().generation;
    let status = observed_status(&previous, &outcome, generation);

    let api: Api<Endpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({"apiVersion": Endpoint::api_version(&()), "kind": Endpoint::kind(&()), "status": status});
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::WriteStatus { name: name.clone(), source })?;

    let first_probe = previous.conditions.is_empty();
    match &outcome {
        Ok(report) if !was_ready => {
            let note = format!(
                "redis {} ({}) answered in {}µs",
                report.server_version,
                report.role,
                report.latency.as_micros()
            );
            tracing::info!(%note, "endpoint ready");
            ctx.event(endpoint.as_ref(), EventType::Normal, "Ready", "Probe", note);
        }
        Err(message) if was_ready || first_probe => {
            tracing::warn!(%message, "endpoint not ready");
            ctx.event(endpoint.as_ref(), EventType::Warning, "ProbeFailed", "Probe", message.clone());
        }
        _ => {}
    }
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    Ok(Action::requeue(if outcome.is_ok() { PROBE_INTERVAL } else { RETRY_INTERVAL }))
}

pub fn error_policy(endpoint: Arc<Endpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(endpoint = %endpoint.name_any(), %error, "reconcile failed; retrying");
    ctx.metrics.failed(CONTROLLER, error.metric_label());
    Action::requeue(RETRY_INTERVAL)
}

/// The status after one probe. A failed probe keeps the last known version and role: they
/// describe the server, which has not changed just because it is unreachable.
fn observed_status(
    previous: &EndpointStatus,
    outcome: &Result<ProbeReport, String>,
    generation: Option<i64>,
) -> EndpointStatus {
    let (condition, report) = match outcome {
        Ok(report) => (
            conditions::observed("Ready", true, "ProbeSucceeded", "PING and INFO answered".into(), generation),
            Some(report),
        ),
        Err(message) => (conditions::observed("Ready", false, "ProbeFailed", message.clone(), generation), None),
    };
    EndpointStatus {
        conditions: conditions::upsert(&previous.conditions, condition),
        observed_generation: generation,
        server_version: report.map(|r| r.server_version.clone()).or_else(|| previous.server_version.clone()),
        role: report.map(|r| r.role.clone()).or_else(|| previous.role.clone()),
        probe_latency_micros: report.map(|r| r.latency.as_micros() as i64),
        last_probe_time: Some(Time(Timestamp::now())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ProbeReport {
        ProbeReport { server_version: "7.0.15".into(), role: "master".into(), latency: Duration::from_micros(250) }
    }

    #[test]
    fn a_successful_probe_makes_the_endpoint_ready_with_what_it_saw() {
        let status = observed_status(&EndpointStatus::default(), &Ok(report()), Some(3));
        assert!(conditions::is_true(&status.conditions, "Ready"));
        assert_eq!(status.server_version.as_deref(), Some("7.0.15"));
        assert_eq!(status.role.as_deref(), Some("master"));
        assert_eq!(status.probe_latency_micros, Some(250));
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn a_failed_probe_says_why_and_keeps_the_last_known_server_facts() {
        let ready = observed_status(&EndpointStatus::default(), &Ok(report()), Some(1));
        let failed = observed_status(&ready, &Err("connection refused".into()), Some(1));
        assert!(!conditions::is_true(&failed.conditions, "Ready"));
        assert_eq!(failed.conditions[0].message, "connection refused");
        assert_eq!(failed.conditions[0].reason, "ProbeFailed");
        assert_eq!(failed.server_version.as_deref(), Some("7.0.15"));
        assert_eq!(failed.probe_latency_micros, None);
    }
}
