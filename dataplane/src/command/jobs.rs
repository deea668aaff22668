//! Sharded jobs after the plan: their state as the repository holds it (which run of each shard
//! is current, which checkpoints count), `cbcr commit --job` (one snapshot combined from every
//! shard's checkpoints), `cbcr jobs` and `cbcr jobs --abandon`.

use std::collections::BTreeMap;
use std::time::Instant;

use wire::assemble::{self, Entry, EntryKind, SegmentResult};
use wire::job::{self, Checkpoint, CheckpointStats, JobId, JobObject, JobPlan, PlanKind, ShardStart};
use wire::repo::{JobRecord, Snapshot, SnapshotStats};
use wire::{BlobKind, ChunkId};

use crate::error::{Error, Result};
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::pipeline::pack::{BlobWriter, Sealer};
use crate::repo::{JobObjects, Repository};

/// One shard as the repository holds it.
#[derive(Debug, Default)]
pub struct ShardState {
    /// The (token, run id) of its current run, if one started.
    pub current: Option<(u64, u64)>,
    /// The highest token any run of it was started with.
    pub max_token: u64,
    /// The checkpoints that count, by object name.
    pub checkpoints: Vec<(String, Checkpoint)>,
}

impl ShardState {
    /// The segments its counted checkpoints hold.
    pub fn done(&self) -> impl Iterator<Item = &job::SegmentDone> {
        self.checkpoints.iter().flat_map(|(_, c)| &c.segments)
    }

    fn stats(&self) -> CheckpointStats {
        let mut sum = CheckpointStats::default();
        for (_, c) in &self.checkpoints {
            sum.bytes_new += c.stats.bytes_new;
            sum.chunks_new += c.stats.chunks_new;
            sum.bytes_stored += c.stats.bytes_stored;
        }
        sum
    }
}

/// A job: its plan and each shard's state.
pub struct JobState {
    pub plan: JobPlan,
    pub shards: Vec<ShardState>,
}

/// The job `spec` names (32 hex digits), or a usage error saying what a job id is.
pub fn parse_job(spec: &str) -> Result<JobId> {
    JobId::from_hex(spec).ok_or_else(|| {
        Error::Usage(format!(
            "--job {spec:?}: a job id is the 32 hex digits `cbcr plan` printed (`cbcr jobs` lists them)"
        ))
    })
}

impl JobState {
    /// Reads job `job`'s plan and the checkpoints that count for each shard. A job already
    /// committed, or unknown, is an error that says so.
    pub fn load(repo: &Repository, objects: &JobObjects, job: JobId) -> Result<Self> {
        let listed = objects.of(job)?;
        let plan = match objects.get(&JobObject::Plan(job), JobPlan::decode)? {
            Some(plan) if plan.id == job => plan,
            Some(_) => {
                return Err(Error::Integrity(format!(
                    "{}: the plan inside is another job's",
                    objects.path(&JobObject::Plan(job).name()).display()
                )))
            }
            None => return Err(missing_job(repo, job)?),
        };
        let mut shards: Vec<ShardState> = (0..plan.shards.len()).map(|_| ShardState::default()).collect();
        let mut listed_checkpoints: BTreeMap<u32, Vec<(String, u64, u64)>> = BTreeMap::new();
        let mut starts: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for o in &listed {
            match *o {
                JobObject::Start { shard, token, run, .. } => starts.entry(shard).or_default().push((token, run)),
                JobObject::Checkpoint { shard, token, run, .. } => {
                    listed_checkpoints.entry(shard).or_default().push((o.name(), token, run))
                }
                _ => {}
            }
        }
        for (k, state) in shards.iter_mut().enumerate() {
            let k = k as u32;
            let runs = starts.remove(&k).unwrap_or_default();
            state.max_token = runs.iter().map(|r| r.0).max().unwrap_or(0);
            state.current = job::current_run(runs);
            let Some((token, run)) = state.current else { continue };
            let start = JobObject::Start { job, shard: k, token, run };
            let adopted = objects.get(&start, ShardStart::decode)?.map(|s| s.adopted).unwrap_or_default();
            let listed = listed_checkpoints.remove(&k).unwrap_or_default();
            let counted = job::counted_checkpoints(
                (token, run),
                &adopted,
                listed.iter().map(|(name, t, r)| (name.as_str(), *t, *r)),
            );
            for name in counted {
                let object = JobObject::parse(name).expect("listed names parse");
                let Some(c) = objects.get(&object, Checkpoint::decode)? else { continue };
                let JobObject::Checkpoint { token, run, seq, .. } = object else { unreachable!("a checkpoint name") };
                if (c.job, c.shard, c.token, c.run, c.seq) != (job, k, token, run, seq) {
                    return Err(Error::Integrity(format!(
                        "{}: the checkpoint inside is of another shard or run",
                        objects.path(name).display()
                    )));
                }
                state.checkpoints.push((name.to_owned(), c));
            }
        }
        Ok(Self { plan, shards })
    }

    /// Each shard's missing segments, as (shard, missing, of): empty when the job is complete.
    pub fn missing(&self) -> Vec<(usize, usize, usize)> {
        let mut out = vec![];
        for (k, state) in self.shards.iter().enumerate() {
            let done: std::collections::HashSet<(u32, u32)> = state.done().map(|d| (d.file, d.segment)).collect();
            let all: Vec<(u32, u32)> = self.plan.shard_segments(k).collect();
            let missing = all.iter().filter(|s| !done.contains(s)).count();
            if missing > 0 {
                out.push((k, missing, all.len()));
            }
        }
        out
    }
}

/// The snapshot that committed `job`, if one did. Reads every snapshot record: a job's plan is
/// gone once it is committed, and only the snapshot remembers it.
pub(crate) fn committed_as(repo: &Repository, job: JobId) -> Result<Option<Error>> {
    let hex = job.to_hex();
    let committed = repo.snapshots()?.into_iter().find(|(_, s)| s.job.as_ref().is_some_and(|j| j.id == hex));
    Ok(committed.map(|(id, _)| Error::JobCommitted { job: hex, snapshot: id.to_hex() }))
}

/// Why there is no plan for `job`: it was committed (a snapshot records it), or never was.
fn missing_job(repo: &Repository, job: JobId) -> Result<Error> {
    Ok(committed_as(repo, job)?.unwrap_or_else(|| {
        Error::NoJob(format!("no job {} in {} (`cbcr jobs` lists the open ones)", job.to_hex(), repo.location()))
    }))
}

/// A committed job.
pub struct CommitOutcome {
    pub snapshot_id: ChunkId,
    pub snapshot: Snapshot,
    pub checkpoints: usize,
    /// Time to read the checkpoints and build the trees.
    pub combine_s: f64,
}

/// `cbcr commit --job`: one snapshot from every shard's checkpoints, committed only when every
/// segment of the plan has one; then the job's objects are removed.
pub fn commit_job(repo: Repository, job: JobId) -> Result<CommitOutcome> {
    let started = Instant::now();
    let objects = repo.jobs()?;
    let state = JobState::load(&repo, &objects, job)?;
    let missing = state.missing();
    if !missing.is_empty() {
        let shards: Vec<String> =
            missing.iter().map(|(k, n, of)| format!("shard {k}: {n} of {of} segments not checkpointed")).collect();
        return Err(Error::JobIncomplete(format!(
            "job {}: {}; run those shards (`cbcr backup --job {} --shard K`), then commit again",
            job.to_hex(),
            shards.join(", "),
            job.to_hex()
        )));
    }
    let lock = repo.lock()?;
    lock.clean_tmp()?;
    let plan = &state.plan;
    let entries: Vec<Entry> = plan
        .entries
        .iter()
        .map(|e| Entry {
            path: e.path.clone(),
            meta: e.meta,
            kind: match &e.kind {
                PlanKind::File { segments, .. } => EntryKind::File { segments: *segments },
                PlanKind::Dir => EntryKind::Dir,
                PlanKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
            },
        })
        .collect();
    let mut results = vec![];
    let mut stats = SnapshotStats::default();
    for shard in &state.shards {
        for d in shard.done() {
            results.push(SegmentResult { file: d.file as usize, segment: d.segment, list: d.list });
            stats.bytes_read += d.bytes;
            stats.chunks_total += d.chunks;
        }
        let s = shard.stats();
        stats.bytes_new += s.bytes_new;
        stats.chunks_new += s.chunks_new;
        stats.bytes_stored += s.bytes_stored;
    }
    for e in &plan.entries {
        match e.kind {
            PlanKind::File { .. } => {
                stats.files += 1;
                stats.bytes_total += e.meta.size;
            }
            PlanKind::Dir => stats.dirs += 1,
            PlanKind::Symlink { .. } => {}
        }
    }
    // Every tree is new or already stored: one writer, sealed before the commit.
    let index = ChunkIndex::load(&*repo.store)?;
    let known = std::sync::Arc::new(KnownBlobs::new(index));
    let sealer = Sealer::start(std::sync::Arc::clone(&known));
    let mut writer =
        BlobWriter::new(&repo, &known, sealer.sender(), limits::PACK_TARGET_SIZE, limits::DEFAULT_COMPRESSION_LEVEL)?;
    let root = assemble::combine(&entries, &results, |tree| writer.store(BlobKind::Tree, tree).map(|(id, _)| id));
    let written = writer.finish();
    let sealed = sealer.finish();
    let root = root??;
    let written = written?;
    sealed?;
    stats.bytes_stored += written.bytes_stored;
    let combine_s = started.elapsed().as_secs_f64();
    stats.duration_s = combine_s;
    let snapshot = Snapshot {
        version: wire::repo::VERSION,
        // The source's state is the one planned: shards read a source that does not change.
        time: plan.created.clone(),
        host: plan.host.clone(),
        paths: plan.paths.clone(),
        tree: root.to_hex(),
        parent: None,
        stats,
        repaired: None,
        db: plan.db.clone(),
        job: Some(JobRecord { id: job.to_hex(), shards: plan.shards.len() as u32 }),
    };
    let snapshot_id = repo.commit_snapshot(&snapshot)?;
    let checkpoints = state.shards.iter().map(|s| s.checkpoints.len()).sum();
    // Committed: what remains of the job is garbage. A crash here leaves objects that
    // `jobs --abandon` removes; a second commit finds the snapshot and refuses.
    remove_job(&objects, job)?;
    if let Err(e) = known.index().compact_all(&*repo.store) {
        tracing::warn!("{}/index: index runs not merged: {e}", repo.location());
    }
    Ok(CommitOutcome { snapshot_id, snapshot, checkpoints, combine_s })
}

/// Removes every object of `job`, the plan last (so a job is listed until it is all gone).
pub fn remove_job(objects: &JobObjects, job: JobId) -> Result<usize> {
    let all = objects.of(job)?;
    let (plans, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|o| matches!(o, JobObject::Plan(_)));
    for o in rest.iter().chain(&plans) {
        objects.delete(o)?;
    }
    Ok(rest.len() + plans.len())
}

/// `cbcr jobs --abandon JOB`: the job's plan, start records and checkpoints removed; its packs
/// stay (garbage for a gc). Returns how many objects went.
pub fn abandon_job(repo: &Repository, job: JobId) -> Result<usize> {
    let objects = repo.jobs()?;
    if objects.of(job)?.is_empty() {
        return Err(missing_job(repo, job)?);
    }
    remove_job(&objects, job)
}

/// One open job, as `cbcr jobs` shows it.
#[derive(serde::Serialize)]
pub struct JobSummary {
    pub job: String,
    pub created: String,
    pub db: Option<String>,
    pub host: String,
    pub paths: Vec<String>,
    pub bytes: u64,
    pub shards: Vec<ShardSummary>,
}

#[derive(serde::Serialize)]
pub struct ShardSummary {
    pub shard: usize,
    pub segments: usize,
    pub checkpointed: usize,
    pub bytes: u64,
    pub bytes_checkpointed: u64,
    /// The current run's token, if one started.
    pub token: Option<u64>,
}

/// `cbcr jobs`: every open job with each shard's progress.
pub fn list_jobs(repo: &Repository) -> Result<Vec<JobSummary>> {
    let objects = repo.jobs()?;
    let mut out = vec![];
    for o in objects.list()? {
        let JobObject::Plan(job) = o else { continue };
        let state = match JobState::load(repo, &objects, job) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("job {}: {e}; left out", job.to_hex());
                continue;
            }
        };
        let plan = &state.plan;
        let shards = state
            .shards
            .iter()
            .enumerate()
            .map(|(k, s)| ShardSummary {
                shard: k,
                segments: plan.shard_segments(k).count(),
                checkpointed: s.done().count(),
                bytes: plan.shard_bytes(k),
                bytes_checkpointed: s.done().map(|d| plan.segment_len(d.file as usize, d.segment)).sum(),
                token: s.current.map(|c| c.0),
            })
            .collect::<Vec<_>>();
        out.push(JobSummary {
            job: job.to_hex(),
            created: plan.created.clone(),
            db: plan.db.clone(),
            host: plan.host.clone(),
            paths: plan.paths.clone(),
            bytes: shards.iter().map(|s| s.bytes).sum(),
            shards,
        });
    }
    out.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(out)
}
