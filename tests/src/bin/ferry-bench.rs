//! `ferry-bench`: a load generator for the whole produce path (DESIGN.md §5).
//!
//! `ferry-bench produce` starts its own `nats-server` (`FERRY_NATS_SERVER`,
//! else `nats-server` on `PATH`) and its own `ferry-sidecar` (`--sidecar-bin`,
//! default `target/release/ferry-sidecar`) on loopback with a temp data dir,
//! then prints one line per figure, each with a baseline measured in the
//! same run and the ratio to it:
//!
//! 1. single-message produce, `ack=local`, closed loop on N keep-alive
//!    connections: msgs/s, p50/p99; baseline raw disk.
//! 2. NDJSON batch produce: msgs/s, MB/s; baseline raw sequential 256 KiB
//!    `write` + `fdatasync` in the same data dir.
//! 3. latency at a fixed rate (open loop, from each request's scheduled
//!    time): p50/p99/max; baseline raw 1 KiB `write` + `fdatasync` p99.
//! 4. forwarder throughput (outbox filled while the broker is down, then
//!    timed to empty); baseline raw async-nats JetStream publishing with
//!    `Nats-Msg-Id` and the forwarder's window; medians of interleaved runs.
//! 5. sidecar RSS idle and peak.
//!
//! `ferry-bench e2e` measures the whole path, produce → broker → push to an
//! in-process app → ack, for the `nats` and `embedded` backends in one run:
//! latency at a fixed rate and sustained throughput, beside raw async-nats
//! publish → pull consumer → ack on the same server (see `ferry-bench/e2e.rs`).
//!
//! With `--json-out FILE` both also append each figure to `FILE` as one JSON
//! line (`ferry-bench/figures.rs`). `ferry-bench describe` appends the
//! machine's description, and `ferry-bench report` renders such a file into
//! the Markdown performance report (`ferry-bench/report.rs`); `scripts/bench`
//! runs them all.
//!
//! Loads go to 127.0.0.1 only, and every loop is bounded in time and count.
//! Timings are printed, never asserted.

#[path = "ferry-bench/catalogue.rs"]
mod catalogue;
#[path = "ferry-bench/e2e.rs"]
mod e2e;
#[path = "ferry-bench/figures.rs"]
mod figures;
#[path = "ferry-bench/forward.rs"]
mod forward;
#[path = "ferry-bench/http.rs"]
mod http;
#[path = "ferry-bench/load.rs"]
mod load;
#[path = "ferry-bench/rawjs.rs"]
mod rawjs;
#[path = "ferry-bench/report.rs"]
mod report;
#[path = "ferry-bench/sink.rs"]
mod sink;
#[path = "ferry-bench/stats.rs"]
mod stats;
#[path = "ferry-bench/sys.rs"]
mod sys;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use ferry_e2e::{free_port, manifests, NatsServer, Process, START_TIMEOUT};
use hyper::{StatusCode, Uri};

use crate::catalogue::Source;
use crate::figures::{Figure, JsonOut};
use crate::http::{Admin, Error};
use crate::load::{closed_loop, open_loop, Target};
use crate::stats::{mbs, median, ms, verdict};

/// Publishes the forwarder keeps awaiting confirmation (ferry-sidecar's
/// `forward::WINDOW`).
const FORWARDER_WINDOW: usize = 1024;
/// Topic of figures 1-3.
const TOPIC: &str = "bench";
/// Topic of figure 4.
const FWD_TOPIC: &str = "fwd";
/// Its stream at the broker.
const FWD_STREAM: &str = "FERRY_default_fwd";

const TOPICS: &str = "\
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: bench
spec: {}
---
apiVersion: ferry.dev/v1alpha1
kind: Topic
metadata:
  name: fwd
spec: {}
";

#[derive(Debug, Parser)]
#[command(name = "ferry-bench", about = "Load generator for Ferry: figures with same-run baselines")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Produce path: single and batch produce, fixed-rate latency, forwarder, RSS.
    Produce(ProduceArgs),
    /// End to end: produce -> broker -> push to an app -> ack, latency and
    /// throughput, nats and embedded backends, beside raw async-nats.
    E2e(e2e::E2eArgs),
    /// Appends the run's description (date, commit, machine) to a JSON-lines file.
    Describe(report::DescribeArgs),
    /// Renders a run's JSON-lines file into the Markdown performance report.
    Report(report::ReportArgs),
}

#[derive(Debug, Args, Clone)]
struct ProduceArgs {
    /// The ferry-sidecar binary (relative paths are tried from the current
    /// directory, then from the workspace root).
    #[arg(long, default_value = "target/release/ferry-sidecar")]
    sidecar_bin: PathBuf,
    /// Keep-alive HTTP/1.1 connections for single-message produce (figures 1 and 3).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keep-alive connections for batch produce (figure 2 and the outbox fill of figure 4).
    #[arg(long, default_value_t = 16)]
    batch_connections: usize,
    /// Seconds each of figures 1-3 runs [default: 10; 1 with --quick].
    #[arg(long)]
    duration: Option<f64>,
    /// Messages per batch request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Messages per second of figure 3.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Messages through the forwarder per run of figure 4 [default: 200000; 20000 with --quick].
    #[arg(long)]
    forward_messages: Option<u64>,
    /// Interleaved forwarder/raw pairs of figure 4 [default: 5; 1 with --quick].
    #[arg(long)]
    repeats: Option<usize>,
    /// Raw baseline's publishes in flight (the forwarder's window).
    #[arg(long, default_value_t = FORWARDER_WINDOW)]
    window: usize,
    /// The sidecar's outbox limit (large, so the produce figures measure
    /// the produce path, not back-pressure).
    #[arg(long, default_value_t = 8 << 30)]
    outbox_max_bytes: u64,
    /// Diagnosis: stop the broker during figures 1-3, so they measure the
    /// produce path without the forwarder and nats-server sharing the CPU.
    #[arg(long)]
    broker_down_for_produce: bool,
    /// Diagnosis: before figure 1, the same closed loop to a topic the
    /// sidecar does not know, answered 404 without touching the log: what
    /// HTTP alone costs on these cores (the sidecar's server and the load
    /// generator), the ceiling figure 1 could reach.
    #[arg(long)]
    http_floor: bool,
    /// Diagnosis: run only this figure of 1-4 (with the raw disk baselines)
    /// and stop, about 15-20 s (the forwarder's 5 interleaved runs, about a
    /// minute), so sidecar builds can be compared in many interleaved runs.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Smoke run: 1 s phases, 20k forwarded messages, 1 repeat.
    #[arg(long)]
    quick: bool,
    /// Also append each figure to this file as a JSON line (for `ferry-bench report`).
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// The figure `--only` runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Only {
    /// Figure 1, single produce.
    Single,
    /// Figure 2, batch produce.
    Batch,
    /// Figure 3, the fixed-rate p99.
    FixedRate,
    /// Figure 4, the forwarder against raw publishing (its 5 interleaved runs).
    Forwarder,
}

/// Resolved settings.
struct Settings {
    args: ProduceArgs,
    sidecar_bin: PathBuf,
    duration: Duration,
    forward_messages: u64,
    repeats: usize,
    /// How long the raw disk baselines run.
    raw_time: Duration,
    /// Longest wait for the outbox to drain between phases.
    drain_timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Produce(args) => match settings(args) {
            Ok(s) => match produce(&s) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry-bench: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("ferry-bench: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::E2e(args) => e2e::main(args),
        Cmd::Describe(args) => report::describe_main(args),
        Cmd::Report(args) => report::report_main(args),
    }
}

/// The sidecar binary at `path` (see [`resolve`]), or an error saying how
/// to build it.
fn sidecar_bin(path: &Path) -> Result<PathBuf, String> {
    resolve(path).ok_or_else(|| {
        format!(
            "the sidecar binary {} does not exist: build it with `cargo build --release -p ferry-sidecar` \
             (or pass --sidecar-bin PATH)",
            path.display()
        )
    })
}

fn settings(args: ProduceArgs) -> Result<Settings, String> {
    let sidecar_bin = sidecar_bin(&args.sidecar_bin)?;
    check_nats_server()?;
    let q = args.quick;
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(if q { 1.0 } else { 10.0 }));
    if duration.is_zero() || duration > Duration::from_secs(3600) {
        return Err("--duration must be more than 0 and at most 3600 seconds".into());
    }
    if args.connections == 0 || args.batch_connections == 0 || args.batch_size == 0 || args.rate == 0 {
        return Err("--connections, --batch-connections, --batch-size and --rate must be positive".into());
    }
    let forward_messages = args.forward_messages.unwrap_or(if q { 20_000 } else { 200_000 }).max(1);
    let repeats = args.repeats.unwrap_or(if q { 1 } else { 5 }).max(1);
    Ok(Settings {
        sidecar_bin,
        duration,
        forward_messages,
        repeats,
        raw_time: if q { Duration::from_millis(300) } else { Duration::from_secs(2) },
        drain_timeout: if q { Duration::from_secs(60) } else { Duration::from_secs(300) },
        args,
    })
}

/// A path as given, else relative to the workspace root.
fn resolve(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    if p.is_relative() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
        let q = root.join(p);
        if q.is_file() {
            return Some(q);
        }
    }
    None
}

fn check_nats_server() -> Result<(), String> {
    let bin = ferry_e2e::nats_server_binary();
    let found = if bin.components().count() > 1 {
        bin.is_file()
    } else {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(&bin).is_file()))
    };
    if found {
        Ok(())
    } else {
        Err(format!(
            "no nats-server ({}): run `source scripts/tools.sh && ensure_nats_server` first, \
             or set FERRY_NATS_SERVER",
            bin.display()
        ))
    }
}

/// A running sidecar.
struct Sidecar {
    process: Process,
    api: SocketAddr,
    admin: SocketAddr,
}

fn start_sidecar(s: &Settings, broker: &str, resources: &Path, data_dir: &Path) -> Sidecar {
    let api: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(&s.sidecar_bin);
    cmd.env_remove("RUST_LOG")
        .args(["--app-id", "bench", "--broker", broker])
        .args(["--api-addr", &api.to_string(), "--admin-addr", &admin.to_string()])
        .arg("--resources")
        .arg(resources)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--outbox-max-bytes", &s.args.outbox_max_bytes.to_string()]);
    let mut process = Process::spawn("ferry-sidecar", cmd);
    process.wait_for_line("ferry-sidecar started", START_TIMEOUT);
    process.wait_for_line("broker configured", START_TIMEOUT);
    Sidecar { process, api, admin }
}

fn nats_pid(nats: &NatsServer) -> Option<u32> {
    let url = nats.url();
    let port = url.rsplit(':').next()?;
    sys::find_pid(&["-p", port, "-js"])
}

fn say(line: &str) {
    use std::io::Write;
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn progress(what: &str) {
    eprintln!("ferry-bench: {what}");
}

/// NDJSON batch of `n` entries whose payload is `payload` bytes: a JSON
/// string (quotes included) stored as the message's bytes.
fn ndjson_batch(n: usize, payload: usize) -> Bytes {
    let line = format!("{{\"data\":\"{}\"}}\n", "x".repeat(payload.saturating_sub(2)));
    Bytes::from(line.repeat(n))
}

/// The payload the forwarder publishes for an [`ndjson_batch`] entry.
fn json_payload(payload: usize) -> Bytes {
    Bytes::from(format!("\"{}\"", "x".repeat(payload.saturating_sub(2))))
}

fn uri(path: &str) -> Uri {
    path.parse().expect("a valid path")
}

fn produce(s: &Settings) -> Result<(), Error> {
    let a = &s.args;
    let out = JsonOut::new(a.json_out.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let nats = NatsServer::start();
    let resources = manifests(&[("topics.yaml", TOPICS)]);
    let data = tempfile::tempdir()?;
    progress(&format!("starting {} (data dir {})", s.sidecar_bin.display(), data.path().display()));
    let mut sc = start_sidecar(s, &nats.url(), resources.path(), data.path());
    let pid = sc.process.pid();
    let admin = Admin::new(sc.admin);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    say(&format!(
        "ferry-bench produce: sidecar {} (pid {pid}), nats-server {}, {cpus} CPUs, data dir {}, {:.0} s phases, \
         {} B payloads{}",
        s.sidecar_bin.display(),
        ferry_e2e::nats_server_binary().display(),
        data.path().display(),
        s.duration.as_secs_f64(),
        a.payload,
        if a.quick { ", --quick" } else { "" }
    ));

    // Idle RSS: after start-up, before any load.
    std::thread::sleep(if a.quick { Duration::from_millis(200) } else { Duration::from_secs(1) });
    let idle_rss = sys::status_bytes(pid, "VmRSS").ok_or("cannot read the sidecar's VmRSS")?;

    // Raw disk baselines, in the same data dir, the sidecar idle.
    progress("raw disk baselines");
    let raw256 = sys::raw_256k(data.path(), s.raw_time, 64 << 10)?;
    let raw1k = sys::raw_small(data.path(), a.payload, s.raw_time, 100_000)?;
    say(&format!(
        "baseline raw disk (same data dir): 256 KiB write+fdatasync {:.1} MB/s ({} chunks in {:.2} s); \
         {} B write+fdatasync {:.0}/s, p50 {}, p99 {}",
        raw256.mbs,
        raw256.chunks,
        raw256.elapsed.as_secs_f64(),
        a.payload,
        raw1k.per_sec,
        ms(raw1k.lat.p50),
        ms(raw1k.lat.p99)
    ));

    let single = Target {
        addr: sc.api,
        uri: uri(&format!("/v1/topics/{TOPIC}/messages")),
        content_type: "application/octet-stream",
        body: Bytes::from(vec![0x42u8; a.payload]),
        msgs_per_req: 1,
        accepted: StatusCode::ACCEPTED,
    };
    let mut run =
        ProduceRun { s, rt, out, nats, pid, admin, data: data.path(), raw256, raw1k, single, hwm: Vec::new() };
    if run.isolated() {
        run.nats.stop();
        wait_disconnected(&run.rt, &mut run.admin)?;
        say("  --broker-down-for-produce: the broker is stopped for figures 1-3 (no forwarding meanwhile)");
    }
    if a.http_floor {
        run.http_floor()?;
    }
    let runs = |f: Only| a.only.is_none_or(|o| o == f);
    if runs(Only::Single) {
        run.single()?;
    }
    if runs(Only::Batch) {
        run.batch_produce()?;
    }
    if runs(Only::FixedRate) {
        run.fixed_rate()?;
    }
    if runs(Only::Forwarder) {
        run.forwarder()?;
    }
    if a.only.is_none() {
        run.rss(idle_rss)?;
    }
    sc.process.signal(15);
    let _ = sc.process.wait_exit(Duration::from_secs(30));
    Ok(())
}

/// What the produce figures share: the settings, the runtime, the sidecar
/// and broker under test, the raw disk baselines and the JSON-lines output.
struct ProduceRun<'a> {
    s: &'a Settings,
    rt: tokio::runtime::Runtime,
    out: JsonOut,
    nats: NatsServer,
    pid: u32,
    admin: Admin,
    data: &'a Path,
    raw256: sys::RawSeq,
    raw1k: sys::RawSmall,
    single: Target,
    /// The sidecar's VmHWM after each phase.
    hwm: Vec<(&'static str, Option<u64>)>,
}

impl ProduceRun<'_> {
    /// The broker is down for figures 1-3 (`--broker-down-for-produce`).
    fn isolated(&self) -> bool {
        self.s.args.broker_down_for_produce
    }

    fn emit(&self, f: Figure) -> std::io::Result<()> {
        self.out.write(&f.quick(self.s.args.quick))
    }

    /// Batches of NDJSON entries to `topic`.
    fn batch(&self, topic: &str) -> Target {
        let a = &self.s.args;
        Target {
            addr: self.single.addr,
            uri: uri(&format!("/v1/topics/{topic}/messages:batch")),
            content_type: "application/x-ndjson",
            body: ndjson_batch(a.batch_size, a.payload),
            msgs_per_req: a.batch_size as u64,
            accepted: StatusCode::ACCEPTED,
        }
    }

    /// After a phase: the peak RSS so far, then (broker up) the outbox drained.
    fn end_phase(&mut self, name: &'static str) -> Result<(), Error> {
        self.hwm.push((name, sys::status_bytes(self.pid, "VmHWM")));
        if !self.isolated() {
            drain(&self.rt, &mut self.admin, self.s, name)?;
        }
        Ok(())
    }

    /// Diagnosis: what HTTP alone costs (404s without the log).
    fn http_floor(&mut self) -> Result<(), Error> {
        let s = self.s;
        let a = &s.args;
        let floor = Target {
            uri: uri("/v1/topics/no-such-topic/messages"),
            accepted: StatusCode::NOT_FOUND,
            ..self.single.clone()
        };
        progress(&format!("HTTP floor: 404s on {} connections for {:?}", a.connections, s.duration));
        let cpu = sys::CpuMeter::start(self.pid, nats_pid(&self.nats));
        let r = self.rt.block_on(closed_loop(&floor, a.connections, s.duration, 100_000_000))?;
        say(&format!(
            "http floor (the same requests to an unknown topic, answered 404 without the log): {:.0} req/s, p50 {}, \
             p99 {}; {}; {}",
            r.msgs_per_sec(),
            ms(r.lat.p50),
            ms(r.lat.p99),
            r.counts(),
            cpu.report()
        ));
        Ok(())
    }

    /// Figure 1: single-message produce, closed loop.
    fn single(&mut self) -> Result<(), Error> {
        let s = self.s;
        let a = &s.args;
        progress(&format!("figure 1: single produce on {} connections for {:?}", a.connections, s.duration));
        let cpu = sys::CpuMeter::start(self.pid, nats_pid(&self.nats));
        let r = self.rt.block_on(closed_loop(&self.single, a.connections, s.duration, 100_000_000))?;
        let cpu1 = cpu.report();
        let rate = r.msgs_per_sec();
        say(&format!(
            "fig1 single produce (ack=local, {} B, {} connections, {:.0} s): {:.0} msg/s, p50 {}, p99 {} \
         | baseline raw {} B write+fdatasync {:.0}/s, raw 256 KiB write+fdatasync {:.1} MB/s \
         | ratio {:.2}x raw small-fsync rate, {:.3}x raw disk bytes/s | goal >= 50000 msg/s: {}",
            a.payload,
            a.connections,
            s.duration.as_secs_f64(),
            rate,
            ms(r.lat.p50),
            ms(r.lat.p99),
            a.payload,
            self.raw1k.per_sec,
            self.raw256.mbs,
            rate / self.raw1k.per_sec,
            rate * a.payload as f64 / (self.raw256.mbs * 1e6),
            verdict(rate >= 50_000.0)
        ));
        say(&format!("  fig1 detail: {}; max {}; {}", r.counts(), ms(r.lat.max), cpu1));
        self.emit(
            Figure::new("produce.single", Source::Produce, rate, "msg/s")
                .label(format!(
                    "single-message produce, `ack=local` (fsynced), {} B, closed loop on {} connections",
                    a.payload, a.connections
                ))
                .baseline(format!("raw {} B write+fdatasync, one at a time", a.payload), self.raw1k.per_sec, "/s")
                .met(rate >= 50_000.0)
                .note(format!(
                    "p50 {}, p99 {}; {:.3}× raw 256 KiB write+fdatasync bytes/s ({:.1} MB/s); {}; {cpu1}",
                    ms(r.lat.p50),
                    ms(r.lat.p99),
                    rate * a.payload as f64 / (self.raw256.mbs * 1e6),
                    self.raw256.mbs,
                    r.counts()
                )),
        )?;
        self.end_phase("fig1")
    }

    /// Figure 2: batch produce, closed loop.
    fn batch_produce(&mut self) -> Result<(), Error> {
        let s = self.s;
        let a = &s.args;
        progress(&format!("figure 2: batch produce on {} connections for {:?}", a.batch_connections, s.duration));
        let cpu = sys::CpuMeter::start(self.pid, nats_pid(&self.nats));
        let r = self.rt.block_on(closed_loop(&self.batch(TOPIC), a.batch_connections, s.duration, 10_000_000))?;
        let cpu2 = cpu.report();
        let rate = r.msgs_per_sec();
        let produce_mbs = mbs(r.msgs * a.payload as u64, r.elapsed);
        let ratio = produce_mbs / self.raw256.mbs;
        say(&format!(
            "fig2 batch produce (ack=local, NDJSON {} x {} B per request, {} connections, {:.0} s): {:.0} msg/s, \
         {:.1} MB/s | baseline raw 256 KiB write+fdatasync {:.1} MB/s (= {:.0} x {} B/s) | ratio {:.2}x raw disk \
         bytes/s | goal >= 300000 msg/s: {}; DESIGN §5 goal >= 0.6x raw: {}",
            a.batch_size,
            a.payload,
            a.batch_connections,
            s.duration.as_secs_f64(),
            rate,
            produce_mbs,
            self.raw256.mbs,
            self.raw256.mbs * 1e6 / a.payload as f64,
            a.payload,
            ratio,
            verdict(rate >= 300_000.0),
            verdict(ratio >= 0.6)
        ));
        say(&format!(
            "  fig2 detail: {}; per request p50 {}, p99 {}, max {}; {}",
            r.counts(),
            ms(r.lat.p50),
            ms(r.lat.p99),
            ms(r.lat.max),
            cpu2
        ));
        self.emit(
            Figure::new("produce.batch", Source::Produce, produce_mbs, "MB/s")
                .label(format!(
                    "NDJSON batch produce, `ack=local` (fsynced), {} × {} B per request, {} connections: payload MB/s",
                    a.batch_size, a.payload, a.batch_connections
                ))
                .baseline("raw 256 KiB write+fdatasync", self.raw256.mbs, "MB/s")
                .met(ratio >= 0.6)
                .note(format!(
                    "{rate:.0} msg/s (issue #4's older goal was 300 000 msg/s: {}); {}; {cpu2}",
                    verdict(rate >= 300_000.0),
                    r.counts()
                )),
        )?;
        self.end_phase("fig2")
    }

    /// Figure 3: a fixed rate, open loop, beside raw write+fdatasync on the same schedule.
    fn fixed_rate(&mut self) -> Result<(), Error> {
        let s = self.s;
        let a = &s.args;
        progress(&format!("figure 3: {} msg/s for {:?}", a.rate, s.duration));
        // The baseline: raw write+fdatasync on the same schedule (same rate, the
        // same pacer, latency from the scheduled time), right before and right
        // after the run (the disk and the machine drift); the ratio uses the
        // larger p99. On some VMs an fdatasync stalls the other vCPU for many
        // milliseconds, which this baseline shows as its own pacer lag.
        let fresh = s.raw_time / 2;
        let before = sys::raw_open_loop(self.data, a.payload, a.rate, fresh)?;
        let cpu = sys::CpuMeter::start(self.pid, nats_pid(&self.nats));
        let r = self.rt.block_on(open_loop(&self.single, a.connections, a.rate, s.duration))?;
        let cpu3 = cpu.report();
        let after = sys::raw_open_loop(self.data, a.payload, a.rate, fresh)?;
        let raw_p99 = before.lat.p99.max(after.lat.p99);
        let raw_lag_p99 = before.pacer_lag.p99.max(after.pacer_lag.p99);
        let l = r.load.lat;
        let complete = r.load.requests == r.scheduled;
        let met = l.p99 <= Duration::from_millis(2) && complete;
        say(&format!(
            "fig3 fixed rate ({} msg/s open loop, single produce ack=local, {} B, {:.0} s): p50 {}, p99 {}, max {} \
         ({} of {} answered 202) | baseline raw {} B write+fdatasync one at a time at the same {}/s open loop, from the \
         scheduled time: p50 {}, p99 {} just before the run; p50 {}, p99 {} just after | ratio {:.2}x the larger \
         raw p99 | goal p99 <= 2 ms: {}",
            a.rate,
            a.payload,
            s.duration.as_secs_f64(),
            ms(l.p50),
            ms(l.p99),
            ms(l.max),
            r.load.requests,
            r.scheduled,
            a.payload,
            a.rate,
            ms(before.lat.p50),
            ms(before.lat.p99),
            ms(after.lat.p50),
            ms(after.lat.p99),
            l.p99.as_secs_f64() / raw_p99.as_secs_f64().max(1e-9),
            verdict(met)
        ));
        say(&format!(
            "  fig3 detail: {}; latency from the scheduled send time; pacer lag (client-side, included) p50 {}, \
         p99 {}, max {}; the raw baseline's pacer lag p99 {} before, {} after; {}",
            r.load.counts(),
            ms(r.pacer_lag.p50),
            ms(r.pacer_lag.p99),
            ms(r.pacer_lag.max),
            ms(before.pacer_lag.p99),
            ms(after.pacer_lag.p99),
            cpu3
        ));
        self.emit(
            Figure::new("produce.fixed_rate_p99", Source::Produce, l.p99.as_secs_f64() * 1e3, "ms")
                .label(format!(
                    "single produce, `ack=local`, {} B, at a fixed {} msg/s (open loop, from the scheduled time): p99",
                    a.payload, a.rate
                ))
                .baseline(
                    format!(
                        "raw {} B write+fdatasync, one at a time, at the same rate and schedule, from the scheduled \
                     time: p99 (the larger of just before/after)",
                        a.payload
                    ),
                    raw_p99.as_secs_f64() * 1e3,
                    "ms",
                )
                .judged(a.rate == 5000, met)
                .note(format!(
                    "p50 {}, max {}; {} of {} requests answered 202; pacer lag p99 {} (the raw baseline's {}){}",
                    ms(l.p50),
                    ms(l.max),
                    r.load.requests,
                    r.scheduled,
                    ms(r.pacer_lag.p99),
                    ms(raw_lag_p99),
                    if a.rate == 5000 { "" } else { "; not judged: the goal is for 5 000 msg/s" }
                )),
        )?;
        self.end_phase("fig3")
    }

    /// Figure 4: the forwarder against raw JetStream publishing, interleaved.
    fn forwarder(&mut self) -> Result<(), Error> {
        let s = self.s;
        let a = &s.args;
        if self.isolated() {
            self.nats.start_again();
            drain(&self.rt, &mut self.admin, s, "restarting the broker")?;
        }
        self.rt.block_on(async {
            let js = forward::connect(&self.nats.url()).await?;
            forward::purge(&js, "FERRY_default_bench").await?;
            Ok::<_, Error>(())
        })?;
        let payload = json_payload(a.payload);
        let fwd_target = self.batch(FWD_TOPIC);
        let (mut fwd_rates, mut raw_rates, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..s.repeats {
            progress(&format!("figure 4: run {} of {}: forwarder", run + 1, s.repeats));
            let f = forwarder_run(&self.rt, s, &mut self.nats, &mut self.admin, &fwd_target, self.pid)?;
            fwd_rates.push(f.rate);
            progress(&format!("figure 4: run {} of {}: raw JetStream publish of {} messages", run + 1, s.repeats, f.n));
            let url = self.nats.url();
            let npid = nats_pid(&self.nats);
            let (raw, raw_cpu) = self.rt.block_on(async {
                let js = forward::connect(&url).await?;
                let cpu = sys::CpuMeter::start(self.pid, npid);
                let t = forward::raw_publish(&js, FWD_STREAM, f.n, a.window, payload.clone(), run).await?;
                let cpu = cpu.report();
                forward::purge(&js, forward::RAW_STREAM).await?;
                forward::purge(&js, FWD_STREAM).await?;
                Ok::<_, Error>((t, cpu))
            })?;
            let raw_rate = f.n as f64 / raw.as_secs_f64().max(1e-9);
            raw_rates.push(raw_rate);
            notes.push(format!(
                "run {}: forwarder {:.0}/s ({}; {}), raw {:.0}/s ({})",
                run + 1,
                f.rate,
                f.note,
                f.cpu,
                raw_rate,
                raw_cpu
            ));
        }
        self.hwm.push(("fig4", sys::status_bytes(self.pid, "VmHWM")));
        let (fwd, raw) = (median(&fwd_rates), median(&raw_rates));
        let ratio = fwd / raw.max(1e-9);
        say(&format!(
            "fig4 forwarder ({} x {} B per run, outbox filled with the broker down, median of {}): {:.0} msg/s \
             | baseline raw async-nats JetStream publish, Nats-Msg-Id, window {}: {:.0} msg/s | ratio {:.2}x \
             | goal >= 0.9x: {}",
            s.forward_messages,
            a.payload,
            s.repeats,
            fwd,
            a.window,
            raw,
            ratio,
            verdict(ratio >= 0.9)
        ));
        for n in &notes {
            say(&format!("  fig4 {n}"));
        }
        self.emit(
            Figure::new("produce.forwarder", Source::Produce, fwd, "msg/s")
                .label(format!(
                    "forwarder, outbox → JetStream ({} × {} B per run, outbox filled with the broker down)",
                    s.forward_messages, a.payload
                ))
                .baseline(format!("raw async-nats JetStream publish, Nats-Msg-Id, window {}", a.window), raw, "msg/s")
                .met(ratio >= 0.9)
                .note(format!(
                    "median of {} interleaved run(s){}: forwarder {}, raw {}",
                    s.repeats,
                    if s.repeats < 5 { " (the goal asks for 5)" } else { "" },
                    rates(&fwd_rates),
                    rates(&raw_rates)
                )),
        )?;

        Ok(())
    }

    /// Figure 5: the sidecar's RSS idle (`idle_rss`, taken before any load) and its peak.
    fn rss(&mut self, idle_rss: u64) -> Result<(), Error> {
        let peak = sys::status_bytes(self.pid, "VmHWM").ok_or("cannot read the sidecar's VmHWM")?;
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        say(&format!(
            "fig5 sidecar RSS: idle {:.1} MiB (VmRSS), peak under load {:.1} MiB (VmHWM) | baseline goals idle <= 20 MiB \
             (DESIGN §5: 15), loaded <= 64 MiB | ratio {:.2}x, {:.2}x of goal | goal idle: {}, loaded: {}",
            mb(idle_rss),
            mb(peak),
            mb(idle_rss) / 20.0,
            mb(peak) / 64.0,
            verdict(mb(idle_rss) <= 20.0),
            verdict(mb(peak) <= 64.0)
        ));
        let phases: Vec<String> = self
            .hwm
            .iter()
            .map(|(n, b)| format!("after {n} {}", b.map_or("?".into(), |b| format!("{:.1} MiB", mb(b)))))
            .collect();
        say(&format!("  fig5 detail: VmHWM {}", phases.join(", ")));
        self.emit(
            Figure::new("produce.rss_idle", Source::Produce, mb(idle_rss), "MiB").met(mb(idle_rss) <= 15.0).note(
                format!(
                    "after start-up, before any load (issue #4's older goal was 20 MiB: {})",
                    verdict(mb(idle_rss) <= 20.0)
                ),
            ),
        )?;
        self.emit(
            Figure::new("produce.rss_loaded", Source::Produce, mb(peak), "MiB")
                .met(mb(peak) <= 64.0)
                .note(format!("VmHWM {}", phases.join(", "))),
        )?;

        Ok(())
    }
}

/// `116,400/s, 116,600/s`: the rates of each run.
fn rates(v: &[f64]) -> String {
    v.iter().map(|r| format!("{}/s", report::number(*r))).collect::<Vec<_>>().join(", ")
}

/// Waits until the broker has confirmed everything in the outbox.
fn drain(rt: &tokio::runtime::Runtime, admin: &mut Admin, s: &Settings, after: &str) -> Result<(), Error> {
    let t0 = Instant::now();
    let pending0 = rt.block_on(admin.pending())?;
    let left = rt.block_on(async {
        loop {
            let p = admin.pending().await?;
            if p == 0 || t0.elapsed() > s.drain_timeout {
                return Ok::<_, Error>(p);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;
    let t = t0.elapsed().as_secs_f64();
    // The next phase starts on a settled disk: the kernel's write-back of
    // this phase's data (gigabytes after figure 2) would otherwise land in
    // the next phase's fsyncs and be measured as the sidecar's latency.
    let t1 = Instant::now();
    let synced = Command::new("sync").status().is_ok_and(|st| st.success());
    let sync_s = t1.elapsed().as_secs_f64();
    let sync_note = if synced { format!("sync {sync_s:.2} s") } else { "sync failed".to_owned() };
    if left > 0 {
        say(&format!("  WARNING after {after}: {left} messages still pending after {t:.1} s; going on ({sync_note})"));
    } else {
        say(&format!(
            "  after {after}: outbox drained to the broker ({pending0} pending at the end of the phase, {t:.2} s; \
             {sync_note})"
        ));
    }
    Ok(())
}

/// Waits until the sidecar noticed that the broker is gone.
fn wait_disconnected(rt: &tokio::runtime::Runtime, admin: &mut Admin) -> Result<(), Error> {
    rt.block_on(async {
        let t0 = Instant::now();
        while admin.broker_connected().await? {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err::<(), Error>("the sidecar still says it is connected 10 s after the broker stopped".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    })
}

struct ForwarderRun {
    n: u64,
    rate: f64,
    note: String,
    cpu: String,
}

/// Stops the broker, fills the outbox with `forward_messages`, starts the
/// broker again and times the forwarder from its first confirmation to
/// its last (reconnect and retry backoff are not the forwarder's speed).
fn forwarder_run(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    nats: &mut NatsServer,
    admin: &mut Admin,
    target: &Target,
    pid: u32,
) -> Result<ForwarderRun, Error> {
    nats.stop();
    wait_disconnected(rt, admin)?;
    let (next0, fwd0) = rt.block_on(admin.offsets(FWD_TOPIC))?;
    if next0 != fwd0 {
        return Err(format!("topic {FWD_TOPIC}: {} messages pending before the fill", next0 - fwd0).into());
    }
    let requests = s.forward_messages.div_ceil(target.msgs_per_req);
    let fill = rt.block_on(closed_loop(target, s.args.batch_connections, Duration::from_secs(300), requests))?;
    if fill.requests != requests {
        return Err(format!("filling the outbox: {}", fill.counts()).into());
    }
    let (next1, _) = rt.block_on(admin.offsets(FWD_TOPIC))?;
    let n = next1 - fwd0;
    nats.start_again();
    let up = Instant::now();
    let npid = nats_pid(nats);
    let (first, end, cpu) = rt.block_on(async {
        let mut first: Option<(Instant, u64, sys::CpuMeter)> = None;
        loop {
            let (_, fwd) = admin.offsets(FWD_TOPIC).await?;
            let now = Instant::now();
            if first.is_none() && fwd > fwd0 {
                first = Some((now, fwd, sys::CpuMeter::start(pid, npid)));
            }
            if fwd >= next1 {
                let (t1, c1, cpu) = first.expect("set when progress was seen");
                return Ok::<_, Error>(((t1, c1), now, cpu.report()));
            }
            if up.elapsed() > Duration::from_secs(300) {
                return Err(format!("the forwarder confirmed {} of {n} messages in 300 s", fwd - fwd0).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })?;
    let (t1, c1) = first;
    let (rate, how) = if c1 < next1 && end > t1 {
        (
            (next1 - c1) as f64 / (end - t1).as_secs_f64(),
            format!("{} msgs timed over {:.3} s", next1 - c1, (end - t1).as_secs_f64()),
        )
    } else {
        (n as f64 / (end - up).as_secs_f64(), format!("all {n} msgs by the first poll, timed from the restart"))
    };
    let note = format!(
        "fill {:.0} msg/s; first confirmation {:.2} s after the broker restart; {how}",
        fill.msgs_per_sec(),
        (t1 - up).as_secs_f64()
    );
    Ok(ForwarderRun { n, rate, note, cpu })
}
