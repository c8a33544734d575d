//! The cluster config source: the resolved Topics and this app's
//! Subscriptions from the broker's KV bucket, which the operator writes.
//! Every change (after the initial state is read whole) is sent as a new
//! [`Resources`], the same value the manifest directory yields.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv::Operation};
use bytes::Bytes;
use ferry_api::naming::CONFIG_BUCKET;
use ferry_api::resolved::{ResolvedSubscription, ResolvedTopic};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::resources::Resources;

/// How long to wait before looking again for a missing bucket or after a
/// broken watch.
pub const RETRY: Duration = Duration::from_secs(1);

/// Builds the resources from KV entries (key → JSON). Entries that do not
/// parse are skipped with a warning.
pub fn resolve(entries: &BTreeMap<String, Bytes>, namespace: &str, app_id: &str) -> Resources {
    let mut r = Resources::default();
    let topics = format!("{namespace}.topic.");
    let subs = format!("{namespace}.app.{app_id}.");
    for (key, value) in entries {
        if key.starts_with(&topics) {
            match serde_json::from_slice::<ResolvedTopic>(value) {
                Ok(t) => {
                    r.topics.insert(t.name, t.spec);
                }
                Err(e) => tracing::warn!(key, error = %e, "skipping an unreadable topic entry"),
            }
        } else if key.starts_with(&subs) {
            match serde_json::from_slice::<ResolvedSubscription>(value) {
                Ok(s) => {
                    r.subscriptions.insert(s.name, s.spec);
                }
                Err(e) => tracing::warn!(key, error = %e, "skipping an unreadable subscription entry"),
            }
        }
    }
    r
}

/// Whether the bucket holds no entry (nor delete marker) of `namespace`.
/// False when that cannot be told: the watch then says.
async fn namespace_is_empty(store: &jetstream::kv::Store, namespace: &str) -> bool {
    match store.stream.info_with_subjects(format!("{}{namespace}.>", store.prefix)).await {
        Ok(mut subjects) => subjects.next().await.is_none(),
        Err(_) => false,
    }
}

/// Watches the bucket for ever, sending the resources whenever they change.
pub async fn watch(js: jetstream::Context, namespace: String, app_id: String, tx: mpsc::Sender<Resources>) {
    loop {
        let store = match js.get_key_value(CONFIG_BUCKET).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "config bucket not there yet");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut updates = match store.watch_with_history(format!("{namespace}.>")).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config bucket");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut entries = BTreeMap::new();
        let mut sent: Option<Resources> = None;
        // A namespace with no entry yields nothing to watch: its (empty)
        // state is whole now. Asked after the watch started, so an entry
        // written meanwhile still comes through it.
        if namespace_is_empty(&store, &namespace).await {
            let r = resolve(&entries, &namespace, &app_id);
            if tx.send(r.clone()).await.is_err() {
                return;
            }
            sent = Some(r);
        }
        while let Some(next) = updates.next().await {
            let entry = match next {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "config watch broke; watching again");
                    break;
                }
            };
            match entry.operation {
                Operation::Put => {
                    entries.insert(entry.key, entry.value);
                }
                Operation::Delete | Operation::Purge => {
                    entries.remove(&entry.key);
                }
            }
            // delta 0: this is the newest entry; the state is whole.
            if entry.delta == 0 {
                let r = resolve(&entries, &namespace, &app_id);
                if sent.as_ref() != Some(&r) {
                    if tx.send(r.clone()).await.is_err() {
                        return;
                    }
                    sent = Some(r);
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
