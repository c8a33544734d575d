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
//! one each; every insert still returns only once its id is written and
//! remembered. The task remembers each batch in the log's order, so memory
//! always holds a suffix of the log and the disk can be trimmed exactly to
//! it.
//!
//! In memory an id is kept as its [`IdKey`] (a 128-bit hash; the tables
//! are rebuilt from the ids on disk at start) with its ack time, in
//! [`Recent`]'s bounded tables: about 29–57 bytes an entry with the tables'
//! slack, against about 80 for the id as a String. The window bounds
//! memory, not the rate: a 10-minute window at 20k acks/s holds 12M ids,
//! about 350–680 MB. Two ids share a key with odds about n²/2¹²⁹ (2 in 10²⁵ for
//! that window); then the second would be taken for a duplicate.
//!
//! So the stores of a sidecar hold at most `--dedupe-max-ids` ids together
//! (an [`IdBudget`] they share). Past that the oldest table of ids across
//! all of them is forgotten before its window is over (an eighth of the
//! cap at a time), counted in `ferry_dedupe_forgotten_early_total` and said
//! in the log (once a minute at most). Every subscription then keeps its
//! ids for about the same time: a busy one does not empty a quiet one's
//! window before its own older ids, and a quiet one leaves a busy one the
//! room it does not use. Memory and disk stay bounded at any rate and for
//! any number of subscriptions, at the cost of a shorter window when the
//! rate is high: an injected sidecar's default memory limit (128 MiB)
//! would otherwise be reached at a few thousand acks a second.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

/// The store's series of the sidecar's metrics (unregistered by default).
#[derive(Debug, Clone, Default)]
pub struct DedupeMetrics {
    /// Ids remembered.
    pub ids: Gauge,
    /// Ids forgotten before their window was over, to stay within the cap.
    pub forgotten_early: Counter,
}

/// The cap on acknowledged ids all of a sidecar's dedupe stores hold
/// together (`--dedupe-max-ids`), and the stores that share it.
pub struct IdBudget {
    max: usize,
    /// Ids the stores hold together.
    held: AtomicUsize,
    /// The stores, in the order they were opened.
    stores: Mutex<Vec<Weak<Held>>>,
    /// One store forgets for the others at a time.
    forgetting: Mutex<()>,
    next_no: AtomicU64,
}

impl std::fmt::Debug for IdBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdBudget").field("max", &self.max).field("held", &self.held()).finish_non_exhaustive()
    }
}

impl IdBudget {
    /// A cap of `max` ids (at least 1) for the stores opened with it.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(IdBudget {
            max: max.max(1),
            held: AtomicUsize::new(0),
            stores: Mutex::new(Vec::new()),
            forgetting: Mutex::new(()),
            next_no: AtomicU64::new(0),
        })
    }

    /// Ids the stores hold together (an id may sit in two tables of a
    /// store and count twice).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn register(&self, store: &Arc<Held>) {
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        stores.retain(|w| w.strong_count() > 0);
        stores.push(Arc::downgrade(store));
    }

    /// While more ids than the cap are held, forgets the table whose
    /// newest id is the oldest of all stores' tables (the first opened
    /// store's on a tie): every id it takes is older than that, and a table
    /// another store is writing into right now is the last to go. Never a
    /// table of `writer` holding ids from log offset `keep_from` on: the
    /// batch just written, whose callers are told it is remembered.
    fn enforce(&self, writer: &Held, keep_from: u64) {
        if self.held() <= self.max {
            return;
        }
        let _one = self.forgetting.lock().unwrap_or_else(|e| e.into_inner());
        let stores: Vec<Arc<Held>> =
            self.stores.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
        while self.held() > self.max {
            let oldest = stores
                .iter()
                .filter_map(|h| {
                    let (newest_ms, last_offset) = h.lock().oldest_table()?;
                    let writing = std::ptr::eq(&**h, writer) && last_offset >= keep_from;
                    (!writing).then_some((newest_ms, h.no, h))
                })
                .min_by_key(|(at, no, _)| (*at, *no));
            let Some((_, _, h)) = oldest else { break };
            let (gone, kept_since) = h.change(|seen| (seen.forget_oldest(), seen.oldest_ms()));
            if let Some((forgotten, last_offset)) = gone {
                h.forgotten_below.fetch_max(last_offset + 1, Ordering::Relaxed);
                h.forgot_early(forgotten, kept_since, self.max);
            }
        }
    }
}

/// A sidecar's dedupe stores, one per subscription, and the cap they
/// share. A subscription restarted (its spec changed) while a request of
/// its old runner still holds the old store (a pull under way) gets that
/// same store back; one closed but whose log is still open (its writing
/// task has not ended yet) is opened again on that log. Two logs on one
/// directory would write the same files.
#[derive(Debug)]
pub struct Stores {
    budget: Arc<IdBudget>,
    open: Mutex<std::collections::HashMap<String, OpenStore>>,
}

/// A subscription's store and its log, while either is open.
type OpenStore = (Weak<Dedupe>, Weak<Log>);

impl Stores {
    /// No store open yet; `max_ids` for all of them together.
    pub fn new(max_ids: usize) -> Self {
        Stores { budget: IdBudget::new(max_ids), open: Mutex::new(Default::default()) }
    }

    /// The cap they share.
    pub fn budget(&self) -> &Arc<IdBudget> {
        &self.budget
    }

    /// Subscription `name`'s store in `dir`: the one still open, else
    /// opened now (see [`Dedupe::open`]).
    pub fn open(
        &self,
        name: &str,
        dir: &Path,
        window: Duration,
        metrics: DedupeMetrics,
    ) -> Result<Arc<Dedupe>, ferry_log::Error> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, (_, log)| log.strong_count() > 0);
        let (store, log) = open.get(name).map_or((None, None), |(s, l)| (s.upgrade(), l.upgrade()));
        if let Some(store) = store {
            return Ok(store);
        }
        let log = match log {
            Some(log) => log,
            None => Arc::new(Dedupe::open_log(dir)?),
        };
        let store = Arc::new(Dedupe::on_log(log.clone(), window, &self.budget, metrics)?);
        open.insert(name.to_owned(), (Arc::downgrade(&store), Arc::downgrade(&log)));
        Ok(store)
    }
}

/// One store's ids in memory, shared with its budget.
struct Held {
    /// Opening order, the tie-break between stores.
    no: u64,
    /// Id hash → when it was acked (ms).
    seen: Mutex<Recent<IdKey, u64>>,
    metrics: DedupeMetrics,
    /// When the log last said that ids were forgotten early.
    warned: Mutex<Option<Instant>>,
    /// The log offset below which every id was forgotten to stay within
    /// the cap (memory holds ids in the log's order, so a table forgotten
    /// whole ends at an offset): the disk need not keep them either.
    forgotten_below: AtomicU64,
    dir: PathBuf,
    window_ms: u64,
    budget: Arc<IdBudget>,
    /// Its store was dropped: it no longer sets the subscription's gauge
    /// (a store reopened for the subscription does), and its writing task
    /// only writes what is left in its queue.
    closed: AtomicBool,
}

impl Drop for Held {
    /// Gives back what is still counted once neither the store nor its
    /// writing task holds it.
    fn drop(&mut self) {
        let seen = self.seen.get_mut().unwrap_or_else(|e| e.into_inner());
        self.budget.held.fetch_sub(seen.len(), Ordering::Relaxed);
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recent<IdKey, u64>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the ids and counts what it added or dropped in the
    /// budget and the store's gauge, under the store's lock.
    fn change<T>(&self, f: impl FnOnce(&mut Recent<IdKey, u64>) -> T) -> T {
        let budget = &self.budget;
        let mut seen = self.lock();
        let before = seen.len();
        let out = f(&mut seen);
        let after = seen.len();
        if after >= before {
            budget.held.fetch_add(after - before, Ordering::Relaxed);
        } else {
            budget.held.fetch_sub(before - after, Ordering::Relaxed);
        }
        if !self.closed.load(Ordering::Relaxed) {
            self.metrics.ids.set(after as i64);
        }
        out
    }

    /// Counts ids forgotten to stay within the cap, and says so in the log
    /// once a minute at most.
    fn forgot_early(&self, forgotten: usize, kept_since: Option<u64>, max_ids: usize) {
        self.metrics.forgotten_early.inc_by(forgotten as u64);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        let kept_secs = kept_since.map_or(0, |o| now_ms().saturating_sub(o) / 1000);
        tracing::warn!(
            dir = %self.dir.display(),
            max_ids,
            forgotten,
            window_secs = self.window_ms / 1000,
            kept_secs,
            "the dedupe stores are full: they forget acknowledged ids before their window is over, so a \
             redelivery of an id acked more than kept_secs ago reaches the app again; raise --dedupe-max-ids if memory \
             allows"
        );
    }
}

/// Acked ids of one subscription.
pub struct Dedupe {
    log: Arc<Log>,
    held: Arc<Held>,
    /// To the task that writes ids in batches.
    queue: mpsc::UnboundedSender<Queued>,
}

impl Drop for Dedupe {
    /// Gives the store's room back at once. The subscription's gauge is
    /// left to a reopened store, or zeroed when the subscription goes.
    fn drop(&mut self) {
        self.held.closed.store(true, Ordering::Relaxed);
        self.held.change(Recent::clear);
    }
}

/// Writes queued ids, each time all that queued up while the last batch was
/// being written, then remembers them in the log's order (so the tables'
/// order is the log's) and answers. Ends when the store is dropped.
async fn write_batches(log: Arc<Log>, held: Arc<Held>, mut queue: mpsc::UnboundedReceiver<Queued>) {
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
        let written = match log.append(&records).await {
            // Left in the queue of a closed store (an insert given up on):
            // on disk for a reopen, not held for nobody.
            Ok(_) if held.closed.load(Ordering::Relaxed) => Ok(()),
            Ok(offsets) => {
                let keep_from = offsets.start;
                held.change(|seen| {
                    for (r, offset) in records.iter().zip(offsets) {
                        seen.insert_tagged(IdKey::of(&r.id), r.timestamp_ms, r.timestamp_ms, offset);
                    }
                });
                held.budget.enforce(&held, keep_from);
                Ok(())
            }
            Err(e) => Err(crate::error_chain(&e)),
        };
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
    /// Opens the store, loading the ids acknowledged within `window`; as
    /// many as `budget` leaves room for (the oldest go first, across its
    /// stores). Must be called within a tokio runtime (it starts the
    /// store's writing task).
    pub fn open(
        dir: &Path,
        window: Duration,
        budget: &Arc<IdBudget>,
        metrics: DedupeMetrics,
    ) -> Result<Self, ferry_log::Error> {
        Self::on_log(Arc::new(Self::open_log(dir)?), window, budget, metrics)
    }

    /// Opens the log of a store in `dir`.
    fn open_log(dir: &Path) -> Result<Log, ferry_log::Error> {
        let opts = LogOptions {
            fsync: FsyncMode::Interval(SYNC_INTERVAL),
            segment_bytes: 4 << 20,
            // Synced ten times a second at most: a reserve would only take
            // disk (4 MiB a subscription).
            preallocate_bytes: 0,
            budget: Budget::unlimited(),
            ..LogOptions::default()
        };
        Ok(Log::open(dir, opts)?.0)
    }

    /// [`Dedupe::open`] on a log already open.
    fn on_log(
        log: Arc<Log>,
        window: Duration,
        budget: &Arc<IdBudget>,
        metrics: DedupeMetrics,
    ) -> Result<Self, ferry_log::Error> {
        let window_ms = window.as_millis() as u64;
        let oldest = now_ms().saturating_sub(window_ms);
        let empty = || Recent::with_slice(span_of(window), budget.max / 8);
        let mut loaded = empty();
        let mut from = log.cursor(WINDOW_CURSOR).unwrap_or(0);
        while from < log.next_offset() {
            let batch = log.read(from, 4096, 4 << 20)?;
            for r in batch.records {
                if r.timestamp_ms >= oldest {
                    loaded.insert_tagged(IdKey::of(&r.id), r.timestamp_ms, r.timestamp_ms, r.offset);
                }
            }
            from = batch.next;
        }
        let held = Arc::new(Held {
            no: budget.next_no.fetch_add(1, Ordering::Relaxed),
            seen: Mutex::new(empty()),
            metrics,
            warned: Mutex::new(None),
            forgotten_below: AtomicU64::new(0),
            dir: log.dir().to_owned(),
            window_ms,
            budget: budget.clone(),
            closed: Default::default(),
        });
        // Registered before its ids count, so that another store over the
        // cap can forget them when they are the oldest.
        budget.register(&held);
        held.change(|seen| *seen = loaded);
        budget.enforce(&held, u64::MAX);
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(log.clone(), held.clone(), queued));
        Ok(Dedupe { log, held, queue })
    }

    /// True when the app acknowledged `id` within the window.
    pub fn contains(&self, id: &str) -> bool {
        let oldest = now_ms().saturating_sub(self.held.window_ms);
        self.held.lock().find(&IdKey::of(id), |t| *t >= oldest).is_some()
    }

    /// Remembers that the app acknowledged `id`; returns once it is
    /// written and remembered.
    pub async fn insert(&self, id: &str) -> Result<(), String> {
        let (done, written) = oneshot::channel();
        self.queue
            .send((NewRecord::new(id, bytes::Bytes::new()), done))
            .map_err(|_| "the dedupe store is closed".to_owned())?;
        written.await.map_err(|_| "the dedupe store is closed".to_owned())?
    }

    /// Forgets ids older than the window, in memory and on disk.
    pub fn prune(&self) -> Result<(), ferry_log::Error> {
        let window_start = now_ms().saturating_sub(self.held.window_ms);
        self.held.change(|seen| seen.forget_before(window_start));
        // The first record still inside the window becomes the cursor, so
        // whole segments before it are deleted.
        let mut from = self.log.cursor(WINDOW_CURSOR).unwrap_or(0);
        while from < self.log.next_offset() {
            let batch = self.log.read(from, 4096, 4 << 20)?;
            if let Some(keep) = batch.records.iter().find(|r| r.timestamp_ms >= window_start) {
                from = keep.offset;
                break;
            }
            from = batch.next;
        }
        // Past the cap, ids younger than the window were forgotten, whole
        // tables at a time: the disk keeps only what memory does, also
        // when the other stores' acks took all of this one's room.
        let forgotten_below = self.held.forgotten_below.load(Ordering::Relaxed).min(self.log.next_offset());
        self.log.commit(WINDOW_CURSOR, from.max(forgotten_below))
    }

    /// Ids currently remembered (some up to an eighth of the window past
    /// it, until their table goes whole).
    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn acked_ids_survive_a_reopen_and_expire_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d =
                Dedupe::open(dir.path(), Duration::from_secs(600), &IdBudget::new(1_000_000), DedupeMetrics::default())
                    .unwrap();
            assert!(!d.contains("a"));
            d.insert("a").await.unwrap();
            assert!(d.contains("a"));
        }
        let d = Dedupe::open(dir.path(), Duration::from_secs(600), &IdBudget::new(1_000_000), DedupeMetrics::default())
            .unwrap();
        assert!(d.contains("a"), "remembered across a reopen");
        assert!(!d.contains("b"));
        drop(d);
        let d = Dedupe::open(dir.path(), Duration::ZERO, &IdBudget::new(1_000_000), DedupeMetrics::default()).unwrap();
        // A zero window keeps only ids acked in this very millisecond.
        d.prune().unwrap();
        let d2 =
            Dedupe::open(dir.path(), Duration::from_secs(600), &IdBudget::new(1_000_000), DedupeMetrics::default())
                .unwrap();
        assert!(d.len() <= 1 && d2.len() <= 1);
    }

    #[tokio::test]
    async fn the_store_takes_only_the_disk_its_ids_need() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dedupe::open(dir.path(), Duration::from_secs(600), &IdBudget::new(1_000_000), DedupeMetrics::default())
            .unwrap();
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
        let budget = IdBudget::new(16);
        {
            let d = Dedupe::open(dir.path(), window, &budget, metrics.clone()).unwrap();
            for i in 0..40 {
                d.insert(&format!("id-{i}")).await.unwrap();
            }
            assert!(d.len() <= 16, "{} ids held past a cap of 16", d.len());
            assert!(d.len() >= 14, "forgets an eighth of the cap at a time, not more: {} held", d.len());
            assert_eq!(budget.held(), d.len());
            assert!(d.contains("id-39") && d.contains("id-30"), "the newest ids are kept");
            assert!(!d.contains("id-0") && !d.contains("id-20"), "the oldest ids are forgotten");
            assert_eq!(metrics.forgotten_early.get(), 40 - d.len() as u64);
            assert_eq!(metrics.ids.get(), d.len() as i64);
            d.prune().unwrap();
            assert!(d.contains("id-39"), "pruning keeps what the cap kept");
        }
        assert_eq!(budget.held(), 0, "a closed store gives its room back");
        let reopened = Dedupe::open(dir.path(), window, &IdBudget::new(16), DedupeMetrics::default()).unwrap();
        assert!(reopened.len() <= 16, "{} ids loaded past a cap of 16", reopened.len());
        assert!(reopened.contains("id-39") && !reopened.contains("id-0"));
        let uncapped = Dedupe::open(dir.path(), window, &IdBudget::new(1_000_000), DedupeMetrics::default()).unwrap();
        assert_eq!(uncapped.len(), reopened.len(), "the disk keeps what memory held, no more");
    }

    #[tokio::test]
    async fn stores_share_the_cap_and_the_oldest_ids_of_any_store_go_first() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let window = Duration::from_secs(600);
        let budget = IdBudget::new(32);
        let metrics = [DedupeMetrics::default(), DedupeMetrics::default(), DedupeMetrics::default()];
        let open = |i: usize| Dedupe::open(dirs[i].path(), window, &budget, metrics[i].clone()).unwrap();
        let (quiet, busy) = (open(0), open(1));
        for i in 0..8 {
            quiet.insert(&format!("quiet-{i}")).await.unwrap();
        }
        for i in 0..40 {
            busy.insert(&format!("busy-{i}")).await.unwrap();
        }
        // 48 acked, room for 32: the quiet store's ids are the oldest, so
        // they went first, then the busy store's oldest.
        assert!(budget.held() <= 32, "{} ids held past a cap of 32 for all stores", budget.held());
        assert!(budget.held() >= 28, "an eighth of the cap goes at a time, not more: {} held", budget.held());
        assert_eq!(budget.held(), quiet.len() + busy.len());
        assert_eq!(quiet.len(), 0, "the quiet store's older ids went before the busy store's newer ones");
        assert!(busy.contains("busy-39") && !busy.contains("busy-0"));
        let forgotten = metrics[0].forgotten_early.get() + metrics[1].forgotten_early.get();
        assert_eq!(forgotten, 48 - budget.held() as u64, "every id forgotten early is counted, by its store");
        assert_eq!(metrics[0].forgotten_early.get(), 8);
        assert_eq!(metrics[0].ids.get(), 0);
        assert_eq!(metrics[1].ids.get(), busy.len() as i64);

        // Now the busy store's ids are the oldest: a third store's acks
        // take their room, and the third keeps all of its own.
        let third = open(2);
        for i in 0..12 {
            third.insert(&format!("third-{i}")).await.unwrap();
        }
        assert!(budget.held() <= 32, "{} held", budget.held());
        assert_eq!(third.len(), 12, "the newest ids are kept whichever store has them");
        assert!(third.contains("third-0") && third.contains("third-11"));
        assert!(busy.contains("busy-39"), "{} of busy's ids held", busy.len());
        assert_eq!(budget.held(), quiet.len() + busy.len() + third.len());

        // A store that closes gives its room back.
        let busy_held = busy.len();
        drop(busy);
        assert_eq!(budget.held(), third.len());
        assert!(busy_held > 0);
    }

    /// A store's ids in memory alone, registered with `budget`.
    fn bare_store(budget: &Arc<IdBudget>) -> Arc<Held> {
        let held = Arc::new(Held {
            no: budget.next_no.fetch_add(1, Ordering::Relaxed),
            seen: Mutex::new(Recent::with_slice(u64::MAX, 2)),
            metrics: DedupeMetrics::default(),
            warned: Mutex::new(None),
            forgotten_below: AtomicU64::new(0),
            dir: PathBuf::new(),
            window_ms: 600_000,
            budget: budget.clone(),
            closed: Default::default(),
        });
        budget.register(&held);
        held
    }

    #[test]
    fn a_table_written_to_just_now_goes_after_older_ids_even_if_it_started_first() {
        let budget = IdBudget::new(4);
        let (quiet, busy) = (bare_store(&budget), bare_store(&budget));
        // The quiet store's one table started at 100 and took an id at 10 000.
        quiet.change(|s| {
            s.insert_tagged(IdKey::of("q-old"), 100, 100, 0);
            s.insert_tagged(IdKey::of("q-new"), 10_000, 10_000, 1);
        });
        // The busy store's tables: ids of 200-300, 400-500, then one of 10 001.
        for (i, t) in [200u64, 300, 400, 500, 10_001].into_iter().enumerate() {
            busy.change(|s| s.insert_tagged(IdKey::of(&format!("b-{i}")), t, t, i as u64));
        }
        // b-4 (log offset 4) is the batch just written.
        budget.enforce(&busy, 4);
        assert_eq!(budget.held(), 3, "7 held, a cap of 4: the two tables of ids no newer than 500 went");
        assert!(quiet.lock().find(&IdKey::of("q-new"), |_| true).is_some(), "an id acked at 10 000 is kept");
        assert!(busy.lock().find(&IdKey::of("b-1"), |_| true).is_none());
        assert!(busy.lock().find(&IdKey::of("b-3"), |_| true).is_none());
        assert!(busy.lock().find(&IdKey::of("b-4"), |_| true).is_some(), "the writer's newest table stays");
        assert_eq!(busy.forgotten_below.load(Ordering::Relaxed), 4, "the log offsets 0-3 of the busy store went");
        assert_eq!(quiet.forgotten_below.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_store_whose_room_the_others_took_trims_its_disk_too() {
        let (quiet_dir, busy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let window = Duration::from_secs(600);
        // Ids the quiet subscription acked a minute ago (written as the store writes them).
        {
            let (log, _) = Log::open(quiet_dir.path(), LogOptions::default()).unwrap();
            let at = now_ms() - 60_000;
            let old: Vec<NewRecord> = (0..8u64)
                .map(|i| NewRecord { timestamp_ms: at, ..NewRecord::new(format!("q-{i}"), Bytes::new()) })
                .collect();
            log.append(&old).await.unwrap();
        }
        let budget = IdBudget::new(16);
        let quiet = Dedupe::open(quiet_dir.path(), window, &budget, DedupeMetrics::default()).unwrap();
        assert_eq!(quiet.len(), 8);
        let busy = Dedupe::open(busy_dir.path(), window, &budget, DedupeMetrics::default()).unwrap();
        for i in 0..16 {
            busy.insert(&format!("b-{i}")).await.unwrap();
        }
        assert_eq!(quiet.len(), 0, "the quiet store's minute-old ids were the oldest");
        quiet.prune().unwrap();
        drop(quiet);
        let reopened = Dedupe::open(quiet_dir.path(), window, &IdBudget::new(1_000), DedupeMetrics::default()).unwrap();
        assert_eq!(reopened.len(), 0, "ids forgotten to stay within the cap are not loaded again");
    }

    #[tokio::test]
    async fn a_subscription_reopened_while_its_store_is_still_held_gets_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(1_000);
        let window = Duration::from_secs(600);
        let old = stores.open("orders", dir.path(), window, DedupeMetrics::default()).unwrap();
        old.insert("a").await.unwrap();
        let new = stores.open("orders", dir.path(), window, DedupeMetrics::default()).unwrap();
        assert!(Arc::ptr_eq(&old, &new), "one store for the files, not two");
        assert_eq!(stores.budget().held(), 1, "its ids count once");
        let other = stores.open("audit", &dir.path().join("audit"), window, DedupeMetrics::default()).unwrap();
        assert!(!Arc::ptr_eq(&old, &other));
        let old_log = Arc::as_ptr(&old.log);
        drop((old, new));
        assert_eq!(stores.budget().held(), 0);
        // No await since the drop: the store's writing task still holds its log.
        let reopened = stores.open("orders", dir.path(), window, DedupeMetrics::default()).unwrap();
        assert_eq!(Arc::as_ptr(&reopened.log), old_log, "the log still open is used, not opened a second time");
        assert!(reopened.contains("a"), "once closed, it is opened again from its files");
        assert_eq!(stores.budget().held(), 1);
    }

    #[tokio::test]
    async fn every_id_of_a_batch_is_remembered_when_its_insert_returns_even_past_a_small_cap() {
        let dir = tempfile::tempdir().unwrap();
        let budget = IdBudget::new(16);
        let d = Dedupe::open(dir.path(), Duration::from_secs(600), &budget, DedupeMetrics::default()).unwrap();
        for i in 0..8 {
            d.insert(&format!("before-{i}")).await.unwrap();
        }
        // 20 inserts queued before the writing task runs: one batch of 20,
        // in tables of 2, with 16 ids of room in all.
        let ids: Vec<String> = (0..20).map(|i| format!("batch-{i}")).collect();
        let inserts = ids.iter().map(|id| d.insert(id));
        for r in futures::future::join_all(inserts).await {
            r.unwrap();
        }
        for id in &ids {
            assert!(d.contains(id), "{id} was written and its insert returned, but it is not remembered");
        }
        assert!(!d.contains("before-0"), "older ids made the room");
        assert_eq!(budget.held(), 20, "past the cap by what one batch needs, until the next batch");
    }

    #[tokio::test]
    async fn a_closed_store_leaves_the_gauge_to_the_store_reopened_for_its_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(1_000);
        let window = Duration::from_secs(600);
        let metrics = DedupeMetrics::default();
        let old = stores.open("orders", dir.path(), window, metrics.clone()).unwrap();
        old.insert("a").await.unwrap();
        drop(old);
        let reopened = stores.open("orders", dir.path(), window, metrics.clone()).unwrap();
        assert_eq!(metrics.ids.get(), 1);
        // The old writing task ends (and drops what it held) once it runs.
        while Arc::strong_count(&reopened.log) > 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.ids.get(), 1, "the old store's end does not zero the reopened store's gauge");
        assert_eq!(stores.budget().held(), 1);
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
