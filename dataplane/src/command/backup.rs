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
    for chunking in opts.chunking.all() {
        let (Chunking::Auto { chunk } | Chunking::Pages { chunk, .. }, Some(page)) = (chunking, chunking.page_size())
        else {
            continue;
        };
        if chunk == 0
            || !chunk.is_multiple_of(page)
            || !repo.config.segment_size.is_multiple_of(u64::from(chunk))
            || chunk > wire::limits::MAX_CHUNK_SIZE
        {
            return Err(Error::Usage(format!(
                "--page-chunk {chunk}: must be a multiple of the page size {page}, divide the segment size {}, and be at most {}",
                repo.config.segment_size,
                wire::limits::MAX_CHUNK_SIZE
            )));
        }
        let per_segment = repo.config.segment_size / u64::from(chunk);
        if per_segment > u64::from(wire::limits::MAX_CHUNK_LIST_ENTRIES) {
            return Err(Error::Usage(format!(
                "--page-chunk {chunk}: a segment of {} would be {per_segment} chunks, more than the {} one chunk list holds; \
                 give a larger --page-chunk (or a repository with smaller segments)",
                crate::human_size(repo.config.segment_size),
                wire::limits::MAX_CHUNK_LIST_ENTRIES
            )));
        }
    }
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
    });

    let depth = opts.cores * limits::SEGMENT_QUEUE_PER_CORE;
    let (job_tx, job_rx) = bounded::<SegmentJob>(depth);
    let (done_tx, done_rx) = bounded::<SegmentDone>(depth);
    let sealer = Sealer::start(Arc::clone(&shared.known));
    let cores = {
        let (shared, seal_tx) = (Arc::clone(&shared), sealer.sender());
        runtime::spawn(opts.cores, move |core| run_core(&shared, core, &job_rx, &done_tx, seal_tx.clone()))?
    };

    match &opts.source {
        BackupSource::Synth(spec) => progress.set_total(spec.files().iter().map(SynthFile::len).sum()),
        // A stream's length is known at its end.
        BackupSource::Stdin(_) => {}
        BackupSource::Paths(_) => {
            let (paths, progress) = (paths.clone(), Arc::clone(&progress));
            std::thread::spawn(move || progress.set_total(paths.iter().map(|p| scan_size(p)).sum()));
        }
    }
    let mut walker = Walker {
        shared: &shared,
        tree_writer: BlobWriter::new(&shared.repo, &shared.known, sealer.sender(), shared.pack_size, shared.level)?,
        reader: BlobReader::new(&shared.repo, shared.known.index())?,
        jobs: job_tx,
        done: done_rx,
        files: HashMap::new(),
        next_slot: 0,
        dirs_done: HashMap::new(),
        pending: VecDeque::new(),
        pending_files: 0,
        stats: SnapshotStats::default(),
        files_changed: 0,
        page_files: BTreeMap::new(),
        excludes: opts.excludes.clone(),
        postgres_data: vec![],
        excluded: 0,
        run,
        chunking: opts.chunking.clone(),
        cdc: ChunkPolicy::Cdc(shared.repo.config.chunker),
        confirmed: HashSet::default(),
        subtrees: HashMap::new(),
        rerooted: HashMap::new(),
    };
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
    };
    let snapshot_id = shared.repo.commit_snapshot(&snapshot)?;
    // The snapshot stands on its own: a merge that fails only leaves more runs to read.
    if let Err(e) = shared.known.index().compact_all(&*shared.repo.store) {
        run.warn(Path::new(&format!("{}/index", shared.repo.location())), &format!("index runs not merged: {e}"));
    }
    let stage_latency = serde_json::json!({"all": written.stages.to_json(), "cores": per_core});
    Ok(BackupOutcome { snapshot_id, snapshot, files_changed, page_files, excluded, stage_latency })
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
            backup_segment(&mut writer, &job, &previous, base, cdc, &mut window, &shared.progress)
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

/// Chunks, hashes, dedups, compresses and packs one segment; stores its chunk list.
fn backup_segment(
    writer: &mut BlobWriter<'_>,
    job: &SegmentJob,
    previous: &PreviousChunks<'_>,
    mut deltas: Option<(&mut BlockDeltas, u32, &mut BlobReader<'_>)>,
    cdc: ChunkerParams,
    window: &mut Vec<u8>,
    progress: &Progress,
) -> Result<SegmentSummary> {
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
                let mut released = 0;
                let cuts: Box<dyn Iterator<Item = (usize, usize)>> = match (&job.regions, job.policy) {
                    (Some(regions), ChunkPolicy::Fixed(chunk)) => {
                        Box::new(chunker::region_cuts(data, job.offset as u64, regions, chunk, cdc).into_iter())
                    }
                    _ => Box::new(chunker::cuts(data, job.policy)),
                };
                for (off, len) in cuts {
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
                let n = buf.len().min(job.len - offset);
                spec.fill(file, (job.offset + offset) as u64, &mut buf[..n]);
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
    Ok(SegmentSummary { list: list_id, bytes: streamed as u64, chunks: list.chunks.len() as u64 })
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

/// The walker's bookkeeping for a file whose segments are on the cores.
struct FileInFlight {
    segments: Vec<Option<ChunkId>>,
    left: usize,
    /// A file on disk, checked again once read: a file that changed meanwhile may be torn.
    path: Option<PathBuf>,
}

enum PendingNode {
    Done(Node),
    File { name: Vec<u8>, meta: Metadata, slot: usize },
    Dir { name: Vec<u8>, meta: Metadata, slot: usize },
}

struct PendingDir {
    slot: usize,
    /// For messages: where the directory is in the source.
    path: PathBuf,
    nodes: Vec<PendingNode>,
}

/// How starting a file went: the slot of its segments in flight, `None` for an empty file, or
/// why the source file can't be read.
type Started = std::result::Result<Option<usize>, String>;

/// A directory of a generated source.
#[derive(Default)]
struct SynthDir {
    dirs: BTreeMap<String, SynthDir>,
    files: Vec<(String, Arc<SynthFile>)>,
}

/// The source paths as a tree of names: a `Leaf` is backed up whole, an `Inner` node is an
/// ancestor recorded only so that restore can recreate the full path.
enum Source {
    Leaf,
    Inner(BTreeMap<OsString, Source>),
}

struct Walker<'a> {
    shared: &'a Shared,
    tree_writer: BlobWriter<'a>,
    reader: BlobReader<'a>,
    jobs: Sender<SegmentJob>,
    done: Receiver<SegmentDone>,
    files: HashMap<usize, FileInFlight>,
    next_slot: usize,
    dirs_done: HashMap<usize, ChunkId>,
    pending: VecDeque<PendingDir>,
    pending_files: usize,
    stats: SnapshotStats,
    /// Files that changed while they were read.
    files_changed: u64,
    /// Files read that `auto` cut as pages, by engine.
    page_files: BTreeMap<Engine, u64>,
    excludes: Excludes,
    /// PostgreSQL data directories the walk is inside of, innermost last.
    postgres_data: Vec<PathBuf>,
    /// Entries that exclusions left out.
    excluded: u64,
    run: &'a Run,
    chunking: ChunkingRules,
    /// The repository's content-defined policy.
    cdc: ChunkPolicy,
    /// Remote repository: chunk lists of the parent's files in the directories being walked
    /// that the receiver says it has (one `Have` per directory rather than one per file).
    confirmed: HashSet<ChunkId, IdBuild>,
    /// Remote repository: the parent trees of the subdirectories of the directories being
    /// walked, fetched in one stream per directory (taken as the walk enters each).
    subtrees: HashMap<PathBuf, Tree>,
    /// Source roots whose parent files lie under another path (a new directory per backup):
    /// the parent's node at its paired root, taken as the walk reaches the root.
    rerooted: HashMap<PathBuf, Node>,
}

impl Walker<'_> {
    /// Pairs the source roots with the parent's (`wire::repo::pair_roots`), so that a root
    /// whose path differs from its parent's still finds the parent's files below it.
    fn reroot(&mut self, paths: &[PathBuf], names: &[String], parent: &Snapshot) -> Result<()> {
        for (i, j) in wire::repo::pair_roots(names, &parent.paths) {
            if names[i] == parent.paths[j] {
                continue;
            }
            if let Some(node) = self.parent_node(&parent.tree_id(), &parent.paths[j])? {
                self.rerooted.insert(paths[i].clone(), node);
            }
        }
        Ok(())
    }

    /// The node at absolute `path` in the snapshot whose root tree is `root`.
    fn parent_node(&mut self, root: &ChunkId, path: &str) -> Result<Option<Node>> {
        let mut tree = self.load_tree(root)?;
        let names: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (k, name) in names.iter().enumerate() {
            let Some(node) = tree.find(name.as_bytes()).cloned() else { return Ok(None) };
            if k + 1 == names.len() {
                return Ok(Some(node));
            }
            match node.kind {
                NodeKind::Dir { tree: sub } => tree = self.load_tree(&sub)?,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Walks a source with `walk_root` (given the parent snapshot's root tree), completes every
    /// directory, and returns the root tree's id.
    fn walk(
        &mut self,
        parent: Option<ChunkId>,
        walk_root: impl FnOnce(&mut Self, Option<&Tree>) -> Result<usize>,
    ) -> Result<ChunkId> {
        let parent = match parent {
            Some(id) => Some(self.load_tree(&id)?),
            None => None,
        };
        let slot = walk_root(self, parent.as_ref())?;
        while !self.pending.is_empty() {
            self.complete_oldest_dir()?;
        }
        Ok(self.dirs_done.remove(&slot).expect("the root is completed last"))
    }

    /// The root directory of the source paths; returns its slot.
    fn walk_sources(&mut self, paths: &[PathBuf], parent: Option<&Tree>) -> Result<usize> {
        let mut root = Source::Inner(BTreeMap::new());
        for p in paths {
            let names: Vec<OsString> = p.components().skip(1).map(|c| c.as_os_str().to_owned()).collect();
            insert_source(&mut root, &names);
        }
        match &root {
            Source::Leaf => self.walk_dir(Path::new("/"), parent),
            Source::Inner(children) => self.walk_ancestors(Path::new("/"), children, parent),
        }
    }

    fn walk_ancestors(
        &mut self,
        path: &Path,
        children: &BTreeMap<OsString, Source>,
        parent: Option<&Tree>,
    ) -> Result<usize> {
        let mut nodes = vec![];
        for (name, child) in children {
            let child_path = path.join(name);
            match child {
                Source::Leaf => match self.rerooted.remove(&child_path) {
                    // The parent's files of this root are under another name: look there.
                    Some(node) => {
                        let moved = Tree { nodes: vec![Node { name: name.as_bytes().to_vec(), ..node }] };
                        self.add_entry(&mut nodes, &child_path, name.as_bytes(), Some(&moved))?
                    }
                    None => self.add_entry(&mut nodes, &child_path, name.as_bytes(), parent)?,
                },
                Source::Inner(grandchildren) => {
                    let md = fs::symlink_metadata(&child_path)
                        .map_err(|e| Error::NotFound(format!("{}: {e}", child_path.display())))?;
                    let sub = self.parent_subtree(parent, name.as_bytes())?;
                    let slot = self.walk_ancestors(&child_path, grandchildren, sub.as_ref())?;
                    nodes.push(PendingNode::Dir { name: name.as_bytes().to_vec(), meta: metadata(&md), slot });
                }
            }
        }
        self.push_dir(path, nodes)
    }

    fn walk_dir(&mut self, path: &Path, parent: Option<&Tree>) -> Result<usize> {
        let mut names = vec![];
        match fs::read_dir(path) {
            Ok(entries) => {
                for entry in entries {
                    match entry {
                        Ok(e) => names.push(e.file_name()),
                        Err(e) => self.skip(path, &e.to_string()),
                    }
                }
            }
            Err(e) => self.skip(path, &format!("cannot list directory: {e}")),
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let data_dir = self.excludes.postgres_defaults
            && exclude::is_postgres_data_dir(&names.iter().map(|n| n.as_bytes()).collect::<Vec<_>>());
        if data_dir {
            self.postgres_data.push(path.to_owned());
        }
        let before = names.len();
        names.retain(|name| !self.excluded_path(&path.join(name)));
        self.excluded += (before - names.len()) as u64;
        let subdirs = self.fetch_subtrees(path, &names, parent)?;
        let lists = file_lists(parent.into_iter().chain(subdirs.iter().map(|d| &self.subtrees[d])));
        let confirmed = self.confirm(lists)?;
        let mut nodes = Vec::with_capacity(names.len());
        for name in names {
            self.add_entry(&mut nodes, &path.join(&name), name.as_bytes(), parent)?;
        }
        for id in confirmed {
            self.confirmed.remove(&id);
        }
        for dir in subdirs {
            self.subtrees.remove(&dir);
        }
        if data_dir {
            self.postgres_data.pop();
        }
        self.push_dir(path, nodes)
    }

    /// Whether the user's patterns, or PostgreSQL's own rules inside a data directory, leave
    /// out the entry at `path`.
    fn excluded_path(&self, path: &Path) -> bool {
        let postgres = self.postgres_data.last().and_then(|root| path.strip_prefix(root).ok());
        self.excludes.matches(path) || postgres.is_some_and(exclude::postgres_skips)
    }

    /// Where reads cost a round trip: fetches the parent trees of this directory's
    /// subdirectories (those still here, at most [`limits::PREFETCH_SUBTREES`]) in one stream
    /// instead of one round trip each; returns the paths they are kept under.
    fn fetch_subtrees(&mut self, path: &Path, names: &[OsString], parent: Option<&Tree>) -> Result<Vec<PathBuf>> {
        let Some(parent) = parent.filter(|_| self.shared.repo.backend.reads_round_trip()) else { return Ok(vec![]) };
        let wanted: Vec<(PathBuf, ChunkId)> = names
            .iter()
            .filter_map(|name| match parent.find(name.as_bytes()) {
                Some(Node { kind: NodeKind::Dir { tree }, .. }) => Some((path.join(name), *tree)),
                _ => None,
            })
            .take(limits::PREFETCH_SUBTREES)
            .collect();
        self.reader.prefetch(wanted.iter().map(|(_, id)| *id).collect());
        let mut fetched = Vec::with_capacity(wanted.len());
        for (dir, id) in wanted {
            let tree = self.load_tree(&id)?;
            self.subtrees.insert(dir.clone(), tree);
            fetched.push(dir);
        }
        Ok(fetched)
    }

    /// Asks once which of these chunk lists (of the parent's files) the repository has, and
    /// remembers them until the directory being walked is done; returns them.
    fn confirm(&mut self, mut ids: Vec<ChunkId>) -> Result<Vec<ChunkId>> {
        ids.retain(|id| !self.confirmed.contains(id));
        let present = self.shared.repo.backend.have(self.shared.known.index(), &ids)?;
        let confirmed: Vec<ChunkId> =
            ids.into_iter().zip(present).filter(|(_, have)| *have).map(|(id, _)| id).collect();
        self.confirmed.extend(confirmed.iter().copied());
        Ok(confirmed)
    }

    /// Whether every chunk list of `ids` is stored (the parent's lists of an unchanged file).
    fn lists_stored(&self, ids: &[ChunkId]) -> Result<bool> {
        if ids.iter().all(|id| self.confirmed.contains(id)) {
            return Ok(true);
        }
        Ok(self.shared.repo.backend.have(self.shared.known.index(), ids)?.into_iter().all(|have| have))
    }

    fn add_entry(
        &mut self,
        nodes: &mut Vec<PendingNode>,
        path: &Path,
        name: &[u8],
        parent: Option<&Tree>,
    ) -> Result<()> {
        if self.run.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) => {
                self.skip(path, &e.to_string());
                return Ok(());
            }
        };
        let meta = metadata(&md);
        let name = name.to_vec();
        let ft = md.file_type();
        if ft.is_dir() {
            let sub = match self.subtrees.remove(path) {
                Some(fetched) => Some(fetched),
                None => self.parent_subtree(parent, &name)?,
            };
            let slot = self.walk_dir(path, sub.as_ref())?;
            nodes.push(PendingNode::Dir { name, meta, slot });
        } else if ft.is_file() {
            if let Err(why) = self
                .add_file(nodes, name, meta, parent, |walker, meta, previous| walker.start_file(path, meta, previous))?
            {
                self.skip(path, &why);
            }
        } else if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => {
                    let target = target.as_os_str().as_bytes().to_vec();
                    nodes.push(PendingNode::Done(Node { name, meta, kind: NodeKind::Symlink { target } }));
                }
                Err(e) => self.skip(path, &e.to_string()),
            }
        } else {
            // Counted, so the backup says it is not whole (exit 3) instead of dropping them quietly.
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device node"
            } else {
                "not a regular file, directory or symlink"
            };
            self.skip(path, &format!("{kind}: not recorded by this version, left out"));
        }
        Ok(())
    }

    /// Adds a regular file: reused from the parent when unchanged, else started by `start`.
    /// The inner error is why the source file can't be read (it is left out with a warning);
    /// the outer one stops the backup (a core failed).
    fn add_file(
        &mut self,
        nodes: &mut Vec<PendingNode>,
        name: Vec<u8>,
        mut meta: Metadata,
        parent: Option<&Tree>,
        start: impl FnOnce(&mut Self, &mut Metadata, &[ChunkId]) -> Result<Started>,
    ) -> Result<std::result::Result<(), String>> {
        let old = parent.and_then(|t| t.find(&name));
        let previous = match old {
            Some(Node { kind: NodeKind::File { segments }, .. }) => &segments[..],
            _ => &[],
        };
        let reusable = match old {
            // Reused only while its chunk lists are still indexed: a damaged repository heals
            // by reading the file again.
            Some(Node { meta: old, kind: NodeKind::File { segments }, .. })
                if unchanged(old, &meta) && self.lists_stored(segments)? =>
            {
                Some(segments.clone())
            }
            _ => None,
        };
        let node = match reusable {
            Some(segments) => {
                self.shared.progress.add(meta.size, 1);
                PendingNode::Done(Node { name, meta, kind: NodeKind::File { segments } })
            }
            None => match start(self, &mut meta, previous)? {
                Ok(Some(slot)) => PendingNode::File { name, meta, slot },
                Ok(None) => PendingNode::Done(Node { name, meta, kind: NodeKind::File { segments: vec![] } }),
                Err(why) => return Ok(Err(why)),
            },
        };
        self.stats.files += 1;
        self.stats.bytes_total += meta.size;
        nodes.push(node);
        Ok(Ok(()))
    }

    /// Maps a file and queues its segments.
    fn start_file(&mut self, path: &Path, meta: &mut Metadata, previous: &[ChunkId]) -> Result<Started> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(format!("cannot open: {e}"))),
        };
        // SAFETY: the mapping is read-only and private. A file truncated by another process
        // while mapped raises SIGBUS on a read past its new end: the cores read it under
        // `truncated::reading`, which turns that into zeros and lets the backup go on.
        let map = match file.metadata().map(|m| m.len()) {
            Ok(0) => {
                meta.size = 0;
                return Ok(Ok(None));
            }
            Ok(_) => unsafe { Mmap::map(&file) },
            Err(e) => Err(e),
        };
        let map = match map {
            Ok(m) => m,
            Err(e) => return Ok(Err(format!("cannot read: {e}"))),
        };
        let _ = map.advise(Advice::Sequential);
        meta.size = map.len() as u64;
        let chunking = self.chunking.for_path(path);
        let segment = self.shared.repo.config.segment_size;
        let head = truncated::reading(&map, || map[..engine::HEAD.min(map.len())].to_vec());
        let (mut plan, why) = chunking.plan(path, meta.size, &head, self.cdc, segment);
        if let Some(why) = why {
            self.run.warn(path, &why);
        }
        let mut regions = None;
        if plan.policy == self.cdc {
            // The tar scan reads the mapping too (headers throughout the file).
            let scanned = truncated::reading(&map, || {
                chunking.tar_scanner(&map).map(|(mut scanner, plan)| {
                    scanner.feed(&map);
                    (scanner.finish(), plan)
                })
            });
            if let Some((layout, tar_plan)) = scanned {
                for warning in &layout.warnings {
                    self.run.warn(path, &format!("tar: {warning}"));
                }
                if !layout.pages.is_empty() {
                    (plan, regions) = (tar_plan, Some(layout.pages.into()));
                }
            }
        }
        let source = SegmentSource::Mapped(Arc::new(map));
        let slot = self.queue_segments(source, meta.size, plan, regions, previous)?;
        self.files.get_mut(&slot).expect("just queued").path = Some(path.to_owned());
        Ok(Ok(Some(slot)))
    }

    /// Queues every segment of a file of `len` bytes, cut as `plan` says, and returns its
    /// slot. `previous` are the file's chunk lists in the parent snapshot.
    fn queue_segments(
        &mut self,
        source: SegmentSource,
        len: u64,
        plan: FilePlan,
        regions: Option<Arc<[PageRegion]>>,
        previous: &[ChunkId],
    ) -> Result<usize> {
        let segment_size = self.shared.repo.config.segment_size;
        let count = len.div_ceil(segment_size) as usize;
        if let Some(engine) = plan.engine {
            *self.page_files.entry(engine).or_default() += 1;
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.files.insert(slot, FileInFlight { segments: vec![None; count], left: count, path: None });
        self.pending_files += 1;
        for segment in 0..count {
            let offset = segment as u64 * segment_size;
            let len = segment_size.min(len - offset) as usize;
            let job = SegmentJob {
                source: source.clone(),
                policy: plan.policy,
                page: plan.page,
                previous: previous.get(segment).copied(),
                regions: regions.clone(),
                file: slot,
                segment,
                offset: offset as usize,
                len,
            };
            self.queue(job)?;
        }
        Ok(slot)
    }

    /// Standard input as the one file `name` of the snapshot's root: read piece by piece, each
    /// segment chunked on a core while the next is read, so memory stays at
    /// [`limits::STDIN_PIECES`] pieces per segment in flight whatever the stream's length.
    fn walk_stdin(&mut self, name: &str, parent: Option<&Tree>) -> Result<usize> {
        let mut nodes = vec![];
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let meta = Metadata { mode: 0o100600, mtime_ns: now, ctime_ns: now, ..Default::default() };
        let name = stdin_name(name)?.to_owned();
        let mut input = std::io::stdin().lock();
        // A read error of standard input stops the backup (the outer result): the inner one,
        // a file left out, is never given.
        let added = self.add_file(&mut nodes, name.as_bytes().to_vec(), meta, parent, |walker, meta, previous| {
            walker.start_stream(&mut input, Path::new(&format!("/{name}")), meta, previous).map(Ok)
        })?;
        debug_assert!(added.is_ok());
        self.push_dir(Path::new("/"), nodes)
    }

    /// Reads `input` to its end as the file `path`, queueing each segment as it begins and
    /// sending it its bytes as they come; returns the file's slot (`None` when it is empty).
    fn start_stream(
        &mut self,
        input: &mut impl std::io::Read,
        path: &Path,
        meta: &mut Metadata,
        previous: &[ChunkId],
    ) -> Result<Option<usize>> {
        let segment = self.shared.repo.config.segment_size;
        let piece_len = limits::STDIN_PIECE.min(segment as usize);
        let mut piece = read_piece(input, piece_len)?;
        meta.size = 0;
        if piece.is_empty() {
            return Ok(None);
        }
        // A stream is judged by its name and first bytes: its length is not known yet.
        let chunking = self.chunking.for_path(path);
        let head = &piece[..engine::HEAD.min(piece.len())];
        let (mut plan, why) = chunking.plan(path, 0, head, self.cdc, segment);
        if let Some(why) = why {
            self.run.warn(path, &why);
        }
        let mut scanner = None;
        if plan.policy == self.cdc {
            if let Some((tar_scanner, tar_plan)) = chunking.tar_scanner(&piece) {
                (scanner, plan) = (Some(tar_scanner), tar_plan);
            }
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.files.insert(slot, FileInFlight { segments: vec![], left: 0, path: None });
        self.pending_files += 1;
        // Regions found so far that reach into the segment being read.
        let mut open: Vec<PageRegion> = vec![];
        let mut found = 0;
        let mut offset = 0u64;
        while !piece.is_empty() {
            let index = self.files[&slot].segments.len();
            if index >= wire::limits::MAX_FILE_SEGMENTS as usize {
                return Err(Error::Usage(format!(
                    "standard input: longer than {} segments of {segment} bytes",
                    wire::limits::MAX_FILE_SEGMENTS
                )));
            }
            let (pieces, stream) = bounded(limits::STDIN_PIECES);
            let f = self.files.get_mut(&slot).expect("inserted above");
            f.segments.push(None);
            f.left += 1;
            let job = SegmentJob {
                source: SegmentSource::Stream(stream),
                policy: plan.policy,
                page: plan.page,
                previous: previous.get(index).copied(),
                regions: scanner.as_ref().map(|_| Arc::from(Vec::new())),
                file: slot,
                segment: index,
                offset: offset as usize,
                len: segment as usize,
            };
            self.queue(job)?;
            open.retain(|r| r.start + r.len > offset);
            let end = offset + segment;
            let mut first = true;
            loop {
                let mut regions = if first { open.clone() } else { vec![] };
                first = false;
                if let Some(scanner) = scanner.as_mut() {
                    scanner.feed(&piece);
                    let new = &scanner.layout.pages[found..];
                    found = scanner.layout.pages.len();
                    regions.extend_from_slice(new);
                    open.extend_from_slice(new);
                    for warning in scanner.layout.warnings.drain(..) {
                        self.run.warn(path, &format!("tar: {warning}"));
                    }
                }
                offset += piece.len() as u64;
                let sent = StreamPiece { bytes: piece, regions };
                self.send_to_cores(&pieces, sent, "a core stopped reading standard input")?;
                piece = read_piece(input, piece_len.min((end - offset) as usize))?;
                if offset == end {
                    piece = read_piece(input, piece_len)?;
                    break;
                }
                if piece.is_empty() {
                    break;
                }
            }
        }
        // A tar counts as a page file when page files were found in it, as a mapped one does.
        let has_pages = scanner.as_ref().is_none_or(|_| found > 0);
        if let (Some(engine), true) = (plan.engine, has_pages) {
            *self.page_files.entry(engine).or_default() += 1;
        }
        if let Some(scanner) = scanner {
            for warning in scanner.finish().warnings {
                self.run.warn(path, &format!("tar: {warning}"));
            }
        }
        meta.size = offset;
        Ok(Some(slot))
    }

    /// Walks a generated source: its files in their directories.
    /// The root directory of a generated source; returns its slot.
    fn walk_synth(&mut self, spec: &SynthSpec, parent: Option<&Tree>) -> Result<usize> {
        let mut root = SynthDir::default();
        for f in spec.files() {
            let mut dir = &mut root;
            let mut names: Vec<&str> = f.path.split('/').collect();
            let file_name = names.pop().expect("paths have a file name").to_owned();
            for d in names {
                dir = dir.dirs.entry(d.to_owned()).or_default();
            }
            dir.files.push((file_name, Arc::new(f)));
        }
        let spec = Arc::new(spec.clone());
        self.walk_synth_dir(&spec, &root, parent)
    }

    fn walk_synth_dir(&mut self, spec: &Arc<SynthSpec>, dir: &SynthDir, parent: Option<&Tree>) -> Result<usize> {
        let mut nodes = vec![];
        let stamp = |mode: u32, size: u64, mtime_ns: i64, inode: u64| Metadata {
            mode,
            size,
            mtime_ns,
            ctime_ns: mtime_ns,
            inode,
            ..Default::default()
        };
        for (name, sub) in &dir.dirs {
            let subtree = self.parent_subtree(parent, name.as_bytes())?;
            let slot = self.walk_synth_dir(spec, sub, subtree.as_ref())?;
            let meta = stamp(0o40700, 0, spec.mtime_ns(), 0);
            nodes.push(PendingNode::Dir { name: name.as_bytes().to_vec(), meta, slot });
        }
        for (name, f) in &dir.files {
            if self.run.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let meta = stamp(0o100600, f.len(), f.mtime_ns, f.inode());
            let source = SegmentSource::Synth(Arc::clone(spec), Arc::clone(f));
            let chunking = self.chunking.for_path(Path::new(&f.path));
            let mut head = vec![0; if f.len() >= synth::PAGE as u64 { synth::PAGE } else { 0 }];
            spec.fill(f, 0, &mut head);
            let segment = self.shared.repo.config.segment_size;
            // Generated files are whole pages: no warning to give.
            let (plan, _) = chunking.plan(Path::new(&f.path), f.len(), &head, self.cdc, segment);
            // A generated file is always readable: the inner result is always Ok.
            let added =
                self.add_file(&mut nodes, name.as_bytes().to_vec(), meta, parent, |walker, meta, previous| {
                    Ok(Ok(Some(walker.queue_segments(source, meta.size, plan, None, previous)?)))
                })?;
            debug_assert!(added.is_ok());
        }
        self.push_dir(Path::new(&spec.source_name()), nodes)
    }

    /// Queues a segment.
    fn queue(&mut self, job: SegmentJob) -> Result<()> {
        self.send_to_cores(&self.jobs.clone(), job, "the cores stopped taking segments")
    }

    /// Sends `item` to the cores on `channel`, taking answers while it is full so the cores never
    /// wait on us; `stopped` says what failed if the cores are gone.
    fn send_to_cores<T>(&mut self, channel: &Sender<T>, item: T, stopped: &str) -> Result<()> {
        let mut item = Some(item);
        while item.is_some() {
            // The message expression is evaluated only if the send arm is the one selected.
            select! {
                send(channel, item.take().expect("loop condition")) -> sent => {
                    sent.map_err(|_| Error::Internal(stopped.into()))?
                }
                recv(self.done) -> answer => self.take_answer(answer)?,
            }
        }
        Ok(())
    }

    fn take_answer(&mut self, answer: std::result::Result<SegmentDone, crossbeam_channel::RecvError>) -> Result<()> {
        let done = answer.map_err(|_| Error::Internal("the cores stopped answering".into()))?;
        let summary = done.result?;
        let f = self.files.get_mut(&done.file).expect("answers are for files in flight");
        debug_assert!(f.segments[done.segment].is_none());
        f.segments[done.segment] = Some(summary.list);
        f.left -= 1;
        self.stats.bytes_read += summary.bytes;
        self.stats.chunks_total += summary.chunks;
        self.shared.progress.add(0, u64::from(f.left == 0));
        Ok(())
    }

    fn push_dir(&mut self, path: &Path, nodes: Vec<PendingNode>) -> Result<usize> {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.pending.push_back(PendingDir { slot, path: path.to_owned(), nodes });
        while self.pending_files > limits::PENDING_FILES || self.pending.len() > limits::PENDING_DIRS {
            self.complete_oldest_dir()?;
        }
        Ok(slot)
    }

    /// Waits for the files of the oldest pending directory and stores its tree. Directories
    /// are pushed in post-order, so its subdirectories are already complete.
    fn complete_oldest_dir(&mut self) -> Result<()> {
        let dir = self.pending.pop_front().expect("called with a pending directory");
        let mut entries = Vec::with_capacity(dir.nodes.len());
        for node in dir.nodes {
            entries.push(match node {
                PendingNode::Done(n) => DirEntry::Node(n),
                PendingNode::File { name, meta, slot } => {
                    while self.files[&slot].left > 0 {
                        let answer = self.done.recv();
                        self.take_answer(answer)?;
                    }
                    let f = self.files.remove(&slot).expect("checked above");
                    self.pending_files -= 1;
                    if let Some(path) = &f.path {
                        self.check_unchanged(path, &meta);
                    }
                    DirEntry::File { name, meta, segments: f.segments }
                }
                PendingNode::Dir { name, meta, slot } => {
                    let tree = self.dirs_done.remove(&slot).expect("subdirectories complete before their parent");
                    DirEntry::Node(Node { name, meta, kind: NodeKind::Dir { tree } })
                }
            });
        }
        let blobs = assemble::dir_tree(&dir.path.to_string_lossy(), entries)?;
        let id = blobs.store(|bytes| self.tree_writer.store(BlobKind::Tree, bytes).map(|(id, _)| id))?;
        self.dirs_done.insert(dir.slot, id);
        self.stats.dirs += 1;
        Ok(())
    }

    fn parent_subtree(&mut self, parent: Option<&Tree>, name: &[u8]) -> Result<Option<Tree>> {
        match parent.and_then(|t| t.find(name)) {
            Some(Node { kind: NodeKind::Dir { tree }, .. }) => Ok(Some(self.load_tree(&tree.clone())?)),
            _ => Ok(None),
        }
    }

    fn load_tree(&mut self, id: &ChunkId) -> Result<Tree> {
        self.reader.read_tree(id)
    }

    /// Warns when a file read for this backup was changed while it was read: its copy may mix
    /// old and new pages (a torn page), so the backup ends as partial.
    fn check_unchanged(&mut self, path: &Path, read: &Metadata) {
        let now = fs::symlink_metadata(path).map(|md| metadata(&md));
        if now.as_ref().is_ok_and(|now| unchanged(read, now)) {
            return;
        }
        self.files_changed += 1;
        match now {
            Ok(now) if now.size < read.size => self.run.warn(
                path,
                &format!(
                    "shrank from {} to {} bytes while it was read (truncated, as logrotate's copytruncate does): \
                     stored at its old size, the bytes past the new end as read or as zeros",
                    read.size, now.size
                ),
            ),
            _ => self.run.warn(
                path,
                "changed while it was read: stored as read, possibly inconsistent (back up a stopped \
                 database, a filesystem snapshot, or use the database's backup mode)",
            ),
        }
    }

    fn skip(&mut self, path: &Path, why: &str) {
        self.stats.files_skipped += 1;
        self.run.warn(path, why);
    }
}

fn insert_source(node: &mut Source, names: &[OsString]) {
    let Source::Inner(children) = node else {
        return;
    };
    match names {
        [] => *node = Source::Leaf,
        [first, rest @ ..] => {
            insert_source(children.entry(first.clone()).or_insert_with(|| Source::Inner(BTreeMap::new())), rest)
        }
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

/// Up to `len` bytes of `input`, fewer only at its end.
fn read_piece(input: &mut impl std::io::Read, len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut piece = Vec::with_capacity(len);
    let io = |source| Error::Io { path: PathBuf::from("standard input"), source };
    input.by_ref().take(len as u64).read_to_end(&mut piece).map_err(io)?;
    Ok(piece)
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

/// A file is unchanged when size, mtime, ctime and inode all match: it is not read again.
/// The chunk lists of the files of these trees.
fn file_lists<'t>(trees: impl Iterator<Item = &'t Tree>) -> Vec<ChunkId> {
    trees
        .flat_map(|t| &t.nodes)
        .filter_map(|n| match &n.kind {
            NodeKind::File { segments } => Some(segments),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

fn unchanged(old: &Metadata, new: &Metadata) -> bool {
    old.size == new.size && old.mtime_ns == new.mtime_ns && old.ctime_ns == new.ctime_ns && old.inode == new.inode
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
