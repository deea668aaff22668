//! Writing blobs into packs, and reading them back verified.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Sender};

use wire::delta::BlockDelta;
use wire::index::{encode_sorted, IndexEntry};
use wire::pack::{encode_trailer, PackEntry, PackHeader};
use wire::{BlobKind, ChunkId, Compression};

use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::metrics::{Stage, StageHistograms};
use crate::net::remote::{BlobStream, HaveQuery, PackAck, PackUpload};
use crate::repo::{pack_name, Repository};
use crate::store::{ObjectKind, ObjectReader};

/// Where a pack's bytes go as they are written.
enum PackOut {
    /// A file under `tmp/`, made durable by the [`Sealer`].
    File { tmp: PathBuf, out: BufWriter<File> },
    /// Straight to a receiver: no local copy to write and read back.
    Remote(PackUpload),
}

/// One pack being written.
struct PackWriter {
    out: PackOut,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    fn create(repo: &Repository) -> Result<Self> {
        let out = match &repo.remote {
            Some(remote) => PackOut::Remote(PackUpload::start(Arc::clone(remote))?),
            None => {
                let tmp = repo.tmp_path("pack");
                let file = OpenOptions::new().create_new(true).write(true).open(&tmp).at(&tmp)?;
                PackOut::File { tmp, out: BufWriter::with_capacity(limits::PACK_WRITE_BUFFER, file) }
            }
        };
        let mut w = Self { out, hasher: blake3::Hasher::new(), len: 0, entries: vec![] };
        w.write(&PackHeader::encode())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.out {
            PackOut::File { tmp, out } => out.write_all(bytes).at(tmp)?,
            PackOut::Remote(upload) => upload.write(bytes)?,
        }
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
        let target = match self.out {
            PackOut::File { tmp, out } => {
                let file = out.into_inner().map_err(|e| e.into_error()).at(&tmp)?;
                SealTarget::File { tmp, file }
            }
            PackOut::Remote(upload) => SealTarget::Remote(upload.finish()?),
        };
        sealer.send(SealJob { target, id, entries }).map_err(|_| Error::Internal("the pack sealer stopped".into()))?;
        Ok(self.len)
    }
}

/// A written pack on its way to durability.
pub(crate) struct SealJob {
    target: SealTarget,
    id: ChunkId,
    entries: Vec<PackEntry>,
}

enum SealTarget {
    File {
        tmp: PathBuf,
        file: File,
    },
    /// Sent; the receiver acknowledges once it is durable.
    Remote(PackAck),
}

/// Makes closed packs durable off the cores, in the design's commit order: fsync the pack,
/// rename it into `packs/`, then write its index run. fsync waits on the disk, not the CPU, so
/// a core that did it itself would sit idle (measured: 0.77-0.84 of the stage limit with fsync
/// on the cores, 0.94-0.97 without; docs/PERFORMANCE.md).
pub(crate) struct Sealer {
    tx: Sender<SealJob>,
    thread: JoinHandle<Result<()>>,
}

impl Sealer {
    pub(crate) fn start(repo: Repository, known: Arc<KnownBlobs>) -> Self {
        let (tx, rx) = bounded::<SealJob>(limits::SEAL_QUEUE);
        let thread = std::thread::Builder::new()
            .name("cbcr-sealer".into())
            .spawn(move || {
                let mut first_error = None;
                for job in rx {
                    if first_error.is_some() {
                        if let SealTarget::File { tmp, .. } = &job.target {
                            let _ = std::fs::remove_file(tmp);
                        }
                    } else if let Err(e) = seal(&repo, &known, job) {
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

fn seal(repo: &Repository, known: &KnownBlobs, job: SealJob) -> Result<()> {
    let (tmp, file) = match job.target {
        SealTarget::File { tmp, file } => (tmp, file),
        SealTarget::Remote(ack) => {
            // The receiver made it durable and indexed it: nothing is left to do here.
            ack.wait(&job.id)?;
            known.release(job.entries.iter().map(|e| e.id));
            return Ok(());
        }
    };
    file.sync_all().at(&tmp)?;
    fault::point("pack-seal");
    repo.publish_pack(&tmp, &job.id)?;
    fault::point("index-write");
    let mut run: Vec<IndexEntry> = job.entries.iter().map(|&entry| IndexEntry { pack: job.id, entry }).collect();
    run.sort_unstable_by_key(|e| e.id());
    let path = repo.write_index_run(&encode_sorted(&run))?;
    known.sealed(&path, &run)?;
    // Merging here keeps lookups to a few runs and runs on no core.
    known.index().compact(repo)
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
    repo: &'a Repository,
    known: &'a KnownBlobs,
    sealer: Sender<SealJob>,
    pack: Option<PackWriter>,
    pack_size: u64,
    compressor: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
    /// Remote repository only: blobs claimed but not yet asked about, so one `Have` round trip
    /// covers [`limits::HAVE_BATCH_BYTES`]; and the batch whose answer is on its way.
    pending: HaveBatch,
    asked: Option<(HaveBatch, HaveQuery<'a>)>,
    pub stats: WriteStats,
}

/// Blobs waiting for a receiver's answer: (id, kind, their bytes in `data`).
#[derive(Default)]
struct HaveBatch {
    blobs: Vec<(ChunkId, BlobKind, std::ops::Range<usize>)>,
    data: Vec<u8>,
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
            repo,
            known,
            sealer,
            pack: None,
            pack_size,
            compressor,
            buf: Vec::new(),
            pending: HaveBatch::default(),
            asked: None,
            stats: WriteStats::default(),
        })
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
        let id = self.repo.key.blob_id(data);
        self.stats.stages.record(Stage::Hash, started.elapsed());
        id
    }

    /// Stores a blob whose id the caller computed; returns whether it was new (for a remote
    /// repository: whether it was new to this backup; the receiver may still have it).
    pub(crate) fn store_with_id(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<bool> {
        debug_assert_eq!(id, self.repo.key.blob_id(data));
        if !self.claim(&id)? {
            return Ok(false);
        }
        assert!(data.len() <= wire::limits::MAX_BLOB_SIZE as usize);
        if self.repo.remote.is_some() {
            let p = &mut self.pending;
            let start = p.data.len();
            p.data.extend_from_slice(data);
            p.blobs.push((id, kind, start..p.data.len()));
            if p.data.len() >= limits::HAVE_BATCH_BYTES || p.blobs.len() >= wire::limits::MAX_BATCH_IDS as usize {
                self.ask_receiver()?;
            }
            return Ok(true);
        }
        self.pack_blob(id, kind, data)?;
        Ok(true)
    }

    /// Claims `id` for this writer: `false` when the repository (or another core) has it.
    /// A claimed blob must then be stored with [`Self::store_claimed`].
    pub(crate) fn claim(&mut self, id: &ChunkId) -> Result<bool> {
        self.known.claim(id)
    }

    /// Packs a blob claimed with [`Self::claim`], as `kind`: a [`BlobKind::Delta`]'s `data` is
    /// the delta's encoding, not the block its id names. Local repositories only (a remote
    /// one's blobs wait for the receiver's answer in [`Self::store_with_id`]).
    pub(crate) fn store_claimed(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<()> {
        assert!(self.repo.remote.is_none(), "block deltas are written to local repositories only");
        self.pack_blob(id, kind, data)
    }

    /// Sends the pending batch's `Have` and packs what the receiver lacks of the batch asked
    /// before: the answer to one batch arrives while the next is chunked.
    fn ask_receiver(&mut self) -> Result<()> {
        let Some(remote) = self.repo.remote.as_deref() else { return Ok(()) };
        let spare = self.pack_answered()?;
        if !self.pending.blobs.is_empty() {
            let ids = self.pending.blobs.iter().map(|b| b.0).collect();
            let query = remote.have_start(ids)?;
            self.asked = Some((std::mem::replace(&mut self.pending, spare), query));
        }
        Ok(())
    }

    /// Waits for the batch asked about, packs what the receiver lacks; returns the emptied batch.
    fn pack_answered(&mut self) -> Result<HaveBatch> {
        let Some((mut batch, query)) = self.asked.take() else { return Ok(HaveBatch::default()) };
        let started = Instant::now();
        let present = query.answer()?;
        self.stats.stages.record(Stage::Dedup, started.elapsed());
        for ((id, kind, range), have) in batch.blobs.drain(..).zip(present) {
            if have {
                self.known.release([id]);
            } else {
                self.pack_blob(id, kind, &batch.data[range])?;
            }
        }
        batch.data.clear();
        Ok(batch)
    }

    /// Compresses a claimed blob into the open pack; seals the pack when it is full.
    fn pack_blob(&mut self, id: ChunkId, kind: BlobKind, data: &[u8]) -> Result<()> {
        let started = Instant::now();
        self.buf.clear();
        self.buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
        let compressed = self.compressor.compress_to_buffer(data, &mut self.buf).is_ok_and(|n| n < data.len());
        let written = Instant::now();
        self.stats.stages.record(Stage::Compress, written - started);
        let (stored, compression) =
            if compressed { (&self.buf[..], Compression::Zstd) } else { (data, Compression::None) };
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

    fn seal(&mut self) -> Result<()> {
        if let Some(pack) = self.pack.take() {
            self.stats.bytes_stored += pack.close(&self.sealer)?;
        }
        Ok(())
    }

    /// Closes the open pack; everything stored is durable once the [`Sealer`] has finished.
    pub(crate) fn finish(mut self) -> Result<WriteStats> {
        self.ask_receiver()?;
        self.pack_answered()?;
        self.seal()?;
        Ok(self.stats)
    }
}

/// Open packs of one reader, at most [`limits::OPEN_PACKS_PER_READER`].
#[derive(Default)]
pub(crate) struct PackFiles(HashMap<ChunkId, Box<dyn ObjectReader>>);

impl PackFiles {
    /// Reads `buf.len()` bytes of pack `pack` at `offset`.
    pub(crate) fn read_at(&mut self, repo: &Repository, pack: &ChunkId, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.0.len() >= limits::OPEN_PACKS_PER_READER && !self.0.contains_key(pack) {
            self.0.clear();
        }
        let object = match self.0.entry(*pack) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(repo.store.open(ObjectKind::Pack, &pack_name(pack))?)
            }
        };
        object.read_at(offset, buf)
    }
}

/// Reads blobs back, decompresses them and checks every one against its id. One per core.
pub struct BlobReader<'a> {
    repo: &'a Repository,
    index: &'a ChunkIndex,
    packs: PackFiles,
    decompressor: zstd::bulk::Decompressor<'static>,
    stored: Vec<u8>,
    /// Remote repository: blobs announced by [`Self::prefetch`], coming back in order.
    fetched: Option<BlobStream<'a>>,
}

impl<'a> BlobReader<'a> {
    pub fn new(repo: &'a Repository, index: &'a ChunkIndex) -> Result<Self> {
        let decompressor = zstd::bulk::Decompressor::new().map_err(|e| Error::Internal(format!("zstd: {e}")))?;
        Ok(Self { repo, index, packs: PackFiles::default(), decompressor, stored: Vec::new(), fetched: None })
    }

    /// Announces the blobs about to be read, in order: a remote repository streams them in one
    /// request instead of one round trip each. A local one needs no notice.
    pub fn prefetch(&mut self, ids: Vec<ChunkId>) {
        if let Some(remote) = self.repo.remote.as_deref() {
            self.fetched = Some(remote.fetch(ids));
        }
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
        let (entry, from) = self.read_stored(id)?;
        if entry.kind() != BlobKind::Delta {
            check_blob(&mut self.decompressor, self.repo, &from, &self.stored, &entry, out, start)?;
            return Ok(0);
        }
        let integrity = |detail: String| Error::Integrity(format!("{from}: delta {id}: {detail}"));
        let mut raw = Vec::new();
        decode_blob(&mut self.decompressor, &self.stored, &entry, &mut raw).map_err(integrity)?;
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

    /// Reads the stored bytes of blob `id` into `self.stored`; returns its entry and where it
    /// came from, for messages.
    fn read_stored(&mut self, id: &ChunkId) -> Result<(PackEntry, String)> {
        if let Some(remote) = self.repo.remote.as_deref() {
            let fetched = match self.fetched.as_mut() {
                Some(f) if f.next_is(id) => f.next(id),
                _ => remote.fetch(vec![*id]).next(id),
            };
            let (entry, stored) = fetched.inspect_err(|_| self.fetched = None)?;
            self.stored = stored;
            return Ok((entry, format!("receiver {}", remote.addr)));
        }
        let entry = self.index.get(id)?.ok_or_else(|| Error::Integrity(format!("blob {id} is not in the index")))?;
        let e = entry.entry;
        self.stored.resize(e.stored_len() as usize, 0);
        self.packs.read_at(self.repo, &entry.pack, e.offset(), &mut self.stored).map_err(|err| match err {
            // A pack missing or shorter than the index says is damage; a store that does not
            // answer is not.
            Error::Io { source, .. } => {
                Error::Integrity(format!("pack {}: blob {} cannot be read: {source}", entry.pack, e.id))
            }
            other => other,
        })?;
        Ok((e, format!("pack {}", entry.pack)))
    }
}

/// Decodes a stored blob onto `out` and checks it against its id; errors name `from`.
fn check_blob(
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    repo: &Repository,
    from: &str,
    stored: &[u8],
    e: &PackEntry,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<()> {
    decode_blob(decompressor, stored, e, out)
        .map_err(|detail| Error::Integrity(format!("{from}: blob {} {detail}", e.id)))?;
    if repo.key.blob_id(&out[start..]) != e.id {
        return Err(Error::Integrity(format!("{from}: blob {} does not match its id (data is corrupt)", e.id)));
    }
    Ok(())
}

/// Turns stored bytes into the raw blob, appended to `out`; the error says what failed.
pub(crate) fn decode_blob(
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    stored: &[u8],
    e: &PackEntry,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    match e.compression() {
        Compression::None => out.extend_from_slice(stored),
        Compression::Zstd => {
            let start = out.len();
            out.resize(start + e.raw_len() as usize, 0);
            let n = decompressor
                .decompress_to_buffer(stored, &mut out[start..])
                .map_err(|err| format!("does not decompress: {err}"))?;
            if n != e.raw_len() as usize {
                return Err(format!("decompresses to {n} bytes, expected {}", e.raw_len()));
            }
        }
    }
    Ok(())
}
