//! Every error answer of the produce API: status, JSON body, and nothing stored.

mod support;

use support::*;

/// The outbox's next offset for `topic`, from /readyz.
async fn next_offset(sc: &Sidecar, topic: &str) -> u64 {
    let (_, ready) = json(http().get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
    ready["outbox"][topic]["nextOffset"].as_u64().unwrap_or_else(|| panic!("no outbox detail for {topic}: {ready}"))
}

fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

async fn send(req: reqwest::RequestBuilder) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let resp = req.send().await.unwrap();
    let headers = resp.headers().clone();
    let (status, body) = json(resp).await;
    (status, body, headers)
}

#[tokio::test]
async fn malformed_requests_get_400_and_store_nothing() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let c = http();
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("bad ack mode", c.post(sc.url("/v1/topics/orders/messages?ack=maybe")).body("x")),
        ("id with a space", c.post(sc.url("/v1/topics/orders/messages")).header("ferry-id", "a b").body("x")),
        ("id too long", c.post(sc.url("/v1/topics/orders/messages")).header("ferry-id", "x".repeat(300)).body("x")),
        (
            "CloudEvent without source",
            c.post(sc.url("/v1/topics/orders/messages"))
                .header("ce-specversion", "1.0")
                .header("ce-id", "1")
                .header("ce-type", "t")
                .body("x"),
        ),
        (
            "structured CloudEvent not JSON",
            c.post(sc.url("/v1/topics/orders/messages"))
                .header("content-type", "application/cloudevents+json")
                .body("{nope"),
        ),
        (
            "batch not an array",
            c.post(sc.url("/v1/topics/orders/messages:batch"))
                .header("content-type", "application/json")
                .body(r#"{"id":"a"}"#),
        ),
        (
            "batch with one bad entry",
            c.post(sc.url("/v1/topics/orders/messages:batch"))
                .header("content-type", "application/json")
                .body(r#"[{"id":"ok"},{"id":"bad id"}]"#),
        ),
        (
            "batch with an unknown field",
            c.post(sc.url("/v1/topics/orders/messages:batch"))
                .header("content-type", "application/json")
                .body(r#"[{"id":"ok","colour":1}]"#),
        ),
        (
            "empty batch",
            c.post(sc.url("/v1/topics/orders/messages:batch")).header("content-type", "application/json").body("[]"),
        ),
        (
            "invalid UTF-8 NDJSON",
            c.post(sc.url("/v1/topics/orders/messages:batch"))
                .header("content-type", "application/x-ndjson")
                .body(vec![0xff, 0xfe]),
        ),
    ];
    for (what, req) in cases {
        let (status, body, _) = send(req).await;
        assert_error(status, &body, 400, "bad_request");
        assert_eq!(next_offset(&sc, "orders").await, 0, "{what} stored something");
    }
    let (status, body, _) =
        send(c.post(sc.url("/v1/topics/orders/messages:batch")).header("content-type", "text/csv").body("a,b")).await;
    assert_error(status, &body, 415, "unsupported_media_type");
    // A compressed body would be stored compressed, labelled as its type.
    for path in ["/v1/topics/orders/messages", "/v1/topics/orders/messages:batch"] {
        let req = c
            .post(sc.url(path))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(vec![0x1f, 0x8b, 8, 0]);
        let (status, body, _) = send(req).await;
        assert_error(status, &body, 415, "unsupported_media_type");
    }
    let (status, body, _) = send(c.get(sc.url("/v1/messages/a%20b"))).await;
    assert_error(status, &body, 400, "bad_request");
    assert_eq!(next_offset(&sc, "orders").await, 0);
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_and_stores_nothing() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).arg("--api-token").arg("s3cret").start();
    let c = http();
    for auth in [None, Some("Bearer wrong"), Some("s3cret"), Some("Basic s3cret")] {
        let mut req = c.post(sc.url("/v1/topics/orders/messages")).body("x");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, body, _) = send(req).await;
        assert_error(status, &body, 401, "unauthorized");
    }
    let (status, body, _) = send(c.get(sc.url("/no/such/route"))).await;
    assert_error(status, &body, 401, "unauthorized");
    assert_eq!(next_offset(&sc, "orders").await, 0);
    let resp = c
        .post(sc.url("/v1/topics/orders/messages"))
        .header("authorization", "Bearer s3cret")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(next_offset(&sc, "orders").await, 1);
}

#[tokio::test]
async fn unknown_topics_messages_and_routes_get_404() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let c = http();
    let (status, body, _) = send(c.post(sc.url("/v1/topics/nope/messages")).body("x")).await;
    assert_error(status, &body, 404, "topic_not_found");
    let (status, body, _) = send(c.post(sc.url("/v1/topics/..%2F..%2Fetc/messages")).body("x")).await;
    assert_error(status, &body, 404, "topic_not_found");
    let (status, body, _) = send(c.get(sc.url("/v1/messages/never-produced"))).await;
    assert_error(status, &body, 404, "message_not_found");
    let (status, body, _) = send(c.get(sc.url("/v2/anything"))).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body, _) = send(c.get(sc.url("/v1/topics/orders/messages"))).await;
    assert_error(status, &body, 405, "method_not_allowed");
    let outbox: Vec<String> = std::fs::read_dir(data.path().join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!outbox.iter().any(|n| n.contains("nope") || n.contains("etc")), "{outbox:?}");
    // Names of unknown topics make no metric series (a client could make
    // any number of them).
    for t in 0..3 {
        let (status, _, _) = send(c.post(sc.url(&format!("/v1/topics/nope-{t}/messages:batch"))).body("x")).await;
        assert_eq!(status, 404);
    }
    let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("nope"), "{metrics}");
    let unknown = metrics
        .lines()
        .find(|l| l.starts_with("ferry_produce_requests_total{") && l.contains(r#"topic="""#) && l.contains("404"))
        .unwrap_or_else(|| panic!("no series for unknown topics: {metrics}"));
    assert!(unknown.ends_with(" 5"), "two single and three batch requests: {unknown}");
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_stores_nothing() {
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).arg("--max-message-bytes").arg("8192").start();
    let c = http();
    // `orders` allows 4096 bytes (its maxMessageSize), `audit` the flag's 8192.
    let (status, body, _) = send(c.post(sc.url("/v1/topics/orders/messages")).body(vec![b'x'; 4097])).await;
    assert_error(status, &body, 413, "too_large");
    let (status, body, _) = send(c.post(sc.url("/v1/topics/audit/messages")).body(vec![b'x'; 8193])).await;
    assert_error(status, &body, 413, "too_large");
    let big_entry = format!(r#"[{{"id":"a","data":"{}"}}]"#, "y".repeat(5000));
    let (status, body, _) = send(
        c.post(sc.url("/v1/topics/orders/messages:batch")).header("content-type", "application/json").body(big_entry),
    )
    .await;
    assert_error(status, &body, 413, "too_large");
    // A declared length over the batch limit is refused before the body is
    // read; the answer comes while the client still has body to send.
    let (status, body) = raw_request(sc.api_port, "POST /v1/topics/audit/messages:batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 17825792\r\n\r\n[");
    assert_error(status, &body, 413, "too_large");
    assert_eq!(next_offset(&sc, "orders").await, 0);
    assert_eq!(next_offset(&sc, "audit").await, 0);
    // Exactly the limit is accepted, and the stream takes it with its headers.
    let resp = c.post(sc.url("/v1/topics/orders/messages?ack=broker")).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201, "exactly the limit is accepted and forwarded");
    // A callback's body over its limit gets the same JSON answer.
    let big = vec![b' '; ferry_sidecar::api::deliveries::MAX_CALLBACK_BODY + 1];
    for verdict in ["retry", "reject"] {
        let (status, body, _) = send(c.post(sc.url(&format!("/v1/deliveries/d-1/{verdict}"))).body(big.clone())).await;
        assert_error(status, &body, 413, "too_large");
    }
}

/// The peak resident memory of process `pid`, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the sidecar is running");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"));
    kib << 10
}

/// A batch body of millions of tiny entries (`{}` is 3 bytes, a built
/// message some hundred) is refused while it is parsed: it once took over
/// a gigabyte before its count was checked, and the pod's memory limit
/// (128 Mi) killed the sidecar. Each format on a sidecar of its own: the
/// peak includes start-up and reading the body (twice its size, as chunks
/// and then in one piece), and freed bodies are not all handed back at once.
#[tokio::test]
async fn a_batch_of_millions_of_tiny_entries_is_refused_while_parsing_in_little_memory() {
    const BODY: usize = 15 << 20;
    const PEAK: u64 = 64 << 20;
    // The default batch limit takes the bodies.
    const { assert!(BODY + 16 < ferry_sidecar::config::DEFAULT_MAX_BATCH_BYTES) };
    let nats = NatsServer::start();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    // Long enough for a sidecar that builds every entry first to answer.
    let c = reqwest::Client::builder().timeout(std::time::Duration::from_secs(300)).build().unwrap();
    let array = |entry: &str| format!("[{}{entry}]", format!("{entry},").repeat(BODY / (entry.len() + 1) - 1));
    let bodies = [
        ("application/x-ndjson", "{}\n".repeat(BODY / 3)),
        ("application/json", array("{}")),
        ("application/cloudevents-batch+json", array("{}")),
    ];
    let want = format!("a batch holds at most {} messages", ferry_sidecar::api::produce::MAX_BATCH_MESSAGES);
    for (content_type, body) in bodies {
        assert!(body.len().abs_diff(BODY) < 16, "{}", body.len());
        let data = tempfile::tempdir().unwrap();
        let sc = Launch::new(nats.url(), res.path(), data.path()).start();
        let pid = sc.process.pid();
        let started = peak_rss(pid);
        let req = c.post(sc.url("/v1/topics/audit/messages:batch")).header("content-type", content_type).body(body);
        let (status, answer, _) = send(req).await;
        assert_error(status, &answer, 400, "bad_request");
        assert_eq!(answer["error"]["message"], want.as_str(), "{content_type}");
        let health = c.get(format!("{}/healthz", sc.admin)).send().await.expect("the sidecar answers /healthz");
        assert_eq!(health.status().as_u16(), 200, "{content_type}");
        let peak = peak_rss(pid);
        eprintln!("{content_type}: peak RSS {} KiB ({} KiB after start)", peak >> 10, started >> 10);
        assert!(peak < PEAK, "{content_type}: the sidecar's peak RSS is {} KiB", peak >> 10);
        assert_eq!(next_offset(&sc, "audit").await, 0, "{content_type}: nothing stored");
    }
}

#[tokio::test]
async fn a_full_outbox_answers_429_with_retry_after_and_takes_nothing_more() {
    let nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    // Two empty segments take 48 bytes; room for a few small messages.
    let sc = Launch::new(nats.url(), res.path(), data.path()).arg("--outbox-max-bytes").arg("600").start();
    let c = http();
    let mut accepted = 0u64;
    let (status, body, headers) = loop {
        let (status, body, headers) = send(c.post(sc.url("/v1/topics/audit/messages")).body(vec![b'z'; 100])).await;
        if status != 202 {
            break (status, body, headers);
        }
        accepted += 1;
        assert!(accepted < 10, "the outbox limit was never reached");
    };
    assert!(accepted >= 1);
    assert_error(status, &body, 429, "outbox_full");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert_eq!(next_offset(&sc, "audit").await, accepted);
}

#[tokio::test]
async fn a_full_disk_answers_507_stores_nothing_and_recovers_when_space_returns() {
    let nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let mnt = tempfile::tempdir().unwrap();
    let _mount = TmpfsMount::new(mnt.path(), "256k");
    let sc = Launch::new(nats.url(), res.path(), mnt.path()).start();
    let c = http();
    let filler = mnt.path().join("filler");
    // Fill the filesystem. tmpfs allocates whole 4 KiB pages and the
    // segment's first page has room left, so the message spans new pages.
    let _ = std::fs::write(&filler, vec![0u8; 256 << 10]);
    let before = next_offset(&sc, "audit").await;
    let (status, body, _) = send(c.post(sc.url("/v1/topics/audit/messages")).body(vec![b'd'; 10_000])).await;
    assert_error(status, &body, 507, "disk_full");
    assert_eq!(next_offset(&sc, "audit").await, before);
    std::fs::remove_file(&filler).unwrap();
    let resp = c
        .post(sc.url("/v1/topics/audit/messages"))
        .header("ferry-id", "after")
        .body(vec![b'd'; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "the outbox is usable again once space returns");
    assert_eq!(next_offset(&sc, "audit").await, before + 1);
}

/// Sends raw bytes, reads one response; returns its status and JSON body.
fn raw_request(port: u16, head: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head}"));
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

#[tokio::test]
async fn a_message_the_broker_would_refuse_for_good_gets_413_and_what_fits_is_forwarded() {
    // A default nats-server takes messages of 1 MiB, headers included, and
    // `audit` (like every topic by default) payloads of 1 MiB.
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let c = http();
    let (status, body, _) = send(c.post(sc.url("/v1/topics/audit/messages")).body(vec![b'x'; 1 << 20])).await;
    assert_error(status, &body, 413, "too_large");
    let (status, body, _) = send(
        c.post(sc.url("/v1/topics/audit/messages:batch")).header("content-type", "application/x-ndjson").body(format!(
            "{{\"id\":\"small\",\"data\":\"x\"}}\n{{\"id\":\"big\",\"data\":\"{}\"}}\n",
            "y".repeat((1 << 20) - 100)
        )),
    )
    .await;
    assert_error(status, &body, 413, "too_large");
    // Headers past their room (16 KiB, less room for a dead letter's).
    let (status, body, _) = send(
        c.post(sc.url("/v1/topics/audit/messages"))
            .header("ce-specversion", "1.0")
            .header("ce-id", "e1")
            .header("ce-source", "/s")
            .header("ce-type", "t")
            .header("ce-big", "z".repeat(13 << 10))
            .body("x"),
    )
    .await;
    assert_error(status, &body, 413, "too_large");
    assert_eq!(next_offset(&sc, "audit").await, 0, "nothing refused was stored");
    // What fits with room for a dead letter's headers is forwarded.
    let resp = c
        .post(sc.url("/v1/topics/audit/messages?ack=broker"))
        .header("ferry-id", "fits")
        .body(vec![b'x'; (1 << 20) - 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let js = jetstream(&nats.url()).await;
    let stored = stream_messages(&js, "FERRY_default_audit").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload.len(), (1 << 20) - 5000);
}

/// A message the broker refuses for good although produce let it in (its
/// stream's limit was lowered after): the forwarder parks it on the data
/// volume and goes on, so it does not hold its topic back. `ack=broker`
/// answers 502 for it; the message status, a metric and `outbox inspect`
/// show it.
#[tokio::test]
async fn a_message_the_broker_refuses_for_good_is_parked_and_the_topic_goes_on() {
    let nats = NatsServer::start();
    let (mut sc, _res, data) = configured_with_topics(&nats);
    // Someone lowers the stream's largest message under the topic's 1 MiB.
    let js = jetstream(&nats.url()).await;
    let mut stream = js.get_stream("FERRY_default_audit").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 24 << 10;
    js.update_stream(config).await.unwrap();

    let c = http();
    let big = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "too-big");
    let (status, body, _) = send(big.body(vec![b'x'; 40 << 10])).await;
    assert_error(status, &body, 502, "refused_by_broker");
    assert!(body["error"]["message"].as_str().unwrap().contains("parked"), "{body}");
    assert_eq!(body["error"]["ids"], serde_json::json!(["too-big"]), "{body}");
    assert_eq!(body["error"]["parked"], serde_json::json!(["too-big"]), "{body}");
    let after = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "after").body("small");
    assert_eq!(after.send().await.unwrap().status().as_u16(), 201, "the topic goes on after the refused message");

    let stored = stored_ids(&js, "FERRY_default_audit").await;
    assert_eq!(stored, ["after"]);
    let (status, body, _) = send(c.get(sc.url("/v1/messages/too-big"))).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("parked")), "{body}");
    let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("ferry_forward_parked_total{topic=\"audit\"} 1"), "{metrics}");

    // A replay of the topic passes the parked message: not sent again, so
    // not refused and parked again.
    let (status, body, _) = send(c.post(sc.url("/v1/topics/audit/outbox:replay"))).await;
    assert_eq!((status, body["from"].as_u64(), body["messages"].as_u64()), (202, Some(0), Some(2)), "{body}");
    let later = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "later").body("small");
    assert_eq!(later.send().await.unwrap().status().as_u16(), 201);
    assert_eq!(stored_ids(&js, "FERRY_default_audit").await, ["after", "later"]);
    let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("ferry_forward_parked_total{topic=\"audit\"} 1"), "{metrics}");

    sc.process.kill9();
    let text = inspect_outbox(data.path());
    assert!(text.contains("parked audit: 1 message(s)") && text.contains("too-big (40960 bytes)"), "{text}");
    assert!(text.contains("topic audit:") && text.contains(" 0 not forwarded"), "{text}");
}

/// Before it first reaches the broker, the sidecar takes NATS's default
/// 1 MiB for the server's largest message. A message produced then, over
/// what the server turns out to take, is refused before it is sent; it is
/// parked in its turn and the messages after it are forwarded.
#[tokio::test]
async fn a_message_over_the_servers_max_payload_produced_while_it_was_down_is_parked() {
    let mut nats = NatsServer::stopped_with_config("max_payload: 65536\n");
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let c = http();
    for (id, len) in [("before", 10), ("over", 100 << 10), ("small", 10)] {
        let resp = c.post(sc.url("/v1/topics/audit/messages")).header("ferry-id", id).body(vec![b'x'; len]);
        assert_eq!(resp.send().await.unwrap().status().as_u16(), 202, "{id}");
    }
    nats.start_again();
    let last = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "last").body("x");
    let (status, body, _) = send(last).await;
    assert_eq!(status, 201, "{body}");
    let js = jetstream(&nats.url()).await;
    let stored = stored_ids(&js, "FERRY_default_audit").await;
    assert_eq!(stored, ["before", "small", "last"]);
    let (_, body, _) = send(c.get(sc.url("/v1/messages/over"))).await;
    assert_eq!(body["status"], "parked", "{body}");
}

/// A sidecar that once reached the broker keeps its `max_payload`: started
/// again while the broker is away, it refuses at the door (413, nothing
/// stored) what the broker would refuse, instead of storing and parking it.
#[tokio::test]
async fn a_sidecar_restarted_while_the_broker_is_away_refuses_what_it_last_heard_the_broker_would() {
    let mut nats = NatsServer::stopped_with_config("max_payload: 65536\n");
    nats.start_again();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
    sc.wait_configured();
    sc.process.signal(15);
    assert!(sc.process.wait_exit(START_TIMEOUT).success());
    nats.stop();

    let sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let c = http();
    let over = c.post(sc.url("/v1/topics/audit/messages")).header("ferry-id", "over").body(vec![b'x'; 100 << 10]);
    let (status, body, _) = send(over).await;
    assert_error(status, &body, 413, "too_large");
    let small = c.post(sc.url("/v1/topics/audit/messages")).header("ferry-id", "small").body("x");
    assert_eq!(small.send().await.unwrap().status().as_u16(), 202);
    let (status, _, _) = send(c.get(sc.url("/v1/messages/over"))).await;
    assert_eq!(status, 404, "nothing of the refused message was stored");
    nats.start_again();
    let last = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "last").body("x");
    assert_eq!(send(last).await.0, 201);
    assert_eq!(stored_ids(&jetstream(&nats.url()).await, "FERRY_default_audit").await, ["small", "last"]);
}

/// `ack=broker` while the broker is down: 504 after `--broker-ack-timeout`,
/// naming the ids it stored, generated ones too. They are forwarded once the
/// broker is back, and a retry that sends them as `Ferry-Id` adds nothing.
#[tokio::test]
async fn an_ack_broker_timeout_names_the_ids_it_stored_which_are_forwarded_later() {
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let sc = Launch::new(nats.url(), res.path(), data.path()).arg("--broker-ack-timeout").arg("300ms").start();
    let c = http();
    let (status, body, _) = send(c.post(sc.url("/v1/topics/audit/messages?ack=broker")).body("one")).await;
    assert_error(status, &body, 504, "broker_timeout");
    let single: Vec<String> = serde_json::from_value(body["error"]["ids"].clone()).expect("ids");
    assert_eq!(single.len(), 1, "{body}");
    let batch = c
        .post(sc.url("/v1/topics/audit/messages:batch?ack=broker"))
        .header("content-type", "application/x-ndjson")
        .body("{\"data\":2}\n{\"id\":\"b-3\",\"data\":3}\n");
    let (status, body, _) = send(batch).await;
    assert_error(status, &body, 504, "broker_timeout");
    let batch: Vec<String> = serde_json::from_value(body["error"]["ids"].clone()).expect("ids");
    assert_eq!(batch.len(), 2, "{body}");
    assert_eq!(batch[1], "b-3");
    nats.start_again();
    // The client retries the first call with the id it was given, until the
    // broker confirms (each try waits up to the timeout).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let retry = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", &single[0]).body("one");
        let (status, body, _) = send(retry).await;
        if status == 201 {
            break;
        }
        assert_error(status, &body, 504, "broker_timeout");
        assert!(std::time::Instant::now() < deadline, "the broker never confirmed");
    }
    let js = jetstream(&nats.url()).await;
    let stored = stored_ids(&js, "FERRY_default_audit").await;
    assert_eq!(stored, [single[0].clone(), batch[0].clone(), batch[1].clone()]);
}

/// A refusal that passes (the stream's limit lowered for a moment) parks
/// nothing: the record is re-sent with backoff and goes through once the
/// limit is back (the forwarder parks only after 3 s of refusals).
#[tokio::test]
async fn a_message_refused_as_too_large_for_a_moment_is_forwarded_not_parked() {
    let nats = NatsServer::start();
    let (sc, _res, _data) = configured_with_topics(&nats);
    let js = jetstream(&nats.url()).await;
    let mut stream = js.get_stream("FERRY_default_audit").await.unwrap();
    let normal = stream.info().await.unwrap().config.clone();
    js.update_stream(async_nats::jetstream::stream::Config { max_message_size: 24 << 10, ..normal.clone() })
        .await
        .unwrap();
    let c = http();
    let big = c.post(sc.url("/v1/topics/audit/messages")).header("ferry-id", "for-a-moment").body(vec![b'x'; 40 << 10]);
    assert_eq!(big.send().await.unwrap().status().as_u16(), 202);
    // Put the limit back as soon as the forwarder has been refused once.
    let refused = "ferry_forward_errors_total{topic=\"audit\"} ";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
        if metrics.lines().any(|l| l.strip_prefix(refused).is_some_and(|n| n != "0")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never refused: {metrics}");
        // The metric is the only sign of the refusal; poll it.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    js.update_stream(normal).await.unwrap();
    let after = c.post(sc.url("/v1/topics/audit/messages?ack=broker")).header("ferry-id", "after").body("small");
    let (status, body, _) = send(after).await;
    assert_eq!(status, 201, "{body}");
    let stored = stored_ids(&js, "FERRY_default_audit").await;
    assert_eq!(stored, ["for-a-moment", "after"]);
    let (_, body, _) = send(c.get(sc.url("/v1/messages/for-a-moment"))).await;
    assert_eq!(body["status"], "forwarded", "{body}");
}
