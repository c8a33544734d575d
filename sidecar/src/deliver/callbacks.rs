//! Deliveries waiting for the app's callback: pushes answered 202, and
//! messages handed out by pull. `POST /v1/deliveries/{id}/ack|retry|reject`
//! finds them here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

/// What the app asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Processed.
    Ack,
    /// Try again, after this delay if given.
    Retry(Option<Duration>),
    /// Do not try again; dead-letter it with this reason.
    Reject(String),
}

/// A callback on its way to the waiting delivery, with a channel for the
/// result of settling it at the broker.
#[derive(Debug)]
pub struct Callback {
    /// The verdict.
    pub verdict: Verdict,
    /// Answered once the delivery is settled by this callback, or with
    /// why it was settled otherwise (the push's answer came with it).
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Registry of deliveries awaiting a callback, by delivery id.
#[derive(Debug, Default)]
pub struct Callbacks {
    waiting: Mutex<HashMap<String, oneshot::Sender<Callback>>>,
}

impl Callbacks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Callback>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a delivery; the receiver gets the app's callback.
    pub fn register(&self, delivery_id: &str) -> oneshot::Receiver<Callback> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(delivery_id.to_owned(), tx);
        rx
    }

    /// Forgets a delivery (timed out or settled otherwise).
    pub fn forget(&self, delivery_id: &str) {
        self.lock().remove(delivery_id);
    }

    /// Hands a callback to its delivery; `None` when no delivery waits
    /// under that id (unknown, already settled, or timed out).
    /// Sent under the lock: once [`Callbacks::forget`] returns, a callback
    /// that found its delivery is already in the delivery's channel.
    pub fn resolve(&self, delivery_id: &str, verdict: Verdict) -> Option<oneshot::Receiver<Result<(), String>>> {
        let mut waiting = self.lock();
        let tx = waiting.remove(delivery_id)?;
        let (done, rx) = oneshot::channel();
        tx.send(Callback { verdict, done }).ok()?;
        Some(rx)
    }
}
