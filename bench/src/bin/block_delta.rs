//! Page chunks (policy a) against block deltas (policy b) on the same synthetic database over
//! several generations: bytes stored per generation (zstd -1, as cbcr stores), index entries,
//! and blobs a restore reads per block at the last generation.
//!
//! Policy b is modelled, not built into cbcr: a 64 KiB block changed in a generation is stored
//! as a delta (a page bitmap plus the changed pages) against its previous version, until the
//! chain reaches `--chain` deltas; then the whole block is stored again (re-basing).
//!
//! ```text
//! cargo run --release -p bench --bin block_delta -- [--size 4GiB] [--gens 5] [--chain 4]
//! ```

use dataplane::source::synth::{SynthFile, SynthSpec, PAGE};

const BLOCK: usize = 64 << 10;
const PAGE_CHUNKS: [usize; 4] = [8 << 10, 16 << 10, 32 << 10, 64 << 10];

struct Args {
    size: u64,
    gens: u32,
    chain: u32,
}

fn parse_args() -> Args {
    let mut a = Args { size: 4 << 30, gens: 5, chain: 4 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = dataplane::parse_size(&value).expect("--size like 4GiB"),
            "--gens" => a.gens = value.parse().expect("--gens N"),
            "--chain" => a.chain = value.parse().expect("--chain N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// What one policy cost so far.
#[derive(Default, Clone)]
struct Cost {
    stored: Vec<u64>,
    entries: u64,
}

fn compressed(c: &mut zstd::bulk::Compressor<'_>, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0; // Zero chunks are not stored.
    }
    c.compress(data).map_or(data.len(), |z| z.len().min(data.len())) as u64
}

fn main() {
    let args = parse_args();
    let spec = |gen: u32| SynthSpec::parse(&format!("synth://pg?size={}&seed=7&gen={gen}", args.size)).unwrap();
    let mut zstd = zstd::bulk::Compressor::new(1).unwrap();
    let mut chunked: Vec<Cost> = vec![Cost::default(); PAGE_CHUNKS.len()];
    let mut delta = Cost::default();
    // Per file path and block: the current chain length of policy b.
    let mut chains: std::collections::HashMap<String, Vec<u32>> = Default::default();
    let mut previous: Option<SynthSpec> = None;
    let (mut old, mut new) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    for gen in 1..=args.gens {
        let now = spec(gen);
        let before: std::collections::HashMap<String, SynthFile> =
            previous.as_ref().map(|p| p.files().into_iter().map(|f| (f.path.clone(), f)).collect()).unwrap_or_default();
        chunked.iter_mut().for_each(|c| c.stored.push(0));
        delta.stored.push(0);
        for file in now.files() {
            let old_file = before.get(&file.path);
            let chain = chains.entry(file.path.clone()).or_default();
            for (b, start) in (0..file.len()).step_by(BLOCK).enumerate() {
                let len = (BLOCK as u64).min(file.len() - start) as usize;
                now.fill(&file, start, &mut new[..len]);
                let had = old_file.filter(|f| f.len() >= start + len as u64);
                if let (Some(f), Some(p)) = (had, &previous) {
                    p.fill(f, start, &mut old[..len]);
                }
                let changed_pages: Vec<usize> = (0..len / PAGE)
                    .filter(|&i| had.is_none() || old[i * PAGE..(i + 1) * PAGE] != new[i * PAGE..(i + 1) * PAGE])
                    .collect();
                if changed_pages.is_empty() {
                    continue;
                }
                // Policy a: every page chunk with a changed page is stored again.
                for (cost, &size) in chunked.iter_mut().zip(&PAGE_CHUNKS) {
                    for chunk in (0..len).step_by(size) {
                        let end = (chunk + size).min(len);
                        if changed_pages.iter().any(|&p| p * PAGE >= chunk && p * PAGE < end) {
                            *cost.stored.last_mut().unwrap() += compressed(&mut zstd, &new[chunk..end]);
                            cost.entries += 1;
                        }
                    }
                }
                // Policy b: a new or re-based block whole, else a delta of its changed pages.
                if chain.len() <= b {
                    chain.resize(b + 1, 0);
                }
                let whole = had.is_none() || chain[b] >= args.chain;
                let bytes = if whole {
                    chain[b] = 0;
                    compressed(&mut zstd, &new[..len])
                } else {
                    chain[b] += 1;
                    let mut d: Vec<u8> = Vec::with_capacity(8 + changed_pages.len() * PAGE);
                    let bitmap = changed_pages.iter().fold(0u64, |m, &p| m | 1 << p);
                    d.extend_from_slice(&bitmap.to_le_bytes());
                    changed_pages.iter().for_each(|&p| d.extend_from_slice(&new[p * PAGE..(p + 1) * PAGE]));
                    compressed(&mut zstd, &d)
                };
                *delta.stored.last_mut().unwrap() += bytes;
                delta.entries += 1;
            }
        }
        previous = Some(now);
        eprintln!("generation {gen} done");
    }
    let reads: f64 = {
        let blocks: Vec<u32> = chains.values().flatten().copied().collect();
        blocks.iter().map(|&c| 1.0 + f64::from(c)).sum::<f64>() / blocks.len().max(1) as f64
    };
    let gb = args.size as f64 / 1e9;
    println!("| policy | full stored | mean incremental stored | incr / full | index entries per GB after {} gens | blobs read per 64 KiB at restore |", args.gens);
    println!("|---|---|---|---|---|---|");
    let row = |name: String, c: &Cost, reads: f64| {
        let incr = c.stored[1..].iter().sum::<u64>() as f64 / (c.stored.len() - 1).max(1) as f64;
        println!(
            "| {name} | {:.1} MB | {:.1} MB | {:.1}% | {:.0} | {reads:.2} |",
            c.stored[0] as f64 / 1e6,
            incr / 1e6,
            100.0 * incr / c.stored[0] as f64,
            c.entries as f64 / gb
        );
    };
    for (c, size) in chunked.iter().zip(PAGE_CHUNKS) {
        row(format!("(a) page chunks {} KiB", size >> 10), c, (BLOCK / size) as f64);
    }
    row(format!("(b) 64 KiB blocks + page deltas, chain <= {}", args.chain), &delta, reads);
}
