//! An in-memory [`Fs`] for tests: live and durable bytes kept apart.
//!
//! * File contents become durable on `sync_data`; names (create, rename,
//!   remove) become durable on `sync_dir` of their directory.
//! * [`MemFs::crash`] returns the filesystem a restarted process would see:
//!   durable names and durable bytes, plus — as real disks do — a prefix of the
//!   unsynced tail of each file, cut at a 512 B boundary chosen by a seed
//!   (a torn write).
//! * Faults can be injected: the next write or sync fails with a given error
//!   kind, or a byte capacity makes writes fail with `StorageFull` after
//!   writing what fits (a partial write, as `write(2)` does).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fs::{AppendFile, Fs, ReadAt};

/// Size of the unit a torn write keeps or loses.
pub const TORN_UNIT: usize = 512;

/// A fault to inject into the next matching operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The next `write_all` fails with this kind, having written nothing.
    Write(io::ErrorKind),
    /// The next `sync_data` fails with this kind; nothing becomes durable.
    Sync(io::ErrorKind),
    /// The next `sync_data` of the file at this path fails with this kind
    /// (other files' syncs, e.g. a cursor commit running meanwhile, pass).
    SyncOf(PathBuf, io::ErrorKind),
}

#[derive(Default)]
struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
}

type FileRef = Arc<Mutex<FileData>>;

#[derive(Default)]
struct State {
    live: BTreeMap<PathBuf, FileRef>,
    durable: BTreeMap<PathBuf, FileRef>,
    faults: VecDeque<Fault>,
    capacity: Option<u64>,
    writes: u64,
    syncs: u64,
}

/// The in-memory filesystem. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct MemFs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for MemFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemFs").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: not found", path.display()))
}

impl MemFs {
    /// An empty filesystem.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a fault for the next matching operation.
    pub fn inject(&self, fault: Fault) {
        lock(&self.state).faults.push_back(fault);
    }

    /// Limits the total live bytes of all files; `None` removes the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.state).capacity = bytes;
    }

    /// Number of `write_all` and `sync_data` calls so far.
    pub fn op_counts(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.writes, s.syncs)
    }

    /// The filesystem after a power loss. `seed` picks how much of each
    /// file's unsynced tail survives (0 keeps none of it).
    pub fn crash(&self, seed: u64) -> MemFs {
        let s = lock(&self.state);
        let mut rng = seed;
        let mut durable = BTreeMap::new();
        for (path, file) in &s.durable {
            let f = lock(file);
            let mut bytes = f.durable.clone();
            if seed != 0 && f.live.len() > bytes.len() && f.live.starts_with(&bytes) {
                // Keep whole 512 B units of the unsynced tail, counted from
                // the file's start, as a disk that wrote some sectors would.
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let max_units = f.live.len() / TORN_UNIT;
                let min_units = bytes.len() / TORN_UNIT;
                if max_units > min_units {
                    let keep = min_units + (rng >> 33) as usize % (max_units - min_units + 1);
                    let end = (keep * TORN_UNIT).max(bytes.len());
                    bytes = f.live[..end].to_vec();
                }
            }
            let data = FileData { live: bytes.clone(), durable: bytes };
            durable.insert(path.clone(), Arc::new(Mutex::new(data)));
        }
        MemFs { state: Arc::new(Mutex::new(State { live: durable.clone(), durable, ..State::default() })) }
    }

    /// The live bytes of a file (for tests that damage files).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = lock(&self.state);
        s.live.get(path).map(|f| lock(f).live.clone())
    }

    /// Replaces a file's bytes, live and durable (a damaged disk).
    pub fn set_contents(&self, path: &Path, bytes: Vec<u8>) {
        let mut s = lock(&self.state);
        let file = Arc::new(Mutex::new(FileData { live: bytes.clone(), durable: bytes }));
        s.live.insert(path.to_path_buf(), file.clone());
        s.durable.insert(path.to_path_buf(), file);
    }

    /// Removes a file, live and durable.
    pub fn delete(&self, path: &Path) {
        let mut s = lock(&self.state);
        s.live.remove(path);
        s.durable.remove(path);
    }

    fn file(&self, path: &Path) -> io::Result<FileRef> {
        lock(&self.state).live.get(path).cloned().ok_or_else(|| not_found(path))
    }
}

#[derive(Debug)]
struct MemFile {
    fs: MemFs,
    path: PathBuf,
    data: FileRef,
}

impl fmt::Debug for FileData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileData(live {}, durable {})", self.live.len(), self.durable.len())
    }
}

impl ReadAt for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let d = lock(&self.data);
        let start = usize::try_from(pos).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > d.live.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d.live[start..end]);
        Ok(())
    }
}

impl AppendFile for MemFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut s = lock(&self.fs.state);
        s.writes += 1;
        if let Some(i) = s.faults.iter().position(|f| matches!(f, Fault::Write(_))) {
            if let Some(Fault::Write(kind)) = s.faults.remove(i) {
                return Err(io::Error::new(kind, "injected write fault"));
            }
        }
        let allowed = match s.capacity {
            Some(cap) => {
                let used: u64 = s.live.values().map(|f| lock(f).live.len() as u64).sum();
                cap.saturating_sub(used).min(buf.len() as u64) as usize
            }
            None => buf.len(),
        };
        lock(&self.data).live.extend_from_slice(&buf[..allowed]);
        if allowed < buf.len() {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left (MemFs capacity)"));
        }
        Ok(())
    }

    /// Not modelled: appends grow the file as before (the real
    /// filesystem's zero tail is covered by tests on disk).
    fn preallocate(&mut self, _upto: u64) -> io::Result<u64> {
        Ok(lock(&self.data).live.len() as u64)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut s = lock(&self.fs.state);
        s.syncs += 1;
        let path = &self.path;
        let hit = s.faults.iter().position(|f| match f {
            Fault::Sync(_) => true,
            Fault::SyncOf(p, _) => p == path,
            Fault::Write(_) => false,
        });
        if let Some(Fault::Sync(kind) | Fault::SyncOf(_, kind)) = hit.and_then(|i| s.faults.remove(i)) {
            return Err(io::Error::new(kind, "injected sync fault"));
        }
        let mut d = lock(&self.data);
        d.durable = d.live.clone();
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut d = lock(&self.data);
        d.live.resize(len as usize, 0);
        Ok(())
    }
}

impl Fs for MemFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = lock(&self.state);
        Ok(s.live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.file(path)?;
        let data = lock(&f).live.clone();
        Ok(data)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let f = self.file(path)?;
        let len = lock(&f).live.len() as u64;
        Ok(len)
    }

    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(MemFile { fs: self.clone(), path: path.to_path_buf(), data: self.file(path)? }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let data = {
            let mut s = lock(&self.state);
            s.live.entry(path.to_path_buf()).or_default().clone()
        };
        Ok(Box::new(MemFile { fs: self.clone(), path: path.to_path_buf(), data }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let f = s.live.remove(from).ok_or_else(|| not_found(from))?;
        s.live.insert(to.to_path_buf(), f);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state).live.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable.retain(|p, _| !in_dir(p));
        let live: Vec<_> = s.live.iter().filter(|(p, _)| in_dir(p)).map(|(p, f)| (p.clone(), f.clone())).collect();
        s.durable.extend(live);
        Ok(())
    }
}
