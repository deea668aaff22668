//! `perf mariadb`: a real MariaDB database loaded and changed by sysbench, backed up by cbcr
//! and restic in one run: as a cold data directory at one path (`plain`), and as cold copies
//! into a new directory per backup (`dated`, as users take them; cbcr with `--db`). InnoDB's
//! tablespaces are what `auto` must find.

use std::path::Path;

use anyhow::{Context, Result};
use datagen::mariadb::MariaDb;

use crate::database::{self, cold_copy, Form};
use crate::ensure_peers;

pub(crate) fn mariadb(cbcr: &Path, out: &Path, tables: u32, table_size: u32, events: u32) -> Result<()> {
    ensure_peers()?;
    let work = std::fs::canonicalize(out)?.join("mariadb");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The mysql user reaches its directories through this one.
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut maria = MariaDb::find(&work.join("run")).context(
        "needs root, setpriv and Debian's mariadb-server and sysbench (apt-get install mariadb-server sysbench)",
    )?;
    let data = work.join("datadir");
    let dated = |day: &str| work.join("dated").join(day);
    let forms = [
        Form { name: "plain", inputs: [data.clone(), data.clone()], db: None },
        Form { name: "dated", inputs: [dated("a"), dated("b")], db: Some("sbtest") },
    ];
    let sizes = [format!("--tables={tables}"), format!("--table-size={table_size}")];
    let sizes: Vec<&str> = sizes.iter().map(String::as_str).collect();

    maria.init(&data)?;
    maria.start(&data)?;
    maria.query("create database sbtest")?;
    eprintln!("sysbench prepare, {tables} tables of {table_size} rows...");
    maria.sysbench("oltp_read_write", &[&sizes[..], &["--threads=2", "prepare"]].concat())?;
    maria.stop()?;
    cold_copy(&data, &dated("a"))?;
    let mut rows = database::fulls(cbcr, &work, &forms)?;

    maria.start(&data)?;
    eprintln!("sysbench oltp_write_only, {events} events...");
    let events_arg = format!("--events={events}");
    maria.sysbench("oltp_write_only", &[&sizes[..], &[&events_arg, "--threads=2", "--time=0", "run"]].concat())?;
    maria.stop()?;
    cold_copy(&data, &dated("b"))?;
    database::incrementals(cbcr, &work, &forms, &mut rows)?;
    drop(maria);
    std::fs::remove_dir_all(&work)?;
    let title = format!(
        "mariadb sysbench, {tables} tables of {table_size} rows, {events} oltp_write_only events between the backups"
    );
    database::print(&title, &forms, &rows);
    Ok(())
}
