//! Bounds of the formats. A decoder rejects anything larger, so a corrupt length can never make a
//! reader allocate or loop without bound. Runtime budgets live in `dataplane::limits`.

/// Largest blob (chunk, tree or chunk list) a pack may hold, raw or stored.
pub const MAX_BLOB_SIZE: u32 = 64 << 20;
/// Largest stored form of a blob: the largest blob, sealed (an encryption envelope adds
/// [`crate::crypto::OVERHEAD`] bytes).
pub const MAX_STORED_BLOB_SIZE: u32 = MAX_BLOB_SIZE + crate::crypto::OVERHEAD as u32;
/// Largest chunk the chunker may be configured to produce.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Chunker size bounds: FastCDC v2020's own (it panics outside them), checked at repository init.
pub const MIN_CHUNK_SIZE: u32 = 64;
/// Largest configurable minimum chunk size.
pub const MAX_CHUNK_MIN: u32 = 1 << 20;
/// Smallest configurable average chunk size.
pub const MIN_CHUNK_AVG: u32 = 256;
/// Largest configurable average chunk size.
pub const MAX_CHUNK_AVG: u32 = 4 << 20;
/// Smallest configurable maximum chunk size.
pub const MIN_CHUNK_MAX: u32 = 1024;
/// Most blobs one pack may index.
pub const MAX_PACK_ENTRIES: u32 = 1 << 20;
/// Most entries one index run may hold.
pub const MAX_INDEX_ENTRIES: u32 = 1 << 26;
/// Most entries (children) one tree may hold.
pub const MAX_TREE_NODES: u32 = 1 << 22;
/// Most pieces one split tree may have (see [`crate::tree::TreeBlob`]).
pub const MAX_TREE_PIECES: u32 = 1 << 16;
/// Most chunks one chunk list (one segment of a file) may hold.
pub const MAX_CHUNK_LIST_ENTRIES: u32 = 1 << 20;
/// Most segments one file may have (with the smallest segment size this is still 64 TiB+).
pub const MAX_FILE_SEGMENTS: u32 = 1 << 24;
/// Longest file name in a tree.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest symlink target in a tree.
pub const MAX_LINK_TARGET_LEN: usize = 4096;
/// Longest chain of block deltas a reader follows (the backup's chain bound is lower and
/// configurable); a longer one is corrupt, which also ends a cycle.
pub const MAX_DELTA_CHAIN: u32 = 16;
/// Smallest segment size a repository may be initialised with.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// Largest segment size a repository may be initialised with.
pub const MAX_SEGMENT_SIZE: u64 = 64 << 30;

const _: () = assert!(MAX_CHUNK_SIZE <= MAX_BLOB_SIZE);
const _: () = assert!(MIN_CHUNK_SIZE < MAX_CHUNK_SIZE);
// A chunk never spans a segment boundary, so a segment must hold at least one largest chunk.
const _: () = assert!(MIN_SEGMENT_SIZE >= 4 * MIN_CHUNK_SIZE as u64);
// A chunk list of a largest segment made of smallest chunks must be encodable.
const _: () = assert!((MAX_CHUNK_LIST_ENTRIES as u64) * 40 + 12 <= MAX_BLOB_SIZE as u64);

/// Most chunk ids one `Have` or `GetBlobs` frame may carry (2 MiB of ids).
pub const MAX_BATCH_IDS: u32 = 1 << 16;
/// Largest pack a client may send (a sealed pack is ~64 MiB plus one largest blob).
pub const MAX_PACK_LEN: u64 = 1 << 30;
/// Largest snapshot record or verify report carried in one frame.
pub const MAX_RECORD_LEN: u32 = 16 << 20;
/// Largest job object (a plan, a start record, a checkpoint, sealed) carried in one frame: a
/// plan of about 300,000 files. A larger plan is kept on the store itself.
pub const MAX_JOB_OBJECT_LEN: u32 = 32 << 20;
