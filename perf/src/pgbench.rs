//! `perf pgbench`: a real pgbench database backed up by cbcr and restic in one run, as a plain
//! data directory (backed up cold), as `pg_basebackup -Ft` tar files, and as cold copies into a
//! new directory per backup (`dated`, as users take them; cbcr with `--db`): full backup, a
//! pgbench run, incremental. Prints throughput and repository growth side by side.

use std::path::Path;

use anyhow::{Context, Result};
use datagen::pg::Postgres;

use crate::database::{self, cold_copy, Form};
use crate::ensure_peers;

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
    cold_copy(&data, &dated("a"))?;

    let mut rows = database::fulls(cbcr, &work, &forms)?;

    pg.start(&data)?;
    eprintln!("pgbench -t {transactions} -c 2...");
    pg.pgbench(&["-t", &transactions.to_string(), "-c", "2"])?;
    base_backup()?;
    pg.stop(&data)?;
    cold_copy(&data, &dated("b"))?;

    database::incrementals(cbcr, &work, &forms, &mut rows)?;
    drop(_guard);
    std::fs::remove_dir_all(&work)?;

    let title = format!("pgbench scale {scale}, {transactions} transactions x 2 clients between the backups");
    database::print(&title, &forms, &rows);
    Ok(())
}
