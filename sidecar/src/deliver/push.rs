//! Pushing a message to the app as a binary-mode CloudEvent, and reading
//! its answer per the table of DESIGN.md §3.2.

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use ferry_api::naming::headers;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

use crate::broker::Fetched;

/// What the app's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx other than 202: processed.
    Ack,
    /// 202: the app calls back later.
    Deferred,
    /// Try again: after `after` when the app said so (429/503 Retry-After),
    /// else with the subscription's backoff.
    Retry {
        /// Delay the app asked for.
        after: Option<Duration>,
        /// The status (or `timeout`, `refused`) for the dead-letter headers.
        status: String,
        /// What went wrong.
        error: String,
    },
    /// 400/409/410/422: never again; dead-letter it.
    Reject {
        /// The status.
        status: String,
        /// The app's reason (start of its body).
        error: String,
    },
}

/// Maps an HTTP status (and `Retry-After`) to an outcome.
pub fn classify(status: u16, retry_after: Option<&str>, body: &str) -> Outcome {
    let snippet: String = body.chars().take(200).collect();
    match status {
        202 => Outcome::Deferred,
        200..=299 => Outcome::Ack,
        429 | 503 => Outcome::Retry {
            after: retry_after.and_then(parse_retry_after),
            status: status.to_string(),
            error: format!("app is overloaded ({status}) {snippet}").trim_end().to_owned(),
        },
        400 | 409 | 410 | 422 => Outcome::Reject { status: status.to_string(), error: snippet },
        _ => Outcome::Retry { after: None, status: status.to_string(), error: snippet },
    }
}

/// `Retry-After` as delay-seconds or as an HTTP date (RFC 9110 §10.2.3);
/// a date in the past is no delay. Anything else is treated as absent.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// The client pushes go through: pooled keep-alive HTTP/1.1 connections to
/// the app (hyper's own pool, `TCP_NODELAY` on). A plain hyper client, not
/// reqwest: a push is one request to one fixed loopback URL, and reqwest's
/// per-request URL parsing, redirect and retry layers cost a fifth of the
/// sidecar's CPU at full delivery load.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// Idle keep-alive connections to the app are closed after this long.
pub const POOL_IDLE: Duration = Duration::from_secs(30);
/// Most bytes of an answer read (an error body's start goes to the
/// dead-letter headers; a bulk push's per-message results are small).
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// A new push client.
pub fn client() -> Client {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).build(http)
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:{port}{path}`, or why that is no URL.
    pub uri: Result<Uri, String>,
    /// `Authorization` value for the app (`Bearer …`), if any.
    pub authorization: Option<HeaderValue>,
    /// Subscription name (header).
    pub subscription: String,
    /// Namespace and topic, for the default `ce-source`.
    pub source: String,
    /// Longest the app may take to answer.
    pub timeout: Duration,
    /// `subscription` as a header value, checked once (`None` when HTTP
    /// cannot carry it; the header is then left out).
    subscription_value: Option<HeaderValue>,
}

impl Target {
    /// The target for a subscription's `path` on the app's port.
    pub fn new(
        app_port: u16,
        path: &str,
        token: Option<&str>,
        subscription: &str,
        source: String,
        timeout: Duration,
    ) -> Self {
        let url = format!("http://127.0.0.1:{app_port}{path}");
        let uri = url.parse::<Uri>().map_err(|e| format!("push URL {url:?}: {e}"));
        let authorization = token.and_then(|t| HeaderValue::try_from(format!("Bearer {t}")).ok()).map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Target {
            uri,
            authorization,
            subscription_value: HeaderValue::from_str(subscription).ok(),
            subscription: subscription.to_owned(),
            source,
            timeout,
        }
    }
}

/// A W3C `traceparent`: the stored one, else a new trace.
fn traceparent(m: &Fetched) -> Option<HeaderValue> {
    if let Some(t) = m.header("traceparent").or_else(|| m.header("ce-traceparent")) {
        return HeaderValue::from_str(t).ok();
    }
    let trace = uuid::Uuid::new_v4().as_u128();
    // A span id of zero is invalid; a v4 uuid's low 64 bits are never all zero
    // (its variant bits are set).
    let span = uuid::Uuid::new_v4().as_u128() as u64;
    HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-01")).ok()
}

/// The RFC 3339 time of a millisecond timestamp.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// CloudEvent attributes of a message: stored `ce-*` headers, completed with
/// defaults for plain messages (`ce-id` is always the message id).
pub fn attributes<'m>(m: &'m Fetched, source: &'m str) -> Vec<(&'m str, Cow<'m, str>)> {
    let mut attrs: Vec<(&'m str, Cow<'m, str>)> = m
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("ce-") && n != "ce-id")
        .map(|(n, v)| (n.as_str(), Cow::Borrowed(v.as_str())))
        .collect();
    attrs.push(("ce-id", Cow::Borrowed(&m.id)));
    let mut default = |name: &'static str, value: Cow<'m, str>| {
        if !attrs.iter().any(|(n, _)| *n == name) {
            attrs.push((name, value));
        }
    };
    default("ce-specversion", Cow::Borrowed("1.0"));
    default("ce-source", Cow::Borrowed(source));
    default("ce-type", Cow::Borrowed("dev.ferry.message"));
    if !attrs.iter().any(|(n, _)| *n == "ce-time") {
        attrs.push(("ce-time", Cow::Owned(rfc3339(m.published_ms))));
    }
    attrs
}

/// Adds a header, skipping a stored one whose name or value HTTP cannot carry.
fn add(map: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        map.append(n, v);
    }
}

/// The names of the headers Ferry adds to every push, parsed once.
mod names {
    use http::HeaderName;
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub const DELIVERY_ID: HeaderName = HeaderName::from_static(ferry_api::naming::headers::DELIVERY_ID);
    pub const ATTEMPT: HeaderName = HeaderName::from_static(ferry_api::naming::headers::ATTEMPT);
    pub const SUBSCRIPTION: HeaderName = HeaderName::from_static(ferry_api::naming::headers::SUBSCRIPTION);
}

/// The headers of a binary-mode push: the message's CloudEvent
/// [`attributes`], its stored `content-type` and `ferry-*` headers, then
/// the trace and delivery headers.
fn binary_headers(t: &Target, m: &Fetched, delivery_id: &str, attempt: u32) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(16);
    for (name, value) in attributes(m, &t.source) {
        add(&mut map, name, &value);
    }
    if let Some(ct) = m.header("content-type") {
        add(&mut map, "content-type", ct);
    }
    // Ferry's own headers a message carries (a dead letter's origin,
    // attempts and last error; the key) go to the app as they are.
    for (name, value) in
        m.headers.iter().filter(|(n, _)| n.as_bytes().get(..6).is_some_and(|p| p.eq_ignore_ascii_case(b"ferry-")))
    {
        add(&mut map, name, value);
    }
    if let Some(tp) = traceparent(m) {
        map.append(names::TRACEPARENT, tp);
    }
    if let (Some(_), Some(state)) = (m.header("traceparent"), m.header("tracestate")) {
        add(&mut map, "tracestate", state);
    }
    if let Ok(v) = HeaderValue::from_str(delivery_id) {
        map.append(names::DELIVERY_ID, v);
    }
    map.append(names::ATTEMPT, HeaderValue::from(attempt));
    if let Some(v) = &t.subscription_value {
        map.append(names::SUBSCRIPTION, v.clone());
    }
    map
}

/// Pushes one message. Never fails: transport errors become `Retry`.
pub async fn push(client: &Client, t: &Target, m: &Fetched, delivery_id: &str, attempt: u32) -> Outcome {
    let map = binary_headers(t, m, delivery_id, attempt);
    match exchange(client, t, map, Full::new(m.payload.clone()), false).await {
        Ok(a) => classify(a.status, a.retry_after.as_deref(), &String::from_utf8_lossy(&a.body)),
        Err(transport) => transport,
    }
}

/// The app's answer to one push.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Bytes,
}

/// POSTs to the target and reads the answer, all within the target's
/// timeout. `Err` is the outcome of a transport failure. The answer's body
/// is read (up to [`MAX_ANSWER_BYTES`]) even when unused, so the connection
/// goes back to the pool; a body that fails or runs late after a status
/// only costs the connection, except for a bulk push (`whole_body`), whose
/// per-message results it carries.
async fn exchange(
    client: &Client,
    t: &Target,
    mut map: HeaderMap,
    body: Full<Bytes>,
    whole_body: bool,
) -> Result<Answer, Outcome> {
    let uri = t.uri.clone().map_err(|e| Outcome::Retry { after: None, status: "error".into(), error: e })?;
    if let Some(auth) = &t.authorization {
        map.insert(http::header::AUTHORIZATION, auth.clone());
    }
    let mut req = Request::new(body);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    let deadline = tokio::time::Instant::now() + t.timeout;
    let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
        Err(_) => {
            return Err(Outcome::Retry {
                after: None,
                status: "timeout".into(),
                error: format!("no answer within the processing timeout of {:?}", t.timeout),
            })
        }
        Ok(Err(e)) => {
            let status = if e.is_connect() { "refused" } else { "error" };
            return Err(Outcome::Retry { after: None, status: status.into(), error: crate::error_chain(&e) });
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let limit = if whole_body || !(200..300).contains(&status) { MAX_ANSWER_BYTES } else { 64 << 10 };
    let body = match tokio::time::timeout_at(deadline, Limited::new(resp.into_body(), limit).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        // A bulk push's 2xx needs its per-message results: without them,
        // nothing is known to be processed, so all of it is tried again.
        _ if whole_body && (200..300).contains(&status) => {
            return Err(Outcome::Retry {
                after: None,
                status: status.to_string(),
                error: "the answer's per-message results were cut short, too long or too slow".into(),
            })
        }
        // Otherwise the status says what happened (a 2xx was processed).
        _ => Bytes::new(),
    };
    Ok(Answer { status, retry_after, body })
}

/// Pushes several messages as one `application/cloudevents-batch+json`
/// request. The app answers with a status for all, or 200 with a body
/// `[{"id": "...", "status": 200}, ...]` giving one per message (a message
/// missing from the list is acknowledged); an entry may also carry
/// `"error"` (the reason a dead letter records) and `"retryAfter"` (as the
/// header: seconds or an HTTP date, for a 429 or 503).
pub async fn push_batch(client: &Client, t: &Target, batch: &[(&Fetched, String, u32)]) -> Vec<Outcome> {
    let events: Vec<Value> =
        batch.iter().map(|(m, delivery_id, attempt)| structured(m, &t.source, delivery_id, *attempt)).collect();
    let mut map = HeaderMap::with_capacity(4);
    add(&mut map, "content-type", "application/cloudevents-batch+json");
    add(&mut map, headers::SUBSCRIPTION, &t.subscription);
    let body = Full::new(Bytes::from(Value::Array(events).to_string()));
    match exchange(client, t, map, body, true).await {
        Err(transport) => vec![transport; batch.len()],
        Ok(a) => {
            let body = String::from_utf8_lossy(&a.body);
            let whole = classify(a.status, a.retry_after.as_deref(), &body);
            if whole != Outcome::Ack {
                return vec![whole; batch.len()];
            }
            let per: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
            batch
                .iter()
                .map(|(m, _, _)| {
                    per.iter()
                        .find(|r| r.get("id").and_then(Value::as_str) == Some(m.id.as_str()))
                        .map_or(Outcome::Ack, per_message)
                })
                .collect()
        }
    }
}

/// One entry of a bulk push's per-message results as an outcome (no
/// status: acknowledged, as a message missing from the list).
fn per_message(r: &Value) -> Outcome {
    let Some(status) = r.get("status").and_then(Value::as_u64) else { return Outcome::Ack };
    let retry_after = match r.get("retryAfter") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let error = r.get("error").and_then(Value::as_str).unwrap_or("");
    classify(u16::try_from(status).unwrap_or(500), retry_after.as_deref(), error)
}

/// A message as a structured-mode CloudEvent (for batches and pull).
pub fn structured(m: &Fetched, source: &str, delivery_id: &str, attempt: u32) -> Value {
    let mut ev = Map::new();
    for (name, value) in attributes(m, source) {
        ev.insert(name.trim_start_matches("ce-").to_owned(), Value::String(value.into_owned()));
    }
    let ct = m.header("content-type").map(str::to_owned);
    let json_data = ct.as_deref().is_some_and(|c| c.starts_with("application/json") || c.contains("+json"));
    match serde_json::from_slice::<Value>(&m.payload) {
        Ok(v) if json_data => {
            ev.insert("data".into(), v);
        }
        _ => match std::str::from_utf8(&m.payload) {
            Ok(text) if ct.as_deref().is_some_and(|c| c.starts_with("text/")) => {
                ev.insert("data".into(), Value::String(text.to_owned()));
            }
            _ if m.payload.is_empty() => {}
            _ => {
                ev.insert(
                    "data_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
                );
            }
        },
    }
    if let Some(ct) = ct {
        ev.insert("datacontenttype".into(), Value::String(ct));
    }
    // The producer's trace context, as the CloudEvents distributed tracing
    // extension's attributes.
    if let Some(parent) = m.header("traceparent") {
        ev.entry("traceparent").or_insert_with(|| Value::String(parent.to_owned()));
        if let Some(state) = m.header("tracestate") {
            ev.entry("tracestate").or_insert_with(|| Value::String(state.to_owned()));
        }
    }
    let mut v = Value::Object(ev);
    v["ferrydeliveryid"] = json!(delivery_id);
    v["ferryattempt"] = json!(attempt);
    if let Some(key) = m.header(headers::KEY) {
        v["ferrykey"] = json!(key);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerError, Settle, Settlement};

    struct NoSettle;
    #[async_trait::async_trait]
    impl Settle for NoSettle {
        async fn settle(&self, _: Settlement) -> Result<(), BrokerError> {
            Ok(())
        }
    }

    fn fetched(headers: &[(&str, &str)]) -> Fetched {
        Fetched {
            id: "m-1".into(),
            subject: "ferry.ns.t.0".into(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            payload: Bytes::from_static(b"{}"),
            sequence: 7,
            delivered: 1,
            published_ms: 1_700_000_000_123,
            settle: std::sync::Arc::new(NoSettle),
        }
    }

    #[test]
    fn a_binary_push_carries_the_same_cloudevent_attributes_as_a_structured_one() {
        let t = Target::new(8080, "/in", None, "billing", "/ferry/shop/orders".into(), Duration::from_secs(5));
        let cases: [&[(&str, &str)]; 3] = [
            &[],
            &[("ce-type", "order.created"), ("ce-source", "/shop"), ("ce-id", "spoofed"), ("ce-subject", "o-9")],
            &[("ce-specversion", "1.0"), ("ce-time", "2024-01-01T00:00:00Z"), ("content-type", "application/json")],
        ];
        for headers in cases {
            let m = fetched(headers);
            let map = binary_headers(&t, &m, "d-1", 3);
            let mut binary: Vec<(String, String)> = map
                .iter()
                .filter(|(n, _)| n.as_str().starts_with("ce-"))
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                .collect();
            let mut structured: Vec<(String, String)> =
                attributes(&m, &t.source).into_iter().map(|(n, v)| (n.to_owned(), v.into_owned())).collect();
            binary.sort();
            structured.sort();
            assert_eq!(binary, structured, "headers {headers:?}");
            assert_eq!(map.get("ce-id").unwrap(), "m-1", "ce-id is always the message id");
            assert_eq!(map.get("ferry-attempt").unwrap(), "3");
            assert_eq!(map.get("ferry-delivery-id").unwrap(), "d-1");
            assert_eq!(map.get("ferry-subscription").unwrap(), "billing");
            let tp = map.get("traceparent").unwrap().to_str().unwrap();
            assert!(tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-01") && &tp[35..36] == "-", "{tp}");
            let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            assert!(hex(&tp[3..35]) && hex(&tp[36..52]), "{tp}");
            assert_ne!(&tp[36..52], "0000000000000000", "{tp}");
            let again = binary_headers(&t, &m, "d-1", 3);
            assert_ne!(again.get("traceparent").unwrap(), tp, "each push without one starts a new trace");
        }
        let m = fetched(&[("content-type", "text/plain"), ("ferry-key", "k1"), ("traceparent", "00-abc-def-01")]);
        let map = binary_headers(&t, &m, "d-2", 1);
        assert_eq!(map.get("content-type").unwrap(), "text/plain");
        assert_eq!(map.get("ferry-key").unwrap(), "k1");
        assert_eq!(map.get("traceparent").unwrap(), "00-abc-def-01", "a stored trace is carried on");
    }

    #[test]
    fn a_bulk_pushs_per_message_results_carry_a_reason_and_a_delay() {
        let r = |v: Value| per_message(&v);
        assert_eq!(r(json!({"id": "a"})), Outcome::Ack);
        assert_eq!(r(json!({"id": "a", "status": 204})), Outcome::Ack);
        assert_eq!(
            r(json!({"id": "a", "status": 422, "error": "no such order"})),
            Outcome::Reject { status: "422".into(), error: "no such order".into() }
        );
        for after in [json!(7), json!("7")] {
            assert!(
                matches!(r(json!({"status": 429, "retryAfter": after})), Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
            );
        }
        assert!(matches!(r(json!({"status": 503})), Outcome::Retry { after: None, .. }));
        assert!(matches!(r(json!({"status": 70000})), Outcome::Retry { ref status, .. } if status == "500"));
    }

    #[test]
    fn every_row_of_the_answer_table_maps_as_designed() {
        assert_eq!(classify(200, None, ""), Outcome::Ack);
        assert_eq!(classify(204, None, ""), Outcome::Ack);
        assert_eq!(classify(202, None, ""), Outcome::Deferred);
        assert!(
            matches!(classify(429, Some("7"), ""), Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(matches!(classify(503, None, ""), Outcome::Retry { after: None, .. }));
        assert!(
            matches!(classify(503, Some(" 7 "), ""), Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
        );
        // As an HTTP date: the time until then (a past one: at once).
        let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let after = match classify(429, Some(&at), "") {
            Outcome::Retry { after: Some(d), .. } => d,
            other => panic!("{other:?}"),
        };
        assert!((Duration::from_secs(118)..=Duration::from_secs(120)).contains(&after), "{after:?}");
        let past = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert!(matches!(classify(503, Some(past), ""), Outcome::Retry { after: Some(Duration::ZERO), .. }));
        assert!(matches!(classify(429, Some("soon"), ""), Outcome::Retry { after: None, .. }));
        for s in [400, 409, 410, 422] {
            assert!(
                matches!(classify(s, None, "bad"), Outcome::Reject { ref status, ref error } if *status == s.to_string() && error == "bad")
            );
        }
        for s in [401, 404, 500, 502, 504] {
            assert!(matches!(classify(s, Some("9"), ""), Outcome::Retry { after: None, .. }), "{s}");
        }
    }
}
