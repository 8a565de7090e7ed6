//! One handle over both modes, for the operator (which stores the checkpoint in the Migration's
//! status) and the CLI: start, watch progress, wait for catch-up, stop.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::endpoint::Endpoint;
use super::freshness::Marks;
use super::{
    Checkpoint, KeptKeys, OpsLimits, Progress, ReplacePolicy, ReplicateError, ScanOptions, ScanReplicator, SyncOptions,
    SyncReplicator,
};
use crate::upstream::Server;

/// How the data moves (the Migration's `spec.data.type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Eden is a replica of the source: snapshot, then the command stream.
    #[default]
    Sync,
    /// SCAN + DUMP/RESTORE and keyspace notifications, for servers that refuse PSYNC.
    Scan,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Mode::Sync),
            "scan" => Ok(Mode::Scan),
            other => Err(format!("unknown mode `{other}`: use sync or scan")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Scan => "scan",
        })
    }
}

/// Options for each mode; [`Replicator::start`] uses the one its mode needs.
#[derive(Debug, Clone, Default)]
pub struct ReplicatorOptions {
    pub scan: ScanOptions,
    pub sync: SyncOptions,
}

impl ReplicatorOptions {
    /// Defaults with one replace policy for both modes.
    pub fn new(replace: ReplacePolicy) -> Self {
        ReplicatorOptions {
            scan: ScanOptions { replace, ..Default::default() },
            sync: SyncOptions { replace, ..Default::default() },
        }
    }

    /// The same big-value threshold for both modes: values of more bytes are copied in pieces
    /// ([`ScanOptions::big_key_bytes`], [`SyncOptions::big_value_bytes`]).
    pub fn with_big_value_bytes(mut self, bytes: u64) -> Self {
        self.scan.big_key_bytes = bytes;
        self.sync.big_value_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        self
    }

    /// The same operations-per-second limits for both modes (sync mode refuses a source limit).
    pub fn with_limits(mut self, limits: OpsLimits) -> Self {
        self.scan.limits = limits;
        self.sync.limits = limits;
        self
    }
}

/// A running replication in either mode. Dropping it stops replication.
pub struct Replicator {
    engine: Engine,
    /// Keeps the target's freshness record while the engine runs (see [`super::freshness`]).
    freshness: Freshness,
}

/// The freshness task, stopped with its replicator.
struct Freshness(Option<(tokio::task::JoinHandle<()>, Endpoint)>);

impl Freshness {
    /// Stops the beats and removes the record, so that a target left behind holds only data.
    async fn forget(mut self) {
        if let Some((task, target)) = self.0.take() {
            task.abort();
            super::freshness::remove(&target).await;
        }
    }
}

impl Drop for Freshness {
    fn drop(&mut self) {
        if let Some((task, _)) = &self.0 {
            task.abort();
        }
    }
}

enum Engine {
    Sync(SyncReplicator),
    // Boxed: the scan replicator carries two connections and is twice the sync one's size.
    Scan(Box<ScanReplicator>),
}

impl Replicator {
    /// Starts replicating `source` into `target`. With a checkpoint from an earlier run (of
    /// either mode) this is a restart: scan mode resumes its passes, sync mode continues the
    /// stream from the target's recorded position when the source still can.
    pub async fn start(
        source: &Server,
        target: &Server,
        mode: Mode,
        options: ReplicatorOptions,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self, ReplicateError> {
        let engine = match mode {
            Mode::Sync => Engine::Sync(SyncReplicator::start(source, target, options.sync, checkpoint).await?),
            Mode::Scan => Engine::Scan(Box::new(match checkpoint {
                None => ScanReplicator::start(source, target, options.scan).await?,
                Some(checkpoint) => ScanReplicator::resume(source, target, options.scan, checkpoint).await?,
            })),
        };
        let mut replicator = Replicator { engine, freshness: Freshness(None) };
        // Without the record no sidecar reads the target before it is authoritative: safe,
        // and said once.
        let beats = async {
            let marks = match &replicator.engine {
                Engine::Sync(_) => Marks::Offset(Box::new(Endpoint::connect("source", source).await?)),
                Engine::Scan(r) => Marks::Barrier(r.barriers()),
            };
            Ok::<_, ReplicateError>((Endpoint::connect("target", target).await?, marks))
        };
        match beats.await {
            Ok((endpoint, marks)) => {
                let task = super::freshness::keep(endpoint.clone(), marks, replicator.progress());
                replicator.freshness = Freshness(Some((task, endpoint)));
            }
            Err(err) => tracing::warn!(
                error = %err,
                "cannot connect to keep the freshness record; sidecars will not read from it before cutover"
            ),
        }
        Ok(replicator)
    }

    pub fn mode(&self) -> Mode {
        match self.engine {
            Engine::Sync(_) => Mode::Sync,
            Engine::Scan(_) => Mode::Scan,
        }
    }

    /// Progress snapshots: lag (ms, and bytes in sync mode), keys copied of total, rate, and
    /// the checkpoint.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        match &self.engine {
            Engine::Sync(r) => r.progress(),
            Engine::Scan(r) => r.progress(),
        }
    }

    /// The keys `replace: skip` kept, for the verifier to count apart (see [`KeptKeys`]):
    /// `None` under `replace`, and for a replicator started from a checkpoint, which cannot
    /// know them.
    pub fn kept_keys(&self) -> Option<KeptKeys> {
        match &self.engine {
            Engine::Sync(r) => r.kept_keys(),
            Engine::Scan(r) => r.kept_keys(),
        }
    }

    /// The latest checkpoint, to store and pass to [`Replicator::start`] after a restart.
    pub fn checkpoint(&self) -> Checkpoint {
        self.progress().borrow().checkpoint.clone()
    }

    /// Waits until every write the source acknowledged before this call is on the target.
    /// `Ok(None)` on timeout; the replicator's error if it stopped.
    pub async fn caught_up(&mut self, timeout: Duration) -> Result<Option<Progress>, ReplicateError> {
        match &mut self.engine {
            Engine::Sync(r) => r.caught_up(timeout).await,
            Engine::Scan(r) => r.caught_up(timeout).await,
        }
    }

    /// Stops replicating; returns the replicator's error if it had already failed.
    pub async fn stop(self) -> Result<(), ReplicateError> {
        self.freshness.forget().await;
        match self.engine {
            Engine::Sync(r) => r.stop().await,
            Engine::Scan(r) => r.stop().await,
        }
    }
}
