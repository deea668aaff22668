//! Criterion micro-benchmarks of the pipeline stages on 64 KiB pieces of database-like pages.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wire::repo::ChunkerParams;

const PIECE: usize = 64 << 10;

fn stages(c: &mut Criterion) {
    let data = datagen::db_pages(7, 4096); // 32 MiB
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc_v2020_64k_avg", |b| {
        b.iter(|| dataplane::pipeline::chunker::chunks(&data, ChunkerParams::default()).count())
    });
    let key = wire::RepoKey::from_bytes([1; 32]);
    g.bench_function("blake3_keyed_64k", |b| {
        b.iter(|| data.chunks(PIECE).map(|p| key.blob_id(p).0[0] as u64).sum::<u64>())
    });
    for level in [-1, 1, 3] {
        let mut compressor = zstd::bulk::Compressor::new(level).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(PIECE));
        g.bench_with_input(BenchmarkId::new("zstd_compress_64k", level), &level, |b, _| {
            b.iter(|| {
                data.chunks(PIECE)
                    .map(|p| {
                        out.clear();
                        compressor.compress_to_buffer(p, &mut out).unwrap()
                    })
                    .sum::<usize>()
            })
        });
    }
    let compressed: Vec<Vec<u8>> = data.chunks(PIECE).map(|p| zstd::bulk::compress(p, 1).unwrap()).collect();
    let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
    let mut out = Vec::with_capacity(PIECE);
    g.bench_function("zstd_decompress_64k", |b| {
        b.iter(|| {
            compressed
                .iter()
                .map(|p| {
                    out.clear();
                    decompressor.decompress_to_buffer(p, &mut out).unwrap()
                })
                .sum::<usize>()
        })
    });
    // Sealing: what encryption at rest adds per stored byte (one envelope per blob).
    let sealer = wire::crypto::DataKey::from_bytes([2; 32]).session([3; 16]);
    let mut sealed = Vec::with_capacity(PIECE + wire::crypto::OVERHEAD);
    g.bench_function("aes256gcm_seal_64k", |b| {
        b.iter(|| {
            data.chunks(PIECE)
                .enumerate()
                .map(|(n, p)| {
                    sealed.clear();
                    sealer.seal(n as u64, b"id", p, &mut sealed);
                    sealed.len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("zero_check_64k", |b| {
        b.iter(|| data.chunks(PIECE).filter(|p| dataplane::pipeline::chunker::is_zero(p)).count())
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
