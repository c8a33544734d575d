//! The checked-in CRDs are what the types generate, and their key parts are
//! what users rely on.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_checked_in_crds_match_the_types() {
    for (name, yaml) in ferry_operator::crd::rendered() {
        let path = repo().join("crds").join(&name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == yaml,
            "{} drifted from the types in api/; run `cargo run -p ferry-operator -- crd --write crds`",
            path.display()
        );
    }
}

fn crd(name: &str) -> serde_json::Value {
    let crd = ferry_operator::crd::crds().into_iter().find(|c| c.metadata.name.as_deref() == Some(name)).unwrap();
    serde_json::to_value(crd).unwrap()
}

#[test]
fn the_subscription_crd_has_its_names_columns_validation_and_descriptions() {
    let c = crd("subscriptions.ferry.dev");
    assert_eq!(c["spec"]["names"]["shortNames"], serde_json::json!(["fsub"]));
    assert_eq!(c["spec"]["scope"], "Namespaced");
    let v = &c["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object(), "status subresource");
    let columns: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Ready", "Topic", "Consumer", "Lag", "Age"]);
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["app", "topic"]));
    assert_eq!(spec["properties"]["maxDeliveries"]["minimum"], 1.0);
    assert_eq!(spec["properties"]["maxDeliveries"]["maximum"], 1000.0);
    assert_eq!(spec["properties"]["ordering"]["enum"], serde_json::json!(["None", "Key", "Strict"]));
    let rules: Vec<&str> =
        spec["x-kubernetes-validations"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert!(rules.iter().any(|r| r.contains("self.deadLetterTopic != self.topic")), "{rules:?}");
    for field in ["topic", "app", "fanout", "startPosition"] {
        assert_eq!(spec["properties"][field]["x-kubernetes-validations"][0]["rule"], "self == oldSelf", "{field}");
    }
    for (field, schema) in spec["properties"].as_object().unwrap() {
        assert!(
            schema["description"].as_str().is_some_and(|d| !d.is_empty()),
            "spec.{field} has no description (kubectl explain)"
        );
    }
}

#[test]
fn the_topic_crd_has_its_names_columns_and_ranges() {
    let c = crd("topics.ferry.dev");
    assert_eq!(c["spec"]["names"]["shortNames"], serde_json::json!(["ftopic"]));
    let v = &c["spec"]["versions"][0];
    let columns: Vec<&str> =
        v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(columns, ["Ready", "Stream", "Messages", "Age"]);
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["partitions"]["maximum"], 256.0);
    assert_eq!(spec["properties"]["storage"]["enum"], serde_json::json!(["File", "Memory"]));
    // Bounded, so every duration the API server takes is one the operator
    // can decode (one it cannot would fail the whole list it comes in).
    for duration in [&spec["properties"]["duplicateWindow"], &spec["properties"]["retention"]["properties"]["maxAge"]] {
        assert_eq!(duration["pattern"], ferry_api::duration::PATTERN, "{duration}");
        assert_eq!(duration["maxLength"], ferry_api::duration::MAX_LENGTH, "{duration}");
    }
    for (field, schema) in spec["properties"].as_object().unwrap() {
        assert!(schema["description"].as_str().is_some_and(|d| !d.is_empty()), "spec.{field} has no description");
    }
}

/// Kubernetes takes names with dots; a dot would split a NATS subject, so
/// both CRDs restrict `metadata.name` to a DNS label (a schema pattern: the
/// API server refuses `orders.v1` when it is applied).
#[test]
fn both_crds_restrict_metadata_name_to_a_dns_label() {
    let pattern = regex::Regex::new(ferry_api::naming::LABEL_PATTERN).unwrap();
    for name in ["topics.ferry.dev", "subscriptions.ferry.dev"] {
        let c = crd(name);
        let schema = &c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"];
        assert_eq!(schema["type"], "object", "{name}");
        let field = &schema["properties"]["name"];
        assert_eq!(field["maxLength"], 63, "{name}");
        assert_eq!(field["pattern"], ferry_api::naming::LABEL_PATTERN, "{name}");
        assert_eq!(schema["properties"].as_object().unwrap().len(), 1, "only name may be restricted: {schema}");
        assert!(!pattern.is_match("orders.v1") && pattern.is_match("orders-v1"));
    }
}
