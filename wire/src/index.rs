//! Index runs: `REPO/index/<id>.idx`, one sorted run of fixed-size entries mapping a blob id to
//! its place in a pack.
//!
//! ```text
//! IndexHeader (16 B) | IndexEntry (88 B) x n, strictly ascending by blob id | BLAKE3 (32 B)
//! ```
//! Sorted fixed-size entries can be binary-searched in place and merged run by run; the trailing
//! hash covers header and entries.

use bytemuck::{Pod, Zeroable};

use crate::pack::PackEntry;
use crate::{limits, ChunkId, Error, Result};

const MAGIC: [u8; 8] = *b"CBCRIDX1";
/// Index format version this cbcr writes and reads.
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct IndexHeader {
    magic: [u8; 8],
    version: [u8; 4],
    count: [u8; 4],
}

/// Where a blob lives: its pack and its entry in that pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct IndexEntry {
    pub pack: ChunkId,
    pub entry: PackEntry,
}

const HEADER_LEN: usize = 16;
/// Size of one [`IndexEntry`].
pub const ENTRY_LEN: usize = 88;
const CHECKSUM_LEN: usize = 32;
const _: () = assert!(size_of::<IndexHeader>() == HEADER_LEN);
const _: () = assert!(size_of::<IndexEntry>() == ENTRY_LEN);

impl IndexEntry {
    /// The blob's id.
    pub fn id(&self) -> ChunkId {
        self.entry.id
    }
}

/// Encodes a run; sorts it first. Duplicate ids are a caller bug.
pub fn encode_run(mut entries: Vec<IndexEntry>) -> Vec<u8> {
    assert!(entries.len() <= limits::MAX_INDEX_ENTRIES as usize);
    entries.sort_unstable_by_key(|e| e.id());
    assert!(entries.windows(2).all(|w| w[0].id() < w[1].id()), "duplicate blob id in an index run");
    let header =
        IndexHeader { magic: MAGIC, version: VERSION.to_le_bytes(), count: (entries.len() as u32).to_le_bytes() };
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + CHECKSUM_LEN);
    out.extend_from_slice(bytemuck::bytes_of(&header));
    out.extend_from_slice(bytemuck::cast_slice(&entries));
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes and validates a run: magic, version, length, checksum, order and every entry.
pub fn decode_run(bytes: &[u8]) -> Result<Vec<IndexEntry>> {
    const WHAT: &str = "index run";
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(Error::Truncated {
            what: WHAT,
            need: (HEADER_LEN + CHECKSUM_LEN) as u64,
            have: bytes.len() as u64,
        });
    }
    let h: IndexHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN]);
    if h.magic != MAGIC {
        return Err(Error::BadMagic { what: WHAT });
    }
    let version = u32::from_le_bytes(h.version);
    if version != VERSION {
        return Err(Error::UnsupportedVersion { what: WHAT, found: version, supported: VERSION });
    }
    let count = u32::from_le_bytes(h.count);
    if count > limits::MAX_INDEX_ENTRIES {
        return Err(Error::Corrupt { what: WHAT, detail: format!("{count} entries, more than the limit") });
    }
    let need = HEADER_LEN + count as usize * ENTRY_LEN + CHECKSUM_LEN;
    if bytes.len() != need {
        return Err(Error::Truncated { what: WHAT, need: need as u64, have: bytes.len() as u64 });
    }
    let (body, sum) = bytes.split_at(need - CHECKSUM_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(Error::ChecksumMismatch { what: WHAT });
    }
    let entries: Vec<IndexEntry> =
        body[HEADER_LEN..].chunks_exact(ENTRY_LEN).map(bytemuck::pod_read_unaligned).collect();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 && entries[i - 1].id() >= e.id() {
            return Err(Error::Corrupt { what: WHAT, detail: "entries are not strictly sorted".into() });
        }
        e.entry.validate_fields()?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobKind, Compression};
    use proptest::prelude::*;

    fn entry(id: [u8; 32], len: u32) -> IndexEntry {
        IndexEntry {
            pack: ChunkId([9; 32]),
            entry: PackEntry::new(ChunkId(id), 16, len, len + 1, BlobKind::Data, Compression::Zstd),
        }
    }

    proptest! {
        #[test]
        fn round_trip(ids in proptest::collection::btree_set(proptest::array::uniform32(any::<u8>()), 0..50)) {
            let entries: Vec<_> = ids.iter().rev().map(|id| entry(*id, 10)).collect();
            let decoded = decode_run(&encode_run(entries.clone())).unwrap();
            prop_assert_eq!(decoded.len(), entries.len());
            prop_assert!(decoded.windows(2).all(|w| w[0].id() < w[1].id()));
            for e in &entries {
                prop_assert!(decoded.contains(e));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(decode_run(&bytes).is_err());
        }

        #[test]
        fn any_bit_flip_is_caught(byte in 0usize..(16 + 2 * 88 + 32), bit in 0u8..8) {
            let mut run = encode_run(vec![entry([1; 32], 5), entry([2; 32], 6)]);
            run[byte] ^= 1 << bit;
            prop_assert!(decode_run(&run).is_err());
        }
    }
}
