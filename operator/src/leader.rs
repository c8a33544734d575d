//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas do
//! not reconcile at once. Every replica serves the webhook and the health
//! endpoints; only the holder of the Lease runs the controllers.
//!
//! The Lease is held for [`LEASE_SECONDS`] after each renewal and renewed
//! [`GRACE_SECONDS`] before it runs out (kube-lease-manager: the Lease is
//! taken with a server-side apply, renewed with patches). A replica that
//! loses the Lease stops (the process exits and Kubernetes restarts it as a
//! candidate), as client-go's controllers do: half-stopped controllers are
//! worse than a restart.
//!
//! The lease manager reports a loss only when it reads another holder; a
//! leader that cannot reach the API server at all would never hear of it
//! while the Lease expires and another replica takes it. So a leader also
//! reads the Lease itself every [`GRACE_SECONDS`], and counts itself lost
//! when no read has shown it as the holder of a fresh Lease for
//! `LEASE_SECONDS - GRACE_SECONDS` (client-go's renew deadline).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// How long a Lease stays valid after a renewal.
pub const LEASE_SECONDS: u64 = 15;
/// How long before expiry the holder renews.
pub const GRACE_SECONDS: u64 = 5;

/// This replica's part in the election.
pub struct Leadership {
    api: Api<Lease>,
    name: String,
    identity: String,
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
    let api = Api::namespaced(client.clone(), namespace);
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_field_manager(format!("ferry-operator-{identity}"))
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .build()
        .await?;
    let (leading, task) = manager.watch().await;
    Ok(Leadership { api, name: name.to_owned(), identity: identity.to_owned(), leading, task })
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
    /// ended), or cannot tell that it still does (see the module doc).
    pub async fn lost(&mut self) {
        let deadline = Duration::from_secs(LEASE_SECONDS - GRACE_SECONDS);
        let (api, name, identity) = (&self.api, &self.name, &self.identity);
        let watchdog = async {
            let mut confirmed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(GRACE_SECONDS)).await;
                match api.get(name).await {
                    Ok(lease) => match held_by(&lease, identity) {
                        Some(true) => confirmed = tokio::time::Instant::now(),
                        Some(false) => {
                            tracing::warn!(lease = %name, "another replica holds the Lease");
                            return;
                        }
                        None => {}
                    },
                    Err(e) => tracing::warn!(lease = %name, error = %e, "cannot read the Lease"),
                }
                if confirmed.elapsed() > deadline {
                    tracing::warn!(lease = %name, "the Lease was not confirmed within the renew deadline");
                    return;
                }
            }
        };
        tokio::select! {
            _ = self.leading.wait_for(|l| !*l) => {}
            () = watchdog => {}
        }
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

/// Whether `lease` shows `identity` as its holder: `Some(true)` held and
/// renewed within its duration (by this machine's clock), `Some(false)` held
/// by another, `None` ours but not fresh.
fn held_by(lease: &Lease, identity: &str) -> Option<bool> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return Some(false);
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
    (age.as_secs() < LEASE_SECONDS as i64).then_some(true)
}
