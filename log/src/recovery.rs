//! Start-up recovery, apart from the hot path.
//!
//! For every segment but the last, the index file is trusted if its CRC32C,
//! base and recorded data length match; otherwise the segment is scanned and
//! the index rewritten. The last (active) segment is always scanned record by
//! record: a torn tail is truncated, a damaged record with valid records
//! after it is reported and skipped, and zeros after the last record are
//! space the writer preallocated (see `LogOptions::preallocate_bytes`): cut
//! off without a report. So reopening reads the index files and one
//! segment, never the whole log.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fs::{write_atomic, Fs};
use crate::record::{check_frame, frame_len, FRAME_HEADER, MIN_BODY};
use crate::segment::*;

/// A damaged byte range that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// Base offset of the segment (its file name).
    pub segment: u64,
    /// Byte position of the damage in the segment file.
    pub position: u64,
    /// Bytes skipped.
    pub len: u64,
    /// What was wrong.
    pub reason: &'static str,
}

/// A torn tail that was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Base offset of the segment.
    pub segment: u64,
    /// New length of the segment file.
    pub at: u64,
    /// Bytes removed.
    pub bytes: u64,
}

/// What opening the log found and did. Everything unusual is here, and was
/// also logged with `tracing::warn!`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Readable records after recovery.
    pub records: u64,
    /// Torn tails cut off (at most one normally: the active segment's).
    pub truncated: Vec<Truncation>,
    /// Damaged records or headers that were skipped.
    pub corrupt: Vec<Corruption>,
    /// Segments whose index was missing or damaged and was rebuilt.
    pub rebuilt_indexes: Vec<u64>,
    /// Leftover files removed (temporary files, orphan indexes).
    pub removed_files: Vec<String>,
    /// Set when the cursor file was damaged and was ignored (every cursor
    /// starts again from the beginning of the log: re-sends, never loss).
    pub cursors_damaged: Option<&'static str>,
    /// Cursors that pointed past the recovered end (records they had passed
    /// were lost with an unsynced or damaged tail), with the offset each
    /// had: they were moved back to the end, so records written from now
    /// on, which take those offsets again, are not skipped.
    pub cursors_past_end: BTreeMap<String, u64>,
}

impl RecoveryReport {
    /// True when nothing had to be repaired or skipped.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty()
            && self.corrupt.is_empty()
            && self.rebuilt_indexes.is_empty()
            && self.cursors_damaged.is_none()
            && self.cursors_past_end.is_empty()
    }
}

/// The result of scanning a segment's bytes.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub entries: Vec<IndexEntry>,
    /// Where readable data ends (the start of a torn tail or of
    /// preallocated zeros, or the file end).
    pub valid_end: u64,
    pub corrupt: Vec<Corruption>,
    pub torn: bool,
}

/// Scans frames from the end of the header, skipping damaged ones when a
/// valid frame can be found after them.
pub(crate) fn scan(data: &[u8], base: u64) -> Scan {
    let mut out = Scan::default();
    let mut pos = SEGMENT_HEADER.min(data.len());
    let mut last: Option<u64> = None;
    // No frame starts in the zeros at the end (a frame's length field is
    // never zero): searches past damage stop before them.
    let nonzero_end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    while pos < nonzero_end {
        match valid_frame_at(data, pos, base, last) {
            Some((len, offset)) => {
                out.entries.push(IndexEntry { rel: (offset - base) as u32, pos: pos as u32 });
                last = Some(offset);
                pos += len;
            }
            None => match skip_one(data, pos, base, last).or_else(|| resync(data, pos + 1, nonzero_end, base, last)) {
                Some(next) => {
                    out.corrupt.push(Corruption {
                        segment: base,
                        position: pos as u64,
                        len: (next - pos) as u64,
                        reason: damage_reason(&data[pos..]),
                    });
                    pos = next;
                }
                None => {
                    out.torn = true;
                    break;
                }
            },
        }
    }
    out.valid_end = pos as u64;
    out
}

fn damage_reason(buf: &[u8]) -> &'static str {
    match frame_len(buf) {
        Err(crate::record::FrameError::BadLength) => "record length out of range",
        Err(_) => "record cut short",
        Ok(_) => match check_frame(buf) {
            Err(_) => "record CRC32C mismatch",
            Ok(_) => "record offset out of sequence",
        },
    }
}

/// A frame at `pos` whose CRC matches and whose offset belongs here.
fn valid_frame_at(data: &[u8], pos: usize, base: u64, last: Option<u64>) -> Option<(usize, u64)> {
    let (len, offset) = check_frame(&data[pos..]).ok()?;
    let in_segment = offset >= base && offset - base <= u32::MAX as u64;
    let increasing = last.is_none_or(|l| offset > l);
    (in_segment && increasing).then_some((len, offset))
}

/// When only the body of the frame at `pos` is damaged, its length field
/// still says where the next frame starts: skip exactly that frame. Checked
/// before a byte-by-byte search so that a frame-shaped payload inside the
/// damaged record is never taken for the next record.
fn skip_one(data: &[u8], pos: usize, base: u64, last: Option<u64>) -> Option<usize> {
    let next = pos + frame_len(&data[pos..]).ok()?;
    (next < data.len() && valid_frame_at(data, next, base, last).is_some()).then_some(next)
}

/// The next position after damage, and before `before`, where a valid,
/// in-sequence frame starts.
fn resync(data: &[u8], from: usize, before: usize, base: u64, last: Option<u64>) -> Option<usize> {
    let floor = last.map_or(base, |l| l + 1);
    let end = data.len().checked_sub(FRAME_HEADER + MIN_BODY)?.min(before.checked_sub(1)?);
    (from..=end).find(|&q| {
        let off = u64::from_le_bytes(data[q + 8..q + 16].try_into().expect("8 bytes"));
        // Cheap filters first: the offset must plausibly follow the last good one.
        off >= floor && off - floor < (1 << 24) && valid_frame_at(data, q, base, last).is_some()
    })
}

/// What recovery hands to the log.
pub(crate) struct Recovered {
    pub segments: Vec<Segment>,
    pub report: RecoveryReport,
}

/// Opens or creates the log directory and brings it to a consistent state.
pub(crate) fn recover(fs: &dyn Fs, dir: &Path) -> Result<Recovered> {
    fs.create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let names = fs.list(dir).map_err(|e| Error::io("listing", dir, e))?;
    let mut report = RecoveryReport::default();

    let bases: BTreeSet<u64> = names.iter().filter_map(|n| parse_name(n, "log")).collect();
    for name in &names {
        let orphan_index = parse_name(name, "idx").is_some_and(|b| !bases.contains(&b));
        if name.ends_with(".tmp") || orphan_index {
            let path = dir.join(name);
            fs.remove(&path).map_err(|e| Error::io("removing", &path, e))?;
            report.removed_files.push(name.clone());
        }
    }

    let mut segments = Vec::with_capacity(bases.len());
    let last_base = bases.last().copied();
    for &base in &bases {
        segments.push(if Some(base) == last_base {
            recover_active(fs, dir, base, &mut report)?
        } else {
            recover_sealed(fs, dir, base, &mut report)?
        });
    }

    if segments.is_empty() {
        // A brand-new log starts at offset 0.
        segments.push(create_segment(fs, dir, 0)?);
    }
    report.segments = segments.len();
    report.records = segments.iter().map(|s| s.index.len() as u64).sum();
    for t in &report.truncated {
        tracing::warn!(segment = t.segment, at = t.at, bytes = t.bytes, "truncated a torn tail");
    }
    for c in &report.corrupt {
        tracing::warn!(
            segment = c.segment,
            position = c.position,
            len = c.len,
            reason = c.reason,
            "skipped damaged bytes"
        );
    }
    Ok(Recovered { segments, report })
}

/// Creates an empty segment file with its header, durably.
pub(crate) fn create_segment(fs: &dyn Fs, dir: &Path, base: u64) -> Result<Segment> {
    let path = segment_path(dir, base);
    let mut file = fs.open_append(&path).map_err(|e| Error::io("creating", &path, e))?;
    let header = encode_segment_header(base);
    let written = file.write_all(&header).and_then(|()| file.sync_data()).and_then(|()| fs.sync_dir(dir));
    if let Err(e) = written {
        drop(file);
        let _ = fs.remove(&path);
        return Err(Error::io("creating", &path, e));
    }
    let reader = fs.open_read(&path).map_err(|e| Error::io("opening", &path, e))?;
    Ok(Segment { base, file: reader, index: Vec::new(), len: SEGMENT_HEADER as u64 })
}

fn check_header(data: &[u8], base: u64, report: &mut RecoveryReport) {
    let reason = match check_segment_header(data) {
        Ok(b) if b == base => return,
        Ok(_) => "segment header names another base offset",
        Err(reason) => reason,
    };
    report.corrupt.push(Corruption { segment: base, position: 0, len: SEGMENT_HEADER as u64, reason });
}

fn recover_sealed(fs: &dyn Fs, dir: &Path, base: u64, report: &mut RecoveryReport) -> Result<Segment> {
    let path = segment_path(dir, base);
    let len = fs.len(&path).map_err(|e| Error::io("reading", &path, e))?;
    let file = fs.open_read(&path).map_err(|e| Error::io("opening", &path, e))?;
    let mut header = [0u8; SEGMENT_HEADER];
    if file.read_exact_at(&mut header, 0).is_err() {
        header = [0; SEGMENT_HEADER];
    }
    check_header(&header, base, report);

    let idx_path = index_path(dir, base);
    let trusted = fs.read(&idx_path).ok().and_then(|buf| decode_index(&buf, base, len).ok());
    if let Some(index) = trusted {
        return Ok(Segment { base, file, index, len });
    }
    let data = fs.read(&path).map_err(|e| Error::io("reading", &path, e))?;
    let scan = scan(&data, base);
    report.corrupt.extend(scan.corrupt);
    if scan.torn {
        // A sealed segment was fsynced whole before it was sealed, so a bad
        // tail here is damage, not a torn write: report it, keep the bytes.
        report.corrupt.push(Corruption {
            segment: base,
            position: scan.valid_end,
            len: len - scan.valid_end,
            reason: "damaged bytes at the end of a sealed segment",
        });
    }
    if let Err(e) = write_atomic(fs, dir, &index_name(base), &encode_index(base, len, &scan.entries)) {
        tracing::warn!(path = %idx_path.display(), error = %e, "could not rewrite an index; it will be rebuilt again");
    }
    report.rebuilt_indexes.push(base);
    // Readers stop where readable frames end, before any damaged tail.
    Ok(Segment { base, file, index: scan.entries, len: scan.valid_end })
}

fn recover_active(fs: &dyn Fs, dir: &Path, base: u64, report: &mut RecoveryReport) -> Result<Segment> {
    let path = segment_path(dir, base);
    let stale_index = index_path(dir, base);
    if fs.len(&stale_index).is_ok() {
        // Sealed, then the next segment was never created: appends continue
        // here, so this index would go stale.
        fs.remove(&stale_index).map_err(|e| Error::io("removing", &stale_index, e))?;
        report.removed_files.push(index_name(base));
    }
    let data = fs.read(&path).map_err(|e| Error::io("reading", &path, e))?;
    if data.len() < SEGMENT_HEADER {
        // Torn while being created: it holds no record. Start it again.
        fs.remove(&path).map_err(|e| Error::io("removing", &path, e))?;
        report.truncated.push(Truncation { segment: base, at: 0, bytes: data.len() as u64 });
        return create_segment(fs, dir, base);
    }
    check_header(&data, base, report);
    let scan = scan(&data, base);
    report.corrupt.extend(scan.corrupt);
    if scan.valid_end < data.len() as u64 {
        let mut file = fs.open_append(&path).map_err(|e| Error::io("opening", &path, e))?;
        file.set_len(scan.valid_end).and_then(|()| file.sync_data()).map_err(|e| Error::io("truncating", &path, e))?;
        if scan.torn {
            report.truncated.push(Truncation {
                segment: base,
                at: scan.valid_end,
                bytes: data.len() as u64 - scan.valid_end,
            });
        }
    }
    let file = fs.open_read(&path).map_err(|e| Error::io("opening", &path, e))?;
    Ok(Segment { base, file, index: scan.entries, len: scan.valid_end })
}
