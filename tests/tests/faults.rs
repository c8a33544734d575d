//! The end-to-end fault suite (DESIGN.md §5): real nats-server, real
//! `ferry-sidecar` processes, a real test app on loopback, and faults
//! injected from outside — `kill -9`, a stopped broker, an app that fails
//! in every way the contract names, a full disk, a lost pod, hostile input
//! and a broker that lost its store (also recovered by a replay). Each
//! scenario prints one summary line (see `ferry_e2e::check`).
//!
//! Short versions run by default; `FERRY_LONG=1` runs the long ones:
//! `cargo build --release -p ferry-sidecar && FERRY_LONG=1 cargo test -p
//! ferry-e2e --release --test faults -- --nocapture --test-threads=1`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Stream of the topic `events` in namespace `default`.
const EVENTS_STREAM: &str = "FERRY_default_events";

/// Waits until the app accepted every id in `ids` (by `success`).
async fn wait_delivered(app: &TestApp, ids: &[String], timeout: Duration, success: impl Fn(&Received) -> bool) {
    let mut missing: HashSet<String> = ids.iter().cloned().collect();
    app.wait_scan(timeout, |new| {
        for r in new.iter().filter(|r| success(r)) {
            missing.remove(r.id());
        }
        match missing.iter().next() {
            None => Ok(()),
            Some(one) => Err(format!("{} acknowledged ids not delivered yet, e.g. {one}", missing.len())),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// 1. kill -9 of the sidecar, again and again, under keyed load.

/// Producers (one per key, each sending its key's messages one after the
/// other, `ack=local`) against one sidecar that is killed with `kill -9`
/// `kills` times and started again on the same ports and data dir. A
/// produce without an answer is retried with the same id once the sidecar
/// is back; only 2xx answers count as acknowledged.
async fn kill9_run(kills: usize, total: usize, keys: usize, embedded: bool) -> Report {
    let started = Instant::now();
    let nats = if embedded { NatsServer::stopped() } else { blocking(NatsServer::start) };
    let broker = if embedded { "embedded".to_owned() } else { nats.url() };
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{partitions: 4}")),
        (
            "subs.yaml",
            &subscription(
                "ordered",
                "events",
                &[
                    "ordering: Key",
                    "maxInFlight: 64",
                    "processingTimeout: 2s",
                    "maxDeliveries: 1000",
                    "backoff: {initial: 50ms, max: 200ms}",
                ],
            ),
        ),
    ]);
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start_without_history(|_| Reply::status(200)).await;
    let mut sc = SidecarSpec::new(&broker, res.path(), data.path()).app_port(app.port).start();
    sc.wait_configured();
    let api = sc.spec.api();
    let checker = Arc::new(Checker::new(if embedded { "kill9_embedded" } else { "kill9" }));
    let (generation_tx, generation) = watch::channel(0usize);
    let (progress_tx, mut progress) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let unanswered = Arc::new(AtomicUsize::new(0));
    let per_key = total / keys;
    let c = http();
    let mut producers = JoinSet::new();
    for k in 0..keys {
        let (c, api, checker, generation, progress_tx, unanswered) =
            (c.clone(), api.clone(), checker.clone(), generation.clone(), progress_tx.clone(), unanswered.clone());
        producers.spawn(async move {
            let key = format!("k{k:03}");
            for i in 0..per_key {
                let id = format!("{key}-{i:06}");
                let body = format!("{id} payload").into_bytes();
                let mut tries = 0;
                loop {
                    let seen = *generation.borrow();
                    match produce(&c, &api, "events", &id, Some(&key), body.clone(), "local").await {
                        Ok(202) => break,
                        Ok(status) => panic!("produce {id}: unexpected status {status}"),
                        Err(_) => {
                            // No answer: the sidecar died under the call.
                            // Retry the same id once it is back.
                            tries += 1;
                            assert!(tries < 100, "produce {id}: no answer after {tries} tries");
                            unanswered.fetch_add(1, Ordering::Relaxed);
                            let mut g = generation.clone();
                            let _ = tokio::time::timeout(Duration::from_secs(1), g.wait_for(|g| *g > seen)).await;
                        }
                    }
                }
                checker.acked(&id, Some(&key));
                progress_tx.send_modify(|n| *n += 1);
            }
        });
    }
    let produce_timeout = Duration::from_secs(if long() { 600 } else { 60 });
    for k in 1..=kills {
        let at = total * k / (kills + 1);
        tokio::time::timeout(produce_timeout, progress.wait_for(|n| *n >= at))
            .await
            .unwrap_or_else(|_| panic!("producers stalled before {at} acknowledged"))
            .unwrap();
        sc.kill9();
        checker.crash();
        sc.restart();
        generation_tx.send_modify(|g| *g += 1);
    }
    while let Some(r) = producers.join_next().await {
        r.expect("a producer failed");
    }
    let produced_in = started.elapsed();
    let deliver_timeout = Duration::from_secs(if long() { 600 } else { 60 });
    wait_delivered(&app, &checker.acked_ids(), deliver_timeout, |_| true).await;
    if !embedded {
        wait_settled(&nats.url(), EVENTS_STREAM, "ordered", deliver_timeout).await;
    }
    // (Embedded: no consumer state to wait for from outside; a restarted
    // consumer hands out every delivered, unacked message before anything
    // new, and every kill falls mid-production, so such redeliveries reach
    // the app before the last messages do.)
    let received = app.received();
    let mut report = checker.report(&received, |_| true);
    report.note("kills", kills);
    report.note("unanswered_produces", unanswered.load(Ordering::Relaxed));
    report.note("requests_at_app", received.len());
    report.note("produced_in_s", format!("{:.1}", produced_in.as_secs_f64()));
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    report
}

fn kill9_sizes() -> (usize, usize, usize) {
    if long() {
        (20, 100_000, 50)
    } else {
        (3, 2_000, 16)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_sidecar_under_keyed_load_loses_nothing_and_duplicates_nothing() {
    kill9_whole(false).await;
}

/// A kill -9 run of the default sizes, checked whole: every message
/// produced and acknowledged, every kill done, none lost, none twice.
async fn kill9_whole(embedded: bool) -> Report {
    let (kills, total, keys) = kill9_sizes();
    let report = kill9_run(kills, total, keys, embedded).await;
    assert_eq!(report.produced_acked, total / keys * keys);
    assert_eq!(report.crashes, kills);
    report.assert_no_loss_no_duplicates();
    report
}

/// The same with the embedded broker (its stream, consumer journal and the
/// dedupe store all on the killed process's data dir). It judges the whole
/// path: an ack the consumer journal lost alone would not show here, as the
/// dedupe store then keeps the message from the app (checked: with the
/// journal's writes turned off this still passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_sidecar_with_the_embedded_broker_loses_nothing_and_duplicates_nothing() {
    kill9_whole(true).await.assert_in_order();
}

/// The same run, judged on per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_sidecar_under_keyed_load_keeps_per_key_order() {
    let (kills, total, keys) = kill9_sizes();
    let report = kill9_run(kills, total, keys, false).await;
    report.assert_no_loss_no_duplicates();
    report.assert_in_order();
}

// ---------------------------------------------------------------------------
// 2. nats-server stopped for a while under produce load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_under_produce_load_fails_no_produce_and_loses_nothing() {
    const PRODUCERS: usize = 4;
    let outage = Duration::from_secs(if long() { 60 } else { 2 });
    let started = Instant::now();
    let mut nats = blocking(NatsServer::start);
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{}")),
        ("subs.yaml", &subscription("work", "events", &["processingTimeout: 5s", "maxInFlight: 64"])),
    ]);
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start_without_history(|_| Reply::status(200)).await;
    let mut sc = SidecarSpec::new(&nats.url(), res.path(), data.path()).app_port(app.port).start();
    sc.wait_configured();
    let (api, admin) = (sc.spec.api(), sc.spec.admin());
    let c = http();
    let checker = Arc::new(Checker::new("nats_outage"));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop_tx, stop) = watch::channel(false);
    let (progress_tx, progress) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let mut producers = JoinSet::new();
    for p in 0..PRODUCERS {
        let (c, api, checker, errors, stop, progress_tx) =
            (c.clone(), api.clone(), checker.clone(), errors.clone(), stop.clone(), progress_tx.clone());
        producers.spawn(async move {
            // About 250 messages/s per producer: load, not a benchmark.
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            let mut i = 0usize;
            while !*stop.borrow() {
                tick.tick().await;
                let id = format!("p{p}-{i:07}");
                i += 1;
                match produce(&c, &api, "events", &id, None, vec![b'o'; 200], "local").await {
                    Ok(202) => {
                        checker.acked(&id, None);
                        progress_tx.send_modify(|n| *n += 1);
                    }
                    Ok(status) => errors.lock().unwrap().push(format!("{id}: {status}")),
                    Err(e) => errors.lock().unwrap().push(format!("{id}: {e}")),
                }
            }
        });
    }
    let wait = Duration::from_secs(60);
    let at_least = |n: usize| {
        let mut progress = progress.clone();
        async move {
            tokio::time::timeout(wait, progress.wait_for(|p| *p >= n))
                .await
                .unwrap_or_else(|_| panic!("fewer than {n} produces acknowledged within {wait:?}"))
                .map(|_| ())
                .unwrap();
        }
    };
    at_least(300).await;
    // SIGTERM: nats-server syncs its store. A `kill -9` would also test
    // JetStream's own durability (it acknowledges before fsync, DESIGN.md
    // §6), which is not what this scenario is about.
    blocking(|| nats.stop_gracefully());
    let at_stop = *progress.borrow();
    poll(wait, || async {
        let r = readyz(&c, &admin).await;
        if r["broker"]["connected"] == false {
            Ok(())
        } else {
            Err(format!("the sidecar still reports the broker connected: {r}"))
        }
    })
    .await;
    // The fault itself lasts this long (the producers keep going).
    tokio::time::sleep(outage).await;
    let during = *progress.borrow() - at_stop;
    let (_, pending_at_restart) = outbox(&c, &admin, "events").await;
    blocking(|| nats.start_again());
    let at_restart = *progress.borrow();
    at_least(at_restart + 300).await;
    stop_tx.send(true).unwrap();
    while let Some(r) = producers.join_next().await {
        r.expect("a producer failed");
    }
    let drain_started = Instant::now();
    let drain_timeout = Duration::from_secs(if long() { 300 } else { 60 });
    wait_drained(&c, &admin, "events", drain_timeout).await;
    let drained_in = drain_started.elapsed();
    wait_delivered(&app, &checker.acked_ids(), drain_timeout, |_| true).await;
    wait_settled(&nats.url(), EVENTS_STREAM, "work", drain_timeout).await;
    let errors = errors.lock().unwrap().clone();
    let mut report = checker.report(&app.received(), |_| true);
    report.note("produce_errors", errors.len());
    report.note("outage_s", outage.as_secs());
    report.note("acked_during_outage", during);
    report.note("outbox_pending_at_restart", pending_at_restart);
    report.note("drained_in_s", format!("{:.1}", drained_in.as_secs_f64()));
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    assert!(errors.is_empty(), "produce errors: {:?}", &errors[..errors.len().min(10)]);
    assert!(during > 0, "nothing was produced while the broker was down");
    assert!(pending_at_restart > 0, "the outbox held nothing back during the outage");
    report.assert_no_loss_no_duplicates();
    let (_, pending) = outbox(&c, &admin, "events").await;
    assert_eq!(pending, 0, "the outbox drained");
}

// ---------------------------------------------------------------------------
// 3. An app that fails in every way the contract names (DESIGN.md §3.2).

/// How the app treats one message (the id's prefix names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 200.
    Ok,
    /// 500 twice, then 200.
    Err500Twice,
    /// 500 always: dead-lettered after maxDeliveries.
    Err500Always,
    /// 429 with Retry-After: 1, then 200.
    Busy429,
    /// 503 with Retry-After: 1 always: dead-lettered after maxDeliveries.
    Busy503Always,
    /// 422: dead-lettered at once.
    Reject422,
    /// Slower than the processing timeout once, then 200.
    Timeout,
    /// 202, then an ack callback.
    CallbackAck,
    /// 202 and no callback once (redelivered after the processing timeout), then 200.
    CallbackNever,
    /// 202, then a reject callback: dead-lettered.
    CallbackReject,
    /// 202, then a retry callback with a delay of 1s, then 200.
    CallbackRetry,
}

const FAULTS: [Fault; 11] = [
    Fault::Ok,
    Fault::Err500Twice,
    Fault::Err500Always,
    Fault::Busy429,
    Fault::Busy503Always,
    Fault::Reject422,
    Fault::Timeout,
    Fault::CallbackAck,
    Fault::CallbackNever,
    Fault::CallbackReject,
    Fault::CallbackRetry,
];

/// The subscription's maxDeliveries and processingTimeout here.
const MAX_DELIVERIES: u32 = 4;
const PROCESSING_TIMEOUT: Duration = Duration::from_secs(1);

/// The callback the app makes after answering 202.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callback {
    Ack,
    Reject,
    Retry,
}

/// What the app answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    RetryAfter(u16),
    TooSlow,
    Defer(Option<Callback>),
}

/// How a message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Acked,
    DeadLettered(&'static str),
}

impl Fault {
    fn of(id: &str) -> Fault {
        let name = id.split('-').next().unwrap_or("");
        *FAULTS.iter().find(|f| format!("{f:?}") == name).unwrap_or_else(|| panic!("no fault in id {id:?}"))
    }

    fn answer(self, attempt: u32) -> Answer {
        use Answer::*;
        match (self, attempt) {
            (Fault::Ok, _) => Status(200),
            (Fault::Err500Twice, 1 | 2) => Status(500),
            (Fault::Err500Twice, _) => Status(200),
            (Fault::Err500Always, _) => Status(500),
            (Fault::Busy429, 1) => RetryAfter(429),
            (Fault::Busy429, _) => Status(200),
            (Fault::Busy503Always, _) => RetryAfter(503),
            (Fault::Reject422, _) => Status(422),
            (Fault::Timeout, 1) => TooSlow,
            (Fault::Timeout, _) => Status(200),
            (Fault::CallbackAck, _) => Defer(Some(Callback::Ack)),
            (Fault::CallbackNever, 1) => Defer(None),
            (Fault::CallbackNever, _) => Status(200),
            (Fault::CallbackReject, _) => Defer(Some(Callback::Reject)),
            (Fault::CallbackRetry, 1) => Defer(Some(Callback::Retry)),
            (Fault::CallbackRetry, _) => Status(200),
        }
    }

    /// Attempts the contract calls for, and how the message ends.
    fn expected(self) -> (u32, End) {
        match self {
            Fault::Ok | Fault::CallbackAck => (1, End::Acked),
            Fault::Err500Twice => (3, End::Acked),
            Fault::Err500Always => (MAX_DELIVERIES, End::DeadLettered("500")),
            Fault::Busy429 | Fault::Timeout | Fault::CallbackNever | Fault::CallbackRetry => (2, End::Acked),
            Fault::Busy503Always => (MAX_DELIVERIES, End::DeadLettered("503")),
            Fault::Reject422 => (1, End::DeadLettered("422")),
            Fault::CallbackReject => (1, End::DeadLettered("202")),
        }
    }

    /// Attempts the app gives up on answering (the sidecar hangs up first).
    fn abandoned(self) -> u32 {
        u32::from(self == Fault::Timeout)
    }

    /// Least time between an attempt and the next one the contract allows.
    fn least_gap(self) -> Duration {
        match self {
            Fault::Busy429 | Fault::Busy503Always | Fault::CallbackRetry => Duration::from_secs(1),
            // The sidecar's push timeout runs from when it sent the request,
            // a little before the app saw it arrive.
            Fault::Timeout => PROCESSING_TIMEOUT - Duration::from_millis(100),
            Fault::CallbackNever => PROCESSING_TIMEOUT,
            _ => Duration::ZERO,
        }
    }
}

/// Whether the app accepted this delivery (answered 2xx in time, or acked it by callback).
fn accepted(r: &Received) -> bool {
    r.path == "/faulty"
        && matches!(Fault::of(r.id()).answer(r.attempt()), Answer::Status(200) | Answer::Defer(Some(Callback::Ack)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_faults_are_acked_retried_or_dead_lettered_as_the_contract_says() {
    let reps = if long() { 40 } else { 3 };
    let started = Instant::now();
    let res = manifests(&[
        ("topics.yaml", &(topic("jobs", "{}") + &topic("jobs-dlq", "{}"))),
        (
            "subs.yaml",
            &(subscription(
                "faulty",
                "jobs",
                &[
                    "deadLetterTopic: jobs-dlq",
                    &format!("maxDeliveries: {MAX_DELIVERIES}"),
                    "processingTimeout: 1s",
                    "backoff: {initial: 100ms, max: 200ms}",
                    "maxInFlight: 64",
                ],
            ) + &subscription("dlq", "jobs-dlq", &[])),
        ),
    ]);
    let data = tempfile::tempdir().unwrap();
    let spec = SidecarSpec::new("embedded", res.path(), data.path());
    let api = spec.api();
    let callbacks = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let app = {
        let (api, callbacks) = (api.clone(), callbacks.clone());
        TestApp::start_without_history(move |r| {
            if r.path == "/dlq" {
                return Reply::status(200);
            }
            match Fault::of(r.id()).answer(r.attempt()) {
                Answer::Status(s) => Reply::status(s).with_body(&format!("status {s}")),
                Answer::RetryAfter(s) => Reply::status(s).with_header("retry-after", "1"),
                Answer::TooSlow => Reply::slow(200, PROCESSING_TIMEOUT * 2),
                Answer::Defer(None) => Reply::status(202),
                Answer::Defer(Some(cb)) => {
                    let (url, body) = match cb {
                        Callback::Ack => ("ack".to_owned(), String::new()),
                        Callback::Reject => ("reject".to_owned(), r#"{"reason":"nope"}"#.to_owned()),
                        Callback::Retry => ("retry?delay=1s".to_owned(), String::new()),
                    };
                    let url = format!("{api}/v1/deliveries/{}/{url}", r.delivery_id());
                    let (id, callbacks) = (r.id().to_owned(), callbacks.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let resp = http().post(url).header("content-type", "application/json").body(body).send().await;
                        let status = resp.map_or(0, |r| r.status().as_u16());
                        callbacks.lock().unwrap().push((id, status));
                    });
                    Reply::status(202)
                }
            }
        })
        .await
    };
    let mut sc = spec.app_port(app.port).start();
    sc.wait_configured();
    let c = http();
    let checker = Checker::new("app_faults");
    let mut ids = Vec::new();
    for rep in 0..reps {
        for f in FAULTS {
            let id = format!("{f:?}-{rep}");
            let status = produce(&c, &api, "jobs", &id, None, b"job".to_vec(), "local").await.unwrap();
            assert_eq!(status, 202, "producing {id}");
            checker.acked(&id, None);
            ids.push(id);
        }
    }
    // Every message reaches its end: all its attempts, and its dead letter.
    let want_attempts: BTreeMap<&str, u32> = ids
        .iter()
        .map(|id| {
            let f = Fault::of(id);
            (id.as_str(), f.expected().0 - f.abandoned())
        })
        .collect();
    let want_dead: HashSet<&str> = ids
        .iter()
        .filter(|id| matches!(Fault::of(id).expected().1, End::DeadLettered(_)))
        .map(String::as_str)
        .collect();
    let mut attempts: BTreeMap<String, u32> = BTreeMap::new();
    let mut dead: HashSet<String> = HashSet::new();
    app.wait_scan(Duration::from_secs(60), |new| {
        for r in new {
            if r.path == "/dlq" {
                dead.insert(r.header("ferry-origin-id").unwrap_or_default().to_owned());
            } else {
                *attempts.entry(r.id().to_owned()).or_insert(0) += 1;
            }
        }
        let short: Vec<String> = want_attempts
            .iter()
            .filter(|(id, n)| attempts.get(**id).copied().unwrap_or(0) < **n)
            .map(|(id, n)| format!("{id} ({} of {n})", attempts.get(*id).copied().unwrap_or(0)))
            .collect();
        let dead_missing: Vec<&&str> = want_dead.iter().filter(|id| !dead.contains(**id)).collect();
        if short.is_empty() && dead_missing.is_empty() {
            Ok(())
        } else {
            Err(format!("short of their attempts: {short:?}; dead letters missing: {dead_missing:?}"))
        }
    })
    .await;
    // Settled: the sidecar's counters agree (no event says so; poll).
    let admin = sc.spec.admin();
    poll(Duration::from_secs(30), || async {
        let acked = metric(&c, &admin, &deliveries("faulty", "acked")).await.unwrap_or(0.0) as usize;
        let dead = metric(&c, &admin, &deliveries("faulty", "dead_lettered")).await.unwrap_or(0.0) as usize;
        let dlq = metric(&c, &admin, &deliveries("dlq", "acked")).await.unwrap_or(0.0) as usize;
        if acked + dead == ids.len() && dlq == want_dead.len() {
            Ok(())
        } else {
            Err(format!("faulty: acked {acked}, dead-lettered {dead} of {}; dlq: acked {dlq}", ids.len()))
        }
    })
    .await;
    let received = app.received();
    let abandoned = app.abandoned();
    for cb in callbacks.lock().unwrap().iter() {
        assert_eq!(cb.1, 200, "callback for {} answered {}", cb.0, cb.1);
    }
    for id in &ids {
        let f = Fault::of(id);
        let (n, end) = f.expected();
        let mut tries: Vec<&Received> =
            received.iter().chain(&abandoned).filter(|r| r.path == "/faulty" && r.id() == id).collect();
        tries.sort_by_key(|r| r.at);
        let seen: Vec<u32> = tries.iter().map(|r| r.attempt()).collect();
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "{id}: attempts (maxDeliveries {MAX_DELIVERIES})");
        for w in tries.windows(2) {
            let gap = w[1].at - w[0].at;
            assert!(gap >= f.least_gap(), "{id}: attempt {} came {gap:?} after {}", w[1].attempt(), w[0].attempt());
        }
        let letters: Vec<&Received> =
            received.iter().filter(|r| r.path == "/dlq" && r.header("ferry-origin-id") == Some(id.as_str())).collect();
        match end {
            End::Acked => assert!(letters.is_empty(), "{id} was dead-lettered"),
            End::DeadLettered(status) => {
                assert_eq!(letters.len(), 1, "{id}: dead letters");
                let l = letters[0];
                checker.dead_lettered(id);
                assert_eq!(l.header("ferry-origin-subscription"), Some("faulty"), "{id}");
                assert_eq!(l.header("ferry-origin-topic"), Some("jobs"), "{id}");
                assert_eq!(l.header("ferry-attempts"), Some(n.to_string().as_str()), "{id}");
                assert_eq!(l.header("ferry-last-status"), Some(status), "{id}");
            }
        }
    }
    let mut report = checker.report(&received, accepted);
    report.note("requests_at_app", received.iter().filter(|r| r.path == "/faulty").count() + abandoned.len());
    report.note("timed_out_at_app", abandoned.len());
    report.note("callbacks", callbacks.lock().unwrap().len());
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    report.assert_no_loss_no_duplicates();
    assert_eq!(report.dead_lettered, want_dead.len());
    assert_eq!(report.delivered, ids.len() - want_dead.len());
}

// ---------------------------------------------------------------------------
// 4. Disk full under the sidecar's data dir.

/// Fills the filesystem of `dir` with one file; returns its path.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..100_000 {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "filling the disk: {e}");
            // tmpfs takes whole pages: fill the last partial one too.
            let small = [0u8; 512];
            while f.write_all(&small).is_ok() {}
            return path;
        }
    }
    panic!("the filesystem never filled up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_loses_nothing_acknowledged_and_recovers() {
    disk_full_run(false).await;
}

/// The same with the embedded broker, whose store shares the full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_embedded_broker_loses_nothing_acknowledged_and_recovers() {
    disk_full_run(true).await;
}

async fn disk_full_run(embedded: bool) {
    const PRODUCERS: usize = 2;
    let cycles = if long() { 10 } else { 1 };
    let started = Instant::now();
    let nats = if embedded { NatsServer::stopped() } else { blocking(NatsServer::start) };
    let broker = if embedded { "embedded".to_owned() } else { nats.url() };
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{}")),
        ("subs.yaml", &subscription("sink", "events", &["processingTimeout: 5s"])),
    ]);
    let mnt = tempfile::tempdir().unwrap();
    // Every message stays on this disk in the active segments (64 MiB each,
    // only deleted once they roll): the outbox's and, embedded, the
    // stream's too, beside the logs' preallocated reserves. The long run's
    // ~50-70k messages need room for that and still leave the filler space
    // to take, each cycle.
    let size = match (long(), embedded) {
        (false, _) => "16m",
        (true, false) => "64m",
        (true, true) => "192m",
    };
    let _mount = TmpfsMount::new(mnt.path(), size);
    let data = mnt.path().join("data");
    let app = TestApp::start_without_history(|_| Reply::status(200)).await;
    let mut sc = SidecarSpec::new(&broker, res.path(), &data).app_port(app.port).start();
    sc.wait_configured();
    let (api, admin) = (sc.spec.api(), sc.spec.admin());
    let c = http();
    let checker = Arc::new(Checker::new(if embedded { "disk_full_embedded" } else { "disk_full" }));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop_tx, stop) = watch::channel(false);
    let (acked_tx, acked) = watch::channel(0usize);
    let (full_tx, full) = watch::channel(0usize);
    let (acked_tx, full_tx) = (Arc::new(acked_tx), Arc::new(full_tx));
    let mut producers = JoinSet::new();
    for p in 0..PRODUCERS {
        let (c, api, checker, errors, stop, acked_tx, full_tx) =
            (c.clone(), api.clone(), checker.clone(), errors.clone(), stop.clone(), acked_tx.clone(), full_tx.clone());
        producers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut i = 0usize;
            while !*stop.borrow() {
                tick.tick().await;
                let id = format!("d{p}-{i:07}");
                i += 1;
                match produce(&c, &api, "events", &id, None, vec![b'd'; 512], "local").await {
                    Ok(202) => {
                        checker.acked(&id, None);
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(507) => full_tx.send_modify(|n| *n += 1),
                    Ok(status) => errors.lock().unwrap().push(format!("{id}: {status}")),
                    Err(e) => errors.lock().unwrap().push(format!("{id}: {e}")),
                }
            }
        });
    }
    let reach = |rx: &watch::Receiver<usize>, n: usize, what: &'static str, wait: Duration| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(wait, rx.wait_for(|v| *v >= n))
                .await
                .unwrap_or_else(|_| panic!("fewer than {n} {what} within {wait:?}"))
                .map(|_| ())
                .unwrap();
        }
    };
    let per_phase = if long() { 2_000 } else { 100 };
    let mut full_answers = 0;
    for _ in 0..cycles {
        let now = *acked.borrow();
        reach(&acked, now + per_phase, "acknowledged produces", Duration::from_secs(30)).await;
        let filler = blocking(|| fill(mnt.path()));
        let before = *full.borrow();
        // The first 507 comes once the outbox's preallocated reserve (4 MiB
        // ahead of its active segment) is used up: ~6 000 of these messages,
        // over 20 s at the rate a loaded 2-core machine reached.
        reach(&full, before + 20, "507 answers", Duration::from_secs(120)).await;
        std::fs::remove_file(&filler).unwrap();
        let freed_at = *acked.borrow();
        reach(&acked, freed_at + per_phase, "acknowledged produces after space returned", Duration::from_secs(30))
            .await;
        full_answers = *full.borrow();
    }
    stop_tx.send(true).unwrap();
    while let Some(r) = producers.join_next().await {
        r.expect("a producer failed");
    }
    let timeout = Duration::from_secs(if long() { 300 } else { 60 });
    wait_drained(&c, &admin, "events", timeout).await;
    wait_delivered(&app, &checker.acked_ids(), timeout, |_| true).await;
    if !embedded {
        wait_settled(&nats.url(), EVENTS_STREAM, "sink", timeout).await;
    }
    let errors = errors.lock().unwrap().clone();
    let mut report = checker.report(&app.received(), |_| true);
    report.note("cycles", cycles);
    report.note("answers_507", full_answers);
    report.note("other_errors", errors.len());
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    assert!(errors.is_empty(), "answers other than 202/507: {:?}", &errors[..errors.len().min(10)]);
    assert!(full_answers >= 20 * cycles);
    report.assert_no_loss_no_duplicates();
}

// ---------------------------------------------------------------------------
// 5. Two sidecars of one app in one group; one is killed mid-run.

/// Produces `w-{first}`..`w-{end}` through `api` in batches the broker
/// confirmed, and records them as acknowledged.
async fn produce_confirmed(c: &reqwest::Client, api: &str, range: std::ops::Range<usize>, checker: &Checker) {
    for first in range.clone().step_by(100) {
        let ids: Vec<String> = (first..(first + 100).min(range.end)).map(|i| format!("w-{i:06}")).collect();
        let entries: Vec<serde_json::Value> = ids.iter().map(|id| serde_json::json!({"id": id, "data": 1})).collect();
        let resp = c
            .post(format!("{api}/v1/topics/events/messages:batch?ack=broker"))
            .header("content-type", "application/json")
            .body(serde_json::Value::Array(entries).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        for id in &ids {
            checker.acked(id, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pods_leased_messages_go_to_the_other_pod_and_none_is_lost() {
    /// Pod a's app holds each message this long: it dies holding some.
    const APP_DELAY: Duration = Duration::from_millis(500);
    let total = if long() { 20_000 } else { 1_000 };
    let started = Instant::now();
    let nats = blocking(NatsServer::start);
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{}")),
        ("subs.yaml", &subscription("work", "events", &["processingTimeout: 2s", "maxInFlight: 16"])),
    ]);
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (arrived_tx, mut arrived) = watch::channel(0usize);
    let app_a = TestApp::start_without_history(move |_| {
        arrived_tx.send_modify(|n| *n += 1);
        Reply::slow(200, APP_DELAY)
    })
    .await;
    let app_b = TestApp::start_without_history(|_| Reply::slow(200, Duration::from_millis(20))).await;
    let mut sc_a = SidecarSpec::new(&nats.url(), res.path(), data_a.path()).app_port(app_a.port).pod("shop-a").start();
    sc_a.wait_configured();
    let mut sc_b = SidecarSpec::new(&nats.url(), res.path(), data_b.path()).app_port(app_b.port).pod("shop-b").start();
    sc_b.wait_configured();
    let c = http();
    let checker = Checker::new("pod_killed").crash_window(APP_DELAY + ferry_e2e::check::DEFAULT_CRASH_WINDOW);
    // Produced through the pod that survives. Pod a is killed as soon as its
    // app holds a few messages, then the rest is produced.
    let api_b = sc_b.spec.api();
    produce_confirmed(&c, &api_b, 0..200, &checker).await;
    tokio::time::timeout(Duration::from_secs(30), arrived.wait_for(|n| *n >= 4))
        .await
        .expect("pod a never pushed 4 messages to its app")
        .unwrap();
    let held = *arrived.borrow() - app_a.count();
    sc_a.kill9();
    checker.crash();
    produce_confirmed(&c, &api_b, 200..total, &checker).await;
    let ids = checker.acked_ids();
    let mut missing: HashSet<String> = ids.iter().cloned().collect();
    for r in app_a.received() {
        missing.remove(r.id());
    }
    wait_delivered(&app_b, &missing.into_iter().collect::<Vec<_>>(), Duration::from_secs(120), |_| true).await;
    wait_settled(&nats.url(), EVENTS_STREAM, "work", Duration::from_secs(60)).await;
    let (a, b) = (app_a.received(), app_b.received());
    // Leased by a when it died (at its app, answered or not), then delivered
    // to b as a redelivery.
    let abandoned = app_a.abandoned();
    let at_a: HashSet<&str> = a.iter().chain(&abandoned).map(Received::id).collect();
    let handed_over: Vec<&Received> = b.iter().filter(|r| at_a.contains(r.id())).collect();
    let all: Vec<Received> = a.iter().chain(&b).cloned().collect();
    let mut report = checker.report(&all, |_| true);
    report.note("held_by_pod_a_at_kill", held);
    report.note("at_pod_a", a.len() + abandoned.len());
    report.note("at_pod_b", b.len());
    report.note("handed_over", handed_over.len());
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    report.assert_no_loss_no_duplicates();
    assert!(held > 0, "pod a died holding nothing: the scenario proved nothing");
    assert!(handed_over.len() >= held, "pod a held {held} messages; {} went to pod b", handed_over.len());
    assert!(handed_over.iter().all(|r| r.attempt() >= 2), "a handed-over message is a redelivery");
}

// ---------------------------------------------------------------------------
// 6. Hostile input at the API.

/// One raw HTTP/1.1 request.
fn request(method: &str, path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        r.extend_from_slice(name.as_bytes());
        r.extend_from_slice(b": ");
        r.extend_from_slice(value);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    r.extend_from_slice(body);
    r
}

/// A hostile request and the answers allowed for it.
struct Case {
    what: String,
    request: Vec<u8>,
    /// Allowed statuses.
    allowed: &'static [u16],
    /// The server may close without an answer (header limits, framing).
    may_close: bool,
}

const BAD_REQUEST: &[u16] = &[400];
const NOT_FOUND: &[u16] = &[404];
const BAD_OR_NOT_FOUND: &[u16] = &[400, 404];
const TOO_LARGE: &[u16] = &[413];
const HEADER_LIMITS: &[u16] = &[400, 413, 431];

/// The `n`-th hostile request (deterministic in `rng`).
fn hostile(rng: &mut Rng) -> Case {
    let case = |what: String, request: Vec<u8>, allowed: &'static [u16], may_close: bool| Case {
        what,
        request,
        allowed,
        may_close,
    };
    let produce = "/v1/topics/orders/messages";
    let batch = "/v1/topics/orders/messages:batch";
    match rng.below(14) {
        0 => {
            let (ct, body): (&str, Vec<u8>) = match rng.below(4) {
                0 => (
                    "application/json",
                    rng.pick(&[
                        &b"["[..],
                        b"{",
                        b"[{\"id\":",
                        b"null",
                        b"\"str\"",
                        b"[1,2]",
                        b"[{\"id\":5}]",
                        b"[{\"id\":\"a b\"}]",
                        b"[{\"id\":\"x\",\"data\":",
                        b"{\"id\":\"a\"}",
                        b"[]",
                    ])
                    .to_vec(),
                ),
                1 => (
                    "application/x-ndjson",
                    rng.pick(&[
                        &b"{"[..],
                        b"{\"id\":\"a b\"}",
                        b"{\"id\":1}",
                        b"[1]",
                        b"\xff\xfe",
                        b"{\"id\":\"ok\",\"colour\":1}",
                        b"{\"id\":\"ok\"}\n{",
                    ])
                    .to_vec(),
                ),
                2 => (
                    "application/cloudevents-batch+json",
                    rng.pick(&[&b"[{}]"[..], b"[{\"specversion\":\"1.0\"}]", b"{}", b"[null]"]).to_vec(),
                ),
                _ => ("application/json", {
                    let n = 1 + rng.below(300) as usize;
                    let mut b = vec![b'['];
                    b.extend(rng.bytes(n).into_iter().map(|x| if x == b']' { b'}' } else { x }));
                    b
                }),
            };
            case(
                format!("bad batch ({ct}): {}", preview(&body)),
                request("POST", batch, &[("content-type", ct.as_bytes())], &body),
                BAD_REQUEST,
                false,
            )
        }
        1 => {
            let body = *rng.pick::<&[u8]>(&[
                &b"{}"[..],
                b"[]",
                b"{nope",
                b"{\"specversion\":\"1.0\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"/s\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"x\",\"type\":\"t\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"\",\"source\":\"/s\",\"type\":\"t\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"a b\",\"source\":\"/s\",\"type\":\"t\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"/s\",\"type\":\"t\",\"data_base64\":\"!!\"}",
                b"{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"/s\",\"type\":\"t\",\"data_base64\":5}",
                b"\xff\xfe\xfd",
            ]);
            case(
                format!("bad structured CloudEvent: {}", preview(body)),
                request("POST", produce, &[("content-type", b"application/cloudevents+json")], body),
                BAD_REQUEST,
                false,
            )
        }
        2 => {
            let all: [(&str, &[u8]); 4] =
                [("ce-specversion", b"1.0"), ("ce-id", b"ce-1"), ("ce-source", b"/s"), ("ce-type", b"t")];
            let mut headers: Vec<(&str, &[u8])> = all.to_vec();
            let what = match rng.below(4) {
                0 => {
                    let drop = 1 + rng.below(3) as usize;
                    headers.remove(drop);
                    format!("binary CloudEvent without {}", all[drop].0)
                }
                1 => {
                    headers[2].1 = b"\xff\xfe";
                    "binary CloudEvent with a non-UTF-8 source".to_owned()
                }
                2 => {
                    headers[1].1 = b"a b";
                    "binary CloudEvent with a spaced id".to_owned()
                }
                _ => {
                    headers[1].1 = b"";
                    "binary CloudEvent with an empty id".to_owned()
                }
            };
            case(what, request("POST", produce, &headers, b"x"), BAD_REQUEST, false)
        }
        3 => {
            let long = "i".repeat(257);
            let (what, name, value): (&str, &str, Vec<u8>) = match rng.below(6) {
                0 => ("invalid UTF-8 id", "ferry-id", vec![0xff, 0xfe, b'a']),
                1 => ("non-ASCII id", "ferry-id", "é-ü".as_bytes().to_vec()),
                2 => ("spaced id", "ferry-id", b"a b".to_vec()),
                3 => ("id too long", "ferry-id", long.into_bytes()),
                4 => ("invalid UTF-8 key", "ferry-key", vec![b'k', 0xc3, 0x28]),
                _ => ("tab in id", "ferry-id", b"a\tb".to_vec()),
            };
            case(what.to_owned(), request("POST", produce, &[(name, &value)], b"x"), BAD_REQUEST, false)
        }
        4 => {
            let (method, path, allowed): (&str, &str, &'static [u16]) = *rng.pick(&[
                ("POST", "/v1/topics/..%2F..%2Fetc/messages", NOT_FOUND),
                ("POST", "/v1/topics/%2e%2e/messages", NOT_FOUND),
                ("POST", "/v1/topics/../messages", NOT_FOUND),
                ("POST", "/v1/topics/orders%2F..%2F..%2Fx/messages", NOT_FOUND),
                ("POST", "/v1/topics/a%00b/messages", NOT_FOUND),
                ("POST", "/v1/topics/%FF%FE/messages", BAD_OR_NOT_FOUND),
                ("POST", "/v1/topics/..%2F..%2Fetc/messages:batch", NOT_FOUND),
                ("POST", "/../../etc/passwd", NOT_FOUND),
                ("GET", "/v1/messages/..%2F..%2Fetc%2Fpasswd", NOT_FOUND),
                ("GET", "/v1/messages/%FF", BAD_OR_NOT_FOUND),
                ("GET", "/v1/subscriptions/..%2F..%2Fx/messages?max=1&wait=1ms", NOT_FOUND),
                ("POST", "/v1/deliveries/..%2F..%2Fx/ack", NOT_FOUND),
            ]);
            case(format!("traversal {method} {path}"), request(method, path, &[], b"x"), allowed, false)
        }
        5 => match rng.below(3) {
            0 => {
                let n = 4097 + rng.below(4000) as usize;
                let body = rng.bytes(n);
                case(format!("{} byte body", body.len()), request("POST", produce, &[], &body), TOO_LARGE, false)
            }
            1 => {
                let head = format!(
                    "POST {produce} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 104857600\r\n\r\nxx"
                );
                case("declared 100 MiB body".into(), head.into_bytes(), TOO_LARGE, true)
            }
            _ => {
                let head = format!(
                    "POST {batch} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n\
                     content-length: 17825792\r\n\r\n["
                );
                case("declared 17 MiB batch".into(), head.into_bytes(), TOO_LARGE, true)
            }
        },
        6 => {
            let size = *rng.pick(&[8 << 10, 64 << 10, 300 << 10, 1 << 20]);
            let value = vec![b'h'; size];
            case(
                format!("{size} byte ferry-id header"),
                request("POST", produce, &[("ferry-id", &value)], b"x"),
                HEADER_LIMITS,
                true,
            )
        }
        7 => {
            let n = 101 + rng.below(400) as usize;
            let names: Vec<String> = (0..n).map(|i| format!("x-h{i}")).collect();
            let mut headers: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"1"[..])).collect();
            headers.push(("ferry-id", b"a b"));
            case(format!("{n} headers"), request("POST", produce, &headers, b"x"), HEADER_LIMITS, true)
        }
        8 => {
            let (method, path) = *rng.pick(&[
                ("PUT", produce),
                ("DELETE", produce),
                ("PATCH", produce),
                ("GET", produce),
                ("GET", batch),
                ("DELETE", "/v1/messages/x"),
                ("GET", "/v1/deliveries/x/ack"),
            ]);
            case(format!("{method} {path}"), request(method, path, &[], b"x"), &[405], false)
        }
        9 => {
            let q = *rng.pick(&["?ack=maybe", "?ack=local&ack=broker", "?ack=%ZZ", "?ack=", "?ack=BROKER"]);
            case(format!("query {q}"), request("POST", &format!("{produce}{q}"), &[], b"x"), BAD_REQUEST, false)
        }
        10 => {
            let ct = *rng.pick::<&[u8]>(&[&b"text/csv"[..], b"application/xml", b"image/png", b"multipart/form-data"]);
            case(
                format!("batch as {}", String::from_utf8_lossy(ct)),
                request("POST", batch, &[("content-type", ct)], b"a,b"),
                &[415],
                false,
            )
        }
        11 => {
            let id = format!("{:016x}", rng.next());
            let (path, allowed): (String, &'static [u16]) = match rng.below(5) {
                0 => (format!("/v1/deliveries/{id}/ack"), NOT_FOUND),
                1 => (format!("/v1/deliveries/{id}/reject"), NOT_FOUND),
                2 => (format!("/v1/deliveries/{id}/retry?delay=abc"), BAD_OR_NOT_FOUND),
                3 => (format!("/v1/deliveries/{id}/retry?delay=1s"), NOT_FOUND),
                _ => (format!("/v1/deliveries/{id}/nope"), NOT_FOUND),
            };
            case(format!("callback {path}"), request("POST", &path, &[], b""), allowed, false)
        }
        12 => {
            let (q, allowed): (&str, &'static [u16]) = *rng.pick(&[
                ("/v1/subscriptions/pulled/messages?max=0", BAD_REQUEST),
                ("/v1/subscriptions/pulled/messages?max=abc", BAD_REQUEST),
                ("/v1/subscriptions/pulled/messages?max=1001", BAD_REQUEST),
                ("/v1/subscriptions/pulled/messages?wait=forever", BAD_REQUEST),
                ("/v1/subscriptions/nope/messages", NOT_FOUND),
            ]);
            case(format!("pull {q}"), request("GET", q, &[], b""), allowed, false)
        }
        _ => {
            let raw = *rng.pick::<&[u8]>(&[
                &b"GARBAGE\r\n\r\n"[..],
                b"\x00\x01\x02\x03\r\n\r\n",
                b"POST /v1/topics/orders/messages HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\nx",
                b"POST /v1/topics/orders/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
                b"POST /v1/topics/orders/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked, x\r\n\r\n1\r\nx\r\n0\r\n\r\n",
                b"POST /v1/topics/orders/messages HTTP/1.1\r\nho st: x\r\n\r\n",
                b"POST /v1/topics/or ders/messages HTTP/1.1\r\nhost: x\r\n\r\n",
            ]);
            case(format!("malformed HTTP: {}", preview(raw)), raw.to_vec(), BAD_REQUEST, true)
        }
    }
}

/// A connection sending a request's head one byte at a time, slowly.
async fn slowloris(port: u16, stop: watch::Receiver<bool>) -> usize {
    use tokio::io::AsyncWriteExt;
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return 0 };
    let head = b"POST /v1/topics/orders/messages HTTP/1.1\r\nhost: x\r\nx-slow: ";
    if s.write_all(head).await.is_err() {
        return 0;
    }
    let mut sent = 0;
    while !*stop.borrow() {
        if s.write_all(b"a").await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_defined_4xx_store_nothing_and_the_sidecar_stays_up() {
    let count = if long() { 20_000 } else { 400 };
    let started = Instant::now();
    let res = manifests(&[
        ("topics.yaml", &(topic("orders", "{maxMessageSize: 4096}") + &topic("other", "{}"))),
        ("subs.yaml", &subscription("pulled", "orders", &["mode: Pull"])),
    ]);
    let data = tempfile::tempdir().unwrap();
    let mut sc = SidecarSpec::new("embedded", res.path(), data.path()).start();
    sc.wait_configured();
    let (port, admin) = (sc.spec.api_port, sc.spec.admin());
    let c = http();
    let before: BTreeMap<String, u64> = {
        let r = readyz(&c, &admin).await;
        r["outbox"].as_object().unwrap().iter().map(|(t, v)| (t.clone(), v["nextOffset"].as_u64().unwrap())).collect()
    };
    assert_eq!(before.keys().collect::<Vec<_>>(), ["orders", "other"]);

    // Slow connections held open the whole time.
    let (stop_tx, stop) = watch::channel(false);
    let mut slow = JoinSet::new();
    for _ in 0..16 {
        slow.spawn(slowloris(port, stop.clone()));
    }

    let mut rng = Rng::new(0x00fe_1217);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut not_json: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..count {
        let case = hostile(&mut rng);
        let answer = raw(port, &case.request, Duration::from_secs(10)).await;
        let ok = match &answer {
            RawAnswer::Closed => case.may_close,
            RawAnswer::Status(s, _) => case.allowed.contains(s),
        };
        let label = match &answer {
            RawAnswer::Closed => "closed".to_owned(),
            RawAnswer::Status(s, _) => s.to_string(),
        };
        *statuses.entry(label).or_insert(0) += 1;
        if let RawAnswer::Status(s, body) = &answer {
            let json = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .is_some_and(|v| v["error"]["code"].is_string() && v["error"]["message"].is_string());
            if !json {
                let kind: String = case
                    .what
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .map(|ch| if ch.is_ascii_digit() { 'N' } else { ch })
                    .collect();
                *not_json.entry(format!("{s} {kind}")).or_insert(0) += 1;
            }
        }
        if !ok {
            failures.push(format!("#{i} {}: got {answer:?}, allowed {:?}", case.what, case.allowed));
        }
    }
    // The sidecar is up and serves while the slow connections hang on.
    let health = c.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let after: BTreeMap<String, u64> = {
        let r = readyz(&c, &admin).await;
        r["outbox"].as_object().unwrap().iter().map(|(t, v)| (t.clone(), v["nextOffset"].as_u64().unwrap())).collect()
    };
    let status = produce(&c, &sc.spec.api(), "orders", "valid-after-fuzz", None, b"ok".to_vec(), "local").await;
    stop_tx.send(true).unwrap();
    let mut slow_bytes = 0;
    while let Some(sent) = slow.join_next().await {
        slow_bytes += sent.unwrap();
    }
    // Nothing was written outside the data dir's own layout.
    let mut names = Vec::new();
    let mut dirs = vec![data.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            names.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    let outbox_topics: Vec<String> = std::fs::read_dir(data.path().join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();

    println!(
        "scenario=bad_input requests={count} failures={} statuses={statuses:?} non_json_errors={not_json:?} \
         slowloris_connections=16 slowloris_bytes={slow_bytes} total_s={:.1}",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} answers outside the contract:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(after, before, "a hostile request stored something");
    assert_eq!(status.unwrap(), 202, "a valid produce after the fuzz run");
    assert!(
        outbox_topics.iter().all(|t| t == "orders" || t == "other"),
        "the outbox has directories beyond its topics: {outbox_topics:?}"
    );
    assert!(!names.iter().any(|n| n.contains("etc") || n.contains("passwd") || n.contains("..")), "{names:?}");
    assert!(sc.process.output().iter().all(|l| !l.contains("panicked")), "the sidecar panicked");
}

/// Every error answer of the API is the JSON error shape (DESIGN.md §3.1),
/// also when the request's query string or path cannot be decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_rejections_are_answered_with_the_json_error_shape() {
    let res = manifests(&[
        ("topics.yaml", &topic("orders", "{}")),
        ("subs.yaml", &subscription("pulled", "orders", &["mode: Pull"])),
    ]);
    let data = tempfile::tempdir().unwrap();
    let sc = SidecarSpec::new("embedded", res.path(), data.path()).start();
    let port = sc.spec.api_port;
    let mut wrong = Vec::new();
    for (method, path) in [
        ("POST", "/v1/topics/orders/messages?ack=local&ack=broker"),
        ("POST", "/v1/topics/orders/messages:batch?ack=local&ack=broker"),
        ("POST", "/v1/topics/%FF%FE/messages"),
        ("GET", "/v1/messages/%FF"),
        ("POST", "/v1/deliveries/x/retry?delay=1s&delay=2s"),
        ("GET", "/v1/subscriptions/pulled/messages?max=1&max=2"),
    ] {
        match raw(port, &request(method, path, &[], b""), Duration::from_secs(10)).await {
            RawAnswer::Status(s, body) if (400..500).contains(&s) => {
                let json = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .is_some_and(|v| v["error"]["code"].is_string() && v["error"]["message"].is_string());
                if !json {
                    wrong.push(format!("{method} {path}: {s} {body:?}"));
                }
            }
            other => wrong.push(format!("{method} {path}: {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "answers without the JSON error shape:\n{}", wrong.join("\n"));
}

/// A structured CloudEvent whose `id` (or `source`, `type`) is not a JSON
/// string is malformed (CloudEvents JSON format: these attributes are strings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_cloudevent_with_a_non_string_id_is_refused() {
    let res = manifests(&[("topics.yaml", &topic("orders", "{}"))]);
    let data = tempfile::tempdir().unwrap();
    let sc = SidecarSpec::new("embedded", res.path(), data.path()).start();
    let c = http();
    for body in [
        r#"{"specversion":"1.0","id":5,"source":"/s","type":"t"}"#,
        r#"{"specversion":"1.0","id":"x","source":true,"type":"t"}"#,
        r#"{"specversion":"1.0","id":"x","source":"/s","type":7}"#,
    ] {
        let resp = c
            .post(sc.url("/v1/topics/orders/messages"))
            .header("content-type", "application/cloudevents+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{body}");
    }
    assert_eq!(outbox(&c, &sc.spec.admin(), "orders").await.0, 0, "nothing stored");
}

/// A connection that sends its request head slowly must be cut off after a
/// header-read timeout, else a few hundred such connections hold the
/// sidecar's file descriptors and memory for ever (slowloris).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_connection_is_closed_by_a_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: Duration = Duration::from_secs(45);
    let res = manifests(&[("topics.yaml", &topic("orders", "{}"))]);
    let data = tempfile::tempdir().unwrap();
    let sc = SidecarSpec::new("embedded", res.path(), data.path()).start();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sc.spec.api_port)).await.unwrap();
    s.write_all(b"POST /v1/topics/orders/messages HTTP/1.1\r\nhost: x\r\nx-slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        if started.elapsed() > LIMIT {
            break false;
        }
        // One header byte a second; a closed connection fails the write or
        // reads EOF (or an error answer).
        if s.write_all(b"a").await.is_err() {
            break true;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => break true,
            Err(_) => {}
        }
    };
    assert!(closed, "a connection sending one header byte a second was still open after {LIMIT:?}");
    println!("slowloris connection closed after {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 7. nats-server restarted with its JetStream store lost.

/// What came back after the broker lost its store.
struct StoreLost {
    report: Report,
    /// How long until the stream existed again (without a sidecar restart).
    recreated_in: Option<Duration>,
    /// Whether the stream existed after the sidecar was restarted.
    recreated_after_restart: Option<bool>,
    /// Messages produced after the loss, and how many reached the app.
    after: (usize, usize),
}

/// Messages forwarded and delivered (`a-*`), then the broker stopped, more
/// produced while it is down (`b-*`, pending in the outbox), its JetStream
/// store wiped and the server started again. Waits up to `self_heal` for
/// the running sidecar to recreate its stream; then, with `restart`,
/// restarts the sidecar (SIGTERM) if it did not; then produces `c-*` and
/// measures what reaches the app.
async fn store_lost_run(self_heal: Duration, restart: bool) -> StoreLost {
    let (before, while_down, after) = if long() { (5_000, 5_000, 1_000) } else { (200, 200, 50) };
    let started = Instant::now();
    let mut nats = blocking(NatsServer::start);
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{}")),
        ("subs.yaml", &subscription("work", "events", &["processingTimeout: 2s"])),
    ]);
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::start_without_history(|_| Reply::status(200)).await;
    let mut sc = SidecarSpec::new(&nats.url(), res.path(), data.path())
        .app_port(app.port)
        .arg("--shutdown-grace")
        .arg("1s")
        .start();
    sc.wait_configured();
    let (api, admin) = (sc.spec.api(), sc.spec.admin());
    let c = http();
    let checker = Checker::new("broker_store_lost");
    // Phase 1: forwarded and delivered.
    for i in 0..before {
        let id = format!("a-{i:06}");
        let ack = if i + 1 == before { "broker" } else { "local" };
        let s = produce(&c, &api, "events", &id, None, b"before".to_vec(), ack).await.unwrap();
        assert!(s == 202 || s == 201, "{id}: {s}");
        checker.acked(&id, None);
    }
    wait_delivered(&app, &checker.acked_ids(), Duration::from_secs(60), |_| true).await;
    wait_settled(&nats.url(), EVENTS_STREAM, "work", Duration::from_secs(60)).await;
    let retained_bytes = readyz(&c, &admin).await["outbox"]["events"]["bytes"].as_u64().unwrap_or(0);
    // Phase 2: the broker is down; more is produced (pending in the outbox).
    blocking(|| nats.stop_gracefully());
    for i in 0..while_down {
        let id = format!("b-{i:06}");
        let s = produce(&c, &api, "events", &id, None, b"while down".to_vec(), "local").await.unwrap();
        assert_eq!(s, 202, "{id}");
        checker.acked(&id, None);
    }
    let (next_at_loss, pending_at_loss) = outbox(&c, &admin, "events").await;
    // The loss: the server comes back with an empty store.
    blocking(|| {
        nats.wipe_store();
        nats.start_again();
    });
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream_exists = || async { js.get_stream(EVENTS_STREAM).await.is_ok() };
    let t = Instant::now();
    let recreated_in = loop {
        if stream_exists().await {
            break Some(t.elapsed());
        }
        if t.elapsed() > self_heal {
            break None;
        }
        // No event says "the stream exists"; ask the server.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut recreated_after_restart = None;
    if recreated_in.is_none() && restart {
        sc.process.signal(15);
        let p = &mut sc.process;
        blocking(|| p.wait_exit(START_TIMEOUT));
        sc.restart();
        sc.wait_configured();
        recreated_after_restart = Some(stream_exists().await);
    }
    // Phase 3: produced after the loss.
    let flowing = recreated_in.is_some() || recreated_after_restart == Some(true);
    let c_ids: Vec<String> = (0..after).map(|i| format!("c-{i:06}")).collect();
    if flowing {
        for id in &c_ids {
            let s = produce(&c, &api, "events", id, None, b"after".to_vec(), "broker").await.unwrap();
            assert_eq!(s, 201, "{id}");
            checker.acked(id, None);
        }
        wait_delivered(&app, &c_ids, Duration::from_secs(60), |_| true).await;
    }
    let (_, pending_end) = outbox(&c, &admin, "events").await;
    let received = app.received();
    let got = |prefix: &str| {
        received.iter().filter(|r| r.id().starts_with(prefix)).map(Received::id).collect::<HashSet<_>>().len()
    };
    let (got_a, got_b, got_c) = (got("a-"), got("b-"), got("c-"));
    let stream_messages = match js.get_stream(EVENTS_STREAM).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    };
    let mut report = checker.report(&received, |_| true);
    report.note("forwarded_before_loss", before);
    report.note("outbox_bytes_retained_after_forwarding", retained_bytes);
    report.note("pending_at_loss", pending_at_loss);
    report.note("outbox_next_offset_at_loss", next_at_loss);
    report.note("recreated_by_running_sidecar_ms", recreated_in.map_or("never".into(), |d| d.as_millis().to_string()));
    report.note("recreated_after_sidecar_restart", recreated_after_restart.map_or("-".into(), |r| r.to_string()));
    report.note("pending_resent_delivered", got_b);
    report.note("produced_after_loss_delivered", format!("{got_c}/{}", if flowing { after } else { 0 }));
    report.note("outbox_pending_at_end", pending_end);
    report.note("stream_messages_at_end", stream_messages);
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    println!(
        "  measurement: the {before} messages forwarded before the loss are gone from the broker and not re-sent \
         (no replay was asked for, although {retained_bytes} bytes of them are still in the outbox: see \
         the replay scenario); of the {pending_at_loss} pending at the loss {got_b} reached the app"
    );
    assert_eq!(got_a, before, "everything produced before the loss was delivered before it");
    StoreLost { report, recreated_in, recreated_after_restart, after: (if flowing { after } else { 0 }, got_c) }
}

/// The measurement: what the outbox re-sends after the broker lost its
/// store, with a sidecar restart if the running one does not recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_lost_its_store_a_sidecar_restart_recreates_the_stream_and_messages_flow_again() {
    let run = store_lost_run(Duration::from_secs(if long() { 20 } else { 3 }), true).await;
    assert!(
        run.recreated_in.is_some() || run.recreated_after_restart == Some(true),
        "{EVENTS_STREAM} was not recreated, even by a restarted sidecar"
    );
    assert_eq!(run.after.1, run.after.0, "messages produced after the loss flow again");
    assert!(run.after.0 > 0);
    assert!(run.report.duplicates.is_empty(), "{}", run.report.line());
}

/// The running sidecar notices that its stream is gone and recreates it
/// (and its consumers), so the outbox drains and new messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_lost_its_store_the_running_sidecar_recreates_its_stream_and_messages_flow_again() {
    let run = store_lost_run(Duration::from_secs(20), false).await;
    assert!(run.recreated_in.is_some(), "the running sidecar never recreated {EVENTS_STREAM}");
    assert_eq!(run.after.1, run.after.0, "messages produced after the loss flow again");
    assert_eq!(run.report.lost.len(), 0, "the pending messages were re-sent after the loss");
}

/// Messages the broker confirmed but had not delivered yet when it lost
/// its store (its app was answering 503): with a replay window, a replay
/// sends them again from the outbox, and the app accepts each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_the_broker_lost_its_store_delivers_what_it_had_confirmed_but_not_delivered() {
    let n = if long() { 5_000 } else { 200 };
    let started = Instant::now();
    let mut nats = blocking(NatsServer::start);
    let res = manifests(&[
        ("topics.yaml", &topic("events", "{}")),
        ("subs.yaml", &subscription("work", "events", &["processingTimeout: 2s", "maxDeliveries: 1000"])),
    ]);
    let data = tempfile::tempdir().unwrap();
    // The app is down (503) until the replay; the deliveries it accepted
    // are the ones answered 200, by delivery id.
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted_deliveries = Arc::new(Mutex::new(HashSet::<String>::new()));
    let app = {
        let (up, ok) = (up.clone(), accepted_deliveries.clone());
        TestApp::start_without_history(move |r| {
            if !up.load(Ordering::Acquire) {
                return Reply::status(503);
            }
            ok.lock().unwrap().insert(r.header("ferry-delivery-id").unwrap_or_default().to_owned());
            Reply::status(200)
        })
        .await
    };
    let mut sc = SidecarSpec::new(&nats.url(), res.path(), data.path())
        .app_port(app.port)
        .arg("--outbox-retention")
        .arg("10m")
        .start();
    sc.wait_configured();
    let api = sc.spec.api();
    let c = http();
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now() - Duration::from_secs(1)).to_string();
    let checker = Checker::new("replay_after_store_lost");
    for i in 0..n {
        let id = format!("r-{i:06}");
        // The last with ack=broker: the broker confirmed them all, in order.
        let ack = if i + 1 == n { "broker" } else { "local" };
        let s = produce(&c, &api, "events", &id, None, b"confirmed".to_vec(), ack).await.unwrap();
        assert!(s == 202 || s == 201, "{id}: {s}");
        checker.acked(&id, None);
    }
    assert!(accepted_deliveries.lock().unwrap().is_empty(), "the app accepted nothing yet");
    // The loss: the server comes back with an empty store.
    blocking(|| {
        nats.stop_gracefully();
        nats.wipe_store();
        nats.start_again();
    });
    let resp = c.post(format!("{api}/v1/topics/events/outbox:replay?since={since}")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((body["messages"].as_u64(), body["complete"].as_bool()), (Some(n as u64), Some(true)), "{body}");
    up.store(true, Ordering::Release);
    let ok = accepted_deliveries.clone();
    let success = move |r: &Received| ok.lock().unwrap().contains(r.header("ferry-delivery-id").unwrap_or_default());
    wait_delivered(&app, &checker.acked_ids(), Duration::from_secs(if long() { 180 } else { 60 }), &success).await;
    let mut report = checker.report(&app.received(), &success);
    report.note("confirmed_then_lost", n);
    report.note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    report.print();
    assert!(report.lost.is_empty() && report.duplicates.is_empty(), "{}", report.line());
}
