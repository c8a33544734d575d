//! `ferry-log`: the durable local log under Ferry's outbox and embedded broker.
//!
//! **Promise.** A record whose append returned `Ok` under [`FsyncMode::Always`]
//! is on disk (`fdatasync` done) and will be read back, byte for byte, after
//! any crash, until every cursor has passed it and its segment is deleted.
//! The log never panics on what it finds on disk: damage is repaired or
//! skipped, and always reported ([`RecoveryReport`], [`ReadBatch::skipped`],
//! `tracing` warnings). It knows nothing of HTTP or NATS.
//!
//! # Shape: one log per topic
//!
//! A log is one directory. The sidecar opens one log per topic (each with its
//! own writer thread and group commit) rather than one shared log with a
//! cursor per topic, because:
//! * a topic whose broker side is stuck only holds back its own segments;
//!   with a shared log its cursor would pin every other topic's data too, and
//!   each topic's forwarder would have to read past the others' records;
//! * `fdatasync` is per file, so one shared file is the only way to share a
//!   sync between topics; produce calls are per topic and concurrent calls
//!   on one topic are what group commit needs to batch;
//! * the embedded broker maps a topic to a log and a consumer group to a cursor.
//!
//! The topics of one outbox share a [`Budget`] (a byte limit across logs).
//!
//! # Invariants
//! 1. Offsets are assigned densely and increase; an offset is never reused
//!    for a different acknowledged record. Gaps appear only where a damaged
//!    record was skipped.
//! 2. A record is visible to readers only after its group was written (and,
//!    with `Always`, synced, unless [`LogOptions::readable_before_sync`]);
//!    an append is answered only after that. [`Log::durable_offset`] says
//!    what is on disk.
//! 3. A failed write or sync is rolled back (file truncated to its last good
//!    length) before the callers hear of it, so the file ends in acknowledged
//!    records. If the rollback fails, or readers may already have seen the
//!    records (a failed sync with `readable_before_sync`: then the rollback
//!    is done at close), the log refuses further appends and syncs
//!    ([`Error::Poisoned`]) and its durable offset stays where it was, until
//!    reopened.
//! 4. Sealed segments were synced whole before their index was written;
//!    only the active (last) segment can have a torn tail.
//! 5. A segment is deleted only when every named cursor is at or past its
//!    end and it is not the active segment; with no cursor nothing is deleted.
//! 6. Opening a log syncs its active segment, so a tail a killed process
//!    wrote but never synced is durable before anything builds on it.
//! 7. The active segment's file may run past its last record into zeros the
//!    writer preallocated ([`LogOptions::preallocate_bytes`]), so that an
//!    append's `fdatasync` need not commit a new file size. Sealed segments
//!    and closed logs end with their last record, also when a
//!    preallocation failed part way (a full disk: the segment then grows
//!    append by append, and its seal cuts off what the failed call added);
//!    recovery cuts the zeros off (no frame starts with a zero length),
//!    reporting only non-zero bytes there as a torn tail.
//!
//! # On disk
//! ```text
//! <dir>/00000000000000000000.log   segment: header + record frames
//!       00000000000000000000.idx   its index, written when sealed
//!       00000000000000004096.log   the active segment (no .idx yet)
//!       cursors                    named committed offsets
//! ```
//! All integers are little-endian. Layouts (DO NOT REORDER; a change needs a
//! new version number):
//! ```text
//! segment header (24 B) magic "FERRYLOG" | version:u16=1 | reserved:u16 |
//!                       base_offset:u64 | crc32c(bytes 0..20):u32
//! record frame          body_len:u32 | crc32c(body):u32 | body
//!   body                offset:u64 | timestamp_ms:u64 | flags:u8 (bit0: has key) |
//!                       id_len:u16 id | key_len:u16 key | header_count:u16 |
//!                       { name_len:u16 name | value_len:u32 value }* |
//!                       payload_len:u32 payload
//! index header (40 B)   magic "FERRYIDX" | version:u16=1 | reserved:u16 | count:u32 |
//!                       base_offset:u64 | data_len:u64 | crc32c:u32 | reserved:u32
//!   entries             count × { offset - base:u32 | frame position:u32 }
//!                       (crc32c over header bytes 8..32 and the entries)
//! cursors               magic "FERRYCUR" | version:u16=1 | count:u16 |
//!                       { name_len:u16 name | offset:u64 }* | crc32c(all before):u32
//! ```
//! The index and cursor files are replaced atomically: `*.tmp`, fsync,
//! rename, directory fsync. An index is trusted only if its CRC32C, base and
//! `data_len` (the segment length when sealed) match.
//!
//! # Recovery (see [`recovery`])
//! Reopening reads every sealed segment's index file and scans only the
//! active segment, so its cost is bounded by the segment size, not the log
//! size. A torn tail is truncated; a damaged record followed by valid ones
//! is skipped and reported; a missing or damaged index is rebuilt by a scan.
//!
//! # What each fsync mode can lose
//! * [`FsyncMode::Always`]: nothing acknowledged. Appends that were written
//!   but not yet answered when the power went may or may not survive.
//! * [`FsyncMode::Interval`]: on power loss or kernel crash, up to the
//!   interval of acknowledged appends; on a process crash, nothing.
//! * [`FsyncMode::Never`]: on power loss, whatever the kernel had not yet
//!   written back (typically up to 30 s); on a process crash, nothing.
//!
//! # Errors
//! [`Error::Full`] when the [`Budget`] would be exceeded, [`Error::NoSpace`]
//! on `ENOSPC`: both change nothing on disk and the log stays usable.

pub mod cursors;
mod error;
pub mod fs;
mod log;
pub mod memfs;
mod options;
pub mod record;
pub mod recovery;
pub mod segment;
mod writer;

pub use crate::error::{Error, Result};
pub use crate::fs::{Fs, StdFs};
pub use crate::log::{Log, LogStats, ReadBatch};
pub use crate::options::{
    Budget, FsyncMode, LogOptions, DEFAULT_GROUP_BYTES, DEFAULT_PREALLOCATE_BYTES, DEFAULT_SEGMENT_BYTES,
};
pub use crate::record::{now_ms, NewRecord, Record};
pub use crate::recovery::{Corruption, RecoveryReport, Truncation};
