//! Ack callbacks (`POST /v1/deliveries/{id}/ack|retry|reject`) and pull
//! (`GET /v1/subscriptions/{name}/messages?max=&wait=`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{arg, PathArg, QueryArg};
use crate::deliver::callbacks::Verdict;
use crate::state::Sidecar;

/// Most messages one pull returns.
pub const MAX_PULL: usize = 1000;
/// Longest a pull may wait.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(30);

/// Largest callback body read (axum's default body limit).
pub const MAX_CALLBACK_BODY: usize = 2 << 20;

/// A callback's body, or its rejection in our JSON error shape (axum's own
/// would be plain text).
fn callback_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { what: "callback body", limit: MAX_CALLBACK_BODY }
        } else {
            ApiError::BadRequest(format!("could not read the request body: {e}"))
        }
    })
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Longest retry delay an app may ask for.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 86_400);

fn parse_duration(field: &str, v: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(v)
        .map_err(|e| ApiError::BadRequest(format!("{field}: {v:?} is not a duration like 5s ({e})")))
}

fn retry_delay(v: &str) -> Result<Duration, ApiError> {
    let d = parse_duration("delay", v)?;
    if d > MAX_RETRY_DELAY {
        return Err(ApiError::BadRequest(format!("delay: {v:?} is longer than the most, 7d")));
    }
    Ok(d)
}

/// `?delay=5s` on retry.
#[derive(Debug, Deserialize, Default)]
pub struct RetryQuery {
    delay: Option<String>,
}

async fn resolve(s: &Sidecar, id: &str, verdict: Verdict) -> Result<Json<Value>, ApiError> {
    let what = match &verdict {
        Verdict::Ack => "acked",
        Verdict::Retry(_) => "retrying",
        Verdict::Reject(_) => "rejected",
    };
    let done = s.delivery.callbacks().resolve(id, verdict).ok_or_else(|| ApiError::UnknownDelivery(id.to_owned()))?;
    match done.await {
        Ok(Ok(())) => Ok(Json(json!({ "deliveryId": id, "status": what }))),
        Ok(Err(e)) => Err(ApiError::DeliverySettled(e)),
        Err(_) => Err(ApiError::ShuttingDown),
    }
}

/// `POST /v1/deliveries/{id}/ack`.
pub async fn ack(State(s): State<Arc<Sidecar>>, path: PathArg<String>) -> Result<Json<Value>, ApiError> {
    let Path(id) = arg(path)?;
    resolve(&s, &id, Verdict::Ack).await
}

/// `POST /v1/deliveries/{id}/retry` with `?delay=` or a body `{"delay": "5s"}`.
pub async fn retry(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    query: QueryArg<RetryQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = arg(path)?;
    let Query(q) = arg(query)?;
    let body = body_json(&callback_body(body)?)?;
    let delay = match (q.delay, body.get("delay")) {
        (Some(d), _) => Some(retry_delay(&d)?),
        (None, Some(Value::String(d))) => Some(retry_delay(d)?),
        (None, Some(Value::Null) | None) => None,
        (None, Some(_)) => return Err(ApiError::BadRequest("delay must be a string like \"5s\"".into())),
    };
    resolve(&s, &id, Verdict::Retry(delay)).await
}

/// `POST /v1/deliveries/{id}/reject` with an optional body `{"reason": "..."}`.
pub async fn reject(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = arg(path)?;
    let body = body_json(&callback_body(body)?)?;
    let reason = match body.get("reason") {
        Some(Value::String(r)) => r.clone(),
        None | Some(Value::Null) => "rejected by the app".to_owned(),
        Some(_) => return Err(ApiError::BadRequest("reason must be a string".into())),
    };
    resolve(&s, &id, Verdict::Reject(reason)).await
}

/// `?max=10&wait=5s`.
#[derive(Debug, Deserialize, Default)]
pub struct PullQuery {
    max: Option<String>,
    wait: Option<String>,
}

/// `GET /v1/subscriptions/{name}/messages`: a JSON array of structured
/// CloudEvents, each with `ferrydeliveryid` to call back with.
pub async fn pull(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    query: QueryArg<PullQuery>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = arg(path)?;
    let Query(q) = arg(query)?;
    super::not_shutting_down(&s)?;
    let Some(ctx) = s.delivery.pull_ctx(&name) else {
        // Configured but not running yet (starting, or its broker side is
        // not there yet): come back shortly. Unknown: 404.
        let configured =
            s.resources.read().unwrap_or_else(|e| e.into_inner()).subscriptions.get(&name).is_some_and(|sub| {
                sub.app == s.config.app_id && sub.mode == ferry_api::subscription::DeliveryMode::Pull
            });
        return Err(if configured || !s.is_config_loaded() {
            ApiError::Unavailable(format!("subscription {name:?} is starting"))
        } else {
            ApiError::UnknownSubscription(name)
        });
    };
    let max = match q.max.as_deref() {
        None => 1,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=MAX_PULL).contains(m))
            .ok_or_else(|| ApiError::BadRequest(format!("max must be 1 to {MAX_PULL}")))?,
    };
    let max = max.min(ctx.spec.max_in_flight as usize);
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => parse_duration("wait", w)?,
    };
    if wait > MAX_PULL_WAIT {
        return Err(ApiError::BadRequest(format!("wait must be at most {MAX_PULL_WAIT:?}")));
    }
    let messages = ctx.pull(max, wait).await.map_err(|e| ApiError::BrokerUnavailable(e.to_string()))?;
    Ok(Json(Value::Array(messages)))
}
