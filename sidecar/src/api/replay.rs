//! `POST /v1/topics/{topic}/outbox:replay[?since=RFC3339]`: forward a
//! topic's messages again from the outbox, after the broker lost what it
//! had confirmed (JetStream confirms before it syncs, by default).
//!
//! The forwarder goes back to the first message still in the outbox that
//! was produced at or after `since` (without it: the first one kept) and
//! forwards from there with the same message ids. The broker drops what it
//! still holds within the stream's duplicate window and stores the rest
//! again, after whatever it stored since the loss (so per-key order does
//! not hold across a replay); subscribers' dedupe windows drop what their
//! app already acked. Records parked before are passed, not sent again.
//! How far back this reaches is the outbox's replay window
//! (`--outbox-retention`; without it, forwarded segments are deleted at
//! once and only the active segment is left).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{arg, PathArg, QueryArg};
use crate::forward::Rewind;
use crate::outbox::Outbox;
use crate::state::Sidecar;

/// `?since=2026-12-07T10:00:00Z`.
#[derive(Debug, Deserialize, Default)]
pub struct ReplayQuery {
    since: Option<String>,
}

/// Sends the topic's forwarder back; answers 202 with the range it forwards
/// again: `{"topic", "from", "to", "messages", "complete"}` (`complete` is
/// false when messages produced since `since` were already deleted).
pub async fn replay(
    State(s): State<Arc<Sidecar>>,
    path: PathArg<String>,
    query: QueryArg<ReplayQuery>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Path(topic) = arg(path)?;
    let Query(q) = arg(query)?;
    let since_ms = match q.since.as_deref() {
        None => None,
        Some(t) => {
            let at = humantime::parse_rfc3339_weak(t).map_err(|e| {
                ApiError::BadRequest(format!("since={t:?} is not an RFC 3339 time like 2026-12-07T10:00:00Z ({e})"))
            })?;
            let ms = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            Some(ms)
        }
    };
    if s.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let unknown = || ApiError::UnknownTopic(topic.clone());
    let tl = s.outbox.topic(&topic).ok_or_else(unknown)?;
    let link = s.link(&topic).ok_or_else(unknown)?;
    let to = *link.confirmed.borrow();
    let (from, complete) = tokio::task::spawn_blocking(move || Outbox::replay_start(&tl, since_ms, to))
        .await
        .map_err(|e| ApiError::Unavailable(format!("finding where to replay from: {e}")))?
        .map_err(|e| ApiError::Unavailable(format!("reading the outbox: {e}")))?;
    let (done, went_back) = tokio::sync::oneshot::channel();
    let stopped = || ApiError::ShuttingDown;
    link.rewind.send(Rewind { from, done }).await.map_err(|_| stopped())?;
    let range = went_back.await.map_err(|_| stopped())?;
    // Segments deleted since (the window given up for room) moved it on.
    let complete = complete && range.start <= from;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "topic": topic,
            "from": range.start,
            "to": range.end,
            "messages": range.end - range.start,
            "complete": complete,
        })),
    ))
}
