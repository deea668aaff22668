//! `perf quic`: the same database-like source backed up, incrementally backed up and restored
//! into a local repository, through a receiver on loopback, and (when `s3s-fs` is installed)
//! into an `s3://` repository on a local S3 server, in one run, each reported as a ratio of
//! local; plus the raw throughput of one quinn stream on loopback (the network limit) with the
//! same TLS setup.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{s, sample, synth};

/// A `cbcr receiver` child, killed on drop.
struct Receiver(Child, String);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Receiver {
    /// CPU seconds (user + system) the receiver has used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
        let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
        ticks as f64 / 100.0
    }
}

fn tls_args(pki: &Path, side: &str) -> Vec<String> {
    vec![
        "--cert".into(),
        s(&pki.join(format!("{side}.crt"))),
        "--key".into(),
        s(&pki.join(format!("{side}.key"))),
        "--ca".into(),
        s(&pki.join("ca.crt")),
    ]
}

/// A local S3 server (`s3s-fs`) with bucket `perf`, killed on drop; `None` when not installed.
struct S3Server(Child, String, std::path::PathBuf);

impl S3Server {
    fn start(root: &Path) -> Result<Option<Self>> {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("perf"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("s3s-fs")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "perf",
                "--secret-key",
                "perf-secret",
            ])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return Ok(None) };
        let server = Self(child, format!("http://127.0.0.1:{port}"), root.to_owned());
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "s3s-fs did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(server))
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "perf"),
            ("AWS_SECRET_ACCESS_KEY", "perf-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", &self.1),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.2);
    }
}

/// Lets the disk settle so each measured phase starts with no writeback of the previous one.
pub(crate) fn settle() {
    let _ = Command::new("sync").status();
}

pub(crate) fn quic(cbcr: &Path, out: &Path, size: u64, raw_bytes: u64, cores: usize) -> Result<()> {
    let started = Instant::now();
    let pki = out.join("quic-pki");
    let status = Command::new(cbcr).args(["cert", "dev", "--out", &s(&pki), "--quiet"]).status()?;
    anyhow::ensure!(status.success(), "cbcr cert dev failed");

    let raw = raw_stream(&pki, raw_bytes)?;
    eprintln!(
        "raw quinn stream on loopback: {:.3} GB/s ({} in {:.2} s)",
        raw.0,
        dataplane::human_size(raw_bytes),
        raw.1
    );

    let (local, remote_dir) = (out.join("quic-local"), out.join("quic-remote"));
    for d in [&local, &remote_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    let mut receiver = Command::new(cbcr)
        .args(["receiver", "--listen", "127.0.0.1:0", "--repo", &s(&remote_dir)])
        .args(tls_args(&pki, "receiver"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(receiver.stdout.take().context("stdout")?).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else { bail!("receiver said {line:?}") };
    let receiver = Receiver(receiver, format!("quic://{addr}"));
    let s3 = S3Server::start(&out.join("quic-s3"))?;
    let mut modes = vec![("local", s(&local)), ("quic", receiver.1.clone())];
    if let Some(s3) = &s3 {
        let url = "s3://perf/repo".to_string();
        let status = Command::new(cbcr).args(["init", "--quiet", "--repo", &url]).envs(s3.env()).status()?;
        anyhow::ensure!(status.success(), "cbcr init {url} failed");
        modes.push(("s3", url));
    } else {
        eprintln!("s3s-fs is not installed: no s3:// figures (cargo install s3s-fs --locked --features binary --version 0.14.1)");
    }

    let every = Duration::from_millis(250);
    let cores_arg = ["--cores".to_string(), cores.to_string()];
    let mut phases = vec![];
    let client_tls = tls_args(&pki, "client");
    for (phase, gen) in [("full", 1), ("incremental", 2), ("restore", 0)] {
        let mut pair = vec![];
        for (mode, repo) in &modes {
            let (mode, repo) = (*mode, repo.clone());
            // Each restore writes a fresh directory: one written right where a large tree was
            // just deleted runs measurably slower here, which would favour whichever goes first.
            let target = out.join(format!("quic-restore-{mode}"));
            let _ = std::fs::remove_dir_all(&target);
            let mut args: Vec<String> = match gen {
                0 => vec!["restore".into(), "latest".into(), "--target".into(), s(&target)],
                g => vec!["backup".into(), "--init".into(), synth(size, 3, g)],
            };
            args.extend(["--repo".into(), repo]);
            args.extend(cores_arg.iter().cloned());
            if mode == "quic" {
                args.extend(client_tls.iter().cloned());
            }
            settle();
            let cpu_before = receiver.cpu_seconds();
            let env = match (&s3, mode) {
                (Some(s3), "s3") => s3.env(),
                _ => vec![],
            };
            let run = sample::run_with(cbcr, &args, &env, every)?;
            let receiver_cpu = if mode == "quic" { receiver.cpu_seconds() - cpu_before } else { 0.0 };
            let gbps = size as f64 / run.seconds / 1e9;
            eprintln!(
                "{phase:>12} {mode:>5} {:>8.2} s {gbps:>7.3} GB/s {:>9} RSS, receiver CPU {receiver_cpu:.2} s",
                run.seconds,
                dataplane::human_size(run.peak_rss)
            );
            pair.push(json!({"mode": mode, "seconds": run.seconds, "gbps": gbps, "peak_rss": run.peak_rss,
                "receiver_cpu_s": receiver_cpu, "summary": run.summary}));
        }
        for (mode, _) in &modes {
            let _ = std::fs::remove_dir_all(out.join(format!("quic-restore-{mode}")));
        }
        // Throughput of each mode as a share of local's (local's seconds over its seconds).
        let local_s = pair[0]["seconds"].as_f64().unwrap_or(f64::NAN);
        let mut ratios = serde_json::Map::new();
        for run in &pair[1..] {
            let ratio = local_s / run["seconds"].as_f64().unwrap_or(f64::NAN);
            let mode = run["mode"].as_str().unwrap_or_default();
            eprintln!("{phase:>12} {mode}/local throughput ratio {ratio:.2}");
            ratios.insert(mode.to_owned(), json!(ratio));
        }
        let ratio = ratios.get("quic").cloned().unwrap_or(json!(null));
        phases.push(json!({"phase": phase, "ratio": ratio, "ratios": ratios, "runs": pair}));
    }
    drop(receiver);
    drop(s3);
    let report = json!({
        "type": "quic_report", "created": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "size": size, "cores": cores, "source": synth(size, 3, 1),
        "raw_stream": {"bytes": raw_bytes, "seconds": raw.1, "gbps": raw.0},
        "phases": phases, "wall_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("quic.json"), serde_json::to_vec_pretty(&report)?)?;
    for d in [&local, &remote_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    eprintln!("wrote {}/quic.json in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// One quinn stream on loopback, with cbcr's TLS and transport settings: GB/s and seconds to
/// move `bytes` (1 MiB writes, as a pack is sent), the receiving side on its own runtime.
fn raw_stream(pki: &Path, bytes: u64) -> Result<(f64, f64)> {
    let files = |side: &str| dataplane::net::quic::TlsFiles {
        cert: pki.join(format!("{side}.crt")),
        key: pki.join(format!("{side}.key")),
        ca: pki.join("ca.crt"),
    };
    let server_rt = dataplane::net::quic::runtime(1)?;
    let client_rt = dataplane::net::quic::runtime(1)?;
    let server = {
        let _guard = server_rt.enter();
        quinn::Endpoint::server(dataplane::net::quic::server_config(&files("receiver"), None)?, "127.0.0.1:0".parse()?)?
    };
    let addr = server.local_addr()?;
    let sink = server_rt.spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            total += chunk.bytes.len() as u64;
        }
        send.write_all(&total.to_le_bytes()).await?;
        send.finish()?;
        conn.closed().await;
        Ok::<u64, anyhow::Error>(total)
    });
    let config = dataplane::net::quic::client_config(&files("client"))?;
    let seconds = client_rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let piece = Arc::new(vec![0x5au8; 1 << 20]);
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = (bytes - sent).min(piece.len() as u64) as usize;
            send.write_all(&piece[..n]).await?;
            sent += n as u64;
        }
        send.finish()?;
        let ack = recv.read_to_end(8).await?;
        let seconds = t.elapsed().as_secs_f64();
        anyhow::ensure!(ack == bytes.to_le_bytes(), "the receiving side counted other bytes");
        conn.close(0u32.into(), b"");
        Ok::<f64, anyhow::Error>(seconds)
    })?;
    server_rt.block_on(sink)??;
    Ok((bytes as f64 / seconds / 1e9, seconds))
}
