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

/// Size of a run's header.
pub const HEADER_LEN: usize = 16;
/// Size of one [`IndexEntry`].
pub const ENTRY_LEN: usize = 88;
/// Size of a run's trailing checksum.
pub const CHECKSUM_LEN: usize = 32;
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
    entries.sort_unstable_by_key(|e| e.id());
    encode_sorted(&entries)
}

/// Encodes a run whose entries are already strictly ascending by id.
pub fn encode_sorted(entries: &[IndexEntry]) -> Vec<u8> {
    let mut encoder = RunEncoder::new(entries.len() as u32);
    let mut out = Vec::with_capacity(run_len(entries.len() as u32) as usize);
    out.extend_from_slice(&encoder.header());
    out.extend_from_slice(encoder.entries(entries));
    out.extend_from_slice(&encoder.finish());
    out
}

/// Length in bytes of a run of `count` entries.
pub const fn run_len(count: u32) -> u64 {
    (HEADER_LEN + CHECKSUM_LEN) as u64 + count as u64 * ENTRY_LEN as u64
}

/// Offset of entry `i` from the start of a run.
pub const fn entry_offset(i: u32) -> u64 {
    HEADER_LEN as u64 + i as u64 * ENTRY_LEN as u64
}

/// Writes a run piece by piece, so a merge of many runs never holds one in memory. The count
/// comes first because the header is hashed first.
pub struct RunEncoder {
    hasher: blake3::Hasher,
    count: u32,
    written: u32,
    last: Option<ChunkId>,
}

impl RunEncoder {
    pub fn new(count: u32) -> Self {
        assert!(count <= limits::MAX_INDEX_ENTRIES);
        Self { hasher: blake3::Hasher::new(), count, written: 0, last: None }
    }

    pub fn header(&mut self) -> [u8; HEADER_LEN] {
        let header = IndexHeader { magic: MAGIC, version: VERSION.to_le_bytes(), count: self.count.to_le_bytes() };
        let bytes: [u8; HEADER_LEN] = bytemuck::cast(header);
        self.hasher.update(&bytes);
        bytes
    }

    /// The next entries' bytes; ids must be strictly ascending (a duplicate is a caller bug).
    pub fn entries<'e>(&mut self, entries: &'e [IndexEntry]) -> &'e [u8] {
        for e in entries {
            assert!(self.last.is_none_or(|l| l < e.id()), "index run entries must be strictly ascending");
            self.last = Some(e.id());
        }
        self.written += entries.len() as u32;
        assert!(self.written <= self.count, "more entries than the header announced");
        let bytes = bytemuck::cast_slice(entries);
        self.hasher.update(bytes);
        bytes
    }

    /// The trailing checksum.
    pub fn finish(self) -> [u8; CHECKSUM_LEN] {
        assert_eq!(self.written, self.count, "fewer entries than the header announced");
        *self.hasher.finalize().as_bytes()
    }
}

/// Validates a run read piece by piece: the header, then each entry in order, then the checksum.
pub struct RunDecoder {
    hasher: blake3::Hasher,
    count: u32,
    read: u32,
    last: Option<ChunkId>,
}

const WHAT: &str = "index run";

impl RunDecoder {
    /// Checks the header of a run whose file is `len` bytes long.
    pub fn new(header: &[u8], len: u64) -> Result<Self> {
        if header.len() < HEADER_LEN || len < (HEADER_LEN + CHECKSUM_LEN) as u64 {
            return Err(Error::Truncated {
                what: WHAT,
                need: (HEADER_LEN + CHECKSUM_LEN) as u64,
                have: len.min(header.len() as u64),
            });
        }
        let h: IndexHeader = bytemuck::pod_read_unaligned(&header[..HEADER_LEN]);
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
        if len != run_len(count) {
            return Err(Error::Truncated { what: WHAT, need: run_len(count), have: len });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header[..HEADER_LEN]);
        Ok(Self { hasher, count, read: 0, last: None })
    }

    /// Entries the header announces.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The next entries (whole entries' bytes), checked for order and field ranges, each given
    /// to `each`.
    pub fn entries(&mut self, bytes: &[u8], mut each: impl FnMut(&IndexEntry)) -> Result<()> {
        assert!(bytes.len().is_multiple_of(ENTRY_LEN), "whole entries only");
        let n = (bytes.len() / ENTRY_LEN) as u32;
        assert!(self.count - self.read >= n, "more entries than the header announced");
        for raw in bytes.chunks_exact(ENTRY_LEN) {
            let e: IndexEntry = bytemuck::pod_read_unaligned(raw);
            if self.last.is_some_and(|l| l >= e.id()) {
                return Err(Error::Corrupt { what: WHAT, detail: "entries are not strictly sorted".into() });
            }
            e.entry.validate_fields()?;
            self.last = Some(e.id());
            each(&e);
        }
        self.hasher.update(bytes);
        self.read += n;
        Ok(())
    }

    /// Checks the trailing checksum once every entry was read.
    pub fn finish(self, checksum: &[u8]) -> Result<()> {
        assert_eq!(self.read, self.count, "fewer entries than the header announced");
        if self.hasher.finalize().as_bytes() != checksum {
            return Err(Error::ChecksumMismatch { what: WHAT });
        }
        Ok(())
    }
}

/// Decodes and validates a run: magic, version, length, checksum, order and every entry.
pub fn decode_run(bytes: &[u8]) -> Result<Vec<IndexEntry>> {
    let mut decoder = RunDecoder::new(bytes, bytes.len() as u64)?;
    let mut entries = Vec::with_capacity(decoder.count() as usize);
    decoder.entries(&bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN], |e| entries.push(*e))?;
    decoder.finish(&bytes[bytes.len() - CHECKSUM_LEN..])?;
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
