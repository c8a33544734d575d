//! Record encoding: the frame written to segment files.
//!
//! ```text
//! frame  := body_len:u32  crc:u32  body            (little-endian)
//! body   := offset:u64 timestamp_ms:u64 flags:u8
//!           id_len:u16 id  key_len:u16 key
//!           header_count:u16 { name_len:u16 name value_len:u32 value }*
//!           payload_len:u32 payload
//! crc    := CRC32C(body)
//! flags  := bit 0 set when the record has a key
//! ```
//!
//! DO NOT REORDER these fields: the byte layout is the on-disk format
//! (segment version 1). Any change needs a new segment version.

use bytes::{BufMut, Bytes};

use crate::error::{Error, Result};

/// Bytes before the body: `body_len` and `crc`.
pub const FRAME_HEADER: usize = 8;
/// The smallest possible body: offset, timestamp, flags, three u16 lengths, payload length.
pub const MIN_BODY: usize = 8 + 8 + 1 + 2 + 2 + 2 + 4;
/// The largest body the log accepts (64 MiB); larger lengths are corruption.
pub const MAX_BODY: usize = 64 << 20;
const FLAG_KEY: u8 = 1;

/// A record to append: what the caller provides. The log assigns the offset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewRecord {
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The message id (unique per message; the broker dedupes on it).
    pub id: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// Headers, in order. Names need not be unique.
    pub headers: Vec<(String, String)>,
    /// The payload bytes.
    pub payload: Bytes,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the log: dense, increasing, never reused.
    pub offset: u64,
    /// Milliseconds since the Unix epoch, as given on append.
    pub timestamp_ms: u64,
    /// The message id.
    pub id: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The payload (a slice of the read buffer; no copy).
    pub payload: Bytes,
}

impl NewRecord {
    /// A record with just an id and a payload, stamped now.
    pub fn new(id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        NewRecord { timestamp_ms: now_ms(), id: id.into(), key: None, headers: Vec::new(), payload: payload.into() }
    }

    /// Sets the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Size of this record on disk, frame included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER
            + MIN_BODY
            + self.id.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum::<usize>()
            + self.payload.len()
    }

    /// Appends the frame to `buf` with offset 0 and no CRC; the writer
    /// patches both with [`seal_frame`] once the offset is known.
    pub(crate) fn encode_unsealed(&self, buf: &mut Vec<u8>) -> Result<()> {
        let len = self.encoded_len();
        if len - FRAME_HEADER > MAX_BODY {
            return Err(Error::TooLarge { size: len, max: MAX_BODY + FRAME_HEADER });
        }
        let u16_len = |s: usize, what: &'static str| u16::try_from(s).map_err(|_| Error::Invalid(what));
        let id_len = u16_len(self.id.len(), "id longer than 65535 bytes")?;
        let key_len = u16_len(self.key.as_ref().map_or(0, String::len), "key longer than 65535 bytes")?;
        let count = u16_len(self.headers.len(), "more than 65535 headers")?;
        for (name, _) in &self.headers {
            u16_len(name.len(), "header name longer than 65535 bytes")?;
        }
        buf.reserve(len);
        buf.put_u32_le((len - FRAME_HEADER) as u32);
        buf.put_u32_le(0);
        buf.put_u64_le(0);
        buf.put_u64_le(self.timestamp_ms);
        buf.put_u8(if self.key.is_some() { FLAG_KEY } else { 0 });
        buf.put_u16_le(id_len);
        buf.put_slice(self.id.as_bytes());
        buf.put_u16_le(key_len);
        buf.put_slice(self.key.as_deref().unwrap_or("").as_bytes());
        buf.put_u16_le(count);
        for (name, value) in &self.headers {
            buf.put_u16_le(name.len() as u16);
            buf.put_slice(name.as_bytes());
            buf.put_u32_le(value.len() as u32);
            buf.put_slice(value.as_bytes());
        }
        buf.put_u32_le(self.payload.len() as u32);
        buf.put_slice(&self.payload);
        Ok(())
    }
}

/// Writes `offset` into an unsealed frame and computes its CRC32C.
pub(crate) fn seal_frame(frame: &mut [u8], offset: u64) {
    frame[FRAME_HEADER..FRAME_HEADER + 8].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&frame[FRAME_HEADER..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes remain than the frame needs (a torn tail, or a bad length).
    Truncated,
    /// The length field is outside `MIN_BODY..=MAX_BODY`.
    BadLength,
    /// The CRC32C of the body does not match.
    BadCrc,
    /// The CRC matched but the fields do not add up (should not happen).
    BadFields,
}

/// The total frame length at the start of `buf`, if its length field is plausible.
pub(crate) fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < FRAME_HEADER {
        return Err(FrameError::Truncated);
    }
    let body = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(MIN_BODY..=MAX_BODY).contains(&body) {
        return Err(FrameError::BadLength);
    }
    if buf.len() < FRAME_HEADER + body {
        return Err(FrameError::Truncated);
    }
    Ok(FRAME_HEADER + body)
}

/// Checks the frame at the start of `buf`; returns its length and offset.
pub(crate) fn check_frame(buf: &[u8]) -> Result<(usize, u64), FrameError> {
    let len = frame_len(buf)?;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[FRAME_HEADER..len]) != crc {
        return Err(FrameError::BadCrc);
    }
    let offset = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    Ok((len, offset))
}

/// Decodes the frame at the start of `buf` (a slice of `whole` starting at `at`),
/// sharing payload memory with `whole`.
pub(crate) fn decode(whole: &Bytes, at: usize) -> Result<(Record, usize), FrameError> {
    let buf = &whole[at..];
    let (len, offset) = check_frame(buf)?;
    let mut r = Reader { buf: &buf[..len], pos: FRAME_HEADER + 8 };
    let timestamp_ms = r.u64()?;
    let flags = r.u8()?;
    let id = r.string16()?;
    let key = r.string16()?;
    let count = r.u16()?;
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = r.string16()?;
        let vlen = r.u32()? as usize;
        let value = r.string(vlen)?;
        headers.push((name, value));
    }
    let plen = r.u32()? as usize;
    let start = r.pos;
    r.take(plen)?;
    if r.pos != len {
        return Err(FrameError::BadFields);
    }
    let payload = whole.slice(at + start..at + start + plen);
    let key = if flags & FLAG_KEY != 0 { Some(key) } else { None };
    Ok((Record { offset, timestamp_ms, id, key, headers, payload }, len))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or(FrameError::BadFields)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, n: usize) -> Result<String, FrameError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FrameError::BadFields)
    }
    fn string16(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        self.string(n)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_frame() {
        let rec = NewRecord::new("id-1", &b"hello"[..]).with_key("k").with_header("a", "b").with_header("c", "");
        let mut buf = Vec::new();
        rec.encode_unsealed(&mut buf).unwrap();
        assert_eq!(buf.len(), rec.encoded_len());
        seal_frame(&mut buf, 42);
        let whole = Bytes::from(buf);
        let (got, len) = decode(&whole, 0).unwrap();
        assert_eq!(len, whole.len());
        assert_eq!(got.offset, 42);
        assert_eq!(got.id, "id-1");
        assert_eq!(got.key.as_deref(), Some("k"));
        assert_eq!(got.headers, rec.headers);
        assert_eq!(got.payload, rec.payload);
        assert_eq!(got.timestamp_ms, rec.timestamp_ms);
    }

    #[test]
    fn an_empty_key_differs_from_no_key() {
        let mut buf = Vec::new();
        NewRecord::new("a", Bytes::new()).with_key("").encode_unsealed(&mut buf).unwrap();
        seal_frame(&mut buf, 0);
        let (got, _) = decode(&Bytes::from(buf), 0).unwrap();
        assert_eq!(got.key.as_deref(), Some(""));
    }

    #[test]
    fn every_flipped_bit_is_caught_by_the_crc_or_the_length_check() {
        let mut buf = Vec::new();
        NewRecord::new("id", &b"payload"[..]).encode_unsealed(&mut buf).unwrap();
        seal_frame(&mut buf, 7);
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&Bytes::from(bad), 0).is_err(), "bit {bit} not caught");
        }
    }

    #[test]
    fn an_oversized_id_is_refused() {
        let rec = NewRecord::new("x".repeat(70_000), Bytes::new());
        assert!(matches!(rec.encode_unsealed(&mut Vec::new()), Err(Error::Invalid(_))));
    }
}
