//! The thread-per-core runtime: one glommio executor pinned to each core. glommio stays behind
//! this module; the stages run as plain functions on the executor's thread, one unit of work
//! (a segment, a pack) at a time, start to finish.

use std::sync::Arc;
use std::thread::JoinHandle;

use glommio::{LocalExecutorBuilder, Placement};

use crate::error::{Error, Result};
use crate::limits;

/// Executors started by [`spawn`]; [`Cores::join`] waits for their results.
pub struct Cores<T> {
    /// `None` from a core that could not start; [`spawn`] has already reported those.
    threads: Vec<JoinHandle<Option<T>>>,
}

/// The number of cores cbcr uses when `--cores` is not given: those this process may run on.
pub fn default_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `cores` executors, pinned to the first `cores` CPUs this process may use, each running
/// `work(core_index)` to completion. Returns only once every executor is up, or with the reason
/// one could not start (io_uring unavailable, too little locked memory).
pub fn spawn<T, F>(cores: usize, work: F) -> Result<Cores<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let cpus = allowed_cpus();
    if cores == 0 || cores > cpus.len().min(limits::MAX_CORES) {
        return Err(Error::Usage(format!("--cores {cores}: this process may use 1 to {} cores", cpus.len())));
    }
    let work = Arc::new(work);
    let (started_tx, started_rx) = crossbeam_channel::bounded(cores);
    let mut threads = Vec::with_capacity(cores);
    for (core, &cpu) in cpus.iter().take(cores).enumerate() {
        let (work, started) = (Arc::clone(&work), started_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("cbcr-core{core}"))
            .spawn(move || {
                let made = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                    .name(&format!("cbcr-core{core}"))
                    .io_memory(limits::IO_MEMORY_PER_CORE)
                    .make();
                match made {
                    Ok(executor) => {
                        let _ = started.send(Ok(()));
                        Some(executor.run(async move { work(core) }))
                    }
                    Err(e) => {
                        let _ = started.send(Err(Error::Runtime { core, detail: startup_failure(&e.to_string()) }));
                        None
                    }
                }
            })
            .map_err(|e| Error::Runtime { core, detail: e.to_string() })?;
        threads.push(thread);
    }
    drop(started_tx);
    let mut failure = None;
    for started in started_rx.iter().take(cores) {
        if let Err(e) = started {
            failure.get_or_insert(e);
        }
    }
    if let Some(e) = failure {
        // The executors that did start run `work` with nobody to feed them; their queues close
        // when the caller drops its senders.
        return Err(e);
    }
    Ok(Cores { threads })
}

impl<T: Send + 'static> Cores<T> {
    /// Waits for every core; a core that panicked is an internal error naming its message (a
    /// core that could not start was reported by [`spawn`]).
    pub fn join(self) -> Result<Vec<T>> {
        self.threads
            .into_iter()
            .enumerate()
            .map(|(core, t)| match t.join() {
                Ok(Some(result)) => Ok(result),
                Ok(None) => Err(Error::Internal(format!("core {core} did not start"))),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|m| m.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::Internal(format!("core {core} panicked: {message}")))
                }
            })
            .collect()
    }
}

/// glommio's error, plus the locked-memory limit in force and what one core needs.
fn startup_failure(glommio: &str) -> String {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct.
    let memlock =
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
            format!("{} KiB", lim.rlim_cur / 1024)
        } else {
            "unlimited".into()
        };
    format!(
        "{glommio} (locked-memory limit {memlock}; each core registers {} KiB of I/O memory plus its rings)",
        limits::IO_MEMORY_PER_CORE / 1024
    )
}

/// CPU ids in this process's affinity mask, ascending.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..default_cores()).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}
