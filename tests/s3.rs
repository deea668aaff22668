//! Repositories in S3-compatible object storage: a real S3 server (`s3s-fs`) on 127.0.0.1 and
//! the real `cbcr` binary. Kill -9 points and bit flips in pack objects are in `faults.rs`, the
//! receiver as a gateway in front of a bucket in `quic.rs`.

use std::fs;
use std::process::Stdio;

use cbcr_tests::*;

const NO_REPOSITORY: i32 = 10;
const NETWORK: i32 = 15;

#[test]
fn a_tree_round_trips_through_s3_with_an_incremental_and_verify() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let repo = Target::s3(&server, "roundtrip", "team/db1");
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    repo.init_small();
    make_tree(&src, 21, 3 << 20);
    let first = last_json(&repo.ok(&["backup", s(&src), "--json", "--pack-size", "256KiB"]));
    assert!(first["bytes_new"].as_u64().unwrap() > 3 << 20, "{first}");
    assert!(repo.files().join("config").exists(), "objects under the prefix: {}", repo.files().display());

    // An incremental: one page of the database file changes; the rest is not stored again.
    let big = src.join("big.db");
    let mut bytes = fs::read(&big).unwrap();
    bytes[100_000] ^= 0xff;
    fs::write(&big, &bytes).unwrap();
    let second = last_json(&repo.ok(&["backup", s(&src), "--json", "--pack-size", "256KiB"]));
    assert_eq!(second["parent"], first["snapshot_id"]);
    assert!(second["bytes_stored"].as_u64().unwrap() < 256 << 10, "{second}");

    repo.ok(&["restore", "latest", "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    let listed = text(&repo.ok(&["ls", "latest"]).stdout);
    assert!(listed.contains("dir/sub/small.txt"), "{listed}");
    assert_eq!(text(&repo.ok(&["snapshots"]).stdout).lines().count(), 2);
    repo.ok(&["verify", "--read-data"]);
    // Every command removed its work directory when it finished (only running ones have one).
    let left: Vec<_> = fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("cbcr-s3-").map(str::to_owned))
        .filter(|rest| !std::path::Path::new("/proc").join(rest.split('-').next().unwrap_or_default()).exists())
        .collect();
    assert!(left.is_empty(), "work directories of finished commands: {left:?}");
}

#[test]
fn a_missing_prefix_is_no_repository_and_a_dead_endpoint_is_a_network_error() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 22, 100_000);
    let typo = Target::s3(&server, "typo", "no-such-prefix");
    let out = typo.cbcr(&["backup", s(&src)]);
    assert_eq!(out.status.code(), Some(NO_REPOSITORY), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("s3://typo/no-such-prefix"), "{}", text(&out.stderr));
    assert!(!typo.files().exists(), "nothing is created without --init");
    typo.ok(&["backup", "--init", s(&src)]);
    typo.ok(&["verify"]);

    // A server that is not there: the error names the store, exit 15.
    let mut cmd = server.command(&["snapshots", "--repo", &typo.url]);
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(NETWORK), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("object storage s3://typo/"), "{}", text(&out.stderr));
}

#[test]
fn several_clients_writing_one_bucket_at_once_all_commit_and_restore() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let repo = Target::s3(&server, "shared", "fleet");
    repo.init_small();
    // Four sources that share a common file, so the writers race to store the same chunks.
    let sources = sources_sharing_a_file(tmp.path(), 4, 30, 2 << 20);
    for round in 0..2 {
        let children: Vec<_> = sources
            .iter()
            .map(|src| {
                let mut cmd =
                    server.command(&["backup", "--repo", &repo.url, s(src), "--json", "--pack-size", "256KiB"]);
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", text(&out.stderr));
        }
    }
    assert_eq!(snapshot_count(repo.files()), 8, "every writer committed");
    // Every snapshot restores bit-exact, from the one listing.
    let listing = text(&repo.ok(&["snapshots", "--json"]).stdout);
    for line in listing.lines() {
        let snap: serde_json::Value = serde_json::from_str(line).unwrap();
        let (id, path) = (snap["id"].as_str().unwrap(), snap["paths"][0].as_str().unwrap());
        let out = tmp.path().join(format!("out-{id}"));
        repo.ok(&["restore", &id[..16], "--target", s(&out)]);
        assert_same_tree(std::path::Path::new(path), &out.join(path.trim_start_matches('/')));
    }
    repo.ok(&["verify", "--read-data"]);
    // The writers' index merges removed only runs each had read itself: what is left covers
    // every pack (verify above found no unindexed blob a snapshot needs).
    assert!(fs::read_dir(repo.files().join("index")).unwrap().count() >= 1);
}

/// A bucket with S3 Object Lock (default retention, for immutable backups) takes only PUTs that
/// carry an integrity checksum: with `AWS_CHECKSUM_ALGORITHM=sha256` every object cbcr writes,
/// single PUTs and multipart packs alike, carries one, and the server checks it.
#[test]
fn writes_carry_sha256_checksums_when_asked_as_object_lock_buckets_require() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let repo = Target::s3(&server, "locked", "db1");
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    make_tree(&src, 23, 24 << 20);
    let env = [("AWS_CHECKSUM_ALGORITHM", "sha256")];
    let run = |args: &[&str]| {
        let o = repo.cbcr_env(args, &env);
        assert!(o.status.success(), "cbcr {args:?}: {}", text(&o.stderr));
        o
    };
    run(&["init", "--segment-size", "8MiB"]);
    // 24 MiB packs: past the multipart part size, so parts carry checksums too.
    run(&["backup", s(&src), "--pack-size", "24MiB"]);
    run(&["restore", "latest", "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    run(&["verify", "--read-data"]);
    // The server keeps, beside each object, the checksum it verified on upload.
    let root = server.object_file("locked", "").parent().unwrap().to_owned();
    let infos: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".internal.json"))
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(infos.len() > 5, "objects written: {}", infos.len());
    for info in &infos {
        assert!(info.contains("checksum_sha256"), "an object uploaded without a checksum: {info}");
    }
}
