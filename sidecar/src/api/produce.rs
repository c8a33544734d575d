//! Turning produce requests into log records: raw bodies, CloudEvents in
//! binary and structured mode, and the three batch formats.
//!
//! Stored headers: `content-type`, and for CloudEvents every attribute as
//! `ce-{name}` (the binary-mode names), so delivery can rebuild the event.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use axum::http::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use ferry_api::naming::headers;
use ferry_log::{now_ms, NewRecord};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::ApiError;

/// Longest message id or key, bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Most messages in one batch request.
pub const MAX_BATCH_MESSAGES: usize = 10_000;

const CE_STRUCTURED: &str = "application/cloudevents+json";
const CE_BATCH: &str = "application/cloudevents-batch+json";

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// The media type of a request, lowercased, without parameters.
pub fn media_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(axum::http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| bad(format!("header {name} must be visible ASCII"))),
    }
}

/// A message id: 1-256 visible ASCII characters.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES || !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(bad(format!("message id must be 1-{MAX_ID_BYTES} visible ASCII characters without spaces")));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_ID_BYTES || key.chars().any(char::is_control) {
        return Err(bad(format!("key must be 1-{MAX_ID_BYTES} bytes without control characters")));
    }
    Ok(())
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Limits applied to each message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload.
    pub max_payload: usize,
    /// Most bytes of headers, as NATS encodes them (see [`wire_headers`]).
    pub max_headers: usize,
    /// Largest message the broker takes, headers and payload together, with
    /// room left for a dead letter's headers; `None` for no such limit.
    pub max_message: Option<usize>,
}

impl Limits {
    /// The limits for a topic whose largest payload is `max_payload`, on a
    /// broker that takes messages of up to `broker_max` bytes.
    pub fn new(max_payload: usize, broker_max: Option<usize>) -> Limits {
        let dead_letter = ferry_api::DEAD_LETTER_HEADER_ROOM as usize;
        Limits {
            max_payload,
            max_headers: ferry_api::HEADER_ROOM as usize - dead_letter,
            max_message: broker_max.map(|m| m.saturating_sub(dead_letter)),
        }
    }
}

/// The bytes of a record's headers as the forwarder sends them to NATS:
/// `NATS/1.0` line, each header (with `Nats-Msg-Id` and `ferry-key`) as
/// `name: value` line, and the blank line.
pub fn wire_headers(r: &NewRecord) -> usize {
    let line = |name: &str, value: &str| name.len() + value.len() + 4;
    let mut n = "NATS/1.0\r\n\r\n".len() + line(headers::NATS_MSG_ID, &r.id);
    n += r.key.as_deref().map_or(0, |k| line(headers::KEY, k));
    n + r.headers.iter().map(|(name, value)| line(name, value)).sum::<usize>()
}

/// Checks what the broker would refuse for good, so that an accepted
/// message can always be forwarded: headers within their room, and headers
/// and payload together within the broker's largest message.
fn check_sizes(records: &[NewRecord], limits: Limits) -> Result<(), ApiError> {
    for r in records {
        let h = wire_headers(r);
        if h > limits.max_headers {
            return Err(ApiError::TooLarge { what: "message headers (with id and key)", limit: limits.max_headers });
        }
        if let Some(max) = limits.max_message {
            if h + r.payload.len() > max {
                return Err(ApiError::TooLarge {
                    what: "message with its headers (the broker's max_payload, less room for a dead letter's headers)",
                    limit: max,
                });
            }
        }
    }
    Ok(())
}

fn record(
    id: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Bytes,
    limits: Limits,
) -> Result<NewRecord, ApiError> {
    check_id(&id)?;
    if let Some(k) = &key {
        check_key(k)?;
    }
    if payload.len() > limits.max_payload {
        return Err(ApiError::TooLarge { what: "message payload", limit: limits.max_payload });
    }
    Ok(NewRecord { timestamp_ms: now_ms(), id, key, headers, payload })
}

/// One message from a single-produce request, within `limits`.
pub fn single(h: &HeaderMap, body: Bytes, limits: Limits) -> Result<NewRecord, ApiError> {
    let mut record = single_record(h, body, limits)?;
    trace_context(h, &mut record.headers);
    check_sizes(std::slice::from_ref(&record), limits)?;
    Ok(record)
}

/// Most bytes of a `tracestate` kept (W3C: 512 is what a vendor must take).
const MAX_TRACESTATE: usize = 512;

/// Keeps the producer's W3C trace context (`traceparent`, with its
/// `tracestate`) with the message, so that its push to a subscriber
/// continues the producer's trace. A message that brings its own (a
/// structured CloudEvent's extension) keeps that one. A malformed
/// `traceparent` is left out, not refused: W3C has the receiver start a
/// new trace then.
fn trace_context(h: &HeaderMap, headers: &mut Vec<(String, String)>) {
    if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("traceparent") || n.eq_ignore_ascii_case("ce-traceparent")) {
        return;
    }
    let Some(parent) = h.get("traceparent").and_then(|v| v.to_str().ok()).filter(|v| valid_traceparent(v)) else {
        return;
    };
    headers.push(("traceparent".to_owned(), parent.to_owned()));
    if let Some(state) =
        h.get("tracestate").and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty() && v.len() <= MAX_TRACESTATE)
    {
        headers.push(("tracestate".to_owned(), state.to_owned()));
    }
}

/// A version-00 W3C `traceparent`: `00-{trace id}-{parent id}-{flags}`,
/// lowercase hex of 32, 16 and 2 digits, neither id all zeros.
fn valid_traceparent(v: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let parts: Vec<&str> = v.split('-').collect();
    matches!(parts[..], [version, trace, parent, flags]
        if version == "00" && hex(trace, 32) && nonzero(trace) && hex(parent, 16) && nonzero(parent) && hex(flags, 2))
}

fn single_record(h: &HeaderMap, body: Bytes, limits: Limits) -> Result<NewRecord, ApiError> {
    let ferry_id = header_str(h, headers::ID)?.map(str::to_owned);
    let key = header_str(h, headers::KEY)?.map(str::to_owned);
    let media = media_type(h);
    if media.as_deref() == Some(CE_STRUCTURED) {
        let text = std::str::from_utf8(&body).map_err(|_| bad("CloudEvent JSON is not UTF-8"))?;
        let mut rec = structured(text, limits)?;
        if let Some(id) = ferry_id {
            rec.id = id;
        }
        if let Some(k) = key {
            check_key(&k)?;
            rec.key = Some(k);
        }
        check_id(&rec.id)?;
        return Ok(rec);
    }
    if let Some(spec) = header_str(h, "ce-specversion")? {
        return binary(h, spec, ferry_id, key, body, limits);
    }
    let mut hdrs = Vec::new();
    if let Some(ct) = header_str(h, "content-type")? {
        hdrs.push(("content-type".to_owned(), ct.to_owned()));
    }
    record(ferry_id.unwrap_or_else(new_id), key, hdrs, body, limits)
}

fn binary(
    h: &HeaderMap,
    spec: &str,
    ferry_id: Option<String>,
    key: Option<String>,
    body: Bytes,
    limits: Limits,
) -> Result<NewRecord, ApiError> {
    if spec != "1.0" {
        return Err(bad(format!("ce-specversion {spec:?} is not supported; use 1.0")));
    }
    let mut hdrs = Vec::new();
    for (name, value) in h {
        let name = name.as_str();
        if let Some(attr) = name.strip_prefix("ce-") {
            check_attr_name(attr)?;
            let value = value.to_str().map_err(|_| bad(format!("header {name} must be visible ASCII")))?;
            hdrs.push((name.to_owned(), value.to_owned()));
        }
    }
    for required in ["ce-id", "ce-source", "ce-type"] {
        if !hdrs.iter().any(|(n, v)| n == required && !v.is_empty()) {
            return Err(bad(format!("binary-mode CloudEvent lacks the {required} header")));
        }
    }
    if let Some(ct) = header_str(h, "content-type")? {
        hdrs.push(("content-type".to_owned(), ct.to_owned()));
    }
    let ce_id = hdrs.iter().find(|(n, _)| n == "ce-id").map(|(_, v)| v.clone()).expect("checked above");
    record(ferry_id.unwrap_or(ce_id), key, hdrs, body, limits)
}

/// CloudEvents attribute names: lowercase letters and digits, 1-20 long.
fn check_attr_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 20 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(bad(format!("CloudEvent attribute {name:?}: names are 1-20 lowercase letters or digits")));
    }
    // `data` is the payload; `ferry…` attributes are the ones Ferry adds
    // when it delivers (delivery id, attempt, key, subscription).
    if name == "data" || name.starts_with("ferry") {
        return Err(bad(format!("CloudEvent attribute {name:?} is reserved")));
    }
    Ok(())
}

/// A structured-mode CloudEvent, `text` a JSON object. Its `data` is kept
/// as the client wrote it (key order, number precision), as in batches.
fn structured(text: &str, limits: Limits) -> Result<NewRecord, ApiError> {
    if !text.trim_start().starts_with('{') {
        return Err(bad("a CloudEvent must be a JSON object"));
    }
    let map: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid CloudEvent JSON: {e}")))?;
    let mut hdrs = Vec::new();
    let mut data: Option<&RawValue> = None;
    let mut data_b64: Option<String> = None;
    let mut content_type: Option<String> = None;
    for (name, raw) in map {
        if name == "data" {
            data = Some(raw);
            continue;
        }
        let v: Value =
            serde_json::from_str(raw.get()).map_err(|e| bad(format!("CloudEvent attribute {name:?}: {e}")))?;
        match name.as_str() {
            "data_base64" => match v {
                Value::String(s) => data_b64 = Some(s),
                _ => return Err(bad("data_base64 must be a string")),
            },
            "datacontenttype" => match v {
                Value::String(s) => content_type = Some(s),
                _ => return Err(bad("datacontenttype must be a string")),
            },
            "id" | "source" | "type" | "specversion" if !v.is_string() => {
                return Err(bad(format!("CloudEvent attribute {name:?} must be a string")));
            }
            attr => {
                check_attr_name(attr)?;
                let text = match v {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(bad(format!("CloudEvent attribute {attr:?} must be a string, number or boolean"))),
                };
                if text.chars().any(char::is_control) {
                    return Err(bad(format!("CloudEvent attribute {attr:?} contains control characters")));
                }
                hdrs.push((format!("ce-{attr}"), text));
            }
        }
    }
    let attr = |n: &str| hdrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    match attr("ce-specversion").as_deref() {
        Some("1.0") => {}
        Some(other) => return Err(bad(format!("specversion {other:?} is not supported; use 1.0"))),
        None => return Err(bad("CloudEvent lacks specversion")),
    }
    for required in ["ce-id", "ce-source", "ce-type"] {
        if attr(required).is_none_or(|v| v.is_empty()) {
            return Err(bad(format!("CloudEvent lacks {}", &required[3..])));
        }
    }
    let id = attr("ce-id").expect("checked above");
    let payload = match (data, data_b64) {
        (Some(_), Some(_)) => return Err(bad("a CloudEvent has data or data_base64, not both")),
        (None, Some(b64)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| bad(format!("data_base64: {e}")))?,
        ),
        (Some(raw), None) if raw.get().starts_with('"') && content_type.as_deref().is_some_and(|c| !is_json(c)) => {
            let text: String = serde_json::from_str(raw.get()).map_err(|e| bad(format!("data: {e}")))?;
            Bytes::from(text)
        }
        (Some(raw), None) => {
            content_type.get_or_insert_with(|| "application/json".to_owned());
            Bytes::copy_from_slice(raw.get().as_bytes())
        }
        (None, None) => Bytes::new(),
    };
    if let Some(ct) = content_type {
        hdrs.push(("content-type".to_owned(), ct));
    }
    record(id, None, hdrs, payload, limits)
}

fn is_json(ct: &str) -> bool {
    let ct = ct.split(';').next().unwrap_or("").trim();
    ct == "application/json" || ct.ends_with("+json") || ct == "text/json"
}

/// One entry of a JSON-array or NDJSON batch, parsed from the request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry<'a> {
    id: Option<String>,
    key: Option<String>,
    /// Kept as the client wrote it: stored byte for byte, never re-encoded,
    /// and not copied: the payload is this part of the request body.
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(rename = "data_base64")]
    data_base64: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The record of `e`, an entry parsed from `body`.
fn entry(e: Entry<'_>, body: &Bytes, limits: Limits) -> Result<NewRecord, ApiError> {
    let mut hdrs = Vec::new();
    for (name, value) in e.headers {
        let lower = name.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(bad(format!("header name {name:?} must be letters, digits, '-' or '_'")));
        }
        if lower == "content-type" || lower.starts_with("ferry-") || lower.starts_with("nats-") {
            return Err(bad(format!("header {name:?} is reserved; use the entry's fields")));
        }
        if let Some(attr) = lower.strip_prefix("ce-") {
            check_attr_name(attr)?;
        }
        if value.chars().any(char::is_control) {
            return Err(bad(format!("header {name:?} contains control characters")));
        }
        hdrs.push((lower, value));
    }
    let (payload, default_ct) = match (e.data, e.data_base64) {
        (Some(_), Some(_)) => return Err(bad("an entry has data or data_base64, not both")),
        (Some(raw), None) => (body.slice_ref(raw.get().as_bytes()), "application/json"),
        (None, Some(b64)) => (
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| bad(format!("data_base64: {e}")))?,
            ),
            "application/octet-stream",
        ),
        (None, None) => (Bytes::new(), "application/octet-stream"),
    };
    hdrs.push(("content-type".to_owned(), e.content_type.unwrap_or_else(|| default_ct.to_owned())));
    record(e.id.unwrap_or_else(new_id), e.key, hdrs, payload, limits)
}

/// The messages of a batch request, all or nothing, each within `limits`.
///
/// More than [`MAX_BATCH_MESSAGES`] are refused while parsing, before any
/// per-message structure is built: a body of millions of tiny entries
/// (`{}` is 3 bytes) would otherwise take some hundred bytes of memory
/// each before the count was checked.
pub fn batch(h: &HeaderMap, body: &Bytes, limits: Limits) -> Result<Vec<NewRecord>, ApiError> {
    let media = media_type(h).unwrap_or_default();
    let records: Vec<NewRecord> = match media.as_str() {
        CE_BATCH => {
            let items: Vec<&RawValue> = capped_array(body).map_err(|e| match e {
                ArrayError::TooMany => too_many(),
                ArrayError::Json(e) => bad(format!("invalid CloudEvents batch: {e}")),
            })?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| structured(v.get(), limits).map_err(|e| at(i, e)))
                .collect::<Result<_, _>>()?
        }
        "application/json" => match capped_array::<Entry<'_>>(body) {
            Ok(entries) => entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| entry(e, body, limits).map_err(|e| at(i, e)))
                .collect::<Result<_, _>>()?,
            Err(ArrayError::TooMany) => return Err(too_many()),
            // Parsed again, slowly, only to say which entry is wrong.
            Err(ArrayError::Json(whole)) => {
                let items: Vec<&RawValue> = capped_array(body).map_err(|e| match e {
                    ArrayError::TooMany => too_many(),
                    ArrayError::Json(_) => bad(format!("a batch is a JSON array of entries: {whole}")),
                })?;
                for (i, item) in items.iter().enumerate() {
                    parse_entry(item.get(), body, limits).map_err(|e| at(i, e))?;
                }
                return Err(bad(format!("a batch is a JSON array of entries: {whole}")));
            }
        },
        "application/x-ndjson" | "application/ndjson" => {
            let text = std::str::from_utf8(body).map_err(|_| bad("NDJSON batch is not UTF-8"))?;
            let lines = || text.lines().filter(|l| !l.trim().is_empty());
            // Counted first, without allocating, up to one past the most.
            if lines().nth(MAX_BATCH_MESSAGES).is_some() {
                return Err(too_many());
            }
            lines()
                .enumerate()
                .map(|(i, line)| parse_entry(line, body, limits).map_err(|e| at(i, e)))
                .collect::<Result<_, _>>()?
        }
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "batch content type {other:?}: use application/json, application/x-ndjson or {CE_BATCH}"
            )))
        }
    };
    if records.is_empty() {
        return Err(bad("empty batch"));
    }
    debug_assert!(records.len() <= MAX_BATCH_MESSAGES, "refused while parsing");
    check_sizes(&records, limits)?;
    Ok(records)
}

/// The answer to a batch of more than [`MAX_BATCH_MESSAGES`].
fn too_many() -> ApiError {
    bad(format!("a batch holds at most {MAX_BATCH_MESSAGES} messages"))
}

/// Why a JSON array did not become a batch's elements.
enum ArrayError {
    /// It has more than [`MAX_BATCH_MESSAGES`] elements.
    TooMany,
    /// It is not a JSON array of such elements.
    Json(serde_json::Error),
}

/// The elements of the JSON array `body`, if it has at most
/// [`MAX_BATCH_MESSAGES`]. Parsing stops at the first element past that,
/// which is only checked to be JSON, never built: at most that many
/// elements are ever held, whatever the body's size.
fn capped_array<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<Vec<T>, ArrayError> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Capped { over: &over, element: PhantomData }.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(items) => Ok(items),
        Err(_) if over.get() => Err(ArrayError::TooMany),
        Err(e) => Err(ArrayError::Json(e)),
    }
}

/// A sequence of at most [`MAX_BATCH_MESSAGES`] `T`s; sets `over` when it
/// fails for having more.
struct Capped<'f, T> {
    over: &'f Cell<bool>,
    element: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Capped<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::new();
        while items.len() < MAX_BATCH_MESSAGES {
            match seq.next_element()? {
                Some(item) => items.push(item),
                None => return Ok(items),
            }
        }
        if seq.next_element::<IgnoredAny>()?.is_some() {
            self.over.set(true);
            return Err(de::Error::custom(format_args!("more than {MAX_BATCH_MESSAGES} elements")));
        }
        Ok(items)
    }
}

/// One entry, `text`, a part of `body`.
fn parse_entry(text: &str, body: &Bytes, limits: Limits) -> Result<NewRecord, ApiError> {
    let e: Entry<'_> = serde_json::from_str(text).map_err(|e| bad(format!("invalid entry: {e}")))?;
    entry(e, body, limits)
}

/// Prefixes a batch error with the entry's position.
fn at(i: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::BadRequest(m) => ApiError::BadRequest(format!("message {i}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const L: Limits = Limits { max_payload: 1024, max_headers: 1 << 20, max_message: None };

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_key_header_is_checked_in_every_mode() {
        let long = "k".repeat(MAX_ID_BYTES + 1);
        for key in ["", "a\tb", long.as_str()] {
            let raw = {
                let mut h = HeaderMap::new();
                h.insert("ferry-key", HeaderValue::from_str(key).unwrap());
                h
            };
            let mut structured = raw.clone();
            structured.insert("content-type", HeaderValue::from_static("application/cloudevents+json"));
            let event = r#"{"specversion":"1.0","id":"e1","source":"/s","type":"t"}"#;
            let mut binary = raw.clone();
            for (n, v) in [("ce-specversion", "1.0"), ("ce-id", "e1"), ("ce-source", "/s"), ("ce-type", "t")] {
                binary.insert(n, HeaderValue::from_static(v));
            }
            for (mode, h, body) in [("raw", &raw, ""), ("structured", &structured, event), ("binary", &binary, "")] {
                let got = single(h, Bytes::from(body), L);
                assert!(matches!(got, Err(ApiError::BadRequest(_))), "{mode} mode with key {key:?}: {got:?}");
            }
        }
        let mut h = hdrs(&[("content-type", "application/cloudevents+json"), ("ferry-key", "k1")]);
        h.insert("ferry-id", HeaderValue::from_static("m1"));
        let ok = single(&h, Bytes::from(r#"{"specversion":"1.0","id":"e1","source":"/s","type":"t"}"#), L).unwrap();
        assert_eq!((ok.id.as_str(), ok.key.as_deref()), ("m1", Some("k1")), "a good key is kept");
    }

    #[test]
    fn the_producers_trace_context_is_kept_unless_malformed_or_the_event_brings_its_own() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = |r: &NewRecord| -> Vec<(String, String)> {
            r.headers.iter().filter(|(n, _)| n.contains("trace")).cloned().collect()
        };
        let r = single(&hdrs(&[("traceparent", parent), ("tracestate", "a=1")]), "x".into(), L).unwrap();
        let want = [("traceparent".to_owned(), parent.to_owned()), ("tracestate".to_owned(), "a=1".to_owned())];
        assert_eq!(trace(&r), want);
        let binary = hdrs(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("traceparent", parent),
        ]);
        assert_eq!(trace(&single(&binary, "x".into(), L).unwrap()), want[..1], "binary mode");
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            let r = single(&hdrs(&[("traceparent", bad), ("tracestate", "a=1")]), "x".into(), L).unwrap();
            assert_eq!(trace(&r), [], "{bad}: left out, not refused, and its state with it");
        }
        let mut h = hdrs(&[("content-type", "application/cloudevents+json"), ("traceparent", parent)]);
        h.insert("ferry-id", HeaderValue::from_static("m1"));
        let own = r#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;
        let r = single(&h, Bytes::from(own), L).unwrap();
        let kept: Vec<&str> =
            r.headers.iter().filter(|(n, _)| n.ends_with("traceparent")).map(|(_, v)| v.as_str()).collect();
        assert_eq!(kept, ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"], "the event's own");
    }

    #[test]
    fn a_raw_body_keeps_its_content_type_id_and_key() {
        let r =
            single(&hdrs(&[("content-type", "text/plain"), ("ferry-id", "abc"), ("ferry-key", "k1")]), "hi".into(), L)
                .unwrap();
        assert_eq!((r.id.as_str(), r.key.as_deref(), &r.payload[..]), ("abc", Some("k1"), &b"hi"[..]));
        assert_eq!(r.headers, [("content-type".to_owned(), "text/plain".to_owned())]);
        let generated = single(&HeaderMap::new(), Bytes::new(), L).unwrap();
        assert_eq!(generated.id.len(), 36, "a UUID is generated");
    }

    #[test]
    fn a_binary_cloudevent_keeps_every_attribute_and_uses_its_id() {
        let h = hdrs(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/shop"),
            ("ce-type", "order.created"),
            ("ce-myext", "x"),
            ("content-type", "application/json"),
        ]);
        let r = single(&h, "{}".into(), L).unwrap();
        assert_eq!(r.id, "e1");
        for want in [
            ("ce-source", "/shop"),
            ("ce-type", "order.created"),
            ("ce-myext", "x"),
            ("content-type", "application/json"),
        ] {
            assert!(r.headers.contains(&(want.0.to_owned(), want.1.to_owned())), "{want:?} in {:?}", r.headers);
        }
        let missing = hdrs(&[("ce-specversion", "1.0"), ("ce-id", "e1"), ("ce-type", "t")]);
        assert!(matches!(single(&missing, Bytes::new(), L), Err(ApiError::BadRequest(m)) if m.contains("ce-source")));
    }

    #[test]
    fn a_structured_cloudevent_becomes_payload_and_ce_headers() {
        let body = r#"{"specversion":"1.0","id":"e2","source":"/s","type":"t","datacontenttype":"application/json","data":{"n":1},"seq":7}"#;
        let r = single(&hdrs(&[("content-type", "application/cloudevents+json")]), body.into(), L).unwrap();
        assert_eq!(r.id, "e2");
        assert_eq!(&r.payload[..], br#"{"n":1}"#);
        assert!(r.headers.contains(&("ce-seq".to_owned(), "7".to_owned())));
        let b64 = r#"{"specversion":"1.0","id":"e3","source":"/s","type":"t","data_base64":"AAEC"}"#;
        let r = single(&hdrs(&[("content-type", "application/cloudevents+json")]), b64.into(), L).unwrap();
        assert_eq!(&r.payload[..], &[0, 1, 2]);
        let text =
            r#"{"specversion":"1.0","id":"e4","source":"/s","type":"t","datacontenttype":"text/plain","data":"hello"}"#;
        let r = single(&hdrs(&[("content-type", "application/cloudevents+json")]), text.into(), L).unwrap();
        assert_eq!(&r.payload[..], b"hello");
        let exact = r#"{"specversion":"1.0","id":"e5","source":"/s","type":"t","data":{"b":1,"a":2,"n":123456789012345678901234}}"#;
        let r = single(&hdrs(&[("content-type", "application/cloudevents+json")]), exact.into(), L).unwrap();
        assert_eq!(&r.payload[..], br#"{"b":1,"a":2,"n":123456789012345678901234}"#, "data is stored as written");
        let r = batch(&hdrs(&[("content-type", CE_BATCH)]), &Bytes::from(format!("[{exact}]")), L).unwrap();
        assert_eq!(&r[0].payload[..], br#"{"b":1,"a":2,"n":123456789012345678901234}"#, "in a batch too");
        for not_an_event in ["[1]", "\"x\"", "{\"specversion\":\"1.0\",", "{\"id\":{\"x\":1},\"specversion\":\"1.0\"}"]
        {
            let got = single(&hdrs(&[("content-type", "application/cloudevents+json")]), not_an_event.into(), L);
            assert!(matches!(got, Err(ApiError::BadRequest(_))), "{not_an_event}: {got:?}");
        }
        let bad_version = r#"{"specversion":"0.3","id":"e","source":"/s","type":"t"}"#;
        assert!(single(&hdrs(&[("content-type", "application/cloudevents+json")]), bad_version.into(), L).is_err());
    }

    #[test]
    fn batches_parse_in_all_three_formats_and_fail_whole() {
        let json = r#"[{"id":"a","data":{"x":1}},{"key":"k","data_base64":"AA==","contentType":"application/x"}]"#;
        let r = batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from(json.to_owned()), L).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].id, "a");
        assert_eq!(&r[0].payload[..], br#"{"x":1}"#, "data is stored as the client wrote it");
        assert_eq!(&r[1].payload[..], [0u8], "data_base64 is decoded");
        assert_eq!(r[1].key.as_deref(), Some("k"));
        assert_eq!(r[1].headers, [("content-type".to_owned(), "application/x".to_owned())]);
        let nd = "{\"id\":\"a\",\"data\":1}\n\n{\"id\":\"b\",\"data\":2}\n";
        let r = batch(&hdrs(&[("content-type", "application/x-ndjson")]), &Bytes::from(nd.to_owned()), L).unwrap();
        assert_eq!(r.iter().map(|r| &r.payload[..]).collect::<Vec<_>>(), [b"1", b"2"]);
        let ce = r#"[{"specversion":"1.0","id":"c1","source":"/s","type":"t"},{"specversion":"1.0","id":"c2","source":"/s","type":"t"}]"#;
        let r = batch(&hdrs(&[("content-type", "application/cloudevents-batch+json")]), &Bytes::from(ce.to_owned()), L)
            .unwrap();
        assert_eq!(r.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c1", "c2"]);
        let one_bad = r#"[{"id":"a"},{"id":"b","colour":"red"}]"#;
        let err =
            batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from(one_bad.to_owned()), L).unwrap_err();
        assert!(matches!(&err, ApiError::BadRequest(m) if m.starts_with("message 1:")), "{err:?}");
        assert!(matches!(
            batch(&hdrs(&[("content-type", "text/plain")]), &Bytes::from_static(b"x"), L),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from_static(b"[]"), L).is_err());
        // Reserved CloudEvent attributes, as entry headers or in any mode.
        for name in ["ce-data", "ce-ferrykey", "ce-Bad_Name"] {
            let entry = format!(r#"[{{"id":"a","headers":{{"{name}":"x"}}}}]"#);
            let got = batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from(entry), L);
            assert!(matches!(&got, Err(ApiError::BadRequest(m)) if m.starts_with("message 0:")), "{name}: {got:?}");
        }
        let ok = batch(
            &hdrs(&[("content-type", "application/json")]),
            &Bytes::from_static(br#"[{"id":"a","headers":{"ce-subject":"x","x-trace":"y"}}]"#),
            L,
        )
        .unwrap();
        assert!(ok[0].headers.contains(&("ce-subject".to_owned(), "x".to_owned())));
        let binary =
            hdrs(&[("ce-specversion", "1.0"), ("ce-id", "e"), ("ce-source", "/s"), ("ce-type", "t"), ("ce-data", "x")]);
        assert!(matches!(single(&binary, Bytes::new(), L), Err(ApiError::BadRequest(_))));
        let structured = r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","ferryattempt":"9"}"#;
        let h = hdrs(&[("content-type", "application/cloudevents+json")]);
        assert!(matches!(single(&h, structured.into(), L), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn a_batch_of_the_most_messages_is_taken_and_one_more_refused_in_every_format() {
        fn array(n: usize, element: &str) -> String {
            format!("[{}]", vec![element; n].join(","))
        }
        let body = |ct: &str, n: usize| match ct {
            // Blank lines are no messages.
            "application/x-ndjson" => "{}\n \n".repeat(n),
            CE_BATCH => array(n, r#"{"specversion":"1.0","id":"e","source":"/s","type":"t"}"#),
            _ => array(n, "{}"),
        };
        for ct in ["application/json", "application/x-ndjson", CE_BATCH] {
            let h = hdrs(&[("content-type", ct)]);
            let r = batch(&h, &Bytes::from(body(ct, MAX_BATCH_MESSAGES)), L).unwrap();
            assert_eq!(r.len(), MAX_BATCH_MESSAGES, "{ct}");
            let want = format!("a batch holds at most {MAX_BATCH_MESSAGES} messages");
            for n in [MAX_BATCH_MESSAGES + 1, 100_000] {
                let got = batch(&h, &Bytes::from(body(ct, n)), L);
                assert!(matches!(&got, Err(ApiError::BadRequest(m)) if *m == want), "{ct}, {n}: {got:?}");
            }
        }
        // Past the most, a bad entry (the slow path) still gets the limit...
        let bad_first = format!("[{{\"colour\":1}},{}]", vec!["{}"; MAX_BATCH_MESSAGES].join(","));
        let got = batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from(bad_first), L);
        assert!(matches!(&got, Err(ApiError::BadRequest(m)) if m.contains("at most")), "{got:?}");
        // ... and JSON that is no array of entries still says so.
        let not_json = format!("[{},{{]", vec!["{}"; MAX_BATCH_MESSAGES].join(","));
        let got = batch(&hdrs(&[("content-type", "application/json")]), &Bytes::from(not_json), L);
        assert!(matches!(&got, Err(ApiError::BadRequest(m)) if m.starts_with("a batch is a JSON array")), "{got:?}");
    }

    #[test]
    fn ids_keys_and_sizes_are_checked() {
        assert!(check_id("ok-1").is_ok());
        for bad_id in ["", "has space", &"x".repeat(257), "tab\t", "é"] {
            assert!(check_id(bad_id).is_err(), "{bad_id:?}");
        }
        let big = Bytes::from(vec![0u8; 1025]);
        assert!(matches!(single(&HeaderMap::new(), big, L), Err(ApiError::TooLarge { .. })));
    }
}
