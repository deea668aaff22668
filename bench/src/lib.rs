//! Database-like test data and the single-core stage costs the pipeline is measured against.

use std::time::Instant;

pub mod pg;

use wire::repo::ChunkerParams;

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

/// Seconds per byte of each stage on one core, measured on `data`.
#[derive(Clone, Copy, Debug)]
pub struct StageCosts {
    pub read: f64,
    pub chunk: f64,
    pub hash: f64,
    pub compress: f64,
}

impl StageCosts {
    /// Bytes per second one core can back up if it does nothing but the stages.
    pub fn core_limit(&self) -> f64 {
        1.0 / (self.read + self.chunk + self.hash + self.compress)
    }
}

/// Measures the stages one after another on one core, the way the pipeline runs them:
/// touch the mapped pages, FastCDC, keyed BLAKE3 per chunk, zstd per chunk.
pub fn measure_stages(data: &[u8], params: ChunkerParams, level: i32) -> StageCosts {
    let n = data.len() as f64;
    let t = Instant::now();
    let mut sum = 0u64;
    for page in data.chunks(4096) {
        sum = sum.wrapping_add(u64::from(page[0]));
    }
    std::hint::black_box(sum);
    let read = t.elapsed().as_secs_f64() / n;

    let t = Instant::now();
    let cuts: Vec<(usize, usize)> = dataplane::pipeline::chunker::chunks(data, params).collect();
    let chunk = t.elapsed().as_secs_f64() / n;

    let key = wire::RepoKey::from_bytes([1; 32]);
    let t = Instant::now();
    for &(o, l) in &cuts {
        std::hint::black_box(key.blob_id(&data[o..o + l]));
    }
    let hash = t.elapsed().as_secs_f64() / n;

    let mut compressor = zstd::bulk::Compressor::new(level).expect("zstd level");
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(params.max as usize));
    let t = Instant::now();
    for &(o, l) in &cuts {
        out.clear();
        std::hint::black_box(compressor.compress_to_buffer(&data[o..o + l], &mut out).expect("fits"));
    }
    let compress = t.elapsed().as_secs_f64() / n;
    StageCosts { read, chunk, hash, compress }
}
