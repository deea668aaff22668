//! Real faults against the real binary: kill -9 at seeded points of a backup, flipped bits in
//! packs and index runs, a full disk, a locked repository, bad paths and bad repositories.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cbcr_tests::*;
use rand::{Rng, RngCore, SeedableRng};

/// Exit codes from the README table.
const PARTIAL: i32 = 3;
const NO_REPOSITORY: i32 = 10;
const LOCKED: i32 = 11;
const UNSUPPORTED: i32 = 12;
const INTEGRITY: i32 = 13;
const NO_SPACE: i32 = 14;

/// The crash points of `dataplane::fault::POINTS`, with how often a backup of the second
/// generation below passes each at least (so every seeded kill really happens).
const POINTS: &[(&str, u64)] = &[
    ("segment", 8),
    ("pack-write", 200),
    ("pack-seal", 4),
    ("index-write", 4),
    ("index-merge", 1),
    ("snapshot-write", 1),
    ("snapshot-rename", 1),
];

#[test]
fn kill_9_at_twenty_seeded_points_leaves_a_consistent_repository() {
    let tmp = tempfile::tempdir().unwrap();
    kill_9_at_seeded_points(&Target::local(&tmp.path().join("repo")), tmp.path(), 0..20);
}

#[test]
fn kill_9_at_seeded_points_in_an_s3_repository_leaves_it_consistent() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // One seed per crash point (the local test covers more seeds).
    kill_9_at_seeded_points(&Target::s3(&server, "kill", "repo"), tmp.path(), 0..POINTS.len() as u64);
}

/// Kills backups into `repo` at the seeded crash points; after each kill the repository
/// verifies, the earlier snapshot restores, and the next backup stores only what the killed one
/// had not made durable.
fn kill_9_at_seeded_points(repo: &Target, tmp: &Path, seeds: std::ops::Range<u64>) {
    let src = tmp.join("src");
    repo.init_small();
    make_tree(&src, 10, 2 << 20);
    repo.ok(&["backup", s(&src), "--pack-size", "256KiB"]);
    let first = tmp.join("first");
    repo.ok(&["restore", "latest", "--target", s(&first)]);
    let first_id = last_json(&repo.ok(&["snapshots", "--json"]))["id"].as_str().unwrap().to_owned();
    // What a backup of the four new files below stores when nothing of them is in the
    // repository yet: their 6 MiB of incompressible data plus metadata.
    const NEW: u64 = 6 << 20;
    let mut most_reused = 0;

    for seed in seeds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // New data each round, so the backup has chunks to write: 4 incompressible files of
        // 1.5 MiB (two segments each).
        for f in 0..4 {
            let mut data = vec![0u8; 3 << 19];
            rng.fill_bytes(&mut data);
            fs::write(src.join(format!("new{f}.bin")), &data).unwrap();
        }
        let (point, most) = POINTS[seed as usize % POINTS.len()];
        let at = rng.gen_range(1..=most);
        let fault = format!("{point}:{at}");
        let before = repo.pack_bytes();
        let out = repo.cbcr_env(&["backup", s(&src), "--pack-size", "256KiB"], &[("CBCR_FAULT", &fault)]);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "seed {seed}: {fault} was not reached: {}",
            text(&out.stderr)
        );
        let durable = repo.pack_bytes() - before;

        let verify = repo.cbcr(&["verify", "--read-data"]);
        assert!(verify.status.success(), "seed {seed} ({fault}): verify after kill -9: {}", text(&verify.stderr));
        let restored = tmp.join(format!("restore{seed}"));
        repo.ok(&["restore", &first_id[..12], "--target", s(&restored)]);
        assert_same_tree(&first.join(src.strip_prefix("/").unwrap()), &restored.join(src.strip_prefix("/").unwrap()));
        fs::remove_dir_all(&restored).unwrap();

        // The next run completes, and what the killed run made durable is not stored again:
        // together the two stored about one backup's worth, not more.
        let rerun = last_json(&repo.ok(&["backup", s(&src), "--json", "--pack-size", "256KiB"]));
        let stored = rerun["bytes_stored"].as_u64().unwrap();
        assert!(
            stored + durable <= NEW + NEW / 8,
            "seed {seed} ({fault}): {durable} B durable, then {stored} B stored: {rerun}"
        );
        most_reused = most_reused.max(durable);
        repo.ok(&["restore", "latest", "--target", s(&restored)]);
        assert_same_tree(&src, &restored.join(src.strip_prefix("/").unwrap()));
        fs::remove_dir_all(&restored).unwrap();
    }
    // Some kill came late enough for the bound above to matter.
    assert!(most_reused >= NEW / 2, "no killed backup left more than {most_reused} B durable");
    repo.ok(&["verify", "--read-data"]);
}

#[test]
fn kill_9_from_outside_mid_backup_keeps_earlier_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 11, 1 << 20);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; 256 << 20];
    rng.fill_bytes(&mut data);
    fs::write(src.join("large.bin"), &data).unwrap();
    let mut snapshots = 1;
    let before = dir_size(&repo.join("packs"));
    for delay_ms in [20u64, 80, 200] {
        let mut child = cbcr_command()
            .args(["backup", "--repo", s(&repo), s(&src), "--cores", "1", "--pack-size", "4MiB"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        // A backup that beat the kill committed its snapshot; a killed one left none.
        snapshots += usize::from(status.success());
        assert_eq!(snapshot_count(&repo), snapshots, "after kill at {delay_ms} ms ({status})");
        ok(&["verify", "--repo", s(&repo)]);
    }
    let durable = dir_size(&repo.join("packs")) - before;
    let rerun = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    // What the killed runs made durable is not stored again: with what they left, the rerun
    // stored about the new file once (random data does not compress), not more.
    let stored = rerun["bytes_stored"].as_u64().unwrap();
    assert!(stored + durable <= data.len() as u64 + (16 << 20), "{durable} B durable, then {stored} B stored");
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
}

#[test]
fn a_flipped_bit_in_a_pack_is_caught_by_verify_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    a_flipped_bit_in_a_pack_is_caught(&Target::local(&tmp.path().join("repo")), tmp.path());
}

#[test]
fn a_flipped_bit_in_a_pack_object_on_s3_is_caught_by_verify_and_restore() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    a_flipped_bit_in_a_pack_is_caught(&Target::s3(&server, "flip", "repo"), tmp.path());
}

fn a_flipped_bit_in_a_pack_is_caught(repo: &Target, tmp: &Path) {
    let src = tmp.join("src");
    repo.init_small();
    fs::create_dir(&src).unwrap();
    let mut data = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut data);
    fs::write(src.join("data.bin"), &data).unwrap();
    repo.ok(&["backup", s(&src), "--cores", "1"]);
    repo.ok(&["verify", "--read-data"]);
    // The largest pack holds the file's chunks; flip one bit in the middle of its body.
    let pack = packs(repo.files()).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x10;
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&pack, &bytes).unwrap();
    let pack_id = pack.file_stem().unwrap().to_str().unwrap();

    let verify = repo.cbcr(&["verify", "--read-data"]);
    assert_eq!(verify.status.code(), Some(INTEGRITY), "{}", text(&verify.stderr));
    let report = text(&verify.stderr);
    assert!(report.contains(pack_id), "verify names the pack: {report}");
    assert!(report.contains("damaged blob"), "verify names the chunk: {report}");
    assert!(report.contains("data.bin"), "verify names the file: {report}");

    let out = tmp.join("out");
    let restore = repo.cbcr(&["restore", "latest", "--target", s(&out)]);
    assert_eq!(restore.status.code(), Some(INTEGRITY), "restore fails loudly: {}", text(&restore.stderr));
    assert!(text(&restore.stderr).contains(pack_id));
    // Whatever was written is the true data or a hole, never the corrupted chunk.
    let restored = fs::read(out.join(src.strip_prefix("/").unwrap()).join("data.bin")).unwrap();
    for (i, (a, b)) in restored.iter().zip(&data).enumerate() {
        assert!(a == b || *a == 0, "byte {i} was restored wrong");
    }
}

#[test]
fn a_damaged_pack_trailer_is_caught_without_reading_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 6, 1 << 20);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let pack = packs(&repo).pop().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let n = bytes.len();
    bytes[n - 70] ^= 1;
    fs::write(&pack, &bytes).unwrap();
    let verify = cbcr(&["verify", "--repo", s(&repo)]);
    assert_eq!(verify.status.code(), Some(INTEGRITY), "{}", text(&verify.stderr));
    assert!(text(&verify.stderr).contains(pack.file_stem().unwrap().to_str().unwrap()));
}

#[test]
fn a_corrupt_index_run_is_named_and_stops_commands_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 7, 1 << 20);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let run = fs::read_dir(repo.join("index")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = fs::read(&run).unwrap();
    bytes[20] ^= 4;
    fs::write(&run, &bytes).unwrap();
    let name = run.file_name().unwrap().to_str().unwrap();
    for args in [&["backup", s(&src)][..], &["restore", "latest", "--target", s(&tmp.path().join("o"))], &["verify"]] {
        let mut full = args.to_vec();
        full.extend(["--repo", s(&repo)]);
        let out = cbcr(&full);
        assert_eq!(out.status.code(), Some(INTEGRITY), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(name), "{args:?} names the index run: {}", text(&out.stderr));
    }
    assert_eq!(snapshot_count(&repo), 1);
}

#[test]
fn disk_full_during_backup_is_a_clear_error_and_the_repository_stays_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let mounted = small_tmpfs(&repo, "6m");
    if !prerequisite("a small tmpfs (mounting needs root and mount permission)", mounted.is_some()) {
        return;
    }
    init_small(&repo);
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small.txt"), b"fits").unwrap();
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    let mut data = vec![0u8; 12 << 20];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
    fs::write(src.join("big.bin"), &data).unwrap();
    let full = cbcr(&["backup", "--repo", s(&repo), s(&src), "--pack-size", "1MiB"]);
    assert_eq!(full.status.code(), Some(NO_SPACE), "{}", text(&full.stderr));
    assert!(text(&full.stderr).contains("no space left"), "{}", text(&full.stderr));
    assert_eq!(snapshot_count(&repo), 1, "no partial snapshot");
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
    let out = tmp.path().join("out");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    assert_eq!(fs::read(out.join(src.strip_prefix("/").unwrap()).join("small.txt")).unwrap(), b"fits");
    // With the large file gone, the next backup fits and succeeds.
    fs::remove_file(src.join("big.bin")).unwrap();
    ok(&["backup", "--repo", s(&repo), s(&src)]);
    assert_eq!(snapshot_count(&repo), 2);
}

#[test]
fn a_second_backup_while_one_holds_the_lock_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 8, 100_000);
    // Hold the lock exactly as a running backup does.
    let lock = fs::OpenOptions::new().write(true).create(true).truncate(false).open(repo.join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let out = cbcr(&["backup", "--repo", s(&repo), s(&src)]);
    assert_eq!(out.status.code(), Some(LOCKED), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("locked"));
    drop(lock);
    ok(&["backup", "--repo", s(&repo), s(&src)]);
}

#[test]
fn bad_paths_and_bad_repositories_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    make_tree(&src, 9, 100_000);

    // A typo in --repo starts no fresh full backup: without --init nothing is created.
    let typo = cbcr(&["backup", "--repo", s(&repo), s(&src)]);
    assert_eq!(typo.status.code(), Some(NO_REPOSITORY), "{}", text(&typo.stderr));
    assert!(text(&typo.stderr).contains("cbcr init"), "{}", text(&typo.stderr));
    assert!(!repo.exists(), "a missing repository is not created without --init");

    let missing = cbcr(&["backup", "--init", "--repo", s(&repo), s(&src.join("nope"))]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("nope"), "{}", text(&missing.stderr));
    assert_eq!(snapshot_count(&repo), 0, "nothing is written for a missing source");

    let not_repo = tmp.path().join("not-a-repo");
    fs::create_dir(&not_repo).unwrap();
    fs::write(not_repo.join("something"), b"x").unwrap();
    for args in [&["backup", s(&src)][..], &["snapshots"], &["verify"], &["restore", "latest", "--target", "/tmp/x"]] {
        let mut full = args.to_vec();
        full.extend(["--repo", s(&not_repo)]);
        let out = cbcr(&full);
        assert_eq!(out.status.code(), Some(NO_REPOSITORY), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("not a cbcr repository"));
    }

    ok(&["backup", "--init", "--repo", s(&repo), s(&src)]);
    let config = fs::read_to_string(repo.join("config")).unwrap();
    fs::write(repo.join("config"), config.replace("\"version\": 2", "\"version\": 99")).unwrap();
    let newer = cbcr(&["snapshots", "--repo", s(&repo)]);
    assert_eq!(newer.status.code(), Some(UNSUPPORTED), "{}", text(&newer.stderr));
    assert!(text(&newer.stderr).contains("version 99"), "{}", text(&newer.stderr));
    fs::write(repo.join("config"), config).unwrap();
    ok(&["verify", "--repo", s(&repo)]);
}

#[test]
fn too_little_locked_memory_is_named_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let out = Command::new("sh")
        .env("CBCR_PASSWORD", PASSWORD)
        .arg("-c")
        .arg(format!(
            "ulimit -l 0 && exec {} backup --init --repo {} /etc/hostname",
            cbcr_bin().display(),
            repo.display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("locked-memory limit 0 KiB") && err.contains("ulimit -l"), "{err}");
    assert_eq!(snapshot_count(&repo), 0);
}

#[test]
fn unreadable_source_files_are_skipped_with_exit_3() {
    let setpriv = is_root() && Command::new("setpriv").arg("--version").output().is_ok();
    if !prerequisite("root and setpriv (to run cbcr as an unprivileged user)", setpriv) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("readable"), b"yes").unwrap();
    fs::write(src.join("secret"), b"no").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = Command::new("setpriv")
        .env("CBCR_PASSWORD", PASSWORD)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cbcr_bin())
        .args(["backup", "--init", "--repo", s(&repo), s(&src), "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(PARTIAL), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\"type\":\"warning\"") && stdout.contains("secret"), "{stdout}");
    assert_eq!(last_json(&out)["files_skipped"], 1);
    let listing = text(&ok(&["ls", "latest", "--repo", s(&repo)]).stdout);
    assert!(listing.contains("/readable") && !listing.contains("/secret"), "{listing}");
}

#[test]
fn sigint_stops_a_backup_at_a_consistent_point_with_exit_130() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    fs::create_dir(&src).unwrap();
    let mut data = vec![0u8; 192 << 20];
    rand::rngs::StdRng::seed_from_u64(12).fill_bytes(&mut data);
    fs::write(src.join("large.bin"), &data).unwrap();
    let child = cbcr_command()
        .args(["backup", "--repo", s(&repo), s(&src), "--cores", "1", "--pack-size", "4MiB", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-backup: some packs are durable, most of the file is not read yet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while dir_size(&repo.join("packs")) < 16 << 20 {
        assert!(std::time::Instant::now() < deadline, "the backup wrote no packs");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted"), "{}", text(&out.stderr));
    let error = last_json(&out);
    assert_eq!(error["type"], "error");
    assert_eq!(error["exit_code"], 130);
    assert_eq!(snapshot_count(&repo), 0, "an interrupted backup commits nothing");
    ok(&["verify", "--repo", s(&repo), "--read-data"]);
    let durable = dir_size(&repo.join("packs"));
    assert!(durable < data.len() as u64 * 3 / 4, "stopped early, not at the end: {durable} B stored");
    let rerun = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let stored = rerun["bytes_stored"].as_u64().unwrap();
    assert!(stored + durable <= data.len() as u64 + (16 << 20), "{durable} B durable, then {stored} B stored");

    // Any other command exits at once with the same code.
    let mut restore = cbcr_command()
        .args(["restore", "latest", "--repo", s(&repo), "--target", s(&tmp.path().join("out"))])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(restore.id() as i32, libc::SIGINT) };
    let status = restore.wait().unwrap();
    assert!(status.code() == Some(130) || status.success(), "restore after SIGINT: {status}");
}

#[test]
fn bad_option_values_and_missing_arguments_are_usage_errors_with_exit_2() {
    const USAGE: i32 = 2;
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    make_tree(&src, 13, 100_000);
    // The repository's default 1 GiB segments in 512-byte page chunks would be 2 M chunks, more
    // than one chunk list holds: refused before anything is read.
    ok(&["init", "--repo", s(&repo)]);
    let cases: [(&[&str], &str); 9] = [
        (&["backup", s(&src), "--chunking", "pages:512", "--page-chunk", "512"], "chunk list"),
        (&["backup", s(&src), "--pack-size", "0"], "--pack-size"),
        (&["backup", s(&src), "--pack-size", "4GiB"], "--pack-size"),
        (&["backup", s(&src), "--cores", "4096"], "--cores"),
        (&["init", "--segment-size", "1"], "--segment-size 1"),
        // Accepted once, and then every default backup of a database file failed.
        (&["init", "--segment-size", "100KiB"], "multiple of 64.0 KiB"),
        (&["init", "--chunk-avg", "0"], "chunk sizes"),
        (&["init", "--segment-size", "64GiB", "--chunk-min", "64", "--chunk-avg", "256"], "chunk list"),
        (&["backup", s(&src), "--compression-level", "99"], "--compression-level"),
    ];
    for (args, says) in cases {
        let fresh = tmp.path().join("fresh");
        let target = if args[0] == "init" { &fresh } else { &repo };
        let out = cbcr(&[args, &["--repo", s(target)]].concat());
        assert_eq!(out.status.code(), Some(USAGE), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    }
    // One slash missing: a URL with a typo, not a local directory to create.
    for typo in ["quic:/127.0.0.1:7443", "s3:bucket/prefix"] {
        let out = cbcr(&["init", "--repo", typo]);
        assert_eq!(out.status.code(), Some(USAGE), "{typo}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("a repository URL is"), "{}", text(&out.stderr));
        assert!(!Path::new(typo).exists());
    }
    let no_repo = cbcr(&["snapshots"]);
    assert_eq!(no_repo.status.code(), Some(USAGE), "{}", text(&no_repo.stderr));
    assert!(text(&no_repo.stderr).contains("--repo"), "{}", text(&no_repo.stderr));
    assert_eq!(snapshot_count(&repo), 0);
}

#[test]
fn stray_files_and_a_bad_record_block_nothing_and_verify_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    make_tree(&src, 31, 200_000);
    // Plaintext, so the test can write a record as a buggy or hostile writer would.
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    let first = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    let id = first["snapshot_id"].as_str().unwrap().to_owned();
    // What operators and editors leave behind.
    fs::write(repo.join("snapshots/notahash"), b"x").unwrap();
    fs::write(repo.join("index/README"), b"notes").unwrap();
    fs::write(repo.join("packs/README"), b"notes").unwrap();
    fs::create_dir_all(repo.join("tmp/left-by-someone/deeper")).unwrap();
    fs::write(repo.join("tmp/left-by-someone/deeper/file"), b"x").unwrap();
    // A record under its right name whose time holds a non-ASCII byte (it made `snapshots`
    // panic for everyone).
    let good = fs::read_to_string(repo.join("snapshots").join(&id)).unwrap();
    let time = last_json(&ok(&["snapshots", "--repo", s(&repo), "--json"]))["time"].as_str().unwrap().to_owned();
    let forged = good.replacen(&time, &format!("{}\u{e9}{}", &time[..15], &time[16..]), 1);
    assert_ne!(forged, good);
    let forged_id = wire::ChunkId::of_file(forged.as_bytes()).to_hex();
    fs::write(repo.join("snapshots").join(&forged_id), &forged).unwrap();

    let listed = ok(&["snapshots", "--repo", s(&repo), "--json"]);
    let ids = snapshot_ids(&listed);
    assert_eq!(ids, vec![id.clone()], "the good snapshot only");
    let warned = text(&listed.stderr);
    assert!(warned.contains("notahash") && warned.contains(&forged_id[..16]), "{warned}");
    ok(&["restore", &id, "--repo", s(&repo), "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert_eq!(second["parent"].as_str(), Some(id.as_str()));
    assert!(!repo.join("tmp/left-by-someone").exists(), "a backup clears tmp/, directories too");
    // Verify names the forged record as damage and the strays as what they are.
    let verify = cbcr(&["verify", "--repo", s(&repo)]);
    assert_eq!(verify.status.code(), Some(13), "{}", text(&verify.stderr));
    let said = text(&verify.stderr);
    assert!(said.contains(&forged_id) && said.contains("RFC 3339"), "{said}");
    for stray in ["snapshots: notahash", "index: README", "packs: README"] {
        assert!(said.contains(stray), "{stray} not named: {said}");
    }
}

/// The index is a cache: lost or damaged runs are rebuilt from the packs by `repair index`.
fn the_index_is_rebuilt_from_the_packs(repo: &Target, tmp: &Path) {
    let (src, out) = (tmp.join("src"), tmp.join("out"));
    repo.init_small();
    make_tree(&src, 41, 2 << 20);
    repo.ok(&["backup", s(&src), "--pack-size", "256KiB"]);
    fs::write(src.join("more.bin"), vec![7u8; 300_000]).unwrap();
    repo.ok(&["backup", s(&src), "--pack-size", "256KiB"]);
    let index = repo.files().join("index");
    // Every run deleted (the only way out once one is damaged): restores need the index, and
    // say which command rebuilds it.
    for run in fs::read_dir(&index).unwrap().flatten() {
        fs::remove_file(run.path()).unwrap();
    }
    let lost = repo.cbcr(&["restore", "latest", "--target", s(&out)]);
    assert_eq!(lost.status.code(), Some(INTEGRITY), "{}", text(&lost.stderr));
    assert!(text(&lost.stderr).contains("cbcr repair index"), "{}", text(&lost.stderr));
    let repaired = last_json(&repo.ok(&["repair", "index", "--json"]));
    assert!(repaired["packs"].as_u64().unwrap() >= 2 && repaired["damaged_packs"] == 0, "{repaired}");
    let _ = fs::remove_dir_all(&out);
    repo.ok(&["restore", "latest", "--target", s(&out)]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    repo.ok(&["verify", "--read-data"]);
    // Deduplication works again at once: an unchanged source stores nothing new.
    let again = last_json(&repo.ok(&["backup", s(&src), "--json"]));
    assert_eq!(again["bytes_new"], 0, "{again}");
    // A damaged run: named, with the fix; the fix replaces it.
    let run = fs::read_dir(&index).unwrap().flatten().next().unwrap().path();
    let mut bytes = fs::read(&run).unwrap();
    bytes[30] ^= 1;
    fs::write(&run, &bytes).unwrap();
    let damaged = repo.cbcr(&["snapshots"]);
    let restore = repo.cbcr(&["restore", "latest", "--target", s(&tmp.join("o2"))]);
    assert_eq!(restore.status.code(), Some(INTEGRITY), "{}", text(&restore.stderr));
    assert!(text(&restore.stderr).contains("cbcr repair index"), "{}", text(&restore.stderr));
    assert!(damaged.status.success(), "listing snapshots needs no index: {}", text(&damaged.stderr));
    repo.ok(&["repair", "index"]);
    repo.ok(&["verify"]);
}

#[test]
fn lost_or_damaged_index_runs_are_rebuilt_from_the_packs() {
    let tmp = tempfile::tempdir().unwrap();
    the_index_is_rebuilt_from_the_packs(&Target::local(&tmp.path().join("repo")), tmp.path());
}

#[test]
fn lost_index_runs_of_an_s3_repository_are_rebuilt_from_the_packs() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    the_index_is_rebuilt_from_the_packs(&Target::s3(&server, "repair", "db1"), tmp.path());
}

#[test]
fn repair_index_names_a_pack_whose_trailer_is_damaged_and_indexes_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    init_small(&repo);
    make_tree(&src, 42, 2 << 20);
    ok(&["backup", "--repo", s(&repo), s(&src), "--pack-size", "256KiB"]);
    let pack = packs(&repo).into_iter().next().unwrap();
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len - 10).unwrap();
    let out = cbcr(&["repair", "index", "--repo", s(&repo), "--json"]);
    assert_eq!(out.status.code(), Some(INTEGRITY), "{}", text(&out.stderr));
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(text(&out.stdout).contains(name), "{}", text(&out.stdout));
    let summary = last_json(&out);
    assert_eq!(summary["damaged_packs"], 1);
    assert!(summary["packs"].as_u64().unwrap() >= 1, "{summary}");
}

#[test]
fn repair_packs_takes_damaged_blobs_out_so_the_next_backup_stores_them_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    // Plaintext and uncompressed-looking data, so a flipped byte lands in a known blob.
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    fs::create_dir_all(&src).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(43);
    let mut data = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut data);
    fs::write(src.join("data.bin"), &data).unwrap();
    let first = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    // A flipped byte in the middle of the pack's body: its trailer still parses.
    let pack = packs(&repo).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    fs::write(&pack, &bytes).unwrap();
    // Before the repair a new backup of a changed file would deduplicate against the damage.
    let repaired = cbcr(&["repair", "packs", "--repo", s(&repo)]);
    assert_eq!(repaired.status.code(), Some(INTEGRITY), "{}", text(&repaired.stderr));
    let said = text(&repaired.stderr) + &text(&repaired.stdout);
    assert!(said.contains("data.bin"), "the file that used the damaged blob is named: {said}");
    assert!(said.contains("back up the files named above again"), "{said}");
    // The next backup stores the blob again (it is no longer indexed), and both snapshots
    // restore and verify: the old one's blob is the same id, stored anew.
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert!(second["bytes_new"].as_u64().unwrap() > 0, "{second}");
    let first_id = first["snapshot_id"].as_str().unwrap();
    ok(&["restore", first_id, "--repo", s(&repo), "--target", s(&out)]);
    assert_eq!(fs::read(out.join(src.strip_prefix("/").unwrap()).join("data.bin")).unwrap(), data);
    // The damaged copy is still in its pack: --read-data names it, nothing uses it.
    let verify = cbcr(&["verify", "--repo", s(&repo)]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
}

/// A 3 MiB random file (and with `other`, a 1 MiB one after it) backed up into one pack, a
/// byte of which (in the first file) is then flipped, and `verify --read-data` run on it:
/// returns the first file's bytes and the first backup.
fn backup_then_damage_then_verify(src: &Path, repo: &Path, seed: u64, other: bool) -> (Vec<u8>, serde_json::Value) {
    ok(&["init", "--insecure-no-encryption", "--repo", s(repo)]);
    fs::create_dir_all(src).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut data);
    fs::write(src.join("data.bin"), &data).unwrap();
    let mut other_data = vec![0u8; 1 << 20];
    if other {
        rng.fill_bytes(&mut other_data);
        fs::write(src.join("other.bin"), &other_data).unwrap();
    }
    let first = last_json(&ok(&["backup", "--repo", s(repo), s(src), "--cores", "1", "--json"]));
    let pack = packs(repo).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    fs::write(&pack, &bytes).unwrap();
    let found = cbcr(&["verify", "--read-data", "--repo", s(repo)]);
    assert_eq!(found.status.code(), Some(INTEGRITY), "{}", text(&found.stderr));
    assert!(text(&found.stdout).contains("recorded the damaged blobs in"), "{}", text(&found.stdout));
    assert_eq!(fs::read_dir(repo.join("damaged")).unwrap().count(), 1);
    if other {
        // A flipped bit costs its blob, not the pack: the other file, in the same pack, restores.
        let out = repo.with_file_name("other-out");
        let other_path = src.join("other.bin");
        ok(&["restore", "latest", "--repo", s(repo), "--target", s(&out), "--include", s(&other_path)]);
        assert_eq!(fs::read(out.join(other_path.strip_prefix("/").unwrap())).unwrap(), other_data);
    }
    (data, first)
}

#[test]
fn damage_verify_found_is_never_deduplicated_against_even_before_a_repair() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    let (data, first) = backup_then_damage_then_verify(&src, &repo, 44, true);
    // No repair yet: the file did not change, and still the backup reads it and stores the
    // damaged blob again instead of reusing the chunk lists that name it (into other packs
    // than before: a smaller pack size).
    let second = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--pack-size", "1MiB", "--json"]));
    assert!(second["bytes_new"].as_u64().unwrap() > 0, "{second}");
    assert!(second["bytes_read"].as_u64().unwrap() >= data.len() as u64, "{second}");
    // Both snapshots restore: lookups pass over the damaged copy to the new one.
    for snapshot in [first["snapshot_id"].as_str().unwrap(), second["snapshot_id"].as_str().unwrap()] {
        let _ = fs::remove_dir_all(&out);
        ok(&["restore", snapshot, "--repo", s(&repo), "--target", s(&out)]);
        assert_eq!(fs::read(out.join(src.strip_prefix("/").unwrap()).join("data.bin")).unwrap(), data);
    }
    let verify = cbcr(&["verify", "--repo", s(&repo)]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    assert_eq!(fs::read_dir(repo.join("damaged")).unwrap().count(), 1, "the damaged copy is still in its pack");
    // The repair takes the damaged copy out of the index and removes the record.
    let repaired = last_json(&cbcr(&["repair", "packs", "--repo", s(&repo), "--json"]));
    assert!(repaired["damage_records_removed"].as_u64().unwrap() >= 1, "{repaired}");
    assert_eq!(fs::read_dir(repo.join("damaged")).unwrap().count(), 0);
    let verify = cbcr(&["verify", "--repo", s(&repo)]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
}

/// A pack's name is the hash of its bytes: a backup that stores the same blobs in the same
/// order writes a lost pack whole again, and the record of its loss goes with it (in a
/// plaintext repository: sealed blobs carry fresh nonces, so encrypted packs never repeat).
#[test]
fn a_backup_that_writes_a_lost_pack_again_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(46).fill_bytes(&mut data);
    fs::write(src.join("data.bin"), &data).unwrap();
    ok(&["backup", "--repo", s(&repo), s(&src), "--cores", "1"]);
    let pack = packs(&repo).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    fs::remove_file(&pack).unwrap();
    let lost = cbcr(&["verify", "--repo", s(&repo)]);
    assert_eq!(lost.status.code(), Some(INTEGRITY), "{}", text(&lost.stderr));
    assert_eq!(fs::read_dir(repo.join("damaged")).unwrap().count(), 1);
    ok(&["backup", "--repo", s(&repo), s(&src), "--cores", "1"]);
    assert!(pack.exists(), "the same blobs in the same order make the same pack");
    assert_eq!(fs::read_dir(repo.join("damaged")).unwrap().count(), 0);
    let verify = cbcr(&["verify", "--read-data", "--repo", s(&repo)]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
}

/// `repair snapshots` on a repository that lost a pack: lost chunks become holes at their
/// offsets, the rest restores byte for byte, and the repaired snapshot is never a parent.
#[test]
fn repair_snapshots_turns_lost_chunks_into_holes_and_keeps_every_other_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    init_small(&repo);
    make_tree(&src, 45, 3 << 20);
    let original = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--pack-size", "256KiB", "--json"]));
    let original_id = original["snapshot_id"].as_str().unwrap().to_string();
    // The largest pack holds file content (directory trees are written last, into a small one).
    let lost = packs(&repo).into_iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    fs::remove_file(&lost).unwrap();
    ok(&["repair", "index", "--repo", s(&repo)]);
    let broken = cbcr(&["verify", "--repo", s(&repo)]);
    assert_eq!(broken.status.code(), Some(INTEGRITY), "{}", text(&broken.stderr));

    let dry = cbcr(&["repair", "snapshots", "--dry-run", "--repo", s(&repo), "--json"]);
    assert_eq!(dry.status.code(), Some(INTEGRITY), "a dry run repairs nothing: {}", text(&dry.stderr));
    assert_eq!(snapshot_count(&repo), 1);
    let planned = last_json(&dry);
    assert_eq!(planned["original"], original_id.as_str(), "{planned}");
    assert!(planned["repaired"].is_null(), "{planned}");

    let fixed = cbcr(&["repair", "snapshots", "--forget", "--repo", s(&repo), "--json"]);
    assert!(fixed.status.success(), "{}", text(&fixed.stderr));
    let fixed = last_json(&fixed);
    assert_eq!(fixed["forgotten"], true, "{fixed}");
    let repaired_id = fixed["repaired"].as_str().unwrap().to_string();
    let named: Vec<String> =
        fixed["files"].as_array().unwrap().iter().map(|f| f[0].as_str().unwrap().to_string()).collect();
    assert!(!named.is_empty() || !fixed["dirs"].as_array().unwrap().is_empty(), "{fixed}");
    let listing = last_json(&ok(&["snapshots", "--repo", s(&repo), "--json"]));
    assert_eq!(listing["id"], repaired_id.as_str());
    assert_eq!(listing["repaired"]["original"], original_id.as_str(), "{listing}");
    assert!(cbcr(&["verify", "--repo", s(&repo)]).status.success(), "the repaired snapshot verifies");

    let restore = ok(&["restore", &repaired_id, "--repo", s(&repo), "--target", s(&out)]);
    assert!(text(&restore.stderr).contains("made by `cbcr repair snapshots`"), "{}", text(&restore.stderr));
    // Every file keeps its size; a file not named is whole; a named one differs only in zeros.
    let restored_root = out.join(src.strip_prefix("/").unwrap());
    let mut differing = 0;
    for entry in walkdir(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let (want, got) = (fs::read(&entry).unwrap(), fs::read(restored_root.join(rel)));
        let Ok(got) = got else {
            let dir_named = fixed["dirs"].as_array().unwrap().iter().any(|d| entry.starts_with(d.as_str().unwrap()));
            assert!(dir_named, "{} is gone but no lost directory holds it", entry.display());
            continue;
        };
        assert_eq!(got.len(), want.len(), "{}", entry.display());
        if got != want {
            differing += 1;
            assert!(named.iter().any(|n| Path::new(n) == entry), "{} differs but is not named", entry.display());
            assert!(got.iter().zip(&want).all(|(g, w)| g == w || *g == 0), "{}: only zeros are new", entry.display());
        }
    }
    assert!(differing > 0 || !fixed["dirs"].as_array().unwrap().is_empty(), "a lost pack changed something");

    // The next backup does not take the repaired snapshot as its parent: it reads every file,
    // stores what was lost again, and restores whole.
    let next = last_json(&ok(&["backup", "--repo", s(&repo), s(&src), "--json"]));
    assert!(next["bytes_new"].as_u64().unwrap() > 0, "{next}");
    let refused = cbcr(&["backup", "--repo", s(&repo), s(&src), "--parent", &repaired_id]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("repair snapshots"), "{}", text(&refused.stderr));
    let whole = tmp.path().join("whole");
    ok(&["restore", next["snapshot_id"].as_str().unwrap(), "--repo", s(&repo), "--target", s(&whole)]);
    assert_same_tree(&src, &whole.join(src.strip_prefix("/").unwrap()));
}

/// The regular files under `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(walkdir(&entry.path()));
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files
}

/// logrotate's copytruncate shortens a file cbcr has mapped: reads past the new end raised
/// SIGBUS and killed cbcr. Now the file is named (exit 3), stored at the size it was read at
/// with zeros past its new end, and the rest of the backup is committed.
#[test]
fn a_file_truncated_while_it_is_read_is_named_and_the_backup_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    fs::create_dir_all(&src).unwrap();
    let mut log = vec![0u8; 64 << 20];
    rand::rngs::StdRng::seed_from_u64(47).fill_bytes(&mut log);
    fs::write(src.join("app.log"), &log).unwrap();
    fs::write(src.join("kept.txt"), b"kept").unwrap();
    ok(&["init", "--repo", s(&repo)]);
    // One core at zstd's slowest level reads the file for seconds: time to cut it mid-read.
    let child = cbcr_command()
        .args(["backup", "--repo", s(&repo), s(&src), "--cores", "1", "--compression-level", "19", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    fs::OpenOptions::new().write(true).open(src.join("app.log")).unwrap().set_len(1 << 20).unwrap();
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(3), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains("shrank from 67108864 to 1048576 bytes"), "{}", text(&done.stdout));
    assert_eq!(snapshot_count(&repo), 1, "the backup is committed");
    ok(&["restore", "latest", "--repo", s(&repo), "--target", s(&out)]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert_eq!(fs::read(restored.join("kept.txt")).unwrap(), b"kept");
    let got = fs::read(restored.join("app.log")).unwrap();
    assert_eq!(got.len(), log.len(), "stored at the size it was read at");
    assert_eq!(got[..1 << 20], log[..1 << 20], "what is still in the file is stored as it is");
    assert!(got.iter().zip(&log).all(|(g, w)| g == w || *g == 0), "past the new end: as read, or zeros");
}

#[test]
fn fifos_and_sockets_are_counted_as_left_out_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("kept.txt"), b"kept").unwrap();
    let fifo = std::ffi::CString::new(src.join("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    ok(&["init", "--repo", s(&repo)]);
    let out = cbcr(&["backup", "--repo", s(&repo), s(&src), "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let summary = last_json(&out);
    assert_eq!(summary["files_skipped"], 2, "{summary}");
    let warnings = text(&out.stdout);
    assert!(warnings.contains("a FIFO") && warnings.contains("a socket"), "{warnings}");
    assert_eq!(snapshot_count(&repo), 1, "the rest is committed");
}

/// The power-loss sweep: each seed kills a backup (or a forget) just before or just after one
/// of its changes to the store (`store-write:N`, `store-written:N`: every pack, index run,
/// index merge and deletion, and the commit; one seed in eight between the snapshot's rename
/// and the fsync of its directory), then loses what a power loss would: the command's sync
/// journal is replayed so that every rename or new directory no later directory fsync made
/// durable is gone and every file renamed before its data was fsynced is emptied (which checks
/// the local store's own fsync discipline), and files in `tmp/` are cut to seeded lengths, as a
/// power loss leaves unsynced files. Every snapshot
/// committed before stays restorable, the repository opens and verifies, the interrupted
/// snapshot is whole or absent, and the next backup completes. `CBCR_POWER_LOSS_SEEDS` sets
/// how many seeds (32 by default; docs/RELIABILITY.md records longer runs).
#[test]
fn power_loss_at_seeded_store_changes_leaves_every_earlier_snapshot_restorable() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo_dir) = (tmp.path().join("src"), tmp.path().join("repo"));
    let repo = Target::local(&repo_dir);
    repo.init_small();
    make_tree(&src, 21, 1 << 20);
    repo.ok(&["backup", s(&src), "--pack-size", "256KiB"]);
    let first = tmp.path().join("first");
    repo.ok(&["restore", "latest", "--target", s(&first), "--fsync"]);
    let first_id = last_json(&repo.ok(&["snapshots", "--json"]))["id"].as_str().unwrap().to_owned();
    let (mut cut, mut forgets, mut lost) = (0, 0, 0);
    let seeds: u64 = std::env::var("CBCR_POWER_LOSS_SEEDS").map_or(32, |n| n.parse().unwrap());
    for seed in 0..seeds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for f in 0..3 {
            let mut data = vec![0u8; 3 << 18];
            rng.fill_bytes(&mut data);
            fs::write(src.join(format!("new{f}.bin")), &data).unwrap();
        }
        let before = snapshot_ids(&repo.ok(&["snapshots", "--json"]));
        // One seed in four cuts a forget of the latest snapshot (never the first) instead: its
        // one change is the deletion; a backup of these files makes about 20 before its commit
        // and a few after (the index merge), so some cuts fall after the commit.
        let forgetting = seed % 4 == 3 && before.len() > 1;
        let point = if rng.gen_bool(0.5) { "store-write" } else { "store-written" };
        let mut fault = format!("{point}:{}", rng.gen_range(1..=if forgetting { 1 } else { 26 }));
        if seed % 8 == 5 {
            fault = "snapshot-rename:1".into();
        }
        let existed = repo_files(&repo_dir);
        let journal = tmp.path().join(format!("journal-{seed}"));
        let args: Vec<&str> = if forgetting {
            vec!["forget", before.last().unwrap()]
        } else {
            vec!["backup", s(&src), "--pack-size", "256KiB"]
        };
        let out = repo.cbcr_env(&args, &[("CBCR_FAULT", &fault), ("CBCR_SYNC_JOURNAL", s(&journal))]);
        let killed = out.status.signal() == Some(libc::SIGKILL);
        assert!(killed || out.status.success(), "seed {seed} ({fault}): {args:?}: {}", text(&out.stderr));
        cut += usize::from(killed);
        forgets += usize::from(killed && forgetting);
        if killed {
            lost += lose_power(&journal, &existed);
        }
        tear_tmp(&repo_dir.join("tmp"), &mut rng);

        let after = snapshot_ids(&repo.ok(&["snapshots", "--json"]));
        let kept = before.iter().filter(|id| after.contains(id)).count();
        if forgetting {
            assert!(after.len() == before.len() || after.len() + 1 == before.len(), "seed {seed} ({fault})");
            assert!(kept + 1 >= before.len(), "seed {seed} ({fault}): forget took more than its snapshot");
        } else {
            assert_eq!(kept, before.len(), "seed {seed} ({fault}): an earlier snapshot is gone");
            assert!(after.len() <= before.len() + 1, "seed {seed} ({fault})");
        }
        let verify = repo.cbcr(&["verify", "--read-data"]);
        assert!(verify.status.success(), "seed {seed} ({fault}): verify after the cut: {}", text(&verify.stderr));
        let restored = tmp.path().join(format!("r{seed}"));
        repo.ok(&["restore", &first_id[..12], "--target", s(&restored)]);
        assert_same_tree(&first.join(src.strip_prefix("/").unwrap()), &restored.join(src.strip_prefix("/").unwrap()));
        fs::remove_dir_all(&restored).unwrap();
        if !forgetting && after.len() > before.len() {
            // Killed after its commit: the snapshot it made is whole.
            repo.ok(&["restore", "latest", "--target", s(&restored)]);
            assert_same_tree(&src, &restored.join(src.strip_prefix("/").unwrap()));
            fs::remove_dir_all(&restored).unwrap();
        }
        // The next backup completes after every cut.
        repo.ok(&["backup", s(&src), "--pack-size", "256KiB"]);
    }
    // Most seeds cut the command (a seed whose point lies beyond the command's last change
    // ran it to the end), forgets among them.
    eprintln!("{seeds} seeds: {cut} cuts, {forgets} of them in a forget, {lost} entries or file contents lost");
    assert!(cut as u64 >= seeds * 3 / 4 && forgets as u64 >= seeds / 8, "{cut} cuts, {forgets} of them in a forget");
    // Only the seeds cut between a rename and its directory's fsync lose anything: everything
    // else the store made durable before it returned.
    assert!(lost as u64 >= seeds / 8, "{lost} entries lost");
    repo.ok(&["restore", "latest", "--target", s(&tmp.path().join("last")), "--fsync"]);
    assert_same_tree(&src, &tmp.path().join("last").join(src.strip_prefix("/").unwrap()));
}

/// Every file of the repository outside `tmp/`.
fn repo_files(dir: &Path) -> std::collections::HashSet<PathBuf> {
    let mut files = std::collections::HashSet::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() && entry.file_name() != "tmp" {
            files.extend(repo_files(&entry.path()));
        } else {
            files.insert(entry.path());
        }
    }
    files
}

/// Replays a killed command's sync journal as a power loss would: a rename or a new directory
/// that no later fsync of its directory made durable is undone (a file renamed over one that
/// existed before keeps the old one: names are content hashes, so it is the same), and a file
/// renamed before its data was fsynced is emptied. (An unlink not made durable could come back;
/// a repository tolerates that, and it is not replayed.) Returns how much it undid.
fn lose_power(journal: &Path, existed: &std::collections::HashSet<PathBuf>) -> usize {
    let text = fs::read_to_string(journal).unwrap_or_default();
    let steps: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let fsynced = |path: &Path, range: &[Vec<&str>]| range.iter().any(|s| s[..] == ["fsync", path.to_str().unwrap()]);
    let mut lost = 0;
    for (i, step) in steps.iter().enumerate() {
        match step[..] {
            ["rename", from, to] => {
                let (from, to) = (Path::new(from), Path::new(to));
                if !fsynced(to.parent().unwrap(), &steps[i + 1..]) {
                    if !existed.contains(to) && fs::remove_file(to).is_ok() {
                        lost += 1;
                    }
                } else if !fsynced(from, &steps[..i]) {
                    fs::OpenOptions::new().write(true).open(to).unwrap().set_len(0).unwrap();
                    lost += 1;
                }
            }
            ["mkdir", dir] => {
                let dir = Path::new(dir);
                if !fsynced(dir.parent().unwrap(), &steps[i + 1..]) && fs::remove_dir_all(dir).is_ok() {
                    lost += 1;
                }
            }
            _ => {}
        }
    }
    lost
}

/// What a power loss leaves of files nobody synced yet: each cut to a seeded length.
fn tear_tmp(dir: &Path, rng: &mut impl Rng) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if let Ok(file) = fs::OpenOptions::new().write(true).open(&path) {
            let len = file.metadata().unwrap().len();
            file.set_len(rng.gen_range(0..=len)).unwrap();
        }
    }
}
