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
    let configured = s.broker_configured.load(Ordering::Acquire) && s.is_config_loaded();
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

#[cfg(test)]
mod liveness_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use clap::Parser;
    use ferry_log::memfs::{Fault, MemFs};
    use ferry_log::Fs;

    use crate::config::{Cli, Config};

    /// Two durable topics, no subscription.
    const MANIFESTS: &str = "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata:\n  name: orders\nspec: {}\n---\n\
        apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata:\n  name: audit\nspec: {}\n";

    async fn get(client: &reqwest::Client, url: String) -> (u16, serde_json::Value) {
        let resp = client.get(url).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn produce(
        client: &reqwest::Client,
        api: std::net::SocketAddr,
        topic: &str,
        id: &str,
    ) -> (u16, serde_json::Value) {
        let resp = client
            .post(format!("http://{api}/v1/topics/{topic}/messages"))
            .header("ferry-id", id)
            .header("content-type", "text/plain")
            .body(format!("message {id}"))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or_default())
    }

    /// Asks `probe` every `every` until its answer is `done`, at most
    /// `within`; returns the last answer (for the caller's assertion). For
    /// state no event announces (a config reload, the outbox reopen, the
    /// forwarder).
    async fn until<T, F: std::future::Future<Output = T>>(
        within: Duration,
        every: Duration,
        mut probe: impl FnMut() -> F,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = std::time::Instant::now() + within;
        loop {
            let answer = probe().await;
            if done(&answer) || std::time::Instant::now() > deadline {
                return answer;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A whole sidecar in this process (embedded broker, real HTTP on
    /// loopback, the `MANIFESTS` polled every 50 ms) whose outbox logs sit
    /// on a `MemFs`, to make its disk fail.
    struct InProcess {
        fs: Arc<MemFs>,
        data: tempfile::TempDir,
        manifests: tempfile::TempDir,
        started: crate::Started,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), crate::StartError>>,
    }

    impl InProcess {
        async fn start() -> InProcess {
            let data = tempfile::tempdir().unwrap();
            let manifests = tempfile::tempdir().unwrap();
            std::fs::write(manifests.path().join("topics.yaml"), MANIFESTS).unwrap();
            let (d, m) = (data.path().to_str().unwrap(), manifests.path().to_str().unwrap());
            let cli = Cli::try_parse_from([
                "ferry-sidecar",
                "--app-id",
                "shop",
                "--data-dir",
                d,
                "--resources",
                m,
                "--resources-poll",
                "50ms",
                "--api-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--shutdown-grace",
                "1s",
            ])
            .unwrap();
            let config = Config::from_args(cli.sidecar).unwrap();
            let fs = Arc::new(MemFs::new());
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            let task = tokio::spawn(crate::run_on(fs.clone(), config, shutdown, Some(ready_tx)));
            let started = ready_rx.await.expect("the sidecar started");
            InProcess { fs, data, manifests, started, stop, task }
        }

        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.task.await.unwrap().expect("the sidecar stopped cleanly");
        }
    }

    /// A topic added while the disk is full gets no outbox: its produce
    /// calls are 503 (configured, not unknown: 404 would tell the app it
    /// does not exist), and once there is room it is opened and forwarded
    /// without another config change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_whose_outbox_cannot_be_opened_is_503_and_opened_once_there_is_room() {
        let sc = InProcess::start().await;
        let (fs, manifests, api) = (&sc.fs, &sc.manifests, sc.started.api);
        let client = reqwest::Client::new();

        fs.set_capacity(Some(0)); // the disk is full
        let added = format!(
            "{MANIFESTS}---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata:\n  name: late\nspec: {{}}\n"
        );
        std::fs::write(manifests.path().join("topics.yaml"), added).unwrap();
        // The new topic is configured (the reload polls every 50 ms), without an outbox.
        let ms = Duration::from_millis;
        let (status, body) =
            until(Duration::from_secs(10), ms(20), || produce(&client, api, "late", "l-1"), |(s, _)| *s != 404).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("could not be opened"), "{body}");

        fs.set_capacity(None);
        // Opened again within REOPEN_EVERY; no event says when.
        let (status, _) =
            until(crate::REOPEN_EVERY * 3, ms(50), || produce(&client, api, "late", "l-1"), |(s, _)| *s == 202).await;
        assert_eq!(status, 202);
        // And its forwarder runs: the message reaches the broker.
        let status = || get(&client, format!("http://{api}/v1/messages/l-1"));
        let (_, body) = until(Duration::from_secs(10), ms(20), status, |(_, b)| b["status"] == "forwarded").await;
        assert_eq!(body["status"], "forwarded", "{body}");
        sc.stop().await;
    }

    /// A whole sidecar (embedded broker, real HTTP on loopback) whose outbox
    /// logs sit on a `MemFs`: the one way here to make an `fdatasync` fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fdatasync_fails_healthz_and_readyz_over_http_and_only_its_topic_refuses() {
        let sc = InProcess::start().await;
        let (fs, data, api, admin) = (&sc.fs, &sc.data, sc.started.api, sc.started.admin);
        let client = reqwest::Client::new();

        assert_eq!(produce(&client, api, "orders", "a").await.0, 202);
        assert_eq!(get(&client, format!("http://{admin}/healthz")).await, (200, serde_json::json!({"status": "ok"})));

        // The next sync of the `orders` segment fails (a cursor commit of
        // the forwarder running meanwhile is left alone).
        let dir = data.path().join("outbox").join("orders");
        let segments: Vec<String> = fs.list(&dir).unwrap().into_iter().filter(|n| n.ends_with(".log")).collect();
        assert_eq!(segments.len(), 1, "{segments:?}");
        fs.inject(Fault::SyncOf(dir.join(&segments[0]), std::io::ErrorKind::Other));
        let (status, body) = produce(&client, api, "orders", "b").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["ids"], serde_json::json!(["b"]), "{body}");

        let (status, body) = get(&client, format!("http://{admin}/healthz")).await;
        assert_eq!((status, body), (503, serde_json::json!({"status": "failed", "failedTopics": ["orders"]})));
        let (status, body) = get(&client, format!("http://{admin}/readyz")).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["ready"], false, "{body}");
        assert_eq!(body["outbox"]["orders"]["failed"], true, "{body}");
        assert_eq!(body["outbox"]["audit"]["failed"], false, "{body}");

        // The failed topic takes nothing more until a restart; others go on.
        let (status, body) = produce(&client, api, "orders", "c").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(produce(&client, api, "audit", "d").await.0, 202);
        assert_eq!(get(&client, format!("http://{admin}/healthz")).await.0, 503, "only a restart mends it");

        sc.stop().await;
    }
}
