//! The Kubernetes side of a generated certificate: kept in a Secret so that
//! every replica (and every restart) serves the same one, and its CA kept in
//! the `caBundle` of the MutatingWebhookConfiguration.
//!
//! A stored certificate is used while it is valid for the Service's name for
//! another 30 days, and replaced otherwise; each replica keeps the CA it
//! started with in `caBundle`, so replicas of different starts can disagree
//! for a while after a replacement, until they restart.
//!
//! Calls (the chart's RBAC must allow exactly these): Secrets `get`,
//! `create`, `update` in the operator's namespace; the
//! MutatingWebhookConfiguration `list`/`watch` (by `metadata.name` field
//! selector) and `patch`.

use std::collections::BTreeMap;

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};

use super::tls::{dns_names, TlsMaterial, CA_CRT, TLS_CRT, TLS_KEY};
use super::Error;

/// A stored certificate that expires within this is replaced.
const RENEW_BEFORE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// How often a lost race for the Secret (another replica wrote it between
/// our read and our write) is retried before giving up.
const SECRET_ATTEMPTS: usize = 5;
/// First and largest wait before patching `caBundle` again after a failure.
const PATCH_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const PATCH_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a generated certificate lives, and who trusts it.
#[derive(Debug, Clone)]
pub struct CertArgs {
    /// The webhook's Service; the certificate is for `{service}.{namespace}.svc`.
    pub service: String,
    /// The operator's namespace: the Service's and the Secret's.
    pub namespace: String,
    /// The Secret holding `tls.crt`, `tls.key` and `ca.crt`.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` gets the CA.
    pub webhook_config: String,
}

impl CertArgs {
    /// From `ferry-operator run`'s flags (`--webhook-service`,
    /// `--operator-namespace`, `--webhook-secret`, `--webhook-config`).
    pub fn from_run_args(args: &crate::cli::RunArgs) -> Self {
        CertArgs {
            service: args.webhook_service.clone(),
            namespace: args.operator_namespace.clone(),
            secret: args.webhook_secret.clone(),
            webhook_config: args.webhook_config.clone(),
        }
    }
}

/// The certificate in the Secret `args.secret`, made and stored there first
/// if the Secret does not exist or has none of the three keys. When another
/// replica creates or fills it at the same time (409), the stored one wins
/// and is returned. A Secret with only some of the keys, or with PEM that
/// does not make a working certificate, is an error: it was made by
/// someone else, and is not overwritten.
pub async fn ensure_certificate(client: kube::Client, args: &CertArgs) -> Result<TlsMaterial, Error> {
    let api: Api<Secret> = Api::namespaced(client, &args.namespace);
    let kube_err = |action: &str| {
        let action = format!("{action} Secret {}/{}", args.namespace, args.secret);
        move |source| Error::Kube { action, source }
    };
    for _ in 0..SECRET_ATTEMPTS {
        let stored = api.get_opt(&args.secret).await.map_err(kube_err("read"))?;
        let written = match stored {
            Some(secret) => {
                if let Some(material) = stored_material(&secret, args)? {
                    // Made for another Service name (the chart's names
                    // changed), or expiring (e.g. left by cert-manager, which
                    // no longer renews it): replace it.
                    let host = format!("{}.{}.svc", args.service, args.namespace);
                    match material.valid_for(&host, std::time::SystemTime::now() + RENEW_BEFORE) {
                        Ok(()) => return Ok(material),
                        Err(why) => tracing::warn!(
                            secret = %args.secret, %host, why,
                            "the stored webhook certificate will not do; generating a new one"
                        ),
                    }
                }
                let material = TlsMaterial::generate(&dns_names(&args.service, &args.namespace))?;
                let mut secret = secret;
                secret.data = Some(secret_data(&material));
                // Guarded by the resourceVersion we read: a 409 means
                // someone else wrote it in between.
                api.replace(&args.secret, &PostParams::default(), &secret).await.map(|_| material)
            }
            None => {
                let material = TlsMaterial::generate(&dns_names(&args.service, &args.namespace))?;
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(args.secret.clone()),
                        namespace: Some(args.namespace.clone()),
                        labels: Some(
                            [
                                ("app.kubernetes.io/managed-by".to_owned(), "ferry-operator".to_owned()),
                                ("app.kubernetes.io/component".to_owned(), "webhook".to_owned()),
                            ]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(secret_data(&material)),
                    ..Secret::default()
                };
                api.create(&PostParams::default(), &secret).await.map(|_| material)
            }
        };
        match written {
            Ok(material) => {
                tracing::info!(secret = %args.secret, namespace = %args.namespace, "stored a new webhook certificate");
                return Ok(material);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::info!(secret = %args.secret, "another replica stored the webhook certificate first; using it");
            }
            Err(e) => return Err(kube_err("write")(e)),
        }
    }
    Err(Error::SecretContention { secret: format!("{}/{}", args.namespace, args.secret) })
}

/// `Some` when the Secret holds a complete certificate, `None` when it holds
/// none of it.
fn stored_material(secret: &Secret, args: &CertArgs) -> Result<Option<TlsMaterial>, Error> {
    let data = secret.data.as_ref();
    let get = |key: &str| {
        data.and_then(|d| d.get(key)).filter(|v| !v.0.is_empty()).map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let bad = |detail: String| Error::StoredCertificate {
        secret: format!("{}/{}", args.namespace, args.secret),
        detail: format!("{detail}; delete the Secret to have a new certificate generated"),
    };
    match (get(TLS_CRT), get(TLS_KEY), get(CA_CRT)) {
        (None, None, None) => Ok(None),
        (Some(cert_pem), Some(key_pem), Some(ca_pem)) => {
            let material = TlsMaterial { cert_pem, key_pem, ca_pem: Some(ca_pem), source_dir: None };
            material.server_config().map_err(|e| bad(e.to_string()))?;
            Ok(Some(material))
        }
        _ => Err(bad(format!("it has only some of {TLS_CRT}, {TLS_KEY} and {CA_CRT}"))),
    }
}

fn secret_data(m: &TlsMaterial) -> BTreeMap<String, ByteString> {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    [
        (TLS_CRT.to_owned(), b(&m.cert_pem)),
        (TLS_KEY.to_owned(), b(&m.key_pem)),
        (CA_CRT.to_owned(), b(m.ca_pem.as_deref().unwrap_or_default())),
    ]
    .into()
}

/// The patch that puts `ca_pem` into the `caBundle` of every webhook of
/// `config` that does not have it yet; `None` when all have it. A strategic
/// merge patch keyed by webhook name, so nothing else in the object changes.
pub fn ca_bundle_patch(config: &MutatingWebhookConfiguration, ca_pem: &str) -> Option<serde_json::Value> {
    let stale: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes()))
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "clientConfig": { "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem) },
            })
        })
        .collect();
    (!stale.is_empty()).then(|| serde_json::json!({ "webhooks": stale }))
}

/// Keeps `ca_pem` in the `caBundle` of the MutatingWebhookConfiguration
/// `name`, for as long as it runs: it watches that one object and patches it
/// whenever it appears (Helm may create it after the operator starts) or its
/// `caBundle` changes (a `helm upgrade` renders it empty again). Failures
/// are logged and retried with the watcher's backoff; it never returns
/// while the API server answers.
pub async fn keep_ca_bundle(client: kube::Client, name: String, ca_pem: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut seen = false;
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let obj = match event {
            Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => obj,
            Ok(watcher::Event::Init) => {
                seen = false;
                continue;
            }
            Ok(watcher::Event::InitDone) if !seen => {
                tracing::warn!(
                    webhook_config = %name,
                    "MutatingWebhookConfiguration not found; its caBundle is patched as soon as it exists"
                );
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(webhook_config = %name, error = %e, "watching the webhook configuration");
                continue;
            }
        };
        seen = true;
        let Some(patch) = ca_bundle_patch(&obj, &ca_pem) else { continue };
        // An unchanged object brings no new event, so a failed patch is
        // retried here, with a capped backoff, until it lands or the object
        // is gone.
        let mut delay = PATCH_RETRY_FIRST;
        loop {
            match api.patch(&name, &PatchParams::default(), &Patch::Strategic(patch.clone())).await {
                Ok(_) => {
                    tracing::info!(webhook_config = %name, "patched the webhook CA into caBundle");
                    break;
                }
                Err(kube::Error::Api(status)) if status.is_not_found() => break,
                Err(e) => {
                    tracing::warn!(webhook_config = %name, error = %e, retry_in = ?delay, "could not patch caBundle");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(PATCH_RETRY_MAX);
                }
            }
        }
    }
}
