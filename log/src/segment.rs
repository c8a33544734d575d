//! Segment files, their headers and names, and index files.
//!
//! ```text
//! segment file  {base:020}.log
//!   header (24 B): magic "FERRYLOG" | version:u16 | reserved:u16 |
//!                  base_offset:u64 | crc32c(previous 20 bytes):u32
//!   then record frames (see `record`)
//!
//! index file    {base:020}.idx   written once, when the segment is sealed
//!   header (40 B): magic "FERRYIDX" | version:u16 | reserved:u16 |
//!                  count:u32 | base_offset:u64 | data_len:u64 |
//!                  crc32c(bytes 8..36 and all entries):u32 | reserved:u32
//!   entries: count × { rel_offset:u32 | position:u32 }
//! ```
//!
//! DO NOT REORDER: this is the on-disk format, version 1.

use std::path::{Path, PathBuf};

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"FERRYLOG";
/// Magic bytes at the start of every index file.
pub const INDEX_MAGIC: &[u8; 8] = b"FERRYIDX";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Length of a segment header.
pub const SEGMENT_HEADER: usize = 24;
/// Length of an index header.
pub const INDEX_HEADER: usize = 40;
/// Length of one index entry.
pub const INDEX_ENTRY: usize = 8;

/// One index entry: a record's offset relative to the segment base, and the
/// byte position of its frame in the segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// `offset - base`.
    pub rel: u32,
    /// Byte position of the frame in the segment file.
    pub pos: u32,
}

/// The file name of a segment with this base offset.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The file name of the index of the segment with this base offset.
pub fn index_name(base: u64) -> String {
    format!("{base:020}.idx")
}

/// Parses `{base:020}.{ext}`; `None` for any other name.
pub fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Path of the segment file in `dir`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(segment_name(base))
}

/// Path of the index file in `dir`.
pub fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(index_name(base))
}

/// The header bytes of a new segment.
pub fn encode_segment_header(base: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns the base offset it names.
pub fn check_segment_header(h: &[u8]) -> Result<u64, &'static str> {
    if h.len() < SEGMENT_HEADER {
        return Err("segment shorter than its header");
    }
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
    if crc32c::crc32c(&h[0..20]) != crc {
        return Err("segment header CRC32C mismatch");
    }
    if u16::from_le_bytes([h[8], h[9]]) != VERSION {
        return Err("unsupported segment version");
    }
    Ok(u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")))
}

/// The bytes of an index file.
pub fn encode_index(base: u64, data_len: u64, entries: &[IndexEntry]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(INDEX_HEADER + entries.len() * INDEX_ENTRY);
    buf.extend_from_slice(INDEX_MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    buf.extend_from_slice(&base.to_le_bytes());
    buf.extend_from_slice(&data_len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]); // crc + reserved, patched below
    for e in entries {
        buf.extend_from_slice(&e.rel.to_le_bytes());
        buf.extend_from_slice(&e.pos.to_le_bytes());
    }
    let crc = index_crc(&buf);
    buf[32..36].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn index_crc(buf: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&buf[8..32]), &buf[INDEX_HEADER..])
}

/// Decodes and checks an index file against its segment's base and length.
pub fn decode_index(buf: &[u8], base: u64, data_len: u64) -> Result<Vec<IndexEntry>, &'static str> {
    if buf.len() < INDEX_HEADER || &buf[0..8] != INDEX_MAGIC {
        return Err("bad index magic");
    }
    if u16::from_le_bytes([buf[8], buf[9]]) != VERSION {
        return Err("unsupported index version");
    }
    let count = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")) as usize;
    if buf.len() != INDEX_HEADER + count * INDEX_ENTRY {
        return Err("index length does not match its count");
    }
    let crc = u32::from_le_bytes(buf[32..36].try_into().expect("4 bytes"));
    if index_crc(buf) != crc {
        return Err("index CRC32C mismatch");
    }
    if u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")) != base {
        return Err("index names another segment");
    }
    if u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes")) != data_len {
        return Err("index was written for another segment length");
    }
    let entries: Vec<IndexEntry> = buf[INDEX_HEADER..]
        .chunks_exact(INDEX_ENTRY)
        .map(|c| IndexEntry {
            rel: u32::from_le_bytes(c[0..4].try_into().expect("4 bytes")),
            pos: u32::from_le_bytes(c[4..8].try_into().expect("4 bytes")),
        })
        .collect();
    let ordered = entries.windows(2).all(|w| w[0].rel < w[1].rel && w[0].pos < w[1].pos);
    let in_bounds = entries.iter().all(|e| (e.pos as u64) >= SEGMENT_HEADER as u64 && (e.pos as u64) < data_len);
    if !ordered || !in_bounds {
        return Err("index entries out of order or out of bounds");
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        for base in [0, 1, 42, 1 << 40, u64::MAX] {
            assert_eq!(parse_name(&segment_name(base), "log"), Some(base));
            assert_eq!(parse_name(&index_name(base), "idx"), Some(base));
            assert_eq!(parse_name(&segment_name(base), "idx"), None);
        }
        assert_eq!(segment_name(7), "00000000000000000007.log");
        for bad in
            ["7.log", "0000000000000000000x.log", "00000000000000000007.log.tmp", ".log", "000000000000000000007.log"]
        {
            assert_eq!(parse_name(bad, "log"), None, "{bad}");
        }
    }

    #[test]
    fn a_segment_header_round_trips_and_catches_every_flipped_bit() {
        let h = encode_segment_header(1234);
        assert_eq!(check_segment_header(&h), Ok(1234));
        for bit in 0..SEGMENT_HEADER * 8 {
            let mut bad = h;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(check_segment_header(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn an_index_round_trips_and_refuses_a_different_segment_length() {
        let entries = vec![IndexEntry { rel: 0, pos: 24 }, IndexEntry { rel: 1, pos: 100 }];
        let buf = encode_index(10, 200, &entries);
        assert_eq!(decode_index(&buf, 10, 200), Ok(entries));
        assert!(decode_index(&buf, 10, 201).is_err());
        assert!(decode_index(&buf, 11, 200).is_err());
        assert!(decode_index(&buf[..buf.len() - 1], 10, 200).is_err());
        let mut flipped = buf.clone();
        flipped[INDEX_HEADER + 5] ^= 4;
        assert!(decode_index(&flipped, 10, 200).is_err());
    }
}

/// A segment as the log holds it in memory.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of the first record this segment may hold (from its name).
    pub base: u64,
    /// A read handle, shared with readers.
    pub file: std::sync::Arc<dyn crate::fs::ReadAt>,
    /// One entry per readable record, in offset order.
    pub index: Vec<IndexEntry>,
    /// Bytes of the file that hold readable frames (header included).
    pub len: u64,
}

impl Segment {
    /// One past the last record's offset (`base` when empty).
    pub fn end_offset(&self) -> u64 {
        self.index.last().map_or(self.base, |e| self.base + e.rel as u64 + 1)
    }

    /// Byte position just past the frame of index entry `i`.
    pub fn frame_end(&self, i: usize) -> u64 {
        self.index.get(i + 1).map_or(self.len, |e| e.pos as u64)
    }
}
