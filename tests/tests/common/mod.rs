//! Shared parts of the fault scenarios: launching the real `ferry-sidecar`
//! binary (and launching it again on the same ports and data dir), HTTP
//! against it, manifests, a size-limited tmpfs, and raw TCP requests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use ferry_e2e::app::{Received, Reply, TestApp};
pub use ferry_e2e::check::{Checker, Report};
pub use ferry_e2e::{free_port, manifests, NatsServer, Process, TmpfsMount, START_TIMEOUT};
use serde_json::Value;

/// The app id of every sidecar here.
pub const APP: &str = "shop";

/// True for the long versions (`FERRY_LONG=1`).
pub fn long() -> bool {
    std::env::var("FERRY_LONG").is_ok_and(|v| v == "1")
}

/// The `ferry-sidecar` binary of this build profile: `FERRY_SIDECAR_BIN`,
/// else `target/{debug,release}/ferry-sidecar` beside the directory holding
/// this test executable (`target/{profile}/deps`).
pub fn sidecar_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_SIDECAR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/{profile}");
    let bin = dir.join("ferry-sidecar");
    let release = if dir.ends_with("release") { " --release" } else { "" };
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build{release} -p ferry-sidecar` (`cargo test --workspace` builds it)",
        bin.display()
    );
    bin
}

/// Runs blocking harness code (waiting for a process's line, starting or
/// stopping nats-server) without stalling the runtime's other tasks.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// How to launch one sidecar; the ports are chosen once, so a relaunch
/// after `kill -9` comes back where the app and producers expect it.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    pub broker: String,
    pub resources: PathBuf,
    pub data_dir: PathBuf,
    pub app_port: Option<u16>,
    pub api_port: u16,
    pub admin_port: u16,
    pub pod: String,
    pub extra: Vec<String>,
}

impl SidecarSpec {
    /// A sidecar of app [`APP`] on free ports.
    pub fn new(broker: &str, resources: &Path, data_dir: &Path) -> SidecarSpec {
        SidecarSpec {
            broker: broker.to_owned(),
            resources: resources.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            app_port: None,
            api_port: free_port(),
            admin_port: free_port(),
            pod: "shop-0".to_owned(),
            extra: Vec::new(),
        }
    }

    pub fn app_port(mut self, port: u16) -> SidecarSpec {
        self.app_port = Some(port);
        self
    }

    pub fn pod(mut self, pod: &str) -> SidecarSpec {
        self.pod = pod.to_owned();
        self
    }

    pub fn arg(mut self, a: &str) -> SidecarSpec {
        self.extra.push(a.to_owned());
        self
    }

    /// `http://127.0.0.1:{api}`.
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `http://127.0.0.1:{admin}`.
    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(sidecar_bin());
        cmd.env_remove("RUST_LOG")
            .env_remove("FERRY_API_TOKEN")
            .args(["--app-id", APP, "--broker", &self.broker, "--pod-name", &self.pod])
            .args(["--api-addr", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--admin-addr", &format!("127.0.0.1:{}", self.admin_port)])
            .arg("--resources")
            .arg(&self.resources)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra);
        if let Some(p) = self.app_port {
            cmd.args(["--app-port", &p.to_string()]);
        }
        cmd
    }

    /// Starts the process and waits for its start-up line.
    pub fn start(self) -> Sidecar {
        let process = self.launch();
        Sidecar { spec: self, process }
    }

    fn launch(&self) -> Process {
        let mut p = Process::spawn(&format!("ferry-sidecar {}", self.pod), self.command());
        blocking(|| p.wait_for_line("ferry-sidecar started", START_TIMEOUT));
        p
    }
}

/// A running `ferry-sidecar`.
pub struct Sidecar {
    pub spec: SidecarSpec,
    pub process: Process,
}

impl Sidecar {
    /// Waits until it created its streams and started its subscriptions.
    pub fn wait_configured(&mut self) {
        let p = &mut self.process;
        blocking(|| p.wait_for_line("broker configured", START_TIMEOUT));
    }

    /// `kill -9` (and reap).
    pub fn kill9(&mut self) {
        let p = &mut self.process;
        blocking(|| p.kill9());
    }

    /// Starts it again: same flags, ports and data dir (after [`Sidecar::kill9`]).
    pub fn restart(&mut self) {
        self.process = self.spec.launch();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.spec.api())
    }
}

/// One HTTP client with a 30 s timeout per request.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client")
}

/// `GET /readyz` on the admin port (whatever its status).
pub async fn readyz(c: &reqwest::Client, admin: &str) -> Value {
    let resp = c.get(format!("{admin}/readyz")).send().await.expect("GET /readyz");
    resp.json().await.expect("/readyz JSON")
}

/// The outbox detail of one topic from `/readyz`: (nextOffset, pending).
pub async fn outbox(c: &reqwest::Client, admin: &str, topic: &str) -> (u64, u64) {
    let r = readyz(c, admin).await;
    let t = &r["outbox"][topic];
    match (t["nextOffset"].as_u64(), t["pending"].as_u64()) {
        (Some(n), Some(p)) => (n, p),
        _ => panic!("no outbox detail for {topic} in /readyz: {r}"),
    }
}

/// The value of one series on `/metrics`.
pub async fn metric(c: &reqwest::Client, admin: &str, series: &str) -> Option<f64> {
    let text = c.get(format!("{admin}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `ferry_deliveries_total{subscription, result}`.
pub fn deliveries(subscription: &str, result: &str) -> String {
    format!("ferry_deliveries_total{{subscription=\"{subscription}\",result=\"{result}\"}}")
}

/// Polls `check` every 50 ms until it returns `Ok`, at most `timeout`;
/// panics with its last `Err`. Only for state no event announces (the
/// broker's consumer info, `/readyz`, `/metrics`).
pub async fn poll<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check().await {
            Ok(()) => return,
            Err(why) => why,
        };
        assert!(Instant::now() < deadline, "not reached within {timeout:?}: {why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the outbox of `topic` has nothing left to forward.
pub async fn wait_drained(c: &reqwest::Client, admin: &str, topic: &str, timeout: Duration) {
    poll(timeout, || async {
        let (next, pending) = outbox(c, admin, topic).await;
        if pending == 0 {
            Ok(())
        } else {
            Err(format!("outbox of {topic}: {pending} of {next} still pending"))
        }
    })
    .await;
}

/// Waits until the broker shows nothing pending or unacked for a consumer.
pub async fn wait_settled(nats_url: &str, stream: &str, consumer: &str, timeout: Duration) {
    let client = async_nats::connect(nats_url).await.expect("connecting to nats-server");
    let js = async_nats::jetstream::new(client);
    poll(timeout, || {
        let js = js.clone();
        async move {
            let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(consumer).await.map_err(|e| e.to_string())?;
            let info = c.info().await.map_err(|e| e.to_string())?;
            if (info.num_pending, info.num_ack_pending) == (0, 0) {
                Ok(())
            } else {
                Err(format!("consumer {consumer}: pending {}, ack pending {}", info.num_pending, info.num_ack_pending))
            }
        }
    })
    .await;
}

/// A Topic manifest; `spec` is its flow-style spec, e.g. `{partitions: 4}`.
pub fn topic(name: &str, spec: &str) -> String {
    format!("---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

/// A Subscription of app [`APP`] to `topic`, pushed to `/{name}`, with
/// more spec fields (one per line, e.g. `ordering: Key`).
pub fn subscription(name: &str, topic: &str, fields: &[&str]) -> String {
    let mut s = format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec:\n  topic: {topic}\n  \
         app: {APP}\n  path: /{name}\n"
    );
    for f in fields {
        s.push_str(&format!("  {f}\n"));
    }
    s
}

/// Produces one message; `Err` when there was no HTTP answer.
pub async fn produce(
    c: &reqwest::Client,
    api: &str,
    topic: &str,
    id: &str,
    key: Option<&str>,
    body: Vec<u8>,
    ack: &str,
) -> Result<u16, reqwest::Error> {
    let mut req = c
        .post(format!("{api}/v1/topics/{topic}/messages?ack={ack}"))
        .header("ferry-id", id)
        .header("content-type", "application/octet-stream");
    if let Some(k) = key {
        req = req.header("ferry-key", k);
    }
    let resp = req.body(body).send().await?;
    let status = resp.status().as_u16();
    // Read the body, so the connection goes back to the pool.
    let _ = resp.bytes().await;
    Ok(status)
}

/// A deterministic pseudo-random generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a raw request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAnswer {
    /// A status line, and the body (as far as it came).
    Status(u16, String),
    /// The server closed the connection (or reset it) without an answer.
    Closed,
}

/// Sends `request` as raw bytes on a new connection and reads one answer
/// (up to `timeout`; a timeout panics: every case must be answered or closed).
pub async fn raw(port: u16, request: &[u8], timeout: Duration) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connecting to the sidecar");
    let exchange = async {
        // The server may answer (and close) before the whole request is
        // written (e.g. an over-long header): a failed write is no error.
        let _ = s.write_all(request).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
        buf
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer and no close within {timeout:?} for {:?}", preview(request)));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return RawAnswer::Closed;
    };
    match head.split(' ').nth(1).and_then(|s| s.parse().ok()) {
        Some(status) => RawAnswer::Status(status, body.to_owned()),
        None => RawAnswer::Closed,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The start of a request, for messages.
pub fn preview(request: &[u8]) -> String {
    let n = request.len().min(160);
    format!("{}{}", request[..n].escape_ascii(), if request.len() > n { "…" } else { "" })
}
