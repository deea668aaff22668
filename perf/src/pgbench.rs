//! `perf pgbench`: a real pgbench database backed up by cbcr and restic in one run, as a plain
//! data directory (backed up cold), as `pg_basebackup -Ft` tar files, and as cold copies into a
//! new directory per backup (`dated`, as users take them; cbcr with `--db`): full backup, a
//! pgbench run, incremental. Prints throughput and repository growth side by side.

use std::path::Path;

use anyhow::{Context, Result};
use datagen::pg::Postgres;

use crate::{dir_bytes, ensure_peers, Peer};

struct Form {
    name: &'static str,
    /// What the tools back up: for the full backup, and for the incremental.
    inputs: [std::path::PathBuf; 2],
    /// The database cbcr is told the backups are of (`--db`).
    db: Option<&'static str>,
}

struct Row {
    form: &'static str,
    tool: &'static str,
    input_bytes: u64,
    full_s: f64,
    full_size: u64,
    incr_s: f64,
    growth: u64,
}

pub(crate) fn pgbench(cbcr: &Path, out: &Path, scale: u32, transactions: u32) -> Result<()> {
    ensure_peers()?;
    let work = std::fs::canonicalize(out)?.join("pgbench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The postgres user reaches its directories through this one.
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let pg = Postgres::find(&work.join("sock"), 5499)
        .context("needs root, setpriv and Debian's postgresql (apt-get install postgresql)")?;
    let data = work.join("pgdata");
    let _guard = pg.stop_on_drop(vec![data.clone()]);
    let tar = work.join("tar");
    let dated = |day: &str| work.join("dated").join(day);
    let forms = [
        Form { name: "plain", inputs: [data.clone(), data.clone()], db: None },
        Form { name: "tar", inputs: [tar.clone(), tar.clone()], db: None },
        Form { name: "dated", inputs: [dated("a"), dated("b")], db: Some("pgbench") },
    ];
    // A cold copy of the data directory into a directory of its own.
    let copy_to = |dir: &Path| -> Result<()> {
        std::fs::create_dir_all(dir.parent().expect("under work"))?;
        let status = std::process::Command::new("cp").arg("-a").arg(&data).arg(dir).status()?;
        anyhow::ensure!(status.success(), "cp -a {} {}: {status}", data.display(), dir.display());
        Ok(())
    };
    let tools = [Peer::Cbcr, Peer::Restic];

    pg.init(&data)?;
    pg.start(&data)?;
    eprintln!("pgbench -i -s {scale}...");
    pg.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    let base_backup = || -> Result<()> {
        let _ = std::fs::remove_dir_all(&tar);
        std::fs::create_dir_all(&tar)?;
        std::process::Command::new("chown").arg("postgres:postgres").arg(&tar).status()?;
        Ok(pg.base_backup_tar(&tar)?)
    };
    base_backup()?;
    pg.stop(&data)?;
    copy_to(&dated("a"))?;

    let mut rows = vec![];
    for form in &forms {
        for tool in tools {
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

    pg.start(&data)?;
    eprintln!("pgbench -t {transactions} -c 2...");
    pg.pgbench(&["-t", &transactions.to_string(), "-c", "2"])?;
    base_backup()?;
    pg.stop(&data)?;
    copy_to(&dated("b"))?;

    for row in &mut rows {
        let form = forms.iter().find(|f| f.name == row.form).expect("rows come from forms");
        let tool = tools.into_iter().find(|t| t.name() == row.tool).expect("rows come from tools");
        let repo_dir = work.join("repos").join(form.name);
        row.incr_s = tool.backup(cbcr, &repo_dir, &form.inputs[1], "b", form.db)?;
        row.growth = dir_bytes(&tool.repo(&repo_dir)) - row.full_size;
        eprintln!("{} {} incremental: {:.2} s", row.form, row.tool, row.incr_s);
    }
    drop(_guard);
    std::fs::remove_dir_all(&work)?;

    println!("pgbench scale {scale}, {transactions} transactions x 2 clients between the backups");
    println!(
        "{:<6} {:<7} {:>12} {:>8} {:>9} {:>13} {:>8} {:>9} {:>13}",
        "form", "tool", "input bytes", "full s", "full MB/s", "full bytes", "incr s", "incr MB/s", "incr growth"
    );
    for r in &rows {
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
    for form in &forms {
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
    Ok(())
}
