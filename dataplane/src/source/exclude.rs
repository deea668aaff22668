//! What a backup leaves out: the user's `--exclude` patterns, and inside a PostgreSQL data
//! directory the files PostgreSQL's own base backup skips. Pure: paths and names in, verdicts out.

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A pattern that is not a glob, named with where it came from.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {pattern:?} is not a pattern: {reason}")]
pub struct PatternError {
    origin: String,
    pattern: String,
    reason: String,
}

/// The user's patterns, as restic reads them: a pattern starting with `/` is matched against
/// the whole path from the root; any other against the path's last components (`*.log` is any
/// file so named, `pg_wal/*` anything directly in any `pg_wal`). `*` and `?` stay within one
/// component, `**` spans any number; `[abc]` and `{a,b}` are sets. A directory that matches is
/// left out with everything below it.
#[derive(Clone, Debug, Default)]
pub struct Excludes {
    set: GlobSet,
    /// PostgreSQL's own exclusions in the data directories the walk finds.
    pub postgres_defaults: bool,
}

impl Excludes {
    /// `patterns`: each with where it came from (`--exclude`, or a file and line).
    pub fn new<'a>(
        patterns: impl IntoIterator<Item = (String, &'a str)>,
        postgres_defaults: bool,
    ) -> Result<Self, PatternError> {
        let mut set = GlobSetBuilder::new();
        for (origin, pattern) in patterns {
            let fail = |reason: String| PatternError { origin: origin.clone(), pattern: pattern.into(), reason };
            let trimmed = pattern.trim_end_matches('/');
            if trimmed.is_empty() {
                return Err(fail("empty".into()));
            }
            let anchored = if trimmed.starts_with('/') { trimmed.to_owned() } else { format!("**/{trimmed}") };
            let glob =
                GlobBuilder::new(&anchored).literal_separator(true).build().map_err(|e| fail(e.kind().to_string()))?;
            set.add(glob);
        }
        let set = set.build().map_err(|e| PatternError {
            origin: "patterns".into(),
            pattern: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Excludes { set, postgres_defaults })
    }

    /// Whether the user's patterns leave out `path` (absolute, as the walk reaches it).
    pub fn matches(&self, path: &Path) -> bool {
        self.set.is_match(path)
    }
}

/// The patterns of an `--exclude-file`: one per line, surrounding blanks trimmed, empty lines
/// and lines starting with `#` ignored; each with its origin (`FILE:LINE`).
pub fn file_patterns(file: &str, text: &str) -> Vec<(String, String)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (format!("{file}:{}", i + 1), line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(origin, line)| (origin, line.to_owned()))
        .collect()
}

/// Whether a directory holding entries `names` is a PostgreSQL data directory.
pub fn is_postgres_data_dir<S: AsRef<[u8]>>(names: &[S]) -> bool {
    let has = |want: &str| names.iter().any(|n| n.as_ref() == want.as_bytes());
    has("PG_VERSION") && has("global") && has("base")
}

/// Directories of a data directory whose contents PostgreSQL's base backup skips (they are
/// rebuilt or meaningless after a restore); the directories themselves are kept.
pub const POSTGRES_SKIPPED_CONTENTS: [&str; 7] =
    ["pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_subtrans"];
/// Files PostgreSQL's base backup skips in any directory of a data directory.
pub const POSTGRES_SKIPPED_FILES: [&str; 4] =
    ["postmaster.pid", "postmaster.opts", "postgresql.auto.conf.tmp", "current_logfiles.tmp"];
/// Name prefixes it skips: relation cache files, and temporary files and directories.
pub const POSTGRES_SKIPPED_PREFIXES: [&str; 2] = ["pg_internal.init", "pgsql_tmp"];

/// Whether PostgreSQL's base backup skips the entry at `rel`, its path below a data directory.
/// Kept, unlike there: `backup_label`, `tablespace_map` and `backup_manifest`, which a base
/// backup writes into its output and a restore of that output needs.
pub fn postgres_skips(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str());
    let (Some(first), second) = (parts.next(), parts.next()) else { return false };
    if second.is_some() && parts.next().is_none() && POSTGRES_SKIPPED_CONTENTS.iter().any(|d| first == *d) {
        return true;
    }
    let Some(name) = rel.file_name().and_then(|n| n.to_str()) else { return false };
    POSTGRES_SKIPPED_FILES.contains(&name) || POSTGRES_SKIPPED_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excludes(patterns: &[&str]) -> Excludes {
        Excludes::new(patterns.iter().map(|p| ("--exclude".to_owned(), *p)), true).unwrap()
    }

    #[test]
    fn patterns_match_as_restic_documents_them() {
        let x = excludes(&["*.log", "/srv/cache", "pg_wal/*", "tmp/", "**/node_modules", "/data/*/scratch"]);
        for yes in [
            "/var/app/x.log",
            "/x.log",
            "/srv/cache",
            "/db/pg_wal/000000010000000000000001",
            "/a/tmp",
            "/a/b/node_modules",
            "/data/2026-12-01/scratch",
        ] {
            assert!(x.matches(Path::new(yes)), "{yes}");
        }
        for no in ["/var/app/x.logs", "/other/srv/cache", "/db/pg_wal/archive/x", "/a/tmpfile", "/data/a/b/scratch"] {
            assert!(!x.matches(Path::new(no)), "{no}");
        }
        assert!(!Excludes::default().matches(Path::new("/anything")));
    }

    #[test]
    fn a_bad_pattern_is_named_with_its_origin() {
        let err = Excludes::new([("rules.txt:3".to_owned(), "[a-")], false).unwrap_err().to_string();
        assert!(err.contains("rules.txt:3") && err.contains("\"[a-\""), "{err}");
        let err = Excludes::new([("--exclude".to_owned(), "/")], false).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn exclude_files_skip_blanks_and_comments_and_number_their_lines() {
        let got = file_patterns("f", "# logs\n*.log\n\n  /srv/cache  \n#x\n");
        assert_eq!(got, vec![("f:2".to_owned(), "*.log".to_owned()), ("f:4".to_owned(), "/srv/cache".to_owned())]);
    }

    #[test]
    fn postgres_skips_what_its_base_backup_skips() {
        assert!(is_postgres_data_dir(&["base", "global", "PG_VERSION", "pg_wal"]));
        assert!(!is_postgres_data_dir(&["base", "PG_VERSION"]));
        for yes in [
            "postmaster.pid",
            "postmaster.opts",
            "pg_stat_tmp/global.stat",
            "pg_replslot/slot1",
            "pg_subtrans/0000",
            "base/5/pg_internal.init",
            "global/pg_internal.init.1234",
            "base/pgsql_tmp",
            "base/pgsql_tmp/pgsql_tmp123.0",
        ] {
            assert!(postgres_skips(Path::new(yes)), "{yes}");
        }
        for no in [
            "pg_stat_tmp",
            "pg_replslot",
            "backup_label",
            "tablespace_map",
            "base/5/16397",
            "pg_wal/0001",
            "PG_VERSION",
        ] {
            assert!(!postgres_skips(Path::new(no)), "{no}");
        }
    }
}
