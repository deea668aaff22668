//! The thread-per-core runtime: one glommio executor pinned to each core. glommio stays behind
//! this module; the stages run as plain functions on the executor's thread, one unit of work
//! (a segment, a pack) at a time, start to finish.

use std::sync::Arc;

use glommio::{LocalExecutorBuilder, Placement};

use crate::error::{Error, Result};
use crate::limits;

/// Executors started by [`spawn`]; [`Cores::join`] waits for their results.
pub struct Cores<T: Send + 'static> {
    handles: Vec<glommio::ExecutorJoinHandle<T>>,
}

/// The number of cores cbcr uses when `--cores` is not given: those this process may run on.
pub fn default_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `cores` executors, pinned to the first `cores` CPUs this process may use, each running
/// `work(core_index)` to completion.
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
    let mut handles = Vec::with_capacity(cores);
    for (core, &cpu) in cpus.iter().take(cores).enumerate() {
        let work = Arc::clone(&work);
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("cbcr-core{core}"))
            .io_memory(limits::IO_MEMORY_PER_CORE)
            .spawn(move || async move { work(core) })
            .map_err(|e| Error::Runtime { core, detail: e.to_string() })?;
        handles.push(handle);
    }
    Ok(Cores { handles })
}

impl<T: Send + 'static> Cores<T> {
    /// Waits for every core; a core that could not start or panicked is an error.
    pub fn join(self) -> Result<Vec<T>> {
        self.handles
            .into_iter()
            .enumerate()
            .map(|(core, h)| h.join().map_err(|e| Error::Runtime { core, detail: e.to_string() }))
            .collect()
    }
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
