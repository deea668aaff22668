//! The fleet's databases as an operator writes them: a TOML file of `[[db]]` tables, or JSON
//! Lines (one entry per line, the form `cbcr-control db ls --json` prints). Pure: text in,
//! checked entries out, and an error names the line and what is wrong with it. Every entry is
//! checked by the core's own rules ([`Registry::check`]), so a file that imports is one the
//! scheduler accepts.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::registry::{DbSpec, Registry};
use crate::core::{DbName, HostName, Millis, Priority};

/// The size a database is planned for until its first snapshot says, when no `size_hint` is
/// given.
pub const DEFAULT_SIZE_HINT: u64 = 10 << 30;

/// One registered database: what the core schedules ([`DbEntry::spec`]) and what an agent
/// needs to back it up (its source and repository).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbEntry {
    pub name: String,
    /// An absolute path on its host, or a `synth://` source.
    pub source: String,
    pub host: String,
    pub priority: Priority,
    pub rpo: Millis,
    /// Milliseconds after midnight (UTC): start, end.
    pub window: Option<(u64, u64)>,
    pub size_hint: Option<u64>,
    /// Where its snapshots go (`quic://`, `s3://`, or a directory); the control plane's
    /// default when `None`.
    pub repo: Option<String>,
}

/// An entry as written: the text forms (`rpo = "1h"`, `window = "01:00-05:00"`,
/// `size_hint = "3TiB"`), which [`DbEntry::written`] gives back.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WrittenEntry {
    pub name: String,
    pub source: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    pub rpo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_hint: Option<SizeHint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

/// Bytes, or a size with a unit.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SizeHint {
    Bytes(u64),
    Text(String),
}

/// What is wrong with a registry file, and on which line (1-based).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct FileError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    JsonLines,
}

impl Format {
    /// `.toml` is TOML; anything else JSON Lines.
    pub fn of(path: &std::path::Path) -> Self {
        if path.extension().is_some_and(|e| e == "toml") {
            Format::Toml
        } else {
            Format::JsonLines
        }
    }
}

/// Every entry of a registry file, checked; two entries of one name are an error naming both
/// lines. A syntax error names its own line; an entry whose values do not check names the
/// entry's first line (its `[[db]]` in TOML) and the field.
pub fn parse(text: &str, format: Format) -> Result<Vec<DbEntry>, FileError> {
    let written: Vec<(usize, WrittenEntry)> = match format {
        Format::Toml => parse_toml(text)?,
        Format::JsonLines => parse_json_lines(text)?,
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(written.len());
    for (line, w) in written {
        let entry = w.check().map_err(|message| FileError { line, message })?;
        if let Some(first) = seen.insert(entry.name.clone(), line) {
            return Err(FileError { line, message: format!("database {:?} is named on line {first} too", entry.name) });
        }
        out.push(entry);
    }
    Ok(out)
}

/// The 1-based line of each byte offset, found by a search over where lines start (a scan
/// per entry would make a large file's import quadratic).
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Self {
        Lines(text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i).collect())
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

fn parse_toml(text: &str) -> Result<Vec<(usize, WrittenEntry)>, FileError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        db: Vec<toml::Spanned<WrittenEntry>>,
    }
    let lines = Lines::of(text);
    let file: File = toml::from_str(text).map_err(|e| FileError {
        line: e.span().map_or(1, |s| lines.line(s.start)),
        message: e.message().to_owned(),
    })?;
    Ok(file.db.into_iter().map(|s| (lines.line(s.span().start), s.into_inner())).collect())
}

fn parse_json_lines(text: &str) -> Result<Vec<(usize, WrittenEntry)>, FileError> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(line).map_err(|e| FileError { line: i + 1, message: e.to_string() })?;
        out.push((i + 1, entry));
    }
    Ok(out)
}

/// `HH:MM` as milliseconds after midnight.
fn clock(s: &str) -> Option<u64> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some((h * 60 + m) * 60_000)
}

fn clock_text(ms: u64) -> String {
    format!("{:02}:{:02}", ms / 3_600_000, ms / 60_000 % 60)
}

fn is_repo_url(s: &str) -> bool {
    s.starts_with("quic://") || s.starts_with("s3://") || s.starts_with('/')
}

impl WrittenEntry {
    /// The entry, if every value checks; else what is wrong, naming the database and field.
    pub fn check(self) -> Result<DbEntry, String> {
        let name = self.name;
        if !wire::repo::is_db_name(&name) {
            return Err(format!("database name {name:?}: 1 to 255 bytes without control characters"));
        }
        let at = |m: String| format!("database {name:?}: {m}");
        if !(self.source.starts_with('/') || self.source.starts_with("synth://")) {
            return Err(at(format!("source {:?} is neither an absolute path nor a synth:// source", self.source)));
        }
        if self.host.is_empty() || self.host.len() > 255 || self.host.chars().any(|c| c.is_control() || c == ' ') {
            return Err(at(format!("host {:?}: a host name without spaces or control characters", self.host)));
        }
        let priority = match self.priority.as_deref() {
            None => Priority::Normal,
            Some(p) => {
                Priority::parse(p).ok_or_else(|| at(format!("priority {p:?} is not critical|high|normal|low")))?
            }
        };
        let rpo = humantime::parse_duration(&self.rpo)
            .map_err(|e| at(format!("rpo {:?} is not a duration like 1h or 30m: {e}", self.rpo)))?;
        let window = match self.window.as_deref() {
            None => None,
            Some(w) => {
                let parsed = w.split_once('-').and_then(|(a, b)| Some((clock(a)?, clock(b)?)));
                Some(parsed.ok_or_else(|| at(format!("window {w:?} is not HH:MM-HH:MM (UTC)")))?)
            }
        };
        let size_hint = match self.size_hint {
            None => None,
            Some(SizeHint::Bytes(n)) => Some(n),
            Some(SizeHint::Text(t)) => Some(
                parse_size::Config::new()
                    .with_binary()
                    .parse_size(t.trim())
                    .map_err(|e| at(format!("size_hint {t:?} is not a size like 500GiB or 3TiB: {e}")))?,
            ),
        };
        if let Some(repo) = self.repo.as_deref().filter(|r| !is_repo_url(r)) {
            return Err(at(format!(
                "repo {repo:?} is not quic://HOST:PORT[/NAME], s3://BUCKET[/PREFIX] or an absolute path"
            )));
        }
        let entry = DbEntry {
            name,
            source: self.source,
            host: self.host,
            priority,
            rpo: Millis(u64::try_from(rpo.as_millis()).unwrap_or(u64::MAX)),
            window,
            size_hint,
            repo: self.repo,
        };
        Registry::check(&entry.spec()).map_err(|e| e.to_string())?;
        Ok(entry)
    }
}

impl DbEntry {
    /// What the core schedules.
    pub fn spec(&self) -> DbSpec {
        DbSpec {
            name: DbName(self.name.as_str().into()),
            source_host: HostName(self.host.as_str().into()),
            size_estimate: self.size_hint.unwrap_or(DEFAULT_SIZE_HINT),
            priority: self.priority,
            rpo: self.rpo,
            window: self.window,
        }
    }

    /// The entry as a file gives it, in canonical form: parsing it gives this entry back.
    pub fn written(&self) -> WrittenEntry {
        WrittenEntry {
            name: self.name.clone(),
            source: self.source.clone(),
            host: self.host.clone(),
            priority: Some(self.priority.name().to_owned()),
            rpo: humantime::format_duration(Duration::from_millis(self.rpo.0)).to_string(),
            window: self.window.map(|(a, b)| format!("{}-{}", clock_text(a), clock_text(b))),
            size_hint: self.size_hint.map(SizeHint::Bytes),
            repo: self.repo.clone(),
        }
    }

    /// One JSON line, as `db ls --json` prints it and the store keeps it.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(&self.written()).expect("an entry serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[[db]]
name = "orders"
source = "/mnt/snap/orders"
host = "db-17"
priority = "critical"
rpo = "1h"
window = "23:00-05:00"
size_hint = "3TiB"
repo = "quic://storage-1:7443/tenant-a"

[[db]]
name = "sessions"
source = "synth://pg?size=1GiB"
host = "db-18"
rpo = "30m"
"#;

    #[test]
    fn a_toml_file_gives_checked_entries_and_round_trips_through_json_lines() {
        let entries = parse(TOML, Format::Toml).unwrap();
        assert_eq!(entries.len(), 2);
        let orders = &entries[0];
        assert_eq!(orders.priority, Priority::Critical);
        assert_eq!(orders.rpo, Millis::from_secs(3600));
        assert_eq!(orders.window, Some((23 * 3_600_000, 5 * 3_600_000)));
        assert_eq!(orders.size_hint, Some(3 << 40));
        assert_eq!(entries[1].priority, Priority::Normal);
        assert_eq!(entries[1].spec().size_estimate, DEFAULT_SIZE_HINT);
        let lines: String = entries.iter().map(|e| e.to_json_line() + "\n").collect();
        assert_eq!(parse(&lines, Format::JsonLines).unwrap(), entries);
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        let cases: &[(&str, Format, usize, &str)] = &[
            (&TOML.replace("rpo = \"30m\"", "rpo = \"30 parsecs\""), Format::Toml, 12, "rpo \"30 parsecs\""),
            (&TOML.replace("\"critical\"", "\"urgent\""), Format::Toml, 2, "priority \"urgent\""),
            (&TOML.replace("23:00-05:00", "23:00-25:00"), Format::Toml, 2, "HH:MM-HH:MM"),
            (&TOML.replace("\"3TiB\"", "\"3 TB-ish\""), Format::Toml, 2, "size_hint"),
            (&TOML.replace("/mnt/snap/orders", "mnt/snap"), Format::Toml, 2, "neither an absolute path"),
            (&TOML.replace("rpo = \"30m\"", "rpo = \"5s\""), Format::Toml, 12, "shorter than"),
            (&TOML.replace("hos", "hots"), Format::Toml, 5, "hots"),
            (&TOML.replace("\"sessions\"", "\"orders\""), Format::Toml, 12, "line 2 too"),
            (&TOML.replace("[[db]]\nname = \"sessions\"", "[[db]\nname = \"sessions\""), Format::Toml, 12, ""),
            (
                "\n{\"name\":\"a\",\"source\":\"/a\",\"host\":\"h\",\"rpo\":\"1h\"}\n{\"name\": 3}\n",
                Format::JsonLines,
                3,
                "",
            ),
            (
                "{\"name\":\"a\",\"source\":\"/a\",\"host\":\"h\",\"rpo\":\"1h\",\"repo\":\"ftp://x\"}",
                Format::JsonLines,
                1,
                "repo",
            ),
        ];
        for (text, format, line, says) in cases {
            let err = parse(text, *format).unwrap_err();
            assert_eq!(err.line, *line, "{err} in:\n{text}");
            assert!(err.message.contains(says), "{err}");
        }
    }

    #[test]
    fn ten_thousand_entries_parse() {
        let text: String = (0..10_000)
            .map(|i| {
                format!("[[db]]\nname = \"db{i}\"\nsource = \"/data/{i}\"\nhost = \"h{}\"\nrpo = \"4h\"\n", i % 300)
            })
            .collect();
        let entries = parse(&text, Format::Toml).unwrap();
        assert_eq!(entries.len(), 10_000);
        assert_eq!(entries[9_999].name, "db9999");
    }
}
