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
//! reads the Lease itself every [`CHECK_SECONDS`], and counts itself lost
//! once [`RENEW_DEADLINE_SECONDS`] have passed since the last renewal it has
//! seen: measured from the Lease's `renewTime` (not from when it was read),
//! and with every read bounded by that deadline, so a hung API server cannot
//! hold a leader past it. That is before the Lease expires for the other
//! replicas, by a second of slack for clock skew.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a Lease stays valid after a renewal.
pub const LEASE_SECONDS: u64 = 15;
/// How long before expiry the holder renews: 5 s after each renewal, so a
/// renewal that fails once is tried again well before the renew deadline.
pub const GRACE_SECONDS: u64 = 10;
/// How often a leader reads the Lease to confirm it still holds it.
pub const CHECK_SECONDS: u64 = 2;
/// Time since the last renewal seen after which a leader counts itself lost.
pub const RENEW_DEADLINE_SECONDS: u64 = LEASE_SECONDS - 2;

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
        let (api, name, identity) = (&self.api, &self.name, &self.identity);
        let deadline = Duration::from_secs(RENEW_DEADLINE_SECONDS);
        let watchdog = async {
            // Just acquired or renewed: the manager says so.
            let mut renewed = Instant::now();
            loop {
                let lost_at = renewed + deadline;
                tokio::time::sleep_until(lost_at.min(Instant::now() + Duration::from_secs(CHECK_SECONDS))).await;
                if Instant::now() >= lost_at {
                    tracing::warn!(lease = %name, "no renewal of the Lease seen within the renew deadline");
                    return;
                }
                match tokio::time::timeout_at(lost_at, api.get(name)).await {
                    Ok(Ok(lease)) => match held_by(&lease, identity) {
                        // The Lease says when it was renewed, later or
                        // earlier than assumed.
                        Held::Renewed(age) => renewed = Instant::now().checked_sub(age).unwrap_or(renewed),
                        Held::ByAnother => {
                            tracing::warn!(lease = %name, "another replica holds the Lease");
                            return;
                        }
                        Held::NotFresh => {}
                    },
                    Ok(Err(e)) => tracing::warn!(lease = %name, error = %e, "cannot read the Lease"),
                    Err(_) => {} // the deadline passed while reading: checked at the top
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

/// What a read of the Lease shows of this replica's hold on it.
#[derive(Debug, PartialEq)]
enum Held {
    /// Ours, renewed this long ago (by this machine's clock).
    Renewed(Duration),
    /// Another replica's.
    ByAnother,
    /// Ours, but not renewed within its duration (or no renewal time).
    NotFresh,
}

fn held_by(lease: &Lease, identity: &str) -> Held {
    let Some(spec) = lease.spec.as_ref() else { return Held::NotFresh };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Held::ByAnother;
    }
    let Some(renewed) = spec.renew_time.as_ref() else { return Held::NotFresh };
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
    // A renewal time ahead of this clock (skew) counts as just now.
    let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
    if age < Duration::from_secs(LEASE_SECONDS) {
        Held::Renewed(age)
    } else {
        Held::NotFresh
    }
}
