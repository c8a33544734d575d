//! [`Broker`] inside the sidecar, on `ferry-log`: for a laptop, a demo or a
//! test. One process only (the sidecar's data-dir lock guards it).
//!
//! * A stream is a log under `{dir}/streams/{stream}`; a message's sequence
//!   is its offset + 1 (as in JetStream, sequences start at 1). Its subject
//!   is kept as the header `ferry-subject`.
//! * Publishing dedupes on the message id within the stream's duplicate
//!   window (ids are reloaded from the log at start), and is pipelined:
//!   publishes are queued in call order and confirmed after the fsync.
//! * A consumer keeps an ack floor (every sequence below it is settled),
//!   the settled sequences above it, and the delivery count of each
//!   delivered one. That state is written atomically to
//!   `{dir}/consumers/{stream}/{consumer}.json` before an ack, term or nak
//!   is answered, so after a crash nothing acked is delivered again and
//!   everything unacked is delivered again at once, counts kept.
//!
//! Documented limits against JetStream: retention limits (`maxAge`,
//! `maxBytes`, `maxMessages`) are not enforced (messages are kept until
//! every consumer acked them and the log's segments can go); per-pod
//! consumers are not removed after inactivity; memory storage is stored on
//! disk like file storage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

use super::{Broker, BrokerError, Consumer, Fetched, OutMessage, PendingAck, PubAck, Settle, Settlement};

/// Header keeping a message's subject.
pub const SUBJECT_HEADER: &str = "ferry-subject";

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
    window: Mutex<Duration>,
    /// Recent ids → their (possibly still pending) sequence, and when seen.
    ids: Mutex<HashMap<String, (AckFuture, u64)>>,
    consumers: Mutex<BTreeMap<String, Arc<ConsumerState>>>,
    dir: PathBuf,
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
        let opts = LogOptions { fsync: FsyncMode::Always, budget: Budget::unlimited(), ..LogOptions::default() };
        let (log, report) = Log::open(base.join("streams").join(&plan.name), opts).map_err(unavailable)?;
        if !report.is_clean() {
            tracing::warn!(stream = %plan.name, ?report, "embedded broker repaired its stream log");
        }
        let prefix = plan.subjects.first().map(|s| s.trim_end_matches('>').to_owned()).unwrap_or_default();
        let stream = Stream {
            name: plan.name.clone(),
            prefix,
            log,
            window: Mutex::new(plan.duplicate_window),
            ids: Mutex::new(HashMap::new()),
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
        let mut from = self.log.stats().start_offset;
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        while from < self.log.next_offset() {
            let batch = self.log.read(from, 4096, 4 << 20).map_err(unavailable)?;
            for r in batch.records {
                if r.timestamp_ms >= oldest {
                    let seq = r.offset + 1;
                    ids.insert(r.id, (async move { Ok(seq) }.boxed().shared(), r.timestamp_ms));
                }
            }
            from = batch.next;
        }
        Ok(())
    }

    fn last_seq(&self) -> u64 {
        self.log.next_offset()
    }

    fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError> {
        let window = *self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        // A cached publish that failed (e.g. ENOSPC) stored nothing: it does
        // not make a re-send a duplicate.
        let failed = ids.get(&msg.id).is_some_and(|(fut, _)| matches!(fut.peek(), Some(Err(_))));
        if failed {
            ids.remove(&msg.id);
        }
        if let Some((fut, seen)) = ids.get(&msg.id) {
            if now.saturating_sub(*seen) <= window.as_millis() as u64 {
                let fut = fut.clone();
                let stream = self.name.clone();
                return Ok(async move {
                    let sequence = fut.await.map_err(BrokerError::Unavailable)?;
                    Ok(PubAck { stream, sequence, duplicate: true })
                }
                .boxed());
            }
        }
        let mut headers = msg.headers;
        headers.push((SUBJECT_HEADER.to_owned(), msg.subject));
        let record = NewRecord { timestamp_ms: now, id: msg.id.clone(), key: None, headers, payload: msg.payload };
        let ticket = self.log.submit(std::slice::from_ref(&record)).map_err(unavailable)?;
        let fut: AckFuture =
            async move { ticket.await.map(|r| r.start + 1).map_err(|e| e.to_string()) }.boxed().shared();
        ids.insert(msg.id, (fut.clone(), now));
        // Forget ids past the window now and then, so the map stays bounded.
        if ids.len() > 10_000 && ids.len().is_power_of_two() {
            ids.retain(|_, (_, seen)| now.saturating_sub(*seen) <= window.as_millis() as u64);
        }
        drop(ids);
        let stream = self.name.clone();
        Ok(async move {
            let sequence = fut.await.map_err(BrokerError::Unavailable)?;
            Ok(PubAck { stream, sequence, duplicate: false })
        }
        .boxed())
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError> {
        if let Some(s) = self.lock().get(&plan.name) {
            *s.window.lock().unwrap_or_else(|e| e.into_inner()) = plan.duplicate_window;
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
        // Waiting fetches wake on the log's end moving, once it is durable.
        stream.publish(msg)
    }

    fn is_connected(&self) -> bool {
        true
    }
}

/// A consumer's persisted state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Snapshot {
    /// Every sequence below this is settled.
    floor: u64,
    /// The next sequence never delivered.
    next: u64,
    /// Settled sequences at or above `floor`.
    settled: BTreeSet<u64>,
    /// Delivery counts of delivered, unsettled sequences.
    delivered: BTreeMap<u64, u32>,
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
    path: PathBuf,
    live: Mutex<Live>,
    wake: Notify,
    write: tokio::sync::Mutex<()>,
    persisted: AtomicU64,
}

impl ConsumerState {
    fn open(stream: Arc<Stream>, plan: &ConsumerPlan) -> Result<Self, BrokerError> {
        std::fs::create_dir_all(&stream.dir).map_err(unavailable)?;
        let path = stream.dir.join(format!("{}.json", plan.name));
        let snap = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| BrokerError::Refused(format!("{}: {e}", path.display())))?
            }
            Err(_) => {
                let start = match plan.start {
                    StartPosition::Earliest => stream.log.stats().start_offset + 1,
                    StartPosition::Latest => stream.last_seq() + 1,
                };
                Snapshot { floor: start, next: start, ..Snapshot::default() }
            }
        };
        // After a restart every delivered, unsettled message is due at once.
        let now = Instant::now();
        let due = snap.delivered.keys().map(|s| (*s, now)).collect();
        let c = ConsumerState {
            stream,
            path,
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
        c.write_snapshot()?;
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

    fn write_snapshot(&self) -> Result<(), BrokerError> {
        let (bytes, generation) = {
            let l = self.lock();
            (serde_json::to_vec(&l.snap).map_err(unavailable)?, l.generation)
        };
        let dir = self.path.parent().expect("consumer files live in a directory");
        let name = self.path.file_name().and_then(|n| n.to_str()).expect("a UTF-8 file name");
        ferry_log::fs::write_atomic(&ferry_log::StdFs, dir, name, &bytes).map_err(unavailable)?;
        self.persisted.fetch_max(generation, AtOrd::AcqRel);
        Ok(())
    }

    /// Returns once the state as of now is on disk. Concurrent callers share
    /// one write: whoever gets the lock writes the newest state for all.
    async fn persist(self: &Arc<Self>) -> Result<(), BrokerError> {
        let wanted = self.lock().generation;
        let _guard = self.write.lock().await;
        if self.persisted.load(AtOrd::Acquire) >= wanted {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.write_snapshot()).await.map_err(unavailable)?
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
                l.due.insert(seq, now + delay);
            }
            Settlement::Release => {
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
                // Delivery counts must survive a crash before the app sees them.
                me.persist().await?;
                let mut out = Vec::with_capacity(picked.len());
                for (seq, delivered) in picked {
                    let batch = me.stream.log.read(seq - 1, 1, 1).map_err(unavailable)?;
                    let Some(r) = batch.records.into_iter().find(|r| r.offset == seq - 1) else {
                        // Gone (damaged and skipped by the log): settle it.
                        me.settle_now(seq, Settlement::Reject);
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
