//! Keys a notification named and that still need a re-copy, oldest first, with a hard cap.
//!
//! The set deduplicates (a hot key notified a thousand times is copied once per round) and the
//! queue keeps first-notified order so lag — the age of the oldest waiting key — is O(1). When
//! the cap is reached the set is dropped and the caller must rescan everything: memory stays
//! bounded and no change is lost.
//!
//! It also tells when every key notified before a barrier has been taken: each key queued gets
//! a place (1, 2, …, counted over the set's life), a barrier is recorded with the last place
//! given when it arrived, and once as many keys were taken as that place, every key notified
//! before the barrier is in a batch (a key already waiting when notified again keeps its
//! earlier place; a key taken before is queued anew). The freshness beats rest on this (DESIGN
//! §9, "Freshness").

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::Key;

pub(crate) struct DirtySet {
    members: HashSet<Key>,
    queue: VecDeque<(Instant, Key)>,
    capacity: usize,
    overflowed: bool,
    /// Keys queued and keys taken, over the set's life.
    queued: u64,
    taken: u64,
    /// Barriers not passed yet, each with the last place given when it arrived; oldest first.
    barriers: VecDeque<(u64, u64)>,
}

/// Barriers kept waiting at most: a copier that falls this far behind passes none of the older
/// ones, which only delays what waits on them.
const BARRIERS_KEPT: usize = 1024;

impl DirtySet {
    pub(crate) fn new(capacity: usize) -> Self {
        DirtySet {
            members: HashSet::new(),
            queue: VecDeque::new(),
            capacity,
            overflowed: false,
            queued: 0,
            taken: 0,
            barriers: VecDeque::new(),
        }
    }

    /// Marks a key dirty; a key already waiting keeps its original time.
    pub(crate) fn insert(&mut self, key: &[u8]) {
        if self.members.contains(key) {
            return;
        }
        if self.members.len() >= self.capacity {
            self.clear();
            self.overflowed = true;
            return;
        }
        self.members.insert(key.to_vec());
        self.queue.push_back((Instant::now(), key.to_vec()));
        self.queued += 1;
    }

    /// Records barrier `n`, which arrived after every notification inserted so far.
    pub(crate) fn barrier(&mut self, n: u64) {
        if self.barriers.len() == BARRIERS_KEPT {
            self.barriers.pop_front();
        }
        self.barriers.push_back((n, self.queued));
    }

    /// The latest barrier every key notified before which has been taken, if one was passed
    /// since the last call.
    pub(crate) fn passed_barrier(&mut self) -> Option<u64> {
        let mut passed = None;
        while let Some(&(n, place)) = self.barriers.front()
            && place <= self.taken
        {
            passed = Some(n);
            self.barriers.pop_front();
        }
        passed
    }

    /// Puts back keys taken into batches that were never written. They queue behind keys
    /// notified later, so no barrier seen so far can be passed on their account: those are
    /// forgotten.
    pub(crate) fn requeue<'a>(&mut self, keys: impl IntoIterator<Item = &'a Key>) {
        keys.into_iter().for_each(|key| self.insert(key));
        self.barriers.clear();
    }

    /// Removes and returns up to `n` keys, oldest first.
    pub(crate) fn take(&mut self, n: usize) -> Vec<Key> {
        let n = n.min(self.queue.len());
        self.taken += n as u64;
        self.queue
            .drain(..n)
            .map(|(_, key)| {
                self.members.remove(&key);
                key
            })
            .collect()
    }

    /// Drops every key (the caller rescans everything), and with them every barrier waiting:
    /// none is passed on the strength of keys never copied.
    pub(crate) fn clear(&mut self) {
        self.members.clear();
        self.taken += self.queue.len() as u64;
        self.queue.clear();
        self.barriers.clear();
    }

    /// Whether the set overflowed since the last call (resetting the flag).
    pub(crate) fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.members.contains(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// How long the oldest waiting key has waited.
    pub(crate) fn oldest_age(&self) -> Duration {
        self.queue.front().map_or(Duration::ZERO, |(at, _)| at.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deduplicates_keeps_order_and_overflows_to_empty() {
        let mut dirty = DirtySet::new(3);
        for key in [b"a", b"b", b"a", b"c"] {
            dirty.insert(key);
        }
        assert_eq!(dirty.take(2), vec![b"a".to_vec(), b"b".to_vec()]);
        dirty.insert(b"a");
        dirty.insert(b"d");
        assert!(!dirty.take_overflow());
        dirty.insert(b"e");
        assert!(dirty.take_overflow());
        assert_eq!(dirty.len(), 0);
    }

    #[test]
    fn a_barrier_is_passed_once_every_key_notified_before_it_is_taken() {
        let mut dirty = DirtySet::new(100);
        for key in [b"a", b"b", b"c"] {
            dirty.insert(key);
        }
        dirty.barrier(1);
        dirty.insert(b"a"); // waiting already: keeps its place
        dirty.insert(b"d");
        dirty.barrier(2);
        assert_eq!(dirty.passed_barrier(), None);
        dirty.take(2);
        assert_eq!(dirty.passed_barrier(), None, "c was notified before 1 and waits");
        dirty.take(1);
        assert_eq!(dirty.passed_barrier(), Some(1));
        dirty.take(1);
        assert_eq!(dirty.passed_barrier(), Some(2));
        assert_eq!(dirty.passed_barrier(), None, "each once");

        // Keys notified again after they were taken queue anew, behind the barrier.
        dirty.insert(b"a");
        dirty.barrier(3);
        assert_eq!(dirty.passed_barrier(), None);
        dirty.take(10);
        assert_eq!(dirty.passed_barrier(), Some(3));
    }

    #[test]
    fn keys_put_back_or_dropped_pass_no_barrier_seen_before() {
        let mut dirty = DirtySet::new(100);
        dirty.insert(b"a");
        let taken = dirty.take(1);
        dirty.barrier(1);
        dirty.requeue(&taken);
        dirty.take(1);
        assert_eq!(dirty.passed_barrier(), None, "a was never written");
        dirty.insert(b"b");
        dirty.barrier(2);
        dirty.clear();
        assert_eq!(dirty.passed_barrier(), None, "b was dropped, not copied");
        dirty.barrier(3);
        assert_eq!(dirty.passed_barrier(), Some(3), "nothing notified since");
    }
}
