//! What the API, the admin endpoints and the background tasks share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::resources::Resources;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// The running sidecar's shared state.
pub struct Sidecar {
    /// Checked configuration.
    pub config: Config,
    /// Known topics and subscriptions.
    pub resources: RwLock<Resources>,
    /// The outbox.
    pub outbox: Arc<Outbox>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per topic: its forwarder's confirmed offset and rewind handle.
    pub forwarding: RwLock<BTreeMap<String, crate::forward::Link>>,
    /// Set on SIGTERM: produce answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// Subscription runners and deliveries awaiting callbacks.
    pub delivery: crate::deliver::Delivery,
    /// Notified when a forwarder finds its stream missing on the broker.
    pub stream_missing: Arc<tokio::sync::Notify>,
    /// Set once every stream and consumer of the resources exists on the broker.
    pub broker_configured: AtomicBool,
    /// Set once the resources are known: at start from a manifest
    /// directory; with the operator's KV bucket, once its first whole
    /// snapshot (or an empty namespace) came. Until then an unknown topic or
    /// subscription may only be not loaded yet: 503, not 404.
    pub config_loaded: AtomicBool,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar").field("app_id", &self.config.app_id).finish_non_exhaustive()
    }
}

impl Sidecar {
    /// The confirmed-offset watch of a topic.
    pub fn confirmed(&self, topic: &str) -> Option<watch::Receiver<u64>> {
        self.link(topic).map(|l| l.confirmed)
    }

    /// A topic's link to its forwarder: its confirmed offset, and the
    /// handle that sends it back for a replay.
    pub fn link(&self, topic: &str) -> Option<crate::forward::Link> {
        self.forwarding.read().unwrap_or_else(|e| e.into_inner()).get(topic).cloned()
    }

    /// The spec of a topic, if configured.
    pub fn topic_spec(&self, topic: &str) -> Option<ferry_api::TopicSpec> {
        self.resources.read().unwrap_or_else(|e| e.into_inner()).topics.get(topic).cloned()
    }

    /// True when `topic` is configured (without copying its spec).
    pub fn knows_topic(&self, topic: &str) -> bool {
        self.resources.read().unwrap_or_else(|e| e.into_inner()).topics.contains_key(topic)
    }

    /// True after SIGTERM.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Whether the resources are known (see [`Sidecar::config_loaded`]).
    pub fn is_config_loaded(&self) -> bool {
        self.config_loaded.load(Ordering::Acquire)
    }
}
