//! A repository in a local directory, the embedded default:
//!
//! ```text
//! REPO/config  REPO/keys/<key id>  REPO/packs/ab/<id>.pack  REPO/index/<id>.idx
//! REPO/snapshots/<id>  REPO/tmp/ (files being written)  REPO/lock (flock)
//! ```
//! Every file is written to `tmp/`, fsynced, renamed into place and its directory fsynced, so a
//! file under its final name is always complete and durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{ObjectInfo, ObjectKind, ObjectReader, Store, WriterClaim};
use crate::error::{Error, IoContext, Result};
use crate::fault;

/// The directories a local repository has.
const DIRS: [&str; 5] = ["keys", "packs", "index", "snapshots", "tmp"];

pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_owned() }
    }

    /// The repository's `lock` file, locked `how` (exclusive or shared), or `Error::Locked`.
    fn flock(&self, how: libc::c_int) -> Result<File> {
        let path = self.root.join("lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).at(&path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            return Err(Error::Locked(self.root.clone()));
        }
        Ok(file)
    }

    fn path(&self, kind: ObjectKind, name: &str) -> PathBuf {
        self.root.join(kind.key(name))
    }

    /// Moves a complete, fsynced file to its final name and makes the rename durable.
    fn publish(&self, tmp: &Path, dest: &Path) -> Result<()> {
        let dir = dest.parent().expect("repository paths have a parent");
        if !dir.exists() {
            fs::create_dir_all(dir).at(dir)?;
            super::journal::record(super::journal::Step::Mkdir(dir));
            sync_dir(dir.parent().expect("pack fan-out dirs have a parent"))?;
        }
        fs::rename(tmp, dest).at(dest)?;
        super::journal::record(super::journal::Step::Rename(tmp, dest));
        sync_dir(dir)
    }
}

use super::sync_path as sync_dir;

struct LocalObject {
    file: File,
    path: PathBuf,
    len: u64,
}

impl ObjectReader for LocalObject {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).at(&self.path)
    }
}

/// Removes every file in `dir` (what interrupted writers left); safe only under the claim.
pub(super) fn clean_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        // Writers leave files; whatever else is there (a directory someone made) goes too.
        if entry.file_type().at(&path)?.is_dir() {
            fs::remove_dir_all(&path).at(&path)?;
        } else {
            fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(())
}

impl Store for LocalDir {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn work_dir(&self) -> &Path {
        &self.root
    }

    fn is_empty(&self) -> Result<bool> {
        match fs::read_dir(&self.root) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).at(&self.root),
        }
    }

    fn create(&self) -> Result<()> {
        // The highest directory of the root's path that does not exist yet: the entries of
        // everything made below it are synced, so a power loss right after `init` cannot take
        // the repository's directories away again.
        let mut first_new = None;
        let mut at = Some(self.root.as_path());
        while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            first_new = Some(dir);
            at = dir.parent();
        }
        for dir in DIRS {
            let path = self.root.join(dir);
            fs::create_dir_all(&path).at(&path)?;
        }
        sync_dir(&self.root)?;
        if let Some(top) = first_new {
            let mut dir = self.root.as_path();
            loop {
                let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                sync_dir(parent)?;
                if dir == top {
                    break;
                }
                dir = parent;
            }
        }
        Ok(())
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(kind, name);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // A file where the repository's directory should be.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
            Err(e) => Err(e).at(&path),
        }
    }

    fn open(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectReader>> {
        let path = self.path(kind, name);
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        Ok(Box::new(LocalObject { file, path, len }))
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let mode = if kind == ObjectKind::Key { 0o600 } else { 0o644 };
        let tmp = super::tmp_path(&self.root, "file");
        let mut f = OpenOptions::new().create_new(true).write(true).mode(mode).open(&tmp).at(&tmp)?;
        let written = f.write_all(bytes).at(&tmp).and_then(|()| super::sync_file(&f, &tmp));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dest = self.path(kind, name);
        if kind != ObjectKind::Snapshot {
            return self.publish(&tmp, &dest);
        }
        fault::point("snapshot-write");
        fs::rename(&tmp, &dest).at(&dest)?;
        super::journal::record(super::journal::Step::Rename(&tmp, &dest));
        fault::point("snapshot-rename");
        sync_dir(dest.parent().expect("snapshots/ is the parent"))
    }

    fn put_file(&self, kind: ObjectKind, name: &str, tmp: &Path) -> Result<()> {
        self.publish(tmp, &self.path(kind, name))
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let dir = self.root.join(kind.dir());
        // Made by the first commit through a receiver's policy (`writers/`), the first verify
        // that found damage (`damaged/`) or the first plan (`jobs/`); most repositories lack them.
        if matches!(kind, ObjectKind::Writer | ObjectKind::Damaged | ObjectKind::Job) && !dir.exists() {
            return Ok(vec![]);
        }
        let mut out = vec![];
        let mut add = |path: &Path| -> Result<()> {
            let len = fs::symlink_metadata(path).at(path)?.len();
            out.push(ObjectInfo { name: path.file_name().unwrap_or_default().to_string_lossy().into_owned(), len });
            Ok(())
        };
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            if kind == ObjectKind::Pack && entry.file_type().at(&entry.path())?.is_dir() {
                for inner in fs::read_dir(entry.path()).at(&entry.path())? {
                    add(&inner.at(&entry.path())?.path())?;
                }
            } else {
                add(&entry.path())?;
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let path = self.path(kind, name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at(&path),
            _ => Ok(()),
        }
    }

    fn index_run(&self, name: &str) -> Result<PathBuf> {
        Ok(self.path(ObjectKind::Index, name))
    }

    fn claim_writer(&self) -> Result<Box<dyn WriterClaim>> {
        let lock = self.flock(libc::LOCK_EX)?;
        Ok(Box::new(super::TmpClaim { tmp: Some(self.root.join("tmp")), _lock: Some(lock) }))
    }

    fn claim_shared_writer(&self) -> Result<Box<dyn WriterClaim>> {
        let lock = self.flock(libc::LOCK_SH)?;
        Ok(Box::new(super::TmpClaim { tmp: None, _lock: Some(lock) }))
    }
}
