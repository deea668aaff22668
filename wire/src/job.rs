//! Sharded backups: a job's plan, its shards' start records and checkpoints, and the rules that
//! decide which run of a shard is current and which checkpoints count. Pure: the data plane
//! stores these as objects of the repository and calls the rules with what it listed.
//!
//! A **plan** lists every entry of the snapshot to be (path, metadata, kind; a file's segment
//! count and how it is cut) and splits the files' segments into shards of about equal bytes.
//! A run of a shard writes a **start** record (its fencing token, a random run id, and the
//! checkpoints of earlier runs it adopts), then a **checkpoint** after each batch of segments
//! whose packs are durable. A run is current when its token is the highest written for the
//! shard (the lowest run id breaks a tie between two runs started at once with one token); only
//! the current run's checkpoints and those it adopted count, so a run fenced off by a take-over
//! can write nothing that a combine would use.

use crate::codec::{self, Reader};
use crate::tree::{decode_meta, encode_meta, Metadata};
use crate::{limits, ChunkId, Result};

const PLAN_MAGIC: &[u8; 4] = b"CBJP";
const START_MAGIC: &[u8; 4] = b"CBJS";
const CHECKPOINT_MAGIC: &[u8; 4] = b"CBJC";
const VERSION: u16 = 1;

/// Most shards one job may have.
pub const MAX_SHARDS: u32 = 1 << 12;
/// Most entries one plan may list.
pub const MAX_PLAN_ENTRIES: u32 = 1 << 24;
/// Most segment results one checkpoint may carry.
pub const MAX_CHECKPOINT_SEGMENTS: u32 = 1 << 16;
/// Most checkpoints a start record may adopt.
pub const MAX_ADOPTED: u32 = 1 << 20;
/// Longest text field (host, database, source spec, a path).
const MAX_TEXT: usize = 4096;
/// Most path components of one entry.
const MAX_DEPTH: usize = 4096;
const META_LEN: usize = 56;

/// A job's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub [u8; 16]);

impl JobId {
    pub fn to_hex(&self) -> String {
        crate::id::to_hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 || !bytes.iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in bytes.chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(out))
    }
}

/// Where a plan's files are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanSource {
    /// Files at their absolute paths: the entries' paths below `/`.
    Paths,
    /// A generated source (`synth://...`), the same on every host.
    Synth(String),
}

/// How a file's segments are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Content-defined chunks with the repository's chunker.
    Content,
    /// Fixed chunks of `chunk` bytes, stored as deltas of `page`-byte pages where they changed.
    Pages { chunk: u32, page: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanKind {
    File { segments: u32, cut: Cut },
    Dir,
    Symlink { target: Vec<u8> },
}

/// One entry of the snapshot a job makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    /// Path components below the snapshot's root.
    pub path: Vec<Vec<u8>>,
    pub meta: Metadata,
    pub kind: PlanKind,
}

/// Segments `first..end` of the file that is entry `file` of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentRange {
    pub file: u32,
    pub first: u32,
    pub end: u32,
}

/// A sharded backup as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobPlan {
    pub id: JobId,
    /// RFC 3339, UTC, when it was planned (the snapshot's time).
    pub created: String,
    pub host: String,
    pub db: Option<String>,
    /// The snapshot's source paths.
    pub paths: Vec<String>,
    pub source: PlanSource,
    /// The repository's segment size when planned (a segment's bytes follow from it).
    pub segment_size: u64,
    pub entries: Vec<PlanEntry>,
    /// Each shard's segments, by file order.
    pub shards: Vec<Vec<SegmentRange>>,
}

impl JobPlan {
    /// The bytes of segment `segment` of entry `file` (its last segment may be short).
    pub fn segment_len(&self, file: usize, segment: u32) -> u64 {
        let size = self.entries.get(file).map_or(0, |e| e.meta.size);
        size.saturating_sub(u64::from(segment) * self.segment_size).min(self.segment_size)
    }

    /// The bytes shard `shard` reads.
    pub fn shard_bytes(&self, shard: usize) -> u64 {
        let ranges = self.shards.get(shard).map_or(&[][..], |r| &r[..]);
        ranges
            .iter()
            .flat_map(|r| (r.first..r.end).map(move |s| (r.file, s)))
            .map(|(f, s)| self.segment_len(f as usize, s))
            .sum()
    }

    /// The segments of shard `shard`, as (file, segment) pairs.
    pub fn shard_segments(&self, shard: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.shards.get(shard).into_iter().flatten().flat_map(|r| (r.first..r.end).map(move |s| (r.file, s)))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        codec::preamble(&mut out, PLAN_MAGIC, VERSION);
        out.extend_from_slice(&self.id.0);
        put_text(&mut out, self.created.as_bytes());
        put_text(&mut out, self.host.as_bytes());
        match &self.db {
            Some(db) => {
                out.push(1);
                put_text(&mut out, db.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.paths.len() as u32).to_le_bytes());
        for p in &self.paths {
            put_text(&mut out, p.as_bytes());
        }
        match &self.source {
            PlanSource::Paths => out.push(0),
            PlanSource::Synth(spec) => {
                out.push(1);
                put_text(&mut out, spec.as_bytes());
            }
        }
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.path.len() as u16).to_le_bytes());
            for name in &e.path {
                put_text(&mut out, name);
            }
            encode_meta(&e.meta, &mut out);
            match &e.kind {
                PlanKind::File { segments, cut } => {
                    out.push(0);
                    out.extend_from_slice(&segments.to_le_bytes());
                    let (chunk, page) = match cut {
                        Cut::Content => (0, 0),
                        Cut::Pages { chunk, page } => (*chunk, *page),
                    };
                    out.extend_from_slice(&chunk.to_le_bytes());
                    out.extend_from_slice(&page.to_le_bytes());
                }
                PlanKind::Dir => out.push(1),
                PlanKind::Symlink { target } => {
                    out.push(2);
                    put_text(&mut out, target);
                }
            }
        }
        out.extend_from_slice(&(self.shards.len() as u32).to_le_bytes());
        for shard in &self.shards {
            out.extend_from_slice(&(shard.len() as u32).to_le_bytes());
            for r in shard {
                for v in [r.file, r.first, r.end] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes a plan and checks it: every file's segments are in exactly one shard's ranges.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "job plan");
        r.preamble(PLAN_MAGIC, VERSION)?;
        let id = JobId(r.array()?);
        let created = text(&mut r)?;
        let host = text(&mut r)?;
        let db = match r.u8()? {
            0 => None,
            1 => Some(text(&mut r)?),
            other => return Err(r.corrupt(format!("database flag {other}"))),
        };
        let count = r.count(limits::MAX_TREE_NODES, 2)?;
        let paths = (0..count).map(|_| text(&mut r)).collect::<Result<Vec<_>>>()?;
        let source = match r.u8()? {
            0 => PlanSource::Paths,
            1 => PlanSource::Synth(text(&mut r)?),
            other => return Err(r.corrupt(format!("source kind {other}"))),
        };
        let segment_size = r.u64()?;
        if !(limits::MIN_SEGMENT_SIZE..=limits::MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(r.corrupt(format!("segment size {segment_size}")));
        }
        let count = r.count(MAX_PLAN_ENTRIES, 2 + META_LEN + 1)?;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let depth = r.u16()? as usize;
            if depth == 0 || depth > MAX_DEPTH {
                return Err(r.corrupt(format!("an entry of {depth} path components")));
            }
            let path = (0..depth).map(|_| raw_text(&mut r, limits::MAX_NAME_LEN)).collect::<Result<Vec<_>>>()?;
            let meta = decode_meta(&mut r)?;
            let kind = match r.u8()? {
                0 => {
                    let segments = r.u32()?;
                    let (chunk, page) = (r.u32()?, r.u32()?);
                    if u64::from(segments) != meta.size.div_ceil(segment_size) {
                        return Err(r.corrupt(format!("a file of {} bytes in {segments} segments", meta.size)));
                    }
                    let cut = match (chunk, page) {
                        (0, 0) => Cut::Content,
                        (c, p) if p > 0 && c > 0 && c.is_multiple_of(p) && c <= limits::MAX_CHUNK_SIZE => {
                            Cut::Pages { chunk: c, page: p }
                        }
                        (c, p) => return Err(r.corrupt(format!("page chunks of {c} bytes for pages of {p}"))),
                    };
                    PlanKind::File { segments, cut }
                }
                1 => PlanKind::Dir,
                2 => PlanKind::Symlink { target: raw_text(&mut r, limits::MAX_LINK_TARGET_LEN)? },
                other => return Err(r.corrupt(format!("entry kind {other}"))),
            };
            entries.push(PlanEntry { path, meta, kind });
        }
        let count = r.count(MAX_SHARDS, 4)?;
        if count == 0 {
            return Err(r.corrupt("no shards".into()));
        }
        let mut shards = Vec::with_capacity(count);
        for _ in 0..count {
            let n = r.count(MAX_PLAN_ENTRIES, 12)?;
            let ranges = (0..n)
                .map(|_| Ok(SegmentRange { file: r.u32()?, first: r.u32()?, end: r.u32()? }))
                .collect::<Result<Vec<_>>>()?;
            shards.push(ranges);
        }
        r.finish()?;
        let plan = Self { id, created, host, db, paths, source, segment_size, entries, shards };
        plan.check_cover().map_err(|detail| crate::Error::Corrupt { what: "job plan", detail })?;
        Ok(plan)
    }

    /// Every segment of every file is in exactly one range, and every range is of a file.
    fn check_cover(&self) -> std::result::Result<(), String> {
        let mut ranges: Vec<SegmentRange> = self.shards.iter().flatten().copied().collect();
        ranges.sort_unstable();
        let mut next: (usize, u32) = (0, 0);
        let files = self.entries.iter().enumerate().filter_map(|(i, e)| match e.kind {
            PlanKind::File { segments, .. } if segments > 0 => Some((i, segments)),
            _ => None,
        });
        let mut ranges = ranges.into_iter().peekable();
        for (file, segments) in files {
            next = (file, 0);
            while next.1 < segments {
                let Some(r) = ranges.next() else {
                    return Err(format!("segment {} of entry {file} is in no shard", next.1));
                };
                if r.file as usize != file || r.first != next.1 || r.end <= r.first || r.end > segments {
                    return Err(format!(
                        "shard range {}:{}..{} does not continue entry {file} at segment {}",
                        r.file, r.first, r.end, next.1
                    ));
                }
                next.1 = r.end;
            }
        }
        match ranges.next() {
            Some(r) => Err(format!(
                "shard range {}:{}..{} is not of a file's segments (after entry {})",
                r.file, r.first, r.end, next.0
            )),
            None => Ok(()),
        }
    }
}

/// Splits the segments of `files` (each: entry index, size in bytes) into at most `shards`
/// shards of about equal bytes: largest segment first, each to the shard with the fewest bytes
/// so far (within one smallest segment of each other, where cutting the file order into runs
/// would be off by up to a whole segment: 1 GiB by default). Each shard's segments are in file
/// order, neighbours of one file merged into one range. Empty shards are left out: fewer
/// segments than shards give fewer shards.
pub fn split(files: &[(u32, u64)], segment_size: u64, shards: u32) -> Vec<Vec<SegmentRange>> {
    use std::cmp::Reverse;
    let mut segments: Vec<(u64, u32, u32)> = vec![];
    for &(file, size) in files {
        for s in 0..size.div_ceil(segment_size) as u32 {
            segments.push(((size - u64::from(s) * segment_size).min(segment_size), file, s));
        }
    }
    segments.sort_by_key(|&(len, file, s)| (Reverse(len), file, s));
    let mut load: std::collections::BinaryHeap<Reverse<(u64, usize)>> =
        (0..shards.max(1) as usize).map(|k| Reverse((0, k))).collect();
    let mut members: Vec<Vec<(u32, u32)>> = vec![vec![]; shards.max(1) as usize];
    for (len, file, s) in segments {
        let Reverse((bytes, k)) = load.pop().expect("one shard at least");
        members[k].push((file, s));
        load.push(Reverse((bytes + len, k)));
    }
    let mut out: Vec<Vec<SegmentRange>> = members
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|mut m| {
            m.sort_unstable();
            let mut ranges: Vec<SegmentRange> = vec![];
            for (file, s) in m {
                match ranges.last_mut() {
                    Some(r) if r.file == file && r.end == s => r.end += 1,
                    _ => ranges.push(SegmentRange { file, first: s, end: s + 1 }),
                }
            }
            ranges
        })
        .collect();
    if out.is_empty() {
        out.push(vec![]);
    }
    out
}

/// A run of one shard, as its start record says: written before its first checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStart {
    pub job: JobId,
    pub shard: u32,
    pub token: u64,
    pub run: u64,
    /// The checkpoint objects of earlier runs this run took over (their segments are done).
    pub adopted: Vec<String>,
}

impl ShardStart {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        codec::preamble(&mut out, START_MAGIC, VERSION);
        out.extend_from_slice(&self.job.0);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.run.to_le_bytes());
        out.extend_from_slice(&(self.adopted.len() as u32).to_le_bytes());
        for name in &self.adopted {
            put_text(&mut out, name.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "shard start record");
        r.preamble(START_MAGIC, VERSION)?;
        let (job, shard, token, run) = (JobId(r.array()?), r.u32()?, r.u64()?, r.u64()?);
        let n = r.count(MAX_ADOPTED, 2)?;
        let adopted = (0..n).map(|_| text(&mut r)).collect::<Result<Vec<_>>>()?;
        r.finish()?;
        Ok(Self { job, shard, token, run, adopted })
    }
}

/// What one segment of a shard became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentDone {
    pub file: u32,
    pub segment: u32,
    pub list: ChunkId,
    /// Bytes read and chunks cut for it.
    pub bytes: u64,
    pub chunks: u64,
}

/// What a run of a shard added to the repository in one batch of checkpointed segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    pub bytes_new: u64,
    pub chunks_new: u64,
    pub bytes_stored: u64,
}

/// Segments of a shard whose packs are durable: written by a run after it made them so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub job: JobId,
    pub shard: u32,
    pub token: u64,
    pub run: u64,
    pub seq: u32,
    pub stats: CheckpointStats,
    pub segments: Vec<SegmentDone>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.segments.len() * 56);
        codec::preamble(&mut out, CHECKPOINT_MAGIC, VERSION);
        out.extend_from_slice(&self.job.0);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.run.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        for v in [self.stats.bytes_new, self.stats.chunks_new, self.stats.bytes_stored] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for s in &self.segments {
            out.extend_from_slice(&s.file.to_le_bytes());
            out.extend_from_slice(&s.segment.to_le_bytes());
            out.extend_from_slice(&s.list.0);
            out.extend_from_slice(&s.bytes.to_le_bytes());
            out.extend_from_slice(&s.chunks.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "shard checkpoint");
        r.preamble(CHECKPOINT_MAGIC, VERSION)?;
        let (job, shard, token, run, seq) = (JobId(r.array()?), r.u32()?, r.u64()?, r.u64()?, r.u32()?);
        let stats = CheckpointStats { bytes_new: r.u64()?, chunks_new: r.u64()?, bytes_stored: r.u64()? };
        let n = r.count(MAX_CHECKPOINT_SEGMENTS, 56)?;
        let segments = (0..n)
            .map(|_| {
                Ok(SegmentDone {
                    file: r.u32()?,
                    segment: r.u32()?,
                    list: ChunkId(r.array()?),
                    bytes: r.u64()?,
                    chunks: r.u64()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        r.finish()?;
        Ok(Self { job, shard, token, run, seq, stats, segments })
    }
}

/// What a job's object is, by its name (all of a repository's job objects share one folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobObject {
    /// `<job>.plan`
    Plan(JobId),
    /// `<job>.<shard>.<token>.<run>.start`
    Start { job: JobId, shard: u32, token: u64, run: u64 },
    /// `<job>.<shard>.<token>.<run>.<seq>.ckpt`
    Checkpoint { job: JobId, shard: u32, token: u64, run: u64, seq: u32 },
}

impl JobObject {
    pub fn name(&self) -> String {
        match self {
            JobObject::Plan(job) => format!("{}.plan", job.to_hex()),
            JobObject::Start { job, shard, token, run } => {
                format!("{}.{shard}.{token:016x}.{run:016x}.start", job.to_hex())
            }
            JobObject::Checkpoint { job, shard, token, run, seq } => {
                format!("{}.{shard}.{token:016x}.{run:016x}.{seq:08x}.ckpt", job.to_hex())
            }
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        let parts: Vec<&str> = name.split('.').collect();
        let job = JobId::from_hex(parts.first()?)?;
        let hex64 = |s: &str| (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten();
        let shard = |s: &str| s.parse::<u32>().ok().filter(|n| n.to_string() == s);
        Some(match parts[1..] {
            ["plan"] => JobObject::Plan(job),
            [k, t, r, "start"] => JobObject::Start { job, shard: shard(k)?, token: hex64(t)?, run: hex64(r)? },
            [k, t, r, s, "ckpt"] if s.len() == 8 => JobObject::Checkpoint {
                job,
                shard: shard(k)?,
                token: hex64(t)?,
                run: hex64(r)?,
                seq: u32::from_str_radix(s, 16).ok()?,
            },
            _ => return None,
        })
    }

    pub fn job(&self) -> JobId {
        match self {
            JobObject::Plan(job) => *job,
            JobObject::Start { job, .. } | JobObject::Checkpoint { job, .. } => *job,
        }
    }
}

/// The current run of a shard among the (token, run id) of its start records: the highest
/// token, and of two runs started with it, the lower run id.
pub fn current_run(starts: impl IntoIterator<Item = (u64, u64)>) -> Option<(u64, u64)> {
    starts.into_iter().max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
}

/// The checkpoint objects that count for a shard whose current run is `current` and adopted
/// `adopted`: the current run's own, and those it adopted that are still listed.
pub fn counted_checkpoints<'a>(
    current: (u64, u64),
    adopted: &[String],
    listed: impl IntoIterator<Item = (&'a str, u64, u64)>,
) -> Vec<&'a str> {
    let adopted: std::collections::HashSet<&str> = adopted.iter().map(String::as_str).collect();
    listed
        .into_iter()
        .filter(|(name, token, run)| (*token, *run) == current || adopted.contains(name))
        .map(|(name, _, _)| name)
        .collect()
}

fn put_text(out: &mut Vec<u8>, bytes: &[u8]) {
    assert!(bytes.len() <= MAX_TEXT, "text fields of a job are at most {MAX_TEXT} bytes");
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn raw_text(r: &mut Reader<'_>, max: usize) -> Result<Vec<u8>> {
    let len = r.u16()? as usize;
    if len > max {
        return Err(r.corrupt(format!("a text field of {len} bytes")));
    }
    Ok(r.bytes(len)?.to_vec())
}

fn text(r: &mut Reader<'_>) -> Result<String> {
    let bytes = raw_text(r, MAX_TEXT)?;
    String::from_utf8(bytes).map_err(|_| r.corrupt("a text field that is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str, size: u64, seg: u64) -> PlanEntry {
        PlanEntry {
            path: path.split('/').map(|c| c.as_bytes().to_vec()).collect(),
            meta: Metadata { mode: 0o100600, size, mtime_ns: -5, ..Default::default() },
            kind: PlanKind::File { segments: size.div_ceil(seg) as u32, cut: Cut::Pages { chunk: 65536, page: 8192 } },
        }
    }

    fn plan(shards: u32) -> JobPlan {
        let seg = 1 << 20;
        let mut entries = vec![PlanEntry {
            path: vec![b"d".to_vec()],
            meta: Metadata { mode: 0o40700, ..Default::default() },
            kind: PlanKind::Dir,
        }];
        entries.push(file("d/a", 5 << 20, seg));
        entries.push(file("d/b", 100, seg));
        entries.push(file("d/empty", 0, seg));
        entries.push(PlanEntry {
            path: vec![b"d".to_vec(), b"link".to_vec()],
            meta: Metadata::default(),
            kind: PlanKind::Symlink { target: b"a".to_vec() },
        });
        entries.push(file("d/c", (3 << 20) + 1, seg));
        let files: Vec<(u32, u64)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, PlanKind::File { .. }))
            .map(|(i, e)| (i as u32, e.meta.size))
            .collect();
        JobPlan {
            id: JobId([7; 16]),
            created: "2026-12-04T10:00:00Z".into(),
            host: "db1".into(),
            db: Some("pg1".into()),
            paths: vec!["/d".into()],
            source: PlanSource::Synth("synth://pg?size=9MiB".into()),
            segment_size: seg,
            shards: split(&files, seg, shards),
            entries,
        }
    }

    #[test]
    fn plans_round_trip_and_every_segment_is_in_one_shard() {
        for n in [1, 2, 3, 4, 16] {
            let p = plan(n);
            assert_eq!(JobPlan::decode(&p.encode()).unwrap(), p);
            // 5 + 1 + 4 segments over the shards, of about equal bytes.
            let counts: usize = (0..p.shards.len()).map(|k| p.shard_segments(k).count()).sum();
            assert_eq!(counts, 10);
            assert!(p.shards.len() <= n as usize);
            let bytes: Vec<u64> = (0..p.shards.len()).map(|k| p.shard_bytes(k)).collect();
            assert_eq!(bytes.iter().sum::<u64>(), (8 << 20) + 101);
            if n == 4 {
                assert_eq!(p.shards.len(), 4);
                // Eight whole segments and two small ones: two whole ones each.
                assert!(bytes.iter().all(|&b| (2 << 20..=(2 << 20) + 101).contains(&b)), "{bytes:?}");
            }
        }
    }

    #[test]
    fn a_plan_that_leaves_a_segment_out_or_names_one_twice_is_refused() {
        let mut p = plan(2);
        p.shards[1].pop();
        assert!(JobPlan::decode(&p.encode()).unwrap_err().to_string().contains("no shard"));
        let mut p = plan(2);
        let first = p.shards[0][0];
        p.shards[1].push(first);
        assert!(JobPlan::decode(&p.encode()).is_err());
        let mut p = plan(1);
        p.shards[0].push(SegmentRange { file: 0, first: 0, end: 1 });
        assert!(JobPlan::decode(&p.encode()).is_err(), "a range of a directory");
    }

    #[test]
    fn the_highest_token_is_current_and_only_its_checkpoints_and_adoptions_count() {
        assert_eq!(current_run([(1, 5), (3, 9), (3, 2), (2, 1)]), Some((3, 2)));
        assert_eq!(current_run([]), None);
        let listed = [("a", 1, 5), ("b", 1, 5), ("c", 3, 2), ("zombie", 1, 5), ("twin", 3, 9)];
        let counted = counted_checkpoints((3, 2), &["a".into(), "b".into()], listed);
        assert_eq!(counted, vec!["a", "b", "c"]);
    }

    #[test]
    fn object_names_round_trip_and_strays_are_not_parsed() {
        let job = JobId([0xab; 16]);
        for o in [
            JobObject::Plan(job),
            JobObject::Start { job, shard: 3, token: 7, run: u64::MAX },
            JobObject::Checkpoint { job, shard: 0, token: 1, run: 2, seq: 9 },
        ] {
            assert_eq!(JobObject::parse(&o.name()), Some(o.clone()));
        }
        for stray in ["x.plan", "abab.plan", &format!("{}.03.{:016x}.{:016x}.start", job.to_hex(), 1, 2), "notes.txt"] {
            assert_eq!(JobObject::parse(stray), None, "{stray}");
        }
    }

    #[test]
    fn checkpoints_and_starts_round_trip() {
        let c = Checkpoint {
            job: JobId([1; 16]),
            shard: 2,
            token: 3,
            run: 4,
            seq: 5,
            stats: CheckpointStats { bytes_new: 6, chunks_new: 7, bytes_stored: 8 },
            segments: vec![SegmentDone { file: 1, segment: 2, list: ChunkId([9; 32]), bytes: 10, chunks: 11 }],
        };
        assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
        let s = ShardStart { job: JobId([1; 16]), shard: 2, token: 3, run: 4, adopted: vec!["x.ckpt".into()] };
        assert_eq!(ShardStart::decode(&s.encode()).unwrap(), s);
    }

    proptest! {
        #[test]
        fn split_covers_every_segment_once(sizes in proptest::collection::vec(0u64..10_000, 0..40), shards in 1u32..20) {
            let files: Vec<(u32, u64)> = sizes.iter().enumerate().map(|(i, s)| (i as u32, *s)).collect();
            let out = split(&files, 1000, shards);
            prop_assert!(out.len() <= shards as usize);
            // Balanced within one segment.
            let bytes: Vec<u64> = out.iter().map(|ranges| ranges.iter().flat_map(|r| (r.first..r.end).map(move |s| (r.file, s)))
                .map(|(f, s)| (sizes[f as usize] - u64::from(s) * 1000).min(1000)).sum()).collect();
            if let (Some(max), Some(min)) = (bytes.iter().max(), bytes.iter().min()) {
                prop_assert!(out.len() < shards as usize || max - min <= 1000, "{bytes:?}");
            }
            let mut seen: Vec<(u32, u32)> = out.iter().flatten().flat_map(|r| (r.first..r.end).map(move |s| (r.file, s))).collect();
            let all = seen.len();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), all);
            let want: usize = sizes.iter().map(|s| s.div_ceil(1000) as usize).sum();
            prop_assert_eq!(all, want);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let _ = JobPlan::decode(&bytes);
            let _ = ShardStart::decode(&bytes);
            let _ = Checkpoint::decode(&bytes);
            let good = plan(3).encode();
            let mut framed = good[..cut.min(good.len())].to_vec();
            framed.extend_from_slice(&bytes);
            let _ = JobPlan::decode(&framed);
            let _ = JobObject::parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn a_flipped_byte_is_an_error_or_another_valid_plan(at in 0usize..10_000, bit in 0u8..8) {
            let good = plan(3).encode();
            let mut bad = good.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            if let Ok(p) = JobPlan::decode(&bad) {
                prop_assert!(p.check_cover().is_ok());
            }
        }
    }
}
