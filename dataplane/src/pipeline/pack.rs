//! Writing blobs into packs, and reading them back verified.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use wire::delta::BlockDelta;
use wire::pack::{encode_trailer, PackEntry, PackHeader};
use wire::tree::{Tree, TreeBlob};
use wire::{BlobKind, ChunkId, Compression};

use crate::error::{Error, Result};
use crate::fault;
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::metrics::{Stage, StageHistograms};
use crate::repo::{BlobSource, NewBlobs, OpenScratch, PackSeal, PackSink, Packer, Repository, Sealing};

/// One pack being written.
struct PackWriter {
    out: Box<dyn PackSink>,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    fn create(repo: &Repository) -> Result<Self> {
        let mut w = Self { out: repo.backend.start_pack()?, hasher: blake3::Hasher::new(), len: 0, entries: vec![] };
        w.write(&PackHeader::encode())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn add(
        &mut self,
        id: ChunkId,
        kind: BlobKind,
        compression: Compression,
        raw_len: usize,
        stored: &[u8],
    ) -> Result<()> {
        let entry = PackEntry::new(id, self.len, stored.len() as u32, raw_len as u32, kind, compression);
        self.write(stored)?;
        self.entries.push(entry);
        fault::point("pack-write");
        Ok(())
    }

    /// Writes the trailer and hands the pack to the sealer. Returns the bytes it occupies.
    fn close(mut self, sealer: &Sender<SealJob>) -> Result<u64> {
        let trailer = encode_trailer(&self.entries, self.len);
        self.write(&trailer)?;
        let (id, entries) = (ChunkId(*self.hasher.finalize().as_bytes()), self.entries);
        let seal = self.out.finish()?;
        sealer.send(SealJob { seal, id, entries }).map_err(|_| Error::Internal("the pack sealer stopped".into()))?;
        Ok(self.len)
    }
}

/// A written pack on its way to durability.
pub(crate) struct SealJob {
    seal: Box<dyn PackSeal>,
    id: ChunkId,
    entries: Vec<PackEntry>,
}

/// Makes closed packs durable off the cores, in the design's commit order (for a local
/// repository: fsync the pack, rename it into `packs/`, then write its index run; through a
/// receiver: wait for its acknowledgement). fsync waits on the disk, not the CPU, so a core
/// that did it itself would sit idle (measured: 0.77-0.84 of the stage limit with fsync on the
/// cores, 0.94-0.97 without; docs/PERFORMANCE.md).
pub(crate) struct Sealer {
    tx: Sender<SealJob>,
    thread: JoinHandle<Result<()>>,
}

impl Sealer {
    pub(crate) fn start(known: Arc<KnownBlobs>) -> Self {
        let (tx, rx) = bounded::<SealJob>(limits::SEAL_QUEUE);
        let thread = std::thread::Builder::new()
            .name("cbcr-sealer".into())
            .spawn(move || {
                let mut first_error = None;
                for job in rx {
                    if first_error.is_some() {
                        job.seal.discard();
                    } else if let Err(e) = job.seal.seal(&job.id, &job.entries, &known) {
                        first_error = Some(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
            .expect("threads can be spawned");
        Self { tx, thread }
    }

    /// Where [`BlobWriter`]s send closed packs.
    pub(crate) fn sender(&self) -> Sender<SealJob> {
        self.tx.clone()
    }

    /// Waits until every pack sent is durable and indexed. Every sender must be dropped first.
    pub(crate) fn finish(self) -> Result<()> {
        drop(self.tx);
        self.thread.join().expect("the sealer does not panic")
    }
}

/// What one [`BlobWriter`] added to the repository, and how long its stages took.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteStats {
    pub stages: StageHistograms,
    /// File-content chunks stored (trees and chunk lists are not counted).
    pub chunks_new: u64,
    /// Raw bytes of those chunks.
    pub bytes_new: u64,
    /// Bytes of the packs sealed, metadata blobs and trailers included.
    pub bytes_stored: u64,
}

impl WriteStats {
    pub(crate) fn add(&mut self, o: &WriteStats) {
        self.stages.merge(&o.stages);
        self.chunks_new += o.chunks_new;
        self.bytes_new += o.bytes_new;
        self.bytes_stored += o.bytes_stored;
    }
}

/// A core's way into the repository: dedups, compresses and packs blobs. One per core, never
/// shared; the only shared state is the [`KnownBlobs`] set.
pub(crate) struct BlobWriter<'a> {
    known: &'a KnownBlobs,
    /// Decides which claimed blobs the repository lacks (see [`crate::repo::Backend::new_blobs`]).
    new_blobs: Box<dyn NewBlobs + 'a>,
    packing: Packing<'a>,
}

/// The compress and write stages of one writer: the [`Packer`] its [`NewBlobs`] feeds.
struct Packing<'a> {
    repo: &'a Repository,
    sealer: Sender<SealJob>,
    pack: Option<PackWriter>,
    pack_size: u64,
    compressor: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
    /// The envelope of the blob being packed, in an encrypted repository.
    sealed: Vec<u8>,
    stats: WriteStats,
}

impl<'a> BlobWriter<'a> {
    pub(crate) fn new(
        repo: &'a Repository,
        known: &'a KnownBlobs,
        sealer: Sender<SealJob>,
        pack_size: u64,
        level: i32,
    ) -> Result<Self> {
        let compressor =
            zstd::bulk::Compressor::new(level).map_err(|e| Error::Usage(format!("zstd level {level}: {e}")))?;
        Ok(Self {
            known,
            new_blobs: repo.backend.new_blobs(known),
            packing: Packing {
                repo,
                sealer,
                pack: None,
                pack_size,
                compressor,
                buf: Vec::new(),
                sealed: Vec::new(),
                stats: WriteStats::default(),
            },
        })
    }

    /// What this writer stored so far, and its stage timings.
    pub(crate) fn stats(&mut self) -> &mut WriteStats {
        &mut self.packing.stats
    }

    /// Hashes and stores a blob unless the repository already has it. Returns its id and
    /// whether it was new.
    pub(crate) fn store(&mut self, kind: BlobKind, data: &[u8]) -> Result<(ChunkId, bool)> {
        let id = self.hash(data);
        Ok((id, self.store_with_id(id, kind, data)?))
    }

    /// The id of `data` (timed as the hash stage).
    pub(crate) fn hash(&mut self, data: &[u8]) -> ChunkId {
        let started = Instant::now();
        let id = self.packing.repo.key.blob_id(data);
        self.packing.stats.stages.record(Stage::Hash, started.elapsed());
        id
    }

    /// Stores a blob whose id the caller computed; returns whether it was new (through a
    /// receiver: whether it was new to this backup; the receiver may still have it).
    pub(crate) fn store_with_id(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<bool> {
        debug_assert_eq!(id, self.packing.repo.key.blob_id(data));
        if !self.claim(&id)? {
            return Ok(false);
        }
        assert!(data.len() <= wire::limits::MAX_BLOB_SIZE as usize);
        self.new_blobs.offer(id, kind, data, &mut self.packing)?;
        Ok(true)
    }

    /// Claims `id` for this writer: `false` when the repository (or another core) has it.
    /// A claimed blob must then be stored with [`Self::store_claimed`].
    pub(crate) fn claim(&mut self, id: &ChunkId) -> Result<bool> {
        self.known.claim(id)
    }

    /// Stores a blob claimed with [`Self::claim`], as `kind`: a [`BlobKind::Delta`]'s `data` is
    /// the delta's encoding, not the block its id names. Through a receiver it is packed once
    /// the receiver says it lacks the block, as [`Self::store_with_id`]'s blobs are.
    pub(crate) fn store_claimed(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<()> {
        assert!(data.len() <= wire::limits::MAX_BLOB_SIZE as usize);
        self.new_blobs.offer(id, kind, data, &mut self.packing)
    }

    /// Closes the open pack and sends it to the sealer: what was stored so far is durable once
    /// the sealer has sealed it (its claims are gone then). The writer goes on with a new pack.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.new_blobs.finish(&mut self.packing)?;
        self.packing.seal()
    }

    /// Closes the open pack; everything stored is durable once the [`Sealer`] has finished.
    pub(crate) fn finish(mut self) -> Result<WriteStats> {
        self.new_blobs.finish(&mut self.packing)?;
        self.packing.seal()?;
        Ok(self.packing.stats)
    }
}

impl Packing<'_> {
    fn seal(&mut self) -> Result<()> {
        if let Some(pack) = self.pack.take() {
            self.stats.bytes_stored += pack.close(&self.sealer)?;
        }
        Ok(())
    }
}

impl Packer for Packing<'_> {
    /// Compresses a claimed blob into the open pack; seals the pack when it is full.
    fn pack(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<()> {
        let started = Instant::now();
        self.buf.clear();
        self.buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
        let compressed = self.compressor.compress_to_buffer(data, &mut self.buf).is_ok_and(|n| n < data.len());
        let written = Instant::now();
        self.stats.stages.record(Stage::Compress, written - started);
        let (plain, compression) =
            if compressed { (&self.buf[..], Compression::Zstd) } else { (data, Compression::None) };
        // Sealed under the blob's id, so a blob moved to another's place fails to open.
        let stored = self.repo.sealing.seal(&id.0, plain, &mut self.sealed)?;
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(self.repo)?);
        }
        let pack = self.pack.as_mut().expect("created above");
        pack.add(id, kind, compression, data.len(), stored)?;
        self.stats.stages.record(Stage::Write, written.elapsed());
        if matches!(kind, BlobKind::Data | BlobKind::Delta) {
            self.stats.chunks_new += 1;
            self.stats.bytes_new += data.len() as u64;
        }
        if pack.len >= self.pack_size {
            self.seal()?;
        }
        Ok(())
    }

    fn waited(&mut self, time: Duration) {
        self.stats.stages.record(Stage::Dedup, time);
    }
}

/// Reads blobs back, decompresses them and checks every one against its id. One per core.
pub struct BlobReader<'a> {
    repo: &'a Repository,
    source: Box<dyn BlobSource + 'a>,
    decoder: BlobDecoder,
    stored: Vec<u8>,
    /// Whether each read from `source` costs a round trip (a receiver).
    remote: bool,
    /// Stored blobs read ahead by [`Self::prefetch_blocks`] (entry, bytes, where from), taken
    /// before the source until [`Self::forget_prefetched`].
    ahead: HashMap<ChunkId, (PackEntry, Vec<u8>, String)>,
}

impl<'a> BlobReader<'a> {
    pub fn new(repo: &'a Repository, index: &'a ChunkIndex) -> Result<Self> {
        let source = repo.backend.blob_source(index);
        let remote = repo.backend.reads_round_trip();
        Ok(Self { repo, source, decoder: BlobDecoder::new(repo)?, stored: Vec::new(), remote, ahead: HashMap::new() })
    }

    /// Reads ahead blocks `ids` and every base of their delta chains, one request per level
    /// of the chains (a receiver streams each level in one), so that the [`Self::read_block`]
    /// of each costs no round trip. A local repository needs none of it. What fails here is
    /// read again (and reported) by `read_block`. The caller bounds `ids` (what is read ahead
    /// is held until [`Self::forget_prefetched`]).
    pub fn prefetch_blocks(&mut self, ids: &[ChunkId]) {
        if !self.remote {
            return;
        }
        let mut level: Vec<ChunkId> = ids.to_vec();
        for _ in 0..=wire::limits::MAX_DELTA_CHAIN {
            level.retain(|id| !self.ahead.contains_key(id));
            level.sort_unstable();
            level.dedup();
            if level.is_empty() {
                return;
            }
            self.source.prefetch(level.clone());
            let mut bases = vec![];
            for id in &level {
                let Ok((entry, from)) = self.source.read_stored(id, &mut self.stored) else { continue };
                if entry.kind() == BlobKind::Delta {
                    let mut raw = Vec::new();
                    if self.decoder.decode(&self.stored, &entry, &mut raw).is_ok() {
                        bases.extend(BlockDelta::decode(&raw).ok().map(|delta| delta.base));
                    }
                }
                self.ahead.insert(*id, (entry, std::mem::take(&mut self.stored), from));
            }
            level = bases;
        }
    }

    /// Whether [`Self::prefetch_blocks`] reads ahead (each read from the source costs a round
    /// trip), so that callers batch their reads.
    pub fn reads_ahead(&self) -> bool {
        self.remote
    }

    /// Drops what [`Self::prefetch_blocks`] read ahead.
    pub fn forget_prefetched(&mut self) {
        self.ahead.clear();
    }

    /// Announces the blobs about to be read, in order: a receiver streams them in one request
    /// instead of one round trip each. A local repository needs no notice.
    pub fn prefetch(&mut self, ids: Vec<ChunkId>) {
        self.source.prefetch(ids);
    }

    /// Reads tree `id`, verified and decoded: a whole one, or every piece of a split one.
    pub fn read_tree(&mut self, id: &ChunkId) -> Result<Tree> {
        self.read_tree_checked(id, |_| true)
    }

    /// [`Self::read_tree`], where a piece for which `usable` is false fails the read (verify
    /// knows some blobs are damaged already).
    pub fn read_tree_checked(&mut self, id: &ChunkId, usable: impl Fn(&ChunkId) -> bool) -> Result<Tree> {
        let bad = |tree: &ChunkId, e: String| Error::Integrity(format!("tree {tree}: {e}"));
        let mut buf = Vec::new();
        self.read(id, &mut buf)?;
        let pieces = match TreeBlob::decode(&buf).map_err(|e| bad(id, e.to_string()))? {
            TreeBlob::Whole(tree) => return Ok(tree),
            TreeBlob::Pieces(pieces) => pieces,
        };
        self.prefetch(pieces.clone());
        let mut trees = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            if !usable(piece) {
                return Err(bad(id, format!("piece {piece} is damaged")));
            }
            self.read(piece, &mut buf)?;
            trees.push(Tree::decode(&buf).map_err(|e| bad(id, format!("piece {piece}: {e}")))?);
        }
        Tree::join(trees).map_err(|e| bad(id, e.to_string()))
    }

    /// Reads blob `id` into `out` (replacing its content).
    pub fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        self.read_append(id, out)
    }

    /// Reads blob `id`, verified, and appends it to `out`; on error `out` is left as it was.
    pub fn read_append(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.read_block(id, out).map(|_depth| ())
    }

    /// [`Self::read_append`] that also says how the blob is stored: 0 when whole, else the
    /// depth of its delta chain (a block delta is rebuilt from its base, recursively).
    pub fn read_block(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<u32> {
        let start = out.len();
        let read = self.read_chain(id, out, wire::limits::MAX_DELTA_CHAIN + 1);
        if read.is_err() {
            out.truncate(start);
        }
        read
    }

    /// Appends blob `id` to `out`; a delta must be shallower than `below`.
    fn read_chain(&mut self, id: &ChunkId, out: &mut Vec<u8>, below: u32) -> Result<u32> {
        let start = out.len();
        let (entry, from) = match self.ahead.get(id) {
            Some((entry, stored, from)) => {
                self.stored.clone_from(stored);
                (*entry, from.clone())
            }
            None => self.source.read_stored(id, &mut self.stored)?,
        };
        if entry.kind() != BlobKind::Delta {
            self.decoder
                .decode(&self.stored, &entry, out)
                .map_err(|detail| Error::Integrity(format!("{from}: blob {} {detail}", entry.id)))?;
            if self.repo.key.blob_id(&out[start..]) != entry.id {
                return Err(Error::Integrity(format!("{from}: blob {id} does not match its id (data is corrupt)")));
            }
            return Ok(0);
        }
        let integrity = |detail: String| Error::Integrity(format!("{from}: delta {id}: {detail}"));
        let mut raw = Vec::new();
        self.decoder.decode(&self.stored, &entry, &mut raw).map_err(integrity)?;
        let delta = BlockDelta::decode(&raw).map_err(|e| integrity(e.to_string()))?;
        if delta.depth >= below {
            return Err(integrity(format!(
                "chain depth {} under a delta of depth {below} (corrupt chain)",
                delta.depth
            )));
        }
        let mut base = Vec::new();
        self.read_chain(&delta.base, &mut base, delta.depth).map_err(|e| {
            integrity(format!("broken link at depth {} of its chain: base {}: {e}", delta.depth, delta.base))
        })?;
        delta.apply(&base, out).map_err(|e| integrity(e.to_string()))?;
        if self.repo.key.blob_id(&out[start..]) != *id {
            return Err(integrity("the rebuilt block does not match its id (data is corrupt)".into()));
        }
        Ok(delta.depth)
    }
}

/// Turns a blob's stored bytes back into the blob: opens its envelope (in an encrypted
/// repository, bound to its id), then decompresses it.
pub(crate) struct BlobDecoder {
    sealing: Arc<dyn Sealing>,
    decompressor: zstd::bulk::Decompressor<'static>,
    opened: OpenScratch,
}

impl BlobDecoder {
    pub(crate) fn new(repo: &Repository) -> Result<Self> {
        let decompressor = zstd::bulk::Decompressor::new().map_err(|e| Error::Internal(format!("zstd: {e}")))?;
        Ok(Self { sealing: Arc::clone(&repo.sealing), decompressor, opened: OpenScratch::default() })
    }

    /// Appends the raw blob of entry `e`, stored as `stored`, to `out`; the error says what
    /// failed. Not checked against its id: callers hash what they need to.
    pub(crate) fn decode(
        &mut self,
        stored: &[u8],
        e: &PackEntry,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let plain = self.sealing.open("blob", &e.id.0, stored, &mut self.opened).map_err(|err| err.to_string())?;
        match e.compression() {
            Compression::None => out.extend_from_slice(plain),
            Compression::Zstd => {
                let start = out.len();
                out.resize(start + e.raw_len() as usize, 0);
                let n = self
                    .decompressor
                    .decompress_to_buffer(plain, &mut out[start..])
                    .map_err(|err| format!("does not decompress: {err}"))?;
                if n != e.raw_len() as usize {
                    out.truncate(start);
                    return Err(format!("decompresses to {n} bytes, expected {}", e.raw_len()));
                }
            }
        }
        Ok(())
    }
}
