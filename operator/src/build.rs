//! The pure step: from a validated resource to the desired broker objects.
//! No client, no IO — so its tests need neither Kubernetes nor NATS.

use ferry_api::naming;
use ferry_api::plan::{consumer_plan, stream_plan, validate_subscription, validate_topic, FieldError};
use ferry_api::resolved::{ResolvedSubscription, ResolvedTopic};
use ferry_api::{ConsumerPlan, StreamPlan, SubscriptionSpec, TopicSpec};

/// What a Topic should be on the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredTopic {
    /// The stream.
    pub stream: StreamPlan,
    /// KV key and JSON value for the sidecars.
    pub kv: (String, Vec<u8>),
}

/// What a Subscription should be on the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSubscription {
    /// The stream of its topic, which must exist before the subscription is
    /// ready (in both fanouts).
    pub stream: String,
    /// The group consumer (`fanout: Pod` consumers are made by each sidecar).
    pub consumer: Option<ConsumerPlan>,
    /// KV key and JSON value for the sidecars of its app.
    pub kv: (String, Vec<u8>),
}

/// Builds a Topic's desired state, or lists what is invalid.
pub fn topic(namespace: &str, name: &str, spec: &TopicSpec) -> Result<DesiredTopic, Vec<FieldError>> {
    let errors = validate_topic(namespace, name, spec);
    if !errors.is_empty() {
        return Err(errors);
    }
    let resolved = ResolvedTopic { namespace: namespace.into(), name: name.into(), spec: spec.clone() };
    Ok(DesiredTopic {
        stream: stream_plan(namespace, name, spec),
        kv: (naming::topic_key(namespace, name), serde_json::to_vec(&resolved).expect("a spec serializes")),
    })
}

/// Builds a Subscription's desired state, or lists what is invalid.
pub fn subscription(
    namespace: &str,
    name: &str,
    spec: &SubscriptionSpec,
) -> Result<DesiredSubscription, Vec<FieldError>> {
    let errors = validate_subscription(namespace, name, spec);
    if !errors.is_empty() {
        return Err(errors);
    }
    let resolved = ResolvedSubscription { namespace: namespace.into(), name: name.into(), spec: spec.clone() };
    let consumer =
        (spec.fanout == ferry_api::subscription::Fanout::Group).then(|| consumer_plan(namespace, name, spec, None));
    Ok(DesiredSubscription {
        stream: naming::stream_name(namespace, &spec.topic),
        consumer,
        kv: (
            naming::subscription_key(namespace, &spec.app, name),
            serde_json::to_vec(&resolved).expect("a spec serializes"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::subscription::Fanout;
    use ferry_api::topic::Storage;

    #[test]
    fn topics_build_into_a_stream_and_a_kv_entry() {
        struct Case {
            name: &'static str,
            spec: TopicSpec,
            stream: &'static str,
            storage: Storage,
        }
        let cases = [
            Case { name: "orders", spec: TopicSpec::default(), stream: "FERRY_shop_orders", storage: Storage::File },
            Case {
                name: "logs",
                spec: TopicSpec { storage: Storage::Memory, ..TopicSpec::default() },
                stream: "FERRY_shop_logs",
                storage: Storage::Memory,
            },
        ];
        for c in cases {
            let d = topic("shop", c.name, &c.spec).unwrap();
            assert_eq!(d.stream.name, c.stream);
            assert_eq!(d.stream.storage, c.storage);
            assert_eq!(d.kv.0, format!("shop.topic.{}", c.name));
            let back: ResolvedTopic = serde_json::from_slice(&d.kv.1).unwrap();
            assert_eq!((back.namespace.as_str(), back.name.as_str(), &back.spec), ("shop", c.name, &c.spec));
        }
    }

    #[test]
    fn an_invalid_topic_builds_nothing_and_names_its_fields() {
        let err = topic("shop", "Bad_Name", &TopicSpec { partitions: 0, ..TopicSpec::default() }).unwrap_err();
        assert_eq!(err.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["metadata.name", "spec.partitions"]);
    }

    #[test]
    fn subscriptions_build_a_group_consumer_and_a_kv_entry_under_their_app() {
        let spec = SubscriptionSpec::new("orders", "billing");
        let d = subscription("shop", "invoices", &spec).unwrap();
        let c = d.consumer.unwrap();
        assert_eq!((c.stream.as_str(), c.name.as_str()), ("FERRY_shop_orders", "invoices"));
        assert_eq!(d.kv.0, "shop.app.billing.invoices");
        let pod = SubscriptionSpec { fanout: Fanout::Pod, ..SubscriptionSpec::new("orders", "audit") };
        assert!(subscription("shop", "audit", &pod).unwrap().consumer.is_none(), "per-pod consumers are the sidecars'");
        let same = SubscriptionSpec { dead_letter_topic: Some("orders".into()), ..spec };
        assert!(subscription("shop", "x", &same).is_err());
    }
}
