//! The filesystem seam between the log and the disk.
//!
//! Production uses [`StdFs`]; tests use [`crate::memfs::MemFs`], which keeps
//! live and durable bytes apart so a simulated crash drops whatever was never
//! synced. The trait holds only what the log needs.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A file opened for positional reads.
pub trait ReadAt: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `pos`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
}

/// A file opened for appending. Every write goes to the end of what was
/// written (which, after [`AppendFile::preallocate`], is before the end of
/// the file).
pub trait AppendFile: Send + Debug {
    /// Appends all of `buf`. On error an unknown prefix may have been written.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Reserves disk space up to byte `upto` past the file's start, so that
    /// appends up to there allocate no blocks and, above all, do not grow the
    /// file: an `fdatasync` then has no size change to commit to the
    /// filesystem journal (on ext4, a small append's sync took ~190 µs and an
    /// overwrite of reserved space ~130 µs). The file reads as zeros past
    /// what was written; [`AppendFile::set_len`] gives the space back.
    /// Returns the file's size afterwards, which stays as it was where
    /// preallocation is not supported. Best effort: an error changes nothing.
    fn preallocate(&mut self, upto: u64) -> io::Result<u64>;
    /// `fdatasync`: makes the written bytes durable.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates (or extends) the file to `len` bytes, dropping any
    /// preallocated space past it; appends continue at `len`. Not durable
    /// until synced.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The directory and file operations the log uses.
pub trait Fs: Send + Sync + Debug {
    /// `mkdir -p`.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The length of a file.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Opens a file for positional reads.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>>;
    /// Opens a file for appending, creating it if missing.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Atomically replaces `to` with `from` (not durable until `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file (not durable until `sync_dir`).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsyncs a directory, making creates, renames and removes in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile(File);

impl ReadAt for StdFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, pos)
    }
}

/// A file appended to with positional writes at `end`, which preallocated
/// space may follow.
#[derive(Debug)]
struct StdAppendFile {
    file: File,
    /// Where the next write goes: the end of what was written.
    end: u64,
}

impl AppendFile for StdAppendFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, self.end)?;
        self.end += buf.len() as u64;
        Ok(())
    }
    fn preallocate(&mut self, upto: u64) -> io::Result<u64> {
        let size = self.file.metadata()?.len();
        if upto <= size {
            return Ok(size);
        }
        preallocate(&self.file, size, upto - size)?;
        self.file.metadata().map(|m| m.len())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.end = len;
        Ok(())
    }
}

/// `fallocate` without `FALLOC_FL_KEEP_SIZE`: the file grows to
/// `from + len`, the new range reading as zeros.
#[cfg(target_os = "linux")]
fn preallocate(file: &File, from: u64, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), from, len).map_err(io::Error::from)
}

/// Elsewhere appends simply grow the file.
#[cfg(not(target_os = "linux"))]
fn preallocate(_file: &File, _from: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

impl Fs for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(StdFile(File::open(path)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let file = OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
        let end = file.metadata()?.len();
        Ok(Box::new(StdAppendFile { file, end }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Replaces `dir/name` atomically and durably: write `name.tmp`, fsync it,
/// rename it over `name`, fsync the directory. A crash leaves either the old
/// or the new file, never a mix.
pub fn write_atomic(fs: &dyn Fs, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    match fs.remove(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = fs.open_append(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    fs.rename(&tmp, &dir.join(name))?;
    fs.sync_dir(dir)
}
