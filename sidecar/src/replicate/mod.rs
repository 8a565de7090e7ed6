//! The replication engine (`sync` and `scan` modes) and the verifier (DESIGN.md §5).
//!
//! [`Replicator`] is the one handle the operator and the CLI hold, whatever the mode: start
//! (with an optional [`Checkpoint`] from an earlier run), watch [`Progress`], wait until caught
//! up, stop. `sync` mode ([`SyncReplicator`], in [`sync`]) makes Eden a replica of the source:
//! the RDB snapshot, each value RESTOREd as encoded, then the command stream applied exactly
//! once.
//!
//! `scan` mode is for managed services that refuse PSYNC: [`ScanReplicator`] subscribes to the
//! source's keyspace notifications *first*, then backfills with SCAN, strings as GETRANGE/SET and
//! other values as DUMP/RESTORE (absolute TTLs), and re-copies every key a notification names. Because the subscription predates every
//! read, any write the backfill could have missed produces a notification that re-copies the key,
//! so the target converges exactly. [`Verifier`] compares the two servers key by key and is what
//! the operator and the CLI run before cutover.
//!
//! Rooms: [`endpoint`] (connections and error mapping), [`keys`] (SCAN and key inspection),
//! [`chunks`] (bounded-memory iteration over big collections), [`budget`] (the bytes one batch may
//! hold), [`copy`] (one batch of keys, source → target), [`streams`] (a big stream's groups and
//! pending entries), [`dirty`] (keys waiting for a re-copy), [`notify`] (keyspace notifications),
//! [`flush`] (FLUSHDB/FLUSHALL detection), [`freshness`] (the record sidecars read), [`kept`] (the keys `skip` kept), [`checkpoint`], [`progress`], [`scan`] (the replicator
//! loop), [`compare`] and [`verify`] (the verifier), [`pace`] (rate limiting), [`sync`] (the
//! replica), [`replicator`] (the handle over both).

mod budget;
mod checkpoint;
mod chunks;
mod compare;
mod copy;
mod dirty;
mod endpoint;
mod error;
mod flush;
mod freshness;
mod kept;
mod keys;
mod notify;
mod pace;
mod progress;
mod replicator;
mod scan;
mod streams;
mod sync;
mod verify;

pub use checkpoint::{Checkpoint, Pass, SyncPosition};
pub use copy::ReplacePolicy;
pub use error::ReplicateError;
pub use freshness::{BEAT_EVERY, FRESHNESS_KEY, FreshnessRecord, TRUSTED_FOR};
pub use kept::KeptKeys;
pub use keys::KeyType;
pub use pace::OpsLimits;
pub use progress::Progress;
pub use replicator::{Mode, Replicator, ReplicatorOptions};
pub use scan::{ScanOptions, ScanReplicator};
pub use sync::{EXPIRY_GRACE_MS, POSITION_KEY, SyncOptions, SyncReplicator};
pub use verify::{Difference, DifferenceKind, Verifier, VerifyOptions, VerifyReport};

/// A Redis key as raw bytes: keys are binary-safe and are never assumed to be UTF-8.
pub type Key = Vec<u8>;

/// Keys Eden itself keeps on the target ([`POSITION_KEY`], [`FRESHNESS_KEY`]): not the
/// source's data, so neither verified nor pruned.
pub(crate) fn eden_own(key: &[u8]) -> bool {
    key == POSITION_KEY.as_bytes() || key == FRESHNESS_KEY.as_bytes()
}
