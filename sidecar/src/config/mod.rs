//! Configuration: flags and `FERRY_*` environment variables (clap), checked
//! whole. Every problem is reported, then the process exits once with code
//! 64 before binding any port. Also the resource sources: manifest files
//! (`resources`, standalone) and the broker's KV bucket (`kv`, cluster).

pub mod kv;
pub mod resources;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit code for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Default app-facing API address: loopback only, the app is in the same pod.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7600";
/// Default admin address (health, readiness, metrics): all interfaces, IPv6
/// and IPv4 (IPv4 only where the kernel has no IPv6), so the kubelet and
/// Prometheus reach it on an IPv4, IPv6 or dual-stack cluster.
pub const DEFAULT_ADMIN_ADDR: &str = "[::]:7601";
/// Default largest message body: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Default largest batch request body: 16 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;
/// Default outbox byte limit: 1 GiB.
pub const DEFAULT_OUTBOX_BYTES: u64 = 1 << 30;
/// Default grace period to drain the outbox on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "20s";
/// Default wait for the broker's confirmation with `?ack=broker`.
pub const DEFAULT_BROKER_ACK_TIMEOUT: &str = "10s";

/// Default consumer-side dedupe window.
pub const DEFAULT_DEDUPE_WINDOW: &str = "10m";
/// Default cap on the acked ids the sidecar's dedupe stores remember
/// together: 18–33 MB of memory and about 40 MB of disk at most (plus a
/// prune interval's acks on disk). The whole default window holds up to
/// about 800 acks a second in all; above that the window is shorter
/// (about 100 s at 5 000 a second).
pub const DEFAULT_DEDUPE_MAX_IDS: usize = 500_000;
/// Default interval for re-reading manifests.
pub const DEFAULT_RESOURCES_POLL: &str = "1s";

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "ferry-sidecar", version, about = "Ferry sidecar: durable messaging for the app next to it")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A maintenance command instead of running the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Sidecar settings.
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

/// Commands besides running the sidecar alone.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar and an app next to it (the developer loop, like
    /// `dapr run`): `ferry-sidecar run --app-id orders --app-port 3000
    /// --resources examples/quickstart -- python3 app.py`. The app gets
    /// `FERRY_URL` and starts once the sidecar is ready; signals go to the
    /// app; when it exits the sidecar stops, and its exit status is ours.
    Run {
        /// Sidecar settings (no `--broker`: the embedded broker).
        #[command(flatten)]
        sidecar: Box<SidecarArgs>,
        /// The app's command line, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Look at the outbox.
    Outbox {
        /// What to do with it.
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

/// Outbox commands.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Print segments, records per topic, the forwarded watermark and any
    /// damage found. Refused while a sidecar uses the data dir.
    Inspect {
        /// The sidecar's data directory.
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of the sidecar itself. Each has a `FERRY_*` variable.
#[derive(Debug, Args, Clone)]
pub struct SidecarArgs {
    /// The app id: Subscriptions with `app: <id>` are delivered to this app.
    #[arg(long, env = "FERRY_APP_ID")]
    pub app_id: Option<String>,
    /// The app's HTTP port on localhost, for push deliveries.
    #[arg(long, env = "FERRY_APP_PORT")]
    pub app_port: Option<u16>,
    /// Kubernetes namespace of the app (names streams and config keys).
    #[arg(long, env = "FERRY_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Name of this pod (per-pod consumers of `fanout: Pod`); defaults to
    /// `$HOSTNAME` (in Kubernetes, the pod's name), else a name made once
    /// and kept in the data dir (`pod-name`), so a restarted standalone
    /// sidecar keeps its per-pod consumers.
    #[arg(long, env = "FERRY_POD_NAME")]
    pub pod_name: Option<String>,
    /// With `fanout: Pod`: how long the broker keeps this pod's own
    /// consumer once nothing uses it, so that a pod gone for good leaves
    /// nothing behind. While the sidecar runs it keeps the consumer in use,
    /// also for a pull subscription whose app polls seldom.
    #[arg(long, env = "FERRY_POD_CONSUMER_TTL", default_value = "5m")]
    pub pod_consumer_ttl: String,
    /// Directory for the outbox and delivery state (a volume in Kubernetes).
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "ferry-data")]
    pub data_dir: PathBuf,
    /// Address of the app-facing API.
    #[arg(long, env = "FERRY_API_ADDR", default_value = DEFAULT_API_ADDR)]
    pub api_addr: String,
    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "FERRY_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,
    /// Broker: `nats://host:port` (several: comma-separated), or `embedded`
    /// (the default): an in-process broker on the data dir, for one sidecar.
    #[arg(long, env = "FERRY_BROKER")]
    pub broker: Option<String>,
    /// NATS credentials file (`.creds`).
    #[arg(long, env = "FERRY_BROKER_CREDS")]
    pub broker_creds: Option<PathBuf>,
    /// NATS user (with `--broker-password`).
    #[arg(long, env = "FERRY_BROKER_USER")]
    pub broker_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "FERRY_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "FERRY_BROKER_TOKEN", hide_env_values = true)]
    pub broker_token: Option<String>,
    /// CA certificate (PEM) to verify the broker's TLS certificate; implies TLS.
    #[arg(long, env = "FERRY_BROKER_TLS_CA")]
    pub broker_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for TLS client authentication.
    #[arg(long, env = "FERRY_BROKER_TLS_CERT")]
    pub broker_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for TLS client authentication.
    #[arg(long, env = "FERRY_BROKER_TLS_KEY")]
    pub broker_tls_key: Option<PathBuf>,
    /// Directory of Topic/Subscription YAML manifests (standalone mode).
    #[arg(long, env = "FERRY_RESOURCES")]
    pub resources: Option<PathBuf>,
    /// Log output format.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Bearer token the app must send on every API call (unset: no auth).
    #[arg(long, env = "FERRY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Bearer token the sidecar sends on every push to the app.
    #[arg(long, env = "FERRY_APP_TOKEN", hide_env_values = true)]
    pub app_token: Option<String>,
    /// Largest message body in bytes (a topic's `maxMessageSize` may lower it).
    #[arg(long, env = "FERRY_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Largest batch request body in bytes.
    #[arg(long, env = "FERRY_MAX_BATCH_BYTES", default_value_t = DEFAULT_MAX_BATCH_BYTES)]
    pub max_batch_bytes: usize,
    /// Outbox byte limit; beyond it produce answers 429.
    #[arg(long, env = "FERRY_OUTBOX_MAX_BYTES", default_value_t = DEFAULT_OUTBOX_BYTES)]
    pub outbox_max_bytes: u64,
    /// Replay window: how long forwarded messages stay in the outbox after
    /// the broker confirmed them (`0s`: deleted at once), so that
    /// `POST /v1/topics/{topic}/outbox:replay` can send them again after
    /// the broker lost them. Given up when produce needs the room.
    #[arg(long, env = "FERRY_OUTBOX_RETENTION", default_value = "0s")]
    pub outbox_retention: String,
    /// On SIGTERM, how long to keep forwarding the outbox before exiting.
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE)]
    pub shutdown_grace: String,
    /// With `?ack=broker`, how long to wait for the broker's confirmation.
    #[arg(long, env = "FERRY_BROKER_ACK_TIMEOUT", default_value = DEFAULT_BROKER_ACK_TIMEOUT)]
    pub broker_ack_timeout: String,
    /// How long ids the app acknowledged are remembered, so a redelivered
    /// copy is acknowledged without reaching the app again.
    #[arg(long, env = "FERRY_DEDUPE_WINDOW", default_value = DEFAULT_DEDUPE_WINDOW)]
    pub dedupe_window: String,
    /// Most acknowledged ids the dedupe stores of all subscriptions
    /// remember together (about 37–65 bytes of memory and 80 of disk
    /// each). When full they forget the oldest ids before their window is
    /// over, and say so.
    #[arg(long, env = "FERRY_DEDUPE_MAX_IDS", default_value_t = DEFAULT_DEDUPE_MAX_IDS)]
    pub dedupe_max_ids: usize,
    /// Longest a client may take to send a request head (slowloris guard);
    /// also how long an idle keep-alive connection is kept.
    #[arg(long, env = "FERRY_HEADER_READ_TIMEOUT", default_value = "30s")]
    pub header_read_timeout: String,
    /// How often the `--resources` directory is re-read for changes.
    #[arg(long, env = "FERRY_RESOURCES_POLL", default_value = DEFAULT_RESOURCES_POLL)]
    pub resources_poll: String,
    /// How far the outbox fsyncs: `always` (each Topic's persistence decides:
    /// a `Durable` topic is fsynced before a produce is answered), `interval`
    /// (every topic synced every second: a power loss can lose that much of
    /// acknowledged messages), `never` (left to the OS). Anything but
    /// `always` is logged at start and shown in `/readyz`.
    #[arg(long, env = "FERRY_FSYNC", value_enum, default_value = "always")]
    pub fsync: FsyncPolicy,
}

/// `--fsync`: the most durability the outbox gives any topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// As each Topic's persistence says.
    #[default]
    Always,
    /// Every topic synced on an interval.
    Interval,
    /// No fsync by Ferry (also spelled `none`, as DESIGN.md does).
    #[value(alias = "none")]
    Never,
}

/// Broker connection settings.
#[derive(Debug, Clone, Default)]
pub struct BrokerConfig {
    /// Server URLs; empty for the embedded broker.
    pub urls: Vec<String>,
    /// Credentials file.
    pub creds: Option<PathBuf>,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// TLS CA file (implies TLS required).
    pub tls_ca: Option<PathBuf>,
    /// TLS client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

/// The checked configuration of a running sidecar.
#[derive(Debug, Clone)]
pub struct Config {
    /// App id.
    pub app_id: String,
    /// App port for push.
    pub app_port: Option<u16>,
    /// Namespace.
    pub namespace: String,
    /// Pod name (empty until [`pod_name_of`] has found it, when neither
    /// `--pod-name` nor `$HOSTNAME` gives one).
    pub pod_name: String,
    /// How long an unused per-pod consumer is kept by the broker.
    pub pod_consumer_ttl: Duration,
    /// Data directory.
    pub data_dir: PathBuf,
    /// API address.
    pub api_addr: SocketAddr,
    /// Admin address.
    pub admin_addr: SocketAddr,
    /// Broker settings.
    pub broker: BrokerConfig,
    /// Manifest directory.
    pub resources: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// API bearer token.
    pub api_token: Option<String>,
    /// Token sent to the app.
    pub app_token: Option<String>,
    /// Largest message body.
    pub max_message_bytes: usize,
    /// Largest batch body.
    pub max_batch_bytes: usize,
    /// Outbox limit.
    pub outbox_max_bytes: u64,
    /// Replay window of forwarded messages (zero: none).
    pub outbox_retention: Duration,
    /// Drain time on SIGTERM.
    pub shutdown_grace: Duration,
    /// Wait for `?ack=broker`.
    pub broker_ack_timeout: Duration,
    /// Consumer-side dedupe window.
    pub dedupe_window: Duration,
    /// Most ids all subscriptions' dedupe stores remember together.
    pub dedupe_max_ids: usize,
    /// Manifest re-read interval.
    pub resources_poll: Duration,
    /// Request-head read timeout (and keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Outbox fsync policy.
    pub fsync: FsyncPolicy,
}

impl BrokerConfig {
    /// True for the in-process broker.
    pub fn is_embedded(&self) -> bool {
        self.urls.is_empty()
    }
}

impl Config {
    /// Checks the parsed flags; returns every problem found.
    pub fn from_args(a: SidecarArgs) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let app_id = match a.app_id {
            Some(id) => {
                if let Err(e) = ferry_api::naming::validate_label("app id", &id) {
                    errors.push(format!("--app-id: {e}"));
                }
                id
            }
            None => {
                errors.push("--app-id (FERRY_APP_ID) is required".to_owned());
                String::new()
            }
        };
        if let Err(e) = ferry_api::naming::validate_label("namespace", &a.namespace) {
            errors.push(format!("--namespace: {e}"));
        }
        let mut addr = |flag: &str, value: &str| match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(format!("{flag}: {value:?} is not an address like 127.0.0.1:7600"));
                None
            }
        };
        let api_addr = addr("--api-addr", &a.api_addr);
        let admin_addr = addr("--admin-addr", &a.admin_addr);
        let mut duration = |flag: &str, value: &str| match humantime::parse_duration(value) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{flag}: {value:?} is not a duration like 20s ({e})"));
                Duration::ZERO
            }
        };
        let shutdown_grace = duration("--shutdown-grace", &a.shutdown_grace);
        let outbox_retention = duration("--outbox-retention", &a.outbox_retention);
        let broker_ack_timeout = duration("--broker-ack-timeout", &a.broker_ack_timeout);
        let dedupe_window = duration("--dedupe-window", &a.dedupe_window);
        let resources_poll = duration("--resources-poll", &a.resources_poll);
        let header_read_timeout = duration("--header-read-timeout", &a.header_read_timeout);
        let pod_consumer_ttl = duration("--pod-consumer-ttl", &a.pod_consumer_ttl);
        if pod_consumer_ttl < Duration::from_secs(1) && humantime::parse_duration(&a.pod_consumer_ttl).is_ok() {
            errors.push(format!("--pod-consumer-ttl: {:?} is shorter than 1s", a.pod_consumer_ttl));
        }
        if dedupe_window > ferry_api::MAX_DEDUPE_WINDOW {
            errors.push(format!("--dedupe-window: {:?} is longer than 366 days", a.dedupe_window));
        }
        if a.dedupe_max_ids == 0 {
            errors.push("--dedupe-max-ids: must be at least 1".to_owned());
        }
        // No --broker, or `embedded`: the in-process broker (standalone mode).
        let urls: Vec<String> = match a.broker.as_deref().map(str::trim) {
            None | Some("embedded") => Vec::new(),
            Some(list) => list.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect(),
        };
        if a.broker.as_deref().is_some_and(|b| b.trim() != "embedded") && urls.is_empty() {
            errors.push("--broker: give a NATS URL like nats://127.0.0.1:4222, or `embedded`".to_owned());
        }
        for u in &urls {
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"].iter().any(|s| u.starts_with(s));
            if !scheme_ok {
                errors.push(format!(
                    "--broker: {u:?} must start with nats://, tls://, ws:// or wss://, or be `embedded`"
                ));
            }
        }
        let user_password = match (a.broker_user, a.broker_password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => {
                errors.push("--broker-user and --broker-password go together".to_owned());
                None
            }
        };
        let auth_kinds = [a.broker_creds.is_some(), user_password.is_some(), a.broker_token.is_some()];
        if auth_kinds.iter().filter(|x| **x).count() > 1 {
            errors.push("choose one of --broker-creds, --broker-user/--broker-password, --broker-token".to_owned());
        }
        let tls_client = match (a.broker_tls_cert, a.broker_tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                errors.push("--broker-tls-cert and --broker-tls-key go together".to_owned());
                None
            }
        };
        if a.max_message_bytes == 0 || a.max_message_bytes > 64 << 20 {
            errors.push("--max-message-bytes must be 1 to 67108864".to_owned());
        }
        if a.max_batch_bytes < a.max_message_bytes {
            errors.push("--max-batch-bytes must be at least --max-message-bytes".to_owned());
        }
        if a.api_token.as_deref() == Some("") {
            errors.push("FERRY_API_TOKEN is set but empty".to_owned());
        }
        if let Some(dir) = &a.resources {
            if !dir.is_dir() {
                errors.push(format!("--resources: {} is not a directory", dir.display()));
            }
        }
        // Empty: made once and kept in the data dir, see `pod_name_of`.
        let pod_name =
            a.pod_name.or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())).unwrap_or_default();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            app_id,
            app_port: a.app_port,
            namespace: a.namespace,
            pod_name,
            pod_consumer_ttl,
            data_dir: a.data_dir,
            api_addr: api_addr.expect("checked above"),
            admin_addr: admin_addr.expect("checked above"),
            broker: BrokerConfig {
                urls,
                creds: a.broker_creds,
                user_password,
                token: a.broker_token,
                tls_ca: a.broker_tls_ca,
                tls_client,
            },
            resources: a.resources,
            log_format: a.log_format,
            api_token: a.api_token,
            app_token: a.app_token,
            max_message_bytes: a.max_message_bytes,
            max_batch_bytes: a.max_batch_bytes,
            outbox_max_bytes: a.outbox_max_bytes,
            outbox_retention,
            shutdown_grace,
            broker_ack_timeout,
            dedupe_window,
            dedupe_max_ids: a.dedupe_max_ids,
            resources_poll: resources_poll.max(Duration::from_millis(50)),
            fsync: a.fsync,
            header_read_timeout: header_read_timeout.max(Duration::from_secs(1)),
        })
    }
}

/// The pod name kept in `data_dir` (file `pod-name`), made on first use as
/// `{app_id}-{8 hex digits}`: stable across restarts of a standalone
/// sidecar (its per-pod consumers stay its own), different for every data
/// dir (two sidecars never share one).
pub fn pod_name_of(data_dir: &std::path::Path, app_id: &str) -> std::io::Result<String> {
    let file = data_dir.join("pod-name");
    match std::fs::read_to_string(&file) {
        Ok(name) if !name.trim().is_empty() => return Ok(name.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = format!("{app_id}-{:08x}", uuid::Uuid::new_v4().as_u128() as u32);
    ferry_log::fs::write_atomic(&ferry_log::StdFs, data_dir, "pod-name", name.as_bytes())?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, Vec<String>> {
        let cli = Cli::try_parse_from(std::iter::once("ferry-sidecar").chain(args.iter().copied()))
            .map_err(|e| vec![e.to_string()])?;
        Config::from_args(cli.sidecar)
    }

    #[test]
    fn no_broker_means_the_embedded_one() {
        let c = parse(&["--app-id", "orders"]).unwrap();
        assert!(c.broker.is_embedded());
        assert!(parse(&["--app-id", "orders", "--broker", "embedded"]).unwrap().broker.is_embedded());
    }

    #[test]
    fn defaults_fill_everything_but_app_id_and_broker() {
        let c = parse(&["--app-id", "orders", "--broker", "nats://127.0.0.1:4222"]).unwrap();
        assert_eq!(c.api_addr.to_string(), DEFAULT_API_ADDR);
        assert_eq!(c.admin_addr.to_string(), DEFAULT_ADMIN_ADDR);
        assert_eq!(c.namespace, "default");
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.dedupe_window, Duration::from_secs(600));
        assert_eq!(c.dedupe_max_ids, DEFAULT_DEDUPE_MAX_IDS);
        assert_eq!(c.pod_consumer_ttl, ferry_api::plan::POD_CONSUMER_INACTIVE);
        assert_eq!(c.broker.urls, ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn fsync_never_is_also_spelled_none() {
        let with = |v: &str| parse(&["--app-id", "orders", "--fsync", v]).map(|c| c.fsync);
        assert_eq!(with("none").unwrap(), FsyncPolicy::Never);
        assert_eq!(with("never").unwrap(), FsyncPolicy::Never);
        assert_eq!(with("interval").unwrap(), FsyncPolicy::Interval);
    }

    #[test]
    fn a_pod_consumer_ttl_under_a_second_is_refused() {
        let with = |ttl: &str| parse(&["--app-id", "orders", "--pod-consumer-ttl", ttl]);
        assert_eq!(with("90s").unwrap().pod_consumer_ttl, Duration::from_secs(90));
        assert_eq!(with("500ms").unwrap_err(), ["--pod-consumer-ttl: \"500ms\" is shorter than 1s"]);
        let errors = with("later").unwrap_err();
        assert_eq!(errors.len(), 1, "one error for a bad value: {errors:?}");
        assert!(errors[0].starts_with("--pod-consumer-ttl: \"later\" is not a duration"), "{errors:?}");
    }

    #[test]
    fn a_dedupe_window_of_a_year_is_taken() {
        for w in ["1y", "12M", "366d"] {
            let c = parse(&["--app-id", "orders", "--broker", "nats://127.0.0.1:4222", "--dedupe-window", w]);
            assert!(c.is_ok(), "{w}: {:?}", c.err());
        }
    }

    #[test]
    fn every_configuration_problem_is_reported_at_once() {
        let errors = parse(&[
            "--namespace",
            "Bad_NS",
            "--api-addr",
            "localhost",
            "--shutdown-grace",
            "soon",
            "--broker",
            "http://x",
            "--broker-user",
            "u",
            "--dedupe-max-ids",
            "0",
            "--dedupe-window",
            "400d",
        ])
        .unwrap_err();
        let text = errors.join("\n");
        for needle in [
            "--app-id",
            "--namespace",
            "--api-addr",
            "--shutdown-grace",
            "--broker: \"http://x\"",
            "--broker-user",
            "--dedupe-max-ids",
            "--dedupe-window: \"400d\" is longer than 366 days",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert_eq!(errors.len(), 8, "{text}");
    }
}
