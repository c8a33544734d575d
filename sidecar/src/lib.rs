//! `ferry-sidecar`: the process next to the app.
//!
//! **Promise.** A message the API answered 2xx for is in the outbox on disk
//! (fsynced, for `Durable` topics) and will reach the broker, in order per
//! topic, whatever crashes in between; re-sends carry the same message id so
//! the broker stores it once. Bad requests get a defined 4xx and change
//! nothing; a full outbox or disk answers 429 / 507, never a silent drop.
//!
//! The data path reads top to bottom: [`api`] (produce) → [`outbox`]
//! (`ferry-log` per topic) → [`forward`] → [`broker`] → [`deliver`] (push to
//! the app, ack callbacks, pull). [`config`] holds flags and resource
//! manifests, [`admin`] the health and metrics endpoints.

pub mod admin;
pub mod api;
pub mod broker;
pub mod config;
pub mod deliver;
pub mod devloop;
pub mod forward;
pub mod inspect;
pub mod metrics;
pub mod outbox;
mod recent;
pub mod serve;
pub mod state;
pub mod telemetry;

use std::collections::BTreeMap;
use std::fs::File;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::broker::embedded::EmbeddedBroker;
use crate::broker::nats::NatsBroker;
use crate::broker::Broker;
use crate::config::resources::{load_dir, Resources};
use crate::config::{Cli, Command, Config, OutboxCommand, EXIT_CONFIG};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::state::Sidecar;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration or manifests are invalid (exit 64).
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// Another process uses the data directory.
    #[error("data directory {0} is in use by another ferry-sidecar (lock file held)")]
    Locked(String),
    /// Anything else at start (I/O, binding a port).
    #[error("{0}")]
    Other(String),
}

impl StartError {
    fn exit_code(&self) -> ExitCode {
        match self {
            StartError::Config(_) => ExitCode::from(EXIT_CONFIG),
            _ => ExitCode::FAILURE,
        }
    }
}

/// A message id as a map key: a 128-bit hash of it, std's SipHash keyed at
/// random once per process, of the id and of the id and one more byte
/// (0xff, never part of UTF-8 text, so no id's second input is another
/// id's first): two independent halves from one pass over the id. 16 bytes
/// an entry against about 80 for the id as a `String`. Maps of recent ids
/// are rebuilt from the ids on disk at start, so the hash need not be
/// stable across restarts. Two ids among n share a key with odds about
/// n²/2¹²⁹.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdKey(u64, u64); // two u64s, not a u128: 8-byte aligned entries

impl IdKey {
    /// The key of `id`.
    pub(crate) fn of(id: &str) -> IdKey {
        use std::hash::{BuildHasher, Hasher};
        static KEYS: std::sync::LazyLock<std::collections::hash_map::RandomState> =
            std::sync::LazyLock::new(Default::default);
        let mut h = KEYS.build_hasher();
        h.write(id.as_bytes());
        let first = h.clone().finish();
        h.write_u8(0xff);
        IdKey(first, h.finish())
    }
}

/// A key is already a keyed hash: maps use its low half as it is, not
/// hashed again.
impl std::hash::Hash for IdKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

impl nohash_hasher::IsEnabled for IdKey {}

/// A map keyed by message id.
pub(crate) type IdMap<V> = std::collections::HashMap<IdKey, V, nohash_hasher::BuildNoHashHasher<IdKey>>;

/// An error and its sources, `outer: inner: …`, for logs and answers.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The process entry point: parses flags, runs the sidecar or a command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::SUCCESS };
        }
    };
    let (args, app) = match cli.command {
        Some(Command::Outbox { command: OutboxCommand::Inspect { data_dir } }) => {
            return match inspect::inspect(&data_dir) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ferry-sidecar outbox inspect: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Run { sidecar, command }) => (*sidecar, Some(command)),
        None => (cli.sidecar, None),
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", StartError::Config(errors));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // With an app beside it, the sidecar says little so the app's output
    // stays readable (RUST_LOG still decides when set).
    telemetry::init(config.log_format, if app.is_some() { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(command) = app {
        return runtime.block_on(devloop::run_with_app(config, command));
    }
    match runtime.block_on(async { run(config, shutdown_signal(), None).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ferry-sidecar: {e}");
            e.exit_code()
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled: `run`
/// polls it only once it has started, and a SIGTERM before that took the
/// default action, ending the process without its drain (seen in a test
/// that signals right after the start-up line, on a loaded machine).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

fn lock_data_dir(config: &Config) -> Result<File, StartError> {
    lock_dir(&config.data_dir)
}

/// Takes the data directory's `LOCK` file (made if missing), held for as
/// long as the file stays open: one process at a time uses a data dir.
pub(crate) fn lock_dir(dir: &std::path::Path) -> Result<File, StartError> {
    std::fs::create_dir_all(dir).map_err(|e| StartError::Other(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::Other(format!("opening {}: {e}", path.display())))?;
    file.try_lock().map_err(|_| StartError::Locked(dir.display().to_string()))?;
    Ok(file)
}

/// Checks that combine flags and manifests.
fn check_resources(config: &Config, resources: &Resources) -> Result<(), StartError> {
    let push: Vec<&String> = resources
        .subscriptions_of(&config.app_id)
        .filter(|(_, s)| s.mode == ferry_api::subscription::DeliveryMode::Push)
        .map(|(n, _)| n)
        .collect();
    if config.app_port.is_none() && !push.is_empty() {
        return Err(StartError::Config(vec![format!(
            "--app-port (FERRY_APP_PORT) is required: push subscriptions {push:?} deliver to the app"
        )]));
    }
    Ok(())
}

/// Binds `addr`; for `[::]` (the default admin address: probes reach a
/// pod on its IPv4 or IPv6 address, and Linux takes both on `[::]`) on a
/// kernel without IPv6, `0.0.0.0` on the same port instead.
async fn bind_any_family(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, error = %e, instead = %v4, "no IPv6 here: listening on IPv4 only");
            TcpListener::bind(v4).await
        }
        other => other,
    }
}

/// How often a configured topic whose outbox could not be opened (a full
/// disk) is tried again.
pub const REOPEN_EVERY: Duration = Duration::from_secs(5);

/// Opens, every [`REOPEN_EVERY`], the outbox (and starts the forwarder) of
/// configured topics that have none: their first open failed. Without
/// this, such a topic stayed without an outbox until the next config change.
async fn reopen_outboxes(s: Arc<Sidecar>, forwarders: Arc<tokio::sync::Mutex<Forwarders>>) {
    loop {
        tokio::time::sleep(REOPEN_EVERY).await;
        let missing = {
            let resources = s.resources.read().unwrap_or_else(|e| e.into_inner());
            resources.topics.keys().any(|t| s.outbox.topic(t).is_none()).then(|| resources.clone())
        };
        if let Some(resources) = missing {
            forwarders.lock().await.ensure(&s, &resources);
        }
    }
}

/// The forwarders, one per topic log, growing as topics are added.
struct Forwarders {
    running: Vec<Forwarder>,
    /// Room for publishes in flight, shared by all of them.
    room: Arc<tokio::sync::Semaphore>,
}

impl Forwarders {
    /// Opens logs for new topics and starts a forwarder for each log without one.
    fn ensure(&mut self, s: &Sidecar, resources: &Resources) {
        for (name, t) in &resources.topics {
            if let Err(e) = s.outbox.ensure_topic(name, t.persistence, t.partitions) {
                tracing::error!(topic = %name, error = %e, "cannot open the outbox of a new topic");
            }
        }
        for tl in s.outbox.topics() {
            if self.running.iter().any(|f| f.topic == tl.topic) {
                continue;
            }
            let f = Forwarder::start(s, tl.clone(), self.room.clone());
            s.forwarding.write().unwrap_or_else(|e| e.into_inner()).insert(tl.topic.clone(), f.link.clone());
            self.running.push(f);
        }
    }
}

/// The file in the data dir that keeps the broker's `max_payload` across
/// restarts.
pub const BROKER_MAX_PAYLOAD_FILE: &str = "broker-max-payload";

/// Where a started sidecar listens, for whoever started it.
#[derive(Debug, Clone)]
pub struct Started {
    /// The app-facing API.
    pub api: std::net::SocketAddr,
    /// The admin endpoints.
    pub admin: std::net::SocketAddr,
    /// Topics configured.
    pub topics: Vec<String>,
    /// This app's subscriptions.
    pub subscriptions: Vec<String>,
}

/// Runs the sidecar until `shutdown` resolves, then drains and stops.
/// `ready` (if given) gets the addresses once the broker is configured.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Started>>,
) -> Result<(), StartError> {
    run_on(Arc::new(ferry_log::StdFs), config, shutdown, ready).await
}

/// [`run`] with the outbox's topic logs on `outbox_fs` (a test's `MemFs`,
/// whose injected faults reach the sidecar's HTTP answers).
pub(crate) async fn run_on(
    outbox_fs: Arc<dyn ferry_log::Fs>,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Started>>,
) -> Result<(), StartError> {
    let resources = match &config.resources {
        Some(dir) => load_dir(dir, &config.namespace).map_err(StartError::Config)?,
        None => Resources::default(),
    };
    check_resources(&config, &resources)?;
    let _lock = lock_data_dir(&config)?;
    if config.broker.is_embedded() && config.resources.is_none() {
        tracing::warn!(
            "the embedded broker and no --resources (FERRY_RESOURCES): no topics, so every produce call will be 404; \
             give the directory of your Topic and Subscription manifests"
        );
    }
    let mut config = config;
    if config.pod_name.is_empty() {
        config.pod_name = config::pod_name_of(&config.data_dir, &config.app_id)
            .map_err(|e| StartError::Other(format!("pod name file in {}: {e}", config.data_dir.display())))?;
    }
    if config.fsync != config::FsyncPolicy::Always {
        tracing::warn!(
            fsync = ?config.fsync,
            "--fsync lowers durability: an acknowledged (202) message can be lost with the machine's power"
        );
    }

    let topics: BTreeMap<_, _> =
        resources.topics.iter().map(|(n, t)| (n.clone(), (t.persistence, t.partitions))).collect();
    let (outbox, reports) =
        Outbox::open_on(outbox_fs, &config.data_dir, config.outbox_max_bytes, config.fsync, &topics)
            .map_err(|e| StartError::Other(format!("opening the outbox: {e}")))?;
    for (topic, report) in &reports {
        if !report.is_clean() {
            tracing::warn!(topic, ?report, "outbox recovery repaired or skipped damage");
        }
    }
    let outbox = Arc::new(outbox);
    let mut nats = None;
    let broker: Arc<dyn Broker> = if config.broker.is_embedded() {
        Arc::new(EmbeddedBroker::open(&config.data_dir.join("broker")).map_err(|e| StartError::Other(e.to_string()))?)
    } else {
        let n = NatsBroker::connect(&config.broker, &format!("ferry-sidecar/{}/{}", config.namespace, config.app_id))
            .await
            .map_err(|e| StartError::Other(e.to_string()))?
            .remembering_max_payload(config.data_dir.join(BROKER_MAX_PAYLOAD_FILE));
        nats = Some(n.clone());
        Arc::new(n)
    };
    let metrics = Arc::new(Metrics::new());

    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .map_err(|e| StartError::Other(format!("binding the API on {}: {e}", config.api_addr)))?;
    let admin_listener = bind_any_family(config.admin_addr)
        .await
        .map_err(|e| StartError::Other(format!("binding the admin port on {}: {e}", config.admin_addr)))?;
    let api_addr = api_listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;

    let client = deliver::push::client();
    let delivery = deliver::Delivery::new(deliver::Deps {
        namespace: config.namespace.clone(),
        app_id: config.app_id.clone(),
        pod_name: config.pod_name.clone(),
        pod_consumer_ttl: config.pod_consumer_ttl,
        app_port: config.app_port,
        app_token: config.app_token.clone(),
        data_dir: config.data_dir.clone(),
        dedupe_window: config.dedupe_window,
        dedupe: Arc::new(deliver::dedupe::Stores::new(config.dedupe_max_ids)),
        broker: broker.clone(),
        metrics: metrics.clone(),
        callbacks: Default::default(),
        client,
        outbox: outbox.clone(),
    });
    let sidecar = Arc::new(Sidecar {
        config: config.clone(),
        resources: RwLock::new(resources.clone()),
        outbox: outbox.clone(),
        broker: broker.clone(),
        metrics: metrics.clone(),
        forwarding: RwLock::new(BTreeMap::new()),
        shutting_down: Default::default(),
        delivery,
        broker_configured: Default::default(),
        // Only the KV bucket comes later; manifests are read above.
        config_loaded: std::sync::atomic::AtomicBool::new(!(config.resources.is_none() && nats.is_some())),
        stream_missing: Default::default(),
    });

    let mut forwarders = Forwarders { running: Vec::new(), room: forward::shared_room() };
    forwarders.ensure(&sidecar, &resources);
    let forwarders = Arc::new(tokio::sync::Mutex::new(forwarders));
    let started = Started {
        api: api_addr,
        admin: admin_addr,
        topics: resources.topics.keys().cloned().collect(),
        subscriptions: resources.subscriptions_of(&config.app_id).map(|(n, _)| n.clone()).collect(),
    };
    let configure = {
        let (s, r) = (sidecar.clone(), resources.clone());
        tokio::spawn(async move {
            configure_broker(s.clone(), r.clone()).await;
            // Keeps the server's largest message for a restart while the
            // broker is away (the NATS backend writes it down).
            let _ = s.broker.max_message_bytes();
            // Subscriptions start once their streams exist; the sidecar is
            // ready once they run (a pull before that would find none). A
            // change applied meanwhile is not undone: the latest resources run.
            let latest = s.resources.read().unwrap_or_else(|e| e.into_inner()).clone();
            s.delivery.reconcile(&latest).await;
            s.broker_configured.store(true, Ordering::Release);
            tracing::info!(topics = r.topics.len(), "broker configured");
            if let Some(tx) = ready {
                let _ = tx.send(started);
            }
        })
    };
    // A forwarder that finds its stream gone (the broker lost its store, or
    // someone deleted it) has the broker configured again, at most once a second.
    let reensure = {
        let s = sidecar.clone();
        tokio::spawn(async move {
            loop {
                s.stream_missing.notified().await;
                let resources = s.resources.read().unwrap_or_else(|e| e.into_inner()).clone();
                tracing::warn!("a stream is missing on the broker; creating the streams and consumers again");
                configure_broker(s.clone(), resources).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let reopen = tokio::spawn(reopen_outboxes(sidecar.clone(), forwarders.clone()));
    // Config source: the manifest directory (standalone), else the broker's
    // KV bucket the operator writes (cluster).
    let reload = match (&config.resources, nats) {
        (Some(dir), _) => Some(tokio::spawn(watch_resources(sidecar.clone(), forwarders.clone(), dir.clone()))),
        (None, Some(n)) => Some(tokio::spawn(watch_kv(sidecar.clone(), forwarders.clone(), n.jetstream().clone()))),
        (None, None) => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let serve = |listener: TcpListener, router: axum::Router| {
        tokio::spawn(serve::serve(listener, router, config.header_read_timeout, stop_rx.clone()))
    };
    let api_task = serve(api_listener, api::router(sidecar.clone()));
    let admin_task = serve(admin_listener, admin::router(sidecar.clone()));
    tracing::info!(
        app_id = %config.app_id,
        namespace = %config.namespace,
        api = %api_addr,
        admin = %admin_addr,
        data_dir = %config.data_dir.display(),
        topics = ?resources.topics.keys().collect::<Vec<_>>(),
        subscriptions = ?resources.subscriptions_of(&config.app_id).map(|(n, _)| n).collect::<Vec<_>>(),
        "ferry-sidecar started"
    );

    shutdown.await;
    // Refuse first, then say so: whoever reads the line finds it true.
    sidecar.shutting_down.store(true, Ordering::Release);
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: refusing produce calls, draining the outbox");
    if let Some(r) = reload {
        r.abort();
    }
    reopen.abort();
    // Stop fetching first and hand back unfinished deliveries, so another
    // pod gets them at once; then drain what the app produced.
    sidecar.delivery.stop_all().await;
    drain(&sidecar, config.shutdown_grace).await;
    configure.abort();
    reensure.abort();
    for f in std::mem::take(&mut forwarders.lock().await.running) {
        f.stop().await;
    }
    let _ = stop_tx.send(true);
    for task in [api_task, admin_task] {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let mut left = 0;
    for tl in outbox.topics() {
        let pending = tl.log.next_offset().saturating_sub(tl.log.cursor(outbox::FORWARDED).unwrap_or(0));
        if pending > 0 {
            tracing::warn!(topic = %tl.topic, pending, "messages left in the outbox; they are forwarded at the next start");
        }
        left += pending;
    }
    tracing::info!(left_in_outbox = left, "ferry-sidecar stopped");
    Ok(())
}

/// Re-reads the manifests every `--resources-poll` and applies changes:
/// new topics get an outbox and a forwarder, broker objects are ensured,
/// subscriptions are started, restarted or stopped. An invalid change is
/// logged and ignored (the running config stays).
async fn watch_resources(s: Arc<Sidecar>, forwarders: Arc<tokio::sync::Mutex<Forwarders>>, dir: std::path::PathBuf) {
    let mut last_error: Option<Vec<String>> = None;
    loop {
        tokio::time::sleep(s.config.resources_poll).await;
        let loaded = load_dir(&dir, &s.config.namespace).and_then(|r| match check_resources(&s.config, &r) {
            Ok(()) => Ok(r),
            Err(StartError::Config(e)) => Err(e),
            Err(e) => Err(vec![e.to_string()]),
        });
        let loaded = loaded.and_then(|r| {
            let refused = s.resources.read().unwrap_or_else(|e| e.into_inner()).immutable_changes(&r);
            if refused.is_empty() {
                Ok(r)
            } else {
                Err(refused)
            }
        });
        match loaded {
            Ok(new) => {
                last_error = None;
                apply_change(&s, &forwarders, new).await;
            }
            Err(errors) => {
                if last_error.as_ref() != Some(&errors) {
                    tracing::error!(errors = ?errors, "changed manifests are invalid; keeping the running configuration");
                    last_error = Some(errors);
                }
            }
        }
    }
}

/// Applies the resources the operator resolved into the broker's KV bucket.
async fn watch_kv(
    s: Arc<Sidecar>,
    forwarders: Arc<tokio::sync::Mutex<Forwarders>>,
    js: async_nats::jetstream::Context,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let watcher = tokio::spawn(config::kv::watch(js, s.config.namespace.clone(), s.config.app_id.clone(), tx));
    while let Some(new) = rx.recv().await {
        if let Err(e) = check_resources(&s.config, &new) {
            tracing::error!(error = %e, "the resolved configuration cannot run here; keeping the running configuration");
            s.config_loaded.store(true, Ordering::Release);
            continue;
        }
        apply_change(&s, &forwarders, new).await;
        if !s.config_loaded.swap(true, Ordering::AcqRel) {
            tracing::info!("configuration loaded from the config bucket");
        }
    }
    watcher.abort();
}

/// Applies new resources: new topics get an outbox and a forwarder, broker
/// objects are ensured, subscriptions are started, restarted or stopped.
async fn apply_change(s: &Arc<Sidecar>, forwarders: &tokio::sync::Mutex<Forwarders>, new: Resources) {
    if *s.resources.read().unwrap_or_else(|e| e.into_inner()) == new {
        return;
    }
    tracing::info!(topics = ?new.topics.keys().collect::<Vec<_>>(), subscriptions = ?new.subscriptions_of(&s.config.app_id).map(|(n, _)| n).collect::<Vec<_>>(), "configuration changed; applying");
    *s.resources.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
    forwarders.lock().await.ensure(s, &new);
    configure_broker(s.clone(), new.clone()).await;
    s.delivery.reconcile(&new).await;
    tracing::info!("configuration applied");
}

/// Waits until every topic's outbox is confirmed by the broker, or `grace` passes.
async fn drain(s: &Sidecar, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    for tl in s.outbox.topics() {
        let Some(mut rx) = s.confirmed(&tl.topic) else { continue };
        let end = tl.log.next_offset();
        if tokio::time::timeout_at(deadline, rx.wait_for(|c| *c >= end)).await.is_err() {
            tracing::warn!(topic = %tl.topic, "grace period over before the outbox drained");
            return;
        }
    }
}

/// Creates the streams of every topic and the consumers of this app's
/// subscriptions, retrying with backoff while the broker is away. An object
/// the broker refuses (an immutable field changed, a limit) is logged and
/// left out: it does not keep the others, or a later change, from applying.
async fn configure_broker(s: Arc<Sidecar>, resources: Resources) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match apply_resources(&*s.broker, &s.config, &resources).await {
            Ok(refused) => {
                for (object, error) in refused {
                    tracing::error!(%object, %error, "the broker refuses this object; the others are configured, it is not");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "could not configure the broker yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Ensures streams and consumers for `resources` (pure mapping from
/// `ferry-api`). Returns the objects the broker refused, with why; fails
/// (to be tried again whole) only when the broker is unavailable.
pub async fn apply_resources(
    broker: &dyn Broker,
    config: &Config,
    resources: &Resources,
) -> Result<Vec<(String, broker::BrokerError)>, broker::BrokerError> {
    let mut refused = Vec::new();
    let mut check = |object: String, r: Result<(), broker::BrokerError>| match r {
        Ok(()) => Ok(()),
        Err(e @ broker::BrokerError::Unavailable(_)) => Err(e),
        Err(e) => {
            refused.push((object, e));
            Ok(())
        }
    };
    for (name, spec) in &resources.topics {
        let r = broker.ensure_stream(&ferry_api::stream_plan(&config.namespace, name, spec)).await;
        check(format!("topic {name}"), r)?;
    }
    for (name, spec) in resources.subscriptions_of(&config.app_id) {
        // A subscription whose topic is gone (deleted while the config
        // still names it) has no stream to hold its consumer: retrying it
        // for ever would keep every other one from starting.
        if !resources.topics.contains_key(&spec.topic) {
            tracing::warn!(subscription = %name, topic = %spec.topic, "the subscription's topic is not configured; its consumer waits for it");
            continue;
        }
        let plan = deliver::consumer_plan(&config.namespace, name, spec, &config.pod_name, config.pod_consumer_ttl);
        let r = broker.ensure_consumer(&plan).await;
        check(format!("subscription {name}"), r)?;
    }
    Ok(refused)
}
