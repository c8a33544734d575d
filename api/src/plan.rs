//! The pure mapping from resources to broker objects, and resource checks.
//!
//! Both the sidecar (standalone: it creates what its manifests name) and the
//! operator (cluster) call these, so a Topic means the same stream wherever
//! it is applied. Plans are broker-neutral; `jetstream` (feature) turns them
//! into async-nats configs, and the embedded broker reads them directly.

use std::time::Duration;

use crate::naming;
use crate::subscription::{Fanout, Ordering, StartPosition, SubscriptionSpec};
use crate::topic::{Storage, TopicSpec};

/// The stream a Topic becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan {
    /// `FERRY_{ns}_{topic}`.
    pub name: String,
    /// `ferry.{ns}.{topic}.>`.
    pub subjects: Vec<String>,
    /// Oldest message kept; `None` = no limit.
    pub max_age: Option<Duration>,
    /// Most bytes kept; `None` = no limit.
    pub max_bytes: Option<i64>,
    /// Most messages kept; `None` = no limit.
    pub max_messages: Option<i64>,
    /// File or memory.
    pub storage: Storage,
    /// Replicas.
    pub replicas: u8,
    /// Broker-side dedupe window for message ids.
    pub duplicate_window: Duration,
    /// Largest message, bytes: the topic's largest payload plus
    /// [`crate::HEADER_ROOM`] for its headers (JetStream counts both).
    pub max_message_size: u32,
}

/// The consumer a Subscription becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPlan {
    /// The topic's stream.
    pub stream: String,
    /// Durable consumer name.
    pub name: String,
    /// Subject filter (the whole topic).
    pub filter_subject: String,
    /// Where a new consumer starts.
    pub start: StartPosition,
    /// Redelivery after this long without ack or progress: the processing
    /// timeout. No `BackOff` list is set, since it would replace this (Ferry
    /// times its own retries with nak-with-delay).
    pub ack_wait: Duration,
    /// Always -1 (unlimited), deliberately: Ferry counts attempts itself and
    /// dead-letters at `maxDeliveries`; a broker limit would strand a message
    /// unacked and undelivered before Ferry could dead-letter it.
    pub max_deliver: i64,
    /// Unacked messages the broker lets out across all pods of the group:
    /// enough for 16 sidecars at `maxInFlight` each, at least 1000; 1 for
    /// `ordering: Strict`, so that of all the pods sharing the consumer only
    /// one has a message, and the next is handed out once it is acked.
    pub max_ack_pending: i64,
    /// For per-pod consumers: removed after this long without a fetch.
    pub inactive_threshold: Option<Duration>,
}

/// How long a per-pod consumer outlives its pod.
pub const POD_CONSUMER_INACTIVE: Duration = Duration::from_secs(300);

/// The stream for a Topic.
pub fn stream_plan(namespace: &str, topic: &str, spec: &TopicSpec) -> StreamPlan {
    StreamPlan {
        name: naming::stream_name(namespace, topic),
        subjects: vec![naming::topic_subjects(namespace, topic)],
        max_age: spec.retention.max_age.map(|d| d.get()),
        max_bytes: spec.retention.max_bytes,
        max_messages: spec.retention.max_messages,
        storage: spec.storage,
        replicas: spec.replicas,
        duplicate_window: spec.duplicate_window.get(),
        max_message_size: spec.max_message_size.saturating_add(crate::HEADER_ROOM),
    }
}

/// The consumer for a Subscription; `pod` is set for `fanout: Pod`.
pub fn consumer_plan(namespace: &str, subscription: &str, spec: &SubscriptionSpec, pod: Option<&str>) -> ConsumerPlan {
    let (name, inactive_threshold) = match (spec.fanout, pod) {
        (Fanout::Pod, Some(pod)) => (naming::pod_consumer_name(subscription, pod), Some(POD_CONSUMER_INACTIVE)),
        _ => (naming::consumer_name(subscription), None),
    };
    ConsumerPlan {
        stream: naming::stream_name(namespace, &spec.topic),
        name,
        filter_subject: naming::topic_subjects(namespace, &spec.topic),
        start: spec.start_position,
        ack_wait: spec.processing_timeout.get(),
        max_deliver: -1,
        max_ack_pending: match spec.ordering {
            // Each sidecar pushes one at a time already; this keeps two pods
            // of a group from each holding one.
            Ordering::Strict => 1,
            Ordering::None | Ordering::Key => (spec.max_in_flight as i64 * 16).max(1000),
        },
        inactive_threshold,
    }
}

/// One problem in a resource, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.deadLetterTopic`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn check(errors: &mut Vec<FieldError>, ok: bool, field: &str, message: impl Into<String>) {
    if !ok {
        errors.push(FieldError { field: field.to_owned(), message: message.into() });
    }
}

fn check_label(errors: &mut Vec<FieldError>, field: &str, what: &'static str, value: &str) {
    if let Err(e) = naming::validate_label(what, value) {
        errors.push(FieldError { field: field.to_owned(), message: e.to_string() });
    }
}

/// Checks a Topic beyond what its schema says; every problem is listed.
pub fn validate_topic(namespace: &str, name: &str, spec: &TopicSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    check_label(&mut e, "metadata.namespace", "namespace", namespace);
    check_label(&mut e, "metadata.name", "topic name", name);
    check(&mut e, (1..=5).contains(&spec.replicas), "spec.replicas", "must be 1 to 5");
    check(&mut e, (1..=256).contains(&spec.partitions), "spec.partitions", "must be 1 to 256");
    check(
        &mut e,
        (1..=64 << 20).contains(&spec.max_message_size),
        "spec.maxMessageSize",
        "must be 1 to 67108864 bytes",
    );
    // JetStream's own rules for a stream, which it would refuse on every
    // reconcile: no age limit or dedupe window under 100 ms, and no id kept
    // for dedupe longer than its message is.
    let window = spec.duplicate_window;
    check_duration(&mut e, "spec.duplicateWindow", window);
    if let Some(max_age) = spec.retention.max_age {
        check_duration(&mut e, "spec.retention.maxAge", max_age);
        check(
            &mut e,
            window <= max_age,
            "spec.duplicateWindow",
            format!(
                "must not be longer than spec.retention.maxAge ({max_age}), which the broker refuses; \
                 it is {window} (2m when unset): set it to at most {max_age}"
            ),
        );
    }
    check(&mut e, spec.retention.max_bytes.is_none_or(|b| b > 0), "spec.retention.maxBytes", "must be positive");
    check(&mut e, spec.retention.max_messages.is_none_or(|m| m > 0), "spec.retention.maxMessages", "must be positive");
    e
}

/// The least age limit and dedupe window JetStream takes.
pub const MIN_STREAM_DURATION: Duration = Duration::from_millis(100);

/// A stream duration: from [`MIN_STREAM_DURATION`] to [`crate::duration::MAX`].
fn check_duration(errors: &mut Vec<FieldError>, field: &str, d: crate::Duration) {
    check(errors, d.get() >= MIN_STREAM_DURATION, field, "must be at least 100ms (the broker's least)");
    check_at_most_max(errors, field, d);
}

/// Any duration of a spec: at most [`crate::duration::MAX`].
fn check_at_most_max(errors: &mut Vec<FieldError>, field: &str, d: crate::Duration) {
    check(errors, d <= crate::duration::MAX, field, "must be at most 100 years");
}

/// Checks a Subscription beyond what its schema says; every problem is listed.
pub fn validate_subscription(namespace: &str, name: &str, spec: &SubscriptionSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    check_label(&mut e, "metadata.namespace", "namespace", namespace);
    check_label(&mut e, "metadata.name", "subscription name", name);
    check_label(&mut e, "spec.topic", "topic name", &spec.topic);
    check_label(&mut e, "spec.app", "app id", &spec.app);
    if let Some(dlq) = &spec.dead_letter_topic {
        check_label(&mut e, "spec.deadLetterTopic", "topic name", dlq);
        check(&mut e, *dlq != spec.topic, "spec.deadLetterTopic", "must differ from spec.topic");
    }
    check(&mut e, spec.path.starts_with('/'), "spec.path", "must start with '/'");
    check(&mut e, (1..=10_000).contains(&spec.max_in_flight), "spec.maxInFlight", "must be 1 to 10000");
    check(&mut e, (1..=1000).contains(&spec.max_deliveries), "spec.maxDeliveries", "must be 1 to 1000");
    check(&mut e, !spec.processing_timeout.get().is_zero(), "spec.processingTimeout", "must be more than 0");
    check_at_most_max(&mut e, "spec.processingTimeout", spec.processing_timeout);
    check_at_most_max(&mut e, "spec.backoff.initial", spec.backoff.initial);
    check_at_most_max(&mut e, "spec.backoff.max", spec.backoff.max);
    check_at_most_max(&mut e, "spec.batch.maxWait", spec.batch.max_wait);
    check(&mut e, spec.backoff.initial <= spec.backoff.max, "spec.backoff", "initial must not exceed max");
    check(&mut e, (1..=1000).contains(&spec.batch.max_messages), "spec.batch.maxMessages", "must be 1 to 1000");
    check(
        &mut e,
        spec.batch.max_messages == 1 || spec.ordering == crate::subscription::Ordering::None,
        "spec.batch.maxMessages",
        "bulk push (more than 1) needs ordering None",
    );
    // A pull hands the app several messages at once, one of a key beside
    // the next, and a retried one would come back behind later ones of its
    // key. Strict pulls keep their order: the consumer leases one message
    // at a time (maxAckPending 1), also while one waits for its retry.
    check(
        &mut e,
        !(spec.mode == crate::subscription::DeliveryMode::Pull && spec.ordering == crate::subscription::Ordering::Key),
        "spec.ordering",
        "Key needs mode Push (a pull hands out several messages of one key at once); use Strict to pull in order",
    );
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::Duration as D;
    use crate::topic::Retention;

    #[test]
    fn a_default_topic_becomes_a_file_stream_with_a_two_minute_dedupe_window() {
        let plan = stream_plan("shop", "orders", &TopicSpec::default());
        assert_eq!(
            plan,
            StreamPlan {
                name: "FERRY_shop_orders".into(),
                subjects: vec!["ferry.shop.orders.>".into()],
                max_age: None,
                max_bytes: None,
                max_messages: None,
                storage: Storage::File,
                replicas: 1,
                duplicate_window: Duration::from_secs(120),
                max_message_size: (1 << 20) + crate::HEADER_ROOM,
            }
        );
    }

    #[test]
    fn topic_retention_maps_to_stream_limits() {
        let spec = TopicSpec {
            retention: Retention { max_age: Some(D::from_secs(3600)), max_bytes: Some(10), max_messages: Some(5) },
            storage: Storage::Memory,
            replicas: 3,
            ..TopicSpec::default()
        };
        let plan = stream_plan("a", "b", &spec);
        assert_eq!(plan.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(
            (plan.max_bytes, plan.max_messages, plan.storage, plan.replicas),
            (Some(10), Some(5), Storage::Memory, 3)
        );
    }

    #[test]
    fn a_subscription_sets_ack_wait_max_deliver_and_max_ack_pending_deliberately() {
        let mut spec = SubscriptionSpec::new("orders", "billing");
        spec.processing_timeout = D::from_secs(10);
        spec.max_in_flight = 100;
        let plan = consumer_plan("shop", "billing", &spec, Some("pod-1"));
        assert_eq!(plan.stream, "FERRY_shop_orders");
        assert_eq!(plan.name, "billing", "group fanout ignores the pod");
        assert_eq!(plan.filter_subject, "ferry.shop.orders.>");
        assert_eq!(plan.ack_wait, Duration::from_secs(10));
        assert_eq!(plan.max_deliver, -1);
        assert_eq!(plan.max_ack_pending, 1600);
        assert_eq!(plan.inactive_threshold, None);
    }

    /// Every pod of a group pulls from one consumer: only the broker can
    /// keep two of them from each having a message of a strictly ordered
    /// subscription in flight.
    #[test]
    fn a_strictly_ordered_subscription_lets_one_message_out_at_a_time_across_all_pods() {
        let mut spec = SubscriptionSpec::new("orders", "ledger");
        spec.max_in_flight = 100;
        spec.ordering = Ordering::Strict;
        assert_eq!(consumer_plan("shop", "ledger", &spec, None).max_ack_pending, 1);
        spec.fanout = Fanout::Pod;
        assert_eq!(consumer_plan("shop", "ledger", &spec, Some("ledger-0")).max_ack_pending, 1, "per pod too");
        spec.ordering = Ordering::Key;
        assert_eq!(consumer_plan("shop", "ledger", &spec, None).max_ack_pending, 1600, "keys run in parallel");
    }

    #[test]
    fn a_pod_fanout_subscription_gets_a_consumer_per_pod_that_expires() {
        let mut spec = SubscriptionSpec::new("orders", "audit");
        spec.fanout = Fanout::Pod;
        let plan = consumer_plan("shop", "audit", &spec, Some("audit-5f7c"));
        assert_eq!(plan.name, "audit_audit-5f7c");
        assert_eq!(plan.inactive_threshold, Some(POD_CONSUMER_INACTIVE));
    }

    fn topic_errors(spec: &TopicSpec) -> Vec<FieldError> {
        validate_topic("shop", "orders", spec)
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    /// JetStream refuses a stream whose dedupe window outlasts its age limit,
    /// or with either under 100 ms: refused here, such a Topic is an
    /// invalid spec rather than a broker refusal retried for ever.
    #[test]
    fn a_topics_dedupe_window_must_fit_its_max_age_and_both_take_at_least_100ms() {
        let with = |max_age: Option<D>, window: D| TopicSpec {
            retention: Retention { max_age, ..Retention::default() },
            duplicate_window: window,
            ..TopicSpec::default()
        };
        // `maxAge: 1m` with the default window of 2m.
        let errors = topic_errors(&with(Some(D::from_secs(60)), TopicSpec::default().duplicate_window));
        assert_eq!(fields(&errors), ["spec.duplicateWindow"]);
        let message = &errors[0].message;
        assert!(message.contains("spec.retention.maxAge (1m)") && message.contains("it is 2m"), "{message}");
        assert!(topic_errors(&with(Some(D::from_secs(60)), D::from_secs(60))).is_empty(), "equal is fine");
        assert!(topic_errors(&with(Some(D::from_millis(100)), D::from_millis(100))).is_empty());
        assert!(topic_errors(&with(None, D::from_millis(100))).is_empty());
        let errors = topic_errors(&with(None, D::from_millis(99)));
        assert_eq!(fields(&errors), ["spec.duplicateWindow"]);
        assert!(errors[0].message.contains("at least 100ms"), "{errors:?}");
        let errors = topic_errors(&with(Some(D::from_millis(50)), D::from_millis(50)));
        assert_eq!(fields(&errors), ["spec.duplicateWindow", "spec.retention.maxAge"]);
        let errors = topic_errors(&with(Some(D::from_secs(0)), D::from_millis(100)));
        assert_eq!(fields(&errors), ["spec.retention.maxAge", "spec.duplicateWindow"], "0s is no \"unlimited\"");
    }

    /// A schema-valid duration can be 31,000 years (`999999999999s`); no
    /// spec needs more than 100, and JetStream cannot hold 300.
    #[test]
    fn durations_longer_than_100_years_are_refused() {
        let century = crate::duration::MAX;
        let longer = D(century.get() + Duration::from_secs(1));
        let at = |max_age: D| TopicSpec {
            retention: Retention { max_age: Some(max_age), ..Retention::default() },
            ..TopicSpec::default()
        };
        assert!(topic_errors(&at(century)).is_empty());
        assert_eq!(fields(&topic_errors(&at(longer))), ["spec.retention.maxAge"]);
        let mut spec = SubscriptionSpec::new("orders", "billing");
        spec.processing_timeout = longer;
        spec.backoff.initial = longer;
        spec.backoff.max = longer;
        spec.batch.max_wait = longer;
        let errors = validate_subscription("shop", "billing", &spec);
        assert_eq!(
            fields(&errors),
            ["spec.processingTimeout", "spec.backoff.initial", "spec.backoff.max", "spec.batch.maxWait"]
        );
        assert!(errors.iter().all(|e| e.message == "must be at most 100 years"), "{errors:?}");
        spec.processing_timeout = century;
        spec.backoff.initial = century;
        spec.backoff.max = century;
        spec.batch.max_wait = century;
        assert!(validate_subscription("shop", "billing", &spec).is_empty());
    }

    #[test]
    fn validation_lists_every_problem_with_its_field() {
        let mut spec = SubscriptionSpec::new("orders", "Bad_App");
        spec.dead_letter_topic = Some("orders".into());
        spec.path = "hook".into();
        spec.max_deliveries = 0;
        let errors = validate_subscription("shop", "billing", &spec);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.app", "spec.deadLetterTopic", "spec.path", "spec.maxDeliveries"]);
        assert!(validate_subscription("shop", "billing", &SubscriptionSpec::new("orders", "billing")).is_empty());
        let mut bulk_keyed = SubscriptionSpec::new("orders", "billing");
        bulk_keyed.batch.max_messages = 10;
        bulk_keyed.ordering = crate::subscription::Ordering::Key;
        let errors = validate_subscription("shop", "billing", &bulk_keyed);
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["spec.batch.maxMessages"]);
        let mut pulled = SubscriptionSpec::new("orders", "billing");
        pulled.mode = crate::subscription::DeliveryMode::Pull;
        pulled.ordering = crate::subscription::Ordering::Key;
        let errors = validate_subscription("shop", "billing", &pulled);
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["spec.ordering"]);
        pulled.ordering = crate::subscription::Ordering::Strict;
        assert!(validate_subscription("shop", "billing", &pulled).is_empty(), "strict pulls are fine");
        let topic = TopicSpec { partitions: 0, ..TopicSpec::default() };
        let errors = validate_topic("shop", "Orders", &topic);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "spec.partitions"]);
    }
}
