//! `cbcr repair index`: the index is a cache of what the packs say about themselves. This
//! rebuilds it from every pack's trailer, so losing or damaging index runs loses nothing.
//! `cbcr repair packs`: the same rebuild, leaving out the copies of blobs that `verify
//! --read-data` finds damaged (and those earlier verifies recorded in `damaged/`), then removing
//! those records: the index no longer names the damage. Until then the records alone keep
//! backups from deduplicating against it; either way the next backup of the files that use
//! them stores them again (and the snapshots that used them restore again once it has).
//!
//! Streamed: trailers are read one pack at a time and their entries written out as sorted runs
//! of at most [`limits::REPAIR_RUN_ENTRIES`], so memory is bounded whatever the repository's
//! size. The new runs are durable before any old one is removed, and only runs listed before
//! the packs are removed: every pack such a run names was listed too (a pack is stored before
//! its run), so at every moment every blob of a listed pack is in some run.

use std::collections::HashSet;

use wire::index::{encode_sorted, IndexEntry};
use wire::verify::VerifyReport;
use wire::ChunkId;

use crate::command::verify::verify_here;
use crate::error::{Error, Result};
use crate::events::Run;
use crate::index::{self, ChunkIndex};
use crate::limits;
use crate::repo::{read_trailer, Repository};
use crate::store::{list_objects, ObjectKind};

/// What a repair did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Packs whose trailers were read.
    pub packs: u64,
    /// Blob entries indexed.
    pub blobs: u64,
    /// Packs whose trailer could not be read, and why: their blobs are not indexed, so the next
    /// backup of the files that use them stores them again.
    pub damaged: Vec<(String, String)>,
    /// Index runs written and removed.
    pub runs_written: u64,
    pub runs_removed: u64,
    /// Copies of blobs found damaged and not indexed (`repair packs`).
    pub blobs_left_out: u64,
    /// Damaged-blob records removed (`repair packs`: the index now leaves their copies out).
    pub records_removed: u64,
}

/// Rebuilds the index of `repo` from its packs' trailers (holding the writer's claim).
pub fn repair_index(repo: &Repository, run: &Run) -> Result<RepairReport> {
    let lock = claim(repo)?;
    // The damaged-blob records stay: the rebuilt index names those copies again, and the
    // records keep lookups passing over them.
    let report = rebuild(repo, run, &HashSet::new());
    drop(lock);
    report
}

/// Verifies every blob (`verify --read-data` on `cores`) and rebuilds the index without the
/// damaged ones, holding the writer's claim throughout so no backup deduplicates against them
/// meanwhile. Returns what verify found (the snapshots and files that use them) and the rebuild.
pub fn repair_packs(repo: &Repository, cores: usize, run: &Run) -> Result<(VerifyReport, RepairReport)> {
    let lock = claim(repo)?;
    // What this full read finds damaged (the blobs, and every copy of the chunk lists that
    // name them: a backup reuses an unchanged file's lists as they are, so only a list gone
    // from the index makes it read the file again) supersedes what earlier verifies recorded:
    // a backup may have written a damaged pack whole again since.
    let (found, copies) = verify_here(repo.clone(), true, cores, run)?;
    let records = list_objects(&*repo.store, ObjectKind::Damaged)?;
    let damaged: HashSet<(ChunkId, ChunkId)> = copies.into_iter().collect();
    let mut report = rebuild(repo, run, &damaged)?;
    report.blobs_left_out = damaged.len() as u64;
    for record in &records {
        repo.store.delete(ObjectKind::Damaged, &record.name)?;
        report.records_removed += 1;
    }
    drop(lock);
    Ok((found, report))
}

/// The writer's claim a repair holds; refused through a receiver.
pub(crate) fn claim(repo: &Repository) -> Result<crate::repo::RepoLock> {
    if repo.location().starts_with("quic://") {
        return Err(Error::Usage(
            "repair runs on the repository's store (its directory or s3://), not through a receiver: stop the receiver first"
                .into(),
        ));
    }
    let lock = repo.lock()?;
    lock.clean_tmp()?;
    Ok(lock)
}

/// Writes the index anew from the trailers, without the copies (blob, pack) in `left_out`.
fn rebuild(repo: &Repository, run: &Run, left_out: &HashSet<(ChunkId, ChunkId)>) -> Result<RepairReport> {
    let store = &*repo.store;
    // Listed before the packs: see the module's comment.
    let old: Vec<String> = store.list(ObjectKind::Index)?.into_iter().map(|o| o.name).collect();
    let packs = list_objects(store, ObjectKind::Pack)?;
    let mut phase = run.phase("repair", None);
    phase.progress.set_total(packs.iter().map(|p| p.len).sum());
    let mut report = RepairReport::default();
    // Of two copies of a blob, a run keeps one: not one an earlier verify recorded damaged.
    let recorded: HashSet<(ChunkId, ChunkId)> = index::damaged_copies(store)?.into_iter().collect();
    let mut written: HashSet<String> = HashSet::new();
    let mut batch: Vec<IndexEntry> = Vec::new();
    let mut flush = |batch: &mut Vec<IndexEntry>, report: &mut RepairReport| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        batch.sort_unstable_by_key(|e| (e.id(), recorded.contains(&(e.id(), e.pack))));
        // A blob stored twice (two writers at once, or again after damage) is indexed once per run.
        batch.dedup_by_key(|e| e.id());
        let path = index::write_run(store, &encode_sorted(batch))?;
        written.insert(path.file_name().unwrap_or_default().to_string_lossy().into_owned());
        report.runs_written += 1;
        batch.clear();
        Ok(())
    };
    for object in &packs {
        if run.cancel.is_cancelled() {
            // The runs written so far are durable and the old ones all still there.
            return Err(Error::Interrupted);
        }
        let Some(Ok(pack)) = object.name.strip_suffix(".pack").map(ChunkId::from_hex) else { continue };
        match read_trailer(store, &pack) {
            Ok((_, entries)) => {
                report.packs += 1;
                let kept = entries.into_iter().filter(|e| !left_out.contains(&(e.id, pack)));
                let before = batch.len();
                batch.extend(kept.map(|entry| IndexEntry { pack, entry }));
                report.blobs += (batch.len() - before) as u64;
                if batch.len() >= limits::REPAIR_RUN_ENTRIES {
                    flush(&mut batch, &mut report)?;
                }
            }
            Err(detail) => {
                report.damaged.push((format!("{}/{}", store.location(), ObjectKind::Pack.key(&object.name)), detail))
            }
        }
        phase.progress.add(object.len, 1);
    }
    flush(&mut batch, &mut report)?;
    phase.finish();
    for name in old.iter().filter(|n| !written.contains(*n)) {
        store.delete(ObjectKind::Index, name)?;
        report.runs_removed += 1;
    }
    // One run for the next command, as after a backup.
    let index = ChunkIndex::load(store)?;
    index.compact_all(store)?;
    Ok(report)
}
