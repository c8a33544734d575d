//! [`Broker`] on NATS JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use ferry_api::naming::headers;
use ferry_api::{ConsumerPlan, StreamPlan};
use futures::FutureExt;

use std::sync::Arc;

use async_nats::jetstream::message::{AckKind, Acker};
use futures::StreamExt;

use super::{Broker, BrokerError, Consumer, Fetched, OutMessage, PendingAck, PubAck, Settle, Settlement};
use crate::config::BrokerConfig;

/// Timeout of JetStream API requests and publish acknowledgements.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes awaiting the broker's ack on this connection: far above
/// what is ever in flight, since a publish that waited here for room would
/// hold up its forwarder while that forwarder's own pending acks hold the
/// room. The bounds are Ferry's: the forwarders' shared room
/// ([`crate::forward::MAX_IN_FLIGHT`]) and, for dead letters, each
/// subscription's `maxInFlight`.
pub const MAX_ACKS_IN_FLIGHT: usize = 1 << 20;

/// How long the returns bucket keeps a note: far longer than a handed-back
/// message waits for its next delivery (at once, if any pod is there).
pub const RETURNS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// After the returns bucket could not be opened, how long before trying again.
const RETURNS_RETRY: Duration = Duration::from_secs(30);

/// A JetStream connection.
#[derive(Clone, Debug)]
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    last_max_payload: Arc<LastMaxPayload>,
    returns: Arc<Returns>,
    /// Counts connection losses and reconnections (see
    /// [`Broker::connection_epoch`]).
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

/// The bucket where handed-back, never-pushed messages are counted
/// ([`Settlement::ReleaseUnpushed`]; JetStream itself counts every
/// delivery). Opened, or made, on first use. Without it (the broker away,
/// no permission) a hand-back counts as JetStream counts it: one attempt.
#[derive(Debug, Default)]
struct Returns {
    state: tokio::sync::Mutex<(Option<jetstream::kv::Store>, Option<std::time::Instant>)>,
}

impl Returns {
    async fn store(&self, js: &jetstream::Context) -> Option<jetstream::kv::Store> {
        let mut state = self.state.lock().await;
        if let Some(kv) = &state.0 {
            return Some(kv.clone());
        }
        if state.1.is_some_and(|at| at.elapsed() < RETURNS_RETRY) {
            return None;
        }
        let bucket = ferry_api::naming::RETURNS_BUCKET;
        let opened = match js.get_key_value(bucket).await {
            Ok(kv) => Ok(kv),
            Err(_) => {
                let config = jetstream::kv::Config {
                    bucket: bucket.into(),
                    history: 1,
                    max_age: RETURNS_MAX_AGE,
                    ..Default::default()
                };
                match js.create_key_value(config).await {
                    Ok(kv) => Ok(kv),
                    // Made meanwhile by another sidecar?
                    Err(e) => js.get_key_value(bucket).await.map_err(|_| e.to_string()),
                }
            }
        };
        match opened {
            Ok(kv) => {
                state.0 = Some(kv.clone());
                Some(kv)
            }
            Err(e) => {
                tracing::warn!(bucket, error = %e, "cannot open the returns bucket: a message handed back unpushed counts as an attempt");
                state.1 = Some(std::time::Instant::now());
                None
            }
        }
    }
}

/// What a consumer's fetched messages need to note or read a return.
#[derive(Debug)]
struct ReturnsOf {
    broker: NatsBroker,
    stream: String,
    consumer: String,
}

/// A note in the returns bucket: `{count} {delivered} {published_ms}`, how
/// many times a message was handed back unpushed, JetStream's delivery
/// count at the last of them, and when the message was stored. A note is
/// void for a message stored at another time (its stream was made again
/// under the same name, sequences starting over) and for a delivery count
/// not above the note's (counts only grow while a consumer lives: an
/// earlier consumer of the same name left it). A message's note is deleted
/// once the message is acked or rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReturnsNote {
    count: u32,
    delivered: u32,
    published_ms: u64,
}

impl ReturnsNote {
    fn parse(text: &str) -> Option<ReturnsNote> {
        let mut parts = text.split_whitespace();
        let note = ReturnsNote {
            count: parts.next()?.parse().ok()?,
            delivered: parts.next()?.parse().ok()?,
            published_ms: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(note)
    }

    fn text(self) -> String {
        format!("{} {} {}", self.count, self.delivered, self.published_ms)
    }

    /// The count that holds for a delivery of the message stored at
    /// `published_ms` with JetStream's count `delivered`.
    fn count_for(self, delivered: u32, published_ms: u64) -> u32 {
        if self.published_ms != published_ms || self.delivered >= delivered {
            0
        } else {
            self.count
        }
    }
}

/// One delivered message, as its returns note knows it.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    sequence: u64,
    /// JetStream's delivery count (not less what the note says).
    delivered: u32,
    published_ms: u64,
}

impl Delivery {
    /// The delivery a JetStream message's reply subject describes.
    fn of(msg: &jetstream::Message) -> Option<Delivery> {
        let info = msg.info().ok()?;
        Some(Delivery {
            sequence: info.stream_sequence,
            delivered: u32::try_from(info.delivered).unwrap_or(u32::MAX),
            published_ms: u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
        })
    }
}

impl ReturnsOf {
    fn key(&self, sequence: u64) -> String {
        ferry_api::naming::returns_key(&self.stream, &self.consumer, sequence)
    }

    /// How many times the message of `d` was handed back unpushed.
    async fn count(&self, d: Delivery) -> u32 {
        let Some(kv) = self.broker.returns.store(&self.broker.js).await else { return 0 };
        read_note(&kv, &self.key(d.sequence)).await.map_or(0, |n| n.count_for(d.delivered, d.published_ms))
    }

    /// Notes one more unpushed hand-back of the message of `d`. Only the
    /// sidecar holding the message writes its key, so no compare-and-set.
    async fn note(&self, d: Delivery) -> Result<(), String> {
        let kv = self.broker.returns.store(&self.broker.js).await.ok_or("no returns bucket")?;
        let key = self.key(d.sequence);
        let before = read_note(&kv, &key).await.map_or(0, |n| n.count_for(d.delivered, d.published_ms));
        let note = ReturnsNote { count: before + 1, delivered: d.delivered, published_ms: d.published_ms };
        tracing::debug!(key, ?note, "noting a return");
        kv.put(key, note.text().into()).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Deletes the note of a message that was acked or rejected.
    async fn forget(&self, sequence: u64) {
        let Some(kv) = self.broker.returns.store(&self.broker.js).await else { return };
        let key = self.key(sequence);
        if let Err(e) = kv.delete(&key).await {
            tracing::debug!(key, error = %e, "returns note not deleted (it expires on its own)");
        }
    }
}

/// The note under `key` in the returns bucket (`None`: none, or unreadable).
async fn read_note(kv: &jetstream::kv::Store, key: &str) -> Option<ReturnsNote> {
    let note = match kv.get(key).await {
        Ok(Some(v)) => std::str::from_utf8(&v).ok().and_then(ReturnsNote::parse),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(key, error = %e, "returns note not read");
            None
        }
    };
    tracing::debug!(key, ?note, "returns note");
    note
}

/// The server's `max_payload` as last seen, kept in a file on the data
/// volume: a sidecar restarted while the broker is away then refuses at
/// the door (413) what the broker would refuse, instead of storing it and
/// parking it once the broker says no. NATS's default (1 MiB) only when
/// this sidecar never reached the broker.
#[derive(Debug, Default)]
struct LastMaxPayload {
    file: Option<std::path::PathBuf>,
    /// 0: none known.
    value: std::sync::atomic::AtomicUsize,
    /// This process has heard from the server (the client's value is the
    /// server's).
    heard: std::sync::atomic::AtomicBool,
    /// Serializes writes of the file (`write_atomic` uses one temp name).
    writing: std::sync::Mutex<()>,
}

impl LastMaxPayload {
    fn load(file: std::path::PathBuf) -> Self {
        let value = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<usize>().ok()).unwrap_or(0);
        LastMaxPayload { file: Some(file), value: value.into(), ..Default::default() }
    }

    fn get(&self) -> Option<usize> {
        Some(self.value.load(std::sync::atomic::Ordering::Relaxed)).filter(|&v| v > 0)
    }

    /// Notes the value the server sent; writes the file when it changed
    /// (rarely: a tiny file, replaced atomically as the log's cursors are).
    fn note(&self, v: usize) {
        if self.value.load(std::sync::atomic::Ordering::Relaxed) == v {
            return; // every produce call: a read only
        }
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.value.swap(v, std::sync::atomic::Ordering::Relaxed) == v {
            return;
        }
        let Some(file) = &self.file else { return };
        let (Some(dir), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str())) else { return };
        if let Err(e) = ferry_log::fs::write_atomic(&ferry_log::StdFs, dir, name, v.to_string().as_bytes()) {
            tracing::debug!(file = %file.display(), error = %e, "could not keep the broker's max_payload");
        }
    }
}

impl NatsBroker {
    /// Connects in the background: returns at once, and the client keeps
    /// (re)connecting for ever, so a broker that is down at start is no error.
    pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Self, BrokerError> {
        let mut opts = ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(2000)));
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = epoch.clone();
        opts = opts.event_callback(move |event| {
            if matches!(event, async_nats::Event::Disconnected | async_nats::Event::Connected) {
                seen.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            std::future::ready(())
        });
        if let Some(path) = &cfg.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| BrokerError::Refused(format!("credentials file {}: {e}", path.display())))?;
        }
        if let Some((user, password)) = &cfg.user_password {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &cfg.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &cfg.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let client = opts
            .connect(cfg.urls.clone())
            .await
            .map_err(|e| BrokerError::Unavailable(format!("connecting to {:?}: {e}", cfg.urls)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(NatsBroker { client, js, last_max_payload: Default::default(), returns: Default::default(), epoch })
    }

    /// Keeps the server's `max_payload` in `file` across restarts (see
    /// [`LastMaxPayload`]), starting from what it holds.
    pub fn remembering_max_payload(mut self, file: std::path::PathBuf) -> Self {
        self.last_max_payload = Arc::new(LastMaxPayload::load(file));
        self
    }

    /// The JetStream context (for tests and tools).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

impl NatsBroker {
    /// The config bucket the operator made (none without an operator: then
    /// there is nothing to count into).
    async fn config_bucket(&self) -> Result<jetstream::kv::Store, String> {
        self.js.get_key_value(ferry_api::naming::CONFIG_BUCKET).await.map_err(|e| e.to_string())
    }

    /// A failed API call is `Unavailable` when the connection is down or the
    /// call timed out (worth retrying), else the broker `Refused` it.
    fn classify(&self, e: impl std::fmt::Display) -> BrokerError {
        let text = e.to_string();
        if !self.is_connected() || text.to_ascii_lowercase().contains("timed out") {
            BrokerError::Unavailable(text)
        } else {
            BrokerError::Refused(text)
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError> {
        self.js.create_or_update_stream(plan.to_jetstream()).await.map(|_| ()).map_err(|e| self.classify(e))
    }

    async fn ensure_consumer(&self, plan: &ConsumerPlan) -> Result<(), BrokerError> {
        let stream = self.js.get_stream(&plan.stream).await.map_err(|e| self.classify(e))?;
        stream.create_consumer(plan.to_jetstream()).await.map(|_| ()).map_err(|e| self.classify(e))
    }

    async fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError> {
        if !self.is_connected() {
            return Err(BrokerError::Unavailable("not connected".into()));
        }
        let mut map = HeaderMap::new();
        for (name, value) in &msg.headers {
            map.append(name.as_str(), value.as_str());
        }
        map.insert(headers::NATS_MSG_ID, msg.id.as_str());
        let subject = msg.subject.clone();
        let publish = PublishMessage::build().payload(msg.payload).headers(map);
        use async_nats::jetstream::context::PublishErrorKind as K;
        let pending = self.js.send_publish(msg.subject, publish).await.map_err(|e| match e.kind() {
            K::MaxPayloadExceeded => BrokerError::TooLarge(e.to_string()),
            _ => self.classify(e),
        })?;
        Ok(async move {
            match pending.await {
                Ok(ack) => Ok(PubAck { stream: ack.stream, sequence: ack.sequence, duplicate: ack.duplicate }),
                Err(e) => Err(match e.kind() {
                    K::StreamNotFound => BrokerError::NoStream(subject),
                    K::TimedOut | K::BrokenPipe => BrokerError::Unavailable(e.to_string()),
                    _ if exceeds_maximum(&e) => BrokerError::TooLarge(e.to_string()),
                    _ => BrokerError::Refused(e.to_string()),
                }),
            }
        }
        .boxed())
    }

    async fn consumer(&self, plan: &ConsumerPlan) -> Result<Arc<dyn Consumer>, BrokerError> {
        let stream = self.js.get_stream(&plan.stream).await.map_err(|e| self.classify(e))?;
        let consumer = stream.create_consumer(plan.to_jetstream()).await.map_err(|e| self.classify(e))?;
        let returns =
            Arc::new(ReturnsOf { broker: self.clone(), stream: plan.stream.clone(), consumer: plan.name.clone() });
        Ok(Arc::new(NatsConsumer { consumer, broker: self.clone(), returns }))
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn connection_epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server's `max_payload`. Before this process first heard from
    /// the server: the value it had last time (see [`LastMaxPayload`]),
    /// else NATS's default (1 MiB), which async-nats checks publishes
    /// against.
    fn max_message_bytes(&self) -> Option<usize> {
        // Once heard, every produce call reads two atomics. Before that the
        // server info is asked for: async-nats sets the client's value before
        // it publishes the info (but after it reports the state Connected).
        let last = &self.last_max_payload;
        let heard = last.heard.load(std::sync::atomic::Ordering::Relaxed);
        if heard || self.client.try_server_info().is_some() {
            if !heard {
                last.heard.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let v = self.client.max_payload();
            last.note(v);
            return Some(v);
        }
        Some(last.get().unwrap_or_else(|| self.client.max_payload()))
    }

    async fn count_dead_letter(&self, namespace: &str, subscription: &str) {
        let key = ferry_api::naming::dead_letter_count_key(namespace, subscription);
        let counted = match self.config_bucket().await {
            Ok(kv) => add_one(&kv, &key).await,
            Err(e) => Err(e),
        };
        if let Err(e) = counted {
            tracing::debug!(key, error = %e, "dead-letter count not written");
        }
    }

    async fn count_dropped(&self, namespace: &str, subscription: &str, reason: &str) {
        use ferry_api::naming::{dropped_count_key, last_dropped_key};
        let kv = match self.config_bucket().await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::debug!(subscription, error = %e, "drop count not written");
                return;
            }
        };
        // The reason first: the operator posts it when it sees the count rise.
        let key = last_dropped_key(namespace, subscription);
        if let Err(e) = kv.put(&key, reason.to_owned().into()).await {
            tracing::debug!(key, error = %e, "last drop reason not written");
        }
        let key = dropped_count_key(namespace, subscription);
        if let Err(e) = add_one(&kv, &key).await {
            tracing::debug!(key, error = %e, "drop count not written");
        }
    }
}

/// Adds one to a counter in the config bucket (compare-and-set, retried on
/// a concurrent writer).
async fn add_one(kv: &jetstream::kv::Store, key: &str) -> Result<(), String> {
    for _ in 0..16 {
        let entry = kv.entry(key).await.map_err(|e| e.to_string())?;
        let written = match entry.filter(|e| e.operation == jetstream::kv::Operation::Put) {
            Some(e) => {
                let n: u64 = std::str::from_utf8(&e.value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                kv.update(key, (n + 1).to_string().into(), e.revision).await.map(|_| ()).map_err(|e| e.to_string())
            }
            None => kv.create(key, "1".into()).await.map(|_| ()).map_err(|e| e.to_string()),
        };
        if written.is_ok() {
            return Ok(());
        }
    }
    Err("gave up after 16 concurrent updates".into())
}

/// Whether JetStream refused a publish as larger than the stream's largest
/// message (error code 10054).
fn exceeds_maximum(e: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|s| s.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// A JetStream pull consumer.
struct NatsConsumer {
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    broker: NatsBroker,
    returns: Arc<ReturnsOf>,
}

struct NatsSettle {
    acker: Acker,
    delivery: Delivery,
    /// A returns note was found for this delivery: deleted once it is
    /// acked or rejected.
    noted: std::sync::atomic::AtomicBool,
    returns: Arc<ReturnsOf>,
}

#[async_trait]
impl Settle for NatsSettle {
    async fn settle(&self, how: Settlement) -> Result<(), BrokerError> {
        if how == Settlement::ReleaseUnpushed {
            // Noted before the nak, so the next delivery finds it. A note
            // that fails leaves this one counted as an attempt.
            if let Err(e) = self.returns.note(self.delivery).await {
                tracing::debug!(sequence = self.delivery.sequence, error = %e, "hand-back not noted");
            }
        }
        if matches!(how, Settlement::Ack | Settlement::Reject) && self.noted.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.returns.forget(self.delivery.sequence).await;
        }
        let kind = match how {
            Settlement::Ack => AckKind::Ack,
            // A bare Nak redelivers at once; always give a delay.
            Settlement::Retry(delay) => AckKind::Nak(Some(delay.max(Duration::from_millis(1)))),
            Settlement::Release | Settlement::ReleaseUnpushed => AckKind::Nak(Some(Duration::from_millis(1))),
            Settlement::Reject => AckKind::Term,
            Settlement::Progress => AckKind::Progress,
        };
        self.acker.ack_with(kind).await.map_err(|e| BrokerError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn leased(&self) -> Result<u64, BrokerError> {
        let info = self.consumer.get_info().await.map_err(|e| self.broker.classify(e))?;
        Ok(info.num_ack_pending as u64)
    }

    /// A pull request for one message of at most one byte, without
    /// waiting: no message fits, so the server answers "no messages" or
    /// "message size exceeds max bytes" and delivers none, but counts the
    /// request as the consumer's activity (nats-server removes a consumer
    /// with an inactivity threshold only when no pull request came within
    /// it). A consumer that is gone has no responder: an error.
    async fn keep_alive(&self) -> Result<(), BrokerError> {
        let info = self.consumer.cached_info();
        let subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", info.stream_name, info.name);
        let request = bytes::Bytes::from_static(br#"{"batch":1,"max_bytes":1,"no_wait":true}"#);
        let answer = self
            .broker
            .client
            .request(subject, request)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("consumer {}: {e}", info.name)))?;
        match answer.status {
            Some(async_nats::StatusCode::NOT_FOUND | async_nats::StatusCode::TIMEOUT) => Ok(()),
            Some(code)
                if code.as_u16() == 409 && answer.description.as_deref().is_some_and(|d| d.contains("MaxBytes")) =>
            {
                Ok(())
            }
            None | Some(async_nats::StatusCode::OK) => {
                // Not expected (no message is one byte long): hand it back
                // at once, noted, so it counts as no attempt.
                let msg = jetstream::Message { message: answer, context: self.broker.js.clone() };
                if let Some(delivery) = Delivery::of(&msg) {
                    let _ = self.returns.note(delivery).await;
                }
                msg.ack_with(AckKind::Nak(Some(Duration::from_millis(1))))
                    .await
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))
            }
            Some(code) => Err(BrokerError::Unavailable(format!(
                "consumer {}: keep-alive answered {code} {}",
                info.name,
                answer.description.unwrap_or_default()
            ))),
        }
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Fetched>, BrokerError> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .expires(wait.max(Duration::from_millis(10)))
            .messages()
            .await
            .map_err(|e| self.broker.classify(e))?;
        let mut out = Vec::new();
        let mut settles: Vec<Arc<NatsSettle>> = Vec::new();
        while let Some(next) = batch.next().await {
            let msg = match next {
                Ok(msg) => msg,
                // The messages already here are leased to us: dropped, they
                // would come back only after their ack wait, behind later
                // ones of their key. The next fetch meets the error again.
                Err(e) if !out.is_empty() => {
                    tracing::debug!(error = %e, fetched = out.len(), "a fetch ended early; keeping what came");
                    break;
                }
                Err(e) => return Err(self.broker.classify(e)),
            };
            let Some(delivery) = Delivery::of(&msg) else { continue };
            let Delivery { sequence, delivered, published_ms } = delivery;
            let (message, acker) = msg.split();
            let mut headers = Vec::new();
            let mut id = None;
            if let Some(map) = &message.headers {
                for (name, values) in map.iter() {
                    for v in values {
                        if AsRef::<str>::as_ref(name).eq_ignore_ascii_case(headers::NATS_MSG_ID) {
                            id = Some(v.as_str().to_owned());
                        } else {
                            headers.push((name.to_string(), v.as_str().to_owned()));
                        }
                    }
                }
            }
            let settle = Arc::new(NatsSettle { acker, delivery, noted: false.into(), returns: self.returns.clone() });
            settles.push(settle.clone());
            out.push(Fetched {
                id: id.unwrap_or_else(|| format!("seq-{sequence}")),
                subject: message.subject.to_string(),
                headers,
                payload: message.payload,
                sequence,
                delivered,
                published_ms,
                settle,
            });
        }
        // Deliveries that were handed back unpushed were no attempts. Asked
        // once the batch is in, never while it comes: async-nats ends a
        // batch at its own timer whatever is still buffered, and a message
        // left behind stays leased, out of its key's order, until its ack
        // wait runs out.
        if out.iter().all(|m| m.delivered <= 1) {
            return Ok(out);
        }
        let counts = futures::future::join_all(settles.iter().map(|s| async move {
            if s.delivery.delivered > 1 {
                self.returns.count(s.delivery).await
            } else {
                0
            }
        }))
        .await;
        for ((m, s), returned) in out.iter_mut().zip(&settles).zip(counts) {
            if returned > 0 {
                s.noted.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            m.delivered = m.delivered.saturating_sub(returned).max(1);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::ReturnsNote;

    #[test]
    fn a_returns_note_counts_for_later_deliveries_of_its_message_only() {
        let note = ReturnsNote::parse("3 4 1700").unwrap();
        assert_eq!(note, ReturnsNote { count: 3, delivered: 4, published_ms: 1700 });
        assert_eq!(ReturnsNote::parse(&note.text()), Some(note));
        assert_eq!(note.count_for(5, 1700), 3, "delivered again after the hand-back");
        assert_eq!(note.count_for(4, 1700), 0, "a count not above the note's: an earlier consumer's note");
        assert_eq!(note.count_for(2, 1700), 0);
        assert_eq!(note.count_for(5, 1800), 0, "another message at that sequence (a stream made again)");
        for bad in ["", "2", "2 3", "x 1 2", "1 x 2", "1 2 x", "1 2 3 4"] {
            assert_eq!(ReturnsNote::parse(bad), None, "{bad:?}");
        }
    }
}
