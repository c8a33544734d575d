//! Produce side against a real nats-server: the API → outbox → JetStream.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn a_produced_message_lands_in_its_stream_with_subject_headers_and_payload() {
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let resp = http()
        .post(sc.url("/v1/topics/orders/messages?ack=broker"))
        .header("content-type", "text/plain")
        .header("ferry-id", "order-1")
        .header("ferry-key", "customer-7")
        .body("hello")
        .send()
        .await
        .unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], "order-1");
    assert_eq!(body["status"], "forwarded");
    assert_eq!(body["stream"], "FERRY_default_orders");
    let seq = body["sequence"].as_u64().expect("a sequence");

    let js = jetstream(&nats.url()).await;
    let msgs = stream_messages(&js, "FERRY_default_orders").await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.sequence, seq);
    let partition = ferry_api::naming::partition_of(Some("customer-7"), 2);
    assert_eq!(m.subject.as_str(), format!("ferry.default.orders.{partition}"));
    assert_eq!(&m.payload[..], b"hello");
    assert_eq!(header(m, "Nats-Msg-Id").as_deref(), Some("order-1"));
    assert_eq!(header(m, "content-type").as_deref(), Some("text/plain"));
    assert_eq!(header(m, "ferry-key").as_deref(), Some("customer-7"));

    let (status, body) = json(http().get(sc.url("/v1/messages/order-1")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str(), body["sequence"].as_u64()), (200, Some("forwarded"), Some(seq)));
}

async fn post(sc: &Sidecar, path: &str, content_type: &str, body: &'static str) -> (u16, serde_json::Value) {
    json(http().post(sc.url(path)).header("content-type", content_type).body(body).send().await.unwrap()).await
}

#[tokio::test]
async fn batches_in_all_three_formats_are_stored_whole_and_in_order() {
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let path = "/v1/topics/audit/messages:batch?ack=broker";
    let (status, body) =
        post(&sc, path, "application/json", r#"[{"id":"j1","data":{"n":1}},{"id":"j2","data":{"n":2}}]"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["count"], 2);
    assert_eq!(body["messages"][1]["id"], "j2");
    let m = &body["messages"][1];
    assert_eq!(
        (m["offset"].as_u64(), m["status"].as_str(), m["stream"].as_str(), m["sequence"].as_u64()),
        (Some(1), Some("forwarded"), Some("FERRY_default_audit"), Some(2)),
        "{body}"
    );
    let (status, _) = post(
        &sc,
        path,
        "application/x-ndjson",
        "{\"id\":\"n1\",\"data\":\"x\"}\n{\"id\":\"n2\",\"key\":\"k\",\"data_base64\":\"AAE=\"}\n",
    )
    .await;
    assert_eq!(status, 201);
    let ce = r#"[{"specversion":"1.0","id":"c1","source":"/s","type":"t","data":{"a":true}}]"#;
    let (status, _) = post(&sc, path, "application/cloudevents-batch+json", ce).await;
    assert_eq!(status, 201);

    let js = jetstream(&nats.url()).await;
    let msgs = stream_messages(&js, "FERRY_default_audit").await;
    let ids = msg_ids(&msgs);
    assert_eq!(ids, ["j1", "j2", "n1", "n2", "c1"]);
    assert_eq!(&msgs[0].payload[..], br#"{"n":1}"#);
    assert_eq!(&msgs[2].payload[..], br#""x""#);
    assert_eq!(&msgs[3].payload[..], &[0, 1]);
    assert_eq!(header(&msgs[3], "content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(header(&msgs[4], "ce-source").as_deref(), Some("/s"));

    // With ack=local the answer says where each message is in the outbox.
    let (status, body) =
        post(&sc, "/v1/topics/audit/messages:batch", "application/x-ndjson", "{\"id\":\"l1\",\"data\":1}\n").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!((body["topic"].as_str(), body["count"].as_u64()), (Some("audit"), Some(1)), "{body}");
    assert_eq!((body["messages"][0]["id"].as_str(), body["messages"][0]["offset"].as_u64()), (Some("l1"), Some(5)));
}

#[tokio::test]
async fn cloudevents_in_binary_and_structured_mode_keep_their_attributes() {
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let resp = http()
        .post(sc.url("/v1/topics/audit/messages?ack=broker"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "evt-1")
        .header("ce-source", "/checkout")
        .header("ce-type", "order.placed")
        .header("ce-time", "2026-11-25T10:00:00Z")
        .header("ce-tenant", "acme")
        .header("content-type", "application/json")
        .body(r#"{"total":12}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let structured = r#"{"specversion":"1.0","id":"evt-2","source":"/checkout","type":"order.paid","subject":"o-9","datacontenttype":"text/plain","data":"paid"}"#;
    let (status, body) =
        post(&sc, "/v1/topics/audit/messages?ack=broker", "application/cloudevents+json", structured).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], "evt-2");

    let js = jetstream(&nats.url()).await;
    let msgs = stream_messages(&js, "FERRY_default_audit").await;
    assert_eq!(msgs.len(), 2);
    let (b, s) = (&msgs[0], &msgs[1]);
    for (name, want) in [
        ("Nats-Msg-Id", "evt-1"),
        ("ce-id", "evt-1"),
        ("ce-source", "/checkout"),
        ("ce-type", "order.placed"),
        ("ce-time", "2026-11-25T10:00:00Z"),
        ("ce-tenant", "acme"),
        ("ce-specversion", "1.0"),
        ("content-type", "application/json"),
    ] {
        assert_eq!(header(b, name).as_deref(), Some(want), "binary {name}");
    }
    assert_eq!(&b.payload[..], br#"{"total":12}"#);
    for (name, want) in
        [("Nats-Msg-Id", "evt-2"), ("ce-type", "order.paid"), ("ce-subject", "o-9"), ("content-type", "text/plain")]
    {
        assert_eq!(header(s, name).as_deref(), Some(want), "structured {name}");
    }
    assert_eq!(&s.payload[..], b"paid");
}

#[tokio::test]
async fn the_same_id_produced_twice_is_stored_once_in_the_stream() {
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let resp = http()
            .post(sc.url("/v1/topics/audit/messages?ack=broker"))
            .header("ferry-id", "dup-1")
            .body("x")
            .send()
            .await
            .unwrap();
        let (status, body) = json(resp).await;
        assert_eq!(status, 201);
        seqs.push(body["sequence"].as_u64().unwrap());
    }
    assert_eq!(seqs[0], seqs[1], "the duplicate reports the original's sequence");
    let js = jetstream(&nats.url()).await;
    assert_eq!(stream_messages(&js, "FERRY_default_audit").await.len(), 1);
}

#[tokio::test]
async fn with_the_broker_down_produce_keeps_answering_and_everything_arrives_in_order_once() {
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let client = http();
    for i in 0..50 {
        let resp = client
            .post(sc.url("/v1/topics/audit/messages"))
            .header("ferry-id", format!("m-{i}"))
            .body(format!("{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "produce {i} with the broker down");
    }
    let (status, ready) = json(client.get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(ready["broker"]["connected"], false);
    assert_eq!(ready["outbox"]["audit"]["pending"], 50);

    nats.start_again();
    // ack=broker answers once this message, and so every earlier one of the
    // topic (forwarding is in order), is confirmed.
    let resp = client
        .post(sc.url("/v1/topics/audit/messages?ack=broker"))
        .header("ferry-id", "m-50")
        .body("50")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let js = jetstream(&nats.url()).await;
    let msgs = stream_messages(&js, "FERRY_default_audit").await;
    let ids = msg_ids(&msgs);
    let want: Vec<String> = (0..=50).map(|i| format!("m-{i}")).collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn kill_9_right_after_acknowledged_produces_loses_and_duplicates_nothing() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let client = http();
    let mut acked = Vec::new();
    for round in 0..3 {
        let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
        for i in 0..200 {
            let id = format!("r{round}-{i}");
            let resp = client
                .post(sc.url("/v1/topics/audit/messages"))
                .header("ferry-id", &id)
                .body(id.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202);
            acked.push(id);
        }
        sc.process.kill9();
    }
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let resp = client
        .post(sc.url("/v1/topics/audit/messages?ack=broker"))
        .header("ferry-id", "last")
        .body("last")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    acked.push("last".into());
    let js = jetstream(&nats.url()).await;
    let msgs = stream_messages(&js, "FERRY_default_audit").await;
    let ids = msg_ids(&msgs);
    assert_eq!(ids, acked, "exactly the acknowledged messages, each once, in order");
    for m in &msgs {
        assert_eq!(m.payload, header(m, "Nats-Msg-Id").unwrap().as_bytes());
    }
}

#[tokio::test]
async fn more_topics_with_a_backlog_than_the_shared_room_holds_all_drain_at_start() {
    use ferry_sidecar::forward::{MAX_IN_FLIGHT, WINDOW};
    // Enough topics that their full windows need more room than there is:
    // started together, the forwarders must take turns rather than each
    // hold part of the room and wait for more.
    let topics = MAX_IN_FLIGHT / WINDOW + 1;
    let per_topic = 3 * WINDOW;
    let manifest = (0..topics)
        .map(|t| format!("apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata:\n  name: t{t}\nspec: {{}}\n"))
        .collect::<Vec<_>>()
        .join("---\n");
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", manifest.as_str())]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let client = http();
    for t in 0..topics {
        for start in (0..per_topic).step_by(100) {
            let body: String = (start..(start + 100).min(per_topic))
                .map(|i| format!("{{\"id\":\"t{t}-{i}\",\"data\":\"{i}\"}}\n"))
                .collect();
            let resp = client
                .post(sc.url(&format!("/v1/topics/t{t}/messages:batch")))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202, "batch {start} of t{t} with the broker down");
        }
    }
    // Every backlog is waiting at once when the next sidecar starts.
    sc.process.kill9();
    nats.start_again();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    for t in 0..topics {
        let resp = client
            .post(sc.url(&format!("/v1/topics/t{t}/messages?ack=broker")))
            .header("ferry-id", format!("t{t}-last"))
            .body("last")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "t{t}: its backlog and the last message confirmed");
    }
    let js = jetstream(&nats.url()).await;
    for t in 0..topics {
        let mut stream = js.get_stream(format!("FERRY_default_t{t}")).await.unwrap();
        let stored = stream.info().await.unwrap().state.messages;
        assert_eq!(stored, per_topic as u64 + 1, "t{t}: every message stored once");
    }
}

#[tokio::test]
async fn a_damaged_record_at_the_outbox_tail_is_skipped_and_the_outbox_drains() {
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let client = http();
    for (id, body) in [("d-1", "first-intact"), ("d-2", "second-intact"), ("d-3", "ROTTEN-PAYLOAD")] {
        let resp =
            client.post(sc.url("/v1/topics/audit/messages")).header("ferry-id", id).body(body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    // Bit rot in the last record, found by its payload in the segment file.
    let dir = data.path().join("outbox").join("audit");
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .expect("a segment file");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(14).position(|w| w == b"ROTTEN-PAYLOAD").expect("the payload on disk");
    bytes[at] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    nats.start_again();
    // The two intact records are forwarded; the damaged one is skipped and
    // must not hold the outbox's confirmed offset back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, ready) = json(client.get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
        if ready["broker"]["connected"] == true && ready["outbox"]["audit"]["pending"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the outbox never drained: {ready}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let js = jetstream(&nats.url()).await;
    let ids = stored_ids(&js, "FERRY_default_audit").await;
    assert_eq!(ids, ["d-1", "d-2"]);
}

/// A TCP proxy in front of nats-server that can swallow what the client
/// sends (as a connection whose bytes are lost in flight) and cut every
/// connection it carries.
struct Proxy {
    port: u16,
    swallow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    swallowed: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy =
            Proxy { port, swallow: Default::default(), swallowed: Default::default(), conns: Default::default() };
        let (swallow, swallowed, conns) = (proxy.swallow.clone(), proxy.swallowed.clone(), proxy.conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let (swallow, swallowed) = (swallow.clone(), swallowed.clone());
                let conn = tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if swallow.load(std::sync::atomic::Ordering::Acquire) {
                                swallowed.lock().unwrap().extend_from_slice(&buf[..n]);
                            } else if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = tokio::io::copy(&mut sr, &mut cw) => {}
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        proxy
    }

    /// Drops every connection (the client sees it closed and reconnects).
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// A publish lost with its connection (its ack due only at its timeout)
/// must not let a later message, published on the next connection, be
/// stored before it: the forwarder sees the connection change and sends
/// again from the first unconfirmed message, so the stream keeps the
/// outbox's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_lost_with_its_connection_is_stored_before_what_follows_on_the_next() {
    let nats = NatsServer::start();
    let upstream = nats.url().trim_start_matches("nats://").to_owned();
    let proxy = Proxy::start(upstream).await;
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(format!("nats://127.0.0.1:{}", proxy.port), res.path(), data.path()).start();
    sc.wait_configured();
    let client = http();
    let url = sc.url("/v1/topics/audit/messages");
    let produce = |id: &'static str, ack: &'static str| {
        client.post(format!("{url}?ack={ack}")).header("ferry-id", id).body(id).send()
    };
    assert_eq!(produce("m-0", "broker").await.unwrap().status().as_u16(), 201);

    // m-1 goes out into a connection that loses it.
    proxy.swallow.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(produce("m-1", "local").await.unwrap().status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.swallowed.lock().unwrap().windows(3).any(|w| w == b"m-1") {
        assert!(Instant::now() < deadline, "m-1 was never published");
        // The proxy offers no event for this; poll what it swallowed.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.swallow.store(false, std::sync::atomic::Ordering::Release);
    proxy.cut();
    sc.process.wait_for_lines("event: connected", 2, Duration::from_secs(10));

    // m-2 is produced on the new connection while m-1 is unconfirmed.
    let _ = produce("m-2", "broker").await.unwrap();
    let js = jetstream(&nats.url()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let msgs = loop {
        let msgs = stream_messages(&js, "FERRY_default_audit").await;
        if msgs.len() >= 3 || Instant::now() > deadline {
            break msgs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(msg_ids(&msgs), ["m-0", "m-1", "m-2"]);
}
