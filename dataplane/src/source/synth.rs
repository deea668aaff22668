//! `synth://pg`: a generated PostgreSQL-like data directory, backed up without ever being
//! written to disk. The same parameters always give the same bytes, so a restore can be checked
//! against regeneration.
//!
//! ```text
//! synth://pg?size=2TiB&seed=7&gen=1&ratio=3&change=2&append=1
//! ```
//! - `size`: bytes at generation 1 (75% tables, 23% indexes, 2% WAL).
//! - `ratio`: zstd -1 compressibility of table pages: 3 (default, like typical production data)
//!   or up to 23 (like pgbench's blank-padded `filler` column).
//! - `dedup=N` (default 1): each table and index repeats its first 1/N of pages, so only 1/N of
//!   the data is distinct: a repository of a many-TB source then fits on a small disk while the
//!   backup still meets every chunk (and looks most of them up in the index).
//! - `gen=N`: each generation after the first changes `change`% of the pages of every table and
//!   index (scattered uniformly, as TPC-B updates are), appends `append`% pages to every table
//!   and index, and writes new WAL files.
//!
//! Files: `base/16384/<relfilenode>[.N]` (1 GiB segment files, like PostgreSQL's) and
//! `pg_wal/<segment name>` (16 MiB). Pages are 8 KiB: a page header, line pointers, tuples
//! growing down from the end, free space of zeros between.

use crate::error::{Error, Result};
use wire::tree::Metadata;

/// Page size of the generated files.
pub const PAGE: usize = 8192;
const PAGES_PER_SEGMENT_FILE: u64 = (1 << 30) / PAGE as u64;
const PAGES_PER_WAL_FILE: u64 = (16 << 20) / PAGE as u64;
const DB_OID: u64 = 16384;
const FIRST_RELFILENODE: u64 = 16397;
/// mtime of generation 1 (2026-01-01T00:00:00Z); each generation is one hour later.
const EPOCH_S: i64 = 1_767_225_600;

/// Parameters of a synthetic database; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    pub size: u64,
    pub seed: u64,
    pub gen: u32,
    pub ratio: u32,
    /// Pages changed per generation, in basis points (1/100 %).
    pub change_bp: u32,
    /// Pages appended per generation, in basis points.
    pub append_bp: u32,
    /// Tables and indexes repeat their first 1/dedup of pages.
    pub dedup: u32,
}

/// What a generated file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelKind {
    Table,
    Index,
    Wal,
}

/// One generated file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthFile {
    /// Relative path, e.g. `base/16384/16397.2`.
    pub path: String,
    pub kind: RelKind,
    /// relfilenode for tables and indexes, WAL segment number for WAL.
    pub rel: u64,
    /// Page number (within the relation) of the file's first page.
    pub first_page: u64,
    /// Page content repeats after this many pages of the relation (`dedup`).
    period: u64,
    pub pages: u64,
    pub mtime_ns: i64,
}

impl SynthFile {
    pub fn len(&self) -> u64 {
        self.pages * PAGE as u64
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// A stable inode number, so unchanged files are recognised by the next backup.
    /// The metadata a backup records for the file.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            mode: 0o100600,
            size: self.len(),
            mtime_ns: self.mtime_ns,
            ctime_ns: self.mtime_ns,
            inode: self.inode(),
            ..Default::default()
        }
    }

    pub fn inode(&self) -> u64 {
        mix(&[self.rel, self.first_page, self.kind as u64]) >> 16
    }
}

struct Relation {
    kind: RelKind,
    relfilenode: u64,
    pages_gen1: u64,
}

impl SynthSpec {
    /// Parses a `synth://pg?...` URL.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: String| Error::Usage(format!("{url}: {why}"));
        let rest = url.strip_prefix("synth://pg").ok_or_else(|| bad("only synth://pg is known".into()))?;
        let query = match rest {
            "" => "",
            r => r.strip_prefix('?').ok_or_else(|| bad("parameters follow a '?'".into()))?,
        };
        let mut spec = Self { size: 1 << 30, seed: 1, gen: 1, ratio: 3, change_bp: 200, append_bp: 100, dedup: 1 };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("{key}={v} is not a whole number")));
            match key {
                "size" => spec.size = crate::parse_size(value).map_err(bad)?,
                "seed" => spec.seed = number(value)?,
                "gen" => spec.gen = number(value)?.try_into().map_err(|_| bad("gen is too large".into()))?,
                "ratio" => spec.ratio = number(value)?.try_into().map_err(|_| bad("ratio is too large".into()))?,
                "dedup" => spec.dedup = number(value)?.try_into().map_err(|_| bad("dedup is too large".into()))?,
                "change" => {
                    spec.change_bp =
                        percent_bp(value).ok_or_else(|| bad(format!("change={value} is not a percentage")))?
                }
                "append" => {
                    spec.append_bp =
                        percent_bp(value).ok_or_else(|| bad(format!("append={value} is not a percentage")))?
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (size, seed, gen, ratio, change, append, dedup)"
                    )))
                }
            }
        }
        if spec.size < 64 * PAGE as u64 {
            return Err(bad("size must be at least 512KiB".into()));
        }
        if !(1..=10_000).contains(&spec.gen) {
            return Err(bad("gen must be 1 to 10000".into()));
        }
        if !(1..=50).contains(&spec.ratio) {
            return Err(bad("ratio must be 1 to 50".into()));
        }
        if !(1..=1000).contains(&spec.dedup) {
            return Err(bad("dedup must be 1 to 1000".into()));
        }
        Ok(spec)
    }

    /// The source's name in snapshots: every parameter but the generation, so generation N+1
    /// finds generation N as its parent.
    pub fn source_name(&self) -> String {
        let dedup = if self.dedup == 1 { String::new() } else { format!("&dedup={}", self.dedup) };
        format!(
            "synth://pg?size={}&seed={}&ratio={}&change={}&append={}{dedup}",
            self.size,
            self.seed,
            self.ratio,
            bp_percent(self.change_bp),
            bp_percent(self.append_bp)
        )
    }

    /// A URL that [`Self::parse`] turns back into this spec, generation included.
    pub fn url(&self) -> String {
        format!("{}&gen={}", self.source_name(), self.gen)
    }

    /// The metadata a backup records for the generation's directories.
    pub fn dir_metadata(&self) -> Metadata {
        Metadata { mode: 0o40700, mtime_ns: self.mtime_ns(), ctime_ns: self.mtime_ns(), ..Default::default() }
    }

    fn relations(&self) -> Vec<Relation> {
        let pages = self.size / PAGE as u64;
        let tables = (self.size / (16 << 30)).clamp(2, 32);
        // Zipf-like sizes: the first table is the largest, as `pgbench_accounts` is.
        let weights: Vec<f64> = (0..tables).map(|i| 1.0 / (i + 1) as f64).collect();
        let total: f64 = weights.iter().sum();
        let mut rels = vec![];
        for (i, w) in weights.iter().enumerate() {
            let table = ((pages as f64 * 0.75 * w / total) as u64).max(1);
            let index = ((pages as f64 * 0.23 * w / total) as u64).max(1);
            let node = FIRST_RELFILENODE + 2 * i as u64;
            rels.push(Relation { kind: RelKind::Table, relfilenode: node, pages_gen1: table });
            rels.push(Relation { kind: RelKind::Index, relfilenode: node + 1, pages_gen1: index });
        }
        rels
    }

    fn pages_at(&self, rel: &Relation, gen: u32) -> u64 {
        rel.pages_gen1 + rel.pages_gen1 * u64::from(self.append_bp) * u64::from(gen - 1) / 10_000
    }

    fn wal_files(&self) -> u64 {
        ((self.size / PAGE as u64) * 2 / 100).div_ceil(PAGES_PER_WAL_FILE).max(1)
    }

    /// mtime of this generation's directories.
    pub fn mtime_ns(&self) -> i64 {
        gen_time(self.gen)
    }

    /// Every file of this generation, in path order.
    pub fn files(&self) -> Vec<SynthFile> {
        let mut files = vec![];
        for rel in self.relations() {
            let total = self.pages_at(&rel, self.gen);
            // Whole 1 MiB runs of pages repeat, so page-aligned chunks repeat too.
            let period = match self.dedup {
                1 => u64::MAX,
                n => (rel.pages_gen1 / u64::from(n)).next_multiple_of(128),
            };
            for segno in 0..total.div_ceil(PAGES_PER_SEGMENT_FILE) {
                let first_page = segno * PAGES_PER_SEGMENT_FILE;
                let pages = PAGES_PER_SEGMENT_FILE.min(total - first_page);
                let suffix = if segno == 0 { String::new() } else { format!(".{segno}") };
                let mut f = SynthFile {
                    path: format!("base/{DB_OID}/{}{suffix}", rel.relfilenode),
                    kind: rel.kind,
                    rel: rel.relfilenode,
                    first_page,
                    period,
                    pages,
                    mtime_ns: 0,
                };
                f.mtime_ns = gen_time(self.last_change(&rel, &f));
                files.push(f);
            }
        }
        let wal = self.wal_files();
        for k in 0..wal {
            let segment = u64::from(self.gen - 1) * wal + k + 1;
            files.push(SynthFile {
                path: format!("pg_wal/00000001{:08X}{:08X}", segment >> 8, segment & 0xff),
                kind: RelKind::Wal,
                rel: segment,
                first_page: 0,
                period: u64::MAX,
                pages: PAGES_PER_WAL_FILE,
                mtime_ns: gen_time(self.gen),
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files
    }

    /// The latest generation up to this one in which the file changed.
    fn last_change(&self, rel: &Relation, f: &SynthFile) -> u32 {
        for g in (2..=self.gen).rev() {
            let before = self.pages_at(rel, g - 1);
            let grew = before < f.first_page + f.pages;
            if grew || (f.first_page..f.first_page + f.pages).any(|p| self.changed(rel.relfilenode, p, g)) {
                return g;
            }
        }
        1
    }

    /// Whether page `page` of relation `rel` is rewritten in generation `gen` (>= 2).
    fn changed(&self, rel: u64, page: u64, gen: u32) -> bool {
        mix(&[self.seed, rel, page, u64::from(gen)]) % 10_000 < u64::from(self.change_bp)
    }

    /// How many times the page has been rewritten up to this generation.
    fn version(&self, rel: u64, page: u64) -> u32 {
        (2..=self.gen).filter(|&g| self.changed(rel, page, g)).count() as u32
    }

    /// Fills `buf` with the file's bytes from `offset` (both multiples of [`PAGE`]).
    pub fn fill(&self, file: &SynthFile, offset: u64, buf: &mut [u8]) {
        assert!(offset.is_multiple_of(PAGE as u64) && buf.len().is_multiple_of(PAGE));
        assert!(offset + buf.len() as u64 <= file.len(), "read past the end of {}", file.path);
        for (i, page) in buf.chunks_exact_mut(PAGE).enumerate() {
            let n = file.first_page + offset / PAGE as u64 + i as u64;
            let version = if file.kind == RelKind::Wal { 0 } else { self.version(file.rel, n) };
            self.fill_page(file.kind, file.rel, n % file.period, version, page);
        }
    }

    /// One page. Tuples: table rows like pgbench_accounts (a 24-byte tuple header, aid, bid,
    /// abalance, an 84-byte filler of which a share set by `ratio` is random), index entries
    /// (sorted keys and item pointers), WAL records (mostly random payload).
    fn fill_page(&self, kind: RelKind, rel: u64, page_no: u64, version: u32, page: &mut [u8]) {
        let mut rng = XorShift(mix(&[self.seed, rel, page_no, u64::from(version), kind as u64]) | 1);
        page.fill(0);
        let (tuple_len, random_len) = match kind {
            RelKind::Table => (128, filler_random_bytes(self.ratio)),
            RelKind::Index => (16, 0),
            RelKind::Wal => (512, 448),
        };
        let count = (PAGE - 24) / (tuple_len + 4);
        // Page header: LSN, checksum, flags, lower, upper, special, size/version, prune xid.
        let lsn = (u64::from(version) << 32) | (page_no & 0xffff_ffff);
        page[0..8].copy_from_slice(&lsn.to_le_bytes());
        page[8..10].copy_from_slice(&(rng.next() as u16).to_le_bytes());
        let lower = 24 + 4 * count;
        let upper = PAGE - count * tuple_len;
        page[12..14].copy_from_slice(&(lower as u16).to_le_bytes());
        page[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
        page[16..18].copy_from_slice(&(PAGE as u16).to_le_bytes());
        page[18..20].copy_from_slice(&(PAGE as u16 | 4).to_le_bytes());
        for t in 0..count {
            let off = PAGE - (t + 1) * tuple_len;
            let lp = (off as u32) | (1 << 15) | ((tuple_len as u32) << 17);
            page[24 + 4 * t..28 + 4 * t].copy_from_slice(&lp.to_le_bytes());
            let tuple = &mut page[off..off + tuple_len];
            let key = page_no * count as u64 + t as u64;
            match kind {
                RelKind::Index => {
                    tuple[0..8].copy_from_slice(&key.to_le_bytes());
                    tuple[8..12].copy_from_slice(&((key / count as u64) as u32).to_le_bytes());
                    tuple[12..14].copy_from_slice(&((key % count as u64) as u16).to_le_bytes());
                }
                RelKind::Table | RelKind::Wal => {
                    // Tuple header: xmin (the version that wrote it), ctid, infomask.
                    tuple[0..4].copy_from_slice(&(1000 + version).to_le_bytes());
                    tuple[8..12].copy_from_slice(&(page_no as u32).to_le_bytes());
                    tuple[12..14].copy_from_slice(&(t as u16).to_le_bytes());
                    tuple[20..22].copy_from_slice(&0x0902u16.to_le_bytes());
                    tuple[24..28].copy_from_slice(&(key as u32).to_le_bytes());
                    tuple[28..32].copy_from_slice(&((key / 100_000) as u32).to_le_bytes());
                    let balance = if version == 0 { 0 } else { (rng.next() % 10_000) as i32 - 5_000 };
                    tuple[32..36].copy_from_slice(&balance.to_le_bytes());
                    let filler = &mut tuple[36..];
                    filler.fill(b' ');
                    let random = random_len.min(filler.len());
                    for w in filler[..random].chunks_mut(8) {
                        let r = rng.next().to_le_bytes();
                        w.copy_from_slice(&r[..w.len()]);
                    }
                }
            }
        }
    }
}

/// Random filler bytes per table row for a zstd -1 ratio of about `ratio` (calibrated by the
/// `compressibility_matches_the_ratio_parameter` test).
fn filler_random_bytes(ratio: u32) -> usize {
    (((132.0 / f64::from(ratio)) - 4.0).max(0.0) as usize).min(92)
}

fn gen_time(gen: u32) -> i64 {
    (EPOCH_S + 3600 * i64::from(gen - 1)) * 1_000_000_000
}

fn percent_bp(v: &str) -> Option<u32> {
    let p: f64 = v.parse().ok()?;
    (0.0..=100.0).contains(&p).then(|| (p * 100.0).round() as u32)
}

fn bp_percent(bp: u32) -> String {
    format!("{}", f64::from(bp) / 100.0)
}

/// splitmix64 over the words: a fast, well-mixed hash for deterministic choices.
fn mix(words: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> SynthSpec {
        SynthSpec::parse(url).unwrap()
    }

    fn bytes(s: &SynthSpec, f: &SynthFile) -> Vec<u8> {
        let mut buf = vec![0u8; f.len() as usize];
        s.fill(f, 0, &mut buf);
        buf
    }

    #[test]
    fn parameters_parse_and_bad_ones_are_named() {
        let s = spec("synth://pg?size=2TiB&seed=7&gen=3&ratio=23&change=2.5&append=0");
        assert_eq!((s.size, s.seed, s.gen, s.ratio, s.change_bp, s.append_bp), (2 << 40, 7, 3, 23, 250, 0));
        assert_eq!(spec("synth://pg").size, 1 << 30);
        for bad in ["synth://mysql", "synth://pg?size=1GiB&colour=red", "synth://pg?gen=0", "synth://pg?size=x"] {
            assert!(SynthSpec::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(spec("synth://pg?gen=2").source_name(), spec("synth://pg?gen=5").source_name());
    }

    #[test]
    fn layout_looks_like_a_data_directory() {
        let s = spec("synth://pg?size=3GiB");
        let files = s.files();
        let total: u64 = files.iter().map(SynthFile::len).sum();
        assert!(total.abs_diff(3 << 30) < 3 << 25, "{total}");
        assert!(files.iter().any(|f| f.path == "base/16384/16397.1"), "a table larger than 1 GiB has segment files");
        assert!(files.iter().any(|f| f.path.starts_with("pg_wal/")));
        assert!(files.iter().all(|f| f.pages <= PAGES_PER_SEGMENT_FILE));
    }

    #[test]
    fn generation_is_deterministic_and_offset_independent() {
        let s = spec("synth://pg?size=8MiB&seed=3");
        let f = &s.files()[0];
        let whole = bytes(&s, f);
        assert_eq!(whole, bytes(&s, f));
        let mut part = vec![0u8; 4 * PAGE];
        s.fill(f, 2 * PAGE as u64, &mut part);
        assert_eq!(&whole[2 * PAGE..6 * PAGE], &part[..]);
        assert_ne!(whole, bytes(&spec("synth://pg?size=8MiB&seed=4"), f));
    }

    #[test]
    fn dedup_repeats_whole_runs_of_pages() {
        let s = spec("synth://pg?size=64MiB&seed=3&dedup=4");
        let f = &s.files()[0];
        assert_eq!(f.kind, RelKind::Table);
        let whole = bytes(&s, f);
        let period = f.period as usize * PAGE;
        assert!(period > 0 && period < whole.len() / 2, "period {period} of {}", whole.len());
        assert_eq!(&whole[..period], &whole[period..2 * period]);
        assert_ne!(&whole[..PAGE], &whole[PAGE..2 * PAGE]);
        assert!(s.source_name().ends_with("&dedup=4"));
        let plain = spec("synth://pg?size=64MiB&seed=3");
        assert_ne!(&bytes(&plain, &plain.files()[0])[period..2 * period], &whole[..period]);
    }

    #[test]
    fn compressibility_matches_the_ratio_parameter() {
        for (ratio, low, high) in [(3u32, 2.4, 3.9), (23, 15.0, 32.0)] {
            let s = spec(&format!("synth://pg?size=64MiB&ratio={ratio}"));
            let table = s.files().into_iter().find(|f| f.kind == RelKind::Table).unwrap();
            let mut buf = vec![0u8; 512 * PAGE];
            s.fill(&table, 0, &mut buf);
            let compressed: usize = buf.chunks(64 << 10).map(|c| zstd::bulk::compress(c, 1).unwrap().len()).sum();
            let measured = buf.len() as f64 / compressed as f64;
            assert!((low..high).contains(&measured), "ratio={ratio}: measured {measured:.1}");
        }
    }

    #[test]
    fn a_new_generation_changes_about_the_change_rate_of_pages_and_appends() {
        let (g1, g2) = (spec("synth://pg?size=64MiB&seed=5"), spec("synth://pg?size=64MiB&seed=5&gen=2"));
        let (f1, f2) = (&g1.files()[0], &g2.files()[0]);
        assert_eq!(f1.path, f2.path);
        assert!(f2.pages > f1.pages, "1% is appended");
        let (a, b) = (bytes(&g1, f1), bytes(&g2, f2));
        let changed = a.chunks(PAGE).zip(b.chunks(PAGE)).filter(|(x, y)| x != y).count();
        let rate = changed as f64 / f1.pages as f64;
        assert!((0.012..0.03).contains(&rate), "changed {rate:.4} of pages");
        assert!(f2.mtime_ns > f1.mtime_ns);
        assert!(g2.files().iter().filter(|f| f.kind == RelKind::Wal).all(|w| !g1.files().contains(w)), "new WAL");
    }
}
