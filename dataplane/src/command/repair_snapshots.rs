//! `cbcr repair snapshots`: for a snapshot that references lost data, write a new snapshot
//! that restores without it, as restic's command of the same name does. The index decides what
//! is lost (run `repair index` or `repair packs` first): a chunk the index does not have (or
//! holds only as a copy `verify` found damaged), a block delta whose chain is broken, a chunk
//! list or directory tree that cannot be read.
//!
//! Unlike restic, which drops a file's lost pieces and so shifts everything after them, a lost
//! chunk becomes a hole of its length: the file keeps its size and every surviving byte its
//! offset, which is what a database's page files need. A lost chunk list becomes a hole of its
//! segment's length, a lost directory an empty one. The new snapshot keeps the original's time,
//! host, paths and parent, and records what was changed (`repaired`: the original's id, and
//! how many files, directories and bytes). With `forget`, the original is removed once the new
//! one is committed; a snapshot whose root tree is lost has nothing to keep and is only removed.
//!
//! Every blob of the new snapshots is durable before any of them is committed, and every new
//! snapshot is committed before any original is removed, so an interrupted repair leaves the
//! originals (and at worst some new snapshots beside them).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use wire::assemble::{self, DirEntry};
use wire::repo::{Repaired, Snapshot};
use wire::tree::{ChunkList, NodeKind, Tree};
use wire::{BlobKind, ChunkId};

use crate::error::{Error, Result};
use crate::events::Run;
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::pipeline::pack::{BlobReader, BlobWriter, Sealer};
use crate::repo::Repository;

/// What `repair snapshots` does.
#[derive(Clone, Debug, Default)]
pub struct RepairSnapshotsOptions {
    /// The snapshots to look at (ids, prefixes or `latest`); empty: all.
    pub snapshots: Vec<String>,
    /// Report only: store nothing, commit nothing, remove nothing.
    pub dry_run: bool,
    /// Remove each original once the snapshot that replaces it is committed.
    pub forget: bool,
}

/// One snapshot found to reference lost data, and what was done.
#[derive(Debug, Default, serde::Serialize)]
pub struct SnapshotRepair {
    /// The damaged snapshot's id.
    pub original: String,
    /// The snapshot committed in its place (`None` on a dry run, or when its root is lost).
    pub repaired: Option<String>,
    /// Files whose lost chunks now restore as zeros, with the bytes made zeros.
    pub files: Vec<(String, u64)>,
    /// Directories whose tree was lost, now empty.
    pub dirs: Vec<String>,
    /// The root tree is lost: there is nothing to keep.
    pub root_lost: bool,
    /// The original was removed (`forget`).
    pub forgotten: bool,
}

/// Looks at every selected snapshot and repairs those that reference lost data (holding the
/// writer's claim, so no backup runs meanwhile). Returns only the damaged ones.
pub fn repair_snapshots(repo: &Repository, opts: &RepairSnapshotsOptions, run: &Run) -> Result<Vec<SnapshotRepair>> {
    let lock = super::repair::claim(repo)?;
    let mut snapshots = repo.snapshots()?;
    if !opts.snapshots.is_empty() {
        let wanted: HashSet<ChunkId> =
            opts.snapshots.iter().map(|spec| repo.find_snapshot(spec).map(|(id, _)| id)).collect::<Result<_>>()?;
        snapshots.retain(|(id, _)| wanted.contains(id));
    }
    let index = ChunkIndex::load(&*repo.store)?;
    let known = Arc::new(KnownBlobs::new(index));
    let sealer = Sealer::start(Arc::clone(&known));
    let writer =
        BlobWriter::new(repo, &known, sealer.sender(), limits::PACK_TARGET_SIZE, limits::DEFAULT_COMPRESSION_LEVEL)?;
    let mut fixer = Fixer {
        index: known.index(),
        reader: BlobReader::new(repo, known.index())?,
        writer,
        dry_run: opts.dry_run,
        segment_size: repo.config.segment_size,
        clean: HashSet::new(),
        chunks: HashMap::new(),
        block: Vec::new(),
    };
    let mut phase = run.phase("repair snapshots", None);
    phase.progress.set_total(snapshots.len() as u64);
    let mut found = vec![];
    let mut commits = vec![];
    let walked = (|| -> Result<()> {
        for (id, snap) in &snapshots {
            if run.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let mut repair = SnapshotRepair { original: id.to_hex(), ..SnapshotRepair::default() };
            match fixer.tree(&snap.tree_id(), Path::new("/"), &mut repair)? {
                TreeOutcome::Clean => {}
                TreeOutcome::Lost(detail) => {
                    run.warn(
                        Path::new(&format!("snapshot {}", id.short())),
                        &format!("its root tree is lost ({detail}): nothing of it can be kept"),
                    );
                    repair.root_lost = true;
                    found.push(repair);
                }
                TreeOutcome::Changed(root) => {
                    let bytes_lost = repair.files.iter().map(|(_, b)| b).sum();
                    let marked = Repaired {
                        original: id.to_hex(),
                        files: repair.files.len() as u64,
                        dirs: repair.dirs.len() as u64,
                        bytes_lost,
                    };
                    commits
                        .push((found.len(), Snapshot { tree: root.to_hex(), repaired: Some(marked), ..snap.clone() }));
                    found.push(repair);
                }
            }
            phase.progress.add(1, 1);
        }
        Ok(())
    })();
    // Every blob stored is durable before anything is committed, on success and error alike.
    let written = fixer.writer.finish();
    let sealed = sealer.finish();
    walked?;
    written?;
    sealed?;
    phase.finish();
    if opts.dry_run {
        drop(lock);
        return Ok(found);
    }
    for (at, snapshot) in commits {
        found[at].repaired = Some(repo.commit_snapshot(&snapshot)?.to_hex());
    }
    if opts.forget {
        let originals: Vec<ChunkId> = found.iter().filter_map(|r| ChunkId::from_hex(&r.original).ok()).collect();
        let removed: HashSet<ChunkId> = repo.forget(&originals)?.into_iter().collect();
        for r in &mut found {
            r.forgotten = ChunkId::from_hex(&r.original).is_ok_and(|id| removed.contains(&id));
        }
    }
    drop(lock);
    Ok(found)
}

enum TreeOutcome {
    Clean,
    /// Repaired: the new tree's id.
    Changed(ChunkId),
    /// Cannot be read, and why.
    Lost(String),
}

struct Fixer<'a> {
    index: &'a ChunkIndex,
    reader: BlobReader<'a>,
    writer: BlobWriter<'a>,
    dry_run: bool,
    segment_size: u64,
    /// Trees found whole, with everything below them: not walked again.
    clean: HashSet<ChunkId>,
    /// Chunks looked up, and whether each is lost; emptied when it reaches its bound.
    chunks: HashMap<ChunkId, bool>,
    block: Vec<u8>,
}

/// Whether an error is damage (the object is lost) rather than a store that did not answer:
/// only damage may be repaired away.
fn is_damage(e: &Error) -> bool {
    matches!(e, Error::Integrity(_) | Error::Format { .. })
}

impl Fixer<'_> {
    fn tree(&mut self, id: &ChunkId, path: &Path, repair: &mut SnapshotRepair) -> Result<TreeOutcome> {
        if self.clean.contains(id) {
            return Ok(TreeOutcome::Clean);
        }
        let tree = match self.reader.read_tree(id) {
            Ok(tree) => tree,
            Err(e) if is_damage(&e) => return Ok(TreeOutcome::Lost(e.to_string())),
            Err(e) => return Err(e),
        };
        let mut changed = false;
        let mut nodes = Vec::with_capacity(tree.nodes.len());
        for mut node in tree.nodes {
            let child = path.join(std::ffi::OsStr::new(&*String::from_utf8_lossy(&node.name)));
            match &mut node.kind {
                NodeKind::Dir { tree } => match self.tree(tree, &child, repair)? {
                    TreeOutcome::Clean => {}
                    TreeOutcome::Changed(new) => (*tree, changed) = (new, true),
                    TreeOutcome::Lost(_) => {
                        *tree = self.put(BlobKind::Tree, &Tree::default().encode())?;
                        repair.dirs.push(child.display().to_string());
                        changed = true;
                    }
                },
                NodeKind::File { segments } => {
                    let mut lost = 0;
                    for (i, list) in segments.iter_mut().enumerate() {
                        let len = node.meta.size.saturating_sub(i as u64 * self.segment_size).min(self.segment_size);
                        if let Some((new, bytes)) = self.segment(list, len)? {
                            *list = new;
                            lost += bytes;
                        }
                    }
                    if lost > 0 {
                        repair.files.push((child.display().to_string(), lost));
                        changed = true;
                    }
                }
                NodeKind::Symlink { .. } => {}
            }
            nodes.push(node);
        }
        if !changed {
            self.clean.insert(*id);
            return Ok(TreeOutcome::Clean);
        }
        let blobs = assemble::dir_tree(&path.to_string_lossy(), nodes.into_iter().map(DirEntry::Node).collect())?;
        Ok(TreeOutcome::Changed(blobs.store(|bytes| self.put(BlobKind::Tree, bytes))?))
    }

    /// The chunk list replacing segment `list` (of `len` bytes) and the bytes it makes holes,
    /// or `None` when nothing of it is lost.
    fn segment(&mut self, list: &ChunkId, len: u64) -> Result<Option<(ChunkId, u64)>> {
        let mut bytes = Vec::new();
        let fixed = match self.reader.read(list, &mut bytes) {
            Err(e) if is_damage(&e) => (ChunkList::holes(len), len),
            Err(e) => return Err(e),
            Ok(()) => match ChunkList::decode(&bytes) {
                Err(_) => (ChunkList::holes(len), len),
                Ok(chunks) => {
                    let mut lost = HashSet::new();
                    for c in chunks.chunks.iter().filter(|c| !c.zero) {
                        if self.lost(&c.id)? {
                            lost.insert(c.id);
                        }
                    }
                    if lost.is_empty() {
                        return Ok(None);
                    }
                    chunks.with_holes_for(|c| lost.contains(&c.id))
                }
            },
        };
        Ok(Some((self.put(BlobKind::ChunkList, &fixed.0.encode())?, fixed.1)))
    }

    /// Whether chunk `id` is lost: not indexed (or only as a damaged copy), or a block delta
    /// whose chain does not rebuild.
    fn lost(&mut self, id: &ChunkId) -> Result<bool> {
        if let Some(&lost) = self.chunks.get(id) {
            return Ok(lost);
        }
        let lost = match self.index.get(id)? {
            None => true,
            Some(entry) if entry.entry.kind() == BlobKind::Delta => {
                self.block.clear();
                match self.reader.read_block(id, &mut self.block) {
                    Ok(_) => false,
                    Err(e) if is_damage(&e) => true,
                    Err(e) => return Err(e),
                }
            }
            Some(_) => false,
        };
        if self.chunks.len() >= limits::REPAIR_CHUNKS_REMEMBERED {
            self.chunks.clear();
        }
        self.chunks.insert(*id, lost);
        Ok(lost)
    }

    /// Stores a blob of the new snapshot (on a dry run, only names it).
    fn put(&mut self, kind: BlobKind, bytes: &[u8]) -> Result<ChunkId> {
        if self.dry_run {
            return Ok(self.writer.hash(bytes));
        }
        Ok(self.writer.store(kind, bytes)?.0)
    }
}

/// What was lost of one repaired snapshot, a line per file and directory.
pub fn describe(repair: &SnapshotRepair) -> Vec<String> {
    let short = repair.original.get(..8).unwrap_or_default();
    let mut lines = vec![];
    for (file, bytes) in &repair.files {
        lines.push(format!("snapshot {short}: {file}: {} lost, restores as zeros", crate::human_size(*bytes)));
    }
    for dir in &repair.dirs {
        lines.push(format!("snapshot {short}: {dir}/: its tree is lost, restores empty"));
    }
    lines
}
