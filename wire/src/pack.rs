//! Pack files: many blobs in one immutable file.
//!
//! ```text
//! PackHeader (16 B) | blob bytes ... | PackEntry (56 B) x n | PackFooter (64 B)
//! ```
//! The trailer (entries + footer) lets a pack be indexed from its last bytes alone, so the index
//! can always be rebuilt from the packs. The pack's id, and file name, is the plain BLAKE3 of all
//! of its bytes: that is the checksum over the body; the footer carries its own checksum over the
//! entries so a reader can trust the trailer without hashing the whole pack.

use bytemuck::{Pod, Zeroable};

use crate::{limits, BlobKind, ChunkId, Compression, Error, Result};

const HEADER_MAGIC: [u8; 8] = *b"CBCRPACK";
const FOOTER_MAGIC: [u8; 8] = *b"CBCRPEND";
/// Pack format version this cbcr writes and reads.
pub const VERSION: u32 = 1;

/// First bytes of every pack.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct PackHeader {
    magic: [u8; 8],
    version: [u8; 4],
    reserved: [u8; 4],
}

/// Where one blob sits in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct PackEntry {
    pub id: ChunkId,
    offset: [u8; 8],
    stored_len: [u8; 4],
    raw_len: [u8; 4],
    kind: u8,
    compression: u8,
    reserved: [u8; 6],
}

/// Last bytes of every pack.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct PackFooter {
    entries_offset: [u8; 8],
    entry_count: [u8; 4],
    version: [u8; 4],
    entries_checksum: [u8; 32],
    reserved: [u8; 8],
    magic: [u8; 8],
}

/// Size of [`PackHeader`].
pub const HEADER_LEN: usize = 16;
/// Size of [`PackEntry`].
pub const ENTRY_LEN: usize = 56;
/// Size of [`PackFooter`].
pub const FOOTER_LEN: usize = 64;
const _: () = assert!(size_of::<PackHeader>() == HEADER_LEN);
const _: () = assert!(size_of::<PackEntry>() == ENTRY_LEN);
const _: () = assert!(size_of::<PackFooter>() == FOOTER_LEN);

impl PackHeader {
    /// The header every pack starts with.
    pub fn encode() -> [u8; HEADER_LEN] {
        bytemuck::cast(PackHeader { magic: HEADER_MAGIC, version: VERSION.to_le_bytes(), reserved: [0; 4] })
    }

    /// Checks the first [`HEADER_LEN`] bytes of a pack.
    pub fn check(bytes: &[u8]) -> Result<()> {
        let h: PackHeader = read_pod(bytes, "pack header")?;
        if h.magic != HEADER_MAGIC {
            return Err(Error::BadMagic { what: "pack header" });
        }
        check_version("pack header", u32::from_le_bytes(h.version))?;
        if h.reserved != [0; 4] {
            return Err(corrupt("pack header", "reserved bytes are not zero".into()));
        }
        Ok(())
    }
}

impl PackEntry {
    /// Describes a blob written at `offset` (from the start of the pack).
    pub fn new(
        id: ChunkId,
        offset: u64,
        stored_len: u32,
        raw_len: u32,
        kind: BlobKind,
        compression: Compression,
    ) -> Self {
        debug_assert!(stored_len <= limits::MAX_STORED_BLOB_SIZE && raw_len <= limits::MAX_BLOB_SIZE);
        Self {
            id,
            offset: offset.to_le_bytes(),
            stored_len: stored_len.to_le_bytes(),
            raw_len: raw_len.to_le_bytes(),
            kind: kind as u8,
            compression: compression as u8,
            reserved: [0; 6],
        }
    }
    pub fn offset(&self) -> u64 {
        u64::from_le_bytes(self.offset)
    }
    pub fn stored_len(&self) -> u32 {
        u32::from_le_bytes(self.stored_len)
    }
    pub fn raw_len(&self) -> u32 {
        u32::from_le_bytes(self.raw_len)
    }
    /// Valid after [`parse_entries`] (which rejects unknown kinds).
    pub fn kind(&self) -> BlobKind {
        BlobKind::from_u8(self.kind).unwrap_or(BlobKind::Data)
    }
    /// Valid after [`parse_entries`] (which rejects unknown methods).
    pub fn compression(&self) -> Compression {
        Compression::from_u8(self.compression).unwrap_or(Compression::None)
    }

    /// Checks everything that does not depend on the pack the entry sits in.
    pub(crate) fn validate_fields(&self) -> Result<()> {
        BlobKind::from_u8(self.kind)?;
        Compression::from_u8(self.compression)?;
        if self.stored_len() > limits::MAX_STORED_BLOB_SIZE || self.raw_len() > limits::MAX_BLOB_SIZE {
            return Err(corrupt("pack entry", format!("blob {} is larger than the limit", self.id.short())));
        }
        // Stored as is, or sealed: an encryption envelope around the raw bytes.
        let sealed_len = self.raw_len() + crate::crypto::OVERHEAD as u32;
        if self.compression() == Compression::None && ![self.raw_len(), sealed_len].contains(&self.stored_len()) {
            return Err(corrupt("pack entry", format!("uncompressed blob {} has two lengths", self.id.short())));
        }
        if self.reserved != [0; 6] {
            return Err(corrupt("pack entry", "reserved bytes are not zero".into()));
        }
        Ok(())
    }

    fn validate(&self, entries_offset: u64) -> Result<()> {
        self.validate_fields()?;
        let end = self.offset().checked_add(self.stored_len().into());
        if self.offset() < HEADER_LEN as u64 || end.is_none_or(|e| e > entries_offset) {
            return Err(corrupt("pack entry", format!("blob {} lies outside the pack body", self.id.short())));
        }
        Ok(())
    }
}

/// What the footer says about the trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrailerLocation {
    /// Offset of the first entry from the start of the pack.
    pub entries_offset: u64,
    /// Number of entries.
    pub entry_count: u32,
    checksum: [u8; 32],
}

impl TrailerLocation {
    /// Bytes of the entries region.
    pub fn entries_len(&self) -> usize {
        self.entry_count as usize * ENTRY_LEN
    }
}

/// Encodes the trailer (entries then footer) of a pack whose body ends at `entries_offset`.
pub fn encode_trailer(entries: &[PackEntry], entries_offset: u64) -> Vec<u8> {
    assert!(entries.len() <= limits::MAX_PACK_ENTRIES as usize);
    let entry_bytes: &[u8] = bytemuck::cast_slice(entries);
    let footer = PackFooter {
        entries_offset: entries_offset.to_le_bytes(),
        entry_count: (entries.len() as u32).to_le_bytes(),
        version: VERSION.to_le_bytes(),
        entries_checksum: *blake3::hash(entry_bytes).as_bytes(),
        reserved: [0; 8],
        magic: FOOTER_MAGIC,
    };
    let mut out = Vec::with_capacity(entry_bytes.len() + FOOTER_LEN);
    out.extend_from_slice(entry_bytes);
    out.extend_from_slice(bytemuck::bytes_of(&footer));
    out
}

/// Decodes the last [`FOOTER_LEN`] bytes of a pack that is `pack_len` bytes long.
pub fn parse_footer(bytes: &[u8], pack_len: u64) -> Result<TrailerLocation> {
    let f: PackFooter = read_pod(bytes, "pack footer")?;
    if f.magic != FOOTER_MAGIC {
        return Err(Error::BadMagic { what: "pack footer" });
    }
    check_version("pack footer", u32::from_le_bytes(f.version))?;
    let loc = TrailerLocation {
        entries_offset: u64::from_le_bytes(f.entries_offset),
        entry_count: u32::from_le_bytes(f.entry_count),
        checksum: f.entries_checksum,
    };
    if loc.entry_count > limits::MAX_PACK_ENTRIES {
        return Err(corrupt("pack footer", format!("{} entries, more than the limit", loc.entry_count)));
    }
    let expected_len = loc.entries_offset.checked_add((loc.entries_len() + FOOTER_LEN) as u64);
    if loc.entries_offset < HEADER_LEN as u64 || expected_len != Some(pack_len) {
        return Err(corrupt("pack footer", format!("trailer does not fit a pack of {pack_len} bytes")));
    }
    if f.reserved != [0; 8] {
        return Err(corrupt("pack footer", "reserved bytes are not zero".into()));
    }
    Ok(loc)
}

/// Decodes and validates the entries region described by `loc`.
pub fn parse_entries(loc: &TrailerLocation, bytes: &[u8]) -> Result<Vec<PackEntry>> {
    if bytes.len() != loc.entries_len() {
        return Err(Error::Truncated {
            what: "pack entries",
            need: loc.entries_len() as u64,
            have: bytes.len() as u64,
        });
    }
    if *blake3::hash(bytes).as_bytes() != loc.checksum {
        return Err(Error::ChecksumMismatch { what: "pack entries" });
    }
    let entries: Vec<PackEntry> = bytes.chunks_exact(ENTRY_LEN).map(bytemuck::pod_read_unaligned).collect();
    for e in &entries {
        e.validate(loc.entries_offset)?;
    }
    // A writer stores a blob once per pack; a second entry for one id is a forged pack.
    let mut ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    if let Some(twice) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Corrupt { what: "pack entries", detail: format!("blob {} is listed twice", twice[0]) });
    }
    Ok(entries)
}

/// Parses a whole pack held in memory: header, footer and entries.
pub fn parse_pack(pack: &[u8]) -> Result<Vec<PackEntry>> {
    PackHeader::check(pack.get(..HEADER_LEN).unwrap_or(pack))?;
    let len = pack.len();
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(Error::Truncated { what: "pack", need: (HEADER_LEN + FOOTER_LEN) as u64, have: len as u64 });
    }
    let loc = parse_footer(&pack[len - FOOTER_LEN..], len as u64)?;
    let start = loc.entries_offset as usize;
    parse_entries(&loc, &pack[start..start + loc.entries_len()])
}

fn read_pod<T: Pod>(bytes: &[u8], what: &'static str) -> Result<T> {
    let n = size_of::<T>();
    if bytes.len() < n {
        return Err(Error::Truncated { what, need: n as u64, have: bytes.len() as u64 });
    }
    Ok(bytemuck::pod_read_unaligned(&bytes[..n]))
}

fn check_version(what: &'static str, found: u32) -> Result<()> {
    if found != VERSION {
        return Err(Error::UnsupportedVersion { what, found, supported: VERSION });
    }
    Ok(())
}

fn corrupt(what: &'static str, detail: String) -> Error {
    Error::Corrupt { what, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a pack the way `dataplane`'s pack writer does, from (id byte, blob) pairs.
    fn build(blobs: &[Vec<u8>]) -> Vec<u8> {
        let mut pack = PackHeader::encode().to_vec();
        let mut entries = vec![];
        for (i, b) in blobs.iter().enumerate() {
            let id = ChunkId([i as u8; 32]);
            entries.push(PackEntry::new(
                id,
                pack.len() as u64,
                b.len() as u32,
                b.len() as u32,
                BlobKind::Data,
                Compression::None,
            ));
            pack.extend_from_slice(b);
        }
        let off = pack.len() as u64;
        pack.extend(encode_trailer(&entries, off));
        pack
    }

    #[test]
    fn a_pack_listing_one_blob_twice_is_refused() {
        let mut pack = PackHeader::encode().to_vec();
        let id = ChunkId([9; 32]);
        let entry = |at: usize| PackEntry::new(id, at as u64, 3, 3, BlobKind::Data, Compression::None);
        let entries = vec![entry(pack.len()), entry(pack.len() + 3)];
        pack.extend_from_slice(b"abcdef");
        let off = pack.len() as u64;
        pack.extend(encode_trailer(&entries, off));
        let err = parse_pack(&pack).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn pack_bytes_are_golden() {
        let pack = build(&[b"hello".to_vec(), b"world!".to_vec()]);
        assert_eq!(pack.len(), HEADER_LEN + 11 + 2 * ENTRY_LEN + FOOTER_LEN);
        assert_eq!(&pack[..8], b"CBCRPACK");
        assert_eq!(&pack[pack.len() - 8..], b"CBCRPEND");
        // The pack id is the format's checksum; pin it so an accidental layout change is caught.
        assert_eq!(
            ChunkId::of_file(&pack).to_hex(),
            "4ce890c2dc57071e3ca562288dd19b3da644b32155851065665e936e4a17af43"
        );
        let entries = parse_pack(&pack).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].offset(), HEADER_LEN as u64 + 5);
        assert_eq!(entries[1].stored_len(), 6);
    }

    #[test]
    fn every_single_bit_flip_in_the_trailer_is_caught() {
        let pack = build(&[b"abc".to_vec(), vec![0u8; 100]]);
        let trailer_start = pack.len() - 2 * ENTRY_LEN - FOOTER_LEN;
        for byte in trailer_start..pack.len() {
            for bit in 0..8 {
                let mut bad = pack.clone();
                bad[byte] ^= 1 << bit;
                assert!(parse_pack(&bad).is_err(), "flip at byte {byte} bit {bit} went unnoticed");
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let pack = build(&blobs);
            let entries = parse_pack(&pack).unwrap();
            prop_assert_eq!(entries.len(), blobs.len());
            for (e, b) in entries.iter().zip(&blobs) {
                let start = e.offset() as usize;
                prop_assert_eq!(&pack[start..start + e.stored_len() as usize], &b[..]);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_pack(&bytes);
            let _ = parse_footer(&bytes, bytes.len() as u64);
        }

        #[test]
        fn truncation_is_an_error(blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 1..5), cut in 1usize..100) {
            let pack = build(&blobs);
            let cut = cut.min(pack.len());
            prop_assert!(parse_pack(&pack[..pack.len() - cut]).is_err());
        }
    }
}
