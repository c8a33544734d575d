//! The cluster config path: the operator writes the resolved Topics and
//! Subscriptions to the broker's KV bucket; a sidecar given `--broker` and no
//! `--resources` picks them up live and delivers.

mod support;

use std::process::Command;
use std::time::Duration;

use ferry_api::subscription::SubscriptionSpec;
use ferry_api::topic::{DeletionPolicy, TopicSpec};
use ferry_e2e::app::{Reply, TestApp};
use ferry_operator::{build, jetstream::JetStream};
use support::*;

/// A sidecar of app `shop` on `nats`, with no `--resources` (so it follows
/// the KV bucket); returns it and its API port.
fn sidecar_of_app_shop(nats: &NatsServer, app: &TestApp, data: &std::path::Path) -> (Process, u16) {
    let (sc, api, _) = kv_sidecar(nats, app, data);
    (sc, api)
}

/// [`sidecar_of_app_shop`], with its admin port too.
fn kv_sidecar(nats: &NatsServer, app: &TestApp, data: &std::path::Path) -> (Process, u16, u16) {
    let (api, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"));
    cmd.env_remove("RUST_LOG")
        .args(["--app-id", "shop", "--broker", &nats.url(), "--app-port", &app.port.to_string()])
        .args(["--api-addr", &format!("127.0.0.1:{api}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .arg("--data-dir")
        .arg(data);
    (Process::spawn("ferry-sidecar", cmd), api, admin)
}

/// A sidecar of app `shop` following the KV bucket, started: the process,
/// its API and its admin base URLs.
fn started_kv_sidecar(nats: &NatsServer, app: &TestApp, data: &std::path::Path) -> (Process, String, String) {
    let (mut sc, api, admin) = kv_sidecar(nats, app, data);
    sc.wait_for_line("ferry-sidecar started", START_TIMEOUT);
    (sc, format!("http://127.0.0.1:{api}"), format!("http://127.0.0.1:{admin}"))
}

async fn status_of(req: reqwest::RequestBuilder) -> (u16, Option<String>) {
    let resp = req.send().await.unwrap();
    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), retry_after)
}

/// Until the config bucket's state has been read whole, a topic the app
/// names may only not be loaded yet: the sidecar is not ready, and a
/// produce is 503 with `Retry-After`, not 404 (which an app takes as final).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_config_bucket_is_read_the_sidecar_is_not_ready_and_produce_is_503() {
    let nats = NatsServer::start();
    let app = TestApp::ok().await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api, admin) = started_kv_sidecar(&nats, &app, data.path());
    sc.wait_for_line("event: connected", START_TIMEOUT);
    // No operator has made the bucket yet.
    let c = http();
    assert_eq!(status_of(c.get(format!("{admin}/readyz"))).await.0, 503);
    let produce = || c.post(format!("{api}/v1/topics/orders/messages")).body("x");
    assert_eq!(status_of(produce()).await, (503, Some("1".to_owned())));

    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    op.apply_topic(&build::topic("default", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    sc.wait_for_line("configuration loaded from the config bucket", START_TIMEOUT);
    assert_eq!(status_of(c.get(format!("{admin}/readyz"))).await.0, 200);
    assert_eq!(status_of(produce()).await.0, 202);
}

/// A namespace with no entry in the bucket is a whole state too: ready,
/// and an unknown topic is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_namespace_in_the_config_bucket_is_loaded_and_an_unknown_topic_is_404() {
    let nats = NatsServer::start();
    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    op.apply_topic(&build::topic("elsewhere", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let app = TestApp::ok().await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api, admin) = started_kv_sidecar(&nats, &app, data.path());
    sc.wait_for_line("configuration loaded from the config bucket", START_TIMEOUT);
    let c = http();
    assert_eq!(status_of(c.get(format!("{admin}/readyz"))).await.0, 200);
    assert_eq!(status_of(c.post(format!("{api}/v1/topics/orders/messages")).body("x")).await, (404, None));
}

/// Produces `id` to `orders` with `ack=broker` and waits for the app to
/// get it (as its first message) on `path`.
async fn produce_and_see_it_pushed(api: u16, app: &TestApp, id: &str, path: &str) {
    let resp = http()
        .post(format!("http://127.0.0.1:{api}/v1/topics/orders/messages?ack=broker"))
        .header("ferry-id", id)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let got = app.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!((got[0].id(), got[0].path.as_str()), (id, path));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_operator_writes_reaches_a_running_sidecar_and_is_delivered() {
    let nats = NatsServer::start();
    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    op.apply_topic(&build::topic("default", "orders", &TopicSpec::default()).unwrap()).await.unwrap();

    let app = TestApp::start(|_, _| Reply::status(200)).await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api) = sidecar_of_app_shop(&nats, &app, data.path());
    sc.wait_for_line("configuration applied", START_TIMEOUT);

    // The operator adds a Subscription for this app while the sidecar runs.
    let spec = SubscriptionSpec { path: "/in".into(), ..SubscriptionSpec::new("orders", "shop") };
    op.apply_subscription(&build::subscription("default", "billing", &spec).unwrap()).await.unwrap();
    sc.wait_for_line("starting subscription subscription=billing", START_TIMEOUT);
    produce_and_see_it_pushed(api, &app, "kv-1", "/in").await;

    // A Subscription of another app is not this sidecar's.
    let other = SubscriptionSpec::new("orders", "other-app");
    op.apply_subscription(&build::subscription("default", "audit", &other).unwrap()).await.unwrap();
    // Deleting ours stops it.
    op.delete_subscription("default", "billing", "orders", "shop").await.unwrap();
    sc.wait_for_line("stopping subscription", START_TIMEOUT);
    assert!(!sc.output().iter().any(|l| l.contains("subscription=audit")), "{:#?}", sc.output());
}

/// Produces a message (`ack=local`) the test app will refuse.
async fn produce_refused(api: u16, id: &str) {
    let url = format!("http://127.0.0.1:{api}/v1/topics/orders/messages");
    let resp = http().post(url).header("ferry-id", id).body("refused").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_messages_are_counted_where_the_operator_reads_them() {
    let nats = NatsServer::start();
    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    for t in ["orders", "orders-dlq"] {
        op.apply_topic(&build::topic("default", t, &TopicSpec::default()).unwrap()).await.unwrap();
    }
    let spec =
        SubscriptionSpec { dead_letter_topic: Some("orders-dlq".into()), ..SubscriptionSpec::new("orders", "shop") };
    op.apply_subscription(&build::subscription("default", "billing", &spec).unwrap()).await.unwrap();
    assert_eq!(op.sidecar_stats("default", "billing").await.unwrap().dead_lettered, 0);

    let app = TestApp::start(|_, _| Reply::status(422)).await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api) = sidecar_of_app_shop(&nats, &app, data.path());
    sc.wait_for_line("starting subscription subscription=billing", START_TIMEOUT);
    for (n, id) in ["dl-1", "dl-2"].into_iter().enumerate() {
        produce_refused(api, id).await;
        sc.wait_for_lines("dead-lettered", n + 1, START_TIMEOUT);
        // The count is written off the delivery path, soon after.
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while op.sidecar_stats("default", "billing").await.unwrap().dead_lettered != n as u64 + 1 {
            assert!(std::time::Instant::now() < deadline, "the count never reached {}", n + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Deleting the Subscription removes its count too.
    op.delete_subscription("default", "billing", "orders", "shop").await.unwrap();
    assert_eq!(op.sidecar_stats("default", "billing").await.unwrap().dead_lettered, 0);
}

/// Subscription `billing`'s drop count and last reason, as the operator reads them.
async fn dropped(op: &JetStream) -> (u64, Option<String>) {
    let stats = op.sidecar_stats("default", "billing").await.unwrap();
    (stats.dropped, stats.last_dropped)
}

/// Without a dead-letter topic, a message the app rejects is dropped: the
/// sidecar counts it and notes why where the operator reads both (for the
/// status and a Warning event), beside its log line and metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_messages_are_counted_with_the_last_reason_where_the_operator_reads_them() {
    let nats = NatsServer::start();
    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    op.apply_topic(&build::topic("default", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    op.apply_subscription(
        &build::subscription("default", "billing", &SubscriptionSpec::new("orders", "shop")).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(dropped(&op).await, (0, None));

    let app = TestApp::start(|_, _| Reply::status(422).with_body("no such customer")).await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api) = sidecar_of_app_shop(&nats, &app, data.path());
    sc.wait_for_line("starting subscription subscription=billing", START_TIMEOUT);
    for (n, id) in ["drop-1", "drop-2"].into_iter().enumerate() {
        produce_refused(api, id).await;
        sc.wait_for_lines("dropping a message: no dead-letter topic", n + 1, START_TIMEOUT);
        // Written off the delivery path, soon after.
        let want = (n as u64 + 1, Some(format!("{id}: 1 attempt(s), last status 422: no such customer")));
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let now = dropped(&op).await;
            if now == want {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never {want:?}: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Deleting the Subscription removes both notes.
    op.delete_subscription("default", "billing", "orders", "shop").await.unwrap();
    assert_eq!(dropped(&op).await, (0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_topic_is_gone_does_not_keep_the_others_from_starting() {
    let nats = NatsServer::start();
    let op = JetStream::new(async_nats::connect(nats.url()).await.unwrap());
    op.apply_topic(&build::topic("default", "orders", &TopicSpec::default()).unwrap()).await.unwrap();
    let good = SubscriptionSpec { path: "/in".into(), ..SubscriptionSpec::new("orders", "shop") };
    op.apply_subscription(&build::subscription("default", "billing", &good).unwrap()).await.unwrap();
    // Its Topic is deleted (with its stream) while the config still names
    // the subscription: no stream holds its consumer any more.
    op.apply_topic(&build::topic("default", "gone", &TopicSpec::default()).unwrap()).await.unwrap();
    let ghost = SubscriptionSpec { path: "/ghost".into(), ..SubscriptionSpec::new("gone", "shop") };
    op.apply_subscription(&build::subscription("default", "ghost", &ghost).unwrap()).await.unwrap();
    op.delete_topic("default", "gone", DeletionPolicy::Delete).await.unwrap();

    let app = TestApp::start(|_, _| Reply::status(200)).await;
    let data = tempfile::tempdir().unwrap();
    let (mut sc, api) = sidecar_of_app_shop(&nats, &app, data.path());
    sc.wait_for_line("configuration applied", START_TIMEOUT);
    produce_and_see_it_pushed(api, &app, "kv-2", "/in").await;
}
