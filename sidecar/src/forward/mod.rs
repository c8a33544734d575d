//! The forwarder: one ordered, pipelined pipeline per topic from the outbox
//! log to the broker.
//!
//! It reads from the `forwarded` cursor, publishes each record with its id
//! as `Nats-Msg-Id`, keeps up to [`WINDOW`] publishes in flight, and moves
//! the confirmed offset forward as acks arrive in order. On any failure it
//! drops what is in flight and starts again from the first unconfirmed
//! record after a capped exponential backoff; records the broker already has
//! come back as duplicates, which count as confirmed. The cursor is
//! committed (durably) at most every [`COMMIT_EVERY`], so a crash re-sends
//! at most that much, and the broker's duplicate window drops the re-sends.
//! A record the broker refuses for good (too large) is parked and passed,
//! so it cannot hold its topic back (see [`crate::outbox`]).
//!
//! With a replay window (`--outbox-retention`) each commit also moves the
//! `retained` cursor to what was confirmed at least that long ago, so
//! forwarded records stay that long after the broker confirmed them (the
//! broker may lose what it confirmed but had not synced yet). A [`Rewind`]
//! (a replay) sends the forwarder back to an earlier offset: it forwards
//! from there again, with the same message ids, so the broker drops what it
//! still holds within its duplicate window and stores the rest again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::naming;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::broker::{Broker, BrokerError, OutMessage, PendingAck};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, TopicLog, FORWARDED, RETAINED};

/// Most publishes awaiting confirmation per topic.
pub const WINDOW: usize = 1024;
/// Most publishes awaiting confirmation across all of a sidecar's topics
/// (bounds the memory of pending acks when many topics have a backlog).
/// A forwarder waits for room only while it has nothing in flight itself,
/// so forwarders never wait on each other's room in a circle.
pub const MAX_IN_FLIGHT: usize = 8192;

/// Room for publishes in flight, shared by a sidecar's forwarders.
pub fn shared_room() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_IN_FLIGHT))
}
/// Most records read from the log at once.
pub const READ_BATCH: usize = 256;
/// How often the confirmed offset is made durable. A commit costs three
/// fsyncs (temp file, rename, directory), which make the file system's
/// journal stall the produce path's fdatasync: at every 100 ms they set
/// the p99 of produce at 5k msg/s (4.8 ms, against 2.0 ms at every 1 s and
/// 0.27 ms for a raw fdatasync). A crash re-sends at most this much, which
/// the broker's duplicate window drops.
pub const COMMIT_EVERY: Duration = Duration::from_millis(1000);
/// How long the broker must go on refusing a record as too large before it
/// is parked (re-sent with backoff meanwhile, about six times).
pub const PARK_AFTER: Duration = Duration::from_secs(3);
/// How many refusals in a row, at the least, before a record is parked.
pub const PARK_AFTER_REFUSALS: u32 = 3;
/// First retry delay after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Too-large refusals of one record in a row. A refusal that passes (a
/// limit lowered for a moment, a client that has not yet read the server's
/// `max_payload` after a reconnect) must not park a record: it is parked
/// only once refused [`PARK_AFTER_REFUSALS`] times over [`PARK_AFTER`] with
/// nothing else in between (another error, such as the broker going away,
/// starts the count again).
#[derive(Debug, Default)]
pub struct Refusals {
    current: Option<(u64, Instant, u32)>,
}

impl Refusals {
    /// Counts a refusal of the record at `offset` at `now`; true once it is
    /// to be parked.
    pub fn refused(&mut self, offset: u64, now: Instant) -> bool {
        match &mut self.current {
            Some((at, since, count)) if *at == offset => {
                *count += 1;
                *count >= PARK_AFTER_REFUSALS && now.duration_since(*since) >= PARK_AFTER
            }
            _ => {
                self.current = Some((offset, now, 1));
                false
            }
        }
    }

    /// Something other than a too-large refusal happened: start again.
    pub fn interrupted(&mut self) {
        self.current = None;
    }
}

/// When forwarded records may go: the confirmed offset at each commit,
/// and when, kept for the replay window.
#[derive(Debug)]
struct Window {
    keep: Duration,
    /// (when, confirmed offset), oldest first.
    marks: VecDeque<(Instant, u64)>,
}

impl Window {
    /// Most marks kept: past this many, a new one waits until the last is
    /// `keep / MAX_MARKS` old (records then stay a little longer).
    const MAX_MARKS: u32 = 1024;

    fn new(keep: Duration, now: Instant, forwarded: u64) -> Self {
        Window { keep, marks: VecDeque::from([(now, forwarded)]) }
    }

    /// A replay went back to `from`: what is above it is not confirmed
    /// any more, so no mark may let it go before it is again.
    fn rewound(&mut self, from: u64) {
        for mark in &mut self.marks {
            mark.1 = mark.1.min(from);
        }
    }

    /// Notes that everything below `forwarded` is confirmed at `now`;
    /// returns the highest offset below which everything was confirmed at
    /// least `keep` ago, if a mark that old was there.
    fn retained(&mut self, now: Instant, forwarded: u64) -> Option<u64> {
        let spacing = (self.keep / Self::MAX_MARKS).max(COMMIT_EVERY);
        let due = self.marks.back().is_none_or(|&(at, o)| o != forwarded && now.duration_since(at) >= spacing);
        if due {
            self.marks.push_back((now, forwarded));
        }
        let mut passed = None;
        while let Some(&(at, offset)) = self.marks.front() {
            if now.duration_since(at) < self.keep {
                break;
            }
            passed = Some(offset);
            self.marks.pop_front();
        }
        passed
    }
}

/// A request to forward again from an earlier offset (a replay).
#[derive(Debug)]
pub struct Rewind {
    /// The offset to forward from (at most the confirmed one).
    pub from: u64,
    /// Told the range forwarded again, once the forwarder went back.
    pub done: oneshot::Sender<std::ops::Range<u64>>,
}

/// What the rest of the sidecar holds of a topic's forwarder.
#[derive(Debug, Clone)]
pub struct Link {
    /// First offset not yet confirmed by the broker.
    pub confirmed: watch::Receiver<u64>,
    /// Sends it back to an earlier offset (a replay).
    pub rewind: mpsc::Sender<Rewind>,
}

/// Handle to one topic's forwarder.
#[derive(Debug)]
pub struct Forwarder {
    /// Topic.
    pub topic: String,
    /// Its confirmed offset and its rewind handle.
    pub link: Link,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Forwarder {
    /// Starts forwarding a topic of the sidecar `s`, within the publishes
    /// in flight `room` shared with its other topics.
    pub fn start(s: &crate::state::Sidecar, tl: Arc<TopicLog>, room: Arc<Semaphore>) -> Self {
        let (outbox, broker, metrics) = (s.outbox.clone(), s.broker.clone(), s.metrics.clone());
        let retention = s.config.outbox_retention;
        let start = tl.log.cursor(FORWARDED).unwrap_or(0);
        let (confirmed_tx, confirmed) = watch::channel(start);
        let (stop, stop_rx) = watch::channel(false);
        let (rewind, rewinds) = mpsc::channel(4);
        let window = (!retention.is_zero()).then(|| Window::new(retention, Instant::now(), start));
        let topic = tl.topic.clone();
        let labels = crate::metrics::TopicLabels { topic: topic.clone() };
        let forwarded = metrics.forward_messages.get_or_create(&labels).clone();
        let errors = metrics.forward_errors.get_or_create(&labels).clone();
        let parked = metrics.forward_parked.get_or_create(&labels).clone();
        let outbox_records = metrics.outbox_records.get_or_create(&labels).clone();
        let outbox_bytes = metrics.outbox_bytes.get_or_create(&labels).clone();
        let ctx = Ctx {
            namespace: s.config.namespace.clone(),
            recovered_end: tl.log.next_offset(),
            forwarded,
            errors,
            parked,
            outbox_records,
            outbox_bytes,
            committing: None,
            stream_missing: s.stream_missing.clone(),
            room,
            refused: Refusals::default(),
            tl,
            outbox,
            broker,
            metrics,
            confirmed: confirmed_tx,
            stop: stop_rx,
            rewinds,
            parked_skip: Default::default(),
            window,
        };
        let task = tokio::spawn(ctx.run());
        Forwarder { topic, link: Link { confirmed, rewind }, task, stop }
    }

    /// Stops the forwarder and commits what was confirmed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Ctx {
    namespace: String,
    tl: Arc<TopicLog>,
    outbox: Arc<Outbox>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    confirmed: watch::Sender<u64>,
    stop: watch::Receiver<bool>,
    /// Records below this were in the log at start: their ids are told to
    /// the outbox's tracker as they are read (later ones it saw produced).
    recovered_end: u64,
    // Metric handles, looked up once.
    forwarded: prometheus_client::metrics::counter::Counter,
    errors: prometheus_client::metrics::counter::Counter,
    parked: prometheus_client::metrics::counter::Counter,
    outbox_records: prometheus_client::metrics::gauge::Gauge,
    outbox_bytes: prometheus_client::metrics::gauge::Gauge,
    /// A cursor commit running on the blocking pool (three fsyncs: never on
    /// a runtime worker, where it would stall produce calls).
    committing: Option<tokio::task::JoinHandle<()>>,
    /// Told when the broker has no stream for the topic (it lost its store,
    /// or someone deleted it): the sidecar then ensures its streams again.
    stream_missing: Arc<tokio::sync::Notify>,
    /// Room for publishes in flight, shared with the other topics' forwarders.
    room: Arc<Semaphore>,
    /// The record the broker refuses as too large, since when and how often.
    refused: Refusals,
    /// Replays asked for.
    rewinds: mpsc::Receiver<Rewind>,
    /// Records at or after the confirmed offset that were parked before
    /// (offset → id): read again (a replay, a restart before the cursor
    /// passed them), they are passed, not sent again (the broker refused
    /// them for good). Usually empty.
    parked_skip: std::collections::HashMap<u64, String>,
    /// The replay window (`None`: forwarded records go at once).
    window: Option<Window>,
}

/// Sets a record the broker refuses for good aside in the outbox's parked
/// log (see [`crate::outbox`]), counts and logs it.
async fn park(
    outbox: &Outbox,
    parked: &prometheus_client::metrics::counter::Counter,
    topic: &str,
    rec: &ferry_log::Record,
    reason: &str,
) -> Result<(), BrokerError> {
    outbox
        .park_record(topic, rec, reason)
        .await
        .map_err(|e| BrokerError::Unavailable(format!("parking message {:?}: {e}", rec.id)))?;
    parked.inc();
    tracing::error!(%topic, id = %rec.id, offset = rec.offset, %reason, "the broker refuses this message for good; parked it on the data volume and went on");
    Ok(())
}

/// Where the `forwarded` cursor may be committed: at what the broker
/// confirmed, but, where records are forwarded while their sync runs, never
/// past what is on disk. Else a power loss (or a failed sync) could leave
/// the cursor past the reopened log's end, over records acknowledged after
/// the restart, were the reopen unable to write the moved-back cursor.
fn committable(log: &ferry_log::Log, confirmed: u64) -> u64 {
    if log.options().fsync == ferry_log::FsyncMode::Always {
        confirmed.min(log.durable_offset())
    } else {
        confirmed
    }
}

/// A publish awaiting its ack, with what to record when it comes; or, with
/// no id, damaged records skipped up to `offset`, confirmed in their turn.
struct InFlight {
    offset: u64,
    id: Option<String>,
    sent: Instant,
}

/// An entry of the ack queue: its ack (`None` for skipped records) or why
/// it failed.
type Pending = futures::future::BoxFuture<'static, (InFlight, Result<Option<crate::broker::PubAck>, BrokerError>)>;

enum Outcome {
    Stopped,
    Failed(BrokerError),
    Rewind(Rewind),
}

impl Ctx {
    async fn run(mut self) {
        self.set_up_window().await;
        let start = *self.confirmed.borrow();
        self.load_parked(start).await;
        let mut backoff = BACKOFF_MIN;
        loop {
            let before = *self.confirmed.borrow();
            match self.pipeline().await {
                Outcome::Stopped => break,
                Outcome::Rewind(r) => {
                    self.rewind(r).await;
                    backoff = BACKOFF_MIN;
                }
                Outcome::Failed(e) => {
                    if matches!(e, BrokerError::NoStream(_)) {
                        self.stream_missing.notify_one();
                    }
                    if !matches!(e, BrokerError::TooLarge(_)) {
                        self.refused.interrupted();
                    }
                    if *self.confirmed.borrow() > before {
                        backoff = BACKOFF_MIN;
                    }
                    self.errors.inc();
                    tracing::warn!(topic = %self.tl.topic, error = %e, retry_in = ?backoff, "forwarding failed; will re-send from the first unconfirmed message");
                    self.commit().await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => break,
                        // Taken at once also while the broker is away.
                        Some(r) = self.rewinds.recv() => self.rewind(r).await,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            if *self.stop.borrow() {
                break;
            }
        }
        self.commit().await;
    }

    /// Goes back to `r.from` (at most the confirmed offset), commits it,
    /// and says what is forwarded again.
    async fn rewind(&mut self, r: Rewind) {
        if let Some(h) = self.committing.take() {
            let _ = h.await;
        }
        let to = *self.confirmed.borrow();
        // Not below the first record kept (deleted since the caller looked).
        let from = r.from.max(self.tl.log.stats().start_offset).min(to);
        self.load_parked(from).await;
        if let Some(w) = &mut self.window {
            w.rewound(from);
        }
        self.confirmed.send_replace(from);
        // The window's start goes back with it, so the records sent again
        // are kept for the window again.
        let (tl, committed) = (self.tl.clone(), committable(&self.tl.log, from));
        let result = tokio::task::spawn_blocking(move || {
            tl.log.commit_with(|c| {
                c.insert(FORWARDED.to_owned(), committed);
                if let Some(retained) = c.get_mut(RETAINED) {
                    *retained = (*retained).min(committed);
                }
            })
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!(topic = %self.tl.topic, "could not commit the replay's start; it is committed with the next progress");
        }
        // Segments deleted before that commit (the window given up for room
        // meanwhile) are not replayed: say where it really starts.
        let from = from.max(self.tl.log.stats().start_offset).min(to);
        tracing::info!(topic = %self.tl.topic, from, to, "replaying: forwarding these records again");
        let _ = r.done.send(from..to);
    }

    /// Loads the records parked at offsets from `from` on, to be passed.
    async fn load_parked(&mut self, from: u64) {
        let (outbox, topic) = (self.outbox.clone(), self.tl.topic.clone());
        self.parked_skip = match tokio::task::spawn_blocking(move || outbox.parked_from(&topic, from)).await {
            Ok(Ok(parked)) => parked,
            _ => {
                tracing::warn!(topic = %self.tl.topic, "could not read the parked messages; any read again are sent again and parked again");
                Default::default()
            }
        };
    }

    /// With a replay window, makes sure the `retained` cursor exists before
    /// anything is committed (without it, a `forwarded` commit alone would
    /// let forwarded segments go); without one, removes a `retained` cursor
    /// left by an earlier run, which would keep them for ever.
    async fn set_up_window(&mut self) {
        let tl = self.tl.clone();
        let on = self.window.is_some();
        let forwarded = tl.log.cursor(FORWARDED).unwrap_or(0);
        let result = tokio::task::spawn_blocking(move || match (on, tl.log.cursor(RETAINED)) {
            (true, None) => tl.log.commit(RETAINED, forwarded),
            (false, Some(_)) => tl.log.remove_cursor(RETAINED),
            _ => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = result {
            // Without it, forwarded records go once confirmed, as without a
            // window; the next start tries again.
            tracing::warn!(topic = %self.tl.topic, error = %e, "could not set up the replay window's cursor");
        }
    }

    /// Starts persisting the confirmed offset as the `forwarded` cursor (and
    /// with a replay window, the `retained` one; so letting retention delete
    /// forwarded segments) unless a commit is still running.
    fn start_commit(&mut self) {
        if self.committing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let confirmed = committable(&self.tl.log, *self.confirmed.borrow());
        self.update_gauges();
        if !self.parked_skip.is_empty() {
            // Passed for good once confirmed (a failure before re-reads them).
            let passed = *self.confirmed.borrow();
            self.parked_skip.retain(|&offset, _| offset >= passed);
        }
        let current = self.tl.log.cursor(RETAINED);
        let retained = self
            .window
            .as_mut()
            .and_then(|w| w.retained(Instant::now(), confirmed))
            .filter(|&r| current.is_some_and(|c| r > c));
        if self.tl.log.cursor(FORWARDED) == Some(confirmed) && retained.is_none() {
            return;
        }
        let tl = self.tl.clone();
        self.committing = Some(tokio::task::spawn_blocking(move || {
            let result = tl.log.commit_with(|c| {
                c.insert(FORWARDED.to_owned(), confirmed);
                // Only raised, and only where it exists: the outbox may have
                // given the window up for room meanwhile.
                if let (Some(r), Some(current)) = (retained, c.get_mut(RETAINED)) {
                    *current = (*current).max(r);
                }
            });
            if let Err(e) = result {
                tracing::warn!(topic = %tl.topic, error = %e, "could not commit the forwarded offset; will retry");
            }
        }));
    }

    /// Commits now and waits for it (on failure and when stopping).
    async fn commit(&mut self) {
        if let Some(h) = self.committing.take() {
            let _ = h.await;
        }
        self.start_commit();
        if let Some(h) = self.committing.take() {
            let _ = h.await;
        }
    }

    fn update_gauges(&self) {
        let stats = self.tl.log.stats();
        let confirmed = *self.confirmed.borrow();
        self.outbox_records.set(stats.next_offset.saturating_sub(confirmed) as i64);
        self.outbox_bytes.set(stats.bytes as i64);
    }

    fn message(&self, rec: &ferry_log::Record) -> OutMessage {
        let partition = naming::partition_of(rec.key.as_deref(), self.tl.partitions());
        let mut headers = rec.headers.clone();
        if let Some(key) = &rec.key {
            headers.push((naming::headers::KEY.to_owned(), key.clone()));
        }
        OutMessage {
            subject: naming::message_subject(&self.namespace, &self.tl.topic, partition),
            id: rec.id.clone(),
            headers,
            payload: rec.payload.clone(),
        }
    }

    /// Publishes from the first unconfirmed record until stopped or failed.
    async fn pipeline(&mut self) -> Outcome {
        let tl = self.tl.clone();
        let log = &tl.log;
        let mut end = log.subscribe();
        let mut next_read = *self.confirmed.borrow();
        let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
        // A record refused before it was sent waits in the ack queue: until
        // its turn, nothing is read past it.
        let mut held = false;
        // The broker connection the publishes in flight went out on; all of
        // them on one (see `Broker::connection_epoch`).
        let mut sent_on = self.broker.connection_epoch();
        let mut last_commit = Instant::now();
        let mut ticker = tokio::time::interval(COMMIT_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Fill the window from the log, as far as the shared room allows.
            let mut out_of_room = false;
            while !out_of_room && !held && in_flight.len() < WINDOW && next_read < log.next_offset() {
                // No more than the room left (one at least, to wait for):
                // else most of a read is thrown away when the room is short.
                let want = READ_BATCH.min(WINDOW - in_flight.len()).min(self.room.available_permits().max(1));
                let batch = match log.read(next_read, want, 1 << 20) {
                    Ok(b) => b,
                    Err(e) => return Outcome::Failed(BrokerError::Unavailable(format!("reading the outbox: {e}"))),
                };
                for rec in &batch.records {
                    if self.parked_skip.get(&rec.offset).is_some_and(|id| *id == rec.id) {
                        // Parked before: passed in its turn.
                        let info = InFlight { offset: rec.offset, id: None, sent: Instant::now() };
                        in_flight.push_back(Box::pin(async move { (info, Ok(None)) }));
                        next_read = rec.offset + 1;
                        continue;
                    }
                    let permit = match self.room.clone().try_acquire_owned() {
                        Ok(p) => p,
                        // Others hold the room: wait for this topic's own acks,
                        // which free room, rather than for theirs.
                        Err(_) if !in_flight.is_empty() => {
                            out_of_room = true;
                            break;
                        }
                        // Holding nothing, waiting cannot block anyone.
                        Err(_) => tokio::select! {
                            p = self.room.clone().acquire_owned() => p.expect("the room is never closed"),
                            _ = self.stop.changed() => return Outcome::Stopped,
                        },
                    };
                    if rec.offset < self.recovered_end {
                        self.outbox.pending_seen(&self.tl.topic, &rec.id, rec.offset);
                    }
                    // The connection dropped and came back with publishes
                    // unconfirmed: one may be lost, its ack due only at its
                    // timeout. Sending this one now would store it before
                    // that one's re-send: send again from the first, in order
                    // (those that did arrive are duplicates, dropped).
                    let epoch = self.broker.connection_epoch();
                    if in_flight.is_empty() {
                        sent_on = epoch;
                    } else if sent_on != epoch {
                        return Outcome::Failed(BrokerError::Unavailable(
                            "the broker connection was lost and made again while publishes were unconfirmed".into(),
                        ));
                    }
                    let pending: PendingAck = match self.broker.publish(self.message(rec)).await {
                        Ok(p) => p,
                        // Never sent (over the server's max_payload): its
                        // refusal is handled in its turn, like an ack's.
                        // Nothing after it is sent until its fate is known:
                        // were it taken on a later try, it would land after
                        // them.
                        Err(BrokerError::TooLarge(reason)) => {
                            let info = InFlight { offset: rec.offset, id: Some(rec.id.clone()), sent: Instant::now() };
                            drop(permit);
                            in_flight.push_back(Box::pin(async move { (info, Err(BrokerError::TooLarge(reason))) }));
                            next_read = rec.offset + 1;
                            held = true;
                            break;
                        }
                        Err(e) => return Outcome::Failed(e),
                    };
                    let info = InFlight { offset: rec.offset, id: Some(rec.id.clone()), sent: Instant::now() };
                    in_flight.push_back(Box::pin(async move {
                        let acked = pending.await.map(Some);
                        drop(permit);
                        (info, acked)
                    }));
                    next_read = rec.offset + 1;
                }
                if out_of_room || held {
                    break;
                }
                if batch.next > next_read {
                    // Damaged records were skipped at the batch's end: nothing
                    // to publish, they are confirmed once everything before is.
                    if in_flight.is_empty() {
                        let _ = self.confirmed.send(batch.next);
                    } else {
                        let info = InFlight { offset: batch.next - 1, id: None, sent: Instant::now() };
                        in_flight.push_back(Box::pin(async move { (info, Ok(None)) }));
                    }
                }
                next_read = batch.next;
            }
            tokio::select! {
                biased;
                _ = self.stop.changed() => return Outcome::Stopped,
                Some(r) = self.rewinds.recv() => return Outcome::Rewind(r),
                Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                    // Take every ack already there, then move the watermark once.
                    let mut next = Some(first);
                    let mut confirmed = None;
                    while let Some((info, result)) = next.take() {
                        match result {
                            Ok(ack) => {
                                if let (Some(id), Some(ack)) = (&info.id, ack) {
                                    self.outbox.confirmed(&self.tl.topic, id, info.offset, &ack.stream, ack.sequence);
                                    self.forwarded.inc();
                                    self.metrics.forward_duration.observe(info.sent.elapsed().as_secs_f64());
                                }
                                confirmed = Some(info.offset + 1);
                            }
                            // Stored by the broker up to here (acks come in
                            // order); this one it will never take, if it
                            // still says so after PARK_AFTER: set it aside
                            // and go on.
                            Err(BrokerError::TooLarge(reason)) if info.id.is_some() && self.refused.refused(info.offset, Instant::now()) => {
                                let parked = match log.read(info.offset, 1, usize::MAX) {
                                    Ok(b) => match b.records.into_iter().find(|r| r.offset == info.offset) {
                                        Some(rec) => park(&self.outbox, &self.parked, &self.tl.topic, &rec, &reason).await,
                                        None => Ok(()), // gone from the log: nothing left to set aside
                                    },
                                    Err(e) => Err(BrokerError::Unavailable(format!("reading the outbox: {e}"))),
                                };
                                if let Err(e) = parked {
                                    if let Some(c) = confirmed {
                                        let _ = self.confirmed.send(c);
                                    }
                                    return Outcome::Failed(e);
                                }
                                confirmed = Some(info.offset + 1);
                                held = false;
                            }
                            Err(e) => {
                                if let Some(c) = confirmed {
                                    let _ = self.confirmed.send(c);
                                }
                                return Outcome::Failed(e);
                            }
                        }
                        next = in_flight.next().now_or_never().flatten();
                    }
                    if let Some(c) = confirmed {
                        let _ = self.confirmed.send(c);
                    }
                }
                _ = end.changed(), if in_flight.len() < WINDOW => {}
                // Wakes an idle pipeline for the commit below.
                _ = ticker.tick() => {}
            }
            // Whichever branch ran: while a backlog drains an ack is ready
            // at every turn and the ticker never is, and a commit only from
            // the ticker would free no segment until the drain ended.
            if last_commit.elapsed() >= COMMIT_EVERY {
                self.start_commit();
                last_commit = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn a_record_is_parked_only_after_refusals_in_a_row_over_park_after() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Refusals::default();
        assert!(!r.refused(7, at(0)));
        assert!(!r.refused(7, at(100)));
        assert!(!r.refused(7, at(2_900)), "three refusals, but not over PARK_AFTER yet");
        assert!(r.refused(7, at(3_000)));
        // Another error in between starts again, however long it has been.
        let mut r = Refusals::default();
        assert!(!r.refused(7, at(0)));
        assert!(!r.refused(7, at(100)));
        r.interrupted();
        assert!(!r.refused(7, at(5_000)));
        assert!(!r.refused(7, at(5_100)));
        assert!(!r.refused(7, at(6_000)), "three in a row, but only 1 s since the first of them");
        // Once over PARK_AFTER, still three in a row are needed.
        let mut r = Refusals::default();
        assert!(!r.refused(7, at(0)));
        assert!(!r.refused(7, at(10_000)), "two refusals");
        assert!(r.refused(7, at(10_100)));
        // Another record starts its own count.
        assert!(!r.refused(8, at(20_000)));
    }
}

#[cfg(test)]
mod commit_tests {
    use std::sync::Arc;

    use ferry_log::memfs::{Fault, MemFs};
    use ferry_log::{FsyncMode, Log, LogOptions, NewRecord};

    use super::committable;

    fn record(id: &str) -> NewRecord {
        NewRecord { timestamp_ms: 1, id: id.to_owned(), key: None, headers: vec![], payload: "x".into() }
    }

    #[test]
    fn the_forwarded_cursor_is_never_committed_past_what_is_on_disk() {
        let fs = Arc::new(MemFs::new());
        let opts = LogOptions { fsync: FsyncMode::Always, readable_before_sync: true, ..LogOptions::default() };
        let (log, _) = Log::open_with(fs.clone(), "/outbox/orders", opts).unwrap();
        log.append_blocking(&[record("a")]).unwrap();
        assert_eq!(committable(&log, 1), 1);
        // `b` was readable, so forwarded and confirmed, but its sync failed.
        fs.inject(Fault::Sync(std::io::ErrorKind::Other));
        log.append_blocking(&[record("b")]).unwrap_err();
        assert_eq!(log.next_offset(), 2);
        assert_eq!(committable(&log, 2), 1);
        // A log synced only now and then is committed as confirmed (its
        // records are forwarded once written, as before).
        let opts = LogOptions { fsync: FsyncMode::Never, ..LogOptions::default() };
        let (never, _) = Log::open_with(fs, "/outbox/audit", opts).unwrap();
        never.append_blocking(&[record("c"), record("d")]).unwrap();
        assert_eq!(committable(&never, 2), 2);
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn records_are_retained_until_they_were_confirmed_keep_ago() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Window::new(Duration::from_secs(60), at(0), 10);
        assert_eq!(w.retained(at(1), 20), None, "nothing was confirmed a minute ago yet");
        assert_eq!(w.retained(at(30), 50), None);
        // Everything below 10 was confirmed at 0, below 20 at 1.
        assert_eq!(w.retained(at(60), 50), Some(10));
        assert_eq!(w.retained(at(61), 50), Some(20));
        assert_eq!(w.retained(at(89), 50), None, "50 was first seen at 30");
        assert_eq!(w.retained(at(90), 50), Some(50));
        // An unchanged offset adds no mark: nothing more to give.
        assert_eq!(w.retained(at(500), 50), None);
    }

    #[test]
    fn after_a_replay_nothing_above_its_start_goes_before_it_is_confirmed_again() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Window::new(Duration::from_secs(60), at(0), 0);
        assert_eq!(w.retained(at(10), 900), None);
        assert_eq!(w.retained(at(50), 1000), None);
        // A replay from 10 at 55: 10..1000 are not confirmed any more.
        w.rewound(10);
        assert_eq!(w.retained(at(56), 20), None);
        assert_eq!(w.retained(at(70), 30), Some(10), "the mark of 900 (at 10) now says 10");
        assert_eq!(w.retained(at(110), 40), Some(10), "the mark of 1000 (at 50) too");
        assert_eq!(w.retained(at(116), 40), Some(20), "confirmed again at 56");
        assert_eq!(w.retained(at(130), 40), Some(30));
    }

    #[test]
    fn marks_are_spaced_so_a_long_window_keeps_a_bounded_number() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(24 * 3600);
        let mut w = Window::new(keep, t0, 0);
        // A commit every second for a day, each with progress.
        for s in 1..=24 * 3600u64 {
            assert_eq!(w.retained(t0 + Duration::from_secs(s) - Duration::from_millis(1), s), None);
        }
        assert!(w.marks.len() <= Window::MAX_MARKS as usize + 1, "{} marks", w.marks.len());
        // A day after the start, what was confirmed then may go; later
        // records are held at least a day (a little longer, by the spacing).
        let released = w.retained(t0 + keep + Duration::from_secs(100), 86_500).unwrap();
        assert!(released <= 100, "{released}");
    }
}
