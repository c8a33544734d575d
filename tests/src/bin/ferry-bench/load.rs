//! Produce load against the sidecar's API: closed loop (each connection
//! sends its next request when the last one is answered) and open loop (a
//! fixed schedule, latency measured from each request's *scheduled* time,
//! so a stall is not hidden by sending less during it: no coordinated
//! omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{StatusCode, Uri};

use crate::http::{open_many, Conn, Error};
use crate::stats::Latencies;

/// Longest wait for one answer before it counts as an error.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause after a 429/503/507 before trying again.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// What to send: every request is the same.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) uri: Uri,
    pub(crate) content_type: &'static str,
    pub(crate) body: Bytes,
    /// Messages each accepted request stores.
    pub(crate) msgs_per_req: u64,
    /// The answer that counts as accepted (202; 404 for `--http-floor`).
    pub(crate) accepted: StatusCode,
}

/// How one request went.
enum Sent {
    Ok(Duration),
    /// Back-pressure (429, 503, 507): wait this long.
    Rejected(Duration),
    Failed(String),
    Broken(String),
}

async fn send_one(conn: &mut Conn, t: &Target) -> Sent {
    let t0 = Instant::now();
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.post(&t.uri, t.content_type, t.body.clone())).await {
        Ok(Ok(a)) if a.status == t.accepted => Sent::Ok(t0.elapsed()),
        Ok(Ok(a))
            if a.status == StatusCode::TOO_MANY_REQUESTS
                || a.status == StatusCode::SERVICE_UNAVAILABLE
                || a.status == StatusCode::INSUFFICIENT_STORAGE =>
        {
            Sent::Rejected(a.retry_after.unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF))
        }
        Ok(Ok(a)) => Sent::Failed(format!("{} {}", a.status, String::from_utf8_lossy(&a.body))),
        Ok(Err(e)) => Sent::Broken(e.to_string()),
        Err(_) => Sent::Broken(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// Counters of one load phase.
#[derive(Default)]
pub(crate) struct LoadResult {
    /// Messages in accepted (202) requests.
    pub(crate) msgs: u64,
    /// Accepted requests.
    pub(crate) requests: u64,
    /// Requests answered 429/503/507 (back-pressure).
    pub(crate) rejected: u64,
    /// Requests that failed otherwise.
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) elapsed: Duration,
    /// Per accepted request.
    pub(crate) lat: Latencies,
}

impl LoadResult {
    pub(crate) fn msgs_per_sec(&self) -> f64 {
        self.msgs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `requests 123 ok, 0 rejected (429/503/507), 0 failed`.
    pub(crate) fn counts(&self) -> String {
        let mut s = format!(
            "{} requests ok ({} msgs) in {:.2} s, {} rejected (429/503/507), {} failed",
            self.requests,
            self.msgs,
            self.elapsed.as_secs_f64(),
            self.rejected,
            self.errors
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!(" (first failure: {e})"));
        }
        s
    }
}

#[derive(Default)]
struct WorkerOut {
    requests: u64,
    rejected: u64,
    errors: u64,
    first_error: Option<String>,
    lats: Vec<Duration>,
    /// (scheduled time, latency) of each answered request, when
    /// `FERRY_BENCH_TIMELINE` names a file to write them to.
    timeline: Vec<(Instant, Duration)>,
}

impl WorkerOut {
    fn failed(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

fn merge(outs: Vec<WorkerOut>, msgs_per_req: u64, elapsed: Duration) -> LoadResult {
    let mut r = LoadResult { elapsed, ..LoadResult::default() };
    let mut lats = Vec::new();
    for o in outs {
        r.requests += o.requests;
        r.rejected += o.rejected;
        r.errors += o.errors;
        if r.first_error.is_none() {
            r.first_error = o.first_error;
        }
        lats.extend(o.lats);
    }
    r.msgs = r.requests * msgs_per_req;
    r.lat = Latencies::of(lats);
    r
}

/// Closed loop on `conns` connections until `duration` has passed or
/// `max_requests` were accepted in total.
pub(crate) async fn closed_loop(
    t: &Target,
    conns: usize,
    duration: Duration,
    max_requests: u64,
) -> Result<LoadResult, Error> {
    let connections = open_many(t.addr, conns).await?;
    let budget = Arc::new(AtomicI64::new(i64::try_from(max_requests).unwrap_or(i64::MAX)));
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut tasks = Vec::with_capacity(conns);
    for mut conn in connections {
        let t = t.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut::default();
            while Instant::now() < deadline {
                if budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
                    break;
                }
                match send_one(&mut conn, &t).await {
                    Sent::Ok(lat) => {
                        out.requests += 1;
                        out.lats.push(lat);
                        continue;
                    }
                    Sent::Rejected(wait) => {
                        out.rejected += 1;
                        tokio::time::sleep(wait).await;
                    }
                    Sent::Failed(e) => out.failed(e),
                    Sent::Broken(e) => {
                        out.failed(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if let Ok(c) = Conn::open(t.addr).await {
                            conn = c;
                        }
                    }
                }
                budget.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    let mut outs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outs.push(task.await?);
    }
    Ok(merge(outs, t.msgs_per_req, t0.elapsed()))
}

/// An open-loop run.
pub(crate) struct OpenResult {
    pub(crate) load: LoadResult,
    /// Requests scheduled.
    pub(crate) scheduled: u64,
    /// How late the pacer thread handed each request out (client-side lag,
    /// included in the latencies).
    pub(crate) pacer_lag: Latencies,
}

/// Sends `rate` requests per second for `duration` on a fixed schedule,
/// spread over `conns` connections; latency runs from the scheduled time.
pub(crate) async fn open_loop(t: &Target, conns: usize, rate: u64, duration: Duration) -> Result<OpenResult, Error> {
    let connections = open_many(t.addr, conns).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut tasks = Vec::with_capacity(conns);
    for mut conn in connections {
        let t = t.clone();
        let rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut::default();
            let timeline = std::env::var_os(TIMELINE).is_some();
            loop {
                let due = rx.lock().await.recv().await;
                let Some(due) = due else { break };
                match send_one(&mut conn, &t).await {
                    Sent::Ok(_) => {
                        out.requests += 1;
                        let lat = due.elapsed();
                        out.lats.push(lat);
                        if timeline {
                            out.timeline.push((due, lat));
                        }
                    }
                    Sent::Rejected(_) => out.rejected += 1,
                    Sent::Failed(e) => out.failed(e),
                    Sent::Broken(e) => {
                        out.failed(e);
                        if let Ok(c) = Conn::open(t.addr).await {
                            conn = c;
                        }
                    }
                }
            }
            out
        }));
    }
    let (total, start, pacer) = pacer(rate, duration, tx);
    let pacer_lag = join_pacer(pacer).await?;
    let mut outs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outs.push(task.await?);
    }
    if let Some(path) = std::env::var_os(TIMELINE) {
        write_timeline(std::path::Path::new(&path), start, &outs)?;
    }
    let load = merge(outs, t.msgs_per_req, start.elapsed());
    Ok(OpenResult { load, scheduled: total, pacer_lag })
}

/// Env var naming a file to which an open-loop run appends one line per
/// answered request: its scheduled time (ms since the run's start) and its
/// latency (ms). A diagnosis aid: where in time the slow requests fall.
const TIMELINE: &str = "FERRY_BENCH_TIMELINE";

fn write_timeline(path: &std::path::Path, start: Instant, outs: &[WorkerOut]) -> Result<(), Error> {
    use std::io::Write;
    let mut points: Vec<(Instant, Duration)> = outs.iter().flat_map(|o| o.timeline.iter().copied()).collect();
    points.sort();
    let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    for (due, lat) in points {
        writeln!(f, "{:.3} {:.3}", (due - start).as_secs_f64() * 1e3, lat.as_secs_f64() * 1e3)?;
    }
    f.flush()?;
    Ok(())
}

/// Hands out `rate` instants per second for `duration` on a thread of its
/// own (std's nanosecond sleep, not tokio's millisecond timer wheel);
/// returns how many it will hand out, the first one's time, and the thread,
/// which yields how late it handed each one out.
pub(crate) fn pacer(
    rate: u64,
    duration: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> (u64, Instant, std::thread::JoinHandle<Vec<Duration>>) {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let start = Instant::now() + Duration::from_millis(10);
    let handle = std::thread::spawn(move || {
        let mut lags = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1));
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            lags.push(due.elapsed());
            if tx.send(due).is_err() {
                break;
            }
        }
        lags
    });
    (total, start, handle)
}

/// Waits (off the runtime's workers) for the pacer thread: its lags.
pub(crate) async fn join_pacer(h: std::thread::JoinHandle<Vec<Duration>>) -> Result<Latencies, Error> {
    let lags = tokio::task::spawn_blocking(move || h.join()).await?.map_err(|_| "the pacer thread panicked")?;
    Ok(Latencies::of(lags))
}
