//! The Helm chart `charts/ferry`, checked with the real `helm` binary
//! (`scripts/test` installs it into `.tools/`): it lints and renders with
//! default values and with every optional block on; every rendered object is
//! a valid Kubernetes object of its kind; the operator's flags are accepted
//! by the operator's own parser and name the objects the chart renders; the
//! sidecar defaults parse as the webhook's `InjectConfig`; the bundled NATS
//! config is valid for `nats-server`; the RBAC allows what the operator
//! does and not more; the schema refuses bad values; the CRDs are the root
//! `crds/`.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;

use clap::{CommandFactory, Parser};
use common::rbac::{self, documents, template, Rbac, Request, NAMESPACE, RELEASE};
use ferry_operator::cli::{Cli, Cmd, RunArgs};
use ferry_operator::webhook::InjectConfig;
use http::{Method, Uri};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Every optional block on: cert-manager, the bundled NATS (a 3-server
/// cluster), broker credentials for the operator and the sidecars, an
/// ephemeral data volume, the webhook's other policies.
const ALL_OPTIONAL: &[&str] = &[
    "webhook.certManager.enabled=true",
    "nats.enabled=true",
    "nats.replicas=3",
    "nats.jetstream.storageClassName=fast",
    "broker.credentialsSecret=ferry-operator-nats",
    "sidecar.broker.credentialsSecret=ferry-nats",
    "sidecar.broker.tlsCASecret=ferry-nats-ca",
    "sidecar.broker.url=nats://nats-leaf.ferry-system.svc:4222",
    "sidecar.dataVolume.type=ephemeral",
    "sidecar.dataVolume.storageClassName=fast",
    "sidecar.dataVolume.sizeLimit=2Gi",
    "sidecar.fsync=interval",
    "sidecar.logFormat=text",
    "sidecar.dedupeMaxIds=2000000",
    "sidecar.dedupeWindow=1.5h 30mins",
    "sidecar.outboxRetention=15m",
    "sidecar.maxMessageBytes=8388608",
    "webhook.failurePolicy=Ignore",
    "webhook.reinvocationPolicy=Never",
    "webhook.objectSelector.matchLabels.ferry=yes",
    "imagePullSecrets[0].name=registry",
    "operator.priorityClassName=ferry-critical",
    "operator.configReplicas=3",
    "operator.podAnnotations.team=messaging",
    "serviceAccount.annotations.owner=messaging",
    "metrics.service.annotations.prometheus\\.io/path=/metrics",
    "replicas=2",
];

/// With a watched namespace: the namespaced RBAC becomes a Role there.
const WATCH_ONE_NAMESPACE: &[&str] = &["operator.watchNamespace=shop"];

fn render(sets: &[&str]) -> Vec<Value> {
    documents(&template(sets).unwrap_or_else(|e| panic!("{e}")))
}

fn typed<T: DeserializeOwned>(doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}\n{doc:#}", doc["kind"]))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

fn operator_container(docs: &[Value]) -> Container {
    let deployment: Deployment = typed(find(docs, "Deployment", "ferry-operator"));
    let pod = deployment.spec.template.spec.expect("a pod spec");
    pod.containers.into_iter().find(|c| c.name == "operator").expect("the operator container")
}

// ---------------------------------------------------------------- lint, render

#[test]
fn helm_lint_passes_and_the_notes_render_with_default_values_and_with_every_optional_block_on() {
    let chart = rbac::chart_dir();
    let chart = chart.to_str().expect("a UTF-8 path");
    for sets in [&[][..], ALL_OPTIONAL, WATCH_ONE_NAMESPACE] {
        let mut values = Vec::new();
        for set in sets {
            values.extend(["--set", set]);
        }
        let lint = [&["lint", "--strict", chart, "--namespace", NAMESPACE][..], &values].concat();
        rbac::run_helm(&lint).unwrap_or_else(|e| panic!("{e}"));
        // `helm template` leaves NOTES.txt out; a client-side dry run renders it.
        let install =
            [&["install", "--dry-run=client", RELEASE, chart, "--namespace", NAMESPACE][..], &values].concat();
        let out = rbac::run_helm(&install).unwrap_or_else(|e| panic!("{e}"));
        let notes = &out[out.find("NOTES:").unwrap_or_else(|| panic!("no NOTES in:\n{out}"))..];
        assert!(notes.contains("kubectl -n ferry-system rollout status deployment/ferry-operator"), "{notes}");
        assert!(notes.contains("ferry.dev/inject: \"true\""), "{notes}");
    }
}

/// Parses `doc` as `T` and checks that nothing was lost on the way: the
/// k8s-openapi types skip fields they do not know, so a misspelt or
/// misplaced field shows up as a difference after a round trip.
fn check_kind<T: DeserializeOwned + Serialize>(doc: &Value) {
    let back = serde_json::to_value(typed::<T>(doc)).expect("a k8s-openapi object serializes");
    let mut diffs = Vec::new();
    differences("", doc, &back, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{} {}: fields its type does not know, or reads differently: {diffs:#?}",
        doc["kind"],
        doc["metadata"]["name"]
    );
}

/// The JSON pointers where `rendered` and `typed` differ.
fn differences(at: &str, rendered: &Value, typed: &Value, out: &mut Vec<String>) {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let (x, y) = (a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null));
                differences(&format!("{at}/{key}"), x, y, out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{at}/{i}"), x, y, out);
            }
        }
        (a, b) if a != b => out.push(format!("{at}: rendered {a}, as the type reads it {b}")),
        _ => {}
    }
}

fn check_document(doc: &Value) {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "ServiceAccount") => check_kind::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => check_kind::<ConfigMap>(doc),
        ("v1", "Secret") => check_kind::<Secret>(doc),
        ("v1", "Service") => check_kind::<Service>(doc),
        ("apps/v1", "Deployment") => check_kind::<Deployment>(doc),
        ("apps/v1", "StatefulSet") => check_kind::<StatefulSet>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => check_kind::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => check_kind::<ClusterRoleBinding>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => check_kind::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => check_kind::<RoleBinding>(doc),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            check_kind::<MutatingWebhookConfiguration>(doc)
        }
        // No k8s-openapi type: checked as YAML.
        ("cert-manager.io/v1", "Issuer") => assert!(doc["spec"]["selfSigned"].is_object(), "{doc:#}"),
        ("cert-manager.io/v1", "Certificate") => {
            assert!(doc["spec"]["secretName"].is_string() && doc["spec"]["issuerRef"]["name"].is_string(), "{doc:#}")
        }
        _ => panic!("the chart renders {kind} ({api_version}), which this test does not know: add it here"),
    }
}

#[test]
fn every_rendered_document_parses_into_its_kubernetes_type() {
    let mut seen = BTreeMap::<String, usize>::new();
    for sets in [&[][..], ALL_OPTIONAL, WATCH_ONE_NAMESPACE] {
        for doc in render(sets) {
            check_document(&doc);
            let name = doc["metadata"]["name"].as_str().expect("every object has a name");
            assert!(name.len() <= 63 && name.starts_with(RELEASE), "{name}");
            *seen.entry(format!("{}/{}", doc["kind"].as_str().unwrap_or_default(), name)).or_default() += 1;
        }
    }
    for object in [
        "Deployment/ferry-operator",
        "ServiceAccount/ferry-operator",
        "ClusterRole/ferry-operator",
        "Role/ferry-operator-self",
        "ClusterRole/ferry-operator-webhook",
        "Service/ferry-webhook",
        "Service/ferry-metrics",
        "ConfigMap/ferry-inject",
        "MutatingWebhookConfiguration/ferry-sidecar-injector",
        "StatefulSet/ferry-nats",
        "Service/ferry-nats",
        "ConfigMap/ferry-nats-config",
        "Certificate/ferry-webhook",
        "Issuer/ferry-selfsigned",
        "Role/ferry-operator",
    ] {
        assert!(seen.contains_key(object), "{object} was never rendered: {seen:?}");
    }
}

#[test]
fn optional_blocks_are_off_by_default() {
    let docs = render(&[]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(!kinds.contains(&"StatefulSet"), "no NATS by default: {kinds:?}");
    assert!(!kinds.contains(&"Certificate") && !kinds.contains(&"Issuer"), "no cert-manager by default: {kinds:?}");
}

// ---------------------------------------------------------------- the operator

/// Turns the container's args and env into the command line clap sees:
/// each env entry becomes the flag that reads that variable, with the value
/// the kubelet would give it (downward API resolved for a pod of the
/// Deployment). An env entry that is no flag's variable fails the test.
fn operator_command_line(container: &Container) -> Vec<String> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("ferry-operator has `run`");
    let mut argv = vec!["ferry-operator".to_owned()];
    argv.extend(container.args.clone().expect("the operator has args"));
    for env in container.env.iter().flatten() {
        if env.name == "RUST_LOG" {
            continue; // the log filter of tracing-subscriber, no flag
        }
        let arg = run
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(&env.name)))
            .unwrap_or_else(|| panic!("env {} is no variable of `ferry-operator run` (cli.rs)", env.name));
        let value = match (&env.value, env.value_from.as_ref().and_then(|v| v.field_ref.as_ref())) {
            (Some(value), None) => value.clone(),
            (None, Some(field)) => match field.field_path.as_str() {
                "metadata.name" => "ferry-operator-5f7c9d-x2k4q".to_owned(),
                "metadata.namespace" => NAMESPACE.to_owned(),
                other => panic!("env {} from an unexpected field {other}", env.name),
            },
            _ => panic!("env {} has no value the test can resolve", env.name),
        };
        argv.push(format!("--{}={value}", arg.get_long().expect("env flags are long flags")));
    }
    argv
}

fn operator_args(docs: &[Value]) -> RunArgs {
    let argv = operator_command_line(&operator_container(docs));
    match Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("ferry-operator refuses {argv:?}:\n{e}")).command {
        Cmd::Run(args) => *args,
        other => panic!("the Deployment runs {other:?}, not `run`"),
    }
}

fn port_named(container: &Container, name: &str) -> u16 {
    let port = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
    u16::try_from(port.unwrap_or_else(|| panic!("no container port {name}")).container_port).expect("a port")
}

fn mount_of<'a>(container: &'a Container, volume: &str) -> &'a str {
    let mount = container.volume_mounts.iter().flatten().find(|m| m.name == volume);
    &mount.unwrap_or_else(|| panic!("volume {volume} is not mounted")).mount_path
}

#[test]
fn the_operators_args_and_env_are_accepted_by_its_own_flag_parser() {
    let docs = render(&[]);
    let args = operator_args(&docs);
    let container = operator_container(&docs);
    assert_eq!(args.broker, "nats://nats.ferry-system.svc:4222");
    assert_eq!(args.broker_creds, None);
    assert_eq!(args.namespace, None, "all namespaces by default");
    assert_eq!(args.operator_namespace, NAMESPACE, "from the downward API");
    assert_eq!(args.pod_name.as_deref(), Some("ferry-operator-5f7c9d-x2k4q"), "from the downward API");
    assert!(args.leader_election);
    assert_eq!(args.lease_name, "ferry-operator");
    assert_eq!(args.metrics_addr.port(), port_named(&container, "metrics"));
    let webhook_addr = args.webhook_addr.expect("the webhook is served");
    assert_eq!(webhook_addr.port(), port_named(&container, "webhook"));
    assert!(webhook_addr.ip().is_unspecified() && args.metrics_addr.ip().is_unspecified());
    assert_eq!(args.webhook_cert_dir, None, "the operator generates the certificate by default");
    // The names the operator is told are the objects the chart renders.
    find(&docs, "Service", &args.webhook_service);
    find(&docs, "MutatingWebhookConfiguration", &args.webhook_config);
    assert_eq!(args.webhook_secret, "ferry-webhook-tls");
    assert_eq!(args.config_replicas, 1, "a config bucket of 1 replica by default");
    let inject = args.inject_config.expect("an inject config");
    assert_eq!(inject.parent().and_then(|p| p.to_str()), Some(mount_of(&container, "inject-config")));
    assert_eq!(inject.file_name(), Some(OsStr::new("inject.yaml")));

    let docs = render(ALL_OPTIONAL);
    let args = operator_args(&docs);
    let container = operator_container(&docs);
    assert_eq!(args.broker, "nats://ferry-nats.ferry-system.svc:4222", "the bundled NATS");
    find(&docs, "Service", "ferry-nats");
    let creds = args.broker_creds.expect("broker credentials");
    assert_eq!(creds.parent().and_then(|p| p.to_str()), Some(mount_of(&container, "broker-creds")));
    assert_eq!(args.broker_tls_ca, None, "the bundled NATS serves no TLS");
    let cert_dir = args.webhook_cert_dir.expect("cert-manager's certificate");
    assert_eq!(cert_dir.to_str(), Some(mount_of(&container, "webhook-tls")));
    let certificate = find(&docs, "Certificate", "ferry-webhook");
    assert_eq!(certificate["spec"]["secretName"], args.webhook_secret.as_str());
    let dns = format!("{}.{NAMESPACE}.svc", args.webhook_service);
    assert!(certificate["spec"]["dnsNames"].as_array().unwrap().contains(&json!(dns)), "{certificate:#}");

    assert_eq!(args.config_replicas, 3, "operator.configReplicas");

    // A NATS of one's own, with TLS from a private CA.
    let docs = render(&["broker.url=tls://nats.example:4222", "broker.tlsCASecret=ferry-operator-nats-ca"]);
    let (args, container) = (operator_args(&docs), operator_container(&docs));
    let ca = args.broker_tls_ca.expect("the broker's CA");
    assert_eq!(ca.parent().and_then(|p| p.to_str()), Some(mount_of(&container, "broker-ca")));
    assert_eq!(ca.file_name(), Some(OsStr::new("ca.crt")));
    let deployment = find(&docs, "Deployment", "ferry-operator");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let secret = &volumes.iter().find(|v| v["name"] == "broker-ca").expect("the CA's volume")["secret"];
    assert_eq!(
        secret,
        &json!({"secretName": "ferry-operator-nats-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]})
    );
    // A CA for the bundled NATS, which serves no TLS, is refused.
    for sets in
        [&["nats.enabled=true", "broker.tlsCASecret=ca"][..], &["nats.enabled=true", "sidecar.broker.tlsCASecret=ca"]]
    {
        let err = template(sets).expect_err("refused");
        assert!(err.contains("serves no TLS"), "{sets:?}: {err}");
    }

    let args = operator_args(&render(WATCH_ONE_NAMESPACE));
    assert_eq!(args.namespace.as_deref(), Some("shop"));
}

#[test]
fn the_operator_pod_is_locked_down_and_probed() {
    let docs = render(&[]);
    let deployment: Deployment = typed(find(&docs, "Deployment", "ferry-operator"));
    let pod = deployment.spec.template.spec.expect("a pod spec");
    let pod_security = pod.security_context.expect("a pod security context");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".to_owned()));
    let c = operator_container(&docs);
    let security = c.security_context.clone().expect("a container security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
    let resources = c.resources.clone().expect("resources");
    assert!(resources.requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
    assert!(resources.limits.is_some_and(|l| l.contains_key("memory")));
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.clone()).expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), json!("metrics"));
    }
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));
}

// ---------------------------------------------------------------- the webhook

#[test]
fn the_webhook_takes_pod_creations_over_its_service_and_spares_the_release_namespace() {
    let docs = render(&[]);
    let mwc: MutatingWebhookConfiguration =
        typed(find(&docs, "MutatingWebhookConfiguration", "ferry-sidecar-injector"));
    let hook = &mwc.webhooks.as_ref().expect("a webhook")[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hook.side_effects, "None");
    assert_eq!(hook.admission_review_versions, ["v1"]);
    assert_eq!(hook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(hook.timeout_seconds, Some(10));
    let rule = &hook.rules.as_ref().expect("rules")[0];
    assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
    let service_ref = hook.client_config.service.as_ref().expect("a service");
    assert_eq!(service_ref.path.as_deref(), Some("/mutate"));
    assert_eq!(service_ref.namespace, NAMESPACE);
    assert!(mwc.metadata.annotations.is_none(), "no cert-manager annotation by default");
    let service: Service = typed(find(&docs, "Service", &service_ref.name));
    let port = &service.spec.expect("a spec").ports.expect("ports")[0];
    assert_eq!(Some(port.port), service_ref.port);
    assert_eq!(serde_json::to_value(&port.target_port).unwrap(), json!("webhook"));
    let selector = serde_json::to_value(&hook.namespace_selector).unwrap();
    assert_eq!(selector["matchLabels"], json!({"ferry.dev/injection": "enabled"}));
    assert!(
        selector["matchExpressions"].as_array().unwrap().contains(&json!({
            "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]
        })),
        "{selector:#}"
    );

    let docs = render(&[
        "webhook.certManager.enabled=true",
        "webhook.failurePolicy=Ignore",
        "webhook.namespaceSelector.matchLabels=null",
    ]);
    let mwc: MutatingWebhookConfiguration =
        typed(find(&docs, "MutatingWebhookConfiguration", "ferry-sidecar-injector"));
    let annotations = mwc.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("cert-manager.io/inject-ca-from").map(String::as_str),
        Some("ferry-system/ferry-webhook")
    );
    let hook = &mwc.webhooks.as_ref().expect("a webhook")[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
    let selector = serde_json::to_value(&hook.namespace_selector).unwrap();
    assert!(selector.get("matchLabels").is_none(), "every namespace: {selector:#}");
    assert_eq!(selector["matchExpressions"].as_array().map(Vec::len), Some(1), "{selector:#}");
}

fn inject_yaml(docs: &[Value]) -> String {
    let cm: ConfigMap = typed(find(docs, "ConfigMap", "ferry-inject"));
    cm.data.and_then(|mut d| d.remove("inject.yaml")).expect("inject.yaml in the ConfigMap")
}

#[test]
fn the_chart_default_sidecar_config_is_the_webhooks_default() {
    let cfg = InjectConfig::from_yaml(&inject_yaml(&render(&[]))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg, InjectConfig::default());
}

#[test]
fn every_sidecar_value_reaches_the_webhooks_inject_config() {
    let cfg = InjectConfig::from_yaml(&inject_yaml(&render(ALL_OPTIONAL))).unwrap_or_else(|e| panic!("{e}"));
    let cfg = serde_json::to_value(cfg).expect("InjectConfig serializes");
    assert_eq!(
        cfg["broker"],
        json!({"url": "nats://nats-leaf.ferry-system.svc:4222", "credentialsSecret": "ferry-nats", "tlsCASecret": "ferry-nats-ca"})
    );
    assert_eq!(cfg["dataVolume"], json!({"type": "ephemeral", "sizeLimit": "2Gi", "storageClassName": "fast"}));
    assert_eq!((cfg["fsync"].as_str(), cfg["logFormat"].as_str()), (Some("interval"), Some("text")));
    assert_eq!(cfg["dedupeMaxIds"], json!(2_000_000));
    assert_eq!(cfg["dedupeWindow"], json!("1.5h 30mins"));
    assert_eq!(cfg["outboxRetention"], json!("15m"));
    assert_eq!(cfg["maxMessageBytes"], json!(8_388_608));

    // Without sidecar.broker.url the sidecars use the operator's broker.
    let cfg = InjectConfig::from_yaml(&inject_yaml(&render(&["nats.enabled=true"]))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.broker.url, "nats://ferry-nats.ferry-system.svc:4222");
    let cfg = InjectConfig::from_yaml(&inject_yaml(&render(&["broker.url=nats://a:4222\\,nats://b:4222"])))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.broker.url, "nats://a:4222,nats://b:4222");
}

#[test]
fn a_changed_sidecar_value_rolls_the_operator_pods() {
    let checksum = |sets: &[&str]| {
        let deployment = render(sets).into_iter().find(|d| d["kind"] == "Deployment").expect("the Deployment");
        deployment["spec"]["template"]["metadata"]["annotations"]["checksum/inject-config"].clone()
    };
    assert_ne!(checksum(&[]), checksum(&["sidecar.fsync=never"]));
}

// ---------------------------------------------------------------- NATS

#[test]
fn the_bundled_nats_config_is_valid_for_nats_server_and_syncs_every_write() {
    for replicas in ["1", "3"] {
        let docs = render(&["nats.enabled=true", &format!("nats.replicas={replicas}")]);
        let cm: ConfigMap = typed(find(&docs, "ConfigMap", "ferry-nats-config"));
        let conf = cm.data.and_then(|mut d| d.remove("nats.conf")).expect("nats.conf");
        assert!(conf.contains("sync_interval: always"), "{conf}");
        assert!(conf.contains("store_dir: /data/jetstream"), "{conf}");
        assert_eq!(conf.contains("routes"), replicas == "3", "{conf}");
        let path = std::env::temp_dir().join(format!("ferry-chart-{}-nats-{replicas}.conf", std::process::id()));
        std::fs::write(&path, &conf).expect("writing nats.conf");
        let out = std::process::Command::new(ferry_e2e::nats_server_binary())
            .args([OsStr::new("-t"), OsStr::new("-c"), path.as_os_str()])
            .env("SERVER_NAME", "ferry-nats-0")
            .output()
            .expect("nats-server runs (scripts/test installs it)");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "nats-server -t refuses the chart's config:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let sts: StatefulSet = typed(find(&docs, "StatefulSet", "ferry-nats"));
        let spec = sts.spec;
        assert_eq!(spec.replicas.map(|r| r.to_string()), Some(replicas.to_owned()));
        let pod = spec.template.spec.expect("a pod spec");
        let nats = &pod.containers[0];
        assert_eq!(mount_of(nats, "data"), "/data");
        assert_eq!(nats.security_context.as_ref().and_then(|s| s.read_only_root_filesystem), Some(true));
        assert_eq!(pod.security_context.and_then(|s| s.run_as_non_root), Some(true));
    }
}

// ---------------------------------------------------------------- RBAC

fn req(method: Method, uri: &str) -> Request {
    rbac::request_of(&method, &uri.parse::<Uri>().expect("a URI"))
}

fn resource(group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>, verb: &'static str) -> Request {
    Request::Resource {
        group: group.to_owned(),
        resource: resource.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        verb,
    }
}

#[test]
fn rbac_maps_uris_to_group_resource_name_and_verb() {
    assert_eq!(
        req(Method::GET, "/api/v1/namespaces/ferry-system/secrets/ferry-webhook-tls"),
        resource("", "secrets", Some("ferry-system"), Some("ferry-webhook-tls"), "get")
    );
    assert_eq!(
        req(Method::POST, "/api/v1/namespaces/ferry-system/secrets?fieldManager=x"),
        resource("", "secrets", Some("ferry-system"), None, "create")
    );
    assert_eq!(
        req(Method::PATCH, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders/status?fieldManager=ferry"),
        resource("ferry.dev", "topics/status", Some("shop"), Some("orders"), "patch")
    );
    assert_eq!(
        req(Method::PUT, "/apis/ferry.dev/v1alpha1/namespaces/shop/subscriptions/invoices/finalizers"),
        resource("ferry.dev", "subscriptions/finalizers", Some("shop"), Some("invoices"), "update")
    );
    assert_eq!(
        req(Method::GET, "/apis/ferry.dev/v1alpha1/topics?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true"),
        resource("ferry.dev", "topics", None, None, "watch")
    );
    assert_eq!(
        req(Method::GET, "/apis/ferry.dev/v1alpha1/topics?limit=500"),
        resource("ferry.dev", "topics", None, None, "list")
    );
    assert_eq!(
        req(Method::GET, "/apis/ferry.dev/v1alpha1/watch/namespaces/shop/topics"),
        resource("ferry.dev", "topics", Some("shop"), None, "watch")
    );
    assert_eq!(
        req(
            Method::PATCH,
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/ferry-sidecar-injector"
        ),
        resource(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("ferry-sidecar-injector"),
            "patch"
        )
    );
    assert_eq!(req(Method::GET, "/api/v1/namespaces/shop"), resource("", "namespaces", None, Some("shop"), "get"));
    assert_eq!(
        req(Method::DELETE, "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases"),
        resource("coordination.k8s.io", "leases", Some("ferry-system"), None, "deletecollection")
    );
    assert_eq!(
        req(
            Method::GET,
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?&watch=true&fieldSelector=metadata.name%3Dferry-sidecar-injector"
        ),
        resource("admissionregistration.k8s.io", "mutatingwebhookconfigurations", None, Some("ferry-sidecar-injector"), "watch")
    );
    assert_eq!(
        req(Method::GET, "/api/v1/namespaces/shop/secrets?fieldSelector=metadata.name%3Da%2Cmetadata.namespace%3Dshop"),
        resource("", "secrets", Some("shop"), None, "list")
    );
    assert_eq!(
        req(Method::GET, "/version"),
        Request::NonResource { path: "/version".to_owned(), verb: "get".to_owned() }
    );
}

fn allows(rbac: &Rbac, method: Method, uri: &str) -> bool {
    rbac.allows(&req(method, uri))
}

const TOPICS_ALL: &str = "/apis/ferry.dev/v1alpha1/topics?watch=true";
const SUBS_SHOP: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/subscriptions?watch=true";
const TOPIC_STATUS: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders/status";
const EVENTS_SHOP: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases/ferry-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases";
const SECRET: &str = "/api/v1/namespaces/ferry-system/secrets/ferry-webhook-tls";
const SECRETS: &str = "/api/v1/namespaces/ferry-system/secrets";
const MWC: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/ferry-sidecar-injector";
const MWC_WATCH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?watch=true&fieldSelector=metadata.name%3Dferry-sidecar-injector";

#[test]
fn rbac_allows_the_operators_calls_and_nothing_more() {
    let rbac = Rbac::of_chart(&render(&[]));
    let allowed = [
        (Method::GET, TOPICS_ALL),
        (Method::GET, "/apis/ferry.dev/v1alpha1/subscriptions?limit=500"),
        (Method::GET, SUBS_SHOP),
        (Method::GET, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders"),
        (Method::PATCH, "/apis/ferry.dev/v1alpha1/namespaces/shop/subscriptions/invoices"),
        (Method::PATCH, TOPIC_STATUS),
        (Method::POST, EVENTS_SHOP),
        (Method::PATCH, "/apis/events.k8s.io/v1/namespaces/shop/events/orders.17a"),
        (Method::GET, LEASE),
        (Method::PATCH, LEASE),
        (Method::POST, LEASES),
        (Method::GET, SECRET),
        (Method::PUT, SECRET),
        (Method::POST, SECRETS),
        (Method::PATCH, MWC),
        (Method::GET, MWC_WATCH),
        (Method::GET, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?fieldSelector=metadata.name%3Dferry-sidecar-injector"),
    ];
    for (method, uri) in allowed {
        assert!(allows(&rbac, method.clone(), uri), "{method} {uri} should be allowed");
    }
    let refused = [
        // The webhook is sent pods; the operator never reads them.
        (Method::GET, "/api/v1/namespaces/shop/pods/orders-0"),
        (Method::GET, "/api/v1/pods?watch=true"),
        (Method::DELETE, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders"),
        (Method::POST, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics"),
        (Method::PUT, TOPIC_STATUS),
        // Verbs the code does not use (finalizers and status go by patch).
        (Method::PUT, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders"),
        (Method::PUT, "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders/finalizers"),
        (Method::GET, TOPIC_STATUS),
        (Method::PUT, LEASE),
        (Method::GET, MWC),
        (Method::GET, "/api/v1/namespaces/ferry-system/secrets/other"),
        (Method::GET, SECRETS),
        (Method::DELETE, SECRET),
        (Method::PATCH, SECRET),
        (Method::GET, "/api/v1/namespaces/shop/secrets/ferry-webhook-tls"),
        (Method::POST, "/api/v1/namespaces/shop/secrets"),
        (Method::GET, "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases/other"),
        (Method::POST, "/apis/coordination.k8s.io/v1/namespaces/shop/leases"),
        (Method::DELETE, LEASE),
        (Method::PATCH, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/other"),
        (Method::GET, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"),
        (Method::GET, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?watch=true&fieldSelector=metadata.name%3Dother"),
        (Method::GET, "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/ferry-sidecar-injector"),
        (Method::POST, "/api/v1/namespaces/shop/events"),
        (Method::GET, "/version"),
    ];
    for (method, uri) in refused {
        assert!(!allows(&rbac, method.clone(), uri), "{method} {uri} should be refused");
    }
}

#[test]
fn rbac_follows_cert_manager_and_a_watched_namespace() {
    // cert-manager's certificate: no Secret, no webhook configuration.
    let rbac = Rbac::of_chart(&render(&["webhook.certManager.enabled=true"]));
    for (method, uri) in
        [(Method::GET, SECRET), (Method::POST, SECRETS), (Method::PATCH, MWC), (Method::GET, MWC_WATCH)]
    {
        assert!(!allows(&rbac, method.clone(), uri), "{method} {uri} with cert-manager");
    }
    assert!(allows(&rbac, Method::PATCH, LEASE) && allows(&rbac, Method::GET, TOPICS_ALL));

    // One watched namespace: its resources and events there, nothing else.
    let rbac = Rbac::of_chart(&render(WATCH_ONE_NAMESPACE));
    for (method, uri) in [(Method::GET, SUBS_SHOP), (Method::PATCH, TOPIC_STATUS), (Method::POST, EVENTS_SHOP)] {
        assert!(allows(&rbac, method.clone(), uri), "{method} {uri} in the watched namespace");
    }
    for (method, uri) in [
        (Method::GET, TOPICS_ALL),
        (Method::GET, "/apis/ferry.dev/v1alpha1/namespaces/billing/topics?watch=true"),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/billing/events"),
    ] {
        assert!(!allows(&rbac, method.clone(), uri), "{method} {uri} outside the watched namespace");
    }
    assert!(allows(&rbac, Method::PATCH, LEASE) && allows(&rbac, Method::PATCH, MWC));
}

// ---------------------------------------------------------------- schema, CRDs

#[test]
fn the_values_schema_refuses_bad_values() {
    for (set, field) in [
        ("replicas=abc", "replicas"),
        ("replicas=0", "replicas"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("webhook.timeoutSeconds=60", "timeoutSeconds"),
        ("sidecar.fsync=sometimes", "fsync"),
        ("sidecar.logFormat=xml", "logFormat"),
        ("sidecar.dedupeMaxIds=0", "dedupeMaxIds"),
        ("sidecar.dedupeWindow=soon", "dedupeWindow"),
        ("sidecar.dedupeWindow=10 parsecs", "dedupeWindow"),
        ("sidecar.outboxRetention=soon", "outboxRetention"),
        ("sidecar.dataVolume.type=hostPath", "type"),
        ("sidecar.dataVolume.sizeLimit=lots", "sizeLimit"),
        ("sidecar.apiPort=70000", "apiPort"),
        ("broker.url=http://nats:4222", "url"),
        ("nats.replicas=2", "replicas"),
        ("nats.jetstream.syncInterval=sometimes", "syncInterval"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.logLevl=debug", "logLevl"),
        ("operator.configReplicas=0", "configReplicas"),
        ("sidecar.maxMessageBytes=0", "maxMessageBytes"),
        ("sidecar.maxMessageBytes=67108865", "maxMessageBytes"),
        ("operator.configReplicas=7", "configReplicas"),
    ] {
        let err = template(&[set]).expect_err(set);
        assert!(err.contains("schema") && err.contains(field), "--set {set}: {err}");
    }
    // And the good ones it is given in the tests pass.
    template(&["nats.jetstream.syncInterval=1m30s", "broker.url=tls://a:4222\\,tls://b:4222"])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_chart_crds_are_the_root_crds() {
    let list = |dir: &std::path::Path| {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let root = rbac::repo().join("crds");
    let chart = rbac::chart_dir().join("crds");
    assert_eq!(list(&chart), list(&root), "charts/ferry/crds/ and crds/ hold different files");
    for name in list(&root) {
        let (a, b) = (std::fs::read(root.join(&name)).unwrap(), std::fs::read(chart.join(&name)).unwrap());
        assert!(a == b, "charts/ferry/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/ferry/crds/");
    }
}
