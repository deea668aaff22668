//! Runs one cbcr command as a child and samples it from /proc while it runs: RSS, CPU time of
//! each core thread, open descriptors, threads, and the bytes done from its progress events.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One sample of a running command.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) bytes_done: u64,
    pub(crate) rss: u64,
    pub(crate) fds: u64,
    pub(crate) threads: u64,
    /// CPU use of each `cbcr-coreN` thread since the previous sample (1.0 = one full core).
    pub(crate) core_cpu: Vec<f64>,
}

/// A finished command.
pub(crate) struct Run {
    /// (seconds, bytes done) from the command's own progress events, once a second.
    pub(crate) progress: Vec<(f64, u64)>,
    pub(crate) seconds: f64,
    pub(crate) peak_rss: u64,
    pub(crate) samples: Vec<Sample>,
    /// The last JSON line it printed (its summary).
    pub(crate) summary: Value,
}

/// Runs `cbcr args... --json --no-progress`, sampling every `every`.
pub(crate) fn run(cbcr: &Path, args: &[String], every: Duration) -> Result<Run> {
    run_with(cbcr, args, &[], every)
}

/// [`run`] with extra environment variables.
pub(crate) fn run_with(cbcr: &Path, args: &[String], env: &[(String, String)], every: Duration) -> Result<Run> {
    let started = Instant::now();
    let mut child = Command::new(cbcr)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["--json", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cbcr.display()))?;
    let pid = child.id();
    let bytes_done = Arc::new(Mutex::new(0u64));
    let progress = Arc::new(Mutex::new(vec![(0.0, 0u64)]));
    let last_line = Arc::new(Mutex::new(String::new()));
    let stdout = child.stdout.take().context("stdout")?;
    let reader = {
        let (bytes_done, last_line, progress) =
            (Arc::clone(&bytes_done), Arc::clone(&last_line), Arc::clone(&progress));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["type"] == "progress" {
                        let done = v["bytes_done"].as_u64().unwrap_or(0);
                        *bytes_done.lock().unwrap() = done;
                        progress.lock().unwrap().push((v["elapsed_s"].as_f64().unwrap_or(0.0), done));
                    }
                }
                *last_line.lock().unwrap() = line;
            }
        })
    };
    let mut samples = vec![];
    let mut peak_rss = 0;
    let mut last_cpu: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_t = f64::NEG_INFINITY;
    loop {
        // Poll often so the end is timed precisely; sample every `every`.
        if let Some(status) = child.try_wait()? {
            let seconds = started.elapsed().as_secs_f64();
            reader.join().ok();
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut stderr)?;
            if !status.success() {
                bail!("cbcr {} failed ({status}): {stderr}", args.join(" "));
            }
            let line = last_line.lock().unwrap().clone();
            let summary = serde_json::from_str(&line).unwrap_or(json!({}));
            let progress = progress.lock().unwrap().clone();
            return Ok(Run { progress, seconds, peak_rss, samples, summary });
        }
        if let Some(hwm) = status_field(pid, "VmHWM:") {
            peak_rss = peak_rss.max(hwm);
        }
        let t = started.elapsed().as_secs_f64();
        if t - last_t >= every.as_secs_f64() {
            let cpu = core_ticks(pid);
            let ticks_per_s = 100.0; // USER_HZ
            let core_cpu = cpu
                .iter()
                .map(|(name, ticks)| {
                    let before = last_cpu.get(name).copied().unwrap_or(0);
                    (ticks - before) as f64 / ticks_per_s / (t - last_t).clamp(1e-3, 1e6)
                })
                .collect();
            if let Some(rss) = status_field(pid, "VmRSS:") {
                samples.push(Sample {
                    t,
                    bytes_done: *bytes_done.lock().unwrap(),
                    rss,
                    fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
                    threads: status_field(pid, "Threads:").unwrap_or(0),
                    core_cpu,
                });
            }
            last_cpu = cpu;
            last_t = t;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A numeric field of /proc/PID/status, in bytes for kB fields.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let mut parts = line[field.len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    Some(if parts.next() == Some("kB") { n * 1024 } else { n })
}

/// utime+stime ticks of each `cbcr-core*` thread.
fn core_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = &stat[open + 1..close];
        if !name.starts_with("cbcr-core") {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name.to_owned()).or_default() += ticks;
    }
    out
}

impl Sample {
    pub(crate) fn to_json(&self) -> Value {
        json!({"t": self.t, "bytes_done": self.bytes_done, "rss": self.rss, "fds": self.fds, "threads": self.threads, "core_cpu": self.core_cpu})
    }
}
