//! Data for tests and benchmarks, in one place: deterministic database-like pages, and real
//! PostgreSQL and MariaDB servers to run pgbench and sysbench against.

pub mod mariadb;
pub mod pg;
pub mod server;

/// Page size of the generated data (PostgreSQL's).
pub const PAGE: usize = 8192;

/// Deterministic pages that look like a database's: a page header, rows of text and numbers
/// with random fields, and free space of zeros. Compressibility varies per page (from nearly
/// full pages of rows to mostly empty ones), roughly 3x overall with zstd -1; not random bytes.
pub fn db_pages(seed: u64, pages: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * PAGE];
    fill_db_pages(seed, 0, &mut out);
    out
}

/// Fills `buf` (a multiple of [`PAGE`]) with the pages that start at page number `first`.
pub fn fill_db_pages(seed: u64, first: u64, buf: &mut [u8]) {
    assert!(buf.len().is_multiple_of(PAGE));
    for (i, page) in buf.chunks_mut(PAGE).enumerate() {
        let n = first + i as u64;
        let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        page.fill(0);
        page[..8].copy_from_slice(&n.to_le_bytes());
        let used = 1024 + (next() % (PAGE as u64 - 1024)) as usize;
        let mut pos = 24;
        while pos + 48 <= used {
            let r = next();
            // A row: fixed text, a key, two numbers and 16 bytes that don't compress.
            page[pos..pos + 8].copy_from_slice(b"account ");
            page[pos + 8..pos + 16].copy_from_slice(&(r % 100_000).to_le_bytes());
            page[pos + 16..pos + 24].copy_from_slice(&((r >> 20) % 1000).to_le_bytes());
            page[pos + 24..pos + 32].copy_from_slice(&next().to_le_bytes());
            page[pos + 32..pos + 40].copy_from_slice(&next().to_le_bytes());
            page[pos + 40..pos + 48].copy_from_slice(b"filler  ");
            pos += 48;
        }
    }
}
