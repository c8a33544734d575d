//! A test app: an HTTP server on loopback that records every delivery and
//! answers per a scripted policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// One request the app received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Lower-cased headers.
    pub headers: HashMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
    /// `ce-id`.
    pub fn id(&self) -> &str {
        self.header("ce-id").unwrap_or("")
    }
    /// `ferry-attempt`.
    pub fn attempt(&self) -> u32 {
        self.header("ferry-attempt").and_then(|a| a.parse().ok()).unwrap_or(0)
    }
    /// `ferry-key`.
    pub fn key(&self) -> Option<&str> {
        self.header("ferry-key")
    }
    /// `ferry-delivery-id`.
    pub fn delivery_id(&self) -> &str {
        self.header("ferry-delivery-id").unwrap_or("")
    }
}

/// How the app answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra headers (e.g. Retry-After).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Wait this long before answering (a slow app, or a timeout).
    pub delay: Duration,
}

impl Reply {
    /// Just a status.
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: String::new(), delay: Duration::ZERO }
    }
    /// A status after a delay.
    pub fn slow(status: u16, delay: Duration) -> Reply {
        Reply { delay, ..Reply::status(status) }
    }
    /// A status with a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
    /// A status with a body.
    pub fn with_body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }
}

/// The answer policy: sees the request and everything received before it.
pub type Policy = Arc<dyn Fn(&Received, &[Received]) -> Reply + Send + Sync>;

struct Inner {
    received: Mutex<Vec<Received>>,
    /// Requests being answered right now (for concurrency checks).
    active: Mutex<Vec<Received>>,
    max_active: Mutex<usize>,
    count: watch::Sender<usize>,
    policy: Mutex<Policy>,
    /// Whether the policy gets the requests received before (a copy per
    /// request: costly for long runs, see [`TestApp::start_without_history`]).
    history: bool,
    /// Requests whose caller hung up while the reply's delay ran.
    abandoned: Mutex<Vec<Received>>,
}

/// A running test app.
#[derive(Clone)]
pub struct TestApp {
    /// Its port on 127.0.0.1.
    pub port: u16,
    inner: Arc<Inner>,
}

impl TestApp {
    /// Starts an app answering per `policy`.
    pub async fn start(policy: impl Fn(&Received, &[Received]) -> Reply + Send + Sync + 'static) -> TestApp {
        Self::start_with(Arc::new(policy), true).await
    }

    async fn start_with(policy: Policy, history: bool) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the test app");
        let port = listener.local_addr().expect("local addr").port();
        let inner = Arc::new(Inner {
            received: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
            max_active: Mutex::new(0),
            count: watch::channel(0).0,
            policy: Mutex::new(policy),
            history,
            abandoned: Mutex::new(Vec::new()),
        });
        let state = inner.clone();
        let router = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move { handle(state, uri.path().to_owned(), headers, body).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        TestApp { port, inner }
    }

    /// An app that answers 200 to everything.
    pub async fn ok() -> TestApp {
        Self::start(|_, _| Reply::status(200)).await
    }

    /// Replaces the policy.
    pub fn set_policy(&self, policy: impl Fn(&Received, &[Received]) -> Reply + Send + Sync + 'static) {
        *self.inner.policy.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The requests being answered now (received, not yet answered).
    pub fn in_progress(&self) -> Vec<Received> {
        self.inner.active.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Most requests answered at the same time so far.
    pub fn max_concurrent(&self) -> usize {
        *self.inner.max_active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done(received)` holds; panics after `timeout` with what arrived.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let mut rx = self.inner.count.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.received();
            if done(&got) {
                return got;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                let ids: Vec<String> = got.iter().map(|r| format!("{}#{}", r.id(), r.attempt())).collect();
                panic!("test app: condition not met within {timeout:?}; received {} requests: {ids:?}", got.len());
            }
        }
    }

    /// Waits until `n` requests arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, |r| r.len() >= n).await
    }
}

async fn handle(state: Arc<Inner>, path: String, headers: HeaderMap, body: Bytes) -> Response {
    let headers: HashMap<String, String> =
        headers.iter().map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())).collect();
    let req = Received { path, headers, body, at: Instant::now() };
    let reply = {
        let before =
            if state.history { state.received.lock().unwrap_or_else(|e| e.into_inner()).clone() } else { Vec::new() };
        let policy = state.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        policy(&req, &before)
    };
    {
        let mut active = state.active.lock().unwrap_or_else(|e| e.into_inner());
        active.push(req.clone());
        let mut max = state.max_active.lock().unwrap_or_else(|e| e.into_inner());
        *max = (*max).max(active.len());
    }
    if !reply.delay.is_zero() {
        // The caller may hang up meanwhile (a push timeout): the server then
        // drops this future, and the guard records the request as abandoned.
        let guard = Abandoned { state: state.clone(), req: Some(req.clone()) };
        tokio::time::sleep(reply.delay).await;
        guard.answered();
    }
    {
        let mut active = state.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = active.iter().position(|r| r.delivery_id() == req.delivery_id() && r.at == req.at) {
            active.remove(i);
        }
    }
    let n = {
        let mut received = state.received.lock().unwrap_or_else(|e| e.into_inner());
        received.push(req);
        received.len()
    };
    state.count.send_replace(n);
    let mut resp =
        (StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), reply.body).into_response();
    for (name, value) in reply.headers {
        if let (Ok(n), Ok(v)) = (axum::http::HeaderName::try_from(name), axum::http::HeaderValue::try_from(value)) {
            resp.headers_mut().insert(n, v);
        }
    }
    resp
}

impl TestApp {
    /// Starts an app answering per `policy`, which sees only the request
    /// (no copy of everything received before it: for runs of many
    /// thousands of messages).
    pub async fn start_without_history(policy: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> TestApp {
        Self::start_with(Arc::new(move |r: &Received, _: &[Received]| policy(r)), false).await
    }

    /// How many requests were answered so far (no copy).
    pub fn count(&self) -> usize {
        self.inner.received.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A copy of the requests from index `from` on.
    pub fn received_from(&self, from: usize) -> Vec<Received> {
        let received = self.inner.received.lock().unwrap_or_else(|e| e.into_inner());
        received.get(from..).map(<[Received]>::to_vec).unwrap_or_default()
    }

    /// Feeds `step` every request as it arrives (each exactly once, in
    /// order, in slices) until it returns true; panics after `timeout`
    /// with `step`'s last description of what is missing. Unlike
    /// [`TestApp::wait_until`] it copies each request once, so it suits
    /// runs of many thousands.
    pub async fn wait_scan(&self, timeout: Duration, mut step: impl FnMut(&[Received]) -> Result<(), String>) {
        let mut rx = self.inner.count.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = 0;
        let mut missing = step(&[]);
        loop {
            let new = self.received_from(seen);
            seen += new.len();
            if !new.is_empty() {
                missing = step(&new);
            }
            let Err(what) = &missing else { return };
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                panic!("test app: not done within {timeout:?} ({seen} requests received): {what}");
            }
        }
    }
}

/// Records a request as abandoned unless it was answered.
struct Abandoned {
    state: Arc<Inner>,
    req: Option<Received>,
}

impl Abandoned {
    fn answered(mut self) {
        self.req = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(req) = self.req.take() {
            self.state.abandoned.lock().unwrap_or_else(|e| e.into_inner()).push(req);
        }
    }
}

impl TestApp {
    /// Requests whose caller hung up before the answer (while the reply's
    /// delay ran, e.g. past the sidecar's push timeout); they are not in
    /// [`TestApp::received`].
    pub fn abandoned(&self) -> Vec<Received> {
        self.inner.abandoned.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
