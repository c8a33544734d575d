//! `ferry-api`: what Ferry's resources are and what they mean on the broker.
//!
//! * [`Topic`] and [`Subscription`] (`ferry.dev/v1alpha1`): the custom
//!   resources users `kubectl apply`, and the same YAML the standalone
//!   sidecar reads. Every field is documented: the docs become the CRD
//!   descriptions `kubectl explain` shows.
//! * [`naming`]: stream, subject, consumer and KV key names, header names.
//! * [`plan`]: the pure mapping Topic → stream and Subscription → consumer,
//!   and checks beyond the schema. Shared by the sidecar and the operator.
//!
//! * [`resolved`]: the configuration the operator writes to the broker's KV
//!   bucket for the sidecars.
//!
//! No IO: this crate reads no file and opens no connection.

pub mod duration;
#[cfg(feature = "jetstream")]
mod jetstream;
pub mod naming;
pub mod plan;
pub mod resolved;
pub mod subscription;
pub mod topic;

/// The longest consumer-side dedupe window a sidecar takes
/// (`--dedupe-window`, an injected `dedupeWindow`): 366 days, so `1y`
/// (365.25 days to the duration parser) and `12M` pass. Beyond it the
/// window would mean nothing the id cap does not decide anyway.
pub const MAX_DEDUPE_WINDOW: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// Room for a message's headers, as NATS encodes them (`Nats-Msg-Id` and
/// `ferry-key` included), beyond its topic's `maxMessageSize` of payload:
/// JetStream counts headers against a stream's largest message, so a
/// topic's stream takes `maxMessageSize + HEADER_ROOM`. A produced message
/// may carry up to `HEADER_ROOM - DEAD_LETTER_HEADER_ROOM` of headers, so
/// that its dead letter fits too.
pub const HEADER_ROOM: u32 = 16 << 10;
/// Headers a dead letter adds (origin topic and subscription, attempts,
/// last status, up to 500 characters of last error).
pub const DEAD_LETTER_HEADER_ROOM: u32 = 4 << 10;

pub use crate::duration::Duration;
pub use crate::plan::{consumer_plan, stream_plan, ConsumerPlan, FieldError, StreamPlan};
pub use crate::subscription::{Subscription, SubscriptionSpec, SubscriptionStatus};
pub use crate::topic::{Topic, TopicSpec, TopicStatus};
