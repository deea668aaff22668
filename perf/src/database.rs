//! What the real-database benchmarks share: one database backed up in several forms (as
//! users take its backups), each by cbcr and by restic: a full backup, the database changed,
//! an incremental; then throughput and repository growth side by side.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{dir_bytes, Peer};

/// One way of taking the database's backups.
pub(crate) struct Form {
    pub name: &'static str,
    /// What the tools back up: for the full backup, and for the incremental.
    pub inputs: [PathBuf; 2],
    /// The database cbcr is told the backups are of (`--db`).
    pub db: Option<&'static str>,
}

/// One tool's figures for one form.
pub(crate) struct Row {
    form: &'static str,
    tool: &'static str,
    input_bytes: u64,
    full_s: f64,
    full_size: u64,
    incr_s: f64,
    growth: u64,
}

const TOOLS: [Peer; 2] = [Peer::Cbcr, Peer::Restic];

/// The full backups of every form by every tool, each into a repository of its own under
/// `work/repos`.
pub(crate) fn fulls(cbcr: &Path, work: &Path, forms: &[Form]) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for form in forms {
        for tool in TOOLS {
            let repo_dir = work.join("repos").join(form.name);
            std::fs::create_dir_all(&repo_dir)?;
            tool.init(cbcr, &repo_dir)?;
            let full_s = tool.backup(cbcr, &repo_dir, &form.inputs[0], "a", form.db)?;
            let full_size = dir_bytes(&tool.repo(&repo_dir));
            eprintln!("{} {} full: {full_s:.2} s", form.name, tool.name());
            rows.push(Row {
                form: form.name,
                tool: tool.name(),
                input_bytes: dir_bytes(&form.inputs[0]),
                full_s,
                full_size,
                incr_s: 0.0,
                growth: 0,
            });
        }
    }
    Ok(rows)
}

/// The incrementals, once the database changed and the second inputs are there.
pub(crate) fn incrementals(cbcr: &Path, work: &Path, forms: &[Form], rows: &mut [Row]) -> Result<()> {
    for row in rows {
        let form = forms.iter().find(|f| f.name == row.form).expect("rows come from forms");
        let tool = TOOLS.into_iter().find(|t| t.name() == row.tool).expect("rows come from tools");
        let repo_dir = work.join("repos").join(form.name);
        row.incr_s = tool.backup(cbcr, &repo_dir, &form.inputs[1], "b", form.db)?;
        row.growth = dir_bytes(&tool.repo(&repo_dir)) - row.full_size;
        eprintln!("{} {} incremental: {:.2} s", row.form, row.tool, row.incr_s);
    }
    Ok(())
}

/// Prints the rows and, per form, cbcr against restic.
pub(crate) fn print(title: &str, forms: &[Form], rows: &[Row]) {
    println!("{title}");
    println!(
        "{:<6} {:<7} {:>12} {:>8} {:>9} {:>13} {:>8} {:>9} {:>13}",
        "form", "tool", "input bytes", "full s", "full MB/s", "full bytes", "incr s", "incr MB/s", "incr growth"
    );
    for r in rows {
        println!(
            "{:<6} {:<7} {:>12} {:>8.2} {:>9.0} {:>13} {:>8.2} {:>9.0} {:>13}",
            r.form,
            r.tool,
            r.input_bytes,
            r.full_s,
            r.input_bytes as f64 / r.full_s / 1e6,
            r.full_size,
            r.incr_s,
            r.input_bytes as f64 / r.incr_s / 1e6,
            r.growth
        );
    }
    for form in forms {
        let pick = |tool: &str| rows.iter().find(|r| r.form == form.name && r.tool == tool).expect("every pair ran");
        let (c, r) = (pick("cbcr"), pick("restic"));
        println!(
            "{}: cbcr vs restic: full {:.2}x faster, incremental {:.2}x faster, incremental growth {:.2}x smaller",
            form.name,
            r.full_s / c.full_s,
            r.incr_s / c.incr_s,
            r.growth as f64 / c.growth.max(1) as f64
        );
    }
}

/// A cold copy of `from` (a stopped server's data directory) at `to`, owners kept.
pub(crate) fn cold_copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().expect("a directory under the work directory"))?;
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    anyhow::ensure!(status.success(), "cp -a {} {}: {status}", from.display(), to.display());
    Ok(())
}
