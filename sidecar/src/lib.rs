//! `ferry-sidecar`: the process next to the app.
//!
//! **Promise.** A message the API answered 2xx for is in the outbox on disk
//! (fsynced, for `Durable` topics) and will reach the broker, in order per
//! topic, whatever crashes in between; re-sends carry the same message id so
//! the broker stores it once. Bad requests get a defined 4xx and change
//! nothing; a full outbox or disk answers 429 / 507, never a silent drop.
//!
//! The data path reads top to bottom: [`api`] (produce) → [`outbox`]
//! (`ferry-log` per topic) → [`forward`] → [`broker`]. [`config`] holds flags
//! and resource manifests, [`admin`] the health and metrics endpoints.

pub mod admin;
pub mod api;
pub mod broker;
pub mod config;
pub mod forward;
pub mod inspect;
pub mod metrics;
pub mod outbox;
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

/// The process entry point: parses flags, runs the sidecar or a command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::SUCCESS };
        }
    };
    if let Some(Command::Outbox { command: OutboxCommand::Inspect { data_dir } }) = cli.command {
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
    let config = match Config::from_args(cli.sidecar) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", StartError::Config(errors));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ferry-sidecar: {e}");
            e.exit_code()
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn lock_data_dir(config: &Config) -> Result<File, StartError> {
    let dir = &config.data_dir;
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

/// Runs the sidecar until `shutdown` resolves, then drains and stops.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), StartError> {
    let resources = match &config.resources {
        Some(dir) => load_dir(dir, &config.namespace).map_err(StartError::Config)?,
        None => Resources::default(),
    };
    let _lock = lock_data_dir(&config)?;

    let topics: BTreeMap<_, _> =
        resources.topics.iter().map(|(n, t)| (n.clone(), (t.persistence, t.partitions))).collect();
    let (outbox, reports) = Outbox::open(&config.data_dir, config.outbox_max_bytes, &topics)
        .map_err(|e| StartError::Other(format!("opening the outbox: {e}")))?;
    for (topic, report) in &reports {
        if !report.is_clean() {
            tracing::warn!(topic, ?report, "outbox recovery repaired or skipped damage");
        }
    }
    let outbox = Arc::new(outbox);
    let broker: Arc<dyn Broker> = Arc::new(
        NatsBroker::connect(&config.broker, &format!("ferry-sidecar/{}/{}", config.namespace, config.app_id))
            .await
            .map_err(|e| StartError::Other(e.to_string()))?,
    );
    let metrics = Arc::new(Metrics::new());

    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .map_err(|e| StartError::Other(format!("binding the API on {}: {e}", config.api_addr)))?;
    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|e| StartError::Other(format!("binding the admin port on {}: {e}", config.admin_addr)))?;
    let api_addr = api_listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;

    let sidecar = Arc::new(Sidecar {
        config: config.clone(),
        resources: RwLock::new(resources.clone()),
        outbox: outbox.clone(),
        broker: broker.clone(),
        metrics: metrics.clone(),
        confirmed: RwLock::new(BTreeMap::new()),
        shutting_down: Default::default(),
        broker_configured: Default::default(),
    });

    let mut forwarders = Vec::new();
    for tl in outbox.topics() {
        let f = Forwarder::start(&config.namespace, tl.clone(), outbox.clone(), broker.clone(), metrics.clone());
        sidecar.confirmed.write().unwrap_or_else(|e| e.into_inner()).insert(tl.topic.clone(), f.confirmed.clone());
        forwarders.push(f);
    }
    let configure = tokio::spawn(configure_broker(sidecar.clone(), resources.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let serve = |listener: TcpListener, router: axum::Router| {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let graceful = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            axum::serve(listener, router).with_graceful_shutdown(graceful).await
        })
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
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: refusing produce calls, draining the outbox");
    sidecar.shutting_down.store(true, Ordering::Release);
    drain(&sidecar, config.shutdown_grace).await;
    configure.abort();
    for f in forwarders {
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
/// subscriptions, retrying with backoff until the broker takes them all.
async fn configure_broker(s: Arc<Sidecar>, resources: Resources) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match apply_resources(&*s.broker, &s.config, &resources).await {
            Ok(()) => {
                s.broker_configured.store(true, Ordering::Release);
                tracing::info!(topics = resources.topics.len(), "broker configured");
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

/// Ensures streams and consumers for `resources` (pure mapping from `ferry-api`).
pub async fn apply_resources(
    broker: &dyn Broker,
    config: &Config,
    resources: &Resources,
) -> Result<(), broker::BrokerError> {
    for (name, spec) in &resources.topics {
        broker.ensure_stream(&ferry_api::stream_plan(&config.namespace, name, spec)).await?;
    }
    for (name, spec) in resources.subscriptions_of(&config.app_id) {
        let plan = ferry_api::consumer_plan(&config.namespace, name, spec, Some(&config.pod_name));
        broker.ensure_consumer(&plan).await?;
    }
    Ok(())
}
