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

/// Milliseconds since the Unix epoch of an RFC 3339 time, in UTC (`Z`) or
/// with an offset (`+01:00`, as `date -Iseconds` prints it; a `+` sent
/// unescaped in a query string arrives as a space, taken as `+` here).
/// humantime reads UTC only.
fn since_ms(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let b = t.as_bytes();
    let n = b.len();
    let offset = (n > 6 && b[n - 3] == b':' && matches!(b[n - 6], b'+' | b'-' | b' '))
        .then(|| {
            let hours: i64 = t[n - 5..n - 3].parse().ok()?;
            let minutes: i64 = t[n - 2..].parse().ok()?;
            let sign = if b[n - 6] == b'-' { -1 } else { 1 };
            (hours < 24 && minutes < 60).then_some(sign * (hours * 3600 + minutes * 60))
        })
        .flatten();
    let (local, offset_secs) = match offset {
        Some(secs) => (&t[..n - 6], secs),
        None => (t, 0),
    };
    if offset.is_some() && local.ends_with(['Z', 'z']) {
        return Err("both Z and an offset".into());
    }
    let at = humantime::parse_rfc3339_weak(local).map_err(|e| e.to_string())?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).map_err(|_| "before 1970".to_owned())?.as_millis() as i64;
    // 10:00+01:00 is 09:00 UTC.
    Ok((ms - offset_secs * 1000).max(0) as u64)
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
            let ms = since_ms(t).map_err(|e| {
                ApiError::BadRequest(format!(
                    "since={t:?} is not an RFC 3339 time like 2026-12-07T10:00:00Z or 2026-12-07T11:00:00+01:00 ({e})"
                ))
            })?;
            Some(ms)
        }
    };
    super::not_shutting_down(&s)?;
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

#[cfg(test)]
mod tests {
    use super::since_ms;

    #[test]
    fn since_takes_utc_and_offsets() {
        let utc = since_ms("2026-12-07T09:00:00Z").unwrap();
        assert_eq!(since_ms("2026-12-07T10:00:00+01:00"), Ok(utc));
        assert_eq!(since_ms("2026-12-07T10:00:00 01:00"), Ok(utc), "a + unescaped in a query string");
        assert_eq!(since_ms("2026-12-07T04:30:00-04:30"), Ok(utc));
        assert_eq!(since_ms("2026-12-07T09:00:00.250Z"), Ok(utc + 250));
        assert_eq!(since_ms("2026-12-07T09:00:00+00:00"), Ok(utc));
        for bad in ["yesterday", "2026-12-07T10:00:00Z+01:00", "2026-12-07T10:00:00+25:00", "2026-12-07"] {
            assert!(since_ms(bad).is_err(), "{bad}");
        }
    }
}
