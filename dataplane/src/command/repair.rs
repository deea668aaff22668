//! `cbcr repair index`: the index is a cache of what the packs say about themselves. This
//! rebuilds it from every pack's trailer, so losing or damaging index runs loses nothing.
//!
//! Streamed: trailers are read one pack at a time and their entries written out as sorted runs
//! of at most [`limits::REPAIR_RUN_ENTRIES`], so memory is bounded whatever the repository's
//! size. The new runs are durable before any old one is removed, and only runs listed before
//! the packs are removed: every pack such a run names was listed too (a pack is stored before
//! its run), so at every moment every blob of a listed pack is in some run.

use std::collections::HashSet;

use wire::index::{encode_sorted, IndexEntry};
use wire::ChunkId;

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
}

/// Rebuilds the index of `repo` from its packs' trailers (holding the writer's claim).
pub fn repair_index(repo: &Repository, run: &Run) -> Result<RepairReport> {
    if repo.location().starts_with("quic://") {
        return Err(Error::Usage(
            "repair runs on the repository's store (its directory or s3://), not through a receiver: stop the receiver first"
                .into(),
        ));
    }
    let lock = repo.lock()?;
    lock.clean_tmp()?;
    let store = &*repo.store;
    // Listed before the packs: see the module's comment.
    let old: Vec<String> = store.list(ObjectKind::Index)?.into_iter().map(|o| o.name).collect();
    let packs = list_objects(store, ObjectKind::Pack)?;
    let mut phase = run.phase("repair", None);
    phase.progress.set_total(packs.iter().map(|p| p.len).sum());
    let mut report = RepairReport::default();
    let mut written: HashSet<String> = HashSet::new();
    let mut batch: Vec<IndexEntry> = Vec::new();
    let mut flush = |batch: &mut Vec<IndexEntry>, report: &mut RepairReport| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        batch.sort_unstable_by_key(|e| e.id());
        // A blob stored twice (two writers at once) is indexed once per run.
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
                report.blobs += entries.len() as u64;
                batch.extend(entries.into_iter().map(|entry| IndexEntry { pack, entry }));
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
