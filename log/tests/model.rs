//! Model-based property tests on the in-memory filesystem.
//!
//! Random sequences of appends, syncs, crashes, clean reopens, reads and
//! cursor commits run against a log with small segments (so rollover and
//! retention happen often). After every step the log is compared with a
//! plain model: the acknowledged records by offset, the cursors, and the
//! highest retention floor so far.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_log::memfs::MemFs;
use ferry_log::segment::{parse_name, SEGMENT_HEADER};
use ferry_log::{Error, Fs, FsyncMode, Log, LogOptions, NewRecord, Record, RecoveryReport};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const DIR: &str = "/log";
const SEGMENT_BYTES: u64 = 2048;
/// The largest batch one append accepts with these segments.
const MAX_BATCH: usize = SEGMENT_BYTES as usize - SEGMENT_HEADER;
const CURSORS: [&str; 2] = ["forwarder", "group-a"];

fn open(fs: &MemFs, fsync: FsyncMode) -> Result<(Log, RecoveryReport), TestCaseError> {
    let opts = LogOptions { fsync, segment_bytes: SEGMENT_BYTES, ..LogOptions::default() };
    Log::open_with(Arc::new(fs.clone()) as Arc<dyn Fs>, DIR, opts)
        .map_err(|e| TestCaseError::fail(format!("opening the log failed: {e:?}")))
}

fn fail(what: &str, e: Error) -> TestCaseError {
    TestCaseError::fail(format!("{what} failed: {e:?}"))
}

/// Base offsets of the segment files in the log directory, ascending.
fn segment_bases(fs: &MemFs) -> Vec<u64> {
    let mut bases: Vec<u64> =
        fs.list(Path::new(DIR)).expect("list").iter().filter_map(|n| parse_name(n, "log")).collect();
    bases.sort_unstable();
    bases
}

fn new_record() -> impl Strategy<Value = NewRecord> {
    // Mostly small payloads, so that most batches fit a segment; sometimes
    // large ones, so that some batches are refused as too large.
    let payload = prop_oneof![3 => 0..64usize, 1 => 0..600usize].prop_flat_map(|n| vec(any::<u8>(), n));
    (
        any::<u64>(),
        "\\PC{0,12}",
        proptest::option::of("[a-z0-9]{0,8}"),
        vec(("[a-z-]{1,8}", "\\PC{0,16}"), 0..3),
        payload,
    )
        .prop_map(|(timestamp_ms, id, key, headers, payload)| NewRecord {
            timestamp_ms,
            id,
            key,
            headers,
            payload: Bytes::from(payload),
        })
}

fn batch() -> impl Strategy<Value = Vec<NewRecord>> {
    vec(new_record(), 1..5)
}

#[derive(Debug, Clone)]
enum Action {
    Append(Vec<NewRecord>),
    Sync,
    /// Power loss (the seed picks torn tails), then reopen on what survived.
    Crash(u64),
    /// Drop the log and open it again on the same filesystem.
    Reopen,
    /// `pick` chooses the start offset in `0..next_offset + 3`.
    Read {
        pick: u64,
        max_records: usize,
        max_bytes: usize,
    },
    /// `pick` chooses the value in `0..=next_offset`.
    Commit {
        cursor: usize,
        pick: u64,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => batch().prop_map(Action::Append),
        1 => Just(Action::Sync),
        2 => any::<u64>().prop_map(Action::Crash),
        1 => Just(Action::Reopen),
        3 => (any::<u64>(), 1..20usize, 0..4096usize)
            .prop_map(|(pick, max_records, max_bytes)| Action::Read { pick, max_records, max_bytes }),
        2 => (0..CURSORS.len(), any::<u64>()).prop_map(|(cursor, pick)| Action::Commit { cursor, pick }),
    ]
}

/// What the log must hold.
#[derive(Debug, Default)]
struct Model {
    /// Every acknowledged record by the offset its append returned.
    records: BTreeMap<u64, NewRecord>,
    /// One past the last acknowledged offset.
    next: u64,
    cursors: BTreeMap<String, u64>,
    /// The highest `min(cursors)` retention ever ran with: records below it
    /// may be gone, records at or after it must all be readable.
    floor: u64,
}

impl Model {
    fn min_cursor(&self) -> Option<u64> {
        self.cursors.values().copied().min()
    }

    fn retention_ran(&mut self) {
        if let Some(min) = self.min_cursor() {
            self.floor = self.floor.max(min);
        }
    }

    /// Appends `records` to the log and the model; the log must refuse a
    /// batch larger than a segment, and otherwise give the next offsets.
    fn append(&mut self, log: &Log, records: Vec<NewRecord>) -> Result<(), TestCaseError> {
        let size: usize = records.iter().map(NewRecord::encoded_len).sum();
        let result = log.append_blocking(&records);
        if size > MAX_BATCH {
            prop_assert!(matches!(result, Err(Error::TooLarge { .. })), "{size} B batch: {result:?}");
            return Ok(());
        }
        let range = result.map_err(|e| fail("append", e))?;
        let n = records.len() as u64;
        prop_assert_eq!(range.clone(), self.next..self.next + n, "offsets must continue where the log ended");
        for (offset, record) in range.clone().zip(records) {
            self.records.insert(offset, record);
        }
        self.next = range.end;
        Ok(())
    }
}

fn same(got: &Record, want: &NewRecord) -> Result<(), TestCaseError> {
    let at = got.offset;
    prop_assert_eq!(&got.id, &want.id, "id at offset {}", at);
    prop_assert_eq!(got.timestamp_ms, want.timestamp_ms, "timestamp at offset {}", at);
    prop_assert_eq!(&got.key, &want.key, "key at offset {}", at);
    prop_assert_eq!(&got.headers, &want.headers, "headers at offset {}", at);
    prop_assert_eq!(&got.payload, &want.payload, "payload at offset {}", at);
    Ok(())
}

/// Reads the whole log, batch by batch, checking every batch's shape.
fn read_all(log: &Log, next: u64) -> Result<Vec<Record>, TestCaseError> {
    let mut from = 0;
    let mut got: Vec<Record> = Vec::new();
    while from < next {
        let batch = log.read(from, 1000, 1 << 20).map_err(|e| fail("read", e))?;
        prop_assert!(batch.skipped.is_empty(), "read({}) skipped damage: {:?}", from, batch.skipped);
        let Some(last) = batch.records.last() else {
            return Err(TestCaseError::fail(format!("read({from}) returned nothing below next_offset {next}")));
        };
        prop_assert_eq!(batch.next, last.offset + 1, "read({}).next", from);
        prop_assert!(batch.next > from, "read({}) made no progress", from);
        from = batch.next;
        got.extend(batch.records);
    }
    Ok(got)
}

/// Everything that must hold between any two steps.
fn check(log: &Log, fs: &MemFs, model: &Model) -> Result<(), TestCaseError> {
    let stats = log.stats();
    prop_assert_eq!(stats.next_offset, model.next, "stats().next_offset");
    prop_assert_eq!(log.next_offset(), model.next, "next_offset()");
    prop_assert_eq!(log.cursors(), model.cursors.clone(), "cursors");

    let got = read_all(log, model.next)?;
    // Offsets are unique, dense and increasing (nothing was damaged).
    for w in got.windows(2) {
        prop_assert_eq!(w[1].offset, w[0].offset + 1, "offsets must be dense and increasing");
    }
    // Whatever is readable was acknowledged, with these exact fields.
    for r in &got {
        let Some(want) = model.records.get(&r.offset) else {
            return Err(TestCaseError::fail(format!("offset {} was never acknowledged: {r:?}", r.offset)));
        };
        same(r, want)?;
    }
    // Every acknowledged record at or after the retention floor is there.
    let start = got.first().map_or(model.next, |r| r.offset);
    prop_assert!(start <= model.floor, "records from {} on must be kept, the log starts at {}", model.floor, start);
    prop_assert_eq!(got.len() as u64, model.next - start, "records from {} up to {}", start, model.next);
    if model.cursors.is_empty() {
        prop_assert_eq!(start, 0, "with no cursor nothing may be deleted");
    }
    prop_assert_eq!(stats.start_offset, start, "stats().start_offset");
    prop_assert_eq!(stats.records, got.len() as u64, "stats().records");
    prop_assert_eq!(stats.segments, segment_bases(fs).len(), "stats().segments vs segment files");
    Ok(())
}

/// Right after retention ran (commit, open): no sealed segment whose records
/// all lie below every cursor is left. Segments are contiguous here, so a
/// sealed segment ends where the next one begins.
fn check_retention(fs: &MemFs, model: &Model) -> Result<(), TestCaseError> {
    if let Some(min) = model.min_cursor() {
        let bases = segment_bases(fs);
        for w in bases.windows(2) {
            prop_assert!(w[1] > min, "sealed segment {} ends at {} <= min cursor {} and was kept", w[0], w[1], min);
        }
    }
    Ok(())
}

fn check_read(log: &Log, model: &Model, from: u64, max_records: usize, max_bytes: usize) -> Result<(), TestCaseError> {
    let batch = log.read(from, max_records, max_bytes).map_err(|e| fail("read", e))?;
    prop_assert!(batch.skipped.is_empty(), "skipped: {:?}", batch.skipped);
    prop_assert!(batch.records.len() <= max_records, "{} records > max {}", batch.records.len(), max_records);
    if from >= model.next {
        prop_assert!(batch.records.is_empty(), "read({}) past the end returned records", from);
        prop_assert_eq!(batch.next, from);
        return Ok(());
    }
    // Reading before the oldest retained record starts at the oldest one.
    let first = from.max(log.stats().start_offset);
    prop_assert!(!batch.records.is_empty(), "read({}) below next_offset {} returned nothing", from, model.next);
    for (i, r) in batch.records.iter().enumerate() {
        prop_assert_eq!(r.offset, first + i as u64, "read({}) record {}", from, i);
        let want = model.records.get(&r.offset).ok_or_else(|| TestCaseError::fail("unacknowledged record"))?;
        same(r, want)?;
    }
    prop_assert_eq!(batch.next, first + batch.records.len() as u64);
    if batch.records.len() > 1 {
        // Past the first record, the byte limit holds.
        let bytes: usize = batch.records.iter().map(|r| model.records[&r.offset].encoded_len()).sum();
        prop_assert!(bytes <= max_bytes, "{} records of {} B > max_bytes {}", batch.records.len(), bytes, max_bytes);
    }
    Ok(())
}

fn run_always(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut fs = MemFs::new();
    let (mut log, report) = open(&fs, FsyncMode::Always)?;
    prop_assert!(report.is_clean(), "{:?}", report);
    let mut model = Model::default();
    for action in actions {
        match action {
            Action::Append(records) => model.append(&log, records)?,
            Action::Sync => log.sync_blocking().map_err(|e| fail("sync", e))?,
            Action::Crash(seed) => {
                let crashed = fs.crash(seed);
                drop(log);
                fs = crashed;
                let report;
                (log, report) = open(&fs, FsyncMode::Always)?;
                // Every acknowledged byte was synced: nothing torn, nothing damaged.
                prop_assert!(report.is_clean(), "after crash({}): {:?}", seed, report);
                model.retention_ran();
                check_retention(&fs, &model)?;
            }
            Action::Reopen => {
                drop(log);
                let report;
                (log, report) = open(&fs, FsyncMode::Always)?;
                prop_assert!(report.is_clean(), "after a clean reopen: {:?}", report);
                model.retention_ran();
                check_retention(&fs, &model)?;
            }
            Action::Read { pick, max_records, max_bytes } => {
                check_read(&log, &model, pick % (model.next + 3), max_records, max_bytes)?;
            }
            Action::Commit { cursor, pick } => {
                let at = pick % (model.next + 1);
                log.commit(CURSORS[cursor], at).map_err(|e| fail("commit", e))?;
                model.cursors.insert(CURSORS[cursor].to_owned(), at);
                model.retention_ran();
                check_retention(&fs, &model)?;
            }
        }
        check(&log, &fs, &model)?;
    }
    Ok(())
}

fn lazy_mode() -> impl Strategy<Value = FsyncMode> {
    prop_oneof![
        Just(FsyncMode::Never),
        Just(FsyncMode::Interval(Duration::from_millis(1))),
        Just(FsyncMode::Interval(Duration::from_secs(3600))),
    ]
}

fn run_lazy(
    mode: FsyncMode,
    before: Vec<Vec<NewRecord>>,
    after: Vec<Vec<NewRecord>>,
    seed: u64,
) -> Result<(), TestCaseError> {
    let fs = MemFs::new();
    let (log, _) = open(&fs, mode)?;
    let mut model = Model::default();
    for records in before {
        model.append(&log, records)?;
    }
    log.sync_blocking().map_err(|e| fail("sync", e))?;
    let synced = model.next;
    for records in after {
        model.append(&log, records)?;
    }
    let crashed = fs.crash(seed);
    drop(log);

    let (log, report) = open(&crashed, mode)?;
    prop_assert!(report.corrupt.is_empty(), "a torn tail is not damage: {:?}", report);
    // What survived is a prefix of the acknowledged records, and holds at
    // least everything acknowledged before the sync.
    let survived = log.next_offset();
    prop_assert!(survived >= synced, "synced up to {}, only {} survived: {:?}", synced, survived, report);
    prop_assert!(survived <= model.next, "{} survived but only {} were acknowledged", survived, model.next);
    let got = read_all(&log, survived)?;
    prop_assert_eq!(got.len() as u64, survived);
    for (i, r) in got.iter().enumerate() {
        prop_assert_eq!(r.offset, i as u64);
        same(r, &model.records[&r.offset])?;
    }
    // The log goes on where the survivors end.
    let range: Range<u64> =
        log.append_blocking(&[NewRecord::new("after", &b"x"[..])]).map_err(|e| fail("append", e))?;
    prop_assert_eq!(range, survived..survived + 1);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn with_fsync_always_every_acknowledged_record_outlives_crashes_reopens_and_retention(
        actions in vec(action(), 1..40),
    ) {
        run_always(actions)?;
    }

    #[test]
    fn with_lazy_fsync_every_record_acknowledged_before_a_sync_survives_a_crash(
        mode in lazy_mode(),
        before in vec(batch(), 0..12),
        after in vec(batch(), 0..6),
        seed in any::<u64>(),
    ) {
        run_lazy(mode, before, after, seed)?;
    }
}
