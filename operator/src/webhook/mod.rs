//! The sidecar-injection webhook (a MutatingWebhookConfiguration on Pod
//! CREATE).
//!
//! What it promises:
//! - A pod annotated `ferry.dev/inject: "true"` with a valid
//!   `ferry.dev/app-id` (and, optionally, `ferry.dev/app-port` and the
//!   token Secret annotations) is admitted with a JSONPatch that adds the
//!   Ferry sidecar as a *native sidecar* (the first init container,
//!   `restartPolicy: Always`, a startup probe on `/readyz`, so the app
//!   starts after it and stops before it; Kubernetes 1.29 or later), its
//!   data volume, its env, and `FERRY_URL` in every app container
//!   ([`inject`]).
//! - A pod without the annotation, with `inject: "false"`, or that already
//!   has a `ferry-sidecar` container is admitted unchanged (so a second pass
//!   changes nothing). A bad annotation is refused with a message naming it.
//! - It serves HTTPS only ([`Webhook`]), with a certificate from
//!   `--webhook-cert-dir` (re-read when renewed) or one it generates, keeps
//!   in a Secret shared by all replicas, and whose CA it keeps in the
//!   webhook configuration's `caBundle` ([`certs`]).
//!
//! What it does not do: look at anything but Pods, call the API server while
//! answering a review, or rotate a generated certificate (valid ten years).
//!
//! For `ferry-operator run`: [`from_args`], then [`Webhook::serve`], on every
//! replica (not only the leader).

pub mod certs;
pub mod config;
pub mod inject;
mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use certs::{ensure_certificate, keep_ca_bundle, CertArgs};
pub use config::InjectConfig;
pub use inject::{answer, review};
pub use server::{router, Webhook};
pub use tls::TlsMaterial;

/// A failure to set the webhook up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--inject-config` does not parse or check.
    #[error("inject config {}: {problems}", path.display())]
    InjectConfig {
        /// The file.
        path: PathBuf,
        /// Every problem found, `; `-separated.
        problems: String,
    },
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate or key PEM that does not make a TLS server.
    #[error("webhook TLS: {detail}")]
    Tls {
        /// What is wrong.
        detail: String,
    },
    /// Generating a certificate failed.
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The Kubernetes API failed.
    #[error("kubernetes API: {action}: {source}")]
    Kube {
        /// What was being done (`read Secret ferry-system/ferry-webhook-tls`).
        action: String,
        /// The error.
        source: kube::Error,
    },
    /// The certificate Secret exists but is unusable.
    #[error("webhook certificate Secret {secret}: {detail}")]
    StoredCertificate {
        /// `namespace/name`.
        secret: String,
        /// What is wrong, and what to do.
        detail: String,
    },
    /// Writes of the certificate Secret kept conflicting.
    #[error("webhook certificate Secret {secret}: kept changing while being written; giving up")]
    SecretContention {
        /// `namespace/name`.
        secret: String,
    },
    /// The webhook address could not be bound.
    #[error("binding the webhook to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Error {
    /// A static label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InjectConfig { .. } => "InjectConfig",
            Error::ReadFile { .. } => "ReadFile",
            Error::Tls { .. } => "Tls",
            Error::Generate(_) => "GenerateCertificate",
            Error::Kube { .. } => "KubeApi",
            Error::StoredCertificate { .. } => "StoredCertificate",
            Error::SecretContention { .. } => "SecretContention",
            Error::Bind { .. } => "Bind",
        }
    }
}

/// The webhook `ferry-operator run`'s flags ask for, bound and ready to
/// [`serve`](Webhook::serve); `None` without `--webhook-addr`.
///
/// Reads `--inject-config`; takes the certificate from `--webhook-cert-dir`,
/// or else from (or into) the Secret `--webhook-secret` in
/// `--operator-namespace`, in which case the returned webhook also keeps the
/// CA in the `caBundle` of `--webhook-config` while it serves.
pub async fn from_args(client: kube::Client, args: &crate::cli::RunArgs) -> Result<Option<Webhook>, Error> {
    let Some(addr) = args.webhook_addr else { return Ok(None) };
    let cfg = Arc::new(InjectConfig::load(args.inject_config.as_deref())?);
    match &args.webhook_cert_dir {
        Some(dir) => Ok(Some(Webhook::bind(addr, &TlsMaterial::from_dir(dir)?, cfg).await?)),
        None => {
            let tls = ensure_certificate(client.clone(), &CertArgs::from_run_args(args)).await?;
            let ca = tls.ca_pem.clone().unwrap_or_default();
            let hook = Webhook::bind(addr, &tls, cfg).await?;
            Ok(Some(hook.keep_ca_bundle(client, args.webhook_config.clone(), ca)))
        }
    }
}
