//! Where a repository's blobs and snapshots are written and read, behind one trait. Two
//! implementations: [`Direct`](super::Direct), the repository's own store (a local directory or
//! a bucket) read and written by this process, and [`Receiver`](super::Receiver), a receiver
//! in front of one, over QUIC. The pipeline and the commands call only this trait.

use std::time::Duration;

use wire::pack::PackEntry;
use wire::repo::Snapshot;
use wire::verify::VerifyReport;
use wire::{BlobKind, ChunkId};

use crate::error::Result;
use crate::index::{ChunkIndex, KnownBlobs};

/// What a command needs from where a repository's data lives. `index` arguments are the
/// command's in-memory view of this process's index runs: the repository's own for
/// [`Direct`](super::Direct), empty for a receiver (whose index is on the receiver).
pub(crate) trait Backend: Send + Sync {
    /// Where the repository is, for messages.
    fn location(&self) -> String;
    /// Every snapshot, oldest first; one that does not decode is an error.
    fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>>;
    /// The last step of a backup: the snapshot becomes visible only now, after everything it
    /// references is durable.
    fn commit(&self, snapshot: &Snapshot) -> Result<ChunkId>;
    /// The snapshots a backup may take as its parent, oldest first: through a receiver with a
    /// policy, only those of writers this client may write as (no other tenant makes its
    /// `latest`).
    fn parent_candidates(&self) -> Result<Vec<(ChunkId, Snapshot)>>;
    /// Removes snapshots (their data stays until a gc); returns those that were there.
    fn forget(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>>;
    /// Starts a new pack; its bytes go to the sink as a core writes them.
    fn start_pack(&self) -> Result<Box<dyn PackSink>>;
    /// One writer's way of deciding which of the blobs it claimed the repository still lacks.
    fn new_blobs<'a>(&'a self, known: &'a KnownBlobs) -> Box<dyn NewBlobs + 'a>;
    /// Which of `ids` the repository has, in order (asked in one batch).
    fn have(&self, index: &ChunkIndex, ids: &[ChunkId]) -> Result<Vec<bool>>;
    /// Whether a chunk of the committed parent snapshot may still be stored, from memory alone
    /// (a chunk whose index entry was lost is stored again).
    fn may_have(&self, index: &ChunkIndex, id: &ChunkId) -> bool;
    /// One reader's source of stored blobs.
    fn blob_source<'a>(&'a self, index: &'a ChunkIndex) -> Box<dyn BlobSource + 'a>;
    /// Whether each read costs a network round trip: callers then announce reads in batches
    /// ([`BlobSource::prefetch`]), and no block delta is made (it reads the parent's block).
    fn reads_round_trip(&self) -> bool;
    /// A receiver verifies its repository where it lies and returns the report; `None` when
    /// the caller is to read the repository itself.
    fn verify_in_place(&self, read_data: bool) -> Result<Option<VerifyReport>>;
    /// Where the objects of sharded jobs (plans, start records, checkpoints) are kept.
    fn job_store(&self) -> std::sync::Arc<dyn super::jobs::JobStore>;
}

/// Where a pack's bytes go while a core writes it.
pub(crate) trait PackSink: Send {
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Every byte is written; the pack goes on to the sealer.
    fn finish(self: Box<Self>) -> Result<Box<dyn PackSeal>>;
}

/// A written pack on its way to durability, handled by the sealer thread off the cores.
pub(crate) trait PackSeal: Send {
    /// Returns once pack `id` (holding `entries`) is durable and indexed, and `known` knows it.
    fn seal(self: Box<Self>, id: &ChunkId, entries: &[PackEntry], known: &KnownBlobs) -> Result<()>;
    /// Drops a pack that will not be sealed (an earlier one failed).
    fn discard(self: Box<Self>);
}

/// Decides, for each blob a writer claimed (new to this backup), whether the repository lacks
/// it, and hands those to the packer: at once, or once a batched question is answered.
pub(crate) trait NewBlobs {
    fn offer(&mut self, id: ChunkId, kind: BlobKind, data: &[u8], packer: &mut dyn Packer) -> Result<()>;
    /// Decides the blobs still waiting.
    fn finish(&mut self, packer: &mut dyn Packer) -> Result<()>;
}

/// A writer's packing stage, as [`NewBlobs`] sees it.
pub(crate) trait Packer {
    /// Compresses a claimed blob into the open pack.
    fn pack(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<()>;
    /// Time spent waiting for the repository's answer (the dedup stage).
    fn waited(&mut self, time: Duration);
}

/// Stored blobs for one reader.
pub(crate) trait BlobSource: Send {
    /// Announces the blobs about to be read, in order, so a remote source streams them in one
    /// request instead of one round trip each.
    fn prefetch(&mut self, ids: Vec<ChunkId>);
    /// Reads blob `id`'s stored bytes into `stored`; returns its pack entry and where it came
    /// from, for messages.
    fn read_stored(&mut self, id: &ChunkId, stored: &mut Vec<u8>) -> Result<(PackEntry, String)>;
}
