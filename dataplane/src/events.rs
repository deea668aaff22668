//! What a running command tells whoever drives it, and how it is stopped: typed events through
//! an [`EventSink`] (the CLI renders them as a progress bar or JSON Lines, a daemon logs them or
//! serves them), and a [`Cancel`] flag another thread may raise.
//!
//! Counters are atomics updated once per segment, pack or file, never per chunk; per-core stage
//! histograms are copied to a [`StageBoard`] at most once per [`Run::every`] by the core that
//! owns them. A ticker thread turns both into events at that interval.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use serde::Serialize;

use crate::metrics::StageHistograms;
use crate::source::throttle::ReadThrottle;

/// One thing a command reports. Serialised with a `type` field (`progress`, `warning`,
/// `stages`, `phase_done`); fields may be added, never renamed.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The counters of the phase under way, every [`Run::every`].
    Progress { phase: &'static str, bytes_done: u64, bytes_total: u64, files_done: u64, elapsed_s: f64 },
    /// A problem with one item that did not stop the command.
    Warning { path: String, message: String },
    /// Latency of each pipeline stage so far, merged over the cores and per core.
    Stages { phase: &'static str, elapsed_s: f64, all: serde_json::Value, cores: Vec<serde_json::Value> },
    /// The phase ended (a terminal clears its bar).
    PhaseDone { phase: &'static str },
    /// A steered backup's source reads over the last interval (`backup --read-cap-stdin`):
    /// windows read, the p99 of the time one took to arrive, bytes, and the cap in force.
    Reading { reads: u64, read_p99_ms: f64, bytes: u64, interval_s: f64, cap_bps: u64 },
}

/// Where a command's events go. Called from any thread, at most a few times per interval.
pub trait EventSink: Send + Sync {
    fn event(&self, event: &Event);
}

/// A sink that drops everything (a receiver's verify for a client, tests).
pub struct Discard;

impl EventSink for Discard {
    fn event(&self, _: &Event) {}
}

/// Raised (by a signal handler, another thread, a daemon's API) to stop a command at the next
/// consistent point: a backup then commits nothing, and what it made durable is reused.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag itself, for a signal handler to set.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

/// How a command runs: where its events go, how often counters are reported, and its cancel
/// flag.
#[derive(Clone)]
pub struct Run {
    pub events: Arc<dyn EventSink>,
    pub every: Duration,
    pub cancel: Cancel,
    /// Every source read goes through it (a backup's rate cap).
    pub reads: Arc<ReadThrottle>,
}

impl Run {
    /// Events dropped, never cancelled.
    pub fn quiet() -> Self {
        Self {
            events: Arc::new(Discard),
            every: Duration::from_secs(1),
            cancel: Cancel::default(),
            reads: ReadThrottle::off(),
        }
    }

    pub fn warn(&self, path: &std::path::Path, message: &str) {
        self.events.event(&Event::Warning { path: path.to_string_lossy().into_owned(), message: message.into() });
    }

    /// Starts reporting a phase: its counters (and, for a backup, its cores' stage latencies)
    /// go to the sink every [`Run::every`] until [`Phase::finish`].
    pub fn phase(&self, phase: &'static str, board: Option<Arc<StageBoard>>) -> Phase {
        let progress = Arc::new(Progress::default());
        let (stop, stopped) = bounded::<()>(0);
        let (events, every, counters) = (Arc::clone(&self.events), self.every, Arc::clone(&progress));
        let started = Instant::now();
        let ticker = std::thread::Builder::new()
            .name("cbcr-events".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    events.event(&counters.event(phase, started));
                    if let Some(board) = &board {
                        events.event(&board.event(phase, started));
                    }
                }
            })
            .expect("threads can be spawned");
        Phase { phase, progress, ticker: Some((stop, ticker)), events: Arc::clone(&self.events) }
    }
}

/// Counters of a running phase, shared with the cores.
#[derive(Default)]
pub struct Progress {
    bytes: AtomicU64,
    files: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Counts `bytes` done and `files` finished.
    pub fn add(&self, bytes: u64, files: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.files.fetch_add(files, Ordering::Relaxed);
    }

    /// The bytes the phase will have done at the end, when known.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    fn event(&self, phase: &'static str, started: Instant) -> Event {
        Event::Progress {
            phase,
            bytes_done: self.bytes.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
            files_done: self.files.load(Ordering::Relaxed),
            elapsed_s: started.elapsed().as_secs_f64(),
        }
    }
}

/// A phase being reported; [`Phase::finish`] (or dropping it) stops the ticker.
pub struct Phase {
    phase: &'static str,
    pub progress: Arc<Progress>,
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
    events: Arc<dyn EventSink>,
}

impl Phase {
    pub fn finish(&mut self) {
        if let Some((stop, thread)) = self.ticker.take() {
            drop(stop);
            let _ = thread.join();
            self.events.event(&Event::PhaseDone { phase: self.phase });
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The latest copy of each core's stage histograms, readable while the cores run.
pub struct StageBoard {
    cores: Vec<Mutex<StageHistograms>>,
    every: Duration,
}

impl StageBoard {
    pub fn new(cores: usize, every: Duration) -> Self {
        Self { cores: (0..cores).map(|_| Mutex::default()).collect(), every }
    }

    /// A core's way to publish: cheap to call after every unit of work.
    pub fn publisher(self: &Arc<Self>, core: usize) -> StagePublisher {
        StagePublisher { board: Arc::clone(self), core, last: Instant::now() }
    }

    fn event(&self, phase: &'static str, started: Instant) -> Event {
        let mut all = StageHistograms::default();
        let cores = self
            .cores
            .iter()
            .map(|c| {
                let c = c.lock().expect("no core panics while publishing");
                all.merge(&c);
                c.to_json()
            })
            .collect();
        Event::Stages { phase, elapsed_s: started.elapsed().as_secs_f64(), all: all.to_json(), cores }
    }
}

/// One core's handle on the [`StageBoard`].
pub struct StagePublisher {
    board: Arc<StageBoard>,
    core: usize,
    last: Instant,
}

impl StagePublisher {
    /// Copies `stages` to the board when the last copy is older than the interval.
    pub fn maybe_publish(&mut self, stages: &StageHistograms) {
        if self.last.elapsed() >= self.board.every {
            self.publish(stages);
        }
    }

    pub fn publish(&mut self, stages: &StageHistograms) {
        if let Some(slot) = self.board.cores.get(self.core) {
            slot.lock().expect("no core panics while publishing").clone_from(stages);
        }
        self.last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Stage;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Event>>);

    impl EventSink for Collect {
        fn event(&self, event: &Event) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    #[test]
    fn counters_and_stage_latencies_are_reported_while_a_phase_runs() {
        let sink = Arc::new(Collect::default());
        let run =
            Run { events: Arc::clone(&sink) as Arc<dyn EventSink>, every: Duration::from_millis(5), ..Run::quiet() };
        let board = Arc::new(StageBoard::new(2, run.every));
        let mut phase = run.phase("backup", Some(Arc::clone(&board)));
        phase.progress.set_total(100);
        let mut core = board.publisher(1);
        let mut stages = StageHistograms::default();
        for _ in 0..40 {
            stages.record(Stage::Hash, Duration::from_micros(3));
            core.maybe_publish(&stages);
            phase.progress.add(2, 0);
            std::thread::sleep(Duration::from_millis(1));
        }
        run.warn(std::path::Path::new("/x"), "left out");
        phase.finish();
        let events = sink.0.lock().unwrap();
        let progress: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Progress { bytes_done, bytes_total: 100, .. } => Some(*bytes_done),
                _ => None,
            })
            .collect();
        assert!(progress.len() >= 2 && progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        let hashed = events.iter().rev().find_map(|e| match e {
            Event::Stages { all, cores, .. } => {
                Some((all["hash"]["count"].as_u64()?, cores[0]["hash"]["count"].as_u64()?))
            }
            _ => None,
        });
        let (all, core0) = hashed.expect("stage events while the phase ran");
        assert!(all > 0 && core0 == 0, "core 1 published {all} hashes, core 0 none");
        assert!(matches!(events.last(), Some(Event::PhaseDone { phase: "backup" })));
        assert!(events.iter().any(|e| matches!(e, Event::Warning { message, .. } if message == "left out")));
        let json = serde_json::to_value(&events[0]).unwrap();
        assert!(json["type"] == "progress" || json["type"] == "stages", "{json}");
    }

    #[test]
    fn cancel_is_seen_by_every_clone() {
        let cancel = Cancel::default();
        let seen = cancel.clone();
        assert!(!seen.is_cancelled());
        std::thread::spawn(move || cancel.cancel()).join().unwrap();
        assert!(seen.is_cancelled());
    }
}
