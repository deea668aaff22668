//! Helpers for the integration tests: run the real `cbcr` binary, generate source trees, compare
//! restored trees with their originals.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::{RngCore, SeedableRng};

/// The release `cbcr` binary, built once per test process (or `CBCR_BIN` when set).
pub fn cbcr_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| release_bin("dataplane", "cbcr", "CBCR_BIN"))
}

/// The release `cbcr-control` binary, built once per test process (or `CBCR_CONTROL_BIN`).
pub fn control_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| release_bin("controlplane", "cbcr-control", "CBCR_CONTROL_BIN"))
}

fn release_bin(package: &str, bin: &str, override_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(override_var) {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", package, "--bin", bin])
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {bin} failed");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    target.join("release").join(bin)
}

/// Runs cbcr with `args`; the environment is cleared of cbcr's variables first.
/// The password of every repository the tests create.
pub const PASSWORD: &str = "correct horse battery staple";

/// A `cbcr` command with the tests' password in its environment.
pub fn cbcr_command() -> Command {
    let mut cmd = Command::new(cbcr_bin());
    cmd.env("CBCR_PASSWORD", PASSWORD);
    cmd
}

pub fn cbcr(args: &[&str]) -> Output {
    cbcr_env(args, &[])
}

/// Runs cbcr with `args` and extra environment variables.
pub fn cbcr_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = cbcr_command();
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
    Target::local(repo).init_small();
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
    fs::write(root.join("dir/pages.db"), datagen::db_pages(seed, 64)).unwrap();
    fs::write(root.join("dir/sub/small.txt"), format!("hello {seed}\n")).unwrap();
    fs::write(root.join("dir/sub/deeper/zeros"), vec![0u8; 200_000]).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let mut big_data = datagen::db_pages(seed + 1, big / datagen::PAGE + 1);
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

/// `n` source trees under `dir` (`src0`, `src1`, ...) that share one file of `common` random
/// bytes, so backups of them race to store the same chunks.
pub fn sources_sharing_a_file(dir: &Path, n: u64, seed: u64, common: usize) -> Vec<PathBuf> {
    let mut shared = vec![0u8; common];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut shared);
    (0..n)
        .map(|i| {
            let src = dir.join(format!("src{i}"));
            make_tree(&src, seed + 1 + i, 1 << 20);
            fs::write(src.join("common.bin"), &shared).unwrap();
            src
        })
        .collect()
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

/// Whether a test's prerequisite is here. Under `CI=true` a missing one fails the test (`.ci/run`
/// installs every prerequisite); elsewhere the test says why it skips.
pub fn prerequisite(what: &str, available: bool) -> bool {
    if !available {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is missing, and under CI=true every prerequisite must be there (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {what} is missing");
    }
    available
}

/// A real S3 server (`s3s-fs`) on 127.0.0.1 serving a private directory; stopped when dropped.
pub struct S3Server {
    child: Child,
    root: tempfile::TempDir,
    endpoint: String,
}

const S3_ACCESS_KEY: &str = "cbcr-test";
const S3_SECRET_KEY: &str = "cbcr-test-secret";

impl S3Server {
    /// Starts one, or `None` (see [`prerequisite`]) when `s3s-fs` is not installed.
    pub fn start() -> Option<Self> {
        let root = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            prerequisite("s3s-fs (cargo install s3s-fs --locked --features binary --version 0.14.1)", false);
            return None;
        };
        let server = Self { child, root, endpoint: format!("http://127.0.0.1:{port}") };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not listen on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// Creates bucket `name` (a directory of the server's root); returns `s3://name`.
    pub fn bucket(&self, name: &str) -> String {
        fs::create_dir_all(self.root.path().join(name)).unwrap();
        format!("s3://{name}")
    }

    /// The file in which the server keeps object `key` of `bucket`.
    pub fn object_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// The variables that point cbcr at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// `cbcr` with `args`, pointed at this server, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = cbcr_command();
        cmd.args(args).env_remove("CBCR_REPO").env_remove("CBCR_FAULT").env_remove("CBCR_CORES");
        cmd.envs(self.env());
        cmd
    }

    /// Runs `cbcr` with `args` against this server, with extra variables.
    pub fn cbcr_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        cmd.output().expect("cbcr runs")
    }

    pub fn cbcr(&self, args: &[&str]) -> Output {
        self.cbcr_env(args, &[])
    }

    /// Runs `cbcr` against this server and asserts exit 0.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.cbcr(args);
        assert!(out.status.success(), "cbcr {args:?} failed: {}\n{}", out.status, text(&out.stderr));
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test's repository: a local directory, or a prefix of a bucket on an [`S3Server`] (which
/// keeps each object as a file, so [`Target::files`] serves both for looking at objects).
pub struct Target {
    pub url: String,
    files: PathBuf,
    /// The variables that point cbcr at it (an S3 server's, a receiver client's certificate).
    env: Vec<(&'static str, String)>,
}

impl Target {
    pub fn local(dir: &Path) -> Self {
        Self { url: s(dir).to_owned(), files: dir.to_owned(), env: vec![] }
    }

    /// `s3://BUCKET/PREFIX` on `server` (the bucket is created; the server must outlive it).
    pub fn s3(server: &S3Server, bucket: &str, prefix: &str) -> Self {
        let url = format!("{}/{prefix}", server.bucket(bucket));
        Self { url, files: server.object_file(bucket, prefix), env: server.env() }
    }

    /// A receiver's repository `url` (`quic://...`), reached as the client certificate `client`
    /// of `pki`; `files` is the directory the receiver serves.
    pub fn quic(url: String, files: &Path, pki: &Path, client: &str) -> Self {
        let file = |name: String| pki.join(name).to_string_lossy().into_owned();
        let env = vec![
            ("CBCR_CERT", file(format!("{client}.crt"))),
            ("CBCR_KEY", file(format!("{client}.key"))),
            ("CBCR_CA", file("ca.crt".into())),
        ];
        Self { url, files: files.to_owned(), env }
    }

    /// `cbcr` with `args` (no `--repo` added) and the variables that point it here, not yet
    /// started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = cbcr_command();
        cmd.args(args).env_remove("CBCR_REPO").env_remove("CBCR_FAULT").env_remove("CBCR_CORES");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Where the repository's objects are files: `files().join("packs")`, ...
    pub fn files(&self) -> &Path {
        &self.files
    }

    /// Runs cbcr with `args` and `--repo` this repository, with extra variables.
    pub fn cbcr_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut full = args.to_vec();
        full.extend(["--repo", &self.url]);
        self.command(&full).envs(env.iter().copied()).output().expect("cbcr runs")
    }

    pub fn cbcr(&self, args: &[&str]) -> Output {
        self.cbcr_env(args, &[])
    }

    /// Runs cbcr against this repository and asserts exit 0.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.cbcr(args);
        assert!(
            out.status.success(),
            "cbcr {args:?} --repo {} failed: {}\n{}",
            self.url,
            out.status,
            text(&out.stderr)
        );
        out
    }

    /// [`init_small`] here.
    pub fn init_small(&self) {
        self.ok(&[
            "init",
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

    /// Bytes of all pack objects.
    pub fn pack_bytes(&self) -> u64 {
        if self.files.join("packs").exists() {
            dir_size(&self.files.join("packs"))
        } else {
            0
        }
    }
}

/// The snapshot ids a `snapshots --json` listing prints, in its order.
pub fn snapshot_ids(listing: &Output) -> Vec<String> {
    text(&listing.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "snapshot")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Strings planted in [`marked_source`]: in a directory name, a file name, compressible text
/// and random bytes. None may appear in any object of an encrypted repository.
pub const MARKERS: [&str; 4] = ["MARKDIR-7f3a9c", "MARKNAME-2d8e6b", "MARKTEXT-5b1e2d", "MARKRAND-9c4f1a"];

/// A source under `dir` carrying [`MARKERS`]; returns its root.
pub fn marked_source(dir: &Path) -> PathBuf {
    let root = dir.join("marked");
    let inner = root.join(MARKERS[0]);
    fs::create_dir_all(&inner).unwrap();
    fs::write(inner.join("notes.txt"), format!("{} customer row\n", MARKERS[2]).repeat(50_000)).unwrap();
    // Random bytes do not compress, so they would be stored as they are without encryption.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut bytes = vec![0u8; 2 << 20];
    rng.fill_bytes(&mut bytes);
    for at in (0..bytes.len() - 64).step_by(4096) {
        bytes[at..at + MARKERS[3].len()].copy_from_slice(MARKERS[3].as_bytes());
    }
    fs::write(inner.join(format!("{}.bin", MARKERS[1])), bytes).unwrap();
    root
}

/// `file: marker` for every marker found in a file under `root`.
pub fn markers_in(root: &Path) -> Vec<String> {
    let mut found = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = fs::read(&path).unwrap();
            for marker in MARKERS {
                if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                    found.push(format!("{}: {marker}", path.display()));
                }
            }
        }
    }
    found
}

/// A `cbcr receiver` on 127.0.0.1 (a free port) with the receiver certificate of `pki`,
/// killed when dropped.
pub struct ReceiverProcess {
    pub child: Child,
    pub addr: String,
}

impl ReceiverProcess {
    /// Starts `cmd` (a cbcr command with its environment and where its stderr goes) as a
    /// receiver with `args` (what it serves: `--repo` or `--policy`, and more); returns once it
    /// listens.
    pub fn start(mut cmd: Command, pki: &Path, args: &[&str]) -> Self {
        let mut child = cmd
            .args(["receiver", "--listen", "127.0.0.1:0"])
            .args(args)
            .args(["--cert", s(&pki.join("receiver.crt")), "--key", s(&pki.join("receiver.key"))])
            .args(["--ca", s(&pki.join("ca.crt"))])
            .env_remove("CBCR_REPO")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("receiver said {line:?}"));
        Self { addr: addr.to_owned(), child }
    }

    /// `quic://ADDR`, or `quic://ADDR/NAME` for a repository named by a policy.
    pub fn url(&self, name: &str) -> String {
        match name {
            "" => format!("quic://{}", self.addr),
            name => format!("quic://{}/{name}", self.addr),
        }
    }

    /// Sends the receiver `signal` (SIGHUP: reload; SIGTERM: stop).
    pub fn signal(&self, signal: i32) {
        // SAFETY: no preconditions; the receiver is our child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` from the HTTP server at `addr` (a receiver's `--metrics`); the whole response,
/// which must be a 200.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    page
}

/// What changed between two copies of a directory: the tests' model of what an incremental of
/// the second after the first must store at most.
#[derive(Clone, Copy, Debug, Default)]
pub struct Changed {
    /// Changed pages (new ones included) of the files picked as page files.
    pub pages: u64,
    /// Bytes of the other changed files, whole.
    pub other: u64,
    /// What storing only those costs: each changed page compressed on its own (zstd -1), each
    /// other changed file compressed whole.
    pub compressed: u64,
}

/// [`Changed`] between `before` and `after`, with `page`-byte pages in the files `is_paged`
/// picks.
pub fn changed_pages(before: &Path, after: &Path, page: usize, is_paged: &dyn Fn(&Path) -> bool) -> Changed {
    let mut changed = Changed::default();
    let compressed = |b: &[u8]| zstd::bulk::compress(b, 1).unwrap().len() as u64;
    for entry in fs::read_dir(after).unwrap().flatten() {
        let path = entry.path();
        let old = before.join(path.file_name().unwrap());
        let md = fs::symlink_metadata(&path).unwrap();
        if md.is_dir() {
            let sub = changed_pages(&old, &path, page, is_paged);
            changed.pages += sub.pages;
            changed.other += sub.other;
            changed.compressed += sub.compressed;
        } else if md.is_file() {
            let (new_bytes, old_bytes) = (fs::read(&path).unwrap(), fs::read(&old).unwrap_or_default());
            if is_paged(&path) {
                for (i, p) in new_bytes.chunks(page).enumerate() {
                    if old_bytes.get(i * page..i * page + p.len()) != Some(p) {
                        changed.pages += 1;
                        changed.compressed += compressed(p);
                    }
                }
            } else if new_bytes != old_bytes {
                changed.other += new_bytes.len() as u64;
                changed.compressed += compressed(&new_bytes);
            }
        }
    }
    changed
}

/// The service, killed when dropped.
pub struct ControlProcess {
    pub child: Child,
    pub addr: String,
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlProcess {
    /// `cbcr-control serve` on 127.0.0.1 with `pki`'s control certificate, leases of 3 s, and
    /// `extra` arguments; returns once it listens.
    pub fn start(pki: &Path, store: &Path, roles: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(control_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--store", s(store), "--roles", s(roles)])
            .args(["--cert", s(&pki.join("control.crt")), "--key", s(&pki.join("control.key"))])
            .args(["--ca", s(&pki.join("ca.crt")), "--lease-ttl", "3s"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("serve said {line:?}")).to_owned();
        Self { child, addr }
    }

    /// `https://ADDR/v1/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}/v1/{path}", self.addr)
    }
}

/// An HTTPS client presenting `name`'s certificate from `pki`, trusting `ca_pki`'s CA.
pub fn https_client(pki: &Path, name: &str, ca_pki: &Path) -> ureq::Agent {
    let read = |p: PathBuf| fs::read(p).unwrap();
    let (cert, key, ca) =
        (read(pki.join(format!("{name}.crt"))), read(pki.join(format!("{name}.key"))), read(ca_pki.join("ca.crt")));
    let tls =
        wire::tls::client_config(wire::tls::Pem { cert: &cert, key: &key, ca: &ca }, wire::control::ALPN).unwrap();
    ureq::AgentBuilder::new().tls_config(Arc::new(tls)).timeout(Duration::from_secs(10)).build()
}
