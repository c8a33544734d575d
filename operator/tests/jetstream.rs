//! The operator's JetStream side against a real nats-server: streams,
//! consumers and KV entries created, left alone, updated and deleted as the
//! resources say.

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use ferry_api::subscription::{Fanout, Ordering, StartPosition, SubscriptionSpec};
use ferry_api::topic::{DeletionPolicy, Storage, TopicSpec};
use ferry_api::Duration as D;
use ferry_e2e::NatsServer;
use ferry_operator::build;
use ferry_operator::jetstream::{ApplyError, ConsumerCounts, JetStream};
use futures::{StreamExt, TryStreamExt};

mod common;
use common::pod_consumer;

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

/// JetStream refuses to change a consumer's deliver policy (err 10012), and
/// so would every sidecar making the consumer from a changed config entry:
/// a changed `startPosition` is reported, and neither the consumer nor the
/// sidecars' entry is touched.
#[tokio::test]
async fn a_changed_start_position_is_an_immutable_field_and_leaves_consumer_and_entry_alone() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let latest = SubscriptionSpec::new("orders", "billing");
    op.apply_subscription(&build::subscription("shop", "invoices", &latest).unwrap()).await.unwrap();
    let kv = js.get_key_value("ferry-config").await.unwrap();
    let entry = kv.get("shop.app.billing.invoices").await.unwrap().expect("an entry");

    let earliest = SubscriptionSpec { start_position: StartPosition::Earliest, ..latest.clone() };
    let err = op.apply_subscription(&build::subscription("shop", "invoices", &earliest).unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, ApplyError::ImmutableField { object: "consumer", field: "spec.startPosition", .. }),
        "{err:?}"
    );
    assert_eq!(err.category(), "ImmutableField");
    assert_eq!(err.retry(|| std::time::Duration::from_secs(1), std::time::Duration::from_secs(1)), None);
    assert!(err.to_string().contains("is Latest, spec says Earliest"), "{err}");
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    let info = stream.consumer_info("invoices").await.unwrap();
    assert_eq!(info.config.deliver_policy, DeliverPolicy::New, "the consumer is as it was");
    assert_eq!(kv.get("shop.app.billing.invoices").await.unwrap(), Some(entry), "and so is the sidecars' entry");

    // Back to the spec the consumer was made from: ready again.
    op.apply_subscription(&build::subscription("shop", "invoices", &latest).unwrap()).await.unwrap();
}

/// A consumer of the same name that Ferry did not make (another ack policy)
/// is reported the same way rather than refused on every reconcile.
#[tokio::test]
async fn a_consumer_made_with_another_ack_policy_is_an_immutable_field() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("invoices".into()),
            ack_policy: AckPolicy::All,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let spec = SubscriptionSpec::new("orders", "billing");
    let err = op.apply_subscription(&build::subscription("shop", "invoices", &spec).unwrap()).await.unwrap_err();
    assert!(matches!(&err, ApplyError::ImmutableField { field: "ack policy", .. }), "{err:?}");
}

/// Deleting a Subscription withdraws the sidecars' config entry before it
/// deletes the consumer, so no sidecar re-creates the consumer from the
/// entry. Shown with an operator that may not delete consumers: the
/// deletion fails, and the entry is gone all the same.
#[tokio::test]
async fn deleting_a_subscription_withdraws_its_config_entry_before_its_consumer() {
    let mut nats = NatsServer::stopped_with_config(
        "authorization {\n  users = [\n    {user: admin, password: admin}\n    \
         {user: op, password: op, permissions: {publish: {allow: \">\", deny: \"$JS.API.CONSUMER.DELETE.>\"}}}\n  ]\n}\n",
    );
    nats.start_again();
    let as_user =
        |user: &str| async_nats::ConnectOptions::with_user_and_password(user.into(), user.into()).connect(nats.url());
    let admin = as_user("admin").await.unwrap();
    let (full, js) = (JetStream::new(admin.clone()), async_nats::jetstream::new(admin));
    full.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let spec = SubscriptionSpec::new("orders", "billing");
    full.apply_subscription(&build::subscription("shop", "invoices", &spec).unwrap()).await.unwrap();
    let kv = js.get_key_value("ferry-config").await.unwrap();
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_some());

    let op = JetStream::new(as_user("op").await.unwrap());
    op.delete_subscription("shop", "invoices", "orders", "billing").await.expect_err("may not delete the consumer");
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    assert!(stream.consumer_info("invoices").await.is_ok(), "the consumer is still there");
    assert!(kv.get("shop.app.billing.invoices").await.unwrap().is_none(), "the sidecars' entry went first");
}

/// `ordering: Strict` sets `max_ack_pending` 1 on the group consumer, which
/// every pod pulls from: while one pod holds a message, another pod's fetch
/// waits out its expiry and ends empty (not in an error, which would make a
/// sidecar drop its consumer and back off), and the next message goes out
/// once the first is acked.
#[tokio::test]
async fn a_strict_subscriptions_consumer_lets_one_message_out_at_a_time_across_pods() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let spec = SubscriptionSpec { ordering: Ordering::Strict, ..SubscriptionSpec::new("orders", "ledger") };
    op.apply_subscription(&build::subscription("shop", "ledger", &spec).unwrap()).await.unwrap();
    for i in 0..3 {
        js.publish(format!("ferry.shop.orders.{i}"), "m".into()).await.unwrap().await.unwrap();
    }
    let pod = || async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
        stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("ledger").await.unwrap()
    };
    let fetch = |c: async_nats::jetstream::consumer::PullConsumer| async move {
        let batch = c.fetch().max_messages(10).expires(std::time::Duration::from_millis(500)).messages().await;
        let messages: Vec<_> = batch.unwrap().collect().await;
        messages.into_iter().collect::<Result<Vec<_>, _>>().expect("an empty fetch, not an error")
    };
    let (a, b) = (pod().await, pod().await);
    let first = fetch(a.clone()).await;
    assert_eq!(first.len(), 1, "one message out, though 10 were asked for");
    assert!(fetch(b.clone()).await.is_empty(), "the other pod gets none while it is unacked");
    assert!(fetch(a.clone()).await.is_empty(), "nor does the same pod");
    first[0].double_ack().await.unwrap();
    let second = fetch(b).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].info().unwrap().stream_sequence, 2, "in order");
}

/// What `validate_topic` refuses of a stream's age limit and dedupe window
/// is what JetStream refuses, no more and no less.
#[tokio::test]
async fn topic_validation_refuses_the_age_limits_and_dedupe_windows_the_broker_refuses() {
    let nats = NatsServer::start();
    let (_op, js) = connect(&nats).await;
    let ms = D::from_millis;
    let cases = [
        (Some(ms(60_000)), ms(120_000)),
        (Some(ms(60_000)), ms(60_000)),
        (Some(ms(120_000)), ms(60_000)),
        (None, ms(99)),
        (None, ms(100)),
        (Some(ms(99)), ms(99)),
        (Some(ms(100)), ms(100)),
        (Some(ferry_api::duration::MAX), ms(120_000)),
    ];
    for (i, (max_age, window)) in cases.into_iter().enumerate() {
        let spec = TopicSpec {
            retention: ferry_api::topic::Retention { max_age, ..Default::default() },
            duplicate_window: window,
            ..TopicSpec::default()
        };
        let name = format!("t{i}");
        let refused_here = ferry_api::plan::validate_topic("shop", &name, &spec);
        let refused_there = js.create_stream(ferry_api::stream_plan("shop", &name, &spec).to_jetstream()).await.err();
        assert_eq!(
            refused_here.is_empty(),
            refused_there.is_none(),
            "maxAge {max_age:?}, duplicateWindow {window}: here {refused_here:?}, broker {refused_there:?}"
        );
    }
}

#[tokio::test]
async fn a_broker_that_is_down_is_reported_as_unavailable() {
    let mut nats = NatsServer::start();
    let (op, _js) = connect(&nats).await;
    nats.stop();
    let err = op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap_err();
    assert_eq!(err.category(), "BrokerUnavailable", "{err:?}");
}

/// `--config-replicas`: the config bucket is made with that many replicas.
#[tokio::test]
async fn the_config_bucket_is_made_with_the_configured_replicas() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let op = JetStream::new(client.clone()).with_config_replicas(1);
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream("KV_ferry-config").await.unwrap();
    let config = s.info().await.unwrap().config.clone();
    assert_eq!((config.num_replicas, config.max_messages_per_subject), (1, 1));
}

/// Three replicas on a single, non-clustered server: the server refuses a
/// new bucket; the operator says which setting asked for what, and what the
/// server said, as a refusal (looked at again on the refresh period) — no
/// panic, and no bucket of 1 replica made behind the flag's back.
#[tokio::test]
async fn more_config_replicas_than_the_broker_has_servers_is_a_clear_refusal() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let three = JetStream::new(client.clone()).with_config_replicas(3);
    let err = three.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap_err();
    assert_eq!(err.category(), "BrokerRefused", "{err}");
    let text = err.to_string();
    assert!(text.contains("config bucket ferry-config with 3 replica(s) (--config-replicas)"), "{text}");
    assert!(text.contains("replicas > 1 not supported in non-clustered mode"), "{text}");
    assert!(js.get_stream("KV_ferry-config").await.is_err(), "no bucket is made");
}

/// An existing bucket whose replica count differs from `--config-replicas`
/// is updated to it. (nats-server 2.12 takes the update of an existing
/// stream to 3 replicas even when not clustered: it records 3 and keeps
/// the one copy it can; a cluster makes the copies.)
#[tokio::test]
async fn an_existing_config_bucket_gets_the_configured_replicas() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let replicas = || async {
        let mut s = js.get_stream("KV_ferry-config").await.unwrap();
        s.info().await.unwrap().config.num_replicas
    };
    JetStream::new(client.clone()).bucket().await.unwrap().put("k", "v".into()).await.unwrap();
    assert_eq!(replicas().await, 1);
    let store = JetStream::new(client.clone()).with_config_replicas(3).bucket().await.unwrap();
    assert_eq!(replicas().await, 3, "updated to --config-replicas");
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]), "the entries stay");
    JetStream::new(client.clone()).with_config_replicas(1).bucket().await.unwrap();
    assert_eq!(replicas().await, 1, "and back");
}

/// Fetches up to `n` messages (without acking them).
async fn fetch(c: &async_nats::jetstream::consumer::PullConsumer, n: usize) -> Vec<async_nats::jetstream::Message> {
    let batch = c.fetch().max_messages(n).expires(std::time::Duration::from_millis(500)).messages().await.unwrap();
    batch.collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>().unwrap()
}

/// `fanout: Pod`: each sidecar makes its own consumer `{subscription}_{pod}`;
/// the Subscription's counts are theirs summed. A consumer of another
/// Subscription whose name starts alike (`audit-b_…`, `audit--b_web-1`,
/// the group consumer `audit--x`) is not counted.
#[tokio::test]
async fn a_pod_fanout_subscription_counts_its_pod_consumers_and_no_other_subscriptions() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    assert_eq!(op.pod_consumer_counts("shop", "orders", "audit").await.unwrap(), None, "no stream yet");
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let spec = SubscriptionSpec { fanout: Fanout::Pod, ..SubscriptionSpec::new("orders", "audit") };
    assert_eq!(op.pod_consumer_counts("shop", "orders", "audit").await.unwrap(), Some(vec![]), "no pod yet");
    let a = pod_consumer(&js, "audit", &spec, "audit-7d9f-a").await;
    pod_consumer(&js, "audit", &spec, "audit-7d9f-b").await;
    let other = pod_consumer(&js, "audit-b", &spec, "p1").await;
    pod_consumer(&js, "audit--b", &spec, "web-1").await;
    let group = SubscriptionSpec::new("orders", "ledger");
    op.apply_subscription(&build::subscription("shop", "audit--x", &group).unwrap()).await.unwrap();
    for i in 0..5 {
        js.publish(format!("ferry.shop.orders.{i}"), "m".into()).await.unwrap().await.unwrap();
    }
    // Pod a: two out, handed back, out again (redelivered), unacked.
    for m in fetch(&a, 2).await {
        m.double_ack_with(AckKind::Nak(None)).await.unwrap();
    }
    assert_eq!(fetch(&a, 2).await.len(), 2);
    // The other Subscription's pod holds one.
    assert_eq!(fetch(&other, 1).await.len(), 1);

    let mine = op.pod_consumer_counts("shop", "orders", "audit").await.unwrap().expect("the stream exists");
    let names: Vec<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["audit_audit-7d9f-a", "audit_audit-7d9f-b"]);
    let sum: ConsumerCounts = mine.into_iter().map(|(_, c)| c).sum();
    assert_eq!(sum, ConsumerCounts { pending: 3 + 5, in_flight: 2, redelivered: 2 });
    let theirs = op.pod_consumer_counts("shop", "orders", "audit-b").await.unwrap().unwrap();
    assert_eq!(theirs, [("audit-b_p1".to_owned(), ConsumerCounts { pending: 4, in_flight: 1, redelivered: 0 })]);
    assert_eq!(
        op.consumer_counts("shop", "orders", "audit--x").await.unwrap(),
        Some(ConsumerCounts { pending: 5, in_flight: 0, redelivered: 0 })
    );
    assert_eq!(op.consumer_counts("shop", "orders", "audit").await.unwrap(), None, "no group consumer");
    assert_eq!(op.consumer_counts("shop", "missing", "audit").await.unwrap(), None, "no stream");

    // Deleting the Subscription deletes its pod consumers (a Subscription
    // made again under its name would otherwise take up their positions
    // within their threshold), and no other Subscription's.
    op.delete_subscription("shop", "audit", "orders", "audit").await.unwrap();
    let stream = js.get_stream("FERRY_shop_orders").await.unwrap();
    let left: std::collections::BTreeSet<String> = stream.consumer_names().try_collect().await.unwrap();
    assert_eq!(left, ["audit--b_web-1", "audit--x", "audit-b_p1"].map(String::from).into());
}

/// The operator reads a gone pod's consumer until the broker drops it:
/// reading its info is no activity that would keep it past its threshold.
#[tokio::test]
async fn reading_pod_consumer_counts_does_not_keep_a_gone_pods_consumer_alive() {
    let nats = NatsServer::start();
    let (op, js) = connect(&nats).await;
    op.apply_topic(&build::topic("shop", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let spec = SubscriptionSpec { fanout: Fanout::Pod, ..SubscriptionSpec::new("orders", "audit") };
    // As a sidecar started with `--pod-consumer-ttl 1s`.
    let mut plan = ferry_api::consumer_plan("shop", "audit", &spec, Some("web-1"));
    plan.inactive_threshold = Some(std::time::Duration::from_secs(1));
    js.get_stream("FERRY_shop_orders").await.unwrap().create_consumer(plan.to_jetstream()).await.unwrap();
    assert_eq!(op.pod_consumer_counts("shop", "orders", "audit").await.unwrap().unwrap().len(), 1);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !op.pod_consumer_counts("shop", "orders", "audit").await.unwrap().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the consumer outlived its threshold while being read");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
