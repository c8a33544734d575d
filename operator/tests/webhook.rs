//! The sidecar-injection webhook: real AdmissionReview JSON in, the
//! JSONPatch out applied to the pod and checked; the same over real TLS
//! with a client that trusts only the generated CA; and the certificate
//! bootstrap's Kubernetes calls against the recorded-request harness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferry_operator::webhook::config::{DataVolumeKind, Fsync, LogFormat, PullPolicy};
use ferry_operator::webhook::inject::{
    ANNOTATION_API_TOKEN_SECRET, ANNOTATION_APP_ID, ANNOTATION_APP_PORT, ANNOTATION_APP_TOKEN_SECRET,
    ANNOTATION_CONFIG, ANNOTATION_INJECT,
};
use ferry_operator::webhook::tls::dns_names;
use ferry_operator::webhook::{
    answer, ensure_certificate, keep_ca_bundle, CertArgs, InjectConfig, TlsMaterial, Webhook,
};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

mod common;
use common::{expect, expect_no_more, expect_status, mock_client, Handle};

// ---------------------------------------------------------------------------
// An AdmissionReview as the API server sends it for a Deployment's pod.

const UID: &str = "b7f2c6a4-3f1e-4d8a-9a51-0c2e7d9f4e11";

/// The body the API server POSTs for the ReplicaSet controller creating a
/// pod of the `orders` Deployment in `shop`, with these annotations.
fn review_with(annotations: Value) -> Value {
    let mut review = json!({
      "kind": "AdmissionReview",
      "apiVersion": "admission.k8s.io/v1",
      "request": {
        "uid": UID,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {
          "username": "system:serviceaccount:kube-system:replicaset-controller",
          "uid": "5e8a1f0e-0b5c-4c1e-8d43-2f0c9b1e7a20",
          "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
        },
        "object": {
          "kind": "Pod",
          "apiVersion": "v1",
          "metadata": {
            "generateName": "orders-7d4b9c8f6-",
            "namespace": "shop",
            "creationTimestamp": null,
            "labels": {"app": "orders", "pod-template-hash": "7d4b9c8f6"},
            "annotations": {},
            "ownerReferences": [{
              "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7d4b9c8f6",
              "uid": "0d7c3b52-7a7e-4d0b-a1e4-6f3d2c1b0a99", "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [{
              "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
              "time": "2025-05-14T09:12:31Z", "fieldsType": "FieldsV1",
              "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}}}
            }]
          },
          "spec": {
            "volumes": [{
              "name": "kube-api-access-x7k2p",
              "projected": {
                "sources": [
                  {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                  {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                  {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ],
                "defaultMode": 420
              }
            }],
            "containers": [
              {
                "name": "orders",
                "image": "registry.example.com/shop/orders:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
              },
              {
                "name": "metrics-exporter",
                "image": "registry.example.com/shop/exporter:0.3.0",
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
              }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
              {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
              {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "aFieldFromANewerKubernetes": {"kept": true}
          },
          "status": {}
        },
        "oldObject": null,
        "dryRun": false,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
      }
    });
    review["request"]["object"]["metadata"]["annotations"] = annotations;
    review
}

/// The annotations of a pod asking for the sidecar.
fn asking() -> Value {
    json!({ANNOTATION_INJECT: "true", ANNOTATION_APP_ID: "orders", ANNOTATION_APP_PORT: "8080"})
}

fn with(mut annotations: Value, key: &str, value: &str) -> Value {
    annotations[key] = Value::String(value.to_owned());
    annotations
}

/// The `response` of the webhook's answer to `review` (asserting a 200).
fn respond(review: &Value, cfg: &InjectConfig) -> Value {
    let (status, answer) = answer(&serde_json::to_vec(review).unwrap(), cfg);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (answer["apiVersion"].as_str(), answer["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    answer["response"].clone()
}

/// The response's JSONPatch: base64 on the wire, as the API documents.
fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let b64 = response["patch"].as_str().unwrap_or_else(|| panic!("patch is not a base64 string: {response}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The pod of `review` with the response's patch applied (unchanged when
/// there is no patch).
fn patched(review: &Value, response: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if response.get("patch").is_some() {
        json_patch::patch(&mut pod, &patch_of(response)).unwrap();
    }
    pod
}

fn typed(pod: &Value) -> Pod {
    serde_json::from_value(pod.clone()).unwrap()
}

/// The review of the same pod, now as `pod`.
fn review_of(review: &Value, pod: Value) -> Value {
    let mut review = review.clone();
    review["request"]["object"] = pod;
    review
}

fn sidecar(pod: &Pod) -> &Container {
    let init = pod.spec.as_ref().unwrap().init_containers.as_deref().unwrap_or_default();
    let found: Vec<&Container> = init.iter().filter(|c| c.name == "ferry-sidecar").collect();
    assert_eq!(found.len(), 1, "the sidecar exactly once: {init:?}");
    found[0]
}

/// Each variable's value; one from the pod's fields as
/// `fieldRef:<path>`, one from a Secret as `secretKeyRef:<name>/<key>`
/// (`?` after it when the Secret is optional).
fn env_map(env: &[EnvVar]) -> BTreeMap<&str, String> {
    env.iter()
        .map(|e| {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => match (&from.field_ref, &from.secret_key_ref) {
                    (Some(field), None) => format!("fieldRef:{}", field.field_path),
                    (None, Some(secret)) => format!(
                        "secretKeyRef:{}/{}{}",
                        secret.name,
                        secret.key,
                        if secret.optional == Some(true) { "?" } else { "" }
                    ),
                    _ => panic!("an env source this test does not know: {from:?}"),
                },
                _ => String::new(),
            };
            (e.name.as_str(), v)
        })
        .collect()
}

fn refusal(annotations: Value) -> String {
    let review = review_with(annotations);
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["uid"], UID);
    assert_eq!(response["allowed"], false, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    assert_eq!(response["status"]["code"], 400, "{response}");
    response["status"]["message"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------
// The mutation.

#[test]
fn an_annotated_pod_gets_the_native_sidecar_its_volume_its_env_and_ferry_url_in_every_app_container() {
    let review = review_with(asking());
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["uid"], UID, "the uid is echoed");
    assert_eq!(response["allowed"], true);
    let patch = patch_of(&response);
    for op in &patch.0 {
        let op = serde_json::to_value(op).unwrap();
        assert_eq!(op["op"], "add", "only adds: {op}");
        let path = op["path"].as_str().unwrap();
        assert!(
            ["/spec/initContainers", "/spec/volumes/", "/spec/containers/0/env/", "/spec/containers/1/env"]
                .iter()
                .any(|p| path.starts_with(p)),
            "touches only what it must: {path}"
        );
    }
    let raw = patched(&review, &response);
    assert_eq!(raw["spec"]["aFieldFromANewerKubernetes"], json!({"kept": true}));
    let pod = typed(&raw);
    let spec = pod.spec.as_ref().unwrap();

    let sc = sidecar(&pod);
    assert_eq!(spec.init_containers.as_ref().unwrap()[0].name, "ferry-sidecar");
    assert_eq!(sc.restart_policy.as_deref(), Some("Always"), "a native sidecar");
    assert_eq!(sc.image.as_deref(), Some("ghcr.io/ferry-dev/ferry-sidecar:0.1.0"));
    assert_eq!(sc.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let startup = sc.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!((startup.path.as_deref(), &startup.port), (Some("/readyz"), &IntOrString::Int(7601)));
    let liveness = sc.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!((liveness.path.as_deref(), &liveness.port), (Some("/healthz"), &IntOrString::Int(7601)));
    assert_eq!(sc.resources.as_ref(), Some(&InjectConfig::default().resources));

    let security = sc.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let volumes = spec.volumes.as_ref().unwrap();
    assert_eq!(volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["kube-api-access-x7k2p", "ferry-data"]);
    let data = volumes.iter().find(|v| v.name == "ferry-data").unwrap();
    assert_eq!(data.empty_dir.as_ref().unwrap().size_limit.as_ref().unwrap().0, "1Gi");
    let mounts = sc.volume_mounts.as_ref().unwrap();
    assert_eq!(mounts.len(), 1, "no credentials configured: {mounts:?}");
    assert_eq!((mounts[0].name.as_str(), mounts[0].mount_path.as_str()), ("ferry-data", "/var/lib/ferry"));

    let env = env_map(sc.env.as_ref().unwrap());
    let expected: BTreeMap<&str, String> = [
        ("FERRY_APP_ID", "orders"),
        ("FERRY_APP_PORT", "8080"),
        ("FERRY_NAMESPACE", "fieldRef:metadata.namespace"),
        ("FERRY_POD_NAME", "fieldRef:metadata.name"),
        ("FERRY_BROKER", "nats://nats.ferry-system.svc:4222"),
        ("FERRY_DATA_DIR", "/var/lib/ferry"),
        ("FERRY_API_ADDR", "127.0.0.1:7600"),
        ("FERRY_ADMIN_ADDR", "[::]:7601"),
        ("FERRY_FSYNC", "always"),
        ("FERRY_LOG_FORMAT", "json"),
        // Three quarters of the 1Gi volume: the outbox is full before the
        // emptyDir is (past its sizeLimit the kubelet evicts the pod).
        ("FERRY_OUTBOX_MAX_BYTES", "805306368"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    assert_eq!(env, expected);

    for c in &spec.containers {
        let env = c.env.as_deref().unwrap();
        let urls: Vec<_> = env.iter().filter(|e| e.name == "FERRY_URL").collect();
        assert_eq!(urls.len(), 1, "{}: {env:?}", c.name);
        assert_eq!(urls[0].value.as_deref(), Some("http://127.0.0.1:7600"));
    }
    assert_eq!(env_map(spec.containers[0].env.as_deref().unwrap())["LOG_LEVEL"], "info", "the app's own env is kept");
    assert!(spec.security_context.as_ref().unwrap().fs_group.is_none(), "an emptyDir needs no fsGroup");
}

#[test]
fn a_pod_reviewed_again_after_the_patch_is_admitted_unchanged() {
    let review = review_with(asking());
    let cfg = InjectConfig::default();
    let once = patched(&review, &respond(&review, &cfg));
    let again = respond(&review_of(&review, once.clone()), &cfg);
    assert_eq!(again["allowed"], true);
    assert!(again.get("patch").is_none() && again.get("patchType").is_none(), "{again}");
    assert_eq!(patched(&review_of(&review, once.clone()), &again), once);
}

#[test]
fn a_pod_without_the_annotation_or_with_inject_false_is_admitted_unchanged() {
    let cfg = InjectConfig::default();
    let bad_but_not_asked =
        json!({ANNOTATION_INJECT: "false", ANNOTATION_APP_ID: "Not A Label", ANNOTATION_APP_PORT: "x"});
    for annotations in [json!({}), json!(null), json!({"team": "shop"}), bad_but_not_asked] {
        let review = review_with(annotations.clone());
        let response = respond(&review, &cfg);
        assert_eq!((response["uid"].as_str(), &response["allowed"]), (Some(UID), &json!(true)), "{annotations}");
        assert!(response.get("patch").is_none(), "{annotations}: {response}");
    }
}

#[test]
fn a_pod_that_already_has_a_ferry_sidecar_container_is_admitted_unchanged() {
    let mut review = review_with(asking());
    review["request"]["object"]["spec"]["containers"][1]["name"] = json!("ferry-sidecar");
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn each_bad_annotation_is_refused_with_a_message_naming_it_and_the_problem() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (with(asking(), ANNOTATION_INJECT, "yes"), "ferry.dev/inject", "neither \"true\" nor \"false\""),
        (with(asking(), ANNOTATION_INJECT, "True"), "ferry.dev/inject", "neither"),
        (json!({ANNOTATION_INJECT: "true", ANNOTATION_APP_PORT: "8080"}), "ferry.dev/app-id", "is required"),
        (with(asking(), ANNOTATION_APP_ID, ""), "ferry.dev/app-id", "is required"),
        (with(asking(), ANNOTATION_APP_ID, "Orders_1"), "ferry.dev/app-id: \"Orders_1\"", "DNS-1123 label"),
        (with(asking(), ANNOTATION_APP_ID, "-orders"), "ferry.dev/app-id", "DNS-1123 label"),
        (with(asking(), ANNOTATION_APP_ID, &"a".repeat(64)), "ferry.dev/app-id", "DNS-1123 label"),
        (with(asking(), ANNOTATION_APP_PORT, ""), "ferry.dev/app-port", "is empty"),
        (with(asking(), ANNOTATION_APP_PORT, "http"), "ferry.dev/app-port: \"http\"", "not a port number"),
        (with(asking(), ANNOTATION_APP_PORT, "0"), "ferry.dev/app-port: \"0\"", "not a port number"),
        (with(asking(), ANNOTATION_APP_PORT, "65536"), "ferry.dev/app-port: \"65536\"", "not a port number"),
        (with(asking(), ANNOTATION_APP_PORT, "-1"), "ferry.dev/app-port", "not a port number"),
        (with(asking(), ANNOTATION_APP_PORT, "7600"), "ferry.dev/app-port: 7600", "the Ferry sidecar's API port"),
        (with(asking(), ANNOTATION_CONFIG, "{fsync: never"), "ferry.dev/config", "not valid JSON"),
        (with(asking(), ANNOTATION_CONFIG, "[]"), "ferry.dev/config", "must be a JSON object"),
        (with(asking(), ANNOTATION_CONFIG, r#"{"fsync":"sometimes"}"#), "ferry.dev/config", "fsync: unknown variant"),
        (with(asking(), ANNOTATION_CONFIG, r#"{"apiPort":"x"}"#), "ferry.dev/config", "apiPort"),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"dataVolume":{"type":"hostPath"}}"#),
            "ferry.dev/config",
            "dataVolume.type",
        ),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"dataVolume":{"size":"2Gi"}}"#),
            "ferry.dev/config",
            "unknown field `size`",
        ),
        (with(asking(), ANNOTATION_CONFIG, r#"{"apiPort":7601}"#), "ferry.dev/config", "apiPort and adminPort"),
        (with(asking(), ANNOTATION_CONFIG, r#"{"dedupeMaxIds":0}"#), "ferry.dev/config", "dedupeMaxIds: must be"),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"maxMessageBytes":0}"#),
            "ferry.dev/config",
            "maxMessageBytes: 0 must be",
        ),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"maxMessageBytes":67108865}"#),
            "ferry.dev/config",
            "maxMessageBytes: 67108865 must be 1 to 67108864",
        ),
        (with(asking(), ANNOTATION_CONFIG, r#"{"maxMessageBytes":-1}"#), "ferry.dev/config", "maxMessageBytes"),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"dedupeWindow":"a while"}"#),
            "ferry.dev/config",
            "dedupeWindow: \"a while\" is not a duration",
        ),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"dedupeWindow":"10000000000y"}"#),
            "ferry.dev/config",
            "longer than 366 days",
        ),
        (
            with(asking(), ANNOTATION_CONFIG, r#"{"outboxRetention":"a while"}"#),
            "ferry.dev/config",
            "outboxRetention: \"a while\" is not a duration",
        ),
    ];
    for (annotations, names, problem) in cases {
        let message = refusal(annotations.clone());
        assert!(message.contains(names) && message.contains(problem), "{annotations}: {message:?}");
    }
}

#[test]
fn an_unknown_or_cluster_owned_override_key_is_refused() {
    for (key, json) in [("colour", r#"{"colour":"blue"}"#), ("broker", r#"{"broker":{"url":"nats://evil:4222"}}"#)] {
        let message = refusal(with(asking(), ANNOTATION_CONFIG, json));
        assert!(message.contains("ferry.dev/config") && message.contains(&format!("`{key}`")), "{message}");
        assert!(message.contains("non-overridable"), "{message}");
    }
}

#[test]
fn every_problem_of_a_pod_is_reported_at_once() {
    let message = refusal(json!({
        ANNOTATION_INJECT: "true", ANNOTATION_APP_ID: "Bad", ANNOTATION_APP_PORT: "http",
        ANNOTATION_API_TOKEN_SECRET: "", ANNOTATION_APP_TOKEN_SECRET: "App_Token",
    }));
    for name in ["ferry.dev/app-id", "ferry.dev/app-port", "ferry.dev/api-token-secret", "ferry.dev/app-token-secret"] {
        assert!(message.contains(name), "{name}: {message}");
    }
}

/// `ferry.dev/api-token-secret` and `ferry.dev/app-token-secret` name
/// Secrets whose key `token` becomes `FERRY_API_TOKEN` (the bearer token
/// the app must send) and `FERRY_APP_TOKEN` (the one the sidecar sends on
/// pushes). Not optional: without the Secret the pod does not start, rather
/// than run without auth.
#[test]
fn token_secret_annotations_become_the_sidecars_token_env_from_those_secrets() {
    let annotations = with(
        with(asking(), ANNOTATION_API_TOKEN_SECRET, "orders-api-token"),
        ANNOTATION_APP_TOKEN_SECRET,
        "orders.app-token.v2",
    );
    let review = review_with(annotations);
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["allowed"], true, "{response}");
    let pod = typed(&patched(&review, &response));
    let env = env_map(sidecar(&pod).env.as_ref().unwrap());
    assert_eq!(env["FERRY_API_TOKEN"], "secretKeyRef:orders-api-token/token");
    assert_eq!(env["FERRY_APP_TOKEN"], "secretKeyRef:orders.app-token.v2/token");
    for c in &pod.spec.as_ref().unwrap().containers {
        let names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(!names.iter().any(|n| n.ends_with("_TOKEN")), "only the sidecar gets them: {}: {names:?}", c.name);
    }

    // Each on its own.
    let review = review_with(with(asking(), ANNOTATION_APP_TOKEN_SECRET, "orders-app-token"));
    let pod = typed(&patched(&review, &respond(&review, &InjectConfig::default())));
    let env = env_map(sidecar(&pod).env.as_ref().unwrap());
    assert_eq!(env["FERRY_APP_TOKEN"], "secretKeyRef:orders-app-token/token");
    assert!(!env.contains_key("FERRY_API_TOKEN"), "{env:?}");
}

#[test]
fn a_token_secret_annotation_that_is_not_a_secret_name_is_refused() {
    let long = format!("{}.{}", "a".repeat(126), "b".repeat(127)); // 254
    for key in [ANNOTATION_API_TOKEN_SECRET, ANNOTATION_APP_TOKEN_SECRET] {
        for bad in
            ["Orders-Token", "orders_token", "-orders", "orders.", "orders..token", "orders token", long.as_str()]
        {
            let message = refusal(with(asking(), key, bad));
            assert!(
                message.contains(&format!("annotation {key}: {bad:?} is not a Secret name"))
                    && message.contains("DNS-1123 subdomain"),
                "{bad:?}: {message}"
            );
        }
        for empty in ["", "  "] {
            let message = refusal(with(asking(), key, empty));
            assert!(message.contains(&format!("annotation {key} is empty")), "{empty:?}: {message}");
        }
        // The longest name Kubernetes takes is taken.
        let longest = &long[1..];
        let review = review_with(with(asking(), key, longest));
        assert_eq!(respond(&review, &InjectConfig::default())["allowed"], true, "{} characters", longest.len());
    }
}

/// An app that only produces, or only pulls, has no port for pushes: the
/// sidecar gets no `FERRY_APP_PORT`, and is otherwise the same (its probes
/// are on its own admin port, not the app's).
#[test]
fn a_pod_without_an_app_port_is_injected_without_ferry_app_port() {
    let mut annotations = asking();
    annotations.as_object_mut().unwrap().remove(ANNOTATION_APP_PORT);
    let review = review_with(annotations);
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["allowed"], true, "{response}");
    let pod = typed(&patched(&review, &response));
    let sc = sidecar(&pod);
    let env = env_map(sc.env.as_ref().unwrap());
    assert!(!env.contains_key("FERRY_APP_PORT"), "{env:?}");
    assert_eq!(env["FERRY_APP_ID"], "orders");

    let with_port = review_with(asking());
    let pod_with_port = typed(&patched(&with_port, &respond(&with_port, &InjectConfig::default())));
    let mut expected = sidecar(&pod_with_port).clone();
    expected.env.as_mut().unwrap().retain(|e| e.name != "FERRY_APP_PORT");
    assert_eq!(sc, &expected, "the same sidecar but for FERRY_APP_PORT");
    let startup = sc.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(startup.port, IntOrString::Int(7601));
}

#[test]
fn an_app_container_declaring_a_sidecar_port_is_refused() {
    let mut review = review_with(asking());
    review["request"]["object"]["spec"]["containers"][1]["ports"] = json!([{"containerPort": 7601, "protocol": "TCP"}]);
    let message = refusal_of(&review);
    assert!(message.contains("\"metrics-exporter\" declares port 7601") && message.contains("admin port"), "{message}");
}

#[test]
fn a_host_network_pod_is_refused() {
    let mut review = review_with(asking());
    review["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    let message = refusal_of(&review);
    assert!(message.contains("ferry.dev/inject") && message.contains("hostNetwork"), "{message}");
}

fn refusal_of(review: &Value) -> String {
    let response = respond(review, &InjectConfig::default());
    assert_eq!(response["allowed"], false, "{response}");
    response["status"]["message"].as_str().unwrap().to_owned()
}

/// A Topic's `maxMessageSize` above the sidecar's default 1 MiB needs the
/// sidecar's own limit raised: `maxMessageBytes` (chart default, or per pod)
/// becomes `FERRY_MAX_MESSAGE_BYTES`, and above the sidecar's 16 MiB batch
/// limit `FERRY_MAX_BATCH_BYTES` too (the sidecar refuses a smaller one).
#[test]
fn max_message_bytes_sets_the_sidecars_message_limit() {
    let env_of = |annotations: Value, cfg: &InjectConfig| {
        let review = review_with(annotations);
        let pod = typed(&patched(&review, &respond(&review, cfg)));
        let env = env_map(sidecar(&pod).env.as_ref().unwrap());
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<BTreeMap<String, String>>()
    };
    let env = env_of(asking(), &InjectConfig::default());
    assert!(!env.contains_key("FERRY_MAX_MESSAGE_BYTES") && !env.contains_key("FERRY_MAX_BATCH_BYTES"), "{env:?}");

    let cfg = InjectConfig { max_message_bytes: Some(4 << 20), ..InjectConfig::default() };
    let env = env_of(asking(), &cfg);
    assert_eq!(env["FERRY_MAX_MESSAGE_BYTES"], "4194304", "the chart's default");
    assert!(!env.contains_key("FERRY_MAX_BATCH_BYTES"), "within the sidecar's batch limit");

    let env = env_of(with(asking(), ANNOTATION_CONFIG, r#"{"maxMessageBytes":33554432}"#), &cfg);
    assert_eq!(env["FERRY_MAX_MESSAGE_BYTES"], "33554432", "the pod's override");
    assert_eq!(env["FERRY_MAX_BATCH_BYTES"], "33554432", "a batch holds at least one message");
}

#[test]
fn config_overrides_are_merged_over_the_defaults() {
    let overrides = r#"{"fsync":"never","logFormat":"text","apiPort":9600,"adminPort":9601,
        "image":"registry.example.com/ferry-sidecar:dev","resources":{"limits":{"memory":"256Mi"}},
        "dataVolume":{"sizeLimit":"5Gi"},"dedupeMaxIds":2000000,"dedupeWindow":"1h","outboxRetention":"15m"}"#;
    let review = review_with(with(asking(), ANNOTATION_CONFIG, overrides));
    let cfg = InjectConfig { log_format: LogFormat::Json, ..InjectConfig::default() };
    let pod = typed(&patched(&review, &respond(&review, &cfg)));
    let sc = sidecar(&pod);
    let env = env_map(sc.env.as_ref().unwrap());
    assert_eq!((env["FERRY_FSYNC"].as_str(), env["FERRY_LOG_FORMAT"].as_str()), ("never", "text"));
    assert_eq!(env["FERRY_DEDUPE_MAX_IDS"], "2000000", "raised with the memory limit");
    assert_eq!(env["FERRY_DEDUPE_WINDOW"], "1h");
    assert_eq!(env["FERRY_OUTBOX_RETENTION"], "15m");
    assert_eq!((env["FERRY_API_ADDR"].as_str(), env["FERRY_ADMIN_ADDR"].as_str()), ("127.0.0.1:9600", "[::]:9601"));
    assert_eq!(env["FERRY_BROKER"], "nats://nats.ferry-system.svc:4222", "not overridden: the default");
    assert_eq!(sc.image.as_deref(), Some("registry.example.com/ferry-sidecar:dev"));
    let startup = sc.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(startup.port, IntOrString::Int(9601));
    let resources = sc.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "256Mi");
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "50m", "merged: the default requests stay");
    let spec = pod.spec.as_ref().unwrap();
    let data = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == "ferry-data").unwrap();
    assert_eq!(data.empty_dir.as_ref().unwrap().size_limit.as_ref().unwrap().0, "5Gi");
    assert_eq!(
        env["FERRY_OUTBOX_MAX_BYTES"].parse::<u64>().unwrap(),
        (5u64 << 30) / 4 * 3,
        "follows the overridden size"
    );
    let url = env_map(spec.containers[0].env.as_deref().unwrap())["FERRY_URL"].clone();
    assert_eq!(url, "http://127.0.0.1:9600");
}

#[test]
fn broker_credentials_are_mounted_read_only_and_named_in_ferry_broker_creds() {
    let mut cfg = InjectConfig::default();
    cfg.broker.credentials_secret = "ferry-nats-creds".into();
    let review = review_with(asking());
    let pod = typed(&patched(&review, &respond(&review, &cfg)));
    let sc = sidecar(&pod);
    assert_eq!(env_map(sc.env.as_ref().unwrap())["FERRY_BROKER_CREDS"], "/etc/ferry/broker/creds");
    let mount = sc.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == "/etc/ferry/broker").unwrap();
    assert_eq!(mount.read_only, Some(true));
    let volume = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap();
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("ferry-nats-creds"));
    assert_eq!(secret.items.as_ref().unwrap()[0].key, "creds");
}

#[test]
fn the_brokers_ca_is_mounted_read_only_and_named_in_ferry_broker_tls_ca() {
    let review = review_with(asking());
    let pod = typed(&patched(&review, &respond(&review, &InjectConfig::default())));
    assert!(!env_map(sidecar(&pod).env.as_ref().unwrap()).contains_key("FERRY_BROKER_TLS_CA"), "none by default");
    let mut cfg = InjectConfig::default();
    cfg.broker.tls_ca_secret = "nats-ca".into();
    let pod = typed(&patched(&review, &respond(&review, &cfg)));
    let sc = sidecar(&pod);
    assert_eq!(env_map(sc.env.as_ref().unwrap())["FERRY_BROKER_TLS_CA"], "/etc/ferry/broker-ca/ca.crt");
    let mount = sc.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == "/etc/ferry/broker-ca").unwrap();
    assert_eq!(mount.read_only, Some(true));
    let volume = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap();
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("nats-ca"));
    assert_eq!(secret.items.as_ref().unwrap()[0].key, "ca.crt");
}

#[test]
fn an_ephemeral_data_volume_is_a_claim_per_pod_and_the_pod_gets_an_fs_group() {
    let mut cfg = InjectConfig::default();
    cfg.data_volume.kind = DataVolumeKind::Ephemeral;
    cfg.data_volume.storage_class_name = "fast-ssd".into();
    let mut without_security_context = review_with(asking());
    without_security_context["request"]["object"]["spec"].as_object_mut().unwrap().remove("securityContext");
    for review in [review_with(asking()), without_security_context] {
        let raw = patched(&review, &respond(&review, &cfg));
        assert_eq!(raw["spec"]["securityContext"], json!({"fsGroup": 65532}), "so the non-root sidecar can write");
        let pod = typed(&raw);
        let spec = pod.spec.as_ref().unwrap();
        let data = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == "ferry-data").unwrap();
        let claim = &data.ephemeral.as_ref().unwrap().volume_claim_template.as_ref().unwrap().spec;
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(claim.access_modes.as_deref(), Some(&["ReadWriteOnce".to_owned()][..]));
        assert_eq!(claim.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0, "1Gi");
    }
}

#[test]
fn a_pod_that_brings_its_own_ferry_data_volume_keeps_it() {
    let mut review = review_with(asking());
    review["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "ferry-data", "persistentVolumeClaim": {"claimName": "ferry-data-orders-0"}}));
    review["request"]["object"]["spec"]["securityContext"] = json!({"fsGroup": 2000});
    let pod = typed(&patched(&review, &respond(&review, &InjectConfig::default())));
    let spec = pod.spec.as_ref().unwrap();
    let data: Vec<_> = spec.volumes.as_ref().unwrap().iter().filter(|v| v.name == "ferry-data").collect();
    assert_eq!(data.len(), 1);
    assert!(data[0].persistent_volume_claim.is_some());
    assert_eq!(spec.security_context.as_ref().unwrap().fs_group, Some(2000), "the pod's own fsGroup is kept");
    let env = env_map(sidecar(&pod).env.as_ref().unwrap());
    assert!(!env.contains_key("FERRY_OUTBOX_MAX_BYTES"), "its size is not the config's: the sidecar's default");
}

#[test]
fn the_outbox_limit_is_a_share_of_the_data_volume_and_a_bad_size_is_refused() {
    let review = review_with(asking());
    for (size, outbox) in [("1.5Gi", Some(1_207_959_552)), ("100M", Some(75_000_000)), ("", None)] {
        let mut cfg = InjectConfig::default();
        cfg.data_volume.size_limit.0 = size.into();
        let pod = typed(&patched(&review, &respond(&review, &cfg)));
        let env = env_map(sidecar(&pod).env.as_ref().unwrap());
        assert_eq!(env.get("FERRY_OUTBOX_MAX_BYTES").map(|v| v.parse::<u64>().unwrap()), outbox, "{size:?}");
    }
    for bad in ["lots", "-1Gi", "1Gb"] {
        let e = InjectConfig::from_yaml(&format!("dataVolume:\n  sizeLimit: \"{bad}\"\n")).unwrap_err();
        assert!(e.contains("dataVolume.sizeLimit") && e.contains(bad), "{bad}: {e}");
        let e = refusal(with(asking(), ANNOTATION_CONFIG, &format!(r#"{{"dataVolume":{{"sizeLimit":"{bad}"}}}}"#)));
        assert!(e.contains("dataVolume.sizeLimit"), "{bad}: {e}");
    }
}

#[test]
fn an_app_container_with_its_own_ferry_url_keeps_it_and_existing_init_containers_run_after_the_sidecar() {
    let mut review = review_with(asking());
    let spec = &mut review["request"]["object"]["spec"];
    spec["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "FERRY_URL", "value": "http://elsewhere"}));
    spec["initContainers"] =
        json!([{"name": "migrate", "image": "registry.example.com/shop/migrate:1", "resources": {}}]);
    let pod = typed(&patched(&review, &respond(&review, &InjectConfig::default())));
    let spec = pod.spec.as_ref().unwrap();
    let init: Vec<_> = spec.init_containers.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(init, ["ferry-sidecar", "migrate"]);
    let urls: Vec<_> = spec.containers[0].env.as_ref().unwrap().iter().filter(|e| e.name == "FERRY_URL").collect();
    assert_eq!(urls.len(), 1);
    assert_eq!(urls[0].value.as_deref(), Some("http://elsewhere"));
}

#[test]
fn only_a_create_is_mutated() {
    let mut review = review_with(asking());
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["oldObject"] = review["request"]["object"].clone();
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn a_body_that_is_not_an_admission_review_is_answered_400() {
    let (status, answer) = answer(br#"{"kind":"Pod"}"#, &InjectConfig::default());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["response"]["allowed"], false);
    assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("not an AdmissionReview"), "{answer}");
}

// ---------------------------------------------------------------------------
// InjectConfig, the chart's ConfigMap format.

const CHART_YAML: &str = r#"
image: ghcr.io/ferry-dev/ferry-sidecar:0.1.0   # required-ish, default that string
imagePullPolicy: Always
broker:
  url: nats://nats.messaging.svc:4222
  credentialsSecret: "nats-creds"
fsync: interval
logFormat: text
apiPort: 7700
adminPort: 7701
dataDir: /data/ferry
dataVolume:
  type: ephemeral
  sizeLimit: 2Gi
  storageClassName: "standard"
resources:
  requests: {cpu: 50m, memory: 32Mi}
  limits: {memory: 128Mi}
"#;

#[test]
fn the_inject_config_yaml_parses_field_by_field() {
    let cfg = InjectConfig::from_yaml(CHART_YAML).unwrap();
    assert_eq!(cfg.image, "ghcr.io/ferry-dev/ferry-sidecar:0.1.0");
    assert_eq!(cfg.image_pull_policy, PullPolicy::Always);
    assert_eq!(
        (cfg.broker.url.as_str(), cfg.broker.credentials_secret.as_str()),
        ("nats://nats.messaging.svc:4222", "nats-creds")
    );
    assert_eq!((cfg.fsync, cfg.log_format), (Fsync::Interval, LogFormat::Text));
    assert_eq!((cfg.api_port, cfg.admin_port, cfg.data_dir.as_str()), (7700, 7701, "/data/ferry"));
    assert_eq!(cfg.data_volume.kind, DataVolumeKind::Ephemeral);
    assert_eq!(
        (cfg.data_volume.size_limit.0.as_str(), cfg.data_volume.storage_class_name.as_str()),
        ("2Gi", "standard")
    );
    assert_eq!(cfg.resources, InjectConfig::default().resources);
}

#[test]
fn an_empty_or_partial_inject_config_takes_the_defaults() {
    assert_eq!(InjectConfig::from_yaml("").unwrap(), InjectConfig::default());
    assert_eq!(InjectConfig::from_yaml("# nothing\n").unwrap(), InjectConfig::default());
    let cfg = InjectConfig::from_yaml("broker:\n  url: nats://n:4222\ndataVolume:\n  sizeLimit: 3Gi\n").unwrap();
    assert_eq!(cfg.broker.url, "nats://n:4222");
    assert_eq!(cfg.broker.credentials_secret, "");
    assert_eq!((cfg.data_volume.kind, cfg.data_volume.size_limit.0.as_str()), (DataVolumeKind::EmptyDir, "3Gi"));
    let d = InjectConfig::default();
    assert_eq!((d.image.as_str(), d.api_port, d.admin_port), ("ghcr.io/ferry-dev/ferry-sidecar:0.1.0", 7600, 7601));
    assert_eq!(
        (d.fsync, d.log_format, d.image_pull_policy),
        (Fsync::Always, LogFormat::Json, PullPolicy::IfNotPresent)
    );
    assert_eq!((d.data_dir.as_str(), d.broker.url.as_str()), ("/var/lib/ferry", "nats://nats.ferry-system.svc:4222"));
    assert_eq!(d.resources.requests.as_ref().unwrap()["memory"].0, "32Mi");
    assert_eq!(d.resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
}

/// DESIGN.md spells the weakest fsync mode `none`; the sidecar's
/// `FERRY_FSYNC` spells it `never`.
#[test]
fn fsync_none_is_never_and_reaches_the_sidecar_as_never() {
    let cfg = InjectConfig::from_yaml("fsync: none\n").unwrap();
    assert_eq!(cfg.fsync, Fsync::Never);
    let review = review_with(asking());
    let pod = typed(&patched(&review, &respond(&review, &cfg)));
    assert_eq!(env_map(sidecar(&pod).env.as_ref().unwrap())["FERRY_FSYNC"], "never");

    let review = review_with(with(asking(), ANNOTATION_CONFIG, r#"{"fsync":"none"}"#));
    let pod = typed(&patched(&review, &respond(&review, &InjectConfig::default())));
    assert_eq!(env_map(sidecar(&pod).env.as_ref().unwrap())["FERRY_FSYNC"], "never", "as a pod's override too");
}

#[test]
fn an_unknown_inject_config_field_is_refused_with_its_path() {
    let e = InjectConfig::from_yaml("broker:\n  url: nats://n:4222\n  password: x\n").unwrap_err();
    assert!(e.contains("broker") && e.contains("unknown field `password`"), "{e}");
    let e = InjectConfig::from_yaml("imagePullPolicy: Sometimes\n").unwrap_err();
    assert!(e.contains("imagePullPolicy"), "{e}");
    let e = InjectConfig::from_yaml("dataVolume:\n  type: hostPath\n").unwrap_err();
    assert!(e.contains("dataVolume.type"), "{e}");
}

#[test]
fn inject_config_checks_ports_and_the_data_dir_and_lists_every_problem() {
    let e = InjectConfig::from_yaml("apiPort: 7601\ndataDir: var/lib/ferry\nimage: \"\"\n").unwrap_err();
    assert!(e.contains("apiPort and adminPort"), "{e}");
    assert!(e.contains("dataDir"), "{e}");
    assert!(e.contains("image"), "{e}");
    let e = InjectConfig::from_yaml("dataVolume:\n  type: ephemeral\n  sizeLimit: \"\"\n").unwrap_err();
    assert!(e.contains("dataVolume.sizeLimit"), "{e}");
}

// ---------------------------------------------------------------------------
// Over real TLS.

const SERVICE: &str = "ferry-webhook";
const NAMESPACE: &str = "ferry-system";
const SERVER_NAME: &str = "ferry-webhook.ferry-system.svc";

/// POSTs `body` to `/mutate` over TLS, trusting only `ca_pem`, asking for
/// `server_name`. `Err` carries the connection or handshake error.
async fn post(addr: SocketAddr, ca_pem: &str, server_name: &str, body: Vec<u8>) -> Result<(StatusCode, Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = http::Request::post("/mutate")
        .header("host", server_name)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).map_err(|e| e.to_string())?))
}

/// A served webhook and the sender that stops it.
struct Served {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(hook: Webhook) -> Served {
    let addr = hook.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(hook.serve(async move {
        let _ = stopped.await;
    }));
    Served { addr, stop, task }
}

impl Served {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn the_webhook_answers_over_tls_a_client_that_trusts_the_generated_ca_under_every_service_name() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let hook = Webhook::bind("127.0.0.1:0".parse().unwrap(), &tls, Arc::new(InjectConfig::default())).await.unwrap();
    let served = serve(hook).await;
    let ca = tls.ca_pem.as_deref().unwrap();
    let review = review_with(asking());
    for name in dns_names(SERVICE, NAMESPACE) {
        let (status, answer) = post(served.addr, ca, &name, serde_json::to_vec(&review).unwrap()).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{name}");
        let response = &answer["response"];
        assert_eq!((response["uid"].as_str(), &response["allowed"]), (Some(UID), &json!(true)));
        let pod = typed(&patched(&review, response));
        assert_eq!(sidecar(&pod).restart_policy.as_deref(), Some("Always"));
    }
    served.stop().await;
}

#[tokio::test]
async fn the_webhook_speaks_http2_as_the_api_server_does() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let hook = Webhook::bind("127.0.0.1:0".parse().unwrap(), &tls, Arc::new(InjectConfig::default())).await.unwrap();
    let served = serve(hook).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(tls.ca_pem.as_deref().unwrap().as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls_stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls_stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let review = review_with(asking());
    let request = http::Request::post(format!("https://{SERVER_NAME}/mutate"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&review).unwrap())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(answer["response"]["uid"], UID);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    served.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let other = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let hook = Webhook::bind("127.0.0.1:0".parse().unwrap(), &tls, Arc::new(InjectConfig::default())).await.unwrap();
    let served = serve(hook).await;
    let body = serde_json::to_vec(&review_with(asking())).unwrap();
    let e = post(served.addr, other.ca_pem.as_deref().unwrap(), SERVER_NAME, body.clone()).await.unwrap_err();
    // Both CAs have the same name, so rustls finds the wrong one and the
    // signature does not verify.
    assert!(e.contains("invalid peer certificate"), "{e}");
    let e = post(served.addr, tls.ca_pem.as_deref().unwrap(), "evil.example.com", body).await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "a name the certificate is not for: {e}");
    served.stop().await;
}

fn write_dir(dir: &std::path::Path, tls: &TlsMaterial) {
    std::fs::write(dir.join("tls.crt"), &tls.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &tls.key_pem).unwrap();
    std::fs::write(dir.join("ca.crt"), tls.ca_pem.as_deref().unwrap()).unwrap();
}

#[tokio::test]
async fn a_renewed_certificate_in_the_cert_dir_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    write_dir(dir.path(), &first);
    let tls = TlsMaterial::from_dir(dir.path()).unwrap();
    assert_eq!(tls.ca_pem, first.ca_pem);
    let hook = Webhook::bind("127.0.0.1:0".parse().unwrap(), &tls, Arc::new(InjectConfig::default())).await.unwrap();
    let served = serve(hook).await;
    let body = serde_json::to_vec(&review_with(asking())).unwrap();
    post(served.addr, first.ca_pem.as_deref().unwrap(), SERVER_NAME, body.clone()).await.unwrap();

    let renewed = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    write_dir(dir.path(), &renewed);
    post(served.addr, renewed.ca_pem.as_deref().unwrap(), SERVER_NAME, body.clone()).await.unwrap();
    assert!(post(served.addr, first.ca_pem.as_deref().unwrap(), SERVER_NAME, body.clone()).await.is_err());

    // A broken file mid-rotation: the last good certificate is kept.
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    post(served.addr, renewed.ca_pem.as_deref().unwrap(), SERVER_NAME, body).await.unwrap();
    served.stop().await;
}

#[tokio::test]
async fn a_cert_dir_without_a_matching_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let b = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &b.key_pem).unwrap();
    let e = TlsMaterial::from_dir(dir.path()).unwrap_err();
    assert_eq!(e.category(), "Tls", "{e}");
    std::fs::remove_file(dir.path().join("tls.key")).unwrap();
    let e = TlsMaterial::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tls.key"), "{e}");
}

#[tokio::test]
async fn from_args_serves_the_inject_config_file_with_the_cert_dir_certificate() {
    use clap::Parser;
    use ferry_operator::cli::{Cli, Cmd};
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    write_dir(dir.path(), &tls);
    let cfg_file = dir.path().join("inject.yaml");
    std::fs::write(&cfg_file, "image: registry.example.com/ferry-sidecar:9.9.9\nfsync: never\n").unwrap();
    let parse = |extra: &[&str]| {
        let mut argv = vec!["ferry-operator", "run", "--broker", "nats://n:4222"];
        argv.extend_from_slice(extra);
        let Cmd::Run(args) = Cli::try_parse_from(argv).unwrap().command else { panic!("not run") };
        args
    };
    let (client, mut handle) = mock_client();
    assert!(ferry_operator::webhook::from_args(client.clone(), &parse(&[])).await.unwrap().is_none());

    let args = parse(&[
        "--webhook-addr",
        "127.0.0.1:0",
        "--webhook-cert-dir",
        dir.path().to_str().unwrap(),
        "--inject-config",
        cfg_file.to_str().unwrap(),
    ]);
    let hook = ferry_operator::webhook::from_args(client, &args).await.unwrap().unwrap();
    let served = serve(hook).await;
    let review = review_with(asking());
    let body = serde_json::to_vec(&review).unwrap();
    let (_, answer) = post(served.addr, tls.ca_pem.as_deref().unwrap(), SERVER_NAME, body).await.unwrap();
    let pod = typed(&patched(&review, &answer["response"]));
    let sc = sidecar(&pod);
    assert_eq!(sc.image.as_deref(), Some("registry.example.com/ferry-sidecar:9.9.9"));
    assert_eq!(env_map(sc.env.as_ref().unwrap())["FERRY_FSYNC"], "never");
    served.stop().await;
    expect_no_more(&mut handle).await;
}

// ---------------------------------------------------------------------------
// The certificate bootstrap's Kubernetes calls.

const SECRET: &str = "/api/v1/namespaces/ferry-system/secrets/ferry-webhook-tls";
const SECRETS: &str = "/api/v1/namespaces/ferry-system/secrets";
const CONFIGS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/ferry-sidecar-injector";

fn cert_args() -> CertArgs {
    CertArgs {
        service: SERVICE.into(),
        namespace: NAMESPACE.into(),
        secret: "ferry-webhook-tls".into(),
        webhook_config: "ferry-sidecar-injector".into(),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn stored_secret(tls: &TlsMaterial) -> Value {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("ferry-webhook-tls".into()),
            namespace: Some(NAMESPACE.into()),
            resource_version: Some("812".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_owned(), b(&tls.cert_pem)),
                ("tls.key".to_owned(), b(&tls.key_pem)),
                ("ca.crt".to_owned(), b(tls.ca_pem.as_deref().unwrap())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    serde_json::to_value(secret).unwrap()
}

fn webhook_config(ca_bundle: Option<&str>) -> Value {
    let mut client_config =
        json!({"service": {"name": SERVICE, "namespace": NAMESPACE, "path": "/mutate", "port": 443}});
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "ferry-sidecar-injector", "resourceVersion": "41", "uid": "2f4c1a7e-9d1b-4b0e-8f5d-3c6a2e1b0d77"},
        "webhooks": [{
            "name": "inject.ferry.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": client_config,
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]
        }]
    })
}

fn config_list(items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfigurationList",
        "metadata": {"resourceVersion": "41"},
        "items": items
    })
}

/// The PEM in a `data` entry of a Secret as the API carries it (base64).
fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap_or_else(|| panic!("no {key} in {secret}"));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

/// The CA in every webhook of a caBundle patch.
fn patched_ca_bundles(patch: &Value) -> Vec<(String, String)> {
    patch["webhooks"]
        .as_array()
        .unwrap_or_else(|| panic!("not a webhooks patch: {patch}"))
        .iter()
        .map(|w| {
            let ca = base64::engine::general_purpose::STANDARD.decode(w["clientConfig"]["caBundle"].as_str().unwrap());
            (w["name"].as_str().unwrap().to_owned(), String::from_utf8(ca.unwrap()).unwrap())
        })
        .collect()
}

/// `keep_ca_bundle` with `ca` against the one webhook config `existing`
/// (which lacks it): it lists, patches `ca` into every webhook, then watches.
async fn assert_ca_patched_into(existing: Value, ca: String) {
    let (client, mut handle) = mock_client();
    let keeper = tokio::spawn(keep_ca_bundle(client, "ferry-sidecar-injector".into(), ca.clone()));
    expect(&mut handle, Method::GET, CONFIGS, Some(config_list(vec![existing]))).await;
    let patch = expect(&mut handle, Method::PATCH, CONFIG, Some(webhook_config(Some(&ca)))).await;
    assert_eq!(patched_ca_bundles(&patch), [("inject.ferry.dev".to_owned(), ca)]);
    expect_watch(&mut handle).await;
    keeper.abort();
}

/// The next call is the watcher's WATCH of the webhook configuration; it is
/// left unanswered.
async fn expect_watch(handle: &mut Handle) {
    let (req, _send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a watch call within 10 s")
        .expect("the mock server is open");
    common::rbac::assert_allowed(req.method(), req.uri());
    assert_eq!((req.method(), req.uri().path()), (&Method::GET, CONFIGS));
    let query = req.uri().query().unwrap_or_default();
    assert!(query.contains("watch=true") && query.contains("metadata.name%3Dferry-sidecar-injector"), "{query}");
}

#[tokio::test]
async fn an_absent_secret_is_created_and_its_ca_patched_into_the_webhook_config() {
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    expect_status(&mut handle, Method::GET, SECRET, StatusCode::NOT_FOUND, Some(status(404, "NotFound", "not found")))
        .await;
    let created = expect(&mut handle, Method::POST, SECRETS, None).await;
    assert_eq!(created["metadata"]["name"], "ferry-webhook-tls");
    assert_eq!(created["type"], "kubernetes.io/tls");
    let tls = ensure.await.unwrap().unwrap();
    assert_eq!(data(&created, "tls.crt"), tls.cert_pem);
    assert_eq!(data(&created, "tls.key"), tls.key_pem);
    assert_eq!(data(&created, "ca.crt"), tls.ca_pem.clone().unwrap());
    expect_no_more(&mut handle).await;

    assert_ca_patched_into(webhook_config(None), tls.ca_pem.clone().unwrap()).await;
}

#[tokio::test]
async fn a_stored_secret_is_used_and_nothing_is_created() {
    let stored = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    expect(&mut handle, Method::GET, SECRET, Some(stored_secret(&stored))).await;
    let tls = ensure.await.unwrap().unwrap();
    assert_eq!((&tls.cert_pem, &tls.key_pem, &tls.ca_pem), (&stored.cert_pem, &stored.key_pem, &stored.ca_pem));
    expect_no_more(&mut handle).await;

    // The stored CA goes into a caBundle that has another one.
    let stale = webhook_config(Some("-----BEGIN CERTIFICATE-----\nold\n-----END CERTIFICATE-----\n"));
    assert_ca_patched_into(stale, stored.ca_pem.clone().unwrap()).await;
}

#[tokio::test]
async fn a_lost_create_race_uses_the_secret_the_other_replica_stored() {
    let winner = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    expect_status(&mut handle, Method::GET, SECRET, StatusCode::NOT_FOUND, Some(status(404, "NotFound", "not found")))
        .await;
    let conflict = status(409, "AlreadyExists", "secrets \"ferry-webhook-tls\" already exists");
    expect_status(&mut handle, Method::POST, SECRETS, StatusCode::CONFLICT, Some(conflict)).await;
    expect(&mut handle, Method::GET, SECRET, Some(stored_secret(&winner))).await;
    let tls = ensure.await.unwrap().unwrap();
    assert_eq!((&tls.cert_pem, &tls.ca_pem), (&winner.cert_pem, &winner.ca_pem));
    expect_no_more(&mut handle).await;
}

#[tokio::test]
async fn an_empty_secret_is_filled_in_guarded_by_its_resource_version() {
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    let empty = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "ferry-webhook-tls", "namespace": NAMESPACE, "resourceVersion": "77",
                     "labels": {"app.kubernetes.io/instance": "ferry"}}});
    expect(&mut handle, Method::GET, SECRET, Some(empty)).await;
    let replaced = expect(&mut handle, Method::PUT, SECRET, None).await;
    assert_eq!(replaced["metadata"]["resourceVersion"], "77", "the write is guarded by what was read");
    assert_eq!(replaced["metadata"]["labels"]["app.kubernetes.io/instance"], "ferry", "the chart's labels stay");
    let tls = ensure.await.unwrap().unwrap();
    assert_eq!(data(&replaced, "ca.crt"), tls.ca_pem.unwrap());
    expect_no_more(&mut handle).await;
}

#[tokio::test]
async fn a_secret_with_part_of_a_certificate_is_an_error_and_is_not_overwritten() {
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let mut partial = stored_secret(&tls);
    partial["data"].as_object_mut().unwrap().remove("ca.crt");
    expect(&mut handle, Method::GET, SECRET, Some(partial)).await;
    let e = ensure.await.unwrap().unwrap_err();
    assert_eq!(e.category(), "StoredCertificate");
    assert!(
        e.to_string().contains("ferry-system/ferry-webhook-tls") && e.to_string().contains("delete the Secret"),
        "{e}"
    );
    expect_no_more(&mut handle).await;
}

#[tokio::test]
async fn a_ca_bundle_already_in_place_is_not_patched_again() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let ca = tls.ca_pem.clone().unwrap();
    let (client, mut handle) = mock_client();
    let keeper = tokio::spawn(keep_ca_bundle(client, "ferry-sidecar-injector".into(), ca.clone()));
    expect(&mut handle, Method::GET, CONFIGS, Some(config_list(vec![webhook_config(Some(&ca))]))).await;
    expect_watch(&mut handle).await;
    keeper.abort();
}

#[tokio::test]
async fn a_webhook_config_created_after_the_operator_started_gets_the_ca_when_it_appears() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let ca = tls.ca_pem.clone().unwrap();
    let (client, mut handle) = mock_client();
    let keeper = tokio::spawn(keep_ca_bundle(client, "ferry-sidecar-injector".into(), ca.clone()));
    expect(&mut handle, Method::GET, CONFIGS, Some(config_list(vec![]))).await;
    // The watch answers with the object Helm just created.
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await.unwrap().unwrap();
    common::rbac::assert_allowed(req.method(), req.uri());
    assert!(req.uri().query().unwrap_or_default().contains("watch=true"), "{}", req.uri());
    let added = json!({"type": "ADDED", "object": webhook_config(None)});
    send.send_response(
        http::Response::builder().body(kube::client::Body::from(format!("{added}\n").into_bytes())).unwrap(),
    );
    let patch = expect(&mut handle, Method::PATCH, CONFIG, Some(webhook_config(Some(&ca)))).await;
    assert_eq!(patched_ca_bundles(&patch), [("inject.ferry.dev".to_owned(), ca)]);
    keeper.abort();
}

#[test]
fn the_example_deployment_for_a_cluster_gets_its_sidecar() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/k8s/deployment.yaml")).unwrap();
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_yaml::from_str(&text).unwrap();
    let template = deployment.spec.template;
    let pod = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": serde_json::to_value(template.metadata.unwrap()).unwrap(),
        "spec": serde_json::to_value(template.spec.unwrap()).unwrap(),
    });
    let review = review_of(&review_with(json!({})), pod);
    let response = respond(&review, &InjectConfig::default());
    assert_eq!(response["allowed"], true, "{response}");
    let pod = typed(&patched(&review, &response));
    let env = env_map(sidecar(&pod).env.as_deref().unwrap_or_default());
    assert_eq!((env["FERRY_APP_ID"].as_str(), env["FERRY_APP_PORT"].as_str()), ("orders", "3000"));
}

/// The injected container's env, turned into the flags that read those
/// variables, is accepted by the sidecar's own parser and checks: the
/// webhook and the sidecar cannot drift apart.
#[test]
fn the_injected_env_is_what_the_sidecars_own_flag_parser_accepts() {
    let tokens = with(
        with(asking(), ANNOTATION_API_TOKEN_SECRET, "orders-api-token"),
        ANNOTATION_APP_TOKEN_SECRET,
        "orders-app-token",
    );
    let config = sidecar_config_of(tokens);
    assert_eq!(config.app_port, Some(8080));
    assert_eq!(
        (config.api_token.as_deref(), config.app_token.as_deref()),
        (Some("token from orders-api-token"), Some("token from orders-app-token"))
    );
    let mut no_port = asking();
    no_port.as_object_mut().unwrap().remove(ANNOTATION_APP_PORT);
    let config = sidecar_config_of(no_port);
    assert_eq!(config.app_port, None);
    assert_eq!((config.api_token, config.app_token), (None, None));
}

/// The sidecar's config from the env the webhook injects for a pod with
/// `annotations`.
fn sidecar_config_of(annotations: Value) -> ferry_sidecar::config::Config {
    use clap::CommandFactory;
    let mut cfg = InjectConfig::default();
    cfg.broker.credentials_secret = "nats-creds".into();
    let review = review_with(annotations);
    let pod = typed(&patched(&review, &respond(&review, &cfg)));
    let env = env_map(sidecar(&pod).env.as_deref().unwrap_or_default());
    let cmd = ferry_sidecar::config::Cli::command();
    let mut argv = vec!["ferry-sidecar".to_owned()];
    for (name, value) in &env {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(*name))
            .unwrap_or_else(|| panic!("the sidecar has no flag reading {name}"));
        let value = match value.as_str() {
            "fieldRef:metadata.namespace" => "shop".to_owned(),
            "fieldRef:metadata.name" => "orders-7d4b9c8f6-x2x9p".to_owned(),
            v => match v.strip_prefix("secretKeyRef:").and_then(|r| r.strip_suffix("/token")) {
                Some(secret) => format!("token from {secret}"),
                None => v.to_owned(),
            },
        };
        argv.push(format!("--{}={value}", arg.get_long().expect("a long flag")));
    }
    let cli =
        <ferry_sidecar::config::Cli as clap::Parser>::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let config = ferry_sidecar::config::Config::from_args(cli.sidecar).unwrap_or_else(|e| panic!("{argv:?}: {e:?}"));
    assert_eq!((config.app_id.as_str(), config.namespace.as_str()), ("orders", "shop"));
    assert_eq!(config.pod_name, "orders-7d4b9c8f6-x2x9p");
    assert_eq!(config.broker.creds.as_deref(), Some(std::path::Path::new("/etc/ferry/broker/creds")));
    assert!(!config.broker.is_embedded(), "injected sidecars use the cluster's broker");
    assert_eq!(config.api_addr.port(), cfg.api_port);
    assert_eq!(config.admin_addr.port(), cfg.admin_port);
    config
}

#[tokio::test]
async fn a_stored_certificate_for_another_service_name_is_replaced() {
    let other = TlsMaterial::generate(&dns_names("old-webhook", NAMESPACE)).unwrap();
    let (client, mut handle) = mock_client();
    let ensure = tokio::spawn(async move { ensure_certificate(client, &cert_args()).await });
    let mut stored = stored_secret(&other);
    stored["metadata"]["resourceVersion"] = json!("12");
    expect(&mut handle, Method::GET, SECRET, Some(stored)).await;
    let replaced = expect(&mut handle, Method::PUT, SECRET, None).await;
    assert_eq!(replaced["metadata"]["resourceVersion"], "12", "the write is guarded by what was read");
    let tls = ensure.await.unwrap().unwrap();
    assert_ne!(tls.cert_pem, other.cert_pem, "a new certificate");
    assert_eq!(data(&replaced, "tls.crt"), tls.cert_pem);
    let host = format!("{SERVICE}.{NAMESPACE}.svc");
    tls.valid_for(&host, std::time::SystemTime::now()).unwrap();
    assert!(other.valid_for(&host, std::time::SystemTime::now()).is_err(), "the old one was not for this name");
    expect_no_more(&mut handle).await;
}

#[test]
fn a_generated_certificate_is_valid_for_its_names_and_not_after_it_expires() {
    let tls = TlsMaterial::generate(&dns_names(SERVICE, NAMESPACE)).unwrap();
    let now = std::time::SystemTime::now();
    for name in dns_names(SERVICE, NAMESPACE) {
        tls.valid_for(&name, now).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(tls.valid_for("elsewhere.ferry-system.svc", now).is_err());
    let in_11_years = now + std::time::Duration::from_secs(11 * 365 * 24 * 3600);
    assert!(tls.valid_for(&format!("{SERVICE}.{NAMESPACE}.svc"), in_11_years).is_err(), "expired by then");
}
