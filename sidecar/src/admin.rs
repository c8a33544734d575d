//! Admin endpoints on their own port: `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::outbox::FORWARDED;
use crate::state::Sidecar;

/// The admin router.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(sidecar)
}

/// Liveness: failed while a topic's outbox log refuses appends after a
/// failed `fdatasync` ([`crate::outbox::Outbox::failed_topics`]), which only
/// a restart (and the log's reopen) mends.
async fn healthz(State(s): State<Arc<Sidecar>>) -> impl IntoResponse {
    let failed = s.outbox.failed_topics();
    if failed.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "failed", "failedTopics": failed })))
    }
}

/// Readiness detail: broker connection, broker config applied, outbox depth per topic.
pub fn readiness(s: &Sidecar) -> (bool, serde_json::Value) {
    let connected = s.broker.is_connected();
    let configured = s.broker_configured.load(Ordering::Acquire);
    let shutting_down = s.is_shutting_down();
    let failed = s.outbox.failed_topics();
    let mut outbox = serde_json::Map::new();
    for tl in s.outbox.topics() {
        let stats = tl.log.stats();
        let confirmed = s.confirmed(&tl.topic).map_or(tl.log.cursor(FORWARDED).unwrap_or(0), |rx| *rx.borrow());
        outbox.insert(
            tl.topic.clone(),
            json!({
                "pending": stats.next_offset.saturating_sub(confirmed),
                "bytes": stats.bytes,
                "nextOffset": stats.next_offset,
                "forwardedOffset": confirmed,
                "failed": tl.log.is_poisoned(),
            }),
        );
    }
    let ready = connected && configured && !shutting_down && failed.is_empty();
    let detail = json!({
        "ready": ready,
        "broker": { "connected": connected, "configured": configured },
        "shuttingDown": shutting_down,
        "outbox": outbox,
        "outboxBytes": s.outbox.budget().used(),
        "outboxLimitBytes": s.outbox.budget().limit(),
        "fsync": s.config.fsync,
    });
    (ready, detail)
}

async fn readyz(State(s): State<Arc<Sidecar>>) -> impl IntoResponse {
    let (ready, detail) = readiness(&s);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(detail))
}

async fn metrics(State(s): State<Arc<Sidecar>>) -> impl IntoResponse {
    s.metrics.broker_connected.set(i64::from(s.broker.is_connected()));
    for tl in s.outbox.topics() {
        let stats = tl.log.stats();
        let confirmed = s.confirmed(&tl.topic).map_or(0, |rx| *rx.borrow());
        let l = crate::metrics::TopicLabels { topic: tl.topic.clone() };
        s.metrics.outbox_records.get_or_create(&l).set(stats.next_offset.saturating_sub(confirmed) as i64);
        s.metrics.outbox_bytes.get_or_create(&l).set(stats.bytes as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}
