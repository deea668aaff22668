//! A repository in a local directory: layout, creation, opening, locking and the snapshot commit.
//!
//! ```text
//! REPO/config  REPO/keys/<key id>  REPO/packs/ab/<id>.pack  REPO/index/<id>.idx
//! REPO/snapshots/<id>  REPO/tmp/ (files being written)  REPO/lock (flock)
//! ```
//! Every file is written to `tmp/`, fsynced, renamed into place and its directory fsynced, so a
//! file under its final name is always complete and durable.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wire::repo::{KeyFile, RepoConfig, Snapshot};
use wire::{ChunkId, RepoKey};

use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::quic::TlsFiles;
use crate::remote::Remote;

/// An open repository: a local directory, or a receiver reached over QUIC (then `root` is a
/// private scratch directory: see [`Remote::scratch`]).
#[derive(Clone)]
pub struct Repository {
    root: PathBuf,
    pub config: RepoConfig,
    pub key: RepoKey,
    pub remote: Option<Arc<Remote>>,
}

/// Held while a backup writes; released when dropped or when the process dies.
pub struct RepoLock {
    _file: File,
    tmp: PathBuf,
}

impl RepoLock {
    /// Removes what interrupted writers left in `tmp/`: safe because the lock is held.
    pub fn clean_tmp(&self) -> Result<()> {
        for entry in fs::read_dir(&self.tmp).at(&self.tmp)? {
            let path = entry.at(&self.tmp)?.path();
            fs::remove_file(&path).at(&path)?;
        }
        Ok(())
    }
}

impl Repository {
    /// Creates a repository in `root`, which must be missing or an empty directory.
    pub fn init(root: &Path, segment_size: u64, chunker: wire::repo::ChunkerParams) -> Result<Self> {
        if root.join("config").exists() {
            return Err(Error::AlreadyARepository(root.to_owned()));
        }
        if root.exists() && fs::read_dir(root).at(root)?.next().is_some() {
            return Err(Error::NotARepository(root.to_owned()));
        }
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key)
            .map_err(|e| Error::Io { path: root.to_owned(), source: std::io::Error::other(e.to_string()) })?;
        let key = RepoKey::from_bytes(key);
        let config = RepoConfig { version: wire::repo::VERSION, key_id: key.key_id(), chunker, segment_size };
        config.validate().map_err(|e| Error::Usage(e.to_string()))?;
        for dir in ["", "keys", "packs", "index", "snapshots", "tmp"] {
            fs::create_dir_all(root.join(dir)).at(&root.join(dir))?;
        }
        let repo = Self { root: root.to_owned(), config, key, remote: None };
        repo.write_durable(
            &repo.root.join("keys").join(repo.config.key_id.as_str()),
            &KeyFile::encode(&repo.key),
            0o600,
        )?;
        // The config is written last: a directory is a repository once it has one.
        repo.write_durable(&repo.root.join("config"), &repo.config.encode(), 0o644)?;
        Ok(repo)
    }

    /// Opens an existing repository.
    pub fn open(root: &Path) -> Result<Self> {
        let config_path = root.join("config");
        let bytes = match fs::read(&config_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotARepository(root.to_owned())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Err(Error::NotARepository(root.to_owned())),
            Err(e) => return Err(Error::Io { path: config_path, source: e }),
        };
        let config = RepoConfig::decode(&bytes).map_err(|e| Error::format(&config_path, e))?;
        let key_path = root.join("keys").join(&config.key_id);
        let key = KeyFile::decode(&fs::read(&key_path).at(&key_path)?).map_err(|e| Error::format(&key_path, e))?;
        if key.key_id() != config.key_id {
            return Err(Error::Integrity(format!("{}: key does not match the repository config", key_path.display())));
        }
        Ok(Self { root: root.to_owned(), config, key, remote: None })
    }

    /// Opens `quic://HOST:PORT` (a session with that receiver), or the directory `spec`.
    pub fn open_spec(spec: &Path, tls: Option<&TlsFiles>, create: bool) -> Result<Self> {
        let Some(url) = spec.to_str().filter(|s| s.starts_with("quic://")) else {
            return if create { Self::open_or_init(spec) } else { Self::open(spec) };
        };
        let tls = tls.ok_or_else(|| {
            Error::Usage(format!("{url}: give --cert, --key and --ca (or CBCR_CERT, CBCR_KEY, CBCR_CA)"))
        })?;
        let welcome = Remote::connect(url, tls)?;
        let root = welcome.remote.scratch.clone();
        for dir in ["tmp", "index"] {
            fs::create_dir_all(root.join(dir)).at(&root.join(dir))?;
        }
        Ok(Self { root, config: welcome.config, key: welcome.key, remote: Some(Arc::new(welcome.remote)) })
    }

    /// Opens the repository at `root`, creating it with default parameters when missing.
    pub fn open_or_init(root: &Path) -> Result<Self> {
        match Self::open(root) {
            Err(Error::NotARepository(_)) if !root.join("config").exists() => {
                Self::init(root, 1 << 30, Default::default())
            }
            other => other,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the exclusive writer lock, or fails at once with [`Error::Locked`].
    pub fn lock(&self) -> Result<RepoLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).at(&path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked(self.root.clone()));
        }
        Ok(RepoLock { _file: file, tmp: self.root.join("tmp") })
    }

    pub fn pack_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("packs").join(&hex[..2]).join(format!("{hex}.pack"))
    }

    /// A fresh path in `tmp/` for a file being written.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let mut r = [0u8; 8];
        let _ = getrandom::getrandom(&mut r);
        self.root.join("tmp").join(format!("{what}-{}", wire::id::to_hex(&r)))
    }

    /// Moves a complete, fsynced temporary file to its final name and makes the rename durable.
    pub fn publish(&self, tmp: &Path, dest: &Path) -> Result<()> {
        let dir = dest.parent().expect("repository paths have a parent");
        if !dir.exists() {
            fs::create_dir_all(dir).at(dir)?;
            sync_dir(dir.parent().expect("pack fan-out dirs have a parent"))?;
        }
        fs::rename(tmp, dest).at(dest)?;
        sync_dir(dir)
    }

    /// Writes `bytes` under `dest` through a temporary file: complete and durable, or absent.
    pub fn write_durable(&self, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        let tmp = self.tmp_path("file");
        let mut f = OpenOptions::new().create_new(true).write(true).mode(mode).open(&tmp).at(&tmp)?;
        let written = f.write_all(bytes).and_then(|_| f.sync_all()).at(&tmp);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(&tmp, dest)
    }

    /// Where the index run whose bytes hash to `id` lives.
    pub fn index_run_path(&self, id: &ChunkId) -> PathBuf {
        self.root.join("index").join(format!("{}.idx", id.to_hex()))
    }

    /// Writes one index run; its name is the hash of its bytes. Returns where.
    pub fn write_index_run(&self, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.index_run_path(&ChunkId::of_file(bytes));
        self.write_durable(&path, bytes, 0o644)?;
        Ok(path)
    }

    /// The last step of a backup: the snapshot becomes visible only now, after everything it
    /// references is durable.
    pub fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        if let Some(remote) = &self.remote {
            return remote.commit(snapshot);
        }
        let bytes = snapshot.encode();
        let id = ChunkId::of_file(&bytes);
        let tmp = self.tmp_path("snapshot");
        let mut f = OpenOptions::new().create_new(true).write(true).open(&tmp).at(&tmp)?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).at(&tmp)?;
        fault::point("snapshot-write");
        let dest = self.root.join("snapshots").join(id.to_hex());
        fs::rename(&tmp, &dest).at(&dest)?;
        fault::point("snapshot-rename");
        sync_dir(&self.root.join("snapshots"))?;
        Ok(id)
    }

    /// Files in one of the repository's directories, sorted by name.
    pub fn list(&self, dir: &str) -> Result<Vec<PathBuf>> {
        let dir = self.root.join(dir);
        let mut out = vec![];
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            if entry.file_type().at(&entry.path())?.is_dir() {
                for inner in fs::read_dir(entry.path()).at(&entry.path())? {
                    out.push(inner.at(&entry.path())?.path());
                }
            } else {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every snapshot, oldest first. A snapshot file that does not decode is an error.
    pub fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        if let Some(remote) = &self.remote {
            return remote.snapshots();
        }
        let mut out = vec![];
        for path in self.list("snapshots")? {
            out.push(self.load_snapshot_file(&path)?);
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    pub fn load_snapshot_file(&self, path: &Path) -> Result<(ChunkId, Snapshot)> {
        let bytes = fs::read(path).at(path)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let id = ChunkId::from_hex(name).map_err(|e| Error::format(path, e))?;
        if ChunkId::of_file(&bytes) != id {
            return Err(Error::format(path, wire::Error::ChecksumMismatch { what: "snapshot" }));
        }
        Ok((id, Snapshot::decode(&bytes).map_err(|e| Error::format(path, e))?))
    }

    /// Finds a snapshot by `latest`, a unique id prefix, or a full id.
    pub fn find_snapshot(&self, spec: &str) -> Result<(ChunkId, Snapshot)> {
        let all = self.snapshots()?;
        if spec == "latest" {
            return all.into_iter().last().ok_or_else(|| Error::Usage("the repository has no snapshots".into()));
        }
        let mut matches = all.into_iter().filter(|(id, _)| id.to_hex().starts_with(&spec.to_lowercase()));
        match (matches.next(), matches.next()) {
            (Some(m), None) if !spec.is_empty() => Ok(m),
            (Some(_), Some(_)) => Err(Error::Usage(format!("snapshot id prefix {spec:?} is ambiguous"))),
            _ => Err(Error::Usage(format!("no snapshot matches {spec:?}"))),
        }
    }
}

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}
