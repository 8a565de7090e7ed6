//! The `sync` mode replicator: Eden acts as a replica of the source (DESIGN.md §5).
//!
//! One task does it all, in order, so the target sees the source's history in order:
//! 1. **Where to start.** The target's position record ([`target`]) says how far a previous run
//!    got. With a checkpoint (a restart) and a record, Eden asks to continue
//!    (`PSYNC <replid> <offset+1>`); otherwise it asks for a full copy (`PSYNC ? -1`).
//! 2. **Snapshot.** On `+FULLRESYNC` the source sends an RDB (`$<len>` or diskless
//!    `$EOF:<mark>`). [`rdb`] finds each key's encoded value and [`load`] RESTOREs it on the
//!    target as is, with its absolute expiry (strings, decoded, go in MSETs, or SETs when they
//!    expire), in pipelined batches, one value in memory at a time (a value past the big-value
//!    threshold is written in pieces instead, see [`load`]). The target is flushed
//!    first only when this is a restart: it then holds Eden's own earlier copy, which may have
//!    keys the source has deleted since. A first run never flushes; keys already on the target
//!    follow the replace policy. Under `skip` and `fail` the target has keys of its own that no
//!    flush may take, so a restart that needs a full copy stops with an error instead.
//! 3. **Stream.** [`apply`] applies the commands that follow, exactly once, acknowledging the
//!    offset every second. FLUSHDB/FLUSHALL arrive as commands and are applied like any other
//!    under `replace`; under `skip` and `fail` they stop replication before reaching the target.
//!
//! Progress and the checkpoint (replication ID and offset) are published on a `watch`
//! channel; [`SyncReplicator::caught_up`] waits until the target has applied the source's
//! offset as of the call.

mod apply;
pub(crate) mod decode;
mod hold;
pub(super) mod link;
pub(super) mod load;
mod psync;
mod rdb;
mod target;

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

pub use hold::EXPIRY_GRACE_MS;
pub(super) use rdb::STRING_PIECE;
pub use target::POSITION_KEY;

use self::hold::Hold;
use self::link::{Address, master_offset, text};
use self::load::{BatchLimits, Loader, SetExpiry};
use self::psync::Outcome;
use self::rdb::Snapshot;
use self::target::{Position, Target};
use super::budget::{BIG_VALUE_BYTES, big_value_threshold};
use super::checkpoint::SyncPosition;
use super::{Checkpoint, KeptKeys, OpsLimits, Progress, ReplacePolicy, ReplicateError};
use crate::upstream::Server;

/// Tuning for [`SyncReplicator`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// What loading the snapshot does with keys that already exist on the target (first run
    /// only: a restart that needs a full copy flushes the target first, which only `replace`
    /// allows; under `skip` and `fail` such a restart stops with an error instead).
    pub replace: ReplacePolicy,
    /// Keys per pipelined RESTORE batch.
    pub batch_keys: usize,
    /// Bytes per pipelined batch (RESTOREs or stream commands), at most about.
    pub batch_bytes: usize,
    /// Snapshot values of more bytes than this (or than half the target's
    /// `proto-max-bulk-len`) are written in pieces into a temporary key rather than restored
    /// whole, so memory does not grow with the biggest value.
    pub big_value_bytes: usize,
    /// Commands per second to the target. A source limit is refused: the source sends one
    /// replication stream and has no per-key commands to pace.
    pub limits: OpsLimits,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            replace: ReplacePolicy::Replace,
            batch_keys: 1000,
            batch_bytes: 4 << 20,
            big_value_bytes: BIG_VALUE_BYTES as usize,
            limits: OpsLimits::default(),
        }
    }
}

impl From<Position> for SyncPosition {
    fn from(p: Position) -> Self {
        SyncPosition { replid: p.replid, offset: p.offset, loading: p.held }
    }
}

/// A running sync-mode replication. Dropping it stops replication.
pub struct SyncReplicator {
    source: Address,
    progress: watch::Receiver<Progress>,
    task: JoinHandle<Result<(), ReplicateError>>,
    kept: Option<KeptKeys>,
}

impl SyncReplicator {
    /// Connects to both servers and starts replicating. `checkpoint` says this is a restart
    /// (any earlier checkpoint, from either mode, will do): Eden then continues from the
    /// position the target recorded, or flushes the target and copies everything again when
    /// the source cannot continue from there.
    pub async fn start(
        source: &Server,
        target: &Server,
        options: SyncOptions,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Self, ReplicateError> {
        if options.limits.source.is_some() {
            return Err(ReplicateError::Usage(
                "sync mode reads the source as one replication stream, with no per-key commands to limit; \
                 limit the target, or use scan mode to limit the source"
                    .into(),
            ));
        }
        let source = Address::whole("source", source)?;
        let target = Address::whole("target", target)?;
        let span = info_span!("sync_replicator", source = %source.label(), target = %target.label());
        let connections = Connections::open(&source, &target, &options).await?;
        let restart = checkpoint.is_some();
        // Until the source answers PSYNC nothing is known to be on the target: a first run
        // reports "loading", so nobody mistakes the empty start for a finished copy.
        let checkpoint = checkpoint.unwrap_or_else(|| Checkpoint {
            sync: Some(SyncPosition { replid: String::new(), offset: 0, loading: true }),
            ..Default::default()
        });
        // Behind from the start until the stream flows again: a restart that cannot reach the
        // target must not look caught up on the strength of its checkpoint.
        let (tx, progress) =
            watch::channel(Progress { checkpoint, behind_since: Some(Instant::now()), ..Default::default() });
        let reporter = Reporter { tx, started: Instant::now(), progress: progress.borrow().clone() };
        let addresses = (source.clone(), target);
        // A restart loads no snapshot under `skip` (it stops rather than flush), so it never
        // meets the keys the first run kept.
        let kept = (!restart && options.replace != ReplacePolicy::Replace).then(KeptKeys::default);
        let session = Session { addresses, connections, options, reporter, restart, handshakes: 0, kept: kept.clone() };
        let task = tokio::spawn(session.run().instrument(span));
        Ok(SyncReplicator { source, progress, task, kept })
    }

    /// The keys `skip` kept while loading the snapshot (see [`KeptKeys`]): `None` under
    /// `replace`, and after a restart, which cannot know them.
    pub fn kept_keys(&self) -> Option<KeptKeys> {
        self.kept.clone()
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
            // Nothing waiting, either: a restart's first snapshot carries the old checkpoint's
            // offset before the stream has confirmed it.
            p.checkpoint.sync.as_ref().is_some_and(|s| !s.loading && s.offset >= target) && p.behind_since.is_none()
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

/// Reconnect attempts in a row before a lost connection stops the run, waiting 1, 2, 4, 8 and
/// 16 s: a server restart or a network blip is ridden out, a server that stays away is
/// reported (the owner restarts the run from its checkpoint later).
const RECONNECT_ATTEMPTS: u32 = 5;

/// The three connections a session uses.
struct Connections {
    /// The replication link: the snapshot, then the stream.
    link: link::Link,
    /// For INFO while the link is busy streaming.
    info: link::Link,
    target: Target,
}

impl Connections {
    async fn open(source: &Address, target: &Address, options: &SyncOptions) -> Result<Self, ReplicateError> {
        Ok(Connections {
            target: Target::new(target.connect().await?, options.limits.target),
            link: source.connect().await?,
            info: source.connect().await?,
        })
    }
}

/// One replication, from handshake to the stream, reconnecting when a connection is lost.
struct Session {
    addresses: (Address, Address),
    connections: Connections,
    options: SyncOptions,
    reporter: Reporter,
    restart: bool,
    /// PSYNC handshakes the source answered.
    handshakes: u64,
    kept: Option<KeptKeys>,
}

impl Session {
    async fn run(mut self) -> Result<(), ReplicateError> {
        let mut attempts = 0;
        loop {
            let handshakes = self.handshakes;
            let err = match self.replicate().await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if self.handshakes > handshakes {
                // It got going again since the last loss: this is a new incident.
                attempts = 0;
            }
            if !err.is_disconnect() || attempts == RECONNECT_ATTEMPTS {
                warn!(error = %err, "sync replication stopped");
                return Err(err);
            }
            // A reconnect is a restart: continue from the position the target recorded. Until
            // the stream flows again, the target falls behind by however long this takes.
            self.restart = true;
            self.reporter.progress.behind_since.get_or_insert_with(Instant::now);
            self.reporter.progress.streamed = None;
            self.reporter.publish();
            loop {
                let wait = Duration::from_secs(1 << attempts);
                attempts += 1;
                warn!(error = %err, retry_in = ?wait, attempt = attempts, "sync replication lost a connection; reconnecting");
                tokio::time::sleep(wait).await;
                let (source, target) = &self.addresses;
                match Connections::open(source, target, &self.options).await {
                    Ok(connections) => {
                        self.connections = connections;
                        break;
                    }
                    Err(err) if err.is_disconnect() && attempts < RECONNECT_ATTEMPTS => {}
                    Err(err) => {
                        warn!(error = %err, "sync replication stopped");
                        return Err(err);
                    }
                }
            }
        }
    }

    async fn replicate(&mut self) -> Result<(), ReplicateError> {
        let Connections { link, info, target } = &mut self.connections;
        let recorded = if self.restart { target.recorded().await? } else { None };
        let outcome = psync::handshake(link, recorded.as_ref()).await?;
        self.handshakes += 1;
        let (applied, hold) = match outcome {
            Outcome::Continue { position } => {
                info!(
                    offset = position.offset,
                    held = position.held,
                    "the source continues its stream where the target stands"
                );
                let hold = Hold::new(position.held, Instant::now());
                (position, hold)
            }
            Outcome::Full { position, framing } => {
                if self.restart {
                    // The target now holds Eden's earlier copy, which may have keys the source has
                    // deleted since: only a flush removes them. Under `skip` and `fail` it also
                    // holds keys of its own, which no flush may take.
                    if self.options.replace != ReplacePolicy::Replace {
                        return Err(ReplicateError::FullCopyWouldFlush { server: target.link.label().clone() });
                    }
                    warn!("the source cannot continue from the target's position; flushing the target for a full copy");
                    target.flush().await?;
                }
                info!(replid = %position.replid, offset = position.offset, ?framing, "loading the source's snapshot");
                let loading_started = Instant::now();
                let checkpoint = &mut self.reporter.progress.checkpoint;
                checkpoint.sync = Some(SyncPosition { loading: true, ..position.clone().into() });
                (checkpoint.copied, checkpoint.skipped, checkpoint.total) = (0, 0, 0);
                self.reporter.progress.lag_ms = 0;
                self.reporter.progress.behind_since = Some(loading_started);
                self.reporter.publish();
                let info = target.link.call(&[b"INFO", b"server"]).await?;
                let set_expiry = SetExpiry::for_target(text(&info).unwrap_or_default());
                let limit = target.bulk_limit().await?;
                let big = big_value_threshold(self.options.big_value_bytes as u64, limit);
                let mut snapshot = Snapshot::open(link, framing, big as usize).await?;
                // After a restart the target holds nothing of its own any more.
                let policy = if self.restart { ReplacePolicy::Replace } else { self.options.replace };
                let limits = BatchLimits { keys: self.options.batch_keys, bytes: self.options.batch_bytes };
                let mut loader = Loader {
                    target,
                    policy,
                    set_expiry,
                    limits,
                    reporter: &mut self.reporter,
                    rebuilt_types: Default::default(),
                    started: loading_started,
                    kept: self.kept.as_ref(),
                    held: false,
                };
                loader.run(&mut snapshot).await?;
                let shifted = loader.held;
                let position = Position { held: true, ..position };
                target.write_position(&position).await?;
                let checkpoint = &self.reporter.progress.checkpoint;
                info!(
                    keys = checkpoint.copied,
                    skipped = checkpoint.skipped,
                    seconds = loading_started.elapsed().as_secs_f64(),
                    "snapshot loaded; following the stream, expiries held until it catches up"
                );
                (position, Hold::after_load(loading_started, shifted))
            }
        };
        let follower = apply::Follower {
            source: link,
            info,
            target,
            reporter: &mut self.reporter,
            applied,
            batch_bytes: self.options.batch_bytes,
            policy: self.options.replace,
            hold,
        };
        follower.run().await
    }
}
