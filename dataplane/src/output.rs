//! What the `cbcr` binary shows: a progress bar on a terminal, JSON Lines with `--json`,
//! warnings; the library's events rendered for people or scripts.
//!
//! JSON events go to stdout, one object per line with a `type` field; progress and human
//! messages go to stderr. Fields may be added, never renamed.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use dataplane::events::{Event, EventSink};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// How a command reports.
pub(crate) struct Reporter {
    json: bool,
    quiet: bool,
    progress: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Reporter {
    /// `progress` asks for a bar; it is shown only when stderr is a terminal and not `--json`.
    pub(crate) fn new(json: bool, quiet: bool, progress: bool) -> Self {
        let progress = progress && !json && !quiet && std::io::stderr().is_terminal();
        Self { json, quiet, progress, bar: Mutex::new(None) }
    }

    /// How often the library should report counters: smoothly for a bar, once a second for
    /// JSON.
    pub(crate) fn every(&self) -> Duration {
        Duration::from_millis(if self.progress { 100 } else { 1000 })
    }

    fn bar(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().expect("no thread panics while drawing")
    }

    /// A human line on stderr, above the bar.
    pub(crate) fn line(&self, text: &str) {
        match &*self.bar() {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// A JSON event on stdout (only with `--json`).
    pub(crate) fn json(&self, value: Value) {
        if self.json {
            print_json(&value);
        }
    }

    /// Clears the bar (before an error message).
    pub(crate) fn finish(&self) {
        if let Some(bar) = self.bar().take() {
            bar.finish_and_clear();
        }
    }
}

impl EventSink for Reporter {
    fn event(&self, event: &Event) {
        match event {
            Event::Progress { phase, bytes_done, bytes_total, files_done, .. } if self.progress => {
                let mut bar = self.bar();
                let bar = bar.get_or_insert_with(|| new_bar(phase));
                bar.set_length(*bytes_total);
                bar.set_position(*bytes_done);
                bar.set_prefix(format!("{files_done} files"));
            }
            Event::Warning { path, message } if !self.json && !self.quiet => {
                self.line(&format!("warning: {path}: {message}"));
            }
            Event::PhaseDone { .. } => self.finish(),
            other if self.json => print_json(&serde_json::to_value(other).expect("events serialise")),
            _ => {}
        }
    }
}

fn new_bar(phase: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {prefix}",
        )
        .expect("template is valid"),
    );
    bar.set_message(phase.to_owned());
    bar
}

fn print_json(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}
