//! The broker seam: everything the sidecar asks of a message broker.
//!
//! The sidecar talks to a broker only through [`Broker`]. `nats` is NATS
//! JetStream; [`embedded`] (standalone mode, on `ferry-log`) implements the same
//! trait, and one conformance suite (`tests/conformance.rs`) runs against both.

pub mod embedded;
pub mod nats;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_api::{ConsumerPlan, StreamPlan};
use futures::future::BoxFuture;

/// A broker failure, classified for the forwarder and the API.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Not connected, timed out, or the connection broke: try again later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The stream for this subject does not exist (yet).
    #[error("no stream for subject {0}")]
    NoStream(String),
    /// The broker refused the request (bad config, limits, immutable field...).
    #[error("broker refused: {0}")]
    Refused(String),
    /// The broker will never take this message: it is larger than the
    /// stream's largest message or the server's `max_payload` (a limit
    /// lowered after the message was produced). Re-sending cannot help.
    #[error("broker refuses the message for good: {0}")]
    TooLarge(String),
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// Subject (`ferry.{ns}.{topic}.{partition}`).
    pub subject: String,
    /// Message id: the broker drops a second publish of the same id within
    /// the stream's duplicate window.
    pub id: String,
    /// Headers to carry (CloudEvents attributes, content type, key...).
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Bytes,
}

/// The broker's confirmation of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Stream that stored it.
    pub stream: String,
    /// Its sequence in the stream (of the original, for a duplicate).
    pub sequence: u64,
    /// True when the id was seen before and this publish was dropped.
    pub duplicate: bool,
}

/// A confirmation still to come; publishes are pipelined.
pub type PendingAck = BoxFuture<'static, Result<PubAck, BrokerError>>;

/// How to settle a fetched message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done: never deliver it again.
    Ack,
    /// Deliver it again after this delay (nak with delay; never a bare nak,
    /// which JetStream redelivers at once).
    Retry(std::time::Duration),
    /// Hand it back now, e.g. on shutdown, so another consumer gets it at
    /// once. The app had it (a push under way or held with 202): this
    /// delivery was an attempt.
    Release,
    /// Hand back, now, a message the app never got (it waited behind the
    /// free push slots or its key): this delivery is no attempt, and the
    /// next one says the count it had before. A crash cannot say so: a
    /// message fetched by a sidecar that died counts one more.
    ReleaseUnpushed,
    /// Never deliver it again, without success (after dead-lettering).
    Reject,
    /// Still working on it: restart the ack timer.
    Progress,
}

/// Settles one fetched message. Shared by the delivery and its heartbeats.
#[async_trait]
pub trait Settle: Send + Sync + 'static {
    /// Sends the settlement to the broker.
    async fn settle(&self, how: Settlement) -> Result<(), BrokerError>;
}

/// A message fetched from a consumer.
pub struct Fetched {
    /// Message id (the producer's, from `Nats-Msg-Id`).
    pub id: String,
    /// Subject it was published to.
    pub subject: String,
    /// Headers as stored.
    pub headers: Vec<(String, String)>,
    /// Payload.
    pub payload: Bytes,
    /// Sequence in the stream.
    pub sequence: u64,
    /// How many times the broker has delivered it, this time included (1 = first).
    pub delivered: u32,
    /// When it was stored, milliseconds since the Unix epoch.
    pub published_ms: u64,
    /// Settles it.
    pub settle: std::sync::Arc<dyn Settle>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("id", &self.id)
            .field("sequence", &self.sequence)
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl Fetched {
    /// The first value of a header (names compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A durable consumer to fetch from.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Up to `max` messages, waiting up to `wait` for the first.
    async fn fetch(&self, max: usize, wait: std::time::Duration) -> Result<Vec<Fetched>, BrokerError>;
    /// Messages delivered and leased (not settled, not yet due again).
    async fn leased(&self) -> Result<u64, BrokerError>;
    /// Tells the broker the consumer is in use, without taking a message,
    /// so that one it removes when idle stays. Nothing to do where the
    /// broker never removes a consumer by itself.
    async fn keep_alive(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// What the sidecar needs from a broker.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Ensures the consumer exists as planned and opens it for fetching.
    async fn consumer(&self, plan: &ConsumerPlan) -> Result<std::sync::Arc<dyn Consumer>, BrokerError>;
    /// Creates the stream, or updates it to match the plan.
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError>;
    /// Creates the durable consumer, or updates it to match the plan.
    async fn ensure_consumer(&self, plan: &ConsumerPlan) -> Result<(), BrokerError>;
    /// Sends a message; returns once it is sent, with a future for the
    /// broker's confirmation. Messages sent in order are stored in order.
    async fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError>;
    /// True while connected.
    fn is_connected(&self) -> bool;
    /// Changes whenever the connection to the broker is lost or made
    /// again. A publish sent on a connection that then dropped may be lost
    /// without an error until its ack times out, while later publishes on
    /// the new connection are stored: a forwarder that sees this change
    /// with publishes unconfirmed sends again from the first of them, so the
    /// stream keeps the outbox's order. Constant for an in-process broker.
    fn connection_epoch(&self) -> u64 {
        0
    }
    /// The largest message the broker takes, headers and payload together
    /// (NATS's `max_payload`); `None` when it sets no such limit.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }
    /// Adds one to the subscription's dead-letter count that the operator
    /// shows in the Subscription's status. Best effort, called off the
    /// delivery path: a count that cannot be written is logged and dropped
    /// (and an update that timed out but was applied is counted twice). The
    /// embedded broker has no operator to read it, so it keeps none.
    async fn count_dead_letter(&self, _namespace: &str, _subscription: &str) {}
    /// Adds one to the subscription's count of messages dropped for want of
    /// a dead-letter topic and notes `reason` as the last one's, for the
    /// operator to show (and to post as an event). As best effort as
    /// [`Broker::count_dead_letter`].
    async fn count_dropped(&self, _namespace: &str, _subscription: &str, _reason: &str) {}
}
