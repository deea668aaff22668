//! Restore: recreate a snapshot's files under a target directory, all cores writing segments at
//! their offsets, every chunk checked against its id before it is written.
//!
//! The walker (calling thread) creates directories, symlinks and sized empty files (so all-zero
//! chunks stay holes), then queues one job per segment. The core that finishes a file's last
//! segment sets its metadata; directory metadata is set last, deepest first, because writing
//! into a directory changes its mtime.

use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver};
use filetime::FileTime;
use wire::tree::{ChunkList, Metadata, Node, NodeKind, Tree};
use wire::ChunkId;

use crate::error::{Error, IoContext, Result};
use crate::index::ChunkIndex;
use crate::limits;
use crate::output::Reporter;
use crate::pack::BlobReader;
use crate::repo::Repository;
use crate::runtime;

/// What the user asked for.
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Restore only these snapshot paths (and what is below them); empty means everything.
    pub include: Vec<PathBuf>,
    pub cores: usize,
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// A file being restored; the core that finishes its last segment sets its metadata.
struct FileTarget {
    path: PathBuf,
    meta: Metadata,
    segments_left: AtomicUsize,
}

struct SegmentJob {
    file: Arc<FileTarget>,
    list: ChunkId,
    offset: u64,
}

struct Shared {
    repo: Repository,
    index: ChunkIndex,
    first_error: Mutex<Option<Error>>,
}

/// Restores `snapshot` (a spec: `latest`, an id or a prefix) into `opts.target`.
pub fn restore(
    repo: Repository,
    snapshot: &str,
    opts: &RestoreOptions,
    reporter: &mut Reporter,
) -> Result<RestoreStats> {
    let (_, snap) = repo.find_snapshot(snapshot)?;
    let index = ChunkIndex::load(&repo)?;
    let mut reader = BlobReader::new(&repo, &index)?;
    for inc in &opts.include {
        if !in_snapshot(&mut reader, snap.tree_id(), inc)? {
            return Err(Error::Usage(format!("--include {}: not in snapshot {}", inc.display(), snapshot)));
        }
    }
    drop(reader);
    fs::create_dir_all(&opts.target).at(&opts.target)?;
    let shared = Arc::new(Shared { repo, index, first_error: Mutex::new(None) });
    let (job_tx, job_rx) = bounded::<SegmentJob>(opts.cores * limits::SEGMENT_QUEUE_PER_CORE);
    let cores = {
        let shared = Arc::clone(&shared);
        runtime::spawn(opts.cores, move |_| run_core(&shared, &job_rx))?
    };
    if let Some(bar) = reporter.start_bar("restore") {
        bar.set_length(snap.stats.bytes_total);
    }
    let mut walk = RestoreWalk {
        shared: &shared,
        reader: BlobReader::new(&shared.repo, &shared.index)?,
        segment_size: shared.repo.config.segment_size,
        include: opts.include.clone(),
        jobs: job_tx,
        dirs: vec![],
        stats: RestoreStats::default(),
        reporter: &*reporter,
    };
    let walked = walk.tree(&snap.tree_id(), &opts.target, Path::new("/"));
    let RestoreWalk { jobs, dirs, stats, .. } = walk;
    drop(jobs);
    let bytes: u64 = cores.join()?.into_iter().sum();
    reporter.finish();
    walked?;
    if let Some(e) = shared.first_error.lock().expect("no core panics holding it").take() {
        return Err(e);
    }
    for (path, meta) in dirs.iter().rev() {
        set_metadata(path, meta, false)?;
    }
    Ok(RestoreStats { bytes, ..stats })
}

fn run_core(shared: &Shared, jobs: &Receiver<SegmentJob>) -> u64 {
    let mut bytes = 0;
    let mut reader = match BlobReader::new(&shared.repo, &shared.index) {
        Ok(r) => r,
        Err(e) => {
            record(shared, e);
            return 0;
        }
    };
    let (mut list_buf, mut buf) = (Vec::new(), Vec::with_capacity(limits::RESTORE_WRITE_BUFFER));
    for job in jobs.iter() {
        match restore_segment(&mut reader, &job, &mut list_buf, &mut buf) {
            Ok(n) => bytes += n,
            Err(e) => record(shared, e),
        }
    }
    bytes
}

fn record(shared: &Shared, e: Error) {
    shared.first_error.lock().expect("no core panics holding it").get_or_insert(e);
}

/// Writes one segment of one file at its offset; sets the file's metadata if it was the last.
/// Chunks are decompressed straight into `buf` and written in runs of up to
/// [`limits::RESTORE_WRITE_BUFFER`]: cores writing the same file contend for its inode lock once
/// per run, not once per chunk.
fn restore_segment(
    reader: &mut BlobReader<'_>,
    job: &SegmentJob,
    list_buf: &mut Vec<u8>,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let path = &job.file.path;
    reader.read(&job.list, list_buf)?;
    let list = ChunkList::decode(list_buf)
        .map_err(|e| Error::Integrity(format!("chunk list {} of {}: {e}", job.list, path.display())))?;
    let file = OpenOptions::new().write(true).open(path).at(path)?;
    let flush = |buf: &mut Vec<u8>, at: u64| -> Result<()> {
        file.write_all_at(buf, at).at(path)?;
        buf.clear();
        Ok(())
    };
    buf.clear();
    let (mut offset, mut run_start) = (job.offset, job.offset);
    for c in &list.chunks {
        if c.zero || buf.len() + c.len as usize > limits::RESTORE_WRITE_BUFFER {
            flush(buf, run_start)?;
            run_start = offset;
        }
        if c.zero {
            // Never written: the file was sized up front, so this stays a hole.
            run_start += u64::from(c.len);
        } else {
            let before = buf.len();
            reader
                .read_append(&c.id, buf)
                .map_err(|e| Error::Integrity(format!("{} at offset {offset}: {e}", path.display())))?;
            if buf.len() - before != c.len as usize {
                return Err(Error::Integrity(format!(
                    "{}: chunk {} has {} bytes, the list says {}",
                    path.display(),
                    c.id,
                    buf.len() - before,
                    c.len
                )));
            }
        }
        offset += u64::from(c.len);
    }
    flush(buf, run_start)?;
    drop(file);
    if job.file.segments_left.fetch_sub(1, Ordering::AcqRel) == 1 {
        set_metadata(path, &job.file.meta, false)?;
    }
    Ok(list.len_bytes())
}

struct RestoreWalk<'a> {
    shared: &'a Shared,
    reader: BlobReader<'a>,
    segment_size: u64,
    include: Vec<PathBuf>,
    jobs: crossbeam_channel::Sender<SegmentJob>,
    dirs: Vec<(PathBuf, Metadata)>,
    stats: RestoreStats,
    reporter: &'a Reporter,
}

impl RestoreWalk<'_> {
    /// Restores the tree `id`, whose snapshot path is `at`, into the directory `dest`.
    fn tree(&mut self, id: &ChunkId, dest: &Path, at: &Path) -> Result<()> {
        let mut buf = Vec::new();
        self.reader.read(id, &mut buf)?;
        let tree = Tree::decode(&buf).map_err(|e| Error::Integrity(format!("tree {id} ({}): {e}", at.display())))?;
        for node in tree.nodes {
            let name = std::ffi::OsStr::from_bytes(&node.name);
            let (dest, at) = (dest.join(name), at.join(name));
            if !self.included(&at) {
                continue;
            }
            self.node(node, &dest, &at)?;
            if self.shared.first_error.lock().expect("no core panics holding it").is_some() {
                break;
            }
        }
        Ok(())
    }

    fn node(&mut self, node: Node, dest: &Path, at: &Path) -> Result<()> {
        match node.kind {
            NodeKind::Dir { tree } => {
                match fs::create_dir(dest) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dest.is_dir() => {}
                    other => other.at(dest)?,
                }
                self.stats.dirs += 1;
                self.dirs.push((dest.to_owned(), node.meta));
                self.tree(&tree, dest, at)?;
            }
            NodeKind::Symlink { target } => {
                let _ = fs::remove_file(dest);
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), dest).at(dest)?;
                set_metadata(dest, &node.meta, true)?;
            }
            NodeKind::File { segments } => {
                let file = File::create(dest).at(dest)?;
                // Sized up front: chunks that are all zero are never written and stay holes.
                file.set_len(node.meta.size).at(dest)?;
                drop(file);
                self.stats.files += 1;
                self.reporter.advance(0, 1);
                if segments.is_empty() {
                    return set_metadata(dest, &node.meta, false);
                }
                let target = Arc::new(FileTarget {
                    path: dest.to_owned(),
                    meta: node.meta,
                    segments_left: AtomicUsize::new(segments.len()),
                });
                for (i, list) in segments.into_iter().enumerate() {
                    let job = SegmentJob { file: Arc::clone(&target), list, offset: i as u64 * self.segment_size };
                    self.jobs.send(job).map_err(|_| Error::Usage("the cores stopped".into()))?;
                }
            }
        }
        Ok(())
    }

    /// A snapshot path is restored when it is an include path, below one, or above one.
    fn included(&self, at: &Path) -> bool {
        self.include.is_empty() || self.include.iter().any(|inc| at.starts_with(inc) || inc.starts_with(at))
    }
}

/// Whether the absolute snapshot path `path` names a node of the tree `root`.
fn in_snapshot(reader: &mut BlobReader<'_>, root: ChunkId, path: &Path) -> Result<bool> {
    let mut tree_id = root;
    let mut buf = Vec::new();
    let mut names = path.components().filter(|c| !matches!(c, std::path::Component::RootDir)).peekable();
    while let Some(name) = names.next() {
        reader.read(&tree_id, &mut buf)?;
        let tree = Tree::decode(&buf).map_err(|e| Error::Integrity(format!("tree {tree_id}: {e}")))?;
        match tree.find(name.as_os_str().as_bytes()).map(|n| &n.kind) {
            Some(_) if names.peek().is_none() => return Ok(true),
            Some(NodeKind::Dir { tree }) => tree_id = *tree,
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Sets mode, owner (when running as root) and times. `symlink`: of the link itself.
fn set_metadata(path: &Path, meta: &Metadata, symlink: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)).at(path)?;
    }
    let mtime = FileTime::from_unix_time(
        meta.mtime_ns.div_euclid(1_000_000_000),
        meta.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    if symlink {
        filetime::set_symlink_file_times(path, mtime, mtime).at(path)?;
    } else {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode & 0o7777)).at(path)?;
        filetime::set_file_times(path, mtime, mtime).at(path)?;
    }
    Ok(())
}
