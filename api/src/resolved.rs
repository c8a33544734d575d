//! The resolved configuration the operator writes to the broker's KV bucket
//! (`naming::CONFIG_BUCKET`) and sidecars watch: one JSON value per topic
//! (`{ns}.topic.{name}`) and per subscription under its app
//! (`{ns}.app.{app}.{name}`).

use serde::{Deserialize, Serialize};

use crate::{SubscriptionSpec, TopicSpec};

/// A Topic as the sidecars see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedTopic {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The spec as applied.
    pub spec: TopicSpec,
}

/// A Subscription as the sidecars of its app see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedSubscription {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The spec as applied.
    pub spec: SubscriptionSpec,
}
