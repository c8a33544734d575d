//! [`Broker`] on NATS JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use ferry_api::naming::headers;
use ferry_api::{ConsumerPlan, StreamPlan};
use futures::FutureExt;

use super::{Broker, BrokerError, OutMessage, PendingAck, PubAck};
use crate::config::BrokerConfig;

/// Timeout of JetStream API requests and publish acknowledgements.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes awaiting the broker's ack on this connection.
pub const MAX_ACKS_IN_FLIGHT: usize = 8192;

/// A JetStream connection.
#[derive(Clone, Debug)]
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl NatsBroker {
    /// Connects in the background: returns at once, and the client keeps
    /// (re)connecting for ever, so a broker that is down at start is no error.
    pub async fn connect(cfg: &BrokerConfig, name: &str) -> Result<Self, BrokerError> {
        let mut opts = ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(2000)));
        if let Some(path) = &cfg.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| BrokerError::Refused(format!("credentials file {}: {e}", path.display())))?;
        }
        if let Some((user, password)) = &cfg.user_password {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &cfg.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &cfg.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let client = opts
            .connect(cfg.urls.clone())
            .await
            .map_err(|e| BrokerError::Unavailable(format!("connecting to {:?}: {e}", cfg.urls)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(NatsBroker { client, js })
    }

    /// The JetStream context (for tests and tools).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

impl NatsBroker {
    /// A failed API call is `Unavailable` when the connection is down or the
    /// call timed out (worth retrying), else the broker `Refused` it.
    fn classify(&self, e: impl std::fmt::Display) -> BrokerError {
        let text = e.to_string();
        if !self.is_connected() || text.to_ascii_lowercase().contains("timed out") {
            BrokerError::Unavailable(text)
        } else {
            BrokerError::Refused(text)
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn ensure_stream(&self, plan: &StreamPlan) -> Result<(), BrokerError> {
        self.js.create_or_update_stream(plan.to_jetstream()).await.map(|_| ()).map_err(|e| self.classify(e))
    }

    async fn ensure_consumer(&self, plan: &ConsumerPlan) -> Result<(), BrokerError> {
        let stream = self.js.get_stream(&plan.stream).await.map_err(|e| self.classify(e))?;
        stream.create_consumer(plan.to_jetstream()).await.map(|_| ()).map_err(|e| self.classify(e))
    }

    async fn publish(&self, msg: OutMessage) -> Result<PendingAck, BrokerError> {
        if !self.is_connected() {
            return Err(BrokerError::Unavailable("not connected".into()));
        }
        let mut map = HeaderMap::new();
        for (name, value) in &msg.headers {
            map.append(name.as_str(), value.as_str());
        }
        map.insert(headers::NATS_MSG_ID, msg.id.as_str());
        let subject = msg.subject.clone();
        let publish = PublishMessage::build().payload(msg.payload).headers(map);
        let pending = self.js.send_publish(msg.subject, publish).await.map_err(|e| self.classify(e))?;
        Ok(async move {
            match pending.await {
                Ok(ack) => Ok(PubAck { stream: ack.stream, sequence: ack.sequence, duplicate: ack.duplicate }),
                Err(e) => {
                    use async_nats::jetstream::context::PublishErrorKind as K;
                    Err(match e.kind() {
                        K::StreamNotFound => BrokerError::NoStream(subject),
                        K::TimedOut | K::BrokenPipe => BrokerError::Unavailable(e.to_string()),
                        _ => BrokerError::Refused(e.to_string()),
                    })
                }
            }
        }
        .boxed())
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
