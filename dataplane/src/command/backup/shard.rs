//! `cbcr backup --job JOB --shard K`: runs one shard of a planned job on the cores, as a backup
//! runs its segments, and checkpoints each batch of segments once their packs are durable. A
//! re-run (on any host that sees the same source) skips every segment a counted checkpoint
//! holds, without reading it; a run started with a higher token fences off the older one.
//!
//! Durability: in a shard each core closes its pack at the end of every segment, and the answer
//! lists the blobs the segment references. A blob is durable once no writer claims it (a claim
//! lasts until its pack is sealed and indexed), so a segment is checkpointed once none of its
//! blobs is claimed: its own pack's and those another core was storing at the same time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use memmap2::{Advice, Mmap};
use wire::job::{self, Checkpoint, CheckpointStats, Cut, JobId, JobObject, JobPlan, PlanKind, PlanSource, ShardStart};

use super::{metadata, start_cores, CorePool, SegmentDone, SegmentJob, SegmentSource, Shared};
use crate::command::jobs::JobState;
use crate::error::{Error, Result};
use crate::events::{Run, StageBoard};
use crate::index::{ChunkIndex, KnownBlobs};
use crate::pipeline::chunker::ChunkPolicy;
use crate::repo::{JobObjects, Repository};
use crate::source::synth::{SynthFile, SynthSpec};
use crate::source::truncated;

/// How often the driver looks for segments whose blobs became durable.
const CHECKPOINT_POLL: Duration = Duration::from_millis(20);

pub struct ShardOptions {
    pub job: JobId,
    pub shard: u32,
    /// The run's fencing token; by default one above the highest the shard has seen.
    pub token: Option<u64>,
    pub cores: usize,
    pub compression_level: i32,
    pub pack_size: u64,
}

/// What a shard run did.
#[derive(Debug, serde::Serialize)]
pub struct ShardOutcome {
    pub job: String,
    pub shard: u32,
    pub token: u64,
    pub segments: usize,
    /// Segments earlier runs had checkpointed: not read.
    pub segments_skipped: usize,
    pub bytes_skipped: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub checkpoints: u32,
    pub duration_s: f64,
    /// Time spent writing checkpoints (off the cores).
    pub checkpoint_s: f64,
}

pub fn run_shard(repo: Repository, opts: &ShardOptions, run: &Run) -> Result<ShardOutcome> {
    let started = Instant::now();
    let objects = repo.jobs()?;
    let state = JobState::load(&repo, &objects, opts.job)?;
    let k = opts.shard as usize;
    let hex = opts.job.to_hex();
    let Some(shard) = state.shards.get(k) else {
        return Err(Error::Usage(format!(
            "job {hex} has {} shards (0 to {})",
            state.shards.len(),
            state.shards.len() - 1
        )));
    };
    if state.plan.segment_size != repo.config.segment_size {
        return Err(Error::Integrity(format!(
            "job {hex} was planned for segments of {} bytes; this repository's are {}",
            state.plan.segment_size, repo.config.segment_size
        )));
    }
    let token = match opts.token {
        Some(t) if t <= shard.max_token => {
            return Err(Error::Fenced(format!(
                "--token {t}: shard {k} of job {hex} has seen token {}; a run that takes it over needs a higher one",
                shard.max_token
            )))
        }
        Some(t) => t,
        None => shard.max_token + 1,
    };
    let lock = repo.lock_shared()?;
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id).map_err(|e| Error::Internal(format!("no random bytes for a run id: {e}")))?;
    let me = (token, u64::from_le_bytes(id));
    let adopted: Vec<String> = shard.checkpoints.iter().map(|(name, _)| name.clone()).collect();
    let start = ShardStart { job: opts.job, shard: opts.shard, token, run: me.1, adopted };
    objects.put(&JobObject::Start { job: opts.job, shard: opts.shard, token, run: me.1 }, &start.encode())?;
    let fence = Fence { objects: &objects, job: opts.job, shard: opts.shard, me };
    fence.check()?;

    let done: HashSet<(u32, u32)> = shard.done().map(|d| (d.file, d.segment)).collect();
    let plan = &state.plan;
    let all: Vec<(u32, u32)> = plan.shard_segments(k).collect();
    let todo: Vec<(u32, u32)> = all.iter().copied().filter(|s| !done.contains(s)).collect();
    let bytes_skipped = all.iter().filter(|s| done.contains(s)).map(|&(f, s)| plan.segment_len(f as usize, s)).sum();

    let index = ChunkIndex::load(&*repo.store)?;
    let board = Arc::new(StageBoard::new(opts.cores, run.every));
    let mut phase = run.phase("backup", Some(Arc::clone(&board)));
    phase.progress.set_total(todo.iter().map(|&(f, s)| plan.segment_len(f as usize, s)).sum());
    let shared = Arc::new(Shared {
        repo,
        known: Arc::new(KnownBlobs::new(index)),
        pack_size: opts.pack_size,
        level: opts.compression_level,
        progress: Arc::clone(&phase.progress),
        deltas: None,
        board,
        run: run.clone(),
        checkpointing: true,
    });
    let CorePool { jobs: job_tx, done: done_rx, sealer, cores } = start_cores(&shared, opts.cores)?;
    let mut driver = Driver {
        plan,
        known: &shared.known,
        fence,
        waiting: VecDeque::new(),
        seq: shard.checkpoints.iter().map(|(_, c)| c.seq + 1).max().unwrap_or(0),
        checkpoints: 0,
        checkpoint_time: Duration::ZERO,
        bytes_read: 0,
        added: CheckpointStats::default(),
        done: done_rx,
    };
    let fed = feed(&mut driver, &shared, &todo, job_tx, run);
    // The queue is closed (dropped by `feed`): the cores finish what they hold and stop.
    let answers = driver.drain();
    let core_results = cores.join();
    let sealed = sealer.finish();
    fed?;
    answers?;
    for r in core_results? {
        r?;
    }
    sealed?;
    // Everything sealed: what still waits is durable now.
    driver.checkpoint_ready(true)?;
    phase.finish();
    drop(lock);
    Ok(ShardOutcome {
        job: hex,
        shard: opts.shard,
        token,
        segments: all.len(),
        segments_skipped: all.len() - todo.len(),
        bytes_skipped,
        bytes_read: driver.bytes_read,
        bytes_new: driver.added.bytes_new,
        bytes_stored: driver.added.bytes_stored,
        checkpoints: driver.checkpoints,
        duration_s: started.elapsed().as_secs_f64(),
        checkpoint_s: driver.checkpoint_time.as_secs_f64(),
    })
}

/// Refuses to go on once this run is not the shard's current one.
struct Fence<'a> {
    objects: &'a JobObjects,
    job: JobId,
    shard: u32,
    me: (u64, u64),
}

impl Fence<'_> {
    fn check(&self) -> Result<()> {
        let runs = self.objects.of(self.job)?.into_iter().filter_map(|o| match o {
            JobObject::Start { shard, token, run, .. } if shard == self.shard => Some((token, run)),
            _ => None,
        });
        match job::current_run(runs) {
            Some(current) if current == self.me => Ok(()),
            Some((token, _)) if token == self.me.0 => Err(Error::Fenced(format!(
                "shard {} of job {} is run by another process with the same token {token} right now",
                self.shard,
                self.job.to_hex()
            ))),
            Some((token, _)) => Err(Error::Fenced(format!(
                "shard {} of job {} was taken over by a run with token {token} (this run has {}); its checkpoints would not count, so it stops",
                self.shard,
                self.job.to_hex(),
                self.me.0
            ))),
            None => Err(Error::Fenced(format!(
                "shard {} of job {}: this run's start record is gone (the job was abandoned?)",
                self.shard,
                self.job.to_hex()
            ))),
        }
    }
}

/// Takes the cores' answers and writes checkpoints.
struct Driver<'a> {
    plan: &'a JobPlan,
    known: &'a KnownBlobs,
    fence: Fence<'a>,
    /// Segments done, in the order they came, waiting for their blobs to be durable.
    waiting: VecDeque<(job::SegmentDone, Vec<wire::ChunkId>, CheckpointStats)>,
    seq: u32,
    checkpoints: u32,
    checkpoint_time: Duration,
    bytes_read: u64,
    added: CheckpointStats,
    done: Receiver<SegmentDone>,
}

impl Driver<'_> {
    fn take(&mut self, answer: SegmentDone) -> Result<()> {
        let summary = answer.result?;
        let done = job::SegmentDone {
            file: answer.file as u32,
            segment: answer.segment as u32,
            list: summary.list,
            bytes: summary.bytes,
            chunks: summary.chunks,
        };
        self.bytes_read += summary.bytes;
        self.waiting.push_back((done, summary.refs, summary.added));
        Ok(())
    }

    /// Writes one checkpoint of the segments whose blobs are durable (all of them with `all`:
    /// everything is sealed).
    fn checkpoint_ready(&mut self, all: bool) -> Result<()> {
        let mut ready = vec![];
        let mut stats = CheckpointStats::default();
        let mut still = VecDeque::new();
        for (done, refs, added) in self.waiting.drain(..) {
            if all || !refs.iter().any(|id| self.known.is_claimed(id)) {
                stats.bytes_new += added.bytes_new;
                stats.chunks_new += added.chunks_new;
                stats.bytes_stored += added.bytes_stored;
                ready.push(done);
            } else {
                still.push_back((done, refs, added));
            }
        }
        self.waiting = still;
        for batch in ready.chunks(job::MAX_CHECKPOINT_SEGMENTS as usize) {
            let started = Instant::now();
            self.fence.check()?;
            let (job, shard, (token, run)) = (self.fence.job, self.fence.shard, self.fence.me);
            let c = Checkpoint { job, shard, token, run, seq: self.seq, stats, segments: batch.to_vec() };
            self.fence.objects.put(&JobObject::Checkpoint { job, shard, token, run, seq: self.seq }, &c.encode())?;
            crate::fault::point("checkpoint");
            self.seq += 1;
            self.checkpoints += 1;
            self.added.bytes_new += stats.bytes_new;
            self.added.chunks_new += stats.chunks_new;
            self.added.bytes_stored += stats.bytes_stored;
            stats = CheckpointStats::default();
            self.checkpoint_time += started.elapsed();
        }
        Ok(())
    }

    /// Takes every answer left once the queue is closed, checkpointing as they become durable;
    /// after an error only takes them (so no core blocks on a send).
    fn drain(&mut self) -> Result<()> {
        let mut first = Ok(());
        let tick = crossbeam_channel::tick(CHECKPOINT_POLL);
        loop {
            select! {
                recv(self.done) -> answer => match answer {
                    Ok(answer) => first = first.and_then(|()| self.take(answer)),
                    Err(_) => return first,
                },
                recv(tick) -> _ => if first.is_ok() {
                    first = self.checkpoint_ready(false);
                },
            }
        }
    }
}

/// Queues the segments `todo` of the plan, taking answers and checkpointing as they come.
fn feed(
    driver: &mut Driver<'_>,
    shared: &Shared,
    todo: &[(u32, u32)],
    jobs: Sender<SegmentJob>,
    run: &Run,
) -> Result<()> {
    let plan = driver.plan;
    let synth = match &plan.source {
        PlanSource::Synth(url) => {
            let spec = SynthSpec::parse(url)?;
            let files: HashMap<String, Arc<SynthFile>> =
                spec.files().into_iter().map(|f| (f.path.clone(), Arc::new(f))).collect();
            Some((Arc::new(spec), files))
        }
        PlanSource::Paths => None,
    };
    let cdc = ChunkPolicy::Cdc(shared.repo.config.chunker);
    let mut opened: Option<(u32, SegmentSource, ChunkPolicy, Option<u32>)> = None;
    let tick = crossbeam_channel::tick(CHECKPOINT_POLL);
    for &(file, segment) in todo {
        if run.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        if opened.as_ref().is_none_or(|o| o.0 != file) {
            let entry = &plan.entries[file as usize];
            let PlanKind::File { cut, .. } = entry.kind else { unreachable!("plans range over files") };
            let (policy, page) = match cut {
                Cut::Content => (cdc, None),
                Cut::Pages { chunk, page } => (ChunkPolicy::Fixed(chunk), Some(page)),
            };
            let path: Vec<String> = entry.path.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
            let source = match &synth {
                Some((spec, files)) => {
                    let f = files.get(&path.join("/")).ok_or_else(|| {
                        Error::SourceChanged(format!("{}: not a file of {}", path.join("/"), spec.url()))
                    })?;
                    SegmentSource::Synth(Arc::clone(spec), Arc::clone(f))
                }
                None => map_planned(&entry_path(&entry.path), &entry.meta)?,
            };
            opened = Some((file, source, policy, page));
        }
        let (_, source, policy, page) = opened.as_ref().expect("opened above");
        let offset = u64::from(segment) * plan.segment_size;
        let job = SegmentJob {
            source: source.clone(),
            policy: *policy,
            page: *page,
            previous: None,
            regions: None,
            file: file as usize,
            segment: segment as usize,
            offset: offset as usize,
            len: plan.segment_len(file as usize, segment) as usize,
        };
        let mut job = Some(job);
        while job.is_some() {
            select! {
                send(jobs, job.take().expect("loop condition")) -> sent => {
                    sent.map_err(|_| Error::Internal("the cores stopped taking segments".into()))?
                }
                recv(driver.done) -> answer => {
                    driver.take(answer.map_err(|_| Error::Internal("the cores stopped answering".into()))?)?
                }
                recv(tick) -> _ => driver.checkpoint_ready(false)?,
            }
        }
    }
    drop(jobs);
    Ok(())
}

/// The source path of a plan entry (its components below `/`).
fn entry_path(components: &[Vec<u8>]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut p = PathBuf::from("/");
    for c in components {
        p.push(std::ffi::OsStr::from_bytes(c));
    }
    p
}

/// Maps the file at `path` once its size and mtime are the plan's: a sharded backup needs a
/// source that does not change between the plan and the last shard.
fn map_planned(path: &Path, planned: &wire::tree::Metadata) -> Result<SegmentSource> {
    let gone = |e: std::io::Error| Error::SourceChanged(format!("{}: planned, but now: {e}", path.display()));
    let file = File::open(path).map_err(gone)?;
    let md = file.metadata().map_err(gone)?;
    let now = metadata(&md);
    if now.size != planned.size || now.mtime_ns != planned.mtime_ns {
        return Err(Error::SourceChanged(format!(
            "{}: changed since the plan (size {} -> {}, mtime {} -> {} ns); a sharded backup needs a source that does not change (a snapshot or a clone): plan it again",
            path.display(),
            planned.size,
            now.size,
            planned.mtime_ns,
            now.mtime_ns
        )));
    }
    // SAFETY: read-only private mapping, read under `truncated::reading` by the cores.
    let map = unsafe { Mmap::map(&file) }.map_err(gone)?;
    let _ = map.advise(Advice::Sequential);
    truncated::install();
    Ok(SegmentSource::Mapped(Arc::new(map)))
}
