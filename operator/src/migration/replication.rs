//! The replication runs this leader owns, one per Migration (DESIGN §5).
//!
//! A run is the replication engine from the sidecar library plus the verification that gates
//! the cutover. Runs live in memory on the leader only; what must outlive a leader (the
//! checkpoint) is copied into the Migration's status on every reconcile, and a new leader
//! resumes from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eden_sidecar::replicate::{
    Checkpoint, KeptKeys, Mode, OpsLimits, Progress, ReplacePolicy, ReplicateError, Replicator, ReplicatorOptions,
    Verifier, VerifyOptions, VerifyReport,
};
use eden_sidecar::upstream::Server;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::crd::{self, DataCopy};

/// How long a failed run stays failed (and visible in status) before it is retried.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long after a verification that found differences they are checked again: under live
/// writes a key can differ for the moment between reading the source and the target.
pub const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// Where to copy from and to, and how.
pub struct Plan {
    pub mode: DataCopy,
    pub replace: crd::ReplacePolicy,
    /// Each with its own credentials and TLS settings.
    pub source: Server,
    pub target: Server,
    pub limits: OpsLimits,
}

/// What a run looks like from outside, for status and the phase machine.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub backfill_done: bool,
    pub lag_millis: i64,
    pub keys_copied: i64,
    pub keys_total: i64,
    /// Why replication stopped, when it did.
    pub failure: Option<String>,
    pub checkpoint: Option<String>,
    pub verification: Option<VerificationOutcome>,
    /// Why the last verification could not run, until the next one does.
    pub verification_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VerificationOutcome {
    pub report: Arc<VerifyReport>,
    /// Whether this outcome re-checked the differences of an earlier one.
    pub recheck: bool,
}

/// The runs, by Migration uid.
#[derive(Default)]
pub struct Replications {
    runs: Mutex<HashMap<String, Run>>,
}

struct Run {
    replicator: Option<Replicator>,
    progress: watch::Receiver<Progress>,
    servers: (Server, Server),
    /// The keys `skip` kept, which outlive the replicator (verification goes on after it stops).
    kept: Option<KeptKeys>,
    failure: Option<(String, Instant)>,
    verification: Verification,
}

enum Verification {
    NotRun,
    Running { task: JoinHandle<Result<VerifyReport, ReplicateError>>, recheck: bool },
    Done { outcome: VerificationOutcome, at: Instant },
    Failed { error: String, at: Instant },
}

impl Replications {
    /// Whether a run exists for `uid` (running or failed).
    pub fn contains(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    /// Starts a run: from `checkpoint` when there is one, else a full copy. A run already there
    /// is replaced (stopped first).
    pub async fn start(&self, uid: &str, plan: &Plan, checkpoint: Option<&str>) -> Result<(), ReplicateError> {
        self.stop(uid).await;
        let mode = match plan.mode {
            DataCopy::Sync => Mode::Sync,
            DataCopy::Scan => Mode::Scan,
            DataCopy::None => return Ok(()),
        };
        let checkpoint = checkpoint.and_then(|text| match Checkpoint::from_json(text) {
            Ok(checkpoint) => Some(checkpoint),
            Err(err) => {
                tracing::warn!(%err, "the checkpoint in status is unreadable; copying everything again");
                None
            }
        });
        let options = ReplicatorOptions::new(replace_policy(plan.replace)).with_limits(plan.limits);
        let replicator = Replicator::start(&plan.source, &plan.target, mode, options, checkpoint).await?;
        let run = Run {
            progress: replicator.progress(),
            kept: replicator.kept_keys(),
            replicator: Some(replicator),
            servers: (plan.source.clone(), plan.target.clone()),
            failure: None,
            verification: Verification::NotRun,
        };
        self.lock().insert(uid.to_string(), run);
        Ok(())
    }

    /// Records a run that could not start, so that status says why and the retry waits.
    pub fn failed_to_start(&self, uid: &str, plan: &Plan, error: String) {
        let (_, progress) = watch::channel(Progress::default());
        let run = Run {
            replicator: None,
            progress,
            servers: (plan.source.clone(), plan.target.clone()),
            kept: None,
            failure: Some((error, Instant::now())),
            verification: Verification::NotRun,
        };
        self.lock().insert(uid.to_string(), run);
    }

    /// Stops and forgets the run for `uid`, if any.
    pub async fn stop(&self, uid: &str) {
        let run = self.lock().remove(uid);
        if let Some(mut run) = run {
            if let Verification::Running { task, .. } = &run.verification {
                task.abort();
            }
            if let Some(replicator) = run.replicator.take()
                && let Err(err) = replicator.stop().await
            {
                tracing::info!(%err, "replication had already stopped with an error");
            }
        }
    }

    /// Waits until every write made on the source so far is on the target; false when that
    /// does not happen within `timeout` or there is no healthy run.
    pub async fn drain(&self, uid: &str, timeout: Duration) -> bool {
        // Taken out for the wait (the lock is not held across it) and put back after; a run
        // removed meanwhile is stopped when the replicator drops here.
        let Some(mut replicator) = self.lock().get_mut(uid).and_then(|run| run.replicator.take()) else {
            return false;
        };
        let drained = matches!(replicator.caught_up(timeout).await, Ok(Some(_)));
        if let Some(run) = self.lock().get_mut(uid) {
            run.replicator = Some(replicator);
        }
        drained
    }

    /// A failed run that has waited [`RETRY_AFTER`]: the caller restarts it.
    pub fn retry_due(&self, uid: &str) -> bool {
        self.lock().get(uid).and_then(|run| run.failure.as_ref()).is_some_and(|(_, at)| at.elapsed() >= RETRY_AFTER)
    }

    /// The run's state now, collecting a finished replication or verification on the way.
    pub async fn observe(&self, uid: &str) -> Option<Snapshot> {
        // A replicator that stopped by itself is collected outside the lock: stop() awaits.
        let stopped = {
            let mut runs = self.lock();
            let run = runs.get_mut(uid)?;
            if run.failure.is_none() && run.progress.has_changed().is_err() { run.replicator.take() } else { None }
        };
        let error = match stopped {
            Some(replicator) => Some(match replicator.stop().await {
                Err(err) => err.to_string(),
                Ok(()) => "replication stopped unexpectedly".to_string(),
            }),
            None => None,
        };
        let verification = self.collect_verification(uid).await;
        self.record_and_snapshot(uid, error, verification)
    }

    fn record_and_snapshot(
        &self,
        uid: &str,
        error: Option<String>,
        verification: Option<Verification>,
    ) -> Option<Snapshot> {
        let mut runs = self.lock();
        let run = runs.get_mut(uid)?;
        if let Some(error) = error {
            tracing::warn!(%error, "replication failed");
            run.failure = Some((error, Instant::now()));
        }
        if let Some(verification) = verification {
            run.verification = verification;
        }
        let progress = run.progress.borrow();
        Some(Snapshot {
            backfill_done: progress.checkpoint.backfill_done(),
            lag_millis: progress.lag_ms_now() as i64,
            keys_copied: progress.checkpoint.copied as i64,
            keys_total: progress.checkpoint.total as i64,
            failure: run.failure.as_ref().map(|(error, _)| error.clone()),
            checkpoint: run.replicator.as_ref().map(|_| progress.checkpoint.to_json()),
            verification: match &run.verification {
                Verification::Done { outcome, .. } => Some(outcome.clone()),
                _ => None,
            },
            verification_error: match &run.verification {
                Verification::Failed { error, .. } => Some(error.clone()),
                _ => None,
            },
        })
    }

    /// Starts a verification when none ran for this run yet, or a re-check of the differences
    /// the last one found once [`RECHECK_AFTER`] has passed. Returns whether one started.
    pub fn verify_if_due(&self, uid: &str) -> bool {
        let mut runs = self.lock();
        let Some(run) = runs.get_mut(uid) else { return false };
        let previous = match &run.verification {
            Verification::NotRun => None,
            Verification::Done { outcome, at } if !outcome.report.is_clean() && at.elapsed() >= RECHECK_AFTER => {
                Some(outcome.report.clone())
            }
            Verification::Failed { at, .. } if at.elapsed() >= RETRY_AFTER => None,
            _ => return false,
        };
        let (source, target) = run.servers.clone();
        let options = VerifyOptions { kept: run.kept.clone(), ..VerifyOptions::default() };
        let recheck = previous.is_some();
        // In the reconcile's span, so that the verifier's lines name the migration too.
        let task = tokio::spawn(
            async move {
                let verifier = Verifier::connect(&source, &target, options).await?;
                match previous {
                    Some(previous) => verifier.recheck(&previous).await,
                    None => verifier.run().await,
                }
            }
            .in_current_span(),
        );
        run.verification = Verification::Running { task, recheck };
        true
    }

    /// The finished verification of `uid`'s run, if one just finished.
    async fn collect_verification(&self, uid: &str) -> Option<Verification> {
        let (task, recheck) = {
            let mut runs = self.lock();
            let run = runs.get_mut(uid)?;
            if !matches!(&run.verification, Verification::Running { task, .. } if task.is_finished()) {
                return None;
            }
            let Verification::Running { task, recheck } =
                std::mem::replace(&mut run.verification, Verification::NotRun)
            else {
                return None;
            };
            (task, recheck)
        };
        let at = Instant::now();
        Some(match task.await {
            Ok(Ok(report)) => {
                Verification::Done { outcome: VerificationOutcome { report: Arc::new(report), recheck }, at }
            }
            Ok(Err(err)) => Verification::Failed { error: err.to_string(), at },
            Err(join) => Verification::Failed { error: format!("verification task ended: {join}"), at },
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        // A panic while holding the lock leaves plain data behind; the map is still usable.
        self.runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn replace_policy(policy: crd::ReplacePolicy) -> ReplacePolicy {
    match policy {
        crd::ReplacePolicy::Replace => ReplacePolicy::Replace,
        crd::ReplacePolicy::Skip => ReplacePolicy::Skip,
        crd::ReplacePolicy::Fail => ReplacePolicy::Fail,
    }
}
