//! `cbcr plan`: one walk of the source into a job's plan: every entry of the snapshot to be,
//! each file's cut decided once (so every shard cuts alike), and the segments split into shards
//! of about equal bytes. The plan is stored in the repository; shards run from it anywhere.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use wire::job::{self, Cut, JobId, JobObject, JobPlan, PlanEntry, PlanKind, PlanSource};
use wire::tree::Metadata;

use super::{canonical_sources, check_chunking, metadata, BackupSource, ChunkingRules, FilePlan};
use crate::error::{Error, Result};
use crate::events::Run;
use crate::pipeline::chunker::ChunkPolicy;
use crate::repo::Repository;
use crate::source::engine;
use crate::source::exclude::{self, Excludes};
use crate::source::synth::{self, SynthSpec};

/// How a plan's segments are split.
#[derive(Clone, Copy, Debug)]
pub enum ShardCount {
    /// Into this many shards (fewer when there are fewer segments).
    Shards(u32),
    /// Into shards of about this many bytes.
    Bytes(u64),
}

pub struct PlanOptions {
    /// The job's id, chosen by the caller (a control plane), else random. With one, planning
    /// is idempotent: a plan of that id already there is the answer (when it has the same
    /// shard count), and the shard count is exact (some shards may be empty), since shards are
    /// handed out by number.
    pub job: Option<JobId>,
    pub source: BackupSource,
    pub db: Option<String>,
    pub shards: ShardCount,
    pub chunking: ChunkingRules,
    pub excludes: Excludes,
}

/// A plan as stored.
pub struct Planned {
    pub plan: JobPlan,
    /// Entries the walk left out (unreadable; each warned about).
    pub skipped: u64,
    /// The plan of the caller's job id was there already and is the answer (nothing walked).
    pub reused: bool,
}

/// Walks the source and stores the plan as a new job (or finds the plan of `opts.job`).
pub fn plan(repo: &Repository, opts: &PlanOptions, run: &Run) -> Result<Planned> {
    let objects = repo.jobs()?;
    if let Some(id) = opts.job {
        if let Some(existing) = objects.get(&JobObject::Plan(id), JobPlan::decode)? {
            if let ShardCount::Shards(n) = opts.shards {
                if existing.shards.len() != n as usize {
                    return Err(Error::Usage(format!(
                        "job {} is planned already with {} shards, not {n}",
                        id.to_hex(),
                        existing.shards.len()
                    )));
                }
            }
            return Ok(Planned { plan: existing, skipped: 0, reused: true });
        }
        if let Some(committed) = crate::command::jobs::committed_as(repo, id)? {
            return Err(committed);
        }
    }
    if let Some(db) = opts.db.as_deref().filter(|db| !wire::repo::is_db_name(db)) {
        return Err(Error::Usage(format!("--db {db:?}: a database name is 1 to 255 bytes without control characters")));
    }
    let segment = repo.config.segment_size;
    check_chunking(&opts.chunking, segment)?;
    let mut walk = PlanWalk {
        entries: vec![],
        chunking: &opts.chunking,
        excludes: &opts.excludes,
        cdc: ChunkPolicy::Cdc(repo.config.chunker),
        segment,
        skipped: 0,
        run,
        postgres_data: vec![],
    };
    let (paths, source) = match &opts.source {
        BackupSource::Paths(paths) => {
            let paths = canonical_sources(paths)?;
            walk.sources(&paths)?;
            (paths.iter().map(|p| p.to_string_lossy().into_owned()).collect(), PlanSource::Paths)
        }
        BackupSource::Synth(spec) => {
            if !segment.is_multiple_of(synth::PAGE as u64) {
                return Err(Error::Usage("synth:// sources need a segment size that is a multiple of 8 KiB".into()));
            }
            walk.synth(spec);
            (vec![spec.source_name()], PlanSource::Synth(spec.url()))
        }
        BackupSource::Stdin(_) => {
            return Err(Error::Usage("a stream cannot be sharded: only paths or a synth:// source".into()))
        }
    };
    let files: Vec<(u32, u64)> = walk
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, PlanKind::File { .. }))
        .map(|(i, e)| (i as u32, e.meta.size))
        .collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    let count = match opts.shards {
        ShardCount::Shards(n) => n,
        ShardCount::Bytes(b) => u32::try_from(total.div_ceil(b.max(1))).unwrap_or(u32::MAX),
    };
    if count == 0 || count > job::MAX_SHARDS {
        return Err(Error::Usage(format!(
            "{count} shards: a job has 1 to {} (give --shards, or a larger --shard-bytes)",
            job::MAX_SHARDS
        )));
    }
    if walk.entries.len() > job::MAX_PLAN_ENTRIES as usize {
        return Err(Error::Usage(format!(
            "{} entries: a plan holds at most {}; plan the source's directories as separate jobs",
            walk.entries.len(),
            job::MAX_PLAN_ENTRIES
        )));
    }
    let id = match opts.job {
        Some(id) => id,
        None => {
            let mut id = [0u8; 16];
            getrandom::getrandom(&mut id).map_err(|e| Error::Internal(format!("no random bytes for a job id: {e}")))?;
            JobId(id)
        }
    };
    let mut shards = job::split(&files, segment, count);
    if opts.job.is_some() {
        shards.resize(count as usize, vec![]);
    }
    let skipped = walk.skipped;
    let plan = JobPlan {
        id,
        created: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        host: crate::source::hostname(),
        db: opts.db.clone(),
        paths,
        source,
        segment_size: segment,
        shards,
        entries: walk.entries,
    };
    objects.put(&JobObject::Plan(plan.id), &plan.encode())?;
    Ok(Planned { plan, skipped, reused: false })
}

struct PlanWalk<'a> {
    entries: Vec<PlanEntry>,
    chunking: &'a ChunkingRules,
    excludes: &'a Excludes,
    cdc: ChunkPolicy,
    segment: u64,
    skipped: u64,
    run: &'a Run,
    /// The PostgreSQL data directories the walk is in (their own exclusions apply).
    postgres_data: Vec<PathBuf>,
}

/// The components of an absolute path, as a plan's entry path.
fn components(path: &Path) -> Vec<Vec<u8>> {
    path.components().skip(1).map(|c| c.as_os_str().as_bytes().to_vec()).collect()
}

impl PlanWalk<'_> {
    /// The source paths and their ancestors (as directories), in path order.
    fn sources(&mut self, paths: &[PathBuf]) -> Result<()> {
        let mut ancestors = BTreeMap::new();
        for p in paths {
            for a in p.ancestors().skip(1).filter(|a| a.parent().is_some()) {
                ancestors.insert(a.to_owned(), ());
            }
        }
        for a in ancestors.keys() {
            let md = fs::symlink_metadata(a).map_err(|e| Error::NotFound(format!("{}: {e}", a.display())))?;
            self.entries.push(PlanEntry { path: components(a), meta: metadata(&md), kind: PlanKind::Dir });
        }
        for p in paths {
            self.entry(p)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path) -> Result<()> {
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) => return self.skip(path, &e.to_string()),
        };
        let meta = metadata(&md);
        let ft = md.file_type();
        if ft.is_dir() {
            self.entries.push(PlanEntry { path: components(path), meta, kind: PlanKind::Dir });
            self.dir(path)
        } else if ft.is_file() {
            let mut head = vec![0; engine::HEAD.min(meta.size as usize)];
            if let Err(e) = fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)) {
                return self.skip(path, &format!("cannot read: {e}"));
            }
            let (plan, why) = self.chunking.for_path(path).plan(path, meta.size, &head, self.cdc, self.segment);
            if let Some(why) = why {
                self.run.warn(path, &why);
            }
            self.file(components(path), meta, plan);
            Ok(())
        } else if ft.is_symlink() {
            match fs::read_link(path) {
                Ok(target) => {
                    let target = target.as_os_str().as_bytes().to_vec();
                    self.entries.push(PlanEntry { path: components(path), meta, kind: PlanKind::Symlink { target } });
                }
                Err(e) => return self.skip(path, &e.to_string()),
            }
            Ok(())
        } else {
            self.skip(path, "not a regular file, directory or symlink: left out")
        }
    }

    fn dir(&mut self, path: &Path) -> Result<()> {
        let mut names: Vec<_> = match fs::read_dir(path) {
            Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
            Err(e) => return self.skip(path, &format!("cannot list directory: {e}")),
        };
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let data_dir = self.excludes.postgres_defaults
            && exclude::is_postgres_data_dir(&names.iter().map(|n| n.as_bytes()).collect::<Vec<_>>());
        if data_dir {
            self.postgres_data.push(path.to_owned());
        }
        for name in names {
            let child = path.join(name);
            let in_data = self.postgres_data.last().and_then(|root| child.strip_prefix(root).ok());
            if !(self.excludes.matches(&child) || in_data.is_some_and(exclude::postgres_skips)) {
                self.entry(&child)?;
            }
        }
        if data_dir {
            self.postgres_data.pop();
        }
        Ok(())
    }

    fn file(&mut self, path: Vec<Vec<u8>>, meta: Metadata, plan: FilePlan) {
        let cut = match (plan.policy, plan.page) {
            (ChunkPolicy::Fixed(chunk), Some(page)) => Cut::Pages { chunk, page },
            _ => Cut::Content,
        };
        let segments = meta.size.div_ceil(self.segment) as u32;
        self.entries.push(PlanEntry { path, meta, kind: PlanKind::File { segments, cut } });
    }

    /// Leaves an entry out, warning why; the plan goes on.
    fn skip(&mut self, path: &Path, why: &str) -> Result<()> {
        self.skipped += 1;
        self.run.warn(path, why);
        Ok(())
    }

    /// A generated source: its directories and files as a backup of it records them.
    fn synth(&mut self, spec: &SynthSpec) {
        let mut dirs = BTreeMap::new();
        let mut files = vec![];
        for f in spec.files() {
            let parts: Vec<&str> = f.path.split('/').collect();
            for depth in 1..parts.len() {
                dirs.insert(parts[..depth].join("/"), ());
            }
            files.push(f);
        }
        let split = |p: &str| p.split('/').map(|c| c.as_bytes().to_vec()).collect::<Vec<_>>();
        for d in dirs.keys() {
            self.entries.push(PlanEntry { path: split(d), meta: spec.dir_metadata(), kind: PlanKind::Dir });
        }
        for f in files {
            let meta = f.metadata();
            let mut head = vec![0; if f.len() >= synth::PAGE as u64 { synth::PAGE } else { 0 }];
            spec.fill(&f, 0, &mut head);
            let path = Path::new(&f.path);
            let (plan, _) = self.chunking.for_path(path).plan(path, f.len(), &head, self.cdc, self.segment);
            self.file(split(&f.path), meta, plan);
        }
    }
}
