//! Backup: walk the source paths, chunk every segment of every changed file on the cores,
//! build the trees, and commit a snapshot.
//!
//! The walker (the calling thread) stats files and directories and hands segments to the
//! cores through a bounded queue; each core runs a segment to completion (chunk, hash, dedup,
//! compress, pack) and answers with the segment's chunk-list id. Directories are completed in
//! post-order, oldest first, once their files are done; the walker waits only when more than
//! [`limits::PENDING_FILES`] files are in flight, so memory does not grow with the snapshot.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, Metadata as FsMetadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::{bounded, select, Receiver, Sender};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use wire::repo::{ChunkerParams, Snapshot, SnapshotStats};
use wire::tree::{ChunkList, ChunkRef, Metadata, Node, NodeKind, Tree};
use wire::{BlobKind, ChunkId};

use crate::error::{Error, Result};
use crate::events::{Progress, Run, StageBoard};
use crate::fault;
use crate::index::{ChunkIndex, IdBuild, KnownBlobs};
use crate::limits;
use crate::metrics::Stage;
use crate::pipeline::chunker::{self, ChunkPolicy};
use crate::pipeline::pack::{BlobReader, BlobWriter, SealJob, Sealer, WriteStats};
use crate::pipeline::tar::{self, PageRegion};
use crate::repo::{Backend, Repository};
use crate::runtime;
use crate::source::engine::{self, Detected, Engine};
use crate::source::exclude::{self, Excludes};
use crate::source::synth::{self, SynthFile, SynthSpec};
use crate::source::truncated;
use wire::assemble::{self, DirEntry};

mod plan;
mod shard;
mod walker;

pub use plan::{plan, PlanOptions, Planned, ShardCount};
pub use shard::{run_shard, ShardOptions, ShardOutcome};

use walker::Walker;

/// What the user asked for.
pub struct BackupOptions {
    pub source: BackupSource,
    /// Snapshot to compare against; by default the latest of `db`, or without one the latest
    /// with the same host and paths.
    pub parent: Option<String>,
    /// The database this is a backup of (recorded; picks the parent).
    pub db: Option<String>,
    pub cores: usize,
    pub compression_level: i32,
    pub pack_size: u64,
    pub chunking: ChunkingRules,
    /// Longest chain of block deltas for page files; 0 stores every changed block whole.
    pub delta_chain: u32,
    /// What the walk leaves out.
    pub excludes: Excludes,
}

/// What a backup reads.
pub enum BackupSource {
    /// Files and directories.
    Paths(Vec<PathBuf>),
    /// A generated source (`synth://pg?...`).
    Synth(SynthSpec),
    /// Standard input, stored as one file of this name (`--stdin NAME`).
    Stdin(String),
}

/// The chunking of each file: `default`, unless a rule's path is an ancestor of (or is) the
/// file; the rule with the longest path wins.
#[derive(Clone, Debug)]
pub struct ChunkingRules {
    pub default: Chunking,
    pub paths: Vec<(PathBuf, Chunking)>,
}

impl ChunkingRules {
    fn for_path(&self, path: &Path) -> Chunking {
        let rules = self.paths.iter().filter(|(prefix, _)| path.starts_with(prefix));
        rules.max_by_key(|(prefix, _)| prefix.components().count()).map_or(self.default, |(_, c)| *c)
    }

    fn all(&self) -> impl Iterator<Item = Chunking> + '_ {
        std::iter::once(self.default).chain(self.paths.iter().map(|(_, c)| *c))
    }
}

/// Which files are chunked at fixed page-aligned offsets instead of by content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Page chunks for the page files of the database engines [`engine::detect`] recognises
    /// (PostgreSQL relation files, InnoDB tablespaces, SQLite databases), each at its own page
    /// size; content-defined for everything else.
    Auto { chunk: u32 },
    /// Content-defined for every file.
    Cdc,
    /// Page chunks for every file whose length is a multiple of `page`.
    Pages { page: u32, chunk: u32 },
}

/// How one file is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FilePlan {
    policy: ChunkPolicy,
    /// The page size of a page file (or of the page files inside a tar): its page chunks may
    /// be stored as deltas of these pages.
    page: Option<u32>,
    /// The engine `auto` recognised the file as.
    engine: Option<Engine>,
}

impl FilePlan {
    fn content(cdc: ChunkPolicy) -> Self {
        FilePlan { policy: cdc, page: None, engine: None }
    }
}

impl Chunking {
    /// The page size `--page-chunk` must be a multiple of, `None` with `cdc`.
    fn page_size(&self) -> Option<u32> {
        match *self {
            Chunking::Cdc => None,
            Chunking::Pages { page, .. } => Some(page),
            Chunking::Auto { .. } => Some(engine::POSTGRES_PAGE),
        }
    }

    /// How to cut the file at `path`, `len` bytes long and starting with `head` (its first
    /// [`engine::HEAD`] bytes), in a repository of `segment`-byte segments; and why a file
    /// named like a page file is not cut as one.
    fn plan(&self, path: &Path, len: u64, head: &[u8], cdc: ChunkPolicy, segment: u64) -> (FilePlan, Option<String>) {
        let content = FilePlan::content(cdc);
        match *self {
            Chunking::Cdc => (content, None),
            Chunking::Pages { page, chunk } if len.is_multiple_of(u64::from(page)) => {
                (FilePlan { policy: ChunkPolicy::Fixed(chunk), page: Some(page), engine: None }, None)
            }
            Chunking::Pages { .. } => (content, None),
            Chunking::Auto { chunk } => match engine::detect(path, len, head) {
                Detected::Pages { engine, page } => match auto_page_chunk(chunk, page, segment) {
                    Some(chunk) => {
                        (FilePlan { policy: ChunkPolicy::Fixed(chunk), page: Some(page), engine: Some(engine) }, None)
                    }
                    None => {
                        let why = format!(
                            "{} page file with {page}-byte pages, which page chunks of {chunk} bytes in segments of \
                             {segment} cannot hold: chunked by content (give --chunking PATH=pages:{page} \
                             and a --page-chunk that fits)",
                            engine.name()
                        );
                        (content, Some(why))
                    }
                },
                Detected::Other => (content, None),
                Detected::Suspect(why) => (content, Some(why)),
            },
        }
    }

    /// When `first` (a file's first bytes, at least a tar header's worth if it has them) starts
    /// a tar: a scanner for its page files, found as [`Self::plan`] finds PostgreSQL's in a
    /// directory, and the plan of their regions; `None` with `cdc`.
    fn tar_scanner(&self, first: &[u8]) -> Option<(tar::TarScanner<impl Fn(&str) -> bool>, FilePlan)> {
        let (page, chunk, engine) = match *self {
            Chunking::Cdc => return None,
            Chunking::Pages { page, chunk } => (page, chunk, None),
            Chunking::Auto { chunk } => (engine::POSTGRES_PAGE, chunk, Some(Engine::Postgres)),
        };
        tar::is_tar(first).then(|| {
            let scanner = tar::TarScanner::new(u64::from(page), limits::TAR_PAGE_MEMBERS, move |name: &str| {
                engine.is_none() || engine::is_relation_path(Path::new(name))
            });
            (scanner, FilePlan { policy: ChunkPolicy::Fixed(chunk), page: Some(page), engine })
        })
    }
}

/// The page chunk for a page file of `page`-byte pages that `auto` found, given the
/// `--page-chunk` (validated as a multiple of PostgreSQL's page): that chunk when it holds
/// whole pages, else one page when a page holds whole chunks (InnoDB's 32 and 64 KiB pages);
/// `None` when neither fits a segment.
fn auto_page_chunk(chunk: u32, page: u32, segment: u64) -> Option<u32> {
    let chunk = if chunk.is_multiple_of(page) {
        chunk
    } else if page.is_multiple_of(chunk) {
        page
    } else {
        return None;
    };
    (chunk <= wire::limits::MAX_CHUNK_SIZE && segment.is_multiple_of(u64::from(chunk))).then_some(chunk)
}

/// A committed backup.
pub struct BackupOutcome {
    pub snapshot_id: ChunkId,
    pub snapshot: Snapshot,
    /// Files that changed while they were read (warned about; stored as read).
    pub files_changed: u64,
    /// Files read that `auto` cut as pages, by engine (unchanged files are not read).
    pub page_files: BTreeMap<Engine, u64>,
    /// Entries (files and directories, not what is below them) that exclusions left out.
    pub excluded: u64,
    /// Per-stage latency percentiles, merged and per core (`metrics::StageHistograms`).
    pub stage_latency: serde_json::Value,
}

/// State the cores share: read-only but for the claim set.
struct Shared {
    repo: Repository,
    known: Arc<KnownBlobs>,
    pack_size: u64,
    level: i32,
    /// Cores count bytes as they go (once per window); the walker counts files.
    progress: Arc<Progress>,
    /// Block deltas for the page chunks of changed files, when enabled: the longest chain
    /// (a block whose parent is this deep is stored whole again, re-based).
    deltas: Option<u32>,
    /// Where the cores publish their stage latencies while they run.
    board: Arc<StageBoard>,
    run: Run,
    /// A shard of a job: each segment's packs are closed when it ends, and its answer says
    /// what it added and which blobs it waits on, so it can be checkpointed once durable.
    checkpointing: bool,
}

/// Where a segment's bytes come from.
#[derive(Clone)]
enum SegmentSource {
    /// A mapped source file; unmapped when the last of its segments is done.
    Mapped(Arc<Mmap>),
    /// A generated file, produced window by window on the core.
    Synth(Arc<SynthSpec>, Arc<SynthFile>),
    /// A segment of a stream, in pieces from the walker as it reads them; the channel's end is
    /// the segment's. With `regions` in the job, the page regions come with the pieces.
    Stream(Receiver<StreamPiece>),
}

/// Bytes of a streamed segment, and the page regions (of a tar stream) that the walker found
/// up to and in them and the segment has not had yet.
struct StreamPiece {
    bytes: Vec<u8>,
    regions: Vec<PageRegion>,
}

struct SegmentJob {
    source: SegmentSource,
    policy: ChunkPolicy,
    /// See [`FilePlan::page`].
    page: Option<u32>,
    /// The parent snapshot's chunk list for this segment of the file, if it had one.
    previous: Option<ChunkId>,
    /// Page files inside a tar: cut by [`chunker::region_cuts`] with `policy`'s chunk size.
    regions: Option<Arc<[PageRegion]>>,
    file: usize,
    segment: usize,
    offset: usize,
    len: usize,
}

struct SegmentDone {
    file: usize,
    segment: usize,
    result: Result<SegmentSummary>,
}

struct SegmentSummary {
    list: ChunkId,
    bytes: u64,
    chunks: u64,
    /// With [`Shared::checkpointing`]: what the segment added, and the blobs it references
    /// (the list and its non-zero chunks), durable once none is claimed any more.
    added: wire::job::CheckpointStats,
    refs: Vec<ChunkId>,
}

/// Runs a backup into `repo` and commits its snapshot.
///
/// Its events (progress, warnings, stage latencies) go to `run.events`; raising `run.cancel`
/// stops it at the next segment or file: nothing is committed, and what it made durable is
/// reused by the next backup.
pub fn backup(repo: Repository, opts: &BackupOptions, run: &Run) -> Result<BackupOutcome> {
    let lock = repo.lock()?;
    lock.clean_tmp()?;
    truncated::install();
    // On failure, give back the space of packs that were never sealed (a full disk, most often).
    backup_locked(repo, opts, run).inspect_err(|_| {
        let _ = lock.clean_tmp();
    })
}

fn backup_locked(repo: Repository, opts: &BackupOptions, run: &Run) -> Result<BackupOutcome> {
    let started = Instant::now();
    let paths = match &opts.source {
        BackupSource::Synth(_) if !repo.config.segment_size.is_multiple_of(synth::PAGE as u64) => {
            return Err(Error::Usage("synth:// sources need a segment size that is a multiple of 8 KiB".into()))
        }
        BackupSource::Synth(_) | BackupSource::Stdin(_) => vec![],
        BackupSource::Paths(paths) => canonical_sources(paths)?,
    };
    let path_strings: Vec<String> = match &opts.source {
        BackupSource::Synth(spec) => vec![spec.source_name()],
        BackupSource::Stdin(name) => vec![format!("/{}", stdin_name(name)?)],
        BackupSource::Paths(_) => paths.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
    };
    let host = crate::source::hostname();
    if let Some(db) = opts.db.as_deref().filter(|db| !wire::repo::is_db_name(db)) {
        return Err(Error::Usage(format!(
            "--db {db:?}: a database name is 1 to {} bytes without control characters",
            wire::repo::MAX_SNAPSHOT_TEXT
        )));
    }
    let parent = repo.find_parent(opts.parent.as_deref(), &host, &path_strings, opts.db.as_deref())?;
    check_chunking(&opts.chunking, repo.config.segment_size)?;
    if !(limits::MIN_PACK_SIZE..=limits::MAX_PACK_SIZE).contains(&opts.pack_size) {
        return Err(Error::Usage(format!(
            "--pack-size must be {} to {}",
            crate::human_size(limits::MIN_PACK_SIZE),
            crate::human_size(limits::MAX_PACK_SIZE)
        )));
    }
    let index = ChunkIndex::load(&*repo.store)?;
    index.compact(&*repo.store)?;
    let board = Arc::new(StageBoard::new(opts.cores, run.every));
    let mut phase = run.phase("backup", Some(Arc::clone(&board)));
    let progress = Arc::clone(&phase.progress);
    // A delta needs the parent's block: one read from local packs, but a round trip to a
    // receiver, so backups through a receiver store changed blocks whole.
    let deltas = (opts.delta_chain > 0).then_some(opts.delta_chain);
    let shared = Arc::new(Shared {
        repo,
        known: Arc::new(KnownBlobs::new(index)),
        pack_size: opts.pack_size,
        level: opts.compression_level,
        progress: Arc::clone(&progress),
        deltas,
        board,
        run: run.clone(),
        checkpointing: false,
    });

    let CorePool { jobs: job_tx, done: done_rx, sealer, cores } = start_cores(&shared, opts.cores)?;

    match &opts.source {
        BackupSource::Synth(spec) => progress.set_total(spec.files().iter().map(SynthFile::len).sum()),
        // A stream's length is known at its end.
        BackupSource::Stdin(_) => {}
        BackupSource::Paths(_) => {
            let (paths, progress) = (paths.clone(), Arc::clone(&progress));
            std::thread::spawn(move || progress.set_total(paths.iter().map(|p| scan_size(p)).sum()));
        }
    }
    let tree_writer = BlobWriter::new(&shared.repo, &shared.known, sealer.sender(), shared.pack_size, shared.level)?;
    let reader = BlobReader::new(&shared.repo, shared.known.index())?;
    let mut walker = Walker::new(&shared, tree_writer, reader, (job_tx, done_rx), opts, run);
    let parent_tree = parent.as_ref().map(|(_, snap)| snap.tree_id());
    if let (Some((_, snap)), BackupSource::Paths(_)) = (&parent, &opts.source) {
        walker.reroot(&paths, &path_strings, snap)?;
    }
    let walked = walker.walk(parent_tree, |walker, parent| match &opts.source {
        BackupSource::Synth(spec) => walker.walk_synth(spec, parent),
        BackupSource::Stdin(name) => walker.walk_stdin(name, parent),
        BackupSource::Paths(_) => walker.walk_sources(&paths, parent),
    });
    let Walker { tree_writer, jobs, done, mut stats, files_changed, page_files, excluded, .. } = walker;
    // Closing the queue lets the cores close their packs and stop; draining the answers keeps
    // a core from blocking on a send when the walk stopped early. Every pack closed is made
    // durable before this returns, on success and on error alike.
    drop(jobs);
    for _ in done.iter() {}
    let core_results = cores.join();
    let tree_written = tree_writer.finish();
    let sealed = sealer.finish();
    let root = walked?;
    let mut written = tree_written?;
    let mut per_core = vec![];
    for r in core_results? {
        let core = r?;
        per_core.push(core.stages.to_json());
        written.add(&core);
    }
    sealed?;
    phase.finish();

    stats.bytes_new = written.bytes_new;
    stats.chunks_new = written.chunks_new;
    stats.bytes_stored = written.bytes_stored;
    stats.duration_s = started.elapsed().as_secs_f64();
    let snapshot = Snapshot {
        version: wire::repo::VERSION,
        time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        host,
        paths: path_strings,
        tree: root.to_hex(),
        parent: parent.map(|(id, _)| id.to_hex()),
        stats,
        repaired: None,
        db: opts.db.clone(),
        job: None,
    };
    let snapshot_id = shared.repo.commit_snapshot(&snapshot)?;
    // The snapshot stands on its own: a merge that fails only leaves more runs to read.
    if let Err(e) = shared.known.index().compact_all(&*shared.repo.store) {
        run.warn(Path::new(&format!("{}/index", shared.repo.location())), &format!("index runs not merged: {e}"));
    }
    let stage_latency = serde_json::json!({"all": written.stages.to_json(), "cores": per_core});
    Ok(BackupOutcome { snapshot_id, snapshot, files_changed, page_files, excluded, stage_latency })
}

/// Checks every page chunk the rules give against the repository's segment size and the
/// format's bounds.
fn check_chunking(rules: &ChunkingRules, segment_size: u64) -> Result<()> {
    for chunking in rules.all() {
        let (Chunking::Auto { chunk } | Chunking::Pages { chunk, .. }, Some(page)) = (chunking, chunking.page_size())
        else {
            continue;
        };
        if chunk == 0
            || !chunk.is_multiple_of(page)
            || !segment_size.is_multiple_of(u64::from(chunk))
            || chunk > wire::limits::MAX_CHUNK_SIZE
        {
            return Err(Error::Usage(format!(
                "--page-chunk {chunk}: must be a multiple of the page size {page}, divide the segment size {}, and be at most {}",
                segment_size,
                wire::limits::MAX_CHUNK_SIZE
            )));
        }
        let per_segment = segment_size / u64::from(chunk);
        if per_segment > u64::from(wire::limits::MAX_CHUNK_LIST_ENTRIES) {
            return Err(Error::Usage(format!(
                "--page-chunk {chunk}: a segment of {} would be {per_segment} chunks, more than the {} one chunk list holds; \
                 give a larger --page-chunk (or a repository with smaller segments)",
                crate::human_size(segment_size),
                wire::limits::MAX_CHUNK_LIST_ENTRIES
            )));
        }
    }
    Ok(())
}

/// The cores of one backup at work: where segments go (bounded), where their answers come from,
/// the sealer their packs go to.
struct CorePool {
    jobs: Sender<SegmentJob>,
    done: Receiver<SegmentDone>,
    sealer: Sealer,
    cores: runtime::Cores<Result<WriteStats>>,
}

/// Starts `cores` cores on `shared`'s work, and their sealer.
fn start_cores(shared: &Arc<Shared>, cores: usize) -> Result<CorePool> {
    let depth = cores * limits::SEGMENT_QUEUE_PER_CORE;
    let (job_tx, job_rx) = bounded::<SegmentJob>(depth);
    let (done_tx, done_rx) = bounded::<SegmentDone>(depth);
    let sealer = Sealer::start(Arc::clone(&shared.known));
    let (shared, seal_tx) = (Arc::clone(shared), sealer.sender());
    let cores = runtime::spawn(cores, move |core| run_core(&shared, core, &job_rx, &done_tx, seal_tx.clone()))?;
    Ok(CorePool { jobs: job_tx, done: done_rx, sealer, cores })
}

/// One core: take segments until the queue closes, then seal the open pack.
fn run_core(
    shared: &Shared,
    core: usize,
    jobs: &Receiver<SegmentJob>,
    done: &Sender<SegmentDone>,
    sealer: Sender<SealJob>,
) -> Result<WriteStats> {
    let mut writer = BlobWriter::new(&shared.repo, &shared.known, sealer, shared.pack_size, shared.level)?;
    let mut reader = BlobReader::new(&shared.repo, shared.known.index())?;
    let mut window = Vec::new();
    let mut previous = PreviousChunks::new(shared.known.index(), &*shared.repo.backend);
    let cdc = shared.repo.config.chunker;
    let mut deltas = shared.deltas.map(BlockDeltas::new);
    let mut stages = shared.board.publisher(core);
    for job in jobs.iter() {
        let result = if shared.run.cancel.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            previous.load(&mut reader, job.previous);
            let page = job.page.filter(|&p| wire::delta::valid_page_size(p));
            let base = deltas.as_mut().zip(page).map(|(d, page)| (d, page, &mut reader));
            let before = (writer.stats().bytes_new, writer.stats().chunks_new, writer.stats().bytes_stored);
            let done = backup_segment(&mut writer, &job, &previous, base, cdc, &mut window, shared);
            done.and_then(|(mut summary, list)| {
                if shared.checkpointing {
                    writer.flush()?;
                    let s = writer.stats();
                    summary.added = wire::job::CheckpointStats {
                        bytes_new: s.bytes_new - before.0,
                        chunks_new: s.chunks_new - before.1,
                        bytes_stored: s.bytes_stored - before.2,
                    };
                    summary.refs = list.chunks.iter().filter(|c| !c.zero).map(|c| c.id).chain([summary.list]).collect();
                }
                Ok(summary)
            })
        };
        stages.maybe_publish(&writer.stats().stages);
        let answer = SegmentDone { file: job.file, segment: job.segment, result };
        if done.send(answer).is_err() {
            break;
        }
    }
    let finished = writer.finish();
    if let Ok(stats) = &finished {
        stages.publish(&stats.stages);
    }
    finished
}

/// Chunks, hashes, dedups, compresses and packs one segment; stores its chunk list, and returns
/// it with the summary.
fn backup_segment(
    writer: &mut BlobWriter<'_>,
    job: &SegmentJob,
    previous: &PreviousChunks<'_>,
    mut deltas: Option<(&mut BlockDeltas, u32, &mut BlobReader<'_>)>,
    cdc: ChunkerParams,
    window: &mut Vec<u8>,
    shared: &Shared,
) -> Result<(SegmentSummary, ChunkList)> {
    // Every source read is counted for the progress, and goes through the read cap.
    let (progress, reads) = (&*shared.progress, &*shared.run.reads);
    let mut list = ChunkList::default();
    // A stream's segment is as long as what came; every other is `job.len`.
    let mut streamed = job.len;
    // The time between two chunks reaching `store` is the time to find the next cut point,
    // reading (or generating) the source bytes included.
    let mut cut_started = Instant::now();
    let mut offset = 0u64;
    // How far this part of the segment moved since the parent, learned from unchanged chunks.
    let mut moved = 0i64;
    let mut store = |chunk: &[u8]| -> Result<()> {
        writer.stats().stages.record(Stage::Chunk, cut_started.elapsed());
        let id = if chunker::is_zero(chunk) {
            ChunkId::default()
        } else {
            let id = writer.hash(chunk);
            if previous.has(&id) {
                if deltas.is_some() {
                    moved = previous.moved(&id, offset, chunk.len()).unwrap_or(moved);
                }
            } else {
                // The parent's version of this block: where its data was before it moved.
                let was = u64::try_from(offset as i64 - moved).ok();
                let parent = deltas.as_mut().zip(was.and_then(|was| previous.at(was, chunk.len())));
                match parent {
                    Some(((deltas, page, reader), base)) => {
                        // Held, and stored once its base is read ahead with others'.
                        if writer.claim(&id)? {
                            deltas.hold(writer, reader, *page, (id, base, chunk))?;
                        }
                    }
                    None => {
                        writer.store_with_id(id, BlobKind::Data, chunk)?;
                    }
                }
            }
            id
        };
        list.chunks.push(ChunkRef { id, len: chunk.len() as u32, zero: id == ChunkId::default() });
        offset += chunk.len() as u64;
        cut_started = Instant::now();
        Ok(())
    };
    match &job.source {
        SegmentSource::Mapped(map) => {
            // A file truncated meanwhile reads as zeros past its new end instead of killing the
            // process; the walker's check after the file names it (see `source::truncated`).
            truncated::reading(map, || -> Result<()> {
                let data = &map[job.offset..job.offset + job.len];
                let (mut released, mut fetched) = (0, 0);
                let cuts: Box<dyn Iterator<Item = (usize, usize)>> = match (&job.regions, job.policy) {
                    (Some(regions), ChunkPolicy::Fixed(chunk)) => {
                        Box::new(chunker::region_cuts(data, job.offset as u64, regions, chunk, cdc).into_iter())
                    }
                    _ => Box::new(chunker::cuts(data, job.policy)),
                };
                for (off, len) in cuts {
                    while off + len > fetched {
                        let n = limits::MAPPED_WINDOW.min(job.len - fetched);
                        reads.fetch(&data[fetched..fetched + n]);
                        fetched += n;
                    }
                    // A private copy: another process may write the file while it is mapped,
                    // and the id, the compressed bytes and a delta must all come from the same
                    // bytes (hashing and compressing the mapping itself once stored a blob that
                    // did not match its id).
                    window.clear();
                    window.extend_from_slice(&data[off..off + len]);
                    store(window)?;
                    if off + len - released >= limits::MAPPED_WINDOW {
                        release_pages(map, job.offset + released, off + len - released);
                        progress.add((off + len - released) as u64, 0);
                        released = off + len;
                    }
                }
                release_pages(map, job.offset + released, job.len - released);
                progress.add((job.len - released) as u64, 0);
                Ok(())
            })?;
        }
        SegmentSource::Synth(spec, file) => {
            let fill = |offset: usize, buf: &mut [u8]| {
                let n = reads.read(|| {
                    let n = buf.len().min(job.len - offset);
                    spec.fill(file, (job.offset + offset) as u64, &mut buf[..n]);
                    n
                });
                progress.add(n as u64, 0);
                n
            };
            let cut = |_: usize, data: &[u8]| chunker::cuts(data, job.policy).collect();
            chunker::chunk_stream(synth::PAGE, job.policy.max_len(), window, fill, cut, &mut store)?;
        }
        SegmentSource::Stream(pieces) => {
            let regions = std::cell::RefCell::new(Vec::new());
            let (mut piece, mut used) = (Vec::new(), 0);
            let fill = |_: usize, buf: &mut [u8]| {
                let n = reads.read(|| {
                    let mut n = 0;
                    while n < buf.len() {
                        if used == piece.len() {
                            let Ok(next) = pieces.recv() else { break };
                            regions.borrow_mut().extend(next.regions);
                            (piece, used) = (next.bytes, 0);
                            continue;
                        }
                        let take = (buf.len() - n).min(piece.len() - used);
                        buf[n..n + take].copy_from_slice(&piece[used..used + take]);
                        (n, used) = (n + take, used + take);
                    }
                    n
                });
                progress.add(n as u64, 0);
                n
            };
            let cut = |start: usize, data: &[u8]| match (&job.regions, job.policy) {
                (Some(_), ChunkPolicy::Fixed(chunk)) => {
                    chunker::region_cuts(data, (job.offset + start) as u64, &regions.borrow(), chunk, cdc)
                }
                (_, policy) => chunker::cuts(data, policy).collect(),
            };
            streamed = chunker::chunk_stream(1, job.policy.max_len(), window, fill, cut, &mut store)?;
        }
    }
    if let Some((deltas, page, reader)) = deltas.as_mut() {
        deltas.store_held(writer, reader, *page)?;
    }
    fault::point("segment");
    let (list_id, _) = writer.store(BlobKind::ChunkList, &list.encode())?;
    let summary = SegmentSummary {
        list: list_id,
        bytes: streamed as u64,
        chunks: list.chunks.len() as u64,
        added: Default::default(),
        refs: vec![],
    };
    Ok((summary, list))
}

/// The chunks of a segment in the parent snapshot. They are in the repository already (the
/// parent is committed), so the bulk of a changed database file, whose unchanged pages chunk
/// exactly as before, needs no index lookup on disk.
struct PreviousChunks<'a> {
    index: &'a ChunkIndex,
    backend: &'a dyn Backend,
    list: Option<ChunkId>,
    /// Each non-zero chunk and where it started in the segment.
    ids: HashMap<ChunkId, u64, IdBuild>,
    /// Where each non-zero chunk started, in order, and its length.
    starts: Vec<(u64, u32, ChunkId)>,
    buf: Vec<u8>,
}

impl<'a> PreviousChunks<'a> {
    fn new(index: &'a ChunkIndex, backend: &'a dyn Backend) -> Self {
        Self { index, backend, list: None, ids: HashMap::default(), starts: Vec::new(), buf: Vec::new() }
    }

    /// The parent's chunk of `len` bytes at `offset` of the segment, if it had one there.
    fn at(&self, offset: u64, len: usize) -> Option<ChunkId> {
        let i = self.starts.binary_search_by_key(&offset, |s| s.0).ok()?;
        let (_, parent_len, id) = self.starts[i];
        (parent_len as usize == len).then_some(id)
    }

    /// How far the data around unchanged chunk `id`, found at `offset`, moved since the
    /// parent: 0 when the parent had it at the same place (checked first, so a duplicate
    /// elsewhere does not mislead), else the distance to where the parent had it. Members of
    /// a tar move when a member before them grew.
    fn moved(&self, id: &ChunkId, offset: u64, len: usize) -> Option<i64> {
        if self.at(offset, len) == Some(*id) {
            return Some(0);
        }
        self.ids.get(id).map(|&was| offset as i64 - was as i64)
    }

    /// Whether the parent had chunk `id` in this segment and the repository may still have it
    /// (memory only; a chunk whose index entry was lost is stored again, as the reuse of
    /// unchanged files requires their chunk lists to be indexed).
    fn has(&self, id: &ChunkId) -> bool {
        self.ids.contains_key(id) && self.backend.may_have(self.index, id)
    }

    fn load(&mut self, reader: &mut BlobReader<'_>, list: Option<ChunkId>) {
        if list == self.list {
            return;
        }
        self.ids.clear();
        self.starts.clear();
        self.list = list;
        let Some(id) = list else { return };
        // An unreadable parent list only means more lookups: the index still decides.
        if reader.read(&id, &mut self.buf).is_ok() {
            if let Ok(l) = ChunkList::decode(&self.buf) {
                let mut offset = 0;
                for c in &l.chunks {
                    if !c.zero {
                        self.starts.push((offset, c.len, c.id));
                        self.ids.entry(c.id).or_insert(offset);
                    }
                    offset += u64::from(c.len);
                }
            }
        }
    }
}

/// One core's block-delta encoder: reads a block's parent version and encodes the difference.
struct BlockDeltas {
    /// Longest chain.
    chain: u32,
    base: Vec<u8>,
    delta: Vec<u8>,
    /// Changed blocks held until their parent versions are read ahead in one go (one request
    /// per level of their chains through a receiver): each one's id (claimed), its parent
    /// version's id, and where its bytes are in `held`.
    waiting: Vec<(ChunkId, ChunkId, std::ops::Range<usize>)>,
    held: Vec<u8>,
}

impl BlockDeltas {
    fn new(chain: u32) -> Self {
        Self { chain, base: Vec::new(), delta: Vec::new(), waiting: Vec::new(), held: Vec::new() }
    }

    /// Holds changed `block` (claimed as `id`) whose parent version is `base`; stores what is
    /// held once it reaches [`limits::DELTA_BATCH`] bytes. Where a read costs no round trip
    /// the block is stored at once (holding it would only copy it).
    fn hold(
        &mut self,
        writer: &mut BlobWriter<'_>,
        reader: &mut BlobReader<'_>,
        page: u32,
        (id, base, block): (ChunkId, ChunkId, &[u8]),
    ) -> Result<()> {
        if !reader.reads_ahead() {
            return self.store_one(writer, reader, page, (id, base, block));
        }
        let start = self.held.len();
        self.held.extend_from_slice(block);
        self.waiting.push((id, base, start..self.held.len()));
        if self.held.len() >= limits::DELTA_BATCH {
            self.store_held(writer, reader, page)?;
        }
        Ok(())
    }

    /// Stores `block` as a delta of `base`, or whole.
    fn store_one(
        &mut self,
        writer: &mut BlobWriter<'_>,
        reader: &mut BlobReader<'_>,
        page: u32,
        (id, base, block): (ChunkId, ChunkId, &[u8]),
    ) -> Result<()> {
        match self.encode(reader, page, base, block) {
            Some(delta) => writer.store_claimed(id, BlobKind::Delta, delta),
            None => writer.store_claimed(id, BlobKind::Data, block),
        }
    }

    /// Reads the held blocks' bases ahead, then stores each block as a delta of its base, or
    /// whole.
    fn store_held(&mut self, writer: &mut BlobWriter<'_>, reader: &mut BlobReader<'_>, page: u32) -> Result<()> {
        let bases: Vec<ChunkId> = self.waiting.iter().map(|(_, base, _)| *base).collect();
        reader.prefetch_blocks(&bases);
        let (waiting, held) = (std::mem::take(&mut self.waiting), std::mem::take(&mut self.held));
        for (id, base, range) in &waiting {
            self.store_one(writer, reader, page, (*id, *base, &held[range.clone()]))?;
        }
        reader.forget_prefetched();
        // The buffers are kept for the next batch.
        (self.waiting, self.held) = (waiting, held);
        self.waiting.clear();
        self.held.clear();
        Ok(())
    }

    /// The delta of `block` against its parent version `base`, or `None` when it is to be
    /// stored whole: the parent is unreadable or as deep as the chain may go (re-basing), the
    /// block is not made of whole pages, or too much of it changed for a delta to pay.
    fn encode(&mut self, reader: &mut BlobReader<'_>, page: u32, base: ChunkId, block: &[u8]) -> Option<&[u8]> {
        if !block.len().is_multiple_of(page as usize) {
            return None;
        }
        self.base.clear();
        let depth = reader.read_block(&base, &mut self.base).ok()?;
        if depth >= self.chain || self.base.len() != block.len() {
            return None;
        }
        let diff = wire::delta::encode(base, depth + 1, page, &self.base, block, &mut self.delta);
        (diff.bytes * limits::DELTA_MAX_CHANGED_FRACTION <= block.len()).then_some(&self.delta[..])
    }
}

/// Drops pages that were read and are not needed again from this process's page tables, so RSS
/// stays at one window per core; the page cache keeps them if it wants. Segments start at
/// multiples of the page size, so only the start may need rounding up.
fn release_pages(map: &Mmap, offset: usize, len: usize) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = offset.next_multiple_of(page);
    let end = offset + len;
    if end > start {
        // SAFETY: nothing reads this range of the private read-only mapping again.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Absolute, symlink-free source paths, sorted, with those inside another source dropped.
/// The file name `--stdin` stores the stream as: one path component.
fn stdin_name(name: &str) -> Result<&str> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0');
    if ok && name.len() <= 255 {
        Ok(name)
    } else {
        Err(Error::Usage(format!("--stdin {name:?}: the stream's file name must be one path component (no '/')")))
    }
}

fn canonical_sources(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        return Err(Error::Usage("give at least one path to back up".into()));
    }
    let mut out = vec![];
    for p in paths {
        let c = fs::canonicalize(p).map_err(|e| Error::NotFound(format!("source {}: {e}", p.display())))?;
        debug_assert!(matches!(c.components().next(), Some(Component::RootDir)));
        out.push(c);
    }
    out.sort();
    out.dedup();
    let all = out.clone();
    out.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    Ok(out)
}

/// Nanoseconds since the epoch in the format's 64 bits (1677 to 2262); a time outside is
/// stored as the nearest end of that range rather than wrapped (2300 read back as 1901).
fn time_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Tree metadata from `lstat`.
pub fn metadata(md: &FsMetadata) -> Metadata {
    Metadata {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: if md.is_file() { md.len() } else { 0 },
        mtime_ns: time_ns(md.mtime(), md.mtime_nsec()),
        ctime_ns: time_ns(md.ctime(), md.ctime_nsec()),
        inode: md.ino(),
        dev: md.dev(),
    }
}

/// Sum of regular file sizes under `path`, for the progress bar's total.
fn scan_size(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            fs::read_dir(path).map(|rd| rd.filter_map(|e| e.ok()).map(|e| scan_size(&e.path())).sum()).unwrap_or(0)
        }
        Ok(md) if md.is_file() => md.len(),
        _ => 0,
    }
}
