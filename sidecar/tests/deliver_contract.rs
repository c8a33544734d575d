//! The push delivery contract of DESIGN.md §3.2, against a real
//! nats-server, the real sidecar binary and a real HTTP app on loopback:
//! `maxInFlight` bounds the pushes at the app at once; a delivery the app
//! answered 202 stays leased at the broker (progress heartbeats) past the
//! broker's ack wait until the app calls back; a rejected message is settled
//! only once its dead letter is stored (its dead-letter stream gone
//! meanwhile); and a `fanout: Pod` subscription's per-pod consumer stays
//! while its sidecar runs and goes once the sidecar is gone.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_e2e::app::{Reply, TestApp};
use support::*;

const STREAM: &str = "FERRY_default_orders";
const DLQ_STREAM: &str = "FERRY_default_orders-dlq";

async fn produce(sc: &Sidecar, id: &str) {
    produce_to(sc, "orders", id, None, &format!("body of {id}")).await;
}

/// The names of the consumers of the `orders` stream.
async fn consumer_names(nats: &NatsServer) -> Vec<String> {
    let js = jetstream(&nats.url()).await;
    let stream = js.get_stream(STREAM).await.unwrap();
    futures::StreamExt::collect(futures::StreamExt::map(stream.consumer_names(), |n| n.unwrap())).await
}

/// Polls the metrics page until `series` reads `want` (the counters move
/// just after the broker has the settlement; no event says so).
async fn wait_metric(sc: &Sidecar, series: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(sc, series).await;
        if now == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} never reached {want}: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 20 messages are all at the broker well before the first push is
/// answered (each takes 500 ms), so without the bound the sidecar would have
/// up to its default of 32 at the app at once; with `maxInFlight: 4` the app
/// sees exactly 4 at a time (never more, and the window is used in full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_bounds_the_pushes_at_the_app_at_once() {
    const N: usize = 20;
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("bounded", "orders", &["maxInFlight: 4"]));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::slow(200, Duration::from_millis(500))).await;
    let sc = start(&nats, res.path(), data.path(), Some(&app), &[]);
    for i in 0..N {
        produce(&sc, &format!("m-{i:02}")).await;
    }
    app.wait_for(N, WAIT).await;
    wait_settled(&nats, "bounded").await;
    assert_eq!(app.max_concurrent(), 4, "requests at the app at once with maxInFlight: 4");
    let want: BTreeMap<String, usize> = (0..N).map(|i| (format!("m-{i:02}"), 1)).collect();
    assert_eq!(counts(&app.received()), want, "each message pushed once");
    wait_metric(&sc, &deliveries("bounded", "acked"), N as f64).await;
    let info = consumer_info(&nats, STREAM, "bounded").await;
    assert_eq!(info.ack_floor.stream_sequence, N as u64, "every message acked at the broker: {info:?}");
    assert_eq!(info.delivered.consumer_sequence, N as u64, "none delivered twice by the broker: {info:?}");
}

/// `processingTimeout` is the broker's ack wait (4 s here). The app takes
/// 2.5 s to answer 202 and calls back 2 s later: 4.5 s after the broker
/// delivered the message, past its ack wait, yet within the processing
/// timeout counted from the 202. The sidecar keeps the lease alive
/// meanwhile (progress heartbeats): the broker delivers the message once,
/// and the app's ack settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_keeps_the_message_leased_past_the_brokers_ack_wait_until_the_callback() {
    const ACK_WAIT: Duration = Duration::from_secs(4);
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("deferred", "orders", &["processingTimeout: 4s"]));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::slow(202, Duration::from_millis(2500))).await;
    let sc = start(&nats, res.path(), data.path(), Some(&app), &[]);
    let info = consumer_info(&nats, STREAM, "deferred").await;
    assert_eq!(info.config.ack_wait, ACK_WAIT, "processingTimeout is the broker's ack wait");
    assert!(info.config.backoff.is_empty(), "no BackOff replacing the ack wait: {:?}", info.config.backoff);

    produce(&sc, "d-1").await;
    // Recorded as the 202 leaves, 2.5 s after the push arrived.
    let got = app.wait_for(1, WAIT).await;
    // The span the app works after its 202 is the point of the test, not
    // something to wait for.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_after = got[0].at.elapsed();
    assert!(acked_after > ACK_WAIT, "the callback comes {acked_after:?} after the push: not past the ack wait");
    let resp = http().post(sc.url(&format!("/v1/deliveries/{}/ack", got[0].delivery_id()))).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("acked")), "{body}");
    wait_settled(&nats, "deferred").await;

    let info = consumer_info(&nats, STREAM, "deferred").await;
    assert_eq!(info.delivered.consumer_sequence, 1, "the broker delivered the message again: {info:?}");
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 1, "acked at the broker: {info:?}");
    let seen: Vec<(String, u32)> = app.received().iter().map(|r| (r.id().to_owned(), r.attempt())).collect();
    assert_eq!(seen, [("d-1".to_owned(), 1)], "pushed to the app once");
    assert_eq!(metric(&sc, &deliveries("deferred", "acked")).await, Some(1.0));
    assert_eq!(metric(&sc, &deliveries("deferred", "retried")).await, None);
}

/// The app rejects a message (422) while its dead-letter topic's stream is
/// gone: the dead-letter publish fails, and the original must not be
/// settled meanwhile (it stays leased: not acked, not redelivered, not
/// lost) for several of the broker's ack waits (1 s). Once the stream is
/// back the dead letter is stored, once, and only then is the original
/// settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_stored_before_its_original_is_settled() {
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("rejects", "orders", &["processingTimeout: 1s"]));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start(|_, _| Reply::status(422).with_body("no such order")).await;
    let mut sc = start(&nats, res.path(), data.path(), Some(&app), &[]);
    let js = jetstream(&nats.url()).await;
    let config = js.get_stream(DLQ_STREAM).await.unwrap().info().await.unwrap().config.clone();
    assert!(js.delete_stream(DLQ_STREAM).await.unwrap().success);

    produce(&sc, "r-1").await;
    app.wait_for(1, WAIT).await;
    sc.process.wait_for_line("dead-letter publish failed", WAIT);
    // Time-based behaviour: a few of the broker's ack waits pass with the
    // dead letter refused; had the original been settled, or its lease run
    // out, the broker would show it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let info = consumer_info(&nats, STREAM, "rejects").await;
    assert_eq!(info.num_ack_pending, 1, "the original is settled though its dead letter is not stored: {info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 0, "{info:?}");
    assert_eq!(info.delivered.consumer_sequence, 1, "its lease ran out: the broker delivered it again: {info:?}");
    assert!(js.get_stream(DLQ_STREAM).await.is_err(), "the dead-letter stream came back on its own");
    assert_eq!(metric(&sc, &deliveries("rejects", "dead_lettered")).await, None);
    assert_eq!(app.received().len(), 1);

    js.create_stream(config).await.unwrap();
    wait_settled(&nats, "rejects").await;
    let letters = stream_messages(&js, DLQ_STREAM).await;
    assert_eq!(msg_ids(&letters), ["rejects:r-1"], "the dead letter, stored once");
    assert_eq!(header(&letters[0], "ferry-origin-id").as_deref(), Some("r-1"));
    assert_eq!(header(&letters[0], "ferry-origin-subscription").as_deref(), Some("rejects"));
    assert_eq!(header(&letters[0], "ferry-last-status").as_deref(), Some("422"));
    assert_eq!(letters[0].payload.as_ref(), b"body of r-1");
    wait_metric(&sc, &deliveries("rejects", "dead_lettered"), 1.0).await;
    let info = consumer_info(&nats, STREAM, "rejects").await;
    assert_eq!(info.delivered.consumer_sequence, 1, "delivered by the broker once: {info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 1, "the original settled: {info:?}");
    assert_eq!(app.received().len(), 1, "not pushed again");
}

/// A `fanout: Pod` push subscription with `--pod-consumer-ttl 2s` (longer
/// than a fetch's 1 s expiry, so no gap between two fetches reaches it): its
/// per-pod consumer stays for twice that idle limit while the sidecar runs
/// with nothing to deliver (its fetches keep it in use), and the broker
/// removes it once the sidecar is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_pod_push_consumer_stays_while_its_sidecar_runs_and_goes_once_it_is_gone() {
    const TTL: Duration = Duration::from_secs(2);
    let nats = NatsServer::start();
    let res = manifests_with(&subscription("cache", "orders", &["fanout: Pod"]));
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::ok().await;
    let mut sc =
        start(&nats, res.path(), data.path(), Some(&app), &["--pod-name", "shop-a", "--pod-consumer-ttl", "2s"]);
    let consumer = "cache_shop-a";
    let deadline = Instant::now() + WAIT;
    // The broker offers no event for a consumer made; poll its list.
    while !consumer_names(&nats).await.iter().any(|n| n == consumer) {
        assert!(Instant::now() < deadline, "the per-pod consumer never appeared: {:?}", consumer_names(&nats).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = consumer_info(&nats, STREAM, consumer).await;
    assert_eq!(info.config.inactive_threshold, TTL, "--pod-consumer-ttl is the broker's idle limit");

    // Time-based behaviour: twice the idle limit with no message, the
    // consumer present throughout.
    let idle = Instant::now();
    while idle.elapsed() < 2 * TTL + Duration::from_millis(500) {
        let names = consumer_names(&nats).await;
        assert_eq!(names, [consumer], "after {:?} of idling, while the sidecar runs", idle.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still the one in use: a message now reaches the app.
    produce(&sc, "f-1").await;
    app.wait_for(1, WAIT).await;
    wait_settled(&nats, consumer).await;

    sc.process.signal(15);
    assert!(sc.process.wait_exit(START_TIMEOUT).success());
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    loop {
        let names = consumer_names(&nats).await;
        if names.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the per-pod consumer outlived its sidecar by {:?}: {names:?}",
            stopped.elapsed()
        );
        // The broker offers no event for a consumer removed; poll its list.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
