//! The HTTPS server: `POST /mutate` and `GET /healthz`, over rustls, HTTP/1.1
//! and HTTP/2 (the API server may use either).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::certs::keep_ca_bundle;
use super::config::InjectConfig;
use super::tls::{server_config, TlsMaterial, TLS_CRT, TLS_KEY};
use super::{inject, Error};

/// Largest request body. An AdmissionReview of a CREATE carries one pod,
/// which etcd caps at 1.5 MiB stored; its JSON may be larger, so this is
/// well above (axum's own default of 2 MiB is not).
const MAX_BODY_BYTES: usize = 8 << 20;
/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request head (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, how long requests in flight may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The routes, without TLS: `POST /mutate` and `GET /healthz`.
pub fn router(cfg: Arc<InjectConfig>) -> axum::Router {
    axum::Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(cfg)
}

async fn mutate(State(cfg): State<Arc<InjectConfig>>, body: Bytes) -> impl IntoResponse {
    let (status, review) = inject::answer(&body, &cfg);
    (status, [(header::CONTENT_TYPE, "application/json")], review.to_string())
}

/// The serving certificate, re-read from its directory when that changed.
enum Certificate {
    Fixed(Arc<rustls::ServerConfig>),
    Dir { dir: PathBuf, loaded: Mutex<Loaded> },
}

struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    config: Arc<rustls::ServerConfig>,
}

impl Certificate {
    fn new(tls: &TlsMaterial) -> Result<Self, Error> {
        let config = tls.server_config()?;
        Ok(match &tls.source_dir {
            None => Certificate::Fixed(config),
            Some(dir) => Certificate::Dir {
                dir: dir.clone(),
                loaded: Mutex::new(Loaded {
                    cert_pem: tls.cert_pem.clone().into_bytes(),
                    key_pem: tls.key_pem.clone().into_bytes(),
                    config,
                }),
            },
        })
    }

    /// The configuration for a new connection. Reading two small files per
    /// connection is cheap (the API server keeps its connections open), and
    /// comparing their bytes needs no file watcher and no timer.
    async fn current(&self) -> Arc<rustls::ServerConfig> {
        let (dir, loaded) = match self {
            Certificate::Fixed(config) => return config.clone(),
            Certificate::Dir { dir, loaded } => (dir, loaded),
        };
        let files = tokio::try_join!(tokio::fs::read(dir.join(TLS_CRT)), tokio::fs::read(dir.join(TLS_KEY)));
        let mut loaded = loaded.lock().expect("never poisoned: nothing panics while holding it");
        match files {
            Ok((cert, key)) if cert != loaded.cert_pem || key != loaded.key_pem => match server_config(&cert, &key) {
                Ok(config) => {
                    tracing::info!(dir = %dir.display(), "loaded the renewed webhook certificate");
                    *loaded = Loaded { cert_pem: cert, key_pem: key, config };
                }
                // Mid-rotation, or broken: keep serving the previous one.
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "keeping the previous webhook certificate"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot re-read the webhook certificate"),
        }
        loaded.config.clone()
    }
}

/// The webhook, bound and ready to serve.
pub struct Webhook {
    listener: TcpListener,
    certificate: Arc<Certificate>,
    cfg: Arc<InjectConfig>,
    ca_bundle: Option<(kube::Client, String, String)>,
}

impl Webhook {
    /// Binds `addr` (port 0: any free port) and checks the certificate.
    pub async fn bind(addr: SocketAddr, tls: &TlsMaterial, cfg: Arc<InjectConfig>) -> Result<Self, Error> {
        let certificate = Arc::new(Certificate::new(tls)?);
        let listener = crate::run::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        Ok(Webhook { listener, certificate, cfg, ca_bundle: None })
    }

    /// While serving, also keep `ca_pem` in the `caBundle` of the
    /// MutatingWebhookConfiguration `webhook_config` (see
    /// [`keep_ca_bundle`]).
    pub fn keep_ca_bundle(mut self, client: kube::Client, webhook_config: String, ca_pem: String) -> Self {
        self.ca_bundle = Some((client, webhook_config, ca_pem));
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound TCP listener has an address")
    }

    /// Serves until `shutdown` completes, then stops accepting and gives the
    /// requests in flight a few seconds to finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) {
        let Webhook { listener, certificate, cfg, ca_bundle } = self;
        let service = TowerToHyperService::new(router(cfg));
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        let http = Arc::new(http);
        let graceful = GracefulShutdown::new();
        let keeper = async move {
            if let Some((client, name, ca)) = ca_bundle {
                keep_ca_bundle(client, name, ca).await;
                tracing::warn!("webhook: stopped keeping caBundle");
            }
            // Serving goes on either way.
            std::future::pending::<()>().await
        };
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "webhook serving");
        let accept = async {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait, do not spin.
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (certificate, service, http, watcher) =
                    (certificate.clone(), service.clone(), http.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(certificate.current().await);
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "webhook TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
                    };
                    let conn = http.serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "webhook connection ended");
                    }
                });
            }
        };
        tokio::select! {
            () = accept => {}
            () = keeper => {}
            () = shutdown => {}
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
            tracing::warn!("webhook: requests still in flight after the drain timeout");
        }
    }
}
