//! The embedded broker's duplicate window: the ids a stream stored within
//! its window, each with its sequence, and the publishes still under way.
//!
//! A stored id is kept as the low 64 bits of its keyed hash → sequence (16
//! bytes an id) in [`Recent`]'s bounded tables. A hit is only a candidate:
//! the caller checks it against the stream's record at that sequence (same
//! id, stored within the window), so a hash collision never turns a new
//! message into a "duplicate", and tables that straddle the window's start
//! are exact too.

use super::AckFuture;
use crate::recent::Recent;
use crate::{IdKey, IdMap};

/// Publishes under way before ended ones are looked for.
const PENDING_SWEEP: usize = 4096;

/// An earlier publish of an id.
#[derive(Clone)]
pub(super) enum Sent {
    /// Under way: a re-send waits for it.
    Pending(AckFuture),
    /// Stored as this sequence.
    Stored(u64),
}

/// The ids of one stream's duplicate window.
#[derive(Default)]
pub(super) struct IdWindow {
    /// Publishes under way, and when each was published.
    pending: IdMap<(AckFuture, u64)>,
    /// Stored ids: the low half of their key → sequence.
    stored: Recent<u64, u64>,
}

impl IdWindow {
    /// The earlier publish of `key`: one under way (unless it failed: that
    /// stored nothing), else a stored sequence that `holds(seq)` confirms
    /// (the record at `seq` has this id and is within the window).
    pub(super) fn find(&self, key: IdKey, holds: impl Fn(u64) -> bool) -> Option<Sent> {
        if let Some((fut, _)) = self.pending.get(&key) {
            if !matches!(fut.peek(), Some(Err(_))) {
                return Some(Sent::Pending(fut.clone()));
            }
        }
        self.stored.find(&key.0, |&seq| holds(seq)).map(|&seq| Sent::Stored(seq))
    }

    /// A publish of `key`, published at `seen_ms`, is under way.
    pub(super) fn begin(&mut self, key: IdKey, fut: AckFuture, seen_ms: u64) {
        self.pending.insert(key, (fut, seen_ms));
        // A publish whose caller let go of it never reports its end: move
        // those that ended now and then.
        if self.pending.len() >= PENDING_SWEEP && self.pending.len().is_power_of_two() {
            let mut ended = Vec::new();
            self.pending.retain(|key, (fut, seen)| match fut.peek() {
                None => true,
                Some(stored) => {
                    ended.push((*key, stored.as_ref().ok().copied(), *seen));
                    false
                }
            });
            for (key, seq, seen) in ended {
                if let Some(seq) = seq {
                    self.insert(key, seq, seen);
                }
            }
        }
    }

    /// The publish `fut` of `key` ended: stored as `stored` (published at
    /// `seen_ms`), or failed. A later publish of the id that took the entry
    /// over (after this one failed) keeps it.
    pub(super) fn end(&mut self, key: IdKey, fut: &AckFuture, stored: Option<u64>, seen_ms: u64) {
        if self.pending.get(&key).is_some_and(|(f, _)| f.ptr_eq(fut)) {
            self.pending.remove(&key);
        }
        if let Some(seq) = stored {
            self.insert(key, seq, seen_ms);
        }
    }

    /// `key` is stored as `seq`, published at `seen_ms`.
    pub(super) fn insert(&mut self, key: IdKey, seq: u64, seen_ms: u64) {
        self.stored.insert(key.0, seq, seen_ms);
    }

    /// Forgets the stored ids published before `oldest_ms` (some a little
    /// later: [`IdWindow::find`]'s check is exact).
    pub(super) fn forget_before(&mut self, oldest_ms: u64) {
        self.stored.forget_before(oldest_ms);
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn ready(r: Result<u64, String>) -> AckFuture {
        async move { r }.boxed().shared()
    }

    #[test]
    fn a_stored_id_is_found_only_where_the_check_confirms_it() {
        let mut w = IdWindow::default();
        let a = IdKey::of("a");
        w.insert(a, 7, 1_000);
        assert!(matches!(w.find(a, |seq| seq == 7), Some(Sent::Stored(7))));
        // A record that does not carry the id (a hash collision) is no hit.
        assert!(w.find(a, |_| false).is_none());
        assert!(w.find(IdKey::of("b"), |_| true).is_none());
    }

    #[test]
    fn a_pending_publish_is_found_until_it_ends_and_a_failed_one_is_not() {
        let mut w = IdWindow::default();
        let a = IdKey::of("a");
        let fut = ready(Ok(3));
        w.begin(a, fut.clone(), 4);
        assert!(matches!(w.find(a, |_| false), Some(Sent::Pending(_))));
        w.end(a, &fut, Some(3), 5);
        assert!(matches!(w.find(a, |s| s == 3), Some(Sent::Stored(3))));

        let b = IdKey::of("b");
        let failed = ready(Err("disk full".into()));
        let _ = futures::executor::block_on(failed.clone());
        w.begin(b, failed.clone(), 5);
        assert!(w.find(b, |_| true).is_none(), "a failed publish stored nothing");
        // A re-send took the entry over: the failed one's end leaves it.
        let again = ready(Ok(9));
        w.begin(b, again.clone(), 6);
        w.end(b, &failed, None, 6);
        assert!(matches!(w.find(b, |_| false), Some(Sent::Pending(f)) if f.ptr_eq(&again)));
    }

    #[test]
    fn publishes_whose_end_was_never_reported_are_moved_in_a_sweep() {
        let mut w = IdWindow::default();
        for i in 0..PENDING_SWEEP as u64 {
            let fut = ready(if i % 2 == 0 { Ok(i + 1) } else { Err("failed".into()) });
            let _ = futures::executor::block_on(fut.clone());
            w.begin(IdKey::of(&i.to_string()), fut, i);
        }
        assert!(w.pending.is_empty(), "every ended publish left the pending table");
        assert_eq!(w.stored.len(), PENDING_SWEEP / 2, "the stored ones moved to the tables");
        assert!(matches!(w.find(IdKey::of("2"), |s| s == 3), Some(Sent::Stored(3))));
        assert!(w.find(IdKey::of("1"), |_| true).is_none());
    }
}
