//! The mutation itself: from an `AdmissionReview` of a Pod to a JSONPatch
//! that adds the Ferry sidecar. Pure (no client, no IO), so its tests need
//! neither a cluster nor a server.
//!
//! The patch is built as explicit `add` operations at the few places that
//! change (`spec.initContainers`, `spec.volumes`, each app container's
//! `env`, and `spec.securityContext.fsGroup` when needed), against the
//! object exactly as the API server sent it. So fields this operator's
//! Kubernetes types do not know are never touched.

use axum::http::StatusCode;
use base64::Engine;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, EphemeralVolumeSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate, PodSpec,
    Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, Status};
use serde_json::{json, Value};

use super::config::{DataVolumeKind, InjectConfig};

/// `"true"` asks for the sidecar, `"false"` (or no annotation) does not.
pub const ANNOTATION_INJECT: &str = "ferry.dev/inject";
/// The app id (a DNS-1123 label): Subscriptions with `app: <id>` deliver to
/// this pod. Required with `inject: "true"`.
pub const ANNOTATION_APP_ID: &str = "ferry.dev/app-id";
/// The port the app listens on for pushed messages (`FERRY_APP_PORT`).
/// Optional: an app that only produces, or only pulls, takes no pushes.
pub const ANNOTATION_APP_PORT: &str = "ferry.dev/app-port";
/// Optional: the name of a Secret in the pod's namespace whose key
/// [`TOKEN_KEY`] is the bearer token the app must send on every call to the
/// sidecar's API (`FERRY_API_TOKEN`). Without it the API takes any caller.
pub const ANNOTATION_API_TOKEN_SECRET: &str = "ferry.dev/api-token-secret";
/// Optional: the name of a Secret in the pod's namespace whose key
/// [`TOKEN_KEY`] is the bearer token the sidecar sends on every push to the
/// app (`FERRY_APP_TOKEN`), so the app can tell the sidecar from others.
pub const ANNOTATION_APP_TOKEN_SECRET: &str = "ferry.dev/app-token-secret";
/// Optional JSON object of [`InjectConfig`] overrides (see
/// [`InjectConfig::with_overrides`]).
pub const ANNOTATION_CONFIG: &str = "ferry.dev/config";

/// Name of the injected container; a pod that has a container of this name
/// is left as it is.
pub const SIDECAR_NAME: &str = "ferry-sidecar";
/// Name of the data volume.
pub const DATA_VOLUME: &str = "ferry-data";
/// Name of the broker credentials volume.
pub const BROKER_VOLUME: &str = "ferry-broker";
/// Where the broker credentials Secret is mounted.
pub const BROKER_MOUNT: &str = "/etc/ferry/broker";
/// The key of the broker credentials Secret (and its file name).
pub const BROKER_CREDS_KEY: &str = "creds";
/// Name of the volume of the CA that signed the broker's TLS certificate.
pub const BROKER_CA_VOLUME: &str = "ferry-broker-ca";
/// Where the broker CA Secret is mounted.
pub const BROKER_CA_MOUNT: &str = "/etc/ferry/broker-ca";
/// The key of the broker CA Secret (and its file name), as cert-manager
/// and `kubectl create secret tls` name a CA certificate.
pub const BROKER_CA_KEY: &str = "ca.crt";
/// The key of the Secrets the token annotations name.
pub const TOKEN_KEY: &str = "token";
/// The env var the app containers find the sidecar's API with.
pub const FERRY_URL: &str = "FERRY_URL";
/// The user and group the sidecar runs as (distroless `nonroot`); also the
/// `fsGroup` given to a pod whose data volume is not an emptyDir.
pub const SIDECAR_UID: i64 = 65532;
/// Name of the sidecar's admin port.
pub const ADMIN_PORT_NAME: &str = "ferry-admin";

/// Startup probe: every second, for up to five minutes (outbox recovery and
/// the first broker connection happen before `/readyz` answers 200).
const STARTUP_PERIOD_SECONDS: i32 = 1;
const STARTUP_FAILURE_THRESHOLD: i32 = 300;

/// What the webhook does with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit it unchanged, for this reason.
    Unchanged(&'static str),
    /// Refuse it with this message (names the annotation and the problem).
    Refuse(String),
    /// Admit it with this patch.
    Patch(json_patch::Patch),
}

/// Answers an `AdmissionReview` (v1) of a Pod: the response echoes the
/// request's uid and apiVersion; it allows the pod unchanged, allows it
/// with a JSONPatch, or refuses it (`allowed: false`, code 400) with the
/// reason. Only CREATE is mutated; anything else is allowed unchanged.
pub fn review(review: AdmissionReview<DynamicObject>, cfg: &InjectConfig) -> AdmissionReview<DynamicObject> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(req) => req,
        Err(e) => return AdmissionResponse::invalid(e).into_review(),
    };
    let response = AdmissionResponse::from(&req);
    let pod = match (&req.operation, &req.object) {
        (Operation::Create, Some(obj)) => serde_json::to_value(obj).expect("a DynamicObject always serializes"),
        _ => return response.into_review(),
    };
    let response = match decide(&pod, cfg) {
        Decision::Unchanged(_) => response,
        Decision::Refuse(message) => {
            tracing::info!(
                uid = %req.uid,
                namespace = req.namespace.as_deref().unwrap_or(""),
                pod = %pod_name(&pod),
                reason = %message,
                "refused a pod asking for the Ferry sidecar"
            );
            let mut response = response.deny(&message);
            response.result = Status::failure(&message, "BadRequest").with_code(400);
            response
        }
        Decision::Patch(patch) => match response.with_patch(patch) {
            Ok(response) => response,
            Err(e) => AdmissionResponse::from(&req).deny(format!("ferry webhook: {e}")),
        },
    };
    response.into_review()
}

/// The HTTP answer to a request body: 200 and the response review, or 400
/// and an invalid-request review for a body that is not an AdmissionReview.
/// The patch is a base64 string, the wire format the API documents (kube's
/// type would write an array of numbers).
pub fn answer(body: &[u8], cfg: &InjectConfig) -> (StatusCode, Value) {
    let (status, review) = match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body) {
        Ok(req) => (StatusCode::OK, review(req, cfg)),
        Err(e) => {
            (StatusCode::BAD_REQUEST, AdmissionResponse::invalid(format!("not an AdmissionReview: {e}")).into_review())
        }
    };
    let mut json = to_json(&review);
    if let Some(patch) = json.pointer_mut("/response/patch") {
        if let Ok(bytes) = serde_json::from_value::<Vec<u8>>(patch.clone()) {
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    (status, json)
}

/// Decides about one pod, given as the JSON the API server sent.
pub fn decide(pod: &Value, cfg: &InjectConfig) -> Decision {
    let meta: ObjectMeta = match serde_json::from_value(pod.get("metadata").cloned().unwrap_or_else(|| json!({}))) {
        Ok(meta) => meta,
        Err(e) => return Decision::Refuse(format!("ferry webhook: unreadable pod metadata: {e}")),
    };
    let annotations = meta.annotations.unwrap_or_default();
    match annotations.get(ANNOTATION_INJECT).map(String::as_str) {
        None | Some("false") => return Decision::Unchanged("not asked for"),
        Some("true") => {}
        Some(other) => {
            return Decision::Refuse(format!(
                "annotation {ANNOTATION_INJECT}: {other:?} is neither \"true\" nor \"false\""
            ))
        }
    }
    let spec: PodSpec = match serde_json::from_value(pod.get("spec").cloned().unwrap_or(Value::Null)) {
        Ok(spec) => spec,
        Err(e) => return Decision::Refuse(format!("ferry webhook: unreadable pod spec: {e}")),
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if init.iter().chain(&spec.containers).any(|c| c.name == SIDECAR_NAME) {
        return Decision::Unchanged("already has the sidecar");
    }
    match Wanted::from_annotations(&annotations, cfg, &spec) {
        Ok(wanted) => Decision::Patch(wanted.patch(&spec)),
        Err(problems) => Decision::Refuse(problems.join("; ")),
    }
}

/// The validated request of one pod.
struct Wanted {
    app_id: String,
    app_port: Option<u16>,
    /// Secret names of `FERRY_API_TOKEN` and `FERRY_APP_TOKEN`.
    api_token_secret: Option<String>,
    app_token_secret: Option<String>,
    cfg: InjectConfig,
}

impl Wanted {
    /// Reads and checks the annotations; every problem is reported.
    fn from_annotations(
        annotations: &std::collections::BTreeMap<String, String>,
        defaults: &InjectConfig,
        spec: &PodSpec,
    ) -> Result<Wanted, Vec<String>> {
        let mut problems = Vec::new();
        let app_id = match annotations.get(ANNOTATION_APP_ID).map(|s| s.trim()) {
            None | Some("") => {
                problems.push(format!("annotation {ANNOTATION_APP_ID} is required with {ANNOTATION_INJECT}: \"true\""));
                String::new()
            }
            Some(id) if !is_dns1123_label(id) => {
                problems.push(format!(
                    "annotation {ANNOTATION_APP_ID}: {id:?} is not a DNS-1123 label (at most 63 lowercase letters, \
                     digits and '-', starting and ending with a letter or digit)"
                ));
                String::new()
            }
            Some(id) => id.to_owned(),
        };
        // Absent: the app takes no pushes. Present, even empty, it must be a
        // port: a typo should not quietly turn pushes off.
        let app_port = match annotations.get(ANNOTATION_APP_PORT).map(|s| s.trim()) {
            None => None,
            Some("") => {
                problems.push(format!(
                    "annotation {ANNOTATION_APP_PORT} is empty; give the app's port, or leave the annotation out for \
                     an app that takes no pushes"
                ));
                None
            }
            Some(port) => match port.parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    problems.push(format!("annotation {ANNOTATION_APP_PORT}: {port:?} is not a port number (1-65535)"));
                    None
                }
            },
        };
        let api_token_secret = secret_name(annotations, ANNOTATION_API_TOKEN_SECRET, &mut problems);
        let app_token_secret = secret_name(annotations, ANNOTATION_APP_TOKEN_SECRET, &mut problems);
        let cfg = match annotations.get(ANNOTATION_CONFIG) {
            None => Some(defaults.clone()),
            Some(json) => match defaults.with_overrides(json) {
                Ok(cfg) => Some(cfg),
                Err(e) => {
                    problems.push(format!("annotation {ANNOTATION_CONFIG}: {e}"));
                    None
                }
            },
        };
        if spec.host_network == Some(true) {
            // Its ports would be the node's: a second such pod on the node
            // could not start, and any process there could call the API.
            problems.push(format!(
                "annotation {ANNOTATION_INJECT}: a pod with hostNetwork: true cannot have the Ferry sidecar (its \
                 ports would be the node's)"
            ));
        } else if let Some(cfg) = &cfg {
            problems.extend(port_conflicts(cfg, app_port, spec));
        }
        match cfg {
            Some(cfg) if problems.is_empty() => {
                Ok(Wanted { app_id, app_port, api_token_secret, app_token_secret, cfg })
            }
            _ => Err(problems),
        }
    }

    /// The JSONPatch that adds the sidecar to a pod with this `spec`.
    fn patch(&self, spec: &PodSpec) -> json_patch::Patch {
        let mut ops = Vec::new();
        let own_data_volume = spec.volumes.iter().flatten().any(|v| v.name == DATA_VOLUME);
        let sidecar = to_json(&self.sidecar(own_data_volume));
        // First among the init containers: the ones after it (and the app)
        // start once its startup probe passes.
        match &spec.init_containers {
            Some(_) => ops.push(add(&["spec", "initContainers", "0"], sidecar)),
            None => ops.push(add(&["spec", "initContainers"], Value::Array(vec![sidecar]))),
        }
        let has_volume = |name: &str| spec.volumes.iter().flatten().any(|v| v.name == name);
        let mut volumes: Vec<Value> = self.volumes().iter().filter(|v| !has_volume(&v.name)).map(to_json).collect();
        if !volumes.is_empty() {
            match &spec.volumes {
                Some(_) => ops.extend(volumes.drain(..).map(|v| add(&["spec", "volumes", "-"], v))),
                None => ops.push(add(&["spec", "volumes"], Value::Array(volumes))),
            }
        }
        if self.needs_fs_group(spec) {
            match &spec.security_context {
                Some(_) => ops.push(add(&["spec", "securityContext", "fsGroup"], SIDECAR_UID.into())),
                None => ops.push(add(&["spec", "securityContext"], json!({ "fsGroup": SIDECAR_UID }))),
            }
        }
        let url = to_json(&env(FERRY_URL, format!("http://127.0.0.1:{}", self.cfg.api_port)));
        for (i, c) in spec.containers.iter().enumerate() {
            let i = i.to_string();
            match &c.env {
                Some(env) if env.iter().any(|e| e.name == FERRY_URL) => {}
                Some(_) => ops.push(add(&["spec", "containers", &i, "env", "-"], url.clone())),
                None => ops.push(add(&["spec", "containers", &i, "env"], Value::Array(vec![url.clone()]))),
            }
        }
        json_patch::Patch(ops)
    }

    /// A volume other than an emptyDir (world-writable) belongs to root
    /// unless the pod has an `fsGroup`; the non-root sidecar could not write
    /// to it.
    fn needs_fs_group(&self, spec: &PodSpec) -> bool {
        if spec.security_context.as_ref().and_then(|s| s.fs_group).is_some() {
            return false;
        }
        let own = spec.volumes.iter().flatten().find(|v| v.name == DATA_VOLUME);
        match own {
            Some(v) => v.empty_dir.is_none(),
            None => self.cfg.data_volume.kind != DataVolumeKind::EmptyDir,
        }
    }

    fn credentials_secret(&self) -> Option<&str> {
        Some(self.cfg.broker.credentials_secret.trim()).filter(|s| !s.is_empty())
    }

    fn tls_ca_secret(&self) -> Option<&str> {
        Some(self.cfg.broker.tls_ca_secret.trim()).filter(|s| !s.is_empty())
    }

    /// The volumes the sidecar needs (the pod's own of the same name win).
    fn volumes(&self) -> Vec<Volume> {
        let dv = &self.cfg.data_volume;
        let size = Some(dv.size_limit.clone()).filter(|q| !q.0.trim().is_empty());
        let data = match dv.kind {
            DataVolumeKind::EmptyDir => Volume {
                name: DATA_VOLUME.to_owned(),
                empty_dir: Some(EmptyDirVolumeSource { size_limit: size, ..EmptyDirVolumeSource::default() }),
                ..Volume::default()
            },
            DataVolumeKind::Ephemeral => Volume {
                name: DATA_VOLUME.to_owned(),
                ephemeral: Some(EphemeralVolumeSource {
                    volume_claim_template: Some(PersistentVolumeClaimTemplate {
                        metadata: Some(ObjectMeta {
                            labels: Some([("app.kubernetes.io/part-of".to_owned(), "ferry".to_owned())].into()),
                            ..ObjectMeta::default()
                        }),
                        spec: PersistentVolumeClaimSpec {
                            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                            resources: Some(VolumeResourceRequirements {
                                requests: size.map(|q| [("storage".to_owned(), q)].into()),
                                limits: None,
                            }),
                            storage_class_name: Some(dv.storage_class_name.trim().to_owned()).filter(|s| !s.is_empty()),
                            ..PersistentVolumeClaimSpec::default()
                        },
                    }),
                }),
                ..Volume::default()
            },
        };
        let secret_volume = |name: &str, secret: &str, key: &str| Volume {
            name: name.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                items: Some(vec![KeyToPath { key: key.to_owned(), path: key.to_owned(), ..KeyToPath::default() }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        };
        let mut volumes = vec![data];
        if let Some(secret) = self.credentials_secret() {
            volumes.push(secret_volume(BROKER_VOLUME, secret, BROKER_CREDS_KEY));
        }
        if let Some(secret) = self.tls_ca_secret() {
            volumes.push(secret_volume(BROKER_CA_VOLUME, secret, BROKER_CA_KEY));
        }
        volumes
    }

    /// The native sidecar: an init container with `restartPolicy: Always`.
    /// Unless the pod brings its own data volume (`own_data_volume`: its
    /// size is not ours to know), the outbox is limited to a share of the
    /// injected volume's size, so that it fills up before the volume does.
    fn sidecar(&self, own_data_volume: bool) -> Container {
        let cfg = &self.cfg;
        let mut env = vec![self::env("FERRY_APP_ID", self.app_id.clone())];
        if let Some(port) = self.app_port {
            env.push(self::env("FERRY_APP_PORT", port.to_string()));
        }
        env.extend([
            field_env("FERRY_NAMESPACE", "metadata.namespace"),
            field_env("FERRY_POD_NAME", "metadata.name"),
            self::env("FERRY_BROKER", cfg.broker.url.trim().to_owned()),
            self::env("FERRY_DATA_DIR", cfg.data_dir.clone()),
            self::env("FERRY_API_ADDR", format!("127.0.0.1:{}", cfg.api_port)),
            self::env("FERRY_ADMIN_ADDR", format!("[::]:{}", cfg.admin_port)),
            self::env("FERRY_FSYNC", cfg.fsync.as_str().to_owned()),
            self::env("FERRY_LOG_FORMAT", cfg.log_format.as_str().to_owned()),
        ]);
        if let Some(secret) = &self.api_token_secret {
            env.push(secret_env("FERRY_API_TOKEN", secret));
        }
        if let Some(secret) = &self.app_token_secret {
            env.push(secret_env("FERRY_APP_TOKEN", secret));
        }
        if let Some(n) = cfg.dedupe_max_ids {
            env.push(self::env("FERRY_DEDUPE_MAX_IDS", n.to_string()));
        }
        if let Some(w) = &cfg.dedupe_window {
            env.push(self::env("FERRY_DEDUPE_WINDOW", w.trim().to_owned()));
        }
        if let Some(r) = &cfg.outbox_retention {
            env.push(self::env("FERRY_OUTBOX_RETENTION", r.trim().to_owned()));
        }
        if let Some(n) = cfg.max_message_bytes {
            env.push(self::env("FERRY_MAX_MESSAGE_BYTES", n.to_string()));
            // The sidecar refuses a batch limit below its message limit.
            if n > super::config::SIDECAR_DEFAULT_BATCH_BYTES {
                env.push(self::env("FERRY_MAX_BATCH_BYTES", n.to_string()));
            }
        }
        if let Some(bytes) = cfg.data_volume.outbox_bytes().filter(|_| !own_data_volume) {
            env.push(self::env("FERRY_OUTBOX_MAX_BYTES", bytes.to_string()));
        }
        let mut mounts = vec![VolumeMount {
            name: DATA_VOLUME.to_owned(),
            mount_path: cfg.data_dir.clone(),
            ..VolumeMount::default()
        }];
        let read_only = |name: &str, path: &str| VolumeMount {
            name: name.to_owned(),
            mount_path: path.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        };
        if self.credentials_secret().is_some() {
            env.push(self::env("FERRY_BROKER_CREDS", format!("{BROKER_MOUNT}/{BROKER_CREDS_KEY}")));
            mounts.push(read_only(BROKER_VOLUME, BROKER_MOUNT));
        }
        if self.tls_ca_secret().is_some() {
            env.push(self::env("FERRY_BROKER_TLS_CA", format!("{BROKER_CA_MOUNT}/{BROKER_CA_KEY}")));
            mounts.push(read_only(BROKER_CA_VOLUME, BROKER_CA_MOUNT));
        }
        let http_probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::Int(i32::from(cfg.admin_port)),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        };
        Container {
            name: SIDECAR_NAME.to_owned(),
            image: Some(cfg.image.clone()),
            image_pull_policy: Some(cfg.image_pull_policy.as_str().to_owned()),
            restart_policy: Some("Always".to_owned()),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some(ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(cfg.admin_port),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            }]),
            startup_probe: Some(Probe {
                period_seconds: Some(STARTUP_PERIOD_SECONDS),
                failure_threshold: Some(STARTUP_FAILURE_THRESHOLD),
                ..http_probe("/readyz")
            }),
            liveness_probe: Some(Probe {
                period_seconds: Some(10),
                failure_threshold: Some(3),
                ..http_probe("/healthz")
            }),
            resources: Some(cfg.resources.clone()),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(SIDECAR_UID),
                run_as_group: Some(SIDECAR_UID),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), localhost_profile: None }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(mounts),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        }
    }
}

/// The sidecar's ports must not be taken by the app: the containers of a
/// pod share one network namespace.
fn port_conflicts(cfg: &InjectConfig, app_port: Option<u16>, spec: &PodSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let ours = [(cfg.api_port, "API port (apiPort)"), (cfg.admin_port, "admin port (adminPort)")];
    for (port, what) in ours {
        if app_port == Some(port) {
            problems.push(format!(
                "annotation {ANNOTATION_APP_PORT}: {port} is the Ferry sidecar's {what}; pick another, or move the \
                 sidecar's with {ANNOTATION_CONFIG}"
            ));
        }
        for c in &spec.containers {
            if c.ports.iter().flatten().any(|p| p.container_port == i32::from(port)) {
                problems.push(format!(
                    "container {:?} declares port {port}, the Ferry sidecar's {what}; move the sidecar's with \
                     annotation {ANNOTATION_CONFIG}",
                    c.name
                ));
            }
        }
    }
    problems
}

/// The value of the optional Secret-name annotation `key`: `None` when it
/// is absent, or when it is not a Secret name (then the problem is pushed).
fn secret_name(
    annotations: &std::collections::BTreeMap<String, String>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let name = annotations.get(key)?.trim();
    if name.is_empty() {
        // Not "no token": the pod asked for auth, and would run without it.
        problems.push(format!("annotation {key} is empty; name a Secret, or leave the annotation out"));
        None
    } else if !is_dns1123_subdomain(name) {
        problems.push(format!(
            "annotation {key}: {name:?} is not a Secret name (a DNS-1123 subdomain: at most 253 lowercase letters, \
             digits, '-' and '.', starting and ending with a letter or digit)"
        ));
        None
    } else {
        Some(name.to_owned())
    }
}

/// RFC 1123 label, as Kubernetes checks it: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`,
/// at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_label_shaped(s)
}

/// RFC 1123 subdomain (the names of most objects, Secrets among them), as
/// Kubernetes checks it: labels joined by '.', each
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 253 characters in all.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_shaped)
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, of any length.
fn is_label_shaped(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.iter().all(inner) && b.first().is_some_and(edge) && b.last().is_some_and(edge)
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value), value_from: None }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { api_version: None, field_path: field.to_owned() }),
            ..EnvVarSource::default()
        }),
    }
}

/// `name` from the key [`TOKEN_KEY`] of the Secret `secret`. Not optional:
/// without the Secret the pod does not start, rather than run without auth.
fn secret_env(name: &str, secret: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: TOKEN_KEY.to_owned(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn add(path: &[&str], value: Value) -> json_patch::PatchOperation {
    json_patch::PatchOperation::Add(json_patch::AddOperation {
        path: json_patch::jsonptr::PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("Kubernetes and admission types always serialize")
}

/// The pod's name, or its `generateName` prefix (pods of a ReplicaSet have
/// no name yet at admission).
fn pod_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    meta["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
        .unwrap_or_default()
}
