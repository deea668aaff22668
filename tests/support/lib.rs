//! Helpers for the integration tests: run the real `cbcr` binary, generate source trees, compare
//! restored trees with their originals.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use rand::{RngCore, SeedableRng};

/// The release `cbcr` binary, built once per test process (or `CBCR_BIN` when set).
pub fn cbcr_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("CBCR_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "dataplane", "--bin", "cbcr"])
            .current_dir(&root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building cbcr failed");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
        target.join("release").join("cbcr")
    })
}

/// Runs cbcr with `args`; the environment is cleared of cbcr's variables first.
pub fn cbcr(args: &[&str]) -> Output {
    cbcr_env(args, &[])
}

/// Runs cbcr with `args` and extra environment variables.
pub fn cbcr_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(cbcr_bin());
    cmd.args(args).env_remove("CBCR_REPO").env_remove("CBCR_FAULT").env_remove("CBCR_CORES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cbcr runs")
}

/// Runs cbcr and asserts exit 0.
pub fn ok(args: &[&str]) -> Output {
    let out = cbcr(args);
    assert!(out.status.success(), "cbcr {args:?} failed: {}\n{}", out.status, text(&out.stderr));
    out
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The last JSON line of stdout.
pub fn last_json(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no JSON output; stderr: {}", text(&out.stderr)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Creates a repository with small segments and chunks so tests cross every boundary.
pub fn init_small(repo: &Path) {
    ok(&[
        "init",
        "--repo",
        repo.to_str().unwrap(),
        "--segment-size",
        "1MiB",
        "--chunk-min",
        "4KiB",
        "--chunk-avg",
        "16KiB",
        "--chunk-max",
        "64KiB",
    ]);
}

/// Writes a source tree with every kind of entry cbcr records; `seed` varies the content.
/// `big` is the size of the one large file (several segments with `init_small`).
pub fn make_tree(root: &Path, seed: u64, big: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    let mut random = vec![0u8; 300_000];
    rng.fill_bytes(&mut random);
    fs::write(root.join("random.bin"), &random).unwrap();
    fs::write(root.join("dir/pages.db"), bench::db_pages(seed, 64)).unwrap();
    fs::write(root.join("dir/sub/small.txt"), format!("hello {seed}\n")).unwrap();
    fs::write(root.join("dir/sub/deeper/zeros"), vec![0u8; 200_000]).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let mut big_data = bench::db_pages(seed + 1, big / bench::PAGE + 1);
    big_data.truncate(big);
    fs::write(root.join("big.db"), &big_data).unwrap();
    // Sparse: 3 MiB with data only at 1 MiB.
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"island of data", 1 << 20).unwrap();
    std::os::unix::fs::symlink("dir/sub/small.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::write(root.join("private"), b"secret").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    if is_root() {
        std::os::unix::fs::lchown(root.join("private"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("link"), Some(4321), Some(8765)).unwrap();
    }
    let old = filetime::FileTime::from_unix_time(1_000_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("random.bin"), old).unwrap();
    filetime::set_symlink_file_times(root.join("link"), old, old).unwrap();
    filetime::set_file_mtime(root.join("dir/sub"), old).unwrap();
}

/// Unmounts a [`small_tmpfs`] when dropped.
pub struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (`6m`) on `dir` (created), for disk-full tests; `None` when this
/// process may not mount.
pub fn small_tmpfs(dir: &Path, size: &str) -> Option<Unmount> {
    fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(dir)]).status();
    matches!(mounted, Ok(st) if st.success()).then(|| Unmount(dir.to_owned()))
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Asserts that `restored` matches `original`: kinds, content, modes, owners, mtimes, links.
pub fn assert_same_tree(original: &Path, restored: &Path) {
    let a = fs::symlink_metadata(original).unwrap();
    let b = fs::symlink_metadata(restored).unwrap_or_else(|e| panic!("{} missing: {e}", restored.display()));
    let what = original.display();
    assert_eq!(a.file_type(), b.file_type(), "{what}: kind");
    assert_eq!(a.mode(), b.mode(), "{what}: mode");
    if is_root() {
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{what}: owner");
    }
    assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()), "{what}: mtime");
    if a.is_dir() {
        let mut names: Vec<_> = fs::read_dir(original).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut names_b: Vec<_> = fs::read_dir(restored).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names_b.sort();
        assert_eq!(names, names_b, "{what}: entries");
        for n in names {
            assert_same_tree(&original.join(&n), &restored.join(&n));
        }
    } else if a.file_type().is_symlink() {
        assert_eq!(fs::read_link(original).unwrap(), fs::read_link(restored).unwrap(), "{what}: link target");
    } else {
        assert_eq!(a.len(), b.len(), "{what}: size");
        assert!(fs::read(original).unwrap() == fs::read(restored).unwrap(), "{what}: content differs");
    }
}

/// Bytes of the regular files under `dir` (apparent sizes).
pub fn dir_size(dir: &Path) -> u64 {
    let md = fs::symlink_metadata(dir).unwrap();
    if md.is_dir() {
        fs::read_dir(dir).unwrap().map(|e| dir_size(&e.unwrap().path())).sum()
    } else if md.is_file() {
        md.len()
    } else {
        0
    }
}

/// Paths of the pack files of a repository.
pub fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for fan in fs::read_dir(repo.join("packs")).unwrap() {
        for p in fs::read_dir(fan.unwrap().path()).unwrap() {
            out.push(p.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Number of snapshots in a repository.
pub fn snapshot_count(repo: &Path) -> usize {
    fs::read_dir(repo.join("snapshots")).map_or(0, |d| d.count())
}
