//! Delivery: broker → sidecar → app → ack (DESIGN.md §3.2).
//!
//! One [`runner`] per Subscription of this app: it fetches from the
//! subscription's durable consumer, pushes each message to the app
//! ([`push`]), and settles it by the app's answer — ack, retry later, or
//! dead-letter — keeping the lease alive with progress heartbeats while the
//! app works. Deliveries answered 202 and pull deliveries wait in
//! [`callbacks`] for the app's ack/retry/reject call. Ids the app already
//! acknowledged are remembered per subscription, within a cap for the
//! sidecar ([`dedupe`]).

pub mod callbacks;
pub mod dedupe;
pub mod push;
pub mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::subscription::DeliveryMode;
use ferry_api::SubscriptionSpec;

use self::callbacks::Callbacks;
use self::runner::{Ctx, Runner};
use crate::broker::Broker;
use crate::config::resources::Resources;
use crate::metrics::Metrics;

/// What every runner needs, fixed for the process.
#[derive(Clone)]
pub struct Deps {
    /// Namespace.
    pub namespace: String,
    /// This app's id.
    pub app_id: String,
    /// This pod's name (per-pod consumers).
    pub pod_name: String,
    /// How long the broker keeps an unused per-pod consumer.
    pub pod_consumer_ttl: Duration,
    /// App port for push.
    pub app_port: Option<u16>,
    /// Token sent to the app.
    pub app_token: Option<String>,
    /// Where dedupe stores live.
    pub data_dir: PathBuf,
    /// Consumer-side dedupe window.
    pub dedupe_window: Duration,
    /// The dedupe stores, and the cap on ids they remember together.
    pub dedupe: Arc<dedupe::Stores>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Deliveries awaiting callbacks.
    pub callbacks: Arc<Callbacks>,
    /// HTTP client for pushes (pooled keep-alive connections to the app).
    pub client: push::Client,
    /// The outbox, whose parked logs take a dead letter its topic refuses
    /// for good.
    pub outbox: Arc<crate::outbox::Outbox>,
}

/// The consumer this pod uses for a subscription: the shared mapping, with
/// a per-pod consumer (`fanout: Pod`) kept `pod_consumer_ttl` once unused.
pub fn consumer_plan(
    namespace: &str,
    subscription: &str,
    spec: &SubscriptionSpec,
    pod_name: &str,
    pod_consumer_ttl: Duration,
) -> ferry_api::ConsumerPlan {
    let mut plan = ferry_api::consumer_plan(namespace, subscription, spec, Some(pod_name));
    if plan.inactive_threshold.is_some() {
        plan.inactive_threshold = Some(pod_consumer_ttl);
    }
    plan
}

/// The set of running subscriptions, kept equal to the resources.
pub struct Delivery {
    deps: Deps,
    running: Mutex<BTreeMap<String, (SubscriptionSpec, Runner)>>,
    /// Set by [`Delivery::stop_all`]: nothing starts afterwards.
    closed: std::sync::atomic::AtomicBool,
    /// One reconcile at a time (the start-up one and a change's can meet).
    reconciling: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").finish_non_exhaustive()
    }
}

impl Delivery {
    /// No subscription running yet.
    pub fn new(deps: Deps) -> Self {
        Delivery {
            deps,
            running: Mutex::new(BTreeMap::new()),
            closed: Default::default(),
            reconciling: Default::default(),
        }
    }

    /// The callbacks registry.
    pub fn callbacks(&self) -> &Arc<Callbacks> {
        &self.deps.callbacks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (SubscriptionSpec, Runner)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts, restarts and stops runners so that exactly this app's
    /// subscriptions in `resources` run, each with its current spec.
    pub async fn reconcile(&self, resources: &Resources) {
        let _one_at_a_time = self.reconciling.lock().await;
        let wanted: BTreeMap<String, SubscriptionSpec> =
            resources.subscriptions_of(&self.deps.app_id).map(|(n, s)| (n.clone(), s.clone())).collect();
        let stale: Vec<(String, Runner)> = {
            let mut running = self.lock();
            let names: Vec<String> =
                running.keys().filter(|n| wanted.get(*n) != running.get(*n).map(|(s, _)| s)).cloned().collect();
            names.into_iter().filter_map(|n| running.remove(&n).map(|(_, r)| (n, r))).collect()
        };
        for (name, runner) in stale {
            tracing::info!(subscription = %name, "stopping subscription (removed or changed)");
            if wanted.contains_key(&name) {
                runner.stop_for_change().await;
            } else {
                runner.stop().await;
            }
            if !wanted.contains_key(&name) {
                // Gone for good: its ids no longer count (a changed one's
                // reopened store sets the gauge itself).
                let labels = crate::metrics::SubscriptionLabels { subscription: name };
                self.deps.metrics.dedupe_ids.get_or_create(&labels).set(0);
            }
        }
        for (name, spec) in wanted {
            if self.lock().contains_key(&name) {
                continue;
            }
            let dlq_partitions =
                spec.dead_letter_topic.as_ref().and_then(|t| resources.topics.get(t)).map_or(1, |t| t.partitions);
            match Ctx::new(&self.deps, &name, spec.clone(), dlq_partitions) {
                Ok(ctx) => {
                    // Checked under the lock stop_all takes its runners with:
                    // a reconcile racing a shutdown starts nothing after it.
                    let mut running = self.lock();
                    if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    tracing::info!(subscription = %name, topic = %spec.topic, mode = ?spec.mode, "starting subscription");
                    running.insert(name, (spec, Runner::start(ctx)));
                }
                Err(e) => tracing::error!(subscription = %name, error = %e, "cannot start subscription"),
            }
        }
    }

    /// The context of a pull subscription.
    pub fn pull_ctx(&self, name: &str) -> Option<Arc<Ctx>> {
        self.lock().get(name).filter(|(s, _)| s.mode == DeliveryMode::Pull).map(|(_, r)| r.ctx.clone())
    }

    /// True when a subscription of that name runs here (any mode).
    pub fn has(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Stops fetching everywhere and hands back what is not finished. All
    /// subscriptions stop at once: one whose pushes hang (each may take up
    /// to [`runner::STOP_WAIT`]) neither delays the others' stop nor keeps
    /// them fetching meanwhile.
    pub async fn stop_all(&self) {
        let all: Vec<Runner> = {
            let mut running = self.lock();
            self.closed.store(true, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *running).into_values().map(|(_, r)| r).collect()
        };
        futures::future::join_all(all.into_iter().map(Runner::stop)).await;
    }
}
