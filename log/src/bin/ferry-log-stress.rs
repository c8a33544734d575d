//! `ferry-log-stress DIR [FIRST]`: appends records to the log in `DIR` from
//! eight threads until it is killed, printing `{offset} {id}` on stdout (and
//! flushing) for every record whose append was acknowledged.
//!
//! Ids are `t{thread}-{n}` with `n` counting up from `FIRST` (default 0), so
//! runs on the same log can keep ids unique; the payload is derived from the
//! id by `payload_of` (the kill test, `tests/kill.rs`, has a copy of it) so
//! every record read back can be checked. Small segments make segments roll
//! often, so a kill also lands in the middle of sealing one. Exits when its
//! stdout is closed, when an append fails, or after `MAX_PER_THREAD` appends
//! per thread.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use ferry_log::{FsyncMode, Log, LogOptions, NewRecord};

const THREADS: u64 = 8;
const SEGMENT_BYTES: u64 = 8 << 10;
/// A bound so a forgotten process does not run forever.
const MAX_PER_THREAD: u64 = 1_000_000;

/// The payload of the record with this id: the id repeated 1 to 24 times,
/// the count depending on the id's bytes.
fn payload_of(id: &str) -> Vec<u8> {
    let sum: u64 = id.bytes().map(u64::from).sum();
    format!("{id}|").repeat(1 + (sum % 24) as usize).into_bytes()
}

/// Why a thread stopped early.
enum Stop {
    /// Stdout was closed: the reader went away (the normal end when not killed).
    Closed,
    /// An append failed.
    Failed(String),
}

fn run(log: &Log, thread: u64, first: u64) -> Result<(), Stop> {
    // Threads append one, two or three records per call.
    let per_call = 1 + thread % 3;
    let mut n = first;
    while n < first + MAX_PER_THREAD {
        let ids: Vec<String> = (n..n + per_call).map(|i| format!("t{thread}-{i}")).collect();
        n += per_call;
        let records: Vec<NewRecord> = ids.iter().map(|id| NewRecord::new(id.clone(), payload_of(id))).collect();
        let offsets = log.append_blocking(&records).map_err(|e| Stop::Failed(format!("append failed: {e}")))?;
        let mut out = std::io::stdout().lock();
        for (offset, id) in offsets.zip(&ids) {
            writeln!(out, "{offset} {id}").map_err(|_| Stop::Closed)?;
        }
        out.flush().map_err(|_| Stop::Closed)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(dir), first) = (args.next(), args.next()) else {
        eprintln!("usage: ferry-log-stress DIR [FIRST]");
        return ExitCode::from(2);
    };
    let Ok(first) = first.as_deref().unwrap_or("0").parse::<u64>() else {
        eprintln!("FIRST must be a number");
        return ExitCode::from(2);
    };
    let opts = LogOptions { fsync: FsyncMode::Always, segment_bytes: SEGMENT_BYTES, ..LogOptions::default() };
    let log = match Log::open(&dir, opts) {
        Ok((log, _report)) => Arc::new(log),
        Err(e) => {
            eprintln!("ferry-log-stress: opening {dir}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || match run(&log, t, first) {
                Ok(()) | Err(Stop::Closed) => {}
                Err(Stop::Failed(e)) => {
                    // Stop at once: the reader sees stdout end early.
                    eprintln!("ferry-log-stress: thread {t}: {e}");
                    std::process::exit(1);
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
