//! Replaying a topic from the outbox after the broker lost what it had
//! confirmed: a real nats-server whose store is wiped, the real sidecar.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Waits until the stream holds `n` messages (the forwarder re-sends with
/// backoff while the broker recreates the stream); its ids in order.
async fn ids_once_stored(js: &async_nats::jetstream::Context, stream: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids = match js.get_stream(stream).await {
            Ok(_) => stored_ids(js, stream).await,
            Err(_) => Vec::new(),
        };
        if ids.len() >= n || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replay_after_the_broker_lost_its_store_forwards_the_kept_messages_again_in_order() {
    let mut nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--outbox-retention").arg("1h").start();
    sc.wait_configured();
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now() - Duration::from_secs(1)).to_string();
    let lost: Vec<String> = (0..5).map(|i| format!("lost-{i}")).collect();
    for id in &lost {
        produce_to(&sc, "audit", id, None, "x").await;
    }
    let stream = "FERRY_default_audit";
    assert_eq!(stored_ids(&jetstream(&nats.url()).await, stream).await, lost);

    // The broker loses its store: what JetStream's default `sync_interval`
    // risks for messages it confirmed, on a power loss.
    nats.stop();
    nats.wipe_store();
    nats.start_again();
    // A message produced after the loss is forwarded; the lost ones are
    // not sent again by themselves.
    produce_to(&sc, "audit", "after", None, "x").await;
    let js = jetstream(&nats.url()).await;
    assert_eq!(stored_ids(&js, stream).await, ["after"]);

    // The broker goes away again, with one more message waiting: the
    // forwarder is backing off between tries when the replay comes.
    nats.stop_gracefully();
    let resp = http().post(sc.url("/v1/topics/audit/messages")).header("ferry-id", "while-down").body("x").send().await;
    assert_eq!(resp.unwrap().status().as_u16(), 202);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let resp = http.post(sc.url(&format!("/v1/topics/audit/outbox:replay?since={since}"))).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, serde_json::json!({"topic": "audit", "from": 0, "to": 6, "messages": 6, "complete": true}));
    nats.start_again();
    let js = jetstream(&nats.url()).await;
    // The lost ones come back in their order; `after`, which the broker
    // still has, is dropped as a duplicate.
    let mut want = vec!["after".to_owned()];
    want.extend(lost.iter().cloned());
    want.push("while-down".to_owned());
    assert_eq!(ids_once_stored(&js, stream, 7).await, want);

    // A replay from a time after every message has nothing to send.
    let later = humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(60)).to_string();
    let resp = http.post(sc.url(&format!("/v1/topics/audit/outbox:replay?since={later}"))).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, &body["messages"]), (202, &serde_json::json!(0)), "{body}");

    // Bad input changes nothing.
    let resp = http.post(sc.url("/v1/topics/audit/outbox:replay?since=yesterday")).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let resp = http.post(sc.url("/v1/topics/nope/outbox:replay")).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("topic_not_found")), "{body}");
    assert_eq!(stored_ids(&js, stream).await, want);
}

/// Produces `n` messages of 1 MB to `audit` (`ack=local`).
async fn produce_megabytes(sc: &Sidecar, n: usize) {
    let body = vec![b'x'; 1_000_000];
    for i in 0..n {
        let resp = http()
            .post(sc.url("/v1/topics/audit/messages"))
            .header("ferry-id", format!("big-{i}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
}

/// Stops the sidecar with SIGTERM (it drains and commits), asserting exit 0.
fn stop(mut sc: Sidecar) {
    sc.process.signal(15);
    let status = sc.process.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status:?}: {:#?}", sc.process.output());
}

#[tokio::test]
async fn the_replay_window_keeps_forwarded_segments_and_turning_it_off_lets_them_go() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    // 75 MB: more than one 64 MiB segment.
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--outbox-retention").arg("1h").start();
    sc.wait_configured();
    produce_megabytes(&sc, 75).await;
    stop(sc);
    let js = jetstream(&nats.url()).await;
    assert_eq!(stream_messages(&js, "FERRY_default_audit").await.len(), 75, "all forwarded");
    let inspected = inspect_outbox(data.path());
    assert!(inspected.contains("topic audit: 2 segment(s)"), "{inspected}");
    assert!(inspected.contains("(offsets 0..75), forwarded up to 75"), "{inspected}");
    assert!(inspected.contains("forwarded records from offset 0 kept"), "{inspected}");

    // Without the flag the window goes, and with it the forwarded segment.
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
    sc.wait_configured();
    stop(sc);
    let inspected = inspect_outbox(data.path());
    assert!(inspected.contains("topic audit: 1 segment(s)"), "{inspected}");
    assert!(!inspected.contains("replay window"), "{inspected}");
    assert!(!inspected.contains("(offsets 0..75)"), "{inspected}");
}

#[tokio::test]
async fn forwarded_segments_go_once_the_replay_window_has_passed_them() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--outbox-retention").arg("2s").start();
    sc.wait_configured();
    produce_megabytes(&sc, 75).await;
    // Forwarded at once; the first segment stays about 2 s more, then goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let bytes = loop {
        let (_, ready) = json(http().get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
        let bytes = ready["outbox"]["audit"]["bytes"].as_u64().unwrap();
        if bytes < 64 << 20 || Instant::now() > deadline {
            break bytes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(bytes < 64 << 20, "the forwarded segment is still there after 30 s: {bytes} bytes");
    stop(sc);
    let inspected = inspect_outbox(data.path());
    assert!(inspected.contains("topic audit: 1 segment(s)"), "{inspected}");
    let audit: Vec<&str> = inspected.lines().skip_while(|l| !l.starts_with("topic audit")).take(2).collect();
    let kept_from: u64 =
        audit[1].split("from offset ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(kept_from >= 67, "the window moved past the deleted segment: {inspected}");
}
