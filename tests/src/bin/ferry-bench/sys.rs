//! What the kernel tells about processes and the disk: RSS and CPU time from
//! `/proc`, and the raw disk baselines (plain `write` + `fdatasync`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stats::{mbs, Latencies};

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of a process so far (clock ticks of 10 ms, the
/// Linux default `CLK_TCK`).
fn cpu_time(pid: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The pid of a running process whose command line holds every one of `args`.
pub(crate) fn find_pid(args: &[&str]) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().all(|a| words.contains(&a.as_bytes())) {
            return Some(pid);
        }
    }
    None
}

/// Busy time of all CPUs together, from the first line of `/proc/stat`
/// (user, nice, system, irq, softirq, steal; 10 ms ticks).
fn machine_busy() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = text.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let ticks = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<u64>();
    Some(Duration::from_millis(ticks * 10))
}

/// CPU used by the sidecar, the broker and this process over a phase, and
/// by the machine as a whole (others' work shows as the difference).
pub(crate) struct CpuMeter {
    pids: Vec<(&'static str, String)>,
    start: Vec<Option<Duration>>,
    machine: Option<Duration>,
    t0: Instant,
}

impl CpuMeter {
    pub(crate) fn start(sidecar: u32, nats: Option<u32>) -> CpuMeter {
        let mut pids = vec![("sidecar", sidecar.to_string())];
        if let Some(n) = nats {
            pids.push(("nats-server", n.to_string()));
        }
        pids.push(("ferry-bench", "self".to_owned()));
        let start = pids.iter().map(|(_, p)| cpu_time(p)).collect();
        CpuMeter { pids, start, machine: machine_busy(), t0: Instant::now() }
    }

    /// `CPU in cores: sidecar 1.21, nats-server 0.40, ferry-bench 0.33; machine 1.98 (others 0.04)`.
    pub(crate) fn report(&self) -> String {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        let mut ours = 0.0;
        let parts: Vec<String> = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((name, pid), s)| match (s, cpu_time(pid)) {
                (Some(a), Some(b)) => {
                    let cores = b.saturating_sub(*a).as_secs_f64() / wall;
                    ours += cores;
                    format!("{name} {cores:.2}")
                }
                _ => format!("{name} ?"),
            })
            .collect();
        let machine = match (self.machine, machine_busy()) {
            (Some(a), Some(b)) => {
                let all = b.saturating_sub(a).as_secs_f64() / wall;
                format!("; all CPUs {all:.2} (others {:.2})", (all - ours).max(0.0))
            }
            _ => String::new(),
        };
        format!("CPU in cores: {}{machine}", parts.join(", "))
    }
}

fn raw_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A new raw file `name` in `dir`, after one warm-up write+fdatasync of the
/// buffer of `size` bytes of `fill` it returns for the measured writes.
fn warmed(dir: &Path, name: &str, fill: u8, size: usize) -> std::io::Result<(std::path::PathBuf, File, Vec<u8>)> {
    let path = dir.join(name);
    let mut f = raw_file(&path)?;
    let buf = vec![fill; size];
    f.write_all(&buf)?;
    f.sync_data()?;
    Ok((path, f, buf))
}

/// Sequential 256 KiB `write` + `fdatasync` (std's `sync_data`) into a new
/// file in `dir`, for `time` or `max_chunks`, whichever comes first.
pub(crate) struct RawSeq {
    pub(crate) mbs: f64,
    pub(crate) chunks: u64,
    pub(crate) elapsed: Duration,
}

pub(crate) fn raw_256k(dir: &Path, time: Duration, max_chunks: u64) -> std::io::Result<RawSeq> {
    const CHUNK: usize = 256 << 10;
    let (path, mut f, chunk) = warmed(dir, "ferry-bench-raw-256k.bin", 0xa5, CHUNK)?;
    let t0 = Instant::now();
    let mut chunks = 0u64;
    while chunks < max_chunks && t0.elapsed() < time {
        f.write_all(&chunk)?;
        f.sync_data()?;
        chunks += 1;
    }
    let elapsed = t0.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(RawSeq { mbs: mbs(chunks * CHUNK as u64, elapsed), chunks, elapsed })
}

/// One `write` + `fdatasync` of `size` bytes at a time, one after the other.
pub(crate) struct RawSmall {
    pub(crate) per_sec: f64,
    pub(crate) lat: Latencies,
}

pub(crate) fn raw_small(dir: &Path, size: usize, time: Duration, max_ops: usize) -> std::io::Result<RawSmall> {
    let (path, mut f, buf) = warmed(dir, "ferry-bench-raw-small.bin", 0x5a, size)?;
    let mut lats = Vec::with_capacity(max_ops.min(1 << 20));
    let t0 = Instant::now();
    while lats.len() < max_ops && t0.elapsed() < time {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        lats.push(t.elapsed());
    }
    let elapsed = t0.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(RawSmall { per_sec: lats.len() as f64 / elapsed.as_secs_f64().max(1e-9), lat: Latencies::of(lats) })
}

/// Raw `write` + `fdatasync` of `size` bytes at a fixed `rate` for
/// `duration`, one at a time on one thread, each due at a time handed out by
/// the same pacer thread the open-loop load uses: the disk and the machine
/// under the fixed-rate figure's schedule, without Ferry.
pub(crate) struct RawOpen {
    /// From each write's scheduled time to the end of its `fdatasync`.
    pub(crate) lat: Latencies,
    /// How late the pacer handed each one out (the machine's wake-up lag).
    pub(crate) pacer_lag: Latencies,
}

pub(crate) fn raw_open_loop(dir: &Path, size: usize, rate: u64, duration: Duration) -> std::io::Result<RawOpen> {
    let (path, mut f, buf) = warmed(dir, "ferry-bench-raw-open.bin", 0x3c, size)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (total, _start, pacer) = crate::load::pacer(rate, duration, tx);
    let mut lats = Vec::with_capacity(total as usize);
    while let Some(due) = rx.blocking_recv() {
        f.write_all(&buf)?;
        f.sync_data()?;
        lats.push(due.elapsed());
    }
    let lags = pacer.join().map_err(|_| std::io::Error::other("the pacer thread panicked"))?;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(RawOpen { lat: Latencies::of(lats), pacer_lag: Latencies::of(lags) })
}

/// Time a thread lost to the machine while it spun on the clock: gaps
/// between two readings longer than [`GAP`], which a running thread only
/// sees when its vCPU did not run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gaps {
    pub(crate) spun: Duration,
    pub(crate) lost: Duration,
    pub(crate) count: usize,
    pub(crate) longest: Duration,
}

const GAP: Duration = Duration::from_micros(500);

fn spin_gaps(time: Duration) -> Gaps {
    let t0 = Instant::now();
    let mut last = t0;
    let (mut lost, mut count, mut longest) = (Duration::ZERO, 0, Duration::ZERO);
    while last - t0 < time {
        let now = Instant::now();
        let gap = now - last;
        if gap > GAP {
            lost += gap;
            count += 1;
            longest = longest.max(gap);
        }
        last = now;
    }
    Gaps { spun: last - t0, lost, count, longest }
}

impl std::fmt::Display for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} ms of {:.0} ms lost in {} gaps over 0.5 ms (longest {:.1} ms)",
            self.lost.as_secs_f64() * 1e3,
            self.spun.as_secs_f64() * 1e3,
            self.count,
            self.longest.as_secs_f64() * 1e3
        )
    }
}

/// A thread spinning on the clock for `time`, first alone, then while
/// another thread runs 1 KiB write+fdatasync in `dir`: on some VMs a disk
/// flush stops the other vCPU for many milliseconds, which every latency
/// figure of the run then carries.
pub(crate) fn stall_probe(dir: &Path, time: Duration) -> std::io::Result<(Gaps, Gaps)> {
    let idle = spin_gaps(time);
    let (path, mut f, buf) = warmed(dir, "ferry-bench-stall-probe.bin", 0x11, 1024)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&buf)?;
                f.sync_data()?;
                n += 1;
            }
            Ok(n)
        })
    };
    let syncing = spin_gaps(time);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let synced = syncer.join().map_err(|_| std::io::Error::other("the fdatasync thread panicked"))??;
    std::fs::remove_file(&path)?;
    if synced == 0 {
        return Err(std::io::Error::other("the fdatasync thread did not complete one write"));
    }
    Ok((idle, syncing))
}
