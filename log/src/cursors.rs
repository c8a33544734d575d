//! Named cursors (committed offsets), persisted atomically in one file.
//!
//! ```text
//! file `cursors`: magic "FERRYCUR" | version:u16 | count:u16 |
//!                 count × { name_len:u16 name value:u64 } | crc32c(all before):u32
//! ```
//!
//! A cursor's value is the first offset *not* yet done: every record below it
//! has been handled by that cursor's owner (forwarded, consumed, ...).

use std::collections::BTreeMap;

/// File name of the cursor file inside a log directory.
pub const CURSORS_FILE: &str = "cursors";
const MAGIC: &[u8; 8] = b"FERRYCUR";
const VERSION: u16 = 1;

/// Encodes the cursor map.
pub fn encode(cursors: &BTreeMap<String, u64>) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(cursors.len() as u16).to_le_bytes());
    for (name, value) in cursors {
        buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&value.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes the cursor map, or says what is wrong with the bytes.
pub fn decode(buf: &[u8]) -> Result<BTreeMap<String, u64>, &'static str> {
    if buf.len() < 16 || &buf[0..8] != MAGIC {
        return Err("bad cursor file magic");
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("cursor file CRC32C mismatch");
    }
    if u16::from_le_bytes([body[8], body[9]]) != VERSION {
        return Err("unsupported cursor file version");
    }
    let count = u16::from_le_bytes([body[10], body[11]]) as usize;
    let mut pos = 12;
    let mut out = BTreeMap::new();
    for _ in 0..count {
        let len =
            u16::from_le_bytes(body.get(pos..pos + 2).ok_or("cursor file too short")?.try_into().expect("2")) as usize;
        pos += 2;
        let name = body.get(pos..pos + len).ok_or("cursor file too short")?;
        let name = std::str::from_utf8(name).map_err(|_| "cursor name is not UTF-8")?;
        pos += len;
        let value = u64::from_le_bytes(body.get(pos..pos + 8).ok_or("cursor file too short")?.try_into().expect("8"));
        pos += 8;
        out.insert(name.to_owned(), value);
    }
    if pos != body.len() {
        return Err("cursor file has trailing bytes");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_a_flipped_bit_is_refused() {
        let mut m = BTreeMap::new();
        m.insert("forwarded".to_owned(), 17);
        m.insert("group-a".to_owned(), u64::MAX);
        let buf = encode(&m);
        assert_eq!(decode(&buf), Ok(m));
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad).is_err(), "bit {bit}");
        }
    }
}
