//! Damaged files on the real filesystem: torn tails, flipped bits, zeroed
//! lengths, missing or damaged indexes and a damaged cursor file. Each test
//! damages a copy of a log written by the log itself, reopens it and checks
//! both what reads return and what the `RecoveryReport` says.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_log::segment::{index_path, parse_name, segment_path, INDEX_HEADER, SEGMENT_HEADER};
use ferry_log::{Corruption, Log, LogOptions, NewRecord, Record, RecoveryReport, Truncation};
use tempfile::TempDir;

/// Small segments so a few dozen records make several sealed segments.
fn opts() -> LogOptions {
    LogOptions { segment_bytes: 1024, ..LogOptions::default() }
}

fn payload(i: u64) -> Vec<u8> {
    format!("payload-{i}-").repeat(1 + (i % 4) as usize).into_bytes()
}

/// Record `i`: its id, payload, key and headers all derive from `i`.
fn rec(i: u64) -> NewRecord {
    let mut r = NewRecord::new(format!("id-{i}"), payload(i));
    // Even records have a key, every third one a header.
    if matches!(i % 6, 0 | 2 | 4) {
        r = r.with_key(format!("k{}", i % 5));
    }
    if matches!(i % 6, 0 | 3) {
        r = r.with_header("h", format!("v{i}"));
    }
    r
}

/// Asserts that `r` is record `i` exactly as appended.
fn check(r: &Record, i: u64) {
    let want = rec(i);
    assert_eq!(r.offset, i);
    assert_eq!(r.id, want.id, "offset {i}");
    assert_eq!(r.payload, want.payload, "offset {i}");
    assert_eq!(r.key, want.key, "offset {i}");
    assert_eq!(r.headers, want.headers, "offset {i}");
}

/// Base offsets of the segment files in `dir`, oldest first.
fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> =
        fs::read_dir(dir).unwrap().filter_map(|e| parse_name(e.unwrap().file_name().to_str()?, "log")).collect();
    bases.sort_unstable();
    bases
}

/// A frame found by walking a segment file: its record offset, byte position and length.
#[derive(Debug, Clone, Copy)]
struct Frame {
    offset: u64,
    pos: usize,
    len: usize,
}

/// Walks the frames of an undamaged segment file by their length fields.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER;
    while pos < bytes.len() {
        let body = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let offset = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        out.push(Frame { offset, pos, len: 8 + body });
        pos += 8 + body;
    }
    assert_eq!(pos, bytes.len(), "frames must tile the segment file");
    out
}

/// Writes records `0..n` into a fresh log in `dir`, one append each, until
/// there are more than `sealed` sealed segments and the active one holds at
/// least `active` records. Returns `n`.
fn build(dir: &Path, sealed: usize, active: u64) -> u64 {
    let (log, report) = Log::open(dir, opts()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let mut n = 0;
    loop {
        let bases = segment_bases(dir);
        if bases.len() > sealed && n - bases.last().unwrap() >= active {
            break;
        }
        assert_eq!(log.append_blocking(&[rec(n)]).unwrap(), n..n + 1);
        n += 1;
    }
    n
}

/// A copy of every file of `from` in a new temporary directory.
fn copy_dir(from: &Path) -> TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
    }
    to
}

fn flip_bit(path: &Path, byte: usize, bit: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[byte] ^= 1 << bit;
    fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

/// Reads the whole log from offset 0 in small batches: the records, and
/// every damaged record the reads skipped.
fn read_all(log: &Log) -> (Vec<Record>, Vec<Corruption>) {
    let (mut records, mut skipped) = (Vec::new(), Vec::new());
    let mut from = 0;
    while from < log.next_offset() {
        let batch = log.read(from, 4, 1 << 20).unwrap();
        assert!(batch.next > from, "a read from {from} must make progress");
        records.extend(batch.records);
        skipped.extend(batch.skipped);
        from = batch.next;
    }
    (records, skipped)
}

/// Asserts that the log holds exactly the records `offsets`, intact, and
/// that reading them skipped nothing.
fn assert_readable(log: &Log, offsets: impl IntoIterator<Item = u64>) {
    let (records, skipped) = read_all(log);
    assert!(skipped.is_empty(), "{skipped:?}");
    let want: Vec<u64> = offsets.into_iter().collect();
    let got: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(got, want);
    for r in &records {
        check(r, r.offset);
    }
}

/// Appends record `n`, checks it gets offset `n` and reads back.
fn assert_appends_at(log: &Log, n: u64) {
    assert_eq!(log.append_blocking(&[rec(n)]).unwrap(), n..n + 1);
    let batch = log.read(n, 1, 1 << 20).unwrap();
    assert_eq!(batch.records.len(), 1, "{batch:?}");
    check(&batch.records[0], n);
    assert_eq!(batch.next, n + 1);
}

fn assert_no_repairs(report: &RecoveryReport) {
    assert!(report.truncated.is_empty(), "{report:?}");
    assert!(report.rebuilt_indexes.is_empty(), "{report:?}");
    assert!(report.cursors_damaged.is_none(), "{report:?}");
    assert!(report.removed_files.is_empty(), "{report:?}");
}

#[test]
fn a_torn_tail_is_cut_at_every_byte_of_the_last_three_records() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 3, 4);
    let base = *segment_bases(pristine.path()).last().unwrap();
    let bytes = fs::read(segment_path(pristine.path(), base)).unwrap();
    let all = frames(&bytes);
    assert_eq!(all.last().unwrap().offset, n - 1);
    let first_cut = all[all.len() - 3].pos;

    for cut in first_cut..bytes.len() {
        let dir = copy_dir(pristine.path());
        let seg = segment_path(dir.path(), base);
        truncate(&seg, cut as u64);
        // Records whose frame ends at or before the cut survive whole.
        let survivors: Vec<&Frame> = all.iter().filter(|f| f.pos + f.len <= cut).collect();
        let kept = survivors.last().map_or(base, |f| f.offset + 1);
        let at = survivors.last().map_or(SEGMENT_HEADER, |f| f.pos + f.len) as u64;
        {
            let (log, report) = Log::open(dir.path(), opts()).unwrap();
            let want = if at == cut as u64 {
                // Cut exactly between two frames: nothing is torn.
                vec![]
            } else {
                vec![Truncation { segment: base, at, bytes: cut as u64 - at }]
            };
            assert_eq!(report.truncated, want, "cut at {cut}");
            assert!(report.corrupt.is_empty(), "cut at {cut}: {report:?}");
            assert!(report.rebuilt_indexes.is_empty(), "cut at {cut}: {report:?}");
            assert_eq!(report.records, kept, "cut at {cut}");
            assert_eq!(fs::metadata(&seg).unwrap().len(), at, "cut at {cut}: the file is cut on disk");
            assert_eq!(log.next_offset(), kept, "cut at {cut}");
            assert_readable(&log, 0..kept);
            assert_appends_at(&log, kept);
        }
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert!(report.is_clean(), "cut at {cut}: {report:?}");
        assert_readable(&log, 0..=kept);
    }
}

#[test]
fn a_flipped_bit_in_a_segment_header_is_reported_and_the_records_stay_readable() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 3, 3);
    let bases = segment_bases(pristine.path());
    // A sealed segment (read through its index) and the active one (scanned).
    for base in [bases[1], *bases.last().unwrap()] {
        // Magic, version, reserved, base offset, CRC.
        for byte in [0, 7, 8, 11, 12, 19, 20, 23] {
            let dir = copy_dir(pristine.path());
            flip_bit(&segment_path(dir.path(), base), byte, (byte % 8) as u8);
            let (log, report) = Log::open(dir.path(), opts()).unwrap();
            let reason = if byte < 8 { "bad segment magic" } else { "segment header CRC32C mismatch" };
            let header = Corruption { segment: base, position: 0, len: SEGMENT_HEADER as u64, reason };
            assert_eq!(report.corrupt, vec![header], "segment {base}, byte {byte}");
            assert_no_repairs(&report);
            assert_eq!(report.records, n);
            assert_readable(&log, 0..n);
            assert_appends_at(&log, n);
        }
    }
}

#[test]
fn a_flipped_bit_in_any_byte_of_a_record_of_the_active_segment_is_reported_and_skipped() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 2, 5);
    let base = *segment_bases(pristine.path()).last().unwrap();
    let active = frames(&fs::read(segment_path(pristine.path(), base)).unwrap());
    let victim = active[active.len() / 2];
    assert!(victim.offset > base && victim.offset < n - 1, "a record in the middle: {victim:?}");

    for byte in victim.pos..victim.pos + victim.len {
        let dir = copy_dir(pristine.path());
        flip_bit(&segment_path(dir.path(), base), byte, (byte % 8) as u8);
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(report.corrupt.len(), 1, "byte {byte}: {report:?}");
        let c = &report.corrupt[0];
        assert_eq!((c.segment, c.position, c.len), (base, victim.pos as u64, victim.len as u64), "byte {byte}");
        if byte >= victim.pos + 4 {
            assert_eq!(c.reason, "record CRC32C mismatch", "byte {byte}");
        } else {
            // A flipped length may be out of range, run past the file end or just be wrong.
            let reasons = ["record length out of range", "record cut short", "record CRC32C mismatch"];
            assert!(reasons.contains(&c.reason), "byte {byte}: {}", c.reason);
        }
        assert_no_repairs(&report);
        assert_eq!(report.records, n - 1);
        assert_eq!(log.next_offset(), n);
        assert_readable(&log, (0..n).filter(|&o| o != victim.offset));
        // Reading from the lost offset starts at the record after it.
        let batch = log.read(victim.offset, 1, 1 << 20).unwrap();
        assert_eq!(batch.records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![victim.offset + 1]);
        assert_appends_at(&log, n);
    }
}

#[test]
fn a_zeroed_length_field_in_the_active_segment_is_skipped_by_resync() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 2, 5);
    let base = *segment_bases(pristine.path()).last().unwrap();
    let active = frames(&fs::read(segment_path(pristine.path(), base)).unwrap());
    for victim in &active[1..active.len() - 1] {
        let dir = copy_dir(pristine.path());
        let seg = segment_path(dir.path(), base);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[victim.pos..victim.pos + 4].fill(0);
        fs::write(&seg, bytes).unwrap();
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        let want = Corruption {
            segment: base,
            position: victim.pos as u64,
            len: victim.len as u64,
            reason: "record length out of range",
        };
        assert_eq!(report.corrupt, vec![want], "{victim:?}");
        assert_no_repairs(&report);
        assert_eq!(report.records, n - 1);
        assert_readable(&log, (0..n).filter(|&o| o != victim.offset));
        assert_appends_at(&log, n);
    }
}

#[test]
fn a_flipped_bit_in_a_record_of_a_sealed_segment_is_skipped_by_read_not_at_open() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 3, 1);
    let base = segment_bases(pristine.path())[1];
    let sealed = frames(&fs::read(segment_path(pristine.path(), base)).unwrap());
    let victim = sealed[sealed.len() / 2];
    let dir = copy_dir(pristine.path());
    // The last payload byte.
    flip_bit(&segment_path(dir.path(), base), victim.pos + victim.len - 1, 3);

    let (log, report) = Log::open(dir.path(), opts()).unwrap();
    // The index is trusted, so opening does not read the record.
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, n);
    let (records, skipped) = read_all(&log);
    let want = Corruption {
        segment: base,
        position: victim.pos as u64,
        len: victim.len as u64,
        reason: "record CRC32C mismatch on read",
    };
    assert_eq!(skipped, vec![want.clone()]);
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..n).filter(|&o| o != victim.offset).collect::<Vec<_>>());
    for r in &records {
        check(r, r.offset);
    }
    // A reader going one record at a time gets past it.
    let batch = log.read(victim.offset, 1, 1 << 20).unwrap();
    assert!(batch.records.is_empty(), "{batch:?}");
    assert_eq!(batch.skipped, vec![want.clone()]);
    assert_eq!(batch.next, victim.offset + 1);
    // Its neighbours come back around it in one batch.
    let batch = log.read(victim.offset - 1, 3, 1 << 20).unwrap();
    let got: Vec<u64> = batch.records.iter().map(|r| r.offset).collect();
    assert_eq!(got, vec![victim.offset - 1, victim.offset + 1]);
    assert_eq!(batch.skipped, vec![want]);
    assert_appends_at(&log, n);
}

#[test]
fn a_flipped_bit_in_any_covered_byte_of_an_index_file_makes_recovery_rebuild_it() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 3, 1);
    let base = segment_bases(pristine.path())[1];
    let original = fs::read(index_path(pristine.path(), base)).unwrap();
    assert!(original.len() > INDEX_HEADER, "the index has entries");

    for byte in 0..original.len() {
        let dir = copy_dir(pristine.path());
        let idx = index_path(dir.path(), base);
        flip_bit(&idx, byte, (byte % 8) as u8);
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        if (36..40).contains(&byte) {
            // Reserved bytes, outside the CRC by design: the index stays
            // trusted, and nothing it says changed.
            assert!(report.is_clean(), "byte {byte}: {report:?}");
        } else {
            assert_eq!(report.rebuilt_indexes, vec![base], "byte {byte}");
            assert!(report.corrupt.is_empty(), "byte {byte}: {report:?}");
            assert!(report.truncated.is_empty(), "byte {byte}: {report:?}");
            assert_eq!(fs::read(&idx).unwrap(), original, "byte {byte}: rewritten as it was");
        }
        assert_eq!(report.records, n, "byte {byte}");
        assert_readable(&log, 0..n);
        drop(log);
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert!(report.is_clean(), "byte {byte}: {report:?}");
        assert_readable(&log, 0..n);
    }
}

#[test]
fn a_missing_index_of_a_sealed_segment_is_rebuilt() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 4, 1);
    let bases = segment_bases(pristine.path());
    let sealed = &bases[..bases.len() - 1];
    // One index in the middle, then every index.
    for missing in [vec![sealed[2]], sealed.to_vec()] {
        let dir = copy_dir(pristine.path());
        for &b in &missing {
            fs::remove_file(index_path(dir.path(), b)).unwrap();
        }
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(report.rebuilt_indexes, missing);
        assert!(report.corrupt.is_empty(), "{report:?}");
        assert!(report.truncated.is_empty(), "{report:?}");
        assert_eq!(report.records, n);
        assert_readable(&log, 0..n);
        for &b in &missing {
            let rebuilt = fs::read(index_path(dir.path(), b)).expect("the index file exists again");
            assert_eq!(rebuilt, fs::read(index_path(pristine.path(), b)).unwrap(), "index {b}");
        }
        assert_appends_at(&log, n);
        drop(log);
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_readable(&log, 0..=n);
    }
}

#[test]
fn a_damaged_cursor_file_is_reported_and_ignored_and_nothing_is_deleted() {
    let pristine = tempfile::tempdir().unwrap();
    let n = build(pristine.path(), 5, 1);
    let bases = segment_bases(pristine.path());
    {
        let (log, _) = Log::open(pristine.path(), opts()).unwrap();
        // Retention deletes the two oldest segments now.
        log.commit("fwd", bases[2] + 1).unwrap();
    }
    let kept = segment_bases(pristine.path());
    assert_eq!(kept, bases[2..], "retention ran on commit");
    let names = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().path().strip_prefix(dir).unwrap().into()).collect();
        v.sort();
        v
    };
    let files = names(pristine.path());
    let good = fs::read(pristine.path().join("cursors")).unwrap();
    // magic 8 | version 2 | count 2 | name_len 2 | "fwd" | value 8 | crc 4
    assert_eq!(good.len(), 8 + 2 + 2 + 2 + 3 + 8 + 4);

    let mut huge = good.clone();
    huge[17 + 7] ^= 0x40; // the value's top byte: past every segment if trusted
    let damages: [(&str, Vec<u8>, &str); 4] = [
        ("a flipped bit in the value", huge, "cursor file CRC32C mismatch"),
        ("a cut-off CRC", good[..good.len() - 1].to_vec(), "cursor file CRC32C mismatch"),
        ("zeroes", vec![0; good.len()], "bad cursor file magic"),
        ("an empty file", vec![], "bad cursor file magic"),
    ];
    for (what, bytes, reason) in damages {
        let dir = copy_dir(pristine.path());
        fs::write(dir.path().join("cursors"), bytes).unwrap();
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(report.cursors_damaged, Some(reason), "{what}");
        assert!(report.corrupt.is_empty() && report.truncated.is_empty(), "{what}: {report:?}");
        assert!(report.rebuilt_indexes.is_empty() && report.removed_files.is_empty(), "{what}: {report:?}");
        assert!(log.cursors().is_empty(), "{what}: {:?}", log.cursors());
        assert_eq!(log.cursor("fwd"), None, "{what}");
        assert_eq!(names(dir.path()), files, "{what}: nothing deleted");
        assert_eq!(log.stats().start_offset, kept[0], "{what}");
        assert_readable(&log, kept[0]..n);
    }
}

/// Two kinds of damage at once: the last record of the last sealed segment
/// is damaged and its index is missing (so recovery scans it and its
/// readable records end one offset early), and the active segment holds
/// only a torn first frame (so it is empty after recovery). Reading from
/// the lost offset must skip ahead, not panic.
#[test]
fn a_read_from_a_gap_before_an_empty_active_segment_returns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Append until a segment has just been started by one record.
    let n = {
        let (log, _) = Log::open(dir.path(), opts()).unwrap();
        let mut n = 0;
        while segment_bases(dir.path()).len() < 3 || n != *segment_bases(dir.path()).last().unwrap() + 1 {
            log.append_blocking(&[rec(n)]).unwrap();
            n += 1;
        }
        n
    };
    let bases = segment_bases(dir.path());
    let (sealed, active) = (bases[bases.len() - 2], bases[bases.len() - 1]);
    assert_eq!(active, n - 1);
    let sealed_frames = frames(&fs::read(segment_path(dir.path(), sealed)).unwrap());
    let last = *sealed_frames.last().unwrap();
    assert_eq!(last.offset, n - 2);
    flip_bit(&segment_path(dir.path(), sealed), last.pos + last.len - 1, 0);
    fs::remove_file(index_path(dir.path(), sealed)).unwrap();
    truncate(&segment_path(dir.path(), active), SEGMENT_HEADER as u64 + 10);

    let (log, report) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(report.rebuilt_indexes, vec![sealed]);
    assert_eq!(report.truncated, vec![Truncation { segment: active, at: SEGMENT_HEADER as u64, bytes: 10 }]);
    let tail = Corruption {
        segment: sealed,
        position: last.pos as u64,
        len: last.len as u64,
        reason: "damaged bytes at the end of a sealed segment",
    };
    assert_eq!(report.corrupt, vec![tail]);
    assert_eq!(log.next_offset(), n - 1);
    let batch = log.read(n - 2, 10, 1 << 20).unwrap();
    assert!(batch.records.is_empty(), "{batch:?}");
    assert!(batch.next >= n - 1, "{batch:?}");
    assert_readable(&log, 0..n - 2);
    assert_appends_at(&log, n - 1);
}

/// An app's payload can hold anything, including the bytes of a valid frame.
/// When the record carrying it is damaged, recovery resynchronises byte by
/// byte and must not take that embedded frame for a record of the log.
#[test]
fn a_frame_inside_a_damaged_records_payload_is_not_taken_for_a_record() {
    const K: u64 = 3;
    let whole = LogOptions::default();
    // A frame with offset K + 1 and a valid CRC32C, made by a scratch log.
    let forged = {
        let scratch = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(scratch.path(), whole.clone()).unwrap();
        for i in 0..=K {
            log.append_blocking(&[rec(i)]).unwrap();
        }
        assert_eq!(log.append_blocking(&[NewRecord::new("forged", &b"forged payload"[..])]).unwrap().start, K + 1);
        drop(log);
        let bytes = fs::read(segment_path(scratch.path(), 0)).unwrap();
        let f = *frames(&bytes).last().unwrap();
        bytes[f.pos..f.pos + f.len].to_vec()
    };
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(dir.path(), whole.clone()).unwrap();
        for i in 0..K {
            log.append_blocking(&[rec(i)]).unwrap();
        }
        log.append_blocking(&[NewRecord::new("carrier", forged)]).unwrap();
        for i in K + 1..K + 5 {
            assert_eq!(log.append_blocking(&[rec(i)]).unwrap().start, i);
        }
    }
    let seg = segment_path(dir.path(), 0);
    let carrier = frames(&fs::read(&seg).unwrap())[K as usize];
    flip_bit(&seg, carrier.pos + 4, 0); // the carrier's CRC

    let (log, report) = Log::open(dir.path(), whole).unwrap();
    let records = read_all(&log).0;
    let got: Vec<(u64, &str)> = records.iter().map(|r| (r.offset, r.id.as_str())).collect();
    assert!(!got.iter().any(|&(_, id)| id == "forged"), "a forged record was recovered: {got:?}");
    let want = Corruption {
        segment: 0,
        position: carrier.pos as u64,
        len: carrier.len as u64,
        reason: "record CRC32C mismatch",
    };
    assert_eq!(report.corrupt, vec![want]);
    assert_readable(&log, (0..K + 5).filter(|&o| o != K));
}

#[test]
fn a_cursor_past_a_lost_tail_is_moved_back_to_the_end_so_new_records_are_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let n = build(dir.path(), 1, 4);
    {
        let (log, _) = Log::open(dir.path(), opts()).unwrap();
        // A forwarder passed every record (with fsync off, it could pass
        // records that a crash then takes away).
        log.commit("forwarded", n).unwrap();
        log.commit("behind", 1).unwrap();
    }
    let base = *segment_bases(dir.path()).last().unwrap();
    let seg = segment_path(dir.path(), base);
    let all = frames(&fs::read(&seg).unwrap());
    // The last two records are lost, cut exactly between frames.
    truncate(&seg, all[all.len() - 2].pos as u64);
    let kept = n - 2;
    {
        let (log, report) = Log::open(dir.path(), opts()).unwrap();
        assert_eq!(log.next_offset(), kept);
        assert_eq!(report.cursors_past_end.get("forwarded"), Some(&n), "{report:?}");
        assert!(!report.cursors_past_end.contains_key("behind"), "{report:?}");
        assert!(!report.is_clean());
        assert_eq!(log.cursor("forwarded"), Some(kept));
        assert_eq!(log.cursor("behind"), Some(1), "a cursor within the log is left alone");
        // A new record takes a lost record's offset: reading from the
        // cursor must find it.
        assert_eq!(log.append_blocking(&[rec(kept)]).unwrap(), kept..kept + 1);
        let batch = log.read(log.cursor("forwarded").unwrap(), 8, 1 << 20).unwrap();
        assert_eq!(batch.records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![kept]);
    }
    // The move was durable: a reopen with no commit since still finds the
    // cursor at the new record.
    let (log, report) = Log::open(dir.path(), opts()).unwrap();
    assert!(report.cursors_past_end.is_empty(), "{report:?}");
    assert_eq!(log.cursor("forwarded"), Some(kept));
}
