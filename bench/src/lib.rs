//! The single-core stage costs the pipeline is measured against.

use std::time::Instant;

use dataplane::pipeline::chunker::{self, ChunkPolicy};

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
        1.0 / (self.read + self.after_read())
    }

    /// Seconds per byte of the stages after the read: cutting, hashing, compressing.
    pub fn after_read(&self) -> f64 {
        self.chunk + self.hash + self.compress
    }
}

/// Measures the stages one after another on one core, the way the pipeline runs them:
/// touch the mapped pages, cut by `policy` (FastCDC, or fixed page chunks), skip all-zero
/// chunks, keyed BLAKE3 per chunk, zstd per chunk.
pub fn measure_stages(data: &[u8], policy: ChunkPolicy, level: i32) -> StageCosts {
    let n = data.len() as f64;
    let t = Instant::now();
    let mut sum = 0u64;
    for page in data.chunks(4096) {
        sum = sum.wrapping_add(u64::from(page[0]));
    }
    std::hint::black_box(sum);
    let read = t.elapsed().as_secs_f64() / n;

    let t = Instant::now();
    let mut cuts: Vec<(usize, usize)> = chunker::cuts(data, policy).collect();
    cuts.retain(|&(o, l)| !chunker::is_zero(&data[o..o + l]));
    let chunk = t.elapsed().as_secs_f64() / n;

    let key = wire::RepoKey::from_bytes([1; 32]);
    let t = Instant::now();
    for &(o, l) in &cuts {
        std::hint::black_box(key.blob_id(&data[o..o + l]));
    }
    let hash = t.elapsed().as_secs_f64() / n;

    let mut compressor = zstd::bulk::Compressor::new(level).expect("zstd level");
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(policy.max_len()));
    let t = Instant::now();
    for &(o, l) in &cuts {
        out.clear();
        std::hint::black_box(compressor.compress_to_buffer(&data[o..o + l], &mut out).expect("fits"));
    }
    let compress = t.elapsed().as_secs_f64() / n;
    StageCosts { read, chunk, hash, compress }
}
