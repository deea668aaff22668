//! `perf`: cbcr's end-to-end performance harness.
//!
//! ```text
//! cargo run --release -p perf -- run [--size 10GiB] [--sizes 1GiB,10GiB] [--cores 1,2] [--quick] [--out DIR]
//! cargo run --release -p perf -- peers --input FILE_OR_DIR [--out DIR]
//! cargo run --release -p perf -- quic [--size 4GiB] [--raw 2GiB] [--out DIR]
//! cargo run --release -p perf -- soak [--duration 30m] [--size 1GiB] [--out DIR]
//! ```
//! Sources are `synth://pg` (generated, never on disk). Figures are measured in the same run as
//! the stage limits they are compared with.

mod database;
mod mariadb;
mod pgbench;
mod quic;
mod report;
mod sample;
mod shards;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use dataplane::pipeline::chunker::ChunkPolicy;
use dataplane::source::engine::{detect, Detected};
use dataplane::source::synth::{SynthSpec, PAGE};
use sample::Run;

#[derive(Parser)]
#[command(name = "perf", about = "cbcr end-to-end performance harness")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// The cbcr binary (default: next to this one).
    #[arg(long, global = true)]
    cbcr: Option<PathBuf>,
    /// Where reports and scratch repositories go.
    #[arg(long, global = true, default_value = "perf-out")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stage limits, then full backup, incremental, restore and verify per size and core count.
    Run {
        /// Size of the synthetic database (also the largest of --sizes).
        #[arg(long, default_value = "10GiB", value_parser = dataplane::parse_size)]
        size: u64,
        /// Sizes for the scaling-with-size curve (default: --size only).
        #[arg(long, value_delimiter = ',', value_parser = dataplane::parse_size)]
        sizes: Vec<u64>,
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        cores: Vec<usize>,
        /// Compressibility preset of the synthetic data (3 typical, 23 pgbench-like).
        #[arg(long, default_value_t = 3)]
        ratio: u32,
        /// Small sizes (1 GiB and 4 GiB): finishes in a few minutes on 2 cores.
        #[arg(long)]
        quick: bool,
        /// Restore by comparing with regeneration instead of writing files (for sizes larger
        /// than the free disk).
        #[arg(long)]
        restore_compare: bool,
        /// Page chunk size for cbcr's backups (its `--page-chunk`): larger chunks, fewer index
        /// entries, as the design suggests for multi-TB databases.
        #[arg(long)]
        page_chunk: Option<String>,
        /// Only 1/N of the synthetic data is distinct (its `dedup`): a many-TB run whose
        /// repository fits on the disk.
        #[arg(long, default_value_t = 1)]
        dedup: u32,
    },
    /// cbcr, restic and borg on the same input in one run: full backup, incremental, restore.
    Peers {
        /// A file or directory (the incremental then sees it unchanged).
        #[arg(long, required_unless_present = "synth", conflicts_with = "synth")]
        input: Option<PathBuf>,
        /// Or a synthetic database written to disk (`synth://pg?size=..`): generation 1 for the
        /// full backup, generation 2 for the incremental.
        #[arg(long)]
        synth: Option<String>,
    },
    /// A real pgbench database, plain and as `pg_basebackup -Ft` tars: cbcr and restic, full
    /// and incremental after a pgbench run (needs root and Debian's postgresql).
    Pgbench {
        #[arg(long, default_value_t = 100)]
        scale: u32,
        /// pgbench transactions per client (2 clients) between the full and the incremental.
        #[arg(long, default_value_t = 10_000)]
        transactions: u32,
    },
    /// A real MariaDB database (sysbench), cold at one path and copied into a new directory per
    /// backup: cbcr and restic, full and incremental after a sysbench write run (needs root,
    /// Debian's mariadb-server and sysbench)
    Mariadb {
        #[arg(long, default_value_t = 4)]
        tables: u32,
        #[arg(long, default_value_t = 1_000_000)]
        table_size: u32,
        /// sysbench oltp_write_only events (2 threads) between the full and the incremental.
        #[arg(long, default_value_t = 2_000)]
        events: u32,
    },
    /// The same source backed up and restored locally and through a receiver on loopback, and
    /// the raw throughput of one quinn stream (the network limit).
    Quic {
        #[arg(long, default_value = "4GiB", value_parser = dataplane::parse_size)]
        size: u64,
        /// Bytes sent for the raw stream measurement.
        #[arg(long, default_value = "2GiB", value_parser = dataplane::parse_size)]
        raw: u64,
        #[arg(long, default_value_t = 2)]
        cores: usize,
    },
    /// One process on all cores against one shard process per core (`plan`, `backup --job`,
    /// `commit --job`) on the same synthetic database; checkpoint cost; a large job combined.
    Shards {
        #[arg(long, default_value = "8GiB", value_parser = dataplane::parse_size)]
        size: u64,
        #[arg(long, default_value_t = 2)]
        cores: usize,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// The combined job's size (0: skip it); `--combine-dedup` keeps its repository small.
        #[arg(long, default_value = "1TiB", value_parser = dataplane::parse_size)]
        combine_size: u64,
        #[arg(long, default_value_t = 16)]
        combine_shards: u32,
        #[arg(long, default_value_t = 1000)]
        combine_dedup: u32,
    },
    /// Loop backup, incremental, restore and verify; fail if resources grow without bound.
    Soak {
        #[arg(long, default_value = "30m")]
        duration: String,
        #[arg(long, default_value = "1GiB", value_parser = dataplane::parse_size)]
        size: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // cbcr encrypts by default, as restic does: every cbcr this harness starts (and every
    // repository it creates) gets this password unless the caller gave one. Set before any
    // thread starts.
    if ["CBCR_PASSWORD", "CBCR_PASSWORD_FILE", "CBCR_KEY_COMMAND"].iter().all(|v| std::env::var_os(v).is_none()) {
        std::env::set_var("CBCR_PASSWORD", "perf");
    }
    let cbcr = cli.cbcr.clone().unwrap_or_else(|| std::env::current_exe().expect("own path").with_file_name("cbcr"));
    ensure!(cbcr.exists(), "{} not found: `cargo build --release -p dataplane` or pass --cbcr", cbcr.display());
    std::fs::create_dir_all(&cli.out)?;
    match cli.command {
        Cmd::Run { size, sizes, cores, ratio, quick, restore_compare, page_chunk, dedup } => {
            let sizes = match (quick, sizes.is_empty()) {
                (true, _) => vec![1 << 30, 4 << 30],
                (false, true) => vec![size],
                (false, false) => sizes,
            };
            let source = Source { ratio, dedup };
            run(&cbcr, &cli.out, &sizes, &cores, source, restore_compare, page_chunk.as_deref())
        }
        Cmd::Peers { input, synth } => peers(&cbcr, &cli.out, input, synth),
        Cmd::Pgbench { scale, transactions } => pgbench::pgbench(&cbcr, &cli.out, scale, transactions),
        Cmd::Mariadb { tables, table_size, events } => mariadb::mariadb(&cbcr, &cli.out, tables, table_size, events),
        Cmd::Quic { size, raw, cores } => quic::quic(&cbcr, &cli.out, size, raw, cores),
        Cmd::Shards { size, cores, rounds, combine_size, combine_shards, combine_dedup } => {
            let bench = shards::ShardBench { size, cores, rounds, combine_size, combine_shards, combine_dedup };
            shards::shards(&cbcr, &cli.out, &bench)
        }
        Cmd::Soak { duration, size } => soak(&cbcr, &cli.out, parse_duration(&duration)?, size),
    }
}

fn parse_duration(s: &str) -> Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("{s:?}: a duration like 90s, 30m or 2h"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("{s:?}: unit must be s, m or h"),
    }))
}

fn synth(size: u64, ratio: u32, gen: u32) -> String {
    format!("synth://pg?size={size}&seed=7&ratio={ratio}&gen={gen}")
}

/// The synthetic source's parameters besides size and generation.
#[derive(Clone, Copy)]
struct Source {
    ratio: u32,
    dedup: u32,
}

impl Source {
    fn url(self, size: u64, gen: u32) -> String {
        let url = synth(size, self.ratio, gen);
        if self.dedup == 1 {
            url
        } else {
            format!("{url}&dedup={}", self.dedup)
        }
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Single-core stage throughputs (bytes/s) on a 256 MiB sample of a 1 GiB synthetic source:
/// the start of each file, in proportion to its size. The default chunking cuts the relation
/// files into page chunks (no FastCDC) and the rest (WAL) by content, so each part of the
/// sample is measured with its own policy and each byte costs what its file's policy costs.
fn stage_limits(ratio: u32) -> Result<Value> {
    let spec = SynthSpec::parse(&synth(1 << 30, ratio, 1))?;
    let files = spec.files();
    let total = files.iter().map(|f| f.len()).sum::<u64>().max(1);
    let (mut pages, mut other) = (Vec::new(), Vec::new());
    let mut generating = Duration::ZERO;
    for f in &files {
        let mut head = vec![0u8; if f.len() >= PAGE as u64 { PAGE } else { 0 }];
        spec.fill(f, 0, &mut head);
        let into = match detect(Path::new(&f.path), f.len(), &head) {
            Detected::Pages { .. } => &mut pages,
            _ => &mut other,
        };
        let share = ((256u64 << 20) * f.len() / total).min(f.len()) / PAGE as u64 * PAGE as u64;
        let start = into.len();
        into.resize(start + share as usize, 0);
        let t = Instant::now();
        spec.fill(f, 0, &mut into[start..]);
        generating += t.elapsed();
    }
    ensure!(!pages.is_empty(), "the synthetic source has no page files");
    let sampled = pages.len() + other.len();
    let generate = sampled as f64 / generating.as_secs_f64();
    let page_share = pages.len() as f64 / sampled as f64;
    let level = dataplane::limits::DEFAULT_COMPRESSION_LEVEL;
    let cdc = ChunkPolicy::Cdc(Default::default());
    let page_chunk = ChunkPolicy::Fixed(dataplane::limits::DEFAULT_PAGE_CHUNK as u32);
    let page_costs = bench::measure_stages(&pages, page_chunk, level);
    // The CDC figures of the report are those of the page files (what `cdc` would cost them).
    let costs = bench::measure_stages(&pages, cdc, level);
    let other_costs = if other.is_empty() { costs } else { bench::measure_stages(&other, cdc, level) };
    let data = pages;
    let compressed: Vec<Vec<u8>> =
        data.chunks(64 << 10).map(|c| zstd::bulk::compress(c, 1)).collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(64 << 10);
    let mut d = zstd::bulk::Decompressor::new()?;
    let t = Instant::now();
    for c in &compressed {
        out.clear();
        d.decompress_to_buffer(c, &mut out)?;
    }
    let decompress = data.len() as f64 / t.elapsed().as_secs_f64();
    let ratio_measured = data.len() as f64 / compressed.iter().map(Vec::len).sum::<usize>() as f64;
    // On a generated source, generating the bytes is the read stage.
    let per_byte =
        1.0 / generate + page_share * page_costs.after_read() + (1.0 - page_share) * other_costs.after_read();
    Ok(json!({
        "bytes": data.len(), "zstd1_ratio": ratio_measured,
        "generate_gbps": generate / 1e9, "read_gbps": 1e-9 / costs.read, "chunk_gbps": 1e-9 / costs.chunk,
        "hash_gbps": 1e-9 / costs.hash, "compress_gbps": 1e-9 / costs.compress, "decompress_gbps": decompress / 1e9,
        "page_share": page_share, "page_chunk_hash_gbps": 1e-9 / page_costs.hash,
        "page_chunk_compress_gbps": 1e-9 / page_costs.compress,
        "backup_core_limit_gbps": 1e-9 / per_byte,
    }))
}

/// One phase's figures.
fn phase(name: &str, size: u64, cores: usize, bytes: u64, r: &Run, limit_gbps: Option<f64>) -> Value {
    let gbps = bytes as f64 / r.seconds / 1e9;
    eprintln!(
        "{name:>12} {:>9} {cores:>5} cores {:>8.2} s {gbps:>7.3} GB/s {:>8} RSS {}",
        dataplane::human_size(size),
        r.seconds,
        dataplane::human_size(r.peak_rss),
        limit_gbps.map_or(String::new(), |l| format!(" efficiency {:.2}", gbps / l))
    );
    json!({
        "phase": name, "size": size, "cores": cores, "bytes": bytes, "seconds": r.seconds, "gbps": gbps,
        "peak_rss": r.peak_rss, "efficiency": limit_gbps.map(|l| gbps / l),
        "summary": r.summary, "samples": r.samples.iter().map(sample::Sample::to_json).collect::<Vec<_>>(),
        "progress": r.progress.iter().map(|(t, b)| json!({"t": t, "bytes_done": b})).chain([json!({"t": r.seconds, "bytes_done": bytes})]).collect::<Vec<_>>(),
    })
}

fn run(
    cbcr: &Path,
    out: &Path,
    sizes: &[u64],
    cores: &[usize],
    source: Source,
    restore_compare: bool,
    page_chunk: Option<&str>,
) -> Result<()> {
    let ratio = source.ratio;
    let started = Instant::now();
    eprintln!("measuring stage limits on one core...");
    let limits = stage_limits(ratio)?;
    let core_limit = limits["backup_core_limit_gbps"].as_f64().unwrap_or(f64::NAN);
    eprintln!("stage limits: {limits}");
    let every = Duration::from_millis(if sizes.iter().max() <= Some(&(4 << 30)) { 250 } else { 1000 });
    let mut phases = vec![];
    for &size in sizes {
        for &c in cores {
            let repo = out.join("repo");
            let target = out.join("restore");
            let _ = std::fs::remove_dir_all(&repo);
            let _ = std::fs::remove_dir_all(&target);
            let cores_arg = c.to_string();
            let args = |a: &[&str]| -> Vec<String> {
                a.iter().map(|x| x.to_string()).chain(["--cores".into(), cores_arg.clone()]).collect()
            };
            let backup = |gen: u32| {
                let mut a = args(&["backup", "--init", "--repo", &s(&repo), &source.url(size, gen)]);
                a.extend(page_chunk.iter().flat_map(|p| ["--page-chunk".to_owned(), p.to_string()]));
                a
            };
            let full = sample::run(cbcr, &backup(1), every)?;
            let bytes = full.summary["bytes_read"].as_u64().unwrap_or(size);
            phases.push(phase("full", size, c, bytes, &full, Some(core_limit * c as f64)));
            let incr = sample::run(cbcr, &backup(2), every)?;
            let total = incr.summary["bytes_total"].as_u64().unwrap_or(size);
            phases.push(phase("incremental", size, c, total, &incr, None));
            let restore = if restore_compare {
                sample::run(cbcr, &args(&["verify", "--repo", &s(&repo), "--against", &source.url(size, 2)]), every)?
            } else {
                sample::run(cbcr, &args(&["restore", "latest", "--repo", &s(&repo), "--target", &s(&target)]), every)?
            };
            phases.push(phase(
                if restore_compare { "restore-compare" } else { "restore" },
                size,
                c,
                total,
                &restore,
                None,
            ));
            let _ = std::fs::remove_dir_all(&target);
            let verify = sample::run(cbcr, &args(&["verify", "--repo", &s(&repo), "--read-data"]), every)?;
            let stored = dir_bytes(&repo);
            phases.push(phase("verify", size, c, stored, &verify, None));
            let _ = std::fs::remove_dir_all(&repo);
        }
    }
    let report = json!({
        "type": "perf_report", "created": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(), "cores_available": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "sizes": sizes, "cores": cores, "ratio": ratio, "dedup": source.dedup, "page_chunk": page_chunk, "stage_limits": limits, "phases": phases,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(out.join("report.html"), report::html(&report))?;
    eprintln!("wrote {}/report.json and report.html in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else { return 0 };
    if md.is_dir() {
        std::fs::read_dir(p).map_or(0, |d| d.flatten().map(|e| dir_bytes(&e.path())).sum())
    } else {
        md.len()
    }
}

/// Wall seconds of a command; its output is discarded, a failure is an error.
fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(t.elapsed().as_secs_f64())
}

/// A backup tool as `peers` drives it.
#[derive(Clone, Copy)]
enum Peer {
    Cbcr,
    Restic,
    Borg,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Cbcr => "cbcr",
            Peer::Restic => "restic",
            Peer::Borg => "borg",
        }
    }

    /// A command of this tool on its repository under `work`.
    fn command(self, cbcr: &Path, work: &Path) -> Command {
        let repo = self.repo(work);
        match self {
            Peer::Cbcr => {
                let mut c = Command::new(cbcr);
                c.env("CBCR_REPO", repo).arg("--no-progress");
                c
            }
            Peer::Restic => {
                let mut c = Command::new("restic");
                c.env("RESTIC_REPOSITORY", repo).env("RESTIC_PASSWORD", "perf");
                c
            }
            Peer::Borg => {
                let mut c = Command::new("borg");
                c.env("BORG_REPO", repo)
                    .env("BORG_PASSPHRASE", "perf")
                    .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
                c
            }
        }
    }

    fn repo(self, work: &Path) -> PathBuf {
        work.join(self.name())
    }

    fn init(self, cbcr: &Path, work: &Path) -> Result<()> {
        match self {
            Peer::Cbcr => Ok(()),
            Peer::Restic => timed(self.command(cbcr, work).arg("init")).map(drop),
            Peer::Borg => timed(self.command(cbcr, work).args(["init", "-e", "none"])).map(drop),
        }
    }

    /// Backs `input` up as archive `tag`.
    /// Backs up `input` (for cbcr, as database `db` when one is given: `--db`).
    fn backup(self, cbcr: &Path, work: &Path, input: &Path, tag: &str, db: Option<&str>) -> Result<f64> {
        let mut c = self.command(cbcr, work);
        if let (Peer::Cbcr, Some(db)) = (self, db) {
            c.env("CBCR_DB", db);
        }
        match self {
            Peer::Cbcr => c.args(["backup", "--init"]).arg(input),
            Peer::Restic => c.arg("backup").arg(input),
            Peer::Borg => c.arg("create").arg(format!("::{tag}")).arg(input),
        };
        timed(&mut c)
    }

    /// Restores the latest backup (archive `b` for borg) into `target`.
    fn restore(self, cbcr: &Path, work: &Path, target: &Path) -> Result<f64> {
        let mut c = self.command(cbcr, work);
        match self {
            Peer::Cbcr | Peer::Restic => c.args(["restore", "latest", "--target"]).arg(target),
            Peer::Borg => c.args(["extract", "::b"]).current_dir(target),
        };
        timed(&mut c)
    }
}

/// One tool's figures.
struct PeerRow {
    name: &'static str,
    full_s: f64,
    full_size: u64,
    incr_s: f64,
    growth: u64,
    restore_s: f64,
}

/// Installs restic and borg (Debian packages) when one is missing.
fn ensure_peers() -> Result<()> {
    if Command::new("restic").arg("version").output().is_err()
        || Command::new("borg").arg("--version").output().is_err()
    {
        eprintln!("installing restic and borgbackup (Debian)");
        let ok = Command::new("sh")
            .args(["-c", "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y restic borgbackup"])
            .status()?;
        ensure!(ok.success(), "could not install restic and borg");
    }
    Ok(())
}

fn peers(cbcr: &Path, out: &Path, input: Option<PathBuf>, synth: Option<String>) -> Result<()> {
    ensure_peers()?;
    let work = std::fs::canonicalize(out)?.join("peers");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let spec = synth.as_deref().map(SynthSpec::parse).transpose()?;
    let input = match (&spec, input) {
        (Some(spec), _) => {
            let dir = work.join("pgdata");
            write_synth(spec, &dir)?;
            dir
        }
        (None, Some(input)) => std::fs::canonicalize(input)?,
        (None, None) => bail!("give --input or --synth"),
    };
    let peers = [Peer::Cbcr, Peer::Restic, Peer::Borg];
    for p in peers {
        p.init(cbcr, &work)?;
    }
    let bytes = dir_bytes(&input);
    let mut full = vec![];
    for p in &peers {
        full.push((p.backup(cbcr, &work, &input, "a", None)?, dir_bytes(&p.repo(&work))));
    }
    if let Some(spec) = &spec {
        write_synth(&SynthSpec { gen: spec.gen + 1, ..spec.clone() }, &input)?;
    }
    let incr_bytes = dir_bytes(&input);
    let mut rows = vec![];
    for (p, (full_s, full_size)) in peers.iter().zip(full) {
        let incr_s = p.backup(cbcr, &work, &input, "b", None)?;
        let growth = dir_bytes(&p.repo(&work)) - full_size;
        let target = work.join("out");
        std::fs::create_dir_all(&target)?;
        let restore_s = p.restore(cbcr, &work, &target)?;
        std::fs::remove_dir_all(&target)?;
        rows.push(PeerRow { name: p.name(), full_s, full_size, incr_s, growth, restore_s });
    }
    std::fs::remove_dir_all(&work)?;
    println!(
        "{:<7} {:>8} {:>9} {:>14} {:>8} {:>9} {:>14} {:>9}",
        "tool", "full s", "full MB/s", "full bytes", "incr s", "incr MB/s", "incr growth", "restore s"
    );
    for r in &rows {
        println!(
            "{:<7} {:>8.2} {:>9.0} {:>14} {:>8.2} {:>9.0} {:>14} {:>9.2}",
            r.name,
            r.full_s,
            bytes as f64 / r.full_s / 1e6,
            r.full_size,
            r.incr_s,
            incr_bytes as f64 / r.incr_s / 1e6,
            r.growth,
            r.restore_s
        );
    }
    let best = |f: fn(&PeerRow) -> f64| rows[1..].iter().map(f).fold(f64::INFINITY, f64::min);
    let cbcr_row = &rows[0];
    println!(
        "cbcr vs the fastest peer: full {:.2}x, incremental {:.2}x, restore {:.2}x; incremental growth {:.2}x less than the smallest",
        best(|r| r.full_s) / cbcr_row.full_s,
        best(|r| r.incr_s) / cbcr_row.incr_s,
        best(|r| r.restore_s) / cbcr_row.restore_s,
        best(|r| r.growth as f64) / (cbcr_row.growth as f64).max(1.0)
    );
    Ok(())
}

/// Writes a generation of a synthetic database into `dir` as real files: files of other
/// generations that are gone are removed, unchanged files are left alone.
fn write_synth(spec: &SynthSpec, dir: &Path) -> Result<()> {
    let files = spec.files();
    let wanted: std::collections::HashSet<PathBuf> = files.iter().map(|f| dir.join(&f.path)).collect();
    for sub in ["base/16384", "pg_wal"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                if !wanted.contains(&e.path()) {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
    }
    let mut buf = vec![0u8; 8 << 20];
    for f in &files {
        let path = dir.join(&f.path);
        let mtime = std::time::UNIX_EPOCH + Duration::from_nanos(f.mtime_ns as u64);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == f.len() && m.modified().ok() == Some(mtime)) {
            continue;
        }
        std::fs::create_dir_all(path.parent().context("file in a directory")?)?;
        let mut out = std::fs::File::create(&path)?;
        let mut offset = 0;
        while offset < f.len() {
            let n = (buf.len() as u64).min(f.len() - offset) as usize;
            spec.fill(f, offset, &mut buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n])?;
            offset += n as u64;
        }
        out.set_modified(mtime)?;
    }
    Ok(())
}

fn soak(cbcr: &Path, out: &Path, duration: Duration, size: u64) -> Result<()> {
    let repo = out.join("soak-repo");
    let _ = std::fs::remove_dir_all(&repo);
    let started = Instant::now();
    let mut rows: Vec<(u32, u64, u64, u64, u64)> = vec![];
    let mut gen = 1;
    while started.elapsed() < duration || gen <= 3 {
        let url = synth(size, 3, gen);
        let every = Duration::from_millis(50);
        let backup =
            sample::run(cbcr, &["backup".into(), "--init".into(), "--repo".into(), s(&repo), url.clone()], every)?;
        let compare = sample::run(cbcr, &["verify".into(), "--repo".into(), s(&repo), "--against".into(), url], every)?;
        let verify = sample::run(cbcr, &["verify".into(), "--repo".into(), s(&repo), "--read-data".into()], every)?;
        let peak = backup.peak_rss.max(compare.peak_rss).max(verify.peak_rss);
        let fds = [&backup, &compare, &verify].iter().flat_map(|r| r.samples.iter().map(|s| s.fds)).max().unwrap_or(0);
        let threads =
            [&backup, &compare, &verify].iter().flat_map(|r| r.samples.iter().map(|s| s.threads)).max().unwrap_or(0);
        let grown = backup.summary["bytes_stored"].as_u64().unwrap_or(0);
        eprintln!(
            "gen {gen}: peak RSS {} fds {fds} threads {threads} stored {}",
            dataplane::human_size(peak),
            dataplane::human_size(grown)
        );
        rows.push((gen, peak, fds, threads, grown));
        gen += 1;
    }
    // Compare the last third with the middle third: growth that has not levelled off by then
    // is unbounded (the first third holds the full backup and the caches filling up).
    let third = (rows.len() / 3).max(1);
    let (early, late) = (&rows[rows.len() - 2 * third..rows.len() - third], &rows[rows.len() - third..]);
    let max = |rows: &[(u32, u64, u64, u64, u64)], f: fn(&(u32, u64, u64, u64, u64)) -> u64| {
        rows.iter().map(f).max().unwrap_or(0)
    };
    let report = json!({"type": "soak_report", "generations": rows.len(), "seconds": started.elapsed().as_secs_f64(),
        "rows": rows.iter().map(|r| json!({"gen": r.0, "peak_rss": r.1, "fds": r.2, "threads": r.3, "bytes_stored": r.4})).collect::<Vec<_>>()});
    std::fs::write(out.join("soak.json"), serde_json::to_vec_pretty(&report)?)?;
    let _ = std::fs::remove_dir_all(&repo);
    ensure!(max(late, |r| r.1) <= max(early, |r| r.1) * 3 / 2 + (16 << 20), "peak RSS grew: {rows:?}");
    // Readers keep up to OPEN_PACKS_PER_READER packs open each by design, one per core plus
    // the walker's (backup reads parent lists and trees, verify checks chunk lists on every
    // core): descriptors may climb to that bound as the repository gains packs, never past it.
    // The rest: index runs (a few per size tier) and fixed ones.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let fd_bound = (cores + 1) * dataplane::limits::OPEN_PACKS_PER_READER as u64 + 128;
    ensure!(max(&rows, |r| r.2) <= fd_bound, "open descriptors passed {fd_bound}: {rows:?}");
    ensure!(max(late, |r| r.3) <= max(early, |r| r.3) + 4, "threads grew: {rows:?}");
    ensure!(
        max(late, |r| r.4) <= max(early, |r| r.4) * 2 + (1 << 20),
        "repository growth per generation grew: {rows:?}"
    );
    println!("soak passed: {} generations in {:.0} s, resources flat", rows.len(), started.elapsed().as_secs_f64());
    Ok(())
}
