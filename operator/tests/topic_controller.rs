//! The Topic controller's Kubernetes calls, checked against kube's
//! recorded-request pattern (a tower-test mock API server with the expected
//! calls in order), and its broker side against a real nats-server.

use std::sync::Arc;

use ferry_api::topic::{DeletionPolicy, Storage, TopicSpec, TopicStatus};
use ferry_api::Topic;
use ferry_e2e::NatsServer;
use ferry_operator::context::FINALIZER;
use ferry_operator::jetstream::JetStream;
use http::Method;
use kube::runtime::controller::Action;

mod common;
use common::{context, expect, expect_no_more};

fn topic(spec: TopicSpec, finalizer: bool, deleting: bool) -> Arc<Topic> {
    let mut t = Topic::new("orders", spec);
    t.metadata.namespace = Some("shop".into());
    t.metadata.generation = Some(3);
    t.metadata.uid = Some("uid-1".into());
    t.metadata.resource_version = Some("10".into());
    if finalizer {
        t.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    if deleting {
        t.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    }
    Arc::new(t)
}

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const STATUS: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders/status";
const OBJECT: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders";

#[tokio::test]
async fn a_new_topic_first_gets_the_finalizer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let t = topic(TopicSpec::default(), false, false);
    let reply = serde_json::to_value(&*topic(TopicSpec::default(), true, false)).unwrap();
    let run = tokio::spawn(ferry_operator::topic::reconcile(t, ctx));
    let patch = expect(&mut handle, Method::PATCH, OBJECT, Some(reply)).await;
    assert!(patch.to_string().contains(FINALIZER), "{patch}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    expect_no_more(&mut handle).await;
}

#[tokio::test]
async fn a_topic_gets_its_stream_a_ready_status_and_an_event_and_an_unchanged_one_writes_nothing() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let t = topic(TopicSpec::default(), true, false);
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx.clone()));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Normal"), Some("Reconciled")), "{ev}");
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!(
        (cond["type"].as_str(), cond["status"].as_str(), cond["reason"].as_str()),
        (Some("Ready"), Some("True"), Some("Reconciled"))
    );
    assert_eq!(cond["observedGeneration"], 3);
    assert_eq!(status["status"]["observedGeneration"], 3);
    assert_eq!(status["status"]["stream"], "FERRY_shop_orders");
    assert_eq!(status["status"]["messages"], 0);
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::topic::REFRESH));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    assert!(js.get_stream("FERRY_shop_orders").await.is_ok());

    // Again, nothing changed: no event (no broker write), just the status.
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    assert_eq!(status["status"]["conditions"][0]["status"], "True");
    run.await.unwrap().unwrap();
    expect_no_more(&mut handle).await;
}

#[tokio::test]
async fn a_changed_storage_reports_immutable_field_with_a_warning_and_no_requeue_loop() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let js = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let t = topic(TopicSpec { storage: Storage::Memory, ..TopicSpec::default() }, true, false);
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("ImmutableField")));
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("ImmutableField")));
    assert!(cond["message"].as_str().unwrap().contains("spec.storage"), "{cond}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
}

/// `retention.maxAge: 1m` with the default 2m dedupe window: JetStream
/// would refuse the stream on every refresh; the Topic is an invalid spec,
/// reported once, and nothing is made until the spec changes.
#[tokio::test]
async fn a_dedupe_window_longer_than_the_max_age_is_an_invalid_spec_that_waits_for_a_new_spec() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let spec = TopicSpec {
        retention: ferry_api::topic::Retention {
            max_age: Some(ferry_api::Duration::from_secs(60)),
            ..Default::default()
        },
        ..TopicSpec::default()
    };
    let t = topic(spec, true, false);
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("InvalidSpec")), "{ev}");
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("InvalidSpec")), "{cond}");
    let message = cond["message"].as_str().unwrap();
    assert!(message.contains("spec.duplicateWindow") && message.contains("spec.retention.maxAge"), "{message}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    expect_no_more(&mut handle).await;
    let raw = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    assert!(raw.get_stream("FERRY_shop_orders").await.is_err(), "no stream is made");
}

#[tokio::test]
async fn a_refused_stream_is_reported_and_looked_at_again_on_the_refresh_period() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    // Three replicas on a single server: JetStream refuses the stream.
    let t = topic(TopicSpec { replicas: 3, ..TopicSpec::default() }, true, false);
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!(ev["reason"], "BrokerRefused", "{ev}");
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "BrokerRefused");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::topic::REFRESH));
}

#[tokio::test]
async fn with_the_broker_down_the_status_says_broker_unavailable_and_it_retries() {
    let mut nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    nats.stop();
    let t = topic(TopicSpec::default(), true, false);
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!(ev["reason"], "BrokerUnavailable");
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "BrokerUnavailable");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::context::RETRY_MIN));
}

#[tokio::test]
async fn deleting_removes_the_stream_per_policy_then_the_finalizer() {
    for (policy, stream_left) in [(DeletionPolicy::Delete, false), (DeletionPolicy::Retain, true)] {
        let nats = NatsServer::start();
        let (ctx, mut handle) = context(&nats).await;
        let js = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
        let spec = TopicSpec { deletion_policy: policy, ..TopicSpec::default() };
        js.apply_topic(&ferry_operator::build::topic("shop", "orders", &spec).unwrap()).await.unwrap();
        let t = topic(spec, true, true);
        let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
        let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
        assert_eq!(ev["reason"], "Deleted");
        let mut gone = (*t).clone();
        gone.metadata.finalizers = None;
        let patch = expect(&mut handle, Method::PATCH, OBJECT, Some(serde_json::to_value(&gone).unwrap())).await;
        assert!(patch.to_string().contains("finalizers"), "the finalizer is removed: {patch}");
        run.await.unwrap().unwrap();
        let raw = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        assert_eq!(raw.get_stream("FERRY_shop_orders").await.is_ok(), stream_left, "{policy:?}");
    }
}

/// A Topic named `orders.v1` (from before the CRD refused dots) never got a
/// stream: NATS cannot hold the name. Deleting it removes the finalizer
/// rather than retrying a stream deletion the broker refuses for ever.
#[tokio::test]
async fn deleting_a_topic_whose_name_nats_cannot_hold_removes_the_finalizer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let mut t = (*topic(TopicSpec::default(), true, true)).clone();
    t.metadata.name = Some("orders.v1".into());
    let run = tokio::spawn(ferry_operator::topic::reconcile(Arc::new(t.clone()), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!(ev["reason"], "Deleted", "{ev}");
    let mut gone = t.clone();
    gone.metadata.finalizers = None;
    let path = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders.v1";
    let patch = expect(&mut handle, Method::PATCH, path, Some(serde_json::to_value(&gone).unwrap())).await;
    assert!(patch.to_string().contains("finalizers"), "the finalizer is removed: {patch}");
    run.await.unwrap().unwrap();
}

/// During a broker outage a Topic is looked at again later each time (5 s
/// doubling to 5 min), and its repeated Warning is one Event whose series
/// counts the repeats (a PATCH), not a new Event object each time.
#[tokio::test]
async fn with_the_broker_down_retries_back_off_and_the_repeated_warning_is_one_aggregated_event() {
    let mut nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    nats.stop();
    let t = topic(TopicSpec::default(), true, false);
    let reply = Some(serde_json::to_value(&*t).unwrap());

    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx.clone()));
    let first = expect(&mut handle, Method::POST, EVENTS, None).await;
    assert_eq!(first["reason"], "BrokerUnavailable", "{first}");
    expect(&mut handle, Method::PATCH, STATUS, reply.clone()).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(std::time::Duration::from_secs(5)));

    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx.clone()));
    let name = first["metadata"]["name"].as_str().expect("the event has a name");
    let again = expect(&mut handle, Method::PATCH, &format!("{EVENTS}/{name}"), None).await;
    assert_eq!(again["series"]["count"], 2, "{again}");
    expect(&mut handle, Method::PATCH, STATUS, reply).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(std::time::Duration::from_secs(10)));
    expect_no_more(&mut handle).await;

    // It keeps doubling, up to 5 min.
    let next: Vec<u64> = (0..6).map(|_| ctx.backoff(&*t).as_secs()).collect();
    assert_eq!(next, [20, 40, 80, 160, 300, 300]);
    // The error policy (a failed reconcile) uses the same backoff.
    let err = ferry_operator::context::Error::MissingNamespace;
    assert_eq!(
        ferry_operator::run::error_policy(t.clone(), &err, ctx.clone()),
        Action::requeue(ferry_operator::context::RETRY_MAX)
    );
    ctx.reset_backoff(&*t);
    assert_eq!(ferry_operator::run::error_policy(t, &err, ctx), Action::requeue(ferry_operator::context::RETRY_MIN));
}

/// `t` with a status as a pass before left it.
fn with_status(t: &Topic) -> Arc<Topic> {
    let mut t = t.clone();
    t.status = Some(TopicStatus {
        stream: Some("FERRY_shop_orders".into()),
        messages: Some(42),
        bytes: Some(4200),
        ..TopicStatus::default()
    });
    Arc::new(t)
}

/// A pass that cannot read the stream (the broker is out of reach) keeps
/// the last stream name and counts; the condition says they are not current.
#[tokio::test]
async fn with_the_broker_down_the_status_keeps_the_last_stream_and_counts() {
    let mut nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    nats.stop();
    let t = with_status(&topic(TopicSpec::default(), true, false));
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    expect(&mut handle, Method::POST, EVENTS, None).await;
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["reason"], "BrokerUnavailable", "{st}");
    assert_eq!(
        (st["stream"].as_str(), st["messages"].as_u64(), st["bytes"].as_u64()),
        (Some("FERRY_shop_orders"), Some(42), Some(4200)),
        "{st}"
    );
    run.await.unwrap().unwrap();
}

/// A pass that reads that the broker has no stream (here: it refused to
/// make it) no longer names one, whatever the last pass showed.
#[tokio::test]
async fn a_stream_the_broker_does_not_have_is_not_shown() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let t = with_status(&topic(TopicSpec { replicas: 3, ..TopicSpec::default() }, true, false));
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    expect(&mut handle, Method::POST, EVENTS, None).await;
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["reason"], "BrokerRefused", "{st}");
    for gone in ["stream", "messages", "bytes"] {
        assert!(st.get(gone).is_none(), "{gone}: {st}");
    }
    run.await.unwrap().unwrap();
}

/// A spec the broker refuses to apply to an existing stream (a changed
/// storage) leaves the stream as it was, and its counts are read anew.
#[tokio::test]
async fn a_stream_kept_as_it_was_is_still_counted() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let t = with_status(&topic(TopicSpec { storage: Storage::Memory, ..TopicSpec::default() }, true, false));
    let run = tokio::spawn(ferry_operator::topic::reconcile(t.clone(), ctx));
    expect(&mut handle, Method::POST, EVENTS, None).await;
    let status = expect(&mut handle, Method::PATCH, STATUS, Some(serde_json::to_value(&*t).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["reason"], "ImmutableField", "{st}");
    assert_eq!((st["stream"].as_str(), st["messages"].as_u64()), (Some("FERRY_shop_orders"), Some(0)), "{st}");
    run.await.unwrap().unwrap();
}
