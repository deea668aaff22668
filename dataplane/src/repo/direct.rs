//! [`Direct`]: the repository's own store, read and written by this process. Packs are written
//! to files in the store's work directory, fsynced, handed to the store under their final
//! names, then indexed; blobs are read from the packs the local index names.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wire::index::{encode_sorted, IndexEntry};
use wire::pack::{parse_entries, parse_footer, PackEntry, PackHeader, FOOTER_LEN, HEADER_LEN};
use wire::repo::Snapshot;
use wire::verify::VerifyReport;
use wire::{BlobKind, ChunkId};

use super::backend::{Backend, BlobSource, NewBlobs, PackSeal, PackSink, Packer};
use super::jobs::{JobStore, StoreJobs};
use super::keys::{OpenScratch, Sealing, SNAPSHOT_AAD};
use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::index::{self, ChunkIndex, KnownBlobs};
use crate::limits;
use crate::store::{list_objects, pack_name, parse_writer_name, ObjectKind, ObjectReader, Store};

/// A repository reached through its store.
pub(crate) struct Direct {
    store: Arc<dyn Store>,
    sealing: Arc<dyn Sealing>,
}

impl Direct {
    pub(crate) fn new(store: Arc<dyn Store>, sealing: Arc<dyn Sealing>) -> Self {
        Self { store, sealing }
    }
}

impl Backend for Direct {
    fn location(&self) -> String {
        self.store.location()
    }

    fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        let mut out = vec![];
        for object in list_objects(&*self.store, ObjectKind::Snapshot)? {
            // A damaged record hides only itself (verify names it as damage).
            match load_snapshot(&*self.store, &*self.sealing, &object.name) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!("{e}; this snapshot is left out (`cbcr verify` reports it)"),
            }
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    fn commit(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        let (plain, mut scratch) = (snapshot.encode(), Vec::new());
        put_snapshot_record(&*self.store, self.sealing.seal(SNAPSHOT_AAD, &plain, &mut scratch)?)
    }

    fn parent_candidates(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        // Whoever reads the store itself is its owner: every snapshot may be a parent.
        self.snapshots()
    }

    fn forget(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let writers = self.store.list(ObjectKind::Writer)?;
        let mut gone = vec![];
        for id in ids {
            let name = id.to_hex();
            if self.store.get(ObjectKind::Snapshot, &name)?.is_none() {
                continue;
            }
            self.store.delete(ObjectKind::Snapshot, &name)?;
            // After the snapshot: a writer record without its snapshot names nothing.
            for w in writers.iter().filter(|w| parse_writer_name(&w.name).is_some_and(|(of, _)| of == *id)) {
                self.store.delete(ObjectKind::Writer, &w.name)?;
            }
            gone.push(*id);
        }
        Ok(gone)
    }

    fn start_pack(&self) -> Result<Box<dyn PackSink>> {
        let tmp = self.store.tmp_path("pack");
        let file = OpenOptions::new().create_new(true).write(true).open(&tmp).at(&tmp)?;
        let out = BufWriter::with_capacity(limits::PACK_WRITE_BUFFER, file);
        Ok(Box::new(PackFile { store: Arc::clone(&self.store), tmp, out }))
    }

    fn new_blobs<'a>(&'a self, _known: &'a KnownBlobs) -> Box<dyn NewBlobs + 'a> {
        Box::new(PackAtOnce)
    }

    fn have(&self, index: &ChunkIndex, ids: &[ChunkId]) -> Result<Vec<bool>> {
        ids.iter().map(|id| index.contains(id)).collect()
    }

    fn may_have(&self, index: &ChunkIndex, id: &ChunkId) -> bool {
        index.may_contain(id)
    }

    fn blob_source<'a>(&'a self, index: &'a ChunkIndex) -> Box<dyn BlobSource + 'a> {
        Box::new(LocalBlobs { store: &*self.store, index, packs: PackFiles::default() })
    }

    fn reads_round_trip(&self) -> bool {
        false
    }

    fn verify_in_place(&self, _read_data: bool) -> Result<Option<VerifyReport>> {
        Ok(None)
    }

    fn job_store(&self) -> Arc<dyn JobStore> {
        Arc::new(StoreJobs(Arc::clone(&self.store)))
    }
}

/// Stores a snapshot record as it is to be stored (sealed, in an encrypted repository): named by
/// its bytes, so anyone can check the object without the key. The commit.
pub(super) fn put_snapshot_record(store: &dyn Store, stored: &[u8]) -> Result<ChunkId> {
    let id = ChunkId::of_file(stored);
    store.put(ObjectKind::Snapshot, &id.to_hex(), stored)?;
    Ok(id)
}

/// The snapshot object `name`, checked against its name, opened and decoded.
pub(super) fn load_snapshot(store: &dyn Store, sealing: &dyn Sealing, name: &str) -> Result<(ChunkId, Snapshot)> {
    let (id, bytes) = stored_snapshot(store, name)?;
    let path = PathBuf::from(format!("{}/{}", store.location(), ObjectKind::Snapshot.key(name)));
    Ok((id, open_snapshot(sealing, &bytes).map_err(|e| Error::format(&path, e))?))
}

/// The snapshot object `name` as stored, checked against its name.
pub(super) fn stored_snapshot(store: &dyn Store, name: &str) -> Result<(ChunkId, Vec<u8>)> {
    let path = PathBuf::from(format!("{}/{}", store.location(), ObjectKind::Snapshot.key(name)));
    let id = ChunkId::from_hex(name).map_err(|e| Error::format(&path, e))?;
    let bytes = store.get(ObjectKind::Snapshot, name)?.ok_or_else(|| Error::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such snapshot"),
    })?;
    if ChunkId::of_file(&bytes) != id {
        return Err(Error::format(&path, wire::Error::ChecksumMismatch { what: "snapshot" }));
    }
    Ok((id, bytes))
}

/// A stored snapshot record, opened and decoded.
pub(super) fn open_snapshot(sealing: &dyn Sealing, stored: &[u8]) -> wire::Result<Snapshot> {
    let mut scratch = OpenScratch::default();
    Snapshot::decode(sealing.open("snapshot", SNAPSHOT_AAD, stored, &mut scratch)?)
}

/// Makes the complete, fsynced pack file `tmp` durable as pack `id`, then writes its index run
/// and adds it to `known`: the design's commit order (a pack is indexed only once durable).
pub(crate) fn publish_pack(
    store: &dyn Store,
    known: &KnownBlobs,
    tmp: &Path,
    id: &ChunkId,
    entries: &[PackEntry],
) -> Result<()> {
    store.put_file(ObjectKind::Pack, &pack_name(id), tmp)?;
    fault::point("index-write");
    let mut run: Vec<IndexEntry> = entries.iter().map(|&entry| IndexEntry { pack: *id, entry }).collect();
    run.sort_unstable_by_key(|e| e.id());
    let path = index::write_run(store, &encode_sorted(&run))?;
    known.sealed(&path, &run)?;
    known.index().pack_rewritten(store, id)?;
    // Merging here keeps lookups to a few runs and runs on no core.
    known.index().compact(store)
}

/// Every blob a writer claimed is new to a local repository: the claim consulted its index.
struct PackAtOnce;

impl NewBlobs for PackAtOnce {
    fn offer(&mut self, id: ChunkId, kind: BlobKind, data: &[u8], packer: &mut dyn Packer) -> Result<()> {
        packer.pack(id, kind, data)
    }

    fn finish(&mut self, _packer: &mut dyn Packer) -> Result<()> {
        Ok(())
    }
}

/// A pack being written under `tmp/`.
struct PackFile {
    store: Arc<dyn Store>,
    tmp: PathBuf,
    out: BufWriter<File>,
}

impl PackSink for PackFile {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).at(&self.tmp)
    }

    fn finish(self: Box<Self>) -> Result<Box<dyn PackSeal>> {
        let file = self.out.into_inner().map_err(|e| e.into_error()).at(&self.tmp)?;
        Ok(Box::new(WrittenPack { store: self.store, tmp: self.tmp, file }))
    }
}

struct WrittenPack {
    store: Arc<dyn Store>,
    tmp: PathBuf,
    file: File,
}

impl PackSeal for WrittenPack {
    fn seal(self: Box<Self>, id: &ChunkId, entries: &[PackEntry], known: &KnownBlobs) -> Result<()> {
        crate::store::sync_file(&self.file, &self.tmp)?;
        fault::point("pack-seal");
        publish_pack(&*self.store, known, &self.tmp, id, entries)
    }

    fn discard(self: Box<Self>) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Open packs of one reader, at most [`limits::OPEN_PACKS_PER_READER`].
#[derive(Default)]
pub(crate) struct PackFiles(HashMap<ChunkId, Box<dyn ObjectReader>>);

impl PackFiles {
    /// Reads `buf.len()` bytes of pack `pack` at `offset`.
    pub(crate) fn read_at(&mut self, store: &dyn Store, pack: &ChunkId, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.0.len() >= limits::OPEN_PACKS_PER_READER && !self.0.contains_key(pack) {
            self.0.clear();
        }
        let object = match self.0.entry(*pack) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(store.open(ObjectKind::Pack, &pack_name(pack))?),
        };
        object.read_at(offset, buf)
    }
}

/// Blobs read from the packs the index names.
struct LocalBlobs<'a> {
    store: &'a dyn Store,
    index: &'a ChunkIndex,
    packs: PackFiles,
}

impl BlobSource for LocalBlobs<'_> {
    fn prefetch(&mut self, _ids: Vec<ChunkId>) {}

    fn read_stored(&mut self, id: &ChunkId, stored: &mut Vec<u8>) -> Result<(PackEntry, String)> {
        let entry = self.index.get(id)?.ok_or_else(|| {
            Error::Integrity(if self.index.has_damaged_copy(id) {
                let packs = self.index.packs_of(id).unwrap_or_default();
                let packs: Vec<String> = packs.iter().map(ChunkId::to_hex).collect();
                format!("blob {id} (pack {}) was found damaged by `cbcr verify` (a backup of its file stores it again; `cbcr repair snapshots` makes snapshots that restore without it)", packs.join(", "))
            } else {
                format!("blob {id} is not in the index (if index runs were lost or damaged, `cbcr repair index` rebuilds them from the packs)")
            })
        })?;
        let e = entry.entry;
        stored.resize(e.stored_len() as usize, 0);
        self.packs.read_at(self.store, &entry.pack, e.offset(), stored).map_err(|err| match err {
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

/// The open pack and its entries, from its header and trailer.
pub(crate) fn read_trailer(
    store: &dyn Store,
    id: &ChunkId,
) -> std::result::Result<(Box<dyn ObjectReader>, Vec<PackEntry>), String> {
    let file = store.open(ObjectKind::Pack, &pack_name(id)).map_err(|e| e.to_string())?;
    let len = file.size();
    if len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(format!("truncated to {len} bytes"));
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_at(0, &mut header).map_err(|e| e.to_string())?;
    PackHeader::check(&header).map_err(|e| e.to_string())?;
    let mut footer = [0u8; FOOTER_LEN];
    file.read_at(len - FOOTER_LEN as u64, &mut footer).map_err(|e| e.to_string())?;
    let loc = parse_footer(&footer, len).map_err(|e| e.to_string())?;
    let mut entries = vec![0u8; loc.entries_len()];
    file.read_at(loc.entries_offset, &mut entries).map_err(|e| e.to_string())?;
    Ok((file, parse_entries(&loc, &entries).map_err(|e| e.to_string())?))
}
