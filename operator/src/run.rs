//! Running the controllers: watches, error policy, health endpoints.
//!
//! The watches are not covered by tests here (no API server can run on
//! these machines): the reconcile functions they drive are, with a mock API
//! server; the health endpoints are, below.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use ferry_api::{Subscription, Topic};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Resource, ResourceExt};

use crate::context::{Context, Error};
use crate::jetstream::JetStream;
use crate::metrics::Metrics;

/// A failed reconcile is retried after the object's backoff (5 s doubling
/// to 5 min), so a lasting failure does not retry every object every 5 s.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let after = ctx.backoff(&*obj);
    tracing::warn!(error = %error, category = error.category(), retry_in = ?after, "reconcile failed");
    Action::requeue(after)
}

/// Wraps a reconcile function so every run is counted and timed.
fn instrumented<K, Fut>(
    controller: &'static str,
    metrics: Arc<Metrics>,
    reconcile: fn(Arc<K>, Arc<Context>) -> Fut,
) -> impl FnMut(Arc<K>, Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action, Error>>
where
    K: Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        let metrics = metrics.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let r = reconcile(obj, ctx).await;
            metrics.observe(controller, &r, started);
            r
        })
    }
}

/// Serves [`admin_router`] on `addr`.
async fn serve_admin(addr: std::net::SocketAddr, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    let router = admin_router(metrics, ready);
    match bind(addr).await {
        Ok(listener) => {
            let _ = axum::serve(listener, router).await;
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot bind the metrics address"),
    }
}

/// `/healthz`, `/readyz` (ready once the controllers run) and `/metrics`.
fn admin_router(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(AtomicOrdering::Acquire);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move { ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
            }),
        )
}

/// Binds `addr`; `[::]` (the chart's default, for IPv6 and dual-stack
/// clusters) falls back to `0.0.0.0` on a kernel without IPv6.
pub(crate) async fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let v6_any = addr.ip() == std::net::Ipv6Addr::UNSPECIFIED;
    match tokio::net::TcpListener::bind(addr).await {
        Err(e) if v6_any => {
            tracing::info!(%addr, error = %e, "no IPv6 here: listening on IPv4 only");
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, addr.port())).await
        }
        other => other,
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// This replica's name: `--pod-name`, else the host name.
fn identity(args: &crate::cli::RunArgs) -> String {
    args.pod_name
        .clone()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ferry-operator".into())
}

/// Runs the operator until the process is stopped: health endpoints and
/// the injection webhook (with `--webhook-addr`) at once; the controllers once this replica holds the Lease (or at once
/// without leader election). Errs when the Lease is lost or cannot be
/// joined, so the process exits and restarts as a candidate.
pub async fn run(client: kube::Client, nats: async_nats::Client, args: &crate::cli::RunArgs) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_admin(args.metrics_addr, metrics.clone(), ready.clone()));
    // One shutdown signal for every part: listening for SIGTERM replaces its
    // default action, so each phase below must watch for it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // Every replica serves the webhook, leader or not.
    match crate::webhook::from_args(client.clone(), args).await {
        Ok(Some(hook)) => {
            tracing::info!(addr = %hook.local_addr(), "serving the sidecar-injection webhook");
            tokio::spawn(hook.serve(stopped()));
        }
        Ok(None) => tracing::info!("no --webhook-addr: not serving the injection webhook"),
        Err(e) => return Err(format!("webhook ({}): {e}", e.category())),
    }
    let mut leadership = if args.leader_election {
        let identity = identity(args);
        let l =
            crate::leader::join(client.clone(), &args.operator_namespace, &args.lease_name, &identity).await.map_err(
                |e| format!("joining the election for Lease {}/{}: {e}", args.operator_namespace, args.lease_name),
            )?;
        tracing::info!(%identity, lease = %args.lease_name, "waiting to lead");
        Some(l)
    } else {
        None
    };
    // A replica that waits for the Lease is ready: it serves the webhook.
    ready.store(true, AtomicOrdering::Release);
    if let Some(l) = &mut leadership {
        tokio::select! {
            r = l.acquired() => r?,
            () = stopped() => {
                leadership.take().expect("joined").release().await;
                return Ok(());
            }
        }
        tracing::info!("leading: starting the controllers");
    }
    metrics.set_leader(true);
    let js = JetStream::new(nats).with_config_replicas(args.config_replicas.into());
    // Said once here; until it succeeds each Topic and Subscription reports
    // it too (their reconciles make or fix the bucket).
    if let Err(e) = js.ensure_bucket().await {
        tracing::error!(error = %e, category = e.category(), "cannot make the config bucket as configured");
    }
    let ctx = Arc::new(Context::new(
        client.clone(),
        js,
        Reporter { controller: "ferry-operator".into(), instance: args.pod_name.clone() },
    ));
    let controllers = controllers(client, ctx, args.namespace.clone(), metrics.clone(), stopped);
    match &mut leadership {
        None => {
            controllers.await;
            Ok(())
        }
        Some(l) => {
            tokio::select! {
                _ = controllers => {
                    metrics.set_leader(false);
                    leadership.take().expect("leading").release().await;
                    Ok(())
                }
                _ = l.lost() => {
                    metrics.set_leader(false);
                    Err("lost the Lease: stopping so another replica leads".into())
                }
            }
        }
    }
}

/// What of a Topic or Subscription wakes its reconcile (kube's predicates):
/// a new generation (a spec change; marking it for deletion bumps it too), a
/// change of its finalizers (kube's finalizer helper adds one and waits for
/// the event), or the deletion mark itself. Not a write of its status: a
/// reconcile writes counters there, and each write would wake the next
/// reconcile at once, non-stop while the counters move. They are refreshed
/// by each reconcile's requeue period instead.
pub fn wakes_reconcile<K: Resource + 'static>() -> impl Predicate<K> {
    predicates::generation
        .combine(predicates::finalizers)
        .combine(|obj: &K| Some(u64::from(obj.meta().deletion_timestamp.is_some())))
}

/// Both controllers, until `stopped()` resolves.
async fn controllers<S, F>(
    client: kube::Client,
    ctx: Arc<Context>,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    stopped: S,
) where
    S: Fn() -> F,
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let (topics, subs): (Api<Topic>, Api<Subscription>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (topic_store, topic_writer) = reflector::store();
    let topic_events = watcher(topics.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(topic_writer)
        .applied_objects()
        .predicate_filter(wakes_reconcile::<Topic>(), Default::default());
    let topic_controller = Controller::for_stream(topic_events, topic_store)
        .graceful_shutdown_on(stopped())
        .run(instrumented("topic", metrics.clone(), crate::topic::reconcile), error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "topic reconcile");
            }
        });
    let (sub_store, sub_writer) = reflector::store();
    let sub_events = watcher(subs, watcher::Config::default())
        .default_backoff()
        .reflect(sub_writer)
        .applied_objects()
        .predicate_filter(wakes_reconcile::<Subscription>(), Default::default());
    let sub_controller = Controller::for_stream(sub_events, sub_store);
    let store = sub_controller.store();
    // A Topic that appears (or changes) wakes the Subscriptions that name it,
    // so `TopicNotFound` recovers by itself.
    let sub_controller = sub_controller
        .watches(topics, watcher::Config::default(), move |topic: Topic| {
            let ns = topic.namespace();
            let name = topic.name_any();
            store
                .state()
                .into_iter()
                .filter(|s| {
                    s.namespace() == ns
                        && (s.spec.topic == name || s.spec.dead_letter_topic.as_deref() == Some(name.as_str()))
                })
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopped())
        .run(instrumented("subscription", metrics.clone(), crate::subscription::reconcile), error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "subscription reconcile");
            }
        });
    futures::join!(topic_controller, sub_controller);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::TopicSpec;
    use kube::api::ObjectMeta;

    #[tokio::test]
    async fn the_health_endpoints_say_live_ready_once_the_controllers_run_and_serve_the_metrics() {
        use tower::ServiceExt;
        let (metrics, ready) = (Arc::new(Metrics::default()), Arc::new(AtomicBool::new(false)));
        metrics.set_leader(true);
        let router = admin_router(metrics, ready.clone());
        let get = |path: &'static str| {
            let router = router.clone();
            async move {
                let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
                let resp = router.oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        assert_eq!(get("/healthz").await, (200, "ok".into()));
        assert_eq!(get("/readyz").await, (503, "starting".into()));
        ready.store(true, AtomicOrdering::Release);
        assert_eq!(get("/readyz").await, (200, "ready".into()));
        let (status, text) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(text.lines().any(|l| l == "ferry_operator_leader 1"), "{text}");
        assert_eq!(get("/nothing").await.0, 404);
    }

    #[test]
    fn a_status_write_does_not_wake_a_reconcile_but_a_spec_change_a_finalizer_or_a_deletion_does() {
        let topic = Topic {
            metadata: ObjectMeta { name: Some("orders".into()), generation: Some(3), ..ObjectMeta::default() },
            spec: TopicSpec::default(),
            status: None,
        };
        let wakes = wakes_reconcile::<Topic>();
        let key = wakes.hash_property(&topic);
        let mut status_only = topic.clone();
        status_only.metadata.resource_version = Some("999".into());
        status_only.status = Some(Default::default());
        assert_eq!(wakes.hash_property(&status_only), key, "a status write");
        let mut spec = topic.clone();
        spec.metadata.generation = Some(4);
        assert_ne!(wakes.hash_property(&spec), key, "a spec change");
        let mut finalizer = topic.clone();
        finalizer.metadata.finalizers = Some(vec!["ferry.dev/cleanup".into()]);
        assert_ne!(wakes.hash_property(&finalizer), key, "a finalizer added");
        let mut deleted = topic.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
        assert_ne!(wakes.hash_property(&deleted), key, "marked for deletion");
    }
}
