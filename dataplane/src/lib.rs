//! cbcr's data plane: thread-per-core backup, restore and verify against a repository.
//!
//! See `docs/ARCHITECTURE.md` for the map. The stages (`chunker`) are plain functions over byte
//! slices; `runtime` is the only module that knows about glommio.

pub mod backup;
pub mod chunker;
pub mod error;
pub mod fault;
pub mod index;
pub mod limits;
pub mod output;
pub mod pack;
pub mod repo;
pub mod restore;
pub mod runtime;
pub mod verify;
