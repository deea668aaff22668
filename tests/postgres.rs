//! Real PostgreSQL (Debian's `postgresql`, started by the test as the `postgres` user on a
//! private socket): pgbench data backed up, changed by a pgbench run, backed up again, restored,
//! and started; row counts and a checksum query must match.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cbcr_tests::*;
use datagen::pg::Postgres;

#[test]
fn pgbench_database_round_trips_through_full_and_incremental_backups() {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("sock");
    let pg = Postgres::find(&socket, 5400 + (std::process::id() % 500) as u16);
    if !prerequisite("root, setpriv and Debian's postgresql", pg.is_some()) {
        return;
    }
    let pg = pg.expect("checked above");
    let (data, repo, out) = (tmp.path().join("pgdata"), tmp.path().join("repo"), tmp.path().join("out"));
    let restored = out.join(data.strip_prefix("/").unwrap());
    let _guard = pg.stop_on_drop(vec![data.clone(), restored.clone()]);
    pg.init(&data).unwrap();
    pg.start(&data).unwrap();
    pg.pgbench(&["-i", "-q", "-s", "4"]).unwrap();
    pg.stop(&data).unwrap();

    // Cold backups: the server is stopped, so the files are consistent.
    let full = last_json(&ok(&["backup", "--init", "--repo", s(&repo), s(&data), "--json"]));
    pg.start(&data).unwrap();
    pg.pgbench(&["-t", "1500", "-c", "2"]).unwrap();
    let counts = "select count(*), sum(abalance) from pgbench_accounts; select count(*) from pgbench_history";
    let checksum = "select md5(string_agg(aid || ':' || abalance, ',' order by aid)) from pgbench_accounts";
    let (want_counts, want_checksum) = (pg.query(counts).unwrap(), pg.query(checksum).unwrap());
    assert!(want_counts.contains("400000"), "{want_counts}");
    pg.stop(&data).unwrap();
    let incr = last_json(&ok(&["backup", "--repo", s(&repo), s(&data), "--json"]));
    let (full_new, incr_new) = (full["bytes_new"].as_u64().unwrap(), incr["bytes_new"].as_u64().unwrap());
    // What really changed: relation files page by page (hint bits and visibility maps included),
    // every other changed file (WAL, commit log) whole.
    let first = tmp.path().join("first");
    let first_id = full["snapshot_id"].as_str().unwrap();
    ok(&["restore", &first_id[..12], "--repo", s(&repo), "--target", s(&first)]);
    let before = first.join(data.strip_prefix("/").unwrap());
    let relation = |p: &Path| {
        let rel = p.strip_prefix(&data).unwrap();
        rel.starts_with("base") || rel.starts_with("global")
    };
    let (pages, other) = changed_pages(&before, &data, 8192, &relation);
    let bound = pages * 16384 + other;
    assert!(
        incr_new <= bound,
        "the incremental stored {incr_new} new bytes; {pages} pages and {other} other bytes changed"
    );
    assert!(incr_new < full_new, "the incremental stored {incr_new} new bytes, the full {full_new}");

    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
    pg.start(&restored).unwrap();
    assert_eq!(pg.query(counts).unwrap(), want_counts, "row counts of the restored database");
    assert_eq!(pg.query(checksum).unwrap(), want_checksum, "checksum of the restored database");
    pg.stop(&restored).unwrap();
    eprintln!("pgbench: full {full_new} new bytes; incremental {incr_new} ({pages} changed pages, {other} other changed bytes)");
}
