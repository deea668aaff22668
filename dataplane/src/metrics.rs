//! Per-core latency histograms of the pipeline stages. Each core owns its own (no shared
//! atomics on the hot path); they are merged when a command ends.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// A pipeline stage whose latency is recorded per chunk.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// Finding the next cut point, including reading (or generating) the source bytes.
    Chunk,
    /// Keyed BLAKE3 of one chunk.
    Hash,
    /// zstd of one new chunk.
    Compress,
    /// Appending one new chunk to the open pack.
    Write,
    /// Asking a receiver which of a batch of chunks it lacks (remote repositories only).
    Dedup,
}

const STAGES: [(Stage, &str); 5] = [
    (Stage::Chunk, "chunk"),
    (Stage::Hash, "hash"),
    (Stage::Compress, "compress"),
    (Stage::Write, "write"),
    (Stage::Dedup, "have"),
];

/// Latency of each stage, in nanoseconds.
#[derive(Clone, Debug)]
pub struct StageHistograms {
    stages: [Histogram<u64>; STAGES.len()],
}

impl Default for StageHistograms {
    fn default() -> Self {
        // 1 ns to 60 s at 2 significant digits: ~20 KiB per stage.
        Self {
            stages: std::array::from_fn(|_| Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid bounds")),
        }
    }
}

impl StageHistograms {
    #[inline]
    pub fn record(&mut self, stage: Stage, took: Duration) {
        self.stages[stage as usize].saturating_record(took.as_nanos().max(1) as u64);
    }

    pub fn merge(&mut self, other: &StageHistograms) {
        for (a, b) in self.stages.iter_mut().zip(&other.stages) {
            a.add(b).expect("same bounds");
        }
    }

    /// `{"chunk": {"count", "p50_us", "p99_us", "p999_us", "max_us"}, ...}`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        for (stage, name) in STAGES {
            let h = &self.stages[stage as usize];
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            out.insert(
                name.into(),
                json!({"count": h.len(), "p50_us": us(0.5), "p99_us": us(0.99), "p999_us": us(0.999), "max_us": h.max() as f64 / 1000.0}),
            );
        }
        Value::Object(out)
    }
}
