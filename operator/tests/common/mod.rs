//! The recorded-request harness the controller tests share: a tower-test
//! mock API server and helpers that check each call in order.
//!
//! Every call a test sees is also checked against the RBAC rules of the
//! Helm chart (`rbac::assert_allowed`), so the chart's permissions follow
//! from the calls the operator's code really makes.

#![allow(dead_code)]

pub mod rbac;

use std::sync::Arc;
use std::time::Duration;

use ferry_e2e::NatsServer;
use ferry_operator::context::Context;
use ferry_operator::jetstream::JetStream;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::Value;

/// The test's side of the mock API server.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A kube client on a mock API server.
pub fn mock_client() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// A controller context: mock API server, real broker.
pub async fn context(nats: &NatsServer) -> (Arc<Context>, Handle) {
    let (client, handle) = mock_client();
    let js = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    let reporter = Reporter { controller: "ferry-operator".into(), instance: None };
    (Arc::new(Context::new(client, js, reporter)), handle)
}

/// The next call: asserts method and path, answers 200 with `reply` (or
/// echoes the body); returns the request body.
pub async fn expect(handle: &mut Handle, method: Method, path: &str, reply: Option<Value>) -> Value {
    expect_status(handle, method, path, StatusCode::OK, reply).await
}

/// As [`expect`], answering with `status`.
pub async fn expect_status(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Option<Value>,
) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path} call within 10 s"))
        .expect("the mock server is open");
    rbac::assert_allowed(req.method(), req.uri());
    assert_eq!((req.method(), req.uri().path()), (&method, path), "call to {}", req.uri());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    let answer = reply.unwrap_or_else(|| body.clone());
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
    );
    body
}

/// Fails if any call is made within a short while (no extra calls).
pub async fn expect_no_more(handle: &mut Handle) {
    if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await {
        panic!("unexpected call {} {}", req.method(), req.uri());
    }
}

/// A consumer as a sidecar of pod `pod` makes it for a `fanout: Pod`
/// Subscription in namespace `shop` (the same name and inactive threshold).
pub async fn pod_consumer(
    js: &async_nats::jetstream::Context,
    name: &str,
    spec: &ferry_api::SubscriptionSpec,
    pod: &str,
) -> async_nats::jetstream::consumer::PullConsumer {
    let plan = ferry_api::consumer_plan("shop", name, spec, Some(pod));
    assert!(plan.inactive_threshold.is_some(), "a per-pod consumer");
    js.get_stream(&plan.stream).await.unwrap().create_consumer(plan.to_jetstream()).await.unwrap()
}
