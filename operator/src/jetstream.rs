//! The broker side of reconciling: apply desired streams, consumers and KV
//! entries to JetStream, level-based and idempotent — nothing is written
//! when the broker already matches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer, kv, stream};
use ferry_api::naming;
use ferry_api::topic::DeletionPolicy;
use futures::TryStreamExt;

use crate::build::{DesiredSubscription, DesiredTopic};

/// Why applying failed, by what the status should say.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The broker cannot be reached (retry with backoff).
    #[error("broker unavailable: {0}")]
    BrokerUnavailable(String),
    /// A field the broker cannot change in place was changed.
    #[error("{field} cannot be changed on an existing {object} (is {current}, spec says {desired}); delete and recreate the resource")]
    ImmutableField {
        /// The broker object: `stream` or `consumer`.
        object: &'static str,
        /// The spec field (or, for a setting Ferry never varies, the
        /// broker's name for it).
        field: &'static str,
        /// What the broker has.
        current: String,
        /// What the spec asks for.
        desired: String,
    },
    /// The broker refused the change.
    #[error("broker refused: {0}")]
    Refused(String),
}

impl ApplyError {
    /// When to look again: after the object's backoff (`unavailable`, asked
    /// only then) for a broker out of reach, on the refresh period for a
    /// refusal, which can pass (JetStream answers 503 just after a
    /// restart); never for a field that cannot change, which waits for a
    /// new spec.
    pub fn retry(
        &self,
        unavailable: impl FnOnce() -> std::time::Duration,
        refresh: std::time::Duration,
    ) -> Option<std::time::Duration> {
        match self {
            ApplyError::BrokerUnavailable(_) => Some(unavailable()),
            ApplyError::Refused(_) => Some(refresh),
            ApplyError::ImmutableField { .. } => None,
        }
    }

    /// The condition reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ApplyError::BrokerUnavailable(_) => "BrokerUnavailable",
            ApplyError::ImmutableField { .. } => "ImmutableField",
            ApplyError::Refused(_) => "BrokerRefused",
        }
    }
}

fn classify(client: &async_nats::Client, e: impl std::fmt::Display) -> ApplyError {
    let text = e.to_string();
    if client.connection_state() != async_nats::connection::State::Connected || text.contains("timed out") {
        ApplyError::BrokerUnavailable(text)
    } else {
        ApplyError::Refused(text)
    }
}

/// Timeout of each JetStream API call.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A JetStream connection with the config bucket.
#[derive(Clone)]
pub struct JetStream {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Replicas of the config bucket (`--config-replicas`).
    config_replicas: usize,
    /// Whether the config bucket was made, or its replicas checked, already.
    bucket_checked: Arc<AtomicBool>,
}

impl JetStream {
    /// Wraps a connected client; the config bucket has 1 replica.
    pub fn new(client: async_nats::Client) -> Self {
        let js = jetstream::ContextBuilder::new().timeout(REQUEST_TIMEOUT).build(client.clone());
        JetStream { client, js, config_replicas: 1, bucket_checked: Arc::default() }
    }

    /// The same with `replicas` replicas of the config bucket (in a
    /// clustered NATS, more than one keeps the sidecars' config watch alive
    /// when a server goes).
    #[must_use]
    pub fn with_config_replicas(mut self, replicas: usize) -> Self {
        self.config_replicas = replicas.max(1);
        self.bucket_checked = Arc::default();
        self
    }

    /// Makes the config bucket with `--config-replicas` replicas, or sets an
    /// existing one's replicas (its stream `KV_ferry-config`) to that when
    /// they differ. A refusal (e.g. more replicas than the broker has
    /// servers) says which setting asked for what.
    pub async fn ensure_bucket(&self) -> Result<(), ApplyError> {
        let replicas = self.config_replicas;
        let refused = |e: ApplyError| match e {
            ApplyError::Refused(text) => ApplyError::Refused(format!(
                "config bucket {} with {replicas} replica(s) (--config-replicas): {text}",
                naming::CONFIG_BUCKET
            )),
            other => other,
        };
        let stream_name = format!("KV_{}", naming::CONFIG_BUCKET);
        match self.js.get_stream(&stream_name).await {
            Ok(mut s) => {
                let mut config = s.info().await.map_err(|e| classify(&self.client, e))?.config.clone();
                if config.num_replicas != replicas {
                    let from = config.num_replicas;
                    config.num_replicas = replicas;
                    self.js.update_stream(config).await.map_err(|e| refused(classify(&self.client, e)))?;
                    tracing::info!(bucket = naming::CONFIG_BUCKET, from, to = replicas, "config bucket replicas set");
                }
            }
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => {
                self.js
                    .create_key_value(kv::Config {
                        bucket: naming::CONFIG_BUCKET.into(),
                        history: 1,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| refused(classify(&self.client, e)))?;
            }
            Err(e) => return Err(classify(&self.client, e)),
        }
        self.bucket_checked.store(true, Ordering::Release);
        Ok(())
    }

    /// Fails fast while disconnected rather than waiting out a timeout.
    fn connected(&self) -> Result<(), ApplyError> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(ApplyError::BrokerUnavailable("not connected to the broker".into()))
        }
    }

    /// The config bucket, made (or its replicas set) on first use, see
    /// [`Self::ensure_bucket`].
    pub async fn bucket(&self) -> Result<kv::Store, ApplyError> {
        if self.bucket_checked.load(Ordering::Acquire) {
            if let Ok(store) = self.js.get_key_value(naming::CONFIG_BUCKET).await {
                return Ok(store);
            }
        }
        self.ensure_bucket().await?;
        self.js.get_key_value(naming::CONFIG_BUCKET).await.map_err(|e| classify(&self.client, e))
    }

    /// Puts a KV entry unless it already holds exactly this value.
    async fn put_if_changed(&self, key: &str, value: &[u8]) -> Result<bool, ApplyError> {
        let bucket = self.bucket().await?;
        let current = bucket.get(key).await.map_err(|e| classify(&self.client, e))?;
        if current.as_deref() == Some(value) {
            return Ok(false);
        }
        bucket.put(key, value.to_vec().into()).await.map_err(|e| classify(&self.client, e))?;
        Ok(true)
    }

    async fn delete_key(&self, key: &str) -> Result<(), ApplyError> {
        let bucket = self.bucket().await?;
        if bucket.get(key).await.map_err(|e| classify(&self.client, e))?.is_some() {
            bucket.delete(key).await.map_err(|e| classify(&self.client, e))?;
        }
        Ok(())
    }

    /// Creates or updates a Topic's stream and KV entry. Returns whether
    /// anything was written.
    pub async fn apply_topic(&self, d: &DesiredTopic) -> Result<bool, ApplyError> {
        self.connected()?;
        let want = d.stream.to_jetstream();
        let mut changed = false;
        match self.js.get_stream(&want.name).await {
            Ok(mut s) => {
                let have = s.info().await.map_err(|e| classify(&self.client, e))?.config.clone();
                if have.storage != want.storage {
                    return Err(ApplyError::ImmutableField {
                        object: "stream",
                        field: "spec.storage",
                        current: format!("{:?}", have.storage),
                        desired: format!("{:?}", want.storage),
                    });
                }
                if !same_stream(&have, &want) {
                    self.js.update_stream(want).await.map_err(|e| classify(&self.client, e))?;
                    changed = true;
                }
            }
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => {
                self.js.create_stream(want).await.map_err(|e| classify(&self.client, e))?;
                changed = true;
            }
            Err(e) => return Err(classify(&self.client, e)),
        }
        changed |= self.put_if_changed(&d.kv.0, &d.kv.1).await?;
        Ok(changed)
    }

    /// Deletes a Topic's broker objects per its deletion policy (the KV entry
    /// always goes). Not found is success, and so are names NATS cannot hold
    /// (a Topic `orders.v1`, from before the CRD refused them): nothing was
    /// ever made under them. The KV entry goes first, so no sidecar re-creates
    /// the stream from it after the stream is gone.
    pub async fn delete_topic(&self, namespace: &str, name: &str, policy: DeletionPolicy) -> Result<(), ApplyError> {
        if !valid_names(&[namespace, name]) {
            return Ok(());
        }
        self.connected()?;
        self.delete_key(&naming::topic_key(namespace, name)).await?;
        if policy == DeletionPolicy::Delete {
            match self.js.delete_stream(naming::stream_name(namespace, name)).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(classify(&self.client, e)),
            }
        }
        Ok(())
    }

    /// Creates or updates a Subscription's consumer and KV entry. Its topic's
    /// stream must exist, for a `fanout: Pod` subscription too (whose
    /// consumers the sidecars make).
    pub async fn apply_subscription(&self, d: &DesiredSubscription) -> Result<bool, ApplyError> {
        self.connected()?;
        let mut changed = false;
        let stream = self.js.get_stream(&d.stream).await.map_err(|e| classify(&self.client, e))?;
        if let Some(plan) = &d.consumer {
            let want = plan.to_jetstream();
            let same = match stream.consumer_info(&plan.name).await {
                Ok(info) => {
                    let have = &info.config;
                    // Before any update: JetStream would refuse it, and so
                    // would every sidecar that makes the consumer from the
                    // new spec in the config entry (which therefore stays
                    // as it was).
                    if let Some(e) = immutable_consumer_change(have, &want) {
                        return Err(e);
                    }
                    have.ack_wait == want.ack_wait
                        && have.max_deliver == want.max_deliver
                        && have.max_ack_pending == want.max_ack_pending
                        && have.filter_subject == want.filter_subject
                }
                Err(_) => false,
            };
            if !same {
                stream.create_consumer(want).await.map_err(|e| classify(&self.client, e))?;
                changed = true;
            }
        }
        changed |= self.put_if_changed(&d.kv.0, &d.kv.1).await?;
        Ok(changed)
    }

    /// Deletes a Subscription's consumer and its per-pod consumers (if its
    /// stream still exists) and KV entries. Names NATS cannot hold are
    /// skipped, as in [`Self::delete_topic`]. The sidecars' config entry
    /// goes first: a sidecar still running it would re-create a consumer
    /// deleted before it, left behind once the finalizer is gone, and
    /// adopted, position and all, by the next Subscription of that name
    /// (a per-pod one, too, within its inactive threshold).
    pub async fn delete_subscription(
        &self,
        namespace: &str,
        name: &str,
        topic: &str,
        app: &str,
    ) -> Result<(), ApplyError> {
        if !valid_names(&[namespace, name]) {
            return Ok(());
        }
        self.connected()?;
        self.withdraw_subscription(namespace, app, name).await?;
        if valid_names(&[topic]) {
            if let Ok(stream) = self.js.get_stream(naming::stream_name(namespace, topic)).await {
                let mut consumers = pod_consumer_names(&stream, name).await.map_err(|e| classify(&self.client, e))?;
                consumers.insert(naming::consumer_name(name));
                for consumer in consumers {
                    match stream.delete_consumer(&consumer).await {
                        Ok(_) => {}
                        Err(e) if e.to_string().contains("not found") => {}
                        Err(e) => return Err(classify(&self.client, e)),
                    }
                }
            }
        }
        self.delete_key(&naming::dead_letter_count_key(namespace, name)).await?;
        self.delete_key(&naming::dropped_count_key(namespace, name)).await?;
        self.delete_key(&naming::last_dropped_key(namespace, name)).await
    }

    /// Removes a Subscription's entry from the sidecars' config, keeping its
    /// consumer: its Topic is gone, so its sidecars stop, and they pick up
    /// where they were if the Topic comes back with its stream kept.
    pub async fn withdraw_subscription(&self, namespace: &str, app: &str, name: &str) -> Result<(), ApplyError> {
        if !valid_names(&[namespace, app, name]) {
            return Ok(());
        }
        self.delete_key(&naming::subscription_key(namespace, app, name)).await
    }

    /// What the sidecars note of a subscription in the config bucket (its
    /// dead-letter and drop counts, why the last drop happened), read with
    /// one lookup of the bucket.
    pub async fn sidecar_stats(&self, namespace: &str, subscription: &str) -> Result<SidecarStats, ApplyError> {
        self.connected()?;
        let bucket = self.bucket().await?;
        let read = |key: String| {
            let bucket = &bucket;
            async move {
                let value = bucket.get(key).await.map_err(|e| classify(&self.client, e))?;
                Ok::<_, ApplyError>(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
            }
        };
        let count = |v: Option<String>| v.and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(SidecarStats {
            dead_lettered: count(read(naming::dead_letter_count_key(namespace, subscription)).await?),
            dropped: count(read(naming::dropped_count_key(namespace, subscription)).await?),
            last_dropped: read(naming::last_dropped_key(namespace, subscription)).await?,
        })
    }

    /// The counts of a Subscription's group consumer, or `None` when the
    /// broker has no such consumer (or not its topic's stream, or the names
    /// are ones NATS cannot hold).
    pub async fn consumer_counts(
        &self,
        namespace: &str,
        topic: &str,
        subscription: &str,
    ) -> Result<Option<ConsumerCounts>, ApplyError> {
        let Some(stream) = self.stream_if_any(namespace, topic).await? else { return Ok(None) };
        match stream.consumer_info(naming::consumer_name(subscription)).await {
            Ok(info) => Ok(Some(ConsumerCounts::of(&info))),
            Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound) => {
                Ok(None)
            }
            Err(e) => Err(classify(&self.client, e)),
        }
    }

    /// The per-pod consumers of a `fanout: Pod` Subscription (those the
    /// sidecars made: named [`naming::pod_consumer_name`] and with an
    /// inactive threshold), each with its counts; `None` when the topic's
    /// stream does not exist.
    ///
    /// JetStream can list a stream's consumers only whole (its filter is by
    /// subject, and every consumer of a topic has the same one), so this
    /// lists their names (a short string each, 1024 a page) and reads the
    /// info only of this Subscription's. Reading the info is no activity:
    /// it does not keep a gone pod's consumer alive past its threshold.
    pub async fn pod_consumer_counts(
        &self,
        namespace: &str,
        topic: &str,
        subscription: &str,
    ) -> Result<Option<Vec<(String, ConsumerCounts)>>, ApplyError> {
        let Some(stream) = self.stream_if_any(namespace, topic).await? else { return Ok(None) };
        let names = pod_consumer_names(&stream, subscription).await.map_err(|e| classify(&self.client, e))?;
        let mut consumers = Vec::with_capacity(names.len());
        for name in names {
            match stream.consumer_info(&name).await {
                // One without a threshold was not made by a sidecar.
                Ok(info) if info.config.inactive_threshold.is_zero() => {}
                Ok(info) => consumers.push((name, ConsumerCounts::of(&info))),
                // Its pod went and its threshold passed since the listing.
                Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => {}
                Err(e) => return Err(classify(&self.client, e)),
            }
        }
        Ok(Some(consumers))
    }

    /// Messages and bytes of a topic's stream, or `None` when the broker has
    /// no such stream (or NATS cannot hold its name).
    pub async fn topic_counts(&self, namespace: &str, name: &str) -> Result<Option<(u64, u64)>, ApplyError> {
        let Some(mut stream) = self.stream_if_any(namespace, name).await? else { return Ok(None) };
        let info = stream.info().await.map_err(|e| classify(&self.client, e))?;
        Ok(Some((info.state.messages, info.state.bytes)))
    }

    /// A topic's stream, `None` when there is none (or NATS cannot hold its
    /// name); fails fast while disconnected, for the status readers.
    async fn stream_if_any(&self, namespace: &str, topic: &str) -> Result<Option<stream::Stream>, ApplyError> {
        if !valid_names(&[namespace, topic]) {
            return Ok(None);
        }
        self.connected()?;
        match self.js.get_stream(naming::stream_name(namespace, topic)).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e) if stream_not_found(&e) => Ok(None),
            Err(e) => Err(classify(&self.client, e)),
        }
    }
}

/// What the sidecars note of a subscription in the config bucket; 0 and
/// `None` where they wrote nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarStats {
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages dropped for want of a dead-letter topic.
    pub dropped: u64,
    /// Why the last of those was dropped.
    pub last_dropped: Option<String>,
}

/// What a Subscription's status shows of a consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerCounts {
    /// Messages not yet delivered to it (`num_pending`): the lag.
    pub pending: u64,
    /// Delivered and not yet acknowledged (`num_ack_pending`).
    pub in_flight: u64,
    /// Delivered more than once and not yet acknowledged (`num_redelivered`).
    pub redelivered: u64,
}

impl ConsumerCounts {
    fn of(info: &consumer::Info) -> Self {
        ConsumerCounts {
            pending: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        }
    }
}

impl std::ops::Add for ConsumerCounts {
    type Output = ConsumerCounts;
    fn add(self, other: ConsumerCounts) -> ConsumerCounts {
        ConsumerCounts {
            pending: self.pending + other.pending,
            in_flight: self.in_flight + other.in_flight,
            redelivered: self.redelivered + other.redelivered,
        }
    }
}

impl std::iter::Sum for ConsumerCounts {
    fn sum<I: Iterator<Item = ConsumerCounts>>(iter: I) -> ConsumerCounts {
        iter.fold(ConsumerCounts::default(), std::ops::Add::add)
    }
}

/// The names of a Subscription's per-pod consumers on `stream`. Listed by
/// offset, 1024 a page: a consumer made or deleted meanwhile can shift a
/// name into two pages, hence the set.
async fn pod_consumer_names(
    stream: &stream::Stream,
    subscription: &str,
) -> Result<std::collections::BTreeSet<String>, jetstream::context::StreamsError> {
    let mut names = std::collections::BTreeSet::new();
    let mut listing = stream.consumer_names();
    while let Some(name) = listing.try_next().await? {
        if naming::pod_of_consumer(subscription, &name).is_some() {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Whether getting a stream failed because the broker has no such stream.
fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Whether each name is one Ferry could have made broker objects under.
fn valid_names(names: &[&str]) -> bool {
    names.iter().all(|n| naming::validate_label("name", n).is_ok())
}

/// The first setting of an existing consumer that JetStream refuses to
/// update (err 10012: deliver policy with its start sequence or time, ack
/// policy, replay policy, pull or push) and that differs from the plan's.
/// Ferry varies only the deliver policy (`spec.startPosition`); the others
/// it sets alike for every consumer, so a difference there means the
/// consumer was made by something else. (The filter subject can be updated
/// since NATS 2.10.)
fn immutable_consumer_change(have: &consumer::Config, want: &consumer::pull::Config) -> Option<ApplyError> {
    let immutable = |field: &'static str, current: String, desired: String| {
        (current != desired).then_some(ApplyError::ImmutableField { object: "consumer", field, current, desired })
    };
    immutable("spec.startPosition", start_position(&have.deliver_policy), start_position(&want.deliver_policy))
        .or_else(|| immutable("ack policy", format!("{:?}", have.ack_policy), format!("{:?}", want.ack_policy)))
        .or_else(|| {
            immutable("replay policy", format!("{:?}", have.replay_policy), format!("{:?}", want.replay_policy))
        })
        .or_else(|| {
            let kind = |push: bool| if push { "push" } else { "pull" }.to_owned();
            immutable("consumer kind", kind(have.deliver_subject.is_some()), kind(false))
        })
}

/// A deliver policy as the `startPosition` it comes from, when it does.
fn start_position(policy: &consumer::DeliverPolicy) -> String {
    match policy {
        consumer::DeliverPolicy::New => "Latest".to_owned(),
        consumer::DeliverPolicy::All => "Earliest".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Whether the stream config already matches on every field Ferry sets.
fn same_stream(have: &stream::Config, want: &stream::Config) -> bool {
    have.subjects == want.subjects
        && have.max_age == want.max_age
        && have.max_bytes == want.max_bytes
        && have.max_messages == want.max_messages
        && have.num_replicas == want.num_replicas
        && have.duplicate_window == want.duplicate_window
        && have.max_message_size == want.max_message_size
}
