//! What `verify` found: the report a receiver sends (as JSON) to a client that asked it to
//! verify the repository where it lies, and that the CLI prints.

/// One damaged object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    /// `index`, `snapshot`, `pack`, `blob` or `file`.
    pub kind: String,
    /// What is damaged: a path in the repository, a blob id, or `snapshot:path` for a file.
    pub name: String,
    pub detail: String,
}

/// The counts verify checked, and the damage it found.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    pub bytes_read: u64,
    /// Packs no index run names: left by an interrupted backup, harmless.
    pub unindexed_packs: u64,
    pub damage: Vec<Damage>,
    /// Files in the repository's folders that are no cbcr object (other commands skip them).
    #[serde(default)]
    pub strays: Vec<String>,
    /// Chunk lists (hex ids) that name a damaged or missing chunk: the files they describe
    /// cannot be restored whole, and a backup must not reuse them.
    #[serde(default)]
    pub damaged_lists: Vec<String>,
    /// Where verify recorded the damaged copies it found (`REPO/damaged/<name>`), so that no
    /// backup deduplicates against them; `None` when it found none, or could not write.
    #[serde(default)]
    pub damaged_recorded: Option<String>,
}

/// `REPO/damaged/<name>`: the copies of blobs `verify` found damaged or lost, each a blob id and
/// the pack it is in, so that until `repair packs` takes them out of the index no backup
/// deduplicates against them and no restore reads them. The name is the BLAKE3 of the bytes.
///
/// ```text
/// "CBDB" version:u16 0:u16 count:u32 (blob:32 pack:32)*     (ascending, no repeats)
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DamagedBlobs {
    pub copies: Vec<(crate::ChunkId, crate::ChunkId)>,
}

const DAMAGED_MAGIC: &[u8; 4] = b"CBDB";
const DAMAGED_VERSION: u16 = 1;
const DAMAGED_PAIR_LEN: usize = 64;

impl DamagedBlobs {
    /// Encodes the copies, sorted and without repeats so that equal findings encode equally.
    pub fn encode(mut self) -> Vec<u8> {
        self.copies.sort_unstable();
        self.copies.dedup();
        assert!(self.copies.len() <= crate::limits::MAX_INDEX_ENTRIES as usize);
        let mut out = Vec::with_capacity(12 + self.copies.len() * DAMAGED_PAIR_LEN);
        crate::codec::preamble(&mut out, DAMAGED_MAGIC, DAMAGED_VERSION);
        out.extend_from_slice(&(self.copies.len() as u32).to_le_bytes());
        for (blob, pack) in &self.copies {
            out.extend_from_slice(&blob.0);
            out.extend_from_slice(&pack.0);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        let mut r = crate::codec::Reader::new(bytes, "damaged-blob list");
        r.preamble(DAMAGED_MAGIC, DAMAGED_VERSION)?;
        let count = r.count(crate::limits::MAX_INDEX_ENTRIES, DAMAGED_PAIR_LEN)?;
        let mut copies = Vec::with_capacity(count);
        for _ in 0..count {
            let pair = (crate::ChunkId(r.array()?), crate::ChunkId(r.array()?));
            if copies.last().is_some_and(|last| *last >= pair) {
                return Err(r.corrupt("copies are not in ascending order".into()));
            }
            copies.push(pair);
        }
        r.finish()?;
        Ok(Self { copies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkId;
    use proptest::prelude::*;

    #[test]
    fn damaged_blobs_round_trip_sorted_and_refuse_disorder() {
        let list =
            DamagedBlobs { copies: vec![(ChunkId([2; 32]), ChunkId([9; 32])), (ChunkId([1; 32]), ChunkId([9; 32]))] };
        let bytes = list.clone().encode();
        let back = DamagedBlobs::decode(&bytes).unwrap();
        assert_eq!(back.copies, vec![(ChunkId([1; 32]), ChunkId([9; 32])), (ChunkId([2; 32]), ChunkId([9; 32]))]);
        let mut swapped = bytes.clone();
        swapped[12..76].copy_from_slice(&bytes[76..140]);
        swapped[76..140].copy_from_slice(&bytes[12..76]);
        assert!(DamagedBlobs::decode(&swapped).unwrap_err().to_string().contains("ascending"));
        assert!(DamagedBlobs::decode(&bytes[..100]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = DamagedBlobs::decode(&bytes);
            let mut framed = DamagedBlobs::default().encode();
            framed.truncate(8);
            framed.extend_from_slice(&bytes);
            let _ = DamagedBlobs::decode(&framed);
        }
    }
}
