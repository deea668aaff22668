//! Source reads at a capped rate, and how long they take.
//!
//! Every core of a backup reads its source through one [`ReadThrottle`]: a token bucket
//! ([`TokenBucket`], pure) shared by the cores caps the bytes per second, and the time each
//! window of the source took to arrive is kept, so whoever steers the cap (`cbcr agent`) sees
//! a source host that is slow to answer. The cap comes from `--read-cap`, and may be changed
//! while the backup runs by lines on standard input (`--read-cap-stdin`, how an agent steers
//! the shards it runs). Without either, a read is a plain call.

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::events::{Cancel, Event, EventSink, Run};

/// The longest a capped read sleeps before it looks at the cap again.
const WAIT_SLICE: Duration = Duration::from_millis(100);
use crate::{fault, limits};

/// A token bucket with debt: a take of any size succeeds, and says how long the caller must
/// wait so that the bytes taken so far stay within `rate` per second plus `burst`. Time is an
/// argument, so the arithmetic is tested without clocks.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    /// Tokens now (bytes); negative while in debt.
    tokens: f64,
    at: Duration,
}

impl TokenBucket {
    /// A bucket of `rate` bytes per second (at least 1), full at `now`.
    pub fn new(rate: u64, now: Duration) -> Self {
        let rate = rate.max(1);
        Self { rate, tokens: Self::burst_of(rate), at: now }
    }

    /// One second of the rate: a read of a window at full speed after a pause is not delayed.
    fn burst_of(rate: u64) -> f64 {
        rate as f64
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// A new rate from `now` on: what was earned at the old rate is kept (up to the new burst),
    /// and so is a debt.
    pub fn set_rate(&mut self, rate: u64, now: Duration) {
        self.refill(now);
        self.rate = rate.max(1);
        self.tokens = self.tokens.min(Self::burst_of(self.rate));
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(Self::burst_of(self.rate));
        self.at = self.at.max(now);
    }

    /// Takes `bytes` at `now`: how long to wait before going on.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        self.owed(now)
    }

    /// How long until the debt is paid, at `now` and the current rate.
    pub fn owed(&mut self, now: Duration) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

/// The p99 of `samples` (microseconds), sorting them.
fn p99(samples: &mut [u32]) -> u32 {
    samples.sort_unstable();
    samples.get((samples.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0)
}

/// What the readers did since the last look.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReadWindow {
    /// Windows read, and the p99 of the time one took to arrive (throttle waits excluded).
    pub reads: u64,
    pub p99_us: u32,
    pub bytes: u64,
}

struct Inner {
    /// `None`: no cap in force.
    bucket: Option<TokenBucket>,
    /// Read times since the last look (microseconds); the oldest are kept when full.
    samples: Vec<u32>,
    reads: u64,
    bytes: u64,
}

/// The rate and latency of a backup's source reads, shared by its cores.
pub struct ReadThrottle {
    /// Off: no cap and nobody watching; reads are plain calls and nothing is measured.
    active: bool,
    /// A wait ends early when the command is stopped (its segment then ends unthrottled).
    cancel: Cancel,
    clock: Instant,
    inner: Mutex<Inner>,
    /// The cap in force, bytes per second (0: none), for reports.
    cap: AtomicU64,
}

impl ReadThrottle {
    /// No cap, nothing measured.
    pub fn off() -> Arc<Self> {
        Arc::new(Self::new(false, 0, Cancel::default()))
    }

    fn new(active: bool, cap: u64, cancel: Cancel) -> Self {
        let clock = Instant::now();
        let bucket = (cap > 0).then(|| TokenBucket::new(cap, Duration::ZERO));
        let inner = Inner { bucket, samples: Vec::with_capacity(limits::READ_SAMPLES), reads: 0, bytes: 0 };
        Self { active, cancel, clock, inner: Mutex::new(inner), cap: AtomicU64::new(cap) }
    }

    /// Caps reads at `cap` bytes per second (0: none). With `steered`, lines on standard input
    /// set a new cap (a size per second, `0` or `none` for none), and every `every` the reads'
    /// rate and latency go to `events` as [`Event::Reading`], for the agent steering the cap.
    pub fn start(cap: u64, steered: bool, run: &Run) -> Arc<Self> {
        let throttle = Arc::new(Self::new(cap > 0 || steered, cap, run.cancel.clone()));
        let (events, every) = (Arc::clone(&run.events), run.every);
        if steered {
            let weak = Arc::downgrade(&throttle);
            std::thread::Builder::new()
                .name("cbcr-read-cap".into())
                .spawn(move || follow_stdin(weak))
                .expect("threads can be spawned");
            let weak = Arc::downgrade(&throttle);
            std::thread::Builder::new()
                .name("cbcr-reading".into())
                .spawn(move || report(weak, events, every))
                .expect("threads can be spawned");
        }
        throttle
    }

    /// The cap in force, bytes per second (0: none).
    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    pub fn set_cap(&self, cap: u64) {
        let now = self.clock.elapsed();
        let mut inner = self.lock();
        inner.bucket = match inner.bucket.take() {
            _ if cap == 0 => None,
            Some(mut b) => {
                b.set_rate(cap, now);
                Some(b)
            }
            None => Some(TokenBucket::new(cap, now)),
        };
        self.cap.store(cap, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("no thread panics holding the throttle")
    }

    /// Reads one window of the source with `read` (which returns the bytes it produced):
    /// timed, counted, and followed by the wait the cap asks for.
    pub fn read(&self, read: impl FnOnce() -> usize) -> usize {
        if !self.active {
            return read();
        }
        let started = Instant::now();
        fault::slow_read();
        let n = read();
        let took = started.elapsed();
        let wait = {
            let mut inner = self.lock();
            if inner.samples.len() < limits::READ_SAMPLES {
                inner.samples.push(took.as_micros().min(u32::MAX as u128) as u32);
            }
            inner.reads += 1;
            inner.bytes += n as u64;
            let now = self.clock.elapsed();
            inner.bucket.as_mut().map_or(Duration::ZERO, |b| b.take(n as u64, now))
        };
        // The core has nothing to do but wait: its next window is the read being capped. The
        // wait is slept in slices, so a new cap (a pause lifted) or a stop ends it early.
        let mut wait = wait;
        while !wait.is_zero() && !self.cancel.is_cancelled() {
            std::thread::sleep(wait.min(WAIT_SLICE));
            let now = self.clock.elapsed();
            wait = self.lock().bucket.as_mut().map_or(Duration::ZERO, |b| b.owed(now));
        }
        n
    }

    /// Reads one window of a mapped source before it is chunked (one byte per page faults it
    /// in), so that its arrival is timed and capped like any other source's; off, nothing.
    pub fn fetch(&self, window: &[u8]) {
        if self.active {
            self.read(|| {
                for i in (0..window.len()).step_by(4096) {
                    std::hint::black_box(window[i]);
                }
                window.len()
            });
        }
    }

    /// What was read since the last call.
    pub fn take_window(&self) -> ReadWindow {
        let mut inner = self.lock();
        let p99_us = p99(&mut inner.samples);
        let window = ReadWindow { reads: inner.reads, p99_us, bytes: inner.bytes };
        inner.samples.clear();
        (inner.reads, inner.bytes) = (0, 0);
        window
    }
}

/// A cap line: a size per second (`50MiB`, `1000000`), or `0` / `none` for no cap.
pub fn parse_cap(line: &str) -> Option<u64> {
    let line = line.trim();
    if line.eq_ignore_ascii_case("none") {
        return Some(0);
    }
    crate::parse_size(line.strip_suffix("/s").unwrap_or(line)).ok()
}

fn follow_stdin(throttle: Weak<ReadThrottle>) {
    for line in std::io::stdin().lock().lines().map_while(|l| l.ok()) {
        let Some(throttle) = throttle.upgrade() else { return };
        match parse_cap(&line) {
            Some(cap) => throttle.set_cap(cap),
            None => tracing::warn!("read cap {line:?} on standard input: not a size per second; cap unchanged"),
        }
    }
    // End of input (the agent is gone): the last cap stays in force.
}

fn report(throttle: Weak<ReadThrottle>, events: Arc<dyn EventSink>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(throttle) = throttle.upgrade() else { return };
        let w = throttle.take_window();
        events.event(&Event::Reading {
            reads: w.reads,
            read_p99_ms: f64::from(w.p99_us) / 1000.0,
            bytes: w.bytes,
            interval_s: every.as_secs_f64(),
            cap_bps: throttle.cap(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_bucket_lets_one_second_through_then_makes_the_reader_wait() {
        let mut b = TokenBucket::new(100, Duration::ZERO);
        assert_eq!(b.take(100, Duration::ZERO), Duration::ZERO);
        // In debt by 50 bytes: half a second.
        assert_eq!(b.take(50, Duration::ZERO), Duration::from_millis(500));
        // The reader waited; a second later 100 more are earned, the debt paid.
        assert_eq!(b.take(50, S + Duration::from_millis(500)), Duration::ZERO);
        // A long pause earns one burst at most.
        assert_eq!(b.take(250, 100 * S), Duration::from_millis(1500));
    }

    #[test]
    fn over_time_a_bucket_holds_the_rate_whatever_the_read_size() {
        for size in [1u64, 7, 4096, 8 << 20] {
            let rate = 1 << 20;
            let mut b = TokenBucket::new(rate, Duration::ZERO);
            let (mut now, mut read) = (Duration::ZERO, 0u64);
            while read < 64 << 20 {
                now += b.take(size, now);
                read += size;
            }
            // 64 MiB at 1 MiB/s, less the first second's burst (and one read).
            let expected = (read - rate) as f64 / rate as f64;
            assert!((now.as_secs_f64() - expected).abs() < 1.0, "size {size}: {now:?} for {read}");
        }
    }

    #[test]
    fn a_new_rate_keeps_a_debt_and_trims_savings() {
        let mut b = TokenBucket::new(1000, Duration::ZERO);
        b.take(3000, Duration::ZERO);
        b.set_rate(100, Duration::ZERO);
        // 2000 bytes owed at 100 B/s, plus the 10 asked now.
        assert_eq!(b.take(10, Duration::ZERO), Duration::from_millis(20_100));
        let mut b = TokenBucket::new(1000, Duration::ZERO);
        b.set_rate(10, 5 * S);
        assert_eq!(b.take(20, 5 * S), S);
    }

    #[test]
    fn the_p99_of_a_hundred_samples_is_the_99th() {
        let mut s: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(p99(&mut s), 99);
        assert_eq!(p99(&mut [7]), 7);
        assert_eq!(p99(&mut []), 0);
    }

    #[test]
    fn cap_lines_are_sizes_per_second() {
        assert_eq!(parse_cap("50MiB\n"), Some(50 << 20));
        assert_eq!(parse_cap("50MiB/s"), Some(50 << 20));
        assert_eq!(parse_cap("1000"), Some(1000));
        assert_eq!(parse_cap("none"), Some(0));
        assert_eq!(parse_cap("fast"), None);
    }

    #[test]
    fn a_throttle_counts_reads_and_an_off_one_only_calls() {
        let t = ReadThrottle::new(true, 0, Cancel::default());
        assert_eq!(t.read(|| 4096), 4096);
        assert_eq!(t.read(|| 100), 100);
        let w = t.take_window();
        assert_eq!((w.reads, w.bytes), (2, 4196));
        assert_eq!(t.take_window().reads, 0);
        let off = ReadThrottle::off();
        off.read(|| 10);
        assert_eq!(off.take_window().reads, 0);
    }

    #[test]
    fn a_paused_read_goes_on_once_the_cap_is_lifted_or_the_command_stopped() {
        for lift in [true, false] {
            let t = Arc::new(ReadThrottle::new(true, 1, Cancel::default()));
            let waiting = Arc::clone(&t);
            let reader = std::thread::spawn(move || waiting.read(|| 4096));
            std::thread::sleep(Duration::from_millis(150));
            assert!(!reader.is_finished(), "a byte a second: 4096 bytes take an hour");
            if lift {
                t.set_cap(0);
            } else {
                t.cancel.cancel();
            }
            assert_eq!(reader.join().unwrap(), 4096);
        }
    }
}
