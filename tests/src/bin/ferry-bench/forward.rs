//! Figure 4's baseline: raw async-nats JetStream publishing of the same
//! messages the forwarder sends (same size, `content-type` and a
//! `Nats-Msg-Id` header each, the forwarder's window of acks in flight) to a
//! stream configured like the topic's, on the same server.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};

use crate::http::Error;

/// The baseline's stream and subject (beside the topics' `ferry.default.*`).
pub(crate) const RAW_STREAM: &str = "FERRY_default_rawbench";
const RAW_SUBJECTS: &str = "ferry.default.rawbench.>";
const RAW_SUBJECT: &str = "ferry.default.rawbench.0";

/// Connects a JetStream context set up like the sidecar's.
pub(crate) async fn connect(url: &str) -> Result<jetstream::Context, Error> {
    let client = async_nats::ConnectOptions::new().name("ferry-bench").connect(url).await?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(8192)
        .backpressure_on_inflight(true)
        .build(client))
}

/// Removes every message of a stream (keeps the broker's restarts quick).
pub(crate) async fn purge(js: &jetstream::Context, stream: &str) -> Result<u64, Error> {
    let s = js.get_stream(stream).await?;
    Ok(s.purge().await?.purged)
}

/// Publishes `n` messages of `payload`, at most `window` unacknowledged,
/// each with `content-type: application/json` and a unique `Nats-Msg-Id`,
/// into a stream whose config copies `template_stream`'s. Returns the
/// time from the first publish to the last ack.
pub(crate) async fn raw_publish(
    js: &jetstream::Context,
    template_stream: &str,
    n: u64,
    window: usize,
    payload: Bytes,
    run: usize,
) -> Result<Duration, Error> {
    let mut config: stream::Config = js.get_stream(template_stream).await?.cached_info().config.clone();
    config.name = RAW_STREAM.to_owned();
    config.subjects = vec![RAW_SUBJECTS.to_owned()];
    js.create_or_update_stream(config).await?;
    let mut in_flight = FuturesOrdered::new();
    let mut acked = 0u64;
    let mut first_error = None;
    let t0 = Instant::now();
    for i in 0..n {
        while in_flight.len() >= window {
            if let Some(r) = in_flight.next().await {
                check(r, &mut acked, &mut first_error);
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json");
        // 36 characters, like the UUIDs the sidecar gives messages.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("rawbench-{run:04}-{i:022}").as_str());
        let publish = PublishMessage::build().payload(payload.clone()).headers(headers);
        let ack = js.send_publish(RAW_SUBJECT, publish).await?;
        in_flight.push_back(ack.into_future());
    }
    while let Some(r) = in_flight.next().await {
        check(r, &mut acked, &mut first_error);
    }
    let elapsed = t0.elapsed();
    match first_error {
        None if acked == n => Ok(elapsed),
        None => Err(format!("{acked} of {n} raw publishes acknowledged as new (duplicates?)").into()),
        Some(e) => Err(format!("raw publish failed: {e}").into()),
    }
}

fn check(
    r: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    acked: &mut u64,
    first_error: &mut Option<String>,
) {
    match r {
        Ok(ack) if !ack.duplicate => *acked += 1,
        Ok(_) => {}
        Err(e) => {
            first_error.get_or_insert(e.to_string());
        }
    }
}
