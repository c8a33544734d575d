//! One subscription's delivery loop, and how each message is settled.
//!
//! Attempts: the broker's delivery count, plus retries done here. With
//! `ordering: None` a retry is a nak-with-delay (the slot is freed, the
//! broker redelivers after the delay and counts the attempt); with `Key` or
//! `Strict` the message is retried here, holding its key, so later messages
//! of the key wait behind it. Either way `maxDeliveries` counts every
//! attempt once. A retry after a sidecar crash restarts from the broker's
//! count (local retries are not persisted).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::naming::{self, headers};
use ferry_api::subscription::{DeliveryMode, Ordering};
use ferry_api::SubscriptionSpec;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::callbacks::{Callback, Verdict};
use super::dedupe::{Dedupe, DedupeMetrics};
use super::push::{self, Outcome, Target};
use super::Deps;
use crate::broker::{BrokerError, Consumer, Fetched, OutMessage, Settle, Settlement};
use crate::metrics::{DeliveryLabels, SubscriptionLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Longest a fetch waits for the first message.
pub const FETCH_WAIT: Duration = Duration::from_secs(1);
/// How often dedupe stores forget expired ids and trim their files. The
/// files hold what memory does plus up to this long of acks (at 20k acks
/// a second, 16 MB for 10 s); a prune reads those records and commits a
/// cursor (three fsyncs).
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// About the most bytes of messages fetched ahead of the free push slots
/// (by the size of recent messages): with large messages, fewer wait.
pub const AHEAD_BYTES: usize = 8 << 20;
/// How long stopping waits for pushes under way; those left are then
/// abandoned and their messages handed back.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// How many messages the next fetch asks for (0: none now). Enough for the
/// `free` push slots, plus some to wait ahead of them: with `waiting`
/// already here, at most `capacity` in all and about [`AHEAD_BYTES`] by the
/// size of recent messages (`avg_bytes`, 0 while unknown: then none ahead);
/// none while half of `capacity` or more waits.
fn fetch_size(capacity: usize, free: usize, waiting: usize, avg_bytes: usize) -> usize {
    if waiting * 2 >= capacity {
        return 0;
    }
    // Sizes not known yet (nothing fetched): only the free slots.
    let ahead = AHEAD_BYTES.checked_div(avg_bytes).map_or(0, |n| n.clamp(1, capacity));
    (free + ahead).min(capacity).saturating_sub(waiting)
}

/// A running subscription.
pub struct Runner {
    /// Its context (pull requests use it).
    pub ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// Starts the loop (push) or just the housekeeping (pull).
    pub fn start(ctx: Ctx) -> Runner {
        let ctx = Arc::new(ctx);
        let stop = ctx.stop_tx.clone();
        let task = tokio::spawn(ctx.clone().run());
        Runner { ctx, stop, task }
    }

    /// Stops for a changed spec: as [`Runner::stop`], but a delivery
    /// waiting for the app's callback keeps waiting up to [`STOP_WAIT`]
    /// (the app is not going away) before it is handed back.
    pub async fn stop_for_change(self) {
        self.ctx.restarting.store(true, std::sync::atomic::Ordering::Release);
        self.stop().await;
    }

    /// Stops fetching, hands back waiting messages, waits for pushes under way.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for Runner {
    /// A runner dropped without [`Runner::stop`] (its owner's task was
    /// aborted) still stops: it must not fetch for a subscription nobody runs.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Everything one subscription's deliveries share.
pub struct Ctx {
    /// Subscription name.
    pub name: String,
    /// Its consumer's name (the subscription's, or per pod for `fanout: pod`).
    consumer_name: String,
    /// Its spec.
    pub spec: SubscriptionSpec,
    deps: Deps,
    target: Target,
    dlq_partitions: u32,
    dedupe: Arc<Dedupe>,
    consumer: tokio::sync::Mutex<Option<Arc<dyn Consumer>>>,
    permits: Arc<Semaphore>,
    /// Pushes allowed at once (the permits' total).
    capacity: usize,
    /// Per-key queues of messages waiting behind one of their key.
    keys: Mutex<KeyQueues>,
    /// Signalled when a push ends or a message waiting behind its key gets
    /// its push slot (fetching may wait for room: see [`Ctx::fetch_room`]).
    room_freed: tokio::sync::Notify,
    stop_tx: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
    /// Messages of deliveries abandoned unsettled when stopping, to hand back.
    abandoned: Mutex<Vec<Arc<dyn Settle>>>,
    /// Stopping for a changed spec (not for good): see [`Runner::stop_for_change`].
    restarting: std::sync::atomic::AtomicBool,
    /// This subscription's series of the hot metrics, looked up once.
    attempts: Counter,
    in_flight: Gauge,
    /// This subscription's push latency histogram.
    push_duration: Histogram,
    acked: Counter,
}

enum Next {
    Done,
    RetryHere(Duration),
}

impl Ctx {
    /// A context; opens the subscription's dedupe store.
    pub fn new(deps: &Deps, name: &str, spec: SubscriptionSpec, dlq_partitions: u32) -> Result<Ctx, ferry_log::Error> {
        let labels = SubscriptionLabels { subscription: name.to_owned() };
        let dedupe_metrics = DedupeMetrics {
            ids: deps.metrics.dedupe_ids.get_or_create(&labels).clone(),
            forgotten_early: deps.metrics.dedupe_forgotten_early.get_or_create(&labels).clone(),
        };
        let dir = deps.data_dir.join("dedupe").join(name);
        let dedupe = deps.dedupe.open(name, &dir, deps.dedupe_window, dedupe_metrics)?;
        let target = Target::new(
            deps.app_port.unwrap_or(0),
            &spec.path,
            deps.app_token.as_deref(),
            name,
            format!("/ferry/{}/{}", deps.namespace, spec.topic),
            spec.processing_timeout.get(),
        );
        let in_flight = if spec.ordering == Ordering::Strict { 1 } else { spec.max_in_flight as usize };
        let (stop_tx, stop) = watch::channel(false);
        let metrics = &deps.metrics;
        let attempts = metrics.push_attempts.get_or_create(&labels).clone();
        let in_flight_gauge = metrics.in_flight.get_or_create(&labels).clone();
        let push_duration = metrics.push_duration.get_or_create(&labels).clone();
        let acked = metrics
            .deliveries
            .get_or_create(&DeliveryLabels { subscription: name.to_owned(), result: "acked" })
            .clone();
        let consumer_name =
            super::consumer_plan(&deps.namespace, name, &spec, &deps.pod_name, deps.pod_consumer_ttl).name;
        Ok(Ctx {
            name: name.to_owned(),
            consumer_name,
            deps: deps.clone(),
            target,
            dlq_partitions,
            dedupe,
            consumer: tokio::sync::Mutex::new(None),
            permits: Arc::new(Semaphore::new(in_flight)),
            capacity: in_flight,
            keys: Mutex::new(KeyQueues::default()),
            room_freed: tokio::sync::Notify::new(),
            stop_tx,
            stop,
            abandoned: Mutex::new(Vec::new()),
            restarting: Default::default(),
            spec,
            attempts,
            in_flight: in_flight_gauge,
            push_duration,
            acked,
        })
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn count(&self, result: &'static str) {
        self.deps.metrics.deliveries.get_or_create(&DeliveryLabels { subscription: self.name.clone(), result }).inc();
    }

    /// The consumer, created (or re-created) on first use.
    pub async fn consumer(&self) -> Result<Arc<dyn Consumer>, BrokerError> {
        let mut slot = self.consumer.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.deps.broker.consumer(&self.plan()).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn plan(&self) -> ferry_api::ConsumerPlan {
        let d = &self.deps;
        super::consumer_plan(&d.namespace, &self.name, &self.spec, &d.pod_name, d.pod_consumer_ttl)
    }

    /// A pull subscription's consumer is used only when the app polls: a
    /// per-pod one would be removed by the broker after its idle time
    /// between two polls, and made again at its start position, missing
    /// what came meanwhile. So the runner tells the broker it is in use, a
    /// few times per idle time, without taking a message.
    async fn keep_alive(&self) {
        let kept = async { self.consumer().await?.keep_alive().await };
        if let Err(e) = kept.await {
            tracing::debug!(subscription = %self.name, error = %e, "could not keep the consumer in use");
            // Gone (removed, or the broker lost it): made again next time.
            self.reset_consumer().await;
        }
    }

    async fn reset_consumer(&self) {
        *self.consumer.lock().await = None;
    }

    fn heartbeat_every(&self) -> Duration {
        (self.spec.processing_timeout.get() / 3).max(Duration::from_millis(50))
    }

    /// Exponential backoff for `attempt` (1-based) with equal jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        backoff(self.spec.backoff, attempt, (uuid::Uuid::new_v4().as_u128() % 1000) as u32)
    }

    async fn run(self: Arc<Self>) {
        let mut tasks = JoinSet::new();
        let mut heartbeat = tokio::time::interval(self.heartbeat_every());
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        let mut stop = self.stop.clone();
        let mut backoff = Duration::from_millis(100);
        let push = self.spec.mode == DeliveryMode::Push;
        // Only consumers the broker removes when idle need it; a push
        // subscription fetches all the time.
        let idle_limit = self.plan().inactive_threshold.filter(|_| !push);
        let mut keep_alive = tokio::time::interval(idle_limit.map_or(PRUNE_EVERY, |t| t / 5));
        let recovered = if push && self.spec.ordering != Ordering::None {
            match self.recover_leases(&mut stop).await {
                Some(first) => first,
                None => return,
            }
        } else {
            VecDeque::new()
        };
        let fetched_ahead = if push && self.spec.batch.max_messages <= 1 {
            self.push_loop(&mut tasks, &mut stop, recovered).await
        } else {
            VecDeque::new()
        };
        loop {
            // Free a finished task's slot in the join set.
            while tasks.try_join_next().is_some() {}
            if self.stopped() {
                break;
            }
            let first = if push {
                tokio::select! {
                    p = self.permits.clone().acquire_owned() => match p { Ok(p) => Some(p), Err(_) => break },
                    _ = stop.changed() => break,
                    _ = heartbeat.tick() => { self.heartbeat_held().await; continue }
                    _ = prune.tick() => { self.prune(); continue }
                }
            } else {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = prune.tick() => { self.prune(); continue }
                    _ = keep_alive.tick(), if idle_limit.is_some() => {
                        // Not held up by a broker slow to answer when stopping.
                        tokio::select! {
                            () = self.keep_alive() => continue,
                            _ = stop.changed() => break,
                        }
                    }
                }
            };
            let Some(first) = first else { continue };
            let mut permits = vec![first];
            let batched = self.spec.batch.max_messages > 1;
            let want = if batched { self.spec.batch.max_messages as usize } else { usize::MAX };
            while permits.len() < want {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let wait = if batched { self.spec.batch.max_wait.get() } else { FETCH_WAIT };
            let fetched = tokio::select! {
                r = async { self.consumer().await?.fetch(permits.len(), wait).await } => r,
                _ = stop.changed() => break,
            };
            let messages = match fetched {
                Ok(mut m) => {
                    self.deps.metrics.fetch_messages.observe(m.len() as f64);
                    backoff = Duration::from_millis(100);
                    if batched && !m.is_empty() {
                        // A partial batch stays open up to maxWait from its first
                        // message, which stays leased meanwhile (maxWait may be
                        // longer than the processing timeout).
                        let until = tokio::time::Instant::now() + wait;
                        let mut leased_at = Instant::now();
                        while m.len() < permits.len() {
                            let left = until.saturating_duration_since(tokio::time::Instant::now());
                            if left.is_zero() {
                                break;
                            }
                            if leased_at.elapsed() >= self.heartbeat_every() {
                                for msg in &m {
                                    let _ = msg.settle.settle(Settlement::Progress).await;
                                }
                                leased_at = Instant::now();
                            }
                            let want = permits.len() - m.len();
                            let left = left.min(self.heartbeat_every());
                            let more = tokio::select! {
                                r = async { self.consumer().await?.fetch(want, left).await } => r,
                                _ = stop.changed() => break,
                            };
                            match more {
                                Ok(more) => {
                                    self.deps.metrics.fetch_messages.observe(more.len() as f64);
                                    m.extend(more)
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    m
                }
                Err(e) => {
                    let wait = self.fetch_failed(&e, &mut backoff).await;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => break,
                    }
                    continue;
                }
            };
            let mut permits = permits.into_iter();
            if batched && !messages.is_empty() {
                let held: Vec<_> = permits.by_ref().take(messages.len()).collect();
                let ctx = self.clone();
                tasks.spawn(async move {
                    let unsettled = HandBack::many(&ctx, &messages);
                    ctx.clone().deliver_batch(messages).await;
                    unsettled.settled();
                    drop(held);
                });
                continue;
            }
            for (msg, permit) in messages.into_iter().zip(permits.by_ref()) {
                self.dispatch(&mut tasks, msg, permit);
            }
        }
        // Stopping: take what waits behind a key (so no key task pushes it),
        // hand back what was fetched ahead and what waited, and let pushes
        // under way finish (they hand back or settle on their own).
        let queued: Vec<Fetched> = self.keys.lock().unwrap_or_else(|e| e.into_inner()).drain();
        let mut waiting: Vec<Fetched> = fetched_ahead.into_iter().chain(queued).collect();
        if self.spec.ordering == Ordering::None {
            self.release_unpushed(waiting).await;
            self.finish(&mut tasks).await;
            return;
        }
        // Ordered: the broker redelivers in the order messages are handed
        // back, so what waited goes back after the pushes under way are
        // settled (or abandoned and handed back), and in stream order;
        // meanwhile it stays leased.
        waiting.sort_by_key(|m| m.sequence);
        self.all_leased(&waiting, self.finish(&mut tasks)).await;
        self.release_unpushed(waiting).await;
    }

    /// Waits up to [`STOP_WAIT`] for the deliveries under way, then aborts
    /// the rest and hands their messages back (their tasks' guards listed
    /// them), so none stays leased until the broker's ack wait runs out.
    async fn finish(&self, tasks: &mut JoinSet<()>) {
        let all = tokio::time::timeout(STOP_WAIT, async { while tasks.join_next().await.is_some() {} }).await;
        if all.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let abandoned = std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|e| e.into_inner()));
        if !abandoned.is_empty() {
            tracing::warn!(subscription = %self.name, count = abandoned.len(), wait = ?STOP_WAIT, "pushes still under way when stopping were abandoned; their messages are handed back");
        }
        for settle in abandoned {
            let _ = settle.settle(Settlement::Release).await;
        }
    }

    /// A fetch failed: logs it, drops the consumer (made again on the next
    /// fetch) and says how long to wait, doubling `backoff` up to 5 s.
    async fn fetch_failed(&self, e: &BrokerError, backoff: &mut Duration) -> Duration {
        let wait = *backoff;
        tracing::warn!(subscription = %self.name, error = %e, retry_in = ?wait, "fetch failed");
        self.reset_consumer().await;
        *backoff = (wait * 2).min(Duration::from_secs(5));
        wait
    }

    /// Hands back messages that were never pushed (redelivered at once, to
    /// any pod), each without it counting as an attempt.
    async fn release_unpushed(&self, messages: Vec<Fetched>) {
        for m in messages {
            let _ = m.settle.settle(Settlement::ReleaseUnpushed).await;
        }
    }

    /// Single-message push: fetches ahead while pushes run, so the next
    /// messages are here when a push frees its slot. One fetch at a time,
    /// started once fewer than half of `capacity` messages wait here, for
    /// as many as make `capacity` wait; they are pushed in the order
    /// fetched, and kept leased while they wait. (A fetch only for the free
    /// slots, after the last one returned, left slots idle for a round trip
    /// to the broker each time: a quarter of them under load.) `first` is
    /// pushed before anything it fetches. Returns what was fetched and not
    /// yet pushed when stopping, to hand back.
    async fn push_loop(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
        first: VecDeque<Fetched>,
    ) -> VecDeque<Fetched> {
        type Fetch = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Fetched>, BrokerError>> + Send>>;
        let mut ahead: VecDeque<Fetched> = first;
        // Payload size of recent messages (0: none seen yet).
        let mut avg_bytes = 0usize;
        let mut fetch: Option<Fetch> = None;
        let mut backoff = Duration::from_millis(100);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut heartbeat = tokio::time::interval(self.heartbeat_every());
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            while tasks.try_join_next().is_some() {}
            if self.stopped() {
                break;
            }
            while !ahead.is_empty() {
                match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => self.dispatch(tasks, ahead.pop_front().expect("not empty"), permit),
                    Err(_) => break,
                }
            }
            let room = self.fetch_room(ahead.len());
            let max = fetch_size(self.capacity, self.permits.available_permits(), ahead.len(), avg_bytes).min(room);
            if fetch.is_none() && retry_at.is_none() && max > 0 {
                let ctx = self.clone();
                fetch = Some(Box::pin(async move { ctx.consumer().await?.fetch(max, FETCH_WAIT).await }));
            }
            tokio::select! {
                r = async { fetch.as_mut().expect("guarded").await }, if fetch.is_some() => {
                    fetch = None;
                    match r {
                        Ok(m) => {
                            self.deps.metrics.fetch_messages.observe(m.len() as f64);
                            backoff = Duration::from_millis(100);
                            for msg in &m {
                                let len = msg.payload.len().max(1);
                                avg_bytes = if avg_bytes == 0 { len } else { avg_bytes - avg_bytes / 8 + len / 8 };
                            }
                            ahead.extend(m);
                        }
                        Err(e) => {
                            let wait = self.fetch_failed(&e, &mut backoff).await;
                            retry_at = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
                p = self.permits.clone().acquire_owned(), if !ahead.is_empty() => match p {
                    Ok(permit) => self.dispatch(tasks, ahead.pop_front().expect("not empty"), permit),
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    retry_at = None;
                }
                // Nothing to fetch now: a push ending may change that.
                () = self.room_freed.notified(), if max == 0 => {}
                _ = stop.changed() => break,
                _ = heartbeat.tick() => {
                    for m in &ahead {
                        let _ = m.settle.settle(Settlement::Progress).await;
                    }
                    self.heartbeat_held().await;
                }
                _ = prune.tick() => self.prune(),
            }
        }
        ahead
    }

    /// Ordered subscriptions only: when messages are still leased at start
    /// (fetched by a sidecar that died, or by another pod), waits one
    /// processing timeout, so that the broker takes back every lease of a
    /// dead sidecar before anything later of their keys is fetched here,
    /// then fetches what it redelivers, in stream order (see
    /// [`Ctx::gather_redelivered`]). Where the broker cannot say what is
    /// leased, it waits all the same. Returns the messages to push first
    /// (handed back, like anything fetched, if the subscription stopped
    /// meanwhile), or `None` when stopped during the wait.
    async fn recover_leases(&self, stop: &mut watch::Receiver<bool>) -> Option<VecDeque<Fetched>> {
        let leased = match self.leased_count().await {
            Ok(0) => return Some(VecDeque::new()),
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = %e, "could not ask the broker what is leased; waiting one processing timeout as if something were");
                None
            }
        };
        let wait = self.spec.processing_timeout.get();
        let leased = leased.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        tracing::info!(subscription = %self.name, %leased, ?wait, "waiting out leased messages so each key stays in order");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return None,
        }
        // Not cut short by a stop: a fetch dropped half-way would leave
        // what the broker sent meanwhile leased until its ack wait.
        Some(self.gather_redelivered().await)
    }

    async fn leased_count(&self) -> Result<u64, BrokerError> {
        self.consumer().await?.leased().await
    }

    /// After [`Ctx::recover_leases`]'s wait: fetches as many messages as the
    /// broker counts leased, and sorts them by stream sequence. JetStream
    /// queues expired leases for redelivery in the order they expired, not
    /// in stream order (a message whose lease was refreshed later comes back
    /// later), and hands them out ahead of anything new; pushed in the order
    /// fetched, a key's later message could reach the app before an earlier
    /// one (seen in the kill -9 fault test). What comes after the
    /// redeliveries is new, later than all of them, so sorting the whole set
    /// keeps every key in order. At most twice `maxInFlight`, what one
    /// sidecar of the group can hold (as many fetched ahead as push slots):
    /// the count includes leases that live pods hold, and taking that many
    /// new messages instead would park up to `maxAckPending` here.
    async fn gather_redelivered(&self) -> VecDeque<Fetched> {
        let leased = match self.leased_count().await {
            Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Err(e) => {
                tracing::warn!(subscription = %self.name, error = %e, "could not ask the broker what is leased; fetching as usual");
                return VecDeque::new();
            }
        };
        let want = leased.min(2 * self.capacity);
        if want == 0 {
            return VecDeque::new();
        }
        let wait = FETCH_WAIT.min(self.heartbeat_every());
        let mut gathered = match self.consumer().await {
            Ok(c) => c.fetch(want, wait).await,
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| {
            tracing::warn!(subscription = %self.name, error = %e, "fetching the redelivered messages failed; fetching as usual");
            Vec::new()
        });
        gathered.sort_by_key(|m| m.sequence);
        tracing::info!(subscription = %self.name, leased, fetched = gathered.len(), "redelivered messages fetched, pushing them in stream order");
        gathered.into()
    }

    fn prune(&self) {
        if let Err(e) = self.dedupe.prune() {
            tracing::warn!(subscription = %self.name, error = %e, "could not prune the dedupe store");
        }
    }

    /// Keeps messages waiting behind their key leased.
    async fn heartbeat_held(&self) {
        let settles: Vec<_> = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .values()
            .flat_map(|q| q.iter().map(|m| m.settle.clone()))
            .collect();
        for s in settles {
            let _ = s.settle(Settlement::Progress).await;
        }
    }

    fn ordering_key(&self, msg: &Fetched) -> Option<String> {
        match self.spec.ordering {
            Ordering::None => None,
            Ordering::Strict => Some(String::new()),
            Ordering::Key => msg.header(headers::KEY).map(str::to_owned),
        }
    }

    fn dispatch(self: &Arc<Self>, tasks: &mut JoinSet<()>, msg: Fetched, permit: OwnedSemaphorePermit) {
        let Some(key) = self.ordering_key(&msg) else {
            let ctx = self.clone();
            // The delivery's future is large (about 3 KB): boxed, it is moved
            // once, not on every hand-over of the task (spawn, task cell,
            // output), which showed as 2-3% of the sidecar's CPU in memmove.
            tasks.spawn(async move {
                let unsettled = HandBack::one(&ctx, &msg);
                Box::pin(ctx.deliver(msg, false)).await;
                unsettled.settled();
                drop(permit);
                ctx.room_freed.notify_one();
            });
            return;
        };
        {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(queue) = keys.by_key.get_mut(&key) {
                // It waits without a push slot: a key whose message is
                // retried for a while must not take every slot from the
                // other keys (within [`Ctx::fetch_room`]).
                queue.push_back(msg);
                keys.queued += 1;
                return;
            }
            keys.by_key.insert(key.clone(), VecDeque::new());
        }
        let ctx = self.clone();
        tasks.spawn(async move {
            let mut stop = ctx.stop.clone();
            let mut current = Some((msg, permit));
            while let Some((msg, permit)) = current.take() {
                let unsettled = HandBack::one(&ctx, &msg);
                Box::pin(ctx.deliver(msg, true)).await;
                unsettled.settled();
                drop(permit);
                ctx.room_freed.notify_one();
                // One decision under one lock: the runner takes the queues
                // when stopping, and once the key is forgotten (nothing
                // waits) a new task may own it at once.
                let next = {
                    let mut keys = ctx.keys.lock().unwrap_or_else(|e| e.into_inner());
                    if ctx.stopped() {
                        // Stopping (and the runner may not have taken this
                        // key's queue yet): no new push starts; what waits
                        // goes back unpushed, after the one just settled.
                        Err(keys.remove(&key))
                    } else {
                        Ok(keys.pop(&key))
                    }
                };
                let next = match next {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(waiting) => {
                        ctx.release_unpushed(waiting).await;
                        break;
                    }
                };
                // Its push slot, taken in turn with the runner's; leased
                // meanwhile (the slots may stay taken for a long time).
                let permit = ctx
                    .leased(&next, async {
                        tokio::select! {
                            biased;
                            _ = stop.wait_for(|s| *s) => None,
                            p = ctx.permits.clone().acquire_owned() => p.ok().filter(|_| !ctx.stopped()),
                        }
                    })
                    .await;
                ctx.keys.lock().unwrap_or_else(|e| e.into_inner()).slotted();
                ctx.room_freed.notify_one();
                match permit {
                    Some(permit) => current = Some((next, permit)),
                    None => {
                        let rest = ctx.keys.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                        ctx.release_unpushed(std::iter::once(next).chain(rest).collect()).await;
                    }
                }
            }
        });
    }

    /// How many more messages an ordered subscription may fetch: what this
    /// sidecar holds (pushes under way, messages waiting behind their key,
    /// `ahead` fetched for the free slots) stays within twice `maxInFlight`,
    /// which a sidecar started after this one died gathers back in stream
    /// order ([`Ctx::gather_redelivered`]); more, and their redeliveries
    /// could come out of order. Unbounded without ordering (the slots and
    /// [`fetch_size`] bound it).
    fn fetch_room(&self, ahead: usize) -> usize {
        if self.spec.ordering == Ordering::None {
            return usize::MAX;
        }
        let pushing = self.capacity.saturating_sub(self.permits.available_permits());
        let waiting = self.keys.lock().unwrap_or_else(|e| e.into_inner()).queued;
        (2 * self.capacity).saturating_sub(pushing + waiting + ahead)
    }

    /// Runs `fut` while keeping the message leased.
    async fn leased<T>(&self, msg: &Fetched, fut: impl std::future::Future<Output = T>) -> T {
        self.all_leased(std::slice::from_ref(msg), fut).await
    }

    /// Runs `fut` while keeping the messages leased.
    async fn all_leased<T>(&self, msgs: &[Fetched], fut: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(fut);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat_every(), self.heartbeat_every());
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tick.tick() => {
                    for msg in msgs {
                        let _ = msg.settle.settle(Settlement::Progress).await;
                    }
                }
            }
        }
    }

    /// Delivers one message until it is settled.
    async fn deliver(&self, msg: Fetched, ordered: bool) {
        let mut local_retries = 0u32;
        loop {
            let attempt = msg.delivered.saturating_add(local_retries);
            if self.settled_before_push(&msg, attempt).await {
                return;
            }
            let delivery_id = uuid::Uuid::now_v7().to_string();
            self.attempts.inc();
            let in_flight = InFlight::new(&self.in_flight);
            let started = Instant::now();
            // Registered before the push: an app may call back before its
            // 202 answer reaches us.
            let mut callback = self.deps.callbacks.register(&delivery_id);
            // Forgotten however this attempt ends, also when its task is
            // aborted (stopping): no entry is left behind.
            let _registered = Registered(&self.deps.callbacks, &delivery_id);
            // An app may call back while its push is still open (some call
            // from inside their handler and answer only then): the callback
            // settles the delivery at once; the push is not waited for (it
            // is dropped at the end of this block).
            let answered = {
                let pushed =
                    self.leased(&msg, push::push(&self.deps.client, &self.target, &msg, &delivery_id, attempt));
                tokio::pin!(pushed);
                tokio::select! {
                    biased;
                    outcome = &mut pushed => Ok(outcome),
                    Ok(cb) = &mut callback => Err(cb),
                }
            };
            self.push_duration.observe(started.elapsed().as_secs_f64());
            let (outcome, done) = match answered {
                Ok(Outcome::Deferred) => self.await_callback(&msg, &delivery_id, callback).await,
                Ok(other) => {
                    self.forget_answered(&delivery_id, callback, &other);
                    (Some(other), None)
                }
                // Its entry went with the callback (`Callbacks::resolve`).
                Err(cb) => (Some(verdict_outcome(cb.verdict)), Some(cb.done)),
            };
            drop(in_flight);
            let Some(outcome) = outcome else {
                // Stopping while the app holds it: hand it back.
                let _ = msg.settle.settle(Settlement::Release).await;
                return;
            };
            let next = self.settle(&msg, attempt, outcome, ordered).await;
            if let Some(done) = done {
                let _ = done.send(Ok(()));
            }
            match next {
                Next::Done => return,
                Next::RetryHere(delay) => {
                    let stop = self.stop.clone();
                    let stopped = self.leased(&msg, async move {
                        let mut stop = stop;
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => false,
                            _ = stop.wait_for(|s| *s) => true,
                        }
                    });
                    if stopped.await {
                        let _ = msg.settle.settle(Settlement::Release).await;
                        return;
                    }
                    local_retries += 1;
                }
            }
        }
    }

    /// Forgets a delivery its push's answer settles; a callback that came
    /// with that answer is told so (409), not left without one.
    fn forget_answered(
        &self,
        delivery_id: &str,
        mut callback: tokio::sync::oneshot::Receiver<Callback>,
        answer: &Outcome,
    ) {
        self.deps.callbacks.forget(delivery_id);
        if let Ok(cb) = callback.try_recv() {
            let _ = cb.done.send(Err(format!(
                "delivery {delivery_id} was settled by the push's own answer ({}), which came with this callback",
                outcome_word(answer)
            )));
        }
    }

    /// Settles a message that must not reach the app (again): acked within
    /// the dedupe window, or out of attempts (dead-lettered). True if so.
    async fn settled_before_push(&self, msg: &Fetched, attempt: u32) -> bool {
        if self.dedupe.contains(&msg.id) {
            self.count("deduplicated");
            let _ = msg.settle.settle(Settlement::Ack).await;
            return true;
        }
        if attempt > self.spec.max_deliveries {
            let why = format!("delivered {} times without success", attempt - 1);
            self.dead_letter(msg, attempt - 1, "timeout", &why).await;
            return true;
        }
        false
    }

    /// Settles an unordered delivery by its outcome (a retry is a
    /// nak-with-delay), hands it back when stopping (`None`), then answers
    /// the app's callback if there was one.
    async fn finish_unordered(
        &self,
        msg: &Fetched,
        attempt: u32,
        outcome: Option<Outcome>,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) {
        match outcome {
            Some(o) => {
                self.settle(msg, attempt, o, false).await;
            }
            None => {
                let _ = msg.settle.settle(Settlement::Release).await;
            }
        }
        if let Some(done) = done {
            let _ = done.send(Ok(()));
        }
    }

    /// Waits for the app's callback (leased); `None` when stopping.
    async fn await_callback(
        &self,
        msg: &Fetched,
        delivery_id: &str,
        mut rx: tokio::sync::oneshot::Receiver<Callback>,
    ) -> (Option<Outcome>, Option<tokio::sync::oneshot::Sender<Result<(), String>>>) {
        let timeout = self.spec.processing_timeout.get();
        let mut stop = self.stop.clone();
        let waited = self
            .leased(msg, async {
                tokio::select! {
                    cb = &mut rx => cb.ok(),
                    _ = tokio::time::sleep(timeout) => None,
                    // Stopping for good (SIGTERM, removed) hands it back at
                    // once, so another pod gets it; a restart for a change
                    // leaves the app the stop's wait to call back first.
                    _ = async {
                        let _ = stop.wait_for(|s| *s).await;
                        if self.restarting.load(std::sync::atomic::Ordering::Acquire) {
                            tokio::time::sleep(STOP_WAIT).await;
                        }
                    } => None,
                }
            })
            .await;
        self.deps.callbacks.forget(delivery_id);
        // A callback handed over as the timeout (or the stop) fired is taken
        // all the same: once forgotten, no other can come.
        let waited = waited.or_else(|| rx.try_recv().ok());
        match waited {
            Some(Callback { verdict, done }) => (Some(verdict_outcome(verdict)), Some(done)),
            None if self.stopped() => (None, None),
            None => (
                Some(Outcome::Retry {
                    after: None,
                    status: "timeout".into(),
                    error: format!("no callback within the processing timeout of {timeout:?}"),
                }),
                None,
            ),
        }
    }

    /// Settles by outcome; says whether to retry here.
    async fn settle(&self, msg: &Fetched, attempt: u32, outcome: Outcome, ordered: bool) -> Next {
        match outcome {
            Outcome::Ack | Outcome::Deferred => {
                if let Err(e) = self.dedupe.insert(&msg.id).await {
                    tracing::warn!(subscription = %self.name, error = %e, "could not record an ack for dedupe");
                }
                let _ = msg.settle.settle(Settlement::Ack).await;
                self.acked.inc();
                Next::Done
            }
            Outcome::Reject { status, error } => {
                self.dead_letter(msg, attempt, &status, &error).await;
                Next::Done
            }
            Outcome::Retry { after, status, error } => {
                if attempt >= self.spec.max_deliveries {
                    self.dead_letter(msg, attempt, &status, &error).await;
                    return Next::Done;
                }
                let delay = after.unwrap_or_else(|| self.backoff(attempt));
                self.count("retried");
                tracing::debug!(subscription = %self.name, id = %msg.id, attempt, ?delay, status, "retrying");
                if ordered {
                    Next::RetryHere(delay)
                } else {
                    let _ = msg.settle.settle(Settlement::Retry(delay)).await;
                    Next::Done
                }
            }
        }
    }

    /// Sends a message to the dead-letter topic (confirmed by the broker)
    /// and only then settles the original; without one, drops it loudly.
    async fn dead_letter(&self, msg: &Fetched, attempts: u32, status: &str, error: &str) {
        // As a header or a note: no control characters, at most 500.
        let error: String = error.chars().filter(|c| !c.is_control()).take(500).collect();
        let Some(dlq) = &self.spec.dead_letter_topic else {
            tracing::warn!(subscription = %self.name, id = %msg.id, attempts, status, error, "dropping a message: no dead-letter topic");
            self.count("dropped");
            let _ = msg.settle.settle(Settlement::Reject).await;
            let reason = format!("{}: {attempts} attempt(s), last status {status}: {error}", msg.id);
            let (broker, namespace, name) = (self.deps.broker.clone(), self.deps.namespace.clone(), self.name.clone());
            tokio::spawn(async move { broker.count_dropped(&namespace, &name, reason.trim_end()).await });
            return;
        };
        let mut hdrs: Vec<(String, String)> = msg
            .headers
            .iter()
            .filter(|(n, _)| {
                // A dead letter dead-lettered again gets these anew, so its
                // headers do not grow with each hop.
                !n.to_ascii_lowercase().starts_with("ferry-origin")
                    && ![headers::ATTEMPTS, headers::LAST_STATUS, headers::LAST_ERROR]
                        .iter()
                        .any(|h| n.eq_ignore_ascii_case(h))
            })
            .cloned()
            .collect();
        hdrs.push((headers::ORIGIN_TOPIC.into(), self.spec.topic.clone()));
        hdrs.push((headers::ORIGIN_SUBSCRIPTION.into(), self.name.clone()));
        hdrs.push((headers::ORIGIN_ID.into(), msg.id.clone()));
        hdrs.push((headers::ATTEMPTS.into(), attempts.to_string()));
        hdrs.push((headers::LAST_STATUS.into(), status.to_owned()));
        hdrs.push((headers::LAST_ERROR.into(), error));
        let key = msg.header(headers::KEY).map(str::to_owned);
        let out = OutMessage {
            subject: naming::message_subject(
                &self.deps.namespace,
                dlq,
                naming::partition_of(key.as_deref(), self.dlq_partitions),
            ),
            // Its own id per consumer: the broker keeps one message per id
            // within the duplicate window, so two subscriptions (or two
            // pods of `fanout: pod`) giving up on one message into one
            // dead-letter topic must not share it; a re-send of the same
            // letter still does.
            id: format!("{}:{}", self.consumer_name, msg.id),
            headers: hdrs,
            payload: msg.payload.clone(),
        };
        let mut backoff = Duration::from_millis(100);
        let mut refusals = crate::forward::Refusals::default();
        loop {
            let published = self.leased(msg, async { self.deps.broker.publish(out.clone()).await?.await }).await;
            let error = match published {
                Ok(_) => break,
                // The dead-letter topic will never take it (its stream's
                // largest message is smaller): parked on the data volume, as
                // the forwarder parks what the broker refuses for good.
                Err(BrokerError::TooLarge(reason)) if refusals.refused(0, Instant::now()) => {
                    let rec = ferry_log::Record {
                        offset: msg.sequence,
                        timestamp_ms: msg.published_ms,
                        id: out.id.clone(),
                        key: key.clone(),
                        headers: out.headers.clone(),
                        payload: out.payload.clone(),
                    };
                    match self.deps.outbox.park_dead_letter(dlq, &rec, &reason).await {
                        Ok(()) => {
                            let _ = msg.settle.settle(Settlement::Reject).await;
                            self.count("parked");
                            tracing::error!(subscription = %self.name, id = %msg.id, dead_letter_topic = %dlq, %reason, "the dead-letter topic refuses this message for good; parked it on the data volume");
                            return;
                        }
                        Err(e) => format!("parking it: {e}"),
                    }
                }
                Err(e) => {
                    if !matches!(e, BrokerError::TooLarge(_)) {
                        refusals.interrupted();
                    }
                    e.to_string()
                }
            };
            tracing::warn!(subscription = %self.name, id = %msg.id, %error, "dead-letter publish failed; the original stays leased");
            if self.stopped() {
                let _ = msg.settle.settle(Settlement::Release).await;
                return;
            }
            self.leased(msg, tokio::time::sleep(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let _ = msg.settle.settle(Settlement::Reject).await;
        self.count("dead_lettered");
        // Counted off the delivery path: the count must not hold the slot.
        let (broker, namespace, name) = (self.deps.broker.clone(), self.deps.namespace.clone(), self.name.clone());
        tokio::spawn(async move { broker.count_dead_letter(&namespace, &name).await });
        tracing::info!(subscription = %self.name, id = %msg.id, attempts, status, dead_letter_topic = %dlq, "dead-lettered");
    }

    /// Bulk push: one request, settled per message.
    async fn deliver_batch(self: Arc<Self>, messages: Vec<Fetched>) {
        // Leased from here until each is settled: a dead-letter publish
        // before the push, or the push itself, may take long.
        let keep = self
            .all_leased(&messages, async {
                let mut keep = Vec::with_capacity(messages.len());
                for m in &messages {
                    keep.push(!self.settled_before_push(m, m.delivered).await);
                }
                keep
            })
            .await;
        let fresh: Vec<Fetched> = messages.into_iter().zip(keep).filter_map(|(m, k)| k.then_some(m)).collect();
        if fresh.is_empty() {
            return;
        }
        let batch: Vec<(&Fetched, String, u32)> =
            fresh.iter().map(|m| (m, uuid::Uuid::now_v7().to_string(), m.delivered)).collect();
        let mut callbacks: Vec<_> = batch.iter().map(|(_, id, _)| Some(self.deps.callbacks.register(id))).collect();
        self.attempts.inc_by(batch.len() as u64);
        // Each message is in flight until its answer or callback settles it.
        let mut in_flight: Vec<InFlight> = batch.iter().map(|_| InFlight::new(&self.in_flight)).collect();
        let started = Instant::now();
        let outcomes = self.all_leased(&fresh, push::push_batch(&self.deps.client, &self.target, &batch)).await;
        self.push_duration.observe(started.elapsed().as_secs_f64());
        let mut settles = Vec::new();
        for (((m, delivery_id, attempt), outcome), callback) in batch.iter().zip(outcomes).zip(callbacks.iter_mut()) {
            let ctx = self.clone();
            let delivery_id = delivery_id.clone();
            let attempt = *attempt;
            let callback = callback.take().expect("one receiver per message");
            let in_flight = in_flight.pop();
            settles.push(async move {
                let _in_flight = in_flight;
                let (outcome, done) = match outcome {
                    Outcome::Deferred => ctx.await_callback(m, &delivery_id, callback).await,
                    other => {
                        ctx.forget_answered(&delivery_id, callback, &other);
                        (Some(other), None)
                    }
                };
                ctx.finish_unordered(m, attempt, outcome, done).await;
            });
        }
        futures::future::join_all(settles).await;
    }

    /// Pull mode: up to `max` messages waiting up to `wait`, each registered
    /// for a callback within the processing timeout (leased meanwhile).
    pub async fn pull(self: &Arc<Self>, max: usize, wait: Duration) -> Result<Vec<serde_json::Value>, BrokerError> {
        let consumer = match self.consumer().await {
            Ok(c) => c,
            Err(e) => {
                self.reset_consumer().await;
                return Err(e);
            }
        };
        let stopping = || BrokerError::Unavailable(format!("subscription {} is restarting or stopping", self.name));
        let mut stop = self.stop.clone();
        // A strict consumer leases one message at a time: a request for
        // more would hold the poll open for its whole wait after the first.
        let want = if self.spec.ordering == Ordering::Strict { 1 } else { max };
        let fetched = tokio::select! {
            r = consumer.fetch(want, wait) => match r {
                Ok(f) => f,
                Err(e) => {
                    self.reset_consumer().await;
                    return Err(e);
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return Err(stopping()),
        };
        // Stopped during the fetch: what came goes back, not to the app.
        if self.stopped() {
            self.release_unpushed(fetched).await;
            return Err(stopping());
        }
        let mut out = Vec::new();
        for msg in fetched {
            let attempt = msg.delivered;
            if self.settled_before_push(&msg, attempt).await {
                continue;
            }
            let delivery_id = uuid::Uuid::now_v7().to_string();
            let mut event = push::structured(&msg, &self.target.source, &delivery_id, attempt);
            event["ferrysubscription"] = self.name.clone().into();
            out.push(event);
            let ctx = self.clone();
            // Registered before the answer leaves, so an immediate callback finds it.
            let callback = ctx.deps.callbacks.register(&delivery_id);
            // Handed to the app: an attempt, in flight until its callback.
            ctx.attempts.inc();
            let in_flight = InFlight::new(&ctx.in_flight);
            tokio::spawn(async move {
                let (outcome, done) = {
                    let _in_flight = in_flight;
                    ctx.await_callback(&msg, &delivery_id, callback).await
                };
                ctx.finish_unordered(&msg, attempt, outcome, done).await;
            });
        }
        Ok(out)
    }
}

/// The messages of a delivery task until they are settled: dropped before
/// [`HandBack::settled`] (the task aborted when stopping), it lists them
/// on the runner to hand back.
struct HandBack {
    ctx: Arc<Ctx>,
    /// A single push's message (no allocation on the hot path)...
    one: Option<Arc<dyn Settle>>,
    /// ...or a bulk push's.
    many: Vec<Arc<dyn Settle>>,
}

impl HandBack {
    fn one(ctx: &Arc<Ctx>, message: &Fetched) -> HandBack {
        HandBack { ctx: ctx.clone(), one: Some(message.settle.clone()), many: Vec::new() }
    }

    fn many(ctx: &Arc<Ctx>, messages: &[Fetched]) -> HandBack {
        HandBack { ctx: ctx.clone(), one: None, many: messages.iter().map(|m| m.settle.clone()).collect() }
    }

    /// The delivery ended on its own (settled, or handed back itself).
    fn settled(mut self) {
        self.one = None;
        self.many.clear();
    }
}

impl Drop for HandBack {
    fn drop(&mut self) {
        if self.one.is_some() || !self.many.is_empty() {
            let mut abandoned = self.ctx.abandoned.lock().unwrap_or_else(|e| e.into_inner());
            abandoned.extend(self.one.take());
            abandoned.append(&mut self.many);
        }
    }
}

/// A delivery id registered for callbacks, forgotten when dropped.
struct Registered<'a>(&'a super::callbacks::Callbacks, &'a str);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

/// The messages of an ordered subscription waiting behind one of their key
/// (that one being pushed), and how many wait without a push slot (those
/// and the next of a key until it has one).
#[derive(Default)]
struct KeyQueues {
    by_key: HashMap<String, VecDeque<Fetched>>,
    queued: usize,
}

impl KeyQueues {
    /// The next message of `key` (counted as waiting until
    /// [`KeyQueues::slotted`]), or `None` (and the key forgotten: a new
    /// message of it is pushed at once) when none waits.
    fn pop(&mut self, key: &str) -> Option<Fetched> {
        let next = self.by_key.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.by_key.remove(key);
        }
        next
    }

    /// A message popped has its push slot (or went back).
    fn slotted(&mut self) {
        self.queued = self.queued.saturating_sub(1);
    }

    /// What waits behind `key`, the key forgotten.
    fn remove(&mut self, key: &str) -> Vec<Fetched> {
        let rest: Vec<Fetched> = self.by_key.remove(key).unwrap_or_default().into();
        self.queued = self.queued.saturating_sub(rest.len());
        rest
    }

    /// Everything that waits, every key forgotten.
    fn drain(&mut self) -> Vec<Fetched> {
        self.queued = 0;
        self.by_key.drain().flat_map(|(_, q)| q).collect()
    }
}

/// One push under way in the in-flight gauge, counted down when dropped.
struct InFlight(Gauge);

impl InFlight {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an app's callback asks for, as an outcome.
fn verdict_outcome(verdict: Verdict) -> Outcome {
    match verdict {
        Verdict::Ack => Outcome::Ack,
        Verdict::Retry(after) => Outcome::Retry { after, status: "202".into(), error: "the app asked to retry".into() },
        Verdict::Reject(reason) => Outcome::Reject { status: "202".into(), error: reason },
    }
}

/// How an outcome settles a delivery, in a few words.
fn outcome_word(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ack => "acked".into(),
        Outcome::Deferred => "deferred".into(),
        Outcome::Retry { status, .. } => format!("{status}: retrying"),
        Outcome::Reject { status, .. } => format!("{status}: rejected"),
    }
}

/// The delay before retry `attempt` (1-based): `initial` doubled per attempt
/// up to `max`, of which a half is fixed and the other half scaled by
/// `jitter` (0..1000), so pods that failed at once retry spread out.
fn backoff(b: ferry_api::subscription::Backoff, attempt: u32, jitter: u32) -> Duration {
    let exp = b.initial.get().saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(b.max.get());
    let half = exp / 2;
    half + half * jitter.min(999) / 1000
}

#[cfg(test)]
mod backoff_tests {
    use super::*;
    use ferry_api::subscription::Backoff;

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let b = Backoff { initial: "1s".parse().unwrap(), max: "60s".parse().unwrap() };
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Attempt n: between half and all of 2^(n-1) s, capped at 60 s.
        for (attempt, full) in [(1, s(1)), (2, s(2)), (3, s(4)), (6, s(32)), (7, s(60)), (40, s(60))] {
            assert_eq!(backoff(b, attempt, 0), full / 2, "attempt {attempt}");
            assert_eq!(backoff(b, attempt, 500), full * 3 / 4, "attempt {attempt}");
            let most = backoff(b, attempt, 999);
            assert!(most < full && most >= full - ms(60), "attempt {attempt}: {most:?}");
        }
        assert_eq!(backoff(b, 0, 0), ms(500), "as the first");
    }
}

#[cfg(test)]
mod fetch_size_tests {
    use super::*;

    #[test]
    fn fetches_ahead_up_to_capacity_and_about_ahead_bytes() {
        // Small messages (or sizes not known yet): up to capacity waiting.
        assert_eq!(fetch_size(256, 0, 0, 1024), 256);
        // Sizes not known yet: the free slots only.
        assert_eq!(fetch_size(256, 256, 0, 0), 256);
        assert_eq!(fetch_size(256, 10, 0, 0), 10);
        assert_eq!(fetch_size(256, 0, 100, 1024), 156);
        assert_eq!(fetch_size(256, 0, 128, 1024), 0, "half of capacity waiting: no fetch");
        // 1 MiB messages: every free slot, and 8 ahead of them.
        assert_eq!(fetch_size(256, 0, 0, 1 << 20), 8);
        assert_eq!(fetch_size(256, 100, 0, 1 << 20), 108);
        assert_eq!(fetch_size(256, 0, 8, 1 << 20), 0);
        // Larger than AHEAD_BYTES: one ahead; never more than capacity.
        assert_eq!(fetch_size(256, 0, 0, 64 << 20), 1);
        assert_eq!(fetch_size(1, 1, 0, 1 << 20), 1);
        assert_eq!(fetch_size(1, 0, 0, 1024), 1, "strict: the next one waits ahead");
        assert_eq!(fetch_size(1, 0, 1, 1024), 0);
    }
}
