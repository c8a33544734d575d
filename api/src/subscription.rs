//! The `Subscription` resource: one consumer group of an app on a topic.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::naming::LABEL_PATTERN;

/// A subscription: every pod of `app` shares its messages (each message goes
/// to one pod), unless `fanout: Pod` gives every pod every message.
// Several `printcolumn(...)` are the kube derive's syntax, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Subscription",
    namespaced,
    status = "SubscriptionStatus",
    shortname = "fsub",
    derive = "PartialEq",
    doc = "A Ferry subscription: a consumer group of one app on one topic, backed by a durable JetStream consumer.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Topic", type_ = "string", json_path = ".spec.topic"),
    printcolumn(name = "Consumer", type_ = "string", json_path = ".status.consumer"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.pending"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.deadLetterTopic) || self.deadLetterTopic != self.topic")
    .message("deadLetterTopic must differ from topic"))]
#[x_kube(validation = Rule::new(
    "!has(self.batch) || !has(self.batch.maxMessages) || self.batch.maxMessages <= 1 || !has(self.ordering) || self.ordering == 'None'"
).message("bulk push (batch.maxMessages > 1) needs ordering None"))]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode != 'Pull' || !has(self.ordering) || self.ordering != 'Key'")
    .message("ordering Key needs mode Push; use Strict to pull in order"))]
#[cfg_attr(feature = "cel", kube(cel))]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSpec {
    /// The Topic (same namespace) this subscription reads. Cannot be
    /// changed: make a new Subscription instead.
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.topic cannot be changed"))]
    pub topic: String,
    /// The app id whose sidecars consume: pods annotated `ferry.dev/app-id:
    /// <app>`. Cannot be changed: make a new Subscription instead.
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.app cannot be changed"))]
    pub app: String,
    /// `Push` (default: the sidecar POSTs each message to the app) or
    /// `Pull` (the app fetches from `GET /v1/subscriptions/{name}/messages`).
    #[serde(default)]
    pub mode: DeliveryMode,
    /// HTTP path on the app that push deliveries are POSTed to (default `/`).
    #[serde(default = "default_path")]
    pub path: String,
    /// Most deliveries in flight at once per sidecar (1-10000; default 32).
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight: u32,
    /// How long the app may take to answer, or to call back after a 202,
    /// before the message is redelivered (default `30s`).
    #[serde(default = "default_processing_timeout")]
    pub processing_timeout: Duration,
    /// Attempts before a message is dead-lettered, counting every kind of
    /// retry (1-1000; default 5).
    #[serde(default = "default_max_deliveries")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: u32,
    /// Delay between attempts: exponential from `initial` to `max`, with jitter.
    #[serde(default)]
    pub backoff: Backoff,
    /// Topic (same namespace) that rejected and exhausted messages go to.
    /// Unset: they are dropped, with a log line and a metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = LABEL_PATTERN))]
    pub dead_letter_topic: Option<String>,
    /// `None` (default: fastest, parallel), `Key` (messages of one key one
    /// at a time, in order; other keys in parallel; push only), or `Strict`
    /// (one message at a time, in order).
    #[serde(default)]
    pub ordering: Ordering,
    /// `Group` (default: each message to one pod of the app) or `Pod`
    /// (every pod gets every message, on its own consumer). Cannot be
    /// changed: make a new Subscription instead.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.fanout cannot be changed"))]
    pub fanout: Fanout,
    /// Where a new subscription starts: `Latest` (default: messages produced
    /// from now on) or `Earliest` (everything the topic still holds).
    /// Cannot be changed (JetStream fixes a consumer's deliver policy when
    /// it is made): make a new Subscription instead.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.startPosition cannot be changed"))]
    pub start_position: StartPosition,
    /// Bulk push: deliver several messages in one request.
    #[serde(default)]
    pub batch: Batch,
}

/// Push or pull.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum DeliveryMode {
    /// The sidecar pushes to the app.
    #[default]
    Push,
    /// The app pulls from the sidecar.
    Pull,
}

/// Delivery ordering.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum Ordering {
    /// No ordering: parallel delivery.
    #[default]
    None,
    /// In order per key, parallel across keys.
    Key,
    /// One at a time, in order.
    Strict,
}

/// Who gets each message.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum Fanout {
    /// One pod of the app per message.
    #[default]
    Group,
    /// Every pod of the app.
    Pod,
}

/// Where a new subscription starts reading.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum StartPosition {
    /// Messages produced after the subscription was created.
    #[default]
    Latest,
    /// Every message the topic still holds.
    Earliest,
}

/// Retry backoff.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First retry delay (default `1s`).
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,
    /// Largest retry delay (default `60s`).
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: default_backoff_initial(), max: default_backoff_max() }
    }
}

/// Bulk push settings.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Most messages per push request (1-1000; default 1 = no bulk push);
    /// at most `maxInFlight` go in one, as each is in flight.
    #[serde(default = "default_batch_max")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_messages: u32,
    /// Longest a partial batch waits for more messages (default `100ms`).
    #[serde(default = "default_batch_wait")]
    pub max_wait: Duration,
}

impl Default for Batch {
    fn default() -> Self {
        Batch { max_messages: default_batch_max(), max_wait: default_batch_wait() }
    }
}

/// Observed state of a Subscription.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStatus {
    /// `Ready` with a reason (e.g. `Reconciled`, `TopicNotFound`, `BrokerUnavailable`, `ImmutableField`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The durable JetStream consumer; for `fanout: Pod`, `{name}_* (N
    /// consumers)`: the per-pod consumers the sidecars made, whose counts
    /// the status sums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Messages not yet delivered (lag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Messages delivered and not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Messages delivered more than once and not yet acknowledged (now,
    /// not a running total: JetStream's `num_redelivered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<u64>,
    /// Messages sent to the dead-letter topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<u64>,
    /// Messages given up on (rejected, or out of attempts) and dropped, as
    /// the Subscription has no dead-letter topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// Why the last dropped message was dropped: its id, attempts, the
    /// app's last status and error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dropped: Option<String>,
}

fn default_path() -> String {
    "/".to_owned()
}
fn default_max_in_flight() -> u32 {
    32
}
fn default_processing_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_batch_max() -> u32 {
    1
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(100)
}

impl SubscriptionSpec {
    /// A spec with defaults for `topic` and `app`.
    pub fn new(topic: impl Into<String>, app: impl Into<String>) -> Self {
        SubscriptionSpec {
            topic: topic.into(),
            app: app.into(),
            mode: DeliveryMode::default(),
            path: default_path(),
            max_in_flight: default_max_in_flight(),
            processing_timeout: default_processing_timeout(),
            max_deliveries: default_max_deliveries(),
            backoff: Backoff::default(),
            dead_letter_topic: None,
            ordering: Ordering::default(),
            fanout: Fanout::default(),
            start_position: StartPosition::default(),
            batch: Batch::default(),
        }
    }
}
