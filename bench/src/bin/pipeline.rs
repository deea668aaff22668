//! End-to-end benchmark: back up one generated file of database-like pages with `cbcr` on 1 and
//! 2 cores, and put each run next to what the single-core stage costs, measured in the same
//! run on the same bytes, allow on that many cores.
//!
//! ```text
//! cargo run --release -p bench --bin pipeline -- [--size 4GiB] [--cores 1,2] [--runs 2] [--dir /var/tmp/cbcr-bench]
//! ```
//! Prints a table on stderr and one JSON object per measurement on stdout.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::json;

struct Args {
    size: u64,
    cores: Vec<usize>,
    runs: usize,
    dir: PathBuf,
    cbcr: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 4 << 30,
        cores: vec![1, 2],
        runs: 1,
        dir: PathBuf::from("/var/tmp/cbcr-bench"),
        cbcr: std::env::current_exe().expect("own path").with_file_name("cbcr"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = parse_size(&value),
            "--cores" => a.cores = value.split(',').map(|c| c.parse().expect("--cores 1,2")).collect(),
            "--runs" => a.runs = value.parse().expect("--runs N"),
            "--dir" => a.dir = value.into(),
            "--cbcr" => a.cbcr = value.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn parse_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().expect("a size like 4GiB");
    n << match unit {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => panic!("unit must be KiB, MiB or GiB"),
    }
}

/// Writes the input file once; later runs reuse it.
fn ensure_input(path: &Path, size: u64) {
    if fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return;
    }
    let mut f = File::create(path).expect("create input");
    let mut block = vec![0u8; 64 << 20];
    let mut page = 0u64;
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        datagen::fill_db_pages(7, page, &mut block[..n.next_multiple_of(datagen::PAGE)]);
        f.write_all(&block[..n]).expect("write input");
        page += (n / datagen::PAGE) as u64;
        left -= n as u64;
    }
    f.sync_all().expect("sync input");
}

/// Runs `cbcr backup` and returns (seconds, peak RSS bytes, summary).
fn run_backup(cbcr: &Path, repo: &Path, input: &Path, cores: usize) -> (f64, u64, serde_json::Value) {
    let _ = fs::remove_dir_all(repo);
    let t = Instant::now();
    let mut child = Command::new(cbcr)
        .args(["backup", "--init", "--repo"])
        .arg(repo)
        .arg(input)
        .args(["--json", "--no-progress", "--cores", &cores.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("cbcr runs");
    let pid = child.id();
    // Peak RSS is read from /proc while the child runs: its rusage maxrss would also count the
    // high-water mark it inherited from this process at fork.
    let status_path = format!("/proc/{pid}/status");
    let sampler = std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        while let Ok(status) = fs::read_to_string(&status_path) {
            if let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak_kib = peak_kib.max(kib.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak_kib * 1024
    });
    let mut stdout = child.stdout.take().expect("piped");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).expect("read stdout");
    let exit = child.wait().expect("wait for cbcr");
    let secs = t.elapsed().as_secs_f64();
    assert!(exit.success(), "cbcr backup failed: {exit}");
    let rss = sampler.join().expect("sampler");
    let summary = serde_json::from_str(out.lines().last().expect("a summary line")).expect("JSON summary");
    (secs, rss, summary)
}

/// Stage costs and the zstd -1 ratio, measured on the input. The mapping is dropped before cbcr
/// runs: a child forked while it is mapped would report it in its peak RSS.
fn stage_costs(input: &Path) -> (bench::StageCosts, f64) {
    let file = File::open(input).expect("open input");
    // SAFETY: read-only mapping of a file only this benchmark writes.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("map input");
    // One file not named like a database's: `auto` cuts it by content.
    let cdc = dataplane::pipeline::chunker::ChunkPolicy::Cdc(Default::default());
    let costs = bench::measure_stages(&map, cdc, dataplane::limits::DEFAULT_COMPRESSION_LEVEL);
    let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
    let sample = &map[..map.len().min(64 << 20)];
    let ratio =
        sample.len() as f64 / sample.chunks(64 << 10).map(|p| c.compress(p).expect("zstd").len()).sum::<usize>() as f64;
    (costs, ratio)
}

fn main() {
    let args = parse_args();
    assert!(
        args.cbcr.exists(),
        "{} not found: build it with `cargo build --release -p dataplane` or pass --cbcr",
        args.cbcr.display()
    );
    fs::create_dir_all(&args.dir).expect("bench dir");
    let input = args.dir.join("pages.db");
    ensure_input(&input, args.size);
    let gb = args.size as f64 / 1e9;
    eprintln!(
        "{:>4} {:>6} {:>9} {:>10} {:>10} {:>8} {:>9}",
        "run", "cores", "backup s", "GB/s", "limit GB/s", "effic.", "RSS MiB"
    );
    let mut base = None;
    for run in 0..args.runs {
        let (costs, stored_ratio) = stage_costs(&input);
        println!(
            "{}",
            json!({"type": "stages", "run": run, "read_gbps": 1e-9 / costs.read, "chunk_gbps": 1e-9 / costs.chunk,
                   "hash_gbps": 1e-9 / costs.hash, "compress_gbps": 1e-9 / costs.compress,
                   "core_limit_gbps": costs.core_limit() / 1e9, "zstd1_ratio": stored_ratio})
        );
        for &cores in &args.cores {
            let (secs, rss, summary) = run_backup(&args.cbcr, &args.dir.join("repo"), &input, cores);
            let gbps = gb / secs;
            let limit = costs.core_limit() * cores as f64 / 1e9;
            let scaling = match (cores, base) {
                (1, _) => {
                    base = Some(gbps);
                    1.0
                }
                (_, Some(b)) => gbps / b,
                _ => f64::NAN,
            };
            eprintln!(
                "{run:>4} {cores:>6} {secs:>9.2} {gbps:>10.3} {limit:>10.3} {:>8.2} {:>9.1}",
                gbps / limit,
                rss as f64 / (1 << 20) as f64
            );
            println!(
                "{}",
                json!({"type": "backup", "run": run, "cores": cores, "bytes": args.size, "seconds": secs, "gbps": gbps,
                       "limit_gbps": limit, "efficiency": gbps / limit, "scaling_vs_1_core": scaling,
                       "peak_rss_bytes": rss, "bytes_stored": summary["bytes_stored"]})
            );
        }
    }
    let _ = fs::remove_dir_all(args.dir.join("repo"));
}
