//! An open repository: its config and key, read from a [`Store`], and the [`Backend`] its blobs
//! and snapshots go through: the store itself ([`Direct`]) or a receiver ([`Receiver`]).

mod backend;
mod direct;
mod receiver;

use std::path::PathBuf;
use std::sync::Arc;

use wire::repo::{KeyFile, RepoConfig, Snapshot};
use wire::{ChunkId, RepoKey};

pub(crate) use backend::{Backend, BlobSource, NewBlobs, PackSeal, PackSink, Packer};
pub(crate) use direct::{publish_pack, Direct, PackFiles};
pub(crate) use receiver::Receiver;

use crate::error::{Error, Result};
use crate::net::quic::TlsFiles;
use crate::net::remote::Remote;
use crate::store::{self, LocalDir, ObjectKind, Store, WriterClaim};

/// An open repository: its config and key, its store, and the [`Backend`] its data goes
/// through. Through a receiver the store is a private scratch directory standing in for the
/// repository's root on this side (the commands' lock and an empty local index).
#[derive(Clone)]
pub struct Repository {
    pub store: Arc<dyn Store>,
    pub config: RepoConfig,
    pub key: RepoKey,
    pub(crate) backend: Arc<dyn Backend>,
}

/// Held while a backup writes; released when dropped or when the process dies.
pub type RepoLock = Box<dyn WriterClaim>;

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
        Ok(Self::direct(store, config, key))
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
        Ok(Self::direct(store, config, key))
    }

    fn direct(store: Box<dyn Store>, config: RepoConfig, key: RepoKey) -> Self {
        let store: Arc<dyn Store> = Arc::from(store);
        Self { backend: Arc::new(Direct::new(Arc::clone(&store))), store, config, key }
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
            backend: Arc::new(Receiver::new(welcome.remote)),
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
        self.backend.location()
    }

    /// Takes the writer's claim, or fails at once with [`Error::Locked`].
    pub fn lock(&self) -> Result<RepoLock> {
        self.store.claim_writer()
    }

    /// The last step of a backup: see [`Backend::commit`].
    pub fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        self.backend.commit(snapshot)
    }

    /// Every snapshot, oldest first. A snapshot that does not decode is an error.
    pub fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        self.backend.snapshots()
    }

    /// The snapshot object `name` in the store, checked against its name.
    pub fn load_snapshot(&self, name: &str) -> Result<(ChunkId, Snapshot)> {
        direct::load_snapshot(&*self.store, name)
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
