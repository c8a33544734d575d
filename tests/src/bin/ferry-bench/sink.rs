//! The receiving end of the end-to-end figures: send-time stamps carried
//! in the message bytes, and a lean in-process HTTP app on loopback that
//! answers every push with 200 and records how long each message took.
//!
//! Producer and app run in this one process, so a stamp is nanoseconds of
//! one monotonic clock ([`Instant`]) since [`base`]: receive time minus
//! stamp is the end-to-end latency, with no clock skew.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};

use crate::http::Error;

/// Hex digits of a stamp at the start of a payload.
pub(crate) const STAMP_LEN: usize = 16;
/// The app's push path.
pub(crate) const PATH: &str = "/e2e";

/// The clock's origin: the first call.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The stamp of an instant (nanoseconds since [`base`]; 0 before it).
pub(crate) fn stamp(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

/// A payload of `size` bytes (at least [`STAMP_LEN`]): the stamp of `at` in
/// hex, then filler.
pub(crate) fn stamped(at: Instant, size: usize) -> Bytes {
    let mut v = format!("{:016x}", stamp(at)).into_bytes();
    v.resize(size.max(STAMP_LEN), b'x');
    Bytes::from(v)
}

/// An NDJSON batch body of `n` messages whose stored payloads (JSON strings,
/// quotes included) are `size` bytes and all carry one stamp.
pub(crate) struct NdjsonStamped {
    template: Vec<u8>,
    line: usize,
    n: usize,
}

/// `{"data":"` before each line's stamp.
const LINE_HEAD: usize = 9;

impl NdjsonStamped {
    pub(crate) fn new(n: usize, size: usize) -> NdjsonStamped {
        let filler = "x".repeat(size.saturating_sub(2 + STAMP_LEN));
        let line = format!("{{\"data\":\"{}{filler}\"}}\n", "0".repeat(STAMP_LEN));
        NdjsonStamped { line: line.len(), template: line.repeat(n).into_bytes(), n }
    }

    /// The body, every line stamped with `at`.
    pub(crate) fn body(&self, at: Instant) -> Bytes {
        let hex = format!("{:016x}", stamp(at));
        let mut v = self.template.clone();
        for i in 0..self.n {
            let at = i * self.line + LINE_HEAD;
            v[at..at + STAMP_LEN].copy_from_slice(hex.as_bytes());
        }
        Bytes::from(v)
    }
}

/// The stamp at the start of a payload (after an opening JSON quote).
fn read_stamp(body: &[u8]) -> Option<u64> {
    let body = body.strip_prefix(b"\"").unwrap_or(body);
    let hex = std::str::from_utf8(body.get(..STAMP_LEN)?).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

/// What arrived since the last [`Recorder::reset`].
#[derive(Default)]
pub(crate) struct Recorder {
    count: AtomicU64,
    unstamped: AtomicU64,
    /// Latencies in nanoseconds.
    lats: Mutex<Vec<u64>>,
}

impl Recorder {
    /// Counts one message received now and records its latency.
    pub(crate) fn record(&self, payload: &[u8]) {
        let now = stamp(Instant::now());
        match read_stamp(payload) {
            Some(s) => self.lats.lock().unwrap_or_else(|e| e.into_inner()).push(now.saturating_sub(s)),
            None => {
                self.unstamped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Release);
    }

    /// Messages received.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Messages without a readable stamp.
    pub(crate) fn unstamped(&self) -> u64 {
        self.unstamped.load(Ordering::Relaxed)
    }

    /// The latencies so far.
    pub(crate) fn latencies(&self) -> Vec<Duration> {
        self.lats.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|n| Duration::from_nanos(*n)).collect()
    }

    /// Forgets everything.
    pub(crate) fn reset(&self) {
        self.lats.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.unstamped.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Release);
    }

    /// Waits until `n` messages arrived, at most `timeout`; returns the count.
    pub(crate) async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count();
            if c >= n || Instant::now() >= deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Starts the app on a free loopback port: `POST` [`PATH`] records the
/// body (or each event of a bulk push) and answers 200 (an ack), anything
/// else 404.
pub(crate) async fn start_app(rec: Arc<Recorder>) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = axum::Router::new().route(PATH, axum::routing::post(receive)).with_state(rec);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(addr)
}

async fn receive(State(rec): State<Arc<Recorder>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let bulk = headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/cloudevents-batch"));
    if !bulk {
        rec.record(&body);
        return StatusCode::OK;
    }
    // Bulk push (`batch.maxMessages > 1`): structured events, `data` a
    // string (text/plain and JSON-string payloads). 200 with no per-message
    // list acks them all.
    match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
        Ok(events) => {
            for ev in events {
                rec.record(ev["data"].as_str().unwrap_or("").as_bytes());
            }
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_both_payload_shapes() {
        let at = Instant::now() + Duration::from_millis(5);
        let p = stamped(at, 1024);
        assert_eq!(p.len(), 1024);
        assert_eq!(read_stamp(&p), Some(stamp(at)));
        let b = NdjsonStamped::new(3, 1024).body(at);
        let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3);
        for l in lines {
            let v: serde_json::Value = serde_json::from_slice(l).expect("a JSON line");
            let stored = v["data"].to_string();
            assert_eq!(stored.len(), 1024, "the stored payload is the JSON string, quotes included");
            assert_eq!(read_stamp(stored.as_bytes()), Some(stamp(at)));
        }
    }
}
