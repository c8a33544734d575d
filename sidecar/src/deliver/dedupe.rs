//! Consumer-side dedupe: ids the app already acknowledged, per subscription,
//! within a window, kept on the data volume so they survive a restart.
//!
//! The broker can deliver a message again (a late ack, an ack lost in a
//! crash, a producer re-send beyond the broker's duplicate window); such a
//! message is acknowledged without reaching the app again.
//!
//! Stored as a `ferry-log` of ids under `{data_dir}/dedupe/{subscription}`,
//! written with `FsyncMode::Interval`: a process crash loses nothing (the
//! bytes are in the page cache); a power loss can forget the last 100 ms of
//! acks, in which case the app may see those messages once more.
//!
//! Acks are recorded in batches: [`Dedupe::insert`] hands its id to one
//! task per store that appends whatever has queued up meanwhile as one
//! append, so a burst of acks costs one trip to the log's writer thread, not
//! one each; every insert still returns only once its id is written.
//!
//! In memory an id is kept as its [`IdKey`] (a 128-bit hash; the tables
//! are rebuilt from the ids on disk at start) with its ack time, in
//! [`Recent`]'s bounded tables: about 29–57 bytes an entry with the tables'
//! slack, against about 80 for the id as a String. The window bounds
//! memory, not the rate: a 10-minute window at 20k acks/s holds 12M ids,
//! about 350–680 MB. Two ids share a key with odds about n²/2¹²⁹ (2 in 10²⁵ for
//! that window); then the second would be taken for a duplicate.
//!
//! So a store also holds at most `max_ids` ids (`--dedupe-max-ids`): past
//! that it forgets its oldest ids before their window is over, an eighth of
//! the cap at a time, counts them in `ferry_dedupe_forgotten_early_total` and says
//! so in the log (once a minute at most). Memory and disk stay bounded at
//! any rate, at the cost of a shorter window when the rate is high: an
//! injected sidecar's default memory limit (128 MiB) would otherwise be
//! reached at a few thousand acks a second.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use tokio::sync::{mpsc, oneshot};

use ferry_log::{now_ms, Budget, FsyncMode, Log, LogOptions, NewRecord};

/// Cursor of the oldest id still inside the window.
const WINDOW_CURSOR: &str = "window";
/// How long acknowledged ids are written before being synced.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Most ids written in one append.
const MAX_BATCH: usize = 4096;

/// An id to write, and who waits for it to be written.
type Queued = (NewRecord, oneshot::Sender<Result<(), String>>);

/// How often at most the log says that ids were forgotten early.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Margin kept on disk before the oldest id held in memory: ids are
/// written in batches, so the log's order is their ack times' only roughly.
const DISK_MARGIN_MS: u64 = 1000;

/// The store's series of the sidecar's metrics (unregistered by default).
#[derive(Debug, Clone, Default)]
pub struct DedupeMetrics {
    /// Ids remembered.
    pub ids: Gauge,
    /// Ids forgotten before their window was over, to stay within the cap.
    pub forgotten_early: Counter,
}

/// Acked ids of one subscription.
pub struct Dedupe {
    log: Arc<Log>,
    window_ms: u64,
    /// Most ids remembered.
    max_ids: usize,
    /// Id hash → when it was acked (ms).
    seen: Mutex<Recent<IdKey, u64>>,
    /// To the task that writes ids in batches.
    queue: mpsc::UnboundedSender<Queued>,
    metrics: DedupeMetrics,
    /// When the log last said that ids were forgotten early.
    warned: Mutex<Option<Instant>>,
}

/// Writes queued ids, each time all that queued up while the last batch was
/// being written. Ends when the store is dropped.
async fn write_batches(log: Arc<Log>, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Let the pushes answered in this scheduler round join the batch:
        // one write and one wake-up of the log's writer thread for them all.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let (records, waiting): (Vec<NewRecord>, Vec<_>) = batch.drain(..).unzip();
        let written = log.append(&records).await.map(|_| ()).map_err(|e| crate::error_chain(&e));
        for w in waiting {
            let _ = w.send(written.clone());
        }
    }
}

use crate::recent::{span_of, Recent};
use crate::IdKey;

impl std::fmt::Debug for Dedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedupe").field("dir", &self.log.dir()).finish_non_exhaustive()
    }
}

impl Dedupe {
    /// Opens the store, loading the ids acknowledged within `window` (the
    /// newest `max_ids` of them). Must be called within a tokio runtime (it
    /// starts the store's writing task).
    pub fn open(
        dir: &Path,
        window: Duration,
        max_ids: usize,
        metrics: DedupeMetrics,
    ) -> Result<Self, ferry_log::Error> {
        let opts = LogOptions {
            fsync: FsyncMode::Interval(SYNC_INTERVAL),
            segment_bytes: 4 << 20,
            // Synced ten times a second at most: a reserve would only take
            // disk (4 MiB a subscription).
            preallocate_bytes: 0,
            budget: Budget::unlimited(),
            ..LogOptions::default()
        };
        let (log, _report) = Log::open(dir, opts)?;
        let window_ms = window.as_millis() as u64;
        let oldest = now_ms().saturating_sub(window_ms);
        let max_ids = max_ids.max(1);
        let mut seen = Recent::with_slice(span_of(window), max_ids / 8);
        let mut from = log.cursor(WINDOW_CURSOR).unwrap_or(0);
        while from < log.next_offset() {
            let batch = log.read(from, 4096, 4 << 20)?;
            for r in batch.records {
                if r.timestamp_ms >= oldest {
                    seen.insert(IdKey::of(&r.id), r.timestamp_ms, r.timestamp_ms);
                }
            }
            from = batch.next;
        }
        seen.forget_beyond(max_ids);
        metrics.ids.set(seen.len() as i64);
        let log = Arc::new(log);
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(log.clone(), queued));
        Ok(Dedupe { log, window_ms, max_ids, seen: Mutex::new(seen), queue, metrics, warned: Mutex::new(None) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent<IdKey, u64>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the app acknowledged `id` within the window.
    pub fn contains(&self, id: &str) -> bool {
        let oldest = now_ms().saturating_sub(self.window_ms);
        self.lock().find(&IdKey::of(id), |t| *t >= oldest).is_some()
    }

    /// Remembers that the app acknowledged `id`; returns once it is written.
    pub async fn insert(&self, id: &str) -> Result<(), String> {
        let rec = NewRecord::new(id, bytes::Bytes::new());
        let ts = rec.timestamp_ms;
        let (done, written) = oneshot::channel();
        self.queue.send((rec, done)).map_err(|_| "the dedupe store is closed".to_owned())?;
        written.await.map_err(|_| "the dedupe store is closed".to_owned())??;
        let (held, forgotten, oldest) = {
            let mut seen = self.lock();
            seen.insert(IdKey::of(id), ts, ts);
            let forgotten = seen.forget_beyond(self.max_ids);
            (seen.len(), forgotten, seen.oldest_ms())
        };
        self.metrics.ids.set(held as i64);
        if forgotten > 0 {
            self.forgot_early(forgotten, oldest);
        }
        Ok(())
    }

    /// Counts ids forgotten to stay within the cap, and says so in the log
    /// once a minute at most.
    fn forgot_early(&self, forgotten: usize, oldest: Option<u64>) {
        self.metrics.forgotten_early.inc_by(forgotten as u64);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        let kept_secs = oldest.map_or(0, |o| now_ms().saturating_sub(o) / 1000);
        tracing::warn!(
            dir = %self.log.dir().display(),
            max_ids = self.max_ids,
            forgotten,
            window_secs = self.window_ms / 1000,
            kept_secs,
            "the dedupe store is full: it forgets acknowledged ids before their window is over, so a \
             redelivery of an id acked more than kept_secs ago reaches the app again; raise --dedupe-max-ids if memory \
             allows"
        );
    }

    /// Forgets ids older than the window, in memory and on disk.
    pub fn prune(&self) -> Result<(), ferry_log::Error> {
        let window_start = now_ms().saturating_sub(self.window_ms);
        let (held, oldest_held) = {
            let mut seen = self.lock();
            seen.forget_before(window_start);
            (seen.len(), seen.oldest_ms())
        };
        self.metrics.ids.set(held as i64);
        // Past the cap the oldest ids held are younger than the window: the
        // disk keeps only what memory does (and a margin).
        let oldest = window_start.max(oldest_held.map_or(0, |o| o.saturating_sub(DISK_MARGIN_MS)));
        // The first record still inside the window becomes the cursor, so
        // whole segments before it are deleted.
        let mut from = self.log.cursor(WINDOW_CURSOR).unwrap_or(0);
        while from < self.log.next_offset() {
            let batch = self.log.read(from, 4096, 4 << 20)?;
            if let Some(keep) = batch.records.iter().find(|r| r.timestamp_ms >= oldest) {
                from = keep.offset;
                break;
            }
            from = batch.next;
        }
        self.log.commit(WINDOW_CURSOR, from)
    }

    /// Ids currently remembered (some up to an eighth of the window past
    /// it, until their table goes whole).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acked_ids_survive_a_reopen_and_expire_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = Dedupe::open(dir.path(), Duration::from_secs(600), 1_000_000, DedupeMetrics::default()).unwrap();
            assert!(!d.contains("a"));
            d.insert("a").await.unwrap();
            assert!(d.contains("a"));
        }
        let d = Dedupe::open(dir.path(), Duration::from_secs(600), 1_000_000, DedupeMetrics::default()).unwrap();
        assert!(d.contains("a"), "remembered across a reopen");
        assert!(!d.contains("b"));
        drop(d);
        let d = Dedupe::open(dir.path(), Duration::ZERO, 1_000_000, DedupeMetrics::default()).unwrap();
        // A zero window keeps only ids acked in this very millisecond.
        d.prune().unwrap();
        let d2 = Dedupe::open(dir.path(), Duration::from_secs(600), 1_000_000, DedupeMetrics::default()).unwrap();
        assert!(d.len() <= 1 && d2.len() <= 1);
    }

    #[tokio::test]
    async fn the_store_takes_only_the_disk_its_ids_need() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dedupe::open(dir.path(), Duration::from_secs(600), 1_000_000, DedupeMetrics::default()).unwrap();
        d.insert("a").await.unwrap();
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk < 4096, "no segment space reserved ahead: {on_disk} bytes");
    }

    #[tokio::test]
    async fn a_full_store_forgets_its_oldest_ids_counts_them_and_keeps_the_cap_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = DedupeMetrics::default();
        let window = Duration::from_secs(600);
        {
            let d = Dedupe::open(dir.path(), window, 16, metrics.clone()).unwrap();
            for i in 0..40 {
                d.insert(&format!("id-{i}")).await.unwrap();
            }
            assert!(d.len() <= 16, "{} ids held past a cap of 16", d.len());
            assert!(d.len() >= 14, "forgets an eighth of the cap at a time, not more: {} held", d.len());
            assert!(d.contains("id-39") && d.contains("id-30"), "the newest ids are kept");
            assert!(!d.contains("id-0") && !d.contains("id-20"), "the oldest ids are forgotten");
            assert_eq!(metrics.forgotten_early.get(), 40 - d.len() as u64);
            assert_eq!(metrics.ids.get(), d.len() as i64);
            d.prune().unwrap();
            assert!(d.contains("id-39"), "pruning keeps what the cap kept");
        }
        let reopened = Dedupe::open(dir.path(), window, 16, DedupeMetrics::default()).unwrap();
        assert!(reopened.len() <= 16, "{} ids loaded past a cap of 16", reopened.len());
        assert!(reopened.contains("id-39") && !reopened.contains("id-0"));
        let uncapped = Dedupe::open(dir.path(), window, 1_000_000, DedupeMetrics::default()).unwrap();
        assert!(uncapped.contains("id-0"), "the disk keeps ids acked within a second of the oldest one held");
    }

    #[test]
    fn ids_that_differ_in_one_byte_have_different_keys() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("order-{i:05}")).collect();
        let keys: std::collections::HashSet<(u64, u64)> =
            ids.iter().map(|i| (IdKey::of(i).0, IdKey::of(i).1)).collect();
        assert_eq!(keys.len(), ids.len());
        let lows: std::collections::HashSet<u64> = ids.iter().map(|i| IdKey::of(i).0).collect();
        assert_eq!(lows.len(), ids.len(), "the half maps index by is spread too");
        let highs: std::collections::HashSet<u64> = ids.iter().map(|i| IdKey::of(i).1).collect();
        assert_eq!(highs.len(), ids.len(), "and so is the other half");
        assert_eq!(IdKey::of("order-00001"), IdKey::of("order-00001"), "stable within the process");
        let a = IdKey::of("a");
        assert_ne!(a.0, a.1, "two independent halves");
    }
}
