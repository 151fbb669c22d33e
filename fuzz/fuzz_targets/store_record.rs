//! The storage format's decoders (`docrelay::store::record`): `check_header`,
//! `decode` and the `Scanner` that recovery runs over a segment's bytes.
//!
//! Input: `[mode, ..]`. Mode bit 0 clear: the rest is one segment's records,
//! behind a good header. Set: `[mode, n, len_1 (u16 LE) .. len_n, bytes ..]`,
//! the bytes cut into `n % 5` writes of those lengths and each padded with
//! zeros to the next block boundary, as the log writes them, so that small
//! inputs reach the resynchronisation at block boundaries.
//!
//! Checks, beyond "never panics" and "always ends":
//! - `decode` of any bytes: an intact record lies inside them and encodes
//!   back to the same bytes (the reserved byte 9 aside);
//! - the scan: items in increasing offsets; each record is what `decode`
//!   reads there; only zeros are skipped silently between items, to the next
//!   block boundary; damage is never reported over zeros alone; it resumes
//!   exactly where the next item is, at a block boundary after it, or ends
//!   the scan;
//! - `encode` / `decode` and `header` / `check_header` round trips.
#![no_main]

use docrelay::store::record::{self, Damage, Kind, Record, Scanned, Scanner, BLOCK, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// `record` encoded again; byte 9 is reserved and not checked, so it (and the
/// checksum that covers it) may differ from intact bytes on disk.
fn assert_encodes_to(r: &Record<'_>, bytes: &[u8]) {
    let mut again = Vec::new();
    record::encode(&mut again, r.kind, r.epoch, r.seq, r.document, r.data);
    assert_eq!(again.len(), bytes.len());
    assert_eq!(again.len(), record::encoded_len(r.document, r.data));
    if bytes[9] == 0 {
        assert_eq!(again, bytes);
    } else {
        assert_eq!((&again[..4], &again[8..9], &again[10..]), (&bytes[..4], &bytes[8..9], &bytes[10..]));
    }
}

fn check_decode(bytes: &[u8]) {
    match record::decode(bytes) {
        Ok((r, len)) => {
            assert!(len <= bytes.len());
            assert_encodes_to(&r, &bytes[..len]);
        }
        Err(Damage::Padding) => assert_eq!(&bytes[..4], &[0; 4]),
        Err(Damage::Torn | Damage::Corrupt(_)) => {}
    }
}

fn check_scan(segment: &[u8]) {
    let aligned = |at: usize| (at as u64).is_multiple_of(BLOCK);
    // Where the previous item ended (the scan starts behind the header).
    let mut end = HEADER_BYTES as usize;
    let mut ended = false;
    let mut items = 0usize;
    for item in Scanner::new(segment) {
        assert!(!ended, "an item after damage that ended the scan");
        items += 1;
        assert!(items <= segment.len(), "more items than bytes");
        let at = match &item {
            Scanned::Record { at, .. } | Scanned::Damage { at, .. } => *at as usize,
        };
        assert!(at >= end && at < segment.len(), "item at {at}, previous one ended at {end}");
        if at > end {
            assert!(aligned(at), "skipped to {at}, not a block boundary");
            assert!(segment[end..at].iter().all(|&b| b == 0), "non-zero bytes skipped silently before {at}");
        }
        match item {
            Scanned::Record { len, record: r, .. } => {
                assert!(at + len <= segment.len());
                let (again, again_len) = record::decode(&segment[at..]).expect("a scanned record decodes");
                assert_eq!((&again, again_len), (&r, len));
                assert_encodes_to(&r, &segment[at..at + len]);
                end = at + len;
            }
            Scanned::Damage { resumed, why, .. } => {
                assert!(!why.is_empty());
                // Zeros up to the next block boundary (or the end) are padding.
                let block_end = (record::align_up(at as u64 + 1) as usize).min(segment.len());
                assert!(segment[at..block_end].iter().any(|&b| b != 0), "damage `{why}` at {at} over zero padding");
                match resumed {
                    Some(r) => {
                        let r = r as usize;
                        assert!(r > at && aligned(r) && r < segment.len(), "resumed at {r} after {at}");
                        assert!(record::decode(&segment[r..]).is_ok(), "resumed at {r}, not an intact record");
                        end = r;
                    }
                    None => ended = true,
                }
            }
        }
    }
    if !ended && end < segment.len() {
        assert!(segment[end..].iter().all(|&b| b == 0), "the scan ended silently before non-zero bytes at {end}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let _ = record::check_header(data);
    check_decode(data);
    check_decode(rest);

    let mut segment = record::header(7, 0).to_vec();
    if mode & 1 == 0 {
        segment.extend_from_slice(rest);
    } else {
        let Some((&n, mut rest)) = rest.split_first() else { return };
        let n = n as usize % 5;
        let Some(lens) = rest.get(..2 * n) else { return };
        rest = &rest[2 * n..];
        for len in lens.chunks(2) {
            let len = (u16::from_le_bytes([len[0], len[1]]) as usize).min(rest.len());
            segment.extend_from_slice(&rest[..len]);
            segment.resize(record::align_up(segment.len() as u64) as usize, 0);
            rest = &rest[len..];
        }
        segment.extend_from_slice(rest);
    }
    assert_eq!(record::check_header(&segment), Ok(7));
    check_scan(&segment);

    // Round trips of what the writer makes, from the input's bytes.
    let cut = (mode as usize).min(rest.len());
    let (document, payload) = rest.split_at(cut);
    let document = String::from_utf8_lossy(document);
    let kind = if mode & 2 == 0 { Kind::Op } else { Kind::Snapshot };
    let (epoch, seq) = (u64::from(mode) << 40 | rest.len() as u64, !(rest.len() as u64));
    let mut out = vec![0xAA; cut % 7];
    let start = out.len();
    record::encode(&mut out, kind, epoch, seq, &document, payload);
    let (r, len) = record::decode(&out[start..]).expect("an encoded record decodes");
    assert_eq!(len, out.len() - start);
    assert_eq!(r, Record { kind, epoch, seq, document: &document, data: payload });
    assert_eq!(record::decode_own(&out[start..]), (r, len));
    let n = u64::from_le_bytes(std::array::from_fn(|i| rest.get(i).copied().unwrap_or(mode)));
    assert_eq!(record::check_header(&record::header(n, u32::from(mode))), Ok(n));
});
