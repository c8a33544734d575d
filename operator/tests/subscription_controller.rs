//! The Subscription controller's Kubernetes calls (tower-test mock API
//! server) and its broker side (real nats-server).

use std::sync::Arc;

use ferry_api::subscription::{Fanout, SubscriptionSpec, SubscriptionStatus};
use ferry_api::topic::TopicSpec;
use ferry_api::{Subscription, Topic};
use ferry_e2e::NatsServer;
use ferry_operator::context::{Context, FINALIZER};
use ferry_operator::jetstream::JetStream;
use futures::StreamExt;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{json, Value};

mod common;
use common::{context, expect_no_more, expect_status as expect, pod_consumer};

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

/// The dead-letter topic is looked up like the topic: a Subscription whose
/// `deadLetterTopic` names no Topic is not made (a dead letter would have
/// nowhere to go) and says which field is wrong.
#[tokio::test]
async fn a_subscription_whose_dead_letter_topic_is_missing_reports_topic_not_found() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let mut s = (*subscription()).clone();
    s.spec.dead_letter_topic = Some("orders-dlq".into());
    let s = Arc::new(s);
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let dlq = "/apis/ferry.dev/v1alpha1/namespaces/shop/topics/orders-dlq";
    expect(&mut handle, Method::GET, dlq, StatusCode::NOT_FOUND, Some(not_found())).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!((ev["type"].as_str(), ev["reason"].as_str()), (Some("Warning"), Some("TopicNotFound")));
    assert!(ev["note"].as_str().unwrap().starts_with("spec.deadLetterTopic: no Topic \"orders-dlq\""), "{ev}");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let cond = &status["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("TopicNotFound")));
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::context::RETRY_MIN));
    expect_no_more(&mut handle).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_err(), "no consumer made");
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

/// Messages dropped for want of a dead-letter topic (the sidecars count them
/// and note the last one's reason in the KV bucket): the status shows the
/// count and the reason, and a Warning event says how many were dropped since
/// the status last showed, once the status shows it: the next pass, with
/// nothing new, posts none, nor does one whose status does not keep it.
#[tokio::test]
async fn dropped_messages_are_in_the_status_and_a_warning_event_once() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    let (ctx2, ctx3) = (ctx.clone(), ctx.clone());
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let kv = ctx.js.bucket().await.unwrap();
    kv.put("_stats.shop.invoices.dropped", "3".into()).await.unwrap();
    let why = "order-7: 5 attempt(s), last status 500: out of stock";
    kv.put("_stats.shop.invoices.lastDropped", why.into()).await.unwrap();
    let mut s = (*subscription()).clone();
    s.status = Some(SubscriptionStatus { dropped: Some(1), ..Default::default() });
    let run = tokio::spawn(ferry_operator::subscription::reconcile(Arc::new(s.clone()), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic.clone())).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["reason"], "Reconciled");
    // The API server answers with the status as it keeps it.
    let mut shown = s.clone();
    shown.status = Some(SubscriptionStatus { dropped: Some(3), last_dropped: Some(why.into()), ..Default::default() });
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&shown).unwrap())).await;
    let st = &status["status"];
    assert_eq!((st["dropped"].as_u64(), st["lastDropped"].as_str()), (Some(3), Some(why)), "{st}");
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!((ev["reason"].as_str(), ev["type"].as_str()), (Some("MessagesDropped"), Some("Warning")), "{ev}");
    let note = ev["note"].as_str().unwrap();
    assert!(note.starts_with("2 message(s) dropped since the last look (3 in all)") && note.ends_with(why), "{note}");
    run.await.unwrap().unwrap();

    // The next pass, with nothing new, posts none.
    s.status = serde_json::from_value(st.clone()).unwrap();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(Arc::new(s.clone()), ctx2));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic.clone())).await;
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&s).unwrap())).await;
    assert_eq!(status["status"]["dropped"].as_u64(), Some(3));
    run.await.unwrap().unwrap();

    // A status that does not keep the count (a CRD from before the field):
    // no event, or one would go out on every pass.
    kv.put("_stats.shop.invoices.dropped", "4".into()).await.unwrap();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(Arc::new(s.clone()), ctx3));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let mut pruned = s.clone();
    pruned.status.as_mut().unwrap().dropped = None;
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&pruned).unwrap())).await;
    assert_eq!(status["status"]["dropped"].as_u64(), Some(4), "sent, but not kept");
    run.await.unwrap().unwrap();
    expect_no_more(&mut handle).await;
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
    // The consumer is still there, so the status still names it, with counts.
    let st = &status["status"];
    assert_eq!((st["consumer"].as_str(), st["pending"].as_u64()), (Some("invoices"), Some(0)), "{st}");
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

/// `s` with a status as a pass before left it.
fn with_status(s: &Subscription, status: SubscriptionStatus) -> Arc<Subscription> {
    let mut s = s.clone();
    s.status = Some(status);
    Arc::new(s)
}

/// What the tests below start from: the counts of an earlier pass.
fn last_status() -> SubscriptionStatus {
    SubscriptionStatus {
        consumer: Some("invoices".into()),
        pending: Some(7),
        in_flight: Some(2),
        redelivered: Some(1),
        dead_lettered: Some(4),
        ..SubscriptionStatus::default()
    }
}

/// `fanout: Pod`: no group consumer, but the pod consumers the sidecars
/// made: the status names them (`invoices_*` and how many) and sums their
/// counts. Consumers of other Subscriptions named alike are left out: of
/// `invoices-b` (`invoices-b_p1`), of `invoices--eu` (`invoices--eu_billing-1`,
/// which with `--` as the separator was also pod `eu--billing-1`'s of
/// `invoices`) and the group consumer of `invoices--x`, with no call to the
/// API server to tell them apart.
#[tokio::test]
async fn a_pod_fanout_subscription_reports_its_pod_consumers_summed_and_no_other_subscriptions() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut s = (*subscription()).clone();
    s.spec.fanout = Fanout::Pod;
    let s = Arc::new(s);
    let a = pod_consumer(&js, "invoices", &s.spec, "billing-7d9f-a").await;
    pod_consumer(&js, "invoices", &s.spec, "billing-7d9f-b").await;
    let others = [
        pod_consumer(&js, "invoices-b", &s.spec, "p1").await,
        pod_consumer(&js, "invoices--eu", &s.spec, "billing-1").await,
    ];
    let group = SubscriptionSpec::new("orders", "billing");
    ctx.js
        .apply_subscription(&ferry_operator::build::subscription("shop", "invoices--x", &group).unwrap())
        .await
        .unwrap();
    for i in 0..3 {
        js.publish(format!("ferry.shop.orders.{i}"), "m".into()).await.unwrap().await.unwrap();
    }
    let fetch = |c: async_nats::jetstream::consumer::PullConsumer| async move {
        let batch = c.fetch().max_messages(1).expires(std::time::Duration::from_millis(500)).messages().await;
        let got: Vec<_> = batch.unwrap().collect().await;
        assert_eq!(got.len(), 1);
    };
    fetch(a).await;
    for c in others {
        fetch(c).await;
    }

    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["reason"], "Reconciled", "{ev}");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["status"], "True", "{st}");
    assert_eq!(st["consumer"], "invoices_* (2 consumers)", "{st}");
    assert_eq!(
        (st["pending"].as_u64(), st["inFlight"].as_u64(), st["redelivered"].as_u64()),
        (Some(2 + 3), Some(1), Some(0)),
        "{st}"
    );
    assert_eq!(st["deadLettered"], 0, "{st}");
    assert_eq!(run.await.unwrap().unwrap(), Action::requeue(ferry_operator::subscription::REFRESH));
    expect_no_more(&mut handle).await;
}

/// The consumer is there but its counts cannot be read (here: the
/// operator's broker user may not read consumer info, so the read times
/// out): the status keeps the last counts rather than dropping them;
/// what could be read (the dead-letter count) is new.
#[tokio::test]
async fn a_count_read_that_fails_keeps_the_last_counts() {
    let mut nats = NatsServer::stopped_with_config(
        "authorization {\n  users = [\n    {user: admin, password: admin}\n    \
         {user: op, password: op, permissions: {publish: {allow: \">\", deny: \"$JS.API.CONSUMER.INFO.>\"}}}\n  ]\n}\n",
    );
    nats.start_again();
    let as_user =
        |user: &str| async_nats::ConnectOptions::with_user_and_password(user.into(), user.into()).connect(nats.url());
    let admin = JetStream::new(as_user("admin").await.unwrap());
    admin.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    admin.bucket().await.unwrap().put("_stats.shop.invoices.deadLettered", "5".into()).await.unwrap();
    let (client, mut handle) = common::mock_client();
    let reporter = kube::runtime::events::Reporter { controller: "ferry-operator".into(), instance: None };
    let ctx = Arc::new(Context::new(client, JetStream::new(as_user("op").await.unwrap()), reporter));
    let s = with_status(&subscription(), last_status());

    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["status"], "True", "{st}");
    assert_eq!(st["consumer"], "invoices", "{st}");
    assert_eq!(
        (st["pending"].as_u64(), st["inFlight"].as_u64(), st["redelivered"].as_u64()),
        (Some(7), Some(2), Some(1)),
        "the last counts: {st}"
    );
    assert_eq!(st["deadLettered"], 5, "read anew: {st}");
    run.await.unwrap().unwrap();
}

/// A pass that is not ready because the broker is out of reach keeps the
/// last consumer and counts: the condition says they are not current.
#[tokio::test]
async fn with_the_broker_down_the_status_keeps_the_last_consumer_and_counts() {
    let mut nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    nats.stop();
    let s = with_status(&subscription(), last_status());
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    let topic = serde_json::to_value(Topic::new("orders", TopicSpec::default())).unwrap();
    expect(&mut handle, Method::GET, TOPIC, StatusCode::OK, Some(topic)).await;
    let ev = expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    assert_eq!(ev["reason"], "BrokerUnavailable", "{ev}");
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let mut st: SubscriptionStatus = serde_json::from_value(status["status"].clone()).unwrap();
    assert_eq!((st.conditions[0].status.as_str(), st.conditions[0].reason.as_str()), ("False", "BrokerUnavailable"));
    st.conditions.clear();
    assert_eq!(st, SubscriptionStatus { observed_generation: Some(2), ..last_status() });
    run.await.unwrap().unwrap();
}

/// A Topic deleted with its stream (`deletionPolicy: Delete`) took the
/// consumer along: `TopicNotFound`, and the status no longer names the
/// consumer nor shows its counts.
#[tokio::test]
async fn a_subscription_whose_topic_and_stream_were_deleted_no_longer_shows_its_consumer() {
    let nats = NatsServer::start();
    let (ctx, mut handle) = context(&nats).await;
    ctx.js.apply_topic(&ferry_operator::build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let s = with_status(&subscription(), last_status());
    ctx.js
        .apply_subscription(&ferry_operator::build::subscription("shop", "invoices", &s.spec).unwrap())
        .await
        .unwrap();
    ctx.js.delete_topic("shop", "orders", ferry_api::topic::DeletionPolicy::Delete).await.unwrap();
    let run = tokio::spawn(ferry_operator::subscription::reconcile(s.clone(), ctx));
    expect(&mut handle, Method::GET, TOPIC, StatusCode::NOT_FOUND, Some(not_found())).await;
    expect(&mut handle, Method::POST, EVENTS, StatusCode::OK, None).await;
    let status =
        expect(&mut handle, Method::PATCH, STATUS, StatusCode::OK, Some(serde_json::to_value(&*s).unwrap())).await;
    let st = &status["status"];
    assert_eq!(st["conditions"][0]["reason"], "TopicNotFound", "{st}");
    for gone in ["consumer", "pending", "inFlight", "redelivered"] {
        assert!(st.get(gone).is_none(), "{gone}: {st}");
    }
    assert_eq!(st["deadLettered"], 0, "the count the sidecars keep is still read: {st}");
    run.await.unwrap().unwrap();
}
