//! The objects of sharded jobs in a repository: `jobs/<name>` (names in [`JobObject`]), sealed
//! like snapshot records (their content comes from the source: file names, sizes), each under
//! its own name, so a checkpoint copied to another shard's name does not open.

use std::path::PathBuf;
use std::sync::Arc;

use wire::job::{Checkpoint, JobId, JobObject, JobPlan, ShardStart};

use super::keys::{OpenScratch, Sealing};
use crate::error::{Error, Result};
use crate::store::{ObjectKind, Store};

/// A repository's job objects.
pub struct JobObjects {
    store: Arc<dyn Store>,
    sealing: Arc<dyn Sealing>,
}

impl JobObjects {
    pub(super) fn new(store: Arc<dyn Store>, sealing: Arc<dyn Sealing>) -> Self {
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
        self.store.put(ObjectKind::Job, &name, stored)
    }

    /// The object's plaintext, decoded by `decode`; `None` when there is no such object.
    pub fn get<T>(&self, object: &JobObject, decode: impl FnOnce(&[u8]) -> wire::Result<T>) -> Result<Option<T>> {
        let name = object.name();
        let Some(stored) = self.store.get(ObjectKind::Job, &name)? else { return Ok(None) };
        let mut scratch = OpenScratch::default();
        let plain = self.sealing.open("job object", name.as_bytes(), &stored, &mut scratch);
        plain.and_then(decode).map(Some).map_err(|e| Error::format(&self.path(&name), e))
    }

    /// Every job object, parsed from its name; anything else in `jobs/` is skipped with a
    /// warning (it never blocks a job).
    pub fn list(&self) -> Result<Vec<JobObject>> {
        let listed = crate::store::list_objects(&*self.store, ObjectKind::Job)?;
        Ok(listed.iter().filter_map(|o| JobObject::parse(&o.name)).collect())
    }

    /// The objects of one job.
    pub fn of(&self, job: JobId) -> Result<Vec<JobObject>> {
        Ok(self.list()?.into_iter().filter(|o| o.job() == job).collect())
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
        self.store.delete(ObjectKind::Job, &object.name())
    }
}
