//! The Subscription controller: validate → build (pure) → apply (consumer,
//! KV) → status. A Subscription whose Topic does not exist reports
//! `TopicNotFound`, is withdrawn from the sidecars' config (its consumer is
//! kept), and recovers by itself when the Topic appears (the controller
//! watches Topics and maps them to their Subscriptions).

use std::sync::Arc;
use std::time::Duration;

use ferry_api::naming;
use ferry_api::subscription::{Fanout, SubscriptionStatus};
use ferry_api::{Subscription, Topic};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Resource, ResourceExt};

use crate::build;
use crate::context::{ready_condition, Context, Error, FIELD_MANAGER, FINALIZER};
use crate::jetstream::ConsumerCounts;

/// How often status counters are refreshed for a ready Subscription.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Why a Subscription is not ready: reason, message, when to look again.
type NotReady = (&'static str, String, Option<Duration>);

/// Reconciles one Subscription.
pub async fn reconcile(sub: Arc<Subscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sub.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Subscription> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, sub, |event| async {
        match event {
            Finalize::Apply(s) => apply(&api, &s, &ctx).await,
            Finalize::Cleanup(s) => cleanup(&s, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(api: &Api<Subscription>, s: &Subscription, ctx: &Context) -> Result<Action, Error> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let topics: Api<Topic> = Api::namespaced(ctx.client.clone(), &ns);
    let outcome: Result<(String, Option<Duration>), NotReady> = async {
        let desired = build::subscription(&ns, &name, &s.spec).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ("InvalidSpec", list.join("; "), None)
        })?;
        for (field, topic) in std::iter::once(("spec.topic", &s.spec.topic))
            .chain(s.spec.dead_letter_topic.iter().map(|t| ("spec.deadLetterTopic", t)))
        {
            if topics.get_opt(topic).await.map_err(|e| ("KubeApi", e.to_string(), Some(ctx.backoff(s))))?.is_none() {
                let mut message = format!("{field}: no Topic {topic:?} in namespace {ns:?}");
                // Without its topic the sidecars cannot run it: take it out of
                // their config (a Topic deleted after the Subscription would
                // otherwise leave the entry there for good).
                if field == "spec.topic" {
                    match ctx.js.withdraw_subscription(&ns, &s.spec.app, &name).await {
                        Ok(()) => message.push_str("; withdrawn from the sidecars' config until it exists"),
                        Err(e) => message.push_str(&format!("; not yet withdrawn from the sidecars' config: {e}")),
                    }
                }
                // Backs off per Subscription (5 s doubling to 5 min) until the Topic appears
                // (which wakes it at once).
                return Err(("TopicNotFound", message, Some(ctx.backoff(s))));
            }
        }
        let changed = ctx
            .js
            .apply_subscription(&desired)
            .await
            .map_err(|e| (e.category(), e.to_string(), e.retry(|| ctx.backoff(s), REFRESH)))?;
        ctx.reset_backoff(s);
        if changed {
            ctx.event(s, EventType::Normal, "Reconciled", "consumer and sidecar config are as the spec says").await;
        }
        Ok(("consumer ready".to_owned(), Some(REFRESH)))
    }
    .await;
    let previous = s.status.as_ref().map(|st| st.conditions.as_slice()).unwrap_or_default();
    let (ok, reason, message, requeue) = match outcome {
        Ok((message, requeue)) => (true, "Reconciled", message, requeue),
        Err((reason, message, requeue)) => (false, reason, message, requeue),
    };
    let mut status = observe(s, ctx, ok).await;
    status.observed_generation = s.meta().generation;
    status.conditions = vec![ready_condition(previous, ok, reason, &message, s.meta().generation)];
    if !ok {
        ctx.event(s, EventType::Warning, reason, &message).await;
    }
    let dropped_before = s.status.as_ref().and_then(|st| st.dropped).unwrap_or(0);
    let patch = serde_json::json!({ "apiVersion": "ferry.dev/v1alpha1", "kind": "Subscription", "status": status });
    let patched = api
        .patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::Kube)?;
    // Posted once the status shows the new count, so that the next pass,
    // which compares with it, does not post it again (nor every pass when
    // the CRD is older than the `dropped` field and the API server drops it).
    if let Some(n) = status.dropped.filter(|&n| n > dropped_before) {
        if patched.status.as_ref().and_then(|st| st.dropped) == Some(n) {
            let last = status.last_dropped.as_deref().unwrap_or("not noted");
            let note = format!(
                "{} message(s) dropped since the last look ({n} in all): no deadLetterTopic to send them to; last: {last}",
                n - dropped_before
            );
            ctx.event(s, EventType::Warning, "MessagesDropped", &note).await;
        } else {
            tracing::warn!(namespace = %ns, subscription = %name, dropped = n, "messages were dropped, but the status does not keep the count (is the Subscription CRD current?); no event posted");
        }
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// The broker's side of the status, read on every pass, ready or not (a
/// Subscription whose Topic is gone may still have its consumer, and lag):
/// the consumer, or for `fanout: Pod` the pod consumers, with their counts,
/// and the dead-letter count. A read that fails keeps the last values (the
/// status is server-side applied whole: a field left out would be
/// removed); a consumer the broker no longer has is left out, with its
/// counts. `applied`: the consumer was just made or checked, so its name
/// stands even when its counts cannot be read.
async fn observe(s: &Subscription, ctx: &Context, applied: bool) -> SubscriptionStatus {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let last = s.status.clone().unwrap_or_default();
    let mut status = SubscriptionStatus::default();
    let read = match s.spec.fanout {
        Fanout::Group => ctx
            .js
            .consumer_counts(&ns, &s.spec.topic, &name)
            .await
            .map(|found| found.map(|counts| (naming::consumer_name(&name), counts)))
            .map_err(|e| e.to_string()),
        Fanout::Pod => pod_consumers(s, ctx).await,
    };
    match read {
        Ok(Some((consumer, counts))) => {
            status.consumer = Some(consumer);
            status.pending = Some(counts.pending);
            status.in_flight = Some(counts.in_flight);
            status.redelivered = Some(counts.redelivered);
        }
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(namespace = %ns, subscription = %name, %error, "consumer counts not read; keeping the last");
            status.consumer = match s.spec.fanout {
                Fanout::Group if applied => Some(naming::consumer_name(&name)),
                _ => last.consumer,
            };
            status.pending = last.pending;
            status.in_flight = last.in_flight;
            status.redelivered = last.redelivered;
        }
    }
    (status.dead_lettered, status.dropped, status.last_dropped) = match ctx.js.sidecar_stats(&ns, &name).await {
        Ok(stats) => {
            let why = stats.last_dropped.filter(|_| stats.dropped > 0);
            (Some(stats.dead_lettered), Some(stats.dropped), why)
        }
        Err(_) => (last.dead_lettered, last.dropped, last.last_dropped),
    };
    status
}

/// A `fanout: Pod` Subscription's pod consumers on its topic's stream, as
/// `{name}_* (N consumers)` (one a pod, each kept a while after its pod
/// goes) with their counts summed; `None` without the stream.
async fn pod_consumers(s: &Subscription, ctx: &Context) -> Result<Option<(String, ConsumerCounts)>, String> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let Some(consumers) = ctx.js.pod_consumer_counts(&ns, &s.spec.topic, &name).await.map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let n = consumers.len();
    let plural = if n == 1 { "" } else { "s" };
    let summed = consumers.into_iter().map(|(_, counts)| counts).sum();
    Ok(Some((format!("{}_* ({n} consumer{plural})", naming::consumer_name(&name)), summed)))
}

async fn cleanup(s: &Subscription, ctx: &Context) -> Result<Action, Error> {
    let ns = s.namespace().unwrap_or_default();
    ctx.js.delete_subscription(&ns, &s.name_any(), &s.spec.topic, &s.spec.app).await.map_err(Error::Apply)?;
    ctx.reset_backoff(s);
    ctx.event(s, EventType::Normal, "Deleted", "consumer and sidecar config removed").await;
    Ok(Action::await_change())
}
