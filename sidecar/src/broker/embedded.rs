//! [`Broker`] inside the sidecar, on `ferry-log`: for a laptop, a demo or a
//! test. One process only (the sidecar's data-dir lock guards it).
//!
//! * A stream is a log under `{dir}/streams/{stream}`; a message's sequence
//!   is its offset + 1 (as in JetStream, sequences start at 1). Its subject
//!   is kept as the header `ferry-subject`.
//! * Publishing dedupes on the message id within the stream's duplicate
//!   window (ids are reloaded from the log at start), and is pipelined:
//!   publishes are queued in call order and confirmed after the fsync.
//!   Consumers may take a message while its fsync runs (the two overlap on
//!   the delivery path); nothing is settled before it is done.
//! * A consumer keeps an ack floor (every sequence below it is settled),
//!   the settled sequences above it, and the delivery count of each
//!   delivered one. That state is appended whole, as one record, to a
//!   `ferry-log` journal under `{dir}/consumers/{stream}/{consumer}/`
//!   (the last record is the state) before an ack, term or nak is
//!   answered, and while a fetch's messages go to the app, so after a
//!   process crash (`kill -9`) nothing acked is delivered again and
//!   everything unacked is delivered again at once, counts kept (but for a
//!   delivery whose count a crash caught in flight, as JetStream would).
//! * The journal is written with `FsyncMode::Interval`
//!   ([`JOURNAL_SYNC_INTERVAL`]), as JetStream keeps consumer state and as
//!   Ferry's consumer-side dedupe store does: a write is in the page cache
//!   when the ack is answered, so a process crash loses none of it; a power
//!   loss can take the last interval's acks (those messages are delivered
//!   again; a message is never lost that way) and delivery counts. Only a
//!   consumer's first state (its start position) is fsynced at once. A
//!   message on the delivery path thus costs one `fdatasync` past the
//!   outbox's (the stream's) where it cost three (and the fetch's and the
//!   ack's state writes): on a VM where a flush stalls the other vCPU,
//!   every sync shows in the latency tail. Older records
//!   are let go every [`COMPACT_EVERY`] writes, after a sync.
//!
//! Documented limits against JetStream: retention limits (`maxAge`,
//! `maxBytes`, `maxMessages`) are not enforced (messages are kept until
//! every consumer acked them and the log's segments can go); per-pod
//! consumers are not removed after inactivity; memory storage is stored on
//! disk like file storage. A failed `fdatasync` of a stream (an I/O error
//! of the disk) refuses that stream's publishes and acks until the sidecar
//! restarts, as a database stops on one: consumers may have seen the
//! message, so its sequence cannot be rolled back and handed out again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtOrd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferry_api::subscription::StartPosition;
use ferry_api::{ConsumerPlan, StreamPlan};
use ferry_log::{now_ms, Budget, FsyncMode, Log, LogOptions, NewRecord};
use futures::future::{FutureExt, Shared};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::IdKey;

use super::{Broker, BrokerError, Consumer, Fetched, OutMessage, PendingAck, PubAck, Settle, Settlement};

/// Header keeping a message's subject.
pub const SUBJECT_HEADER: &str = "ferry-subject";
/// A consumer journal's records before the older ones may be deleted.
pub const COMPACT_EVERY: u64 = 1024;
/// How long a consumer journal's write may wait for its `fdatasync`.
pub const JOURNAL_SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Segment size of a consumer journal (also the largest state it holds).
const JOURNAL_SEGMENT_BYTES: u64 = 16 << 20;
/// The journal cursor at the newest state (older segments can go).
const LATEST: &str = "latest";

mod window;
use window::{IdWindow, Sent};

type AckFuture = Shared<futures::future::BoxFuture<'static, Result<u64, String>>>;

/// The embedded broker.
pub struct EmbeddedBroker {
    dir: PathBuf,
    streams: Mutex<BTreeMap<String, Arc<Stream>>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// What is kept of a stream's plan (the rest does not apply here).
#[derive(Debug, Serialize, Deserialize)]
struct SavedStream {
    name: String,
    subjects: Vec<String>,
    duplicate_window_ms: u64,
}

impl SavedStream {
    fn plan(&self) -> StreamPlan {
        StreamPlan {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age: None,
            max_bytes: None,
            max_messages: None,
            storage: ferry_api::topic::Storage::File,
            replicas: 1,
            duplicate_window: Duration::from_millis(self.duplicate_window_ms),
            max_message_size: u32::MAX,
        }
    }

    fn save(base: &Path, plan: &StreamPlan) -> Result<(), BrokerError> {
        let saved = SavedStream {
            name: plan.name.clone(),
            subjects: plan.subjects.clone(),
            duplicate_window_ms: plan.duplicate_window.as_millis() as u64,
        };
        let bytes = serde_json::to_vec(&saved).map_err(unavailable)?;
        let dir = base.join("streams");
        ferry_log::fs::write_atomic(&ferry_log::StdFs, &dir, &format!("{}.json", plan.name), &bytes)
            .map_err(unavailable)
    }
}

struct Stream {
    name: String,
    /// Subject prefix (`ferry.{ns}.{topic}.`).
    prefix: String,
    log: Log,
    /// The duplicate window and its ids.
    ids: Mutex<IdWindow>,
    consumers: Mutex<BTreeMap<String, Arc<ConsumerState>>>,
    dir: PathBuf,
}

/// A consumer asked for with another start position than it has.
fn start_changed(plan: &ConsumerPlan, has: StartPosition) -> BrokerError {
    BrokerError::Refused(format!(
        "consumer {} exists with startPosition {has:?}, asked for {:?}: a start position cannot change \
         (give the subscription a new name for a new consumer)",
        plan.name, plan.start
    ))
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl EmbeddedBroker {
    /// Opens (or creates) the broker's state under `dir`, with every
    /// stream created before (their plans are kept as `streams/{name}.json`).
    pub fn open(dir: &Path) -> Result<Self, BrokerError> {
        let streams_dir = dir.join("streams");
        std::fs::create_dir_all(&streams_dir).map_err(unavailable)?;
        let mut streams = BTreeMap::new();
        for entry in std::fs::read_dir(&streams_dir).map_err(unavailable)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let saved: SavedStream = std::fs::read(&path).map_err(unavailable).and_then(|b| {
                    serde_json::from_slice(&b).map_err(|e| BrokerError::Refused(format!("{}: {e}", path.display())))
                })?;
                let plan = saved.plan();
                streams.insert(plan.name.clone(), Arc::new(Stream::open(dir, &plan)?));
            }
        }
        Ok(EmbeddedBroker { dir: dir.to_path_buf(), streams: Mutex::new(streams) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Stream>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stream(&self, name: &str) -> Result<Arc<Stream>, BrokerError> {
        self.lock().get(name).cloned().ok_or_else(|| BrokerError::Refused(format!("stream {name} not found")))
    }
}

impl Stream {
    fn open(base: &Path, plan: &StreamPlan) -> Result<Stream, BrokerError> {
        Self::open_on(Arc::new(ferry_log::StdFs), base, plan)
    }

    /// [`Stream::open`] with its log on `fs` (a test's `MemFs`).
    fn open_on(fs: Arc<dyn ferry_log::Fs>, base: &Path, plan: &StreamPlan) -> Result<Stream, BrokerError> {
        // Consumers start on a message while its sync runs; publishers are
        // confirmed after it, and acks wait for it (`ConsumerState::persist`).
        let opts = LogOptions {
            fsync: FsyncMode::Always,
            budget: Budget::unlimited(),
            readable_before_sync: true,
            ..LogOptions::default()
        };
        let (log, report) = Log::open_with(fs, base.join("streams").join(&plan.name), opts).map_err(unavailable)?;
        if !report.is_clean() {
            tracing::warn!(stream = %plan.name, ?report, "embedded broker repaired its stream log");
        }
        let prefix = plan.subjects.first().map(|s| s.trim_end_matches('>').to_owned()).unwrap_or_default();
        let stream = Stream {
            name: plan.name.clone(),
            prefix,
            log,
            ids: Mutex::new(IdWindow::new(plan.duplicate_window)),
            consumers: Mutex::new(BTreeMap::new()),
            dir: base.join("consumers").join(&plan.name),
        };
        stream.reload_ids(plan.duplicate_window)?;
        Ok(stream)
    }

    /// Ids published within the window, from the log (newest segments are
    /// enough in practice; the scan starts at the oldest retained record).
    fn reload_ids(&self, window: Duration) -> Result<(), BrokerError> {
        let oldest = now_ms().saturating_sub(window.as_millis() as u64);
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        self.log
            .scan(self.log.stats().start_offset, |r| {
                if r.timestamp_ms >= oldest {
                    let seq = r.offset + 1;
                    ids.insert(IdKey::of(&r.id), seq, r.timestamp_ms);
                }
                std::ops::ControlFlow::<()>::Continue(())
            })
            .map_err(unavailable)?;
        Ok(())
    }

    fn last_seq(&self) -> u64 {
        self.log.next_offset()
    }

    /// Whether the record at `seq` is `id`'s, published at `oldest_ms` or
    /// later (a duplicate-window hit is checked against the log: its
    /// tables hold 64-bit hashes). A record that cannot be read is no hit.
    /// Only hits read (re-sends: after a restart, at most the forwarder's
    /// window of them), one record each, from the page cache as a rule.
    fn holds(&self, seq: u64, id: &str, oldest_ms: u64) -> bool {
        let Some(offset) = seq.checked_sub(1) else { return false };
        self.log.read(offset, 1, usize::MAX).is_ok_and(|b| {
            b.records.first().is_some_and(|r| r.offset == offset && r.id == id && r.timestamp_ms >= oldest_ms)
        })
    }

    fn publish(self: &Arc<Self>, msg: OutMessage) -> Result<PendingAck, BrokerError> {
        let now = now_ms();
        let key = IdKey::of(&msg.id);
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = ids.advance_to(now);
        if let Some(sent) = ids.find(key, |seq| self.holds(seq, &msg.id, oldest)) {
            let stream = self.name.clone();
            return Ok(async move {
                let sequence = match sent {
                    Sent::Pending(fut) => fut.await.map_err(BrokerError::Unavailable)?,
                    Sent::Stored(seq) => seq,
                };
                Ok(PubAck { stream, sequence, duplicate: true })
            }
            .boxed());
        }
        let mut headers = msg.headers;
        headers.push((SUBJECT_HEADER.to_owned(), msg.subject));
        let record = NewRecord { timestamp_ms: now, id: msg.id, key: None, headers, payload: msg.payload };
        // Larger than a stream segment takes: refused for good (parked by
        // the forwarder), not a broker away (retried for ever).
        let ticket = self.log.submit(std::slice::from_ref(&record)).map_err(|e| match e {
            ferry_log::Error::TooLarge { .. } => BrokerError::TooLarge(e.to_string()),
            e => unavailable(e),
        })?;
        let fut: AckFuture =
            async move { ticket.await.map(|r| r.start + 1).map_err(|e| e.to_string()) }.boxed().shared();
        ids.begin(key, fut.clone(), now);
        drop(ids);
        let me = self.clone();
        Ok(async move {
            let stored = fut.clone().await;
            me.ids.lock().unwrap_or_else(|e| e.into_inner()).end(key, &fut, stored.as_ref().ok().copied(), now);
            let sequence = stored.map_err(BrokerError::Unavailable)?;
            Ok(PubAck { stream: me.name.clone(), sequence, duplicate: false })
        }
        .boxed())
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError> {
        if let Some(s) = self.lock().get(&plan.name) {
            s.ids.lock().unwrap_or_else(|e| e.into_inner()).set_window(plan.duplicate_window);
            return SavedStream::save(&self.dir, plan);
        }
        let dir = self.dir.clone();
        let plan2 = plan.clone();
        let stream = tokio::task::spawn_blocking(move || {
            SavedStream::save(&dir, &plan2)?;
            Stream::open(&dir, &plan2)
        })
        .await
        .map_err(unavailable)??;
        self.lock().entry(plan.name.clone()).or_insert_with(|| Arc::new(stream));
        Ok(())
    }

    async fn ensure_consumer(&self, plan: &ConsumerPlan) -> Result<(), BrokerError> {
        self.consumer(plan).await.map(|_| ())
    }

    async fn consumer(&self, plan: &ConsumerPlan) -> Result<Arc<dyn Consumer>, BrokerError> {
        let stream = self.stream(&plan.stream)?;
        let mut consumers = stream.consumers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = consumers.get(&plan.name) {
            if let Some(start) = c.lock().snap.start.filter(|s| *s != plan.start) {
                return Err(start_changed(plan, start));
            }
            c.update(plan);
            return Ok(Arc::new(EmbeddedConsumer(c.clone())));
        }
        let c = Arc::new(ConsumerState::open(stream.clone(), plan)?);
        consumers.insert(plan.name.clone(), c.clone());
        Ok(Arc::new(EmbeddedConsumer(c)))
    }

    async fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError> {
        let stream = self
            .lock()
            .values()
            .find(|s| msg.subject.starts_with(&s.prefix))
            .cloned()
            .ok_or_else(|| BrokerError::NoStream(msg.subject.clone()))?;
        // Waiting fetches wake on the log's end moving, once it is written.
        stream.publish(msg)
    }

    /// False once a stream's disk failed (a poisoned stream log refuses
    /// publishes until the sidecar restarts), so `/readyz` says so.
    fn is_connected(&self) -> bool {
        !self.lock().values().any(|s| s.log.is_poisoned())
    }
}

/// A consumer's persisted state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Snapshot {
    /// Every sequence below this is settled.
    floor: u64,
    /// The next sequence never delivered.
    next: u64,
    /// Settled sequences at or above `floor` (on disk as runs).
    #[serde(with = "runs")]
    settled: BTreeSet<u64>,
    /// Delivery counts of delivered, unsettled sequences.
    delivered: BTreeMap<u64, u32>,
    /// Where the consumer started, which JetStream cannot change on an
    /// existing consumer either: a plan asking for another is refused, not
    /// silently given the old state. (`None`: saved by an earlier version;
    /// the next plan's is taken.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start: Option<StartPosition>,
}

/// `settled` on disk as runs of consecutive sequences, `[first, last]`:
/// a message stuck at the floor while everything after it is acked costs
/// one run, not a number per ack, so a state stays small (at most about one
/// run per unsettled message). Plain numbers (an earlier version's) are read
/// too.
mod runs {
    use std::collections::BTreeSet;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(set: &BTreeSet<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<[u64; 2]> = Vec::new();
        for &seq in set {
            match runs.last_mut() {
                Some(run) if run[1] + 1 == seq => run[1] = seq,
                _ => runs.push([seq, seq]),
            }
        }
        runs.serialize(s)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Run([u64; 2]),
        One(u64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u64>, D::Error> {
        let mut set = BTreeSet::new();
        for item in Vec::<Item>::deserialize(d)? {
            match item {
                Item::One(seq) => {
                    set.insert(seq);
                }
                Item::Run([first, last]) if first <= last => set.extend(first..=last),
                Item::Run([first, last]) => {
                    return Err(serde::de::Error::custom(format!("settled run [{first}, {last}] runs backwards")))
                }
            }
        }
        Ok(set)
    }
}

struct Live {
    snap: Snapshot,
    /// Unsettled delivered sequences → when they may be delivered again.
    due: BTreeMap<u64, Instant>,
    ack_wait: Duration,
    max_ack_pending: usize,
    generation: u64,
}

struct ConsumerState {
    stream: Arc<Stream>,
    /// Snapshots, one a record; the last one is the state.
    journal: Arc<Log>,
    live: Mutex<Live>,
    wake: Notify,
    write: tokio::sync::Mutex<()>,
    persisted: AtomicU64,
}

impl ConsumerState {
    fn open(stream: Arc<Stream>, plan: &ConsumerPlan) -> Result<Self, BrokerError> {
        Self::open_with(stream, plan, JOURNAL_SEGMENT_BYTES)
    }

    fn open_with(stream: Arc<Stream>, plan: &ConsumerPlan, segment_bytes: u64) -> Result<Self, BrokerError> {
        std::fs::create_dir_all(&stream.dir).map_err(unavailable)?;
        let opts = LogOptions {
            fsync: FsyncMode::Interval(JOURNAL_SYNC_INTERVAL),
            segment_bytes,
            budget: Budget::unlimited(),
            ..LogOptions::default()
        };
        let dir = stream.dir.join(&plan.name);
        let (journal, report) = Log::open(&dir, opts).map_err(unavailable)?;
        // The journal's own directory entry must outlive a power loss too.
        ferry_log::Fs::sync_dir(&ferry_log::StdFs, &stream.dir).map_err(unavailable)?;
        if !report.is_clean() {
            tracing::warn!(consumer = %plan.name, ?report, "embedded broker repaired a consumer journal");
        }
        let refused = |e: serde_json::Error| BrokerError::Refused(format!("{}: {e}", dir.display()));
        // A state file of an earlier version, taken over once.
        let legacy = stream.dir.join(format!("{}.json", plan.name));
        let mut snap: Snapshot = if journal.next_offset() > journal.stats().start_offset {
            let batch = journal.read(journal.next_offset() - 1, 1, usize::MAX).map_err(unavailable)?;
            let last = batch.records.last().ok_or_else(|| unavailable("consumer journal: no last record"))?;
            serde_json::from_slice(&last.payload).map_err(refused)?
        } else if let Ok(bytes) = std::fs::read(&legacy) {
            serde_json::from_slice(&bytes).map_err(refused)?
        } else {
            let start = match plan.start {
                StartPosition::Earliest => stream.log.stats().start_offset + 1,
                // Past what is on disk only: a message still syncing is
                // the new consumer's, and could be lost and sent again.
                StartPosition::Latest => stream.log.durable_offset() + 1,
            };
            Snapshot { floor: start, next: start, start: Some(plan.start), ..Snapshot::default() }
        };
        match snap.start {
            Some(start) if start != plan.start => return Err(start_changed(plan, start)),
            Some(_) => {}
            None => snap.start = Some(plan.start),
        }
        // A power loss can take messages this consumer was given while
        // their sync ran (never acked: acks wait for the disk). Their
        // sequences go to the messages published next (the forwarder's
        // re-sends first), which are new to this consumer.
        let end = stream.last_seq() + 1;
        if snap.next > end {
            tracing::warn!(consumer = %plan.name, next = snap.next, end, "the stream lost messages this consumer was given (a power loss while they synced); their sequences will be delivered afresh");
            snap.next = end;
            snap.floor = snap.floor.min(end);
            snap.delivered.retain(|seq, _| *seq < end);
            snap.settled.retain(|seq| *seq < end);
        }
        // After a restart every delivered, unsettled message is due at once.
        let now = Instant::now();
        let due = snap.delivered.keys().map(|s| (*s, now)).collect();
        let c = ConsumerState {
            stream,
            journal: Arc::new(journal),
            live: Mutex::new(Live {
                snap,
                due,
                ack_wait: plan.ack_wait,
                max_ack_pending: plan.max_ack_pending.max(1) as usize,
                generation: 0,
            }),
            wake: Notify::new(),
            write: tokio::sync::Mutex::new(()),
            persisted: AtomicU64::new(0),
        };
        // The start position is fixed now, durably (a Latest consumer must
        // not move on after a crash, even a power loss). Waited for in
        // place, as opening the journal itself is: one fsync when a
        // consumer first appears.
        let bytes = c.encode()?.0;
        let written = c.journal.submit(&[NewRecord::new(LATEST, bytes)]).map_err(unavailable)?;
        futures::executor::block_on(async {
            written.await?;
            c.journal.sync().await
        })
        .map_err(unavailable)?;
        match std::fs::remove_file(&legacy) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unavailable(e)),
        }
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, plan: &ConsumerPlan) {
        let mut l = self.lock();
        l.ack_wait = plan.ack_wait;
        l.max_ack_pending = plan.max_ack_pending.max(1) as usize;
    }

    /// The state as of now, its generation, and the highest sequence it
    /// says is settled.
    fn encode(&self) -> Result<(bytes::Bytes, u64, u64), BrokerError> {
        let l = self.lock();
        let settled = l.snap.settled.last().copied().unwrap_or(0).max(l.snap.floor.saturating_sub(1));
        Ok((serde_json::to_vec(&l.snap).map_err(unavailable)?.into(), l.generation, settled))
    }

    /// Returns once the state as of now is on disk. Concurrent callers share
    /// one write: whoever gets the lock writes the newest state for all.
    ///
    /// A state never says a sequence is settled before the stream has that
    /// message on disk (a consumer may take it while its sync runs): after a
    /// power loss the stream could give that sequence to another message,
    /// which would then count as acked. Delivered and `next` may run ahead:
    /// after a restart a lost sequence is delivered again at once.
    async fn persist(self: &Arc<Self>) -> Result<(), BrokerError> {
        let wanted = self.lock().generation;
        let _guard = self.write.lock().await;
        if self.persisted.load(AtOrd::Acquire) >= wanted {
            return Ok(());
        }
        let (bytes, generation, settled) = self.encode()?;
        // Sequence s is offset s - 1: durable once the durable offset is ≥ s.
        self.stream.log.wait_durable(settled).await.map_err(unavailable)?;
        let at = self.journal.append(&[NewRecord::new(LATEST, bytes)]).await.map_err(unavailable)?.start;
        self.persisted.fetch_max(generation, AtOrd::AcqRel);
        if at > 0 && at % COMPACT_EVERY == 0 {
            // Off the delivery path: a cursor commit costs three syncs.
            // The record it names is synced first, or a power loss could
            // leave the cursor past the journal's end, the older states gone.
            let journal = self.journal.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = journal.sync_blocking().and_then(|()| journal.commit(LATEST, at)) {
                    tracing::warn!(dir = %journal.dir().display(), error = %e, "could not compact a consumer journal");
                }
            });
        }
        Ok(())
    }

    fn settle_now(&self, seq: u64, how: Settlement) {
        let mut l = self.lock();
        let unsettled = seq >= l.snap.floor && !l.snap.settled.contains(&seq) && seq < l.snap.next;
        if !unsettled {
            return;
        }
        let now = Instant::now();
        match how {
            Settlement::Ack | Settlement::Reject => {
                l.snap.settled.insert(seq);
                l.snap.delivered.remove(&seq);
                l.due.remove(&seq);
                loop {
                    let floor = l.snap.floor;
                    if !l.snap.settled.remove(&floor) {
                        break;
                    }
                    l.snap.floor += 1;
                }
                if l.snap.floor >= l.snap.next {
                    l.snap.floor = l.snap.next;
                }
            }
            Settlement::Retry(delay) => {
                // An absurd delay (the API bounds it) must not overflow.
                l.due.insert(seq, now.checked_add(delay).unwrap_or(now + Duration::from_secs(365 * 86_400)));
            }
            Settlement::Release => {
                l.due.insert(seq, now);
            }
            Settlement::ReleaseUnpushed => {
                // Not an attempt: the next delivery counts this one again.
                if let Some(n) = l.snap.delivered.get_mut(&seq) {
                    *n = n.saturating_sub(1);
                }
                l.due.insert(seq, now);
            }
            Settlement::Progress => {
                let wait = l.ack_wait;
                l.due.insert(seq, now + wait);
            }
        }
        l.generation += 1;
        drop(l);
        self.wake.notify_waiters();
    }

    /// Picks what to deliver now: due redeliveries first (oldest first),
    /// then new messages, within `max_ack_pending`.
    fn take(&self, max: usize) -> Vec<(u64, u32)> {
        let now = Instant::now();
        let mut l = self.lock();
        let ack_wait = l.ack_wait;
        let mut out = Vec::new();
        let due: Vec<u64> = l.due.iter().filter(|(_, t)| **t <= now).map(|(s, _)| *s).take(max).collect();
        for seq in due {
            let n = l.snap.delivered.entry(seq).or_insert(0);
            *n += 1;
            let n = *n;
            l.due.insert(seq, now + ack_wait);
            out.push((seq, n));
        }
        let last = self.stream.last_seq();
        while out.len() < max && l.snap.next <= last && l.due.len() < l.max_ack_pending {
            let seq = l.snap.next;
            l.snap.next += 1;
            l.snap.delivered.insert(seq, 1);
            l.due.insert(seq, now + ack_wait);
            out.push((seq, 1));
        }
        if !out.is_empty() {
            l.generation += 1;
        }
        out
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().due.values().min().copied()
    }
}

struct EmbeddedSettle {
    consumer: Arc<ConsumerState>,
    seq: u64,
}

#[async_trait]
impl Settle for EmbeddedSettle {
    async fn settle(&self, how: Settlement) -> Result<(), BrokerError> {
        self.consumer.settle_now(self.seq, how);
        if how == Settlement::Progress {
            return Ok(());
        }
        self.consumer.persist().await
    }
}

/// A handle to fetch from a consumer.
struct EmbeddedConsumer(Arc<ConsumerState>);

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn leased(&self) -> Result<u64, BrokerError> {
        let now = Instant::now();
        Ok(self.0.lock().due.values().filter(|t| **t > now).count() as u64)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Fetched>, BrokerError> {
        let deadline = Instant::now() + wait;
        let me = &self.0;
        loop {
            let notified = me.wake.notified();
            let mut end = me.stream.log.subscribe();
            let picked = me.take(max.max(1));
            if !picked.is_empty() {
                // The delivery counts go to disk while the app gets the
                // messages, as JetStream keeps them: a crash in between may
                // lose this delivery's count (the message is delivered again
                // with the count it had), never a message. An ack waits for
                // this write (it shares the write lock, and writes later state).
                let persist = me.clone();
                tokio::spawn(async move {
                    if let Err(e) = persist.persist().await {
                        tracing::warn!(error = %e, "embedded broker: could not save a consumer's delivery counts");
                    }
                });
                let mut out = Vec::with_capacity(picked.len());
                for (seq, delivered) in picked {
                    let batch = me.stream.log.read(seq - 1, 1, 1).map_err(unavailable)?;
                    let Some(r) = batch.records.into_iter().find(|r| r.offset == seq - 1) else {
                        // Gone (damaged and skipped by the log): settle it.
                        // (Never past the log's end: `open` keeps the state
                        // within it, and a running stream does not shrink.)
                        if seq <= me.stream.last_seq() {
                            me.settle_now(seq, Settlement::Reject);
                        }
                        continue;
                    };
                    let subject =
                        r.headers.iter().find(|(n, _)| n == SUBJECT_HEADER).map(|(_, v)| v.clone()).unwrap_or_default();
                    let headers = r.headers.into_iter().filter(|(n, _)| n != SUBJECT_HEADER).collect();
                    out.push(Fetched {
                        id: r.id,
                        subject,
                        headers,
                        payload: r.payload,
                        sequence: seq,
                        delivered,
                        published_ms: r.timestamp_ms,
                        settle: Arc::new(EmbeddedSettle { consumer: me.clone(), seq }),
                    });
                }
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = me.next_due().map_or(deadline, |d| d.min(deadline)).max(now + Duration::from_millis(1));
            tokio::select! {
                _ = notified => {}
                _ = end.changed() => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::{consumer_plan, stream_plan, SubscriptionSpec, TopicSpec};

    async fn stream_and_plan(broker: &EmbeddedBroker) -> (Arc<Stream>, ConsumerPlan) {
        broker.ensure_stream(&stream_plan("t", "orders", &TopicSpec::default())).await.unwrap();
        let mut spec = SubscriptionSpec::new("orders", "app");
        spec.start_position = StartPosition::Earliest;
        let plan = consumer_plan("t", "group", &spec, None);
        (broker.stream(&plan.stream).unwrap(), plan)
    }

    fn message(id: &str) -> OutMessage {
        OutMessage {
            subject: "ferry.t.orders.x".into(),
            id: id.into(),
            headers: Vec::new(),
            payload: bytes::Bytes::from_static(b"{}"),
        }
    }

    /// A message larger than a stream segment can never be stored: refused
    /// for good (`TooLarge`, which the forwarder parks), not `Unavailable`
    /// (retried for ever, holding back its topic).
    #[tokio::test]
    async fn a_message_larger_than_a_segment_is_refused_as_too_large() {
        let tmp = tempfile::tempdir().unwrap();
        let broker = EmbeddedBroker::open(tmp.path()).unwrap();
        let _ = stream_and_plan(&broker).await;
        let huge = OutMessage {
            payload: bytes::Bytes::from(vec![0u8; ferry_log::DEFAULT_SEGMENT_BYTES as usize]),
            ..message("huge")
        };
        let refused = match broker.publish(huge).await {
            Ok(pending) => pending.await.err(),
            Err(e) => Some(e),
        };
        assert!(matches!(refused, Some(BrokerError::TooLarge(_))), "{refused:?}");
        let small = broker.publish(message("small")).await.unwrap().await.unwrap();
        assert_eq!(small.sequence, 1, "nothing was stored for the refused one");
    }

    #[tokio::test]
    async fn an_ack_is_saved_only_once_its_message_is_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = ferry_log::memfs::MemFs::new();
        let plan = stream_plan("t", "orders", &TopicSpec::default());
        let mut spec = SubscriptionSpec::new("orders", "app");
        spec.start_position = StartPosition::Earliest;
        let cplan = consumer_plan("t", "group", &spec, None);
        let crashed = {
            let stream = Arc::new(Stream::open_on(Arc::new(fs.clone()), tmp.path(), &plan).unwrap());
            let c = Arc::new(ConsumerState::open(stream.clone(), &cplan).unwrap());
            let broker = EmbeddedBroker {
                dir: tmp.path().to_path_buf(),
                streams: Mutex::new(BTreeMap::from([(plan.name.clone(), stream.clone())])),
            };
            assert!(broker.is_connected());
            // The stream's sync fails: the publish is refused, but the
            // consumer may take the message, written, while the sync ran.
            fs.inject(ferry_log::memfs::Fault::Sync(std::io::ErrorKind::Other));
            assert!(stream.publish(message("lost")).unwrap().await.is_err());
            // The stream refuses publishes from now on, and readiness says so.
            assert!(!broker.is_connected(), "a stream whose disk failed is not a working broker");
            let refused = match broker.publish(message("after")).await {
                Ok(pending) => pending.await.err(),
                Err(e) => Some(e),
            };
            let refused = refused.expect("a poisoned stream refuses publishes");
            assert!(matches!(refused, BrokerError::Unavailable(_)), "{refused:?}");
            let got = EmbeddedConsumer(c.clone()).fetch(1, Duration::from_secs(5)).await.unwrap();
            assert_eq!(got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["lost"]);
            // The fetch's state write (a delivery, nothing settled) runs on
            // its own task and needs nothing synced: it goes through.
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.persisted.load(AtOrd::Acquire) < c.lock().generation {
                assert!(Instant::now() < deadline, "the fetch's state write never ended");
                tokio::task::yield_now().await;
            }
            let err = got[0].settle.settle(Settlement::Ack).await.expect_err("its message is not on disk");
            assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
            drop(got);
            // A consumer that starts at the latest message now starts at
            // the first not on disk, which is that one.
            latest_consumer(&stream, &spec);
            // The power goes now: the unsynced message with it.
            fs.crash(0)
        };
        let stream = Arc::new(Stream::open_on(Arc::new(crashed), tmp.path(), &plan).unwrap());
        assert_eq!(stream.last_seq(), 0, "the power loss took the message");
        let c = EmbeddedConsumer(Arc::new(ConsumerState::open(stream.clone(), &cplan).unwrap()));
        // The consumer was given sequence 1, which the stream no longer has:
        // a fetch now finds nothing, and must not settle that sequence.
        assert!(c.fetch(1, Duration::ZERO).await.unwrap().is_empty());
        // The forwarder's re-send (or another message) gets sequence 1. The
        // consumer's journal must not call it acked, nor skip it.
        let sent = stream.publish(message("next")).unwrap().await.unwrap();
        assert_eq!((sent.sequence, sent.duplicate), (1, false));
        for (c, name) in [(c, "group"), (latest_consumer(&stream, &spec), "latest")] {
            let got = c.fetch(1, Duration::from_secs(5)).await.unwrap();
            let got: Vec<_> = got.iter().map(|m| (m.id.as_str(), m.sequence, m.delivered)).collect();
            assert_eq!(got, [("next", 1, 1)], "consumer {name}");
        }
    }

    fn latest_consumer(stream: &Arc<Stream>, spec: &SubscriptionSpec) -> EmbeddedConsumer {
        let mut latest = spec.clone();
        latest.start_position = StartPosition::Latest;
        let plan = consumer_plan("t", "latest", &latest, None);
        EmbeddedConsumer(Arc::new(ConsumerState::open(stream.clone(), &plan).unwrap()))
    }

    /// Puts `n` messages in the stream (a consumer's state stays within it).
    async fn fill(stream: &Stream, n: u64) {
        let records: Vec<NewRecord> = (0..n).map(|i| NewRecord::new(format!("m{i}"), "{}")).collect();
        stream.log.append(&records).await.unwrap();
    }

    fn journal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum()
    }

    #[tokio::test]
    async fn the_consumer_journal_lets_old_states_go_and_reopens_at_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let broker = Arc::new(EmbeddedBroker::open(tmp.path()).unwrap());
        let (stream, plan) = stream_and_plan(&broker).await;
        let journal_dir = stream.dir.join(&plan.name);
        fill(&stream, 3 * COMPACT_EVERY).await;
        {
            let c = Arc::new(ConsumerState::open_with(stream.clone(), &plan, 8 << 10).unwrap());
            // Each state write is one record of about 60 bytes: 3 × 1024
            // writes fill about 22 segments of 8 KiB.
            for i in 0..3 * COMPACT_EVERY {
                c.lock().snap.floor = i + 1;
                c.lock().generation += 1;
                c.persist().await.unwrap();
            }
            // Compactions run on the blocking pool, each holding the
            // journal: wait until they are done and have deleted segments.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(&c.journal) > 1 || c.journal.stats().start_offset < 2 * COMPACT_EVERY {
                assert!(Instant::now() < deadline, "older segments were never deleted: {:?}", c.journal.stats());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(journal_bytes(&journal_dir) < 120 << 10, "{} bytes kept", journal_bytes(&journal_dir));
        }
        let c = ConsumerState::open_with(stream, &plan, 8 << 10).unwrap();
        assert_eq!(c.lock().snap.floor, 3 * COMPACT_EVERY, "the newest state, not an older one");
    }

    #[test]
    fn settled_sequences_are_written_as_runs_and_read_in_either_form() {
        let snap = Snapshot {
            floor: 1,
            next: 9,
            settled: BTreeSet::from([2, 3, 4, 6, 8]),
            delivered: BTreeMap::from([(1, 3), (5, 1), (7, 1)]),
            start: None,
        };
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains(r#""settled":[[2,4],[6,6],[8,8]]"#), "{json}");
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), snap);
        let earlier = r#"{"floor":1,"next":9,"settled":[2,3,4,6,8],"delivered":{"1":3,"5":1,"7":1}}"#;
        assert_eq!(serde_json::from_str::<Snapshot>(earlier).unwrap(), snap, "an earlier version's form");
        assert!(serde_json::from_str::<Snapshot>(r#"{"floor":1,"next":9,"settled":[[4,2]],"delivered":{}}"#).is_err());
    }

    #[test]
    fn a_message_stuck_at_the_floor_keeps_the_state_small() {
        // One message retried for an hour while a million after it are acked.
        let snap = Snapshot {
            floor: 1,
            next: 1_000_002,
            settled: (2..=1_000_001).collect(),
            delivered: BTreeMap::from([(1, 7)]),
            start: Some(StartPosition::Earliest),
        };
        let bytes = serde_json::to_vec(&snap).unwrap();
        assert!(bytes.len() < 100, "{} bytes", bytes.len());
    }

    #[tokio::test]
    async fn a_state_file_of_an_earlier_version_is_taken_over_once() {
        let tmp = tempfile::tempdir().unwrap();
        let broker = Arc::new(EmbeddedBroker::open(tmp.path()).unwrap());
        let (stream, plan) = stream_and_plan(&broker).await;
        fill(&stream, 8).await;
        std::fs::create_dir_all(&stream.dir).unwrap();
        let legacy = stream.dir.join(format!("{}.json", plan.name));
        let mut old =
            Snapshot { floor: 7, next: 9, settled: BTreeSet::new(), delivered: BTreeMap::from([(8, 2)]), start: None };
        std::fs::write(&legacy, serde_json::to_vec(&old).unwrap()).unwrap();
        let c = ConsumerState::open(stream.clone(), &plan).unwrap();
        old.start = Some(plan.start); // an earlier version's state takes the plan's start
        assert_eq!(c.lock().snap, old);
        assert!(!legacy.exists(), "taken over into the journal");
        drop(c);
        let c = ConsumerState::open(stream, &plan).unwrap();
        assert_eq!(c.lock().snap, old, "read back from the journal");
    }
}
