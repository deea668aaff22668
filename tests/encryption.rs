//! Encryption at rest: nothing a source holds is readable in the repository's objects, and
//! password slots open, rotate and refuse as documented.

use std::fs;
use std::process::{Command, Stdio};

use cbcr_tests::*;

const WRONG_PASSWORD: i32 = 16;
const USAGE: i32 = 2;
const INTEGRITY: i32 = 13;

/// `cbcr` with `args` and exactly this password in the environment (none with `None`).
fn with_password(password: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(cbcr_bin());
    cmd.args(args).env_remove("CBCR_PASSWORD").env_remove("CBCR_PASSWORD_FILE").stdin(Stdio::null());
    if let Some(p) = password {
        cmd.env("CBCR_PASSWORD", p);
    }
    cmd.output().unwrap()
}

#[test]
fn no_source_content_name_or_path_appears_in_a_local_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let src = marked_source(tmp.path());
    let (repo, plain, out) = (tmp.path().join("repo"), tmp.path().join("plain"), tmp.path().join("out"));
    ok(&["backup", "--init", "--repo", s(&repo), s(&src)]);
    assert_eq!(markers_in(&repo), Vec::<String>::new());
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
    // The check can fail: a plaintext repository shows every marker.
    let init = ok(&["init", "--insecure-no-encryption", "--repo", s(&plain)]);
    assert!(text(&init.stderr).contains("WARNING") && text(&init.stderr).contains("plaintext"));
    ok(&["backup", "--repo", s(&plain), s(&src)]);
    let found = markers_in(&plain);
    for marker in MARKERS {
        assert!(found.iter().any(|f| f.ends_with(marker)), "{marker} not found in the plaintext repository: {found:?}");
    }
}

#[test]
fn no_source_content_name_or_path_appears_in_a_bucket() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = marked_source(tmp.path());
    let url = format!("{}/repo", server.bucket("sealed"));
    server.ok(&["backup", "--init", "--repo", &url, s(&src)]);
    let bucket_dir = server.object_file("sealed", "");
    assert!(bucket_dir.join("repo/config").exists(), "objects are files of the server's root");
    assert_eq!(markers_in(&bucket_dir), Vec::<String>::new());
    server.ok(&["verify", "--read-data", "--repo", &url]);
}

#[test]
fn passwords_open_rotate_and_refuse_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    make_tree(&src, 3, 200_000);
    let pw_file = tmp.path().join("pw");
    fs::write(&pw_file, "one\nignored second line\n").unwrap();
    let init = with_password(None, &["init", "--repo", s(&repo), "--password-file", s(&pw_file)]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let backup = with_password(Some("one"), &["backup", "--repo", s(&repo), s(&src)]);
    assert!(backup.status.success(), "{}", text(&backup.stderr));

    let wrong = with_password(Some("two"), &["snapshots", "--repo", s(&repo)]);
    assert_eq!(wrong.status.code(), Some(WRONG_PASSWORD), "{}", text(&wrong.stderr));
    assert!(text(&wrong.stderr).contains("opens none of the repository's key slots"), "{}", text(&wrong.stderr));
    let none = with_password(None, &["snapshots", "--repo", s(&repo)]);
    assert_eq!(none.status.code(), Some(USAGE), "{}", text(&none.stderr));
    assert!(text(&none.stderr).contains("--password-file"), "{}", text(&none.stderr));

    // A second slot; then the first password replaced; then the original slot removed.
    let mut add = Command::new(cbcr_bin());
    add.args(["key", "add", "--repo", s(&repo)]).env("CBCR_PASSWORD", "one").env("CBCR_NEW_PASSWORD", "two");
    assert!(add.output().unwrap().status.success());
    let list = with_password(Some("two"), &["key", "list", "--repo", s(&repo), "--json"]);
    let slots: Vec<serde_json::Value> = text(&list.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["type"] == "key")
        .collect();
    assert_eq!(slots.len(), 2, "{}", text(&list.stdout));
    let original = slots.iter().find(|v| v["current"] == false).unwrap()["name"].as_str().unwrap().to_owned();
    let refused = with_password(Some("one"), &["key", "remove", &original, "--repo", s(&repo)]);
    assert_eq!(refused.status.code(), Some(USAGE), "the slot in use stays: {}", text(&refused.stderr));
    let mut passwd = Command::new(cbcr_bin());
    passwd.args(["key", "passwd", "--repo", s(&repo)]).env("CBCR_PASSWORD", "two").env("CBCR_NEW_PASSWORD", "three");
    assert!(passwd.output().unwrap().status.success());
    assert_eq!(with_password(Some("two"), &["snapshots", "--repo", s(&repo)]).status.code(), Some(WRONG_PASSWORD));
    let removed = with_password(Some("three"), &["key", "remove", &original, "--repo", s(&repo)]);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    assert_eq!(with_password(Some("one"), &["snapshots", "--repo", s(&repo)]).status.code(), Some(WRONG_PASSWORD));
    let out = tmp.path().join("out");
    let restore = with_password(Some("three"), &["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert!(restore.status.success(), "the new password alone opens it: {}", text(&restore.stderr));
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // A key command (a KMS or vault client) gives the secret on stdout; one that fails is named.
    let kms = with_password(None, &["snapshots", "--repo", s(&repo), "--key-command", "echo three"]);
    assert!(kms.status.success(), "{}", text(&kms.stderr));
    let broken = with_password(None, &["snapshots", "--repo", s(&repo), "--key-command", "exit 3"]);
    assert_eq!(broken.status.code(), Some(USAGE));
    assert!(text(&broken.stderr).contains("key command"), "{}", text(&broken.stderr));
}

#[test]
fn a_slot_of_another_repository_does_not_open_this_one_and_plaintext_has_no_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, plain) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("plain"));
    assert!(with_password(Some("pa"), &["init", "--repo", s(&a)]).status.success());
    assert!(with_password(Some("pb"), &["init", "--repo", s(&b)]).status.success());
    for slot in fs::read_dir(b.join("keys")).unwrap() {
        let slot = slot.unwrap();
        fs::copy(slot.path(), a.join("keys").join(slot.file_name())).unwrap();
    }
    let crossed = with_password(Some("pb"), &["snapshots", "--repo", s(&a)]);
    assert_eq!(crossed.status.code(), Some(INTEGRITY), "{}", text(&crossed.stderr));
    assert!(text(&crossed.stderr).contains("does not match the repository config"), "{}", text(&crossed.stderr));
    assert!(with_password(Some("pa"), &["snapshots", "--repo", s(&a)]).status.success());

    ok(&["init", "--insecure-no-encryption", "--repo", s(&plain)]);
    let list = cbcr(&["key", "list", "--repo", s(&plain)]);
    assert_eq!(list.status.code(), Some(USAGE));
    assert!(text(&list.stderr).contains("not encrypted"), "{}", text(&list.stderr));
}

#[test]
fn a_repository_of_the_format_before_encryption_stays_readable_and_writable_without_a_password() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    make_tree(&src, 5, 100_000);
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    // As a cbcr before encryption wrote it: config version 1, no `encryption` field.
    let config = fs::read_to_string(repo.join("config")).unwrap();
    let v1 = config.replace("\"version\": 2", "\"version\": 1").replace(",\n  \"encryption\": \"none\"", "");
    assert!(!v1.contains("encryption") && v1.contains("\"version\": 1"), "{v1}");
    fs::write(repo.join("config"), v1).unwrap();
    for args in [&["backup", "--repo", s(&repo), s(&src)][..], &["snapshots", "--repo", s(&repo)]] {
        let out = with_password(None, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    assert!(with_password(None, &["restore", "latest", "--repo", s(&repo), "--target", s(&out)]).status.success());
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
}
