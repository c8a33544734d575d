//! What the controllers share, and their errors.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};

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
    /// The label of the failure metric and the event reason. Every error
    /// of a reconcile comes wrapped by the finalizer machinery: the
    /// category is that of the error inside (was `Finalizer` for all).
    pub fn category(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Apply(e) => e.category(),
            Error::Finalizer(e) => match &**e {
                F::ApplyFailed(inner) | F::CleanupFailed(inner) => inner.category(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "KubeApi",
                _ => "Finalizer",
            },
            Error::MissingNamespace => "MissingNamespace",
        }
    }
}

/// The first retry delay of an object whose broker is out of reach or whose
/// Topic is missing (and after a failed reconcile).
pub const RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest retry delay: [`RETRY_MIN`] doubles up to this.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Shared by every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// The broker.
    pub js: JetStream,
    /// One recorder for every event: it remembers what it published, so an
    /// event repeated within minutes updates the first one's series (count,
    /// last seen) with a PATCH instead of creating another Event object.
    recorder: Recorder,
    /// The next retry delay of each object that is retrying, by
    /// `kind/namespace/name`.
    backoff: Mutex<HashMap<String, Duration>>,
}

fn backoff_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Context {
    /// A context whose events `reporter` publishes.
    pub fn new(client: kube::Client, js: JetStream, reporter: Reporter) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Context { client, js, recorder, backoff: Mutex::default() }
    }

    /// The delay before `obj` is looked at again after one more failure:
    /// [`RETRY_MIN`] the first time, doubling each time up to [`RETRY_MAX`],
    /// until [`Self::reset_backoff`].
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let mut map = self.backoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = map.entry(backoff_key(obj)).or_insert(RETRY_MIN);
        let now = *next;
        *next = (now * 2).min(RETRY_MAX);
        now
    }

    /// Forgets `obj`'s retry delay: it reconciled, or is gone.
    pub fn reset_backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.backoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&backoff_key(obj));
    }

    /// Publishes an event about `obj`; failing to publish one is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: &str) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
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
