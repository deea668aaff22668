//! Page files inside a tar stream (`pg_basebackup -Ft` writes `base.tar`): where each member's
//! data starts, so a relation file's pages are cut at their own 8 KiB boundaries although the
//! member starts at any multiple of 512 bytes. Pure: reads the mapped bytes, does no I/O.
//!
//! Everything but the data of page-structured members (headers, padding, other files) is
//! chunked by content. Long names (GNU `L`, pax `path`) are followed; sparse members, whose
//! stored bytes are not the file's layout, and anything unreadable end the scan with a warning:
//! the rest of the file is then chunked by content, which is always correct, just larger.

const BLOCK: u64 = 512;

/// Data of one page-structured member: `[start, start + len)` of the tar file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub len: u64,
}

/// What a scan of a tar file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TarLayout {
    /// In file order, not overlapping.
    pub pages: Vec<PageRegion>,
    /// Why part of the file is chunked by content although it may hold page files.
    pub warnings: Vec<String>,
}

/// True when `bytes` start with a ustar (POSIX or GNU) header.
pub(crate) fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= BLOCK as usize && &bytes[257..262] == b"ustar" && checksum_ok(&bytes[..BLOCK as usize])
}

/// Finds the page-structured members of tar `bytes`: regular files whose name `is_page_file`
/// accepts and whose size is a multiple of `page`. Keeps at most `max_regions`. (What a
/// [`TarScanner`] fed the whole file finds.)
#[cfg(test)]
pub(crate) fn scan(bytes: &[u8], page: u64, max_regions: usize, is_page_file: impl Fn(&str) -> bool) -> TarLayout {
    let mut scanner = TarScanner::new(page, max_regions, is_page_file);
    scanner.feed(bytes);
    scanner.finish()
}

/// [`scan`] of a stream, fed in pieces of any length (standard input): the regions of a
/// member are known once the piece holding its header is fed, before its data. Holds at most a
/// header and an extension's body (`limits::TAR_MAX_EXTENSION`) of the stream at a time.
pub(crate) struct TarScanner<F> {
    page: u64,
    max_regions: usize,
    is_page_file: F,
    /// Stream offset of the next header.
    next: u64,
    /// Bytes fed so far.
    fed: u64,
    /// The stream from `next` on, while the header there (and an extension's body after it)
    /// has not been fed whole.
    pending: Vec<u8>,
    long_name: Option<String>,
    /// The last header read, and its member's size: named if the stream ends inside it.
    last: (u64, u64),
    done: bool,
    pub layout: TarLayout,
}

/// What the header at the scanner's next offset says.
enum Step {
    /// This many bytes from the header on are needed (it, and an extension's body).
    Need(usize),
    /// The next header is at this offset.
    Next(u64),
    /// The scan is over (the archive's end, or a warning was given).
    Stop,
}

impl<F: Fn(&str) -> bool> TarScanner<F> {
    pub(crate) fn new(page: u64, max_regions: usize, is_page_file: F) -> Self {
        TarScanner {
            page,
            max_regions,
            is_page_file,
            next: 0,
            fed: 0,
            pending: vec![],
            long_name: None,
            last: (0, 0),
            done: false,
            layout: TarLayout::default(),
        }
    }

    /// The stream's next bytes.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        let mut bytes_at = self.fed;
        self.fed += bytes.len() as u64;
        while !self.done && self.next < self.fed {
            let mut unit = if self.next < bytes_at {
                std::mem::take(&mut self.pending) // Holds [next, bytes_at).
            } else {
                let skip = (self.next - bytes_at) as usize;
                (bytes, bytes_at) = (&bytes[skip..], self.next);
                vec![]
            };
            // Only a unit cut short by the end of `bytes` is copied.
            let step = if unit.is_empty() {
                match self.step(bytes) {
                    Step::Need(_) => {
                        self.pending = bytes.to_vec();
                        return;
                    }
                    step => step,
                }
            } else {
                loop {
                    match self.step(&unit) {
                        Step::Need(_) if bytes.is_empty() => {
                            self.pending = unit;
                            return;
                        }
                        Step::Need(n) => {
                            let take = (n - unit.len()).min(bytes.len());
                            unit.extend_from_slice(&bytes[..take]);
                            (bytes, bytes_at) = (&bytes[take..], bytes_at + take as u64);
                        }
                        step => break step,
                    }
                }
            };
            match step {
                Step::Next(next) => self.next = next,
                Step::Stop | Step::Need(_) => self.done = true,
            }
        }
    }

    /// The layout, once the stream's `fed` bytes are all there is: a member whose data runs past
    /// the end is no region, and is named.
    pub(crate) fn finish(mut self) -> TarLayout {
        if !self.done && (self.next > self.fed || self.pending.len() >= BLOCK as usize) {
            let (at, size) = self.last;
            self.layout.warnings.push(format!(
                "at byte {at}: member of {size} bytes runs past the end; the rest is chunked by content"
            ));
            let end = self.fed;
            self.layout.pages.retain(|r| r.start + r.len <= end);
        }
        self.layout
    }

    fn stop(&mut self, at: u64, why: String) -> Step {
        self.layout.warnings.push(format!("at byte {at}: {why}"));
        Step::Stop
    }

    /// Reads the header that `unit` (the stream from the next offset on) starts with.
    fn step(&mut self, unit: &[u8]) -> Step {
        let at = self.next;
        let Some(header) = unit.get(..BLOCK as usize) else { return Step::Need(BLOCK as usize) };
        if header.iter().all(|&b| b == 0) {
            return Step::Stop; // End of archive.
        }
        if !checksum_ok(header) {
            return self.stop(at, "not a valid tar header; the rest is chunked by content".into());
        }
        let Some(size) = octal_or_binary(&header[124..136]) else {
            return self.stop(at, "unreadable member size; the rest is chunked by content".into());
        };
        let data = at + BLOCK;
        let Some(next) = size.checked_next_multiple_of(BLOCK).and_then(|s| data.checked_add(s)) else {
            return self.stop(at, format!("member of {size} bytes runs past the end; the rest is chunked by content"));
        };
        self.last = (at, size);
        match header[156] {
            kind @ (b'L' | b'x') => {
                if size > crate::limits::TAR_MAX_EXTENSION as u64 {
                    return self
                        .stop(at, format!("an extended header of {size} bytes; the rest is chunked by content"));
                }
                let end = BLOCK as usize + size as usize;
                let Some(body) = unit.get(BLOCK as usize..end) else { return Step::Need(end) };
                if kind == b'L' {
                    self.long_name = Some(c_string(body));
                } else if let Some(path) = pax_path(body) {
                    self.long_name = Some(path);
                }
            }
            b'S' => {
                return self.stop(at, format!("{} is a sparse member; the rest is chunked by content", name(header)))
            }
            b'0' | 0 | b'7' => {
                let name = self.long_name.take().unwrap_or_else(|| name(header));
                if size > 0 && size.is_multiple_of(self.page) && (self.is_page_file)(&name) {
                    if self.layout.pages.len() == self.max_regions {
                        let max = self.max_regions;
                        return self.stop(at, format!("more than {max} page files; the rest is chunked by content"));
                    }
                    self.layout.pages.push(PageRegion { start: data, len: size });
                }
            }
            b'g' => {}
            _ => self.long_name = None,
        }
        Step::Next(next)
    }
}

/// `prefix/name` of a ustar header.
fn name(header: &[u8]) -> String {
    let name = c_string(&header[..100]);
    let prefix = if &header[257..262] == b"ustar" { c_string(&header[345..500]) } else { String::new() };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The `path` record of a pax extended header (`"<len> path=<value>\n"` records).
fn pax_path(mut records: &[u8]) -> Option<String> {
    let mut path = None;
    while !records.is_empty() {
        let space = records.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&records[..space]).ok()?.parse().ok()?;
        if len <= space || len > records.len() {
            return None;
        }
        let record = &records[space + 1..len];
        if let Some(value) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(value.strip_suffix(b"\n").unwrap_or(value)).into_owned());
        }
        records = &records[len..];
    }
    path
}

/// A numeric field: octal text, or GNU base-256 when the first byte has its high bit set.
fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // Only fields longer than 8 bytes (sizes, not checksums) can be base-256 here.
        let high = field.len().checked_sub(8).filter(|&h| h > 0)?;
        if field[0] != 0x80 || field[1..high].iter().any(|&b| b != 0) {
            return None; // Negative, or more than 64 bits.
        }
        return Some(u64::from_be_bytes(field[high..].try_into().ok()?));
    }
    let text = std::str::from_utf8(field).ok()?.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The header checksum: the sum of its bytes with the checksum field read as spaces.
fn checksum_ok(header: &[u8]) -> bool {
    let Some(stored) = octal_or_binary(&header[148..156]) else { return false };
    let sum: u64 =
        header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    sum == stored
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ustar header for a member; `kind` is the type flag.
    pub(crate) fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    /// Appends a member (header, data, padding).
    pub(crate) fn member(tar: &mut Vec<u8>, name: &str, data: &[u8], kind: u8) {
        tar.extend(header(name, data.len() as u64, kind));
        tar.extend_from_slice(data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }

    fn pages(name: &str) -> bool {
        name.starts_with("base/")
    }

    #[test]
    fn finds_page_members_at_their_odd_offsets() {
        let mut tar = vec![];
        member(&mut tar, "PG_VERSION", b"15\n", b'0');
        member(&mut tar, "base/1/1259", &[7u8; 3 * 8192], b'0');
        member(&mut tar, "base/1/notes", &[1u8; 100], b'0');
        member(&mut tar, "base/1/2600", &[9u8; 8192], b'0');
        tar.extend([0u8; 1024]);
        assert!(is_tar(&tar));
        let layout = scan(&tar, 8192, 10, pages);
        assert_eq!(layout.warnings, Vec::<String>::new());
        assert_eq!(
            layout.pages,
            vec![PageRegion { start: 1536, len: 3 * 8192 }, PageRegion { start: 1536 + 3 * 8192 + 1536, len: 8192 }]
        );
    }

    #[test]
    fn follows_long_names_and_stops_at_sparse_members() {
        let long = format!("base/16384/{}/16397", "d".repeat(120));
        let mut tar = vec![];
        member(&mut tar, "././@LongLink", format!("{long}\0").as_bytes(), b'L');
        member(&mut tar, "truncated-name", &[3u8; 8192], b'0');
        let pax = "path=base/1/99\n";
        let record = format!("{} {pax}", pax.len() + 3);
        member(&mut tar, "PaxHeaders/x", record.as_bytes(), b'x');
        member(&mut tar, "short", &[4u8; 8192], b'0');
        member(&mut tar, "base/1/sparse", &[5u8; 8192], b'S');
        member(&mut tar, "base/1/after", &[6u8; 8192], b'0');
        let layout = scan(&tar, 8192, 10, pages);
        assert_eq!(layout.pages.len(), 2, "{layout:?}");
        // The `L` member (header and one block of name) comes first.
        assert_eq!(layout.pages[0].start, 1536);
        assert_eq!(layout.warnings.len(), 1);
        assert!(layout.warnings[0].contains("sparse"), "{:?}", layout.warnings);
    }

    #[test]
    fn damage_ends_the_scan_with_a_warning_never_a_panic() {
        let mut tar = vec![];
        member(&mut tar, "base/1/1", &[7u8; 8192], b'0');
        member(&mut tar, "base/1/2", &[7u8; 8192], b'0');
        for cut in [0, 100, 512, 700, 9000, tar.len() - 1] {
            let layout = scan(&tar[..cut], 8192, 10, pages);
            assert!(layout.pages.len() <= 1);
        }
        let mut bad = tar.clone();
        bad[512 + 8192 + 3] ^= 1; // The second header's name: its checksum no longer matches.
        let layout = scan(&bad, 8192, 10, pages);
        assert_eq!(layout.pages.len(), 1);
        assert!(layout.warnings[0].contains("not a valid tar header"), "{:?}", layout.warnings);
    }

    /// The same layout whatever pieces the stream comes in.
    fn scan_in_pieces(bytes: &[u8], piece: usize) -> TarLayout {
        let mut scanner = TarScanner::new(8192, 10, pages);
        for p in bytes.chunks(piece.max(1)) {
            scanner.feed(p);
        }
        scanner.finish()
    }

    #[test]
    fn a_stream_fed_in_pieces_scans_as_the_whole() {
        let long = format!("base/16384/{}/16397", "d".repeat(120));
        let mut tar = vec![];
        member(&mut tar, "PG_VERSION", b"15\n", b'0');
        member(&mut tar, "././@LongLink", format!("{long}\0").as_bytes(), b'L');
        member(&mut tar, "x", &[3u8; 2 * 8192], b'0');
        let pax = format!("path=base/1/{}\n", "p".repeat(700));
        let record = format!("{} {pax}", pax.len() + 4);
        member(&mut tar, "PaxHeaders/x", record.as_bytes(), b'x');
        member(&mut tar, "short", &[4u8; 8192], b'0');
        member(&mut tar, "base/1/2", &[5u8; 8192], b'0');
        let whole = scan(&tar, 8192, 10, pages);
        assert_eq!(whole.pages.len(), 3, "{whole:?}");
        for piece in [1, 100, 511, 512, 513, 1000, 8192, 9000, tar.len()] {
            assert_eq!(scan_in_pieces(&tar, piece), whole, "pieces of {piece}");
        }
        // Cut short: the member running past the end is named and is no region, in pieces too.
        let cut = &tar[..tar.len() - 100];
        let short = scan(cut, 8192, 10, pages);
        assert_eq!(short.pages.len(), 2);
        assert!(short.warnings[0].contains("runs past the end"), "{:?}", short.warnings);
        assert_eq!(scan_in_pieces(cut, 700), short);
    }

    proptest::proptest! {
        #[test]
        fn pieces_never_change_the_layout(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000), piece in 1usize..700) {
            proptest::prop_assert_eq!(scan_in_pieces(&bytes, piece), scan(&bytes, 8192, 10, pages));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let _ = is_tar(&bytes);
            let layout = scan(&bytes, 8192, 4, |_| true);
            proptest::prop_assert!(layout.pages.iter().all(|p| p.start + p.len <= bytes.len() as u64));
        }
    }
}
