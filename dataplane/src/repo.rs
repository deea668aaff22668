//! An open repository: its config and key, read from a [`Store`], and the steps of the commit
//! protocol on top of the store's objects.
//!
//! Packs and index runs are written as files in the store's work directory (`tmp/`), fsynced,
//! then handed to the store, which makes them durable under their final names; a snapshot is
//! one object written last.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wire::repo::{KeyFile, RepoConfig, Snapshot};
use wire::{ChunkId, RepoKey};

use crate::error::{Error, IoContext, Result};
use crate::net::quic::TlsFiles;
use crate::net::remote::Remote;
use crate::store::{self, LocalDir, ObjectKind, Store, WriterClaim};

/// An open repository: in a store (a local directory or object storage), or on a receiver
/// reached over QUIC (then the store is a private scratch directory: see [`Remote::scratch`]).
#[derive(Clone)]
pub struct Repository {
    pub store: Arc<dyn Store>,
    pub config: RepoConfig,
    pub key: RepoKey,
    pub remote: Option<Arc<Remote>>,
}

/// Held while a backup writes; released when dropped or when the process dies.
pub type RepoLock = Box<dyn WriterClaim>;

/// The file name of pack `id`.
pub fn pack_name(id: &ChunkId) -> String {
    format!("{}.pack", id.to_hex())
}

/// The file name of the index run whose bytes hash to `id`.
pub fn index_run_name(id: &ChunkId) -> String {
    format!("{}.idx", id.to_hex())
}

impl Repository {
    /// Creates a repository in `store`, which must hold nothing yet.
    pub fn init(store: Box<dyn Store>, segment_size: u64, chunker: wire::repo::ChunkerParams) -> Result<Self> {
        let location = PathBuf::from(store.location());
        if store.get(ObjectKind::Config, "")?.is_some() {
            return Err(Error::AlreadyARepository(location));
        }
        if !store.is_empty()? {
            return Err(Error::NotARepository(location));
        }
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key)
            .map_err(|e| Error::Io { path: location.clone(), source: std::io::Error::other(e.to_string()) })?;
        let key = RepoKey::from_bytes(key);
        let config = RepoConfig { version: wire::repo::VERSION, key_id: key.key_id(), chunker, segment_size };
        config.validate().map_err(|e| Error::Usage(e.to_string()))?;
        store.create()?;
        store.put(ObjectKind::Key, config.key_id.as_str(), &KeyFile::encode(&key))?;
        // The config is written last: a store holds a repository once it has one.
        store.put(ObjectKind::Config, "", &config.encode())?;
        Ok(Self { store: Arc::from(store), config, key, remote: None })
    }

    /// Opens the repository in `store`.
    pub fn open(store: Box<dyn Store>) -> Result<Self> {
        let location = store.location();
        let Some(bytes) = store.get(ObjectKind::Config, "")? else {
            return Err(Error::NotARepository(location.into()));
        };
        let at = |kind: ObjectKind, name: &str| PathBuf::from(format!("{location}/{}", kind.key(name)));
        let config = RepoConfig::decode(&bytes).map_err(|e| Error::format(&at(ObjectKind::Config, ""), e))?;
        let key_path = at(ObjectKind::Key, &config.key_id);
        let key_bytes = store
            .get(ObjectKind::Key, &config.key_id)?
            .ok_or_else(|| Error::Integrity(format!("{}: the repository's key is missing", key_path.display())))?;
        let key = KeyFile::decode(&key_bytes).map_err(|e| Error::format(&key_path, e))?;
        if key.key_id() != config.key_id {
            return Err(Error::Integrity(format!("{}: key does not match the repository config", key_path.display())));
        }
        Ok(Self { store: Arc::from(store), config, key, remote: None })
    }

    /// Opens `quic://HOST:PORT` (a session with that receiver), `s3://BUCKET/PREFIX`, or the
    /// directory `spec`; with `init`, a repository with the defaults is created when there is
    /// none (in an empty or missing directory, or an empty prefix).
    pub fn open_spec(spec: &str, tls: Option<&TlsFiles>, init: bool) -> Result<Self> {
        if !spec.starts_with("quic://") {
            let store = store::open(spec)?;
            return if init { Self::open_or_init(store) } else { Self::open(store) };
        }
        let tls = tls.ok_or_else(|| {
            Error::Usage(format!("{spec}: give --cert, --key and --ca (or CBCR_CERT, CBCR_KEY, CBCR_CA)"))
        })?;
        let welcome = Remote::connect(spec, tls)?;
        let scratch = LocalDir::new(&welcome.remote.scratch);
        scratch.create()?;
        Ok(Self {
            store: Arc::new(scratch),
            config: welcome.config,
            key: welcome.key,
            remote: Some(Arc::new(welcome.remote)),
        })
    }

    /// Opens the repository in `store`, creating it with default parameters when it is empty.
    pub fn open_or_init(store: Box<dyn Store>) -> Result<Self> {
        if store.get(ObjectKind::Config, "")?.is_none() && store.is_empty()? {
            return Self::init(store, 1 << 30, Default::default());
        }
        Self::open(store)
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(remote) => format!("quic://{}", remote.addr),
            None => self.store.location(),
        }
    }

    /// Takes the writer's claim, or fails at once with [`Error::Locked`].
    pub fn lock(&self) -> Result<RepoLock> {
        self.store.claim_writer()
    }

    /// A fresh path in the work directory's `tmp/` for a file being written.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        store::tmp_path(self.store.work_dir(), what)
    }

    /// Makes the complete, fsynced pack file `tmp` durable as pack `id`.
    pub fn publish_pack(&self, tmp: &Path, id: &ChunkId) -> Result<()> {
        self.store.put_file(ObjectKind::Pack, &pack_name(id), tmp)
    }

    /// Makes the complete, fsynced index run file `tmp` durable as run `id` (the hash of its
    /// bytes); returns the local file to search it in.
    pub fn publish_index_run(&self, tmp: &Path, id: &ChunkId) -> Result<PathBuf> {
        let name = index_run_name(id);
        self.store.put_file(ObjectKind::Index, &name, tmp)?;
        self.store.index_run(&name)
    }

    /// Writes one index run; its name is the hash of its bytes. Returns the local file.
    pub fn write_index_run(&self, bytes: &[u8]) -> Result<PathBuf> {
        let id = ChunkId::of_file(bytes);
        let tmp = self.tmp_path("index");
        let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::File::open(&tmp)?.sync_all()).at(&tmp);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish_index_run(&tmp, &id)
    }

    /// The last step of a backup: the snapshot becomes visible only now, after everything it
    /// references is durable.
    pub fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        if let Some(remote) = &self.remote {
            return remote.commit(snapshot);
        }
        let bytes = snapshot.encode();
        let id = ChunkId::of_file(&bytes);
        self.store.put(ObjectKind::Snapshot, &id.to_hex(), &bytes)?;
        Ok(id)
    }

    /// Every snapshot, oldest first. A snapshot that does not decode is an error.
    pub fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        if let Some(remote) = &self.remote {
            return remote.snapshots();
        }
        let mut out = vec![];
        for object in self.store.list(ObjectKind::Snapshot)? {
            out.push(self.load_snapshot(&object.name)?);
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// The snapshot object `name`, checked against its name.
    pub fn load_snapshot(&self, name: &str) -> Result<(ChunkId, Snapshot)> {
        let path = PathBuf::from(format!("{}/{}", self.store.location(), ObjectKind::Snapshot.key(name)));
        let id = ChunkId::from_hex(name).map_err(|e| Error::format(&path, e))?;
        let bytes = self.store.get(ObjectKind::Snapshot, name)?.ok_or_else(|| Error::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such snapshot"),
        })?;
        if ChunkId::of_file(&bytes) != id {
            return Err(Error::format(&path, wire::Error::ChecksumMismatch { what: "snapshot" }));
        }
        Ok((id, Snapshot::decode(&bytes).map_err(|e| Error::format(&path, e))?))
    }

    /// Finds a snapshot by `latest`, a unique id prefix, or a full id.
    pub fn find_snapshot(&self, spec: &str) -> Result<(ChunkId, Snapshot)> {
        let all = self.snapshots()?;
        if spec == "latest" {
            return all.into_iter().last().ok_or_else(|| Error::NotFound("the repository has no snapshots".into()));
        }
        let mut matches = all.into_iter().filter(|(id, _)| id.to_hex().starts_with(&spec.to_lowercase()));
        match (matches.next(), matches.next()) {
            (Some(m), None) if !spec.is_empty() => Ok(m),
            (Some(_), Some(_)) => Err(Error::NotFound(format!("snapshot id prefix {spec:?} is ambiguous"))),
            _ => Err(Error::NotFound(format!("no snapshot matches {spec:?}"))),
        }
    }
}
