//! `ferry-bench e2e`: produce → sidecar → broker → sidecar → push to an app
//! → 200 (ack), for each backend in one run, each figure beside a baseline
//! measured in the same run (DESIGN.md §5, issues 5 and 6).
//!
//! The app is in this process ([`crate::sink`]): every message carries its
//! send time, and the app records receive time minus send time.
//!
//! 1. `nats` backend (its own nats-server): latency at a fixed rate (open
//!    loop, stamped with each message's *scheduled* send time), then the
//!    raw async-nats path at the same rate on the same server.
//! 2. `embedded` backend: the same fixed-rate latency.
//! 3. `nats` sustained throughput: NDJSON batches on several connections as
//!    fast as the sidecar accepts them, while at most `--window` produced
//!    messages are not yet at the app (so the run is a steady state, not
//!    a backlog growing for later); messages/s reaching the app during the
//!    phase. Baseline: raw pipelined JetStream publish → durable pull
//!    consumer (fetch in batches, ack each) under the same window.
//! 4. `embedded` sustained throughput, against the nats backend's.
//! 5. durable throughput: messages Ferry acknowledged after its fsync
//!    (NDJSON batches as fast as answered, to a topic nobody consumes, on
//!    the nats backend with a new nats-server and sidecar), against
//!    JetStream's own `sync_interval: always` (another new nats-server,
//!    configured so): its pipelined publish rate.
//!
//! Loads go to 127.0.0.1 only; every phase is bounded in time, every wait
//! in time. Timings are printed, never asserted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ferry_e2e::{free_port, manifests, NatsServer, Process, START_TIMEOUT};
use hyper::{StatusCode, Uri};

use crate::catalogue::Source;
use crate::figures::{Figure, JsonOut};
use crate::http::{open_many, Conn, Error};
use crate::load::{join_pacer, pacer, REQUEST_TIMEOUT};
use crate::rawjs::{self, SyncAlwaysServer, Template};
use crate::sink::{self, NdjsonStamped, Recorder};
use crate::stats::{ms, verdict, Latencies};
use crate::{nats_pid, progress, say, sys, Sidecar};

/// The topic and its stream at the broker.
const TOPIC: &str = "e2e";
/// A topic without a subscription: the durable produce phase's.
const DURABLE_TOPIC: &str = "e2e-durable";
const STREAM: &str = "FERRY_default_e2e";
/// The subscription.
const SUBSCRIPTION: &str = "e2e-app";
/// Messages sent (and awaited) before the figures, to open connections and
/// create consumers.
const WARM_UP: u64 = 200;

fn manifest(max_in_flight: u32, push_batch: u32, push_batch_wait_ms: u64) -> String {
    format!(
        "\
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: {TOPIC}
spec: {{}}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: {DURABLE_TOPIC}
spec: {{}}
---
apiVersion: ferry.dev/v1alpha1
kind: Subscription
metadata:
  name: {SUBSCRIPTION}
spec:
  topic: {TOPIC}
  app: bench
  path: {path}
  maxInFlight: {max_in_flight}
  startPosition: Earliest
  batch: {{maxMessages: {push_batch}, maxWait: {push_batch_wait_ms}ms}}
",
        path = sink::PATH
    )
}

#[derive(Debug, Args, Clone)]
pub(crate) struct E2eArgs {
    /// The ferry-sidecar binary (relative paths are tried from the current
    /// directory, then from the workspace root).
    #[arg(long, default_value = "target/release/ferry-sidecar")]
    sidecar_bin: PathBuf,
    /// Seconds each phase runs [default: 10; 1 with --quick].
    #[arg(long)]
    duration: Option<f64>,
    /// Messages per second of the latency phases.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Keep-alive connections for the fixed-rate single-message produce.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Keep-alive connections for batch produce in the throughput phases.
    #[arg(long, default_value_t = 4)]
    batch_connections: usize,
    /// Messages per NDJSON batch request in the throughput phases.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Throughput phases: most messages produced (or published) but not yet
    /// received by the app (0: no limit, a growing backlog).
    #[arg(long, default_value_t = 5_000)]
    window: u64,
    /// The subscription's maxInFlight (concurrent pushes to the app).
    #[arg(long, default_value_t = 256)]
    max_in_flight: u32,
    /// Diagnosis: bulk push, this many messages per push request
    /// (the subscription's batch.maxMessages; 1 = one request per message).
    #[arg(long, default_value_t = 1)]
    push_batch: u32,
    /// Diagnosis: the subscription's batch.maxWait in milliseconds (with --push-batch).
    #[arg(long, default_value_t = 1)]
    push_batch_wait_ms: u64,
    /// The raw consumer's fetch batch (messages per pull request).
    #[arg(long, default_value_t = 256)]
    fetch_batch: usize,
    /// The raw publisher's confirmations in flight (the forwarder's window).
    #[arg(long, default_value_t = crate::FORWARDER_WINDOW)]
    publish_window: usize,
    /// Figure e2e3: interleaved runs of the nats backend's and the raw
    /// path's throughput phases; each side's figure is its median run
    /// [default: 3; 1 with --quick].
    #[arg(long)]
    sustained_pairs: Option<usize>,
    /// Leave out figure 5 (the second nats-server with `sync_interval: always`).
    #[arg(long)]
    skip_sync_always: bool,
    /// Diagnosis, for A/B runs of two sidecar builds: only the nats
    /// backend's and the raw path's throughput phases (figure e2e3), each
    /// with the CPU its processes used; no figures written.
    #[arg(long)]
    throughput_only: bool,
    /// Diagnosis: only the embedded backend's fixed-rate phase (figures
    /// e2e6/e2e7), with its produce answers and pacer lag; no figures written.
    #[arg(long, conflicts_with = "throughput_only")]
    embedded_latency_only: bool,
    /// Diagnosis, for A/B runs of two sidecar builds: only the nats
    /// backend's fixed-rate phase and the raw path's (figures e2e1/e2e2),
    /// each with its CPU; no figures written.
    #[arg(long, conflicts_with_all = ["throughput_only", "embedded_latency_only"])]
    latency_only: bool,
    /// Diagnosis: only figure e2e5, the nats backend's durable produce
    /// (with the CPU its processes used) and JetStream's `sync_interval:
    /// always` publish rate; no figures written.
    #[arg(long, conflicts_with_all = ["throughput_only", "embedded_latency_only", "latency_only", "skip_sync_always"])]
    durable_only: bool,
    /// Keep-alive connections of the durable produce phase (figure e2e5)
    /// [default: --batch-connections].
    #[arg(long)]
    durable_connections: Option<usize>,
    /// Smoke run: 1 s phases.
    #[arg(long)]
    quick: bool,
    /// Also append each figure to this file as a JSON line (for `ferry-bench report`).
    #[arg(long)]
    json_out: Option<PathBuf>,
}

struct Settings {
    args: E2eArgs,
    sidecar_bin: PathBuf,
    duration: Duration,
    /// Interleaved Ferry/raw throughput runs of figure e2e3.
    pairs: usize,
    /// Longest wait for the app to receive what a phase produced.
    drain_timeout: Duration,
}

/// Runs `ferry-bench e2e`.
pub(crate) fn main(args: E2eArgs) -> ExitCode {
    let s = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&s) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn settings(args: E2eArgs) -> Result<Settings, String> {
    let sidecar_bin = crate::sidecar_bin(&args.sidecar_bin)?;
    crate::check_nats_server()?;
    let q = args.quick;
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(if q { 1.0 } else { 10.0 }));
    if duration.is_zero() || duration > Duration::from_secs(3600) {
        return Err("--duration must be more than 0 and at most 3600 seconds".into());
    }
    if args.rate == 0
        || args.connections == 0
        || args.batch_connections == 0
        || args.durable_connections == Some(0)
        || args.batch_size == 0
        || args.fetch_batch == 0
        || args.publish_window == 0
        || args.max_in_flight == 0
        || args.push_batch == 0
        || args.push_batch_wait_ms == 0
    {
        return Err("--rate, --connections, --batch-connections, --batch-size, --fetch-batch, --publish-window, \
                    --max-in-flight, --push-batch and --push-batch-wait-ms must be positive"
            .into());
    }
    if args.payload < sink::STAMP_LEN + 2 {
        return Err(format!("--payload must be at least {} bytes (it carries the send time)", sink::STAMP_LEN + 2));
    }
    let pairs = args.sustained_pairs.unwrap_or(if q { 1 } else { 3 });
    if pairs == 0 || pairs > 100 {
        return Err("--sustained-pairs must be 1 to 100".into());
    }
    if args.window != 0 && args.window < args.batch_size as u64 {
        return Err("--window must be 0 or at least --batch-size".into());
    }
    Ok(Settings {
        sidecar_bin,
        duration,
        pairs,
        drain_timeout: if q { Duration::from_secs(60) } else { Duration::from_secs(180) },
        args,
    })
}

/// A fixed-rate phase.
struct Fixed {
    /// Receive time minus scheduled send time, per message at the app.
    lat: Latencies,
    scheduled: u64,
    /// Produces answered 202 / publishes confirmed.
    accepted: u64,
    delivered: u64,
    errors: u64,
    first_error: Option<String>,
    /// Produce answers (Ferry) from the scheduled time.
    answers: Option<Latencies>,
    pacer_lag: Latencies,
    cpu: String,
}

impl Fixed {
    fn all_delivered(&self) -> bool {
        self.errors == 0 && self.accepted == self.scheduled && self.delivered >= self.accepted
    }

    fn counts(&self) -> String {
        let mut s = format!(
            "{} scheduled, {} accepted, {} received by the app, {} failed",
            self.scheduled, self.accepted, self.delivered, self.errors
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!(" (first failure: {e})"));
        }
        s
    }
}

/// A throughput phase.
struct Sustained {
    /// Messages the app received during the phase, per second.
    rate: f64,
    /// Produced messages accepted (202) / publishes confirmed, per second.
    produce_rate: f64,
    accepted: u64,
    delivered: u64,
    errors: u64,
    rejected: u64,
    first_error: Option<String>,
    /// How long the app took to receive the rest after the phase.
    drain: Duration,
    /// Receive time minus send time (of the batch request, or the publish).
    lat: Latencies,
    cpu: String,
    /// Rates of every run this figure is the median of, in run order.
    runs: Vec<f64>,
    /// Those other runs in which the app missed a message or a request failed.
    other_runs_incomplete: usize,
}

impl Sustained {
    fn all_delivered(&self) -> bool {
        self.errors == 0 && self.delivered >= self.accepted && self.other_runs_incomplete == 0
    }

    /// The run with the median rate (the upper one of an even count),
    /// keeping every run's rate and whether the others delivered everything.
    fn median(runs: Vec<Sustained>) -> Sustained {
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let incomplete = runs.iter().filter(|r| !r.all_delivered()).count();
        let mut runs = runs;
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let mut m = runs.swap_remove(runs.len() / 2);
        m.other_runs_incomplete = incomplete - usize::from(!m.all_delivered());
        m.runs = rates;
        m
    }

    fn counts(&self) -> String {
        let mut s = format!(
            "{} accepted ({:.0}/s), {} received by the app, {} rejected (429/503/507), {} failed, the last received \
             {:.2} s after the phase's end",
            self.accepted,
            self.produce_rate,
            self.delivered,
            self.rejected,
            self.errors,
            self.drain.as_secs_f64()
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!(" (first failure: {e})"));
        }
        s
    }
}

/// Everything one backend measured.
struct Backend {
    fixed: Fixed,
    sustained: Sustained,
    rss_peak: Option<u64>,
    /// The nats backend's acknowledged (fsynced) produce rate.
    durable: Option<Durable>,
}

/// Acknowledged, fsynced produce: NDJSON batches as fast as the sidecar
/// answers 202, to a topic nobody consumes, while it forwards to the broker.
struct Durable {
    rate: f64,
    accepted: u64,
    /// Requests answered 429/503/507 (back-pressure), retried after 10 ms.
    rejected: u64,
    failed: u64,
    first_error: Option<String>,
    /// CPU of the sidecar, nats-server and the load generator.
    cpu: String,
}

/// The raw path's figures.
struct RawFigures {
    fixed: Fixed,
    sustained: Sustained,
    max_ack_pending: i64,
}

/// The sync_interval: always figures.
struct SyncFigures {
    publish_rate: f64,
    publish_note: String,
    sustained: Sustained,
    sync_line: Option<String>,
}

fn run(s: &Settings) -> Result<(), Error> {
    let a = &s.args;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rec = Arc::new(Recorder::default());
    let app = rt.block_on(sink::start_app(rec.clone()))?;
    let resources = manifests(&[("e2e.yaml", &manifest(a.max_in_flight, a.push_batch, a.push_batch_wait_ms))]);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    say(&format!(
        "ferry-bench e2e: sidecar {}, nats-server {}, {cpus} CPUs, {:.0} s phases, {} B payloads, app on {app} \
         (in-process, answers 200), subscription maxInFlight {}{}, latency at {} msg/s on {} connections, \
         throughput with NDJSON batches of {} on {} connections and a window of {} messages{}",
        s.sidecar_bin.display(),
        ferry_e2e::nats_server_binary().display(),
        s.duration.as_secs_f64(),
        a.payload,
        a.max_in_flight,
        if a.push_batch > 1 {
            format!(" with bulk push of up to {} (maxWait {} ms)", a.push_batch, a.push_batch_wait_ms)
        } else {
            String::new()
        },
        a.rate,
        a.connections,
        a.batch_size,
        a.batch_connections,
        if a.window == 0 { "unlimited".to_owned() } else { a.window.to_string() },
        if a.quick { ", --quick" } else { "" }
    ));

    if a.embedded_latency_only {
        return embedded_latency_only(&rt, s, resources.path(), app, &rec);
    }
    if a.durable_only {
        return durable_only(&rt, s, resources.path(), app, &rec);
    }
    // The nats backend and the raw path, on one nats-server.
    let nats_server = NatsServer::start();
    let data = tempfile::tempdir()?;
    progress(&format!("nats backend: starting {} (data dir {})", s.sidecar_bin.display(), data.path().display()));
    let mut sc = start_sidecar(s, &nats_server.url(), resources.path(), data.path(), app)?;
    let npid = nats_pid(&nats_server);
    if a.throughput_only {
        return only(&rt, s, &nats_server, &mut sc, &rec, Only::Throughput);
    }
    if a.latency_only {
        return only(&rt, s, &nats_server, &mut sc, &rec, Only::Latency);
    }
    let (mut nats, raw, template) = {
        let pid = sc.process.pid();
        warm_up(&rt, s, &sc, &rec)?;
        progress(&format!("nats backend: {} msg/s for {:?}", a.rate, s.duration));
        let fixed = ferry_fixed(&rt, s, &sc, &rec, sys::CpuMeter::start(pid, npid))?;
        progress(&format!("raw path: {} msg/s for {:?}", a.rate, s.duration));
        let js = rt.block_on(crate::forward::connect(&nats_server.url()))?;
        let template = rt.block_on(Template::of(&js, STREAM))?;
        let raw_fixed = raw_fixed(&rt, s, &js, &template, &rec, sys::CpuMeter::start(pid, npid))?;
        let (sustained, raw_sustained) = sustained_pairs(&rt, s, &sc, npid, &js, &template, &rec)?;
        let rss_peak = sys::status_bytes(pid, "VmHWM");
        let _ = rt.block_on(rawjs::purge(&js));
        (
            Backend { fixed, sustained, rss_peak, durable: None },
            RawFigures { fixed: raw_fixed, sustained: raw_sustained, max_ack_pending: template.max_ack_pending() },
            template,
        )
    };
    stop(&mut sc);
    drop(nats_server);
    // Durable produce on a fresh server and sidecar, like its baseline's.
    nats.durable = Some(durable_phase(&rt, s, resources.path(), app, &rec)?.0);

    // The embedded backend.
    let data = tempfile::tempdir()?;
    progress(&format!("embedded backend: starting {} (data dir {})", s.sidecar_bin.display(), data.path().display()));
    let mut sc = start_sidecar(s, "embedded", resources.path(), data.path(), app)?;
    let embedded = {
        let pid = sc.process.pid();
        warm_up(&rt, s, &sc, &rec)?;
        progress(&format!("embedded backend: {} msg/s for {:?}", a.rate, s.duration));
        let fixed = ferry_fixed(&rt, s, &sc, &rec, sys::CpuMeter::start(pid, None))?;
        progress(&format!("embedded backend: throughput for {:?}", s.duration));
        let sustained = ferry_sustained(&rt, s, &sc, &rec, sys::CpuMeter::start(pid, None))?;
        Backend { fixed, sustained, rss_peak: sys::status_bytes(pid, "VmHWM"), durable: None }
    };
    stop(&mut sc);

    // JetStream's own durable rate, on a second server (stream and consumer
    // configured like the first server's).
    let sync = if a.skip_sync_always {
        None
    } else {
        progress("nats-server with sync_interval: always: publish, then the raw path's throughput");
        let server = SyncAlwaysServer::start()?;
        Some(sync_always(&rt, s, &server, &template, &rec)?)
    };

    print_figures(s, &nats, &raw, &embedded, sync.as_ref());
    let out = JsonOut::new(a.json_out.clone());
    for f in figures(s, &nats, &raw, &embedded, sync.as_ref()) {
        out.write(&f.quick(a.quick))?;
    }
    Ok(())
}

/// The diagnosis runs against the nats backend; neither writes figures.
enum Only {
    /// `--throughput-only`: figure e2e3 alone, each side's rate with the
    /// CPU it took per message.
    Throughput,
    /// `--latency-only`: figures e2e1/e2e2 alone, Ferry's fixed-rate phase
    /// then the raw path's.
    Latency,
}

fn only(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    nats_server: &NatsServer,
    sc: &mut Sidecar,
    rec: &Arc<Recorder>,
    what: Only,
) -> Result<(), Error> {
    let npid = nats_pid(nats_server);
    let pid = sc.process.pid();
    warm_up(rt, s, sc, rec)?;
    // As in the full run, Ferry's fixed-rate phase comes before the raw
    // client connects.
    let fixed = match what {
        Only::Latency => Some(ferry_fixed(rt, s, sc, rec, sys::CpuMeter::start(pid, npid))?),
        Only::Throughput => None,
    };
    let js = rt.block_on(crate::forward::connect(&nats_server.url()))?;
    let template = rt.block_on(Template::of(&js, STREAM))?;
    match fixed {
        None => {
            let (ferry, raw) = sustained_pairs(rt, s, sc, npid, &js, &template, rec)?;
            stop(sc);
            println!(
                "throughput-only: ferry {:.0} msg/s ({}) | raw {:.0} msg/s ({}) | ratio {:.3}",
                ferry.rate,
                sustained_detail("ferry", &ferry),
                raw.rate,
                sustained_detail("raw", &raw),
                ferry.rate / raw.rate
            );
        }
        Some(fixed) => {
            let raw = raw_fixed(rt, s, &js, &template, rec, sys::CpuMeter::start(pid, npid))?;
            stop(sc);
            println!("latency-only: {}", fixed_detail("Ferry", &fixed));
            println!("latency-only: {}", fixed_detail("raw", &raw));
            println!("latency-only: delivered Ferry {} | raw {}", lat3(&fixed.lat), lat3(&raw.lat));
        }
    }
    Ok(())
}

/// Figure e2e3's runs: Ferry's throughput phase, then the raw path's, as
/// many times as `--sustained-pairs` says; each side's median run. The raw
/// path's rate moved by a third between runs a few minutes apart on the
/// shared VM; interleaved runs put both sides through the same drift.
fn sustained_pairs(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    sc: &Sidecar,
    npid: Option<u32>,
    js: &async_nats::jetstream::Context,
    template: &Template,
    rec: &Arc<Recorder>,
) -> Result<(Sustained, Sustained), Error> {
    let pid = sc.process.pid();
    let (mut ferry, mut raw) = (Vec::new(), Vec::new());
    for i in 1..=s.pairs {
        progress(&format!("nats backend: throughput for {:?} (run {i} of {})", s.duration, s.pairs));
        let f = ferry_sustained(rt, s, sc, rec, sys::CpuMeter::start(pid, npid))?;
        progress(&format!("raw path: throughput for {:?} (run {i} of {})", s.duration, s.pairs));
        let r = raw_sustained(rt, s, js, template, rec, Some(sys::CpuMeter::start(pid, npid)))?;
        progress(&format!(
            "run {i}: ferry {:.0} msg/s ({}), raw {:.0} msg/s ({}), ratio {:.3}",
            f.rate,
            f.cpu,
            r.rate,
            r.cpu,
            f.rate / r.rate
        ));
        ferry.push(f);
        raw.push(r);
    }
    Ok((Sustained::median(ferry), Sustained::median(raw)))
}

/// Figure e2e5's Ferry side: the nats backend on its own new nats-server
/// and sidecar (as the baseline gets a new server), so that the earlier
/// phases' backlog and disk writes are not in it. Its backlog is forwarded
/// while the sidecar stops. Also returns the settings of the stream and
/// consumer the sidecar made (the raw paths copy them).
fn durable_phase(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    resources: &Path,
    app: SocketAddr,
    rec: &Arc<Recorder>,
) -> Result<(Durable, Template), Error> {
    let nats_server = NatsServer::start();
    let data = tempfile::tempdir()?;
    progress(&format!("durable produce: a new nats-server and sidecar (data dir {})", data.path().display()));
    let mut sc = start_sidecar(s, &nats_server.url(), resources, data.path(), app)?;
    warm_up(rt, s, &sc, rec)?;
    progress(&format!("nats backend: acknowledged (fsynced) produce for {:?}", s.duration));
    let meter = sys::CpuMeter::start(sc.process.pid(), nats_pid(&nats_server));
    let durable = ferry_durable_produce(rt, s, &sc, meter);
    let js = rt.block_on(crate::forward::connect(&nats_server.url()));
    let template = match js {
        Ok(js) => rt.block_on(Template::of(&js, STREAM)),
        Err(e) => Err(e),
    };
    stop(&mut sc);
    Ok((durable?, template?))
}

/// `--durable-only`: figure e2e5 alone, with the CPU Ferry's side took.
fn durable_only(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    resources: &Path,
    app: SocketAddr,
    rec: &Arc<Recorder>,
) -> Result<(), Error> {
    let (durable, template) = durable_phase(rt, s, resources, app, rec)?;
    let server = SyncAlwaysServer::start()?;
    let sync = sync_always_publish(rt, s, &server, &template, rec)?;
    println!(
        "durable-only: ferry {:.0} msg/s on {} connections ({} failed, {} refused; {}) | JetStream sync_interval \
         always {:.0} msg/s ({}) | ratio {:.1}",
        durable.rate,
        durable_connections(&s.args),
        durable.failed,
        durable.rejected,
        durable.cpu,
        sync.0,
        sync.1,
        ratio(durable.rate, sync.0)
    );
    Ok(())
}

fn durable_connections(a: &E2eArgs) -> usize {
    a.durable_connections.unwrap_or(a.batch_connections)
}

/// `--embedded-latency-only`: the embedded backend's fixed-rate phase alone.
fn embedded_latency_only(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    resources: &Path,
    app: SocketAddr,
    rec: &Arc<Recorder>,
) -> Result<(), Error> {
    let data = tempfile::tempdir()?;
    let mut sc = start_sidecar(s, "embedded", resources, data.path(), app)?;
    let pid = sc.process.pid();
    warm_up(rt, s, &sc, rec)?;
    let fixed = ferry_fixed(rt, s, &sc, rec, sys::CpuMeter::start(pid, None))?;
    stop(&mut sc);
    println!("embedded-latency-only: {}", fixed_detail("Ferry embedded", &fixed));
    println!("embedded-latency-only: delivered {}", lat3(&fixed.lat));
    Ok(())
}

fn start_sidecar(
    s: &Settings,
    broker: &str,
    resources: &Path,
    data_dir: &Path,
    app: SocketAddr,
) -> Result<Sidecar, Error> {
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(&s.sidecar_bin);
    cmd.env_remove("RUST_LOG")
        .env_remove("FERRY_API_TOKEN")
        .env_remove("FERRY_APP_TOKEN")
        .args(["--app-id", "bench", "--broker", broker, "--app-port", &app.port().to_string()])
        .args(["--api-addr", &api.to_string(), "--admin-addr", &admin.to_string()])
        .arg("--resources")
        .arg(resources)
        .arg("--data-dir")
        .arg(data_dir);
    let mut process = Process::spawn("ferry-sidecar", cmd);
    process.wait_for_line("ferry-sidecar started", START_TIMEOUT);
    process.wait_for_line("broker configured", START_TIMEOUT);
    Ok(Sidecar { process, api, admin })
}

fn stop(sc: &mut Sidecar) {
    sc.process.signal(15);
    let _ = sc.process.wait_exit(Duration::from_secs(30));
}

fn produce_uri() -> Uri {
    crate::uri(&format!("/v1/topics/{TOPIC}/messages"))
}

fn batch_uri() -> Uri {
    crate::uri(&format!("/v1/topics/{TOPIC}/messages:batch"))
}

/// Sends a few hundred messages and waits for them at the app.
fn warm_up(rt: &tokio::runtime::Runtime, s: &Settings, sc: &Sidecar, rec: &Recorder) -> Result<(), Error> {
    rec.reset();
    rt.block_on(async {
        let mut conn = Conn::open(sc.api).await?;
        let uri = produce_uri();
        for _ in 0..WARM_UP {
            let body = sink::stamped(Instant::now(), s.args.payload);
            let a = conn.post(&uri, "text/plain", body).await?;
            if a.status != StatusCode::ACCEPTED {
                return Err::<(), Error>(
                    format!("warm-up produce answered {}: {}", a.status, String::from_utf8_lossy(&a.body)).into(),
                );
            }
        }
        let got = rec.wait_for(WARM_UP, s.drain_timeout).await;
        if got < WARM_UP {
            return Err(
                format!("warm-up: the app received {got} of {WARM_UP} messages in {:?}", s.drain_timeout).into()
            );
        }
        Ok(())
    })?;
    // Let the sidecar's queues settle before measuring.
    std::thread::sleep(Duration::from_millis(200));
    rec.reset();
    Ok(())
}

#[derive(Default)]
struct Worker {
    accepted: u64,
    rejected: u64,
    errors: u64,
    first_error: Option<String>,
    answers: Vec<Duration>,
}

impl Worker {
    fn failed(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    fn merge(ws: Vec<Worker>) -> Worker {
        let mut out = Worker::default();
        for w in ws {
            out.accepted += w.accepted;
            out.rejected += w.rejected;
            out.errors += w.errors;
            if out.first_error.is_none() {
                out.first_error = w.first_error;
            }
            out.answers.extend(w.answers);
        }
        out
    }
}

/// One produce request; `Ok(true)` when accepted (202), `Ok(false)` on
/// back-pressure (429/503/507).
async fn post(conn: &mut Conn, uri: &Uri, content_type: &'static str, body: bytes::Bytes) -> Result<bool, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.post(uri, content_type, body)).await {
        Ok(Ok(a)) if a.status == StatusCode::ACCEPTED => Ok(true),
        Ok(Ok(a))
            if a.status == StatusCode::TOO_MANY_REQUESTS
                || a.status == StatusCode::SERVICE_UNAVAILABLE
                || a.status == StatusCode::INSUFFICIENT_STORAGE =>
        {
            Ok(false)
        }
        Ok(Ok(a)) => Err(format!("{} {}", a.status, String::from_utf8_lossy(&a.body))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// Ferry at a fixed rate: single-message produce, open loop.
fn ferry_fixed(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    sc: &Sidecar,
    rec: &Recorder,
    cpu: sys::CpuMeter,
) -> Result<Fixed, Error> {
    let a = &s.args;
    rec.reset();
    let (w, scheduled, pacer_lag) = rt.block_on(async {
        let conns = open_many(sc.api, a.connections).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks = Vec::new();
        for mut conn in conns {
            let rx = rx.clone();
            let (size, addr, uri) = (a.payload, sc.api, produce_uri());
            tasks.push(tokio::spawn(async move {
                let mut w = Worker::default();
                loop {
                    let due = rx.lock().await.recv().await;
                    let Some(due) = due else { break };
                    match post(&mut conn, &uri, "text/plain", sink::stamped(due, size)).await {
                        Ok(true) => {
                            w.accepted += 1;
                            w.answers.push(due.elapsed());
                        }
                        Ok(false) => w.rejected += 1,
                        Err(e) => {
                            w.failed(e);
                            if let Ok(c) = Conn::open(addr).await {
                                conn = c;
                            }
                        }
                    }
                }
                w
            }));
        }
        let (scheduled, _, pacer) = pacer(a.rate, s.duration, tx);
        let lag = join_pacer(pacer).await?;
        let mut ws = Vec::new();
        for t in tasks {
            ws.push(t.await?);
        }
        Ok::<_, Error>((Worker::merge(ws), scheduled, lag))
    })?;
    let cpu = cpu.report();
    let delivered = rt.block_on(rec.wait_for(w.accepted, s.drain_timeout));
    Ok(Fixed {
        lat: Latencies::of(rec.latencies()),
        scheduled,
        accepted: w.accepted,
        delivered,
        errors: w.errors + w.rejected + rec.unstamped(),
        first_error: w.first_error,
        answers: Some(Latencies::of(w.answers)),
        pacer_lag,
        cpu,
    })
}

/// The raw path at a fixed rate.
fn raw_fixed(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    js: &async_nats::jetstream::Context,
    template: &Template,
    rec: &Arc<Recorder>,
    cpu: sys::CpuMeter,
) -> Result<Fixed, Error> {
    let a = &s.args;
    rec.reset();
    let (published, scheduled, pacer_lag, cpu, delivered) = rt.block_on(async {
        let consumer = rawjs::setup(js, template).await?;
        let consuming = rawjs::consume(consumer, a.fetch_batch, rec.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let (scheduled, _, pacer) = pacer(a.rate, s.duration, tx);
        let published = rawjs::publish_paced(js, rx, a.payload).await?;
        let lag = join_pacer(pacer).await?;
        let cpu = cpu.report();
        let delivered = rec.wait_for(published.acked, s.drain_timeout).await;
        consuming.abort();
        Ok::<_, Error>((published, scheduled, lag, cpu, delivered))
    })?;
    Ok(Fixed {
        lat: Latencies::of(rec.latencies()),
        scheduled,
        accepted: published.acked,
        delivered,
        errors: published.errors + rec.unstamped(),
        first_error: published.first_error,
        answers: None,
        pacer_lag,
        cpu,
    })
}

/// Waits until a worker may send `n` more messages: at most `window` sent
/// and not yet received. False once `deadline` passed.
async fn gate(reserved: &AtomicU64, rec: &Recorder, n: u64, window: u64, deadline: Instant) -> bool {
    loop {
        if Instant::now() >= deadline {
            return false;
        }
        let r = reserved.load(Ordering::Acquire);
        if window == 0 || r.saturating_sub(rec.count()) + n <= window {
            if reserved.compare_exchange(r, r + n, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return true;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// DESIGN §5's durable goal: no failed request, and at least 20× JetStream's
/// own `sync_interval: always` publish rate.
fn durable_met(d: Option<&Durable>, sync: &SyncFigures) -> bool {
    d.is_some_and(|d| d.failed == 0 && ratio(d.rate, sync.publish_rate) >= 20.0)
}

/// Ferry's acknowledged produce rate: NDJSON batches (`ack=local`: each
/// answered 202 after its fsync) as fast as they are answered, to a topic
/// without a subscription, for the phase's duration.
fn ferry_durable_produce(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    sc: &Sidecar,
    cpu: sys::CpuMeter,
) -> Result<Durable, Error> {
    let a = &s.args;
    let batch = Arc::new(NdjsonStamped::new(a.batch_size, a.payload));
    let uri = crate::uri(&format!("/v1/topics/{DURABLE_TOPIC}/messages:batch"));
    rt.block_on(async {
        let conns = open_many(sc.api, durable_connections(a)).await?;
        let t0 = Instant::now();
        let deadline = t0 + s.duration;
        let mut tasks = Vec::new();
        for mut conn in conns {
            let (batch, uri, n) = (batch.clone(), uri.clone(), a.batch_size as u64);
            tasks.push(tokio::spawn(async move {
                let mut w = Worker::default();
                while Instant::now() < deadline {
                    match post(&mut conn, &uri, "application/x-ndjson", batch.body(Instant::now())).await {
                        Ok(true) => w.accepted += n,
                        Ok(false) => {
                            w.rejected += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => {
                            w.failed(e);
                            break;
                        }
                    }
                }
                w
            }));
        }
        let mut ws = Vec::with_capacity(tasks.len());
        for t in tasks {
            ws.push(t.await.map_err(|e| e.to_string())?);
        }
        let w = Worker::merge(ws);
        let rate = w.accepted as f64 / t0.elapsed().as_secs_f64();
        let cpu = cpu.report();
        Ok::<_, Error>(Durable {
            cpu,
            rate,
            accepted: w.accepted,
            rejected: w.rejected,
            failed: w.errors,
            first_error: w.first_error,
        })
    })
}

/// Ferry's sustained throughput: NDJSON batches as fast as accepted, within the window.
fn ferry_sustained(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    sc: &Sidecar,
    rec: &Arc<Recorder>,
    cpu: sys::CpuMeter,
) -> Result<Sustained, Error> {
    let a = &s.args;
    rec.reset();
    let batch = Arc::new(NdjsonStamped::new(a.batch_size, a.payload));
    let (w, at_deadline, cpu, deadline) = rt.block_on(async {
        let conns = open_many(sc.api, a.batch_connections).await?;
        let reserved = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let deadline = t0 + s.duration;
        let mut tasks = Vec::new();
        for mut conn in conns {
            let (batch, reserved, rec) = (batch.clone(), reserved.clone(), rec.clone());
            let (n, window, addr, uri) = (a.batch_size as u64, a.window, sc.api, batch_uri());
            tasks.push(tokio::spawn(async move {
                let mut w = Worker::default();
                while gate(&reserved, &rec, n, window, deadline).await {
                    let sent = Instant::now();
                    match post(&mut conn, &uri, "application/x-ndjson", batch.body(sent)).await {
                        Ok(true) => {
                            w.accepted += n;
                            w.answers.push(sent.elapsed());
                            continue;
                        }
                        Ok(false) => {
                            w.rejected += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => {
                            w.failed(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            if let Ok(c) = Conn::open(addr).await {
                                conn = c;
                            }
                        }
                    }
                    reserved.fetch_sub(n, Ordering::AcqRel);
                }
                w
            }));
        }
        tokio::time::sleep_until(deadline.into()).await;
        let at_deadline = rec.count();
        let cpu = cpu.report();
        let mut ws = Vec::new();
        for t in tasks {
            ws.push(t.await?);
        }
        Ok::<_, Error>((Worker::merge(ws), at_deadline, cpu, deadline))
    })?;
    let delivered = rt.block_on(rec.wait_for(w.accepted, s.drain_timeout));
    Ok(Sustained {
        rate: at_deadline as f64 / s.duration.as_secs_f64(),
        produce_rate: w.accepted as f64 / s.duration.as_secs_f64(),
        accepted: w.accepted,
        delivered,
        errors: w.errors + rec.unstamped(),
        rejected: w.rejected,
        first_error: w.first_error,
        drain: deadline.elapsed(),
        lat: Latencies::of(rec.latencies()),
        cpu,
        runs: Vec::new(),
        other_runs_incomplete: 0,
    })
}

/// The raw path's sustained throughput, within the same window.
fn raw_sustained(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    js: &async_nats::jetstream::Context,
    template: &Template,
    rec: &Arc<Recorder>,
    cpu: Option<sys::CpuMeter>,
) -> Result<Sustained, Error> {
    let a = &s.args;
    rec.reset();
    let (published, at_deadline, cpu, delivered, drain) = rt.block_on(async {
        let consumer = rawjs::setup(js, template).await?;
        let consuming = rawjs::consume(consumer, a.fetch_batch, rec.clone());
        let deadline = Instant::now() + s.duration;
        let (published, at_deadline, cpu) = {
            let publishing = rawjs::publish_sustained(js, a.payload, a.publish_window, a.window, deadline, rec);
            let watch = async {
                tokio::time::sleep_until(deadline.into()).await;
                (rec.count(), cpu.map(|c| c.report()))
            };
            let (published, (at_deadline, cpu)) = tokio::join!(publishing, watch);
            (published?, at_deadline, cpu)
        };
        let delivered = rec.wait_for(published.acked, s.drain_timeout).await;
        let drain = deadline.elapsed();
        if delivered < published.acked && consuming.is_finished() {
            let e = consuming.await?;
            return Err(format!("the raw consumer stopped: {e}").into());
        }
        consuming.abort();
        Ok::<_, Error>((published, at_deadline, cpu, delivered, drain))
    })?;
    Ok(Sustained {
        rate: at_deadline as f64 / s.duration.as_secs_f64(),
        produce_rate: published.acked as f64 / s.duration.as_secs_f64(),
        accepted: published.acked,
        delivered,
        errors: published.errors + rec.unstamped(),
        rejected: 0,
        first_error: published.first_error,
        drain,
        lat: Latencies::of(rec.latencies()),
        cpu: cpu.unwrap_or_default(),
        runs: Vec::new(),
        other_runs_incomplete: 0,
    })
}

/// On the `sync_interval: always` server: the pipelined publish rate alone
/// (at most 5 s), then the raw path's sustained throughput.
fn sync_always(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    server: &SyncAlwaysServer,
    template: &Template,
    rec: &Arc<Recorder>,
) -> Result<SyncFigures, Error> {
    let (publish_rate, publish_note) = sync_always_publish(rt, s, server, template, rec)?;
    let js = rt.block_on(crate::forward::connect(&server.url()))?;
    let sustained = raw_sustained(rt, s, &js, template, rec, None)?;
    let _ = rt.block_on(rawjs::purge(&js));
    Ok(SyncFigures { publish_rate, publish_note, sustained, sync_line: server.sync_line() })
}

/// JetStream's own durable rate: pipelined publishes confirmed by the
/// `sync_interval: always` server, per second, and how the run went.
fn sync_always_publish(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    server: &SyncAlwaysServer,
    template: &Template,
    rec: &Arc<Recorder>,
) -> Result<(f64, String), Error> {
    let a = &s.args;
    let js = rt.block_on(crate::forward::connect(&server.url()))?;
    let time = s.duration.min(Duration::from_secs(5));
    let (published, elapsed) = rt.block_on(async {
        rawjs::setup(&js, template).await?;
        let t0 = Instant::now();
        let p = rawjs::publish_sustained(&js, a.payload, a.publish_window, 0, t0 + time, rec).await?;
        Ok::<_, Error>((p, t0.elapsed()))
    })?;
    let publish_rate = published.acked as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut publish_note = format!(
        "{} publishes confirmed in {:.2} s (publishing for {:.1} s, then the last confirmations), {} failed",
        published.acked,
        elapsed.as_secs_f64(),
        time.as_secs_f64(),
        published.errors
    );
    if let Some(e) = &published.first_error {
        publish_note.push_str(&format!(" (first failure: {e})"));
    }
    Ok((publish_rate, publish_note))
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-9)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn lat3(l: &Latencies) -> String {
    format!("p50 {}, p99 {}, max {}", ms(l.p50), ms(l.p99), ms(l.max))
}

fn latency_goals(l: &Latencies, complete: bool) -> String {
    let within = |d: Duration, limit_ms: u64| verdict(complete && d <= Duration::from_millis(limit_ms));
    format!(
        "goal DESIGN §5 p50 <= 1 ms: {}, p99 <= 5 ms: {}; issue 5 p50 <= 2 ms: {}, p99 <= 10 ms: {}",
        within(l.p50, 1),
        within(l.p99, 5),
        within(l.p50, 2),
        within(l.p99, 10)
    )
}

fn fixed_detail(who: &str, f: &Fixed) -> String {
    let mut s = format!("{who}: {}", f.counts());
    if let Some(a) = &f.answers {
        s.push_str(&format!("; produce answered (202) {} from the scheduled time", lat3(a)));
    }
    s.push_str(&format!("; pacer lag (included) p50 {}, p99 {}; {}", ms(f.pacer_lag.p50), ms(f.pacer_lag.p99), f.cpu));
    s
}

fn sustained_detail(who: &str, t: &Sustained) -> String {
    let mut s = String::new();
    if t.runs.len() > 1 {
        let rates: Vec<String> = t.runs.iter().map(|r| format!("{r:.0}")).collect();
        s.push_str(&format!(
            "{who}: median of {} interleaved runs ({} msg/s{}), the median run: ",
            t.runs.len(),
            rates.join(", "),
            if t.other_runs_incomplete > 0 {
                format!("; {} other run(s) did not deliver everything", t.other_runs_incomplete)
            } else {
                String::new()
            }
        ));
    } else {
        s.push_str(&format!("{who}: "));
    }
    s.push_str(&format!("{}; latency under this load {}", t.counts(), lat3(&t.lat)));
    if !t.cpu.is_empty() {
        s.push_str(&format!("; {}", t.cpu));
    }
    s
}

fn print_figures(s: &Settings, nats: &Backend, raw: &RawFigures, embedded: &Backend, sync: Option<&SyncFigures>) {
    let a = &s.args;
    let d = secs(s.duration);
    let mib = |b: Option<u64>| b.map_or("?".to_owned(), |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64));

    let (f, r) = (&nats.fixed, &raw.fixed);
    say(&format!(
        "e2e1 latency, nats backend ({} msg/s open loop, single produce ack=local -> JetStream -> push -> 200, {} B, \
         {d:.0} s; from each message's scheduled send time to its arrival at the app): {} | baseline raw \
         async-nats JetStream publish -> durable pull consumer (fetch, ack each), same rate and server: {} \
         | ratio p50 {:.2}x, p99 {:.2}x raw | {}",
        a.rate,
        a.payload,
        lat3(&f.lat),
        lat3(&r.lat),
        ratio(secs(f.lat.p50), secs(r.lat.p50)),
        ratio(secs(f.lat.p99), secs(r.lat.p99)),
        latency_goals(&f.lat, f.all_delivered())
    ));
    say(&format!("  e2e1 detail: {}", fixed_detail("Ferry", f)));
    say(&format!("  e2e1 detail: {}", fixed_detail("raw", r)));

    let e = &embedded.fixed;
    say(&format!(
        "e2e2 latency, embedded broker (same load): {} | baseline raw async-nats path (above): p50 {}, p99 {}; \
         nats backend p50 {}, p99 {} | ratio p50 {:.2}x, p99 {:.2}x raw; p50 {:.2}x, p99 {:.2}x the nats backend \
         | {}",
        lat3(&e.lat),
        ms(r.lat.p50),
        ms(r.lat.p99),
        ms(f.lat.p50),
        ms(f.lat.p99),
        ratio(secs(e.lat.p50), secs(r.lat.p50)),
        ratio(secs(e.lat.p99), secs(r.lat.p99)),
        ratio(secs(e.lat.p50), secs(f.lat.p50)),
        ratio(secs(e.lat.p99), secs(f.lat.p99)),
        latency_goals(&e.lat, e.all_delivered())
    ));
    say(&format!("  e2e2 detail: {}", fixed_detail("Ferry embedded", e)));

    let (t, rt) = (&nats.sustained, &raw.sustained);
    let window = if a.window == 0 { "no window".to_owned() } else { format!("window {}", a.window) };
    let r3 = ratio(t.rate, rt.rate);
    say(&format!(
        "e2e3 throughput, nats backend (NDJSON batches of {} on {} connections, ack=local, {window}, maxInFlight {}, \
         {d:.0} s): {:.0} msg/s received by the app | baseline raw async-nats pipelined publish (Nats-Msg-Id, {} in \
         flight) -> durable pull consumer (fetch {}, ack each, maxAckPending {}), same {window} and server: {:.0} \
         msg/s | ratio {:.2}x raw | goal (issue 5) >= 0.5x: {}",
        a.batch_size,
        a.batch_connections,
        a.max_in_flight,
        t.rate,
        a.publish_window,
        a.fetch_batch,
        raw.max_ack_pending,
        rt.rate,
        r3,
        verdict(r3 >= 0.5 && t.all_delivered())
    ));
    say(&format!("  e2e3 detail: {}; sidecar peak RSS {}", sustained_detail("Ferry", t), mib(nats.rss_peak)));
    say(&format!("  e2e3 detail: {}", sustained_detail("raw", rt)));

    let te = &embedded.sustained;
    let r4 = ratio(te.rate, t.rate);
    say(&format!(
        "e2e4 throughput, embedded broker (same load): {:.0} msg/s received by the app | baseline nats backend \
         {:.0} msg/s (raw path {:.0}) | ratio {:.2}x the nats backend, {:.2}x raw | goal (issue 6) >= 1.0x: {}",
        te.rate,
        t.rate,
        rt.rate,
        r4,
        ratio(te.rate, rt.rate),
        verdict(r4 >= 1.0 && te.all_delivered())
    ));
    say(&format!(
        "  e2e4 detail: {}; sidecar peak RSS {}",
        sustained_detail("Ferry embedded", te),
        mib(embedded.rss_peak)
    ));

    match sync {
        None => say("  e2e5 skipped (--skip-sync-always)"),
        Some(y) => {
            let d = nats.durable.as_ref();
            let durable = d.map_or(0.0, |d| d.rate);
            let r5 = ratio(durable, y.publish_rate);
            say(&format!(
                "e2e5 durable throughput (messages acknowledged after Ferry's fsync: NDJSON batches of {} as fast as \
                 answered 202, {} connections, a topic without a subscription, forwarded to the broker meanwhile): \
                 nats backend {:.0} msg/s | baseline JetStream with sync_interval: always, pipelined publish with \
                 Nats-Msg-Id ({} in flight), {} B: {:.0} msg/s | ratio {:.2}x | goal DESIGN §5 >= 20x: {}",
                a.batch_size,
                durable_connections(a),
                durable,
                a.publish_window,
                a.payload,
                y.publish_rate,
                r5,
                verdict(durable_met(d, y))
            ));
            if let Some(d) = d {
                say(&format!(
                    "  e2e5 detail: {} messages acknowledged, {} requests refused by back-pressure (429/503/507), \
                     {} failed{}; delivered end to end (e2e3/e2e4, each also pushed and acked by the app): nats \
                     backend {:.0} msg/s ({:.2}x), embedded {:.0} msg/s ({:.2}x)",
                    d.accepted,
                    d.rejected,
                    d.failed,
                    d.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
                    t.rate,
                    ratio(t.rate, y.publish_rate),
                    te.rate,
                    ratio(te.rate, y.publish_rate)
                ));
            }
            say(&format!("  e2e5 detail: sync_interval: always publish: {}", y.publish_note));
            say(&format!(
                "  e2e5 detail: the raw path on that server: {:.0} msg/s received (nats backend {:.2}x, embedded \
                 {:.2}x); {}",
                y.sustained.rate,
                ratio(t.rate, y.sustained.rate),
                ratio(te.rate, y.sustained.rate),
                sustained_detail("raw sync-always", &y.sustained)
            ));
            if let Some(l) = &y.sync_line {
                say(&format!("  e2e5 detail: that server's log: {l}"));
            }
        }
    }
}

/// The figures for the report (`--json-out`), as [`print_figures`] prints them.
fn figures(
    s: &Settings,
    nats: &Backend,
    raw: &RawFigures,
    embedded: &Backend,
    sync: Option<&SyncFigures>,
) -> Vec<Figure> {
    let a = &s.args;
    let at_rate = a.rate == 1000;
    let not_at_rate = if at_rate { "" } else { "; not judged: the goal is for 1 000 msg/s" };
    let msec = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let raw_path = "raw async-nats publish → durable pull consumer (fetch, ack each), same rate and server";
    let older = |l: &Latencies, complete: bool| {
        let within = |d: Duration, limit_ms: u64| verdict(complete && d <= Duration::from_millis(limit_ms));
        format!("issue #5's older goals p50 ≤ 2 ms: {}, p99 ≤ 10 ms: {}", within(l.p50, 2), within(l.p99, 10))
    };
    let mut out = Vec::new();

    let (f, r) = (&nats.fixed, &raw.fixed);
    let how = format!("{} msg/s open loop, single produce `ack=local`, {} B", a.rate, a.payload);
    let nats_note =
        format!("{}; {}; {}{not_at_rate}", lat3(&f.lat), older(&f.lat, f.all_delivered()), fixed_detail("Ferry", f));
    out.push(
        Figure::new("e2e.latency_p50", Source::E2e, msec(f.lat.p50), "ms")
            .label(format!("produce → JetStream → push → 200, nats backend ({how}): p50"))
            .baseline(format!("{raw_path}: p50"), msec(r.lat.p50), "ms")
            .judged(at_rate, f.all_delivered() && f.lat.p50 <= Duration::from_millis(1))
            .note(nats_note.clone()),
    );
    out.push(
        Figure::new("e2e.latency_p99", Source::E2e, msec(f.lat.p99), "ms")
            .label(format!("produce → JetStream → push → 200, nats backend ({how}): p99"))
            .baseline(format!("{raw_path}: p99"), msec(r.lat.p99), "ms")
            .judged(at_rate, f.all_delivered() && f.lat.p99 <= Duration::from_millis(5))
            .note(format!("raw {}; {}", lat3(&r.lat), fixed_detail("raw", r))),
    );

    let (t, rt) = (&nats.sustained, &raw.sustained);
    let window = if a.window == 0 { "no window".to_owned() } else { format!("window {}", a.window) };
    out.push(
        Figure::new("e2e.sustained", Source::E2e, t.rate, "msg/s")
            .label(format!(
                "sustained throughput to the app, nats backend (NDJSON batches of {} on {} connections, {window}, \
                 maxInFlight {}{})",
                a.batch_size,
                a.batch_connections,
                a.max_in_flight,
                if t.runs.len() > 1 {
                    format!("; each side the median of {} interleaved runs", t.runs.len())
                } else {
                    String::new()
                }
            ))
            .baseline(
                format!(
                    "raw pipelined publish (Nats-Msg-Id, {} in flight) → pull consumer (fetch {}, ack each), same {window}",
                    a.publish_window, a.fetch_batch
                ),
                rt.rate,
                "msg/s",
            )
            .met(ratio(t.rate, rt.rate) >= 0.5 && t.all_delivered())
            .note(format!("{}; {}", sustained_detail("Ferry", t), sustained_detail("raw", rt))),
    );
    match sync {
        None => {}
        Some(y) => out.push(
            Figure::new("e2e.durable", Source::E2e, nats.durable.as_ref().map_or(0.0, |d| d.rate), "msg/s")
                .label(format!(
                    "durable throughput, nats backend: messages acknowledged after Ferry's fsync (`ack=local` 202), \
                     NDJSON batches of {} on {} connections as fast as answered, to a topic without a subscription, \
                     forwarded to the broker meanwhile",
                    a.batch_size,
                    durable_connections(a)
                ))
                .baseline(
                    format!(
                        "JetStream with `sync_interval: always`: raw async-nats publish, Nats-Msg-Id, pipelined ({} in \
                         flight), {} B",
                        a.publish_window, a.payload
                    ),
                    y.publish_rate,
                    "msg/s",
                )
                .met(durable_met(nats.durable.as_ref(), y))
                .note(format!(
                    "{}; the stricter reading, delivered end to end and acked by the app (the sustained phase): \
                     nats backend {:.0} msg/s ({:.1}× the baseline), embedded {:.0} msg/s ({:.1}×); the raw publish → \
                     pull → ack path on the sync-always server {:.0} msg/s; {}",
                    nats.durable.as_ref().map_or("not measured".to_owned(), |d| format!(
                        "{} messages acknowledged, {} requests refused by back-pressure (429/503/507), {} failed; {}",
                        d.accepted, d.rejected, d.failed, d.cpu
                    )),
                    t.rate,
                    ratio(t.rate, y.publish_rate),
                    embedded.sustained.rate,
                    ratio(embedded.sustained.rate, y.publish_rate),
                    y.sustained.rate,
                    y.publish_note
                )),
        ),
    }
    if let Some(b) = nats.rss_peak {
        out.push(
            Figure::new("e2e.rss_loaded", Source::E2e, mib(b), "MiB")
                .met(mib(b) <= 64.0)
                .note("VmHWM of the nats backend's sidecar after its latency and throughput phases"),
        );
    }

    let (te, e) = (&embedded.sustained, &embedded.fixed);
    out.push(
        Figure::new("embedded.sustained", Source::E2e, te.rate, "msg/s")
            .label("sustained throughput to the app, embedded broker (same load as the nats backend)")
            .baseline("nats backend, same load, same run", t.rate, "msg/s")
            .met(ratio(te.rate, t.rate) >= 1.0 && te.all_delivered())
            .note(format!(
                "{:.2}× the raw path ({:.0} msg/s); {}",
                ratio(te.rate, rt.rate),
                rt.rate,
                sustained_detail("Ferry embedded", te)
            )),
    );
    let embedded_note = format!(
        "{}; raw path p50 {}, p99 {}; {}; {}{not_at_rate}",
        lat3(&e.lat),
        ms(r.lat.p50),
        ms(r.lat.p99),
        older(&e.lat, e.all_delivered()),
        fixed_detail("Ferry embedded", e)
    );
    out.push(
        Figure::new("embedded.latency_p50", Source::E2e, msec(e.lat.p50), "ms")
            .label(format!("produce → embedded broker → push → 200 ({how}): p50"))
            .baseline("nats backend, same load: p50", msec(f.lat.p50), "ms")
            .judged(at_rate, e.all_delivered() && e.lat.p50 <= Duration::from_millis(1))
            .note(embedded_note),
    );
    out.push(
        Figure::new("embedded.latency_p99", Source::E2e, msec(e.lat.p99), "ms")
            .label(format!("produce → embedded broker → push → 200 ({how}): p99"))
            .baseline("nats backend, same load: p99", msec(f.lat.p99), "ms")
            .judged(at_rate, e.all_delivered() && e.lat.p99 <= Duration::from_millis(5)),
    );
    if let Some(b) = embedded.rss_peak {
        out.push(
            Figure::new("embedded.rss_loaded", Source::E2e, mib(b), "MiB")
                .met(mib(b) <= 64.0)
                .note("VmHWM of the embedded backend's sidecar after its latency and throughput phases"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rate: f64, delivered: u64) -> Sustained {
        Sustained {
            rate,
            produce_rate: rate,
            accepted: 100,
            delivered,
            errors: 0,
            rejected: 0,
            first_error: None,
            drain: Duration::ZERO,
            lat: Latencies::default(),
            cpu: format!("cpu of the {rate} run"),
            runs: Vec::new(),
            other_runs_incomplete: 0,
        }
    }

    #[test]
    fn the_median_run_is_kept_with_every_runs_rate_in_run_order() {
        let m = Sustained::median(vec![run(30.0, 100), run(10.0, 100), run(20.0, 100)]);
        assert_eq!(m.rate, 20.0);
        assert_eq!(m.cpu, "cpu of the 20 run");
        assert_eq!(m.runs, vec![30.0, 10.0, 20.0]);
        assert!(m.all_delivered());
        let even = Sustained::median(vec![run(10.0, 100), run(40.0, 100), run(20.0, 100), run(30.0, 100)]);
        assert_eq!(even.rate, 30.0, "the upper median of an even count");
    }

    #[test]
    fn a_run_that_lost_messages_fails_the_median_even_when_it_is_not_the_median() {
        let other = Sustained::median(vec![run(10.0, 99), run(20.0, 100), run(30.0, 100)]);
        assert_eq!(other.rate, 20.0);
        assert_eq!(other.other_runs_incomplete, 1);
        assert!(!other.all_delivered());
        let itself = Sustained::median(vec![run(10.0, 100), run(20.0, 99), run(30.0, 100)]);
        assert_eq!(itself.other_runs_incomplete, 0);
        assert!(!itself.all_delivered());
        assert!(sustained_detail("ferry", &other).contains("1 other run(s) did not deliver everything"));
    }
}
