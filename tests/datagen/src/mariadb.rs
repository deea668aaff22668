//! A real MariaDB server (Debian's `mariadb-server`) run as the `mysql` user on a private
//! socket with networking off, for the InnoDB test and benchmark; sysbench drives its load.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::server::{self, path, ServerError};

const SERVER: &str = "/usr/sbin/mariadbd";
const INSTALL: &str = "/usr/bin/mariadb-install-db";
const CLIENT: &str = "/usr/bin/mariadb";
const SYSBENCH: &str = "/usr/bin/sysbench";

/// How to reach servers started by [`MariaDb::start`]: one at a time, on `socket`.
pub struct MariaDb {
    /// The option file every program reads (`--defaults-file`): small buffers and redo log,
    /// and a slow shutdown (`innodb_fast_shutdown=0`: purge and change-buffer merges finish
    /// before the server exits, so the pages a copy holds are those the load changed, not
    /// also those background work would rewrite at the next start).
    config: PathBuf,
    pub socket: PathBuf,
    server: Option<Child>,
}

impl MariaDb {
    /// `None` when MariaDB or sysbench is not installed, or when this process cannot run
    /// programs as `mysql` (it must be root, with `setpriv`). `dir` holds the socket, the
    /// option file and the logs.
    pub fn find(dir: &Path) -> Option<Self> {
        let installed = [SERVER, INSTALL, CLIENT, SYSBENCH].iter().all(|p| Path::new(p).exists());
        if !installed || !server::can_switch_user() {
            return None;
        }
        server::make_dirs_for("mysql", &[dir]).ok()?;
        let socket = dir.join("mysqld.sock");
        let config = dir.join("my.cnf");
        let options = format!(
            "[mysqld]\nsocket={}\nskip-networking\ninnodb_buffer_pool_size=64M\ninnodb_log_file_size=16M\ninnodb_fast_shutdown=0\n\
             log-error={}\n[client]\nsocket={}\nuser=root\n",
            socket.display(),
            dir.join("mariadbd.log").display(),
            socket.display()
        );
        fs::write(&config, options).ok()?;
        Some(Self { config, socket, server: None })
    }

    fn defaults(&self) -> String {
        format!("--defaults-file={}", self.config.display())
    }

    /// An empty server in `data` (created, owned by `mysql`); root may log in on the socket
    /// without a password.
    pub fn init(&self, data: &Path) -> Result<(), ServerError> {
        server::make_dirs_for("mysql", &[data])?;
        let datadir = format!("--datadir={}", data.display());
        let args = [&self.defaults(), datadir.as_str(), "--auth-root-authentication-method=normal", "--skip-test-db"];
        server::run_as("mysql", Path::new(INSTALL), &args).map(drop)
    }

    /// Starts the server of `data` and waits until it answers.
    pub fn start(&mut self, data: &Path) -> Result<(), ServerError> {
        assert!(self.server.is_none(), "one server at a time");
        let datadir = format!("--datadir={}", data.display());
        let child = server::command_as("mysql", Path::new(SERVER), &[&self.defaults(), &datadir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ServerError::io("mariadbd", data, e))?;
        self.server = Some(child);
        let started = Instant::now();
        while self.query("select 1").is_err() {
            let exited = self.server.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > Duration::from_secs(60) {
                let log = fs::read_to_string(self.config.with_file_name("mariadbd.log")).unwrap_or_default();
                self.kill();
                let detail = std::io::Error::other(format!("did not start ({exited:?}); its log:\n{log}"));
                return Err(ServerError::io("mariadbd", data, detail));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Shuts the server down cleanly (InnoDB flushes every page: its files are then a
    /// consistent cold copy) and waits for it to exit.
    pub fn stop(&mut self) -> Result<(), ServerError> {
        self.query("shutdown")?;
        if let Some(mut child) = self.server.take() {
            child.wait().map_err(|e| ServerError::io("mariadbd", &self.socket, e))?;
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One statement's (or several's) output, tab-separated, without column names.
    pub fn query(&self, sql: &str) -> Result<String, ServerError> {
        let out = server::run_as("root", Path::new(CLIENT), &[&self.defaults(), "-N", "-B", "-e", sql])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// sysbench's `test` (`oltp_read_write`, `oltp_write_only`, ...) against database
    /// `sbtest` with `args` (`prepare`, or `run` with `--events=N`).
    pub fn sysbench(&self, test: &str, args: &[&str]) -> Result<(), ServerError> {
        let socket = format!("--mysql-socket={}", path(&self.socket));
        let mut all = vec![test, "--db-driver=mysql", &socket, "--mysql-user=root", "--mysql-db=sbtest"];
        all.extend_from_slice(args);
        server::run_as("root", Path::new(SYSBENCH), &all).map(drop)
    }
}

impl Drop for MariaDb {
    /// A failed assertion must not leave a server running.
    fn drop(&mut self) {
        self.kill();
    }
}
