//! The end-to-end figures' baseline: raw async-nats with no sidecar. A
//! JetStream publisher (pipelined, a `Nats-Msg-Id` each) into a stream
//! configured like the topic's, and a durable pull consumer (configured like
//! the subscription's) fetching in batches and acking each message after
//! handing it to the same [`Recorder`] the app uses. Also a second
//! nats-server with `sync_interval: always`, for JetStream's own durable rate.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use ferry_e2e::{free_port, Process, START_TIMEOUT};
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};

use crate::http::Error;
use crate::sink::{self, Recorder};

/// The baseline's stream (beside the topic's `FERRY_default_e2e`), subjects
/// and durable consumer.
const RAW_STREAM: &str = "FERRY_default_rawe2e";
const RAW_SUBJECTS: &str = "ferry.default.rawe2e.>";
const RAW_SUBJECT: &str = "ferry.default.rawe2e.0";
const RAW_CONSUMER: &str = "rawe2e";
/// How long one fetch waits for its first message.
const FETCH_EXPIRES: Duration = Duration::from_millis(500);

/// Stream and consumer settings copied from Ferry's topic and subscription.
#[derive(Clone)]
pub(crate) struct Template {
    stream: stream::Config,
    ack_wait: Duration,
    max_ack_pending: i64,
}

impl Template {
    /// The config of `stream_name` and of its (only) consumer.
    pub(crate) async fn of(js: &jetstream::Context, stream_name: &str) -> Result<Template, Error> {
        let mut s = js.get_stream(stream_name).await?;
        let config = s.info().await?.config.clone();
        let info = s.consumers().next().await.ok_or_else(|| format!("stream {stream_name} has no consumer"))??;
        Ok(Template { stream: config, ack_wait: info.config.ack_wait, max_ack_pending: info.config.max_ack_pending })
    }

    /// `max_ack_pending` of the consumer.
    pub(crate) fn max_ack_pending(&self) -> i64 {
        self.max_ack_pending
    }
}

/// Creates (or empties) the baseline's stream and a fresh durable consumer on it.
pub(crate) async fn setup(js: &jetstream::Context, t: &Template) -> Result<PullConsumer, Error> {
    let mut config = t.stream.clone();
    config.name = RAW_STREAM.to_owned();
    config.subjects = vec![RAW_SUBJECTS.to_owned()];
    js.create_or_update_stream(config).await?;
    let stream = js.get_stream(RAW_STREAM).await?;
    let _ = stream.delete_consumer(RAW_CONSUMER).await;
    stream.purge().await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(RAW_CONSUMER.to_owned()),
            name: Some(RAW_CONSUMER.to_owned()),
            filter_subject: RAW_SUBJECTS.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: t.ack_wait,
            max_deliver: -1,
            max_ack_pending: t.max_ack_pending,
            ..Default::default()
        })
        .await?;
    Ok(consumer)
}

/// Empties the baseline's stream (keeps the server's disk use small).
pub(crate) async fn purge(js: &jetstream::Context) -> Result<(), Error> {
    js.get_stream(RAW_STREAM).await?.purge().await?;
    Ok(())
}

/// The consumer loop: fetch up to `batch` (returning as soon as any
/// arrived), record each message, ack it. Runs until aborted.
pub(crate) fn consume(consumer: PullConsumer, batch: usize, rec: Arc<Recorder>) -> tokio::task::JoinHandle<Error> {
    tokio::spawn(async move {
        let run = async {
            loop {
                let mut msgs = consumer.fetch().max_messages(batch).expires(FETCH_EXPIRES).messages().await?;
                while let Some(m) = msgs.next().await {
                    let m = m?;
                    rec.record(&m.payload);
                    m.ack().await?;
                }
            }
        };
        let r: Result<(), Error> = run.await;
        r.err().unwrap_or_else(|| "the consumer loop ended".into())
    })
}

/// Publish counts of one phase.
#[derive(Default)]
pub(crate) struct Published {
    /// Publishes the broker confirmed as new.
    pub(crate) acked: u64,
    /// Publishes refused, failed or confirmed as duplicates.
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Published {
    fn check(&mut self, r: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>) {
        match r {
            Ok(ack) if !ack.duplicate => self.acked += 1,
            Ok(_) => self.failed("confirmed as a duplicate".into()),
            Err(e) => self.failed(e.to_string()),
        }
    }

    fn failed(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// A unique 36-character message id.
fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("rawe2e-{:029}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn message(payload: Bytes) -> PublishMessage {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "text/plain");
    headers.insert(async_nats::header::NATS_MESSAGE_ID, next_id().as_str());
    PublishMessage::build().payload(payload).headers(headers)
}

/// Publishes one message per instant received (stamped with it), not
/// waiting for confirmations before the next; returns when the sender is
/// dropped and every confirmation is in.
pub(crate) async fn publish_paced(
    js: &jetstream::Context,
    mut due: tokio::sync::mpsc::UnboundedReceiver<Instant>,
    size: usize,
) -> Result<Published, Error> {
    let mut out = Published::default();
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            d = due.recv() => match d {
                Some(d) => {
                    let ack = js.send_publish(RAW_SUBJECT, message(sink::stamped(d, size))).await?;
                    acks.push(ack.into_future());
                }
                None => break,
            },
            Some(r) = acks.next(), if !acks.is_empty() => out.check(r),
        }
    }
    while let Some(r) = acks.next().await {
        out.check(r);
    }
    Ok(out)
}

/// Publishes as fast as confirmations come back (at most `in_flight`
/// unconfirmed), each message stamped when sent, until `deadline`, while
/// at most `window` published messages are not yet received (0: no limit).
pub(crate) async fn publish_sustained(
    js: &jetstream::Context,
    size: usize,
    in_flight: usize,
    window: u64,
    deadline: Instant,
    rec: &Recorder,
) -> Result<Published, Error> {
    let mut out = Published::default();
    let mut acks = FuturesOrdered::new();
    let mut sent = 0u64;
    while Instant::now() < deadline {
        while acks.len() >= in_flight {
            if let Some(r) = acks.next().await {
                out.check(r);
            }
        }
        if window > 0 && sent.saturating_sub(rec.count()) >= window {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let ack = js.send_publish(RAW_SUBJECT, message(sink::stamped(Instant::now(), size))).await?;
        acks.push_back(ack.into_future());
        sent += 1;
    }
    while let Some(r) = acks.next().await {
        out.check(r);
    }
    Ok(out)
}

/// A nats-server whose JetStream fsyncs every write before confirming it
/// (`sync_interval: always`), in its own temp dir.
pub(crate) struct SyncAlwaysServer {
    process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl SyncAlwaysServer {
    pub(crate) fn start() -> Result<SyncAlwaysServer, Error> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let store = dir.path().join("jetstream");
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, format!("jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n", store))?;
        let mut cmd = std::process::Command::new(ferry_e2e::nats_server_binary());
        cmd.arg("-c").arg(&conf).args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Process::spawn("nats-server (sync_interval: always)", cmd);
        process.wait_for_line("Server is ready", START_TIMEOUT);
        Ok(SyncAlwaysServer { process, port, _dir: dir })
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its start-up line about the sync interval, if it printed one.
    pub(crate) fn sync_line(&self) -> Option<String> {
        self.process.output().into_iter().find(|l| l.to_ascii_lowercase().contains("sync"))
    }
}
