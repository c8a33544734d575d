//! The Subscription controller: validate → build (pure) → apply (consumer,
//! KV) → status. A Subscription whose Topic does not exist reports
//! `TopicNotFound`, is withdrawn from the sidecars' config (its consumer is
//! kept), and recovers by itself when the Topic appears (the controller
//! watches Topics and maps them to their Subscriptions).

use std::sync::Arc;
use std::time::Duration;

use ferry_api::subscription::SubscriptionStatus;
use ferry_api::{Subscription, Topic};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Resource, ResourceExt};

use crate::build;
use crate::context::{ready_condition, Context, Error, FIELD_MANAGER, FINALIZER};

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
    let mut status = SubscriptionStatus { observed_generation: s.meta().generation, ..SubscriptionStatus::default() };
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
        if let Some(plan) = &desired.consumer {
            status.consumer = Some(plan.name.clone());
            if let Ok((pending, in_flight, redelivered)) = ctx.js.consumer_counts(&plan.stream, &plan.name).await {
                status.pending = Some(pending);
                status.in_flight = Some(in_flight);
                status.redelivered = Some(redelivered);
            }
            // A failed read keeps the last count rather than dropping the field.
            status.dead_lettered = match ctx.js.dead_letter_count(&ns, &name).await {
                Ok(n) => Some(n),
                Err(_) => s.status.as_ref().and_then(|st| st.dead_lettered),
            };
        }
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
    status.conditions = vec![ready_condition(previous, ok, reason, &message, s.meta().generation)];
    if !ok {
        ctx.event(s, EventType::Warning, reason, &message).await;
    }
    let patch = serde_json::json!({ "apiVersion": "ferry.dev/v1alpha1", "kind": "Subscription", "status": status });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::Kube)?;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

async fn cleanup(s: &Subscription, ctx: &Context) -> Result<Action, Error> {
    let ns = s.namespace().unwrap_or_default();
    ctx.js.delete_subscription(&ns, &s.name_any(), &s.spec.topic, &s.spec.app).await.map_err(Error::Apply)?;
    ctx.reset_backoff(s);
    ctx.event(s, EventType::Normal, "Deleted", "consumer and sidecar config removed").await;
    Ok(Action::await_change())
}
