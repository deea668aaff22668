/// Why bytes could not be decoded. Every message names the structure that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input ended before the structure did.
    #[error("{what}: truncated (need {need} bytes, have {have})")]
    Truncated { what: &'static str, need: u64, have: u64 },
    /// The magic bytes do not name this structure.
    #[error("{what}: bad magic, this is not a cbcr {what}")]
    BadMagic { what: &'static str },
    /// Written by a newer cbcr (or garbage).
    #[error("{what}: format version {found} is not supported (this cbcr reads up to {supported}); upgrade cbcr")]
    UnsupportedVersion { what: &'static str, found: u32, supported: u32 },
    /// A checksum over the structure does not match its content.
    #[error("{what}: checksum mismatch")]
    ChecksumMismatch { what: &'static str },
    /// A field is out of range or inconsistent with another.
    #[error("{what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// An encrypted object did not authenticate: damaged, forged, or sealed under another key.
    #[error("{what}: does not authenticate (damaged, forged, or written under another repository's key)")]
    Authentication { what: &'static str },
}
