//! The sync journal of the power-loss sweep. With `CBCR_SYNC_JOURNAL=FILE`, every fsync, rename
//! and new directory that makes a local repository's files durable is appended to FILE as one
//! line as it returns, in order (`fsync PATH`, `rename FROM TO`, `mkdir PATH`, tab-separated).
//! After a kill, the test replays it as a power loss would (`tests/faults.rs`): a rename or new
//! directory that no later fsync of its directory made durable is gone, and a file renamed into
//! place before its data was fsynced has lost that data. So the sweep checks the local store's
//! own fsync discipline, not only the order of the store's calls. Unset, a call costs one load.

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// One durability step.
pub(crate) enum Step<'a> {
    /// A file's data, or a directory's entries, made durable.
    Fsync(&'a Path),
    Rename(&'a Path, &'a Path),
    Mkdir(&'a Path),
}

fn journal() -> Option<&'static Mutex<std::fs::File>> {
    static JOURNAL: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    JOURNAL
        .get_or_init(|| {
            let path = std::env::var_os("CBCR_SYNC_JOURNAL")?;
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path).ok()?;
            Some(Mutex::new(file))
        })
        .as_ref()
}

/// Appends `step` to the journal, if one is asked for.
pub(crate) fn record(step: Step<'_>) {
    let Some(journal) = journal() else { return };
    let line = match step {
        Step::Fsync(p) => format!("fsync\t{}\n", p.display()),
        Step::Rename(from, to) => format!("rename\t{}\t{}\n", from.display(), to.display()),
        Step::Mkdir(p) => format!("mkdir\t{}\n", p.display()),
    };
    // One write per line: a kill leaves whole lines (the kernel has them; no power is lost).
    let _ = journal.lock().map(|mut f| f.write_all(line.as_bytes()));
}
