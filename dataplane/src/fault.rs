//! Crash points for the kill -9 tests.
//!
//! `CBCR_FAULT=NAME:N` makes the process SIGKILL itself the N-th time it passes the point called
//! NAME. The test suite uses it to stop a backup at exact places in chunking, pack writing and
//! the commit, then checks that the repository is consistent. Unset, a point costs one load.
//! The `store-` points stand before and after every change to the store by any command (index
//! merges, forget, repair included): the power-loss sweep kills there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The points a backup passes, in the order of the commit protocol.
pub(crate) const POINTS: &[&str] = &[
    "segment",
    "pack-write",
    "pack-seal",
    "index-write",
    "index-merge",
    // A shard's checkpoint was written (`backup --job`).
    "checkpoint",
    "snapshot-write",
    "snapshot-rename",
    // Before and after every call that changes the store, whatever the command (the power-loss
    // sweep; see `store::crash`).
    "store-write",
    "store-written",
];

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("CBCR_FAULT").ok()?;
            let (name, at) = spec.split_once(':')?;
            Some(Armed { name: name.to_owned(), at: at.parse().ok()?, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Whether a store crash point is armed: only then is the store wrapped to pass them.
pub(crate) fn armed_in_store() -> bool {
    armed().is_some_and(|a| a.name.starts_with("store-"))
}

/// `CBCR_FAULT_SLOW_READ=PATH:MS`: while the file PATH exists, every window a backup reads from
/// its source takes MS milliseconds longer (a deliberately slow source host, for the throttle
/// tests). Only a steered or capped backup measures its reads, so only such a one is slowed.
pub(crate) fn slow_read() {
    static SLOW: OnceLock<Option<(std::path::PathBuf, u64)>> = OnceLock::new();
    let slow = SLOW.get_or_init(|| {
        let spec = std::env::var("CBCR_FAULT_SLOW_READ").ok()?;
        let (path, ms) = spec.rsplit_once(':')?;
        Some((path.into(), ms.parse().ok()?))
    });
    if let Some((path, ms)) = slow {
        if path.exists() {
            std::thread::sleep(std::time::Duration::from_millis(*ms));
        }
    }
}

/// Passes the crash point `name`.
#[inline]
pub(crate) fn point(name: &'static str) {
    debug_assert!(POINTS.contains(&name));
    if let Some(a) = armed() {
        if a.name == name && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            // SAFETY: plain syscalls; the process dies here, as with an external kill -9.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
