//! Windows of recent ids (a broker's duplicate window, a subscription's
//! acked ids): kept in tables of at most [`SLICE`] entries, each spanning
//! at most an eighth of the window ([`span_of`]), oldest first.
//!
//! One table for the whole window doubles in a single resize when it fills,
//! holding the old and the new table for the moment of the copy: at
//! 250 000 ids of 24 bytes that is ~20 MB at once. Here no table grows past
//! one slice, and forgetting drops whole tables once their newest entry is
//! older than the window (no sweep over every entry, no tombstones). So an
//! entry may outlive the window by a table's span: callers that need the
//! window exact compare times on a hit.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use nohash_hasher::{BuildNoHashHasher, IsEnabled};

/// Entries a table holds before the next one starts: a table of 2^17
/// buckets takes 7/8 of that before it would grow.
pub(crate) const SLICE: usize = 114_688;

/// The longest time one table spans for a window: an eighth of it, at
/// least a second (so a window's ids sit in about nine tables at most,
/// besides those that filled up).
pub(crate) fn span_of(window: Duration) -> u64 {
    (window.as_millis() as u64 / 8).max(1000)
}

/// Recent keys (already hashes: they index the tables as they are), each
/// with a value, and when it was added.
pub(crate) struct Recent<K, V> {
    slices: VecDeque<Slice<K, V>>,
    /// Longest time a table spans (ms).
    span_ms: u64,
    /// Most entries a table takes.
    slice: usize,
}

struct Slice<K, V> {
    map: HashMap<K, V, BuildNoHashHasher<K>>,
    /// When its first and its newest entry were added (ms since the epoch).
    first_ms: u64,
    newest_ms: u64,
    /// The largest tag of its entries (a caller's position, such as an
    /// offset in a file the entries were written to in order).
    tag: u64,
}

impl<K: Hash + Eq + IsEnabled, V> Recent<K, V> {
    /// An empty window whose tables span at most `span_ms` each.
    pub(crate) fn new(span_ms: u64) -> Self {
        Self::with_slice(span_ms, SLICE)
    }

    /// An empty window whose tables span at most `span_ms` and hold at
    /// most `slice` entries each (at least 1, at most [`SLICE`]), rounded
    /// down to what fills a table's buckets: 7/8 of a power of two, as
    /// [`SLICE`] is. A table of 62 500 entries would take the 2^17 buckets
    /// of one of 114 688, twice the memory an entry.
    pub(crate) fn with_slice(span_ms: u64, slice: usize) -> Self {
        let mut fits = SLICE;
        while fits > slice && fits > 7 {
            fits /= 2;
        }
        Recent { slices: VecDeque::new(), span_ms, slice: fits.min(slice).max(1) }
    }

    /// Changes the span of the tables started from now on.
    pub(crate) fn set_span(&mut self, span_ms: u64) {
        self.span_ms = span_ms;
    }

    /// Adds `key` (added at `at_ms`); a repeat within one table replaces
    /// the value, across tables the newest is found first.
    pub(crate) fn insert(&mut self, key: K, value: V, at_ms: u64) {
        self.insert_tagged(key, value, at_ms, 0);
    }

    /// [`Recent::insert`], with a tag its table keeps the largest of.
    pub(crate) fn insert_tagged(&mut self, key: K, value: V, at_ms: u64, tag: u64) {
        let span_ms = self.span_ms;
        let slice = self.slice;
        if self.slices.back().is_none_or(|s| s.map.len() >= slice || at_ms >= s.first_ms.saturating_add(span_ms)) {
            self.slices.push_back(Slice { map: HashMap::default(), first_ms: at_ms, newest_ms: at_ms, tag });
        }
        let slice = self.slices.back_mut().expect("a slice was just ensured");
        slice.map.insert(key, value);
        slice.newest_ms = slice.newest_ms.max(at_ms);
        slice.tag = slice.tag.max(tag);
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

    /// Drops the oldest table; returns how many entries went with it and
    /// the largest of their tags (`None` when there was no table).
    pub(crate) fn forget_oldest(&mut self) -> Option<(usize, u64)> {
        self.slices.pop_front().map(|s| (s.map.len(), s.tag))
    }

    /// The oldest table, if any: when its newest entry was added (ms;
    /// every entry it would take with it is at least this old) and its
    /// largest tag.
    pub(crate) fn oldest_table(&self) -> Option<(u64, u64)> {
        self.slices.front().map(|s| (s.newest_ms, s.tag))
    }

    /// Drops every table.
    pub(crate) fn clear(&mut self) {
        self.slices.clear();
    }

    /// When the oldest entry held was added (ms), if any is held.
    pub(crate) fn oldest_ms(&self) -> Option<u64> {
        self.slices.front().map(|s| s.first_ms)
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
        let mut r: Recent<u64, u64> = Recent::new(1000);
        r.insert(1, 10, 5);
        assert_eq!(r.find(&1, |_| true), Some(&10));
        assert_eq!(r.find(&1, |v| *v > 10), None, "a value the caller rejects is no hit");
        assert_eq!(r.find(&2, |_| true), None);
        // The same key again, in a later table: the newer value comes first,
        // the older one is still there for a caller that rejects the newer.
        r.insert(1, 20, 2000);
        assert_eq!(r.tables(), 2);
        assert_eq!(r.find(&1, |_| true), Some(&20));
        assert_eq!(r.find(&1, |v| *v < 20), Some(&10));
    }

    #[test]
    fn at_a_low_rate_tables_close_by_time_and_old_ones_go() {
        // One id a second for an hour, with a 10-minute window: the ids
        // kept stay about one window's worth, not a table's 114 688.
        let window_ms = 600_000;
        let mut r: Recent<u64, u64> = Recent::new(span_of(Duration::from_millis(window_ms)));
        for t in 0..3600u64 {
            let now = t * 1000;
            r.forget_before(now.saturating_sub(window_ms));
            r.insert(t, t, now);
        }
        assert!(r.len() <= 600 + 75 + 1, "{} ids kept for a window of 600", r.len());
        assert!(r.len() >= 600, "an id inside the window was forgotten: {} kept", r.len());
        assert_eq!(r.find(&(3600 - 600), |_| true), Some(&(3600 - 600)));
    }

    #[test]
    fn the_oldest_table_goes_first_and_whole() {
        let mut r: Recent<u64, u64> = Recent::with_slice(u64::MAX, 4);
        for i in 0..10u64 {
            r.insert_tagged(i, i, 100 + i, 1000 + i);
        }
        assert_eq!(r.tables(), 3, "tables of 4, 4 and 2 entries");
        assert_eq!(r.oldest_table(), Some((103, 1003)));
        assert_eq!(r.forget_oldest(), Some((4, 1003)), "the oldest table goes whole, with its largest tag");
        assert_eq!(r.len(), 6);
        assert_eq!(r.find(&3, |_| true), None, "the oldest ids are forgotten");
        assert_eq!(r.find(&4, |_| true), Some(&4), "the rest are kept");
        assert_eq!(r.oldest_ms(), Some(104));
        assert_eq!(r.forget_oldest(), Some((4, 1007)));
        r.insert(10, 10, 110);
        r.clear();
        assert_eq!((r.len(), r.tables(), r.oldest_ms()), (0, 0, None));
        assert_eq!(r.forget_oldest(), None);
        assert_eq!(r.oldest_table(), None);
        assert_eq!(Recent::<u64, u64>::with_slice(1, 0).slice, 1, "a table takes at least one entry");
        assert_eq!(Recent::<u64, u64>::with_slice(1, 62_500).slice, 57_344, "7/8 of 2^16 buckets, not half of 2^17");
        assert_eq!(Recent::<u64, u64>::with_slice(1, 1 << 20).slice, SLICE);
        let mut full: Recent<u64, u64> = Recent::with_slice(u64::MAX, 62_500);
        for i in 0..57_344u64 {
            full.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i, 0);
        }
        assert_eq!(full.tables(), 1);
        assert!(full.slices[0].map.capacity() < 65_536, "the table filled 2^16 buckets without growing");
    }

    #[test]
    fn tables_hold_a_slice_each_and_go_whole_once_past_the_window() {
        let mut r: Recent<u64, u64> = Recent::new(u64::MAX);
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
