//! The group-commit writer: one thread per log that is the permanent leader.
//!
//! Appenders encode their records (in their own task, in parallel) and send
//! the bytes here. The thread takes every request waiting in the queue, gives
//! them offsets, writes them with one `write`, runs one `fdatasync`, then
//! publishes the new records to readers (with `readable_before_sync`: before
//! the `fdatasync`) and answers every appender. A
//! dedicated thread instead of a leader elected among callers keeps async
//! callers from ever blocking a runtime thread on `fdatasync`.

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::fs::{write_atomic, AppendFile};
use crate::log::Shared;
use crate::options::FsyncMode;
use crate::record::seal_frame;
use crate::recovery::create_segment;
use crate::segment::{encode_index, index_name, segment_path, IndexEntry};

/// An append request: frames encoded with offset 0 and no CRC.
/// Longest the writer waits for the appenders of its last commit to come
/// back before committing with fewer (see `run`).
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(200);
/// The smallest last group that makes the writer wait for more.
const GATHER_AFTER: usize = 4;

pub(crate) struct Request {
    pub buf: Vec<u8>,
    /// Start of each frame in `buf`.
    pub starts: Vec<usize>,
    pub reply: oneshot::Sender<Result<Range<u64>>>,
}

pub(crate) enum Command {
    Append(Request),
    /// Make everything written so far durable, then answer.
    Sync(oneshot::Sender<Result<()>>),
    /// Seal the active segment if it holds a record (answer true), so
    /// retention may delete it once every cursor has passed it.
    Seal(oneshot::Sender<Result<bool>>),
}

struct Pending {
    reply: oneshot::Sender<Result<Range<u64>>>,
    range: Range<u64>,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: Box<dyn AppendFile>,
    path: PathBuf,
    base: u64,
    /// Bytes written and accepted in the active segment.
    len: u64,
    /// Bytes of the active segment known durable.
    durable_len: u64,
    /// Size of the active segment's file: past `len`, preallocated zeros
    /// (`u64::MAX`: unknown, after a failed preallocation).
    reserved: u64,
    next_offset: u64,
    /// Staged frames not yet written.
    buf: Vec<u8>,
    staged_entries: Vec<IndexEntry>,
    pending: Vec<Pending>,
    first_unsynced: Option<Instant>,
    /// Append requests in the last commit.
    last_group: usize,
    /// Bytes past `len` were written and shown to readers, but their sync
    /// failed (with `readable_before_sync`): cut off at close.
    unacked_tail: bool,
    /// An `fdatasync` failed: no later sync may count as making anything
    /// durable.
    sync_failed: bool,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self> {
        let (base, len, next_offset) = {
            let st = shared.state();
            let seg = st.segments.last().expect("a log always has an active segment");
            (seg.base, seg.len, seg.end_offset())
        };
        let path = segment_path(&shared.dir, base);
        let mut file = shared.fs.open_append(&path).map_err(|e| Error::io("opening", &path, e))?;
        // What a killed process wrote but never synced survives in the page
        // cache and is read back as the log's tail: sync it before anything
        // is built on it (e.g. a re-sent publish answered as a duplicate).
        if next_offset > base {
            file.sync_data().map_err(|e| Error::io("syncing", &path, e))?;
        }
        Ok(Writer {
            shared,
            file,
            path,
            base,
            len,
            durable_len: len,
            reserved: len,
            next_offset,
            buf: Vec::new(),
            staged_entries: Vec::new(),
            pending: Vec::new(),
            first_unsynced: None,
            last_group: 0,
            unacked_tail: false,
            sync_failed: false,
        })
    }

    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        loop {
            let first = match (self.shared.opts.fsync, self.first_unsynced) {
                (FsyncMode::Interval(every), Some(since)) => {
                    match rx.recv_timeout(every.saturating_sub(since.elapsed())) {
                        Ok(cmd) => cmd,
                        Err(RecvTimeoutError::Timeout) => {
                            // A failure poisons the log and is logged there.
                            let _ = self.sync_unsynced();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                },
            };
            let mut gathered = 0usize;
            let mut requests = 0usize;
            let mut syncs = Vec::new();
            let mut seals = Vec::new();
            let mut next = Some(first);
            let waited_until = Instant::now() + GATHER_WAIT;
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append(req) => {
                        gathered += req.buf.len();
                        requests += 1;
                        self.stage(req);
                    }
                    Command::Sync(tx) => syncs.push(tx),
                    Command::Seal(tx) => seals.push(tx),
                }
                if gathered < self.shared.opts.group_bytes {
                    next = rx.try_recv().ok();
                    // Appenders answered by the last commit are about to send
                    // their next record: when fewer than last time have
                    // arrived, wait a moment for the rest rather than spend
                    // a whole fdatasync on a handful. Only after a group of
                    // several: groups of one or two are independent arrivals
                    // (a fixed request rate), which the wait would only delay.
                    if next.is_none() && self.last_group >= GATHER_AFTER && requests < self.last_group {
                        let left = waited_until.saturating_duration_since(Instant::now());
                        next = rx.recv_timeout(left).ok();
                    }
                }
            }
            self.last_group = requests;
            self.flush();
            if !syncs.is_empty() {
                let r = self.sync_unsynced();
                for tx in syncs {
                    let _ = tx.send(r.as_ref().map(|_| ()).map_err(|_| Error::Poisoned));
                }
            }
            if !seals.is_empty() {
                // Everything staged is written (flush above): seal only a
                // segment that holds a record (an empty one frees nothing).
                let mut r = if self.next_offset > self.base { self.roll().map(|()| true) } else { Ok(false) };
                for tx in seals {
                    // One roll for all: the others learn it sealed, or that
                    // it did not (an error goes to the first).
                    let _ = tx.send(std::mem::replace(&mut r, Ok(false)));
                }
            }
            if let (FsyncMode::Interval(every), Some(since)) = (self.shared.opts.fsync, self.first_unsynced) {
                if since.elapsed() >= every {
                    let _ = self.sync_unsynced();
                }
            }
        }
        // Closing: make everything written durable, and give back the
        // preallocated space (best effort: recovery knows it for what it is).
        self.flush();
        if self.sync_unsynced().is_ok() {
            let _ = self.trim_reserve();
        }
        if self.unacked_tail {
            // Records whose sync failed after readers saw them: nobody reads
            // any more, so cut them off (best effort), lest a reopen take
            // them for durable.
            let _ = self.file.set_len(self.len).and_then(|()| self.file.sync_data());
        }
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn poison(&self, why: &str, e: &io::Error) {
        tracing::error!(path = %self.path.display(), error = %e, "{why}; the log refuses appends until reopened");
        self.shared.poison();
    }

    /// Gives a request its offsets and stages its bytes.
    fn stage(&mut self, mut req: Request) {
        if self.poisoned() {
            return answer(req.reply, Err(Error::Poisoned));
        }
        let n = req.buf.len() as u64;
        let budget = self.shared.opts.budget.clone();
        if let Err(used) = budget.try_reserve(n) {
            return answer(req.reply, Err(Error::Full { limit: budget.limit(), used, requested: n }));
        }
        if self.must_roll(n) {
            self.flush();
            if self.poisoned() {
                // The flush failed for good: nothing more goes on this log
                // (its end may hold records that are neither durable nor
                // taken back).
                budget.release(n);
                return answer(req.reply, Err(Error::Poisoned));
            }
            // A failed flush cut its records off again: if that left the
            // segment empty, there is nothing to seal (sealing it would
            // start a second segment at the same base offset).
            if self.must_roll(n) {
                if let Err(e) = self.roll() {
                    budget.release(n);
                    return answer(req.reply, Err(e));
                }
            }
        }
        let first = self.next_offset;
        let buf_base = self.len + self.buf.len() as u64;
        for (i, &start) in req.starts.iter().enumerate() {
            let end = req.starts.get(i + 1).copied().unwrap_or(req.buf.len());
            let offset = self.next_offset;
            seal_frame(&mut req.buf[start..end], offset);
            self.staged_entries
                .push(IndexEntry { rel: (offset - self.base) as u32, pos: (buf_base + start as u64) as u32 });
            self.next_offset += 1;
        }
        self.buf.extend_from_slice(&req.buf);
        self.pending.push(Pending { reply: req.reply, range: first..self.next_offset });
    }

    /// True when `n` more bytes do not fit the active segment and it holds
    /// or has staged a record (an empty segment takes any batch).
    fn must_roll(&self, n: u64) -> bool {
        let has_records = self.next_offset > self.base || !self.buf.is_empty();
        has_records && self.len + self.buf.len() as u64 + n > self.shared.opts.segment_bytes
    }

    /// Writes (and, with `FsyncMode::Always`, syncs) everything staged,
    /// then publishes it and answers the appenders.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let always = self.shared.opts.fsync == FsyncMode::Always;
        let written = self.buf.len() as u64;
        self.reserve(written);
        let mut result = self.file.write_all(&self.buf);
        // Readers may start on these records while the sync runs.
        let published = result.is_ok() && always && self.shared.opts.readable_before_sync;
        if published {
            self.shared.publish(self.len + written, &mut self.staged_entries, self.next_offset);
        }
        if result.is_ok() && always {
            result = self.file.sync_data();
        }
        match result {
            Ok(()) => {
                self.len += written;
                if always {
                    self.durable_len = self.len;
                } else if self.first_unsynced.is_none() {
                    self.first_unsynced = Some(Instant::now());
                }
                if !published {
                    self.shared.publish(self.len, &mut self.staged_entries, self.next_offset);
                }
                if always {
                    self.shared.mark_durable(self.next_offset);
                }
                for p in self.pending.drain(..) {
                    answer(p.reply, Ok(p.range));
                }
            }
            Err(e) if published => {
                // Readers may have seen these records: their offsets must
                // not be handed out again, so no more appends, and the
                // rollback waits for the close (`unacked_tail`).
                self.unacked_tail = true;
                self.sync_failed = true;
                self.poison("fdatasync failed for records already readable", &e);
                // Never `NoSpace`, even for `ENOSPC`: that says the append
                // was taken back and may be retried, and these records may
                // already be in a reader's hands.
                for p in self.pending.drain(..) {
                    let source = io::Error::new(e.kind(), e.to_string());
                    answer(p.reply, Err(Error::SyncFailed { path: self.path.clone(), source }));
                }
            }
            Err(e) => {
                // Nothing of this group was acknowledged: cut it off again
                // so the file ends with acknowledged records only.
                self.reserved = self.len;
                let rolled_back =
                    self.file.set_len(self.len).and_then(|()| if always { self.file.sync_data() } else { Ok(()) });
                if let Err(e2) = rolled_back {
                    self.poison("a failed append could not be rolled back", &e2);
                }
                self.shared.opts.budget.release(written);
                let first = self.pending.first().map_or(self.next_offset, |p| p.range.start);
                self.next_offset = first;
                self.staged_entries.clear();
                tracing::warn!(path = %self.path.display(), error = %e, records = self.pending.len(), "append failed");
                for p in self.pending.drain(..) {
                    answer(
                        p.reply,
                        Err(Error::io("appending to", &self.path, io::Error::new(e.kind(), e.to_string()))),
                    );
                }
            }
        }
        self.buf.clear();
    }

    /// Makes sure the file has room for `n` more bytes without growing: if
    /// not, reserves `preallocate_bytes` more (within the segment size).
    fn reserve(&mut self, n: u64) {
        let ahead = self.shared.opts.preallocate_bytes;
        let needed = self.len + n;
        if ahead == 0 || needed <= self.reserved {
            return;
        }
        let upto = (needed + ahead).min(self.shared.opts.segment_bytes.max(needed));
        match self.file.preallocate(upto) {
            Ok(size) => self.reserved = size.max(self.len),
            Err(e) => {
                // The append grows the file as it would without a reserve.
                // The call may have grown the file part way (a full disk),
                // to a size we do not know: no more tries in this segment
                // (one failing syscall an append), and the seal or close
                // trims whatever is past `len`.
                tracing::debug!(path = %self.path.display(), error = %e, "could not preallocate");
                self.reserved = u64::MAX;
            }
        }
    }

    /// Cuts the preallocated zeros off the active segment, durably, so a
    /// sealed segment's file ends with its last record.
    fn trim_reserve(&mut self) -> Result<()> {
        if self.reserved <= self.len {
            return Ok(());
        }
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io("trimming the preallocated space of", &self.path, e))?;
        self.reserved = self.len;
        Ok(())
    }

    /// Syncs bytes written in `Interval`/`Never` mode.
    fn sync_unsynced(&mut self) -> Result<()> {
        self.first_unsynced = None;
        if self.sync_failed {
            // After a failed sync a retry may succeed without the bytes on
            // disk (the kernel marked them clean): nothing is durable now.
            return Err(Error::Poisoned);
        }
        if self.durable_len == self.len {
            return Ok(());
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.durable_len = self.len;
                self.shared.mark_durable(self.shared.end());
                Ok(())
            }
            Err(e) => {
                // These bytes were already acknowledged (the documented risk
                // of the `Interval`/`Never` modes); whether they reached the
                // disk is unknown.
                self.sync_failed = true;
                self.poison("fdatasync failed for acknowledged records", &e);
                Err(Error::io("syncing", &self.path, e))
            }
        }
    }

    /// Seals the active segment (data synced, index written) and starts a new one.
    fn roll(&mut self) -> Result<()> {
        if self.poisoned() {
            return Err(Error::Poisoned);
        }
        self.sync_unsynced()?;
        self.trim_reserve()?;
        let dir = self.shared.dir.clone();
        let index = encode_index(self.base, self.len, &self.shared.state().segments.last().expect("active").index);
        if let Err(e) = write_atomic(&*self.shared.fs, &dir, &index_name(self.base), &index) {
            // Not fatal: recovery rebuilds a missing index.
            tracing::warn!(segment = self.base, error = %e, "could not write a segment index");
        }
        let seg = create_segment(&*self.shared.fs, &dir, self.next_offset)?;
        let path = segment_path(&dir, seg.base);
        let file = self.shared.fs.open_append(&path).map_err(|e| Error::io("opening", &path, e))?;
        self.shared.opts.budget.add(seg.len);
        self.base = seg.base;
        self.len = seg.len;
        self.durable_len = seg.len;
        self.reserved = seg.len;
        self.file = file;
        self.path = path;
        self.shared.state_mut().segments.push(seg);
        Ok(())
    }
}

/// Answers an appender. It may have stopped waiting (its task was
/// cancelled); the records are in the log all the same.
fn answer(tx: oneshot::Sender<Result<Range<u64>>>, r: Result<Range<u64>>) {
    let _ = tx.send(r);
}
