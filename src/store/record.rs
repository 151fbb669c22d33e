//! The on-disk format of the log (`docs/storage.md`): segment headers and
//! records, their encoding and their checked decoding. Pure: no I/O.
//!
//! A segment is a 64-byte header followed by records. Every write the log
//! makes (one group commit) starts on a [`BLOCK`] boundary and is padded with
//! zeros up to the next one, so a write never rewrites a block that holds
//! stored records, and a reader that meets damage can look for the next
//! intact write at the following block boundaries.
//!
//! ```text
//! record  = len: u32 LE | crc: u32 LE | body (len bytes)
//! body    = kind: u8 | 0: u8 | id_len: u16 LE | epoch: u64 LE | seq: u64 LE
//!           | document id (id_len bytes) | data
//! ```
//! `crc` is the CRC-32C of the body. A `len` of 0 is padding up to the next
//! block boundary.

/// Writes start on, and are padded to, multiples of this many bytes.
pub const BLOCK: u64 = 4096;

/// Bytes of the segment header.
pub const HEADER_BYTES: u64 = 64;

const MAGIC: &[u8; 16] = b"docrelay-log\0\0\0\x01";

/// Bytes before a record's body (length and checksum).
pub const RECORD_HEAD: usize = 8;
/// Bytes of a body before the document id.
const BODY_HEAD: usize = 20;

/// Largest body a reader accepts; anything longer is damage.
pub const MAX_BODY: usize = 1 << 30;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An accepted operation: `data` is its broadcast (the operation
    /// message's JSON, as every subscriber received it).
    Op = 1,
    /// A snapshot: `data` is the state's JSON, stored at `seq`.
    Snapshot = 2,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Op),
            2 => Some(Kind::Snapshot),
            _ => None,
        }
    }
}

/// A decoded record, borrowing from the segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: Kind,
    pub epoch: u64,
    pub seq: u64,
    pub document: &'a str,
    pub data: &'a [u8],
}

/// Appends one encoded record to `out`.
pub fn encode(out: &mut Vec<u8>, kind: Kind, epoch: u64, seq: u64, document: &str, data: &[u8]) {
    let body_len = BODY_HEAD + document.len() + data.len();
    out.reserve(RECORD_HEAD + body_len);
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&(document.len() as u16).to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(document.as_bytes());
    out.extend_from_slice(data);
    let crc = crc32c::crc32c(&out[start + RECORD_HEAD..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes one record takes.
pub fn encoded_len(document: &str, data: &[u8]) -> usize {
    RECORD_HEAD + BODY_HEAD + document.len() + data.len()
}

/// The segment header for segment `n`, written by core `core`.
pub fn header(n: u64, core: u32) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..16].copy_from_slice(MAGIC);
    h[16..24].copy_from_slice(&n.to_le_bytes());
    h[24..28].copy_from_slice(&core.to_le_bytes());
    h[28..32].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns the segment number it names.
pub fn check_header(bytes: &[u8]) -> Result<u64, &'static str> {
    if bytes.len() < HEADER_BYTES as usize {
        return Err("shorter than a segment header");
    }
    if &bytes[..16] != MAGIC {
        return Err("not a docrelay log segment (bad magic)");
    }
    let crc = u32::from_le_bytes(bytes[32..36].try_into().unwrap());
    if crc != crc32c::crc32c(&bytes[..32]) {
        return Err("segment header checksum mismatch");
    }
    if u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as u64 != BLOCK {
        return Err("segment written with another block size");
    }
    Ok(u64::from_le_bytes(bytes[16..24].try_into().unwrap()))
}

/// Decodes the record that starts at `bytes[0]` (a whole record, or more).
pub fn decode(bytes: &[u8]) -> Result<(Record<'_>, usize), Damage> {
    parse(bytes, true)
}

/// Decodes a record this process encoded and still holds in memory (its
/// batch): the same as [`decode`] without the checksum pass.
pub fn decode_own(bytes: &[u8]) -> (Record<'_>, usize) {
    parse(bytes, false).expect("a record encoded by `encode`")
}

fn parse(bytes: &[u8], check: bool) -> Result<(Record<'_>, usize), Damage> {
    if bytes.len() < RECORD_HEAD {
        return Err(Damage::Torn);
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    if len == 0 {
        return Err(Damage::Padding);
    }
    if !(BODY_HEAD..=MAX_BODY).contains(&len) {
        return Err(Damage::Corrupt("impossible record length"));
    }
    if bytes.len() < RECORD_HEAD + len {
        return Err(Damage::Torn);
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let body = &bytes[RECORD_HEAD..RECORD_HEAD + len];
    if check && crc != crc32c::crc32c(body) {
        return Err(Damage::Corrupt("checksum mismatch"));
    }
    let kind = Kind::from_u8(body[0]).ok_or(Damage::Corrupt("unknown record kind"))?;
    let id_len = u16::from_le_bytes(body[2..4].try_into().unwrap()) as usize;
    if BODY_HEAD + id_len > len {
        return Err(Damage::Corrupt("document id overruns the record"));
    }
    let document = std::str::from_utf8(&body[BODY_HEAD..BODY_HEAD + id_len])
        .map_err(|_| Damage::Corrupt("document id not UTF-8"))?;
    let record = Record {
        kind,
        epoch: u64::from_le_bytes(body[4..12].try_into().unwrap()),
        seq: u64::from_le_bytes(body[12..20].try_into().unwrap()),
        document,
        data: &body[BODY_HEAD + id_len..],
    };
    Ok((record, RECORD_HEAD + len))
}

/// Why no record could be read at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Zero length: padding to the next block.
    Padding,
    /// The segment ends inside the record.
    Torn,
    /// The bytes are not a record.
    Corrupt(&'static str),
}

/// `v` rounded up to a multiple of [`BLOCK`].
pub fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// One step of a segment scan.
#[derive(Debug)]
pub enum Scanned<'a> {
    Record {
        at: u64,
        len: usize,
        record: Record<'a>,
    },
    /// Bytes that hold no record: where, why, and where scanning resumed
    /// (`None`: nothing intact follows; the segment's valid part ends at `at`).
    Damage {
        at: u64,
        why: &'static str,
        resumed: Option<u64>,
    },
}

/// Iterates the records of one segment's bytes (header included), reporting
/// damage and resynchronising at the next block boundary that starts an
/// intact record.
pub struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner over a segment whose header was checked.
    pub fn new(bytes: &'a [u8]) -> Scanner<'a> {
        Scanner { bytes, pos: HEADER_BYTES as usize }
    }

    fn next_block(&self, from: usize) -> usize {
        align_up(from as u64 + 1) as usize
    }

    /// The first block boundary at or after `from` holding an intact record.
    fn resync(&self, from: usize) -> Option<usize> {
        let mut at = align_up(from as u64) as usize;
        while at + RECORD_HEAD <= self.bytes.len() {
            if decode(&self.bytes[at..]).is_ok() {
                return Some(at);
            }
            at += BLOCK as usize;
        }
        None
    }

    fn padding_is_clean(&self, at: usize) -> bool {
        let end = (align_up(at as u64 + 1) as usize).min(self.bytes.len());
        self.bytes[at..end].iter().all(|&b| b == 0)
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = Scanned<'a>;

    fn next(&mut self) -> Option<Scanned<'a>> {
        loop {
            if self.pos >= self.bytes.len() {
                return None;
            }
            let at = self.pos;
            let why = match decode(&self.bytes[at..]) {
                Ok((record, len)) => {
                    self.pos += len;
                    return Some(Scanned::Record { at: at as u64, len, record });
                }
                Err(Damage::Padding) if self.padding_is_clean(at) => {
                    self.pos = self.next_block(at);
                    continue;
                }
                // Zeros too short to hold a record's length and checksum:
                // the padding of the last write, not a torn record.
                Err(Damage::Torn) if self.bytes.len() - at < RECORD_HEAD && self.padding_is_clean(at) => {
                    self.pos = self.bytes.len();
                    continue;
                }
                Err(Damage::Padding) => "non-zero bytes in padding",
                Err(Damage::Torn) => "torn record (the segment ends inside it)",
                Err(Damage::Corrupt(why)) => why,
            };
            let resumed = self.resync(at + 1);
            self.pos = resumed.unwrap_or(self.bytes.len());
            return Some(Scanned::Damage { at: at as u64, why, resumed: resumed.map(|r| r as u64) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(&str, u64, &[u8])]) -> Vec<u8> {
        let mut s = header(7, 0).to_vec();
        for (doc, seq, data) in records {
            encode(&mut s, Kind::Op, 42, *seq, doc, data);
        }
        s
    }

    fn records(bytes: &[u8]) -> (Vec<u64>, Vec<(u64, Option<u64>)>) {
        let (mut seqs, mut damage) = (Vec::new(), Vec::new());
        for s in Scanner::new(bytes) {
            match s {
                Scanned::Record { record, .. } => seqs.push(record.seq),
                Scanned::Damage { at, resumed, .. } => damage.push((at, resumed)),
            }
        }
        (seqs, damage)
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        encode(&mut out, Kind::Snapshot, 9, 3, "doc-1", br#"{"a":1}"#);
        assert_eq!(out.len(), encoded_len("doc-1", br#"{"a":1}"#));
        let (r, len) = decode(&out).unwrap();
        assert_eq!(len, out.len());
        assert_eq!(r, Record { kind: Kind::Snapshot, epoch: 9, seq: 3, document: "doc-1", data: br#"{"a":1}"# });
        assert_eq!(decode_own(&out), (r, len));
        assert_eq!(check_header(&header(7, 1)), Ok(7));
    }

    #[test]
    fn a_torn_tail_ends_the_scan() {
        let s = segment(&[("d", 1, b"one"), ("d", 2, b"two")]);
        let cut = &s[..s.len() - 2];
        let (seqs, damage) = records(cut);
        assert_eq!(seqs, vec![1]);
        assert_eq!(damage, vec![(HEADER_BYTES + encoded_len("d", b"one") as u64, None)]);
    }

    #[test]
    fn a_flipped_byte_is_found_and_the_next_block_resumes() {
        let mut s = segment(&[("d", 1, b"one"), ("d", 2, b"two")]);
        s.resize(BLOCK as usize, 0);
        encode(&mut s, Kind::Op, 42, 3, "d", b"three");
        // A byte inside the second record's body.
        let second = HEADER_BYTES as usize + encoded_len("d", b"one");
        s[second + RECORD_HEAD + 21] ^= 0x40;
        let (seqs, damage) = records(&s);
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(damage, vec![(second as u64, Some(BLOCK))]);
    }

    #[test]
    fn padding_too_short_for_a_record_head_is_not_a_torn_record() {
        // Found by fuzz/fuzz_targets/store_record.rs: a write whose records
        // end 1 to 7 bytes before its block boundary leaves that few zeros.
        for zeros in 1..RECORD_HEAD {
            let mut s = segment(&[("d", 1, b"one")]);
            s.resize(s.len() + zeros, 0);
            assert_eq!(records(&s), (vec![1], vec![]), "{zeros} zeros");
            *s.last_mut().unwrap() = 1;
            let at = HEADER_BYTES + encoded_len("d", b"one") as u64;
            assert_eq!(records(&s), (vec![1], vec![(at, None)]), "{zeros} bytes, not all zero");
        }
        let mut s = header(7, 0).to_vec();
        s.resize(s.len() + 5, 0);
        assert_eq!(records(&s), (vec![], vec![]));
    }

    #[test]
    fn padding_is_skipped_but_garbage_in_it_is_damage() {
        let mut s = segment(&[("d", 1, b"one")]);
        s.resize(BLOCK as usize, 0);
        encode(&mut s, Kind::Op, 42, 2, "d", b"two");
        assert_eq!(records(&s), (vec![1, 2], vec![]));
        let mut dirty = s.clone();
        dirty[BLOCK as usize - 10] = 1;
        let (seqs, damage) = records(&dirty);
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(damage.len(), 1);
    }
}
