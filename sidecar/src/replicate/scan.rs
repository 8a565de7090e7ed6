//! The `scan` mode replicator: subscribe, backfill, then follow live changes until stopped.
//!
//! Why the copy is exact. The keyspace subscription is confirmed before the first SCAN, so every
//! write from then on produces a notification after the write executes. One task, the copier,
//! does all target writes, one batch at a time, and it removes a key from the dirty set *before*
//! it sends that key's DUMP. Take any write W to key K:
//! - if W executed before the DUMP that copied K, the DUMP includes W;
//! - if W executed after that DUMP, its notification was published after the DUMP ran, hence
//!   after K left the dirty set, so the subscriber puts K back and a later batch copies K again.
//!
//! Because batches never overlap, an older DUMP can never be restored after a newer one, so a
//! stale snapshot never overwrites a newer write. The same argument covers keys changed during a
//! chunked big-key copy. Deletes and expiries are notified too, and a nil DUMP becomes a DEL.
//!
//! When the argument's premise breaks — the subscription dropped, the dirty set overflowed, or
//! the replicator restarted from a [`Checkpoint`] — notifications may have been lost, so a full
//! re-copy pass and a prune pass (target keys the source no longer has) are queued. A FLUSHDB or
//! FLUSHALL on the source ([`super::flush`]) flushes the target and restarts the backfill.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{cmd, pipe};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::checkpoint::Pass;
use super::copy::{Copier, CopyStats, ExpiryCommand};
use super::endpoint::Endpoint;
use super::flush::FlushWatch;
use super::notify::{self, Shared};
use super::{Checkpoint, Key, OpsLimits, Progress, ReplacePolicy, ReplicateError, keys};
use crate::upstream::TlsSettings;

/// Tuning for [`ScanReplicator`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Keys per SCAN step and per copy batch (one MULTI of DUMPs, one pipeline of RESTOREs).
    pub batch: usize,
    /// What the backfill does with keys that already exist on the target.
    pub replace: ReplacePolicy,
    /// MEMORY USAGE above which lists, hashes, sets, sorted sets and streams are copied in chunks.
    pub big_key_bytes: u64,
    /// Elements per chunk when copying a big key.
    pub chunk: usize,
    /// Dirty keys held at most; beyond this the set is dropped and a full rescan runs.
    pub dirty_capacity: usize,
    /// How often the source is checked for FLUSHDB/FLUSHALL.
    pub flush_check: Duration,
    /// Trust for `rediss://` servers.
    pub tls: TlsSettings,
    /// Commands per second to each server.
    pub limits: OpsLimits,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            batch: 500,
            replace: ReplacePolicy::Replace,
            big_key_bytes: 16 << 20,
            chunk: 1000,
            dirty_capacity: 100_000,
            flush_check: Duration::from_millis(500),
            tls: TlsSettings::default(),
            limits: OpsLimits::default(),
        }
    }
}

/// A running scan-mode replication from a source to a target. Dropping it stops replication.
pub struct ScanReplicator {
    source: Endpoint,
    barrier_channel: String,
    next_barrier: AtomicU64,
    progress: watch::Receiver<Progress>,
    copier: JoinHandle<Result<(), ReplicateError>>,
    subscriber: JoinHandle<()>,
}

impl ScanReplicator {
    /// Starts a fresh replication: subscribe, then backfill everything.
    pub async fn start(source: &str, target: &str, options: ScanOptions) -> Result<Self, ReplicateError> {
        Self::launch(source, target, options, Checkpoint::fresh()).await
    }

    /// Resumes from a checkpoint taken from [`Progress::checkpoint`]: the interrupted pass goes on
    /// from its cursor, then a full re-copy and prune pass run because notifications were missed
    /// while the replicator was down (see [`Checkpoint`]). A resumed backfill treats `fail` as
    /// `skip`: keys written by the previous run are indistinguishable from keys that were there
    /// before.
    pub async fn resume(
        source: &str,
        target: &str,
        mut options: ScanOptions,
        mut checkpoint: Checkpoint,
    ) -> Result<Self, ReplicateError> {
        if options.replace == ReplacePolicy::Fail {
            options.replace = ReplacePolicy::Skip;
        }
        checkpoint.queue_full_pass();
        Self::launch(source, target, options, checkpoint).await
    }

    async fn launch(
        source_url: &str,
        target_url: &str,
        options: ScanOptions,
        checkpoint: Checkpoint,
    ) -> Result<Self, ReplicateError> {
        let source = Endpoint::connect("source", source_url, &options.tls).await?.paced(options.limits.source);
        let target = Endpoint::connect("target", target_url, &options.tls).await?.paced(options.limits.target);
        let span = info_span!("scan_replicator", source = %source.label(), target = %target.label());
        let verified = notify::enable(&source).instrument(span.clone()).await?;

        let shared = Arc::new(Shared::new(options.dirty_capacity));
        let barrier_channel = notify::barrier_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let subscriber = tokio::spawn(
            notify::subscriber(
                source.client().clone(),
                source.label().clone(),
                source.db(),
                barrier_channel.clone(),
                shared.clone(),
                ready_tx,
            )
            .instrument(span.clone()),
        );
        let ready = async {
            ready_rx.await.unwrap_or_else(|_| unreachable!("the subscriber answers before it can end"))?;
            if !verified {
                probe(&source, &shared, &barrier_channel).await?;
            }
            ExpiryCommand::detect(&source).await
        };
        let expiry = match ready.await {
            Ok(expiry) => expiry,
            Err(err) => {
                subscriber.abort();
                return Err(err);
            }
        };
        let (progress_tx, progress) = watch::channel(Progress { checkpoint: checkpoint.clone(), ..Default::default() });
        let copier = Copier {
            expiry,
            source: source.clone(),
            target,
            big_key_bytes: options.big_key_bytes,
            chunk: options.chunk,
            rebuilt_types: Default::default(),
        };
        info!(parent: &span, passes = ?checkpoint.passes, "scan replication starting");
        let run = CopyLoop { copier, shared, options, progress: progress_tx, started: Instant::now() };
        Ok(ScanReplicator {
            source,
            barrier_channel,
            next_barrier: AtomicU64::new(PROBE_BARRIER),
            progress,
            copier: tokio::spawn(run.run(checkpoint).instrument(span)),
            subscriber,
        })
    }

    async fn publish_barrier(&self) -> Result<u64, ReplicateError> {
        let n = self.next_barrier.fetch_add(1, Ordering::Relaxed) + 1;
        notify::publish_barrier(&self.source, &self.barrier_channel, n).await?;
        Ok(n)
    }

    /// Progress snapshots, updated after every batch.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until every write made on the source before this call is on the target (backfill
    /// done, all notifications up to a barrier processed, dirty set empty). `Ok(None)` on
    /// timeout; the replicator's error if it stopped.
    pub async fn caught_up(&mut self, timeout: Duration) -> Result<Option<Progress>, ReplicateError> {
        let barrier = self.publish_barrier().await?;
        let mut progress = self.progress.clone();
        let wait = progress.wait_for(|p| p.barrier >= barrier && p.caught_up());
        // The snapshot is cloned at once: a borrowed watch value held across the await below
        // would make this future !Send, unusable from a spawned task.
        let outcome = tokio::time::timeout(timeout, wait).await.map(|waited| waited.map(|snapshot| snapshot.clone()));
        match outcome {
            Ok(Ok(snapshot)) => Ok(Some(snapshot)),
            Ok(Err(_stopped)) => (&mut self.copier).await.unwrap_or(Ok(())).map(|()| None),
            Err(_elapsed) => Ok(None),
        }
    }

    /// Stops replication; returns the copier's error if it had already failed.
    pub async fn stop(mut self) -> Result<(), ReplicateError> {
        self.subscriber.abort();
        self.copier.abort();
        (&mut self.copier).await.unwrap_or(Ok(()))
    }
}

impl Drop for ScanReplicator {
    fn drop(&mut self) {
        self.subscriber.abort();
        self.copier.abort();
    }
}

/// The single task that writes to the target; see the module docs for why there is only one.
struct CopyLoop {
    copier: Copier,
    shared: Arc<Shared>,
    options: ScanOptions,
    progress: watch::Sender<Progress>,
    started: Instant,
}

impl CopyLoop {
    async fn run(self, checkpoint: Checkpoint) -> Result<(), ReplicateError> {
        let result = self.run_inner(checkpoint).await;
        if let Err(err) = &result {
            warn!(error = %err, "scan replication stopped");
        }
        result
    }

    async fn run_inner(&self, mut state: Checkpoint) -> Result<(), ReplicateError> {
        let source = &self.copier.source;
        let mut flush = FlushWatch::start(source).await?;
        let mut last_flush_check = Instant::now();
        let mut seen_barrier = 0;
        let mut pass_started = Instant::now();
        let mut snapshot = self.progress.borrow().clone();
        loop {
            // Read the barrier first: everything notified before it is in the dirty set now.
            let barrier = self.shared.barrier();
            if barrier != seen_barrier || last_flush_check.elapsed() >= self.options.flush_check {
                last_flush_check = Instant::now();
                seen_barrier = barrier;
                if flush.flushed(source).await? {
                    warn!("source was flushed; flushing the target and restarting the backfill");
                    self.shared.dirty().clear();
                    self.copier.target.cmd::<()>("FLUSHDB", &cmd("FLUSHDB")).await?;
                    state.passes.clear();
                    state.passes.push_back(Pass::Recopy { cursor: 0 });
                    snapshot.flushes += 1;
                }
            }
            let overflowed = self.shared.dirty().take_overflow();
            if overflowed || self.shared.take_resync() {
                warn!(overflowed, "notifications may have been lost; queueing a full re-copy and prune");
                state.queue_full_pass();
                snapshot.resyncs += 1;
            }

            // Live changes first, so lag stays low during a long backfill. `take` removes the
            // keys from the dirty set before their DUMP is sent (the ordering the proof needs).
            let dirty = self.shared.dirty().take(self.options.batch);
            let mut stats = self.copier.copy(&dirty, ReplacePolicy::Replace).await?;

            match state.passes.front().copied() {
                Some(pass) => {
                    let (cursor, pass_stats) = self.step(pass).await?;
                    stats += pass_stats;
                    if pass_is_starting(pass) {
                        pass_started = Instant::now();
                        state.total = source.cmd("DBSIZE", &cmd("DBSIZE")).await?;
                    }
                    match (cursor, state.passes.front_mut()) {
                        (0, _) => {
                            state.passes.pop_front();
                            info!(?pass, "pass complete");
                        }
                        (next, Some(Pass::Backfill { cursor } | Pass::Recopy { cursor } | Pass::Prune { cursor })) => {
                            *cursor = next
                        }
                        (_, None) => {}
                    }
                }
                None if dirty.is_empty() => {
                    self.publish(&mut snapshot, &state, barrier, pass_started);
                    let _ = tokio::time::timeout(self.options.flush_check, self.shared.wake.notified()).await;
                    continue;
                }
                None => {}
            }
            state.copied += stats.copied;
            state.deleted += stats.deleted;
            state.skipped += stats.skipped;
            self.publish(&mut snapshot, &state, barrier, pass_started);
        }
    }

    /// One SCAN step of a pass; returns the next cursor.
    async fn step(&self, pass: Pass) -> Result<(u64, CopyStats), ReplicateError> {
        let (source, target) = (&self.copier.source, &self.copier.target);
        match pass {
            Pass::Backfill { cursor } => {
                let (next, found) = keys::scan(source, cursor, self.options.batch).await?;
                Ok((next, self.copier.copy(&found, self.options.replace).await?))
            }
            Pass::Recopy { cursor } => {
                let (next, found) = keys::scan(source, cursor, self.options.batch).await?;
                Ok((next, self.copier.copy(&found, ReplacePolicy::Replace).await?))
            }
            Pass::Prune { cursor } => {
                let (next, found) = keys::scan(target, cursor, self.options.batch).await?;
                let on_source = keys::exists(source, &found).await?;
                let gone: Vec<&Key> = found.iter().zip(on_source).filter(|(_, on)| !on).map(|(k, _)| k).collect();
                let mut del = pipe();
                for key in &gone {
                    del.cmd("DEL").arg(*key);
                }
                target.pipe("DEL", &mut del).await?;
                Ok((next, CopyStats { deleted: gone.len() as u64, ..Default::default() }))
            }
        }
    }

    fn publish(&self, snapshot: &mut Progress, state: &Checkpoint, barrier: u64, pass_started: Instant) {
        let dirty = self.shared.dirty();
        let pass_age = if state.passes.is_empty() { Duration::ZERO } else { pass_started.elapsed() };
        let lag = dirty.oldest_age().max(pass_age);
        snapshot.lag_ms = lag.as_millis() as u64;
        snapshot.behind_since = (!lag.is_zero()).then(|| Instant::now() - lag);
        snapshot.dirty = dirty.len();
        drop(dirty);
        snapshot.rate = state.copied as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        snapshot.barrier = barrier;
        snapshot.checkpoint = state.clone();
        self.progress.send_replace(snapshot.clone());
    }
}

/// The barrier number the probe uses; [`ScanReplicator::caught_up`] counts on from it.
const PROBE_BARRIER: u64 = 1;

/// CONFIG was refused: write a short-lived probe key and check that its notification arrives
/// before a barrier published after it does.
async fn probe(source: &Endpoint, shared: &Shared, barrier_channel: &str) -> Result<(), ReplicateError> {
    let key = format!("eden:probe:{barrier_channel}");
    source.cmd::<()>("SET", cmd("SET").arg(&key).arg(1).arg("PX").arg(10_000)).await?;
    notify::publish_barrier(source, barrier_channel, PROBE_BARRIER).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.barrier() < PROBE_BARRIER && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = shared.dirty().contains(key.as_bytes());
    source.cmd::<()>("DEL", cmd("DEL").arg(&key)).await?;
    if seen {
        Ok(())
    } else {
        Err(ReplicateError::NotificationsOff {
            server: source.label().clone(),
            detail: "CONFIG is refused and a probe write produced no keyevent notification".into(),
        })
    }
}

fn pass_is_starting(pass: Pass) -> bool {
    matches!(pass, Pass::Backfill { cursor: 0 } | Pass::Recopy { cursor: 0 } | Pass::Prune { cursor: 0 })
}
