//! The objects of sharded jobs in a repository: `jobs/<name>` (names in [`JobObject`]), sealed
//! like snapshot records (their content comes from the source: file names, sizes), each under
//! its own name, so a checkpoint copied to another shard's name does not open. They are kept
//! through a [`JobStore`]: the repository's store, or a receiver in front of it.

use std::path::PathBuf;
use std::sync::Arc;

use wire::job::{Checkpoint, JobId, JobObject, JobPlan, ShardStart};

use super::keys::{OpenScratch, Sealing};
use crate::error::{Error, Result};
use crate::store::{ObjectKind, Store};

/// Where job objects are kept, as stored (sealed by the client in an encrypted repository).
pub(crate) trait JobStore: Send + Sync {
    /// Where the repository is, for messages.
    fn location(&self) -> String;
    /// Stores `object` under `name`, durably, replacing one of that name.
    fn put(&self, name: &JobObject, object: &[u8]) -> Result<()>;
    fn get(&self, name: &JobObject) -> Result<Option<Vec<u8>>>;
    /// Removes the object; one not there is no error.
    fn delete(&self, name: &JobObject) -> Result<()>;
    /// The objects of `job`, or of every job.
    fn list(&self, job: Option<JobId>) -> Result<Vec<JobObject>>;
}

/// Job objects in the repository's store: `jobs/<name>`.
pub(crate) struct StoreJobs(pub(crate) Arc<dyn Store>);

impl JobStore for StoreJobs {
    fn location(&self) -> String {
        self.0.location()
    }

    fn put(&self, name: &JobObject, object: &[u8]) -> Result<()> {
        self.0.put(ObjectKind::Job, &name.name(), object)
    }

    fn get(&self, name: &JobObject) -> Result<Option<Vec<u8>>> {
        self.0.get(ObjectKind::Job, &name.name())
    }

    fn delete(&self, name: &JobObject) -> Result<()> {
        self.0.delete(ObjectKind::Job, &name.name())
    }

    /// Anything in `jobs/` that is not a job object's name is skipped with a warning (it never
    /// blocks a job).
    fn list(&self, job: Option<JobId>) -> Result<Vec<JobObject>> {
        let listed = crate::store::list_objects(&*self.0, ObjectKind::Job)?;
        let parsed = listed.iter().filter_map(|o| JobObject::parse(&o.name));
        Ok(parsed.filter(|o| job.is_none_or(|j| o.job() == j)).collect())
    }
}

/// A repository's job objects.
pub struct JobObjects {
    store: Arc<dyn JobStore>,
    sealing: Arc<dyn Sealing>,
}

impl JobObjects {
    pub(super) fn new(store: Arc<dyn JobStore>, sealing: Arc<dyn Sealing>) -> Self {
        Self { store, sealing }
    }

    /// Where object `name` is, for messages.
    pub fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.store.location(), ObjectKind::Job.key(name)))
    }

    pub fn put(&self, object: &JobObject, plain: &[u8]) -> Result<()> {
        let name = object.name();
        let mut scratch = Vec::new();
        let stored = self.sealing.seal(name.as_bytes(), plain, &mut scratch)?;
        self.store.put(object, stored)
    }

    /// The object's plaintext, decoded by `decode`; `None` when there is no such object.
    pub fn get<T>(&self, object: &JobObject, decode: impl FnOnce(&[u8]) -> wire::Result<T>) -> Result<Option<T>> {
        let name = object.name();
        let Some(stored) = self.store.get(object)? else { return Ok(None) };
        let mut scratch = OpenScratch::default();
        let plain = self.sealing.open("job object", name.as_bytes(), &stored, &mut scratch);
        plain.and_then(decode).map(Some).map_err(|e| Error::format(&self.path(&name), e))
    }

    /// Every job object, parsed from its name.
    pub fn list(&self) -> Result<Vec<JobObject>> {
        self.store.list(None)
    }

    /// The objects of one job.
    pub fn of(&self, job: JobId) -> Result<Vec<JobObject>> {
        self.store.list(Some(job))
    }

    /// Opens and decodes the object as what its name says it is. One gone since it was listed
    /// (a commit or an abandon meanwhile) is no damage.
    pub fn check(&self, object: &JobObject) -> Result<()> {
        let found = match object {
            JobObject::Plan(_) => self.get(object, |b| JobPlan::decode(b).map(drop)),
            JobObject::Start { .. } => self.get(object, |b| ShardStart::decode(b).map(drop)),
            JobObject::Checkpoint { .. } => self.get(object, |b| Checkpoint::decode(b).map(drop)),
        };
        found.map(drop)
    }

    pub fn delete(&self, object: &JobObject) -> Result<()> {
        self.store.delete(object)
    }
}
