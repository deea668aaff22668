//! The fleet as registered: databases (what to back up, how urgently) and nodes (what backs them
//! up, with what capacity). Every change is checked; a bad one is a typed error naming what was
//! wrong and changes nothing.

use rustc_hash::FxHashMap;

use super::model::{DbName, HostName, Millis, NodeName, Priority, MAX_SIZE_ESTIMATE, MIN_RPO};

/// A database as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSpec {
    pub name: DbName,
    /// The host its source lives on: per-host caps keep a production host from being overloaded.
    pub source_host: HostName,
    /// Bytes, until a snapshot's stats replace it.
    pub size_estimate: u64,
    pub priority: Priority,
    /// How old its latest snapshot may become.
    pub rpo: Millis,
    /// A daily window (start, end) in milliseconds after midnight within which its backups may
    /// run; `end < start` wraps past midnight.
    pub window: Option<(u64, u64)>,
}

/// A node's capacity, as it reports on joining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCapacity {
    pub cores: u32,
    pub memory_bytes: u64,
    /// Bytes per second.
    pub network_bps: u64,
    pub disk_bps: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("database {0} is already registered (a change is `changed`, not a second registration)")]
    DuplicateDb(DbName),
    #[error("database {0} is not registered")]
    UnknownDb(DbName),
    #[error("node {0} has already joined")]
    DuplicateNode(NodeName),
    #[error("node {0} has not joined")]
    UnknownNode(NodeName),
    #[error("database {name}: RPO {rpo} is shorter than the shortest the scheduler keeps ({min})", min = MIN_RPO)]
    RpoTooShort { name: DbName, rpo: Millis },
    #[error("database {0}: a size estimate of 0 bytes (give the expected size; a snapshot's stats replace it)")]
    SizeZero(DbName),
    #[error("database {name}: a size estimate of {size} bytes is more than 1 EiB (a unit mistake?)")]
    SizeAbsurd { name: DbName, size: u64 },
    #[error("database {name}: window end {end} ms or start {start} ms is past the end of a day")]
    BadWindow { name: DbName, start: u64, end: u64 },
    #[error("node {0}: a capacity of 0 cores, memory or bandwidth cannot run a backup")]
    NoCapacity(NodeName),
}

/// Milliseconds in a day: windows are given within one.
const DAY_MS: u64 = 24 * 3600 * 1000;

#[derive(Default)]
pub struct Registry {
    dbs: FxHashMap<DbName, DbSpec>,
    nodes: FxHashMap<NodeName, NodeCapacity>,
}

impl Registry {
    /// Whether `spec` may be registered, by itself (not whether its name is taken).
    pub fn check(spec: &DbSpec) -> Result<(), RegistryError> {
        let name = || spec.name.clone();
        if spec.rpo < MIN_RPO {
            return Err(RegistryError::RpoTooShort { name: name(), rpo: spec.rpo });
        }
        if spec.size_estimate == 0 {
            return Err(RegistryError::SizeZero(name()));
        }
        if spec.size_estimate > MAX_SIZE_ESTIMATE {
            return Err(RegistryError::SizeAbsurd { name: name(), size: spec.size_estimate });
        }
        if let Some((start, end)) = spec.window {
            if start >= DAY_MS || end >= DAY_MS || start == end {
                return Err(RegistryError::BadWindow { name: name(), start, end });
            }
        }
        Ok(())
    }

    pub fn register(&mut self, spec: DbSpec) -> Result<(), RegistryError> {
        Self::check(&spec)?;
        if self.dbs.contains_key(&spec.name) {
            return Err(RegistryError::DuplicateDb(spec.name));
        }
        self.dbs.insert(spec.name.clone(), spec);
        Ok(())
    }

    /// Replaces a registered database's spec; returns the old one.
    pub fn change(&mut self, spec: DbSpec) -> Result<DbSpec, RegistryError> {
        Self::check(&spec)?;
        match self.dbs.get_mut(&spec.name) {
            Some(old) => Ok(std::mem::replace(old, spec)),
            None => Err(RegistryError::UnknownDb(spec.name)),
        }
    }

    pub fn remove(&mut self, name: &DbName) -> Result<DbSpec, RegistryError> {
        self.dbs.remove(name).ok_or_else(|| RegistryError::UnknownDb(name.clone()))
    }

    pub fn db(&self, name: &DbName) -> Result<&DbSpec, RegistryError> {
        self.dbs.get(name).ok_or_else(|| RegistryError::UnknownDb(name.clone()))
    }

    pub fn join(&mut self, name: NodeName, capacity: NodeCapacity) -> Result<(), RegistryError> {
        let c = capacity;
        if c.cores == 0 || c.memory_bytes == 0 || c.network_bps == 0 || c.disk_bps == 0 {
            return Err(RegistryError::NoCapacity(name));
        }
        if self.nodes.contains_key(&name) {
            return Err(RegistryError::DuplicateNode(name));
        }
        self.nodes.insert(name, capacity);
        Ok(())
    }

    pub fn leave(&mut self, name: &NodeName) -> Result<NodeCapacity, RegistryError> {
        self.nodes.remove(name).ok_or_else(|| RegistryError::UnknownNode(name.clone()))
    }

    pub fn node(&self, name: &NodeName) -> Result<&NodeCapacity, RegistryError> {
        self.nodes.get(name).ok_or_else(|| RegistryError::UnknownNode(name.clone()))
    }

    pub fn db_count(&self) -> usize {
        self.dbs.len()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// Whether `at` (a time of day, ms after midnight) falls in `window`; no window is always open.
pub fn in_window(window: Option<(u64, u64)>, at: u64) -> bool {
    let at = at % DAY_MS;
    match window {
        None => true,
        Some((start, end)) if start < end => start <= at && at < end,
        Some((start, end)) => at >= start || at < end,
    }
}

/// The first time at or after `at` within `window`, taking the clock's origin as a midnight (the
/// service's clock is the Unix epoch, so windows are UTC).
pub fn next_open(window: Option<(u64, u64)>, at: Millis) -> Millis {
    let Some((start, _)) = window else { return at };
    if in_window(window, at.0) {
        return at;
    }
    let midnight = at.0 - at.0 % DAY_MS;
    let opens = midnight + start;
    Millis(if opens > at.0 { opens } else { opens + DAY_MS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str) -> DbSpec {
        DbSpec {
            name: DbName(name.into()),
            source_host: HostName("pg-1".into()),
            size_estimate: 1 << 30,
            priority: Priority::Normal,
            rpo: Millis::from_secs(3600),
            window: None,
        }
    }

    const NODE: NodeCapacity =
        NodeCapacity { cores: 8, memory_bytes: 32 << 30, network_bps: 1 << 30, disk_bps: 1 << 30 };

    #[test]
    fn bad_registrations_are_named_and_change_nothing() {
        let mut r = Registry::default();
        r.register(db("a")).unwrap();
        assert_eq!(r.register(db("a")), Err(RegistryError::DuplicateDb(DbName("a".into()))));
        let zero_rpo = DbSpec { rpo: Millis(0), ..db("b") };
        assert!(matches!(r.register(zero_rpo), Err(RegistryError::RpoTooShort { .. })));
        assert_eq!(
            r.register(DbSpec { size_estimate: 0, ..db("b") }),
            Err(RegistryError::SizeZero(DbName("b".into())))
        );
        let huge = DbSpec { size_estimate: u64::MAX, ..db("b") };
        assert!(matches!(r.register(huge), Err(RegistryError::SizeAbsurd { .. })));
        let window = DbSpec { window: Some((0, DAY_MS)), ..db("b") };
        assert!(matches!(r.register(window), Err(RegistryError::BadWindow { .. })));
        assert_eq!(r.db_count(), 1);
        assert_eq!(r.change(db("zz")), Err(RegistryError::UnknownDb(DbName("zz".into()))));
        assert_eq!(r.remove(&DbName("zz".into())), Err(RegistryError::UnknownDb(DbName("zz".into()))));
        let changed = DbSpec { priority: Priority::Critical, ..db("a") };
        assert_eq!(r.change(changed).unwrap().priority, Priority::Normal);
        assert_eq!(r.db(&DbName("a".into())).unwrap().priority, Priority::Critical);
    }

    #[test]
    fn nodes_join_once_with_capacity_and_leave_once() {
        let mut r = Registry::default();
        let n = NodeName("n1".into());
        r.join(n.clone(), NODE).unwrap();
        assert_eq!(r.join(n.clone(), NODE), Err(RegistryError::DuplicateNode(n.clone())));
        let empty = NodeCapacity { cores: 0, ..NODE };
        assert_eq!(r.join(NodeName("n2".into()), empty), Err(RegistryError::NoCapacity(NodeName("n2".into()))));
        assert_eq!(r.leave(&n).unwrap(), NODE);
        assert_eq!(r.leave(&n), Err(RegistryError::UnknownNode(n)));
        assert_eq!(r.node_count(), 0);
    }

    #[test]
    fn windows_open_and_close_and_wrap_past_midnight() {
        let h = 3600 * 1000;
        assert!(in_window(None, 5));
        assert!(in_window(Some((h, 5 * h)), 2 * h));
        assert!(!in_window(Some((h, 5 * h)), 5 * h));
        assert!(in_window(Some((22 * h, 2 * h)), 23 * h));
        assert!(in_window(Some((22 * h, 2 * h)), h + DAY_MS));
        assert!(!in_window(Some((22 * h, 2 * h)), 12 * h));
        // The next opening: later the same day, or the next day once today's has passed.
        assert_eq!(next_open(Some((h, 5 * h)), Millis(2 * h)), Millis(2 * h));
        assert_eq!(next_open(Some((h, 5 * h)), Millis(DAY_MS + 30)), Millis(DAY_MS + h));
        assert_eq!(next_open(Some((h, 5 * h)), Millis(6 * h)), Millis(DAY_MS + h));
        assert_eq!(next_open(Some((22 * h, 2 * h)), Millis(12 * h)), Millis(22 * h));
        assert_eq!(next_open(None, Millis(7)), Millis(7));
    }
}
