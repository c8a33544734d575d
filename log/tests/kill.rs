//! A real process appending to a log is killed with SIGKILL at a random
//! moment, again and again on the same directory; after each kill every
//! append it acknowledged must read back, byte for byte.
//!
//! The child (`src/bin/ferry-log-stress.rs`) prints `{offset} {id}` after
//! each acknowledged append; reading its stdout is how this test knows what
//! was acknowledged and when to kill it. Set `FERRY_KILL_SEED` to replay the
//! kill points of a failed run (the seed is printed).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_log::segment::parse_name;
use ferry_log::{Log, LogOptions, Record};

const ROUNDS: u64 = 10;
/// Ids of round `r` are numbered from `r * ID_STRIDE`, so they stay unique.
const ID_STRIDE: u64 = 1_000_000;
/// A round that takes longer than this is hung: the child is killed and the test fails.
const ROUND_LIMIT: Duration = Duration::from_secs(120);

/// Must match `payload_of` in `src/bin/ferry-log-stress.rs`.
fn payload_of(id: &str) -> Vec<u8> {
    let sum: u64 = id.bytes().map(u64::from).sum();
    format!("{id}|").repeat(1 + (sum % 24) as usize).into_bytes()
}

/// xorshift64*: enough randomness for kill points, no dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Kills the child (if still running) and reaps it when dropped, so a
/// failing test leaves no process behind.
struct Reaper(Arc<Mutex<Child>>);

impl Reaper {
    /// SIGKILL, then wait until the process is gone.
    fn kill(&self) {
        let mut child = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns the stress binary on `dir`, reads `count` acknowledgements from
/// it, kills it with SIGKILL and waits for it to be gone. Returns the
/// acknowledged `(offset, id)` pairs in the order they were printed.
fn run_and_kill(dir: &Path, first_id: u64, count: usize) -> Vec<(u64, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-log-stress"))
        .arg(dir)
        .arg(first_id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning ferry-log-stress");
    let stdout = child.stdout.take().expect("piped stdout");
    let reaper = Reaper(Arc::new(Mutex::new(child)));

    // A watchdog kills a hung child, which ends its stdout and fails the round.
    let (done, watch) = mpsc::channel::<()>();
    let hung = {
        let child = reaper.0.clone();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = watch.recv_timeout(ROUND_LIMIT) {
                let _ = child.lock().unwrap_or_else(|e| e.into_inner()).kill();
                return true;
            }
            false
        })
    };

    let mut acked = Vec::with_capacity(count);
    let mut lines = BufReader::new(stdout).lines();
    while acked.len() < count {
        let Some(line) = lines.next() else {
            drop(done);
            let hung = hung.join().unwrap();
            panic!("ferry-log-stress ended after {} of {count} acknowledgements (hung: {hung})", acked.len());
        };
        let line = line.expect("reading the child's stdout");
        let (offset, id) = line.split_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        acked.push((offset.parse().unwrap_or_else(|_| panic!("bad line {line:?}")), id.to_owned()));
    }
    reaper.kill();
    drop(done);
    assert!(!hung.join().unwrap(), "the watchdog killed the child");
    acked
}

fn read_all(log: &Log) -> Vec<Record> {
    let mut out = Vec::new();
    let mut from = 0;
    while from < log.next_offset() {
        let batch = log.read(from, 1000, 1 << 20).unwrap();
        assert!(batch.skipped.is_empty(), "damaged records after a kill: {:?}", batch.skipped);
        assert!(batch.next > from, "a read from {from} must make progress");
        out.extend(batch.records);
        from = batch.next;
    }
    out
}

fn last_segment(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir).unwrap().filter_map(|e| parse_name(e.unwrap().file_name().to_str()?, "log")).max()
}

#[test]
fn every_acknowledged_append_survives_repeated_kill_9() {
    let seed = std::env::var("FERRY_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_nanos() as u64 | 1
    });
    eprintln!("FERRY_KILL_SEED={seed}");
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    // Every acknowledged offset, over all rounds, with its id.
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut next_offset = 0;

    for round in 0..ROUNDS {
        let count = 200 + (next_random(&mut rng) % 1300) as usize;
        let new = run_and_kill(dir.path(), round * ID_STRIDE, count);
        for (offset, id) in new {
            assert!(
                offset >= next_offset,
                "round {round}: offset {offset} acknowledged again (log ended at {next_offset})"
            );
            if let Some(old) = acked.insert(offset, id.clone()) {
                panic!("round {round}: offset {offset} acknowledged for {old} and for {id}");
            }
        }

        let (log, report) = Log::open(dir.path(), LogOptions::default()).unwrap();
        assert!(report.corrupt.is_empty(), "round {round}: {report:?}");
        assert!(report.rebuilt_indexes.is_empty(), "round {round}: {report:?}");
        assert!(report.cursors_damaged.is_none(), "round {round}: {report:?}");
        // Only the active segment can have a torn tail.
        assert!(report.truncated.len() <= 1, "round {round}: {report:?}");
        if let Some(t) = report.truncated.first() {
            assert_eq!(Some(t.segment), last_segment(dir.path()), "round {round}: {report:?}");
        }

        let records = read_all(&log);
        // No gaps: offsets are dense from 0 to the end of the log.
        assert_eq!(records.len() as u64, log.next_offset(), "round {round}");
        let mut ids = std::collections::HashSet::new();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "round {round}");
            assert_eq!(r.payload, payload_of(&r.id), "round {round}: offset {}", r.offset);
            assert!(ids.insert(r.id.clone()), "round {round}: id {} appears twice", r.id);
        }
        for (&offset, id) in &acked {
            let r = records.get(offset as usize).unwrap_or_else(|| {
                panic!("round {round}: acknowledged offset {offset} ({id}) lost; log ends at {}", log.next_offset())
            });
            assert_eq!(&r.id, id, "round {round}: offset {offset}");
        }
        assert!(log.next_offset() > *acked.keys().last().unwrap(), "round {round}");
        eprintln!(
            "round {round}: killed after {count} acknowledgements; {} records in {} segments; truncated {:?}; removed {:?}",
            log.next_offset(),
            report.segments,
            report.truncated,
            report.removed_files,
        );
        next_offset = log.next_offset();
    }
}
