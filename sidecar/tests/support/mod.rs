//! Shared helpers for the sidecar's integration tests: a real nats-server,
//! the real `ferry-sidecar` binary, HTTP on loopback, and reading streams
//! back with async-nats.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_e2e::app::{Received, TestApp};
#[allow(unused_imports)]
pub use ferry_e2e::{free_port, manifests, NatsServer, Process, TmpfsMount, START_TIMEOUT};

/// A Topic `orders` and a Topic `audit` in namespace `default`.
pub const TOPICS: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: orders
spec:
  partitions: 2
  maxMessageSize: 4096
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: audit
spec: {}
";

/// The delivery tests' topics: `orders` (two partitions), `orders-dlq`, and `once` whose broker
/// duplicate window is only one second.
pub const DELIVERY_TOPICS: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: orders}
spec: {partitions: 2}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: orders-dlq}
spec: {}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata: {name: once}
spec: {duplicateWindow: 1s}
";

/// A Subscription of app `shop` to `topic`, pushed to `/{name}`, dead
/// letters to `orders-dlq`, with more spec fields (one per line).
pub fn subscription(name: &str, topic: &str, fields: &[&str]) -> String {
    let mut s = format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec:\n  topic: {topic}\n  \
         app: shop\n  path: /{name}\n  deadLetterTopic: orders-dlq\n"
    );
    for f in fields {
        s.push_str(&format!("  {f}\n"));
    }
    s
}

pub fn manifests_with(subs: &str) -> tempfile::TempDir {
    manifests(&[("topics.yaml", DELIVERY_TOPICS), ("subs.yaml", subs)])
}

/// A running `ferry-sidecar` process.
pub struct Sidecar {
    pub process: Process,
    pub api: String,
    pub admin: String,
    pub data_dir: PathBuf,
    pub api_port: u16,
    pub admin_port: u16,
}

/// How to start a sidecar.
pub struct Launch<'a> {
    pub broker: String,
    pub resources: &'a Path,
    pub data_dir: &'a Path,
    pub extra: Vec<String>,
    pub api_port: Option<u16>,
    /// Environment variables the process does not inherit.
    pub without_env: Vec<String>,
}

impl<'a> Launch<'a> {
    pub fn new(broker: String, resources: &'a Path, data_dir: &'a Path) -> Self {
        Launch { broker, resources, data_dir, extra: Vec::new(), api_port: None, without_env: Vec::new() }
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_owned());
        self
    }

    /// Starts the process and waits for its start-up line.
    pub fn start(self) -> Sidecar {
        let api_port = self.api_port.unwrap_or_else(free_port);
        let admin_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"));
        cmd.env_remove("RUST_LOG")
            .args(["--app-id", "shop", "--broker", &self.broker])
            .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .arg("--resources")
            .arg(self.resources)
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(&self.extra);
        for name in &self.without_env {
            cmd.env_remove(name);
        }
        let mut process = Process::spawn("ferry-sidecar", cmd);
        process.wait_for_line("ferry-sidecar started", START_TIMEOUT);
        Sidecar {
            process,
            api: format!("http://127.0.0.1:{api_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            data_dir: self.data_dir.to_path_buf(),
            api_port,
            admin_port,
        }
    }
}

impl Sidecar {
    /// Waits until the sidecar has created its streams on the broker.
    pub fn wait_configured(&mut self) {
        self.process.wait_for_line("broker configured", START_TIMEOUT);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.api, path)
    }
}

/// A sidecar on `nats` with the test [`TOPICS`], started and configured;
/// the manifest and data directories live as long as the returned guards.
pub fn configured_with_topics(nats: &NatsServer) -> (Sidecar, tempfile::TempDir, tempfile::TempDir) {
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
    sc.wait_configured();
    (sc, res, data)
}

/// Produces one text message to `topic` with `?ack=broker`, asserting 201.
pub async fn produce_to(sc: &Sidecar, topic: &str, id: &str, key: Option<&str>, body: &str) {
    let mut req = http()
        .post(sc.url(&format!("/v1/topics/{topic}/messages?ack=broker")))
        .header("ferry-id", id)
        .header("content-type", "text/plain");
    if let Some(k) = key {
        req = req.header("ferry-key", k);
    }
    let resp = req.body(body.to_owned()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201, "producing {id}");
}

/// The text of `ferry-sidecar outbox inspect` on `data_dir`, asserting
/// that it succeeded.
pub fn inspect_outbox(data_dir: &Path) -> String {
    let report = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"))
        .args(["outbox", "inspect", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("running outbox inspect");
    let text = String::from_utf8_lossy(&report.stdout).into_owned();
    assert!(report.status.success(), "{text}");
    text
}

/// The ids (`Nats-Msg-Id`) of stored messages, in order; each must have one.
pub fn msg_ids(msgs: &[async_nats::jetstream::message::StreamMessage]) -> Vec<String> {
    msgs.iter().map(|m| header(m, "Nats-Msg-Id").expect("a stored message without Nats-Msg-Id")).collect()
}

/// The ids (`Nats-Msg-Id`) of a stream's messages, in order.
pub async fn stored_ids(js: &async_nats::jetstream::Context, stream: &str) -> Vec<String> {
    msg_ids(&stream_messages(js, stream).await)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client")
}

/// Connects a JetStream client to the server.
pub async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.expect("connecting to nats-server");
    async_nats::jetstream::new(client)
}

/// Every message of a stream, in sequence order.
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let info = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if info.messages == 0 {
        return out;
    }
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// Header value of a stream message.
pub fn header(m: &async_nats::jetstream::message::StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_owned())
}

/// The JSON of a response, with its status.
pub async fn json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("response body");
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, value)
}

/// How long the delivery tests wait for what should come soon.
pub const WAIT: Duration = Duration::from_secs(30);

/// Starts a sidecar pushing to `app` (if any) and waits until it configured the broker.
pub fn start(nats: &NatsServer, res: &Path, data: &Path, app: Option<&TestApp>, extra: &[&str]) -> Sidecar {
    let mut launch = Launch::new(nats.url(), res, data);
    if let Some(app) = app {
        launch = launch.arg("--app-port").arg(&app.port.to_string());
    }
    for a in extra {
        launch = launch.arg(a);
    }
    let mut sc = launch.start();
    sc.wait_configured();
    sc
}

pub async fn consumer_info(nats: &NatsServer, stream: &str, consumer: &str) -> async_nats::jetstream::consumer::Info {
    let js = jetstream(&nats.url()).await;
    let stream = js.get_stream(stream).await.unwrap();
    let mut c: async_nats::jetstream::consumer::PullConsumer = stream.get_consumer(consumer).await.unwrap();
    c.info().await.unwrap().clone()
}

/// Waits until the broker shows nothing pending or unacked for the consumer.
pub async fn wait_settled_on(nats: &NatsServer, stream: &str, consumer: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = consumer_info(nats, stream, consumer).await;
        if (info.num_pending, info.num_ack_pending) == (0, 0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer {consumer} never settled: pending {}, ack pending {}",
            info.num_pending,
            info.num_ack_pending
        );
        // The broker offers no event for "consumer idle"; poll its info.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_settled(nats: &NatsServer, consumer: &str) {
    wait_settled_on(nats, "FERRY_default_orders", consumer).await;
}

pub async fn dead_letters(nats: &NatsServer) -> Vec<async_nats::jetstream::message::StreamMessage> {
    stream_messages(&jetstream(&nats.url()).await, "FERRY_default_orders-dlq").await
}

/// The value of one series on the admin `/metrics` page.
pub async fn metric(sc: &Sidecar, series: &str) -> Option<f64> {
    let text = http().get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn deliveries(subscription: &str, result: &str) -> String {
    format!("ferry_deliveries_total{{subscription=\"{subscription}\",result=\"{result}\"}}")
}

/// How many requests the app got for each id.
pub fn counts<'a>(reqs: impl IntoIterator<Item = &'a Received>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in reqs {
        *out.entry(r.id().to_owned()).or_insert(0) += 1;
    }
    out
}
