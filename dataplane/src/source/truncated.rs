//! Source files truncated while they are mapped. Another process that shortens a file cbcr has
//! mapped (logrotate's `copytruncate` does) makes every read past the new end raise SIGBUS,
//! which kills the process. While a thread reads a mapping inside [`reading`], a SIGBUS at an
//! address of that mapping maps zero pages over the rest of it instead, and the read goes on:
//! the bytes past the new end read as zeros, and the backup's check that a file did not
//! change while it was read names the file (exit 3). Any other SIGBUS keeps its default
//! action: the process dies of it, as before.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

thread_local! {
    /// The mapping this thread is reading: start and end address, page-aligned end.
    static GUARDED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// Installs the SIGBUS handler (once per process).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf has no preconditions; sigaction gets a zeroed, then filled struct
        // and a handler that only touches const thread-locals and makes one mmap call.
        unsafe {
            PAGE.store(libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize, Ordering::Relaxed);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = GUARDED.with(Cell::get);
    if (start..end).contains(&addr) {
        let from = addr & !(PAGE.load(Ordering::Relaxed) - 1);
        // SAFETY: [from, end) lies inside the private read-only mapping this thread reads, which
        // its owner unmaps whole later; zero pages take the place of the file's vanished ones.
        let mapped = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                end - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            return;
        }
    }
    // Not a read of a guarded mapping: the default action, when the fault repeats on return.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Runs `read`, which reads `map` (a whole mapping, as mmap returned it): should the file turn
/// out shorter than the mapping meanwhile, the bytes past its end read as zeros. [`install`]
/// must have run.
pub(crate) fn reading<R>(map: &[u8], read: impl FnOnce() -> R) -> R {
    struct Unguard;
    impl Drop for Unguard {
        fn drop(&mut self) {
            GUARDED.with(|g| g.set((0, 0)));
        }
    }
    let start = map.as_ptr() as usize;
    let end = (start + map.len()).next_multiple_of(PAGE.load(Ordering::Relaxed));
    GUARDED.with(|g| g.set((start, end)));
    let _unguard = Unguard;
    read()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_truncated_while_mapped_reads_as_zeros_past_its_new_end() {
        install();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        // SAFETY: a private read-only mapping of a file only this test touches.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let sum = reading(&map, || map.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(sum, 7 << 20);
        file.set_len(100_000).unwrap();
        // Unguarded, this read would kill the test process with SIGBUS.
        let bytes = reading(&map, || map.to_vec());
        let page = PAGE.load(Ordering::Relaxed);
        // What the kernel still maps (to the end of the last page) keeps the data; past it, zeros.
        let kept = 100_000usize.next_multiple_of(page);
        assert!(bytes[..100_000].iter().all(|&b| b == 7));
        assert!(bytes[kept..].iter().all(|&b| b == 0));
        assert_eq!(bytes.len(), 1 << 20);
    }
}
