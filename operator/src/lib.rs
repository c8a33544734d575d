//! `ferry-operator`: turns `Topic` and `Subscription` resources into
//! JetStream streams and consumers, and writes the resolved configuration to
//! the broker's KV bucket, which the sidecars watch.
//!
//! Each controller is a pipeline: validate → [`build`] (pure) → apply
//! ([`jetstream`]) → status. The CRDs are generated from the `ferry-api`
//! types ([`crd`]).
//!
//! Status of this crate: CRD generation, the pure build step and the
//! JetStream apply side are here and tested; the Kubernetes controllers
//! (watch, finalizers, status, events, leader election) are not written yet.

pub mod build;
pub mod crd;
pub mod jetstream;
