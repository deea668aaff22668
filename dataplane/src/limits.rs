//! Every runtime bound of the data plane, in one place. Format bounds are in `wire::limits`.
//!
//! Memory of a backup is the sum of these budgets, whatever the size of the snapshot:
//! per core one pack write buffer, one compression buffer and the segment being chunked (mapped,
//! and dropped from the page tables as soon as it is done), plus the bounded queues below.

/// A core drops the pages of the segment it is chunking from its page tables every this many
/// bytes, so a mapped 1 GiB segment costs this much RSS, not 1 GiB.
pub const MAPPED_WINDOW: usize = 8 << 20;
/// Bytes a core generates at a time for a streamed (synthetic) source, plus one largest chunk.
pub const STREAM_WINDOW: usize = 8 << 20;
/// Pack files are sealed once they reach this many bytes (the design's ~64 MiB).
pub const PACK_TARGET_SIZE: u64 = 64 << 20;
/// Smallest `--pack-size` accepted (tests use small packs to exercise sealing).
pub const MIN_PACK_SIZE: u64 = 64 << 10;
/// Largest `--pack-size` accepted: a sealed pack plus one largest blob stays within what a
/// receiver takes.
pub const MAX_PACK_SIZE: u64 = 512 << 20;
/// Bytes buffered in memory before a pack writer hands them to the kernel.
pub const PACK_WRITE_BUFFER: usize = 1 << 20;
/// Segment jobs queued for the cores, per core: enough to keep every core busy while the
/// walker stats the next files.
pub const SEGMENT_QUEUE_PER_CORE: usize = 4;
/// Files whose content is still being chunked before the walker waits for the oldest
/// directory to complete. Bounds the walker's bookkeeping (and open mappings).
pub const PENDING_FILES: usize = 1024;
/// Closed packs waiting for fsync: past this the cores wait for the disk.
pub const SEAL_QUEUE: usize = 4;
/// Bytes a restoring core collects before one `pwrite` (plus one largest chunk).
pub const RESTORE_WRITE_BUFFER: usize = 4 << 20;
/// Parent trees of one directory's subdirectories a remote backup fetches in one stream (and
/// holds until the walk enters each): bounds the walker's memory on very wide directories.
pub const PREFETCH_SUBTREES: usize = 1024;
/// Segments a restoring core takes at once when more are queued, and the file bytes they may
/// cover: their chunk lists (and then their chunks) come from a receiver in one request each.
/// Chunk lists of a batch are held decoded: at most ~40 bytes per smallest chunk of these bytes.
pub const RESTORE_BATCH_SEGMENTS: usize = 64;
pub const RESTORE_BATCH_BYTES: u64 = 64 << 20;
/// Directories waiting for their files before the walker completes the oldest: bounds the
/// walker's memory on trees of many small or empty directories.
pub const PENDING_DIRS: usize = 4096;
/// Bytes `verify --read-data` reads at a time while hashing a pack (more when one blob is
/// larger: a read never splits a blob).
pub const VERIFY_READ_BUFFER: usize = 1 << 20;
/// Chunk lists `verify` hands its checking threads at a time (the depth of both queues).
pub const VERIFY_LIST_BATCH: usize = 64;
/// Open pack files a reader keeps per core (restore, verify).
pub const OPEN_PACKS_PER_READER: usize = 64;
/// Index entries per fence: a lookup reads one block of this many entries (2.75 KiB) from a
/// run, and a run costs 8 bytes of memory per block.
pub const INDEX_FENCE_STRIDE: usize = 32;
/// Membership filter bits per indexed blob (~1% of absent blobs pass).
pub const FILTER_BITS_PER_BLOB: u64 = 10;
/// Smallest filter, in blobs (80 KiB).
pub const FILTER_MIN_CAPACITY: u64 = 1 << 16;
/// Index runs of one size tier merged into one; also bounds the runs per tier, so a lookup
/// asks at most this many runs per tier.
pub const INDEX_MERGE_FANIN: usize = 8;
/// Read (and write) buffer per index run streamed while loading or merging.
pub const INDEX_READ_BUFFER: usize = 256 << 10;
/// Page-file members of one tar file that get page-aligned chunks (16 bytes each in memory
/// while the file is backed up); members past this are chunked by content, with a warning.
pub const TAR_PAGE_MEMBERS: usize = 1 << 18;
/// `backup --stdin` reads standard input in pieces of this size, and a segment being chunked
/// holds at most `STDIN_PIECES` of them queued: with the one being read and the one a core
/// copies from, (`STDIN_PIECES` + 2) pieces per segment in flight.
pub const STDIN_PIECE: usize = 4 << 20;
pub const STDIN_PIECES: usize = 4;
/// Changed blocks a core holds (bytes) while their parent versions are read ahead in one
/// request per level of their chains: one round trip per this many bytes of changed blocks
/// through a receiver, instead of one per block. Their bases are held as long, stored.
pub const DELTA_BATCH: usize = 8 << 20;
/// Largest GNU long name or pax extended header a tar scan reads (it holds one in memory); a
/// larger one ends the scan with a warning (the rest is chunked by content).
pub const TAR_MAX_EXTENSION: usize = 1 << 20;
/// Bytes of blobs a core collects before it asks a receiver which of them it lacks (one `Have`
/// round trip per this much new-looking data), plus one largest blob. A core holds two such
/// batches: one filling, one whose answer is on its way.
pub const HAVE_BATCH_BYTES: usize = 4 << 20;
/// Bytes of a pack read from disk and written to a QUIC stream at a time.
pub const PACK_SEND_PIECE: usize = 1 << 20;
/// Bytes one QUIC stream may have in flight unacknowledged (per direction): a slow receiver
/// stops a sender after this much, whatever the pack size.
pub const QUIC_STREAM_WINDOW: u32 = 8 << 20;
/// Bytes one QUIC connection may have in flight over all its streams.
pub const QUIC_CONNECTION_WINDOW: u32 = 32 << 20;
/// Requests one connection may have open at once (a few per core).
pub const QUIC_STREAMS_PER_CONNECTION: u32 = 256;
/// A connection with no traffic (keep-alives included) for this long is dead.
pub const QUIC_IDLE_TIMEOUT_S: u64 = 15;
/// Bytes of a file uploaded to object storage per request: a larger file goes up in parts of
/// this size, [`S3_PARTS_IN_FLIGHT`] at a time, so an upload holds at most their product.
pub const S3_PART_SIZE: usize = 8 << 20;
pub const S3_PARTS_IN_FLIGHT: usize = 2;
/// Bytes an object-storage read fetches ahead of what was asked (one request per this much of
/// a pack read in order), and the most all open objects of a process hold that way; past it,
/// reads fetch only what they need.
pub const S3_READ_AHEAD: usize = 4 << 20;
pub const S3_READ_CACHE: usize = 64 << 20;
/// A failed object-storage request is retried (with backoff) this often, within this long.
pub const S3_MAX_RETRIES: usize = 4;
pub const S3_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A receiver that misses a blob looks for index runs other writers of a shared store added,
/// at most this often (one listing of the store's index each time).
pub const INDEX_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Sessions a receiver serves at once; more wait at the handshake.
pub const RECEIVER_SESSIONS: usize = 256;
/// Sessions one client certificate may hold at once, so one identity cannot take them all.
pub const RECEIVER_SESSIONS_PER_IDENTITY: usize = RECEIVER_SESSIONS / 4;
/// Bytes of request payloads and pack pieces one connection may hold in a receiver's memory at
/// once; further streams wait. With the limits above: at most 64 MiB x 256 sessions.
pub const RECEIVER_CONNECTION_BUFFER: usize = 64 << 20;
/// A session with no request open for this long is closed (keep-alives do not count); the
/// receiver's `--idle-timeout` default.
pub const RECEIVER_IDLE_SESSION: &str = "120s";
/// Most cores one process drives.
pub const MAX_CORES: usize = 1024;
/// Locked memory glommio registers for io_uring per core (its default is 10 MiB; less keeps
/// cbcr under a default RLIMIT_MEMLOCK of 8 MiB on two cores).
pub const IO_MEMORY_PER_CORE: usize = 1 << 20;
/// zstd level used when none is given (the design's default).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// Index entries `repair index` holds before it writes them as one run (88 bytes each).
pub const REPAIR_RUN_ENTRIES: usize = 1 << 18;
/// Chunks `repair snapshots` remembers as looked up (about 50 bytes each) before it forgets
/// them all and looks chunks up again.
pub const REPAIR_CHUNKS_REMEMBERED: usize = 1 << 20;
/// `backup --page-chunk`'s default: a repository's segments must be a multiple of it.
pub const DEFAULT_PAGE_CHUNK: u64 = 64 << 10;
/// Longest chain of block deltas a backup builds before storing a block whole again.
pub const DEFAULT_DELTA_CHAIN: u32 = 3;
/// A changed page block is stored as a delta only when what the delta carries (differing bytes
/// of similar pages, rewritten pages whole) is at most 1/this of the block; past that, storing
/// the block whole costs about the same and starts a new chain.
pub const DELTA_MAX_CHANGED_FRACTION: usize = 2;

const _: () = assert!(MIN_PACK_SIZE <= PACK_TARGET_SIZE && PACK_TARGET_SIZE <= MAX_PACK_SIZE);
const _: () = assert!(MAX_PACK_SIZE + wire::limits::MAX_STORED_BLOB_SIZE as u64 <= wire::limits::MAX_PACK_LEN);
// The window must hold a largest chunk, or a chunk could be dropped while it is still read.
const _: () = assert!(MAPPED_WINDOW >= wire::limits::MAX_CHUNK_SIZE as usize / 2);
// A pack must hold at least one largest blob, or a writer could never make progress.
const _: () = assert!(PACK_TARGET_SIZE >= wire::limits::MAX_BLOB_SIZE as u64);
const _: () = assert!(PACK_WRITE_BUFFER as u64 <= MIN_PACK_SIZE * 16);
/// Source read times a backup keeps between two looks of whoever steers its read cap (4 bytes
/// each; one per window of up to `MAPPED_WINDOW` bytes, so a second of reading needs far fewer).
pub const READ_SAMPLES: usize = 4096;
/// Tasks (shards and commits) an agent runs at once, at most; orders beyond are refused with
/// a failure report. The control plane assigns by the capacity the agent registered, far below.
pub const AGENT_MAX_TASKS: usize = 256;
/// Admin socket connections a daemon serves at once, and the bytes one may send in all.
pub const ADMIN_CONNECTIONS: usize = 8;
pub const ADMIN_REQUEST_BYTES: u64 = 1 << 20;
/// Readings of its shards an agent holds between two looks of its throttle (one per shard a
/// second; more are dropped until the next look).
pub const AGENT_READINGS: usize = 4 * AGENT_MAX_TASKS;
/// Shard reports an agent keeps to send while the control plane is unreachable (one per
/// task, so never more than the tasks).
pub const AGENT_REPORT_QUEUE: usize = AGENT_MAX_TASKS;
