//! The Migration controller: the phase machine ([`phase`]) decides, the reconciler carries
//! decisions out.
//!
//! One reconcile: observe ([`observe`]: the Endpoints, the ConfigMap the sidecars read, their
//! Leases, the replication run), decide ([`phase::next`]), act (start or stop replication,
//! verify, push the strategy with a new generation when it changed), and report ([`status`]:
//! status with server-side apply, an Event for every transition). Nothing is remembered between
//! reconciles except in the API server and in the leader's replication runs
//! ([`replication`]), so a restarted or new leader picks up where the last one was.

mod observe;
pub mod phase;
pub mod replication;
mod status;

#[cfg(test)]
mod phase_tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use eden_sidecar::lease::LABEL_MIGRATION;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::context::{Context, FIELD_MANAGER};
use crate::crd::{DataCopy, Endpoint, GatewayStatus, Migration, Phase};
use crate::{configmap, gateway, proxy};
use observe::Observation;
pub use observe::{TARGET_CREDENTIALS_DIR, TARGET_CREDENTIALS_FILE};
use phase::{Decision, Writes};
use status::Notice;

/// The finalizer that lets the operator stop replication and delete the ConfigMap before a
/// Migration goes (there may be no garbage collector; see DESIGN §9).
pub const FINALIZER: &str = "eden.io/cleanup";
const CONTROLLER: &str = "migration";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Migration {0} has no namespace; Migrations are namespaced")]
    NotNamespaced(String),
    #[error("Migration {0} has no uid yet")]
    NoUid(String),
    #[error("reading {what}: {source}")]
    Read { what: String, source: kube::Error },
    #[error("writing {what}: {source}")]
    Write { what: String, source: kube::Error },
    #[error("the strategy payload could not be built: {0}")]
    Payload(#[from] eden_sidecar::config::ConfigError),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::NotNamespaced(_) => "not_namespaced",
            Error::NoUid(_) => "no_uid",
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::Payload(_) => "payload",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Runs the Migration controller until the stream of watch events ends, for Migrations in
/// `namespace` or, with `None`, in every namespace.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let migrations: Api<Migration> = scoped(&client, namespace.as_deref());
    let (reader, writer) = reflector::store();
    // Only spec, annotation and finalizer edits wake the reconciler: the status it writes
    // itself must not, or every status write would start another reconcile at once.
    let triggers = watcher(migrations, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations).combine(predicates::finalizers),
            Default::default(),
        );
    let (store, moving) = (reader.clone(), reader.clone());
    Controller::for_stream(triggers, reader)
        .owns(
            scoped::<ConfigMap>(&client, namespace.as_deref()),
            watcher::Config::default().labels("eden.io/migration"),
        )
        .watches(scoped::<Endpoint>(&client, namespace.as_deref()), watcher::Config::default(), move |endpoint| {
            let namespace = endpoint.namespace();
            let name = endpoint.name_any();
            store
                .state()
                .into_iter()
                .filter(|m| m.namespace() == namespace && observe::references(m, &name))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        // While writes move, a sidecar's acknowledgement wakes its Migration at once rather than
        // at the next 200 ms requeue: each step of a cutover waits on one. At rest it does not:
        // renewals would only wake reconciles that find nothing to do.
        .watches(
            scoped::<Lease>(&client, namespace.as_deref()),
            watcher::Config::default().labels(LABEL_MIGRATION),
            move |lease| {
                let namespace = lease.namespace();
                let migration = lease.labels().get(LABEL_MIGRATION).cloned();
                moving
                    .state()
                    .into_iter()
                    .filter(|m| m.namespace() == namespace && Some(m.name_any()) == migration)
                    .filter(|m| {
                        let phase = m.status.as_ref().and_then(|s| s.phase);
                        matches!(phase, Some(Phase::CuttingOver | Phase::RollingBack))
                    })
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

#[tracing::instrument(skip_all, fields(migration = %migration.name_any(), namespace = migration.namespace()))]
pub async fn reconcile(migration: Arc<Migration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = migration.name_any();
    let namespace = migration.namespace().ok_or_else(|| Error::NotNamespaced(name.clone()))?;
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, migration, |event| async {
        match event {
            Finalizer::Apply(migration) => apply(migration, &ctx).await,
            Finalizer::Cleanup(migration) => cleanup(migration, &ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)))?;
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    Ok(action)
}

pub fn error_policy(migration: Arc<Migration>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(migration = %migration.name_any(), %error, "reconcile failed; retrying");
    ctx.metrics.failed(CONTROLLER, error.metric_label());
    Action::requeue(Duration::from_secs(5))
}

async fn apply(migration: Arc<Migration>, ctx: &Context) -> Result<Action, Error> {
    // The phase machine starts from the phase in status, so it reads the object fresh: the
    // watch cache can lag behind this controller's own last status write, and a stale phase
    // would repeat a transition (and its Events).
    let name = migration.name_any();
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    let migration = api.get(&name).await.map_err(|source| Error::Read { what: format!("Migration {name}"), source })?;
    let uid = migration.uid().ok_or_else(|| Error::NoUid(name.clone()))?;
    let started = Instant::now();
    let observation = Observation::gather(&migration, ctx).await?;
    let decision = phase::next(&migration.spec, &observation.observed, observation.phase);
    tracing::debug!(
        phase = ?observation.phase,
        next = ?decision.phase,
        writes_held = observation.observed.cutover.writes_held,
        waiting_for = observation.observed.cutover.waiting_for,
        gathered_in = ?started.elapsed(),
        "observed"
    );
    let mut events = Vec::new();

    // The flip happens only once the engine has provably applied every write made before the
    // hold; after it, replication stops so that writes mirrored to the source do not come back.
    let flip = decision.effective.is_some_and(|e| matches!(e.writes, Writes::Target { .. } | Writes::Split { .. }))
        && decision.phase == Phase::CuttingOver
        && !observation.observed.cutover.flip_pushed;
    let drained = !flip || migration.spec.data.type_ == DataCopy::None || {
        let remaining =
            migration.spec.cutover.max_write_pause_millis - observation.observed.cutover.paused_for_millis.max(0);
        let drained = ctx.replications.drain(&uid, Duration::from_millis(remaining.max(0) as u64)).await;
        tracing::debug!(drained, after = ?started.elapsed(), "drained replication for the flip");
        drained
    };

    // A flip that could not drain does not happen, so neither does the stop that goes with it:
    // the engine keeps applying what it has not applied yet.
    let replicate = decision.replicate || !drained;
    drive_replication(&migration, ctx, &uid, &observation, &decision, replicate, &mut events).await;

    let mut generation = observation.configured_generation();
    let mut barrier = match decision.phase {
        Phase::CuttingOver => observation.status.cutover_barrier_generation,
        _ => None,
    };
    let mut push = None;
    if drained
        && let Some(effective) = &decision.effective
        && let Some(payload) = observation.payload(&migration, effective)
    {
        // A cutover starts with a generation of its own, so that every sidecar either answers
        // it or is fenced before writes pause (DESIGN §9, "Fencing").
        let barrier_due =
            decision.phase == Phase::CuttingOver && barrier.is_none() && effective.writes != Writes::Paused;
        let floor = observation.sidecars.max_applied().max(ctx.fence_clock(&uid).latest());
        let next = configmap::next_generation(observation.config.as_ref(), &payload, floor, barrier_due);
        if Some(next) != observation.config.as_ref().map(|c| c.generation) {
            push = Some(eden_sidecar::config::EdenConfig { generation: next, ..payload });
            generation = next;
        }
        if barrier_due {
            barrier = Some(next as i64);
        }
    }
    // This reconcile's push is the one that pauses writes.
    let pausing = push.is_some() && decision.effective.is_some_and(|e| e.writes == Writes::Paused);

    if decision.phase == Phase::Completed && observation.phase != Phase::Completed {
        forget_sync_position(&migration, ctx).await;
    }

    let snapshot = ctx.replications.observe(&uid).await;
    // Only while the engine runs here: a stopped or failed run's last figure is not a lag.
    let lag = snapshot.as_ref().filter(|s| s.failure.is_none() && s.checkpoint.is_some()).map(|s| s.lag_millis);
    ctx.metrics.replication_lag(&migration.namespace().unwrap_or_default(), &name, lag);
    if migration.spec.cutover.require_verification
        && decision.replicate
        && snapshot.as_ref().is_some_and(|s| {
            s.failure.is_none() && s.backfill_done && s.lag_millis <= migration.spec.cutover.max_lag_millis
        })
        && ctx.replications.verify_if_due(&uid)
    {
        tracing::info!("verifying the copy");
    }

    let gateway = sync_gateway(&migration, ctx, &observation, &mut events).await?;

    // The pause is timed from the status that announces it, written just before the push.
    let cutover_started_at = match decision.phase {
        Phase::CuttingOver if pausing => Some(MicroTime(Timestamp::now())),
        Phase::CuttingOver => observation.status.cutover_started_at.clone(),
        _ => None,
    };
    let report = status::Report {
        migration: &migration,
        previous: &observation.status,
        decision: &decision,
        observation: &observation,
        snapshot: snapshot.as_ref(),
        configured_generation: generation,
        cutover_started_at,
        cutover_barrier_generation: barrier,
        gateway,
    };
    let new_status = report.status();
    // Unchanged, it is not written again: every write is one more request for the API server
    // that the sidecars' acknowledgements queue behind in a cutover.
    let status_due = new_status != observation.status;
    // The status that starts a pause goes out before the pause does. Every sidecar answers the
    // pause with a Lease write at once; a status write queued behind them would hold this
    // reconcile, and so the next one, which flips, for as long as they take: time every
    // client's writes wait. Written first, it can only start the pause's clock early, and so
    // end a pause early (an abort: writes resume on the source), never hold one longer; that
    // includes a push that fails after it.
    if pausing && status_due {
        write_status(&migration, ctx, &new_status).await?;
    }
    if let Some(payload) = push {
        push_config(&migration, ctx, &payload).await?;
        ctx.fence_clock(&uid).generation_seen(payload.generation, tokio::time::Instant::now());
        let note = status::describe_strategy(&payload);
        let action = format!("PushGeneration{}", payload.generation);
        events.push(Notice::new(EventType::Normal, "StrategyPushed", action, note));
    }
    events.extend(report.events(&new_status));
    if !pausing && status_due {
        write_status(&migration, ctx, &new_status).await?;
    }
    let status_written = started.elapsed();
    let recorded = events.len();
    for notice in events {
        ctx.event(&migration, notice.type_, notice.reason, &notice.action, notice.note);
    }
    tracing::debug!(?status_written, recorded, done = ?started.elapsed(), "reconciled");
    Ok(Action::requeue(requeue_after(decision.phase)))
}

/// Starts, restarts or stops the replication run so that it runs exactly when `replicate`.
async fn drive_replication(
    migration: &Migration,
    ctx: &Context,
    uid: &str,
    observation: &Observation,
    decision: &Decision,
    replicate: bool,
    events: &mut Vec<Notice>,
) {
    let running = ctx.replications.contains(uid);
    if !replicate {
        if running {
            ctx.replications.stop(uid).await;
            events.push(Notice::new(
                EventType::Normal,
                "ReplicationStopped",
                "Replicate",
                format!("replication stopped in phase {:?}", decision.phase),
            ));
        }
        return;
    }
    if running && !decision.fresh_copy && !ctx.replications.retry_due(uid) {
        return;
    }
    let plan = match observation.plan(migration, ctx).await {
        Ok(plan) => plan,
        Err(message) => {
            events.push(Notice::new(EventType::Warning, "ReplicationFailed", "Replicate", message));
            return;
        }
    };
    let plan = &plan;
    // A fresh copy ignores the checkpoint: the target diverged from the source.
    let checkpoint = (!decision.fresh_copy).then_some(observation.status.checkpoint.as_deref()).flatten();
    match ctx.replications.start(uid, plan, checkpoint).await {
        Ok(()) => {
            let (action, how) = match checkpoint {
                Some(_) => ("Resume", "resumed from its checkpoint"),
                None => ("FullCopy", "started with a full copy"),
            };
            tracing::info!(mode = ?migration.spec.data.type_, how, "replication running");
            events.push(Notice::new(
                EventType::Normal,
                "ReplicationStarted",
                action,
                format!("{:?} replication {how}", plan.mode),
            ));
        }
        Err(err) => {
            tracing::warn!(%err, "replication could not start");
            events.push(Notice::new(EventType::Warning, "ReplicationFailed", "Replicate", err.to_string()));
            ctx.replications.failed_to_start(uid, plan, err.to_string());
        }
    }
}

async fn push_config(
    migration: &Migration,
    ctx: &Context,
    payload: &eden_sidecar::config::EdenConfig,
) -> Result<(), Error> {
    apply_owned(ctx, &configmap::build(migration, payload)?).await?;
    tracing::info!(generation = payload.generation, "strategy pushed to the sidecars");
    Ok(())
}

/// Applies the gateway's Deployment and Service while `spec.gateway` asks for one, and deletes
/// what an earlier reconcile made (as recorded in status) once it does not, or once the Service
/// was renamed. Applied on every reconcile, so a deleted or edited object comes back as
/// specified; an unchanged apply writes nothing.
async fn sync_gateway(
    migration: &Migration,
    ctx: &Context,
    observation: &Observation,
    events: &mut Vec<Notice>,
) -> Result<Option<GatewayStatus>, Error> {
    let previous = observation.status.gateway.as_ref();
    let Some(spec) = &migration.spec.gateway else {
        if let Some(previous) = previous {
            let namespace = migration.namespace().unwrap_or_default();
            delete_owned::<Deployment>(ctx, &namespace, &previous.deployment).await?;
            delete_owned::<Service>(ctx, &namespace, &previous.service).await?;
            let note = format!(
                "spec.gateway removed: Deployment {} and Service {} deleted",
                previous.deployment, previous.service
            );
            events.push(Notice::new(EventType::Normal, "GatewayRemoved", "DeleteGateway", note));
        }
        return Ok(None);
    };
    // The proxies need both Endpoints (addresses, TLS, the target's Secret); a missing Endpoint is
    // already reported as held.
    let (Some(source), Some(target)) = (&observation.source.endpoint, &observation.target.endpoint) else {
        return Ok(previous.cloned());
    };
    let upstreams = proxy::Upstreams { source: &source.spec, target: &target.spec };
    let service = gateway::service(migration, spec);
    let service_name = service.name_any();
    if let Some(previous) = previous.filter(|previous| previous.service != service_name) {
        delete_owned::<Service>(ctx, &migration.namespace().unwrap_or_default(), &previous.service).await?;
    }
    let deployment = apply_owned(ctx, &gateway::deployment(migration, spec, &upstreams, &ctx.sidecar_image)).await?;
    apply_owned(ctx, &service).await?;
    let deployment_name = deployment.name_any();
    if previous.is_none_or(|previous| previous.service != service_name) {
        let note = format!(
            "Deployment {deployment_name} ({} replicas) serving on Service {service_name}:{}",
            spec.replicas, spec.port
        );
        events.push(Notice::new(EventType::Normal, "GatewayCreated", "CreateGateway", note));
    }
    Ok(Some(GatewayStatus {
        service: service_name,
        deployment: deployment_name,
        ready_replicas: deployment.status.and_then(|s| s.ready_replicas).unwrap_or(0),
    }))
}

/// Server-side applies an object the operator owns, in the namespace its metadata names, and
/// returns what the API server holds after.
async fn apply_owned<K>(ctx: &Context, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Write { what: format!("{} {name}", K::kind(&())), source })
}

/// Deletes an object the operator made; one that is already gone is fine.
async fn delete_owned<K>(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Write { what: format!("deleting {} {name}", K::kind(&())), source }),
    }
}

async fn write_status(migration: &Migration, ctx: &Context, status: &crate::crd::MigrationStatus) -> Result<(), Error> {
    let name = migration.name_any();
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": Migration::api_version(&()), "kind": Migration::kind(&()), "status": status});
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Write { what: format!("status of Migration {name}"), source })?;
    Ok(())
}

/// Stops replication and deletes the ConfigMap and the gateway. The data on both servers is left
/// alone.
async fn cleanup(migration: Arc<Migration>, ctx: &Context) -> Result<Action, Error> {
    if let Some(uid) = migration.uid() {
        ctx.replications.stop(&uid).await;
        ctx.forget_fence_clock(&uid);
    }
    forget_sync_position(&migration, ctx).await;
    let namespace = migration.namespace().unwrap_or_default();
    ctx.metrics.replication_lag(&namespace, &migration.name_any(), None);
    let name = configmap::name(&migration);
    delete_owned::<ConfigMap>(ctx, &namespace, &name).await?;
    // Sidecars that lost writes keep their Leases after exiting (see `sidecars`); a later
    // Migration of the same name must not inherit them. Live sidecars recreate theirs.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = ListParams::default().labels(&format!("{LABEL_MIGRATION}={}", migration.name_any()));
    leases
        .delete_collection(&DeleteParams::default(), &selector)
        .await
        .map_err(|source| Error::Write { what: "deleting sidecar Leases".into(), source })?;
    // The gateway as specified and as last recorded: they differ after a rename that the
    // Migration was deleted in the middle of.
    let recorded = migration.status.as_ref().and_then(|s| s.gateway.as_ref()).map(|g| g.service.clone());
    let specified = migration.spec.gateway.as_ref().map(|g| gateway::service_name(&migration, g));
    let mut services: Vec<String> = recorded.into_iter().chain(specified).collect();
    services.dedup();
    if !services.is_empty() {
        delete_owned::<Deployment>(ctx, &namespace, &gateway::deployment_name(&migration)).await?;
    }
    for service in &services {
        delete_owned::<Service>(ctx, &namespace, service).await?;
    }
    let gateway_note = match services.is_empty() {
        true => String::new(),
        false => {
            format!(", gateway {} and Service {} deleted", gateway::deployment_name(&migration), services.join(", "))
        }
    };
    let note = format!(
        "replication stopped, ConfigMap {name} and sidecar Leases deleted{gateway_note}; data on both servers left as it is"
    );
    tracing::info!(%note, "cleaned up");
    ctx.event(migration.as_ref(), EventType::Normal, "CleanedUp", "Delete", note);
    Ok(Action::await_change())
}

/// Removes the `sync` engine's position record from the target once nothing will resume from
/// it. Best effort: a target that cannot be reached keeps one small key, which is logged.
async fn forget_sync_position(migration: &Migration, ctx: &Context) {
    if migration.spec.data.type_ != DataCopy::Sync {
        return;
    }
    let endpoints: Api<Endpoint> = Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    let outcome = match endpoints.get(&migration.spec.target.endpoint_ref.name).await {
        Ok(target) => match observe::connection(ctx, &target).await {
            Ok(settings) => crate::endpoint::forget_sync_position(&settings).await.map_err(|e| e.to_string()),
            Err(err) => Err(err),
        },
        Err(err) => Err(err.to_string()),
    };
    match outcome {
        Ok(()) => {
            tracing::info!(key = eden_sidecar::replicate::POSITION_KEY, "removed the sync record from the target")
        }
        Err(err) => {
            tracing::warn!(%err, key = eden_sidecar::replicate::POSITION_KEY, "could not remove the sync record from the target")
        }
    }
}

/// How soon to look again: often while something moves, rarely when at rest.
fn requeue_after(phase: Phase) -> Duration {
    match phase {
        Phase::CuttingOver => Duration::from_millis(200),
        Phase::Pending | Phase::Syncing | Phase::Ready | Phase::RollingBack | Phase::CutOver => Duration::from_secs(1),
        Phase::Completed | Phase::RolledBack | Phase::Paused | Phase::Failed => Duration::from_secs(10),
    }
}
