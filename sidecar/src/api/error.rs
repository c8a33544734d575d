//! The one place where errors become HTTP answers.
//!
//! Every handler returns `Result<_, ApiError>`; this file decides status,
//! error code, `Retry-After` and the JSON body
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Seconds a client should wait before retrying when the outbox is full.
pub const RETRY_AFTER_FULL: u64 = 1;
/// Seconds a client should wait before retrying against a stopping sidecar
/// (by then another pod, or this one restarted, takes the call).
pub const RETRY_AFTER_SHUTDOWN: u64 = 5;

/// Everything the app-facing API can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: the bearer token is missing or wrong.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 404: no such topic.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// 404: no such message id among the recent ones.
    #[error("no recent message with id {0:?}")]
    UnknownMessage(String),
    /// 404: no delivery awaits a callback under this id.
    #[error("no delivery {0:?} awaits a callback (unknown, already settled, or timed out)")]
    UnknownDelivery(String),
    /// 409: the push's own answer, which came with this callback, settled
    /// the delivery.
    #[error("{0}")]
    DeliverySettled(String),
    /// 404: no such subscription of this app (or not a pull subscription).
    #[error("no pull subscription {0:?} for this app")]
    UnknownSubscription(String),
    /// 503: the broker is not reachable for this call.
    #[error("broker unavailable: {0}")]
    BrokerUnavailable(String),
    /// 404: no such route.
    #[error("no such endpoint")]
    NoRoute,
    /// 405.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// 413: body or message larger than allowed.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// 415: a content type the endpoint does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: the outbox is over its byte limit (back-pressure).
    #[error("outbox is full ({used} of {limit} bytes); retry later")]
    OutboxFull {
        /// Bytes in use.
        used: u64,
        /// Limit.
        limit: u64,
    },
    /// 507: the disk under the data directory is full.
    #[error("no space left on the sidecar's data volume; nothing was stored")]
    DiskFull,
    /// 503: the sidecar is shutting down.
    #[error("sidecar is shutting down; retry against a running sidecar")]
    ShuttingDown,
    /// 503: the outbox cannot take writes (I/O failure).
    #[error("outbox unavailable: {0}")]
    Unavailable(String),
    /// 504: `?ack=broker` and the broker did not confirm in time. The
    /// messages (`ids`) ARE stored in the outbox and will be forwarded.
    #[error("stored locally, but the broker did not confirm within {timeout:?}; it will be forwarded (to retry, send the same ids as Ferry-Id)")]
    BrokerTimeout {
        /// How long the call waited.
        timeout: std::time::Duration,
        /// The ids of the messages stored.
        ids: Vec<String>,
    },
    /// 503: `?ack=broker` and the sidecar stopped forwarding (its drain
    /// ended) before the broker confirmed. The messages (`ids`) ARE stored;
    /// they are forwarded after its restart.
    #[error("stored locally, but the sidecar stopped before the broker confirmed; it will be forwarded when the sidecar restarts (to retry, send the same ids as Ferry-Id)")]
    StoppedBeforeConfirmed {
        /// The ids of the messages stored.
        ids: Vec<String>,
    },
    /// 502: `?ack=broker` and the broker refused a message for good (larger
    /// than a limit lowered after produce checked it). It is parked on the
    /// sidecar's data volume, not forwarded.
    #[error("the broker refused {parked:?} for good (larger than it takes); parked on the sidecar's data volume, not forwarded (the call's other messages were)")]
    RefusedByBroker {
        /// The ids of the messages parked.
        parked: Vec<String>,
        /// The ids of every message the call stored.
        ids: Vec<String>,
    },
    /// 503: the outbox's fdatasync failed after the forwarder could read
    /// the messages (`ids`): they may reach the broker, and the topic takes
    /// nothing more until the sidecar restarts.
    #[error(
        "outbox unavailable: {why}; the messages may still reach the broker (to retry, send the same ids as Ferry-Id)"
    )]
    OutcomeUnknown {
        /// What failed.
        why: String,
        /// The ids of the messages.
        ids: Vec<String>,
    },
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::UnknownTopic(_)
            | ApiError::UnknownMessage(_)
            | ApiError::UnknownDelivery(_)
            | ApiError::UnknownSubscription(_)
            | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::DeliverySettled(_) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::OutboxFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::ShuttingDown
            | ApiError::StoppedBeforeConfirmed { .. }
            | ApiError::OutcomeUnknown { .. }
            | ApiError::Unavailable(_)
            | ApiError::BrokerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BrokerTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RefusedByBroker { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The machine-readable code in the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::UnknownTopic(_) => "topic_not_found",
            ApiError::UnknownMessage(_) => "message_not_found",
            ApiError::UnknownDelivery(_) => "delivery_not_found",
            ApiError::DeliverySettled(_) => "delivery_settled",
            ApiError::UnknownSubscription(_) => "subscription_not_found",
            ApiError::BrokerUnavailable(_) => "broker_unavailable",
            ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::OutboxFull { .. } => "outbox_full",
            ApiError::DiskFull => "disk_full",
            ApiError::ShuttingDown | ApiError::StoppedBeforeConfirmed { .. } => "shutting_down",
            ApiError::Unavailable(_) | ApiError::OutcomeUnknown { .. } => "unavailable",
            ApiError::BrokerTimeout { .. } => "broker_timeout",
            ApiError::RefusedByBroker { .. } => "refused_by_broker",
        }
    }

    /// The ids of the messages a call stored (or may have) before it failed.
    fn stored_ids(&self) -> Option<Vec<String>> {
        match self {
            ApiError::BrokerTimeout { ids, .. }
            | ApiError::StoppedBeforeConfirmed { ids }
            | ApiError::OutcomeUnknown { ids, .. }
            | ApiError::RefusedByBroker { ids, .. } => Some(ids.clone()),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::OutboxFull { .. } | ApiError::Unavailable(_) | ApiError::BrokerUnavailable(_) => {
                Some(RETRY_AFTER_FULL)
            }
            ApiError::ShuttingDown | ApiError::StoppedBeforeConfirmed { .. } => Some(RETRY_AFTER_SHUTDOWN),
            _ => None,
        }
    }
}

impl From<ferry_log::Error> for ApiError {
    fn from(e: ferry_log::Error) -> Self {
        use ferry_log::Error as E;
        match e {
            E::Full { used, limit, .. } => ApiError::OutboxFull { used, limit },
            E::NoSpace { .. } => ApiError::DiskFull,
            E::TooLarge { max, .. } => ApiError::TooLarge { what: "message batch", limit: max },
            E::Invalid(why) => ApiError::BadRequest(why.to_owned()),
            // The source chain, so the answer says what failed.
            other => ApiError::Unavailable(crate::error_chain(&other)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } });
        // What the call stored (or may have) although it failed: sent again
        // with these ids as `Ferry-Id`, within the stream's duplicate window,
        // they add nothing.
        if let Some(ids) = self.stored_ids() {
            body["error"]["ids"] = ids.into();
        }
        if let ApiError::RefusedByBroker { parked, .. } = &self {
            body["error"]["parked"] = parked.clone().into();
        }
        let mut resp = (self.status(), Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
