//! The outbox: one `ferry-log` per topic under `{data_dir}/outbox/{topic}`,
//! sharing one byte budget, plus a bounded index of recent message ids for
//! `GET /v1/messages/{id}`.
//!
//! A produce call appends to its topic's log; the forwarder reads it from
//! the `forwarded` cursor and advances that cursor as the broker confirms.
//!
//! Where every append is synced, a record is readable (and may be
//! forwarded) while its `fdatasync` runs: the produce call is still
//! answered only after it, but delivery no longer waits for it (about
//! 0.25 ms of the end-to-end p50). So a message whose produce was never
//! answered (the machine lost power during the sync) or failed (the sync
//! failed) may have reached the broker: the same unknown outcome as an
//! answer lost on the network, which a retry with the same `Ferry-Id` turns
//! into one message. A failed sync makes the topic's log refuse appends
//! until the sidecar restarts ([`Outbox::failed_topics`]); the forwarder
//! never commits its cursor past what is on disk.
//!
//! With `--outbox-retention`, forwarded records stay for a replay window:
//! a second cursor, `retained`, trails `forwarded` by that long (see
//! [`crate::forward`]), and segments go only once both passed them. The
//! window holds no room produce needs: an append refused for room (the
//! byte limit, or a full disk) first gives up every topic's window and is
//! tried once more. [`Outbox::replay_start`] finds where a replay (`POST
//! /v1/topics/{topic}/outbox:replay`) starts.
//!
//! A record the broker refuses for good (larger than a limit lowered after
//! it was produced) would hold its topic back for ever. The forwarder sets
//! it aside instead: it is appended, durably, to `{data_dir}/parked/{topic}`
//! with a `ferry-parked-reason` header, and counts as passed. So is a dead
//! letter its dead-letter topic refuses for good. `outbox inspect` lists what
//! is parked; nothing deletes it.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::FsyncPolicy;
use crate::{IdKey, IdMap};
use ferry_api::topic::Persistence;
use ferry_log::{Budget, FsyncMode, Log, LogOptions, NewRecord, RecoveryReport};

/// Name of the log cursor holding the first offset not yet confirmed by the broker.
pub const FORWARDED: &str = "forwarded";
/// Name of the log cursor below which forwarded records may be deleted
/// (only with `--outbox-retention`: the replay window's start).
pub const RETAINED: &str = "retained";
/// `GET /v1/messages/{id}` remembers the most recent 50 000 to 100 000
/// message ids: two generations of this many.
pub const TRACKED_GENERATION: usize = 50_000;
/// The header a parked record carries: why the broker refused it.
pub const PARKED_REASON: &str = "ferry-parked-reason";
/// The header a record parked from a topic's outbox carries: its offset
/// there, so the forwarder passes it when it reads it again (a replay, a
/// restart before the cursor passed it) instead of sending it again.
pub const PARKED_OFFSET: &str = "ferry-parked-offset";
/// Sync interval of `BestEffort` topics.
pub const BEST_EFFORT_SYNC: Duration = Duration::from_secs(1);

/// One topic's log.
#[derive(Debug)]
pub struct TopicLog {
    /// Topic name.
    pub topic: String,
    /// The log.
    pub log: Log,
    /// Partitions of the topic (from its spec; 1 while the topic is unknown,
    /// e.g. a log found on disk before the cluster config arrived).
    partitions: std::sync::atomic::AtomicU32,
}

impl TopicLog {
    /// Partitions of the topic, as its spec says now.
    pub fn partitions(&self) -> u32 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a produced message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    /// In the outbox, not yet confirmed by the broker.
    Pending,
    /// Confirmed by the broker.
    Forwarded {
        /// Stream.
        stream: String,
        /// Sequence in the stream.
        sequence: u64,
    },
    /// Refused by the broker for good and set aside in the parked log.
    Parked,
}

/// What is known about a recent message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStatus {
    /// Topic.
    pub topic: String,
    /// Offset in the topic's outbox log.
    pub offset: u64,
    /// Pending or forwarded.
    pub state: MessageState,
}

/// Recent message ids, compactly: keyed by [`IdKey`], 40 bytes an entry
/// (names are numbers into a table kept once), in two generations: ids
/// go into `current`; when it holds [`TRACKED_GENERATION`], the older one
/// is dropped whole and `current` takes its place. No id is ever removed alone,
/// so the tables never fill up with tombstones and grow past their ids.
#[derive(Default)]
struct Tracker {
    current: IdMap<Tracked>,
    previous: IdMap<Tracked>,
    /// Topic and stream names; a name's number is its place + 1.
    names: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
}

#[derive(Clone, Copy)]
struct Tracked {
    offset: u64,
    /// The broker's sequence once forwarded.
    sequence: u64,
    topic: u32,
    /// The stream's name number once forwarded, [`PARKED`] once parked,
    /// else 0.
    stream: u32,
}

/// `Tracked::stream` of a parked record.
const PARKED: u32 = u32::MAX;

/// The outbox.
pub struct Outbox {
    dir: PathBuf,
    /// `{data_dir}/parked`: one log per topic, opened on first use.
    parked_dir: PathBuf,
    parked: Mutex<HashMap<String, Arc<Log>>>,
    budget: Budget,
    fsync: FsyncPolicy,
    logs: RwLock<BTreeMap<String, Arc<TopicLog>>>,
    tracker: Mutex<Tracker>,
    /// Where the topic logs live: the real file system, or a test's `MemFs`.
    fs: Arc<dyn ferry_log::Fs>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Raises the `retained` cursor of every topic that has one to its
/// `forwarded` cursor (in one step with the cursors as they are, so a
/// forwarder's commit cannot lower it again), deleting the segments only
/// the replay window kept. Returns whether any topic has a window (an
/// append refused for room is worth one more try then, even when another
/// caller gave the room up first), and the topics this call moved.
fn release_retained(topics: &[Arc<TopicLog>]) -> (bool, Vec<String>) {
    let (mut any, mut released) = (false, Vec::new());
    for tl in topics {
        let Some(retained) = tl.log.cursor(RETAINED) else { continue };
        any = true;
        if tl.log.cursor(FORWARDED).is_none_or(|forwarded| retained >= forwarded) {
            continue; // nothing held: no cursor file written for nothing
        }
        let mut moved = false;
        let result = tl.log.commit_with(|c| {
            let forwarded = c.get(FORWARDED).copied();
            if let (Some(forwarded), Some(retained)) = (forwarded, c.get_mut(RETAINED)) {
                moved = *retained < forwarded;
                *retained = (*retained).max(forwarded);
            }
        });
        match result {
            Ok(()) if moved => released.push(tl.topic.clone()),
            Ok(()) => {}
            // On a full disk the cursor file cannot be written, but the
            // segments it passed are deleted all the same.
            Err(e) => tracing::warn!(topic = %tl.topic, error = %e, "could not record giving up the replay window"),
        }
    }
    (any, released)
}

/// Seals the active segment of every topic whose active segment holds
/// forwarded records no replay window keeps, so retention deletes them now
/// (or, for a segment with records still to forward, once they are). The
/// budget counts every segment byte: without this, an outbox limit below
/// the active segments' size (a small volume, many topics) refuses every
/// append for good, with nothing left to forward. True if any was sealed.
async fn seal_forwarded(topics: &[Arc<TopicLog>]) -> bool {
    let mut any = false;
    for tl in topics {
        let stats = tl.log.stats();
        let kept_from = tl.log.cursors().values().copied().min().unwrap_or(0);
        if stats.next_offset > stats.active_base && kept_from > stats.active_base {
            match tl.log.seal_active().await {
                Ok(sealed) => any |= sealed,
                Err(e) => tracing::warn!(topic = %tl.topic, error = %e, "could not seal a forwarded segment"),
            }
        }
    }
    any
}

/// Log options for a topic with this persistence, under the sidecar's
/// `--fsync` policy (which can only lower it). Segment space is
/// preallocated only where every append is synced: elsewhere a sync is
/// rare and the reserve would only take disk. Where every append is
/// synced, records are readable before their sync (see the module doc).
pub fn log_options(persistence: Persistence, policy: FsyncPolicy, budget: &Budget) -> LogOptions {
    let fsync = match (policy, persistence) {
        (FsyncPolicy::Never, _) => FsyncMode::Never,
        (FsyncPolicy::Always, Persistence::Durable) => FsyncMode::Always,
        _ => FsyncMode::Interval(BEST_EFFORT_SYNC),
    };
    let preallocate_bytes = if fsync == FsyncMode::Always { ferry_log::DEFAULT_PREALLOCATE_BYTES } else { 0 };
    LogOptions {
        fsync,
        preallocate_bytes,
        budget: budget.clone(),
        readable_before_sync: fsync == FsyncMode::Always,
        ..LogOptions::default()
    }
}

impl Outbox {
    /// Opens the outbox: every topic directory already there (so messages of
    /// a topic no longer configured still get forwarded) and every topic in
    /// `topics` (name → (persistence, partitions)).
    pub fn open(
        data_dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
        topics: &BTreeMap<String, (Persistence, u32)>,
    ) -> Result<(Self, Vec<(String, RecoveryReport)>), ferry_log::Error> {
        Self::open_on(Arc::new(ferry_log::StdFs), data_dir, max_bytes, fsync, topics)
    }

    /// [`Outbox::open`] with the topic logs on `fs` (a test's `MemFs`).
    pub(crate) fn open_on(
        fs: Arc<dyn ferry_log::Fs>,
        data_dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
        topics: &BTreeMap<String, (Persistence, u32)>,
    ) -> Result<(Self, Vec<(String, RecoveryReport)>), ferry_log::Error> {
        let dir = data_dir.join("outbox");
        std::fs::create_dir_all(&dir).map_err(|e| ferry_log::Error::Io {
            op: "creating",
            path: dir.clone(),
            source: e,
        })?;
        let mut names: Vec<String> = topics.keys().cloned().collect();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if let Some(name) = e.file_name().to_str() {
                    if e.path().is_dir() && ferry_api::naming::validate_label("topic", name).is_ok() {
                        names.push(name.to_owned());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        let outbox = Outbox {
            dir,
            parked_dir: data_dir.join("parked"),
            parked: Mutex::new(HashMap::new()),
            budget: Budget::new(max_bytes),
            fsync,
            logs: RwLock::new(BTreeMap::new()),
            tracker: Mutex::new(Tracker::default()),
            fs,
        };
        let mut reports = Vec::new();
        for name in names {
            let (persistence, partitions) = topics.get(&name).copied().unwrap_or((Persistence::Durable, 1));
            let new = outbox.fs.list(&outbox.dir.join(&name)).map_or(true, |files| files.is_empty());
            match outbox.open_topic(&name, persistence, partitions) {
                Ok(report) => reports.push((name, report)),
                // A topic with nothing stored yet (e.g. on a full disk) is
                // opened again later; the others, and their backlog, go on.
                Err(e) if new => {
                    tracing::error!(topic = %name, error = %e, "cannot open the outbox of a new topic; trying again later")
                }
                Err(e) => return Err(e),
            }
        }
        Ok((outbox, reports))
    }

    /// Opens a topic's log unless it is open already (a topic added at run
    /// time); an open one takes the spec's partitions. (Its persistence
    /// stays as it was opened until a restart: a log found on disk before
    /// its spec was known is durable, the safe side.)
    pub fn ensure_topic(
        &self,
        topic: &str,
        persistence: Persistence,
        partitions: u32,
    ) -> Result<bool, ferry_log::Error> {
        if let Some(tl) = self.topic(topic) {
            tl.partitions.store(partitions, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        self.open_topic(topic, persistence, partitions).map(|_| true)
    }

    fn open_topic(
        &self,
        topic: &str,
        persistence: Persistence,
        partitions: u32,
    ) -> Result<RecoveryReport, ferry_log::Error> {
        let opts = log_options(persistence, self.fsync, &self.budget);
        let (log, report) = Log::open_with(self.fs.clone(), self.dir.join(topic), opts)?;
        let tl = Arc::new(TopicLog { topic: topic.to_owned(), log, partitions: partitions.into() });
        self.logs.write().unwrap_or_else(|e| e.into_inner()).insert(topic.to_owned(), tl);
        Ok(report)
    }

    /// Topics whose log refuses appends until the sidecar restarts: an
    /// `fdatasync` failed after its records were readable (or, on a topic
    /// synced only now and then, at all), or a failed append could not be
    /// taken back.
    /// `/healthz` fails while there is one, so that Kubernetes restarts the
    /// sidecar.
    pub fn failed_topics(&self) -> Vec<String> {
        let logs = self.logs.read().unwrap_or_else(|e| e.into_inner());
        logs.values().filter(|tl| tl.log.is_poisoned()).map(|tl| tl.topic.clone()).collect()
    }

    /// The log of a topic.
    pub fn topic(&self, topic: &str) -> Option<Arc<TopicLog>> {
        self.logs.read().unwrap_or_else(|e| e.into_inner()).get(topic).cloned()
    }

    /// All topic logs.
    pub fn topics(&self) -> Vec<Arc<TopicLog>> {
        self.logs.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The shared byte budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Appends records to a topic's log (one durable write) and tracks their ids.
    pub async fn append(&self, tl: &TopicLog, records: &[NewRecord]) -> Result<std::ops::Range<u64>, ferry_log::Error> {
        let range = match tl.log.append(records).await {
            Err(e @ (ferry_log::Error::Full { .. } | ferry_log::Error::NoSpace { .. })) => {
                // Room held only for replays goes first.
                let topics = self.topics();
                let (any, released) = {
                    let topics = topics.clone();
                    tokio::task::spawn_blocking(move || release_retained(&topics)).await.unwrap_or_default()
                };
                if !released.is_empty() {
                    tracing::warn!(topics = ?released, error = %e, "the outbox needed room: gave up the replay window of these topics");
                }
                // Then forwarded records in active segments, which
                // retention cannot delete until their segment is sealed.
                let sealed = seal_forwarded(&topics).await;
                if !any && !sealed {
                    return Err(e);
                }
                tl.log.append(records).await?
            }
            other => other?,
        };
        let keys: Vec<IdKey> = records.iter().map(|r| IdKey::of(&r.id)).collect(); // outside the lock
        let mut t = self.lock_tracker();
        let topic = t.number(&tl.topic);
        for (key, offset) in keys.into_iter().zip(range.clone()) {
            t.note_pending(key, topic, offset);
        }
        Ok(range)
    }

    fn lock_tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the broker confirmed a message.
    pub fn confirmed(&self, topic: &str, id: &str, offset: u64, stream: &str, sequence: u64) {
        let key = IdKey::of(id);
        let mut t = self.lock_tracker();
        let (topic, stream) = (t.number(topic), t.number(stream));
        t.insert(key, Tracked { offset, sequence, topic, stream });
    }

    /// Sets an outbox record the broker refuses for good aside, durably, in
    /// the topic's parked log, with `reason`; its id's status becomes
    /// parked. Records are parked in order, so one parked again (a crash
    /// before the cursor passed it) is the last one there: not appended twice.
    pub async fn park_record(
        &self,
        topic: &str,
        rec: &ferry_log::Record,
        reason: &str,
    ) -> Result<(), ferry_log::Error> {
        let log = self.parked_log(topic)?;
        let last = log.next_offset().checked_sub(1).map(|o| log.read(o, 1, usize::MAX)).transpose()?;
        let parked_again = last.is_some_and(|b| b.records.last().is_some_and(|r| r.id == rec.id));
        if !parked_again {
            append_parked(&log, rec, reason, Some(rec.offset)).await?;
        }
        let key = IdKey::of(&rec.id);
        let mut t = self.lock_tracker();
        let topic = t.number(topic);
        t.insert(key, Tracked { offset: rec.offset, sequence: 0, topic, stream: PARKED });
        Ok(())
    }

    /// Sets a dead letter its dead-letter topic refuses for good aside,
    /// durably, in that topic's parked log, with `reason`. (Dead letters of
    /// one id can come from several subscriptions: all are kept.)
    pub async fn park_dead_letter(
        &self,
        topic: &str,
        rec: &ferry_log::Record,
        reason: &str,
    ) -> Result<(), ferry_log::Error> {
        append_parked(&*self.parked_log(topic)?, rec, reason, None).await
    }

    /// The records of a topic's outbox parked so far at offsets from
    /// `from` on: offset → id (few: parked messages are rare). Reads the
    /// parked log: call it off the runtime's workers.
    pub fn parked_from(&self, topic: &str, from: u64) -> Result<HashMap<u64, String>, ferry_log::Error> {
        let mut parked = HashMap::new();
        if !self.parked_dir.join(topic).exists() {
            return Ok(parked);
        }
        self.parked_log(topic)?.scan(0, |r| {
            let offset = r.headers.iter().find(|(n, _)| n == PARKED_OFFSET).and_then(|(_, v)| v.parse::<u64>().ok());
            if let Some(offset) = offset.filter(|&o| o >= from) {
                parked.insert(offset, r.id);
            }
            ControlFlow::<()>::Continue(())
        })?;
        Ok(parked)
    }

    fn parked_log(&self, topic: &str) -> Result<Arc<Log>, ferry_log::Error> {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = parked.get(topic) {
            return Ok(log.clone());
        }
        // Rare (a limit lowered under a backlog): opened here, on first use.
        let log = Arc::new(Log::open(self.parked_dir.join(topic), parked_log_options())?.0);
        parked.insert(topic.to_owned(), log.clone());
        Ok(log)
    }

    /// Where a replay of `tl` up to `to` (its confirmed offset) starts: the
    /// first record still in the log produced at or after `since_ms` (the
    /// first record kept, without `since_ms`), and whether that is every
    /// record produced since then (false when older records of the window
    /// asked for were already deleted). Reads the log: call it off the
    /// runtime's workers.
    pub fn replay_start(tl: &TopicLog, since_ms: Option<u64>, to: u64) -> Result<(u64, bool), ferry_log::Error> {
        let first = tl.log.stats().start_offset;
        let Some(since) = since_ms else { return Ok((first.min(to), true)) };
        if first >= to {
            return Ok((to, true));
        }
        let found = tl.log.scan(first, |r| {
            if r.timestamp_ms >= since {
                // Records are deleted oldest first: when one older than
                // `since` is still here, none deleted was produced later.
                ControlFlow::Break((r.offset.min(to), r.offset > first || first == 0))
            } else if r.offset >= to {
                ControlFlow::Break((to, true))
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(found.unwrap_or((to, true)))
    }

    /// Remembers a pending message found in the log after a restart.
    pub fn pending_seen(&self, topic: &str, id: &str, offset: u64) {
        let key = IdKey::of(id);
        let mut t = self.lock_tracker();
        let topic = t.number(topic);
        t.note_pending(key, topic, offset);
    }

    /// What is known of a message id (recent ones only).
    pub fn status(&self, id: &str) -> Option<MessageStatus> {
        let t = self.lock_tracker();
        let tracked = t.get(&IdKey::of(id))?;
        Some(MessageStatus {
            topic: t.name(tracked.topic).to_owned(),
            offset: tracked.offset,
            state: match tracked.stream {
                0 => MessageState::Pending,
                PARKED => MessageState::Parked,
                n => MessageState::Forwarded { stream: t.name(n).to_owned(), sequence: tracked.sequence },
            },
        })
    }
}

/// Options of a parked log: every append synced, no byte budget (parked
/// messages are few and never deleted).
pub fn parked_log_options() -> LogOptions {
    LogOptions { fsync: FsyncMode::Always, preallocate_bytes: 0, budget: Budget::unlimited(), ..LogOptions::default() }
}

/// Appends `rec` to a parked log with its `reason`.
async fn append_parked(
    log: &Log,
    rec: &ferry_log::Record,
    reason: &str,
    offset: Option<u64>,
) -> Result<(), ferry_log::Error> {
    let mut headers = rec.headers.clone();
    headers.push((PARKED_REASON.to_owned(), reason.to_owned()));
    if let Some(offset) = offset {
        headers.push((PARKED_OFFSET.to_owned(), offset.to_string()));
    }
    let parked = NewRecord {
        timestamp_ms: rec.timestamp_ms,
        id: rec.id.clone(),
        key: rec.key.clone(),
        headers,
        payload: rec.payload.clone(),
    };
    log.append(std::slice::from_ref(&parked)).await?;
    Ok(())
}

impl Tracker {
    /// The number of a topic or stream name (from 1).
    fn number(&mut self, name: &str) -> u32 {
        if let Some(n) = self.numbers.get(name) {
            return *n;
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.push(shared.clone());
        let n = self.names.len() as u32;
        self.numbers.insert(shared, n);
        n
    }

    /// The name with this number.
    fn name(&self, number: u32) -> &str {
        &self.names[number as usize - 1]
    }

    /// Records a pending message unless this record (or a later produce of
    /// the same id) is already known: the forwarder can confirm a record
    /// before its appender gets here.
    fn note_pending(&mut self, key: IdKey, topic: u32, offset: u64) {
        let known = self.get(&key).is_some_and(|s| s.topic == topic && s.offset >= offset);
        if !known {
            self.insert(key, Tracked { offset, sequence: 0, topic, stream: 0 });
        }
    }

    fn get(&self, key: &IdKey) -> Option<&Tracked> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    fn insert(&mut self, key: IdKey, tracked: Tracked) {
        if self.current.len() >= TRACKED_GENERATION && !self.current.contains_key(&key) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, tracked);
    }
}

#[cfg(test)]
mod fsync_policy_tests {
    use super::*;

    #[test]
    fn the_fsync_policy_only_lowers_a_topics_persistence() {
        let b = Budget::unlimited();
        let mode = |p, f| log_options(p, f, &b).fsync;
        assert_eq!(mode(Persistence::Durable, FsyncPolicy::Always), FsyncMode::Always);
        assert_eq!(mode(Persistence::BestEffort, FsyncPolicy::Always), FsyncMode::Interval(BEST_EFFORT_SYNC));
        assert_eq!(mode(Persistence::Durable, FsyncPolicy::Interval), FsyncMode::Interval(BEST_EFFORT_SYNC));
        assert_eq!(mode(Persistence::Durable, FsyncPolicy::Never), FsyncMode::Never);
        assert_eq!(mode(Persistence::BestEffort, FsyncPolicy::Never), FsyncMode::Never);
    }

    #[test]
    fn only_a_log_synced_on_every_append_preallocates() {
        let b = Budget::unlimited();
        let reserve = |p, f| log_options(p, f, &b).preallocate_bytes;
        assert_eq!(reserve(Persistence::Durable, FsyncPolicy::Always), ferry_log::DEFAULT_PREALLOCATE_BYTES);
        assert_eq!(reserve(Persistence::BestEffort, FsyncPolicy::Always), 0);
        assert_eq!(reserve(Persistence::Durable, FsyncPolicy::Interval), 0);
        assert_eq!(reserve(Persistence::Durable, FsyncPolicy::Never), 0);
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;

    /// An outbox of `limit` bytes on `fs` with one durable topic, `orders`.
    fn orders_outbox(fs: Arc<dyn ferry_log::Fs>, limit: u64) -> (tempfile::TempDir, Outbox, Arc<TopicLog>) {
        let data = tempfile::tempdir().unwrap();
        let spec = BTreeMap::from([("orders".to_owned(), (Persistence::Durable, 1))]);
        let (outbox, _) = Outbox::open_on(fs, data.path(), limit, FsyncPolicy::Always, &spec).unwrap();
        let tl = outbox.topic("orders").unwrap();
        (data, outbox, tl)
    }

    #[test]
    fn a_log_found_on_disk_takes_its_topics_partitions_once_the_spec_is_known() {
        let data = tempfile::tempdir().unwrap();
        let spec = BTreeMap::from([("orders".to_owned(), (Persistence::Durable, 4))]);
        {
            let (outbox, _) = Outbox::open(data.path(), 1 << 30, FsyncPolicy::Always, &spec).unwrap();
            assert_eq!(outbox.topic("orders").unwrap().partitions(), 4);
        }
        // A cluster sidecar opens its outbox before the config arrives.
        let (outbox, _) = Outbox::open(data.path(), 1 << 30, FsyncPolicy::Always, &BTreeMap::new()).unwrap();
        let tl = outbox.topic("orders").expect("the log on disk is opened");
        assert_eq!(tl.partitions(), 1);
        assert!(!outbox.ensure_topic("orders", Persistence::Durable, 4).unwrap(), "already open");
        assert_eq!(tl.partitions(), 4, "the open log takes the spec's partitions");
    }

    fn record(id: &str) -> NewRecord {
        NewRecord { timestamp_ms: 1, id: id.to_owned(), key: None, headers: vec![], payload: "x".into() }
    }

    fn mib(id: String) -> NewRecord {
        NewRecord::new(id, vec![7u8; 1 << 20])
    }

    #[tokio::test]
    async fn the_replay_window_keeps_forwarded_segments_until_produce_needs_the_room() {
        let limit = 100 << 20;
        let (_data, outbox, tl) = orders_outbox(Arc::new(ferry_log::memfs::MemFs::new()), limit);
        tl.log.commit(RETAINED, 0).unwrap(); // as the forwarder sets it up with a window
        for i in 0..70 {
            outbox.append(&tl, &[mib(format!("m{i}"))]).await.unwrap();
        }
        tl.log.commit(FORWARDED, 70).unwrap();
        let held = tl.log.stats();
        assert!(held.segments >= 2 && held.start_offset == 0, "the window keeps the forwarded segment: {held:?}");

        // 40 MiB more is over the limit with the window, not without it.
        let batch: Vec<NewRecord> = (70..110).map(|i| mib(format!("m{i}"))).collect();
        let range = outbox.append(&tl, &batch).await.expect("the window gave way");
        assert_eq!(range, 70..110);
        assert_eq!(tl.log.cursor(RETAINED), Some(70), "the window was given up up to what was forwarded");
        assert!(tl.log.stats().start_offset > 0, "{:?}", tl.log.stats());
        assert!(outbox.budget().used() <= limit);
        // A replay from before the first record kept cannot be complete.
        let first = tl.log.stats().start_offset;
        assert_eq!(Outbox::replay_start(&tl, Some(0), 110).unwrap(), (first, false));

        // With no window left to give up, a full outbox refuses as before
        // and stores nothing.
        let next = tl.log.next_offset();
        let big: Vec<NewRecord> = (0..60).map(|i| mib(format!("n{i}"))).collect();
        let err = outbox.append(&tl, &big).await.unwrap_err();
        assert!(matches!(err, ferry_log::Error::Full { .. }), "{err:?}");
        assert_eq!(tl.log.next_offset(), next);
    }

    /// Forwarded records in the active segment hold their room until it is
    /// sealed (retention deletes sealed segments only). With an outbox
    /// limit below one segment (a small volume: the webhook sets 75% of
    /// it), an append that finds the outbox full seals it, and appends go
    /// on as long as the forwarder keeps up; without, every append was
    /// refused for good after the limit's worth of traffic, with nothing
    /// left to forward.
    #[tokio::test]
    async fn forwarded_records_in_the_active_segment_make_room_when_the_outbox_is_full() {
        let limit = 2 << 20;
        let (_data, outbox, tl) = orders_outbox(Arc::new(ferry_log::memfs::MemFs::new()), limit);
        assert!(tl.log.options().segment_bytes > limit, "the case: a segment is larger than the limit");
        let batch = |name: String| -> Vec<NewRecord> {
            (0..64).map(|j| NewRecord::new(format!("{name}-{j}"), vec![1u8; 1024])).collect()
        };
        for i in 0..80u64 {
            let range = outbox.append(&tl, &batch(format!("m{i}"))).await.unwrap_or_else(|e| panic!("batch {i}: {e}"));
            tl.log.commit(FORWARDED, range.end).unwrap(); // the forwarder keeps up
        }
        assert_eq!(tl.log.next_offset(), 80 * 64, "5 MiB through a 2 MiB outbox");
        assert!(outbox.budget().used() <= limit);

        // Records not forwarded count: a full outbox of them refuses, and
        // stores nothing; once they are forwarded, there is room again.
        let next = tl.log.next_offset();
        let mut refused = None;
        for i in 0..40u64 {
            if let Err(e) = outbox.append(&tl, &batch(format!("p{i}"))).await {
                refused = Some((i, e));
                break;
            }
        }
        let (i, err) = refused.expect("pending records fill the outbox");
        assert!(matches!(err, ferry_log::Error::Full { .. }), "{err:?}");
        assert_eq!(tl.log.next_offset(), next + i * 64, "the refused batch stored nothing");
        tl.log.commit(FORWARDED, tl.log.next_offset()).unwrap();
        outbox.append(&tl, &batch("after".into())).await.expect("room once forwarded");
    }

    #[tokio::test]
    async fn parked_records_are_known_by_offset_and_id_so_a_re_read_passes_them() {
        let (_data, outbox, tl) = orders_outbox(Arc::new(ferry_log::StdFs), 1 << 30);
        let ids: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
        tl.log.append(&ids.iter().map(|id| record(id)).collect::<Vec<_>>()).await.unwrap();
        let recs = tl.log.read(0, 8, 1 << 20).unwrap().records;
        assert!(outbox.parked_from("orders", 0).unwrap().is_empty(), "nothing parked yet");
        outbox.park_record("orders", &recs[3], "too large").await.unwrap();
        outbox.park_record("orders", &recs[7], "too large").await.unwrap();
        // Parked again after a restart: kept once.
        outbox.park_record("orders", &recs[7], "too large").await.unwrap();
        // A dead letter parked on the same topic is no record of its outbox.
        outbox.park_dead_letter("orders", &recs[5], "dead letter too large").await.unwrap();
        assert_eq!(outbox.parked_from("orders", 0).unwrap(), HashMap::from([(3, "m3".into()), (7, "m7".into())]));
        assert_eq!(outbox.parked_from("orders", 4).unwrap(), HashMap::from([(7, "m7".into())]));
        assert!(outbox.parked_from("audit", 0).unwrap().is_empty());
    }

    #[test]
    fn a_replay_starts_at_the_first_kept_record_produced_since_and_says_if_older_ones_went() {
        let (_data, _outbox, tl) = orders_outbox(Arc::new(ferry_log::StdFs), 1 << 30);
        let at = |id: &str, ms: u64| NewRecord { timestamp_ms: ms, ..record(id) };
        tl.log.append_blocking(&[at("a", 1_000), at("b", 2_000), at("c", 3_000), at("d", 4_000)]).unwrap();
        assert_eq!(Outbox::replay_start(&tl, Some(2_500), 4).unwrap(), (2, true));
        assert_eq!(Outbox::replay_start(&tl, Some(2_000), 4).unwrap(), (1, true));
        assert_eq!(Outbox::replay_start(&tl, None, 4).unwrap(), (0, true));
        assert_eq!(Outbox::replay_start(&tl, Some(9_000), 4).unwrap(), (4, true), "nothing that new");
        // Only what the broker confirmed is replayed (up to `to`).
        assert_eq!(Outbox::replay_start(&tl, Some(3_500), 2).unwrap(), (2, true));
    }

    fn ids(tl: &TopicLog) -> Vec<String> {
        tl.log.read(0, 16, 1 << 20).unwrap().records.into_iter().map(|r| r.id).collect()
    }

    #[tokio::test]
    async fn a_record_is_forwardable_during_its_sync_and_a_failed_sync_fails_its_topic_until_reopened() {
        use ferry_log::memfs::{Fault, MemFs};
        let data = tempfile::tempdir().unwrap();
        let fs = Arc::new(MemFs::new());
        let spec = BTreeMap::from([
            ("orders".to_owned(), (Persistence::Durable, 1)),
            ("audit".to_owned(), (Persistence::Durable, 1)),
        ]);
        {
            let (outbox, _) = Outbox::open_on(fs.clone(), data.path(), 1 << 30, FsyncPolicy::Always, &spec).unwrap();
            let tl = outbox.topic("orders").unwrap();
            outbox.append(&tl, &[record("a")]).await.unwrap();
            assert!(outbox.failed_topics().is_empty());
            fs.inject(Fault::Sync(std::io::ErrorKind::Other));
            outbox.append(&tl, &[record("b")]).await.expect_err("its sync failed");
            // The forwarder could read `b` while its sync ran, so it may be
            // at the broker: its offset is never given to another record.
            assert_eq!(ids(&tl), ["a", "b"]);
            assert_eq!(tl.log.durable_offset(), 1);
            assert_eq!(outbox.failed_topics(), ["orders"]);
            outbox.append(&tl, &[record("c")]).await.expect_err("a failed topic takes nothing more");
            let audit = outbox.topic("audit").unwrap();
            outbox.append(&audit, &[record("d")]).await.expect("other topics go on");
            // The forwarder confirmed `b` (the broker took it).
            tl.log.commit(FORWARDED, 2).unwrap();
        }
        let (outbox, reports) = Outbox::open_on(fs, data.path(), 1 << 30, FsyncPolicy::Always, &spec).unwrap();
        assert!(outbox.failed_topics().is_empty(), "the reopen mends the topic");
        let tl = outbox.topic("orders").unwrap();
        assert_eq!(ids(&tl), ["a"], "the close cut off what the disk never kept");
        let report = &reports.iter().find(|(t, _)| t == "orders").unwrap().1;
        assert_eq!(report.cursors_past_end.get(FORWARDED), Some(&2));
        assert_eq!(tl.log.cursor(FORWARDED), Some(1), "the next record here is forwarded");
        outbox.append(&tl, &[record("e")]).await.unwrap();
        assert_eq!(ids(&tl), ["a", "e"]);
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;

    #[test]
    fn the_newest_generation_is_always_known_and_old_ones_go_whole() {
        let mut t = Tracker::default();
        let topic = t.number("orders");
        let n = 3 * TRACKED_GENERATION as u64;
        for i in 0..n {
            t.note_pending(IdKey::of(&format!("m-{i}")), topic, i);
        }
        // Two generations kept: the last 2 × TRACKED_GENERATION ids.
        let known = |t: &Tracker, i: u64| t.get(&IdKey::of(&format!("m-{i}"))).map(|s| s.offset);
        for i in [n - 1, n - TRACKED_GENERATION as u64, n - 2 * TRACKED_GENERATION as u64] {
            assert_eq!(known(&t, i), Some(i), "m-{i}");
        }
        assert_eq!(known(&t, n - 2 * TRACKED_GENERATION as u64 - 1), None, "the oldest generation is gone");
        assert_eq!(known(&t, 0), None);
        assert!(t.current.len() + t.previous.len() <= 2 * TRACKED_GENERATION);
        // A message of the older generation confirmed now moves to the
        // current one, forwarded, and a late note of it as pending is ignored.
        let old = n - 2 * TRACKED_GENERATION as u64;
        let stream = t.number("FERRY_default_orders");
        t.insert(IdKey::of(&format!("m-{old}")), Tracked { offset: old, sequence: 7, topic, stream });
        t.note_pending(IdKey::of(&format!("m-{old}")), topic, old);
        let s = *t.get(&IdKey::of(&format!("m-{old}"))).unwrap();
        assert_eq!((t.name(s.stream), s.sequence), ("FERRY_default_orders", 7));
    }
}
