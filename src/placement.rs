//! Which core owns a document (`docs/protocol.md`, "Documents and cores").

/// The FNV-1a 64-bit hash that places documents on cores.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The core index (not CPU id) that owns a document.
pub fn owner_core(document_id: &str, cores: usize) -> usize {
    (fnv1a_64(document_id.as_bytes()) % cores as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn owner_is_within_the_cores() {
        for cores in 1..8 {
            for doc in ["a", "b", "doc-17", "team:x"] {
                assert!(owner_core(doc, cores) < cores);
            }
        }
    }
}
