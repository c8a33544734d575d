//! The app-facing HTTP API (DESIGN.md §3.1): produce, message status, ack
//! callbacks and pull.
//! Errors become answers in one place: [`error`].

pub mod deliveries;
pub mod error;
pub mod produce;
pub mod replay;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use self::error::ApiError;
use self::produce::Limits;
use crate::metrics::ProduceLabels;
use crate::outbox::MessageState;
use crate::state::Sidecar;

/// Extra bytes a single-message body may have over the payload limit, for a
/// structured CloudEvent's envelope.
pub const ENVELOPE_ALLOWANCE: usize = 64 << 10;

/// The API router.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    Router::new()
        .route("/v1/topics/{topic}/messages", post(produce_one))
        .route("/v1/topics/{topic}/messages:batch", post(produce_batch))
        .route("/v1/topics/{topic}/outbox:replay", post(replay::replay))
        .route("/v1/messages/{id}", get(message_status))
        .route("/v1/deliveries/{id}/ack", post(deliveries::ack))
        .route("/v1/deliveries/{id}/retry", post(deliveries::retry))
        .route("/v1/deliveries/{id}/reject", post(deliveries::reject))
        .route("/v1/subscriptions/{name}/messages", get(deliveries::pull))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Auth wraps every route (and the fallbacks), so an unauthenticated
        // caller learns nothing, not even which routes exist.
        .layer(middleware::from_fn_with_state(sidecar.clone(), auth))
        .with_state(sidecar)
}

async fn auth(State(s): State<Arc<Sidecar>>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.config.api_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `?ack=local|broker`.
#[derive(Debug, Deserialize, Default)]
pub struct ProduceQuery {
    ack: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    Local,
    Broker,
}

fn ack_mode(q: &ProduceQuery) -> Result<AckMode, ApiError> {
    match q.ack.as_deref() {
        None | Some("local") => Ok(AckMode::Local),
        Some("broker") => Ok(AckMode::Broker),
        Some(other) => Err(ApiError::BadRequest(format!("ack={other:?}: use ack=local or ack=broker"))),
    }
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize, what: &'static str) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { what, limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut too_large = false;
        while let Some(err) = source {
            too_large |= err.is::<http_body_util::LengthLimitError>();
            source = err.source();
        }
        if too_large {
            ApiError::TooLarge { what, limit }
        } else {
            ApiError::BadRequest(format!("could not read the request body: {e}"))
        }
    })
}

/// Refuses an encoded (compressed) body: it would be stored as it came,
/// under a content type that does not say so.
fn check_encoding(h: &HeaderMap) -> Result<(), ApiError> {
    match h.get(axum::http::header::CONTENT_ENCODING) {
        None => Ok(()),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => Ok(()),
        Some(v) => Err(ApiError::UnsupportedMediaType(format!(
            "content-encoding {v:?} is not taken: send the body as it is to be stored"
        ))),
    }
}

/// Checks the topic and the sidecar's state; returns the payload limits.
fn admit(s: &Sidecar, topic: &str) -> Result<(Arc<crate::outbox::TopicLog>, Limits), ApiError> {
    not_shutting_down(s)?;
    let unknown = || {
        if s.is_config_loaded() {
            ApiError::UnknownTopic(topic.to_owned())
        } else {
            ApiError::Unavailable("the sidecar is starting: its configuration is not loaded yet".into())
        }
    };
    let spec = s.topic_spec(topic).ok_or_else(unknown)?;
    // Configured, but its outbox could not be opened (a full disk): the
    // sidecar tries again (see `reopen_outboxes`); not a 404.
    let tl = s.outbox.topic(topic).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "the outbox of topic {topic:?} could not be opened (the sidecar's log says why); it is tried again every {}s",
            crate::REOPEN_EVERY.as_secs()
        ))
    })?;
    let max_payload = s.config.max_message_bytes.min(spec.max_message_size as usize);
    Ok((tl, Limits::new(max_payload, s.broker.max_message_bytes())))
}

fn count(s: &Sidecar, topic: &str, code: StatusCode, started: Instant) {
    // Only known topics get their own series: a client can name any number
    // of unknown ones.
    let topic = if s.knows_topic(topic) { topic } else { "" };
    s.metrics.produce_requests.get_or_create(&ProduceLabels { topic: topic.to_owned(), code: code.as_u16() }).inc();
    s.metrics.produce_duration.observe(started.elapsed().as_secs_f64());
}

/// Path and query extractors whose rejections become our JSON 400.
pub type PathArg<T> = Result<Path<T>, axum::extract::rejection::PathRejection>;
/// See [`PathArg`].
pub type QueryArg<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// Unwraps an extractor, turning its rejection into a 400 in our error shape.
pub fn arg<T, R: std::fmt::Display>(r: Result<T, R>) -> Result<T, ApiError> {
    r.map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// 503 once the shutdown began. A produce call checks it on admission and
/// again once the body is in (a slow upload may outlast the start of a
/// shutdown): an append after the drain began could be answered 202 and
/// never forwarded before the process exits.
pub(crate) fn not_shutting_down(s: &Sidecar) -> Result<(), ApiError> {
    if s.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    Ok(())
}

async fn produce_one(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    query: QueryArg<ProduceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(topic) = arg(path)?;
    let Query(q) = arg(query)?;
    let started = Instant::now();
    let result = async {
        let mode = ack_mode(&q)?;
        let (tl, limits) = admit(&s, &topic)?;
        check_encoding(&headers)?;
        let body = read_body(&headers, body, limits.max_payload + ENVELOPE_ALLOWANCE, "request body").await?;
        let record = produce::single(&headers, body, limits)?;
        let id = record.id.clone();
        not_shutting_down(&s)?;
        let confirmations = confirmations(&s, &topic, mode)?;
        let range = s
            .outbox
            .append(&tl, std::slice::from_ref(&record))
            .await
            .map_err(|e| append_failed(e, || vec![id.clone()]))?;
        s.metrics.produce_messages.get_or_create(&crate::metrics::TopicLabels { topic: topic.clone() }).inc();
        let answer = Produced::new(&id, range.start).topic(&topic);
        let (status, answer) = match mode {
            AckMode::Local => (StatusCode::ACCEPTED, answer.pending()),
            AckMode::Broker => {
                let ids = || vec![id.clone()];
                wait_confirmed(&s, confirmations, range.end, ids).await?;
                refuse_parked(&s, ids())?;
                (StatusCode::CREATED, answer.forwarded(&s))
            }
        };
        Ok::<_, ApiError>((status, Json(answer)).into_response())
    }
    .await;
    count(&s, &topic, result.as_ref().map_or_else(ApiError::status, |r| r.status()), started);
    result
}

async fn produce_batch(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    query: QueryArg<ProduceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(topic) = arg(path)?;
    let Query(q) = arg(query)?;
    let started = Instant::now();
    let result = async {
        let mode = ack_mode(&q)?;
        let (tl, limits) = admit(&s, &topic)?;
        check_encoding(&headers)?;
        let body = read_body(&headers, body, s.config.max_batch_bytes, "batch body").await?;
        let records = produce::batch(&headers, &body, limits)?;
        let ids = || records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        not_shutting_down(&s)?;
        let confirmations = confirmations(&s, &topic, mode)?;
        let range = s.outbox.append(&tl, &records).await.map_err(|e| append_failed(e, ids))?;
        s.metrics
            .produce_messages
            .get_or_create(&crate::metrics::TopicLabels { topic: topic.clone() })
            .inc_by(records.len() as u64);
        let messages = records.iter().zip(range.clone()).map(|(r, offset)| Produced::new(&r.id, offset));
        let (status, messages): (_, Vec<Produced<'_>>) = match mode {
            AckMode::Local => (StatusCode::ACCEPTED, messages.map(Produced::pending).collect()),
            AckMode::Broker => {
                wait_confirmed(&s, confirmations, range.end, ids).await?;
                refuse_parked(&s, ids())?;
                (StatusCode::CREATED, messages.map(|m| m.forwarded(&s)).collect())
            }
        };
        let answer = BatchAnswer { topic: &topic, count: records.len(), messages };
        Ok::<_, ApiError>((status, Json(answer)).into_response())
    }
    .await;
    count(&s, &topic, result.as_ref().map_or_else(ApiError::status, |r| r.status()), started);
    result
}

/// With `ack=broker`, the topic's confirmed offset, taken before the call
/// stores anything (a topic added at run time may not have its forwarder yet).
fn confirmations(s: &Sidecar, topic: &str, mode: AckMode) -> Result<Option<watch::Receiver<u64>>, ApiError> {
    match mode {
        AckMode::Local => Ok(None),
        AckMode::Broker => s
            .confirmed(topic)
            .map(Some)
            .ok_or_else(|| ApiError::Unavailable(format!("no forwarder for topic {topic:?} yet"))),
    }
}

/// The answer to a failed append. After a failed sync of records the
/// forwarder could already read, they may reach the broker: the answer
/// names them.
fn append_failed(e: ferry_log::Error, ids: impl FnOnce() -> Vec<String>) -> ApiError {
    match e {
        e @ ferry_log::Error::SyncFailed { .. } => ApiError::OutcomeUnknown { why: crate::error_chain(&e), ids: ids() },
        other => other.into(),
    }
}

/// Waits until the broker confirmed every offset below `end`; on failure
/// the error names the stored messages (`ids`).
async fn wait_confirmed(
    s: &Sidecar,
    rx: Option<watch::Receiver<u64>>,
    end: u64,
    ids: impl FnOnce() -> Vec<String>,
) -> Result<(), ApiError> {
    let Some(mut rx) = rx else { return Ok(()) };
    let timeout = s.config.broker_ack_timeout;
    let confirmed = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= end)).await.map(|r| r.is_ok());
    match confirmed {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::StoppedBeforeConfirmed { ids: ids() }),
        Err(_) => Err(ApiError::BrokerTimeout { timeout, ids: ids() }),
    }
}

/// Errs if the forwarder parked some of these confirmed messages (the
/// broker refused them for good) rather than forwarding them.
fn refuse_parked(s: &Sidecar, ids: Vec<String>) -> Result<(), ApiError> {
    let parked: Vec<String> = ids
        .iter()
        .filter(|id| s.outbox.status(id).is_some_and(|st| st.state == MessageState::Parked))
        .cloned()
        .collect();
    if parked.is_empty() {
        Ok(())
    } else {
        Err(ApiError::RefusedByBroker { parked, ids })
    }
}

/// A produced message in an answer: where it is in the outbox, and with
/// `ack=broker` where the broker stored it.
#[derive(Serialize)]
struct Produced<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
}

impl<'a> Produced<'a> {
    fn new(id: &'a str, offset: u64) -> Self {
        Produced { id, topic: None, offset, status: None, stream: None, sequence: None }
    }

    fn topic(self, topic: &'a str) -> Self {
        Produced { topic: Some(topic), ..self }
    }

    fn pending(self) -> Self {
        Produced { status: Some("pending"), ..self }
    }

    /// Confirmed by the broker: its stream and sequence, when still known.
    fn forwarded(self, s: &Sidecar) -> Self {
        let (stream, sequence) = match s.outbox.status(self.id).map(|st| st.state) {
            Some(MessageState::Forwarded { stream, sequence }) => (Some(stream), Some(sequence)),
            _ => (None, None),
        };
        Produced { status: Some("forwarded"), stream, sequence, ..self }
    }
}

/// The answer to a batch produce.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    topic: &'a str,
    count: usize,
    messages: Vec<Produced<'a>>,
}

async fn message_status(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = arg(path)?;
    produce::check_id(&id)?;
    let st = s.outbox.status(&id).ok_or_else(|| ApiError::UnknownMessage(id.clone()))?;
    let mut answer = json!({ "id": id, "topic": st.topic, "offset": st.offset });
    match st.state {
        MessageState::Pending => answer["status"] = "pending".into(),
        MessageState::Parked => answer["status"] = "parked".into(),
        MessageState::Forwarded { stream, sequence } => {
            answer["status"] = "forwarded".into();
            answer["stream"] = stream.into();
            answer["sequence"] = sequence.into();
        }
    }
    Ok(Json(answer))
}

#[cfg(test)]
mod answer_tests {
    use super::*;

    async fn answer(e: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = e.into_response();
        let retry_after = resp.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_sync_that_failed_after_the_forwarder_could_read_names_the_messages() {
        let io = || std::io::Error::new(std::io::ErrorKind::StorageFull, "no space");
        let failed = ferry_log::Error::SyncFailed { path: "/d/outbox/t/0.log".into(), source: io() };
        let (status, retry_after, body) = answer(append_failed(failed, || vec!["a".into(), "b".into()])).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(body["error"]["ids"], json!(["a", "b"]));
        assert!(body["error"]["message"].as_str().unwrap().contains("may still reach the broker"), "{body}");
        assert_eq!(retry_after, None, "the topic takes nothing more until a restart");
        // A full disk before anything was readable stored nothing: 507,
        // and no ids.
        let nothing = ferry_log::Error::NoSpace { op: "appending to", path: "/d".into(), source: io() };
        let (status, _, body) = answer(append_failed(nothing, || vec!["a".into()])).await;
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
        assert!(body["error"].get("ids").is_none(), "{body}");
    }
}
