//! Injected I/O errors (through `MemFs`): a full disk, a failed `fdatasync`,
//! `EIO`, and a failure in the middle of a group commit. Each test checks
//! the error the caller gets, that nothing unacknowledged became readable,
//! that earlier records are intact, whether the log goes on working, and
//! that a reopen — clean or after a power loss — shows exactly the
//! acknowledged records.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use ferry_log::fs::{AppendFile, ReadAt};
use ferry_log::memfs::{Fault, MemFs};
use ferry_log::segment::{index_name, segment_name, INDEX_ENTRY, INDEX_HEADER, SEGMENT_HEADER};
use ferry_log::{Error, Fs, FsyncMode, Log, LogOptions, NewRecord, Record, RecoveryReport};

const DIR: &str = "/log";
/// Crash seeds: 0 keeps no unsynced byte, the others keep various prefixes.
const SEEDS: [u64; 4] = [0, 1, 0x5eed, u64::MAX];

fn always() -> LogOptions {
    LogOptions { fsync: FsyncMode::Always, segment_bytes: 1024, ..LogOptions::default() }
}

fn open_on(fs: Arc<dyn Fs>, opts: LogOptions) -> (Log, RecoveryReport) {
    Log::open_with(fs, DIR, opts).expect("open")
}

fn open(fs: &MemFs, opts: LogOptions) -> (Log, RecoveryReport) {
    open_on(Arc::new(fs.clone()) as Arc<dyn Fs>, opts)
}

/// A record whose encoded size is exactly `size` bytes (at least 32).
fn rec(i: u64, size: usize) -> NewRecord {
    let id = format!("id-{i:04}");
    let fixed = NewRecord { id: id.clone(), ..NewRecord::default() }.encoded_len();
    let payload: Vec<u8> = (0..size - fixed).map(|b| (b as u64 * 31 + i) as u8).collect();
    let r =
        NewRecord { timestamp_ms: 1_700_000_000_000 + i, id, key: None, headers: Vec::new(), payload: payload.into() };
    assert_eq!(r.encoded_len(), size);
    r
}

/// The acknowledged records, by offset.
type Acked = BTreeMap<u64, NewRecord>;

fn append(log: &Log, acked: &mut Acked, records: Vec<NewRecord>) -> Range<u64> {
    let range = log.append_blocking(&records).expect("append");
    assert_eq!(range.end - range.start, records.len() as u64);
    acked.extend(range.clone().zip(records));
    range
}

/// Every file of the log directory with its live bytes.
fn files(fs: &MemFs) -> BTreeMap<String, Vec<u8>> {
    fs.list(Path::new(DIR))
        .expect("list")
        .into_iter()
        .map(|name| {
            let bytes = fs.contents(&Path::new(DIR).join(&name)).expect("listed file");
            (name, bytes)
        })
        .collect()
}

/// The segment files only.
fn segments(fs: &MemFs) -> BTreeMap<String, Vec<u8>> {
    files(fs).into_iter().filter(|(name, _)| name.ends_with(".log")).collect()
}

/// Live bytes of all files.
fn used(fs: &MemFs) -> u64 {
    files(fs).values().map(|b| b.len() as u64).sum()
}

fn read_all(log: &Log) -> Vec<Record> {
    let mut from = 0;
    let mut got = Vec::new();
    while from < log.next_offset() {
        let batch = log.read(from, 1000, 1 << 20).expect("read");
        assert!(batch.skipped.is_empty(), "read({from}) skipped damage: {:?}", batch.skipped);
        assert!(batch.next > from, "read({from}) made no progress: {batch:?}");
        from = batch.next;
        got.extend(batch.records);
    }
    got
}

/// The log holds exactly the acknowledged records, field for field.
fn assert_exactly(log: &Log, acked: &Acked) {
    let got = read_all(log);
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, acked.keys().copied().collect::<Vec<_>>(), "readable offsets");
    for r in &got {
        let want = &acked[&r.offset];
        assert_eq!(r.id, want.id, "id at {}", r.offset);
        assert_eq!(r.timestamp_ms, want.timestamp_ms, "timestamp at {}", r.offset);
        assert_eq!(r.key, want.key, "key at {}", r.offset);
        assert_eq!(r.headers, want.headers, "headers at {}", r.offset);
        assert_eq!(r.payload, want.payload, "payload at {}", r.offset);
    }
    let next = acked.last_key_value().map_or(0, |(o, _)| o + 1);
    assert_eq!(log.next_offset(), next, "next_offset");
    assert_eq!(log.stats().records, acked.len() as u64, "stats().records");
}

/// Opening `fs` finds nothing torn or damaged and exactly `acked`; the
/// reopened log takes the next append at the next offset.
fn assert_reopens_exactly(fs: &MemFs, opts: LogOptions, acked: &Acked) {
    let (log, report) = open(fs, opts);
    assert!(report.truncated.is_empty() && report.corrupt.is_empty(), "{report:?}");
    if log.cursors().is_empty() {
        // (With cursors, retention may delete recovered segments after this count.)
        assert_eq!(report.records, acked.len() as u64, "{report:?}");
    }
    assert_exactly(&log, acked);
    let next = log.next_offset();
    assert_eq!(log.append_blocking(&[rec(999, 64)]).expect("append after reopen"), next..next + 1);
}

/// Power loss now, with each seed: every crashed copy reopens to exactly `acked`.
fn assert_crash_keeps_exactly(fs: &MemFs, opts: &LogOptions, acked: &Acked) {
    for seed in SEEDS {
        assert_reopens_exactly(&fs.crash(seed), opts.clone(), acked);
    }
}

/// A log on a fresh [`MemFs`] (fsync always) holding records 0..3 of 100 B.
fn three_records() -> (MemFs, Log, Acked) {
    let fs = MemFs::new();
    let (log, _) = open(&fs, always());
    let mut acked = Acked::new();
    for i in 0..3 {
        append(&log, &mut acked, vec![rec(i, 100)]);
    }
    (fs, log, acked)
}

/// `log` holds exactly `acked`, a power loss keeps exactly that, and a
/// clean reopen (nothing to repair; `why` says why that is expected) finds it.
fn assert_kept_and_reopens_clean(fs: &MemFs, log: Log, acked: &Acked, why: &str) {
    assert_exactly(&log, acked);
    assert_crash_keeps_exactly(fs, &always(), acked);
    drop(log);
    let (log, report) = open(fs, always());
    assert!(report.is_clean(), "{why} {report:?}");
    assert_exactly(&log, acked);
}

fn seg_path(base: u64) -> PathBuf {
    Path::new(DIR).join(segment_name(base))
}

#[test]
fn a_write_failing_with_enospc_changes_nothing_and_the_log_stays_usable() {
    a_write_failing_for_room_changes_nothing_and_the_log_stays_usable(io::ErrorKind::StorageFull);
}

/// A full quota (EDQUOT, on a quota'd volume) is a full disk too: retryable,
/// `NoSpace` (the sidecar answers 507 and gives up replay windows for room).
#[test]
fn a_write_failing_with_edquot_is_no_space_and_changes_nothing() {
    a_write_failing_for_room_changes_nothing_and_the_log_stays_usable(io::ErrorKind::QuotaExceeded);
}

fn a_write_failing_for_room_changes_nothing_and_the_log_stays_usable(kind: io::ErrorKind) {
    let fs = MemFs::new();
    let (log, _) = open(&fs, always());
    let mut acked = Acked::new();
    for i in 0..5 {
        append(&log, &mut acked, vec![rec(i, 100)]);
    }
    let before = files(&fs);
    let stats = log.stats();

    fs.inject(Fault::Write(kind));
    let err = log.append_blocking(&[rec(5, 100), rec(6, 100)]).expect_err("the write fails");
    assert!(matches!(&err, Error::NoSpace { path, .. } if *path == seg_path(0)), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(files(&fs), before, "a refused append must not change any file");
    assert_eq!(log.stats(), stats);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);

    // The same log takes the same append once the disk has room again,
    // at the offsets the failed one did not use.
    assert_eq!(append(&log, &mut acked, vec![rec(5, 100), rec(6, 100)]), 5..7);
    assert_kept_and_reopens_clean(&fs, log, &acked, "");
}

#[test]
fn a_write_cut_short_by_a_full_disk_is_rolled_back_and_appends_resume_once_space_returns() {
    let (fs, log, mut acked) = three_records();
    let before = files(&fs);
    let stats = log.stats();

    // Room for 100 of the 500 bytes: the write lands partly, then ENOSPC.
    fs.set_capacity(Some(used(&fs) + 100));
    for _ in 0..2 {
        let err = log.append_blocking(&[rec(3, 500)]).expect_err("the disk is full");
        assert!(matches!(&err, Error::NoSpace { path, .. } if *path == seg_path(0)), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(files(&fs), before, "the partial write must be cut off again");
        assert_eq!(log.stats(), stats);
        assert_exactly(&log, &acked);
        assert_crash_keeps_exactly(&fs, &always(), &acked);
    }

    fs.set_capacity(None);
    assert_eq!(append(&log, &mut acked, vec![rec(3, 500)]), 3..4);
    assert_kept_and_reopens_clean(&fs, log, &acked, "");
}

#[test]
fn running_out_of_space_while_starting_a_new_segment_fails_the_append_and_changes_no_segment() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, always());
    let mut acked = Acked::new();
    let mut i = 0;
    while log.stats().bytes + 200 <= always().segment_bytes {
        append(&log, &mut acked, vec![rec(i, 200)]);
        i += 1;
    }
    let before = segments(&fs);
    let stats = log.stats();
    assert_eq!(stats.segments, 1);

    // Not a byte free: neither the index of the full segment nor the next
    // segment's header can be written.
    fs.set_capacity(Some(used(&fs)));
    let err = log.append_blocking(&[rec(i, 200)]).expect_err("the disk is full");
    assert!(matches!(err, Error::NoSpace { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(segments(&fs), before, "no segment may change or appear");
    assert_eq!(log.stats(), stats);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);

    fs.set_capacity(None);
    assert_eq!(append(&log, &mut acked, vec![rec(i, 200)]), i..i + 1);
    assert_eq!(log.stats().segments, 2, "the retried append starts the next segment");
    assert_kept_and_reopens_clean(&fs, log, &acked, "the full segment's index was written on the retry");
}

#[test]
fn an_append_failing_just_after_a_rollover_leaves_an_empty_segment_that_reads_and_retention_handle() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, always());
    let mut acked = Acked::new();
    let mut i = 0;
    while log.stats().bytes + 200 <= always().segment_bytes {
        append(&log, &mut acked, vec![rec(i, 200)]);
        i += 1;
    }
    let n = i;
    // Room for the sealed segment's index and the new segment's header,
    // but not for the record.
    let index_len = (INDEX_HEADER + INDEX_ENTRY * n as usize) as u64;
    fs.set_capacity(Some(used(&fs) + index_len + SEGMENT_HEADER as u64 + 10));
    let err = log.append_blocking(&[rec(n, 200)]).expect_err("the disk is full");
    assert!(matches!(&err, Error::NoSpace { path, .. } if *path == seg_path(n)), "{err:?}");
    let names: Vec<String> = files(&fs).into_keys().collect();
    assert_eq!(names, [index_name(0), segment_name(0), segment_name(n)], "the rollover itself succeeded");
    assert_eq!(fs.contents(&seg_path(n)).map(|b| b.len()), Some(SEGMENT_HEADER), "the new segment holds no record");
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);

    // Space comes back and every record is done: retention deletes the full
    // segment, and the empty one is all that is left.
    fs.set_capacity(None);
    log.commit("fwd", n).unwrap();
    acked.clear();
    let stats = log.stats();
    assert_eq!((stats.segments, stats.records, stats.start_offset, stats.next_offset), (1, 0, n, n), "{stats:?}");
    // Reading from before the oldest retained record starts at the oldest
    // one: here there is none, so the batch is empty.
    for from in [0, n - 1, n, n + 5] {
        let batch = log.read(from, 10, 1 << 20).expect("read");
        assert!(batch.records.is_empty() && batch.skipped.is_empty(), "read({from}): {batch:?}");
        assert_eq!(batch.next, from.max(n), "read({from}).next");
    }

    assert_eq!(append(&log, &mut acked, vec![rec(n, 200)]), n..n + 1);
    let batch = log.read(0, 10, 1 << 20).expect("read");
    assert_eq!(batch.records.iter().map(|r| r.offset).collect::<Vec<_>>(), [n]);
    assert_kept_and_reopens_clean(&fs, log, &acked, "");
}

#[test]
fn a_failed_fsync_is_rolled_back_so_its_records_never_appear_and_the_log_stays_usable() {
    let (fs, log, mut acked) = three_records();
    let before = files(&fs);

    fs.inject(Fault::Sync(io::ErrorKind::Other));
    let err = log.append_blocking(&[rec(3, 100), rec(4, 100)]).expect_err("the sync fails");
    assert!(
        matches!(&err, Error::Io { path, source, .. } if *path == seg_path(0) && source.kind() == io::ErrorKind::Other),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // The written bytes were cut off again, durably, before the caller heard.
    assert_eq!(files(&fs), before);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);

    // The rollback succeeded, so the log is not poisoned (invariant 3).
    assert_eq!(append(&log, &mut acked, vec![rec(5, 100)]), 3..4);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);
    drop(log);
    assert_reopens_exactly(&fs, always(), &acked);
}

#[test]
fn when_the_rollback_of_a_failed_fsync_fails_too_the_log_refuses_appends_until_reopened() {
    let (fs, log, acked) = three_records();

    // The append's sync fails, then the sync of its rollback.
    fs.inject(Fault::Sync(io::ErrorKind::Other));
    fs.inject(Fault::Sync(io::ErrorKind::Other));
    let err = log.append_blocking(&[rec(3, 100)]).expect_err("the sync fails");
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    for i in 4..6 {
        let err = log.append_blocking(&[rec(i, 100)]).expect_err("poisoned");
        assert!(matches!(err, Error::Poisoned), "{err:?}");
        assert!(!err.is_retryable());
    }
    // Readers still see exactly the acknowledged records.
    assert_exactly(&log, &acked);

    // Whether the power goes or the process restarts, reopening recovers
    // exactly the acknowledged records and appends work again.
    assert_crash_keeps_exactly(&fs, &always(), &acked);
    drop(log);
    assert_reopens_exactly(&fs, always(), &acked);
}

#[test]
fn with_interval_fsync_a_failed_sync_poisons_the_log_and_a_reopen_recovers_it() {
    let opts = LogOptions { fsync: FsyncMode::Interval(Duration::from_secs(3600)), ..always() };
    let fs = MemFs::new();
    let (log, _) = open(&fs, opts.clone());
    let mut acked = Acked::new();
    for i in 0..2 {
        append(&log, &mut acked, vec![rec(i, 300)]);
    }
    log.sync_blocking().expect("sync");
    let synced = acked.clone();
    for i in 2..4 {
        append(&log, &mut acked, vec![rec(i, 300)]);
    }

    fs.inject(Fault::Sync(io::ErrorKind::Other));
    let err = log.sync_blocking().expect_err("the sync fails");
    assert!(matches!(err, Error::Poisoned), "{err:?}");
    let err = log.append_blocking(&[rec(4, 100)]).expect_err("poisoned");
    assert!(matches!(err, Error::Poisoned), "{err:?}");
    // Acknowledged records stay readable.
    assert_exactly(&log, &acked);

    // A power loss may take the unsynced records (the documented risk of
    // this mode) but never a synced one, and never leaves damage.
    for seed in SEEDS {
        let (crashed, report) = open(&fs.crash(seed), opts.clone());
        assert!(report.corrupt.is_empty(), "{report:?}");
        let got = read_all(&crashed);
        assert!(got.len() >= synced.len() && got.len() <= acked.len(), "{} survived", got.len());
        for r in &got {
            assert_eq!((&r.id, &r.payload), (&acked[&r.offset].id, &acked[&r.offset].payload));
        }
        let next = got.len() as u64;
        assert_eq!(crashed.append_blocking(&[rec(9, 64)]).unwrap(), next..next + 1);
    }
    // A process restart loses nothing acknowledged.
    drop(log);
    assert_reopens_exactly(&fs, opts, &acked);
}

#[test]
fn an_eio_on_write_fails_the_append_with_io_and_changes_nothing() {
    let eio = io::Error::from_raw_os_error(libc::EIO).kind();
    let (fs, log, mut acked) = three_records();
    let before = files(&fs);

    fs.inject(Fault::Write(eio));
    let err = log.append_blocking(&[rec(3, 100)]).expect_err("EIO");
    assert!(matches!(&err, Error::Io { path, source, .. } if *path == seg_path(0) && source.kind() == eio), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(files(&fs), before);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);

    assert_eq!(append(&log, &mut acked, vec![rec(3, 100)]), 3..4);
    assert_exactly(&log, &acked);
    drop(log);
    assert_reopens_exactly(&fs, always(), &acked);
}

/// A `MemFs` whose next `sync_data`, once armed, waits until the test lets
/// it go: it holds the writer thread so appends can queue up behind it.
#[derive(Debug)]
struct GateFs {
    inner: MemFs,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct Gate {
    armed: AtomicBool,
    /// The next `sync_data` to start fails (one already held is not hit).
    fail_sync: AtomicBool,
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

/// The test's ends of the gate.
struct GateControl {
    gate: Arc<Gate>,
    entered: Receiver<()>,
    release: Sender<()>,
}

impl GateControl {
    fn arm(&self) {
        self.gate.armed.store(true, Ordering::SeqCst);
    }
    /// Waits until the writer is held in `sync_data` (a watchdog, not a delay).
    fn wait_entered(&self) {
        self.entered.recv_timeout(Duration::from_secs(30)).expect("the writer never reached the gate");
    }
    fn open(&self) {
        self.release.send(()).expect("the writer is waiting");
    }
}

/// A log on a fresh [`MemFs`] behind the gate: the filesystem (to inject
/// faults and crash), the log, and the gate's control.
fn open_gated(opts: LogOptions) -> (MemFs, Log, GateControl) {
    let fs = MemFs::new();
    let (gated, gate) = gate_fs(fs.clone());
    let (log, _) = open_on(Arc::new(gated), opts);
    (fs, log, gate)
}

fn gate_fs(inner: MemFs) -> (GateFs, GateControl) {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        armed: AtomicBool::new(false),
        fail_sync: AtomicBool::new(false),
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    });
    (GateFs { inner, gate: gate.clone() }, GateControl { gate, entered, release })
}

#[derive(Debug)]
struct GatedFile {
    inner: Box<dyn AppendFile>,
    gate: Arc<Gate>,
}

impl AppendFile for GatedFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }
    fn preallocate(&mut self, upto: u64) -> io::Result<u64> {
        self.inner.preallocate(upto)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        if self.gate.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected sync failure"));
        }
        if self.gate.armed.swap(false, Ordering::SeqCst) {
            self.gate.entered.lock().unwrap().send(()).unwrap();
            self.gate.release.lock().unwrap().recv().unwrap();
        }
        self.inner.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl Fs for GateFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read(path)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        self.inner.len(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        self.inner.open_read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(GatedFile { inner: self.inner.open_append(path)?, gate: self.gate.clone() }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

/// Polls an append once, which hands its records to the writer, and keeps
/// the future to learn the answer later.
fn submit<F: Future>(append: F) -> Pin<Box<F>> {
    let mut fut = Box::pin(append);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending(), "the writer is held: no append can be answered yet");
    fut
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime")
}

#[test]
fn every_append_of_a_group_whose_write_fails_gets_the_error_and_none_of_its_records_appear() {
    let rt = runtime();
    let (fs, log, gate) = open_gated(always());
    let mut acked = Acked::new();
    append(&log, &mut acked, vec![rec(0, 100)]);

    let first = vec![rec(1, 100)];
    let group: Vec<Vec<NewRecord>> = (2..5).map(|i| vec![rec(i, 100), rec(i + 10, 60)]).collect();
    std::thread::scope(|s| {
        // Hold the writer in the sync of one append while three more queue up:
        // the writer then takes those three as one group, with one write.
        gate.arm();
        let held = s.spawn(|| log.append_blocking(&first));
        gate.wait_entered();
        let queued: Vec<_> = group.iter().map(|records| submit(log.append(records))).collect();
        fs.inject(Fault::Write(io::ErrorKind::Other));
        gate.open();

        assert_eq!(held.join().unwrap().expect("the held append was written before the fault"), 1..2);
        acked.insert(1, first[0].clone());
        for fut in queued {
            let err = rt.block_on(fut).expect_err("the group's write failed");
            assert!(matches!(err, Error::Io { .. }), "{err:?}");
        }
    });
    assert_exactly(&log, &acked);
    // The next append takes the offsets the failed group did not use.
    assert_eq!(append(&log, &mut acked, vec![rec(20, 100)]), 2..3);
    assert_exactly(&log, &acked);
    assert_crash_keeps_exactly(&fs, &always(), &acked);
    drop(log);
    assert_reopens_exactly(&fs, always(), &acked);
}

#[test]
fn a_group_write_failing_in_an_empty_segment_before_a_rollover_does_not_start_a_second_segment_at_the_same_offset() {
    let rt = runtime();
    let (fs, log, gate) = open_gated(always());
    let mut acked = Acked::new();

    // The first append's sync fails, so the segment is empty again. Queued
    // behind it: `fits` (fits the segment) and `next` (does not fit after
    // it), taken as one group whose write of `fits` fails.
    let first = vec![rec(0, 100)];
    let fits = vec![rec(1, 600)];
    let next = vec![rec(2, 600)];
    std::thread::scope(|s| {
        gate.arm();
        let held = s.spawn(|| log.append_blocking(&first));
        gate.wait_entered();
        let fits_fut = submit(log.append(&fits));
        let next_fut = submit(log.append(&next));
        fs.inject(Fault::Sync(io::ErrorKind::Other));
        fs.inject(Fault::Write(io::ErrorKind::Other));
        gate.open();

        let err = held.join().unwrap().expect_err("its sync failed");
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let err = rt.block_on(fits_fut).expect_err("its write failed");
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let range = rt.block_on(next_fut).expect("the record after the failure is written");
        assert_eq!(range, 0..1);
        acked.insert(0, next[0].clone());
    });
    // Nothing was ever acknowledged in the first segment, so there was
    // nothing to seal: one segment, starting with one header.
    let names: Vec<String> = files(&fs).into_keys().collect();
    assert_eq!(names, [segment_name(0)]);
    assert_eq!(log.stats().segments, 1);
    assert_kept_and_reopens_clean(&fs, log, &acked, "");
}

fn readable_early() -> LogOptions {
    LogOptions { readable_before_sync: true, ..always() }
}

#[test]
fn with_readable_before_sync_records_are_readable_while_their_sync_runs_and_durable_offset_trails() {
    let rt = runtime();
    for early in [false, true] {
        let opts = LogOptions { readable_before_sync: early, ..always() };
        let (fs, log, gate) = open_gated(opts.clone());
        let mut acked = Acked::new();
        append(&log, &mut acked, vec![rec(0, 100), rec(1, 100)]);
        assert_eq!((log.next_offset(), log.durable_offset()), (2, 2));
        let mut end = log.subscribe();
        end.borrow_and_update();

        let held = vec![rec(2, 100)];
        std::thread::scope(|s| {
            gate.arm();
            let append = s.spawn(|| log.append_blocking(&held));
            gate.wait_entered();
            // The writer is inside the sync: nothing is acknowledged yet.
            assert_eq!(log.durable_offset(), 2, "early {early}");
            let mut durable = submit(log.wait_durable(3));
            rt.block_on(log.wait_durable(2)).expect("already durable");
            if early {
                assert_eq!(log.next_offset(), 3);
                assert!(end.has_changed().unwrap(), "subscribers hear of the record before its sync");
                let got = log.read(2, 10, 1 << 20).unwrap();
                assert_eq!(got.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["id-0002"]);
            } else {
                assert_eq!(log.next_offset(), 2, "readable only once durable");
                assert!(!end.has_changed().unwrap());
            }
            // A power loss now keeps exactly the acknowledged records.
            assert_crash_keeps_exactly(&fs, &opts, &acked);
            gate.open();
            assert_eq!(append.join().unwrap().expect("the sync succeeds"), 2..3);
            rt.block_on(durable.as_mut()).expect("durable once synced");
        });
        acked.insert(2, held[0].clone());
        assert_eq!((log.next_offset(), log.durable_offset()), (3, 3));
        assert_exactly(&log, &acked);
        assert_crash_keeps_exactly(&fs, &opts, &acked);
    }
}

#[test]
fn with_readable_before_sync_a_failed_fsync_poisons_the_log_instead_of_reusing_offsets_readers_saw() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, readable_early());
    let mut acked = Acked::new();
    append(&log, &mut acked, vec![rec(0, 100), rec(1, 100)]);

    let rt = runtime();
    let mut durable = submit(log.wait_durable(3));
    // A full disk too: not `NoSpace`, which says "taken back, retry".
    fs.inject(Fault::Sync(io::ErrorKind::StorageFull));
    let err = log.append_blocking(&[rec(2, 100)]).expect_err("the sync fails");
    assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let waited = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), durable.as_mut()).await });
    let err = waited.expect("the poison wakes whoever waits").expect_err("offset 2 never becomes durable");
    assert!(matches!(err, Error::Poisoned), "{err:?}");
    // Readers may have seen offset 2: it is neither taken back nor handed
    // out again, and the disk is not said to have it.
    assert_eq!((log.next_offset(), log.durable_offset()), (3, 2));
    let err = log.append_blocking(&[rec(3, 100)]).expect_err("poisoned");
    assert!(matches!(err, Error::Poisoned), "{err:?}");
    // A later sync does not declare it durable either (a retry after a
    // failed fdatasync can succeed without the bytes on disk).
    assert!(matches!(log.sync_blocking(), Err(Error::Poisoned)));
    assert_eq!(log.durable_offset(), 2);
    // A power loss keeps the acknowledged records, whatever else it keeps.
    for seed in SEEDS {
        let (crashed, report) = open(&fs.crash(seed), readable_early());
        assert!(report.corrupt.is_empty(), "{report:?}");
        let got = read_all(&crashed);
        assert!(got.len() >= 2, "{} survived", got.len());
        for r in got.iter().take(2) {
            assert_eq!((&r.id, &r.payload), (&acked[&r.offset].id, &acked[&r.offset].payload));
        }
    }
    // Closing cuts the unacknowledged record off: a reopen does not take it
    // for durable, and gives its offset to the next append.
    drop(durable);
    drop(log);
    assert_reopens_exactly(&fs, readable_early(), &acked);
}

#[test]
fn reopening_syncs_a_tail_the_last_process_wrote_but_never_synced() {
    let opts = LogOptions { fsync: FsyncMode::Never, ..always() };
    let fs = MemFs::new();
    let (log, _) = open(&fs, opts.clone());
    let mut acked = Acked::new();
    append(&log, &mut acked, vec![rec(0, 100), rec(1, 100)]);
    // The process is killed: its writer never syncs (a drop would).
    std::mem::forget(log);
    let (reopened, _) = open(&fs, always());
    assert_exactly(&reopened, &acked);
    assert_eq!(reopened.durable_offset(), 2);
    // The restarted process may build on that tail (a re-sent publish is
    // answered as a duplicate of it), so a power loss must not take it.
    assert_crash_keeps_exactly(&fs, &always(), &acked);
}

#[test]
fn with_readable_before_sync_an_append_behind_a_failed_sync_in_its_group_is_refused_not_written() {
    let rt = runtime();
    let (fs, log, gate) = open_gated(readable_early());
    let mut acked = Acked::new();
    append(&log, &mut acked, vec![rec(0, 100)]);
    // Held in the sync of one append while two more queue up as one group:
    // `fits` fits the segment, `next` does not after it, so staging `next`
    // flushes `fits` first, and that sync fails.
    let held = vec![rec(1, 100)];
    let fits = vec![rec(2, 600)];
    let next = vec![rec(3, 600)];
    std::thread::scope(|s| {
        gate.arm();
        let held_append = s.spawn(|| log.append_blocking(&held));
        gate.wait_entered();
        let fits_fut = submit(log.append(&fits));
        let next_fut = submit(log.append(&next));
        gate.gate.fail_sync.store(true, Ordering::SeqCst);
        gate.open();
        assert_eq!(held_append.join().unwrap().expect("its sync succeeds"), 1..2);
        acked.insert(1, held[0].clone());
        let err = rt.block_on(fits_fut).expect_err("its sync failed");
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
        // The log is poisoned by then: `next` is neither written behind the
        // failed records nor acknowledged.
        let err = rt.block_on(next_fut).expect_err("behind a failed sync");
        assert!(matches!(err, Error::Poisoned), "{err:?}");
    });
    assert_eq!(log.durable_offset(), 2, "nothing past the acknowledged records is called durable");
    assert!(matches!(log.sync_blocking(), Err(Error::Poisoned)));
    assert_eq!(log.durable_offset(), 2);
    drop(log);
    assert_reopens_exactly(&fs, readable_early(), &acked);
}

#[test]
fn an_append_taken_while_the_previous_group_syncs_is_answered_only_after_its_own_sync() {
    let rt = runtime();
    let (fs, log, gate) = open_gated(always());
    let mut acked = Acked::new();
    let first = vec![rec(0, 100)];
    let second = vec![rec(1, 100)];
    std::thread::scope(|s| {
        // Hold the sync of `first`; `second` arrives meanwhile and, once
        // `first` lands, becomes the next group, whose sync is held too.
        gate.arm();
        let held = s.spawn(|| log.append_blocking(&first));
        gate.wait_entered();
        let mut second_fut = submit(log.append(&second));
        gate.arm();
        gate.open();
        assert_eq!(held.join().unwrap().expect("the first group's sync succeeds"), 0..1);
        acked.insert(0, first[0].clone());
        gate.wait_entered();
        // `second` is written and its sync is running: not answered, not
        // called durable, and a power loss now keeps exactly `first`.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(second_fut.as_mut().poll(&mut cx).is_pending(), "answered before its own sync returned");
        assert_eq!(log.durable_offset(), 1);
        assert_eq!(log.next_offset(), 1, "readable only once durable");
        assert_crash_keeps_exactly(&fs, &always(), &acked);
        gate.open();
        assert_eq!(rt.block_on(second_fut).expect("its sync succeeds"), 1..2);
        acked.insert(1, second[0].clone());
    });
    assert_eq!(log.durable_offset(), 2);
    assert_kept_and_reopens_clean(&fs, log, &acked, "");
}

#[test]
fn dropping_the_log_while_a_sync_runs_makes_the_appends_queued_behind_it_durable_and_answers_them() {
    let rt = runtime();
    let (fs, log, gate) = open_gated(always());
    let mut acked = Acked::new();
    let first = vec![rec(0, 100)];
    let queued: Vec<Vec<NewRecord>> = (1..4).map(|i| vec![rec(i, 100)]).collect();
    gate.arm();
    let first_fut = log.submit(&first).expect("queued");
    gate.wait_entered();
    let futs: Vec<_> = queued.iter().map(|records| log.submit(records).expect("queued")).collect();
    // The handle goes away with the first sync still held and three appends
    // behind it: the close waits for them.
    let closing = std::thread::spawn(move || drop(log));
    gate.open();
    closing.join().unwrap();
    assert_eq!(rt.block_on(first_fut).expect("synced"), 0..1);
    acked.insert(0, first[0].clone());
    for (i, fut) in futs.into_iter().enumerate() {
        let range = rt.block_on(fut).expect("written and synced by the close");
        assert_eq!(range, (i as u64 + 1)..(i as u64 + 2));
        acked.insert(range.start, queued[i][0].clone());
    }
    assert_crash_keeps_exactly(&fs, &always(), &acked);
    assert_reopens_exactly(&fs, always(), &acked);
}

#[test]
fn a_cursor_commit_on_a_full_disk_still_deletes_the_segments_it_passed_so_the_disk_frees() {
    let fs = MemFs::new();
    let (log, _) = open(&fs, always());
    let mut acked = Acked::new();
    for i in 0..40 {
        append(&log, &mut acked, vec![rec(i, 100)]);
    }
    let sealed = segments(&fs).len() - 1;
    assert!(sealed >= 3, "{sealed} sealed segments");
    log.commit("forwarded", 5).unwrap();
    let before = log.cursor("forwarded");
    // The disk is full: not even the cursor file's temp file fits.
    fs.set_capacity(Some(used(&fs)));
    let used_full = used(&fs);
    let err = log.commit("forwarded", 40).expect_err("no room for the cursor file");
    assert!(matches!(&err, Error::NoSpace { .. }), "{err:?}");
    assert_eq!(log.cursor("forwarded"), before, "the cursor stays where the disk says it is");
    assert_eq!(segments(&fs).len(), 1, "every sealed segment the new cursor passed is gone");
    assert!(used(&fs) < used_full, "the disk has room again");
    // Reads start from the first record kept, also for a process that
    // restarts with the older cursor the disk still holds.
    let first_kept = log.stats().start_offset;
    assert!(first_kept > 5 && first_kept <= 40, "{first_kept}");
    assert_eq!(read_all(&log).first().map(|r| r.offset), Some(first_kept));
    drop(log);
    fs.set_capacity(None);
    let (log, _) = open(&fs, always());
    assert_eq!(log.cursor("forwarded"), Some(5));
    let from_cursor = log.read(5, 1, 1 << 20).unwrap();
    assert_eq!(from_cursor.records.first().map(|r| r.offset), Some(first_kept));
    let kept: Acked = acked.range(first_kept..).map(|(o, r)| (*o, r.clone())).collect();
    assert_exactly(&log, &kept);
    // And the commit goes through once there is room.
    log.commit("forwarded", 40).unwrap();
    assert_eq!(log.cursor("forwarded"), Some(40));
}
