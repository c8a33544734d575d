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

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Acked ids of one subscription.
pub struct Dedupe {
    log: Arc<Log>,
    window_ms: u64,
    /// Id hash → when it was acked (ms).
    seen: Mutex<Recent<IdKey, u64>>,
    /// To the task that writes ids in batches.
    queue: mpsc::UnboundedSender<Queued>,
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
    /// Opens the store, loading the ids acknowledged within `window`. Must
    /// be called within a tokio runtime (it starts the store's writing task).
    pub fn open(dir: &Path, window: Duration) -> Result<Self, ferry_log::Error> {
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
        let mut seen = Recent::new(span_of(window));
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
        let log = Arc::new(log);
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(log.clone(), queued));
        Ok(Dedupe { log, window_ms, seen: Mutex::new(seen), queue })
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
        self.lock().insert(IdKey::of(id), ts, ts);
        Ok(())
    }

    /// Forgets ids older than the window, in memory and on disk.
    pub fn prune(&self) -> Result<(), ferry_log::Error> {
        let oldest = now_ms().saturating_sub(self.window_ms);
        self.lock().forget_before(oldest);
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
            let d = Dedupe::open(dir.path(), Duration::from_secs(600)).unwrap();
            assert!(!d.contains("a"));
            d.insert("a").await.unwrap();
            assert!(d.contains("a"));
        }
        let d = Dedupe::open(dir.path(), Duration::from_secs(600)).unwrap();
        assert!(d.contains("a"), "remembered across a reopen");
        assert!(!d.contains("b"));
        drop(d);
        let d = Dedupe::open(dir.path(), Duration::ZERO).unwrap();
        // A zero window keeps only ids acked in this very millisecond.
        d.prune().unwrap();
        let d2 = Dedupe::open(dir.path(), Duration::from_secs(600)).unwrap();
        assert!(d.len() <= 1 && d2.len() <= 1);
    }

    #[tokio::test]
    async fn the_store_takes_only_the_disk_its_ids_need() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dedupe::open(dir.path(), Duration::from_secs(600)).unwrap();
        d.insert("a").await.unwrap();
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk < 4096, "no segment space reserved ahead: {on_disk} bytes");
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
