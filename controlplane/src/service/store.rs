//! The control plane's state on disk, embedded: one redb file (ACID, crash-safe, one writer
//! process at a time). It holds the registry now: each database as the JSON line
//! [`DbEntry::to_json_line`] gives, read back through the same checks a registry file passes.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::registry_file::{parse, DbEntry, Format};

const DBS: TableDefinition<&str, &str> = TableDefinition::new("dbs");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: the store is open in another process (a running `cbcr-control serve`?): stop it first")]
    Busy(PathBuf),
    #[error("{path}: {source}")]
    Redb { path: PathBuf, source: redb::Error },
    #[error("{path}: database {name:?} as stored does not check: {message} (the store is damaged)")]
    Damaged { path: PathBuf, name: String, message: String },
    #[error("database {name:?} is registered with other settings (stored: {stored}); `--replace` changes it")]
    Conflict { name: String, stored: String },
    #[error("database {0:?} is not registered (`cbcr-control db ls` lists them)")]
    UnknownDb(String),
}

/// What registering an entry did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Put {
    Added,
    Replaced,
    /// It was registered exactly so already: registering is idempotent.
    Unchanged,
}

pub struct FleetStore {
    db: redb::Database,
    path: PathBuf,
}

impl FleetStore {
    /// Opens the store at `path`, creating it when there is none.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let redb_error = |e: redb::Error| StoreError::Redb { path: path.to_owned(), source: e };
        let db = redb::Builder::new().set_check_integrity_on_open(true).create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Busy(path.to_owned()),
            e => redb_error(e.into()),
        })?;
        let store = Self { db, path: path.to_owned() };
        // Every table exists from the start: a reader never finds one missing.
        let tx = store.db.begin_write().map_err(|e| redb_error(e.into()))?;
        tx.open_table(DBS).map_err(|e| redb_error(e.into()))?;
        tx.commit().map_err(|e| redb_error(e.into()))?;
        Ok(store)
    }

    fn redb(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Redb { path: self.path.clone(), source: e.into() }
    }

    /// Registers `entries` in one transaction: all of them or, on any error, none. An entry
    /// registered with other settings is a [`StoreError::Conflict`] unless `replace`.
    pub fn put_dbs(&self, entries: &[DbEntry], replace: bool) -> Result<Vec<Put>, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.redb(e))?;
        let mut done = Vec::with_capacity(entries.len());
        {
            let mut table = tx.open_table(DBS).map_err(|e| self.redb(e))?;
            for entry in entries {
                let line = entry.to_json_line();
                let stored = table.get(entry.name.as_str()).map_err(|e| self.redb(e))?.map(|v| v.value().to_owned());
                let put = match stored {
                    None => Put::Added,
                    Some(s) if s == line => Put::Unchanged,
                    Some(_) if replace => Put::Replaced,
                    Some(stored) => return Err(StoreError::Conflict { name: entry.name.clone(), stored }),
                };
                if put != Put::Unchanged {
                    table.insert(entry.name.as_str(), line.as_str()).map_err(|e| self.redb(e))?;
                }
                done.push(put);
            }
        }
        tx.commit().map_err(|e| self.redb(e))?;
        Ok(done)
    }

    /// Unregisters database `name`; returns what it was.
    pub fn remove_db(&self, name: &str) -> Result<DbEntry, StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.redb(e))?;
        let removed = {
            let mut table = tx.open_table(DBS).map_err(|e| self.redb(e))?;
            let removed = table.remove(name).map_err(|e| self.redb(e))?;
            removed.map(|v| v.value().to_owned())
        };
        let Some(line) = removed else { return Err(StoreError::UnknownDb(name.to_owned())) };
        let entry = self.checked(name, &line)?;
        tx.commit().map_err(|e| self.redb(e))?;
        Ok(entry)
    }

    /// Every registered database, by name.
    pub fn dbs(&self) -> Result<Vec<DbEntry>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.redb(e))?;
        let table = tx.open_table(DBS).map_err(|e| self.redb(e))?;
        let mut out = vec![];
        for row in table.iter().map_err(|e| self.redb(e))? {
            let (name, line) = row.map_err(|e| self.redb(e))?;
            out.push(self.checked(name.value(), line.value())?);
        }
        Ok(out)
    }

    fn checked(&self, name: &str, line: &str) -> Result<DbEntry, StoreError> {
        let damaged = |message: String| StoreError::Damaged { path: self.path.clone(), name: name.to_owned(), message };
        let mut parsed = parse(line, Format::JsonLines).map_err(|e| damaged(e.message))?;
        match parsed.pop() {
            Some(entry) if parsed.is_empty() && entry.name == name => Ok(entry),
            _ => Err(damaged("the record is not this database's".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, rpo: &str) -> DbEntry {
        let line = format!("{{\"name\":\"{name}\",\"source\":\"/d/{name}\",\"host\":\"h1\",\"rpo\":\"{rpo}\"}}");
        parse(&line, Format::JsonLines).unwrap().remove(0)
    }

    #[test]
    fn registering_is_idempotent_a_conflict_changes_nothing_and_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.redb");
        let store = FleetStore::open(&path).unwrap();
        assert_eq!(store.put_dbs(&[entry("a", "1h"), entry("b", "2h")], false).unwrap(), [Put::Added, Put::Added]);
        assert_eq!(store.put_dbs(&[entry("a", "1h")], false).unwrap(), [Put::Unchanged]);
        // One conflicting entry and the whole batch is refused: "c" is not added either.
        let err = store.put_dbs(&[entry("c", "1h"), entry("a", "3h")], false).unwrap_err();
        assert!(matches!(&err, StoreError::Conflict { name, .. } if name == "a"), "{err}");
        assert_eq!(store.dbs().unwrap().len(), 2);
        assert_eq!(store.put_dbs(&[entry("a", "3h")], true).unwrap(), [Put::Replaced]);
        // A second process cannot open it while this one has it.
        assert!(matches!(FleetStore::open(&path), Err(StoreError::Busy(_))));
        drop(store);
        let store = FleetStore::open(&path).unwrap();
        let names: Vec<_> = store.dbs().unwrap().into_iter().map(|e| (e.name, e.rpo.0)).collect();
        assert_eq!(names, [("a".to_owned(), 3 * 3_600_000), ("b".to_owned(), 2 * 3_600_000)]);
        assert_eq!(store.remove_db("b").unwrap().name, "b");
        assert!(matches!(store.remove_db("b"), Err(StoreError::UnknownDb(_))));
    }
}
