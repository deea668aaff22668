//! cbcr's formats: everything that is written to disk or sent on the wire.
//!
//! This crate does no I/O and reads no clock: encoders take values and return bytes, decoders take
//! bytes and return values or a typed [`Error`]. A decoder never panics, whatever the input; the
//! proptests in each module feed it garbage and truncations to keep it that way.
//!
//! One algorithm lives here too, because both planes run it: the AIMD loop of read caps
//! ([`throttle`]), the control plane's per host and node, each agent's over its own reads.
//!
//! Integers are little-endian. Fixed-size records are `#[repr(C)]` [`bytemuck::Pod`] structs made
//! only of byte arrays, so they have alignment 1, no padding, and can be cast from any byte slice.

pub mod assemble;
mod codec;
pub mod control;
pub mod crypto;
pub mod delta;
mod error;
pub mod frame;
pub mod id;
pub mod index;
pub mod job;
pub mod limits;
pub mod pack;
pub mod repo;
pub mod throttle;
pub mod tls;
pub mod tree;
pub mod verify;

pub use error::Error;
pub use id::{ChunkId, RepoKey};

/// Result of decoding.
pub type Result<T> = std::result::Result<T, Error>;

/// What a blob stored in a pack holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// File content.
    Data = 0,
    /// An encoded [`tree::Tree`]: one directory.
    Tree = 1,
    /// An encoded [`tree::ChunkList`]: the chunks of one segment of one file.
    ChunkList = 2,
    /// File content stored as a [`delta::BlockDelta`] against an earlier version of the block;
    /// its id is the id of the whole block it rebuilds.
    Delta = 3,
}

impl BlobKind {
    /// Decodes the kind byte of a pack or index entry.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(Self::Data),
            1 => Ok(Self::Tree),
            2 => Ok(Self::ChunkList),
            3 => Ok(Self::Delta),
            _ => Err(Error::Corrupt { what: "blob kind", detail: format!("unknown kind {v}") }),
        }
    }
}

/// How a blob's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    /// Stored as is (the blob did not shrink).
    None = 0,
    /// One zstd frame.
    Zstd = 1,
}

impl Compression {
    /// Decodes the compression byte of a pack or index entry.
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(Self::None),
            1 => Ok(Self::Zstd),
            _ => Err(Error::Corrupt { what: "compression", detail: format!("unknown method {v}") }),
        }
    }
}
