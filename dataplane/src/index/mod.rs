//! The chunk index: sorted runs on disk (`REPO/index/*.idx`) searched in place, and in memory only
//! what finds an entry fast: a membership filter (~1.25 bytes per blob) and one 8-byte fence per
//! [`limits::INDEX_FENCE_STRIDE`] entries of each run. An entry itself (88 bytes) stays on disk,
//! so memory grows by ~1.5 bytes per blob, not ~90.
//!
//! A lookup asks the filter, then reads one block of each run until it finds the blob, largest
//! run first (it holds most blobs). During a backup, runs of one size tier are merged, streamed,
//! into a scratch run in `tmp/` once [`limits::INDEX_MERGE_FANIN`] of them exist, so there are
//! few runs to ask; after the commit every run is merged into one durable run and the files it
//! covers are removed. Only a backup merges (it holds the repository lock). A crash leaves the
//! durable runs (scratch runs go with `tmp/`), or the merged run beside some of the runs it
//! covers: duplicate entries, which are harmless, since each names a valid place.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use wire::index::{entry_offset, IndexEntry, RunDecoder, RunEncoder, CHECKSUM_LEN, ENTRY_LEN, HEADER_LEN};
use wire::ChunkId;

use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::limits;
use crate::store::{index_run_name, ObjectKind, Store};

/// Blob ids are uniformly random, so their first 8 bytes are already a good hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // ChunkId hashes as its 32-byte array: the length prefix is written first, then the bytes.
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

/// Hash maps and sets keyed by blob id use its own bytes.
pub(crate) type IdBuild = BuildHasherDefault<IdHasher>;

fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// A blocked Bloom filter: each id sets 7 bits in one 512-bit block, so a query touches one
/// cache line. At 10 bits per blob about 1% of absent blobs pass it.
#[derive(Default)]
struct Filter {
    blocks: Vec<[u64; 8]>,
    capacity: u64,
}

impl Filter {
    fn with_capacity(blobs: u64) -> Self {
        let capacity = blobs.max(limits::FILTER_MIN_CAPACITY);
        let blocks = (capacity * limits::FILTER_BITS_PER_BLOB).div_ceil(512) as usize;
        Self { blocks: vec![[0; 8]; blocks], capacity }
    }

    /// The block and the 7 bit positions in it; from id bytes other than the fence prefix.
    fn bits(&self, id: &ChunkId) -> (usize, impl Iterator<Item = usize>) {
        let block = u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes")) % self.blocks.len() as u64;
        let bits = u64::from_le_bytes(id.0[16..24].try_into().expect("8 bytes"));
        (block as usize, (0..7).map(move |i| ((bits >> (9 * i)) & 511) as usize))
    }

    fn insert(&mut self, id: &ChunkId) {
        let (b, bits) = self.bits(id);
        let block = &mut self.blocks[b];
        for bit in bits {
            block[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, id: &ChunkId) -> bool {
        let (b, mut bits) = self.bits(id);
        let block = &self.blocks[b];
        bits.all(|bit| block[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// One run file, open for lookups.
struct Run {
    path: PathBuf,
    file: File,
    /// A merge written to `tmp/` during a backup: not durable, not in `index/`.
    scratch: bool,
    /// The names of the durable runs whose entries this run holds (its own, for a durable run
    /// loaded or added; those it merged, for a merge).
    covers: Vec<String>,
    count: u32,
    /// Id prefix of every `INDEX_FENCE_STRIDE`-th entry.
    fences: Vec<u64>,
}

const STRIDE: usize = limits::INDEX_FENCE_STRIDE;
/// Entries validated and hashed at a time while a run is streamed (hashing one 88-byte entry
/// at a time runs BLAKE3 at a fraction of its speed).
const STREAM_BLOCK: usize = 2048;

impl Run {
    /// Opens and validates a run in one streamed pass (header, order, fields, checksum, and its
    /// name, which is the hash of its bytes), feeding every id to `each`.
    fn open(path: &Path, mut each: impl FnMut(&IndexEntry)) -> Result<Self> {
        let file = File::open(path).at(path)?;
        let mut fences = vec![];
        let count = stream(path, &file, |i, e| {
            if (i as usize).is_multiple_of(STRIDE) {
                fences.push(prefix(&e.id()));
            }
            each(e);
        })?;
        Ok(Self { path: path.to_owned(), file, scratch: false, covers: vec![file_name(path)], count, fences })
    }

    /// The size tier: runs within a factor of the fan-in of each other share one.
    fn tier(&self) -> u32 {
        self.count.max(1).ilog(limits::INDEX_MERGE_FANIN as u32)
    }

    /// Finds `id` by reading the one block its fences allow (more only on an 8-byte prefix tie).
    fn find(&self, id: &ChunkId, mut accept: impl FnMut(&IndexEntry) -> bool) -> Result<Option<IndexEntry>> {
        let key = prefix(id);
        let first = self.fences.partition_point(|&f| f < key).saturating_sub(1);
        let last = self.fences.partition_point(|&f| f <= key);
        let mut buf = [0u8; STRIDE * ENTRY_LEN];
        for block in (first..last).rev() {
            let start = block * STRIDE;
            let n = STRIDE.min(self.count as usize - start);
            let bytes = &mut buf[..n * ENTRY_LEN];
            self.file.read_exact_at(bytes, entry_offset(start as u32)).at(&self.path)?;
            let at = |i: usize| -> IndexEntry { bytemuck::pod_read_unaligned(&bytes[i * ENTRY_LEN..][..ENTRY_LEN]) };
            let (mut lo, mut hi) = (0, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                match at(mid).id().cmp(id) {
                    std::cmp::Ordering::Less => lo = mid + 1,
                    std::cmp::Ordering::Greater => hi = mid,
                    std::cmp::Ordering::Equal => {
                        let e = at(mid);
                        return Ok(accept(&e).then_some(e));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Every copy recorded in the repository's damaged-blob lists (`REPO/damaged/`). A list that
/// cannot be read is skipped with a warning: it only keeps backups from deduplicating against
/// damage that `verify` finds again.
pub fn damaged_copies(store: &dyn Store) -> Result<Vec<(ChunkId, ChunkId)>> {
    let mut copies = vec![];
    for object in crate::store::list_objects(store, ObjectKind::Damaged)? {
        if let Some(list) = read_damaged(store, &object.name) {
            copies.extend(list.copies);
        }
    }
    Ok(copies)
}

fn damaged_map(store: &dyn Store) -> Result<DamagedCopies> {
    let mut map = DamagedCopies::default();
    for (blob, pack) in damaged_copies(store)? {
        map.entry(blob).or_default().push(pack);
    }
    Ok(map)
}

/// Damaged-blob list `name`, or `None` (with a warning) when it cannot be read.
fn read_damaged(store: &dyn Store, name: &str) -> Option<wire::verify::DamagedBlobs> {
    let at = || format!("{}/{}", store.location(), ObjectKind::Damaged.key(name));
    let read = store.get(ObjectKind::Damaged, name).and_then(|bytes| {
        let bytes = bytes.unwrap_or_default();
        if ChunkId::of_file(&bytes).to_hex() != name {
            return Err(Error::Integrity(format!("{}: content does not match its name", at())));
        }
        wire::verify::DamagedBlobs::decode(&bytes).map_err(|e| Error::Integrity(format!("{}: {e}", at())))
    });
    read.map_err(|e| tracing::warn!("{e}; skipped (`cbcr verify` records the damage it finds again)")).ok()
}

/// Writes damaged-blob list `list` (named by the hash of its bytes); returns the name.
pub fn write_damaged(store: &dyn Store, list: wire::verify::DamagedBlobs) -> Result<String> {
    let bytes = list.encode();
    let name = ChunkId::of_file(&bytes).to_hex();
    store.put(ObjectKind::Damaged, &name, &bytes)?;
    Ok(name)
}

/// Reads run `file` from the start, validating it, and calls `each` with every entry in order.
/// Returns the entry count.
fn stream(path: &Path, file: &File, mut each: impl FnMut(u32, &IndexEntry)) -> Result<u32> {
    let len = file.metadata().at(path)?.len();
    let mut reader = BufReader::with_capacity(limits::INDEX_READ_BUFFER, file);
    let mut name = blake3::Hasher::new();
    let mut header = [0u8; HEADER_LEN];
    let read = reader.read_exact(&mut header);
    let mut decoder = RunDecoder::new(&header[..if read.is_ok() { HEADER_LEN } else { 0 }], len)
        .map_err(|e| Error::format(path, e))?;
    name.update(&header);
    let mut block = vec![0u8; STREAM_BLOCK * ENTRY_LEN];
    let mut i = 0;
    while i < decoder.count() {
        let n = STREAM_BLOCK.min((decoder.count() - i) as usize);
        let bytes = &mut block[..n * ENTRY_LEN];
        reader.read_exact(bytes).at(path)?;
        name.update(bytes);
        decoder
            .entries(bytes, |e| {
                each(i, e);
                i += 1;
            })
            .map_err(|e| Error::format(path, e))?;
    }
    let mut sum = [0u8; CHECKSUM_LEN];
    reader.read_exact(&mut sum).at(path)?;
    name.update(&sum);
    let count = decoder.count();
    decoder.finish(&sum).map_err(|e| Error::format(path, e))?;
    let stem = path.file_stem().and_then(|n| n.to_str()).unwrap_or_default();
    if name.finalize().to_hex().as_str() != stem {
        return Err(Error::Integrity(format!("index run {}: content does not match its name", path.display())));
    }
    Ok(count)
}

/// Blob id -> the packs whose copy of it `verify` found damaged.
type DamagedCopies = std::collections::HashMap<ChunkId, Vec<ChunkId>, IdBuild>;

#[derive(Default)]
struct State {
    /// Largest first.
    runs: Vec<Arc<Run>>,
    filter: Filter,
    /// Entries of all runs, duplicates included: what the filter was sized against.
    entries: u64,
    /// Copies `verify` found damaged (blob id -> their packs): lookups pass over them.
    damaged: DamagedCopies,
}

/// Blob id -> where it is stored.
pub struct ChunkIndex {
    state: RwLock<State>,
}

impl ChunkIndex {
    /// Opens every index run of the repository; a run that fails to validate is an error naming it.
    pub fn load(store: &dyn Store) -> Result<Self> {
        Self::load_checked(store, |path, e| {
            Err(Error::Integrity(format!(
                "index run {}: {e}; the index is rebuilt from the packs with `cbcr repair index`",
                path.display()
            )))
        })
    }

    /// Opens every index run; `damaged` decides whether a run that fails to validate stops the
    /// load (return the error) or is left out (return `Ok`).
    pub fn load_checked(store: &dyn Store, mut damaged: impl FnMut(&Path, Error) -> Result<()>) -> Result<Self> {
        // A backup merging runs removes them after listing: list again when one vanished.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_load(store, &mut damaged) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempts < 5 => {}
                other => return other,
            }
        }
    }

    fn try_load(store: &dyn Store, damaged: &mut impl FnMut(&Path, Error) -> Result<()>) -> Result<Self> {
        let runs = crate::store::list_objects(store, ObjectKind::Index)?;
        let total: u64 = runs.iter().map(|r| r.len / ENTRY_LEN as u64).sum();
        let mut state = State { filter: Filter::with_capacity(total + total / 4), ..State::default() };
        for object in &runs {
            let path = store.index_run(&object.name)?;
            let path = &path;
            let filter = &mut state.filter;
            match Run::open(path, |e| filter.insert(&e.id())) {
                Ok(run) => {
                    state.entries += u64::from(run.count);
                    state.runs.push(Arc::new(run));
                }
                Err(Error::Io { source, path }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::Io { source, path })
                }
                Err(e) => damaged(path, e)?,
            }
        }
        state.runs.sort_by_key(|r| std::cmp::Reverse(r.count));
        state.damaged = damaged_map(store)?;
        tracing::info!(blobs = state.entries, runs = state.runs.len(), damaged = state.damaged.len(), "index opened");
        Ok(Self { state: RwLock::new(state) })
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("no thread panics while holding the index")
    }

    /// Where blob `id` is stored.
    pub fn get(&self, id: &ChunkId) -> Result<Option<IndexEntry>> {
        self.find(id, |_, damaged| !damaged)
    }

    /// The entry for blob `id` in pack `pack`, if the index has one (it may name other packs too).
    pub fn get_in_pack(&self, id: &ChunkId, pack: &ChunkId) -> Result<Option<IndexEntry>> {
        self.find(id, |e, _| e.pack == *pack)
    }

    /// The first entry for `id` that `accept` takes, given each entry and whether `verify` found
    /// that copy damaged.
    fn find(&self, id: &ChunkId, mut accept: impl FnMut(&IndexEntry, bool) -> bool) -> Result<Option<IndexEntry>> {
        let state = self.state();
        if !state.filter.may_contain(id) {
            return Ok(None);
        }
        let damaged = state.damaged.get(id).map_or(&[][..], Vec::as_slice);
        for run in &state.runs {
            if let Some(e) = run.find(id, |e| accept(e, damaged.contains(&e.pack)))? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Reads the repository's damaged-blob lists again (a long-lived process, after a verify
    /// recorded more).
    pub fn reload_damaged(&self, store: &dyn Store) -> Result<()> {
        let damaged = damaged_map(store)?;
        self.state.write().expect("no thread panics while holding the index").damaged = damaged;
        Ok(())
    }

    /// Whether `verify` found a copy of blob `id` damaged (lookups pass over such copies).
    pub fn has_damaged_copy(&self, id: &ChunkId) -> bool {
        self.state().damaged.contains_key(id)
    }

    /// How many blob copies `verify` found damaged.
    pub fn damaged_copies(&self) -> usize {
        self.state().damaged.values().map(Vec::len).sum()
    }

    /// Whether blob `id` has a copy that no `verify` found damaged and that `bad` (given its
    /// pack) does not rule out.
    pub fn has_good_copy(&self, id: &ChunkId, bad: impl Fn(&ChunkId) -> bool) -> Result<bool> {
        Ok(self.find(id, |e, damaged| !damaged && !bad(&e.pack))?.is_some())
    }

    /// Pack `pack` was just written whole. A pack's name is the hash of its content, so a
    /// backup that stores the same blobs in the same order makes the same pack again, in the
    /// place of a damaged one: the copies recorded damaged in it are good again, here and in
    /// the repository's damaged-blob lists.
    pub fn pack_rewritten(&self, store: &dyn Store, pack: &ChunkId) -> Result<()> {
        if self.state().damaged.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.state.write().expect("no thread panics while holding the index");
            let before = state.damaged.values().map(Vec::len).sum::<usize>();
            state.damaged.retain(|_, packs| {
                packs.retain(|p| p != pack);
                !packs.is_empty()
            });
            if state.damaged.values().map(Vec::len).sum::<usize>() == before {
                return Ok(());
            }
        }
        for object in crate::store::list_objects(store, ObjectKind::Damaged)? {
            let Some(mut list) = read_damaged(store, &object.name) else { continue };
            let before = list.copies.len();
            list.copies.retain(|(_, p)| p != pack);
            if list.copies.len() == before {
                continue;
            }
            // The shorter list is durable before the longer one goes.
            if !list.copies.is_empty() {
                write_damaged(store, list)?;
            }
            store.delete(ObjectKind::Damaged, &object.name)?;
        }
        Ok(())
    }

    /// The packs holding a copy of blob `id` (damaged copies too).
    pub fn packs_of(&self, id: &ChunkId) -> Result<Vec<ChunkId>> {
        let mut packs = vec![];
        let state = self.state();
        for run in &state.runs {
            run.find(id, |e| {
                if !packs.contains(&e.pack) {
                    packs.push(e.pack);
                }
                false
            })?;
        }
        Ok(packs)
    }

    /// Whether the membership filter lets `id` through: `false` means absent for sure, `true`
    /// means present or (~1% of absent ids) a false positive. Memory only.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        self.state().filter.may_contain(id)
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.get(id)?.is_some())
    }

    /// Every entry of every run, in one id-ordered stream with duplicate entries (the same blob in
    /// the same pack, left by an interrupted merge) given once. Reads the runs again from disk.
    pub fn for_each(&self, each: impl FnMut(&IndexEntry)) -> Result<()> {
        let runs = self.state().runs.clone();
        merge(&runs, each).map(|_| ())
    }

    /// Adds a run the caller just made durable at `path`, with its entries (sorted).
    fn add_run(&self, path: &Path, entries: &[IndexEntry]) -> Result<()> {
        let fences = entries.iter().step_by(STRIDE).map(|e| prefix(&e.id())).collect();
        let file = File::open(path).at(path)?;
        let covers = vec![file_name(path)];
        let run = Run { path: path.to_owned(), file, scratch: false, covers, count: entries.len() as u32, fences };
        let grown = {
            let state = self.state();
            let need = state.entries + entries.len() as u64;
            if need > state.filter.capacity {
                // Only the sealer adds runs, so none appear while the bigger filter is built.
                let mut filter = Filter::with_capacity(need * 2);
                merge(&state.runs, |e| filter.insert(&e.id()))?;
                Some(filter)
            } else {
                None
            }
        };
        let mut state = self.state.write().expect("no thread panics while holding the index");
        if let Some(filter) = grown {
            state.filter = filter;
        }
        for e in entries {
            state.filter.insert(&e.id());
        }
        state.entries += entries.len() as u64;
        let at = state.runs.partition_point(|r| r.count >= run.count);
        state.runs.insert(at, Arc::new(run));
        Ok(())
    }

    /// Adds the runs other writers have made durable since this index was loaded (a store
    /// shared by several receivers); returns how many. Runs it already covers are skipped.
    pub fn refresh(&self, store: &dyn Store) -> Result<usize> {
        let covered: HashSet<String> = self.state().runs.iter().flat_map(|r| r.covers.iter().cloned()).collect();
        let mut added = 0;
        for object in
            crate::store::list_objects(store, ObjectKind::Index)?.into_iter().filter(|o| !covered.contains(&o.name))
        {
            let path = match store.index_run(&object.name) {
                // Merged away by its writer since the listing: its entries are in the merge.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                other => other?,
            };
            let mut entries = vec![];
            Run::open(&path, |e| entries.push(*e))?;
            self.add_run(&path, &entries)?;
            added += 1;
        }
        Ok(added)
    }

    /// Merges runs of one size tier while [`limits::INDEX_MERGE_FANIN`] of them exist. Only
    /// under the repository lock.
    pub fn compact(&self, store: &dyn Store) -> Result<()> {
        loop {
            let group: Vec<Arc<Run>> = {
                let state = self.state();
                let mut tiers: Vec<u32> = state.runs.iter().map(|r| r.tier()).collect();
                tiers.sort_unstable();
                tiers.dedup();
                let full = tiers.into_iter().find_map(|t| {
                    let group: Vec<_> =
                        state.runs.iter().filter(|r| r.tier() == t).take(limits::INDEX_MERGE_FANIN).cloned().collect();
                    let count: u64 = group.iter().map(|r| u64::from(r.count)).sum();
                    (group.len() == limits::INDEX_MERGE_FANIN && count <= u64::from(wire::limits::MAX_INDEX_ENTRIES))
                        .then_some(group)
                });
                match full {
                    Some(g) => g,
                    None => return Ok(()),
                }
            };
            // In `tmp/`, without fsync: the durable runs it covers stay in `index/` until
            // `compact_all` replaces them all, so a crash loses nothing.
            let damaged = self.state().damaged.clone();
            let merged = write_merged(store, &group, &damaged, false)?;
            self.swap(&group, merged);
            for run in group.iter().filter(|r| r.scratch) {
                let _ = std::fs::remove_file(&run.path);
            }
        }
    }

    /// Merges every run into one durable run (when the result fits in a run) and removes the
    /// runs it covers: a lookup then reads one block. A backup does it after its commit, the
    /// one fsync of the index per backup.
    ///
    /// Safe with other writers on the same store (object storage has no lock): only runs this
    /// index read or wrote itself are removed, and only once the merged run holding all their
    /// entries is durable, so every entry is in some listed run at every moment; a reader that
    /// listed a run another writer then removed lists again (see [`Self::load_checked`]).
    pub fn compact_all(&self, store: &dyn Store) -> Result<()> {
        let runs = self.state().runs.clone();
        let count: u64 = runs.iter().map(|r| u64::from(r.count)).sum();
        let durable = runs.len() == 1 && !runs[0].scratch;
        if runs.is_empty() || durable || count > u64::from(wire::limits::MAX_INDEX_ENTRIES) {
            return Ok(());
        }
        let damaged = self.state().damaged.clone();
        let merged = write_merged(store, &runs, &damaged, true)?;
        let keep = merged.path.clone();
        self.swap(&runs, merged);
        fault::point("index-merge");
        // The same entries make the same name, so the merge may replace one of its inputs.
        let kept = file_name(&keep);
        for name in runs.iter().flat_map(|r| &r.covers).filter(|n| **n != kept) {
            store.delete(ObjectKind::Index, name)?;
        }
        for run in runs.iter().filter(|r| r.scratch) {
            let _ = std::fs::remove_file(&run.path);
        }
        Ok(())
    }

    /// Puts `merged` in the place of the runs of `group`.
    fn swap(&self, group: &[Arc<Run>], merged: Run) {
        let mut state = self.state.write().expect("no thread panics while holding the index");
        state.runs.retain(|r| !group.iter().any(|g| Arc::ptr_eq(g, r)));
        let at = state.runs.partition_point(|r| r.count >= merged.count);
        state.runs.insert(at, Arc::new(merged));
    }
}

/// Reads a file from an offset with `pread`, leaving the descriptor's own offset alone, so
/// lookups and merges can share one open run.
struct At<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Merges `runs` by id (k-way, each streamed through its own buffer) and calls `each` with every
/// entry once; the same blob in two different packs is given twice. Returns the count given.
fn merge(runs: &[Arc<Run>], mut each: impl FnMut(&IndexEntry)) -> Result<u64> {
    struct Cursor<'a> {
        run: &'a Run,
        reader: BufReader<At<'a>>,
        left: u32,
        head: Option<IndexEntry>,
    }
    impl Cursor<'_> {
        fn next(&mut self) -> Result<Option<IndexEntry>> {
            if self.left == 0 {
                return Ok(None);
            }
            self.left -= 1;
            let mut bytes = [0u8; ENTRY_LEN];
            self.reader.read_exact(&mut bytes).at(&self.run.path)?;
            Ok(Some(bytemuck::pod_read_unaligned(&bytes)))
        }
    }
    let mut cursors = vec![];
    let mut heap = std::collections::BinaryHeap::new();
    for run in runs {
        let at = At { file: &run.file, offset: HEADER_LEN as u64 };
        let mut c = Cursor {
            run,
            reader: BufReader::with_capacity(limits::INDEX_READ_BUFFER, at),
            left: run.count,
            head: None,
        };
        c.head = c.next()?;
        if let Some(e) = &c.head {
            heap.push(std::cmp::Reverse((e.id(), e.pack, cursors.len())));
        }
        cursors.push(c);
    }
    let mut last: Option<(ChunkId, ChunkId)> = None;
    let mut given = 0;
    while let Some(std::cmp::Reverse((id, pack, i))) = heap.pop() {
        let c = &mut cursors[i];
        if last != Some((id, pack)) {
            each(c.head.as_ref().expect("a cursor in the heap has a head"));
            given += 1;
            last = Some((id, pack));
        }
        c.head = c.next()?;
        if let Some(next) = &c.head {
            heap.push(std::cmp::Reverse((next.id(), next.pack, i)));
        }
    }
    Ok(given)
}

/// Writes the merge of `runs` as one new run, keeping the first place of a blob stored twice:
/// durable in `index/`, or a scratch file in `tmp/`. Two passes, because the header (hashed
/// first) holds the count.
fn write_merged(store: &dyn Store, runs: &[Arc<Run>], damaged: &DamagedCopies, durable: bool) -> Result<Run> {
    let mut last = None;
    let mut count = 0u32;
    merge(runs, |e| {
        if last != Some(e.id()) {
            count += 1;
            last = Some(e.id());
        }
    })?;
    let covers = runs.iter().flat_map(|r| r.covers.iter().cloned()).collect();
    let tmp = store.tmp_path("index");
    let file = OpenOptions::new().create_new(true).read(true).write(true).open(&tmp).at(&tmp)?;
    let mut out = BufWriter::with_capacity(limits::INDEX_READ_BUFFER, &file);
    let mut name = blake3::Hasher::new();
    let mut encoder = RunEncoder::new(count);
    let mut fences = vec![];
    let mut failed = None;
    let mut put = |bytes: &[u8], out: &mut BufWriter<&File>| {
        name.update(bytes);
        if let Err(e) = out.write_all(bytes) {
            failed.get_or_insert(e);
        }
    };
    put(&encoder.header(), &mut out);
    let mut written = 0usize;
    let mut batch = Vec::with_capacity(STREAM_BLOCK);
    let mut emit = |e: IndexEntry, out: &mut BufWriter<&File>| {
        if written.is_multiple_of(STRIDE) {
            fences.push(prefix(&e.id()));
        }
        batch.push(e);
        if batch.len() == STREAM_BLOCK {
            put(encoder.entries(&batch), out);
            batch.clear();
        }
        written += 1;
    };
    // A run holds one entry per blob: of several copies, one that no verify found damaged (a
    // backup stored it again because the other was).
    let is_damaged =
        |e: &IndexEntry| !damaged.is_empty() && damaged.get(&e.id()).is_some_and(|packs| packs.contains(&e.pack));
    let mut pending: Option<IndexEntry> = None;
    merge(runs, |e| match &mut pending {
        Some(p) if p.id() == e.id() => {
            if is_damaged(p) && !is_damaged(e) {
                *p = *e;
            }
        }
        _ => {
            if let Some(p) = pending.replace(*e) {
                emit(p, &mut out);
            }
        }
    })?;
    if let Some(p) = pending {
        emit(p, &mut out);
    }
    put(encoder.entries(&batch), &mut out);
    put(&encoder.finish(), &mut out);
    if let Some(e) = failed {
        return Err(e).at(&tmp);
    }
    out.flush().at(&tmp)?;
    drop(out);
    if !durable {
        return Ok(Run { path: tmp, file, scratch: true, covers, count, fences });
    }
    crate::store::sync_file(&file, &tmp)?;
    let path = publish_run(store, &tmp, &ChunkId(*name.finalize().as_bytes()))?;
    Ok(Run { covers: vec![file_name(&path)], path, file, scratch: false, count, fences })
}

/// A run's object name: its file name.
fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

const SHARDS: usize = 64;

/// Blobs already in the repository plus those claimed by a core during this backup, so each new
/// blob is stored once even when two cores meet it at the same time. A claim lasts until the
/// blob's pack is sealed and its run is in the index, so the set holds at most the blobs of the
/// packs being written or sealed, however large the backup.
pub(crate) struct KnownBlobs {
    index: ChunkIndex,
    claimed: [Mutex<HashSet<ChunkId, IdBuild>>; SHARDS],
}

impl KnownBlobs {
    pub(crate) fn new(index: ChunkIndex) -> Self {
        Self { index, claimed: std::array::from_fn(|_| Mutex::default()) }
    }

    fn shard(&self, id: &ChunkId) -> std::sync::MutexGuard<'_, HashSet<ChunkId, IdBuild>> {
        self.claimed[id.0[0] as usize % SHARDS].lock().expect("a core panicked while holding a claim shard")
    }

    /// True when the caller is the first to meet `id` and must store it.
    pub(crate) fn claim(&self, id: &ChunkId) -> Result<bool> {
        // The index is asked under the shard lock: [`Self::sealed`] adds a run to the index
        // before it drops the run's claims, so a blob is always in one of the two.
        let mut shard = self.shard(id);
        if shard.contains(id) || self.index.contains(id)? {
            return Ok(false);
        }
        Ok(shard.insert(*id))
    }

    /// A sealed pack's run is durable at `path`: index it and drop its claims.
    pub(crate) fn sealed(&self, path: &Path, entries: &[IndexEntry]) -> Result<()> {
        self.index.add_run(path, entries)?;
        for e in entries {
            self.shard(&e.id()).remove(&e.id());
        }
        Ok(())
    }

    /// Whether `id` is claimed by a writer whose pack is not yet sealed and indexed.
    pub(crate) fn is_claimed(&self, id: &ChunkId) -> bool {
        self.shard(id).contains(id)
    }

    /// Drops claims without indexing: the blobs are durable elsewhere (a receiver has them).
    pub(crate) fn release(&self, ids: impl IntoIterator<Item = ChunkId>) {
        for id in ids {
            self.shard(&id).remove(&id);
        }
    }

    pub(crate) fn index(&self) -> &ChunkIndex {
        &self.index
    }
}

/// Makes the complete, fsynced run file `tmp` durable as run `id` (the hash of its bytes);
/// returns the local file to search it in.
pub fn publish_run(store: &dyn Store, tmp: &Path, id: &ChunkId) -> Result<PathBuf> {
    let name = index_run_name(id);
    store.put_file(ObjectKind::Index, &name, tmp)?;
    store.index_run(&name)
}

/// Writes one durable index run; its name is the hash of its bytes. Returns the local file.
pub fn write_run(store: &dyn Store, bytes: &[u8]) -> Result<PathBuf> {
    let id = ChunkId::of_file(bytes);
    let tmp = store.tmp_path("index");
    crate::store::write_synced(&tmp, bytes)?;
    publish_run(store, &tmp, &id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::index::encode_run;
    use wire::pack::PackEntry;
    use wire::{BlobKind, Compression};

    use crate::store::LocalDir;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    /// Entries `from..to` of pack `pack`, sorted.
    fn run(pack: u64, from: u64, to: u64) -> Vec<IndexEntry> {
        let mut run: Vec<IndexEntry> = (from..to)
            .map(|n| IndexEntry {
                pack: ChunkId([pack as u8; 32]),
                entry: PackEntry::new(id(n), 16 + n, 100, 200, BlobKind::Data, Compression::Zstd),
            })
            .collect();
        run.sort_unstable_by_key(|e| e.id());
        run
    }

    fn repo(dir: &Path) -> LocalDir {
        let store = LocalDir::new(&dir.join("repo"));
        store.create().unwrap();
        store
    }

    fn run_files(repo: &dyn Store) -> usize {
        repo.list(ObjectKind::Index).unwrap().len()
    }

    fn seal(known: &KnownBlobs, repo: &dyn Store, run: &[IndexEntry]) {
        let path = write_run(repo, &encode_run(run.to_vec())).unwrap();
        known.sealed(&path, run).unwrap();
        known.index().compact(repo).unwrap();
    }

    #[test]
    fn copies_verify_found_damaged_are_passed_over_merged_away_and_healed() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path());
        let (bad, good) = (ChunkId([1; 32]), ChunkId([2; 32]));
        // Blobs 0..10 in pack 1; 0..5 of them stored again in pack 2, after verify recorded
        // that pack 1's copies of 0..3 are damaged.
        write_run(&repo, &encode_run(run(1, 0, 10))).unwrap();
        let damaged = (0..3).map(|n| (id(n), bad)).collect();
        write_damaged(&repo, wire::verify::DamagedBlobs { copies: damaged }).unwrap();
        let known = KnownBlobs::new(ChunkIndex::load(&repo).unwrap());
        for n in 0..10 {
            assert_eq!(known.claim(&id(n)).unwrap(), n < 3, "blob {n}: only the damaged ones are new");
        }
        seal(&known, &repo, &run(2, 0, 5));
        let index = known.index();
        for n in 0..10 {
            let want = if n < 3 { good } else { bad };
            assert_eq!(index.get(&id(n)).unwrap().unwrap().pack, want, "blob {n}");
            assert_eq!(index.has_damaged_copy(&id(n)), n < 3);
        }
        // One entry per blob in a merged run: the good copy, whichever pack sorts first.
        index.compact_all(&repo).unwrap();
        let reloaded = ChunkIndex::load(&repo).unwrap();
        for n in 0..10 {
            let want = if n < 3 { good } else { bad };
            assert_eq!(reloaded.get(&id(n)).unwrap().unwrap().pack, want, "blob {n} after the merge");
        }
        // Pack 1 written whole again: its copies are good, here and in the records.
        reloaded.pack_rewritten(&repo, &bad).unwrap();
        assert_eq!(reloaded.damaged_copies(), 0);
        assert!(repo.list(ObjectKind::Damaged).unwrap().is_empty());
        assert!(damaged_copies(&repo).unwrap().is_empty());
    }

    #[test]
    fn every_blob_is_found_across_merges_and_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path());
        let known = KnownBlobs::new(ChunkIndex::load(&repo).unwrap());
        for pack in 0..100 {
            let entries = run(pack, pack * 200, pack * 200 + 200);
            for e in &entries {
                assert!(known.claim(&e.id()).unwrap(), "a new blob is claimed once");
                assert!(!known.claim(&e.id()).unwrap(), "and only once");
            }
            seal(&known, &repo, &entries);
            for e in &entries {
                assert!(!known.claim(&e.id()).unwrap(), "a sealed blob stays known");
            }
        }
        assert!(known.claimed.iter().all(|s| s.lock().unwrap().is_empty()), "sealing drops the claims");
        // 100 runs of 200 entries merge into tiers of fewer than FANIN runs each (scratch runs
        // in tmp/; the durable ones stay until compact_all).
        let runs = known.index().state().runs.len();
        assert!(runs < 2 * limits::INDEX_MERGE_FANIN, "{runs} runs left after merging");
        assert_eq!(run_files(&repo), 100);
        known.index().compact_all(&repo).unwrap();
        assert_eq!(run_files(&repo), 1, "one durable run covers them all");
        assert_eq!(known.index().state().runs.len(), 1);

        let reloaded = ChunkIndex::load(&repo).unwrap();
        for index in [known.index(), &reloaded] {
            for pack in 0..100 {
                for e in run(pack, pack * 200, pack * 200 + 200) {
                    assert_eq!(index.get(&e.id()).unwrap(), Some(e));
                    assert_eq!(index.get_in_pack(&e.id(), &e.pack).unwrap(), Some(e));
                    assert_eq!(index.get_in_pack(&e.id(), &ChunkId([255; 32])).unwrap(), None);
                }
            }
            for n in 20_000..21_000 {
                assert_eq!(index.get(&id(n)).unwrap(), None);
            }
            let mut all = vec![];
            index.for_each(|e| all.push(e.id())).unwrap();
            assert_eq!(all.len(), 20_000);
            assert!(all.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn duplicate_entries_left_by_an_interrupted_merge_are_harmless() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path());
        // A merged run next to one of its inputs, as a crash between the two steps leaves them.
        write_run(&repo, &encode_run(run(1, 0, 500))).unwrap();
        write_run(&repo, &encode_run(run(1, 100, 200))).unwrap();
        let index = ChunkIndex::load(&repo).unwrap();
        let mut all = vec![];
        index.for_each(|e| all.push(*e)).unwrap();
        assert_eq!(all.len(), 500);
        for e in run(1, 0, 500) {
            assert_eq!(index.get(&e.id()).unwrap(), Some(e));
        }
    }

    #[test]
    fn the_filter_grows_past_its_first_capacity() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path());
        let known = KnownBlobs::new(ChunkIndex::load(&repo).unwrap());
        let per = limits::FILTER_MIN_CAPACITY / 2;
        for pack in 0..5 {
            seal(&known, &repo, &run(pack, pack * per, (pack + 1) * per));
        }
        assert!(known.index().state().filter.capacity >= 5 * per);
        for n in (0..5 * per).step_by(97) {
            assert!(known.index().contains(&id(n)).unwrap(), "blob {n}");
        }
    }

    #[test]
    fn the_filter_lets_few_absent_blobs_through() {
        let mut filter = Filter::with_capacity(100_000);
        (0..100_000).for_each(|n| filter.insert(&id(n)));
        assert!((0..100_000).all(|n| filter.may_contain(&id(n))));
        let passed = (100_000..200_000).filter(|&n| filter.may_contain(&id(n))).count();
        assert!(passed < 2_000, "{passed} of 100000 absent blobs passed");
    }

    #[test]
    fn a_damaged_run_is_named_or_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path());
        let good = write_run(&repo, &encode_run(run(1, 0, 100))).unwrap();
        let bad = write_run(&repo, &encode_run(run(2, 100, 200))).unwrap();
        let mut bytes = std::fs::read(&bad).unwrap();
        bytes[HEADER_LEN + 50 * ENTRY_LEN + 40] ^= 1;
        std::fs::write(&bad, bytes).unwrap();
        let err = ChunkIndex::load(&repo).err().expect("a damaged run fails the load").to_string();
        assert!(err.contains(&*bad.to_string_lossy()), "{err}");
        let mut named = vec![];
        let index = ChunkIndex::load_checked(&repo, |p, _| {
            named.push(p.to_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(named, vec![bad]);
        assert!(index.contains(&id(5)).unwrap());
        assert!(!index.contains(&id(150)).unwrap());
        assert!(good.exists());
    }
}
