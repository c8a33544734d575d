//! `ferry-operator`: turns `Topic` and `Subscription` resources into
//! JetStream streams and consumers, and writes the resolved configuration to
//! the broker's KV bucket, which the sidecars watch.
//!
//! Each controller is a pipeline: validate → [`build`] (pure) → apply
//! ([`jetstream`]) → status. The CRDs are generated from the `ferry-api`
//! types ([`crd`]).
//!
//! Only the replica holding the Lease ([`leader`]) runs the controllers;
//! every replica serves the health endpoints ([`run`]) and the
//! sidecar-injection [`webhook`].

pub mod build;
pub mod cli;
pub mod context;
pub mod crd;
pub mod jetstream;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod subscription;
pub mod topic;
pub mod webhook;
