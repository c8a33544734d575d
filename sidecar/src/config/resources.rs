//! Topic and Subscription manifests from a directory: the same YAML one
//! would `kubectl apply` (multi-document files allowed). Every problem is
//! reported with its file, document and field. Like `kubectl apply` (strict
//! field validation), an unknown field in a `spec` is an error, not ignored:
//! a misspelled `deadLetter:` must not quietly mean no dead-letter topic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_api::plan::{validate_subscription, validate_topic};
use ferry_api::{Subscription, SubscriptionSpec, Topic, TopicSpec};
use serde::de::DeserializeOwned;

const API_VERSION: &str = "ferry.dev/v1alpha1";

/// The resources this sidecar knows, by name, in its namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// Topics by name.
    pub topics: BTreeMap<String, TopicSpec>,
    /// Subscriptions by name.
    pub subscriptions: BTreeMap<String, SubscriptionSpec>,
}

impl Resources {
    /// Subscriptions whose `app` is `app_id`.
    pub fn subscriptions_of<'a>(&'a self, app_id: &'a str) -> impl Iterator<Item = (&'a String, &'a SubscriptionSpec)> {
        self.subscriptions.iter().filter(move |(_, s)| s.app == app_id)
    }

    /// The edits in `next` that an object already running cannot take (the
    /// CRDs refuse the same ones): a stream's storage; a subscription's
    /// topic, app, fanout and start position (the broker keeps a
    /// consumer's start). One message per field.
    pub fn immutable_changes(&self, next: &Resources) -> Vec<String> {
        let mut errors = Vec::new();
        let mut field = |kind: &str, name: &str, path: &str, changed: bool| {
            if changed {
                errors.push(format!(
                    "{kind} {name}: {path} cannot be changed: give the {kind} a new name (the broker keeps \
                     the old one's stream or consumer when it is removed from the manifests)"
                ));
            }
        };
        for (name, old) in &self.topics {
            if let Some(new) = next.topics.get(name) {
                field("Topic", name, "spec.storage", old.storage != new.storage);
            }
        }
        for (name, old) in &self.subscriptions {
            if let Some(new) = next.subscriptions.get(name) {
                field("Subscription", name, "spec.topic", old.topic != new.topic);
                field("Subscription", name, "spec.app", old.app != new.app);
                field("Subscription", name, "spec.fanout", old.fanout != new.fanout);
                field("Subscription", name, "spec.startPosition", old.start_position != new.start_position);
            }
        }
        errors
    }
}

/// Reads every `*.yaml` / `*.yml` file in `dir` (not recursive, in name order).
pub fn load_dir(dir: &Path, namespace: &str) -> Result<Resources, Vec<String>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect(),
        Err(e) => return Err(vec![format!("{}: {e}", dir.display())]),
    };
    files.sort();
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push((file.display().to_string(), text)),
            Err(e) => errors.push(format!("{}: {e}", file.display())),
        }
    }
    match parse_sources(&sources, namespace) {
        Ok(r) if errors.is_empty() => Ok(r),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// Parses manifests given as (file name, text) pairs. Pure: tests feed it strings.
pub fn parse_sources(sources: &[(String, String)], namespace: &str) -> Result<Resources, Vec<String>> {
    let mut res = Resources::default();
    let mut errors = Vec::new();
    for (file, text) in sources {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let at = format!("{file} (document {})", i + 1);
            let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("{at}: not valid YAML: {e}"));
                    continue;
                }
            };
            if let Err(es) = add_document(&mut res, value, namespace) {
                errors.extend(es.into_iter().map(|e| format!("{at}: {e}")));
            }
        }
    }
    for (name, sub) in &res.subscriptions {
        let topics = std::iter::once(("spec.topic", &sub.topic))
            .chain(sub.dead_letter_topic.iter().map(|t| ("spec.deadLetterTopic", t)));
        for (field, topic) in topics {
            if !res.topics.contains_key(topic) {
                errors.push(format!("Subscription {name:?}: {field}: no Topic named {topic:?} in these manifests"));
            }
        }
    }
    if errors.is_empty() {
        Ok(res)
    } else {
        Err(errors)
    }
}

/// `value` as a `T`. A field under `spec` that `T` does not have is an
/// error, one per field; elsewhere (`metadata`'s many fields, `status`)
/// what Ferry does not read passes, as Kubernetes keeps it.
fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, Vec<String>> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| {
        let path = field_path(&path);
        if path.split(['.', '[']).next() == Some("spec") {
            unknown.push(format!("{path}: unknown field"));
        }
    };
    let t = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note)).map_err(|e| {
        let path = e.path().to_string();
        vec![format!("{path}: {}", e.into_inner())]
    })?;
    if unknown.is_empty() {
        Ok(t)
    } else {
        Err(unknown)
    }
}

/// A field's path as the other errors write it: `spec.backoff.max`, `a[0].b`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

fn add_document(res: &mut Resources, value: serde_yaml::Value, namespace: &str) -> Result<(), Vec<String>> {
    let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    if api_version != API_VERSION {
        return Err(vec![format!("apiVersion: expected {API_VERSION:?}, found {api_version:?}")]);
    }
    let (name, ns, problems) = match kind.as_str() {
        "Topic" => {
            let t: Topic = typed(value)?;
            let (name, ns) = meta(&t.metadata, namespace).map_err(|e| vec![e])?;
            let problems = validate_topic(&ns, &name, &t.spec);
            if problems.is_empty() && res.topics.insert(name.clone(), t.spec).is_some() {
                return Err(vec![format!("Topic {name:?} is defined twice")]);
            }
            (name, ns, problems)
        }
        "Subscription" => {
            let s: Subscription = typed(value)?;
            let (name, ns) = meta(&s.metadata, namespace).map_err(|e| vec![e])?;
            let problems = validate_subscription(&ns, &name, &s.spec);
            if problems.is_empty() && res.subscriptions.insert(name.clone(), s.spec).is_some() {
                return Err(vec![format!("Subscription {name:?} is defined twice")]);
            }
            (name, ns, problems)
        }
        other => return Err(vec![format!("kind: expected Topic or Subscription, found {other:?}")]),
    };
    if ns != namespace {
        return Err(vec![format!(
            "{kind} {name:?}: metadata.namespace: {ns:?} is not this sidecar's namespace {namespace:?}"
        )]);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        Err(vec![format!("{kind} {name:?}: {}", list.join("; "))])
    }
}

fn meta(
    m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespace: &str,
) -> Result<(String, String), String> {
    let name = m.name.clone().ok_or("metadata.name: missing")?;
    Ok((name, m.namespace.clone().unwrap_or_else(|| namespace.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Resources, Vec<String>> {
        parse_sources(&[("m.yaml".to_owned(), text.to_owned())], "default")
    }

    #[test]
    fn edits_a_running_object_cannot_take_are_named_and_others_pass() {
        let topic =
            "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {partitions: 2}\n---\n";
        let sub = |extra: &str| {
            format!(
                "{topic}apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: billing}}\n\
                 spec: {{topic: orders, app: shop{extra}}}\n"
            )
        };
        let running = parse(&sub("")).unwrap();
        assert!(running.immutable_changes(&parse(&sub(", maxInFlight: 8")).unwrap()).is_empty());
        assert!(running.immutable_changes(&parse(topic).unwrap()).is_empty(), "a removal is no edit");
        let errors = running.immutable_changes(&parse(&sub(", startPosition: Earliest, fanout: Pod")).unwrap());
        assert_eq!(
            errors,
            [
                "Subscription billing: spec.fanout cannot be changed: give the Subscription a new name (the broker \
                 keeps the old one's stream or consumer when it is removed from the manifests)",
                "Subscription billing: spec.startPosition cannot be changed: give the Subscription a new name (the \
                 broker keeps the old one's stream or consumer when it is removed from the manifests)"
            ]
        );
        let mem = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {partitions: 2, storage: Memory}\n";
        assert_eq!(running.immutable_changes(&parse(mem).unwrap()).len(), 1);
    }

    #[test]
    fn a_multi_document_file_yields_topics_and_subscriptions_with_defaults() {
        let r = parse(
            "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {partitions: 4}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders-dlq}\nspec: {}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {name: billing, namespace: default}\n\
             spec: {topic: orders, app: billing, deadLetterTopic: orders-dlq, maxDeliveries: 3}\n",
        )
        .unwrap();
        assert_eq!(r.topics["orders"].partitions, 4);
        assert_eq!(r.topics["orders-dlq"].partitions, 1);
        let s = &r.subscriptions["billing"];
        assert_eq!((s.max_deliveries, s.max_in_flight, s.path.as_str()), (3, 32, "/"));
        assert_eq!(r.subscriptions_of("billing").count(), 1);
        assert_eq!(r.subscriptions_of("other").count(), 0);
    }

    #[test]
    fn a_bad_field_is_reported_with_file_document_and_path() {
        let errors = parse(
            "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {name: billing}\n\
             spec: {topic: orders, app: billing, maxDeliveries: many}\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("m.yaml (document 2): spec.maxDeliveries: invalid type"), "{}", errors[0]);
    }

    const ORDERS: &str = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {}\n---\n";

    fn subscription(spec: &str) -> String {
        format!(
            "{ORDERS}apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: billing}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn an_unknown_spec_field_is_an_error_as_kubectl_apply_makes_it() {
        for (field, spec) in [
            ("spec.maxInflight", "{topic: orders, app: billing, maxInflight: 8}"),
            ("spec.deadLetter", "{topic: orders, app: billing, deadLetter: orders}"),
            ("spec.procesingTimeout", "{topic: orders, app: billing, procesingTimeout: 5s}"),
            ("spec.backoff.maximum", "{topic: orders, app: billing, backoff: {initial: 1s, maximum: 9s}}"),
        ] {
            assert_eq!(
                parse(&subscription(spec)).unwrap_err(),
                [format!("m.yaml (document 2): {field}: unknown field")],
                "{spec}"
            );
        }
        // In a Topic too, and each unknown field is named.
        let topic = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\n\
                     spec: {partition: 2, retention: {maxAge: 1h, maxMessage: 5}}\n";
        assert_eq!(
            parse(topic).unwrap_err(),
            [
                "m.yaml (document 1): spec.partition: unknown field",
                "m.yaml (document 1): spec.retention.maxMessage: unknown field"
            ]
        );
    }

    #[test]
    fn what_kubernetes_keeps_outside_spec_still_loads() {
        // As `kubectl get -o yaml` prints it: metadata Kubernetes fills in, a status.
        let exported = "apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata:\n  name: billing\n  \
                        namespace: default\n  labels: {team: shop}\n  annotations: {note: x}\n  uid: 5f0c\n  \
                        resourceVersion: \"42\"\n  generation: 3\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n  \
                        finalizers: [ferry.dev/cleanup]\n  managedFields: [{manager: kubectl, operation: Apply}]\n\
                        spec:\n  topic: orders\n  app: billing\n  maxInFlight: 8\n  deadLetterTopic: orders-dlq\n\
                        status:\n  consumer: c\n  conditions: []\n  somethingNewer: 1\n";
        let dlq = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders-dlq}\nspec: {}\n---\n";
        let r = parse(&format!("{ORDERS}{dlq}{exported}")).unwrap();
        let s = &r.subscriptions["billing"];
        assert_eq!((s.max_in_flight, s.dead_letter_topic.as_deref()), (8, Some("orders-dlq")));
    }

    #[test]
    fn a_reload_with_an_unknown_field_is_refused_whole_and_the_running_config_stays() {
        // The watcher keeps what runs whenever `load_dir` is an error.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, subscription("{topic: orders, app: billing, maxInFlight: 4}")).unwrap();
        let running = load_dir(dir.path(), "default").unwrap();
        assert_eq!(running.subscriptions["billing"].max_in_flight, 4);
        std::fs::write(&file, subscription("{topic: orders, app: billing, maxInflight: 8}")).unwrap();
        let errors = load_dir(dir.path(), "default").unwrap_err();
        assert_eq!(errors, [format!("{} (document 2): spec.maxInflight: unknown field", file.display())]);
        std::fs::write(&file, subscription("{topic: orders, app: billing, maxInFlight: 8}")).unwrap();
        assert_eq!(load_dir(dir.path(), "default").unwrap().subscriptions["billing"].max_in_flight, 8);
    }

    #[test]
    fn unknown_kinds_namespaces_topics_and_semantic_problems_are_all_reported() {
        let errors = parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: a, namespace: other}\nspec: {}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: Bad}\nspec: {}\n---\n\
             apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {name: s}\nspec: {topic: missing, app: x}\n",
        )
        .unwrap_err();
        let text = errors.join("\n");
        assert_eq!(errors.len(), 4, "{text}");
        assert!(text.contains("(document 1): apiVersion"), "{text}");
        assert!(text.contains("(document 2): Topic \"a\": metadata.namespace"), "{text}");
        assert!(text.contains("(document 3): Topic \"Bad\": metadata.name"), "{text}");
        assert!(text.contains("Subscription \"s\": spec.topic: no Topic named \"missing\""), "{text}");
    }
}
