//! Windows of recent ids (a broker's duplicate window, a subscription's
//! acked ids): kept in tables of at most [`SLICE`] entries, oldest first.
//!
//! One table for the whole window doubles in a single resize when it fills,
//! holding the old and the new table for the moment of the copy: at
//! 250 000 ids of 24 bytes that is ~20 MB at once. Here no table grows past
//! one slice, and forgetting drops whole tables once their newest entry is
//! older than the window (no sweep over every entry, no tombstones).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use nohash_hasher::{BuildNoHashHasher, IsEnabled};

/// Entries a table holds before the next one starts: a table of 2^17
/// buckets takes 7/8 of that before it would grow.
pub(crate) const SLICE: usize = 114_688;

/// Recent keys (already hashes: they index the tables as they are), each
/// with a value, and when it was added.
pub(crate) struct Recent<K, V> {
    slices: VecDeque<Slice<K, V>>,
}

struct Slice<K, V> {
    map: HashMap<K, V, BuildNoHashHasher<K>>,
    /// When its newest entry was added (ms since the epoch).
    newest_ms: u64,
}

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Recent { slices: VecDeque::new() }
    }
}

impl<K: Hash + Eq + IsEnabled, V> Recent<K, V> {
    /// Adds `key` (added at `at_ms`); a repeat within one table replaces
    /// the value, across tables the newest is found first.
    pub(crate) fn insert(&mut self, key: K, value: V, at_ms: u64) {
        if self.slices.back().is_none_or(|s| s.map.len() >= SLICE) {
            self.slices.push_back(Slice { map: HashMap::default(), newest_ms: 0 });
        }
        let slice = self.slices.back_mut().expect("a slice was just ensured");
        slice.map.insert(key, value);
        slice.newest_ms = slice.newest_ms.max(at_ms);
    }

    /// The newest value of `key` that `accept` takes.
    pub(crate) fn find(&self, key: &K, accept: impl Fn(&V) -> bool) -> Option<&V> {
        self.slices.iter().rev().filter_map(|s| s.map.get(key)).find(|v| accept(v))
    }

    /// Drops the tables whose every entry was added before `oldest_ms`.
    pub(crate) fn forget_before(&mut self, oldest_ms: u64) {
        while self.slices.front().is_some_and(|s| s.newest_ms < oldest_ms) {
            self.slices.pop_front();
        }
    }

    /// Entries held (a key added twice in different tables counts twice).
    pub(crate) fn len(&self) -> usize {
        self.slices.iter().map(|s| s.map.len()).sum()
    }

    /// Tables held.
    #[cfg(test)]
    fn tables(&self) -> usize {
        self.slices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_accepted_value_is_found() {
        let mut r: Recent<u64, u64> = Recent::default();
        r.insert(1, 10, 5);
        assert_eq!(r.find(&1, |_| true), Some(&10));
        assert_eq!(r.find(&1, |v| *v > 10), None, "a value the caller rejects is no hit");
        assert_eq!(r.find(&2, |_| true), None);
    }

    #[test]
    fn tables_hold_a_slice_each_and_go_whole_once_past_the_window() {
        let mut r: Recent<u64, u64> = Recent::default();
        let n = 2 * SLICE as u64 + 10;
        for i in 0..n {
            r.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i, i / 1000);
        }
        assert_eq!(r.tables(), 3);
        assert!(r.slices.iter().all(|s| s.map.capacity() < 2 * SLICE), "no table grew past a slice");
        // Its newest entry is still inside a window starting at its time.
        let first_newest = r.slices[0].newest_ms;
        r.forget_before(first_newest);
        assert_eq!(r.len(), n as usize);
        r.forget_before(first_newest + 1);
        assert_eq!(r.len(), SLICE + 10);
        assert_eq!(r.find(&0, |_| true), None, "the oldest table went");
        let last = n - 1;
        assert_eq!(r.find(&last.wrapping_mul(0x9e37_79b9_7f4a_7c15), |_| true), Some(&last));
    }
}
