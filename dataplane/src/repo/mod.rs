//! An open repository: its config and key, read from a [`Store`], and the [`Backend`] its blobs
//! and snapshots go through: the store itself ([`Direct`]) or a receiver ([`Receiver`]).

mod backend;
mod direct;
mod jobs;
mod keys;
mod receiver;

use std::path::PathBuf;
use std::sync::Arc;

use wire::crypto::KeySlot;
use wire::frame::WelcomeKeys;
use wire::repo::{RepoConfig, Snapshot};
use wire::{ChunkId, RepoKey};

pub(crate) use backend::{Backend, BlobSource, NewBlobs, PackSeal, PackSink, Packer};
pub(crate) use direct::{publish_pack, read_trailer, Direct, PackFiles};
pub use jobs::JobObjects;
pub(crate) use jobs::{JobStore, StoreJobs};
pub use keys::{first_line, PasswordSource, Secret};
pub(crate) use keys::{OpenScratch, Sealing};
pub(crate) use receiver::Receiver;

use crate::error::{Error, Result};
use crate::net::quic::TlsFiles;
use crate::net::remote::Remote;
use crate::store::{self, LocalDir, ObjectKind, Store, WriterClaim};
use keys::Unlocked;

/// An open repository: its config and key, its store, and the [`Backend`] its data goes
/// through. Through a receiver the store is a private scratch directory standing in for the
/// repository's root on this side (the commands' lock and an empty local index).
#[derive(Clone)]
pub struct Repository {
    pub store: Arc<dyn Store>,
    pub config: RepoConfig,
    pub key: RepoKey,
    pub(crate) backend: Arc<dyn Backend>,
    /// Seals blobs and snapshot records (plaintext for an unencrypted repository).
    pub(crate) sealing: Arc<dyn Sealing>,
    /// The password slot that opened it, if encrypted.
    slot: Option<String>,
}

/// One password slot, as `cbcr key list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlotInfo {
    pub name: String,
    pub created: String,
    pub label: String,
    /// Whether this slot's password opened the repository now.
    pub current: bool,
}

/// Held while a backup writes; released when dropped or when the process dies.
pub type RepoLock = Box<dyn WriterClaim>;

/// The store's config, decoded, or `None` when it holds no repository.
fn read_config(store: &dyn Store) -> Result<Option<RepoConfig>> {
    let Some(bytes) = store.get(ObjectKind::Config, "")? else { return Ok(None) };
    let path = PathBuf::from(format!("{}/{}", store.location(), ObjectKind::Config.key("")));
    RepoConfig::decode(&bytes).map(Some).map_err(|e| Error::format(&path, e))
}

impl Repository {
    /// Creates a repository in `store`, which must hold nothing yet: encrypted under `secret`,
    /// or (with `None`, `init --insecure-no-encryption`) plaintext.
    pub fn init(
        store: Box<dyn Store>,
        segment_size: u64,
        chunker: wire::repo::ChunkerParams,
        secret: Option<&[u8]>,
    ) -> Result<Self> {
        let location = PathBuf::from(store.location());
        if store.get(ObjectKind::Config, "")?.is_some() {
            return Err(Error::AlreadyARepository(location));
        }
        if !store.is_empty()? {
            return Err(Error::NotARepository(location));
        }
        let (unlocked, encryption, (key_name, key_bytes)) = keys::create(secret)?;
        let config = RepoConfig {
            version: wire::repo::CONFIG_VERSION,
            key_id: unlocked.key.key_id(),
            chunker,
            segment_size,
            encryption,
        };
        config.validate().map_err(|e| Error::Usage(e.to_string()))?;
        store.create()?;
        store.put(ObjectKind::Key, &key_name, &key_bytes)?;
        // The config is written last: a store holds a repository once it has one.
        store.put(ObjectKind::Config, "", &config.encode())?;
        Ok(Self::direct(store, config, unlocked))
    }

    /// Opens the repository in `store`; `password` is asked when it is encrypted.
    pub fn open(store: Box<dyn Store>, password: PasswordSource<'_>) -> Result<Self> {
        let location = store.location();
        let config = read_config(&*store)?.ok_or_else(|| Error::NotARepository(location.clone().into()))?;
        let objects = keys::key_objects(&*store, &config)?;
        let unlocked = keys::unlock(&location, &config, objects, password)?;
        Ok(Self::direct(store, config, unlocked))
    }

    fn direct(store: Box<dyn Store>, config: RepoConfig, unlocked: Unlocked) -> Self {
        let store: Arc<dyn Store> = Arc::from(store);
        let backend = Arc::new(Direct::new(Arc::clone(&store), Arc::clone(&unlocked.sealing)));
        Self { backend, store, config, key: unlocked.key, sealing: unlocked.sealing, slot: unlocked.slot }
    }

    /// Opens `quic://HOST:PORT` (a session with that receiver), `s3://BUCKET/PREFIX`, or the
    /// directory `spec`. With `init`, a repository with the defaults, encrypted under the
    /// password, is created when there is none (in an empty or missing directory, or an empty
    /// prefix).
    pub fn open_spec(spec: &str, tls: Option<&TlsFiles>, init: bool, password: PasswordSource<'_>) -> Result<Self> {
        if !spec.starts_with("quic://") {
            let store = store::open(spec)?;
            return if init { Self::open_or_init(store, password) } else { Self::open(store, password) };
        }
        let tls = tls.ok_or_else(|| {
            Error::Usage(format!("{spec}: give --cert, --key and --ca (or CBCR_CERT, CBCR_KEY, CBCR_CA)"))
        })?;
        let welcome = Remote::connect(spec, tls)?;
        let unlocked = match welcome.keys {
            // A receiver of protocol version 1 or 2 serves only plaintext repositories.
            WelcomeKeys::Raw(key) => keys::plaintext(RepoKey::from_bytes(key)),
            WelcomeKeys::Objects(objects) => keys::unlock(spec, &welcome.config, objects, password)?,
        };
        if unlocked.key.key_id() != welcome.config.key_id {
            return Err(Error::Integrity(format!("{spec}: the receiver's key does not match its config")));
        }
        let scratch = LocalDir::new(&welcome.remote.scratch);
        scratch.create()?;
        Ok(Self {
            store: Arc::new(scratch),
            config: welcome.config,
            key: unlocked.key,
            backend: Arc::new(Receiver::new(welcome.remote, Arc::clone(&unlocked.sealing))),
            sealing: unlocked.sealing,
            slot: unlocked.slot,
        })
    }

    /// Opens the repository in `store` to serve it: with `password`, as [`Self::open_or_init`];
    /// without one, an encrypted repository is opened locked (its objects are stored and served
    /// as they are, none is opened), and an empty store is an error (nothing to encrypt under).
    pub fn open_to_serve(store: Box<dyn Store>, password: Option<&[u8]>) -> Result<Self> {
        if let Some(secret) = password {
            return Self::open_or_init(store, &|| Ok(secret.to_vec()));
        }
        let Some(config) = read_config(&*store)? else {
            return Err(Error::Usage(format!(
                "{}: no repository yet; create it with `cbcr init` (which encrypts it under a password), or give the receiver the password to create it",
                store.location()
            )));
        };
        if config.encryption == wire::repo::Encryption::None {
            // Plaintext: opened as any command opens it; no password is asked.
            return Self::open(store, &|| Ok(vec![]));
        }
        Ok(Self::direct(store, config, keys::locked()))
    }

    /// Whether this process can open the repository's objects (not a locked receiver's).
    pub fn holds_keys(&self) -> bool {
        self.sealing.holds_keys()
    }

    /// Commits a snapshot record exactly as a client sealed it (a receiver's commit). Its
    /// `writer` (the receiver's policy's name for the client) is recorded first: a snapshot
    /// committed under a policy never lacks one.
    pub fn commit_record(&self, stored: &[u8], writer: Option<&str>) -> Result<ChunkId> {
        if let Some(writer) = writer {
            self.store.put(ObjectKind::Writer, &store::writer_name(&ChunkId::of_file(stored), writer), b"")?;
        }
        direct::put_snapshot_record(&*self.store, stored)
    }

    /// The writer of each snapshot committed under a receiver's policy. Names that are not a
    /// snapshot id and a writer are ignored (a stray file decides nothing).
    pub fn snapshot_writers(&self) -> Result<std::collections::HashMap<ChunkId, String>> {
        let mut out = std::collections::HashMap::new();
        for object in self.store.list(ObjectKind::Writer)? {
            if let Some((id, writer)) = store::parse_writer_name(&object.name) {
                out.insert(id, writer.to_owned());
            }
        }
        Ok(out)
    }

    /// Removes snapshots (their data stays until a gc); returns those that were there.
    pub fn forget(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.backend.forget(ids)
    }

    /// Opens the repository in `store`, creating it with default parameters, encrypted under
    /// the password, when it is empty.
    pub fn open_or_init(store: Box<dyn Store>, password: PasswordSource<'_>) -> Result<Self> {
        if store.get(ObjectKind::Config, "")?.is_none() && store.is_empty()? {
            return Self::init(store, 1 << 30, Default::default(), Some(&password()?));
        }
        Self::open(store, password)
    }

    /// The key objects a receiver hands a client: stored as they are, never opened.
    pub fn key_objects(&self) -> Result<Vec<(String, Vec<u8>)>> {
        keys::key_objects(&*self.store, &self.config)
    }

    /// The password slots (empty for a plaintext repository), and which one opened it.
    pub fn key_slots(&self) -> Result<Vec<SlotInfo>> {
        let mut out = vec![];
        if self.slot.is_none() {
            return Ok(out);
        }
        for (name, bytes) in self.key_objects()? {
            let path = PathBuf::from(format!("{}/{}", self.store.location(), ObjectKind::Key.key(&name)));
            let slot = KeySlot::decode(&bytes).map_err(|e| Error::format(&path, e))?;
            let current = self.slot.as_deref() == Some(&name);
            out.push(SlotInfo { name, created: slot.created, label: slot.label, current });
        }
        Ok(out)
    }

    /// Adds a password slot for `secret`; returns its name.
    pub fn add_key(&self, secret: &[u8]) -> Result<String> {
        let (name, bytes) = self.sealing.new_slot(secret)?;
        self.store.put(ObjectKind::Key, &name, &bytes)?;
        Ok(name)
    }

    /// Removes password slot `name`; the slot that opened this repository and the last slot
    /// are kept (removing them could lock everyone out).
    pub fn remove_key(&self, name: &str) -> Result<()> {
        let slots = self.key_slots()?;
        match slots.iter().find(|s| s.name == name) {
            None => Err(Error::NotFound(format!("no key slot {name:?} (see `cbcr key list`)"))),
            Some(s) if s.current => Err(Error::Usage(format!(
                "key slot {name} is the one this password opened; open with another slot's password to remove it (or use `cbcr key passwd`)"
            ))),
            Some(_) => self.store.delete(ObjectKind::Key, name),
        }
    }

    /// Replaces the slot that opened the repository with one for `secret`; returns its name.
    pub fn change_password(&self, secret: &[u8]) -> Result<String> {
        // A plaintext repository has no slots: `add_key` says so.
        let name = self.add_key(secret)?;
        if let Some(old) = &self.slot {
            self.store.delete(ObjectKind::Key, old)?;
        }
        Ok(name)
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Takes the writer's claim, or fails at once with [`Error::Locked`].
    pub fn lock(&self) -> Result<RepoLock> {
        self.store.claim_writer()
    }

    /// Takes the claim the shard runs of jobs share (see [`Store::claim_shared_writer`]).
    pub fn lock_shared(&self) -> Result<RepoLock> {
        self.store.claim_shared_writer()
    }

    /// The repository's sharded jobs' objects, where its backend keeps them.
    pub fn jobs(&self) -> Result<JobObjects> {
        Ok(JobObjects::new(self.backend.job_store(), Arc::clone(&self.sealing)))
    }

    /// The job objects of the repository's own store, as stored (a receiver keeps its clients'
    /// there without opening them).
    pub(crate) fn stored_jobs(&self) -> StoreJobs {
        StoreJobs(Arc::clone(&self.store))
    }

    /// The last step of a backup: see [`Backend::commit`].
    pub fn commit_snapshot(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        self.backend.commit(snapshot)
    }

    /// Every snapshot, oldest first. A snapshot that does not decode is an error.
    pub fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        self.backend.snapshots()
    }

    /// Every snapshot object of the store as stored (sealed if encrypted), checked against its
    /// name, by name order.
    pub fn stored_snapshots(&self) -> Result<Vec<(ChunkId, Vec<u8>)>> {
        let mut out = vec![];
        for object in store::list_objects(&*self.store, ObjectKind::Snapshot)? {
            match direct::stored_snapshot(&*self.store, &object.name) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!("{e}; this snapshot is left out (`cbcr verify` reports it)"),
            }
        }
        Ok(out)
    }

    /// A snapshot record as stored (a receiver's client sends it sealed), opened and decoded.
    pub fn open_snapshot(&self, stored: &[u8]) -> wire::Result<Snapshot> {
        direct::open_snapshot(&*self.sealing, stored)
    }

    /// The snapshot object `name` in the store, checked against its name.
    pub fn load_snapshot(&self, name: &str) -> Result<(ChunkId, Snapshot)> {
        direct::load_snapshot(&*self.store, &*self.sealing, name)
    }

    /// Finds a snapshot by `latest`, a unique id prefix, or a full id.
    pub fn find_snapshot(&self, spec: &str) -> Result<(ChunkId, Snapshot)> {
        find_in(self.snapshots()?, spec)
    }

    /// [`Self::find_snapshot`] among the snapshots of database `db` (all, when `None`).
    pub fn find_snapshot_of(&self, spec: &str, db: Option<&str>) -> Result<(ChunkId, Snapshot)> {
        let Some(db) = db else { return self.find_snapshot(spec) };
        let of_db: Vec<_> = self.snapshots()?.into_iter().filter(|(_, s)| s.db.as_deref() == Some(db)).collect();
        if of_db.is_empty() {
            return Err(Error::NotFound(format!("the repository has no snapshots of database {db:?}")));
        }
        find_in(of_db, spec)
    }

    /// The parent a backup of `host` and `paths` compares against: `spec` if given, else the
    /// latest with the same host and paths; only among the snapshots it may take as parents.
    /// Never a snapshot `repair snapshots` made: its files hold holes where data was lost, and
    /// a backup would keep them for every file whose metadata did not change.
    /// With `db`, the default is the latest snapshot of that database, whatever host or paths.
    pub fn find_parent(
        &self,
        spec: Option<&str>,
        host: &str,
        paths: &[String],
        db: Option<&str>,
    ) -> Result<Option<(ChunkId, Snapshot)>> {
        let candidates = self.backend.parent_candidates()?;
        let Some(spec) = spec else {
            let same = |s: &Snapshot| {
                s.repaired.is_none()
                    && match db {
                        Some(db) => s.db.as_deref() == Some(db),
                        None => s.host == host && s.paths == paths,
                    }
            };
            return Ok(candidates.into_iter().rev().find(|(_, s)| same(s)));
        };
        match find_in(candidates, spec) {
            Ok((id, s)) if s.repaired.is_some() => Err(Error::Usage(format!(
                "--parent {spec}: snapshot {} was made by `cbcr repair snapshots` and holds holes where data was lost; a backup against it would keep them: give another parent, or none",
                id.short()
            ))),
            Err(Error::NotFound(_)) if spec != "latest" && self.find_snapshot(spec).is_ok() => {
                Err(Error::Denied(format!(
                    "--parent {spec}: that snapshot was committed by an identity this client may not write as (the receiver's policy, writes_as), so it cannot be this backup's parent"
                )))
            }
            found => found.map(Some),
        }
    }
}

/// The snapshot of `all` that `spec` names: `latest`, a unique id prefix, or a full id.
fn find_in(all: Vec<(ChunkId, Snapshot)>, spec: &str) -> Result<(ChunkId, Snapshot)> {
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
