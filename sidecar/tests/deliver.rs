//! Delivery side against a real nats-server and a real HTTP app on loopback:
//! one test per row of the answer table, dead letters, ordering, dedupe,
//! groups and fanout, pull, and live config.

mod support;

use std::time::Duration;

use ferry_e2e::app::{Reply, TestApp};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

fn subscription(name: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec:\n  topic: orders\n  app: shop\n  path: /{name}\n  deadLetterTopic: orders-dlq\n  processingTimeout: 1s\n  backoff: {{initial: 50ms, max: 200ms}}\n{extra}"
    )
}

fn manifests_with(subs: &str) -> tempfile::TempDir {
    let topics = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders}\nspec: {partitions: 2}\n---\n\
                  apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {name: orders-dlq}\nspec: {}\n";
    manifests(&[("topics.yaml", topics), ("subs.yaml", subs)])
}

async fn start(nats: &NatsServer, res: &tempfile::TempDir, data: &tempfile::TempDir, app: &TestApp) -> Sidecar {
    start_with(nats, res, data, app, &[]).await
}

/// A configured sidecar pushing to `app`, with more flags.
async fn start_with(
    nats: &NatsServer,
    res: &tempfile::TempDir,
    data: &tempfile::TempDir,
    app: &TestApp,
    args: &[&str],
) -> Sidecar {
    let mut launch = Launch::new(nats.url(), res.path(), data.path()).arg("--app-port").arg(&app.port.to_string());
    for a in args {
        launch = launch.arg(a);
    }
    let mut sc = launch.start();
    sc.wait_configured();
    sc
}

async fn produce(sc: &Sidecar, id: &str, key: Option<&str>, body: &str) {
    produce_to(sc, "orders", id, key, body).await;
}

/// Consumer state from the broker: (pending, ack pending).
async fn consumer_state(nats: &NatsServer, consumer: &str) -> (u64, usize) {
    let js = jetstream(&nats.url()).await;
    let stream = js.get_stream("FERRY_default_orders").await.unwrap();
    let mut c: async_nats::jetstream::consumer::PullConsumer = stream.get_consumer(consumer).await.unwrap();
    let info = c.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

/// Waits until the broker shows nothing pending or unacked for the consumer.
async fn wait_settled(nats: &NatsServer, consumer: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = consumer_state(nats, consumer).await;
        if state == (0, 0) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "consumer {consumer} never settled: {state:?}");
        // The broker offers no event for "consumer idle"; poll its info.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters(nats: &NatsServer) -> Vec<async_nats::jetstream::message::StreamMessage> {
    stream_messages(&jetstream(&nats.url()).await, "FERRY_default_orders-dlq").await
}

#[tokio::test]
async fn a_2xx_answer_acks_and_the_push_carries_the_cloudevent_and_ferry_headers() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(204)).await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "o-1", Some("cust-1"), "one").await;
    let got = app.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.path, "/billing");
    assert_eq!(r.id(), "o-1");
    assert_eq!(&r.body[..], b"one");
    for (name, want) in [
        ("ce-specversion", "1.0"),
        ("ce-source", "/ferry/default/orders"),
        ("ce-type", "dev.ferry.message"),
        ("content-type", "text/plain"),
        ("ferry-attempt", "1"),
        ("ferry-subscription", "billing"),
        ("ferry-key", "cust-1"),
    ] {
        assert_eq!(r.header(name), Some(want), "{name}");
    }
    assert!(r.header("ce-time").is_some_and(|t| t.ends_with('Z')));
    assert!(
        r.header("traceparent").is_some_and(|t| t.starts_with("00-") && t.len() == 55),
        "{:?}",
        r.header("traceparent")
    );
    assert!(!r.delivery_id().is_empty());
    assert_eq!(r.header("authorization"), None, "no FERRY_APP_TOKEN, no credentials");
    wait_settled(&nats, "billing").await;
    assert_eq!(app.received().len(), 1, "acked: never delivered again");
}

/// The producer's W3C trace context reaches the subscriber: the push
/// carries the `traceparent` and `tracestate` the produce call came with.
#[tokio::test]
async fn the_push_continues_the_trace_of_the_produce_call() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(204)).await;
    let sc = start(&nats, &res, &data, &app).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = http()
        .post(sc.url("/v1/topics/orders/messages"))
        .header("ferry-id", "traced")
        .header("traceparent", parent)
        .header("tracestate", "congo=t61rcWkgMzE")
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let got = app.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("traceparent"), Some(parent));
    assert_eq!(got[0].header("tracestate"), Some("congo=t61rcWkgMzE"));
}

#[tokio::test]
async fn with_an_app_token_every_push_carries_it_as_a_bearer_token() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    // The app answers 200 with a body: the sidecar reads it, and the next
    // push still reaches the app.
    let app = TestApp::start(|_, _| Reply::status(200).with_body("thanks")).await;
    let sc = start_with(&nats, &res, &data, &app, &["--app-token", "app-s3cret"]).await;
    produce(&sc, "t-1", None, "one").await;
    produce(&sc, "t-2", None, "two").await;
    let got = app.wait_for(2, WAIT).await;
    for r in &got {
        assert_eq!(r.header("authorization"), Some("Bearer app-s3cret"), "{}", r.id());
    }
    wait_settled(&nats, "billing").await;
}

#[tokio::test]
async fn a_202_waits_for_the_ack_callback_and_without_one_redelivers_after_the_timeout() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(202)).await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "cb-1", None, "x").await;
    let first = app.wait_for(1, WAIT).await;
    let resp = http().post(sc.url(&format!("/v1/deliveries/{}/ack", first[0].delivery_id()))).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("acked")), "{body}");
    wait_settled(&nats, "billing").await;
    // A second callback for the same delivery finds nothing.
    let resp = http().post(sc.url(&format!("/v1/deliveries/{}/ack", first[0].delivery_id()))).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("delivery_not_found")));

    // No callback: after processingTimeout (1s) it is delivered again.
    produce(&sc, "cb-2", None, "y").await;
    let got = app.wait_until(WAIT, |r| r.iter().filter(|r| r.id() == "cb-2").count() >= 2).await;
    let tries: Vec<_> = got.iter().filter(|r| r.id() == "cb-2").collect();
    assert_eq!(tries[1].attempt(), 2);
    assert!(tries[1].at - tries[0].at >= Duration::from_secs(1), "redelivered before the processing timeout");
    let resp = http().post(sc.url(&format!("/v1/deliveries/{}/ack", tries[1].delivery_id()))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    wait_settled(&nats, "billing").await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_not_redelivered_before_that_delay() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|r, _| {
        if r.attempt() == 1 {
            Reply::status(429).with_header("retry-after", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "busy-1", None, "x").await;
    let got = app.wait_for(2, WAIT).await;
    assert_eq!((got[0].attempt(), got[1].attempt()), (1, 2));
    assert!(got[1].at - got[0].at >= Duration::from_secs(2), "retried after {:?}", got[1].at - got[0].at);
    wait_settled(&nats, "billing").await;
    assert_eq!(app.received().len(), 2);
}

#[tokio::test]
async fn a_422_is_dead_lettered_at_once_with_headers_naming_its_origin() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", ""));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(422).with_body("amount must be positive")).await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "bad-1", Some("k"), "payload").await;
    app.wait_for(1, WAIT).await;
    wait_settled(&nats, "billing").await;
    let dl = dead_letters(&nats).await;
    assert_eq!(dl.len(), 1);
    let m = &dl[0];
    assert_eq!(&m.payload[..], b"payload");
    for (name, want) in [
        ("Nats-Msg-Id", "billing:bad-1"),
        ("ferry-origin-id", "bad-1"),
        ("ferry-origin-topic", "orders"),
        ("ferry-origin-subscription", "billing"),
        ("ferry-attempts", "1"),
        ("ferry-last-status", "422"),
        ("ferry-last-error", "amount must be positive"),
        ("ferry-key", "k"),
    ] {
        assert_eq!(header(m, name).as_deref(), Some(want), "{name}");
    }
    assert_eq!(app.received().len(), 1, "a rejected message is not retried");
}

#[tokio::test]
async fn two_subscriptions_rejecting_one_message_into_one_dead_letter_topic_each_leave_their_letter() {
    let nats = NatsServer::start();
    let res = manifests_with(&format!("{}{}", subscription("billing", ""), subscription("shipping", "")));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(422).with_body("no")).await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "bad-1", None, "payload").await;
    app.wait_for(2, WAIT).await;
    wait_settled(&nats, "billing").await;
    wait_settled(&nats, "shipping").await;
    let dl = dead_letters(&nats).await;
    let mut letters: Vec<(Option<String>, Option<String>, Option<String>)> = dl
        .iter()
        .map(|m| (header(m, "Nats-Msg-Id"), header(m, "ferry-origin-id"), header(m, "ferry-origin-subscription")))
        .collect();
    letters.sort();
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        letters,
        [
            (some("billing:bad-1"), some("bad-1"), some("billing")),
            (some("shipping:bad-1"), some("bad-1"), some("shipping"))
        ],
        "each subscription's dead letter is kept, not dropped as the other's duplicate"
    );
}

#[tokio::test]
async fn a_subscription_the_broker_refuses_does_not_keep_the_others_or_a_later_change_from_applying() {
    let nats = NatsServer::start();
    // The broker already holds a consumer `stuck` that starts at the
    // earliest message; its manifest says Latest, an edit JetStream refuses.
    let js = jetstream(&nats.url()).await;
    let spec = ferry_api::topic::TopicSpec { partitions: 2, ..Default::default() };
    let stream = js.create_stream(ferry_api::stream_plan("default", "orders", &spec).to_jetstream()).await.unwrap();
    let stuck = ferry_api::subscription::SubscriptionSpec::new("orders", "shop");
    let mut config = ferry_api::consumer_plan("default", "stuck", &stuck, None).to_jetstream();
    config.deliver_policy = async_nats::jetstream::consumer::DeliverPolicy::All;
    stream.create_consumer(config).await.unwrap();

    let res = manifests_with(&format!("{}{}", subscription("billing", ""), subscription("stuck", "")));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(200)).await;
    let mut sc = start(&nats, &res, &data, &app).await;
    let refused = sc.process.wait_for_line("the broker refuses this object", WAIT);
    assert!(refused.contains("subscription stuck"), "{refused}");
    produce(&sc, "o-1", None, "one").await;
    app.wait_until(WAIT, |rs| rs.iter().any(|r| r.path == "/billing" && r.id() == "o-1")).await;
    // A later change still applies: a new subscription starts.
    std::fs::write(res.path().join("later.yaml"), subscription("later", "")).unwrap();
    sc.process.wait_for_line("starting subscription subscription=later", WAIT);
    produce(&sc, "o-2", None, "two").await;
    app.wait_until(WAIT, |rs| rs.iter().any(|r| r.path == "/later" && r.id() == "o-2")).await;
    // An edit a running consumer cannot take is refused whole, with its field.
    std::fs::write(res.path().join("later.yaml"), subscription("later", "  startPosition: Earliest\n")).unwrap();
    let line = sc.process.wait_for_line("changed manifests are invalid", WAIT);
    assert!(line.contains("Subscription later: spec.startPosition cannot be changed"), "{line}");
}

#[tokio::test]
async fn errors_are_retried_with_backoff_exactly_max_deliveries_times_then_dead_lettered() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", "  maxDeliveries: 3\n"));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(500).with_body("boom")).await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "fail-1", None, "x").await;
    app.wait_for(3, WAIT).await;
    wait_settled(&nats, "billing").await;
    let got = app.received();
    assert_eq!(got.iter().map(|r| r.attempt()).collect::<Vec<_>>(), [1, 2, 3]);
    let dl = dead_letters(&nats).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(header(&dl[0], "ferry-attempts").as_deref(), Some("3"));
    assert_eq!(header(&dl[0], "ferry-last-status").as_deref(), Some("500"));
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retried() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("billing", "  maxDeliveries: 10\n"));
    let data = tempfile::tempdir().unwrap();
    // Attempt 1 takes longer than the 1s processing timeout.
    let app =
        TestApp::start(
            |r, _| if r.attempt() == 1 { Reply::slow(200, Duration::from_secs(3)) } else { Reply::status(200) },
        )
        .await;
    let sc = start(&nats, &res, &data, &app).await;
    produce(&sc, "slow-1", None, "x").await;
    let got = app.wait_until(WAIT, |r| r.iter().any(|r| r.attempt() >= 2)).await;
    assert!(got.iter().any(|r| r.id() == "slow-1" && r.attempt() >= 2));
    wait_settled(&nats, "billing").await;
    assert!(dead_letters(&nats).await.is_empty());
    drop(sc);

    // Nothing listens on the app port: refused, retried until max, dead-lettered.
    let nats2 = NatsServer::start();
    let res2 = manifests_with(&subscription("billing", "  maxDeliveries: 2\n"));
    let data2 = tempfile::tempdir().unwrap();
    let closed = free_port();
    let mut sc2 =
        Launch::new(nats2.url(), res2.path(), data2.path()).arg("--app-port").arg(&closed.to_string()).start();
    sc2.wait_configured();
    produce(&sc2, "nobody-home", None, "x").await;
    wait_settled(&nats2, "billing").await;
    let dl = dead_letters(&nats2).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(header(&dl[0], "ferry-last-status").as_deref(), Some("refused"));
    assert_eq!(header(&dl[0], "ferry-attempts").as_deref(), Some("2"));
}
