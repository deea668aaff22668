//! Sharded backups against one process, on the same synthetic database in one run: one process
//! on all cores against as many shard processes on one core each (plan and commit included in
//! their time), alternating which goes first; each shard's checkpoint cost against its segment
//! time; then a large job combined (its commit's time and peak memory).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::quic::settle;
use crate::{s, sample};

pub(crate) struct ShardBench {
    pub(crate) size: u64,
    pub(crate) cores: usize,
    pub(crate) rounds: u32,
    /// The combined job: its size, shard count and dedup (0 skips it).
    pub(crate) combine_size: u64,
    pub(crate) combine_shards: u32,
    pub(crate) combine_dedup: u32,
}

fn cbcr_json(cbcr: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(cbcr).args(args).args(["--json", "--no-progress"]).output()?;
    ensure!(out.status.success(), "cbcr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().context("no output")?).context("last line is not JSON")
}

/// Starts shard `k` of `job` on `cores` cores, on its own CPUs (the `slot`-th `cores` of them):
/// a process pins its cores to the first CPUs of its mask.
fn spawn_shard(cbcr: &Path, repo: &Path, job: &str, k: usize, slot: usize, cores: usize) -> Result<Child> {
    let cpus = format!("{}-{}", slot * cores, (slot + 1) * cores - 1);
    Command::new("taskset")
        .args(["-c", &cpus])
        .arg(cbcr)
        .args(["--json", "--no-progress", "--cores", &cores.to_string(), "--repo", &s(repo)])
        .args(["backup", "--job", job, "--shard", &k.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a shard under taskset")
}

fn init(cbcr: &Path, repo: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(repo);
    cbcr_json(cbcr, &["init", "--repo", &s(repo)]).map(drop)
}

/// Plans `url` into `shards`, runs them all at once on `cores_each`, commits. Returns the wall
/// time and each shard's summary.
fn sharded(cbcr: &Path, repo: &Path, url: &str, shards: u32, cores_each: usize) -> Result<(f64, Vec<Value>, Value)> {
    let started = Instant::now();
    let planned = cbcr_json(cbcr, &["plan", "--repo", &s(repo), "--shards", &shards.to_string(), url])?;
    let job = planned["job"].as_str().context("plan printed no job")?.to_owned();
    let children: Vec<Child> = (0..planned["shards"].as_array().map_or(0, Vec::len))
        .map(|k| spawn_shard(cbcr, repo, &job, k, k, cores_each))
        .collect::<Result<_>>()?;
    let mut summaries = vec![];
    for child in children {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "a shard failed: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
        summaries.push(serde_json::from_str::<Value>(&line)?["summary"].clone());
    }
    let commit = sample::run(
        cbcr,
        &["commit".into(), "--repo".into(), s(repo), "--job".into(), job],
        Duration::from_millis(20),
    )?;
    let commit = json!({"seconds": commit.seconds, "peak_rss": commit.peak_rss, "summary": commit.summary});
    Ok((started.elapsed().as_secs_f64(), summaries, commit))
}

pub(crate) fn shards(cbcr: &Path, out: &Path, b: &ShardBench) -> Result<()> {
    let url = format!("synth://pg?size={}&seed=11", b.size);
    let (one, many) = (out.join("shards-one"), out.join("shards-many"));
    let mut rows = vec![];
    for round in 0..b.rounds {
        let mut single = 0.0;
        let mut shard_run = (0.0, vec![], json!({}));
        // Alternate which goes first, so neither always meets a warmer page cache.
        for first in [round % 2 == 0, round % 2 == 1] {
            settle();
            if first {
                init(cbcr, &one)?;
                let started = Instant::now();
                cbcr_json(cbcr, &["backup", "--repo", &s(&one), "--cores", &b.cores.to_string(), &url])?;
                single = started.elapsed().as_secs_f64();
            } else {
                init(cbcr, &many)?;
                shard_run = sharded(cbcr, &many, &url, b.cores as u32, 1)?;
            }
        }
        let (wall, summaries, commit) = shard_run;
        // Checkpoint cost: time writing checkpoints against time spent per segment.
        let segments: f64 = summaries.iter().map(|s| s["segments"].as_f64().unwrap_or(0.0)).sum();
        let checkpoints: f64 = summaries.iter().map(|s| s["checkpoints"].as_f64().unwrap_or(0.0)).sum();
        let checkpoint_s: f64 = summaries.iter().map(|s| s["checkpoint_s"].as_f64().unwrap_or(0.0)).sum();
        let shard_s: f64 = summaries.iter().map(|s| s["duration_s"].as_f64().unwrap_or(0.0)).sum();
        let row = json!({
            "round": round,
            "single_s": single,
            "sharded_s": wall,
            "throughput_ratio": single / wall,
            "segments": segments,
            "checkpoints": checkpoints,
            "checkpoint_ms_each": 1e3 * checkpoint_s / checkpoints.max(1.0),
            "checkpoint_fraction_of_segment_time": checkpoint_s / shard_s.max(1e-9),
            "commit": commit,
            "shards": summaries,
        });
        eprintln!(
            "round {round}: one process {single:.2} s, {} shards {wall:.2} s: ratio {:.3}; {checkpoints} checkpoints, {:.2} ms each, {:.4} of shard time",
            b.cores,
            single / wall,
            row["checkpoint_ms_each"].as_f64().unwrap_or(0.0),
            row["checkpoint_fraction_of_segment_time"].as_f64().unwrap_or(0.0)
        );
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&one);
    let _ = std::fs::remove_dir_all(&many);
    let mut combined = Value::Null;
    if b.combine_size > 0 {
        let repo = out.join("shards-combine");
        init(cbcr, &repo)?;
        let url = format!("synth://pg?size={}&seed=12&dedup={}", b.combine_size, b.combine_dedup);
        // The shards run as many at a time as there are cores, one core each.
        let cores_each = 1;
        let planned = cbcr_json(cbcr, &["plan", "--repo", &s(&repo), "--shards", &b.combine_shards.to_string(), &url])?;
        let job = planned["job"].as_str().context("no job")?.to_owned();
        let started = Instant::now();
        let count = planned["shards"].as_array().map_or(0, Vec::len);
        for batch in (0..count).collect::<Vec<_>>().chunks(b.cores) {
            let children: Vec<Child> = batch
                .iter()
                .map(|&k| spawn_shard(cbcr, &repo, &job, k, k % b.cores, cores_each))
                .collect::<Result<_>>()?;
            for child in children {
                let out = child.wait_with_output()?;
                ensure!(out.status.success(), "a shard failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let shards_s = started.elapsed().as_secs_f64();
        let commit = sample::run(
            cbcr,
            &["commit".into(), "--repo".into(), s(&repo), "--job".into(), job],
            Duration::from_millis(20),
        )?;
        eprintln!(
            "combine {} in {} shards: shards {shards_s:.1} s, commit {:.2} s, peak RSS {}",
            dataplane::human_size(b.combine_size),
            count,
            commit.seconds,
            dataplane::human_size(commit.peak_rss)
        );
        combined = json!({"size": b.combine_size, "shards": count, "shards_s": shards_s, "commit_s": commit.seconds,
            "commit_peak_rss": commit.peak_rss, "summary": commit.summary});
        let _ = std::fs::remove_dir_all(&repo);
    }
    let report =
        json!({"type": "shards_report", "size": b.size, "cores": b.cores, "rounds": rows, "combine": combined});
    std::fs::write(out.join("shards.json"), serde_json::to_vec_pretty(&report)?)?;
    Ok(())
}
