//! Which files `--chunking auto` cuts into page chunks: the page files of the database engines
//! it recognises, by name and by content. Pure: a path, a length and the file's first bytes in,
//! a verdict out.

use std::path::Path;

/// PostgreSQL's page size (fixed at build time; Debian's and every common build use 8 KiB).
pub const POSTGRES_PAGE: u32 = 8192;
/// How many of a file's first bytes [`detect`] looks at: the InnoDB tablespace flags end at
/// byte 58, the SQLite page size at byte 18.
pub const HEAD: usize = 64;

/// A database engine whose data files are arrays of fixed-size pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Engine {
    Postgres,
    InnoDb,
    Sqlite,
}

impl Engine {
    pub const ALL: [Engine; 3] = [Engine::Postgres, Engine::InnoDb, Engine::Sqlite];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgresql",
            Engine::InnoDb => "innodb",
            Engine::Sqlite => "sqlite",
        }
    }
}

/// What a file was found to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A page file of `engine` whose pages are `page` bytes.
    Pages { engine: Engine, page: u32 },
    /// Not a page file: chunked by content.
    Other,
    /// Named like a page file but not one (a torn last page, a file being written, a format
    /// variant): chunked by content, and the backup says why.
    Suspect(String),
}

/// What `path`, `len` bytes long and starting with `head` (its first [`HEAD`] bytes, fewer if
/// it is shorter), is.
pub fn detect(path: &Path, len: u64, head: &[u8]) -> Detected {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if is_relation_path(path) {
        if len.is_multiple_of(u64::from(POSTGRES_PAGE)) {
            return Detected::Pages { engine: Engine::Postgres, page: POSTGRES_PAGE };
        }
        if is_relation_file_name(name) {
            return Detected::Suspect(format!(
                "named like a PostgreSQL relation file but {len} bytes long, not a whole number of 8 KiB pages \
                 (a torn last page, or a file being written?): chunked by content"
            ));
        }
    }
    if let Some(page) = sqlite_page_size(head) {
        return whole_pages(Engine::Sqlite, "an SQLite database", page, len);
    }
    if is_innodb_file_name(name) {
        return match innodb_page_size(head) {
            Some(page) => whole_pages(Engine::InnoDb, "an InnoDB tablespace", page, len),
            None => Detected::Suspect(
                "named like an InnoDB tablespace but its first page is no tablespace header \
                 (a file being created, or a format cbcr does not know): chunked by content"
                    .into(),
            ),
        };
    }
    Detected::Other
}

fn whole_pages(engine: Engine, what: &str, page: u32, len: u64) -> Detected {
    if len.is_multiple_of(u64::from(page)) {
        Detected::Pages { engine, page }
    } else {
        Detected::Suspect(format!(
            "{what} with {page}-byte pages but {len} bytes long, not a whole number of pages \
             (a file being written?): chunked by content"
        ))
    }
}

/// Below a `base` or `global` directory, where PostgreSQL keeps its relation files.
pub fn is_relation_path(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "base" || c.as_os_str() == "global")
}

/// Named as PostgreSQL names relation files: a filenode, a fork suffix (`_fsm`, `_vm`,
/// `_init`), a segment number (`.1`): `16397`, `16397_vm`, `16397.2`.
pub fn is_relation_file_name(name: &str) -> bool {
    let (stem, segment) = name.split_once('.').unwrap_or((name, "0"));
    let node = ["_fsm", "_vm", "_init"].iter().find_map(|f| stem.strip_suffix(f)).unwrap_or(stem);
    digits(node) && digits(segment)
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Named as InnoDB names its tablespaces: file-per-table `*.ibd`, the system tablespace
/// `ibdata1`, undo tablespaces (`undo001` in MariaDB, `undo_001` and `*.ibu` in MySQL), the
/// temporary tablespace `ibtmp1`.
fn is_innodb_file_name(name: &str) -> bool {
    let numbered = |prefix: &str| name.strip_prefix(prefix).is_some_and(digits);
    name.ends_with(".ibd") || name.ends_with(".ibu") || ["ibdata", "ibtmp", "undo", "undo_"].into_iter().any(numbered)
}

/// The page size of the tablespace whose first page starts with `head`, from the flags of its
/// file space header; `None` if `head` is not a tablespace's first page.
///
/// Page 0 of every tablespace is a file space header page: the FIL header's page number (bytes
/// 4..8) is 0, its page type (24..26) is `FIL_PAGE_TYPE_FSP_HDR` (8), its space id (34..38)
/// equals the FSP header's (38..42), and the space flags are bytes 54..58. Two flag layouts:
/// MariaDB's `full_crc32` (bit 4 set; page size shift in bits 0..4) and the original one of
/// MySQL and older MariaDB (compressed page size in bits 1..5, page size shift in bits 6..10,
/// 0 meaning 16 KiB). A size shift `s` is a page of `512 << s` bytes. A `ROW_FORMAT=COMPRESSED`
/// tablespace's pages are its compressed size on disk, and that is the size returned.
pub fn innodb_page_size(head: &[u8]) -> Option<u32> {
    const FSP_HDR: u16 = 8;
    const FULL_CRC32: u32 = 1 << 4;
    let u32_at = |at: usize| Some(u32::from_be_bytes(head.get(at..at + 4)?.try_into().ok()?));
    let page_type = u16::from_be_bytes(head.get(24..26)?.try_into().ok()?);
    if u32_at(4)? != 0 || page_type != FSP_HDR || u32_at(34)? != u32_at(38)? {
        return None;
    }
    let flags = u32_at(54)?;
    let size = |shift: u32| (3..=7).contains(&shift).then(|| 512 << shift);
    if flags & FULL_CRC32 != 0 {
        return size(flags & 0xf);
    }
    let logical = match (flags >> 6) & 0xf {
        0 => 16 << 10,
        shift => size(shift)?,
    };
    match (flags >> 1) & 0xf {
        0 => Some(logical),
        zip if zip <= 5 && 512 << zip <= logical => Some(512 << zip),
        _ => None,
    }
}

/// The page size of the SQLite database whose header starts with `head`; `None` if it is not
/// one. The header is the 16 bytes `SQLite format 3\0`, then the page size as a big-endian
/// u16 (a power of two from 512 to 32768, or 1 for 65536).
pub fn sqlite_page_size(head: &[u8]) -> Option<u32> {
    if !head.starts_with(b"SQLite format 3\0") {
        return None;
    }
    match u16::from_be_bytes(head.get(16..18)?.try_into().ok()?) {
        1 => Some(64 << 10),
        p if p.is_power_of_two() && p >= 512 => Some(u32::from(p)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Page 0 of an InnoDB tablespace with `flags`, as InnoDB writes its first 64 bytes.
    fn innodb_head(space: u32, flags: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEAD];
        h[8..16].fill(0xff);
        h[24..26].copy_from_slice(&8u16.to_be_bytes());
        h[34..38].copy_from_slice(&space.to_be_bytes());
        h[38..42].copy_from_slice(&space.to_be_bytes());
        h[54..58].copy_from_slice(&flags.to_be_bytes());
        h
    }

    fn sqlite_head(page: u16) -> Vec<u8> {
        let mut h = b"SQLite format 3\0".to_vec();
        h.extend_from_slice(&page.to_be_bytes());
        h.resize(HEAD, 0);
        h
    }

    #[test]
    fn innodb_page_sizes_come_from_either_flag_layout() {
        // MariaDB 10.11's ibdata1 (full_crc32, 16 KiB): flags 0x15, as read from a real one.
        assert_eq!(innodb_page_size(&innodb_head(0, 0x15)), Some(16 << 10));
        assert_eq!(innodb_page_size(&innodb_head(7, 0x10 | 3)), Some(4 << 10));
        assert_eq!(innodb_page_size(&innodb_head(7, 0x10 | 7)), Some(64 << 10));
        // The original layout: shift 0 is 16 KiB; 4 is 8 KiB; atomic blobs and post-antelope
        // bits change nothing.
        assert_eq!(innodb_page_size(&innodb_head(5, 0x21)), Some(16 << 10));
        assert_eq!(innodb_page_size(&innodb_head(5, 4 << 6 | 0x21)), Some(8 << 10));
        // ROW_FORMAT=COMPRESSED KEY_BLOCK_SIZE=8: pages of 8 KiB on disk.
        assert_eq!(innodb_page_size(&innodb_head(5, 4 << 1 | 0x21)), Some(8 << 10));
        // Invalid sizes and headers.
        assert_eq!(innodb_page_size(&innodb_head(5, 0x10 | 9)), None);
        assert_eq!(innodb_page_size(&innodb_head(5, 2 << 6)), None);
        assert_eq!(innodb_page_size(&innodb_head(5, 4 << 6 | 5 << 1)), None, "a zip size above the page size");
        let mut other_space = innodb_head(5, 0x15);
        other_space[41] = 6;
        assert_eq!(innodb_page_size(&other_space), None);
        let mut not_page_zero = innodb_head(5, 0x15);
        not_page_zero[7] = 1;
        assert_eq!(innodb_page_size(&not_page_zero), None);
        assert_eq!(innodb_page_size(&[0; HEAD]), None, "a zeroed page has type 0");
        assert_eq!(innodb_page_size(&innodb_head(0, 0x15)[..57]), None);
    }

    #[test]
    fn sqlite_page_sizes_come_from_the_header() {
        assert_eq!(sqlite_page_size(&sqlite_head(4096)), Some(4096));
        assert_eq!(sqlite_page_size(&sqlite_head(1)), Some(65536));
        assert_eq!(sqlite_page_size(&sqlite_head(512)), Some(512));
        assert_eq!(sqlite_page_size(&sqlite_head(256)), None);
        assert_eq!(sqlite_page_size(&sqlite_head(3000)), None);
        assert_eq!(sqlite_page_size(&sqlite_head(4096)[..17]), None);
        assert_eq!(sqlite_page_size(b"SQLite format 2\0\x10\x00"), None);
    }

    #[test]
    fn files_are_detected_by_name_and_content() {
        let p = |s: &str| Path::new(s).to_owned();
        let pages = |engine, page| Detected::Pages { engine, page };
        let ibd = innodb_head(9, 0x15);
        assert_eq!(detect(&p("/pg/base/5/16397"), 8192 * 3, &[]), pages(Engine::Postgres, 8192));
        assert_eq!(detect(&p("/pg/global/1262"), 8192, &[]), pages(Engine::Postgres, 8192));
        assert!(matches!(detect(&p("/pg/base/5/16397"), 8193, &[]), Detected::Suspect(w) if w.contains("8193 bytes")));
        assert_eq!(detect(&p("/pg/base/5/notes.txt"), 8193, &[]), Detected::Other);
        for name in ["t1.ibd", "ibdata1", "undo001", "undo_002", "x.ibu", "ibtmp1"] {
            let path = p(&format!("/var/lib/mysql/db/{name}"));
            assert_eq!(detect(&path, 16384 * 6, &ibd), pages(Engine::InnoDb, 16384), "{name}");
            assert!(matches!(detect(&path, 16384 * 6 + 1, &ibd), Detected::Suspect(w) if w.contains("InnoDB")));
            assert!(
                matches!(detect(&path, 16384, &[0; HEAD]), Detected::Suspect(w) if w.contains("no tablespace header"))
            );
        }
        // A tablespace header under another name is not taken for one; a name alone neither.
        for name in ["t1.frm", "ibdata", "undo", "undox1", "ib_logfile0"] {
            assert_eq!(detect(&p(&format!("/m/{name}")), 16384 * 6, &ibd), Detected::Other, "{name}");
        }
        // SQLite by content alone, any name.
        let lite = sqlite_head(4096);
        assert_eq!(detect(&p("/srv/app/state"), 4096 * 10, &lite), pages(Engine::Sqlite, 4096));
        assert!(
            matches!(detect(&p("/srv/app.db"), 4096 * 10 + 24, &lite), Detected::Suspect(w) if w.contains("SQLite"))
        );
        assert_eq!(detect(&p("/srv/app.db"), 4096 * 10, &[]), Detected::Other);
    }

    #[test]
    fn relation_file_names() {
        for name in ["16397", "16397_vm", "16397_fsm", "16397_init", "16397.2", "1_vm.12"] {
            assert!(is_relation_file_name(name), "{name}");
        }
        for name in ["pg_filenode.map", "PG_VERSION", "pg_internal.init", "16397_x", "_vm", "12.", "a1"] {
            assert!(!is_relation_file_name(name), "{name}");
        }
    }

    proptest! {
        #[test]
        fn detection_never_panics(name in "[a-z_0-9.]{0,12}", len in any::<u64>(), head in proptest::collection::vec(any::<u8>(), 0..HEAD)) {
            let _ = detect(&Path::new("/d").join(name), len, &head);
        }
    }
}
