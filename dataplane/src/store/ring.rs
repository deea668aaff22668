//! Reads of local files through io_uring, started now and collected later: a core starts the
//! reads of what it will need next and works on what it has meanwhile, so the disk sees a queue
//! instead of one read at a time and the core never waits for a read it could have started
//! earlier. One ring per thread (each core's executor thread has its own), made on first use;
//! where the kernel refuses one (an old kernel, a seccomp profile), a read is done with `pread`
//! when it is started, and one warning per thread says so.
//!
//! A read's buffer belongs to the ring from [`start`] until [`Ticket::finish`]: the kernel writes
//! into it meanwhile. A ticket dropped unfinished leaves its buffer to the ring, which frees it
//! once the kernel is done with it; a thread's ring waits for its reads before it goes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::limits;

/// A read started by [`start`]; [`Ticket::finish`] waits for it on the thread that started it.
pub(crate) struct Ticket {
    id: u64,
    thread: std::thread::ThreadId,
    /// Cleared by `finish`, so that dropping a finished ticket does nothing.
    open: bool,
}

/// Starts reading `buf.len()` bytes of `file` at `offset` into `buf`; the read is submitted
/// before this returns.
pub(crate) fn start(file: &Arc<File>, offset: u64, buf: Vec<u8>) -> Ticket {
    let id = RING.with(|ring| ring.borrow_mut().start(file, offset, buf));
    Ticket { id, thread: std::thread::current().id(), open: true }
}

impl Ticket {
    /// Waits for the read and gives back its buffer, filled. A file shorter than the read is an
    /// `UnexpectedEof` error.
    pub(crate) fn finish(mut self) -> io::Result<Vec<u8>> {
        self.open = false;
        if self.thread != std::thread::current().id() {
            return Err(io::Error::other("a read was collected on another thread than started it"));
        }
        RING.with(|ring| ring.borrow_mut().finish(self.id))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open && self.thread == std::thread::current().id() {
            // Ignored when the thread's ring is already gone (the thread is ending).
            let _ = RING.try_with(|ring| ring.borrow_mut().abandon(self.id));
        }
    }
}

thread_local! {
    static RING: RefCell<Ring> = RefCell::new(Ring::new());
}

/// One read: where from, into what, how far it got.
struct Read {
    /// Held so the descriptor stays open while the kernel reads from it.
    file: Arc<File>,
    offset: u64,
    buf: Vec<u8>,
    filled: usize,
    state: ReadState,
}

enum ReadState {
    InFlight,
    Done(io::Result<()>),
    /// Its ticket was dropped: freed when the kernel completes it.
    Abandoned,
}

struct Ring {
    /// `None` where the kernel refused a ring: reads are done when started.
    uring: Option<IoUring>,
    reads: HashMap<u64, Read>,
    next_id: u64,
    /// Submitted to the kernel and not completed.
    in_flight: usize,
}

impl Ring {
    fn new() -> Self {
        let uring = match IoUring::new(limits::RING_DEPTH) {
            Ok(ring) => Some(ring),
            Err(e) => {
                tracing::warn!("io_uring is not available to this thread ({e}); reads go one at a time");
                None
            }
        };
        Self { uring, reads: HashMap::new(), next_id: 0, in_flight: 0 }
    }

    fn start(&mut self, file: &Arc<File>, offset: u64, buf: Vec<u8>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut read = Read { file: Arc::clone(file), offset, buf, filled: 0, state: ReadState::InFlight };
        if self.uring.is_none() {
            read.state = ReadState::Done(read.file.read_exact_at(&mut read.buf, offset));
            read.filled = read.buf.len();
            self.reads.insert(id, read);
            return id;
        }
        if read.buf.is_empty() {
            read.state = ReadState::Done(Ok(()));
        }
        let submit = matches!(read.state, ReadState::InFlight);
        self.reads.insert(id, read);
        if submit {
            while self.in_flight >= limits::RING_DEPTH as usize {
                self.complete_one();
            }
            self.submit(id);
        }
        id
    }

    /// Puts the rest of read `id` on the ring and hands it to the kernel.
    fn submit(&mut self, id: u64) {
        let read = self.reads.get_mut(&id).expect("a read is submitted while it is known");
        let rest = &mut read.buf[read.filled..];
        // The kernel takes at most u32::MAX bytes per read; a short read is resubmitted.
        let len = rest.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Read::new(types::Fd(read.file.as_raw_fd()), rest.as_mut_ptr(), len)
            .offset(read.offset + read.filled as u64)
            .build()
            .user_data(id);
        let uring = self.uring.as_mut().expect("submit is only reached with a ring");
        // SAFETY: the buffer and the descriptor live in `self.reads` until the completion of
        // this entry is reaped (finish and abandon keep an in-flight read; Drop waits for all).
        let pushed = unsafe { uring.submission().push(&entry) };
        if pushed.is_err() {
            // In flight stays below the ring's depth, so the queue has room after a submit.
            let _ = uring.submit();
            // SAFETY: as above.
            unsafe { uring.submission().push(&entry) }.expect("the submission queue has room after a submit");
        }
        self.in_flight += 1;
        if let Err(e) = uring.submit() {
            tracing::debug!("io_uring submit: {e}; retried when the read is waited for");
        }
    }

    /// Waits for at least one completion and applies every one that arrived.
    fn complete_one(&mut self) {
        let uring = self.uring.as_mut().expect("completions are only waited for with a ring");
        loop {
            match uring.submit_and_wait(1) {
                // EBUSY: completions wait to be reaped first.
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Submission itself failing leaves the reads in flight: they cannot be
                    // abandoned safely, so this thread stops here.
                    panic!("io_uring: waiting for reads failed: {e}");
                }
            }
        }
        let done: Vec<(u64, i32)> = uring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (id, result) in done {
            self.in_flight -= 1;
            self.completed(id, result);
        }
    }

    fn completed(&mut self, id: u64, result: i32) {
        let Some(read) = self.reads.get_mut(&id) else { return };
        let outcome = if result == -libc::EINTR || result == -libc::EAGAIN {
            None
        } else if result < 0 {
            Some(Err(io::Error::from_raw_os_error(-result)))
        } else if result == 0 {
            Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends before the read")))
        } else {
            read.filled += result as usize;
            (read.filled == read.buf.len()).then_some(Ok(()))
        };
        match (outcome, &read.state) {
            // Nobody wants the rest; the kernel is done with the buffer.
            (_, ReadState::Abandoned) => {
                self.reads.remove(&id);
            }
            (Some(outcome), _) => read.state = ReadState::Done(outcome),
            // The rest of a short read, or a retry.
            (None, _) => self.submit(id),
        }
    }

    fn finish(&mut self, id: u64) -> io::Result<Vec<u8>> {
        while matches!(self.reads.get(&id).map(|r| &r.state), Some(ReadState::InFlight)) {
            self.complete_one();
        }
        let read = self.reads.remove(&id).expect("a ticket's read is known until it is finished");
        match read.state {
            ReadState::Done(Ok(())) => Ok(read.buf),
            ReadState::Done(Err(e)) => Err(e),
            ReadState::InFlight | ReadState::Abandoned => unreachable!("waited for above"),
        }
    }

    fn abandon(&mut self, id: u64) {
        let Some(read) = self.reads.get_mut(&id) else { return };
        match read.state {
            ReadState::InFlight => read.state = ReadState::Abandoned,
            _ => {
                self.reads.remove(&id);
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers this ring owns.
        while self.in_flight > 0 {
            self.complete_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, Arc::new(File::open(&path).unwrap()))
    }

    #[test]
    fn reads_started_together_each_get_their_bytes() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let (_dir, file) = file_of(&data);
        // More than the ring holds at once: starts wait for room.
        let ranges: Vec<(u64, usize)> = (0..3 * limits::RING_DEPTH as u64).map(|i| (i * 4096 + i, 4000)).collect();
        let tickets: Vec<Ticket> = ranges.iter().map(|&(at, len)| start(&file, at, vec![0; len])).collect();
        for (ticket, &(at, len)) in tickets.into_iter().zip(&ranges).rev() {
            assert_eq!(ticket.finish().unwrap(), &data[at as usize..][..len]);
        }
    }

    #[test]
    fn a_read_past_the_end_is_unexpected_eof_and_others_still_complete() {
        let (_dir, file) = file_of(&[5u8; 10_000]);
        let past = start(&file, 9_000, vec![0; 2_000]);
        let fine = start(&file, 0, vec![0; 100]);
        assert_eq!(past.finish().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(fine.finish().unwrap(), vec![5u8; 100]);
    }

    #[test]
    fn a_dropped_ticket_frees_its_read_and_an_empty_read_needs_no_kernel() {
        let (_dir, file) = file_of(&[1u8; 1 << 16]);
        drop(start(&file, 0, vec![0; 1 << 16]));
        assert_eq!(start(&file, 10, Vec::new()).finish().unwrap(), Vec::<u8>::new());
        // The abandoned read is gone once the kernel is done with it.
        let last = start(&file, 0, vec![0; 8]);
        assert_eq!(last.finish().unwrap(), vec![1u8; 8]);
        RING.with(|ring| {
            let mut ring = ring.borrow_mut();
            while ring.in_flight > 0 {
                ring.complete_one();
            }
            assert!(ring.reads.is_empty(), "{} reads left", ring.reads.len());
        });
    }
}
