//! The stages a segment goes through on one core: cut into chunks (content-defined, page
//! blocks, tar members), then hashed, deduplicated, compressed and packed; and the way back,
//! blobs read from packs and checked against their ids.

pub mod chunker;
pub mod pack;
pub(crate) mod tar;
