//! Where a repository's objects live, behind one trait: a local directory (the embedded
//! default) or S3-compatible object storage. A repository served by a receiver reaches these
//! through the receiver, which stores into one of them.
//!
//! Objects are named by kind and name: a pack `<hex>.pack`, an index run `<hex>.idx`, a
//! snapshot `<hex>`, a key `<key id>`, the config. Every object but the config is named by the
//! hash of its bytes or never rewritten, so several writers can share one store without a lock
//! server as long as none deletes what another depends on (see [`crate::index`] for the index
//! rule). Every store also has a private local work directory: files being written (`tmp/`) and
//! the index runs searched in place (`index/`).

mod crash;
pub(crate) mod journal;
mod local;
mod s3;

use std::path::{Path, PathBuf};

pub use local::LocalDir;
pub use s3::S3Store;

use wire::ChunkId;

use crate::error::Result;

/// What an object is; decides where a store keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    /// Who committed a snapshot through a receiver's policy: `writers/<snapshot id>_<writer>`,
    /// empty (the name says it all, so one listing finds every writer).
    Writer,
    /// The copies of blobs `verify` found damaged (a [`wire::verify::DamagedBlobs`]), named by
    /// the hash of their bytes; `repair packs` removes them once the index leaves them out.
    Damaged,
    /// A sharded backup's plan, its shards' start records and checkpoints
    /// (`jobs/<job>.plan`, see [`wire::job::JobObject`]).
    Job,
}

impl ObjectKind {
    /// The object's key relative to the repository root (`packs/ab/<name>`, `index/<name>`).
    pub fn key(self, name: &str) -> String {
        match self {
            ObjectKind::Config => "config".into(),
            ObjectKind::Key => format!("keys/{name}"),
            ObjectKind::Pack => format!("packs/{}/{name}", name.get(..2).unwrap_or("__")),
            ObjectKind::Index => format!("index/{name}"),
            ObjectKind::Snapshot => format!("snapshots/{name}"),
            ObjectKind::Writer => format!("writers/{name}"),
            ObjectKind::Damaged => format!("damaged/{name}"),
            ObjectKind::Job => format!("jobs/{name}"),
        }
    }

    /// The folder that [`Store::list`] lists.
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Config => "",
            ObjectKind::Key => "keys",
            ObjectKind::Pack => "packs",
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Writer => "writers",
            ObjectKind::Damaged => "damaged",
            ObjectKind::Job => "jobs",
        }
    }
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectInfo {
    pub name: String,
    pub len: u64,
}

/// An object open for reads at offsets (a pack being restored or verified).
pub trait ObjectReader: Send {
    /// The object's length in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an object shorter than that is an `Io` error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// Held while a backup writes. A local directory allows one writer at a time (`flock`); an
/// object store allows several, and the claim only guards this process's work directory.
pub trait WriterClaim: Send + Sync {
    /// Removes what interrupted writers of this work directory left in `tmp/`.
    fn clean_tmp(&self) -> Result<()>;
}

/// The claim both stores give: the work directory's `tmp/`, and for a local directory the
/// `flock` held as long as the claim lives.
struct TmpClaim {
    /// `None` for a shared claim, which must not clean what other writers are writing.
    tmp: Option<PathBuf>,
    _lock: Option<std::fs::File>,
}

impl WriterClaim for TmpClaim {
    fn clean_tmp(&self) -> Result<()> {
        self.tmp.as_deref().map_or(Ok(()), local::clean_dir)
    }
}

/// Everything the commands need from where a repository lives.
pub trait Store: Send + Sync {
    /// Where the repository is, for messages: a directory, or `s3://BUCKET/PREFIX`.
    fn location(&self) -> String;
    /// This process's local directory for files being written (`tmp/`) and index runs.
    fn work_dir(&self) -> &Path;
    /// Whether the store holds no object at all (a repository may be created there).
    fn is_empty(&self) -> Result<bool>;
    /// Prepares an empty store for a new repository's first objects.
    fn create(&self) -> Result<()>;
    /// The whole object, or `None` when there is none of that name.
    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>>;
    /// Opens an object for reads at offsets; a missing object is an `Io` error of kind NotFound.
    fn open(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectReader>>;
    /// Stores `bytes` under the name: afterwards the object is complete and durable, or absent.
    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()>;
    /// Stores the complete, fsynced file `tmp` (under [`Store::work_dir`]) as the object and
    /// consumes it; an index run then stays readable at [`Store::index_run`].
    fn put_file(&self, kind: ObjectKind, name: &str, tmp: &Path) -> Result<()>;
    /// Every object of a kind, sorted by name; names that are not the kind's are listed too
    /// (verify reports them).
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;
    /// Removes an object; one already gone is no error.
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()>;
    /// A local file holding index run `name`, to be searched in place (fetched when needed).
    fn index_run(&self, name: &str) -> Result<PathBuf>;
    /// Takes the writer's claim, or fails at once with `Error::Locked`.
    fn claim_writer(&self) -> Result<Box<dyn WriterClaim>>;
    /// A claim that writers of the shards of one job share: several at once, but none while a
    /// [`Store::claim_writer`] claim is held (that one cleans `tmp/` and merges the index).
    /// It cleans nothing: what a killed shard left in `tmp/` goes with the next full claim.
    fn claim_shared_writer(&self) -> Result<Box<dyn WriterClaim>>;

    /// A fresh path in the work directory's `tmp/` for a file being written.
    fn tmp_path(&self, what: &str) -> PathBuf {
        tmp_path(self.work_dir(), what)
    }
}

/// The object name of pack `id`.
pub fn pack_name(id: &ChunkId) -> String {
    format!("{}.pack", id.to_hex())
}

/// Whether `name` is one cbcr gives an object of `kind` (`<id>.pack`, `<id>.idx`, `<id>`).
pub fn is_object_name(kind: ObjectKind, name: &str) -> bool {
    let id = match kind {
        ObjectKind::Pack => name.strip_suffix(".pack"),
        ObjectKind::Index => name.strip_suffix(".idx"),
        ObjectKind::Snapshot | ObjectKind::Damaged => Some(name),
        ObjectKind::Config | ObjectKind::Key | ObjectKind::Writer => return true,
        ObjectKind::Job => return wire::job::JobObject::parse(name).is_some(),
    };
    id.is_some_and(|id| ChunkId::from_hex(id).is_ok())
}

/// The name of the writer record of snapshot `id` committed by `writer`.
pub fn writer_name(id: &ChunkId, writer: &str) -> String {
    format!("{}_{writer}", id.to_hex())
}

/// The snapshot and writer a writer record's name gives, if it is one.
pub fn parse_writer_name(name: &str) -> Option<(ChunkId, &str)> {
    let (id, writer) = name.split_once('_')?;
    Some((ChunkId::from_hex(id).ok()?, writer)).filter(|(_, w)| !w.is_empty())
}

/// A stray file as messages name it: its folder and name (packs may sit in a fan-out folder).
pub fn stray_name(store: &dyn Store, kind: ObjectKind, name: &str) -> String {
    format!("{}/{}: {name}", store.location(), kind.dir())
}

/// The objects of `kind` that cbcr wrote. Anything else in their folder (a stray file, an
/// editor's backup) is skipped with a warning naming it: it never blocks a command (`verify`
/// reports it).
pub fn list_objects(store: &dyn Store, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
    let (ours, strays): (Vec<ObjectInfo>, Vec<ObjectInfo>) =
        store.list(kind)?.into_iter().partition(|o| is_object_name(kind, &o.name));
    for stray in strays {
        tracing::warn!(
            "{}: not a cbcr object name; skipped (move it out of the repository)",
            stray_name(store, kind, &stray.name)
        );
    }
    Ok(ours)
}

/// The object name of the index run whose bytes hash to `id`.
pub fn index_run_name(id: &ChunkId) -> String {
    format!("{}.idx", id.to_hex())
}

/// Opens the store a `--repo` value names: `s3://BUCKET/PREFIX`, or a local directory.
pub fn open(spec: &str) -> Result<Box<dyn Store>> {
    // `quic:/h:p` or `s3:bucket` is a URL with a typo, not a directory to create.
    if let Some(scheme) =
        ["quic:", "s3:"].into_iter().find(|s| spec.starts_with(s) && !spec[s.len()..].starts_with("//"))
    {
        return Err(crate::error::Error::Usage(format!(
            "{spec}: a repository URL is {scheme}//...; for a local directory of that name, write ./{spec}"
        )));
    }
    let store: Box<dyn Store> = match spec.strip_prefix("s3://") {
        Some(rest) => Box::new(S3Store::open(rest)?),
        None => Box::new(LocalDir::new(Path::new(spec))),
    };
    Ok(if crate::fault::armed_in_store() { Box::new(crash::CrashPoints(store)) } else { store })
}

/// fsync a file or directory by path (a directory: making the entries made in it durable).
pub(crate) fn sync_path(path: &Path) -> Result<()> {
    use crate::error::IoContext;
    std::fs::File::open(path).and_then(|f| f.sync_all()).at(path)?;
    journal::record(journal::Step::Fsync(path));
    Ok(())
}

/// fsync an open file (at `path`, for messages and the sync journal).
pub(crate) fn sync_file(file: &std::fs::File, path: &Path) -> Result<()> {
    use crate::error::IoContext;
    file.sync_all().at(path)?;
    journal::record(journal::Step::Fsync(path));
    Ok(())
}

/// Writes `bytes` as the file `path` and fsyncs it; a failed write leaves no file.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use crate::error::IoContext;
    let written = std::fs::write(path, bytes).at(path).and_then(|()| sync_path(path));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// A fresh name in `work/tmp/` for a file being written: `WHAT-<16 hex digits>`.
pub(crate) fn tmp_path(work: &Path, what: &str) -> PathBuf {
    let mut r = [0u8; 8];
    let _ = getrandom::getrandom(&mut r);
    work.join("tmp").join(format!("{what}-{}", wire::id::to_hex(&r)))
}

/// A fresh private directory under the system's temporary directory, `PREFIXPID-N`, after
/// removing those of the same prefix whose process is gone (killed with -9).
pub fn scratch_dir(prefix: &str, n: u64) -> PathBuf {
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)?.split('-').next()) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    std::env::temp_dir().join(format!("{prefix}{}-{n}", std::process::id()))
}
