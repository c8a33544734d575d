//! The log's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the log. Each variant is distinct so the
/// sidecar can map it to its own answer (`Full` → 429/503, `NoSpace` → 507).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured byte limit would be exceeded. Nothing was written.
    #[error("log is full: {used} of {limit} bytes used, {requested} more requested")]
    Full {
        /// The limit in bytes.
        limit: u64,
        /// Bytes in use when the append was refused.
        used: u64,
        /// Bytes the refused append needed.
        requested: u64,
    },
    /// The filesystem answered `ENOSPC`. What this append wrote was rolled
    /// back; the log stays usable and the append can be retried later.
    #[error("no space left on device while {op} {path}")]
    NoSpace {
        /// What the log was doing.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other I/O error, with the operation and file.
    #[error("I/O error while {op} {path}")]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `fdatasync` failed for records readers could already see
    /// ([`crate::LogOptions::readable_before_sync`]): they may have been read
    /// (and passed on), so they are neither durable nor taken back, and the
    /// log is poisoned. Not retryable on this log; reopen it.
    #[error("fdatasync of {path} failed after readers could see its newest records (they may have been passed on); the log refuses appends until reopened")]
    SyncFailed {
        /// The segment file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// One record is larger than the log accepts.
    #[error("record of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded size of the record.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A field does not fit the record format (e.g. an id over 65535 bytes).
    #[error("invalid record: {0}")]
    Invalid(&'static str),
    /// A write or sync failed and could not be rolled back, so the log no
    /// longer knows what is on disk. Reopen it (recovery sorts it out).
    #[error("log is unusable after an earlier I/O failure; reopen it")]
    Poisoned,
    /// The writer thread is gone (the log is closing).
    #[error("log is closed")]
    Closed,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        // A full disk, or a full quota (a quota'd volume): room may come back.
        if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
            Error::NoSpace { op, path, source }
        } else {
            Error::Io { op, path, source }
        }
    }

    /// True for errors after which the same append may succeed later
    /// (capacity or disk space came back).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Full { .. } | Error::NoSpace { .. })
    }
}

/// `Result` with the log's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
