//! A real PostgreSQL cluster (Debian's `postgresql`) run as the `postgres` user on a private
//! socket, for the PostgreSQL test and the pgbench benchmark.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::server::{self, path, ServerError};

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
        if !server::can_switch_user() {
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
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, ServerError> {
        server::run_as("postgres", &self.bin.join(program), args)
    }

    /// Creates the directories (owned by `postgres`) and an empty cluster in `data`.
    pub fn init(&self, data: &Path) -> Result<(), ServerError> {
        server::make_dirs_for("postgres", &[data, &self.socket])?;
        self.run("initdb", &["-D", &path(data), "-A", "trust", "-N"]).map(drop)
    }

    pub fn start(&self, data: &Path) -> Result<(), ServerError> {
        let opts = format!("-k {} -c listen_addresses='' -p {}", self.socket.display(), self.port);
        let log = self.socket.join(format!("{}.log", data.file_name().unwrap_or_default().to_string_lossy()));
        self.run("pg_ctl", &["-D", &path(data), "-o", &opts, "-w", "-l", &path(&log), "start"]).map(drop)
    }

    pub fn stop(&self, data: &Path) -> Result<(), ServerError> {
        self.run("pg_ctl", &["-D", &path(data), "-m", "fast", "-w", "stop"]).map(drop)
    }

    /// `pgbench` against the running server with `args` (e.g. `-i -s 100`, or `-t 1000 -c 2`).
    pub fn pgbench(&self, args: &[&str]) -> Result<(), ServerError> {
        let (socket, port) = (path(&self.socket), self.port.to_string());
        let all: Vec<&str> = args.iter().copied().chain(["-h", &socket, "-p", &port, "postgres"]).collect();
        self.run("pgbench", &all).map(drop)
    }

    /// `pg_basebackup -Ft` of the running server into `dir` (`base.tar`, `pg_wal.tar`). The
    /// checkpoint is immediate: a spread one waits up to 4.5 minutes with default settings.
    pub fn base_backup_tar(&self, dir: &Path) -> Result<(), ServerError> {
        let (socket, port) = (path(&self.socket), self.port.to_string());
        let args = ["-h", &socket, "-p", &port, "-D", &path(dir), "-Ft", "-X", "fetch", "--checkpoint=fast"];
        self.run("pg_basebackup", &args).map(drop)
    }

    /// One query's output, unaligned and without headers.
    pub fn query(&self, sql: &str) -> Result<String, ServerError> {
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
