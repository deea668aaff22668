//! The power-loss tests' view of a store: every call that changes it passes a crash point just
//! before (`store-write`) and just after (`store-written`) it. A process killed at either stops
//! where a power loss can leave the store: every object whose write returned is durable (the
//! [`Store`] contract), the one in flight is whole or absent, nothing later happened. The
//! files a writer had not yet published are only in `tmp/`, which the tests tear as a power
//! loss would before the next run. Wrapped around a store only when `CBCR_FAULT` is set.

use std::path::{Path, PathBuf};

use super::{ObjectInfo, ObjectKind, ObjectReader, Store, WriterClaim};
use crate::error::Result;
use crate::fault;

pub(super) struct CrashPoints(pub(super) Box<dyn Store>);

impl CrashPoints {
    fn change<T>(&self, write: impl FnOnce(&dyn Store) -> Result<T>) -> Result<T> {
        fault::point("store-write");
        let done = write(&*self.0)?;
        fault::point("store-written");
        Ok(done)
    }
}

impl Store for CrashPoints {
    fn location(&self) -> String {
        self.0.location()
    }

    fn work_dir(&self) -> &Path {
        self.0.work_dir()
    }

    fn is_empty(&self) -> Result<bool> {
        self.0.is_empty()
    }

    fn create(&self) -> Result<()> {
        self.change(|s| s.create())
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        self.0.get(kind, name)
    }

    fn open(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectReader>> {
        self.0.open(kind, name)
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        self.change(|s| s.put(kind, name, bytes))
    }

    fn put_file(&self, kind: ObjectKind, name: &str, tmp: &Path) -> Result<()> {
        self.change(|s| s.put_file(kind, name, tmp))
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        self.0.list(kind)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        self.change(|s| s.delete(kind, name))
    }

    fn index_run(&self, name: &str) -> Result<PathBuf> {
        self.0.index_run(name)
    }

    fn claim_writer(&self) -> Result<Box<dyn WriterClaim>> {
        self.0.claim_writer()
    }

    fn claim_shared_writer(&self) -> Result<Box<dyn WriterClaim>> {
        self.0.claim_shared_writer()
    }
}
