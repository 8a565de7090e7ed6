//! Everything one reconcile looks at, gathered before anything is decided.

use std::num::NonZeroU32;

use eden_sidecar::config::{EdenConfig, UpstreamConfig, WriteMode, WritePolicy, WritesState};
use eden_sidecar::replicate::OpsLimits;
use eden_sidecar::upstream::Server;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::Error;
use super::phase::{
    ANNOTATION_ACCEPT_LOST_TARGET_WRITES, ANNOTATION_ACCEPT_LOST_WRITES, CutoverProgress, Effective, Held, Observed,
    Replication,
};
use super::replication::Plan;
use crate::conditions;
use crate::configmap;
use crate::context::Context;
use crate::crd::{Endpoint, Migration, MigrationStatus, Phase};
use crate::endpoint::resolve;
use crate::sidecars::{self, FenceClock, Settlement, SidecarReport};

/// Where the target Endpoint's Secret is mounted into sidecars (by the webhook, or by the
/// gateway's Deployment), and the password file in it that the payload names (DESIGN §6).
pub const TARGET_CREDENTIALS_DIR: &str = "/var/run/eden/target";
pub const TARGET_CREDENTIALS_FILE: &str = "/var/run/eden/target/password";

/// The lost writes the user accepted losing, by the annotation that says so
/// ([`ANNOTATION_ACCEPT_LOST_WRITES`] for a rollback, [`ANNOTATION_ACCEPT_LOST_TARGET_WRITES`]
/// for a cutover); 0 when it is absent or not a count.
fn accepted(migration: &Migration, annotation: &str) -> u64 {
    migration.annotations().get(annotation).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Whether `migration` names the Endpoint `endpoint` as its source or target.
pub fn references(migration: &Migration, endpoint: &str) -> bool {
    migration.spec.source.endpoint_ref.name == endpoint || migration.spec.target.endpoint_ref.name == endpoint
}

/// One side of the migration as found in the API.
pub struct Side {
    pub role: &'static str,
    pub name: String,
    pub endpoint: Option<Endpoint>,
}

impl Side {
    fn ready(&self) -> bool {
        self.endpoint
            .as_ref()
            .and_then(|e| e.status.as_ref())
            .is_some_and(|status| conditions::is_true(&status.conditions, "Ready"))
    }

    /// The address the sidecars are given: no secret in it, the password comes from a file.
    fn upstream(&self) -> Option<UpstreamConfig> {
        let endpoint = self.endpoint.as_ref()?;
        let credentials_file = (self.role == "target" && endpoint.spec.credentials_secret_ref.is_some())
            .then(|| TARGET_CREDENTIALS_FILE.into());
        Some(UpstreamConfig { uri: endpoint.spec.uri.clone(), credentials_file })
    }
}

pub struct Observation {
    /// The phase in status: where the last reconcile left the migration.
    pub phase: Phase,
    pub status: MigrationStatus,
    pub source: Side,
    pub target: Side,
    /// The payload in the ConfigMap now, if there is a valid one.
    pub config: Option<EdenConfig>,
    pub sidecars: SidecarReport,
    /// Every sidecar's standing with respect to the configured generation.
    pub settlement: Settlement,
    pub observed: Observed,
    /// Why the spec cannot be acted on at all (an Endpoint that does not exist).
    pub missing: Vec<Held>,
}

impl Observation {
    pub async fn gather(migration: &Migration, ctx: &Context) -> Result<Self, Error> {
        let namespace = migration.namespace().unwrap_or_default();
        let status = migration.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        let endpoints: Api<Endpoint> = Api::namespaced(ctx.client.clone(), &namespace);
        let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
        let config_name = configmap::name(migration);
        // The ConfigMap, then the Leases (the order matters, see below), while the Endpoints
        // are read beside them: in a cutover each reconcile waits on these reads.
        let config_then_leases = async {
            let config = config_maps
                .get_opt(&config_name)
                .await
                .map_err(|source| Error::Read { what: format!("ConfigMap {config_name}"), source })?
                .as_ref()
                .and_then(configmap::read);
            let leases = sidecars::list(&leases, &migration.name_any())
                .await
                .map_err(|source| Error::Read { what: "sidecar Leases".into(), source })?;
            Ok::<_, Error>((config, leases))
        };
        let (source, target, (config, leases)) = tokio::try_join!(
            side(&endpoints, "source", &migration.spec.source.endpoint_ref.name),
            side(&endpoints, "target", &migration.spec.target.endpoint_ref.name),
            config_then_leases,
        )?;
        let missing = [&source, &target]
            .into_iter()
            .filter(|side| side.endpoint.is_none())
            .map(|side| Held {
                reason: "EndpointNotFound",
                message: format!("the {} Endpoint {:?} does not exist in namespace {namespace}", side.role, side.name),
            })
            .collect();
        let configured_generation = config.as_ref().map_or(0, |c| c.generation);

        // The ConfigMap was read before the Leases: a sidecar that acknowledged what was read
        // has its acknowledgement in this list (DESIGN §9, "Fencing").
        let now = Instant::now();
        let uid = migration.uid().ok_or_else(|| Error::NoUid(migration.name_any()))?;
        let (sidecars, settlement, cutover) = {
            let mut clock = ctx.fence_clock(&uid);
            if let Some(config) = &config {
                clock.generation_seen(config.generation, now);
            }
            let sidecars = sidecars::report(&leases, &mut clock, now);
            let settlement = sidecars.settle(configured_generation, false, &clock, now);
            let cutover = cutover_progress(phase, config.as_ref(), &sidecars, &status, &clock, now);
            (sidecars, settlement, cutover)
        };

        let snapshot = match migration.uid() {
            Some(uid) => ctx.replications.observe(&uid).await,
            None => None,
        };
        let observed = Observed {
            source_ready: source.ready(),
            target_ready: target.ready(),
            replication: snapshot.as_ref().map(|s| Replication {
                backfill_done: s.backfill_done,
                lag_millis: s.lag_millis,
                failed: s.failure.is_some(),
            }),
            verification_differences: snapshot
                .as_ref()
                .and_then(|s| s.verification.as_ref())
                .map(|v| v.report.differences() as i64),
            lost_source_writes: sidecars
                .lost_source_writes
                .saturating_sub(accepted(migration, ANNOTATION_ACCEPT_LOST_WRITES))
                as i64,
            lost_target_writes: sidecars
                .lost_target_writes
                .saturating_sub(accepted(migration, ANNOTATION_ACCEPT_LOST_TARGET_WRITES))
                as i64,
            sidecars_settled: settlement.settled(),
            sidecar_reports_unreadable: (!sidecars.unreadable.is_empty()).then(|| sidecars.unreadable.join(", ")),
            cutover,
        };
        Ok(Observation { phase, status, source, target, config, sidecars, settlement, observed, missing })
    }

    pub fn configured_generation(&self) -> u64 {
        self.config.as_ref().map_or(0, |c| c.generation)
    }

    /// The sidecars' payload for `effective`, when both Endpoints exist.
    pub fn payload(&self, migration: &Migration, effective: &Effective) -> Option<EdenConfig> {
        Some(configmap::payload(migration, self.source.upstream()?, self.target.upstream()?, effective))
    }

    /// What the replication engine needs, with the Endpoints' Secrets read.
    pub async fn plan(&self, migration: &Migration, ctx: &Context) -> Result<Plan, String> {
        let (Some(source), Some(target)) = (&self.source.endpoint, &self.target.endpoint) else {
            return Err("an Endpoint is missing".into());
        };
        let data = &migration.spec.data;
        // Each server with its own credentials and TLS settings.
        let (source, target) = (connection(ctx, source).await?, connection(ctx, target).await?);
        Ok(Plan {
            mode: data.type_,
            replace: data.replace,
            source,
            target,
            limits: OpsLimits {
                source: data.source_ops_per_second.and_then(NonZeroU32::new),
                target: data.target_ops_per_second.and_then(NonZeroU32::new),
            },
        })
    }
}

/// The Endpoint's connection settings, its Secrets read.
pub(super) async fn connection(ctx: &Context, endpoint: &Endpoint) -> Result<Server, String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &endpoint.namespace().unwrap_or_default());
    resolve(&endpoint.spec, &secrets).await.map_err(|e| e.to_string())
}

async fn side(endpoints: &Api<Endpoint>, role: &'static str, name: &str) -> Result<Side, Error> {
    let endpoint =
        endpoints.get_opt(name).await.map_err(|source| Error::Read { what: format!("Endpoint {name}"), source })?;
    Ok(Side { role, name: name.to_string(), endpoint })
}

/// Where the cutover protocol stands, read from the ConfigMap (what was pushed) and the Leases
/// (what the sidecars did with it).
fn cutover_progress(
    phase: Phase,
    config: Option<&EdenConfig>,
    sidecars: &SidecarReport,
    status: &MigrationStatus,
    clock: &FenceClock,
    now: Instant,
) -> CutoverProgress {
    if phase != Phase::CuttingOver {
        return CutoverProgress::default();
    }
    let Some(config) = config else { return CutoverProgress::default() };
    let paused = config.writes == WritesState::Paused;
    let flip_pushed = config.writes == WritesState::Flowing
        && (config.write_policy == WritePolicy::NewAuthoritative || config.write_mode == WriteMode::Cutover);
    // Once writes are paused (or flipped) the barrier has done its work: it is not asked again.
    let barrier = match status.cutover_barrier_generation {
        _ if paused || flip_pushed => Some(sidecars.settle(config.generation, false, clock, now)),
        Some(barrier) => Some(sidecars.settle(barrier as u64, false, clock, now)),
        None => None,
    };
    let paused_for_millis = status
        .cutover_started_at
        .as_ref()
        .map_or(0, |started| Timestamp::now().duration_since(started.0).as_millis() as i64);
    let settled = |hold| sidecars.settle(config.generation, hold, clock, now);
    CutoverProgress {
        fenced: barrier.as_ref().is_some_and(|b| b.settled() || paused || flip_pushed),
        waiting_for: barrier.filter(|b| !b.settled()).map(|b| b.describe_waiting()),
        writes_held: paused && settled(true).settled(),
        flip_pushed,
        flipped: flip_pushed && settled(false).settled(),
        paused_for_millis,
    }
}
