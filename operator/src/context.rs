//! What the controllers share, and their errors.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;

use crate::jetstream::{ApplyError, JetStream};

/// The finalizer on every Ferry resource.
pub const FINALIZER: &str = "ferry.dev/cleanup";
/// The field manager of status patches (server-side apply).
pub const FIELD_MANAGER: &str = "ferry-operator";

/// A controller failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The broker side failed.
    #[error(transparent)]
    Apply(ApplyError),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A namespaced resource without a namespace.
    #[error("resource has no namespace")]
    MissingNamespace,
}

impl Error {
    /// The label of the failure metric and the event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Apply(e) => e.category(),
            Error::Finalizer(_) => "Finalizer",
            Error::MissingNamespace => "MissingNamespace",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// The broker.
    pub js: JetStream,
    /// Who publishes events.
    pub reporter: Reporter,
}

impl Context {
    /// Publishes an event about `obj`; failing to publish one is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: &str) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }
}

/// A Ready condition; its transition time only moves when its status does.
pub fn ready_condition(
    previous: &[Condition],
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = previous.iter().find(|c| c.type_ == "Ready");
    let last_transition_time = match last {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        observed_generation: generation,
        last_transition_time,
    }
}
