//! The `scan` mode replicator: subscribe, backfill, then follow live changes until stopped.
//!
//! Why the copy is exact. The keyspace subscription is confirmed before the first SCAN, so every
//! write from then on produces a notification after the write executes. One task, the copy loop,
//! moves keys in batches through a pipeline: it *forms* a batch (takes keys out of the dirty set,
//! runs one SCAN step), *reads* it on the source (each key as a string with its expiry in one
//! MULTI; the other keys sized, then DUMP and expiry in further MULTIs, or chunk by chunk for a
//! big key) and *writes* it to the target (SET, RESTORE, DEL). Up to three batches are in
//! flight, each at a different stage, but two rules hold:
//! - every read of a batch happens after the batch was formed;
//! - batches are written in the order they were formed, one after the other, by this task over
//!   one target connection, so the target applies them in that order.
//!
//! Take any key K and the last write W to it. W's notification is published after W, so K is in
//! the dirty set at some moment after W and a batch B formed later still takes it. B reads K after
//! W, so it copies K's final value (or deletes it). Every batch written after B was formed after
//! B, hence after W, and also copies the final value; every batch written before B is overwritten
//! by B. So the last copy of K on the target is the final value: an older DUMP is never restored
//! after a newer one, and a stale snapshot never overwrites a newer write. The same argument covers
//! keys changed during a chunked big-key copy (its reads, too, follow its batch's forming), and
//! deletes and expiries, which are notified too: a key the reads find missing becomes a DEL.
//! Reading a key twice (as a string, then, when it is not one or is longer than the string
//! read's cap, as a DUMP payload) changes nothing: both reads follow the forming, and the one
//! whose result is written describes a single moment (value and expiry come from one MULTI).
//! Nothing here relates two keys, so a batch's keys need not be read at one moment: keys to DUMP
//! are split into MULTIs that fit the batch's byte budget, and those that do not fit beside the
//! rest of the read are DUMPed at write time, like a big key's chunks, after the forming still.
//!
//! A `fail` or `skip` backfill must not mistake a key it wrote itself for one the target had
//! before: a key written on the source during the backfill is copied from the dirty set before
//! SCAN gets to it, and SCAN may return a key twice. So while such a backfill runs, the loop
//! remembers every key it has settled on the target ([`Settled`]): copied, deleted, or, under
//! `skip`, found there and kept. A key SCAN finds that is already settled is copied with
//! `replace` under `fail`, where settled means written by us (a key found on the target would
//! have stopped the run); like any other, its read follows its batch's forming, so the argument
//! above holds. Under `skip` it is left out of the batch: it was either written by us after the
//! subscription (any later change is notified and re-copied anyway) or kept on purpose, and either
//! way it is counted once. A dirty key not settled yet is held to the policy too, as it may be one
//! the target had before; and one gone from the source by then is not deleted from the target,
//! only looked for there (`fail` stops, `skip` keeps it), since its copy there is not ours. A key
//! is settled when its batch is formed, yet the set only decides for batches formed after that
//! one, and those are written after it: by then the earlier write has been applied. Batches
//! dropped unwritten at a restart take their keys back out.
//!
//! Progress counts a taken key as waiting until its batch is written, so
//! [`ScanReplicator::caught_up`] never reports a key that is still in flight as copied.
//!
//! When the argument's premise breaks — the subscription dropped, the dirty set overflowed, or
//! the replicator restarted from a [`Checkpoint`] — notifications may have been lost, so a full
//! re-copy pass and, under `replace`, a prune pass (target keys the source no longer has) are
//! queued: under `skip` and `fail` a key only the target has may be one it had before. A
//! FLUSHDB or FLUSHALL on the source ([`super::flush`]) flushes the target and restarts the
//! backfill under `replace`; under `skip` and `fail` it stops replication, as the target's own
//! keys are not the source's to flush.
//!
//! Under `skip`, a re-copy must not undo what the backfill kept: the source is the truth for
//! every key but those the target had and `skip` kept, until the application writes them on the
//! source. A run that began with the backfill remembers them (`Turns::kept`) and the write stage
//! exempts them from a re-copy batch when it writes it, after every earlier batch has recorded
//! what it kept. A resumed run cannot know them, so its re-copy skips every key the target has:
//! a copy that went stale while notifications were lost stays stale, for the verifier to report,
//! rather than the target's own value being overwritten.
//!
//! A lost copy connection breaks nothing of the argument: the batches not written yet are
//! dropped, their dirty keys go back to the dirty set and their pass steps are formed again, so
//! every key they held is taken by a batch formed (and read) later ([`CopyLoop::run_inner`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::cmd;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::budget::{BIG_VALUE_BYTES, big_value_threshold};
use super::checkpoint::Pass;
use super::copy::{Copier, ExpiryCommand, Read};
use super::endpoint::Endpoint;
use super::flush::FlushWatch;
use super::kept::{Fingerprints, KeptKeys};
use super::notify::{self, Shared};
use super::sync::link::{Address, Link};
use super::sync::load::SetExpiry;
use super::{Checkpoint, Key, OpsLimits, Progress, ReplacePolicy, ReplicateError, keys};
use crate::upstream::Server;

/// Tuning for [`ScanReplicator`].
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Keys per SCAN step and per copy batch; three batches are in flight at a time.
    pub batch: usize,
    /// Value bytes a batch's reads hold at most, about (MEMORY USAGE is an estimate): each
    /// string is read up to its share of this, and keys to DUMP are read and written in groups
    /// within it. One value bigger than this by itself still moves whole, unless it is a
    /// collection over `big_key_bytes`.
    pub batch_bytes: u64,
    /// What the backfill does with keys that already exist on the target.
    pub replace: ReplacePolicy,
    /// MEMORY USAGE above which values (strings, lists, hashes, sets, sorted sets, streams)
    /// are copied in chunks; at most half the target's `proto-max-bulk-len`
    /// ([`super::budget::big_value_threshold`]).
    pub big_key_bytes: u64,
    /// Elements per chunk when copying a big key.
    pub chunk: usize,
    /// Dirty keys held at most; beyond this the set is dropped and a full rescan runs.
    pub dirty_capacity: usize,
    /// How often the source is checked for FLUSHDB/FLUSHALL.
    pub flush_check: Duration,
    /// Commands per second to each server.
    pub limits: OpsLimits,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            batch: 1000,
            batch_bytes: 32 << 20,
            replace: ReplacePolicy::Replace,
            big_key_bytes: BIG_VALUE_BYTES,
            chunk: 1000,
            dirty_capacity: 100_000,
            flush_check: Duration::from_millis(500),
            limits: OpsLimits::default(),
        }
    }
}

/// A running scan-mode replication from a source to a target. Dropping it stops replication.
pub struct ScanReplicator {
    barriers: Arc<Barriers>,
    progress: watch::Receiver<Progress>,
    copier: JoinHandle<Result<(), ReplicateError>>,
    subscriber: JoinHandle<()>,
    kept: Option<KeptKeys>,
}

impl ScanReplicator {
    /// Starts a fresh replication: subscribe, then backfill everything.
    pub async fn start(source: &Server, target: &Server, options: ScanOptions) -> Result<Self, ReplicateError> {
        Self::launch(source, target, options, Checkpoint::fresh()).await
    }

    /// Resumes from a checkpoint taken from [`Progress::checkpoint`]: the interrupted pass goes on
    /// from its cursor, then a full re-copy and prune pass (a prune only under `replace`) run
    /// because notifications were missed while the replicator was down (see [`Checkpoint`]). A resumed backfill treats `fail` as
    /// `skip`: keys written by the previous run are indistinguishable from keys that were there
    /// before.
    pub async fn resume(
        source: &Server,
        target: &Server,
        mut options: ScanOptions,
        mut checkpoint: Checkpoint,
    ) -> Result<Self, ReplicateError> {
        if options.replace == ReplacePolicy::Fail {
            options.replace = ReplacePolicy::Skip;
        }
        checkpoint.queue_full_pass(options.replace == ReplacePolicy::Replace);
        Self::launch(source, target, options, checkpoint).await
    }

    async fn launch(
        source_server: &Server,
        target_server: &Server,
        options: ScanOptions,
        checkpoint: Checkpoint,
    ) -> Result<Self, ReplicateError> {
        let source = Endpoint::connect("source", source_server).await?.paced(options.limits.source);
        let target = Endpoint::connect("target", target_server).await?.paced(options.limits.target);
        // The DUMPs and RESTOREs that carry every value go over raw connections of their own;
        // the write stage DUMPs what its batch's budget left for later on one more, as the read
        // stage is using the first for the next batch meanwhile.
        let addresses = LinkAddresses {
            source: Address::new("source", source_server)?,
            target: Address::new("target", target_server)?,
        };
        let links = addresses.connect().await?;
        let span = info_span!("scan_replicator", source = %source.label(), target = %target.label());
        let verified = notify::enable(&source).instrument(span.clone()).await?;

        let shared = Arc::new(Shared::new(options.dirty_capacity));
        let barrier_channel = notify::barrier_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let subscriber = tokio::spawn(
            notify::subscriber(source.clone(), barrier_channel.clone(), shared.clone(), ready_tx)
                .instrument(span.clone()),
        );
        let ready = async {
            ready_rx.await.unwrap_or_else(|_| unreachable!("the subscriber answers before it can end"))?;
            if !verified {
                probe(&source, &shared, &barrier_channel).await?;
            }
            let info: String = target.cmd("INFO", redis::cmd("INFO").arg("server")).await?;
            // Refused on many managed services: their limit is then taken to be the default.
            let limit: Option<Vec<String>> =
                target.cmd("CONFIG GET", redis::cmd("CONFIG").arg("GET").arg("proto-max-bulk-len")).await.ok();
            let limit = limit.and_then(|pair| pair.get(1)?.parse().ok());
            let big = big_value_threshold(options.big_key_bytes, limit);
            Ok((ExpiryCommand::detect(&source).await?, SetExpiry::for_target(&info), big))
        };
        let (expiry, set_expiry, big_key_bytes) = match ready.await {
            Ok(detected) => detected,
            Err(err) => {
                subscriber.abort();
                return Err(err);
            }
        };
        // Behind from the start until the first batch publishes: a restart must not look caught
        // up on the strength of its checkpoint (notifications were missed meanwhile).
        let initial =
            Progress { checkpoint: checkpoint.clone(), behind_since: Some(Instant::now()), ..Default::default() };
        let (progress_tx, progress) = watch::channel(initial);
        let copier = Copier {
            expiry,
            set_expiry,
            source: source.clone(),
            target,
            big_key_bytes,
            batch_bytes: options.batch_bytes,
            chunk: options.chunk,
            rebuilt_types: Default::default(),
        };
        info!(parent: &span, passes = ?checkpoint.passes, "scan replication starting");
        // A resumed checkpoint always has a re-copy queued, so only a fresh run matches.
        let kept = (options.replace != ReplacePolicy::Replace && checkpoint.passes == Checkpoint::fresh().passes)
            .then(KeptKeys::default);
        let run = CopyLoop {
            db: copier.target.db() as u64,
            copier,
            addresses,
            shared,
            options,
            progress: progress_tx,
            kept: kept.clone(),
            started: Instant::now(),
        };
        Ok(ScanReplicator {
            barriers: Arc::new(Barriers { source, channel: barrier_channel, next: AtomicU64::new(PROBE_BARRIER) }),
            progress,
            copier: tokio::spawn(run.run(checkpoint, links).instrument(span)),
            subscriber,
            kept,
        })
    }

    /// The barriers [`Self::caught_up`] publishes, for others to wait on the same way (the
    /// freshness beats).
    pub(crate) fn barriers(&self) -> Arc<Barriers> {
        self.barriers.clone()
    }

    /// The keys `skip` kept (see [`KeptKeys`]): `None` under `replace`, and for a resumed run,
    /// which cannot know them.
    pub fn kept_keys(&self) -> Option<KeptKeys> {
        self.kept.clone()
    }

    /// Progress snapshots, updated after every batch.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until every write made on the source before this call is on the target (backfill
    /// done, all notifications up to a barrier processed, dirty set empty). `Ok(None)` on
    /// timeout; the replicator's error if it stopped.
    pub async fn caught_up(&mut self, timeout: Duration) -> Result<Option<Progress>, ReplicateError> {
        let barrier = self.barriers.publish().await?;
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

/// Barriers on the notification channel: a barrier is processed once every notification the
/// source published before it is in the dirty set (see [`notify`]).
pub(crate) struct Barriers {
    source: Endpoint,
    channel: String,
    next: AtomicU64,
}

impl Barriers {
    /// Publishes the next barrier and returns its number.
    pub(crate) async fn publish(&self) -> Result<u64, ReplicateError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        // A connection lost since the last call fails the first command; the next reconnects.
        match notify::publish_barrier(&self.source, &self.channel, n).await {
            Err(err) if err.is_disconnect() => notify::publish_barrier(&self.source, &self.channel, n).await?,
            other => other?,
        }
        Ok(n)
    }
}

/// Reconnect attempts in a row before a lost connection stops the run, waiting 1, 2, 4, 8 and
/// 16 s (as sync mode does).
const RECONNECT_ATTEMPTS: u32 = 5;

/// The single task that writes to the target; see the module docs for why there is only one.
struct CopyLoop {
    copier: Copier,
    /// The target's database, which [`CopyLoop::kept`] is about.
    db: u64,
    addresses: LinkAddresses,
    shared: Arc<Shared>,
    options: ScanOptions,
    progress: watch::Sender<Progress>,
    /// The keys a `skip` run found on the target and kept, and the application has not written
    /// since; there while this process has seen every one (the run began with the backfill).
    /// A re-copy leaves them out. A resumed run cannot know them, so its re-copy skips every key
    /// the target has.
    kept: Option<KeptKeys>,
    started: Instant,
}

/// What the copy loop carries from one turn to the next.
struct Turns {
    /// As far as the batches written so far go.
    state: Checkpoint,
    /// Where the next batch's pass step comes from: ahead of `state` by the batches in flight.
    ahead: VecDeque<Pass>,
    settled: Option<Settled>,
    /// Formed, not read yet.
    unread: Option<Batch>,
    /// Read, not written yet.
    read: Option<(Batch, Read)>,
    flush: FlushWatch,
    /// A source flush seen, and the target not flushed yet.
    flush_pending: bool,
    /// The target's `run_id`, which changes when it restarts or another server takes its place.
    target_run: Option<String>,
    last_flush_check: Instant,
    seen_barrier: u64,
    pass_started: Instant,
    snapshot: Progress,
}

impl Turns {
    /// After a lost connection: the batches not written yet are dropped, their dirty keys go
    /// back to the dirty set, and their pass steps are formed again.
    fn drop_in_flight(&mut self, shared: &Shared) {
        let (unread, read) = (self.unread.take(), self.read.take());
        let batches = unread.iter().chain(read.as_ref().map(|(batch, _)| batch));
        shared.dirty().requeue(batches.flat_map(|batch| batch.keys[..batch.dirty].iter().map(|(key, _)| key)));
        self.ahead = self.state.passes.clone();
    }
}

/// Where the value links go, to open them again after a lost connection.
struct LinkAddresses {
    source: Address,
    target: Address,
}

impl LinkAddresses {
    async fn connect(&self) -> Result<ValueLinks, ReplicateError> {
        Ok(ValueLinks {
            dumps: self.source.connect().await?,
            late_dumps: self.source.connect().await?,
            restores: self.target.connect().await?,
        })
    }
}

/// The raw connections values travel over, one per stage that uses it at the same time as the
/// others: the read stage's DUMPs, the write stage's (what a batch's budget left for later),
/// and the RESTOREs.
struct ValueLinks {
    dumps: Link,
    late_dumps: Link,
    restores: Link,
}

/// One batch on its way through the pipeline: the keys it copies, and what applying it means for
/// the checkpoint and for [`ScanReplicator::caught_up`].
struct Batch {
    /// The notification barrier read before the batch was formed.
    barrier: u64,
    /// The latest barrier every key notified before which is on the target once this batch
    /// is (see [`super::dirty`]).
    passes: Option<u64>,
    /// Keys to copy, each with its policy: the dirty keys first (replaced, unless a `fail` or
    /// `skip` backfill has not settled them yet), then the keys a SCAN step of the source found
    /// (under the pass's policy, unless [`Settled`] decides).
    keys: Vec<(Key, ReplacePolicy)>,
    /// How many of `keys` came from the dirty set.
    dirty: usize,
    /// Target keys a prune step found missing on the source.
    stale: Vec<Key>,
    /// The pass step the batch carries and the cursor after it (0: the pass is complete).
    step: Option<(Pass, u64)>,
    /// Fingerprints this batch added to [`Settled`], taken out again if it is dropped unwritten.
    settled: Vec<u64>,
}

impl CopyLoop {
    async fn run(self, checkpoint: Checkpoint, links: ValueLinks) -> Result<(), ReplicateError> {
        let result = self.run_inner(checkpoint, links).await;
        if let Err(err) = &result {
            warn!(error = %err, "scan replication stopped");
        }
        result
    }

    /// Turns the pipeline until an error. A lost connection is ridden out in place, outside a
    /// `fail` or `skip` backfill: the batches not written yet are dropped, their dirty keys go
    /// back to the dirty set and their pass steps are formed again, and the value links are
    /// opened again (the command connections reconnect by themselves). Nothing was missed, so
    /// no full pass follows. During a `fail` or `skip` backfill the run stops instead: whether a
    /// half-written batch's keys were ours or the target's own could no longer be told.
    async fn run_inner(&self, state: Checkpoint, mut links: ValueLinks) -> Result<(), ReplicateError> {
        let mut turns = Turns {
            flush: FlushWatch::start(&self.copier.source).await?,
            flush_pending: false,
            target_run: run_id(&self.copier.target).await?,
            last_flush_check: Instant::now(),
            seen_barrier: 0,
            pass_started: Instant::now(),
            snapshot: self.progress.borrow().clone(),
            ahead: state.passes.clone(),
            settled: self.tracked(&state.passes).then(Settled::default),
            state,
            unread: None,
            read: None,
        };
        let mut attempts = 0;
        loop {
            match self.turn(&mut turns, &mut links).await {
                Ok(()) => attempts = 0,
                Err(err) if err.is_disconnect() && turns.settled.is_none() => {
                    turns.drop_in_flight(&self.shared);
                    self.snapshot_behind(&mut turns.snapshot);
                    links = self.reconnect(err, &mut attempts).await?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Whether the current pass is a `fail` or `skip` backfill, which tracks what it settled.
    fn tracked(&self, passes: &VecDeque<Pass>) -> bool {
        self.options.replace != ReplacePolicy::Replace && matches!(passes.front(), Some(Pass::Backfill { .. }))
    }

    /// Lag keeps counting while the links are down.
    fn snapshot_behind(&self, snapshot: &mut Progress) {
        snapshot.behind_since.get_or_insert_with(Instant::now);
        self.progress.send_replace(snapshot.clone());
    }

    /// Waits 1, 2, 4, 8 and 16 s, opening the value links after each wait, until they open; the
    /// last error once `attempts` (counted across calls until a turn succeeds) runs out.
    async fn reconnect(&self, mut err: ReplicateError, attempts: &mut u32) -> Result<ValueLinks, ReplicateError> {
        while *attempts < RECONNECT_ATTEMPTS {
            let wait = Duration::from_secs(1 << *attempts);
            *attempts += 1;
            warn!(error = %err, retry_in = ?wait, attempt = *attempts, "scan replication lost a connection; reconnecting");
            tokio::time::sleep(wait).await;
            match self.addresses.connect().await {
                Ok(links) => return Ok(links),
                Err(next) if next.is_disconnect() => err = next,
                Err(next) => return Err(next),
            }
        }
        Err(err)
    }

    /// One turn: forms a batch, reads the one formed last turn and writes the one read last
    /// turn, so that three batches are in flight: while batch N is written to the target, batch
    /// N+1's values are read from the source and batch N+2 is formed. `state` moves only as
    /// batches are written; `ahead` is where the next batch is formed from.
    async fn turn(&self, t: &mut Turns, links: &mut ValueLinks) -> Result<(), ReplicateError> {
        if let Some(err) = self.shared.take_failure() {
            return Err(err);
        }
        let source = &self.copier.source;
        // Read the barrier first: everything notified before it is in the dirty set now.
        let barrier = self.shared.barrier();
        let mut restart = false;
        if barrier != t.seen_barrier || t.last_flush_check.elapsed() >= self.options.flush_check {
            t.last_flush_check = Instant::now();
            t.seen_barrier = barrier;
            // A flush seen is pending until the target is flushed too: the watch will not see it
            // again if that fails and the loop carries on after reconnecting.
            t.flush_pending |= t.flush.flushed(source).await?;
            if t.flush_pending {
                if self.options.replace != ReplacePolicy::Replace {
                    let evidence = "its FLUSHDB and FLUSHALL call counts changed, or it emptied; \
                                    CONFIG RESETSTAT looks the same";
                    return Err(ReplicateError::SourceFlushed {
                        server: source.label().clone(),
                        evidence: evidence.to_owned(),
                    });
                }
                warn!("source was flushed; flushing the target and restarting the backfill");
                self.copier.target.cmd::<()>("FLUSHDB", &cmd("FLUSHDB")).await?;
                t.flush_pending = false;
                self.shared.dirty().clear();
                t.state.passes.clear();
                t.state.passes.push_back(Pass::Recopy { cursor: 0 });
                t.snapshot.flushes += 1;
                restart = true;
            }
            // A target that restarted (or failed over to a replica) may have lost what was copied
            // to it, and nothing else would say so now that lost connections are ridden out.
            let run = run_id(&self.copier.target).await?;
            if t.target_run.is_some() && run.is_some() && t.target_run != run {
                warn!("the target restarted or failed over and may have lost keys; queueing a full re-copy");
                t.state.queue_full_pass(self.options.replace == ReplacePolicy::Replace);
                t.snapshot.resyncs += 1;
                restart = true;
            }
            t.target_run = run.or(t.target_run.take());
        }
        let overflowed = self.shared.dirty().take_overflow();
        if overflowed || self.shared.take_resync() {
            warn!(overflowed, "notifications may have been lost; queueing a full re-copy (and prune, under replace)");
            t.state.queue_full_pass(self.options.replace == ReplacePolicy::Replace);
            t.snapshot.resyncs += 1;
            restart = true;
        }
        if restart {
            // The batches in flight are dropped unwritten and their pass steps redone: the full
            // pass now queued copies their keys again (after a flush, into an emptied target).
            if let Some(settled) = &mut t.settled {
                for batch in t.unread.iter().chain(t.read.iter().map(|(batch, _)| batch)) {
                    settled.forget(&batch.settled);
                }
            }
            (t.unread, t.read) = (None, None);
            t.ahead = t.state.passes.clone();
        }
        if !self.tracked(&t.state.passes) {
            t.settled = None;
        }

        let pass = t.ahead.front().copied();
        if pass.is_some_and(pass_is_starting) {
            t.pass_started = Instant::now();
            t.state.total = source.cmd("DBSIZE", &cmd("DBSIZE")).await?;
        }
        // Live changes first, so lag stays low during a long backfill. `take` removes the keys
        // from the dirty set before anything of them is read (the ordering the proof needs);
        // from here on they are in a batch, so a failure below cannot lose them.
        // A barrier passed by this take is on the target once the batch formed last is written.
        let (dirty, passed) = {
            let mut set = self.shared.dirty();
            (set.take(self.options.batch), set.passed_barrier())
        };
        if pass.is_none() && dirty.is_empty() && t.unread.is_none() && t.read.is_none() {
            self.publish(&mut t.snapshot, &t.state, barrier, passed, t.pass_started, 0);
            let _ = tokio::time::timeout(self.options.flush_check, self.shared.wake.notified()).await;
            return Ok(());
        }
        let mut formed = (pass.is_some() || !dirty.is_empty()).then(|| self.form(barrier, dirty, t.settled.as_mut()));
        let last_formed = formed.as_mut().or(t.unread.as_mut()).or(t.read.as_mut().map(|(batch, _)| batch));
        if let Some(batch) = last_formed {
            batch.passes = batch.passes.max(passed);
        }
        let to_read = t.unread.take();
        let (mut to_write, read) = t.read.take().unzip();
        if let (Some(batch), Some(kept)) = (&mut to_write, &self.kept) {
            // Decided now, not when the batch was formed: every batch written before this one
            // has recorded what it kept.
            if matches!(batch.step, Some((Pass::Recopy { .. }, _))) {
                for (key, policy) in &mut batch.keys[batch.dirty..] {
                    if kept.contains(self.db, key) {
                        *policy = ReplacePolicy::Skip;
                    }
                }
            }
        }
        let (copier, settled) = (&self.copier, t.settled.as_mut());
        let kept_known = self.options.replace == ReplacePolicy::Replace || self.kept.is_some();
        let ValueLinks { dumps, late_dumps, restores } = links;
        let outcome = tokio::try_join!(
            async {
                match (&mut formed, pass) {
                    (Some(batch), Some(pass)) => self.step(batch, pass, settled, kept_known).await,
                    _ => Ok(()),
                }
            },
            async {
                match &to_read {
                    Some(batch) => copier.read(dumps, &batch.keys).await.map(Some),
                    None => Ok(None),
                }
            },
            async {
                match (&to_write, read) {
                    (Some(batch), Some(read)) => {
                        copier.write(restores, late_dumps, &batch.keys, read, &batch.stale).await.map(Some)
                    }
                    _ => Ok(None),
                }
            },
        );
        let (_, was_read, written) = match outcome {
            Ok(done) => done,
            Err(err) => {
                // None of these batches is known to be on the target (the one being written may
                // be in part). Their dirty keys go back, to be taken by batches formed later,
                // whose reads follow their forming, so the argument in the module docs holds.
                let batches = formed.iter().chain(&to_read).chain(&to_write);
                let keys = batches.flat_map(|batch| batch.keys[..batch.dirty].iter().map(|(key, _)| key));
                self.shared.dirty().requeue(keys);
                return Err(err);
            }
        };
        if let Some((_, next)) = formed.as_ref().and_then(|batch| batch.step) {
            advance(&mut t.ahead, next);
        }
        (t.unread, t.read) = (formed, to_read.zip(was_read));
        if let (Some(batch), Some(stats)) = (to_write, written) {
            if let Some((pass, next)) = batch.step
                && advance(&mut t.state.passes, next)
            {
                info!(?pass, "pass complete");
            }
            if let Some(kept) = &self.kept {
                // The application wrote these since: the source's value is on the target now.
                for (key, _) in batch.keys[..batch.dirty].iter().filter(|(_, p)| *p == ReplacePolicy::Replace) {
                    kept.remove(self.db, key);
                }
                for key in &stats.kept {
                    kept.insert(self.db, key);
                }
            }
            t.state.copied += stats.copied;
            t.state.deleted += stats.deleted;
            t.state.skipped += stats.skipped;
            let in_flight = t.unread.iter().map(|b| b.dirty).chain(t.read.iter().map(|(b, _)| b.dirty)).sum();
            self.publish(&mut t.snapshot, &t.state, batch.barrier, batch.passes, t.pass_started, in_flight);
        }
        Ok(())
    }

    /// Starts a batch with the keys taken from the dirty set; `settled` is there while a `fail`
    /// or `skip` backfill runs.
    fn form(&self, barrier: u64, dirty: Vec<Key>, settled: Option<&mut Settled>) -> Batch {
        let mut batch = Batch {
            barrier,
            passes: None,
            dirty: dirty.len(),
            keys: dirty.into_iter().map(|key| (key, ReplacePolicy::Replace)).collect(),
            stale: Vec::new(),
            step: None,
            settled: Vec::new(),
        };
        if let Some(settled) = settled {
            // A dirty key the backfill has not settled yet may be one the target had before, so
            // it is held to the backfill's policy like a key SCAN finds; once settled it is ours.
            // First, so that a SCAN copy of a key this batch also takes as dirty counts as ours.
            for (key, policy) in &mut batch.keys {
                if settled.settle(key, &mut batch.settled) {
                    *policy = self.options.replace;
                }
            }
        }
        batch
    }

    /// Adds one step of the current pass to a batch.
    /// `kept_known`: whether a re-copy may replace, the keys `skip` kept being known (always,
    /// under `replace`).
    async fn step(
        &self,
        batch: &mut Batch,
        pass: Pass,
        settled: Option<&mut Settled>,
        kept_known: bool,
    ) -> Result<(), ReplicateError> {
        let (source, target) = (&self.copier.source, &self.copier.target);
        match pass {
            Pass::Backfill { cursor } | Pass::Recopy { cursor } => {
                let backfill = matches!(pass, Pass::Backfill { .. });
                let policy = match (backfill, kept_known) {
                    (true, _) => self.options.replace,
                    // The source is the truth for every key but those `skip` kept, which the
                    // write stage exempts; without knowing them, no key the target has is touched.
                    (false, true) => ReplacePolicy::Replace,
                    (false, false) => ReplacePolicy::Skip,
                };
                let (next, found) = keys::scan(source, cursor, self.options.batch).await?;
                match settled.filter(|_| backfill) {
                    Some(settled) => {
                        let found = found.into_iter().filter_map(|key| settled.found(key, policy, &mut batch.settled));
                        batch.keys.extend(found);
                    }
                    None => batch.keys.extend(found.into_iter().map(|key| (key, policy))),
                }
                batch.step = Some((pass, next));
            }
            Pass::Prune { cursor } => {
                let (next, found) = keys::scan(target, cursor, self.options.batch).await?;
                let on_source = keys::exists(source, &found).await?;
                batch.stale = found
                    .into_iter()
                    .zip(on_source)
                    .filter(|(key, on)| !on && !super::eden_own(key))
                    .map(|(key, _)| key)
                    .collect();
                batch.step = Some((pass, next));
            }
        }
        Ok(())
    }

    /// Publishes progress as of the last batch written; `in_flight` dirty keys were taken into
    /// batches not written yet and still count as waiting.
    fn publish(
        &self,
        snapshot: &mut Progress,
        state: &Checkpoint,
        barrier: u64,
        passed: Option<u64>,
        pass_started: Instant,
        in_flight: usize,
    ) {
        let dirty = self.shared.dirty();
        let pass_age = if state.passes.is_empty() { Duration::ZERO } else { pass_started.elapsed() };
        let lag = dirty.oldest_age().max(pass_age);
        snapshot.lag_ms = lag.as_millis() as u64;
        snapshot.behind_since = (!lag.is_zero()).then(|| Instant::now() - lag);
        snapshot.dirty = dirty.len() + in_flight;
        drop(dirty);
        snapshot.rate = state.copied as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        snapshot.barrier = barrier;
        snapshot.written_through = snapshot.written_through.max(passed.unwrap_or(0));
        snapshot.checkpoint = state.clone();
        self.progress.send_replace(snapshot.clone());
    }
}

/// The keys a `fail` or `skip` backfill has settled on the target so far (see the module docs),
/// kept only while that backfill runs.
///
/// Each key is kept as a fingerprint, not as the key itself ([`Fingerprints`] gives the cost,
/// freed when the backfill pass ends). A collision makes a key not yet visited look settled;
/// with n keys that happens in a whole backfill with probability below n²/2⁶⁵. Under `fail` the key is then replaced rather than checked: still copied exactly, and it only
/// matters if that very key was also on the target before, which the run would otherwise have
/// stopped on. Under `skip` the key is left out of the backfill: missing on the target until its
/// next write, which the verifier run before cutover reports.
#[derive(Default)]
struct Settled {
    keys: Fingerprints,
}

impl Settled {
    /// Records `key` as settled; when it was not yet, returns true and adds its fingerprint to
    /// `added`.
    fn settle(&mut self, key: &[u8], added: &mut Vec<u64>) -> bool {
        self.keys.insert(key).map(|fingerprint| added.push(fingerprint)).is_some()
    }

    /// What the backfill does with a key SCAN found, under the pass's `policy` (`fail` or
    /// `skip`): `None` when the key is already settled and there is nothing left to do.
    fn found(&mut self, key: Key, policy: ReplacePolicy, added: &mut Vec<u64>) -> Option<(Key, ReplacePolicy)> {
        if self.settle(&key, added) {
            Some((key, policy))
        } else if policy == ReplacePolicy::Fail {
            Some((key, ReplacePolicy::Replace))
        } else {
            None
        }
    }

    /// Takes back the fingerprints a batch dropped unwritten had added.
    fn forget(&mut self, added: &[u64]) {
        for fingerprint in added {
            self.keys.set.remove(fingerprint);
        }
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

/// A server's `run_id` from `INFO server`; `None` when it does not say (a lost connection is
/// an error, so that the caller reconnects and asks again).
async fn run_id(server: &Endpoint) -> Result<Option<String>, ReplicateError> {
    match server.cmd::<String>("INFO server", cmd("INFO").arg("server")).await {
        Ok(info) => Ok(info.lines().find_map(|line| line.strip_prefix("run_id:")).map(|id| id.trim().to_string())),
        Err(err) if err.is_disconnect() => Err(err),
        Err(_refused) => Ok(None),
    }
}

/// Moves the current pass to cursor `next`, or off the queue when `next` is 0 (the SCAN is
/// complete); returns whether the pass completed.
fn advance(passes: &mut VecDeque<Pass>, next: u64) -> bool {
    match (next, passes.front_mut()) {
        (0, _) => passes.pop_front().is_some(),
        (next, Some(Pass::Backfill { cursor } | Pass::Recopy { cursor } | Pass::Prune { cursor })) => {
            *cursor = next;
            false
        }
        (_, None) => false,
    }
}

fn pass_is_starting(pass: Pass) -> bool {
    matches!(pass, Pass::Backfill { cursor: 0 } | Pass::Recopy { cursor: 0 } | Pass::Prune { cursor: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key seen again, whether first taken as dirty or found by an earlier SCAN step (SCAN
    /// returns some keys twice), is ours under `fail` and needs nothing more under `skip`; a batch
    /// dropped unwritten gives its keys back.
    #[test]
    fn settled_keys_are_not_checked_again() {
        for policy in [ReplacePolicy::Fail, ReplacePolicy::Skip] {
            let again = (policy == ReplacePolicy::Fail).then(|| (b"k".to_vec(), ReplacePolicy::Replace));
            let mut settled = Settled::default();
            let (mut first, mut second) = (Vec::new(), Vec::new());
            assert!(settled.settle(b"k", &mut first), "taken as dirty");
            assert_eq!(settled.found(b"k".to_vec(), policy, &mut second), again);
            assert_eq!(settled.found(b"new".to_vec(), policy, &mut second), Some((b"new".to_vec(), policy)));
            assert_eq!(settled.found(b"new".to_vec(), policy, &mut second), again.map(|(_, p)| (b"new".to_vec(), p)));
            assert_eq!((first.len(), second.len()), (1, 1), "only new keys are recorded for an undo");

            settled.forget(&second);
            assert_eq!(settled.found(b"new".to_vec(), policy, &mut Vec::new()), Some((b"new".to_vec(), policy)));
            settled.forget(&first);
            assert_eq!(settled.found(b"k".to_vec(), policy, &mut Vec::new()), Some((b"k".to_vec(), policy)));
        }
    }
}
