//! The `Topic` resource: a named stream of messages.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// A topic: producers write to it, every Subscription of it gets every message.
// Several `printcolumn(...)` are the kube derive's syntax, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Topic",
    namespaced,
    status = "TopicStatus",
    shortname = "ftopic",
    derive = "PartialEq",
    doc = "A Ferry topic: a durable, ordered stream of messages, backed by a JetStream stream.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Stream", type_ = "string", json_path = ".status.stream"),
    printcolumn(name = "Messages", type_ = "integer", json_path = ".status.messages"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[cfg_attr(feature = "cel", kube(cel))]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// How long and how much the broker keeps. Unset limits are unlimited.
    #[serde(default)]
    pub retention: Retention,
    /// Where the broker stores messages: `File` (default, survives broker
    /// restarts) or `Memory` (faster, lost when the broker restarts).
    /// Cannot be changed: JetStream cannot move a stream between the two.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.storage cannot be changed"))]
    pub storage: Storage,
    /// Broker replicas of the stream (1-5; default 1). Cannot be changed
    /// above 1 on a single-node broker.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u8,
    /// Window in which a message id produced again is dropped as a duplicate
    /// by the broker (default `2m`; at least `100ms`, and no longer than
    /// `retention.maxAge` when that is set).
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window: Duration,
    /// Largest accepted message payload in bytes (default 1048576 = 1 MiB).
    /// The broker's largest message (NATS `max_payload`, 1 MiB by default)
    /// bounds payload and headers together, less 4 KiB kept for a dead
    /// letter's headers.
    #[serde(default = "default_max_message_size")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_message_size: u32,
    /// Partitions (1-256; default 1). Messages with the same key go to the
    /// same partition, which is what per-key ordering relies on.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 256))]
    pub partitions: u32,
    /// How the producing sidecar keeps messages before the broker has them:
    /// `Durable` (default: fsynced before the produce call is answered) or
    /// `BestEffort` (written without fsync; a power loss can lose the last
    /// seconds; for logs, metrics and other high-volume, low-value data).
    #[serde(default)]
    pub persistence: Persistence,
    /// What happens to the broker stream when this Topic is deleted:
    /// `Delete` (default) or `Retain`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Broker retention limits.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Oldest message age kept (e.g. `24h`; at least `100ms`, and no
    /// shorter than `duplicateWindow`). Unset: no age limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// Most bytes kept; older messages are removed first. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
    /// Most messages kept; older messages are removed first. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages: Option<i64>,
}

/// Broker storage type.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum Storage {
    /// On disk at the broker.
    #[default]
    File,
    /// In the broker's memory.
    Memory,
}

/// Sidecar-side persistence of produced messages.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum Persistence {
    /// fsynced before the produce call is answered.
    #[default]
    Durable,
    /// Written, fsynced about once a second.
    BestEffort,
}

/// What deleting the resource does to the broker object.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the broker object (and its messages).
    #[default]
    Delete,
    /// Keep the broker object.
    Retain,
}

/// Observed state of a Topic.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// `Ready` with a reason (e.g. `Reconciled`, `BrokerUnavailable`, `ImmutableField`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The JetStream stream backing the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Messages in the stream (refreshed periodically).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Bytes in the stream (refreshed periodically).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

fn default_replicas() -> u8 {
    1
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}
fn default_max_message_size() -> u32 {
    1 << 20
}
fn default_partitions() -> u32 {
    1
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec {
            retention: Retention::default(),
            storage: Storage::default(),
            replicas: default_replicas(),
            duplicate_window: default_duplicate_window(),
            max_message_size: default_max_message_size(),
            partitions: default_partitions(),
            persistence: Persistence::default(),
            deletion_policy: DeletionPolicy::default(),
        }
    }
}
