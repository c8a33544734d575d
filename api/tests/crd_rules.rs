//! The rules the CRDs carry for the API server — fields that cannot change,
//! fields tied to each other, names that fit a NATS subject — run here with
//! kube's client-side CEL evaluator, so a rule that is missing or wrong fails
//! a test rather than a cluster.

use ferry_api::naming::{validate_label, LABEL_PATTERN};
use ferry_api::subscription::{DeliveryMode, Fanout, Ordering, StartPosition};
use ferry_api::topic::Storage;
use ferry_api::{Subscription, SubscriptionSpec, Topic, TopicSpec};
use kube::CustomResourceExt;

fn topic(name: &str, spec: TopicSpec) -> Topic {
    let mut t = Topic::new(name, spec);
    t.metadata.namespace = Some("shop".into());
    t
}

fn subscription(name: &str, spec: SubscriptionSpec) -> Subscription {
    let mut s = Subscription::new(name, spec);
    s.metadata.namespace = Some("shop".into());
    s
}

fn errors(result: Result<(), kube::core::cel::ValidationErrors>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_subscription_whose_fields_contradict_each_other_is_refused() {
    let ok = subscription("invoices", SubscriptionSpec::new("orders", "billing"));
    assert_eq!(errors(ok.validate_cel()), "");
    let mut same = ok.clone();
    same.spec.dead_letter_topic = Some("orders".into());
    assert!(errors(same.validate_cel()).contains("deadLetterTopic must differ from topic"));
    let mut bulk = ok.clone();
    bulk.spec.batch.max_messages = 10;
    assert_eq!(errors(bulk.validate_cel()), "", "bulk push with ordering None");
    bulk.spec.ordering = Ordering::Key;
    assert!(errors(bulk.validate_cel()).contains("needs ordering None"));
    let mut pulled = ok.clone();
    pulled.spec.mode = DeliveryMode::Pull;
    pulled.spec.ordering = Ordering::Strict;
    assert_eq!(errors(pulled.validate_cel()), "", "a strict pull");
    pulled.spec.ordering = Ordering::Key;
    assert!(errors(pulled.validate_cel()).contains("ordering Key needs mode Push"));
}

#[test]
fn topic_app_fanout_and_start_position_of_a_subscription_cannot_change_and_the_rest_can() {
    let old = subscription("invoices", SubscriptionSpec::new("orders", "billing"));
    let changed = |f: &dyn Fn(&mut SubscriptionSpec)| {
        let mut new = old.clone();
        f(&mut new.spec);
        errors(new.validate_cel_update(&old))
    };
    assert!(changed(&|s| s.topic = "payments".into()).contains("spec.topic cannot be changed"));
    assert!(changed(&|s| s.app = "audit".into()).contains("spec.app cannot be changed"));
    assert!(changed(&|s| s.fanout = Fanout::Pod).contains("spec.fanout cannot be changed"));
    // JetStream refuses to change a consumer's deliver policy (err 10012).
    assert!(changed(&|s| s.start_position = StartPosition::Earliest).contains("spec.startPosition cannot be changed"));
    assert_eq!(changed(&|s| s.max_in_flight = 7), "");
    assert_eq!(changed(&|s| s.dead_letter_topic = Some("orders-dlq".into())), "");
}

#[test]
fn a_topics_storage_cannot_change_and_its_retention_can() {
    let old = topic("orders", TopicSpec::default());
    let mut memory = old.clone();
    memory.spec.storage = Storage::Memory;
    assert!(errors(memory.validate_cel_update(&old)).contains("spec.storage cannot be changed"));
    let mut longer = old.clone();
    longer.spec.partitions = 4;
    assert_eq!(errors(longer.validate_cel_update(&old)), "");
}

/// The schema's `pattern` on names in a spec is the same rule as
/// `naming::validate_label`, which the sidecar and operator check.
#[test]
fn names_in_a_subscription_spec_carry_the_label_pattern() {
    let crd = serde_json::to_value(Subscription::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in ["topic", "app", "deadLetterTopic"] {
        assert_eq!(spec[field]["pattern"], LABEL_PATTERN, "{field}: {}", spec[field]);
        assert_eq!(spec[field]["maxLength"], 63, "{field}");
    }
    let pattern = regex::Regex::new(LABEL_PATTERN).unwrap();
    for value in ["billing", "billing-v2", "a", "0", "billing app", "Billing", "-a", "a-", "a.b", "a_b", ""] {
        assert_eq!(pattern.is_match(value), validate_label("app id", value).is_ok(), "{value:?}");
    }
}

/// Every key of `written` is in `read` (the manifest read into the type and
/// written out again): a misspelt or unknown field would be dropped silently.
fn no_unknown_fields(path: &str, written: &serde_json::Value, read: &serde_json::Value) {
    if let (Some(w), Some(r)) = (written.as_object(), read.as_object()) {
        for (k, v) in w {
            let back = r.get(k).unwrap_or_else(|| panic!("{path}.{k}: not a field of the type"));
            no_unknown_fields(&format!("{path}.{k}"), v, back);
        }
    }
}

/// The manifests README's install steps apply (`examples/k8s/`) and the
/// quickstart's (`examples/quickstart/`) read into the types with no field
/// left over, pass the CRDs' rules and the operator's validation.
#[test]
fn the_example_manifests_are_valid_topics_and_subscriptions() {
    let mut seen = (0, 0);
    for file in ["k8s/topic.yaml", "k8s/subscription.yaml", "quickstart/topics.yaml", "quickstart/subscriptions.yaml"] {
        let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let written: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let name = written["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let ns = written["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
            match written["kind"].as_str() {
                Some("Topic") => {
                    let t: Topic = serde_json::from_value(written.clone()).unwrap();
                    no_unknown_fields(&format!("{file} {name}"), &written, &serde_json::to_value(&t).unwrap());
                    assert_eq!(errors(t.validate_cel()), "", "{file} {name}");
                    assert!(ferry_api::plan::validate_topic(&ns, &name, &t.spec).is_empty(), "{file} {name}");
                    seen.0 += 1;
                }
                Some("Subscription") => {
                    let s: Subscription = serde_json::from_value(written.clone()).unwrap();
                    no_unknown_fields(&format!("{file} {name}"), &written, &serde_json::to_value(&s).unwrap());
                    assert_eq!(errors(s.validate_cel()), "", "{file} {name}");
                    let invalid = ferry_api::plan::validate_subscription(&ns, &name, &s.spec);
                    assert!(invalid.is_empty(), "{file} {name}: {invalid:?}");
                    seen.1 += 1;
                }
                other => panic!("{file}: a {other:?}"),
            }
        }
    }
    assert!(seen.0 >= 3 && seen.1 >= 2, "{seen:?}");
}
