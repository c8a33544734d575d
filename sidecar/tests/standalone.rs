//! Standalone mode: `ferry-sidecar run` with the embedded broker, the
//! quickstart, and embedded state across `kill -9`.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_e2e::app::{Reply, TestApp};
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_cmd(data: &std::path::Path, resources: &std::path::Path, app_port: u16, api_port: u16, app: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-sidecar"));
    cmd.env_remove("RUST_LOG")
        .args(["run", "--app-id", "orders", "--app-port", &app_port.to_string()])
        .args(["--api-addr", &format!("127.0.0.1:{api_port}"), "--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--resources")
        .arg(resources)
        .arg("--data-dir")
        .arg(data)
        .arg("--")
        .args(app);
    cmd
}

#[test]
fn the_quickstart_shows_messages_produced_delivered_acked_retried_and_dead_lettered() {
    let data = tempfile::tempdir().unwrap();
    let app = repo().join("examples/apps/orders.py");
    let mut p = Process::spawn(
        "quickstart",
        run_cmd(
            data.path(),
            &repo().join("examples/quickstart"),
            free_port(),
            free_port(),
            &["python3", app.to_str().unwrap()],
        ),
    );
    let status = p.wait_exit(Duration::from_secs(90));
    let out = p.output().join("\n");
    assert!(status.success(), "exit {status:?}\n{out}");
    for needle in [
        "ferry: sidecar for app \"orders\" is ready",
        "produced order-1 -> HTTP 202",
        "order-3 (attempt 1): 202, will ack in 300 ms",
        "order-3: acked via callback (HTTP 200)",
        "order-4 (attempt 1): 503 busy",
        "order-4 (attempt 2): 200 -> acked",
        "order-7 (attempt 1): 422",
        "dead letter: order-7 from subscription fulfil after 1 attempt(s): 422 amount must be positive",
        "done: 9 acked, 1 dead-lettered, 1 retried",
        "ferry: app exited with status 0",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
}

#[test]
fn run_gives_the_app_ferry_url_and_exits_with_its_status() {
    let data = tempfile::tempdir().unwrap();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let api = free_port();
    let mut p = Process::spawn(
        "run",
        run_cmd(
            data.path(),
            res.path(),
            free_port(),
            api,
            &["sh", "-c", "echo \"url=$FERRY_URL app=$FERRY_APP_ID\"; exit 3"],
        ),
    );
    let status = p.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{:#?}", p.output());
    let out = p.output().join("\n");
    assert!(out.contains(&format!("url=http://127.0.0.1:{api} app=orders")), "{out}");
}

#[test]
fn sigint_stops_the_app_and_then_the_sidecar() {
    let data = tempfile::tempdir().unwrap();
    let res = manifests(&[("topics.yaml", TOPICS)]);
    let mut p = Process::spawn("run", run_cmd(data.path(), res.path(), free_port(), free_port(), &["sleep", "60"]));
    p.wait_for_line("ferry: starting app", START_TIMEOUT);
    p.signal(2);
    let status = p.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "the app died of SIGINT: 128 + 2; {:#?}", p.output());
    assert!(p.output().iter().any(|l| l.contains("app exited with status 130; stopping the sidecar")));
}

#[tokio::test]
async fn embedded_state_survives_kill_9_acked_stays_acked_and_unacked_comes_back() {
    let subs = "apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {name: billing}\n\
                spec: {topic: orders, app: shop, path: /b, processingTimeout: 30s}\n";
    let res = manifests(&[("topics.yaml", TOPICS), ("subs.yaml", subs)]);
    let data = tempfile::tempdir().unwrap();
    // "held" gets 202 and no callback: unacked when the sidecar dies.
    let app =
        TestApp::start(
            |r, _| if r.id() == "held" && r.attempt() == 1 { Reply::status(202) } else { Reply::status(200) },
        )
        .await;
    let launch = |data: &tempfile::TempDir| {
        let mut sc = Launch::new("embedded".into(), res.path(), data.path())
            .arg("--app-port")
            .arg(&app.port.to_string())
            .start();
        sc.wait_configured();
        sc
    };
    let mut sc = launch(&data);
    for id in ["done", "held"] {
        let resp =
            http().post(sc.url("/v1/topics/orders/messages")).header("ferry-id", id).body(id).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    app.wait_until(Duration::from_secs(30), |r| {
        r.iter().any(|r| r.id() == "done") && r.iter().any(|r| r.id() == "held")
    })
    .await;
    // The app has answered "done"; wait until the sidecar has settled it (an
    // ack lost in the kill would rightly bring it back: at-least-once).
    let metrics = format!("{}/metrics", sc.admin);
    let acked = "ferry_deliveries_total{subscription=\"billing\",result=\"acked\"} 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !http().get(&metrics).send().await.unwrap().text().await.unwrap().lines().any(|l| l == acked) {
        assert!(std::time::Instant::now() < deadline, "the sidecar never settled the acked delivery");
        // No event exposes the settlement; poll the metric.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sc.process.kill9();

    let sc = launch(&data);
    let resp = http()
        .post(sc.url("/v1/topics/orders/messages"))
        .header("ferry-id", "after")
        .body("after")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let got = app
        .wait_until(Duration::from_secs(30), |r| {
            r.iter().any(|r| r.id() == "after") && r.iter().filter(|r| r.id() == "held").count() == 2
        })
        .await;
    let held: Vec<u32> = got.iter().filter(|r| r.id() == "held").map(|r| r.attempt()).collect();
    assert_eq!(held, [1, 2], "the unacked delivery came back, counted");
    assert_eq!(got.iter().filter(|r| r.id() == "done").count(), 1, "the acked one did not come back");
}
