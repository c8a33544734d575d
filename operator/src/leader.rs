//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas do
//! not reconcile at once. Every replica serves the webhook and the health
//! endpoints; only the holder of the Lease runs the controllers.
//!
//! The Lease is held for [`LEASE_SECONDS`] after each renewal and renewed
//! [`GRACE_SECONDS`] before it runs out (kube-lease-manager, server-side
//! apply). A replica that loses the Lease stops (the process exits and
//! Kubernetes restarts it as a candidate), as client-go's controllers do:
//! half-stopped controllers are worse than a restart.

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// How long a Lease stays valid after a renewal.
pub const LEASE_SECONDS: u64 = 15;
/// How long before expiry the holder renews.
pub const GRACE_SECONDS: u64 = 5;

/// This replica's part in the election.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("leading", &*self.leading.borrow()).finish()
    }
}

/// Joins the election for Lease `name` in `namespace` as `identity`. The
/// Lease is created if it does not exist.
pub async fn join(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> Result<Leadership, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_field_manager(format!("ferry-operator-{identity}"))
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .build()
        .await?;
    let (leading, task) = manager.watch().await;
    Ok(Leadership { leading, task })
}

impl Leadership {
    /// True while this replica holds the Lease.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until this replica holds the Lease. Errs if the election ended
    /// (its task failed).
    pub async fn acquired(&mut self) -> Result<(), String> {
        self.leading.wait_for(|l| *l).await.map(|_| ()).map_err(|_| "the lease manager stopped".to_string())
    }

    /// Waits until this replica no longer holds the Lease (or the election
    /// ended).
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|l| !*l).await;
    }

    /// Gives the Lease up (so another replica takes over at once) and ends
    /// the election.
    pub async fn release(self) {
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease"),
            Err(e) => tracing::warn!(error = %e, "lease task"),
        }
    }
}
