//! The `sync` mode replicator: Eden acts as a replica of the source (DESIGN.md §5).
//!
//! One task does it all, in order, so the target sees the source's history in order:
//! 1. **Where to start.** The target's position record ([`target`]) says how far a previous run
//!    got. With a checkpoint (a restart) and a record, Eden asks to continue
//!    (`PSYNC <replid> <offset+1>`); otherwise it asks for a full copy (`PSYNC ? -1`).
//! 2. **Snapshot.** On `+FULLRESYNC` the source sends an RDB (`$<len>` or diskless
//!    `$EOF:<mark>`). [`rdb`] finds each key's encoded value and [`load`] RESTOREs it on the
//!    target as is, with its absolute expiry, in pipelined batches, one value in memory at a
//!    time. The target is flushed first only when this is a restart: it then holds Eden's own
//!    earlier copy, which may have keys the source has deleted since. A first run never
//!    flushes; keys already on the target follow the replace policy.
//! 3. **Stream.** [`apply`] applies the commands that follow, exactly once, acknowledging the
//!    offset every second. FLUSHDB/FLUSHALL arrive as commands and are applied like any other.
//!
//! Progress and the checkpoint (replication ID and offset) are published on a `watch`
//! channel; [`SyncReplicator::caught_up`] waits until the target has applied the source's
//! offset as of the call.

mod apply;
mod decode;
pub(super) mod link;
mod load;
mod psync;
mod rdb;
mod target;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

pub use target::POSITION_KEY;

use self::link::{Address, master_offset};
use self::load::{BatchLimits, Loader};
use self::psync::Outcome;
use self::rdb::Snapshot;
use self::target::{Position, Target};
use super::checkpoint::SyncPosition;
use super::{Checkpoint, Progress, ReplacePolicy, ReplicateError};
use crate::upstream::TlsSettings;

/// Tuning for [`SyncReplicator`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// What loading the snapshot does with keys that already exist on the target (first run
    /// only: a restart that needs a full copy flushes the target first).
    pub replace: ReplacePolicy,
    /// Trust for `rediss://` servers.
    pub tls: TlsSettings,
    /// Keys per pipelined RESTORE batch.
    pub batch_keys: usize,
    /// Bytes per pipelined batch (RESTOREs or stream commands), at most about.
    pub batch_bytes: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            replace: ReplacePolicy::Replace,
            tls: TlsSettings::default(),
            batch_keys: 1000,
            batch_bytes: 4 << 20,
        }
    }
}

impl From<Position> for SyncPosition {
    fn from(p: Position) -> Self {
        SyncPosition { replid: p.replid, offset: p.offset, loading: false }
    }
}

/// A running sync-mode replication. Dropping it stops replication.
pub struct SyncReplicator {
    source: Address,
    progress: watch::Receiver<Progress>,
    task: JoinHandle<Result<(), ReplicateError>>,
}

impl SyncReplicator {
    /// Connects to both servers and starts replicating. `checkpoint` says this is a restart
    /// (any earlier checkpoint, from either mode, will do): Eden then continues from the
    /// position the target recorded, or flushes the target and copies everything again when
    /// the source cannot continue from there.
    pub async fn start(
        source: &str,
        target: &str,
        options: SyncOptions,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self, ReplicateError> {
        let source = Address::parse("source", source, &options.tls)?;
        let target = Address::parse("target", target, &options.tls)?;
        let span = info_span!("sync_replicator", source = %source.label(), target = %target.label());
        let target = Target::new(target.connect().await?);
        let link = source.connect().await?;
        let info = source.connect().await?;
        let restart = checkpoint.is_some();
        // Until the source answers PSYNC nothing is known to be on the target: a first run
        // reports "loading", so nobody mistakes the empty start for a finished copy.
        let checkpoint = checkpoint.unwrap_or_else(|| Checkpoint {
            sync: Some(SyncPosition { replid: String::new(), offset: 0, loading: true }),
            ..Default::default()
        });
        let (tx, progress) = watch::channel(Progress { checkpoint, ..Default::default() });
        let reporter = Reporter { tx, started: Instant::now(), progress: progress.borrow().clone() };
        let session = Session { link, info, target, options, reporter, restart };
        let task = tokio::spawn(session.run().instrument(span));
        Ok(SyncReplicator { source, progress, task })
    }

    /// Progress snapshots, updated after every batch and at least once a second.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until the target has applied everything the source had written when this was
    /// called (its `master_repl_offset`). `Ok(None)` on timeout; the replicator's error if it
    /// stopped.
    pub async fn caught_up(&mut self, timeout: Duration) -> Result<Option<Progress>, ReplicateError> {
        let mut info = self.source.connect().await?;
        let target = master_offset(&mut info).await?;
        let mut progress = self.progress.clone();
        let wait = progress.wait_for(|p| {
            p.checkpoint.sync.as_ref().is_some_and(|s| !s.loading && s.offset >= target) && p.lag_ms == 0
        });
        // Cloned at once: a borrowed watch value held across the await below would make this
        // future !Send, unusable from a spawned task.
        let outcome = tokio::time::timeout(timeout, wait).await.map(|waited| waited.map(|snapshot| snapshot.clone()));
        match outcome {
            Ok(Ok(mut snapshot)) => {
                // The source is no further than the barrier and the target has it all.
                snapshot.lag_bytes = 0;
                Ok(Some(snapshot))
            }
            Ok(Err(_stopped)) => (&mut self.task).await.unwrap_or(Ok(())).map(|()| None),
            Err(_elapsed) => Ok(None),
        }
    }

    /// Stops replication; returns the replicator's error if it had already failed.
    pub async fn stop(mut self) -> Result<(), ReplicateError> {
        self.task.abort();
        (&mut self.task).await.unwrap_or(Ok(()))
    }
}

impl Drop for SyncReplicator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes progress: the snapshot every part of the session updates, sent as a whole.
pub(crate) struct Reporter {
    tx: watch::Sender<Progress>,
    started: Instant,
    pub(crate) progress: Progress,
}

impl Reporter {
    pub(crate) fn publish(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        self.progress.rate = self.progress.checkpoint.copied as f64 / elapsed;
        self.tx.send_replace(self.progress.clone());
    }
}

/// One replication session, from handshake to the stream.
struct Session {
    link: link::Link,
    info: link::Link,
    target: Target,
    options: SyncOptions,
    reporter: Reporter,
    restart: bool,
}

impl Session {
    async fn run(mut self) -> Result<(), ReplicateError> {
        let result = self.replicate().await;
        if let Err(err) = &result {
            warn!(error = %err, "sync replication stopped");
        }
        result
    }

    async fn replicate(&mut self) -> Result<(), ReplicateError> {
        let recorded = if self.restart { self.target.recorded().await? } else { None };
        let applied = match psync::handshake(&mut self.link, recorded.as_ref()).await? {
            Outcome::Continue { replid } => {
                let recorded = recorded.unwrap_or_else(|| unreachable!("CONTINUE answers a PSYNC with a position"));
                info!(offset = recorded.offset, "the source continues its stream where the target stands");
                Position { replid, ..recorded }
            }
            Outcome::Full { position, framing } => {
                if self.restart {
                    warn!("the source cannot continue from the target's position; flushing the target for a full copy");
                    self.target.flush().await?;
                }
                info!(replid = %position.replid, offset = position.offset, ?framing, "loading the source's snapshot");
                let loading_started = Instant::now();
                let checkpoint = &mut self.reporter.progress.checkpoint;
                checkpoint.sync = Some(SyncPosition { loading: true, ..position.clone().into() });
                (checkpoint.copied, checkpoint.skipped, checkpoint.total) = (0, 0, 0);
                self.reporter.progress.lag_ms = 0;
                self.reporter.progress.behind_since = Some(loading_started);
                self.reporter.publish();
                let mut snapshot = Snapshot::open(&mut self.link, framing).await?;
                // After a restart the target holds nothing of its own any more.
                let policy = if self.restart { ReplacePolicy::Replace } else { self.options.replace };
                let limits = BatchLimits { keys: self.options.batch_keys, bytes: self.options.batch_bytes };
                let mut loader = Loader {
                    target: &mut self.target,
                    policy,
                    limits,
                    reporter: &mut self.reporter,
                    rebuilt_types: HashSet::new(),
                    started: loading_started,
                };
                loader.run(&mut snapshot).await?;
                self.target.write_position(&position).await?;
                let checkpoint = &self.reporter.progress.checkpoint;
                info!(
                    keys = checkpoint.copied,
                    skipped = checkpoint.skipped,
                    seconds = loading_started.elapsed().as_secs_f64(),
                    "snapshot loaded; following the stream"
                );
                position
            }
        };
        let follower = apply::Follower {
            source: &mut self.link,
            info: &mut self.info,
            target: &mut self.target,
            reporter: &mut self.reporter,
            applied,
            batch_bytes: self.options.batch_bytes,
        };
        follower.run().await
    }
}
