//! Content ids. A chunk's id is BLAKE3 keyed with the repository key, so ids reveal nothing about
//! content to someone without the key, and two repositories never share ids by accident.

use std::fmt;

use crate::Error;

/// 32-byte content id of a blob (chunk, tree or chunk list), and of packs, index runs and
/// snapshots (those are unkeyed: see [`ChunkId::of_file`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of a whole file (pack, index run, snapshot): plain BLAKE3 of its bytes, so anyone
    /// can check a file against its name without the key.
    pub fn of_file(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let bytes = from_hex(s)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::Corrupt { what: "id", detail: format!("{s:?} is not 64 hex characters") })?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes);
        Ok(Self(id))
    }

    /// First 8 hex characters, as shown to users.
    pub fn short(&self) -> String {
        to_hex(&self.0[..4])
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The repository key for keyed BLAKE3.
#[derive(Clone)]
pub struct RepoKey([u8; 32]);

impl RepoKey {
    /// Wraps 32 bytes of key material (from the OS random source, in `dataplane`).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key material, for writing the key file.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id of a blob: keyed BLAKE3 of its raw (uncompressed) bytes.
    #[inline]
    pub fn blob_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, data).as_bytes())
    }

    /// Names the key without revealing it: the repository config records it, so a key file that
    /// belongs to another repository is caught at open.
    pub fn key_id(&self) -> String {
        to_hex(&blake3::derive_key("cbcr 2026 repository key id", &self.0)[..8])
    }
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoKey({})", self.key_id())
    }
}

/// Lower-case hex of any bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); `None` on odd length or a non-hex character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyed_ids_are_golden() {
        // Changing these breaks every repository ever written: they are the format.
        let key = RepoKey::from_bytes([7u8; 32]);
        assert_eq!(key.blob_id(b"cbcr").to_hex(), to_hex(blake3::keyed_hash(&[7u8; 32], b"cbcr").as_bytes()));
        assert_ne!(key.blob_id(b"cbcr"), RepoKey::from_bytes([8u8; 32]).blob_id(b"cbcr"));
        assert_eq!(ChunkId::of_file(b"").to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let id = ChunkId(bytes);
            prop_assert_eq!(ChunkId::from_hex(&id.to_hex()).unwrap(), id);
        }

        #[test]
        fn hex_garbage_is_an_error_not_a_panic(s in ".{0,80}") {
            if let Ok(id) = ChunkId::from_hex(&s) {
                prop_assert_eq!(id.to_hex(), s.to_lowercase());
            }
        }
    }
}
