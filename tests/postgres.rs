//! Real PostgreSQL (Debian's `postgresql`, started by the test as the `postgres` user on a
//! private socket): pgbench data copied cold into a new directory per backup (as users take
//! them), changed by a pgbench run, backed up again with `--db`, restored, and started; row
//! counts and a checksum query must match.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cbcr_tests::*;
use datagen::pg::Postgres;

/// A cold copy of `from` at `to`, owners, modes and times kept (`cp -a`).
fn cold_copy(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

#[test]
fn pgbench_database_copied_into_a_new_directory_per_backup_stores_its_changed_pages_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("sock");
    let pg = Postgres::find(&socket, 5400 + (std::process::id() % 500) as u16);
    if !prerequisite("root, setpriv and Debian's postgresql", pg.is_some()) {
        return;
    }
    let pg = pg.expect("checked above");
    let (data, repo, out) = (tmp.path().join("pgdata"), tmp.path().join("repo"), tmp.path().join("out"));
    let (day1, day2) = (tmp.path().join("backups/2026-12-01"), tmp.path().join("backups/2026-12-02"));
    let restored = out.join(day2.strip_prefix("/").unwrap());
    let _guard = pg.stop_on_drop(vec![data.clone(), restored.clone()]);
    pg.init(&data).unwrap();
    pg.start(&data).unwrap();
    pg.pgbench(&["-i", "-q", "-s", "4"]).unwrap();
    pg.stop(&data).unwrap();

    // Cold copies: the server is stopped, so the files are consistent.
    cold_copy(&data, &day1);
    let backup = |dir: &Path, extra: &[&str]| {
        last_json(&ok(&[&["backup", "--repo", s(&repo), "--db", "pg1", s(dir), "--json"], extra].concat()))
    };
    let full = backup(&day1, &["--init"]);
    assert!(full["page_files"]["postgresql"].as_u64().unwrap_or(0) > 10, "{full}");
    pg.start(&data).unwrap();
    pg.pgbench(&["-t", "1500", "-c", "2"]).unwrap();
    let counts = "select count(*), sum(abalance) from pgbench_accounts; select count(*) from pgbench_history";
    let checksum = "select md5(string_agg(aid || ':' || abalance, ',' order by aid)) from pgbench_accounts";
    let (want_counts, want_checksum) = (pg.query(counts).unwrap(), pg.query(checksum).unwrap());
    assert!(want_counts.contains("400000"), "{want_counts}");
    pg.stop(&data).unwrap();
    cold_copy(&data, &day2);
    let incr = backup(&day2, &[]);
    assert_eq!(
        incr["parent"], full["snapshot_id"],
        "the parent is the database's last snapshot, from another directory"
    );
    let (full_new, incr_new) = (full["bytes_new"].as_u64().unwrap(), incr["bytes_new"].as_u64().unwrap());
    let grew = incr["bytes_stored"].as_u64().unwrap();
    // What really changed: relation files page by page (hint bits and visibility maps included),
    // every other changed file (WAL, commit log) whole.
    let relation = |p: &Path| {
        let rel = p.strip_prefix(&day2).unwrap();
        rel.starts_with("base") || rel.starts_with("global")
    };
    let changed = changed_pages(&day1, &day2, 8192, &relation);
    let bound = changed.pages * 16384 + changed.other;
    assert!(
        incr_new <= bound,
        "the incremental stored {incr_new} new bytes; {} pages and {} other bytes changed",
        changed.pages,
        changed.other
    );
    assert!(incr_new < full_new, "the incremental stored {incr_new} new bytes, the full {full_new}");
    assert!(
        grew * 2 <= changed.compressed * 3,
        "the incremental grew the repository by {grew} bytes, more than 1.5x the {} that the changed pages \
         and files compressed on their own cost",
        changed.compressed
    );

    ok(&["restore", "latest", "--db", "pg1", "--repo", s(&repo), "--target", s(&out)]);
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
    pg.start(&restored).unwrap();
    assert_eq!(pg.query(counts).unwrap(), want_counts, "row counts of the restored database");
    assert_eq!(pg.query(checksum).unwrap(), want_checksum, "checksum of the restored database");
    pg.stop(&restored).unwrap();
    eprintln!(
        "pgbench: full {full_new} new bytes; incremental {incr_new} new, {grew} stored ({} changed pages, {} other \
         changed bytes, {} compressed)",
        changed.pages, changed.other, changed.compressed
    );
}
