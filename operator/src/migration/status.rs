//! What a reconcile reports: the Migration's status and the Events for what changed.
//!
//! Conditions (each with `observedGeneration`):
//! - `EndpointsReady`: both Endpoints exist and answer their probes;
//! - `Replicating`: the engine runs, with copy progress and lag, or why it does not;
//! - `ReadyForCutover`: in sync within the lag guard and verified when that is required;
//! - `Held`: something the spec asks for is not in effect yet, and why (reasons joined by `,`);
//! - `SidecarsAcknowledged`: every sidecar applied the configured generation or is fenced.

use eden_sidecar::config::{EdenConfig, WriteMode, WritePolicy, WritesState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::observe::Observation;
use super::phase::{Decision, Held};
use super::replication::Snapshot;
use crate::conditions;
use crate::crd::{
    CopyProgress, DataCopy, GatewayStatus, Migration, MigrationStatus, Phase, SidecarCounts, Verification,
};

/// An Event to record. The API folds Events with the same reason and action into one series
/// that keeps its first note, so `action` names what tells one occurrence from another.
pub struct Notice {
    pub type_: EventType,
    pub reason: &'static str,
    pub action: String,
    pub note: String,
}

impl Notice {
    pub fn new(type_: EventType, reason: &'static str, action: impl Into<String>, note: String) -> Notice {
        Notice { type_, reason, action: action.into(), note }
    }
}

pub struct Report<'a> {
    pub migration: &'a Migration,
    pub previous: &'a MigrationStatus,
    pub decision: &'a Decision,
    pub observation: &'a Observation,
    pub snapshot: Option<&'a Snapshot>,
    pub configured_generation: u64,
    pub cutover_started_at: Option<MicroTime>,
    pub cutover_barrier_generation: Option<i64>,
    pub gateway: Option<GatewayStatus>,
}

impl Report<'_> {
    fn held(&self) -> Vec<&Held> {
        self.observation.missing.iter().chain(&self.decision.held).collect()
    }

    pub fn status(&self) -> MigrationStatus {
        let generation = self.migration.metadata.generation;
        let mut conditions = self.previous.conditions.clone();
        for condition in [
            self.endpoints_ready(generation),
            self.replicating(generation),
            self.ready_for_cutover(generation),
            self.held_condition(generation),
            self.sidecars_acknowledged(generation),
        ] {
            conditions = conditions::upsert(&conditions, condition);
        }
        let running = self.snapshot.filter(|s| s.failure.is_none());
        MigrationStatus {
            phase: Some(self.decision.phase),
            conditions,
            observed_generation: generation,
            replication_lag_millis: running.map(|s| s.lag_millis),
            progress: match running {
                Some(s) => Some(progress(s.keys_copied, s.keys_total)),
                None if self.decision.fresh_copy => None,
                None => self.previous.progress.clone(),
            },
            ready_for_cutover: self.decision.ready_for_cutover,
            sidecars: Some(SidecarCounts {
                configured_generation: self.configured_generation as i64,
                ..self.observation.sidecars.counts(&self.observation.settlement)
            }),
            last_verification: self.verification(),
            checkpoint: match self.snapshot.and_then(|s| s.checkpoint.clone()) {
                Some(checkpoint) => Some(checkpoint),
                None if self.decision.fresh_copy => None,
                None => self.previous.checkpoint.clone(),
            },
            cutover_started_at: self.cutover_started_at.clone(),
            cutover_barrier_generation: self.cutover_barrier_generation,
            gateway: self.gateway.clone(),
        }
    }

    /// Events for what changed between the previous status and `next`.
    pub fn events(&self, next: &MigrationStatus) -> Vec<Notice> {
        let mut events = Vec::new();
        let (before, after) = (self.previous.phase.unwrap_or_default(), self.decision.phase);
        if self.previous.phase != Some(after) {
            let type_ = if matches!(after, Phase::Failed | Phase::RollingBack) {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let why = self.held().first().map(|h| format!(": {}", h.message)).unwrap_or_default();
            events.push(Notice::new(
                type_,
                "PhaseChanged",
                format!("To{after:?}"),
                format!("{before:?} → {after:?}{why}"),
            ));
        }
        let held_reason = |status: &MigrationStatus| {
            status.conditions.iter().find(|c| c.type_ == "Held" && c.status == "True").map(|c| c.reason.clone())
        };
        if let Some(reason) = held_reason(next)
            && held_reason(self.previous).as_ref() != Some(&reason)
        {
            let message = self.held().iter().map(|h| h.message.as_str()).collect::<Vec<_>>().join("; ");
            events.push(Notice::new(EventType::Warning, "Held", reason, message));
        }
        if let Some(verification) = &next.last_verification
            && self.previous.last_verification.as_ref().map(counts) != Some(counts(verification))
        {
            let note = format!("{} keys checked: no differences", verification.checked);
            events.push(match differences(verification) {
                0 => Notice::new(EventType::Normal, "Verified", "Verify", note),
                n => Notice::new(
                    EventType::Warning,
                    "VerificationFoundDifferences",
                    "Verify",
                    verification_note(self.snapshot, n),
                ),
            });
        }
        events
    }

    fn endpoints_ready(&self, generation: Option<i64>) -> Condition {
        let observed = &self.observation.observed;
        if let Some(missing) = self.observation.missing.first() {
            return conditions::observed("EndpointsReady", false, missing.reason, missing.message.clone(), generation);
        }
        let waiting: Vec<&str> = [(observed.source_ready, "source"), (observed.target_ready, "target")]
            .into_iter()
            .filter_map(|(ready, role)| (!ready).then_some(role))
            .collect();
        if waiting.is_empty() {
            conditions::observed(
                "EndpointsReady",
                true,
                "Ready",
                "source and target answer their probes".into(),
                generation,
            )
        } else {
            let message = format!("the {} Endpoint is not Ready (see kubectl describe eep)", waiting.join(" and "));
            conditions::observed("EndpointsReady", false, "EndpointsNotReady", message, generation)
        }
    }

    fn replicating(&self, generation: Option<i64>) -> Condition {
        let (status, reason, message) = match self.snapshot {
            _ if self.migration.spec.data.type_ == DataCopy::None => {
                (false, "NotNeeded", "data.type is none: the sidecars mirror writes to the target".to_string())
            }
            Some(Snapshot { failure: Some(error), .. }) => (false, "ReplicationFailed", error.clone()),
            Some(s) => {
                let reason = if s.backfill_done { "Streaming" } else { "Backfilling" };
                (
                    true,
                    reason,
                    format!("{} keys copied, lag {}ms", progress(s.keys_copied, s.keys_total).summary, s.lag_millis),
                )
            }
            None => (false, "NotRunning", format!("replication does not run in phase {:?}", self.decision.phase)),
        };
        conditions::observed("Replicating", status, reason, message, generation)
    }

    fn ready_for_cutover(&self, generation: Option<i64>) -> Condition {
        if self.decision.ready_for_cutover {
            let message = format!("in sync within maxLagMillis {}", self.migration.spec.cutover.max_lag_millis);
            return conditions::observed("ReadyForCutover", true, "InSync", message, generation);
        }
        let gate = ["LagAboveGuard", "VerificationPending", "VerificationFailed", "TargetWritesLost"];
        let verification_error = self.snapshot.and_then(|s| s.verification_error.as_ref());
        let (reason, message) = match (self.decision.held.iter().find(|h| gate.contains(&h.reason)), verification_error)
        {
            (Some(held), Some(error)) if held.reason == "VerificationPending" => {
                ("VerificationError", format!("the verification could not run: {error}"))
            }
            (Some(held), _) => (held.reason, held.message.clone()),
            (None, _) => ("NotInSync", format!("phase {:?}", self.decision.phase)),
        };
        conditions::observed("ReadyForCutover", false, reason, message, generation)
    }

    fn held_condition(&self, generation: Option<i64>) -> Condition {
        let held = self.held();
        if held.is_empty() {
            return conditions::observed("Held", false, "AsRequested", "the spec is in effect".into(), generation);
        }
        let mut reasons: Vec<&str> = held.iter().map(|h| h.reason).collect();
        reasons.dedup();
        let message = held.iter().map(|h| h.message.as_str()).collect::<Vec<_>>().join("; ");
        conditions::observed("Held", true, &reasons.join(","), message, generation)
    }

    fn sidecars_acknowledged(&self, generation: Option<i64>) -> Condition {
        let (report, settlement) = (&self.observation.sidecars, &self.observation.settlement);
        let mut message = format!(
            "{} of {} sidecars applied generation {}",
            settlement.acknowledged.len(),
            report.sidecars.len(),
            settlement.generation
        );
        if !settlement.fenced.is_empty() {
            message += &format!("; fenced: {}", settlement.fenced.join(", "));
        }
        if !report.config_errors.is_empty() {
            let message = format!("{message}; rejected: {}", report.config_errors.join("; "));
            return conditions::observed("SidecarsAcknowledged", false, "ConfigRejected", message, generation);
        }
        if !settlement.settled() {
            let message = format!("{message}; {}", settlement.describe_waiting());
            return conditions::observed("SidecarsAcknowledged", false, "WaitingForAcks", message, generation);
        }
        conditions::observed("SidecarsAcknowledged", true, "Acknowledged", message, generation)
    }

    fn verification(&self) -> Option<Verification> {
        let Some(outcome) = self.snapshot.and_then(|s| s.verification.as_ref()) else {
            return self.previous.last_verification.clone();
        };
        let report = &outcome.report;
        let mut verification = Verification {
            checked: report.checked as i64,
            missing: report.missing as i64,
            extra: report.extra as i64,
            mismatched: (report.type_mismatch + report.value_mismatch + report.ttl_mismatch) as i64,
            kept: report.kept as i64,
            time: None,
        };
        verification.time = match &self.previous.last_verification {
            Some(previous) if counts(previous) == counts(&verification) => previous.time.clone(),
            _ => Some(Time(Timestamp::now())),
        };
        Some(verification)
    }
}

fn counts(v: &Verification) -> (i64, i64, i64, i64, i64) {
    (v.checked, v.missing, v.extra, v.mismatched, v.kept)
}

fn differences(v: &Verification) -> i64 {
    v.missing + v.extra + v.mismatched
}

fn verification_note(snapshot: Option<&Snapshot>, differences: i64) -> String {
    let samples = snapshot
        .and_then(|s| s.verification.as_ref())
        .map(|v| v.report.samples.iter().take(3).map(|d| format!("{} ({:?})", d.key, d.kind)).collect::<Vec<_>>())
        .unwrap_or_default();
    format!("{differences} differences, e.g. {}; they are checked again shortly", samples.join(", "))
}

fn progress(copied: i64, total: i64) -> CopyProgress {
    let percent = if total > 0 { (copied.min(total) * 100) / total } else { 100 };
    CopyProgress { keys_copied: copied, keys_total: total, summary: format!("{copied}/{total} ({percent}%)") }
}

/// One line for the StrategyPushed Event: what the sidecars now do.
pub fn describe_strategy(payload: &EdenConfig) -> String {
    let writes = match (payload.writes, payload.write_mode, payload.write_policy) {
        (WritesState::Paused, ..) => "writes held for the cutover".to_string(),
        (_, WriteMode::Cutover, _) => {
            format!("writes split: {}% of keys owned by the target", payload.write_percentage)
        }
        (_, _, WritePolicy::NewAuthoritative) => {
            format!("writes to the target{}", if payload.mirror_writes { ", mirrored to the source" } else { "" })
        }
        (_, _, WritePolicy::OldAuthoritative) => {
            format!("writes to the source{}", if payload.mirror_writes { ", mirrored to the target" } else { "" })
        }
    };
    format!(
        "generation {}: {}% of reads to the target, {}% shadowed, {writes}",
        payload.generation, payload.read_percentage, payload.shadow_read_percentage
    )
}
