//! The webhook's certificate: generated (a self-signed CA and a serving
//! certificate it signs), or read from a directory in cert-manager's Secret
//! format (`tls.crt`, `tls.key`, optional `ca.crt`); and the rustls server
//! configuration (ring provider) made from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Error;

/// File (and Secret key) of the serving certificate chain, PEM.
pub const TLS_CRT: &str = "tls.crt";
/// File (and Secret key) of the serving certificate's private key, PEM.
pub const TLS_KEY: &str = "tls.key";
/// File (and Secret key) of the CA certificate that signed it, PEM.
pub const CA_CRT: &str = "ca.crt";

/// How long a generated CA and serving certificate are valid: ten years.
/// They are not rotated; delete the Secret and restart the operator to
/// make new ones.
const VALIDITY: time::Duration = time::Duration::days(3650);

/// The webhook's certificate and key, and the CA clients should trust.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The serving certificate (then any intermediates), PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// The CA certificate, PEM; what goes into the webhook's `caBundle`.
    /// `None` when a certificate directory has no `ca.crt`.
    pub ca_pem: Option<String>,
    /// The directory the material was read from; the server re-reads it on
    /// each new connection, so a renewed certificate is served at once.
    pub(crate) source_dir: Option<PathBuf>,
}

impl std::fmt::Debug for TlsMaterial {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("source_dir", &self.source_dir).finish_non_exhaustive()
    }
}

/// The names the webhook's Service answers to, most specific first:
/// `{service}.{namespace}.svc` (what the API server uses),
/// `….svc.cluster.local`, `{service}.{namespace}` and `{service}`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
    ]
}

impl TlsMaterial {
    /// A fresh self-signed CA (ECDSA P-256) and a serving certificate for
    /// `dns_names` signed by it. The CA's key is dropped: nothing else is
    /// ever signed with it.
    pub fn generate(dns_names: &[String]) -> Result<Self, Error> {
        let now = time::OffsetDateTime::now_utc();
        // An hour back, for nodes whose clocks run a little behind ours.
        let not_before = now - time::Duration::hours(1);
        let not_after = now + VALIDITY;

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = name("ferry-webhook-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        (ca.not_before, ca.not_after) = (not_before, not_after);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(dns_names.to_vec())?;
        leaf.distinguished_name = name(dns_names.first().map_or("ferry-webhook", String::as_str));
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        (leaf.not_before, leaf.not_after) = (not_before, not_after);
        let cert = leaf.signed_by(&key, &issuer)?;

        Ok(TlsMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: Some(ca_cert.pem()),
            source_dir: None,
        })
    }

    /// Reads `tls.crt`, `tls.key` and (if present) `ca.crt` from `dir`, and
    /// checks that they make a server configuration. The server re-reads the
    /// directory when the files change (cert-manager renewals).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| Error::ReadFile { path, source })
        };
        let ca_pem = match read(CA_CRT) {
            Ok(ca) => Some(ca),
            Err(Error::ReadFile { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let material =
            TlsMaterial { cert_pem: read(TLS_CRT)?, key_pem: read(TLS_KEY)?, ca_pem, source_dir: Some(dir.to_owned()) };
        material.server_config()?;
        Ok(material)
    }

    /// The rustls server configuration (ring provider, TLS 1.2 and 1.3,
    /// ALPN `h2` and `http/1.1`). Fails on PEM without a certificate or a
    /// key, or a key that does not match the certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        server_config(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }

    /// Checks, as the API server will, that the certificate chains to the
    /// CA and is valid for `dns_name` at `at`: `Err` says why not (e.g. a
    /// stored certificate made for another Service, or about to expire).
    pub fn valid_for(&self, dns_name: &str, at: std::time::SystemTime) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        let ca_pem = self.ca_pem.as_deref().ok_or("no CA certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| format!("{CA_CRT}: {e}"))?).map_err(|e| format!("{CA_CRT}: {e}"))?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{TLS_CRT}: {e}"))?;
        let (end_entity, intermediates) = chain.split_first().ok_or(format!("{TLS_CRT}: no certificate"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(dns_name.to_owned()).map_err(|e| e.to_string())?;
        let now = rustls::pki_types::UnixTime::since_unix_epoch(
            at.duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?,
        );
        verifier.verify_server_cert(end_entity, intermediates, &name, &[], now).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// See [`TlsMaterial::server_config`].
pub(crate) fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, Error> {
    let tls = |detail: String| Error::Tls { detail };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(format!("{TLS_CRT}: {e}")))?;
    if chain.is_empty() {
        return Err(tls(format!("{TLS_CRT}: no PEM certificate in it")));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls(format!("{TLS_KEY}: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls(format!("{TLS_CRT} and {TLS_KEY}: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferry");
    dn.push(DnType::CommonName, common_name);
    dn
}
