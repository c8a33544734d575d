//! The operator's JetStream side against a real nats-server: streams,
//! consumers and KV entries created, left alone, updated and deleted as the
//! resources say.

use ferry_api::subscription::SubscriptionSpec;
use ferry_api::topic::{DeletionPolicy, Storage, TopicSpec};
use ferry_api::Duration as D;
use ferry_e2e::NatsServer;
use ferry_operator::build;
use ferry_operator::jetstream::{ApplyError, JetStream};

async fn connect(nats: &NatsServer) -> (JetStream, async_nats::jetstream::Context) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    (JetStream::new(client.clone()), async_nats::jetstream::new(client))
}

#[tokio::test]
async fn a_topic_is_created_then_left_alone_then_updated_then_deleted() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    let spec = TopicSpec::default();
    let d = build::topic("shop", "orders", &spec).unwrap();
    assert!(op.apply_topic(&d).await.unwrap(), "first apply creates");
    assert!(!op.apply_topic(&d).await.unwrap(), "an unchanged topic writes nothing");
    let mut s = js.get_stream("FERRY_shop_orders").await.unwrap();
    assert_eq!(s.info().await.unwrap().config.subjects, ["ferry.shop.orders.>"]);
    let kv = js.get_key_value("ferry-config").await.unwrap();
    let entry = kv.get("shop.topic.orders").await.unwrap().expect("a KV entry");
    let resolved: ferry_api::resolved::ResolvedTopic = serde_json::from_slice(&entry).unwrap();
    assert_eq!(resolved.spec, spec);

    let bigger = TopicSpec { duplicate_window: D::from_secs(300), ..spec.clone() };
    assert!(op.apply_topic(&build::topic("shop", "orders", &bigger).unwrap()).await.unwrap());
    let mut s = js.get_stream("FERRY_shop_orders").await.unwrap();
    assert_eq!(s.info().await.unwrap().config.duplicate_window, std::time::Duration::from_secs(300));

    op.delete_topic("shop", "orders", DeletionPolicy::Delete).await.unwrap();
    assert!(js.get_stream("FERRY_shop_orders").await.is_err(), "Delete removes the stream");
    assert!(kv.get("shop.topic.orders").await.unwrap().is_none(), "and the KV entry");
    op.delete_topic("shop", "orders", DeletionPolicy::Delete).await.expect("not found is success");
}

#[tokio::test]
async fn retain_keeps_the_stream_and_a_storage_change_is_an_immutable_field() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    let spec = TopicSpec { deletion_policy: DeletionPolicy::Retain, ..TopicSpec::default() };
    op.apply_topic(&build::topic("shop", "audit", &spec).unwrap()).await.unwrap();
    let memory = TopicSpec { storage: Storage::Memory, ..spec.clone() };
    let err = op.apply_topic(&build::topic("shop", "audit", &memory).unwrap()).await.unwrap_err();
    assert!(matches!(&err, ApplyError::ImmutableField { field: "spec.storage", .. }), "{err:?}");
    assert_eq!(err.category(), "ImmutableField");
    op.delete_topic("shop", "audit", DeletionPolicy::Retain).await.unwrap();
    assert!(js.get_stream("FERRY_shop_audit").await.is_ok(), "Retain keeps the stream");
    let kv = js.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.topic.audit").await.unwrap().is_none(), "the sidecars no longer see it");
}

#[tokio::test]
async fn a_subscription_gets_its_consumer_and_kv_entry_and_loses_them_on_delete() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let spec = SubscriptionSpec { processing_timeout: D::from_secs(12), ..SubscriptionSpec::new("orders", "billing") };
    let d = build::subscription("shop", "invoices", &spec).unwrap();
    assert!(op.apply_subscription(&d).await.unwrap());
    assert!(!op.apply_subscription(&d).await.unwrap(), "unchanged: no write");
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    let info = stream.consumer_info("invoices").await.unwrap();
    assert_eq!(info.config.ack_wait, std::time::Duration::from_secs(12));
    assert_eq!(info.config.max_deliver, -1);
    let kv = js.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_some());
    op.delete_subscription("shop", "invoices", "orders", "billing").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_err());
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_none());
}

#[tokio::test]
async fn a_broker_that_is_down_is_reported_as_unavailable() {
    let mut nats = NatsServer::start();
    let (op, _js) = connect(&nats).await;
    nats.stop();
    let err = op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap_err();
    assert_eq!(err.category(), "BrokerUnavailable", "{err:?}");
}
