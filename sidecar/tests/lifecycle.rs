//! Start-up, readiness, metrics, SIGTERM, and the outbox inspect command.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

const SIGTERM: i32 = 15;

#[tokio::test]
async fn sigterm_drains_the_outbox_to_the_broker_then_exits_0() {
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--shutdown-grace").arg("30s").start();
    let c = http();
    for i in 0..20 {
        let resp = c
            .post(sc.url("/v1/topics/orders/messages"))
            .header("ferry-id", format!("d-{i}"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    sc.process.signal(SIGTERM);
    sc.process.wait_for_line("shutting down", START_TIMEOUT);
    // While draining, produce calls are refused with 503 + Retry-After.
    let resp = c.post(sc.url("/v1/topics/orders/messages")).body("late").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let (_, body) = json(resp).await;
    assert_eq!(body["error"]["code"], "shutting_down");
    // The broker comes back within the grace period: the outbox drains.
    nats.start_again();
    let status = sc.process.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        sc.process.output().iter().any(|l| l.contains("ferry-sidecar stopped") && l.contains("left_in_outbox=0")),
        "{:#?}",
        sc.process.output()
    );
    let js = jetstream(&nats.url()).await;
    assert_eq!(stream_messages(&js, "FERRY_default_orders").await.len(), 20);
}

/// A sidecar on `data` whose broker is down (grace 300 ms), with three
/// messages produced to `audit`, each answered 202.
async fn three_messages_with_the_broker_down(data: &Path) -> (NatsServer, tempfile::TempDir, Sidecar) {
    let nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let sc = Launch::new(nats.url(), res.path(), data).arg("--shutdown-grace").arg("300ms").start();
    for _ in 0..3 {
        let resp = http().post(sc.url("/v1/topics/audit/messages")).body("x").send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    (nats, res, sc)
}

#[tokio::test]
async fn sigterm_with_the_broker_down_exits_0_after_the_grace_and_says_what_is_left() {
    let data = tempfile::tempdir().unwrap();
    let (_nats, _res, mut sc) = three_messages_with_the_broker_down(data.path()).await;
    sc.process.signal(SIGTERM);
    let status = sc.process.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let out = sc.process.output().join("\n");
    assert!(out.contains("messages left in the outbox") && out.contains("pending=3"), "{out}");
    // They are still there for the next start.
    let text = inspect_outbox(data.path());
    assert!(text.contains("topic audit:") && text.contains("3 not forwarded"), "{text}");
}

/// A sidecar on the embedded broker with its admin port on `admin` and
/// `--resources` only if given (the environment's `FERRY_RESOURCES` is not
/// inherited).
fn embedded_sidecar(data: &Path, admin: &str, resources: Option<&Path>) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"));
    cmd.env_remove("RUST_LOG")
        .env_remove("FERRY_RESOURCES")
        .args(["--app-id", "shop", "--api-addr", &format!("127.0.0.1:{}", free_port()), "--admin-addr", admin])
        .arg("--data-dir")
        .arg(data);
    if let Some(dir) = resources {
        cmd.arg("--resources").arg(dir);
    }
    Process::spawn("ferry-sidecar", cmd)
}

/// The embedded broker without manifests has no topic at all: the sidecar
/// says so at start rather than answering 404 to every produce unexplained.
#[tokio::test]
async fn the_embedded_broker_without_resources_warns_at_start() {
    let data = tempfile::tempdir().unwrap();
    let mut sc = embedded_sidecar(data.path(), &format!("127.0.0.1:{}", free_port()), None);
    let line = sc.wait_for_line("no --resources", START_TIMEOUT);
    assert!(line.contains("WARN") && line.contains("404"), "{line}");
}

/// A produce call whose body was still coming in when SIGTERM came is
/// refused (503), not stored after the drain began and answered 202.
#[tokio::test]
async fn a_slow_upload_finished_after_sigterm_is_refused_and_stores_nothing() {
    use std::io::{Read, Write};
    let nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).arg("--shutdown-grace").arg("300ms").start();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", sc.api_port)).unwrap();
    write!(
        conn,
        "POST /v1/topics/audit/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nferry-id: slow\r\n\r\nhalf-"
    )
    .unwrap();
    sc.process.signal(SIGTERM);
    sc.process.wait_for_line("shutting down", Duration::from_secs(10));
    conn.write_all(b"done!").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(sc.process.wait_exit(Duration::from_secs(30)).success());
    let text = inspect_outbox(data.path());
    assert!(text.contains("topic audit:") && text.contains("0 record(s) held"), "{text}");
}

/// The admin port on `[::]` (the default, and what the webhook injects)
/// answers on IPv4 and IPv6 alike: kubelet probes reach a pod on its IPv6
/// address in an IPv6 cluster, on IPv4 elsewhere.
#[tokio::test]
async fn the_admin_port_on_the_any_address_answers_on_ipv4_and_ipv6() {
    let data = tempfile::tempdir().unwrap();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let port = free_port();
    let mut sc = embedded_sidecar(data.path(), &format!("[::]:{port}"), Some(res.path()));
    sc.wait_for_line("ferry-sidecar started", START_TIMEOUT);
    for host in ["127.0.0.1", "[::1]"] {
        let resp = http().get(format!("http://{host}:{port}/healthz")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{host}");
    }
}

/// Every file under `dir` with its length.
fn sizes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sizes(&path));
        } else {
            out.insert(path.clone(), std::fs::metadata(&path).unwrap().len());
        }
    }
    out
}

/// `outbox inspect` runs each log's recovery, which beside a running
/// sidecar would cut off (truncate) what it is appending: it refuses a
/// data dir in use, and changes no file.
#[tokio::test]
async fn outbox_inspect_refuses_a_data_dir_a_running_sidecar_uses_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let (_nats, _res, mut sc) = three_messages_with_the_broker_down(data.path()).await;
    let before = sizes(data.path());
    let report = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"))
        .args(["outbox", "inspect", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&report.stderr);
    assert!(!report.status.success(), "inspect ran beside the sidecar: {}", String::from_utf8_lossy(&report.stdout));
    assert!(stderr.contains("in use by a running ferry-sidecar"), "{stderr}");
    assert_eq!(sizes(data.path()), before, "inspect changed files of the running sidecar");
    sc.process.signal(SIGTERM);
    assert!(sc.process.wait_exit(Duration::from_secs(30)).success());
    let text = inspect_outbox(data.path());
    assert!(text.contains("topic audit:") && text.contains("3 not forwarded"), "{text}");
}

#[tokio::test]
async fn readyz_and_metrics_report_broker_state_and_outbox_depth() {
    let mut nats = NatsServer::stopped();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = Launch::new(nats.url(), res.path(), data.path()).start();
    let c = http();
    let (status, health) = json(c.get(format!("{}/healthz", sc.admin)).send().await.unwrap()).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    for _ in 0..4 {
        c.post(sc.url("/v1/topics/orders/messages")).body("x").send().await.unwrap();
    }
    let (status, ready) = json(c.get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["broker"]["connected"], false);
    assert_eq!(ready["fsync"], "always", "the outbox's fsync policy is shown");
    assert_eq!(ready["outbox"]["orders"]["pending"], 4);
    let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    for line in [
        "ferry_broker_connected 0",
        "ferry_outbox_records{topic=\"orders\"} 4",
        "ferry_produce_requests_total{topic=\"orders\",code=\"202\"} 4",
        "ferry_produce_messages_total{topic=\"orders\"} 4",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("ferry_produce_duration_seconds_count 4"), "{metrics}");

    nats.start_again();
    sc.wait_configured();
    let resp = c.post(sc.url("/v1/topics/orders/messages?ack=broker")).body("y").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let (status, ready) = json(c.get(format!("{}/readyz", sc.admin)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["broker"]["connected"], true);
    assert_eq!(ready["outbox"]["orders"]["pending"], 0);
    let metrics = c.get(format!("{}/metrics", sc.admin)).send().await.unwrap().text().await.unwrap();
    for line in [
        "ferry_broker_connected 1",
        "ferry_forward_messages_total{topic=\"orders\"} 5",
        "ferry_outbox_records{topic=\"orders\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("ferry_forward_duration_seconds_count 5"), "{metrics}");
}

#[test]
fn invalid_flags_are_all_reported_and_exit_64_before_binding() {
    // We hold the API port: a sidecar that tried to bind it would fail with
    // "address in use" instead of reporting the flags.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"))
        .args([
            "--namespace",
            "Not_Valid",
            "--api-addr",
            &format!("127.0.0.1:{port}"),
            "--shutdown-grace",
            "later",
            "--broker",
            "http://x",
        ])
        .env_remove("FERRY_APP_ID")
        .env_remove("FERRY_BROKER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--app-id", "--namespace", "--shutdown-grace", "--broker"] {
        assert!(err.contains(needle), "{needle} not reported in:\n{err}");
    }
    // It stopped before binding anything.
    assert!(!err.to_lowercase().contains("in use"), "it tried to bind:\n{err}");
}

/// Runs a sidecar of app `shop` (broker unreachable, ports any) on these
/// manifests and data dir until it exits.
fn run_to_exit(resources: &std::path::Path, data_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"))
        .args(["--app-id", "shop", "--broker", "nats://127.0.0.1:1"])
        .args(["--api-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--resources"])
        .arg(resources)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

#[test]
fn an_invalid_manifest_exits_64_naming_file_and_field() {
    let res = manifests(&[
        ("topics.yaml", TOPICS),
        ("subs.yaml", "apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {name: billing}\nspec: {topic: orders, app: shop, maxInFlight: lots}\n"),
    ]);
    let data = tempfile::tempdir().unwrap();
    let out = run_to_exit(res.path(), data.path());
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("subs.yaml (document 1): spec.maxInFlight: invalid type"), "{err}");
    assert!(!data.path().join("outbox").exists(), "nothing was created");
}

#[test]
fn a_second_sidecar_on_the_same_data_dir_is_refused() {
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir().unwrap();
    let _first = Launch::new("nats://127.0.0.1:1".into(), res.path(), data.path()).start();
    let out = run_to_exit(res.path(), data.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another ferry-sidecar"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
