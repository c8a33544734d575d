//! The embedded broker's duplicate window: the ids a stream stored within
//! its window, each with its sequence, and the publishes still under way.
//!
//! A stored id is kept as the low 64 bits of its keyed hash → sequence (16
//! bytes an id) in [`Recent`]'s bounded tables. A hit is only a candidate:
//! the caller checks it against the stream's record at that sequence (same
//! id, stored within the window), so a hash collision never turns a new
//! message into a "duplicate", and the ids of a table that straddles the
//! window's start count only while inside it. Two ids in one table with the
//! same 64 bits (odds about n²/2⁶⁵: 2 in 10⁷ for 3M ids) keep only the
//! newer: a re-send of the older one within the window is then stored
//! twice, a duplicate the consumer-side dedupe still catches, never a loss.

use std::time::Duration;

use super::AckFuture;
use crate::recent::{span_of, Recent};
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

/// One stream's duplicate window and its ids.
pub(super) struct IdWindow {
    /// How long an id counts.
    window: Duration,
    /// Publishes under way, and when each was published.
    pending: IdMap<(AckFuture, u64)>,
    /// Publishes under way at which the next sweep of `pending` runs.
    sweep_at: usize,
    /// Stored ids: the low half of their key → sequence.
    stored: Recent<u64, u64>,
    /// The window's start at the last [`IdWindow::advance_to`] (ms).
    oldest_ms: u64,
}

impl IdWindow {
    /// An empty window of `window`.
    pub(super) fn new(window: Duration) -> Self {
        IdWindow {
            window,
            pending: IdMap::default(),
            sweep_at: PENDING_SWEEP,
            stored: Recent::new(span_of(window)),
            oldest_ms: 0,
        }
    }

    /// The stream's window changed.
    pub(super) fn set_window(&mut self, window: Duration) {
        self.window = window;
        self.stored.set_span(span_of(window));
    }

    /// The earlier publish of `key` within the window: one under way
    /// (unless it failed: that stored nothing), else a stored sequence that
    /// `holds(seq)` confirms (the record at `seq` has this id and is within
    /// the window: the tables hold 64-bit hashes, and may hold ids a
    /// little past the window).
    pub(super) fn find(&self, key: IdKey, holds: impl Fn(u64) -> bool) -> Option<Sent> {
        if let Some((fut, seen)) = self.pending.get(&key) {
            if *seen >= self.oldest_ms && !matches!(fut.peek(), Some(Err(_))) {
                return Some(Sent::Pending(fut.clone()));
            }
        }
        self.stored.find(&key.0, |&seq| holds(seq)).map(|&seq| Sent::Stored(seq))
    }

    /// A publish of `key`, published at `seen_ms`, is under way.
    pub(super) fn begin(&mut self, key: IdKey, fut: AckFuture, seen_ms: u64) {
        self.pending.insert(key, (fut, seen_ms));
        if self.pending.len() >= self.sweep_at {
            self.sweep();
        }
    }

    /// A publish whose caller let go of it never reports its end (and is
    /// never polled to it): moves the ended ones to the stored ids and
    /// drops those past the window, whatever became of them.
    fn sweep(&mut self) {
        let oldest = self.oldest_ms;
        let mut ended = Vec::new();
        self.pending.retain(|key, (fut, seen)| match fut.peek() {
            None => *seen >= oldest,
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
        self.sweep_at = (2 * self.pending.len()).max(PENDING_SWEEP);
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

    /// The window now ends at `now_ms`: forgets the tables of stored ids
    /// published before its start, which it returns.
    pub(super) fn advance_to(&mut self, now_ms: u64) -> u64 {
        self.oldest_ms = now_ms.saturating_sub(self.window.as_millis() as u64);
        self.stored.forget_before(self.oldest_ms);
        self.oldest_ms
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
        let mut w = IdWindow::new(Duration::from_secs(120));
        let a = IdKey::of("a");
        w.insert(a, 7, 1_000);
        assert!(matches!(w.find(a, |seq| seq == 7), Some(Sent::Stored(7))));
        // A record that does not carry the id (a hash collision) is no hit.
        assert!(w.find(a, |_| false).is_none());
        assert!(w.find(IdKey::of("b"), |_| true).is_none());
    }

    #[test]
    fn a_pending_publish_is_found_until_it_ends_and_a_failed_one_is_not() {
        let mut w = IdWindow::new(Duration::from_secs(120));
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
        let mut w = IdWindow::new(Duration::from_secs(120));
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

    #[test]
    fn publishes_never_polled_to_their_end_stop_counting_and_go_once_past_the_window() {
        let mut w = IdWindow::new(Duration::from_secs(1));
        // Futures nobody polls: `peek` never has a result for them.
        let unpolled = || -> AckFuture { futures::future::pending::<Result<u64, String>>().boxed().shared() };
        w.advance_to(1_000);
        w.begin(IdKey::of("x"), unpolled(), 1_000);
        assert!(matches!(w.find(IdKey::of("x"), |_| false), Some(Sent::Pending(_))));
        assert_eq!(w.advance_to(2_001), 1_001);
        assert!(w.find(IdKey::of("x"), |_| true).is_none(), "a publish past the window is no duplicate");
        // A sweep drops them; those inside the window stay.
        for i in 1..PENDING_SWEEP as u64 {
            w.begin(IdKey::of(&i.to_string()), unpolled(), if i < 100 { 1_000 } else { 2_000 });
        }
        assert_eq!(w.pending.len(), PENDING_SWEEP - 100, "only the ones inside the window are left");
        assert!(w.sweep_at > w.pending.len(), "the next sweep waits for more");
        assert!(matches!(w.find(IdKey::of("100"), |_| false), Some(Sent::Pending(_))));
    }
}
