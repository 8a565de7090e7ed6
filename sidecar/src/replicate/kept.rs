//! The keys `replace: skip` kept: the target had them when the copy reached them, so its value
//! stayed, on purpose, and the two servers may differ there until the application writes the
//! key again. The replicator records each one as it meets it; the verifier counts them apart
//! from differences, so that a `skip` migration can pass the verification its cutover waits for.
//!
//! Only the process that did the load (sync) or the backfill (scan) has met them: a replicator
//! resumed from a checkpoint has no record ([`crate::replicate::Replicator::kept_keys`] is
//! `None`), and its verifier reports such keys as differences.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A set of keys held as 64-bit SipHash fingerprints with a random seed (so key names cannot be
/// chosen to collide), whatever the keys' length: a hash set of `u64` costs 10 to 21 bytes per
/// key (buckets of 8 bytes plus a control byte, at most 7/8 full, doubling as it grows), about
/// 100 to 200 MB for 10 million keys. Two of n keys share a fingerprint with probability below
/// n²/2⁶⁵ (3·10⁻⁶ for 10 million keys).
#[derive(Default)]
pub(crate) struct Fingerprints {
    pub(crate) set: HashSet<u64>,
    hasher: RandomState,
}

impl Fingerprints {
    /// Adds `key`; its fingerprint when it was not there yet.
    pub(crate) fn insert<K: Hash + ?Sized>(&mut self, key: &K) -> Option<u64> {
        let fingerprint = self.hasher.hash_one(key);
        self.set.insert(fingerprint).then_some(fingerprint)
    }

    pub(crate) fn remove<K: Hash + ?Sized>(&mut self, key: &K) {
        self.set.remove(&self.hasher.hash_one(key));
    }

    pub(crate) fn contains<K: Hash + ?Sized>(&self, key: &K) -> bool {
        self.set.contains(&self.hasher.hash_one(key))
    }
}

/// The keys `skip` kept, by database: shared by the replicator that records them and the
/// verifiers that read them.
#[derive(Clone, Default)]
pub struct KeptKeys(Arc<Mutex<Fingerprints>>);

impl KeptKeys {
    pub(crate) fn insert(&self, db: u64, key: &[u8]) {
        self.set().insert(&(db, key));
    }

    /// The application wrote `key` on the source since, and its value was copied.
    pub(crate) fn remove(&self, db: u64, key: &[u8]) {
        self.set().remove(&(db, key));
    }

    /// Whether `skip` kept the target's `key` in database `db`. A key that merely shares a
    /// fingerprint with a kept one (see [`Fingerprints`] for the odds) is taken for kept too.
    pub fn contains(&self, db: u64, key: &[u8]) -> bool {
        self.set().contains(&(db, key))
    }

    pub fn len(&self) -> usize {
        self.set().set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set(&self) -> MutexGuard<'_, Fingerprints> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for KeptKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptKeys").field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_kept_per_database_until_removed() {
        let kept = KeptKeys::default();
        kept.insert(0, b"user:1");
        let verifier_view = kept.clone();
        assert!(verifier_view.contains(0, b"user:1"));
        assert!(!verifier_view.contains(1, b"user:1"), "another database's key of the same name");
        assert!(!verifier_view.contains(0, b"user:2"));
        kept.remove(0, b"user:1");
        assert!(!verifier_view.contains(0, b"user:1"));
        assert!(verifier_view.is_empty());
    }
}
