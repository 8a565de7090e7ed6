//! Keys a notification named and that still need a re-copy, oldest first, with a hard cap.
//!
//! The set deduplicates (a hot key notified a thousand times is copied once per round) and the
//! queue keeps first-notified order so lag — the age of the oldest waiting key — is O(1). When
//! the cap is reached the set is dropped and the caller must rescan everything: memory stays
//! bounded and no change is lost.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::Key;

pub(crate) struct DirtySet {
    members: HashSet<Key>,
    queue: VecDeque<(Instant, Key)>,
    capacity: usize,
    overflowed: bool,
}

impl DirtySet {
    pub(crate) fn new(capacity: usize) -> Self {
        DirtySet { members: HashSet::new(), queue: VecDeque::new(), capacity, overflowed: false }
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
    }

    /// Removes and returns up to `n` keys, oldest first.
    pub(crate) fn take(&mut self, n: usize) -> Vec<Key> {
        let n = n.min(self.queue.len());
        self.queue
            .drain(..n)
            .map(|(_, key)| {
                self.members.remove(&key);
                key
            })
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.members.clear();
        self.queue.clear();
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
}
