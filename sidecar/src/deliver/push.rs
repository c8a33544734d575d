//! Pushing a message to the app as a binary-mode CloudEvent, and reading
//! its answer per the table of DESIGN.md §3.2.

use std::time::Duration;

use base64::Engine;
use ferry_api::naming::headers;
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

/// `Retry-After` in seconds (HTTP dates are not used by apps on localhost
/// and are treated as absent).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:{port}{path}`.
    pub url: String,
    /// Bearer token for the app, if any.
    pub token: Option<String>,
    /// Subscription name (header).
    pub subscription: String,
    /// Namespace and topic, for the default `ce-source`.
    pub source: String,
    /// Longest the app may take to answer.
    pub timeout: Duration,
}

/// A W3C `traceparent`: the stored one, else a new trace.
fn traceparent(m: &Fetched) -> String {
    if let Some(t) = m.header("traceparent") {
        return t.to_owned();
    }
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// The RFC 3339 time of a millisecond timestamp.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// CloudEvent attributes of a message: stored `ce-*` headers, completed with
/// defaults for plain messages (`ce-id` is always the message id).
pub fn attributes(m: &Fetched, source: &str) -> Vec<(String, String)> {
    let mut attrs: Vec<(String, String)> = m
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("ce-") && n != "ce-id")
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    attrs.push(("ce-id".into(), m.id.clone()));
    let mut default = |name: &str, value: String| {
        if !attrs.iter().any(|(n, _)| n == name) {
            attrs.push((name.to_owned(), value));
        }
    };
    default("ce-specversion", "1.0".into());
    default("ce-source", source.to_owned());
    default("ce-type", "dev.ferry.message".into());
    default("ce-time", rfc3339(m.published_ms));
    attrs
}

/// Pushes one message. Never fails: transport errors become `Retry`.
pub async fn push(client: &reqwest::Client, t: &Target, m: &Fetched, delivery_id: &str, attempt: u32) -> Outcome {
    let mut req = client.post(&t.url).timeout(t.timeout);
    for (name, value) in attributes(m, &t.source) {
        req = req.header(name, value);
    }
    if let Some(ct) = m.header("content-type") {
        req = req.header("content-type", ct);
    }
    // Ferry's own headers a message carries (a dead letter's origin,
    // attempts and last error; the key) go to the app as they are.
    for (name, value) in m.headers.iter().filter(|(n, _)| n.to_ascii_lowercase().starts_with("ferry-")) {
        req = req.header(name.as_str(), value.as_str());
    }
    req = req
        .header("traceparent", traceparent(m))
        .header(headers::DELIVERY_ID, delivery_id)
        .header(headers::ATTEMPT, attempt.to_string())
        .header(headers::SUBSCRIPTION, &t.subscription);
    if let Some(token) = &t.token {
        req = req.bearer_auth(token);
    }
    send(req.body(m.payload.clone())).await
}

/// Pushes several messages as one `application/cloudevents-batch+json`
/// request. The app answers with a status for all, or 200 with a body
/// `[{"id": "...", "status": 200}, ...]` giving one per message (a message
/// missing from the list is acknowledged).
pub async fn push_batch(client: &reqwest::Client, t: &Target, batch: &[(&Fetched, String, u32)]) -> Vec<Outcome> {
    let events: Vec<Value> =
        batch.iter().map(|(m, delivery_id, attempt)| structured(m, &t.source, delivery_id, *attempt)).collect();
    let mut req = client
        .post(&t.url)
        .timeout(t.timeout)
        .header("content-type", "application/cloudevents-batch+json")
        .header(headers::SUBSCRIPTION, &t.subscription);
    if let Some(token) = &t.token {
        req = req.bearer_auth(token);
    }
    let req = req.body(Value::Array(events).to_string());
    match req.send().await {
        Err(e) => vec![transport(e); batch.len()],
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = resp.text().await.unwrap_or_default();
            let whole = classify(status, retry_after.as_deref(), &body);
            if whole != Outcome::Ack {
                return vec![whole; batch.len()];
            }
            let per: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
            batch
                .iter()
                .map(|(m, _, _)| {
                    per.iter()
                        .find(|r| r.get("id").and_then(Value::as_str) == Some(m.id.as_str()))
                        .and_then(|r| r.get("status").and_then(Value::as_u64))
                        .map_or(Outcome::Ack, |s| classify(s as u16, None, ""))
                })
                .collect()
        }
    }
}

/// A message as a structured-mode CloudEvent (for batches and pull).
pub fn structured(m: &Fetched, source: &str, delivery_id: &str, attempt: u32) -> Value {
    let mut ev = Map::new();
    for (name, value) in attributes(m, source) {
        ev.insert(name.trim_start_matches("ce-").to_owned(), Value::String(value));
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
    let mut v = Value::Object(ev);
    v["ferrydeliveryid"] = json!(delivery_id);
    v["ferryattempt"] = json!(attempt);
    if let Some(key) = m.header(headers::KEY) {
        v["ferrykey"] = json!(key);
    }
    v
}

fn transport(e: reqwest::Error) -> Outcome {
    let status = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "refused"
    } else {
        "error"
    };
    Outcome::Retry { after: None, status: status.into(), error: e.to_string() }
}

async fn send(req: reqwest::RequestBuilder) -> Outcome {
    match req.send().await {
        Err(e) => transport(e),
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = if (200..300).contains(&status) { String::new() } else { resp.text().await.unwrap_or_default() };
            classify(status, retry_after.as_deref(), &body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_answer_table_maps_as_designed() {
        assert_eq!(classify(200, None, ""), Outcome::Ack);
        assert_eq!(classify(204, None, ""), Outcome::Ack);
        assert_eq!(classify(202, None, ""), Outcome::Deferred);
        assert!(
            matches!(classify(429, Some("7"), ""), Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(matches!(classify(503, None, ""), Outcome::Retry { after: None, .. }));
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
