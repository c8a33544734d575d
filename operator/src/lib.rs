//! `ferry-operator`: turns `Topic` and `Subscription` resources into
//! JetStream streams and consumers, and writes the resolved configuration to
//! the broker's KV bucket, which the sidecars watch.
//!
//! Each controller is a pipeline: validate → [`build`] (pure) → apply
//! ([`jetstream`]) → status. The CRDs are generated from the `ferry-api`
//! types ([`crd`]).
//!
//! Status of this crate: CRD generation, the pure build step, the JetStream
//! apply side and the Topic and Subscription reconciles (finalizer, status,
//! events) are here and tested; `run` wires the controllers with
//! health and metrics endpoints; leader election and the webhook are not
//! written yet.

pub mod build;
pub mod cli;
pub mod context;
pub mod crd;
pub mod jetstream;
pub mod metrics;
pub mod run;
pub mod subscription;
pub mod topic;
