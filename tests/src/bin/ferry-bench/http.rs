//! A lean HTTP/1.1 keep-alive client (hyper's connection-level client, one
//! TCP connection per [`Conn`]), so the load generator spends little CPU per
//! request on the two cores it shares with the sidecar and nats-server.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Any client-side failure (connect, send, read).
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// An answer: status, `Retry-After` (seconds) if any, body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Bytes,
}

/// One keep-alive HTTP/1.1 connection to 127.0.0.1.
pub(crate) struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
}

impl Conn {
    /// Connects (TCP_NODELAY) and does the HTTP/1.1 handshake.
    pub(crate) async fn open(addr: SocketAddr) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the peer closes.
            let _ = connection.await;
        });
        Ok(Conn { sender, host: HeaderValue::from_str(&addr.to_string())? })
    }

    /// Sends one request and reads the whole answer.
    pub(crate) async fn send(
        &mut self,
        method: Method,
        uri: &Uri,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Answer, Error> {
        self.sender.ready().await?;
        let mut req = Request::builder().method(method).uri(uri.clone()).header(HOST, self.host.clone());
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, retry_after, body })
    }

    /// `POST` with a content type.
    pub(crate) async fn post(&mut self, uri: &Uri, content_type: &'static str, body: Bytes) -> Result<Answer, Error> {
        self.send(Method::POST, uri, Some(content_type), body).await
    }

    /// `GET`.
    pub(crate) async fn get(&mut self, uri: &Uri) -> Result<Answer, Error> {
        self.send(Method::GET, uri, None, Bytes::new()).await
    }
}

/// Opens `n` connections.
pub(crate) async fn open_many(addr: SocketAddr, n: usize) -> Result<Vec<Conn>, Error> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::open(addr).await?);
    }
    Ok(conns)
}

/// The sidecar's admin port: `/readyz` detail, reconnecting when needed.
pub(crate) struct Admin {
    addr: SocketAddr,
    conn: Option<Conn>,
    readyz: Uri,
}

impl Admin {
    pub(crate) fn new(addr: SocketAddr) -> Admin {
        Admin { addr, conn: None, readyz: Uri::from_static("/readyz") }
    }

    /// The `/readyz` JSON (answered with 200 or 503; both carry the detail).
    pub(crate) async fn readyz(&mut self) -> Result<serde_json::Value, Error> {
        if self.conn.is_none() {
            self.conn = Some(Conn::open(self.addr).await?);
        }
        let conn = self.conn.as_mut().expect("just opened");
        match conn.get(&self.readyz).await {
            Ok(a) => Ok(serde_json::from_slice(&a.body)?),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// `(nextOffset, forwardedOffset)` of a topic's outbox.
    pub(crate) async fn offsets(&mut self, topic: &str) -> Result<(u64, u64), Error> {
        let v = self.readyz().await?;
        let t = &v["outbox"][topic];
        match (t["nextOffset"].as_u64(), t["forwardedOffset"].as_u64()) {
            (Some(next), Some(fwd)) => Ok((next, fwd)),
            _ => Err(format!("no outbox detail for topic {topic:?} in /readyz: {v}").into()),
        }
    }

    /// Messages not yet confirmed by the broker, over all topics.
    pub(crate) async fn pending(&mut self) -> Result<u64, Error> {
        let v = self.readyz().await?;
        let outbox = v["outbox"].as_object().ok_or_else(|| format!("no outbox detail in /readyz: {v}"))?;
        Ok(outbox.values().filter_map(|t| t["pending"].as_u64()).sum())
    }

    /// Whether the sidecar is connected to the broker.
    pub(crate) async fn broker_connected(&mut self) -> Result<bool, Error> {
        let v = self.readyz().await?;
        Ok(v["broker"]["connected"].as_bool().unwrap_or(false))
    }
}
