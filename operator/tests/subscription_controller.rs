//! The Subscription controller's Kubernetes calls (tower-test mock API
//! server) and its broker side (real nats-server).

use std::sync::Arc;

use ferry_api::subscription::SubscriptionSpec;
use ferry_api::topic::TopicSpec;
use ferry_api::{Subscription, Topic};
use ferry_e2e::NatsServer;
use ferry_operator::context::FINALIZER;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{json, Value};

mod common;
use common::{context, expect_no_more, expect_status as expect};

fn subscription() -> Arc<Subscription> {
    let mut spec = SubscriptionSpec::new("orders", "billing");
    spec.dead_letter_topic = None;
    let mut s = Subscription::new("invoices", spec);
    s.metadata.namespace = Some("shop".into());
    s.metadata.generation = Some(2);
    s.metadata.uid = Some("uid-2".into());
    s.metadata.finalizers = Some(vec![FINALIZER.into()]);
    Arc::new(s)
}

const TOPIC: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const STATUS: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/subscriptions/invoices/status";
const OBJECT: &str = "/apis/ferry.dev/v1alpha1/namespaces/shop/subscriptions/invoices";

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "topics.ferry.dev \"orders\" not found"})
}

#[tokio::test]
async fn a_subscription_before_its_topic_reports_topic_not_found_and_retries() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let s = subscription();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("TopicNotFound")));
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("TopicNotFound")));
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::context::RETRY_MIN));
}

#[tokio::test]
async fn once_its_topic_exists_a_subscription_gets_its_consumer_and_a_ready_status() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let s = subscription();
    // Sidecars have dead-lettered 3 messages of this subscription.
    ctx.js.bucket().await.unwrap().put("_stats.shop.invoices.deadLettered", "3".into()).await.unwrap();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["reason"], "Reconciled");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let st = &status["status"];
    assert_eq!((st["conditions"][0]["status"].as_str(), st["consumer"].as_str()), (Some("True"), Some("invoices")));
    assert_eq!(
        (st["pending"].as_u64(), st["inFlight"].as_u64(), st["observedGeneration"].as_i64()),
        (Some(0), Some(0), Some(2))
    );
    assert_eq!(st["deadLettered"].as_u64(), Some(3), "{st}");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::subscription::REFRESH));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_ok());
    let kv = js.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_some());
}

#[tokio::test]
async fn deleting_removes_the_consumer_the_config_and_the_count_then_the_finalizer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let js = &ctx.js;
    js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let live = subscription();
    js.apply_subscription(&ferry_operator::build::subscription("shop", "invoices", &live.spec).unwrap()).await.unwrap();
    js.bucket().await.unwrap().put("_stats.shop.invoices.deadLettered", "1".into()).await.unwrap();

    let mut deleting = (*live).clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let deleting = Arc::new(deleting);
    let run = tokio::spawn(ferry_operator::subscription::reconcile(deleting.clone(), ctx.clone()));
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Normal"), Some("Deleted")), "{ev}");
    let mut gone = (*deleting).clone();
    gone.metadata.finalizers = None;
    let patch =
        expect(&mut handle, Method::PATCH, OBJECT, StatusCode::OK, Some(serde_json::to_value(&gone).unwrap())).await;
    assert!(patch.to_string().contains("finalizers"), "the finalizer is removed: {patch}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    expect_no_more(&mut handle).await;

    let raw = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = raw.get_stream("FERRY_shop_orders").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_err(), "the consumer is deleted");
    let kv = raw.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_none(), "the sidecar config is deleted");
    assert!(kv.get("_stats.shop.invoices.deadLettered").await.unwrap().is_none(), "the count is deleted");
    assert!(raw.get_stream("FERRY_shop_orders").await.is_ok(), "the Topic's stream stays");
}

/// A Topic deleted after its Subscription (stream kept, `Retain`): the
/// Subscription reports `TopicNotFound` and leaves the sidecars' config, so
/// they stop retrying a consumer nothing feeds; the consumer stays, with its
/// position, for when the Topic comes back.
#[tokio::test]
async fn a_subscription_whose_topic_was_deleted_leaves_the_sidecars_config_and_keeps_its_consumer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let spec = TopicSpec { deletion_policy: ferry_api::topic::DeletionPolicy::Retain, ..TopicSpec::default() };
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &spec).unwrap()).await.unwrap();
    let s = subscription();
    ctx.js
        .apply_subscription(&ferry_operator::build::subscription("shop", "invoices", &s.spec).unwrap())
        .await
        .unwrap();
    ctx.js.delete_topic("shop", "orders", spec.deletion_policy).await.unwrap();
    let raw = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = raw.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_some(), "the entry is there before");

    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("TopicNotFound")));
    assert!(cond["message"].as_str().unwrap().contains("withdrawn from the sidecars' config"), "{cond}");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::context::RETRY_MIN));

    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_none(), "the sidecars' entry is withdrawn");
    let stream = raw.get_stream("FERRY_shop_orders").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_ok(), "the consumer is kept");
}

/// `fanout: Pod` has no group consumer to make, but it still needs its
/// topic's stream: while the Topic exists only in Kubernetes (its stream not
/// made yet, or refused), the Subscription is not Ready and the sidecars get
/// no entry to fail on.
#[tokio::test]
async fn a_pod_fanout_subscription_is_not_ready_while_its_topics_stream_is_missing() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let mut s = (*subscription()).clone();
    s.spec.fanout = ferry_api::subscription::Fanout::Pod;
    let s = Arc::new(s);
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["type"], "Warning", "{ev}");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("BrokerRefused")), "{cond}");
    assert!(cond["message"].as_str().unwrap().contains("not found"), "{cond}");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::subscription::REFRESH));
    let raw = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // No bucket at all is no entry too: nothing was written.
    if let Ok(kv) = raw.get_key_value("ferry-config").await {
        assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_none(), "no entry for the sidecars");
    }
}

/// A `startPosition` changed on a live Subscription (the CRD refuses it
/// now; an older CRD did not): JetStream cannot change the consumer's
/// deliver policy, so the status says so, once, rather than Ready.
#[tokio::test]
async fn a_changed_start_position_reports_immutable_field_and_waits_for_a_new_spec() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let live = subscription();
    ctx.js
        .apply_subscription(&ferry_operator::build::subscription("shop", "invoices", &live.spec).unwrap())
        .await
        .unwrap();
    let mut s = (*live).clone();
    s.spec.start_position = ferry_api::subscription::StartPosition::Earliest;
    let s = Arc::new(s);
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("ImmutableField")), "{ev}");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("ImmutableField")), "{cond}");
    assert!(cond["message"].as_str().unwrap().contains("spec.startPosition"), "{cond}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    expect_no_more(&mut handle).await;
}

/// A Subscription made before the CRD refused such names (`app` with a
/// space, a topic with a dot) never got broker objects; deleting it must not
/// wait for the broker to accept names it cannot hold.
#[tokio::test]
async fn deleting_a_subscription_with_names_nats_cannot_hold_removes_the_finalizer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let mut s = (*subscription()).clone();
    s.spec.app = "billing app".into();
    s.spec.topic = "orders.v1".into();
    s.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let run = tokio::spawn(ferry_operator::subscription::reconcile(Arc::new(s.clone()), ctx));
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["reason"], "Deleted", "{ev}");
    let mut gone = s.clone();
    gone.metadata.finalizers = None;
    let patch =
        expect(&mut handle, Method::PATCH, OBJECT, StatusCode::OK, Some(serde_json::to_value(&gone).unwrap())).await;
    assert!(patch.to_string().contains("finalizers"), "the finalizer is removed: {patch}");
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
}

/// A missing Topic is retried later each time (5 s, then 10 s), its repeated
/// Warning aggregated into one Event; once the Subscription reconciles, the
/// backoff starts over.
#[tokio::test]
async fn topic_not_found_backs_off_and_a_success_resets_the_backoff() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let s = subscription();
    let reply = Some(serde_json::to_value(&*s).unwrap());

    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx.clone()));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    let first = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(first["reason"], "TopicNotFound", "{first}");
    expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, reply.clone()).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(std::time::Duration::from_secs(5)));
    let warning = format!("{EVENTS}/{}", first["metadata"]["name"].as_str().unwrap());

    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx.clone()));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    let again = expect(&mut handle, Method::PATCH, &warning, StatusCode::OK, None).await;
    assert_eq!(again["series"]["count"], 2, "{again}");
    expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, reply.clone()).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(std::time::Duration::from_secs(10)));

    // The Topic appears: ready, and the backoff is forgotten.
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx.clone()));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, reply.clone()).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::subscription::REFRESH));

    // Gone again: back to 5 s (the Warning still counts on the same Event).
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx.clone()));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    let third = expect(&mut handle, Method::PATCH, &warning, StatusCode::OK, None).await;
    assert_eq!(third["series"]["count"], 3, "{third}");
    expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, reply).await;
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(std::time::Duration::from_secs(5)));
    expect_no_more(&mut handle).await;
}
