//! Keyspace notifications from the source: turning them on, and the subscriber task that turns
//! each one into a dirty key.
//!
//! The subscriber listens to `__keyevent@<db>__:*` (every event carries the key as its payload)
//! and to a private barrier channel. Pub/Sub delivers one connection's messages in order, so when
//! a barrier message arrives every notification published before it has already been recorded —
//! that is how [`super::ScanReplicator::caught_up`] knows it has seen all writes made before it
//! was called. If the subscription drops, notifications may have been lost: the task reconnects,
//! resubscribes, turns notifications on again (a restarted server forgets a CONFIG SET) and only
//! then asks for a full rescan, so the rescan starts once the new subscription hears every
//! write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use redis::{Value, cmd};
use tokio::sync::{Notify, oneshot};
use tracing::{info, warn};

use super::ReplicateError;
use super::dirty::DirtySet;
use super::endpoint::Endpoint;

/// Event classes scan mode needs: `E` (keyevent channels) and `A` (every data type, expired,
/// evicted).
const NEEDED: [char; 2] = ['E', 'A'];
/// What `A` stands for, in case a server lists the classes one by one.
const ALL_CLASSES: &str = "g$lshzxet";

/// State the subscriber task shares with the copier.
pub(crate) struct Shared {
    dirty: Mutex<DirtySet>,
    /// Wakes the copier when a key becomes dirty or a rescan is requested.
    pub(crate) wake: Notify,
    resync: AtomicBool,
    barrier: AtomicU64,
    /// Why the subscriber can no longer hear the source's writes, for the copier to stop with.
    failure: Mutex<Option<ReplicateError>>,
}

impl Shared {
    pub(crate) fn new(dirty_capacity: usize) -> Self {
        Shared {
            dirty: Mutex::new(DirtySet::new(dirty_capacity)),
            wake: Notify::new(),
            resync: AtomicBool::new(false),
            barrier: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    pub(crate) fn dirty(&self) -> MutexGuard<'_, DirtySet> {
        self.dirty.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The subscriber's failure, if it has one: replication cannot go on without notifications.
    pub(crate) fn take_failure(&self) -> Option<ReplicateError> {
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Whether a full rescan was requested since the last call (resetting the request).
    pub(crate) fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// The highest barrier seen; all notifications published before it are in the dirty set or
    /// already copied.
    pub(crate) fn barrier(&self) -> u64 {
        self.barrier.load(Ordering::Acquire)
    }
}

/// Makes sure the source publishes the events scan mode needs, enabling missing classes with
/// CONFIG SET. Returns `false` when CONFIG is refused, so the caller must probe instead.
pub(crate) async fn enable(source: &Endpoint) -> Result<bool, ReplicateError> {
    let reply =
        match source.cmd::<Vec<String>>("CONFIG GET", cmd("CONFIG").arg("GET").arg("notify-keyspace-events")).await {
            Ok(reply) => reply,
            Err(err) if err.is_disconnect() => return Err(err),
            Err(_refused) => return Ok(false),
        };
    let current = reply.get(1).cloned().unwrap_or_default();
    let has = |flag: char| current.contains(flag) || (flag == 'A' && ALL_CLASSES.chars().all(|c| current.contains(c)));
    let missing: String = NEEDED.into_iter().filter(|flag| !has(*flag)).collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let wanted = format!("{current}{missing}");
    source.cmd::<()>("CONFIG SET", cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&wanted)).await.map_err(
        |err| ReplicateError::NotificationsOff {
            server: source.label().clone(),
            detail: format!("notify-keyspace-events is {current:?}, CONFIG SET to {wanted:?} failed: {err}"),
        },
    )?;
    info!(server = %source.label(), from = %current, to = %wanted, "enabled keyspace notifications");
    Ok(true)
}

/// The subscriber: `ready` gets the first subscription's outcome; afterwards the task runs until
/// aborted, reconnecting (and requesting a rescan) whenever the subscription drops.
pub(crate) async fn subscriber(
    source: Endpoint,
    barrier_channel: String,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<(), ReplicateError>>,
) {
    let label = source.label().clone();
    let mut ready = Some(ready);
    loop {
        match subscribe(&source, &barrier_channel).await {
            Ok(pubsub) => {
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Ok(()));
                    }
                    None => {
                        // A server that restarted has forgotten the CONFIG SET that turned them
                        // on. Where CONFIG is refused, the provider's settings survive a restart.
                        match enable(&source).await {
                            Ok(_) => {}
                            Err(err) if err.is_disconnect() => {
                                warn!(server = %label, error = %err, "lost the source again; resubscribing in 1s");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                            Err(err) => {
                                warn!(server = %label, error = %err, "cannot turn keyspace notifications back on");
                                *shared.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err);
                                shared.wake.notify_one();
                                return;
                            }
                        }
                        warn!(server = %label, "resubscribed to keyspace notifications; rescanning because some may have been lost");
                        shared.resync.store(true, Ordering::Release);
                        shared.wake.notify_one();
                    }
                }
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    if msg.get_channel_name() == barrier_channel {
                        let n = std::str::from_utf8(msg.get_payload_bytes()).ok().and_then(|s| s.parse().ok());
                        shared.dirty().barrier(n.unwrap_or(0));
                        shared.barrier.fetch_max(n.unwrap_or(0), Ordering::AcqRel);
                    } else {
                        shared.dirty().insert(msg.get_payload_bytes());
                    }
                    shared.wake.notify_one();
                }
                warn!(server = %label, "keyspace notification connection dropped; reconnecting, then rescanning");
            }
            Err(err) => match ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(err));
                    return;
                }
                None => {
                    warn!(server = %label, error = %err, "cannot resubscribe to keyspace notifications; retrying in 1s")
                }
            },
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn subscribe(source: &Endpoint, barrier_channel: &str) -> Result<redis::aio::PubSub, ReplicateError> {
    let mut pubsub = source.pubsub().await?;
    pubsub.psubscribe(format!("__keyevent@{}__:*", source.db())).await.map_err(|e| source.error("PSUBSCRIBE", e))?;
    pubsub.subscribe(barrier_channel).await.map_err(|e| source.error("SUBSCRIBE", e))?;
    Ok(pubsub)
}

/// Publishes barrier `n` on the source; see the module docs.
pub(crate) async fn publish_barrier(source: &Endpoint, channel: &str, n: u64) -> Result<(), ReplicateError> {
    source.cmd::<Value>("PUBLISH", cmd("PUBLISH").arg(channel).arg(n)).await.map(drop)
}

/// A channel name no other client uses.
pub(crate) fn barrier_channel() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("__eden_barrier__:{}:{nanos}", std::process::id())
}
