//! How Ferry names things on the broker, and the header names it uses.
//! One place, so the sidecar and the operator always agree.
//!
//! | what | name |
//! | --- | --- |
//! | stream of topic `t` in namespace `ns` | `FERRY_{ns}_{t}` |
//! | its subjects | `ferry.{ns}.{t}.>`; a message goes to `ferry.{ns}.{t}.{partition}` |
//! | durable consumer of subscription `s` | `{s}` (on the topic's stream) |
//! | per-pod consumer (`fanout: Pod`) | `{s}_{pod}` |
//! | config bucket (NATS KV) | `ferry-config` |
//! | KV key of a topic | `{ns}.topic.{t}` |
//! | KV key of a subscription for app `a` | `{ns}.app.{a}.{s}` |
//!
//! Namespaces, topic, subscription and app names are DNS-1123 labels
//! (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes), so they contain no
//! `.`, `_`, `*`, `>` or spaces and the names above are unambiguous.
//! Pod names may contain dots (DNS-1123 subdomains): those become `_`
//! (after the first `_`, which ends the subscription's name).

/// The JetStream KV bucket holding the resolved configuration.
pub const CONFIG_BUCKET: &str = "ferry-config";

/// KV bucket where sidecars note the messages they handed back without
/// pushing them, so the next delivery's attempt count leaves that one out
/// (JetStream counts every delivery). Made by the first sidecar that needs it.
pub const RETURNS_BUCKET: &str = "ferry-returns";

/// Key in [`RETURNS_BUCKET`] of one message (its stream sequence) of one
/// consumer. Not its creation time: nats-server reports a durable
/// consumer's `created` anew after every restart, which made every note
/// unreadable once the broker had restarted. A note also holds the
/// delivery count of its last hand-back, so that a note left by an
/// earlier consumer of the same name is told apart (see the sidecar's
/// nats backend).
pub fn returns_key(stream: &str, consumer: &str, sequence: u64) -> String {
    format!("{stream}.{consumer}.{sequence}")
}

/// Header names Ferry reads and writes (HTTP and broker messages).
pub mod headers {
    /// Idempotency id of a produced message (HTTP request header).
    pub const ID: &str = "ferry-id";
    /// Ordering key of a message.
    pub const KEY: &str = "ferry-key";
    /// Delivery id to acknowledge a push or pull delivery with.
    pub const DELIVERY_ID: &str = "ferry-delivery-id";
    /// Attempt number of a delivery, starting at 1.
    pub const ATTEMPT: &str = "ferry-attempt";
    /// Subscription a delivery belongs to.
    pub const SUBSCRIPTION: &str = "ferry-subscription";
    /// On a dead letter: the topic it came from.
    pub const ORIGIN_TOPIC: &str = "ferry-origin-topic";
    /// On a dead letter: the subscription that gave up on it.
    pub const ORIGIN_SUBSCRIPTION: &str = "ferry-origin-subscription";
    /// On a dead letter: the message's own id (the dead letter's id is
    /// `{consumer}:{id}`, so that each subscription's letter is kept).
    pub const ORIGIN_ID: &str = "ferry-origin-id";
    /// On a dead letter: how many attempts were made.
    pub const ATTEMPTS: &str = "ferry-attempts";
    /// On a dead letter: the app's last HTTP status (or `timeout`, `refused`).
    pub const LAST_STATUS: &str = "ferry-last-status";
    /// On a dead letter: the last error or reject reason.
    pub const LAST_ERROR: &str = "ferry-last-error";
    /// Produce time (RFC 3339) stored with each message.
    pub const PRODUCED_AT: &str = "ferry-produced-at";
    /// JetStream's deduplication header; Ferry sets it to the message id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
}

/// Why a name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    /// What kind of name (e.g. "topic name").
    pub what: &'static str,
    /// The offending value.
    pub value: String,
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid {} {:?}: must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
            self.what, self.value
        )
    }
}

impl std::error::Error for NameError {}

/// A DNS-1123 label as a regular expression: the CRDs' `pattern` for
/// `metadata.name` and the names in a spec. Kubernetes itself accepts names
/// with dots (DNS-1123 subdomains), but a dot would split a NATS subject.
pub const LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Checks a DNS-1123 label.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError { what, value: value.to_owned() })
    }
}

/// The JetStream stream of a topic.
pub fn stream_name(namespace: &str, topic: &str) -> String {
    format!("FERRY_{namespace}_{topic}")
}

/// The subject filter covering all of a topic's messages.
pub fn topic_subjects(namespace: &str, topic: &str) -> String {
    format!("ferry.{namespace}.{topic}.>")
}

/// The subject a message of `topic` goes to, given its partition.
pub fn message_subject(namespace: &str, topic: &str, partition: u32) -> String {
    format!("ferry.{namespace}.{topic}.{partition}")
}

/// The partition of a key among `partitions` (FNV-1a, stable across
/// versions and processes). Messages without a key go to partition 0.
pub fn partition_of(key: Option<&str>, partitions: u32) -> u32 {
    let Some(key) = key else { return 0 };
    if partitions <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions
}

/// The durable consumer of a subscription.
pub fn consumer_name(subscription: &str) -> String {
    subscription.to_owned()
}

/// The per-pod consumer of a `fanout: Pod` subscription: `{subscription}_{pod}`,
/// the pod name with every character but a letter, digit or `-` made `_`.
/// A subscription name (a DNS-1123 label) holds no `_`, so the first `_`
/// ends it and no two subscriptions' pod consumers can share a name (with
/// `--`, the earlier separator, `a--b--web-1` was pod `b--web-1` of `a`
/// as much as pod `web-1` of `a--b`).
pub fn pod_consumer_name(subscription: &str, pod: &str) -> String {
    let pod: String = pod.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{subscription}_{pod}")
}

/// The pod part of `consumer` when it is named as a per-pod consumer of
/// `subscription` by [`pod_consumer_name`].
pub fn pod_of_consumer<'a>(subscription: &str, consumer: &'a str) -> Option<&'a str> {
    let (owner, pod) = consumer.split_once('_')?;
    let ok = owner == subscription
        && !pod.is_empty()
        && pod.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(pod)
}

/// KV key of a topic's resolved config.
pub fn topic_key(namespace: &str, topic: &str) -> String {
    format!("{namespace}.topic.{topic}")
}

/// KV key of a subscription's resolved config, under its app.
pub fn subscription_key(namespace: &str, app: &str, subscription: &str) -> String {
    format!("{namespace}.app.{app}.{subscription}")
}

/// KV key filter a sidecar of `app` watches for its subscriptions.
pub fn app_keys(namespace: &str, app: &str) -> String {
    format!("{namespace}.app.{app}.>")
}

/// KV key filter for all topics of a namespace.
pub fn topic_keys(namespace: &str) -> String {
    format!("{namespace}.topic.>")
}

/// KV key of the count of a subscription's dead-lettered messages. The
/// sidecars add to it; the operator reports it in the Subscription's status.
/// Its first token starts with `_`, which no namespace name can, so it is
/// never under a `{namespace}.>` that sidecars watch for their config.
pub fn dead_letter_count_key(namespace: &str, subscription: &str) -> String {
    format!("_stats.{namespace}.{subscription}.deadLettered")
}

/// KV key of the count of a subscription's messages dropped for want of a
/// dead-letter topic (as [`dead_letter_count_key`]).
pub fn dropped_count_key(namespace: &str, subscription: &str) -> String {
    format!("_stats.{namespace}.{subscription}.dropped")
}

/// KV key of why the last of those was dropped (its id, attempts, the
/// app's last status and error), which the operator reports beside the count.
pub fn last_dropped_key(namespace: &str, subscription: &str) -> String {
    format!("_stats.{namespace}.{subscription}.lastDropped")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_names_follow_the_documented_scheme() {
        assert_eq!(stream_name("default", "orders"), "FERRY_default_orders");
        assert_eq!(dead_letter_count_key("shop", "invoices"), "_stats.shop.invoices.deadLettered");
        assert_eq!(dropped_count_key("shop", "invoices"), "_stats.shop.invoices.dropped");
        assert_eq!(last_dropped_key("shop", "invoices"), "_stats.shop.invoices.lastDropped");
        assert_eq!(topic_subjects("default", "orders"), "ferry.default.orders.>");
        assert_eq!(message_subject("shop", "orders", 3), "ferry.shop.orders.3");
        assert_eq!(consumer_name("billing"), "billing");
        assert_eq!(pod_consumer_name("audit", "web-7d9f.x"), "audit_web-7d9f_x");
        assert_eq!(topic_key("shop", "orders"), "shop.topic.orders");
        assert_eq!(subscription_key("shop", "billing-app", "billing"), "shop.app.billing-app.billing");
        assert_eq!(app_keys("shop", "billing-app"), "shop.app.billing-app.>");
        assert_eq!(topic_keys("shop"), "shop.topic.>");
    }

    #[test]
    fn only_names_formed_as_a_subscriptions_pod_consumers_are_its_own() {
        for pod in ["web-7d9f-x2x4z", "web-7d9f.a", "0", "A", "b--web-1", "-x"] {
            let name = pod_consumer_name("audit", pod);
            assert_eq!(pod_of_consumer("audit", &name), Some(&name["audit_".len()..]), "{name}");
        }
        for other in ["audit", "audit-b_web-1", "auditb_web-1", "audit_", "audit_web.1", "x_audit_w", "audit--web"] {
            assert_eq!(pod_of_consumer("audit", other), None, "{other}");
        }
        // A subscription name with `--` owns only its own pods' consumers.
        let name = pod_consumer_name("a--b", "web-1");
        assert_eq!((pod_of_consumer("a--b", &name), pod_of_consumer("a", &name)), (Some("web-1"), None));
    }

    #[test]
    fn labels_are_checked_like_kubernetes_names() {
        for ok in ["a", "orders", "order-events-2", &"x".repeat(63)] {
            assert_eq!(validate_label("topic name", ok), Ok(()), "{ok}");
        }
        for bad in ["", "Orders", "a_b", "a.b", "-a", "a-", "a b", "a>", "a*", &"x".repeat(64), "../etc"] {
            assert!(validate_label("topic name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of(None, 8), 0);
        assert_eq!(partition_of(Some("k"), 1), 0);
        // FNV-1a of "a" is 0xe40c292c; pinned so a change of hash is noticed.
        assert_eq!(partition_of(Some("a"), 1000), 0xe40c_292c % 1000);
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            seen.insert(partition_of(Some(&format!("key-{i}")), 4));
        }
        assert_eq!(seen.len(), 4);
    }
}
