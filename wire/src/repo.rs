//! The small JSON records of a repository: its config, its key file and its snapshots.
//!
//! These are few and small, so they are JSON for people and tools to read; each carries a format
//! version that is checked before anything else is trusted.

use serde::{Deserialize, Serialize};

use crate::codec::{check_version, from_json, to_json};
use crate::{limits, ChunkId, Error, RepoKey, Result};

/// Format version of the key file and snapshot records, and the oldest config version read.
pub const VERSION: u32 = 1;
/// The config version new repositories get; version 2 adds [`RepoConfig::encryption`].
pub const CONFIG_VERSION: u32 = 2;

/// How a repository's objects are sealed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// Plaintext: every version-1 repository, and `init --insecure-no-encryption`.
    #[default]
    None,
    /// Blobs and snapshot records in [`crate::crypto`] envelopes (AES-256-GCM under session
    /// keys); the keys in password slots.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
}

/// `REPO/config`: fixed at init, read at every open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    /// Names the key file under `REPO/keys/`.
    pub key_id: String,
    pub chunker: ChunkerParams,
    /// Files are cut at every multiple of this many bytes; each segment is chunked on its own.
    pub segment_size: u64,
    /// Absent in version 1: plaintext.
    #[serde(default)]
    pub encryption: Encryption,
}

/// FastCDC v2020 sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self { min: 16 << 10, avg: 64 << 10, max: 256 << 10 }
    }
}

impl RepoConfig {
    /// Checks that the parameters are usable together; called on create and on every decode.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::Corrupt { what: "repository config", detail });
        let c = self.chunker;
        let in_range = (limits::MIN_CHUNK_SIZE..=limits::MAX_CHUNK_MIN).contains(&c.min)
            && (limits::MIN_CHUNK_AVG..=limits::MAX_CHUNK_AVG).contains(&c.avg)
            && (limits::MIN_CHUNK_MAX..=limits::MAX_CHUNK_SIZE).contains(&c.max);
        if !(in_range && c.min <= c.avg && c.avg <= c.max) {
            return bad(format!(
                "chunk sizes must satisfy min <= avg <= max with min in {}..={}, avg in {}..={}, max in {}..={} (got {}/{}/{})",
                limits::MIN_CHUNK_SIZE,
                limits::MAX_CHUNK_MIN,
                limits::MIN_CHUNK_AVG,
                limits::MAX_CHUNK_AVG,
                limits::MIN_CHUNK_MAX,
                limits::MAX_CHUNK_SIZE,
                c.min,
                c.avg,
                c.max
            ));
        }
        if !(limits::MIN_SEGMENT_SIZE..=limits::MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return bad(format!(
                "segment size {} is outside {}..={}",
                self.segment_size,
                limits::MIN_SEGMENT_SIZE,
                limits::MAX_SEGMENT_SIZE
            ));
        }
        // Content-defined chunks are at least `min` long (but the last), so this bounds the
        // chunk list of a segment.
        if self.segment_size / u64::from(c.min) + 1 > u64::from(limits::MAX_CHUNK_LIST_ENTRIES) {
            return bad(format!(
                "segment size {} cut into chunks of at least {} bytes can make more than the {} chunks one chunk list holds; use a larger minimum chunk or smaller segments",
                self.segment_size,
                c.min,
                limits::MAX_CHUNK_LIST_ENTRIES
            ));
        }
        if self.segment_size < u64::from(c.max) {
            return bad(format!("segment size {} is smaller than the largest chunk {}", self.segment_size, c.max));
        }
        if self.segment_size / u64::from(c.min) > u64::from(limits::MAX_CHUNK_LIST_ENTRIES) {
            return bad(format!(
                "segment size {} over minimum chunk {} makes too many chunks per segment",
                self.segment_size, c.min
            ));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        to_json(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        check_version("repository config", bytes, VERSION..=CONFIG_VERSION)?;
        let c: Self = from_json("repository config", bytes)?;
        c.validate()?;
        Ok(c)
    }
}

/// `REPO/keys/<key_id>`: the key for blob ids. Not encrypted: cbcr does not encrypt (yet), the
/// key only makes ids unguessable; the file is mode 0600.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    /// 64 hex characters.
    pub key: String,
}

impl KeyFile {
    pub fn encode(key: &RepoKey) -> Vec<u8> {
        to_json(&KeyFile { version: VERSION, key: crate::id::to_hex(key.as_bytes()) })
    }

    pub fn decode(bytes: &[u8]) -> Result<RepoKey> {
        check_version("key file", bytes, VERSION..=VERSION)?;
        let f: KeyFile = from_json("key file", bytes)?;
        let id = ChunkId::from_hex(&f.key)
            .map_err(|_| Error::Corrupt { what: "key file", detail: "key is not 64 hex characters".into() })?;
        Ok(RepoKey::from_bytes(id.0))
    }
}

/// What one backup did; stored in its snapshot and printed as the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotStats {
    /// Bytes read from source files (unchanged files are not read).
    pub bytes_read: u64,
    /// Total size of the files in the snapshot.
    pub bytes_total: u64,
    /// Raw bytes of the chunks this backup added to the repository.
    pub bytes_new: u64,
    /// Bytes this backup added to pack files (after compression, metadata included).
    pub bytes_stored: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    pub files: u64,
    pub dirs: u64,
    /// Source files that could not be read and were left out.
    pub files_skipped: u64,
    pub duration_s: f64,
}

/// Longest host name a snapshot records.
pub const MAX_SNAPSHOT_TEXT: usize = 255;
/// Most source paths one snapshot records.
pub const MAX_SNAPSHOT_PATHS: usize = 1 << 16;

/// Whether `t` is a time as snapshots record it: `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, fields in
/// range (ASCII only, so it sorts as time and can be cut at any byte).
fn is_utc_time(t: &str) -> bool {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let digits = b.get(r)?;
        digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let fields = (|| {
        let (month, day, hour, min, sec) = (num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
        num(0..4)?;
        let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
        let seps_ok = seps.iter().all(|&(i, c)| b.get(i) == Some(&c));
        Some(seps_ok && (1..=12).contains(&month) && (1..=31).contains(&day) && hour < 24 && min < 60 && sec <= 60)
    })();
    let tail = match b.get(19..) {
        Some([b'.', rest @ .., b'Z']) => !rest.is_empty() && rest.len() <= 9 && rest.iter().all(u8::is_ascii_digit),
        Some([b'Z']) => true,
        _ => false,
    };
    fields == Some(true) && tail
}

/// `REPO/snapshots/<id>`; the id is the BLAKE3 of these bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    /// Absolute source paths, sorted.
    pub paths: Vec<String>,
    /// Root tree: `/` of the snapshot, holding the paths' ancestors as directories.
    pub tree: String,
    pub parent: Option<String>,
    pub stats: SnapshotStats,
    /// Set when `repair snapshots` made this snapshot from a damaged one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
    /// The database this is a backup of (`backup --db`): its parent is the latest snapshot of
    /// the same database, whatever host or paths it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<String>,
    /// Set when the snapshot was combined from the shards of a job (`cbcr commit --job`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
}

/// The sharded job a snapshot was combined from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    /// The job's id (32 hex digits).
    pub id: String,
    pub shards: u32,
}

/// Whether `name` may name a database: 1 to 255 bytes, no control characters.
pub fn is_db_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_SNAPSHOT_TEXT && !name.chars().any(char::is_control)
}

/// Pairs the source roots of a backup with those of its parent (indexes into each), so files
/// are matched by their path below their root: the same path pairs with itself; the rest pair
/// in order when both sides have as many left, else by their last component when that names
/// one root on each side. A root left unpaired has no parent files.
pub fn pair_roots(current: &[String], parent: &[String]) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> =
        current.iter().enumerate().filter_map(|(i, c)| parent.iter().position(|p| p == c).map(|j| (i, j))).collect();
    let left = |n: usize, taken: &dyn Fn(usize) -> bool| (0..n).filter(|&i| !taken(i)).collect::<Vec<_>>();
    let cur: Vec<usize> = left(current.len(), &|i| pairs.iter().any(|p| p.0 == i));
    let par: Vec<usize> = left(parent.len(), &|j| pairs.iter().any(|p| p.1 == j));
    if cur.len() == par.len() {
        pairs.extend(cur.into_iter().zip(par));
    } else {
        let last = |s: &str| s.rsplit('/').find(|c| !c.is_empty()).unwrap_or_default().to_owned();
        for &i in &cur {
            let name = last(&current[i]);
            let same: Vec<usize> = par.iter().copied().filter(|&j| last(&parent[j]) == name).collect();
            let mine = cur.iter().filter(|&&k| last(&current[k]) == name).count();
            if let ([j], 1) = (&same[..], mine) {
                pairs.push((i, *j));
            }
        }
    }
    pairs.sort_unstable();
    pairs
}

/// What `repair snapshots` changed to make a snapshot from a damaged one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repaired {
    /// The damaged snapshot's id (hex).
    pub original: String,
    /// Files whose lost chunks now restore as zeros (holes), at their offsets.
    pub files: u64,
    /// Directories whose tree was lost, now empty.
    pub dirs: u64,
    /// Bytes that restore as zeros instead of the data that was lost.
    pub bytes_lost: u64,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        to_json(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        check_version("snapshot", bytes, VERSION..=VERSION)?;
        let s: Self = from_json("snapshot", bytes)?;
        ChunkId::from_hex(&s.tree)?;
        if let Some(p) = &s.parent {
            ChunkId::from_hex(p)?;
        }
        if let Some(r) = &s.repaired {
            ChunkId::from_hex(&r.original)?;
        }
        if let Some(j) = s.job.as_ref().filter(|j| crate::job::JobId::from_hex(&j.id).is_none()) {
            return Err(Error::Corrupt { what: "snapshot", detail: format!("job id {:?} is not 32 hex digits", j.id) });
        }
        if let Some(db) = s.db.as_deref().filter(|db| !is_db_name(db)) {
            return Err(Error::Corrupt {
                what: "snapshot",
                detail: format!(
                    "database name {db:?} is empty, longer than {MAX_SNAPSHOT_TEXT} bytes or holds control characters"
                ),
            });
        }
        let bad = |detail: String| Error::Corrupt { what: "snapshot", detail };
        if !is_utc_time(&s.time) {
            return Err(bad(format!("time {:?} is not an RFC 3339 UTC time", s.time)));
        }
        if s.host.len() > MAX_SNAPSHOT_TEXT || s.host.chars().any(char::is_control) {
            return Err(bad(format!(
                "host {:?} is longer than {MAX_SNAPSHOT_TEXT} bytes or holds control characters",
                s.host
            )));
        }
        if s.paths.is_empty() || s.paths.len() > MAX_SNAPSHOT_PATHS {
            return Err(bad(format!("{} source paths (1 to {MAX_SNAPSHOT_PATHS})", s.paths.len())));
        }
        if let Some(p) = s.paths.iter().find(|p| p.is_empty() || p.len() > 4096 || p.contains('\0')) {
            return Err(bad(format!("source path {p:?} is empty, longer than 4096 bytes or holds a NUL")));
        }
        if !(s.stats.duration_s.is_finite() && s.stats.duration_s >= 0.0) {
            return Err(bad(format!("duration {} s", s.stats.duration_s)));
        }
        Ok(s)
    }

    /// The root tree's id.
    pub fn tree_id(&self) -> ChunkId {
        ChunkId::from_hex(&self.tree).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> RepoConfig {
        RepoConfig {
            version: VERSION,
            key_id: "00".into(),
            chunker: ChunkerParams::default(),
            segment_size: 1 << 30,
            encryption: Encryption::None,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            version: VERSION,
            time: "2026-12-02T06:31:46.123456Z".into(),
            host: "db17".into(),
            paths: vec!["/var/lib/postgresql".into()],
            tree: ChunkId([3; 32]).to_hex(),
            parent: None,
            stats: SnapshotStats::default(),
            repaired: None,
            db: None,
            job: None,
        }
    }

    #[test]
    fn snapshot_fields_out_of_range_are_refused_by_name() {
        assert_eq!(Snapshot::decode(&snapshot().encode()).unwrap(), snapshot());
        let whole = Snapshot { time: "2026-12-02T06:31:46Z".into(), ..snapshot() };
        assert_eq!(Snapshot::decode(&whole.encode()).unwrap(), whole);
        // A snapshot that was never repaired encodes as before the field existed (its id too).
        assert!(!String::from_utf8(snapshot().encode()).unwrap().contains("repaired"));
        let repaired = Repaired { original: ChunkId([7; 32]).to_hex(), files: 2, dirs: 1, bytes_lost: 65536 };
        let with_db = Snapshot { db: Some("pg-orders".into()), ..snapshot() };
        assert_eq!(Snapshot::decode(&with_db.encode()).unwrap(), with_db);
        let fixed = Snapshot { repaired: Some(repaired.clone()), ..snapshot() };
        assert_eq!(Snapshot::decode(&fixed.encode()).unwrap(), fixed);
        let bad_original = Snapshot { repaired: Some(Repaired { original: "zz".into(), ..repaired }), ..snapshot() };
        assert!(Snapshot::decode(&bad_original.encode()).is_err());
        let cases = [
            (Snapshot { time: "2026-12-02T06:3\u{e9}:46Z".into(), ..snapshot() }, "not an RFC 3339"),
            (Snapshot { time: "2026-13-02T06:31:46Z".into(), ..snapshot() }, "not an RFC 3339"),
            (Snapshot { time: "2026-12-02T06:31:46".into(), ..snapshot() }, "not an RFC 3339"),
            (Snapshot { time: "2026-12-02T06:31:46.Z".into(), ..snapshot() }, "not an RFC 3339"),
            (Snapshot { time: "".into(), ..snapshot() }, "not an RFC 3339"),
            (Snapshot { host: "a\nb".into(), ..snapshot() }, "control characters"),
            (Snapshot { db: Some(String::new()), ..snapshot() }, "database name"),
            (Snapshot { db: Some("pg\u{7}1".into()), ..snapshot() }, "database name"),
            (Snapshot { host: "h".repeat(300), ..snapshot() }, "longer than 255"),
            (Snapshot { paths: vec![], ..snapshot() }, "0 source paths"),
            (Snapshot { paths: vec!["/a\0b".into()], ..snapshot() }, "NUL"),
            (Snapshot { stats: SnapshotStats { duration_s: -1.0, ..Default::default() }, ..snapshot() }, "duration"),
        ];
        for (bad, says) in cases {
            let err = Snapshot::decode(&bad.encode()).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    proptest! {
        #[test]
        fn any_time_string_decodes_or_is_refused(time in "\\PC{0,40}") {
            let _ = Snapshot::decode(&Snapshot { time, ..snapshot() }.encode());
        }
    }

    #[test]
    fn source_roots_pair_by_path_then_order_then_name() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // A new directory per backup: one root each.
        assert_eq!(pair_roots(&s(&["/backups/2026-12-02"]), &s(&["/backups/2026-12-01"])), vec![(0, 0)]);
        // The same paths pair with themselves first.
        assert_eq!(pair_roots(&s(&["/a", "/x/new"]), &s(&["/a", "/x/old"])), vec![(0, 0), (1, 1)]);
        assert_eq!(pair_roots(&s(&["/b/data", "/b/wal"]), &s(&["/a/data", "/a/wal"])), vec![(0, 0), (1, 1)]);
        // Unequal counts: by last component, when it names one root on each side.
        assert_eq!(pair_roots(&s(&["/n/wal", "/n/data"]), &s(&["/o/data"])), vec![(1, 0)]);
        assert_eq!(pair_roots(&s(&["/n/x", "/m/x"]), &s(&["/o/x"])), vec![]);
        assert_eq!(pair_roots(&s(&["/n"]), &s(&[])), vec![]);
    }

    #[test]
    fn config_round_trips_and_newer_versions_are_named() {
        let c = config();
        assert_eq!(RepoConfig::decode(&c.encode()).unwrap(), c);
        // Version 1 has no `encryption`: plaintext.
        let v1 = String::from_utf8(c.encode()).unwrap().replace(",\n  \"encryption\": \"none\"", "");
        assert!(!v1.contains("encryption"), "{v1}");
        assert_eq!(RepoConfig::decode(v1.as_bytes()).unwrap(), c);
        let sealed = RepoConfig { version: CONFIG_VERSION, encryption: Encryption::Aes256Gcm, ..config() };
        assert!(String::from_utf8(sealed.encode()).unwrap().contains("\"aes-256-gcm\""));
        assert_eq!(RepoConfig::decode(&sealed.encode()).unwrap(), sealed);
        let newer = String::from_utf8(c.encode()).unwrap().replace("\"version\": 1", "\"version\": 7");
        match RepoConfig::decode(newer.as_bytes()) {
            Err(Error::UnsupportedVersion { found: 7, supported: CONFIG_VERSION, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    #[test]
    fn inconsistent_chunker_is_rejected() {
        let mut c = config();
        c.chunker.min = c.chunker.max + 1;
        assert!(c.validate().is_err());
        let mut c = config();
        c.segment_size = 1024;
        assert!(c.validate().is_err());
    }

    #[test]
    fn key_file_round_trips() {
        let key = RepoKey::from_bytes([3; 32]);
        assert_eq!(KeyFile::decode(&KeyFile::encode(&key)).unwrap().as_bytes(), key.as_bytes());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(RepoConfig::decode(&bytes).is_err());
            prop_assert!(Snapshot::decode(&bytes).is_err());
            prop_assert!(KeyFile::decode(&bytes).is_err());
        }
    }
}
