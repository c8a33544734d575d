//! `ferry-sidecar outbox inspect`: what the outbox holds, for an operator.

use std::fmt::Write;
use std::path::Path;

use ferry_log::{Budget, Log};

use crate::outbox::{log_options, parked_log_options, FORWARDED, PARKED_REASON};

/// A text report of every topic log under `{data_dir}/outbox`. Opening a log
/// runs its recovery (a torn tail is truncated, as a restart would), so it
/// takes the data dir's lock first and refuses while a sidecar holds it:
/// beside a running writer, recovery would cut off records it is appending
/// (answered 202) at the end of its active segment.
pub fn inspect(data_dir: &Path) -> Result<String, String> {
    if !data_dir.is_dir() {
        return Err(format!("{}: no such data directory", data_dir.display()));
    }
    let _lock = crate::lock_dir(data_dir).map_err(|e| match e {
        crate::StartError::Locked(dir) => format!(
            "data directory {dir} is in use by a running ferry-sidecar: stop it first (inspecting a log \
             runs its recovery, which would cut off what the running sidecar is appending); while it runs, \
             its /readyz and /metrics show the outbox"
        ),
        other => other.to_string(),
    })?;
    let dir = data_dir.join("outbox");
    let names = subdirs(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = String::new();
    let _ = writeln!(out, "outbox {}: {} topic(s)", dir.display(), names.len());
    for name in names {
        let path = dir.join(&name);
        let opts = log_options(
            ferry_api::topic::Persistence::Durable,
            crate::config::FsyncPolicy::Always,
            &Budget::unlimited(),
        );
        let (log, report) = Log::open(&path, opts).map_err(|e| format!("{}: {e}", path.display()))?;
        let stats = log.stats();
        let forwarded = log.cursor(FORWARDED).unwrap_or(0);
        let _ = writeln!(
            out,
            "topic {name}: {} segment(s), {} bytes, {} record(s) held (offsets {}..{}), forwarded up to {forwarded}, {} not forwarded",
            stats.segments,
            stats.bytes,
            stats.records,
            stats.start_offset,
            stats.next_offset,
            stats.next_offset.saturating_sub(forwarded),
        );
        if let Some(retained) = log.cursor(crate::outbox::RETAINED) {
            let _ =
                writeln!(out, "  replay window (--outbox-retention): forwarded records from offset {retained} kept");
        }
        for entry in std::fs::read_dir(&path).map_err(|e| e.to_string())?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.ends_with(".log") {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = writeln!(out, "  segment {file}: {len} bytes");
            }
        }
        for t in &report.truncated {
            let _ =
                writeln!(out, "  truncated a torn tail: segment {} at byte {} ({} bytes)", t.segment, t.at, t.bytes);
        }
        for c in &report.corrupt {
            let _ =
                writeln!(out, "  CORRUPT: segment {} byte {} ({} bytes): {}", c.segment, c.position, c.len, c.reason);
        }
        for b in &report.rebuilt_indexes {
            let _ = writeln!(out, "  rebuilt the index of segment {b}");
        }
        if let Some(why) = report.cursors_damaged {
            let _ = writeln!(out, "  CORRUPT cursor file: {why}");
        }
        if report.is_clean() {
            let _ = writeln!(out, "  no damage found");
        }
    }
    parked(data_dir, &mut out)?;
    Ok(out)
}

/// Lists what the forwarder parked under `{data_dir}/parked` (messages the
/// broker refused for good), one line each with id and reason.
fn parked(data_dir: &Path, out: &mut String) -> Result<(), String> {
    let dir = data_dir.join("parked");
    let Ok(names) = subdirs(&dir) else { return Ok(()) };
    for name in names {
        let path = dir.join(&name);
        let (log, _) = Log::open(&path, parked_log_options()).map_err(|e| format!("{}: {e}", path.display()))?;
        let stats = log.stats();
        let _ = writeln!(
            out,
            "parked {name}: {} message(s) the broker refused for good, in {}",
            stats.records,
            path.display()
        );
        log.scan(stats.start_offset, |r| {
            let reason = r.headers.iter().find(|(n, _)| n == PARKED_REASON).map_or("", |(_, v)| v.as_str());
            let _ = writeln!(out, "  {} ({} bytes): {reason}", r.id, r.payload.len());
            std::ops::ControlFlow::<()>::Continue(())
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The names of the directories in `dir` (one log each), sorted.
fn subdirs(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}
