//! `cbcr-control db` with the real binary and a real store file: a registry of 10,000
//! databases imported, listed and imported again; bad files and conflicts change nothing.

use std::path::Path;
use std::process::{Command, Output};

fn control(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbcr-control"))
        .arg("db")
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("CBCR_CONTROL_STORE")
        .output()
        .unwrap()
}

fn ok(store: &Path, args: &[&str]) -> String {
    let out = control(store, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(store: &Path, args: &[&str], code: i32, says: &str) {
    let out = control(store, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?}: expected {says:?} in {err}");
}

#[test]
fn ten_thousand_databases_import_list_and_import_again_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, file) = (dir.path().join("state.redb"), dir.path().join("fleet.toml"));
    let classes = ["critical", "high", "normal", "low"];
    let text: String = (0..10_000)
        .map(|i| {
            format!(
                "[[db]]\nname = \"pg{i:05}\"\nsource = \"/srv/pg/{i}\"\nhost = \"host{}\"\npriority = \"{}\"\nrpo = \"{}h\"\nsize_hint = \"{}GiB\"\n\n",
                i % 500,
                classes[i % 4],
                1 + i % 24,
                1 + i % 900
            )
        })
        .collect();
    std::fs::write(&file, &text).unwrap();
    assert_eq!(ok(&store, &["import", file.to_str().unwrap()]).trim(), "10000 added, 0 replaced, 0 unchanged");
    let listed = ok(&store, &["ls", "--json"]);
    assert_eq!(listed.lines().count(), 10_000);
    assert!(listed.lines().next().unwrap().contains("\"name\":\"pg00000\""), "{}", &listed[..200]);
    // What `ls --json` prints imports as it is: nothing changes.
    let lines = dir.path().join("fleet.jsonl");
    std::fs::write(&lines, &listed).unwrap();
    assert_eq!(ok(&store, &["import", lines.to_str().unwrap()]).trim(), "0 added, 0 replaced, 10000 unchanged");

    // One bad entry deep in the file: its line is named and nothing is imported.
    let bad = dir.path().join("bad.toml");
    let broken =
        text.replace("name = \"pg07777\"\nsource = \"/srv/pg/7777\"", "name = \"pg07777\"\nsource = \"srv/pg\"");
    std::fs::write(&bad, broken.replace("pg0", "qg0")).unwrap();
    let line = broken[..broken.find("name = \"pg07777\"").unwrap()].lines().count();
    fails(&store, &["import", bad.to_str().unwrap()], 2, &format!("bad.toml:{line}: database \"qg07777\": source"));
    assert_eq!(ok(&store, &["ls", "--json"]).lines().count(), 10_000);

    // A conflicting registration changes nothing unless --replace.
    let add = ["add", "pg00001", "--source", "/srv/pg/1", "--host", "host1", "--rpo", "30m"];
    fails(&store, &add, 4, "registered with other settings");
    let mut replace = add.to_vec();
    replace.push("--replace");
    assert_eq!(ok(&store, &replace).trim(), "0 added, 1 replaced, 0 unchanged");
    assert!(ok(&store, &["ls"]).contains("pg00001  normal  host1  rpo 30m"));
    fails(&store, &["rm", "pg99999"], 5, "not registered");
    assert_eq!(ok(&store, &["rm", "pg00001"]).trim(), "removed pg00001");
    assert_eq!(ok(&store, &["ls"]).lines().count(), 9_999);
}
