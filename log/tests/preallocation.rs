//! Preallocated segment space on the real filesystem: appends overwrite
//! reserved zeros instead of growing the file, the reserve is given back on
//! seal and close, and after a crash recovery takes the zeros for the
//! reserve they are — while damage before them is still a torn tail.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_log::fs::{AppendFile, ReadAt};
use ferry_log::{Fs, Log, LogOptions, NewRecord, StdFs, DEFAULT_PREALLOCATE_BYTES};

/// A record whose frame ends with a non-zero byte (its payload).
fn rec(i: u64) -> NewRecord {
    NewRecord::new(format!("id-{i}"), vec![0xab; 200])
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// What a `kill -9` or power loss right now would leave: every file as it
/// is on disk (the appends below were acknowledged, so synced).
fn crash_image(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A crash image of a log (default options) after `n` acknowledged
/// appends: the image's dir, its one segment file, and the bytes of data.
fn crashed_after(n: u64) -> (tempfile::TempDir, PathBuf, u64) {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..n {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    crash_image(dir.path(), image.path());
    let [segment] = segment_files(image.path()).try_into().unwrap();
    (image, segment, log.stats().bytes)
}

fn read_ids(log: &Log) -> Vec<String> {
    let mut ids = Vec::new();
    let mut from = log.stats().start_offset;
    while from < log.next_offset() {
        let batch = log.read(from, 1000, usize::MAX).unwrap();
        from = batch.next;
        ids.extend(batch.records.into_iter().map(|r| r.id));
    }
    ids
}

#[test]
fn appends_go_into_preallocated_space_and_closing_the_log_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogOptions::default()).unwrap();
    for i in 0..10 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    let data = log.stats().bytes;
    let [segment] = segment_files(dir.path()).try_into().unwrap();
    assert!(
        file_len(&segment) > data && file_len(&segment) >= DEFAULT_PREALLOCATE_BYTES,
        "the file ({} bytes) should reach past the data ({data} bytes) into the reserve",
        file_len(&segment)
    );
    drop(log);
    assert_eq!(file_len(&segment), data, "closing trims the reserve");

    let (log, report) = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(read_ids(&log).len(), 10);
}

#[test]
fn with_preallocation_off_the_file_holds_just_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogOptions { preallocate_bytes: 0, ..LogOptions::default() }).unwrap();
    log.append_blocking(&[rec(0), rec(1)]).unwrap();
    let [segment] = segment_files(dir.path()).try_into().unwrap();
    assert_eq!(file_len(&segment), log.stats().bytes);
}

#[test]
fn a_crash_image_with_preallocated_zeros_reopens_clean_with_every_acknowledged_record() {
    let (image, segment, data) = crashed_after(25);
    let bytes = fs::read(&segment).unwrap();
    assert!(bytes.len() as u64 > data, "the image must hold the reserve");
    assert!(bytes[data as usize..].iter().all(|&b| b == 0));

    let (reopened, report) = Log::open(image.path(), LogOptions::default()).unwrap();
    assert!(report.is_clean(), "zeros past the last record are the reserve, not damage: {report:?}");
    assert_eq!(read_ids(&reopened), (0..25).map(|i| format!("id-{i}")).collect::<Vec<_>>());
    assert_eq!(file_len(&segment), data, "recovery cuts the reserve off");
    // Appends carry on where the records end, not after the old reserve.
    assert_eq!(reopened.append_blocking(&[rec(25)]).unwrap(), 25..26);
    drop(reopened);
    let (reopened, report) = Log::open(image.path(), LogOptions::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(read_ids(&reopened).len(), 26);
}

#[test]
fn damage_between_the_last_record_and_the_preallocated_zeros_is_still_a_torn_tail() {
    let (image, segment, data) = crashed_after(5);
    let data = data as usize;
    let mut bytes = fs::read(&segment).unwrap();
    // Half a record that was being written when the process died.
    bytes[data..data + 100].fill(0x5c);
    fs::write(&segment, &bytes).unwrap();

    let (reopened, report) = Log::open(image.path(), LogOptions::default()).unwrap();
    assert_eq!(report.truncated.len(), 1, "{report:?}");
    assert_eq!(report.truncated[0].at, data as u64);
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(read_ids(&reopened).len(), 5);
    assert_eq!(file_len(&segment), data as u64);
}

#[test]
fn a_sealed_segment_ends_with_its_last_record_not_with_reserved_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let opts = || LogOptions { segment_bytes: 16 << 10, preallocate_bytes: 4 << 10, ..LogOptions::default() };
    let (log, _) = Log::open(dir.path(), opts()).unwrap();
    for i in 0..200 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "the segments should roll: {files:?}");
    for sealed in &files[..files.len() - 1] {
        let bytes = fs::read(sealed).unwrap();
        assert_ne!(bytes.last(), Some(&0), "{} ends with reserved zeros", sealed.display());
        assert!(bytes.len() as u64 <= 16 << 10, "{}: {} bytes", sealed.display(), bytes.len());
    }
    // Their indexes match them, so a reopen trusts them (nothing rebuilt).
    crash_image(dir.path(), image.path());
    let (reopened, report) = Log::open(image.path(), opts()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(read_ids(&reopened).len(), 200);
}

/// The real filesystem, but a preallocation grows the file only half way
/// to what was asked and then fails, as `fallocate` can on a full disk.
#[derive(Debug)]
struct HalfFullFs;

#[derive(Debug)]
struct HalfFullFile(Box<dyn AppendFile>);

impl AppendFile for HalfFullFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn preallocate(&mut self, upto: u64) -> io::Result<u64> {
        let now = self.0.preallocate(0)?;
        self.0.preallocate(now + (upto.saturating_sub(now)) / 2)?;
        Err(io::Error::new(io::ErrorKind::StorageFull, "no space left part way"))
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Fs for HalfFullFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        StdFs.read(path)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        StdFs.len(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        StdFs.open_read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(HalfFullFile(StdFs.open_append(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
}

#[test]
fn a_preallocation_that_fails_part_way_still_leaves_sealed_segments_ending_with_their_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let opts = || LogOptions { segment_bytes: 16 << 10, preallocate_bytes: 4 << 10, ..LogOptions::default() };
    let (log, _) = Log::open_with(Arc::new(HalfFullFs), dir.path(), opts()).unwrap();
    for i in 0..200 {
        log.append_blocking(&[rec(i)]).unwrap();
    }
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "the segments should roll: {files:?}");
    for sealed in &files[..files.len() - 1] {
        let bytes = fs::read(sealed).unwrap();
        assert_ne!(bytes.last(), Some(&0), "{} ends with zeros of a failed preallocation", sealed.display());
    }
    crash_image(dir.path(), image.path());
    let (reopened, report) = Log::open(image.path(), opts()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(read_ids(&reopened).len(), 200);
    drop(reopened);
    drop(log);
    let active = segment_files(dir.path()).pop().unwrap();
    assert_ne!(fs::read(&active).unwrap().last(), Some(&0), "closing trims the active segment too");
}
