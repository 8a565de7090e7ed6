//! `kubectl eden status` and `kubectl eden list`: where a Migration stands, what holds it and
//! what the user can do next, read from the Migration, its Events and its sidecars' Leases. A
//! [`Report`] is what `-o json|yaml` prints; the text is rendered from it by pure functions, so
//! the output for fixed objects is tested as text.

use std::fmt::Write;

use eden_sidecar::human::{self, duration, percent, thousands};
use eden_sidecar::lease::{ANNOTATION_GENERATION, ANNOTATION_WRITES};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use kube::ResourceExt;
use serde::Serialize;

use crate::crd::{Migration, Phase, Verification, WriteModeKind, WritePolicy};

/// Where a Migration stands.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub name: String,
    pub namespace: String,
    pub phase: Phase,
    /// The phases so far, each with when it began, oldest first (from the Migration's
    /// `PhaseChanged` Events; its creation for the first).
    pub path: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<Copy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_millis: Option<i64>,
    pub max_lag_millis: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<Sidecars>,
    pub reads_on_target: i32,
    /// Where reads go, in words: `readPercentage` moves reads of the keys the source owns only
    /// (the sidecars read a key the target owns from the target).
    pub reads: String,
    /// Where writes go, in words.
    pub writes: String,
    /// What holds the Migration back or keeps it from going on, from its conditions.
    pub held: Vec<Held>,
    /// What the user can do now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub phase: Phase,
    pub at: Time,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Copy {
    pub copied: i64,
    pub total: i64,
    /// While the copy runs: keys copied per second since it began, and the time left at that
    /// rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecars {
    pub live: i32,
    pub acknowledged: i32,
    pub fenced: i32,
    pub generation: i64,
    /// Sidecars that have not applied `generation`, by pod.
    pub behind: Vec<Behind>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Behind {
    pub pod: String,
    /// The generation its Lease says it applied (`None`: unreadable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// The condition that says so.
    pub condition: String,
    pub reason: String,
    pub message: String,
}

impl Report {
    /// The report on `migration` at `now`, from the Events and Leases of its namespace (others'
    /// are ignored).
    pub fn new(migration: &Migration, events: &[Event], leases: &[Lease], now: Timestamp) -> Report {
        let name = migration.name_any();
        let status = migration.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        let path = path(migration, events);
        let copy = status.progress.as_ref().map(|progress| {
            let copying = phase == Phase::Syncing && progress.keys_copied < progress.keys_total;
            let since = path.iter().rev().find(|step| step.phase == Phase::Syncing).map(|step| step.at.0);
            let seconds = since.map(|since| now.duration_since(since).as_secs_f64()).filter(|s| *s >= 1.0);
            let rate = seconds.filter(|_| copying).map(|seconds| progress.keys_copied as f64 / seconds);
            Copy {
                copied: progress.keys_copied,
                total: progress.keys_total,
                keys_per_second: rate,
                eta_seconds: rate.and_then(|rate| human::eta_seconds(progress.keys_copied, progress.keys_total, rate)),
            }
        });
        let sidecars = status.sidecars.as_ref().map(|counts| {
            let mut behind: Vec<Behind> = leases
                .iter()
                .filter(|lease| lease.labels().get(eden_sidecar::lease::LABEL_MIGRATION) == Some(&name))
                .filter_map(|lease| {
                    let annotations = lease.annotations();
                    let applied = annotations.get(ANNOTATION_GENERATION).and_then(|g| g.parse::<i64>().ok());
                    (applied < Some(counts.configured_generation)).then(|| Behind {
                        pod: lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or(lease.name_any()),
                        applied,
                        writes: annotations.get(ANNOTATION_WRITES).cloned(),
                    })
                })
                .collect();
            behind.sort_by(|a, b| a.pod.cmp(&b.pod));
            Sidecars {
                live: counts.live,
                acknowledged: counts.acknowledged,
                fenced: counts.fenced,
                generation: counts.configured_generation,
                behind,
            }
        });
        let strategy = &migration.spec.strategy;
        let share = strategy.read_percentage;
        let (reads, writes) =
            match (strategy.write_mode.mode, strategy.write_mode.policy, strategy.write_mode.write_percentage) {
                (WriteModeKind::DualWrite, Some(WritePolicy::NewAuthoritative), _)
                | (WriteModeKind::Cutover, _, Some(100)) => (
                    "all on the target, which owns every key".to_string(),
                    "to the target, mirrored to the source".to_string(),
                ),
                (WriteModeKind::DualWrite, _, _) => {
                    (format!("{share}% on the target"), "to both sides, the source answering".to_string())
                }
                (WriteModeKind::Cutover, _, Some(owned @ 1..)) => (
                    format!("the target's keys on the target, {share}% of the others"),
                    format!("{owned}% of keys owned by the target"),
                ),
                (WriteModeKind::Cutover, _, _) => (format!("{share}% on the target"), "to the source".to_string()),
            };
        let before_cutover = matches!(phase, Phase::Pending | Phase::Syncing | Phase::Ready);
        let held = status
            .conditions
            .iter()
            .filter(|c| match (c.type_.as_str(), c.status.as_str()) {
                ("Held", "True") => true,
                ("ReadyForCutover", "False") => before_cutover && phase != Phase::Pending,
                ("EndpointsReady" | "SidecarsAcknowledged", "False") => true,
                ("Replicating", "False") => c.reason == "ReplicationFailed",
                _ => false,
            })
            .map(|c| Held { condition: c.type_.clone(), reason: c.reason.clone(), message: c.message.clone() })
            .collect();
        Report {
            next: next(&name, phase, status.ready_for_cutover, strategy.read_percentage),
            namespace: migration.namespace().unwrap_or_default(),
            name,
            phase,
            path,
            copy,
            lag_millis: status.replication_lag_millis,
            max_lag_millis: migration.spec.cutover.max_lag_millis,
            verification: status.last_verification,
            sidecars,
            reads_on_target: share,
            reads,
            writes,
            held,
        }
    }

    /// When the Migration entered its phase.
    pub fn since(&self) -> Option<Timestamp> {
        self.path.last().map(|step| step.at.0)
    }

    /// The text of `kubectl eden status`, coloured when `colour`.
    pub fn render(&self, now: Timestamp, colour: bool) -> String {
        let paint = Paint(colour);
        let mut out = String::new();
        let line = |out: &mut String, label: &str, text: &str| {
            let _ = writeln!(out, "  {label:<10} {text}");
        };
        let _ = writeln!(out, "Migration {}/{}", self.namespace, self.name);
        let for_how_long = self.since().map(|since| format!(", for {}", age(now, since))).unwrap_or_default();
        line(&mut out, "Phase", &format!("{}{for_how_long}", paint.phase(self.phase)));
        let path: Vec<String> = self.path.iter().map(|step| format!("{:?} {}", step.phase, clock(step.at.0))).collect();
        line(&mut out, "Path", &path.join(" → "));
        if let Some(copy) = &self.copy {
            line(&mut out, "Copy", &copy.render());
        }
        if let Some(lag) = self.lag_millis {
            line(&mut out, "Lag", &format!("{lag} ms (guard {} ms)", self.max_lag_millis));
        }
        let verified = match &self.verification {
            None => "not yet".to_string(),
            Some(v) if v.missing + v.extra + v.mismatched == 0 => {
                format!("{} keys checked: no differences", thousands(v.checked))
            }
            Some(v) => paint.warn(&format!(
                "{} keys checked: {} missing, {} extra, {} different",
                thousands(v.checked),
                v.missing,
                v.extra,
                v.mismatched
            )),
        };
        line(&mut out, "Verified", &verified);
        if let Some(sidecars) = &self.sidecars {
            line(&mut out, "Sidecars", &sidecars.render(&paint));
        }
        line(&mut out, "Traffic", &format!("reads {}; writes {}", self.reads, self.writes));
        for held in &self.held {
            let text = format!("{} ({}): {}", held.reason, held.condition, held.message);
            line(&mut out, "Held", &paint.warn(&text));
        }
        if let Some(next) = &self.next {
            line(&mut out, "Next", &paint.bold(next));
        }
        out
    }

    /// One row of `kubectl eden list`, in [`LIST_COLUMNS`] order.
    pub fn row(&self, now: Timestamp) -> [String; 8] {
        let copy = self.copy.as_ref().map_or("-".into(), |c| format!("{}%", percent(c.copied, c.total)));
        let sidecars = self.sidecars.as_ref().map_or("-".into(), |s| format!("{}/{}", s.acknowledged, s.live));
        [
            self.namespace.clone(),
            self.name.clone(),
            format!("{:?}", self.phase),
            self.since().map_or("-".into(), |since| age(now, since)),
            copy,
            self.lag_millis.map_or("-".into(), |lag| format!("{lag}ms")),
            sidecars,
            format!("{}%", self.reads_on_target),
        ]
    }
}

/// The columns of `kubectl eden list`.
pub const LIST_COLUMNS: [&str; 8] = ["NAMESPACE", "NAME", "PHASE", "FOR", "COPY", "LAG", "SIDECARS", "READS"];

/// `rows` under [`LIST_COLUMNS`], aligned as kubectl aligns its tables; the namespace column
/// only when `namespaces`.
pub fn table(rows: &[[String; 8]], namespaces: bool) -> String {
    let skip = usize::from(!namespaces);
    let header = LIST_COLUMNS.map(String::from);
    let all: Vec<&[String; 8]> = std::iter::once(&header).chain(rows).collect();
    let widths: Vec<usize> = (0..8).map(|i| all.iter().map(|row| row[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in all {
        let cells: Vec<String> = (skip..8).map(|i| format!("{:<w$}", row[i], w = widths[i])).collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

impl Copy {
    fn render(&self) -> String {
        human::copy_progress(self.copied, self.total, self.keys_per_second)
    }
}

impl Sidecars {
    fn render(&self, paint: &Paint) -> String {
        let mut text = format!(
            "{} live, {} applied generation {}, {} fenced",
            self.live, self.acknowledged, self.generation, self.fenced
        );
        if !self.behind.is_empty() {
            let behind: Vec<String> = self
                .behind
                .iter()
                .map(|b| match b.applied {
                    Some(applied) => format!("{} (on {applied})", b.pod),
                    None => format!("{} (unreadable Lease)", b.pod),
                })
                .collect();
            let _ = write!(text, "; behind: {}", paint.warn(&behind.join(", ")));
        }
        text
    }
}

/// The phases so far, from the `PhaseChanged` Events about `migration`.
fn path(migration: &Migration, events: &[Event]) -> Vec<Step> {
    let uid = migration.uid();
    let mut steps: Vec<Step> = events
        .iter()
        .filter(|event| event.reason.as_deref() == Some("PhaseChanged"))
        .filter(|event| uid.is_some() && event.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
        .filter_map(|event| {
            let phase = event.action.as_deref()?.strip_prefix("To")?;
            let phase: Phase = serde_json::from_value(serde_json::Value::String(phase.into())).ok()?;
            // A phase entered again is one Event with a series: its last time is the latest.
            let at = event
                .series
                .as_ref()
                .map(|series| series.last_observed_time.0)
                .or(event.event_time.as_ref().map(|t| t.0))?;
            Some(Step { phase, at: Time(at) })
        })
        .collect();
    steps.sort_by_key(|step| step.at.0);
    if steps.first().is_none_or(|step| step.phase != Phase::Pending)
        && let Some(created) = migration.creation_timestamp()
    {
        steps.insert(0, Step { phase: Phase::Pending, at: created });
    }
    steps
}

/// What the user can do in `phase`.
fn next(name: &str, phase: Phase, ready_for_cutover: bool, reads: i32) -> Option<String> {
    Some(match phase {
        Phase::Pending | Phase::Syncing => format!("wait for the copy: kubectl eden status {name} --watch"),
        Phase::Ready if !ready_for_cutover => "wait until it is ready for cutover (see Held)".into(),
        Phase::Ready if reads < 100 => {
            format!("kubectl eden set-read {name} <percent> to move reads, or kubectl eden cutover {name}")
        }
        Phase::Ready => format!("kubectl eden cutover {name}"),
        Phase::CuttingOver | Phase::RollingBack => "wait: writes are moving".into(),
        Phase::CutOver => {
            format!(
                "kubectl eden complete {name} once the application is well on the target, or kubectl eden rollback {name}"
            )
        }
        Phase::RolledBack => format!("kubectl eden cutover {name} to try again, or delete the Migration"),
        Phase::Paused => format!("kubectl eden resume {name}"),
        Phase::Failed => format!("fix what Held says, or kubectl eden rollback {name}"),
        Phase::Completed => return None,
    })
}

/// ANSI colours, or none.
struct Paint(bool);

impl Paint {
    fn wrap(&self, code: &str, text: &str) -> String {
        if self.0 { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
    }

    fn phase(&self, phase: Phase) -> String {
        let code = match phase {
            Phase::Ready | Phase::CutOver | Phase::Completed => "32",
            Phase::Failed => "31",
            Phase::CuttingOver | Phase::RollingBack | Phase::Paused | Phase::RolledBack => "33",
            Phase::Pending | Phase::Syncing => "36",
        };
        self.wrap(code, &format!("{phase:?}"))
    }

    fn warn(&self, text: &str) -> String {
        self.wrap("33", text)
    }

    fn bold(&self, text: &str) -> String {
        self.wrap("1", text)
    }
}

fn age(now: Timestamp, since: Timestamp) -> String {
    duration(now.duration_since(since).as_secs())
}

/// A time of day, UTC.
fn clock(at: Timestamp) -> String {
    at.to_zoned(TimeZone::UTC).strftime("%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2026-12-03T12:10:00Z";

    fn migration(status: serde_json::Value) -> Migration {
        serde_json::from_value(json!({
            "apiVersion": "eden.io/v1alpha1", "kind": "Migration",
            "metadata": {"name": "shop-cache", "namespace": "shop", "uid": "u-1",
                         "creationTimestamp": "2026-12-03T12:00:00Z"},
            "spec": {
                "source": {"endpointRef": {"name": "old"}}, "target": {"endpointRef": {"name": "new"}},
                "strategy": {"readPercentage": 25, "writeMode": {"mode": "dualWrite", "policy": "oldAuthoritative"}},
            },
            "status": status,
        }))
        .unwrap()
    }

    fn phase_changed(to: &str, at: &str, uid: &str) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": format!("e-{to}")}, "eventTime": at, "reason": "PhaseChanged",
            "action": format!("To{to}"), "regarding": {"kind": "Migration", "name": "shop-cache", "uid": uid},
        }))
        .unwrap()
    }

    fn lease(pod: &str, generation: &str) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": format!("eden-sidecar-{pod}"), "labels": {"eden.io/migration": "shop-cache"},
                         "annotations": {"eden.io/applied-generation": generation, "eden.io/writes": "flowing"}},
            "spec": {"holderIdentity": pod},
        }))
        .unwrap()
    }

    #[test]
    fn a_copy_in_progress_shows_its_rate_its_eta_and_what_to_do() {
        let migration = migration(json!({
            "phase": "Syncing",
            "progress": {"keysCopied": 600_000, "keysTotal": 1_000_000, "summary": "600000/1000000 (60%)"},
            "replicationLagMillis": 1200,
            "conditions": [{"type": "ReadyForCutover", "status": "False", "reason": "LagAboveGuard",
                            "message": "lag 1200ms above maxLagMillis 100", "lastTransitionTime": NOW}],
        }));
        let events = [
            phase_changed("Syncing", "2026-12-03T12:00:00.000000Z", "u-1"),
            phase_changed("Ready", "2026-12-03T11:00:00.000000Z", "another migration"),
        ];
        let now: Timestamp = NOW.parse().unwrap();
        let report = Report::new(&migration, &events, &[], now);
        assert_eq!(
            report.render(now, false),
            "Migration shop/shop-cache
  Phase      Syncing, for 10m0s
  Path       Pending 12:00:00Z → Syncing 12:00:00Z
  Copy       ████████████░░░░░░░░ 60%  600,000 / 1,000,000 keys  1,000 keys/s  ETA 6m40s
  Lag        1200 ms (guard 100 ms)
  Verified   not yet
  Traffic    reads 25% on the target; writes to both sides, the source answering
  Held       LagAboveGuard (ReadyForCutover): lag 1200ms above maxLagMillis 100
  Next       wait for the copy: kubectl eden status shop-cache --watch
"
        );
        let coloured = report.render(now, true);
        assert!(coloured.contains("\x1b[36mSyncing\x1b[0m"), "{coloured}");
    }

    #[test]
    fn after_a_cutover_every_read_is_the_targets_whatever_the_read_share() {
        let mut cut_over = migration(json!({"phase": "CutOver"}));
        cut_over.spec.strategy.write_mode.policy = Some(WritePolicy::NewAuthoritative);
        let now: Timestamp = NOW.parse().unwrap();
        let text = Report::new(&cut_over, &[], &[], now).render(now, false);
        assert!(
            text.contains(
                "Traffic    reads all on the target, which owns every key; writes to the target, mirrored to the source"
            ),
            "{text}"
        );
    }

    #[test]
    fn sidecars_behind_are_named_and_the_next_verb_follows_the_phase() {
        let migration = migration(json!({
            "phase": "Ready", "readyForCutover": true, "replicationLagMillis": 3,
            "sidecars": {"live": 3, "acknowledged": 1, "fenced": 0, "configuredGeneration": 7, "summary": "1/3"},
            "lastVerification": {"checked": 1_000_000, "missing": 0, "extra": 0, "mismatched": 0, "kept": 0},
        }));
        let events = [
            phase_changed("Syncing", "2026-12-03T12:00:01.000000Z", "u-1"),
            phase_changed("Ready", "2026-12-03T12:04:30.000000Z", "u-1"),
        ];
        let leases = [lease("app-0", "7"), lease("app-2", "6"), lease("app-1", "oops")];
        let now: Timestamp = NOW.parse().unwrap();
        let report = Report::new(&migration, &events, &leases, now);
        assert_eq!(
            report.render(now, false),
            "Migration shop/shop-cache
  Phase      Ready, for 5m30s
  Path       Pending 12:00:00Z → Syncing 12:00:01Z → Ready 12:04:30Z
  Lag        3 ms (guard 100 ms)
  Verified   1,000,000 keys checked: no differences
  Sidecars   3 live, 1 applied generation 7, 0 fenced; behind: app-1 (unreadable Lease), app-2 (on 6)
  Traffic    reads 25% on the target; writes to both sides, the source answering
  Next       kubectl eden set-read shop-cache <percent> to move reads, or kubectl eden cutover shop-cache
"
        );
        assert_eq!(
            table(&[report.row(now)], false),
            "NAME         PHASE   FOR     COPY   LAG   SIDECARS   READS\nshop-cache   Ready   5m30s   -      3ms   1/3        25%\n"
        );
    }
}
