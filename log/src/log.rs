//! The [`Log`] handle: append, read, cursors, retention.

use std::collections::BTreeMap;
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::cursors::{self, CURSORS_FILE};
use crate::error::{Error, Result};
use crate::fs::{write_atomic, Fs, StdFs};
use crate::options::LogOptions;
use crate::record::{decode, NewRecord, Record};
use crate::recovery::{recover, Corruption, RecoveryReport};
use crate::segment::{index_path, segment_path, IndexEntry, Segment};
use crate::writer::{Command, Request, Writer};

/// State shared by the handle, the writer thread and readers.
pub(crate) struct Shared {
    pub fs: Arc<dyn Fs>,
    pub dir: PathBuf,
    pub opts: LogOptions,
    state: RwLock<State>,
    cursors: Mutex<BTreeMap<String, u64>>,
    end: watch::Sender<u64>,
    /// One past the last record known durable (trails `end` while a sync
    /// runs, and in the `Interval`/`Never` modes).
    durable: watch::Sender<u64>,
    pub poisoned: AtomicBool,
}

pub(crate) struct State {
    /// Oldest first; the last one is the active segment.
    pub segments: Vec<Segment>,
}

impl Shared {
    pub(crate) fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes freshly written records visible to readers.
    pub(crate) fn publish(&self, len: u64, entries: &mut Vec<IndexEntry>, next_offset: u64) {
        {
            let mut st = self.state_mut();
            let seg = st.segments.last_mut().expect("a log always has an active segment");
            seg.index.append(entries);
            seg.len = len;
        }
        self.end.send_replace(next_offset);
    }

    /// Records below `next_offset` are durable.
    pub(crate) fn mark_durable(&self, next_offset: u64) {
        self.durable.send_if_modified(|d| {
            let moved = next_offset > *d;
            *d = (*d).max(next_offset);
            moved
        });
    }

    /// Marks the log poisoned and wakes whoever waits for durability.
    pub(crate) fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        self.durable.send_modify(|_| {});
    }

    /// One past the last readable record.
    pub(crate) fn end(&self) -> u64 {
        *self.end.borrow()
    }
}

/// What [`Log::read`] returns.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// Records in offset order. Offsets may have gaps where damaged records
    /// were skipped (each listed in `skipped`).
    pub records: Vec<Record>,
    /// The offset to read from next.
    pub next: u64,
    /// Damaged records found and skipped by this read.
    pub skipped: Vec<Corruption>,
}

/// Counters describing a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Offset of the oldest readable record (`next_offset` when empty).
    pub start_offset: u64,
    /// Offset the next appended record will get.
    pub next_offset: u64,
    /// Readable records still held.
    pub records: u64,
    /// Bytes of segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// First offset of the active segment (the one appends go to).
    pub active_base: u64,
}

/// An open log. Cheap to share behind an `Arc`; every method takes `&self`.
/// Dropping it stops the writer thread after a final sync.
pub struct Log {
    shared: Arc<Shared>,
    tx: Option<Sender<Command>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (or creates) the log in `dir` on the real filesystem.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<(Log, RecoveryReport)> {
        Self::open_with(Arc::new(StdFs), dir, opts)
    }

    /// Opens (or creates) the log in `dir` on the given filesystem.
    pub fn open_with(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: LogOptions) -> Result<(Log, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        if opts.segment_bytes > u32::MAX as u64 {
            return Err(Error::Invalid("segment_bytes must be at most u32::MAX"));
        }
        let recovered = recover(&*fs, &dir)?;
        let mut report = recovered.report;
        let mut cursors = match fs.read(&dir.join(CURSORS_FILE)) {
            Ok(buf) => cursors::decode(&buf).unwrap_or_else(|why| {
                tracing::warn!(dir = %dir.display(), why, "cursor file damaged; cursors restart from the log start");
                report.cursors_damaged = Some(why);
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        let next = recovered.segments.last().map_or(0, Segment::end_offset);
        for (name, at) in cursors.iter_mut().filter(|(_, at)| **at > next) {
            tracing::warn!(dir = %dir.display(), cursor = %name, was = *at, now = next, "cursor was past the recovered end of the log (its tail was lost); moved back to the end");
            report.cursors_past_end.insert(name.clone(), *at);
            *at = next;
        }
        if !report.cursors_past_end.is_empty() {
            // Durably, before any record takes those offsets again: else a
            // crash before the next commit would bring the old cursor back
            // past the new records. On a full disk the log still opens (its
            // retention is what frees the disk); the next commit writes them.
            if let Err(e) = write_atomic(&*fs, &dir, CURSORS_FILE, &cursors::encode(&cursors)) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not write the moved cursors; the next commit will");
            }
        }
        let bytes: u64 = recovered.segments.iter().map(|s| s.len).sum();
        opts.budget.add(bytes);
        let (end, _) = watch::channel(next);
        // The writer syncs what the last process may have left unsynced
        // before it runs (see `Writer::new`).
        let (durable, _) = watch::channel(next);
        let shared = Arc::new(Shared {
            fs,
            dir,
            opts,
            state: RwLock::new(State { segments: recovered.segments }),
            cursors: Mutex::new(cursors),
            end,
            durable,
            poisoned: AtomicBool::new(false),
        });
        let writer = Writer::new(shared.clone())?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("ferry-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("starting the writer thread for", &shared.dir, e))?;
        let log = Log { shared, tx: Some(tx), writer: Some(handle) };
        log.apply_retention()?;
        Ok((log, report))
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn encode(&self, records: &[NewRecord]) -> Result<Request> {
        if records.is_empty() {
            return Err(Error::Invalid("empty batch"));
        }
        let total: usize = records.iter().map(NewRecord::encoded_len).sum();
        let max = self.shared.opts.segment_bytes as usize - crate::segment::SEGMENT_HEADER;
        if total > max {
            return Err(Error::TooLarge { size: total, max });
        }
        let mut buf = Vec::with_capacity(total);
        let mut starts = Vec::with_capacity(records.len());
        for r in records {
            starts.push(buf.len());
            r.encode_unsealed(&mut buf)?;
        }
        let (reply, _) = oneshot::channel();
        Ok(Request { buf, starts, reply })
    }

    fn send(&self, cmd: Command) -> Result<()> {
        self.tx.as_ref().ok_or(Error::Closed)?.send(cmd).map_err(|_| Error::Closed)
    }

    /// Appends records as one group: they get consecutive offsets and are
    /// written by one write. Returns their offsets once the mode's durability
    /// is reached (with `FsyncMode::Always`: after `fdatasync`).
    ///
    /// Cancelling the future does not cancel the append.
    pub async fn append(&self, records: &[NewRecord]) -> Result<Range<u64>> {
        self.submit(records)?.await
    }

    /// Queues an append now and returns a future for its offsets. Appends
    /// submitted one after another get increasing offsets in that order,
    /// whenever their futures are awaited: for callers that pipeline.
    pub fn submit(
        &self,
        records: &[NewRecord],
    ) -> Result<impl std::future::Future<Output = Result<Range<u64>>> + Send + 'static> {
        let mut req = self.encode(records)?;
        let (tx, rx) = oneshot::channel();
        req.reply = tx;
        self.send(Command::Append(req))?;
        Ok(async move { rx.await.map_err(|_| Error::Closed)? })
    }

    /// [`Log::append`] for threads outside an async runtime.
    pub fn append_blocking(&self, records: &[NewRecord]) -> Result<Range<u64>> {
        let mut req = self.encode(records)?;
        let (tx, rx) = oneshot::channel();
        req.reply = tx;
        self.send(Command::Append(req))?;
        rx.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Makes everything appended so far durable (for `Interval`/`Never`).
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Sync(tx))?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Seals the active segment, if it holds a record, and starts a new one;
    /// then deletes the sealed segments every cursor has passed. Returns
    /// whether it sealed. Retention deletes only sealed segments, so records
    /// every cursor has passed still hold their bytes (and their budget)
    /// while their segment is active: a caller short of room seals it, and
    /// its bytes go once the cursors pass its last record.
    pub async fn seal_active(&self) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Seal(tx))?;
        let sealed = rx.await.map_err(|_| Error::Closed)??;
        self.apply_retention()?;
        Ok(sealed)
    }

    /// [`Log::sync`] for threads outside an async runtime.
    pub fn sync_blocking(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Sync(tx))?;
        rx.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Reads up to `max_records` records (and about `max_bytes`, at least one
    /// record) starting at `from`, within one segment. Records before the
    /// oldest retained one are gone; reading starts at the oldest then.
    ///
    /// Every record's CRC32C is checked; a damaged record is skipped, logged
    /// and listed in [`ReadBatch::skipped`].
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<ReadBatch> {
        let max_records = max_records.max(1);
        let (file, base, seg_base, entries, end) = {
            let st = self.shared.state();
            let first = st.segments.partition_point(|s| s.end_offset() <= from);
            // Skip segments without readable records (an active segment whose
            // first append failed, a sealed one whose records were all damaged).
            let Some(seg) = st.segments[first..].iter().find(|s| !s.index.is_empty()) else {
                return Ok(ReadBatch { next: from.max(self.next_offset()), ..ReadBatch::default() });
            };
            let k = seg.index.partition_point(|e| seg.base + (e.rel as u64) < from);
            let start = seg.index[k].pos as u64;
            let mut n = 1;
            while n < max_records && k + n < seg.index.len() && (seg.frame_end(k + n) - start) as usize <= max_bytes {
                n += 1;
            }
            let entries: Vec<IndexEntry> = seg.index[k..k + n].to_vec();
            (seg.file.clone(), start, seg.base, entries, seg.frame_end(k + n - 1))
        };
        let mut buf = vec![0u8; (end - base) as usize];
        let path = segment_path(&self.shared.dir, seg_base);
        file.read_exact_at(&mut buf, base).map_err(|e| Error::io("reading", &path, e))?;
        let whole = Bytes::from(buf);
        let mut out = ReadBatch::default();
        for (i, e) in entries.iter().enumerate() {
            let at = (e.pos as u64 - base) as usize;
            match decode(&whole, at) {
                Ok((rec, _)) if rec.offset == seg_base + e.rel as u64 => out.records.push(rec),
                _ => {
                    let next = entries.get(i + 1).map_or(end, |n| n.pos as u64);
                    let c = Corruption {
                        segment: seg_base,
                        position: e.pos as u64,
                        len: next - e.pos as u64,
                        reason: "record CRC32C mismatch on read",
                    };
                    tracing::warn!(path = %path.display(), position = c.position, offset = seg_base + e.rel as u64, "skipped a damaged record");
                    out.skipped.push(c);
                }
            }
        }
        out.next = entries.last().map_or(from, |e| seg_base + e.rel as u64 + 1);
        Ok(out)
    }

    /// Calls `visit` with each record from `from` on, in offset order, read
    /// in batches as [`Log::read`] reads them (damaged records skipped), up to
    /// the end of the log or until `visit` breaks; returns what it broke with.
    pub fn scan<B>(&self, from: u64, mut visit: impl FnMut(Record) -> ControlFlow<B>) -> Result<Option<B>> {
        let mut from = from;
        while from < self.next_offset() {
            let batch = self.read(from, 1024, 4 << 20)?;
            for r in batch.records {
                if let ControlFlow::Break(b) = visit(r) {
                    return Ok(Some(b));
                }
            }
            if batch.next <= from {
                break;
            }
            from = batch.next;
        }
        Ok(None)
    }

    /// Offset the next appended record will get (one past the last readable).
    pub fn next_offset(&self) -> u64 {
        *self.shared.end.borrow()
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.shared.opts
    }

    /// A receiver that changes whenever records become readable; its value
    /// is [`Log::next_offset`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.end.subscribe()
    }

    /// One past the last record known to be on disk. Equal to
    /// [`Log::next_offset`] with [`crate::FsyncMode::Always`], except while a
    /// sync runs with [`LogOptions::readable_before_sync`] (and for good if
    /// that sync failed: the log is poisoned); trails it in the
    /// `Interval`/`Never` modes until their sync.
    pub fn durable_offset(&self) -> u64 {
        *self.shared.durable.borrow()
    }

    /// True once a failure made the log refuse appends until reopened
    /// ([`Error::Poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Returns once every record below `offset` is on disk
    /// ([`Log::durable_offset`] ≥ `offset`), or [`Error::Poisoned`] if the
    /// log failed before it got there.
    pub async fn wait_durable(&self, offset: u64) -> Result<()> {
        let mut durable = self.shared.durable.subscribe();
        loop {
            if *durable.borrow_and_update() >= offset {
                return Ok(());
            }
            if self.is_poisoned() {
                return Err(Error::Poisoned);
            }
            // The sender lives as long as `self`.
            let _ = durable.changed().await;
        }
    }

    /// The value of a named cursor, if set.
    pub fn cursor(&self, name: &str) -> Option<u64> {
        self.lock_cursors().get(name).copied()
    }

    /// All cursors.
    pub fn cursors(&self) -> BTreeMap<String, u64> {
        self.lock_cursors().clone()
    }

    fn lock_cursors(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.shared.cursors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a named cursor to `offset` (the first offset *not* done), durably
    /// (temp file, fsync, rename, directory fsync), then deletes segments
    /// every cursor has passed. Each call costs three fsyncs: commit in
    /// batches, not per record.
    pub fn commit(&self, name: &str, offset: u64) -> Result<()> {
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::Invalid("cursor name must be 1..=65535 bytes"));
        }
        self.update_cursors(|c| {
            c.insert(name.to_owned(), offset);
        })
    }

    /// Changes the cursors with `change`, given the current ones, and
    /// commits the result with one durable write of the cursor file (see
    /// [`Log::commit`]): a read-modify-write no other commit of this log
    /// interleaves with (e.g. "raise this cursor, never lower it").
    pub fn commit_with(&self, change: impl FnOnce(&mut BTreeMap<String, u64>)) -> Result<()> {
        self.update_cursors(change)
    }

    /// Removes a named cursor (it no longer holds back retention).
    pub fn remove_cursor(&self, name: &str) -> Result<()> {
        self.update_cursors(|c| {
            c.remove(name);
        })
    }

    /// Segments are deleted with the cursors' lock held, below the minimum
    /// of the cursors as they are then: a commit that computed a higher
    /// minimum can never delete past a cursor another commit just lowered.
    fn update_cursors(&self, change: impl FnOnce(&mut BTreeMap<String, u64>)) -> Result<()> {
        let mut cursors = self.lock_cursors();
        let mut next = cursors.clone();
        change(&mut next);
        if next.keys().any(|name| name.is_empty() || name.len() > u16::MAX as usize) {
            return Err(Error::Invalid("cursor name must be 1..=65535 bytes"));
        }
        let bytes = cursors::encode(&next);
        if let Err(e) = write_atomic(&*self.shared.fs, &self.shared.dir, CURSORS_FILE, &bytes) {
            // On a full disk the cursor file cannot be replaced, yet the
            // segments every new cursor has passed are what would free
            // the disk: delete them all the same. Safe: a reader starting
            // from the older cursor on disk (after a crash) reads from the
            // first record kept, and the new cursors say nothing below it
            // is needed. The cursors stay as they were, so the caller
            // commits again.
            self.delete_below(next.values().copied().min())?;
            return Err(Error::io("writing", self.shared.dir.join(CURSORS_FILE), e));
        }
        *cursors = next;
        self.delete_below(cursors.values().copied().min())
    }

    /// Deletes sealed segments whose records are all below every cursor.
    /// With no cursor at all nothing is deleted.
    fn apply_retention(&self) -> Result<()> {
        let cursors = self.lock_cursors();
        self.delete_below(cursors.values().copied().min())
    }

    /// Deletes sealed segments whose records are all below `min` (nothing
    /// when `None`). Called with the cursors' lock held (the state's is
    /// taken under it; never the other way round).
    fn delete_below(&self, min: Option<u64>) -> Result<()> {
        let Some(min) = min else {
            return Ok(());
        };
        let removed: Vec<Segment> = {
            let mut st = self.shared.state_mut();
            let sealed = st.segments.len() - 1;
            let n = st.segments[..sealed].iter().take_while(|s| s.end_offset() <= min).count();
            st.segments.drain(..n).collect()
        };
        for seg in removed {
            let path = segment_path(&self.shared.dir, seg.base);
            self.shared.fs.remove(&path).map_err(|e| Error::io("deleting", &path, e))?;
            let _ = self.shared.fs.remove(&index_path(&self.shared.dir, seg.base));
            self.shared.opts.budget.release(seg.len);
            tracing::debug!(segment = seg.base, "deleted a segment past every cursor");
        }
        Ok(())
    }

    /// Counters for metrics and inspection.
    pub fn stats(&self) -> LogStats {
        let st = self.shared.state();
        let next = st.segments.last().map_or(0, Segment::end_offset);
        let start = st.segments.iter().find_map(|s| s.index.first().map(|e| s.base + e.rel as u64)).unwrap_or(next);
        LogStats {
            start_offset: start,
            next_offset: next,
            records: st.segments.iter().map(|s| s.index.len() as u64).sum(),
            bytes: st.segments.iter().map(|s| s.len).sum(),
            segments: st.segments.len(),
            active_base: st.segments.last().map_or(0, |s| s.base),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
        let bytes: u64 = self.shared.state().segments.iter().map(|s| s.len).sum();
        self.shared.opts.budget.release(bytes);
    }
}
