//! What a command shows: a progress bar on a terminal, JSON Lines with `--json`, warnings.
//!
//! JSON events go to stdout, one object per line with a `type` field; progress and human
//! messages go to stderr. Fields may be added, never renamed.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Counters of a running command, shared with the cores. Updated once per segment, pack or
/// file, never per chunk.
pub struct Progress {
    bytes: AtomicU64,
    files: AtomicU64,
    total: AtomicU64,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Counts `bytes` done and `files` finished.
    pub fn add(&self, bytes: u64, files: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let files = self.files.fetch_add(files, Ordering::Relaxed) + files;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            bar.set_prefix(format!("{files} files"));
        }
    }

    /// The bytes the command will have done at the end, when known.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    fn event(&self, phase: &str, started: Instant) -> Value {
        json!({
            "type": "progress",
            "phase": phase,
            "bytes_done": self.bytes.load(Ordering::Relaxed),
            "bytes_total": self.total.load(Ordering::Relaxed),
            "files_done": self.files.load(Ordering::Relaxed),
            "elapsed_s": started.elapsed().as_secs_f64(),
        })
    }
}

/// How a command reports.
pub struct Reporter {
    json: bool,
    quiet: bool,
    progress: bool,
    bar: Option<ProgressBar>,
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Reporter {
    /// `progress` asks for a bar; it is shown only when stderr is a terminal and not `--json`.
    pub fn new(json: bool, quiet: bool, progress: bool) -> Self {
        let progress = progress && !json && !quiet && std::io::stderr().is_terminal();
        Self { json, quiet, progress, bar: None, ticker: None }
    }

    /// Starts counting a phase: a bar on a terminal; with `--json`, a `progress` event every
    /// second until [`Reporter::finish`].
    pub fn start(&mut self, phase: &'static str) -> Arc<Progress> {
        let bar = self.progress.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {prefix}",
                )
                .expect("template is valid"),
            );
            bar.set_message(phase);
            bar
        });
        self.bar = bar.clone();
        let progress =
            Arc::new(Progress { bytes: AtomicU64::new(0), files: AtomicU64::new(0), total: AtomicU64::new(0), bar });
        if self.json {
            let (stop, stopped) = bounded::<()>(0);
            let counters = Arc::clone(&progress);
            let started = Instant::now();
            let thread = std::thread::spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1)) {
                    print_event(&counters.event(phase, started));
                }
            });
            self.ticker = Some((stop, thread));
        }
        progress
    }

    /// A problem with one item that did not stop the command.
    pub fn warn(&self, path: &Path, message: &str) {
        if self.json {
            self.event(json!({"type": "warning", "path": path.to_string_lossy(), "message": message}));
        } else if !self.quiet {
            self.line(&format!("warning: {}: {message}", path.display()));
        }
    }

    /// A human line on stderr, above the bar.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// A JSON event on stdout (only with `--json`).
    pub fn event(&self, value: Value) {
        if self.json {
            print_event(&value);
        }
    }

    /// Ends the phase: stops the progress events and clears the bar.
    pub fn finish(&mut self) {
        if let Some((stop, thread)) = self.ticker.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_event(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}
