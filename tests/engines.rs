//! Database engines `--chunking auto` recognises by name and content, on files the real
//! engines wrote: MariaDB's InnoDB tablespaces (Debian's `mariadb-server`, started by the test
//! as the `mysql` user on a private socket, loaded and changed by sysbench) and an SQLite
//! database (Debian's `sqlite3`). Each is backed up, changed, backed up again, restored, and
//! checked by the engine itself.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cbcr_tests::*;
use datagen::mariadb::MariaDb;

/// A cold copy of `from` at `to`, owners and times kept (`cp -a`).
fn cold_copy(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

fn innodb_file(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    name.ends_with(".ibd") || name.starts_with("ibdata")
}

#[test]
fn mariadb_tablespaces_are_detected_changed_pages_stored_and_the_restored_server_checksums_match() {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let maria = MariaDb::find(&tmp.path().join("run"));
    if !prerequisite("root, setpriv, Debian's mariadb-server and sysbench", maria.is_some()) {
        return;
    }
    let mut maria = maria.expect("checked above");
    let live = tmp.path().join("live");
    maria.init(&live).unwrap();
    maria.start(&live).unwrap();
    maria.query("create database sbtest").unwrap();
    let tables = ["--tables=2", "--table-size=100000"];
    maria.sysbench("oltp_read_write", &[&tables[..], &["prepare"]].concat()).unwrap();
    maria.stop().unwrap();

    // A cold copy into a new directory per backup, as users take them. What detection is worth
    // is measured on the tables' own tablespaces (`sbtest/`), in two more repositories: the
    // default chunking, and content-defined (what `auto` gave InnoDB before it knew it).
    let (day1, day2) = (tmp.path().join("backups/2026-12-01"), tmp.path().join("backups/2026-12-02"));
    let repos = ["repo", "tables-auto", "tables-cdc"].map(|r| tmp.path().join(r));
    cold_copy(&live, &day1);
    let backup = |repo: &Path, dir: &Path, extra: &[&str]| {
        let args = [&["backup", "--repo", s(repo), "--db", "maria1", s(dir), "--json"], extra].concat();
        last_json(&ok(&args))
    };
    let backups = |day: &Path, first: &[&str]| {
        let whole = backup(&repos[0], day, first);
        let tables = backup(&repos[1], &day.join("sbtest"), first);
        let cdc = backup(&repos[2], &day.join("sbtest"), &[first, &["--chunking", "cdc"]].concat());
        [whole, tables, cdc]
    };
    let [full, ..] = backups(&day1, &["--init"]);
    let innodb = full["page_files"]["innodb"].as_u64().unwrap_or(0);
    assert!(innodb >= 3, "auto found {innodb} InnoDB tablespaces, not sbtest1, sbtest2 and ibdata1: {full}");

    maria.start(&live).unwrap();
    let run = [&tables[..], &["--events=50", "--threads=2", "run"]].concat();
    maria.sysbench("oltp_write_only", &run).unwrap();
    let checksum = "checksum table sbtest.sbtest1, sbtest.sbtest2";
    let want = maria.query(checksum).unwrap();
    maria.stop().unwrap();
    cold_copy(&live, &day2);
    let [incr, tables, cdc] = backups(&day2, &[]);
    assert_eq!(
        incr["parent"], full["snapshot_id"],
        "the parent is the database's last snapshot, from another directory"
    );

    let Changed { pages, other, .. } = changed_pages(&day1, &day2, 16384, &innodb_file);
    let incr_new = incr["bytes_new"].as_u64().unwrap();
    // What the repository grew by: a delta of a page where a few rows changed compresses to
    // little, a content-defined chunk around them does not.
    let stored = |summary: &serde_json::Value| summary["bytes_stored"].as_u64().unwrap();
    let (tables_stored, cdc_stored) = (stored(&tables), stored(&cdc));
    // A changed 16 KiB page costs at most itself once more (a delta's page map and a block of
    // a few pages stored whole); the redo log and the rest are counted whole.
    let bound = pages * 2 * 16384 + other;
    assert!(
        incr_new <= bound,
        "the incremental stored {incr_new} new bytes; {pages} pages and {other} other bytes changed"
    );
    assert!(
        tables_stored * 4 < cdc_stored,
        "the tables' incremental grew the repository by {tables_stored} bytes with page chunks, by {cdc_stored} \
         with content-defined chunks: detection is not paying"
    );

    let out = tmp.path().join("out");
    ok(&["restore", "latest", "--repo", s(&repos[0]), "--db", "maria1", "--target", s(&out)]);
    ok(&["verify", "--repo", s(&repos[0]), "--read-data"]);
    let restored = out.join(day2.strip_prefix("/").unwrap());
    let status = Command::new("chown").args(["-R", "mysql:mysql"]).arg(&restored).status().unwrap();
    assert!(status.success());
    maria.start(&restored).unwrap();
    assert_eq!(maria.query(checksum).unwrap(), want, "CHECKSUM TABLE of the restored server");
    maria.stop().unwrap();
    eprintln!(
        "mariadb: {innodb} tablespaces; incremental {incr_new} new bytes ({pages} changed 16 KiB pages, {other} other \
         changed bytes); the tables alone grew the repository {tables_stored} bytes, content-defined {cdc_stored}"
    );
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3 {sql}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn an_sqlite_database_is_detected_by_its_header_and_its_changed_pages_stored() {
    if !prerequisite("Debian's sqlite3", Command::new("sqlite3").arg("-version").output().is_ok()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("app"), tmp.path().join("repo"), tmp.path().join("out"));
    fs::create_dir(&src).unwrap();
    // Not named like a database: SQLite is found by content.
    let db = src.join("state");
    sqlite(
        &db,
        "pragma page_size = 4096; create table t(a integer primary key, b blob); \
         with recursive c(x) as (select 1 union all select x + 1 from c where x < 30000) \
         insert into t select x, randomblob(120) from c;",
    );
    init_small(&repo);
    let full = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert_eq!(full["page_files"]["sqlite"], 1, "{full}");
    let before = tmp.path().join("before");
    cold_copy(&src, &before);
    sqlite(&db, "update t set b = randomblob(120) where a % 97 = 0;");
    let incr = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let pages = changed_pages(&before, &src, 4096, &|_| true).pages;
    let incr_new = incr["bytes_new"].as_u64().unwrap();
    assert!(
        pages > 0 && incr_new <= pages * 2 * 4096,
        "the incremental stored {incr_new} new bytes; {pages} 4 KiB pages changed"
    );
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = out.join(db.strip_prefix("/").unwrap());
    assert_eq!(fs::read(&restored).unwrap(), fs::read(&db).unwrap());
    assert_eq!(sqlite(&restored, "pragma integrity_check;"), "ok");
    eprintln!("sqlite: incremental {incr_new} new bytes for {pages} changed 4 KiB pages");
}
