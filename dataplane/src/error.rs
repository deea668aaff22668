//! Errors of the data plane and the exit code each one maps to.
//!
//! Policy: library code returns [`Error`] with the path or object it was working on attached;
//! only `main.rs` turns it into a message and an exit code. Messages say what to do about it,
//! and the variant says who failed: the user (`Usage`, `NotFound`), the repository (`Format`,
//! `Integrity`, `NotARepository`), the machine (`Io`, `NoSpace`, `Runtime`), a peer (`Network`,
//! `ObjectStore`, `Protocol`), or cbcr itself (`Internal`).

use std::io;
use std::path::{Path, PathBuf};

/// Documented exit codes (README, "Exit codes"). Keep the two in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    Fatal = 1,
    /// The command line asked for something that cannot be done (a bad option value).
    Usage = 2,
    /// Backup finished, but some source files could not be read and are not in the snapshot.
    Partial = 3,
    NoRepository = 10,
    Locked = 11,
    UnsupportedFormat = 12,
    /// Verify found damage, or restore met data that does not match its id.
    Integrity = 13,
    NoSpace = 14,
    /// A remote repository could not be reached, refused us, or the connection broke.
    Network = 15,
    /// The password (or the key command's secret) opens no key slot of the repository.
    WrongPassword = 16,
    /// A receiver's policy does not let this client's certificate do what was asked.
    Denied = 17,
    /// A shard run was fenced off: its token is not the highest for the shard (a take-over
    /// by a later run, or a stale agent), or another run of it holds the same token.
    Fenced = 18,
    /// `commit --job` found segments of the plan with no checkpoint.
    JobIncomplete = 19,
    /// A shard found a source file whose size or mtime differs from the plan.
    SourceChanged = 20,
    /// `backup --job` or `commit --job` of a job with no plan in the repository.
    NoJob = 21,
    /// `plan`, `backup` or `commit --job` of a job a snapshot records as committed.
    JobCommitted = 22,
    Interrupted = 130,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not a cbcr repository (no config file); give --repo an existing repository, or create one with `cbcr init` (or `cbcr backup --init`, in an empty or missing directory or prefix)")]
    NotARepository(PathBuf),
    #[error("{0}: already a cbcr repository")]
    AlreadyARepository(PathBuf),
    #[error("repository {0} is locked by another backup; wait for it to finish (the lock is released when that process exits)")]
    Locked(PathBuf),
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: wire::Error },
    #[error("{0}: the password opens none of the repository's key slots ({1} tried); check the password, or the --password-file / CBCR_PASSWORD / --key-command given")]
    WrongPassword(String, usize),
    #[error(
        "no space left on device while writing {0}; free space and run the backup again (earlier snapshots are intact)"
    )]
    NoSpace(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("integrity: {0}")]
    Integrity(String),
    /// The user asked for something that cannot be done as asked: fix the command line.
    #[error("{0}")]
    Usage(String),
    /// What the user named is not there (a snapshot, a path in a snapshot, a source path).
    #[error("{0}")]
    NotFound(String),
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("{0}")]
    JobIncomplete(String),
    /// A job with no plan in the repository: never planned there, or abandoned.
    #[error("{0}")]
    NoJob(String),
    /// A job that a snapshot records as committed: its plan is gone, and it is not made twice.
    #[error("job {job} was committed already, as snapshot {snapshot}")]
    JobCommitted { job: String, snapshot: String },
    #[error("{0}")]
    SourceChanged(String),
    /// A snapshot's trees could not be built from what its segments gave (a directory too
    /// wide for one tree, or results that do not fit the entries).
    #[error(transparent)]
    Assembly(#[from] wire::assemble::AssemblyError),
    /// A part of cbcr stopped that should not have (a core, the sealer): a bug, never the
    /// user's or the repository's fault.
    #[error("internal error: {0} (a bug in cbcr; earlier snapshots are intact)")]
    Internal(String),
    /// Stopped by SIGINT at a consistent point: what was made durable is reused next time.
    #[error("interrupted; nothing was committed, and what was stored is reused by the next backup")]
    Interrupted,
    #[error("network: {0}")]
    Network(String),
    /// A receiver's policy refused the request for this client's certificate.
    #[error("denied: {0}; ask the receiver's operator for a grant in its policy file")]
    Denied(String),
    /// The other side speaks no protocol version this cbcr speaks.
    #[error("protocol: {0}; upgrade the older side")]
    Protocol(String),
    /// Object storage refused a request or could not be reached.
    #[error("object storage {location}: {detail}")]
    ObjectStore { location: String, detail: String },
    #[error("cannot start the thread-per-core runtime on core {core}: {detail}. cbcr needs io_uring and locked memory: check `ulimit -l` (LimitMEMLOCK= under systemd) and that the container's seccomp profile allows io_uring")]
    Runtime { core: usize, detail: String },
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::NotARepository(_) => ExitCode::NoRepository,
            Error::Locked(_) => ExitCode::Locked,
            Error::WrongPassword(..) => ExitCode::WrongPassword,
            Error::Format { source: wire::Error::UnsupportedVersion { .. }, .. } => ExitCode::UnsupportedFormat,
            Error::Protocol(_) => ExitCode::UnsupportedFormat,
            Error::Format { .. } | Error::Integrity(_) => ExitCode::Integrity,
            Error::NoSpace(_) => ExitCode::NoSpace,
            Error::Network(_) | Error::ObjectStore { .. } => ExitCode::Network,
            Error::Usage(_) => ExitCode::Usage,
            Error::Denied(_) => ExitCode::Denied,
            Error::Fenced(_) => ExitCode::Fenced,
            Error::JobIncomplete(_) => ExitCode::JobIncomplete,
            Error::NoJob(_) => ExitCode::NoJob,
            Error::JobCommitted { .. } => ExitCode::JobCommitted,
            Error::SourceChanged(_) => ExitCode::SourceChanged,
            Error::Interrupted => ExitCode::Interrupted,
            _ => ExitCode::Fatal,
        }
    }

    /// A decode error of the file at `path`.
    pub fn format(path: &Path, source: wire::Error) -> Self {
        Error::Format { path: path.to_owned(), source }
    }
}

/// Attaches the path an I/O error is about; disk-full becomes [`Error::NoSpace`].
pub trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, Error> {
        self.map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace(path.to_owned()),
            _ => Error::Io { path: path.to_owned(), source },
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
