//! What a command shows: a progress bar on a terminal, JSON Lines with `--json`, warnings.
//!
//! JSON events go to stdout, one object per line with a `type` field; progress and human
//! messages go to stderr. Fields may be added, never renamed.

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// How a command reports.
pub struct Reporter {
    json: bool,
    quiet: bool,
    progress: bool,
    bar: Option<ProgressBar>,
    files: Cell<u64>,
}

impl Reporter {
    /// `progress` asks for a bar; it is shown only when stderr is a terminal and not `--json`.
    pub fn new(json: bool, quiet: bool, progress: bool) -> Self {
        let progress = progress && !json && !quiet && std::io::stderr().is_terminal();
        Self { json, quiet, progress, bar: None, files: Cell::new(0) }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Starts a byte-counting bar; its length can be set later when a scan finishes.
    pub fn start_bar(&mut self, message: &'static str) -> Option<ProgressBar> {
        if !self.progress {
            return None;
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {prefix}",
            )
            .expect("template is valid"),
        );
        bar.set_message(message);
        self.bar = Some(bar.clone());
        Some(bar)
    }

    /// Counts bytes and, when `file_done`, a file.
    pub fn advance(&self, bytes: u64, files: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            if files > 0 {
                self.files.set(self.files.get() + files);
                bar.set_prefix(format!("{} files", self.files.get()));
            }
        }
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
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{value}");
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
