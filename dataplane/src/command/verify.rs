//! Verify: check that every snapshot can be restored.
//!
//! Always: every index run decodes and matches its name, every snapshot decodes, every pack's
//! trailer decodes and agrees with the index, and every tree, chunk list and chunk that a
//! snapshot references is indexed. With `read_data`, every pack is read whole on the cores: its
//! hash must match its name, and every blob is decompressed and re-hashed. Damage is reported
//! by pack, blob, snapshot and file.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use wire::index::IndexEntry;
use wire::pack::PackEntry;
use wire::tree::{ChunkList, NodeKind, Tree};
use wire::{BlobKind, ChunkId};

use crate::error::{Error, Result};
use crate::events::Run;
use crate::index::ChunkIndex;
use crate::limits;
use crate::pipeline::pack::{BlobDecoder, BlobReader};
use crate::repo::{read_trailer, Repository};
use crate::runtime;
use crate::store::{ObjectKind, ObjectReader};

pub use wire::verify::{Damage, VerifyReport};

struct PackJob {
    id: ChunkId,
    len: u64,
    /// Blobs the index places in this pack.
    indexed: u64,
}

/// Verifies `repo` (a receiver verifies its own, next to the data).
pub fn verify(repo: Repository, read_data: bool, cores: usize, run: &Run) -> Result<VerifyReport> {
    if let Some(report) = repo.backend.verify_in_place(read_data)? {
        return Ok(report);
    }
    verify_here(repo, read_data, cores, run).map(|(report, _)| report)
}

/// Verifies `repo` from here; returns the report and the damaged copies (blob, pack) found,
/// which it also records in the repository.
pub(crate) fn verify_here(
    repo: Repository,
    read_data: bool,
    cores: usize,
    run: &Run,
) -> Result<(VerifyReport, Vec<(ChunkId, ChunkId)>)> {
    let mut report = VerifyReport::default();
    let index = Arc::new(ChunkIndex::load_checked(&*repo.store, |path, e| {
        report.damage.push(Damage { kind: "index".into(), name: path.display().to_string(), detail: e.to_string() });
        Ok(())
    })?);
    let mut snapshots = vec![];
    let at = |kind: ObjectKind, name: &str| format!("{}/{}", repo.store.location(), kind.key(name));
    for kind in [ObjectKind::Snapshot, ObjectKind::Index, ObjectKind::Pack, ObjectKind::Damaged, ObjectKind::Job] {
        let listed = repo.store.list(kind)?;
        report.strays.extend(
            listed
                .iter()
                .filter(|o| !crate::store::is_object_name(kind, &o.name))
                .map(|o| crate::store::stray_name(&*repo.store, kind, &o.name)),
        );
    }
    for object in crate::store::list_objects(&*repo.store, ObjectKind::Snapshot)? {
        match repo.load_snapshot(&object.name) {
            Ok(s) => snapshots.push(s),
            Err(e) => report.damage.push(Damage {
                kind: "snapshot".into(),
                name: at(ObjectKind::Snapshot, &object.name),
                detail: e.to_string(),
            }),
        }
    }
    report.snapshots = snapshots.len() as u64;
    // A damaged plan or checkpoint would fail its job's commit: named now.
    let jobs = repo.jobs()?;
    for object in jobs.list()? {
        if let Err(e) = jobs.check(&object) {
            report.damage.push(Damage {
                kind: "job".into(),
                name: at(ObjectKind::Job, &object.name()),
                detail: e.to_string(),
            });
        }
    }

    // Packs, on the cores. Only a count per pack is held here; the cores look each trailer
    // entry up in the index on disk.
    let mut by_pack: HashMap<ChunkId, u64> = HashMap::new();
    index.for_each(|e| *by_pack.entry(e.pack).or_default() += 1)?;
    let mut jobs = vec![];
    for object in crate::store::list_objects(&*repo.store, ObjectKind::Pack)? {
        if let Some(Ok(id)) = object.name.strip_suffix(".pack").map(ChunkId::from_hex) {
            let indexed = by_pack.remove(&id).unwrap_or_default();
            report.unindexed_packs += u64::from(indexed == 0);
            jobs.push(PackJob { id, len: object.len, indexed });
        }
    }
    let mut damaged_blobs: HashSet<ChunkId> = HashSet::new();
    // The same, with the pack of each copy: what the damaged-blob list records.
    let mut copies: Vec<(ChunkId, ChunkId)> = vec![];
    for (pack, count) in by_pack {
        report.damage.push(Damage {
            kind: "pack".into(),
            name: pack.to_hex(),
            detail: format!("missing, {count} blobs lost"),
        });
        let lost = indexed_in(&index, &pack, |_| true);
        copies.extend(lost.iter().map(|id| (*id, pack)));
        damaged_blobs.extend(lost);
    }
    report.packs = jobs.len() as u64;
    let mut phase = run.phase(if read_data { "verify (read data)" } else { "verify" }, None);
    let progress = &phase.progress;
    progress.set_total(jobs.iter().map(|j| j.len).sum());
    let repo = Arc::new(repo);
    let (tx, rx) = bounded::<PackJob>(cores * 2);
    let workers = {
        let (repo, index) = (Arc::clone(&repo), Arc::clone(&index));
        runtime::spawn(cores, move |_| check_packs(&repo, &index, &rx, read_data))?
    };
    for job in jobs {
        progress.add(job.len, 0);
        if tx.send(job).is_err() {
            break;
        }
    }
    drop(tx);
    for (damage, blobs, bytes) in workers.join()? {
        report.blobs += blobs;
        report.bytes_read += bytes;
        for (d, pack, ids) in damage {
            copies.extend(ids.iter().map(|id| (*id, pack)));
            damaged_blobs.extend(ids);
            report.damage.push(d);
        }
    }
    phase.finish();
    // A blob is lost to the snapshots only when no copy of it is good (a backup may have
    // stored a damaged one again, in another pack).
    let mut bad_packs: HashMap<ChunkId, Vec<ChunkId>> = HashMap::new();
    for (id, pack) in &copies {
        bad_packs.entry(*id).or_default().push(*pack);
    }
    let mut lost = HashSet::new();
    for id in damaged_blobs {
        let bad = &bad_packs.get(&id).map_or(&[][..], Vec::as_slice);
        if !index.has_good_copy(&id, |pack| bad.contains(pack))? {
            lost.insert(id);
        }
    }
    let damaged_blobs = lost;

    // Snapshots: every tree, chunk list and chunk they reference. Trees are walked here; the
    // chunk lists, one index lookup per chunk, are checked on `cores` threads.
    let (found, lists) = std::thread::scope(|scope| -> Result<(Vec<Damage>, HashSet<ChunkId>)> {
        let (jobs, job_rx) = bounded::<(usize, ChunkId)>(limits::VERIFY_LIST_BATCH);
        let (result_tx, results) = bounded(limits::VERIFY_LIST_BATCH);
        for _ in 0..cores {
            let (job_rx, result_tx) = (job_rx.clone(), result_tx.clone());
            let mut reader = BlobReader::new(&repo, &index)?;
            let (index, damaged) = (&*index, &damaged_blobs);
            scope.spawn(move || {
                for (i, id) in job_rx {
                    let checked = check_list(&mut reader, index, damaged, &id);
                    if result_tx.send((i, checked)).is_err() {
                        break;
                    }
                }
            });
        }
        let mut walk = SnapshotWalk {
            reader: BlobReader::new(&repo, &index)?,
            damaged: &damaged_blobs,
            lists: ListChecker { jobs, results },
            clean_trees: HashSet::new(),
            found: vec![],
            damaged_lists: HashSet::new(),
        };
        for (id, snap) in &snapshots {
            walk.tree(&snap.tree_id(), &id.short(), Path::new("/"));
        }
        // Dropping the walk closes the job queue, which ends the threads.
        Ok((walk.found, walk.damaged_lists))
    })?;
    report.damage.extend(found);
    report.damaged_lists = lists.iter().map(ChunkId::to_hex).collect();
    report.damaged_lists.sort();
    // A backup reuses an unchanged file's chunk lists as they are: every copy of a list that
    // names damage is recorded too, so the file is read and its lost chunks stored again.
    for list in &lists {
        copies.extend(index.packs_of(list)?.into_iter().map(|pack| (*list, pack)));
    }
    if !copies.is_empty() {
        report.damaged_recorded = record_damage(&repo, copies.clone(), run);
    }
    Ok((report, copies))
}

/// Writes the damaged-blob list; a repository verify cannot write to (read-only) only warns.
fn record_damage(repo: &Repository, copies: Vec<(ChunkId, ChunkId)>, run: &Run) -> Option<String> {
    match crate::index::write_damaged(&*repo.store, wire::verify::DamagedBlobs { copies }) {
        Ok(name) => Some(format!("{}/{}", repo.store.location(), ObjectKind::Damaged.key(&name))),
        Err(e) => {
            let at = format!("{}/{}", repo.store.location(), ObjectKind::Damaged.dir());
            run.warn(Path::new(&at), &format!("the damage found is not recorded ({e}): backups may still deduplicate against it until `cbcr repair packs`"));
            None
        }
    }
}

/// The blobs the index places in `pack` that `keep` selects; a scan of the whole index, for
/// damage only.
fn indexed_in(index: &ChunkIndex, pack: &ChunkId, keep: impl Fn(&IndexEntry) -> bool) -> Vec<ChunkId> {
    let mut ids = vec![];
    // A run that cannot be read now was read whole at load; the pack's damage is reported anyway.
    let _ = index.for_each(|e| {
        if e.pack == *pack && keep(e) {
            ids.push(e.id());
        }
    });
    ids
}

/// Damage, the pack it is in, and the blobs of that pack it loses.
type PackDamage = (Damage, ChunkId, Vec<ChunkId>);

/// One core's share of the packs: returns damage (with the blobs it loses), blobs checked and
/// bytes read.
fn check_packs(
    repo: &Repository,
    index: &ChunkIndex,
    jobs: &Receiver<PackJob>,
    read_data: bool,
) -> (Vec<PackDamage>, u64, u64) {
    let mut out = (vec![], 0, 0);
    let mut blobs = BlobChecker {
        decoder: BlobDecoder::new(repo).expect("zstd contexts can always be created"),
        reader: BlobReader::new(repo, index).expect("zstd contexts can always be created"),
        raw: Vec::new(),
        window: Vec::new(),
        scratch: Vec::new(),
    };
    for job in jobs.iter() {
        // The blobs a damaged pack loses are looked up only when it is damaged.
        let pack_damage = |detail: String| {
            (
                Damage { kind: "pack".into(), name: job.id.to_hex(), detail },
                job.id,
                indexed_in(index, &job.id, |_| true),
            )
        };
        let (file, entries) = match read_trailer(&*repo.store, &job.id) {
            Ok(found) => found,
            Err(detail) => {
                out.0.push(pack_damage(detail));
                continue;
            }
        };
        if read_data {
            let (damage, read) = check_pack_data(repo, &*file, &job.id, &entries, &mut blobs);
            out.0.extend(damage);
            out.1 += entries.len() as u64;
            out.2 += read;
        }
        // Every index entry naming this pack must match a trailer entry: count the matches.
        let same =
            |i: &IndexEntry, e: &PackEntry| i.entry.offset() == e.offset() && i.entry.stored_len() == e.stored_len();
        let matched = entries.iter().try_fold(0u64, |n, e| {
            Ok::<_, Error>(n + u64::from(index.get_in_pack(&e.id, &job.id)?.is_some_and(|i| same(&i, e))))
        });
        match matched {
            Err(err) => out.0.push(pack_damage(format!("its index entries cannot be read: {err}"))),
            Ok(n) if n != job.indexed => {
                let in_pack: HashSet<_> = entries.iter().map(|e| (e.id, e.offset(), e.stored_len())).collect();
                let disagree = indexed_in(index, &job.id, |i| {
                    !in_pack.contains(&(i.entry.id, i.entry.offset(), i.entry.stored_len()))
                });
                let detail = format!("{} indexed blobs are not where the index says", disagree.len());
                out.0.push((Damage { kind: "pack".into(), name: job.id.to_hex(), detail }, job.id, disagree));
            }
            Ok(_) => {}
        }
    }
    out
}

/// Reads pack `id` once, in windows that end where blobs end: the whole file is hashed (its hash
/// is its name), and every blob is decoded and re-hashed from the window that holds it. Which
/// blobs a damaged pack loses, the blob checks tell: a flipped bit costs one blob, not the pack.
/// Returns the damage found and the bytes read (none when the file could not be read whole).
fn check_pack_data(
    repo: &Repository,
    file: &dyn ObjectReader,
    id: &ChunkId,
    entries: &[PackEntry],
    checker: &mut BlobChecker<'_>,
) -> (Vec<PackDamage>, u64) {
    let whole = |detail: String| (Damage { kind: "pack".into(), name: id.to_hex(), detail }, *id, vec![]);
    let mut by_offset: Vec<&PackEntry> = entries.iter().collect();
    by_offset.sort_by_key(|e| e.offset());
    let windows = read_windows(file.size(), &by_offset, limits::VERIFY_READ_BUFFER as u64);
    let (mut damage, mut hasher, mut unreadable) = (vec![], blake3::Hasher::new(), None);
    let (mut blobs, mut piece) = (by_offset.iter().peekable(), std::mem::take(&mut checker.window));
    for &(start, end) in &windows {
        piece.resize((end - start) as usize, 0);
        let read = file.read_at(start, &mut piece);
        match &read {
            Ok(()) => {
                hasher.update(&piece);
            }
            Err(e) => {
                unreadable.get_or_insert_with(|| format!("cannot be read: {e}"));
            }
        }
        while let Some(e) = blobs.next_if(|e| e.offset() < end) {
            let held = read
                .as_ref()
                .ok()
                .filter(|_| e.offset() >= start)
                .and_then(|()| piece.get((e.offset() - start) as usize..)?.get(..e.stored_len() as usize));
            damage.extend(checker.check(repo, file, id, e, held));
        }
    }
    checker.window = piece;
    // Blobs the trailer places past the end of the file.
    for e in blobs {
        damage.extend(checker.check(repo, file, id, e, None));
    }
    match unreadable {
        Some(detail) => damage.push(whole(detail)),
        None if ChunkId(*hasher.finalize().as_bytes()) != *id => {
            damage.push(whole("content does not match its name (corrupt)".into()))
        }
        None => return (damage, file.size()),
    }
    (damage, 0)
}

/// Byte ranges that cover `len` bytes in order, each ending where a blob ends (so none is
/// split) and at most `limit` long unless one blob is longer; past the last blob (the
/// trailer), pieces of `limit`. `by_offset` is sorted by offset; blobs that overlap or pass
/// the end do not move the boundaries (they are read on their own).
fn read_windows(len: u64, by_offset: &[&PackEntry], limit: u64) -> Vec<(u64, u64)> {
    let (mut windows, mut start, mut end) = (vec![], 0, 0);
    for e in by_offset {
        let blob_end = e.offset() + u64::from(e.stored_len());
        if blob_end > len || blob_end <= end {
            continue;
        }
        if blob_end - start > limit && end > start {
            windows.push((start, end));
            start = end;
        }
        end = blob_end;
    }
    if end > start {
        windows.push((start, end));
        start = end;
    }
    while start < len {
        let stop = (start + limit).min(len);
        windows.push((start, stop));
        start = stop;
    }
    windows
}

/// What one core checks blobs with, and its buffers.
struct BlobChecker<'a> {
    decoder: BlobDecoder,
    /// Rebuilds deltas down their chains.
    reader: BlobReader<'a>,
    raw: Vec<u8>,
    /// The window of a pack being read, and a blob read on its own.
    window: Vec<u8>,
    scratch: Vec<u8>,
}

impl BlobChecker<'_> {
    /// Checks blob `e` of pack `pack`: from `held` (its stored bytes, already read) or read on
    /// its own; a delta by rebuilding its block down its chain, which names the first broken
    /// link.
    fn check(
        &mut self,
        repo: &Repository,
        file: &dyn ObjectReader,
        pack: &ChunkId,
        e: &PackEntry,
        held: Option<&[u8]>,
    ) -> Option<PackDamage> {
        self.raw.clear();
        let ok = match e.kind() {
            BlobKind::Delta => self.reader.read(&e.id, &mut self.raw).map_err(|err| err.to_string()),
            _ => {
                let stored = match held {
                    Some(bytes) => Ok(bytes),
                    None => {
                        self.scratch.resize(e.stored_len() as usize, 0);
                        file.read_at(e.offset(), &mut self.scratch)
                            .map(|()| &self.scratch[..])
                            .map_err(|err| format!("cannot be read: {err}"))
                    }
                };
                stored.and_then(|stored| self.decoder.decode(stored, e, &mut self.raw)).and_then(|()| {
                    if repo.key.blob_id(&self.raw) == e.id {
                        Ok(())
                    } else {
                        Err("does not match its id (data is corrupt)".into())
                    }
                })
            }
        };
        let detail = ok.err()?;
        let damage = Damage { kind: "blob".into(), name: e.id.to_hex(), detail: format!("in pack {pack}: {detail}") };
        Some((damage, *pack, vec![e.id]))
    }
}

struct SnapshotWalk<'a> {
    reader: BlobReader<'a>,
    damaged: &'a HashSet<ChunkId>,
    lists: ListChecker,
    clean_trees: HashSet<ChunkId>,
    found: Vec<Damage>,
    /// Chunk lists that name a damaged or missing chunk.
    damaged_lists: HashSet<ChunkId>,
}

/// The way to the threads that check chunk lists.
struct ListChecker {
    jobs: Sender<(usize, ChunkId)>,
    results: Receiver<(usize, std::result::Result<(), String>)>,
}

impl ListChecker {
    /// Checks `ids` on the threads, a batch at a time (the queues hold one batch, so neither
    /// side waits on a full queue); results in the order of `ids`.
    fn check(&self, ids: &[ChunkId]) -> Vec<std::result::Result<(), String>> {
        let mut out = vec![Ok(()); ids.len()];
        for (b, batch) in ids.chunks(limits::VERIFY_LIST_BATCH).enumerate() {
            let base = b * limits::VERIFY_LIST_BATCH;
            for (i, id) in batch.iter().enumerate() {
                self.jobs.send((base + i, *id)).expect("list checkers run until the walk ends");
            }
            for _ in batch {
                let (i, checked) = self.results.recv().expect("list checkers answer every job");
                out[i] = checked;
            }
        }
        out
    }
}

/// Every chunk of chunk list `id` is indexed and not damaged.
fn check_list(
    reader: &mut BlobReader<'_>,
    index: &ChunkIndex,
    damaged: &HashSet<ChunkId>,
    id: &ChunkId,
) -> std::result::Result<(), String> {
    let list = ChunkList::decode(&read_blob(reader, damaged, id)?).map_err(|e| format!("chunk list {id}: {e}"))?;
    for c in list.chunks.iter().filter(|c| !c.zero) {
        if damaged.contains(&c.id) {
            return Err(format!("chunk {} is damaged", c.id));
        }
        if !index.contains(&c.id).map_err(|e| e.to_string())? {
            if index.has_damaged_copy(&c.id) {
                return Err(format!("chunk {} is damaged (recorded by an earlier verify)", c.id));
            }
            return Err(format!("chunk {} is missing", c.id));
        }
    }
    Ok(())
}

/// A tree (all its pieces, if split), verified, unless verify already found a blob of it damaged.
fn read_tree(
    reader: &mut BlobReader<'_>,
    damaged: &HashSet<ChunkId>,
    id: &ChunkId,
) -> std::result::Result<Tree, String> {
    if damaged.contains(id) {
        return Err(format!("blob {id} is damaged"));
    }
    reader.read_tree_checked(id, |piece| !damaged.contains(piece)).map_err(|e| match e {
        Error::Integrity(d) => d,
        other => other.to_string(),
    })
}

/// A blob, verified, unless verify already found it damaged.
fn read_blob(
    reader: &mut BlobReader<'_>,
    damaged: &HashSet<ChunkId>,
    id: &ChunkId,
) -> std::result::Result<Vec<u8>, String> {
    if damaged.contains(id) {
        return Err(format!("blob {id} is damaged"));
    }
    let mut buf = Vec::new();
    reader.read(id, &mut buf).map_err(|e| match e {
        Error::Integrity(d) => d,
        other => other.to_string(),
    })?;
    Ok(buf)
}

impl SnapshotWalk<'_> {
    /// Checks tree `id` at `path` of snapshot `snap`; returns whether it was clean.
    fn tree(&mut self, id: &ChunkId, snap: &str, path: &Path) -> bool {
        if self.clean_trees.contains(id) {
            return true;
        }
        let tree = match read_tree(&mut self.reader, self.damaged, id) {
            Ok(t) => t,
            Err(detail) => {
                self.damage_file(snap, path, format!("directory tree {id}: {detail}"));
                return false;
            }
        };
        let mut clean = true;
        let lists: Vec<ChunkId> = tree
            .nodes
            .iter()
            .flat_map(|n| match &n.kind {
                NodeKind::File { segments } => &segments[..],
                _ => &[],
            })
            .copied()
            .collect();
        let mut checked = self.lists.check(&lists).into_iter();
        for node in &tree.nodes {
            let child = path.join(std::ffi::OsStr::new(&*String::from_utf8_lossy(&node.name)));
            match &node.kind {
                NodeKind::Dir { tree } => clean &= self.tree(tree, snap, &child),
                NodeKind::File { segments } => {
                    // Take all of this file's results, so the next file starts at its own.
                    let mine: Vec<_> = checked.by_ref().take(segments.len()).collect();
                    for (list, _) in segments.iter().zip(&mine).filter(|(_, c)| c.is_err()) {
                        self.damaged_lists.insert(*list);
                    }
                    let first_damage = mine.into_iter().find_map(|c| c.err());
                    if let Some(detail) = first_damage {
                        self.damage_file(snap, &child, detail);
                        clean = false;
                    }
                }
                NodeKind::Symlink { .. } => {}
            }
        }
        if clean {
            self.clean_trees.insert(*id);
        }
        clean
    }

    fn damage_file(&mut self, snap: &str, path: &Path, detail: String) {
        self.found.push(Damage { kind: "file".into(), name: format!("snapshot {snap}: {}", path.display()), detail });
    }
}

/// Exposed for `cbcr verify` to print: damage of one kind as one line.
pub fn describe(d: &Damage) -> String {
    format!("damaged {} {}: {}", d.kind, d.name, d.detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Compression;

    fn blob(offset: u64, len: u32) -> PackEntry {
        PackEntry::new(ChunkId([offset as u8; 32]), offset, len, len, BlobKind::Data, Compression::None)
    }

    fn windows_of(len: u64, blobs: &[PackEntry], limit: u64) -> Vec<(u64, u64)> {
        let mut by_offset: Vec<&PackEntry> = blobs.iter().collect();
        by_offset.sort_by_key(|e| e.offset());
        read_windows(len, &by_offset, limit)
    }

    #[test]
    fn windows_cover_the_pack_in_order_and_never_split_a_blob() {
        // Header 0..16, blobs of 40, a trailer of 30.
        let blobs: Vec<PackEntry> = (0..10).map(|i| blob(16 + i * 40, 40)).collect();
        let len = 16 + 400 + 30;
        let windows = windows_of(len, &blobs, 100);
        assert_eq!(windows.first().unwrap().0, 0);
        assert_eq!(windows.last().unwrap().1, len);
        for pair in windows.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "contiguous: {windows:?}");
        }
        for b in &blobs {
            let end = b.offset() + u64::from(b.stored_len());
            assert!(
                windows.iter().any(|&(s, e)| s <= b.offset() && end <= e),
                "blob at {} split: {windows:?}",
                b.offset()
            );
        }
        assert!(windows.iter().all(|&(s, e)| e - s <= 100), "{windows:?}");
    }

    #[test]
    fn a_blob_longer_than_the_limit_gets_a_window_of_its_own_and_the_trailer_is_cut_in_pieces() {
        let blobs = [blob(16, 50), blob(66, 500), blob(566, 20)];
        let windows = windows_of(566 + 20 + 250, &blobs, 100);
        assert_eq!(windows, vec![(0, 66), (66, 566), (566, 586), (586, 686), (686, 786), (786, 836)]);
    }

    #[test]
    fn blobs_past_the_end_or_overlapping_do_not_move_the_boundaries() {
        // One blob runs past the end of a 200-byte file; one lies inside another.
        let blobs = [blob(16, 100), blob(20, 10), blob(150, 100)];
        assert_eq!(windows_of(200, &blobs, 1000), vec![(0, 116), (116, 200)]);
        assert_eq!(windows_of(0, &[], 1000), vec![]);
    }
}
