//! The Topic controller: validate → build (pure) → apply (JetStream, KV) →
//! status, with a finalizer that deletes broker objects per `deletionPolicy`.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::naming;
use ferry_api::topic::TopicStatus;
use ferry_api::Topic;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Resource, ResourceExt};

use crate::build;
use crate::context::{ready_condition, Context, Error, FIELD_MANAGER, FINALIZER};

/// How often status counters are refreshed for a ready Topic.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Reconciles one Topic.
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = topic.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, topic, |event| async {
        match event {
            Finalize::Apply(t) => apply(&api, &t, &ctx).await,
            Finalize::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(api: &Api<Topic>, t: &Topic, ctx: &Context) -> Result<Action, Error> {
    let ns = t.namespace().unwrap_or_default();
    let name = t.name_any();
    let (ok, reason, message, requeue) = match build::topic(&ns, &name, &t.spec) {
        Err(errors) => {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            (false, "InvalidSpec", list.join("; "), None)
        }
        Ok(desired) => match ctx.js.apply_topic(&desired).await {
            Ok(changed) => {
                ctx.reset_backoff(t);
                if changed {
                    ctx.event(
                        t,
                        EventType::Normal,
                        "Reconciled",
                        &format!("stream {} is as the spec says", desired.stream.name),
                    )
                    .await;
                }
                (true, "Reconciled", format!("stream {} ready", desired.stream.name), Some(REFRESH))
            }
            Err(e) => {
                // Backs off per Topic (5 s doubling to 5 min) while the broker is out of reach.
                let retry = e.retry(|| ctx.backoff(t), REFRESH);
                (false, e.category(), e.to_string(), retry)
            }
        },
    };
    let mut status = observe(t, ctx, ok).await;
    status.observed_generation = t.meta().generation;
    let previous = t.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    status.conditions = vec![ready_condition(previous, ok, reason, &message, t.meta().generation)];
    if !ok {
        ctx.event(t, EventType::Warning, reason, &message).await;
    }
    let patch = serde_json::json!({ "apiVersion": "ferry.dev/v1alpha1", "kind": "Topic", "status": status });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::Kube)?;
    Ok(match requeue {
        Some(after) => Action::requeue(after),
        // Invalid or immutable: nothing changes until the spec does.
        None => Action::await_change(),
    })
}

/// The broker's side of the status, read on every pass, ready or not (a
/// Topic whose new spec is refused still has its stream, and messages):
/// the stream with its counts. A read that fails keeps the last values (the
/// status is server-side applied whole: a field left out would be
/// removed); a stream the broker no longer has is left out, with its
/// counts. `applied`: the stream was just made or checked, so its name
/// stands even when its counts cannot be read.
async fn observe(t: &Topic, ctx: &Context, applied: bool) -> TopicStatus {
    let ns = t.namespace().unwrap_or_default();
    let name = t.name_any();
    let last = t.status.clone().unwrap_or_default();
    let mut status = TopicStatus::default();
    match ctx.js.topic_counts(&ns, &name).await {
        Ok(Some((messages, bytes))) => {
            status.stream = Some(naming::stream_name(&ns, &name));
            status.messages = Some(messages);
            status.bytes = Some(bytes);
        }
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(namespace = %ns, topic = %name, %error, "stream counts not read; keeping the last");
            status.stream = if applied { Some(naming::stream_name(&ns, &name)) } else { last.stream };
            status.messages = last.messages;
            status.bytes = last.bytes;
        }
    }
    status
}

async fn cleanup(t: &Topic, ctx: &Context) -> Result<Action, Error> {
    let ns = t.namespace().unwrap_or_default();
    ctx.js.delete_topic(&ns, &t.name_any(), t.spec.deletion_policy).await.map_err(Error::Apply)?;
    ctx.reset_backoff(t);
    ctx.event(
        t,
        EventType::Normal,
        "Deleted",
        &format!("broker objects handled per deletionPolicy {:?}", t.spec.deletion_policy),
    )
    .await;
    Ok(Action::await_change())
}
