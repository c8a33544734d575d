//! Prometheus metrics of the sidecar, in one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels naming a topic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// Topic name.
    pub topic: String,
}

/// Labels of a produce request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProduceLabels {
    /// Topic name (empty when the request named no known topic).
    pub topic: String,
    /// HTTP status code answered.
    pub code: u16,
}

/// Labels naming a subscription.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabels {
    /// Subscription name.
    pub subscription: String,
}

/// Labels of a settled delivery.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// Subscription name.
    pub subscription: String,
    /// `acked`, `retried`, `dead_lettered`, `dropped` or `deduplicated`.
    pub result: &'static str,
}

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Produce requests by topic and status code.
    pub produce_requests: Family<ProduceLabels, Counter>,
    /// Messages accepted into the outbox.
    pub produce_messages: Family<TopicLabels, Counter>,
    /// Produce request latency (seconds), including the fsync.
    pub produce_duration: Histogram,
    /// Records in the outbox not yet confirmed by the broker.
    pub outbox_records: Family<TopicLabels, Gauge>,
    /// Bytes of outbox segment files.
    pub outbox_bytes: Family<TopicLabels, Gauge>,
    /// Messages confirmed by the broker.
    pub forward_messages: Family<TopicLabels, Counter>,
    /// Forwarding failures (each followed by a re-send after backoff).
    pub forward_errors: Family<TopicLabels, Counter>,
    /// Messages the broker refused for good, set aside on the data volume.
    pub forward_parked: Family<TopicLabels, Counter>,
    /// Publish-to-confirmation latency (seconds).
    pub forward_duration: Histogram,
    /// 1 while connected to the broker.
    pub broker_connected: Gauge,
    /// Deliveries by subscription and result.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Pushes to the app (every attempt).
    pub push_attempts: Family<SubscriptionLabels, Counter>,
    /// Push latency until the app's answer (seconds), by subscription.
    pub push_duration: Family<SubscriptionLabels, Histogram, fn() -> Histogram>,
    /// Deliveries pushed or awaiting a callback.
    pub in_flight: Family<SubscriptionLabels, Gauge>,
    /// Messages per fetch from the broker, for pushed subscriptions.
    pub fetch_messages: Histogram,
    /// Acked ids a subscription's dedupe store remembers.
    pub dedupe_ids: Family<SubscriptionLabels, Gauge>,
    /// Acked ids forgotten before the dedupe window was over (the store was full).
    pub dedupe_forgotten_early: Family<SubscriptionLabels, Counter>,
}

fn latency() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let m = Metrics {
            produce_requests: Family::default(),
            produce_messages: Family::default(),
            produce_duration: latency(),
            outbox_records: Family::default(),
            outbox_bytes: Family::default(),
            forward_messages: Family::default(),
            forward_errors: Family::default(),
            forward_parked: Family::default(),
            forward_duration: latency(),
            broker_connected: Gauge::default(),
            deliveries: Family::default(),
            push_attempts: Family::default(),
            push_duration: Family::new_with_constructor(latency),
            in_flight: Family::default(),
            fetch_messages: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            dedupe_ids: Family::default(),
            dedupe_forgotten_early: Family::default(),
            registry: Registry::default(),
        };
        registry.register("produce_requests", "Produce requests by topic and status code", m.produce_requests.clone());
        registry.register("produce_messages", "Messages accepted into the outbox", m.produce_messages.clone());
        registry.register(
            "produce_duration_seconds",
            "Produce request latency, fsync included",
            m.produce_duration.clone(),
        );
        registry.register("outbox_records", "Outbox records not yet confirmed by the broker", m.outbox_records.clone());
        registry.register("outbox_bytes", "Bytes of outbox segment files", m.outbox_bytes.clone());
        registry.register("forward_messages", "Messages confirmed by the broker", m.forward_messages.clone());
        registry.register(
            "forward_errors",
            "Forwarding failures, each followed by a re-send",
            m.forward_errors.clone(),
        );
        registry.register(
            "forward_parked",
            "Messages the broker refused for good (too large), parked on the data volume",
            m.forward_parked.clone(),
        );
        registry.register("forward_duration_seconds", "Publish-to-confirmation latency", m.forward_duration.clone());
        registry.register("broker_connected", "1 while connected to the broker", m.broker_connected.clone());
        registry.register("deliveries", "Deliveries by subscription and result", m.deliveries.clone());
        registry.register("push_attempts", "Pushes to the app, every attempt", m.push_attempts.clone());
        registry.register(
            "fetch_messages",
            "Messages per fetch from the broker (pushed subscriptions; empty fetches count 0)",
            m.fetch_messages.clone(),
        );
        registry.register("push_duration_seconds", "Push latency until the app answered", m.push_duration.clone());
        registry.register("deliveries_in_flight", "Deliveries pushed or awaiting a callback", m.in_flight.clone());
        registry.register("dedupe_ids", "Acked ids a subscription's dedupe store remembers", m.dedupe_ids.clone());
        registry.register(
            "dedupe_forgotten_early",
            "Acked ids forgotten before the dedupe window was over, to stay within --dedupe-max-ids",
            m.dedupe_forgotten_early.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
