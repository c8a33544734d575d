//! The broker seam: everything the sidecar asks of a message broker.
//!
//! The sidecar talks to a broker only through [`Broker`]. `nats` is NATS
//! JetStream; the embedded broker (standalone mode) implements the same trait.

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

/// What the sidecar needs from a broker.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Creates the stream, or updates it to match the plan.
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError>;
    /// Creates the durable consumer, or updates it to match the plan.
    async fn ensure_consumer(&self, plan: &ConsumerPlan) -> Result<(), BrokerError>;
    /// Sends a message; returns once it is sent, with a future for the
    /// broker's confirmation. Messages sent in order are stored in order.
    async fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError>;
    /// True while connected.
    fn is_connected(&self) -> bool;
}
