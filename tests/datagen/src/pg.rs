//! A real PostgreSQL cluster (Debian's `postgresql`) run as the `postgres` user on a private
//! socket, for the PostgreSQL test and the pgbench benchmark.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A PostgreSQL program that could not be run or failed.
#[derive(Debug, thiserror::Error)]
#[error("{program} {args}: {detail}")]
pub struct PgError {
    program: String,
    args: String,
    detail: String,
}

/// Where PostgreSQL's programs are and how to reach a server started by [`Postgres::start`].
pub struct Postgres {
    pub bin: PathBuf,
    pub port: u16,
    pub socket: PathBuf,
}

impl Postgres {
    /// Finds the newest installed PostgreSQL; `None` when there is none, or when this process
    /// cannot run programs as `postgres` (it must be root, with `setpriv`).
    pub fn find(socket: &Path, port: u16) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err() {
            return None;
        }
        let mut bins: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        bins.sort();
        Some(Self { bin: bins.pop()?, port, socket: socket.to_owned() })
    }

    /// Runs a PostgreSQL program as the `postgres` user.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, PgError> {
        let fail = |detail: String| PgError { program: program.into(), args: args.join(" "), detail };
        let out = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            return Err(fail(format!("{}\n{}{}", out.status, text(&out.stdout), text(&out.stderr))));
        }
        Ok(out)
    }

    /// Creates the directories (owned by `postgres`) and an empty cluster in `data`.
    pub fn init(&self, data: &Path) -> Result<(), PgError> {
        for dir in [data, &self.socket] {
            fs::create_dir_all(dir).map_err(|e| self.io("mkdir", dir, e))?;
            let ok = Command::new("chown").arg("postgres:postgres").arg(dir).status();
            if !ok.is_ok_and(|s| s.success()) {
                return Err(self.io("chown", dir, std::io::Error::other("chown failed")));
            }
        }
        self.run("initdb", &["-D", &path(data), "-A", "trust", "-N"]).map(drop)
    }

    fn io(&self, what: &str, p: &Path, e: std::io::Error) -> PgError {
        PgError { program: what.into(), args: p.display().to_string(), detail: e.to_string() }
    }

    pub fn start(&self, data: &Path) -> Result<(), PgError> {
        let opts = format!("-k {} -c listen_addresses='' -p {}", self.socket.display(), self.port);
        let log = self.socket.join(format!("{}.log", data.file_name().unwrap_or_default().to_string_lossy()));
        self.run("pg_ctl", &["-D", &path(data), "-o", &opts, "-w", "-l", &path(&log), "start"]).map(drop)
    }

    pub fn stop(&self, data: &Path) -> Result<(), PgError> {
        self.run("pg_ctl", &["-D", &path(data), "-m", "fast", "-w", "stop"]).map(drop)
    }

    /// `pgbench` against the running server with `args` (e.g. `-i -s 100`, or `-t 1000 -c 2`).
    pub fn pgbench(&self, args: &[&str]) -> Result<(), PgError> {
        let (socket, port) = (path(&self.socket), self.port.to_string());
        let all: Vec<&str> = args.iter().copied().chain(["-h", &socket, "-p", &port, "postgres"]).collect();
        self.run("pgbench", &all).map(drop)
    }

    /// `pg_basebackup -Ft` of the running server into `dir` (`base.tar`, `pg_wal.tar`). The
    /// checkpoint is immediate: a spread one waits up to 4.5 minutes with default settings.
    pub fn base_backup_tar(&self, dir: &Path) -> Result<(), PgError> {
        let (socket, port) = (path(&self.socket), self.port.to_string());
        let args = ["-h", &socket, "-p", &port, "-D", &path(dir), "-Ft", "-X", "fetch", "--checkpoint=fast"];
        self.run("pg_basebackup", &args).map(drop)
    }

    /// One query's output, unaligned and without headers.
    pub fn query(&self, sql: &str) -> Result<String, PgError> {
        let (socket, port) = (path(&self.socket), self.port.to_string());
        let out = self.run("psql", &["-h", &socket, "-p", &port, "-At", "-c", sql, "postgres"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the servers of `data` dirs when dropped (a failed assertion must not leave one).
    pub fn stop_on_drop(&self, data: Vec<PathBuf>) -> StopOnDrop<'_> {
        StopOnDrop(self, data)
    }
}

/// See [`Postgres::stop_on_drop`].
pub struct StopOnDrop<'a>(&'a Postgres, Vec<PathBuf>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for data in &self.1 {
            if data.join("postmaster.pid").exists() {
                let _ = self.0.run("pg_ctl", &["-D", &path(data), "-m", "immediate", "-w", "stop"]);
            }
        }
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
