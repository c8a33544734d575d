//! Leader election against a mock API server that keeps one Lease: the
//! calls the operator makes, and who ends up holding the Lease.

use std::sync::{Arc, Mutex};

use ferry_operator::leader;
use http::{Method, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

mod common;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases/ferry-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases";

/// What the mock server saw and holds.
#[derive(Default)]
struct Server {
    lease: Option<Value>,
    calls: Vec<(Method, String, Value)>,
    /// Answer every call with 500 (an API server the replica cannot use).
    failing: bool,
    /// Answer no call at all (an API server that hangs).
    hanging: bool,
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn lease(holder: &str, renewed: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "ferry-operator", "namespace": "ferry-system", "resourceVersion": "1"},
        "spec": {"holderIdentity": holder, "acquireTime": renewed, "renewTime": renewed,
                 "leaseDurationSeconds": 15, "leaseTransitions": 4}
    })
}

/// Merges a patch into the stored Lease (a null removes the field).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Answers every call to the Lease like an API server would.
fn serve(mut handle: common::Handle, server: Arc<Mutex<Server>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Calls left unanswered while the server hangs (dropping one would
        // answer it with an error).
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            if server.lock().unwrap().hanging {
                held.push(send);
                continue;
            }
            common::rbac::assert_allowed(req.method(), req.uri());
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            let mut s = server.lock().unwrap();
            s.calls.push((method.clone(), path.clone(), body.clone()));
            let failure = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500});
            let (status, answer) = match (method, path.as_str(), s.lease.clone()) {
                _ if s.failing => (StatusCode::INTERNAL_SERVER_ERROR, failure),
                (Method::GET, LEASE, Some(l)) => (StatusCode::OK, l),
                (Method::GET, LEASE, None) | (Method::PATCH, LEASE, None) => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                ),
                (Method::POST, LEASES, None) => {
                    let mut created = body.clone();
                    merge(&mut created, &json!({"metadata": {"namespace": "ferry-system", "resourceVersion": "1"}}));
                    s.lease = Some(created.clone());
                    (StatusCode::CREATED, created)
                }
                (Method::PATCH, LEASE, Some(mut l)) => {
                    merge(&mut l, &json!({"spec": body["spec"]}));
                    s.lease = Some(l.clone());
                    (StatusCode::OK, l)
                }
                (m, p, _) => panic!("unexpected call {m} {p}"),
            };
            send.send_response(
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
            );
        }
    })
}

/// A replica named `identity` joining the election, with `server` as its
/// API server.
async fn join_as(server: &Arc<Mutex<Server>>, identity: &str) -> leader::Leadership {
    let (client, handle) = common::mock_client();
    serve(handle, server.clone());
    leader::join(client, "ferry-system", "ferry-operator", identity).await.unwrap()
}

fn holder(server: &Mutex<Server>) -> Option<String> {
    server.lock().unwrap().lease.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut l = join_as(&server, "operator-a").await;
    l.acquired().await.unwrap();
    assert!(l.is_leading());
    assert_eq!(holder(&server).as_deref(), Some("operator-a"));
    let calls = server.lock().unwrap().calls.clone();
    assert!(calls.iter().any(|(m, p, _)| m == Method::POST && p == LEASES), "{calls:?}");
    assert!(
        calls.iter().any(|(m, _, b)| m == Method::PATCH && b["spec"]["holderIdentity"] == "operator-a"),
        "no patch taking the lease: {calls:?}"
    );
    // Releasing hands the Lease back: no holder left.
    l.release().await;
    assert_eq!(holder(&server), None);
}

#[tokio::test]
async fn an_expired_lease_of_another_replica_is_taken_over() {
    let server = Arc::new(Mutex::new(Server {
        lease: Some(lease("operator-old", "2020-01-01T00:00:00.000000Z")),
        ..Default::default()
    }));
    let mut l = join_as(&server, "operator-b").await;
    l.acquired().await.unwrap();
    assert_eq!(holder(&server).as_deref(), Some("operator-b"));
    let s = server.lock().unwrap();
    assert!(s.calls.iter().all(|(m, _, _)| m != Method::POST), "an existing Lease is not created again");
    assert_eq!(s.lease.as_ref().unwrap()["spec"]["leaseTransitions"], 5, "the takeover is counted");
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_left_alone() {
    let server = Arc::new(Mutex::new(Server { lease: Some(lease("operator-a", &now())), ..Default::default() }));
    let l = join_as(&server, "operator-b").await;
    // Wait until the candidate has read the Lease twice (its first look and
    // the watch loop's, after which it would try to lock).
    loop {
        let gets = server.lock().unwrap().calls.iter().filter(|(m, _, _)| m == Method::GET).count();
        if gets >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    // A write would follow the read at once; absence can only be checked
    // over a while (as `common::expect_no_more` does).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!l.is_leading());
    assert_eq!(holder(&server).as_deref(), Some("operator-a"));
    let calls = server.lock().unwrap().calls.clone();
    assert!(calls.iter().all(|(m, _, _)| m == Method::GET), "a candidate only reads a live Lease: {calls:?}");
}

/// A leader whose API server stops answering counts itself lost within the
/// renew deadline, even though the lease manager never reads another holder
/// (time is paused: the test does not wait the real 10-15 s).
#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_reach_the_api_server_counts_itself_lost() {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut l = join_as(&server, "operator-a").await;
    l.acquired().await.unwrap();
    server.lock().unwrap().failing = true;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(120), l.lost())
        .await
        .expect("the leader never counted itself lost");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(leader::LEASE_SECONDS - leader::GRACE_SECONDS),
        "not before the renew deadline: {waited:?}"
    );
    assert!(waited <= std::time::Duration::from_secs(leader::LEASE_SECONDS), "before the Lease expires: {waited:?}");
}

/// While the API server answers and the Lease is ours, a leader stays.
#[tokio::test(start_paused = true)]
async fn a_leader_that_renews_is_not_lost() {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut l = join_as(&server, "operator-a").await;
    l.acquired().await.unwrap();
    let lost = tokio::time::timeout(std::time::Duration::from_secs(60), l.lost()).await;
    assert!(lost.is_err(), "a renewed Lease is not lost");
    assert_eq!(holder(&server).as_deref(), Some("operator-a"));
}

/// An API server that stops answering (rather than failing fast) cannot hold
/// a leader past the renew deadline: each read of the Lease is bounded by it.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_api_server_hangs_counts_itself_lost_before_the_lease_expires() {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut l = join_as(&server, "operator-a").await;
    l.acquired().await.unwrap();
    server.lock().unwrap().hanging = true;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(120), l.lost())
        .await
        .expect("a hung read of the Lease kept the leader leading");
    assert!(started.elapsed() < std::time::Duration::from_secs(leader::LEASE_SECONDS), "{:?}", started.elapsed());
}

/// The deadline runs from the Lease's `renewTime`, not from when the leader
/// read it: a Lease last renewed 14 s ago is about to expire for the other
/// replicas, however recently this leader looked at it. (Time is paused, so
/// the wall clock that `renewTime` is compared with stands still, and the
/// manager's own renewal is 10 s of paused time away.)
#[tokio::test(start_paused = true)]
async fn a_leader_counts_its_deadline_from_the_leases_renew_time_not_from_its_last_read() {
    let server = Arc::new(Mutex::new(Server::default()));
    let mut l = join_as(&server, "operator-a").await;
    l.acquired().await.unwrap();
    let old = (k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(14))
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    server.lock().unwrap().lease.as_mut().unwrap()["spec"]["renewTime"] = json!(old);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(60), l.lost())
        .await
        .expect("a leader that read a Lease about to expire kept leading");
    assert!(
        started.elapsed() <= std::time::Duration::from_secs(leader::CHECK_SECONDS),
        "lost at the first read: {:?}",
        started.elapsed()
    );
}
