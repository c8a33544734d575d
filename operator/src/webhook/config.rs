//! The injected sidecar's defaults, and the per-pod overrides.
//!
//! [`InjectConfig`] is read from the YAML file `--inject-config` names (the
//! Helm chart renders it into a ConfigMap, and its tests parse that with this
//! very type, so the shape is a contract). A pod may override a few fields
//! with the `ferry.dev/config` annotation ([`InjectConfig::with_overrides`]).

use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use super::Error;

/// Default sidecar image.
pub const DEFAULT_IMAGE: &str = "ghcr.io/ferry-dev/ferry-sidecar:0.1.0";
/// Default broker URL: the chart's optional NATS.
pub const DEFAULT_BROKER_URL: &str = "nats://nats.ferry-system.svc:4222";
/// Default port of the app-facing API (bound to 127.0.0.1 in the pod).
pub const DEFAULT_API_PORT: u16 = 7600;
/// Default port of the admin endpoints (`/healthz`, `/readyz`, `/metrics`).
pub const DEFAULT_ADMIN_PORT: u16 = 7601;
/// Default data directory in the sidecar (the outbox lives there).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferry";
/// Default data volume size: the emptyDir's `sizeLimit`, or the ephemeral
/// claim's storage request.
pub const DEFAULT_DATA_SIZE: &str = "1Gi";

/// Largest `maxMessageBytes`: the sidecar's own bound on
/// `FERRY_MAX_MESSAGE_BYTES` (64 MiB).
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 64 << 20;
/// The sidecar's default batch body limit (`FERRY_MAX_BATCH_BYTES`, 16
/// MiB), which must be at least its message limit: a larger
/// `maxMessageBytes` raises it too.
pub const SIDECAR_DEFAULT_BATCH_BYTES: u64 = 16 << 20;

/// Share of a sized data volume (percent) the outbox may fill: the
/// injected `FERRY_OUTBOX_MAX_BYTES`. The rest is for the sidecar's other
/// files (the dedupe stores of acked ids, segment indexes, the space a log
/// preallocates ahead). An emptyDir used past its `sizeLimit` gets the pod
/// evicted and the volume deleted, outbox and all; below it, a full outbox
/// answers produce calls 507/429 and loses nothing.
pub const OUTBOX_SHARE_PERCENT: u64 = 75;

/// The fields of [`InjectConfig`] a pod may set in its `ferry.dev/config`
/// annotation. The broker, the data directory and the pull policy are the
/// cluster admin's, so they are not among them.
pub const OVERRIDABLE: &[&str] = &[
    "image",
    "fsync",
    "logFormat",
    "apiPort",
    "adminPort",
    "dataVolume",
    "resources",
    "dedupeMaxIds",
    "dedupeWindow",
    "outboxRetention",
    "maxMessageBytes",
];

/// How the injected sidecar is configured. Every field has a default, so an
/// empty file (or no `--inject-config`) is valid; an unknown field is an
/// error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectConfig {
    /// Sidecar image. Default [`DEFAULT_IMAGE`].
    pub image: String,
    /// Pull policy of the sidecar image. Default `IfNotPresent`.
    pub image_pull_policy: PullPolicy,
    /// Where the sidecar's broker is.
    pub broker: BrokerConfig,
    /// How far the outbox fsyncs (`FERRY_FSYNC`): `always`, `interval` or
    /// `never` (also spelled `none`). Default `always`.
    pub fsync: Fsync,
    /// The sidecar's log format (`FERRY_LOG_FORMAT`). Default `json`.
    pub log_format: LogFormat,
    /// Port of the app-facing API on 127.0.0.1; the app containers get
    /// `FERRY_URL=http://127.0.0.1:{apiPort}`. Default 7600.
    pub api_port: u16,
    /// Port of `/healthz`, `/readyz` and `/metrics` on all interfaces; the
    /// probes use it. Default 7601.
    pub admin_port: u16,
    /// Absolute path of the data directory in the sidecar, where the data
    /// volume is mounted. Default [`DEFAULT_DATA_DIR`].
    pub data_dir: String,
    /// The volume behind the data directory.
    pub data_volume: DataVolume,
    /// The sidecar container's resources. Default: requests `cpu: 50m`,
    /// `memory: 32Mi`; limits `memory: 128Mi`.
    pub resources: ResourceRequirements,
    /// Most acked ids the sidecar's dedupe stores remember, all
    /// subscriptions together (`FERRY_DEDUPE_MAX_IDS`, about 37–65 bytes
    /// of memory each). Unset: the sidecar's default (500 000), sized for
    /// the default memory limit; raise both together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe_max_ids: Option<u64>,
    /// How long the sidecar remembers the ids the app acked, so that a
    /// copy the broker delivers again is acked without reaching the app
    /// (`FERRY_DEDUPE_WINDOW`, a duration like `10m` or `1h 30m`). Unset:
    /// the sidecar's default (10 minutes). Within `dedupeMaxIds`: a longer
    /// window only holds more ids at low rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe_window: Option<String>,
    /// How long forwarded messages stay in the outbox after the broker
    /// confirmed them, for a replay after the broker lost them
    /// (`FERRY_OUTBOX_RETENTION`, a duration like `10m`). Unset: the
    /// sidecar's default (none). Given up when produce needs the room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_retention: Option<String>,
    /// Largest message body the sidecar takes, in bytes
    /// (`FERRY_MAX_MESSAGE_BYTES`, 1 to 64 MiB; above 16 MiB the batch
    /// limit `FERRY_MAX_BATCH_BYTES` is raised to it too). Unset: the
    /// sidecar's default (1 MiB). A Topic's `maxMessageSize` above it is
    /// refused by the sidecar, so raise it for such topics (and the NATS
    /// server's `max_payload` with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u64>,
}

/// The broker the injected sidecars use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// NATS URL(s), comma-separated (`FERRY_BROKER`). Default
    /// [`DEFAULT_BROKER_URL`].
    pub url: String,
    /// Name of a Secret in the pod's namespace with the key `creds` (a NATS
    /// credentials file); mounted read-only at `/etc/ferry/broker`. Empty
    /// (the default): no credentials.
    pub credentials_secret: String,
    /// Name of a Secret in the pod's namespace with the key `ca.crt`: the
    /// CA that signed the broker's TLS certificate, when no public one did
    /// (`FERRY_BROKER_TLS_CA`); mounted read-only at `/etc/ferry/broker-ca`.
    /// Empty (the default): the system's roots.
    #[serde(rename = "tlsCASecret")]
    pub tls_ca_secret: String,
}

/// `FERRY_FSYNC`: how far the sidecar's outbox fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Each Topic's persistence decides; a durable topic is fsynced before a
    /// produce is answered.
    #[default]
    Always,
    /// Every topic at most an interval behind (a power loss loses that much).
    Interval,
    /// Left to the OS. Also spelled `none`, as DESIGN.md does; written
    /// back (and into `FERRY_FSYNC`) as `never`, the sidecar's spelling.
    #[serde(alias = "none")]
    Never,
}

/// `FERRY_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (what log collectors want).
    #[default]
    Json,
}

/// A container image pull policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when the node does not have the image.
    #[default]
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The data volume, named `ferry-data`. A pod that already has a volume of
/// that name keeps it (that is how a StatefulSet gives the sidecar a
/// persistent volume claim).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DataVolume {
    /// `emptyDir` (the default) or `ephemeral` (a generic ephemeral volume: a
    /// PVC per pod, deleted with it).
    #[serde(rename = "type")]
    pub kind: DataVolumeKind,
    /// The emptyDir's `sizeLimit` (empty: no limit), or the ephemeral claim's
    /// storage request (required). Default [`DEFAULT_DATA_SIZE`].
    pub size_limit: Quantity,
    /// Storage class of the ephemeral claim; empty (the default): the
    /// cluster's default class. Ignored for `emptyDir`.
    pub storage_class_name: String,
}

impl DataVolume {
    /// The volume's size in bytes (`None`: no limit), or why `sizeLimit` is
    /// not one.
    pub fn size_bytes(&self) -> Result<Option<u64>, String> {
        let q = self.size_limit.0.trim();
        if q.is_empty() {
            return Ok(None);
        }
        let bad = |why: &str| format!("dataVolume.sizeLimit: {q:?} {why}");
        let parsed = kube_quantity::ParsedQuantity::try_from(q).map_err(|e| bad(&format!("is not a quantity: {e}")))?;
        match parsed.to_bytes_f64() {
            Some(b) if b >= 1.0 && b < u64::MAX as f64 => Ok(Some(b as u64)),
            _ => Err(bad("is not a size in bytes")),
        }
    }

    /// The outbox's byte limit on this volume: [`OUTBOX_SHARE_PERCENT`] of
    /// its size; `None` without a (valid) size.
    pub fn outbox_bytes(&self) -> Option<u64> {
        let size = self.size_bytes().ok().flatten()?;
        Some(size / 100 * OUTBOX_SHARE_PERCENT + size % 100 * OUTBOX_SHARE_PERCENT / 100)
    }
}

/// The kinds of data volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataVolumeKind {
    /// Node-local scratch space, gone with the pod.
    #[default]
    EmptyDir,
    /// A PVC per pod, created and deleted with it.
    Ephemeral,
}

impl Default for InjectConfig {
    fn default() -> Self {
        let q = |s: &str| Quantity(s.to_owned());
        InjectConfig {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: PullPolicy::default(),
            broker: BrokerConfig::default(),
            fsync: Fsync::default(),
            log_format: LogFormat::default(),
            api_port: DEFAULT_API_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            data_dir: DEFAULT_DATA_DIR.to_owned(),
            data_volume: DataVolume::default(),
            resources: ResourceRequirements {
                requests: Some([("cpu".to_owned(), q("50m")), ("memory".to_owned(), q("32Mi"))].into()),
                limits: Some([("memory".to_owned(), q("128Mi"))].into()),
                claims: None,
            },
            dedupe_max_ids: None,
            dedupe_window: None,
            outbox_retention: None,
            max_message_bytes: None,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: DEFAULT_BROKER_URL.to_owned(),
            credentials_secret: String::new(),
            tls_ca_secret: String::new(),
        }
    }
}

impl Default for DataVolume {
    fn default() -> Self {
        DataVolume {
            kind: DataVolumeKind::default(),
            size_limit: Quantity(DEFAULT_DATA_SIZE.to_owned()),
            storage_class_name: String::new(),
        }
    }
}

impl Fsync {
    /// The value of `FERRY_FSYNC`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Interval => "interval",
            Fsync::Never => "never",
        }
    }
}

impl LogFormat {
    /// The value of `FERRY_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl PullPolicy {
    /// The value of a container's `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

impl InjectConfig {
    /// Parses and checks the YAML of `--inject-config`. An empty document
    /// is all defaults. The error names the field (`dataVolume.type: ...`)
    /// and lists every problem.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(InjectConfig::default());
        }
        // serde_yaml's errors already name the field's path and line.
        let cfg: InjectConfig = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads `--inject-config`; without one, the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let Some(path) = path else { return Ok(InjectConfig::default()) };
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile { path: path.to_owned(), source })?;
        InjectConfig::from_yaml(&text).map_err(|problems| Error::InjectConfig { path: path.to_owned(), problems })
    }

    /// This configuration with a pod's `ferry.dev/config` annotation merged
    /// over it. The annotation is a JSON object of [`OVERRIDABLE`] fields,
    /// applied as a JSON merge patch (RFC 7386): `{"resources": {"limits":
    /// {"memory": "256Mi"}}}` changes only that limit, `null` removes a
    /// value. Unknown or non-overridable keys, wrong types and a result that
    /// fails [`InjectConfig::check`] are errors.
    pub fn with_overrides(&self, annotation: &str) -> Result<InjectConfig, String> {
        let overrides: serde_json::Value =
            serde_json::from_str(annotation).map_err(|e| format!("not valid JSON: {e}"))?;
        let Some(fields) = overrides.as_object() else {
            return Err("must be a JSON object".to_owned());
        };
        let unknown: Vec<&str> = fields.keys().map(String::as_str).filter(|k| !OVERRIDABLE.contains(k)).collect();
        if !unknown.is_empty() {
            return Err(format!(
                "unknown or non-overridable field(s) {}; a pod may set only {}",
                unknown.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                OVERRIDABLE.join(", ")
            ));
        }
        let mut merged = serde_json::to_value(self).expect("an InjectConfig always serializes");
        json_patch::merge(&mut merged, &overrides);
        let cfg: InjectConfig = serde_path_to_error::deserialize(merged).map_err(|e| path_error(&e))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ports set and distinct, an absolute data
    /// directory, a size for an ephemeral claim, a size that is a quantity,
    /// a dedupe cap of at least 1, a dedupe window that is a duration.
    /// Lists every problem.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.image.trim().is_empty() {
            problems.push("image: must not be empty".to_owned());
        }
        if self.broker.url.trim().is_empty() {
            problems.push("broker.url: must not be empty".to_owned());
        }
        if self.api_port == 0 {
            problems.push("apiPort: must be 1-65535".to_owned());
        }
        if self.admin_port == 0 {
            problems.push("adminPort: must be 1-65535".to_owned());
        }
        if self.api_port == self.admin_port {
            problems.push(format!("apiPort and adminPort: both are {}; they must differ", self.api_port));
        }
        if !self.data_dir.starts_with('/') {
            problems.push(format!("dataDir: {:?} is not an absolute path", self.data_dir));
        }
        if self.data_volume.kind == DataVolumeKind::Ephemeral && self.data_volume.size_limit.0.trim().is_empty() {
            problems.push("dataVolume.sizeLimit: an ephemeral volume needs a size".to_owned());
        }
        if let Err(e) = self.data_volume.size_bytes() {
            problems.push(e);
        }
        if self.dedupe_max_ids == Some(0) {
            problems.push("dedupeMaxIds: must be at least 1".to_owned());
        }
        if let Some(n) = self.max_message_bytes {
            if n == 0 || n > MAX_MESSAGE_BYTES_LIMIT {
                problems.push(format!("maxMessageBytes: {n} must be 1 to {MAX_MESSAGE_BYTES_LIMIT} (64 MiB)"));
            }
        }
        if let Some(w) = &self.dedupe_window {
            match humantime::parse_duration(w.trim()) {
                Err(e) => problems.push(format!("dedupeWindow: {w:?} is not a duration like 10m ({e})")),
                Ok(d) if d > ferry_api::MAX_DEDUPE_WINDOW => {
                    problems.push(format!("dedupeWindow: {w:?} is longer than 366 days"))
                }
                Ok(_) => {}
            }
        }
        if let Some(r) = &self.outbox_retention {
            if let Err(e) = humantime::parse_duration(r.trim()) {
                problems.push(format!("outboxRetention: {r:?} is not a duration like 10m ({e})"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// `path.to.field: message`, or the message alone at the top level.
fn path_error<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}
