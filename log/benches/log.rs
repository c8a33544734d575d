//! Benchmarks of `ferry-log`, each printed next to a baseline measured in the
//! same run, on the same disk (raw `write` + `fdatasync`, raw `read`).
//!
//! ```text
//! cargo bench -p ferry-log --bench log               # full sizes, a few minutes
//! FERRY_BENCH_QUICK=1 cargo bench -p ferry-log --bench log   # smoke run
//! cargo bench -p ferry-log --bench log -- reopen     # only names containing "reopen"
//! ```
//! Without `--bench` (`cargo test --benches`) every benchmark runs once at a
//! tiny size. Data goes to a temporary directory under the target directory
//! (or under `FERRY_BENCH_DIR`) and is deleted at the end.
//!
//! With `FERRY_BENCH_JSON=FILE` each figure is also appended to `FILE` as one
//! JSON line, the shape `ferry-bench report` renders into `bench/REPORT.md`
//! (`scripts/bench` sets it): `{"figure", "issue", "source", "label", "value",
//! "unit", "baseline", "baseline_label", "baseline_unit", "ratio", "goal",
//! "met", "note", "quick"}`.
//!
//! Latencies are percentiles of per-operation times recorded here (nearest
//! rank), not criterion's mean-based estimates. The log and its baseline run
//! in alternating rounds so that drift in the shared disk hits both alike.
//! Record size: a 1 KiB payload (the frame adds its header, offset, timestamp
//! and a 12-byte id). MB/s figures are 10^6 bytes of *payload* per second
//! for the log (the on-disk rate is in parentheses) and of file bytes for
//! the raw baselines, so the ratios are slightly conservative for the log.
//!
//! Benchmarks:
//! 1. `single-appender`: `append_blocking` of one record, `FsyncMode::Always`,
//!    vs one `write` + `fdatasync` of the same frame size. Goal p99 <= 1.5x raw.
//! 2. `concurrent-256`: 256 tokio tasks each awaiting `append` of one record
//!    in a loop, vs sequential 256 KiB `write` + `fdatasync`. Goal >= 0.5x raw MB/s.
//! 3. `batch-1000`: one `append` of 1000 records at a time (durable), vs the
//!    same bytes in one `write` + `fdatasync`, and the 256 KiB raw figure.
//! 4. `reopen`: `Log::open` of a ~1 GiB log (64 MiB segments), page cache
//!    evicted and warm (goal <= 1 s), then `read` of the whole log vs raw
//!    sequential reads of the segment files.
//! 5. Two criterion micro-benchmarks of the CPU path (no fsync): append with
//!    `FsyncMode::Never`, and a warm read of 1000 records.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use ferry_log::{now_ms, FsyncMode, Log, LogOptions, NewRecord, DEFAULT_SEGMENT_BYTES};

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;
const PAYLOAD: usize = KIB;
const BATCH: usize = 1000;
const RAW_CHUNK: usize = 256 * KIB;
const CRIT_APPEND: &str = "criterion/append_blocking 1 KiB FsyncMode::Never";
const CRIT_READ: &str = "criterion/read 1000 x 1 KiB warm";

/// How much work each benchmark does.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    name: &'static str,
    /// Measured single appends (and raw write+fdatasync calls).
    single: usize,
    /// Concurrent appenders.
    tasks: usize,
    /// Appends per concurrent appender, over all rounds.
    per_task: usize,
    /// Bytes of the raw 256 KiB-chunk baseline, over all rounds.
    raw_chunk_bytes: u64,
    /// Calls of `append` with `BATCH` records.
    batches: usize,
    /// Size of the log to reopen and read.
    log_bytes: u64,
    /// Alternating rounds of log / baseline.
    rounds: usize,
    /// Criterion measurement time.
    criterion_secs: u64,
}

const FULL: Sizes = Sizes {
    name: "full",
    single: 5000,
    tasks: 256,
    per_task: 2000,
    raw_chunk_bytes: 1024 * MIB,
    batches: 300,
    log_bytes: 1 << 30,
    rounds: 8,
    criterion_secs: 3,
};
const QUICK: Sizes = Sizes {
    name: "quick (FERRY_BENCH_QUICK=1)",
    single: 500,
    tasks: 256,
    per_task: 100,
    raw_chunk_bytes: 64 * MIB,
    batches: 30,
    log_bytes: 64 * MIB,
    rounds: 2,
    criterion_secs: 1,
};
const TINY: Sizes = Sizes {
    name: "tiny (test mode: no --bench; a smoke check, not figures)",
    single: 20,
    tasks: 256,
    per_task: 2,
    raw_chunk_bytes: 2 * MIB,
    batches: 2,
    log_bytes: 4 * MIB,
    rounds: 1,
    criterion_secs: 1,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Like criterion: `--bench` benchmarks, `--test` or neither runs tests.
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    if args.iter().any(|a| a == "--list") {
        for name in ["single-appender", "concurrent-256", "batch-1000", "reopen", "read-all", CRIT_APPEND, CRIT_READ] {
            println!("{name}: benchmark");
        }
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let quick = std::env::var("FERRY_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let sz = match (bench_mode, quick) {
        (false, _) => TINY,
        (true, true) => QUICK,
        (true, false) => FULL,
    };
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));

    let base = bench_base_dir();
    fs::create_dir_all(&base).expect("creating the bench base directory");
    let tmp = tempfile::Builder::new().prefix("ferry-log-bench-").tempdir_in(&base).expect("creating a temp dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let same_dev = fs::metadata(tmp.path()).expect("stat").dev() == fs::metadata(repo).expect("stat").dev();
    println!("ferry-log bench, sizes: {}", sz.name);
    println!(
        "data dir: {} (same filesystem as the repo {}: {})",
        tmp.path().display(),
        repo.display(),
        if same_dev { "yes" } else { "NO" }
    );

    let json = JsonOut::from_env(sz.name != FULL.name);
    if let Some(path) = &json.path {
        println!("figures also appended to {} (JSON lines)", path.display());
    }
    let mut summary = Vec::new();
    let mut raw_256k_mbs = None;
    if wanted("single-appender") {
        summary.push(single_appender(&sz, tmp.path(), &json));
    }
    if wanted("concurrent-256") {
        let (line, raw) = concurrent(&sz, tmp.path(), &json);
        summary.push(line);
        raw_256k_mbs = Some(raw);
    }
    if wanted("batch-1000") {
        summary.push(batch(&sz, tmp.path(), raw_256k_mbs, &json));
    }
    if wanted("reopen") || wanted("read-all") {
        summary.extend(reopen_and_read(&sz, tmp.path(), &json));
    }
    criterion_benches(&sz, tmp.path());

    println!();
    println!("== summary ({}) ==", sz.name);
    for line in &summary {
        println!("{line}");
    }
    let path = tmp.path().to_path_buf();
    tmp.close().unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
    // Only if empty (another run may be using it).
    let _ = fs::remove_dir(&base);
}

/// `FERRY_BENCH_DIR`, else `<target dir>/ferry-bench`: the bench binary is
/// `<target>/<profile>/deps/log-<hash>`.
fn bench_base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BENCH_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    match exe.parent().and_then(Path::parent).and_then(Path::parent) {
        Some(target) => target.join("ferry-bench"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ferry-bench"),
    }
}

// ---------------------------------------------------------------- helpers

fn payload() -> Bytes {
    Bytes::from((0..PAYLOAD).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

/// A record with a fixed-width 12-byte id, so every frame has the same size.
fn rec(n: u64, payload: &Bytes) -> NewRecord {
    NewRecord {
        timestamp_ms: now_ms(),
        id: format!("r{n:011}"),
        key: None,
        headers: Vec::new(),
        payload: payload.clone(),
    }
}

fn frame_len() -> usize {
    rec(0, &payload()).encoded_len()
}

fn batch_of(first: u64, n: usize, payload: &Bytes) -> Vec<NewRecord> {
    (0..n as u64).map(|i| rec(first + i, payload)).collect()
}

fn open(dir: &Path, fsync: FsyncMode) -> Log {
    let (log, report) = Log::open(dir, LogOptions { fsync, ..LogOptions::default() }).expect("opening the log");
    assert!(report.is_clean(), "{report:?}");
    log
}

fn raw_file(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).expect("creating a raw file")
}

/// One `write` + `fdatasync` (std's `sync_data` is `fdatasync` on Linux).
fn raw_write_sync(f: &mut File, buf: &[u8]) {
    f.write_all(buf).expect("raw write");
    f.sync_data().expect("raw fdatasync");
}

/// Nearest-rank percentile of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Lat {
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
    n: usize,
}

fn lat(mut v: Vec<Duration>) -> Lat {
    v.sort_unstable();
    let n = v.len();
    let mean = if n == 0 { Duration::ZERO } else { v.iter().sum::<Duration>() / n as u32 };
    Lat { p50: pct(&v, 50.0), p99: pct(&v, 99.0), max: v.last().copied().unwrap_or_default(), mean, n }
}

fn d(x: Duration) -> String {
    let us = x.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.3}s", us / 1e6)
    }
}

fn mbs(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "MISSED"
    }
}

fn dir_bytes(dir: &Path, ext: &str) -> u64 {
    files(dir, ext).iter().map(|p| fs::metadata(p).map_or(0, |m| m.len())).sum()
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("listing")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// `write`-family syscalls made by this process so far (`/proc/self/io`).
fn write_syscalls() -> u64 {
    let io = fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("syscw:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// User + system CPU time from a `/proc/.../stat` file (clock ticks of 10 ms).
fn stat_cpu(path: &Path) -> Option<Duration> {
    let stat = fs::read_to_string(path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn process_cpu() -> Duration {
    stat_cpu(Path::new("/proc/self/stat")).unwrap_or_default()
}

/// CPU time of the threads of this process named `comm` (at most 15 bytes).
fn thread_cpu(comm: &str) -> Duration {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    tasks
        .filter_map(Result::ok)
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == comm))
        .filter_map(|t| stat_cpu(&t.path().join("stat")))
        .sum()
}

/// Drops the files of `dir` from the (guest) page cache, so the next read
/// comes from the disk. They are synced first: dirty pages cannot be dropped.
#[allow(unsafe_code)]
fn evict(dir: &Path) {
    use std::os::fd::AsRawFd;
    for entry in fs::read_dir(dir).expect("listing") {
        let path = entry.expect("dir entry").path();
        let Ok(f) = File::open(&path) else { continue };
        let _ = f.sync_data();
        // SAFETY: `f` is an open file descriptor for the whole call; the
        // advice only affects caching, never the file's contents.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            eprintln!("posix_fadvise({}) failed: {rc}", path.display());
        }
    }
}

// ---------------------------------------------------- report figures

/// One figure for the performance report (`ferry-bench report`, issue #9):
/// the log's figure, its same-run baseline and the goal it is judged by.
struct Figure {
    /// Stable id, as `ferry-bench`'s report catalogue names it.
    id: &'static str,
    label: String,
    value: f64,
    unit: &'static str,
    /// What the baseline is, its value and unit.
    baseline: Option<(String, f64, &'static str)>,
    ratio: Option<f64>,
    goal: Option<&'static str>,
    /// `None`: not judged (no goal, or not measured under the goal's conditions).
    met: Option<bool>,
    note: String,
}

/// Where figures go as JSON lines: the file named by `FERRY_BENCH_JSON`, if set.
struct JsonOut {
    path: Option<PathBuf>,
    /// Not the full sizes: the figures are smoke figures.
    quick: bool,
}

impl JsonOut {
    fn from_env(quick: bool) -> JsonOut {
        let path = std::env::var_os("FERRY_BENCH_JSON").filter(|v| !v.is_empty()).map(PathBuf::from);
        JsonOut { path, quick }
    }

    /// Appends one line for `f` (at once, so a later panic keeps it).
    fn emit(&self, f: Figure) {
        let Some(path) = &self.path else { return };
        let (b_label, b_value, b_unit) = match &f.baseline {
            Some((l, v, u)) => (json_str(l), json_num(*v), json_str(u)),
            None => ("null".to_owned(), "null".to_owned(), "null".to_owned()),
        };
        let line = format!(
            "{{\"figure\":{},\"issue\":3,\"source\":\"log bench\",\"label\":{},\"value\":{},\"unit\":{},\
             \"baseline\":{b_value},\"baseline_label\":{b_label},\"baseline_unit\":{b_unit},\"ratio\":{},\"goal\":{},\
             \"met\":{},\"note\":{},\"quick\":{}}}\n",
            json_str(f.id),
            json_str(&f.label),
            json_num(f.value),
            json_str(f.unit),
            f.ratio.map_or("null".to_owned(), json_num),
            f.goal.map_or("null".to_owned(), json_str),
            f.met.map_or("null", |m| if m { "true" } else { "false" }),
            json_str(&f.note),
            self.quick
        );
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening FERRY_BENCH_JSON {}: {e}", path.display()));
        file.write_all(line.as_bytes()).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (`null` when not finite). Rust prints no exponent, so
/// `Display` is valid JSON.
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_owned()
    }
}

fn millis(x: Duration) -> f64 {
    x.as_secs_f64() * 1e3
}

// ---------------------------------------------------- 1. single appender

fn single_appender(sz: &Sizes, tmp: &Path, json: &JsonOut) -> String {
    let dir = tmp.join("single");
    let log = open(&dir, FsyncMode::Always);
    let raw_path = tmp.join("single.raw");
    let mut raw = raw_file(&raw_path);
    let p = payload();
    let frame = vec![0x5au8; frame_len()];
    let mut next = 0u64;
    for _ in 0..20 {
        log.append_blocking(&[rec(next, &p)]).expect("append");
        next += 1;
        raw_write_sync(&mut raw, &frame);
    }
    let (mut log_lat, mut raw_lat) = (Vec::with_capacity(sz.single), Vec::with_capacity(sz.single));
    let per_round = sz.single.div_ceil(sz.rounds);
    while log_lat.len() < sz.single {
        let n = per_round.min(sz.single - log_lat.len());
        for _ in 0..n {
            let r = [rec(next, &p)];
            next += 1;
            let t = Instant::now();
            log.append_blocking(&r).expect("append");
            log_lat.push(t.elapsed());
        }
        for _ in 0..n {
            let t = Instant::now();
            raw_write_sync(&mut raw, &frame);
            raw_lat.push(t.elapsed());
        }
    }
    drop(log);
    drop(raw);
    let (l, r) = (lat(log_lat), lat(raw_lat));
    let ratio = l.p99.as_secs_f64() / r.p99.as_secs_f64();
    println!(
        "  single-appender detail: n={} log mean={} max={} | raw mean={} max={} | ratio p50 = {:.2}x",
        l.n,
        d(l.mean),
        d(l.max),
        d(r.mean),
        d(r.max),
        l.p50.as_secs_f64() / r.p50.as_secs_f64()
    );
    let line = format!(
        "single-appender ({} B frames, FsyncMode::Always, n={}) p50={} p99={} | raw write+fdatasync p50={} p99={} | ratio p99 = {:.3}x (goal <= 1.5x) {}",
        frame.len(),
        l.n,
        d(l.p50),
        d(l.p99),
        d(r.p50),
        d(r.p99),
        ratio,
        verdict(ratio <= 1.5)
    );
    println!("{line}");
    json.emit(Figure {
        id: "log.single_appender_p99",
        label: format!("single appender, {} B frames, `FsyncMode::Always`: append p99", frame.len()),
        value: millis(l.p99),
        unit: "ms",
        baseline: Some((format!("raw {} B write+fdatasync p99", frame.len()), millis(r.p99), "ms")),
        ratio: Some(ratio),
        goal: Some("p99 ≤ 1.5× raw write+fdatasync p99"),
        met: Some(ratio <= 1.5),
        note: format!(
            "p50 {} vs raw {} ({:.2}×); {} appends and {} raw writes in {} alternating rounds",
            d(l.p50),
            d(r.p50),
            l.p50.as_secs_f64() / r.p50.as_secs_f64(),
            l.n,
            r.n,
            sz.rounds
        ),
    });
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_file(&raw_path);
    line
}

// ---------------------------------------------- 2. 256 concurrent appenders

/// Runs `tasks` appenders of `n` records each; returns the wall time and
/// every append's latency.
fn run_tasks(rt: &tokio::runtime::Runtime, log: &Arc<Log>, tasks: usize, n: usize) -> (Duration, Vec<Duration>) {
    let p = payload();
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks as u64)
            .map(|t| {
                let log = log.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    let mut lats = Vec::with_capacity(n);
                    for i in 0..n as u64 {
                        let r = [rec(t << 32 | i, &p)];
                        let t0 = Instant::now();
                        log.append(&r).await.expect("append");
                        lats.push(t0.elapsed());
                    }
                    lats
                })
            })
            .collect();
        let mut all = Vec::with_capacity(tasks * n);
        for h in handles {
            all.extend(h.await.expect("appender task"));
        }
        (start.elapsed(), all)
    })
}

/// Returns the summary line and the raw 256 KiB write+fdatasync MB/s.
fn concurrent(sz: &Sizes, tmp: &Path, json: &JsonOut) -> (String, f64) {
    // No IO or timer driver: an idle worker then parks on a futex, not by
    // writing to an eventfd, so `syscw` below counts the log's writes only.
    let rt = tokio::runtime::Builder::new_multi_thread().build().expect("tokio runtime");
    let dir = tmp.join("concurrent");
    let log = Arc::new(open(&dir, FsyncMode::Always));
    let raw_path = tmp.join("concurrent.raw");
    let mut raw = raw_file(&raw_path);
    let chunk = vec![0xa5u8; RAW_CHUNK];
    // Warm-up.
    run_tasks(&rt, &log, sz.tasks, 2);
    raw_write_sync(&mut raw, &chunk);

    let per_round = sz.per_task.div_ceil(sz.rounds);
    let raw_per_round = (sz.raw_chunk_bytes as usize / RAW_CHUNK).div_ceil(sz.rounds);
    let (mut log_t, mut raw_t, mut raw_bytes, mut done) = (Duration::ZERO, Duration::ZERO, 0u64, 0usize);
    let mut lats = Vec::new();
    let (mut writes, mut cpu, mut writer_cpu) = (0u64, Duration::ZERO, Duration::ZERO);
    while done < sz.per_task {
        let n = per_round.min(sz.per_task - done);
        let before = (write_syscalls(), process_cpu(), thread_cpu("ferry-log-write"));
        let (t, l) = run_tasks(&rt, &log, sz.tasks, n);
        writes += write_syscalls().saturating_sub(before.0);
        cpu += process_cpu().saturating_sub(before.1);
        writer_cpu += thread_cpu("ferry-log-write").saturating_sub(before.2);
        log_t += t;
        lats.extend(l);
        done += n;
        let t = Instant::now();
        for _ in 0..raw_per_round {
            raw_write_sync(&mut raw, &chunk);
        }
        raw_t += t.elapsed();
        raw_bytes += (raw_per_round * RAW_CHUNK) as u64;
    }
    let records = (sz.tasks * sz.per_task) as u64;
    drop(Arc::into_inner(log).expect("no other handle"));
    drop(raw);
    drop(rt);
    let l = lat(lats);
    let log_mbs = mbs(records * PAYLOAD as u64, log_t);
    let disk_mbs = mbs(records * frame_len() as u64, log_t);
    let raw_mbs = mbs(raw_bytes, raw_t);
    let ratio = log_mbs / raw_mbs;
    println!(
        "  concurrent-256 detail: {} records in {}; per-append latency p50={} p99={} max={}; {} write syscalls (~groups, mean {:.1} records/group); CPU {:.0}% of one core (writer thread {:.0}%); raw {} x 256 KiB in {} ({:.0} syncs/s)",
        records,
        d(log_t),
        d(l.p50),
        d(l.p99),
        d(l.max),
        writes,
        records as f64 / writes.max(1) as f64,
        100.0 * cpu.as_secs_f64() / log_t.as_secs_f64(),
        100.0 * writer_cpu.as_secs_f64() / log_t.as_secs_f64(),
        raw_bytes / RAW_CHUNK as u64,
        d(raw_t),
        (raw_bytes / RAW_CHUNK as u64) as f64 / raw_t.as_secs_f64()
    );
    let line = format!(
        "concurrent-256 ({} tasks x {} appends, 1 KiB, FsyncMode::Always) {:.0} records/s {:.1} MB/s ({:.1} MB/s on disk) | raw 256 KiB write+fdatasync {:.1} MB/s | ratio = {:.3}x (goal >= 0.5x) {}",
        sz.tasks,
        sz.per_task,
        records as f64 / log_t.as_secs_f64(),
        log_mbs,
        disk_mbs,
        raw_mbs,
        ratio,
        verdict(ratio >= 0.5)
    );
    println!("{line}");
    json.emit(Figure {
        id: "log.concurrent_256",
        label: format!("{} concurrent appenders, 1 KiB records, `FsyncMode::Always`: payload MB/s", sz.tasks),
        value: log_mbs,
        unit: "MB/s",
        baseline: Some(("raw 256 KiB write+fdatasync".to_owned(), raw_mbs, "MB/s")),
        ratio: Some(ratio),
        goal: Some("≥ 0.5× raw 256 KiB write+fdatasync bandwidth"),
        met: Some(ratio >= 0.5),
        note: format!(
            "{:.0} records/s ({:.1} MB/s on disk); per-append p50 {}, p99 {}; mean {:.1} records per group commit",
            records as f64 / log_t.as_secs_f64(),
            disk_mbs,
            d(l.p50),
            d(l.p99),
            records as f64 / writes.max(1) as f64
        ),
    });
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_file(&raw_path);
    (line, raw_mbs)
}

// ------------------------------------------------------ 3. batch append

fn batch(sz: &Sizes, tmp: &Path, raw_256k_mbs: Option<f64>, json: &JsonOut) -> String {
    let dir = tmp.join("batch");
    let log = open(&dir, FsyncMode::Always);
    let raw_path = tmp.join("batch.raw");
    let mut raw = raw_file(&raw_path);
    let p = payload();
    let same = vec![0x3cu8; BATCH * frame_len()];
    let chunk = vec![0xa5u8; RAW_CHUNK];
    let mut next = 0u64;
    // Warm-up.
    log.append_blocking(&batch_of(next, BATCH, &p)).expect("append");
    next += BATCH as u64;
    raw_write_sync(&mut raw, &same);

    let per_round = sz.batches.div_ceil(sz.rounds);
    let (mut log_lat, mut raw_lat) = (Vec::new(), Vec::new());
    let (mut raw256_t, mut raw256_n) = (Duration::ZERO, 0usize);
    while log_lat.len() < sz.batches {
        let n = per_round.min(sz.batches - log_lat.len());
        for _ in 0..n {
            let records = batch_of(next, BATCH, &p);
            next += BATCH as u64;
            let t = Instant::now();
            log.append_blocking(&records).expect("append");
            log_lat.push(t.elapsed());
        }
        for _ in 0..n {
            let t = Instant::now();
            raw_write_sync(&mut raw, &same);
            raw_lat.push(t.elapsed());
        }
        if raw_256k_mbs.is_none() {
            let t = Instant::now();
            for _ in 0..n * same.len() / RAW_CHUNK {
                raw_write_sync(&mut raw, &chunk);
                raw256_n += 1;
            }
            raw256_t += t.elapsed();
        }
    }
    drop(log);
    drop(raw);
    let raw256 = raw_256k_mbs.unwrap_or_else(|| mbs((raw256_n * RAW_CHUNK) as u64, raw256_t));
    let (log_total, raw_total): (Duration, Duration) = (log_lat.iter().sum(), raw_lat.iter().sum());
    let records = (sz.batches * BATCH) as u64;
    let log_mbs = mbs(records * PAYLOAD as u64, log_total);
    let raw_mbs = mbs((sz.batches * same.len()) as u64, raw_total);
    let (l, r) = (lat(log_lat), lat(raw_lat));
    println!(
        "  batch-1000 detail: per call log p50={} p99={} | raw {} B write+fdatasync p50={} p99={}",
        d(l.p50),
        d(l.p99),
        same.len(),
        d(r.p50),
        d(r.p99)
    );
    let line = format!(
        "batch-1000 ({} appends of 1000 x 1 KiB, FsyncMode::Always) {:.0} records/s {:.1} MB/s ({:.1} MB/s on disk) | raw same-size write+fdatasync {:.1} MB/s, ratio = {:.2}x | raw 256 KiB write+fdatasync {:.1} MB/s",
        sz.batches,
        records as f64 / log_total.as_secs_f64(),
        log_mbs,
        mbs(records * frame_len() as u64, log_total),
        raw_mbs,
        log_mbs / raw_mbs,
        raw256
    );
    println!("{line}");
    json.emit(Figure {
        id: "log.batch_1000",
        label: "batch append of 1000 × 1 KiB, `FsyncMode::Always`: payload MB/s".to_owned(),
        value: log_mbs,
        unit: "MB/s",
        baseline: Some((format!("raw {} B (same size) write+fdatasync", same.len()), raw_mbs, "MB/s")),
        ratio: Some(log_mbs / raw_mbs),
        goal: None,
        met: None,
        note: format!(
            "{:.0} records/s; raw 256 KiB write+fdatasync {:.1} MB/s ({:.2}×)",
            records as f64 / log_total.as_secs_f64(),
            raw256,
            log_mbs / raw256
        ),
    });
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_file(&raw_path);
    line
}

// ------------------------------------------------ 4. reopen and read

/// Creates a log of about `sz.log_bytes` with every segment, the active one
/// included, as full as the writer fills them (the worst case for reopen:
/// recovery scans the whole active segment).
fn create_big_log(sz: &Sizes, dir: &Path) -> Duration {
    let t = Instant::now();
    let log = open(dir, FsyncMode::Never);
    let batch_bytes = (BATCH * frame_len()) as u64;
    let per_segment = (DEFAULT_SEGMENT_BYTES - ferry_log::segment::SEGMENT_HEADER as u64) / batch_bytes;
    let batches = if sz.log_bytes >= DEFAULT_SEGMENT_BYTES {
        sz.log_bytes / DEFAULT_SEGMENT_BYTES * per_segment
    } else {
        sz.log_bytes.div_ceil(batch_bytes)
    };
    let p = payload();
    for b in 0..batches {
        log.append_blocking(&batch_of(b * BATCH as u64, BATCH, &p)).expect("append");
    }
    log.sync_blocking().expect("sync");
    drop(log);
    t.elapsed()
}

fn read_log(log: &Log) -> (Duration, u64, u64) {
    let t = Instant::now();
    let (mut from, end) = (log.stats().start_offset, log.next_offset());
    let (mut records, mut bytes) = (0u64, 0u64);
    while from < end {
        let batch = log.read(from, 10_000, 4 << 20).expect("read");
        assert!(batch.skipped.is_empty(), "{:?}", batch.skipped);
        records += batch.records.len() as u64;
        bytes += batch.records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        from = batch.next;
    }
    (t.elapsed(), records, bytes)
}

fn read_raw(paths: &[PathBuf]) -> (Duration, u64) {
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    for path in paths {
        let mut f = File::open(path).expect("open");
        loop {
            let n = f.read(&mut buf).expect("raw read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    (t.elapsed(), total)
}

fn reopen_and_read(sz: &Sizes, tmp: &Path, json: &JsonOut) -> Vec<String> {
    let dir = tmp.join("big");
    let created = create_big_log(sz, &dir);
    let seg_bytes = dir_bytes(&dir, "log");
    let segs = files(&dir, "log");
    println!(
        "  reopen detail: created {:.1} MiB in {} segments ({} index files) in {} (FsyncMode::Never, one sync at the end)",
        seg_bytes as f64 / MIB as f64,
        segs.len(),
        files(&dir, "idx").len(),
        d(created)
    );

    // Reopen: cold (page cache evicted), then warm.
    evict(&dir);
    let t = Instant::now();
    let (log, report) = Log::open(&dir, LogOptions::default()).expect("reopen");
    let cold = t.elapsed();
    assert!(report.is_clean(), "{report:?}");
    drop(log);
    let t = Instant::now();
    let (log, warm_report) = Log::open(&dir, LogOptions::default()).expect("reopen");
    let warm = t.elapsed();
    assert_eq!(warm_report.records, report.records);
    // Baseline: reading what recovery has to read (every index, the active segment).
    let mut must_read = files(&dir, "idx");
    must_read.extend(segs.last().cloned());
    evict(&dir);
    let (raw_cold, raw_cold_bytes) = read_raw(&must_read);
    let (raw_warm, _) = read_raw(&must_read);
    let reopen_line = format!(
        "reopen ({:.2} GiB, {} segments, {} records in RecoveryReport) Log::open cold={} warm={} (goal <= 1 s) {} | raw read of the {} idx files + active segment ({:.1} MiB) cold={} warm={}",
        seg_bytes as f64 / (1u64 << 30) as f64,
        report.segments,
        report.records,
        d(cold),
        d(warm),
        verdict(cold.max(warm) <= Duration::from_secs(1)),
        must_read.len().saturating_sub(1),
        raw_cold_bytes as f64 / MIB as f64,
        d(raw_cold),
        d(raw_warm)
    );
    println!("{reopen_line}");
    // The goal is for 1 GiB; a smaller (quick) log is reported, not judged.
    let full_size = seg_bytes >= (1u64 << 30) * 9 / 10;
    json.emit(Figure {
        id: "log.reopen_1gib",
        label: format!(
            "reopen (`Log::open`) of a {:.0} MiB log, {} segment(s), page cache evicted",
            seg_bytes as f64 / MIB as f64,
            report.segments
        ),
        value: millis(cold),
        unit: "ms",
        baseline: Some((
            format!(
                "raw cold read of what recovery reads ({} idx files + active segment)",
                must_read.len().saturating_sub(1)
            ),
            millis(raw_cold),
            "ms",
        )),
        ratio: Some(cold.as_secs_f64() / raw_cold.as_secs_f64().max(1e-9)),
        goal: Some("reopen of a 1 GiB log ≤ 1 s"),
        met: full_size.then_some(cold.max(warm) <= Duration::from_secs(1)),
        note: format!(
            "warm {}; {} records{}",
            d(warm),
            report.records,
            if full_size {
                String::new()
            } else {
                " — smaller than the goal's 1 GiB (quick sizes): not judged".into()
            }
        ),
    });

    // Sequential read: cold then warm, log then raw each time.
    let mut lines = vec![reopen_line];
    for cache in ["cold", "warm"] {
        if cache == "cold" {
            evict(&dir);
        }
        let (log_t, records, payload_bytes) = read_log(&log);
        assert_eq!(records, report.records, "every record read back");
        if cache == "cold" {
            evict(&dir);
        }
        let (raw_t, raw_bytes) = read_raw(&segs);
        let (log_mbs, raw_mbs) = (mbs(payload_bytes, log_t), mbs(raw_bytes, raw_t));
        let line = format!(
            "read-all {cache} ({records} records, read(from, 10_000, 4 MiB)) {:.0} MB/s ({:.0} MB/s on disk) in {} | raw sequential read of the segment files {:.0} MB/s in {} | ratio = {:.2}x",
            log_mbs,
            mbs(seg_bytes, log_t),
            d(log_t),
            raw_mbs,
            d(raw_t),
            log_mbs / raw_mbs
        );
        println!("{line}");
        json.emit(Figure {
            id: if cache == "cold" { "log.read_all_cold" } else { "log.read_all_warm" },
            label: format!("sequential read of the whole log ({cache} page cache): payload MB/s"),
            value: log_mbs,
            unit: "MB/s",
            baseline: Some((format!("raw sequential read of the segment files ({cache})"), raw_mbs, "MB/s")),
            ratio: Some(log_mbs / raw_mbs),
            goal: None,
            met: None,
            note: format!("{records} records in {}", d(log_t)),
        });
        lines.push(line);
    }
    drop(log);
    let _ = fs::remove_dir_all(&dir);
    lines
}

// ------------------------------------------------ 5. criterion (CPU path)

fn criterion_benches(sz: &Sizes, tmp: &Path) {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(sz.criterion_secs))
        .configure_from_args();
    let p = payload();
    let dir = tmp.join("criterion");
    {
        let log = open(&dir.join("append"), FsyncMode::Never);
        let mut next = 0u64;
        c.bench_function(CRIT_APPEND, |b| {
            b.iter_batched(
                || {
                    next += 1;
                    [rec(next, &p)]
                },
                |r| log.append_blocking(&r).expect("append"),
                BatchSize::SmallInput,
            )
        });
    }
    {
        let log = open(&dir.join("read"), FsyncMode::Never);
        log.append_blocking(&batch_of(0, BATCH, &p)).expect("append");
        c.bench_function(CRIT_READ, |b| {
            b.iter(|| {
                let batch = log.read(0, BATCH, 4 << 20).expect("read");
                assert_eq!(batch.records.len(), BATCH);
                batch
            })
        });
    }
    c.final_summary();
    let _ = fs::remove_dir_all(&dir);
}
