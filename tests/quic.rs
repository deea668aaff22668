//! The QUIC data path with real processes on 127.0.0.1: a `cbcr receiver` and `cbcr` clients.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbcr_tests::*;
use rand::{RngCore, SeedableRng};
use wire::frame::{ErrorCode, Frame, FrameHeader, HEADER_LEN};

/// A receiver of one repository, killed when dropped.
struct Receiver(ReceiverProcess);

impl Receiver {
    fn start(repo: &Path, pki: &Path) -> Self {
        Self::start_with(repo, pki, &[])
    }

    fn start_with(repo: &Path, pki: &Path, extra: &[&str]) -> Self {
        Self::start_cmd(cbcr_command(), s(repo), pki, extra)
    }

    /// A receiver started from `cmd` (a binary with its environment), serving `repo`.
    fn start_cmd(mut cmd: Command, repo: &str, pki: &Path, extra: &[&str]) -> Self {
        let args: Vec<&str> = ["--repo", repo, "--grace", "5s"].into_iter().chain(extra.iter().copied()).collect();
        cmd.stderr(Stdio::null());
        Self(ReceiverProcess::start(cmd, pki, &args))
    }

    fn url(&self) -> String {
        self.0.url("")
    }

    fn kill(&mut self) {
        self.0.kill();
    }
}

impl std::ops::Deref for Receiver {
    type Target = ReceiverProcess;
    fn deref(&self) -> &ReceiverProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Receiver {
    fn deref_mut(&mut self) -> &mut ReceiverProcess {
        &mut self.0
    }
}

fn pki(dir: &Path) -> PathBuf {
    let out = dir.join("pki");
    ok(&["cert", "dev", "--out", s(&out)]);
    out
}

/// cbcr with the client certificate of `pki`.
fn client(args: &[&str], pki: &Path) -> Output {
    let (cert, key, ca) = (pki.join("client.crt"), pki.join("client.key"), pki.join("ca.crt"));
    cbcr_env(args, &[("CBCR_CERT", s(&cert)), ("CBCR_KEY", s(&key)), ("CBCR_CA", s(&ca))])
}

/// cbcr with the client certificate of `pki`, started in the background (stderr piped).
fn client_child(args: &[&str], pki: &Path, stdout: Stdio) -> Child {
    let (cert, key, ca) = (pki.join("client.crt"), pki.join("client.key"), pki.join("ca.crt"));
    cbcr_command()
        .args(args)
        .args(["--cert", s(&cert), "--key", s(&key), "--ca", s(&ca)])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn client_ok(args: &[&str], pki: &Path) -> Output {
    let out = client(args, pki);
    assert!(out.status.success(), "cbcr {args:?} failed: {}\n{}", out.status, text(&out.stderr));
    out
}

/// Half-received packs in the receiver's `tmp/`, once it has seen the client go: at once when
/// the client's close arrives, else at the QUIC idle timeout (15 s, `limits.rs`).
fn partial_packs(repo: &Path) -> usize {
    let count = || {
        fs::read_dir(repo.join("tmp"))
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("pack")).count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if count() > 0 {
        let names: Vec<_> = fs::read_dir(repo.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
        eprintln!("left in tmp/: {names:?}");
    }
    count()
}

#[test]
fn round_trip_over_quic_is_bit_exact_and_incrementals_send_nothing_known() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("src"), tmp.path().join("repo"), tmp.path().join("out"));
    let pki = pki(tmp.path());
    init_small(&repo);
    // big.db is 3.5 segments of the 1 MiB segment size.
    make_tree(&src, 1, 3_500_000);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let receiver = Receiver::start_with(&repo, &pki, &["--metrics", &metrics]);
    let url = receiver.url();
    let first = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json", "--pack-size", "1MiB"], &pki));
    assert!(first["bytes_new"].as_u64().unwrap() > 3_000_000, "{first}");
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // Only the changed page goes over the wire the second time.
    let mut big = fs::read(src.join("big.db")).unwrap();
    big[2_000_000] ^= 0xff;
    fs::write(src.join("big.db"), &big).unwrap();
    let second = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json"], &pki));
    assert!(second["bytes_new"].as_u64().unwrap() <= 64 << 10, "{second}");
    let listed = text(&client_ok(&["ls", "latest", "--repo", &url], &pki).stdout);
    assert!(listed.contains("big.db"), "{listed}");
    let snapshots = text(&client_ok(&["snapshots", "--repo", &url], &pki).stdout);
    assert_eq!(snapshots.lines().count(), 2, "{snapshots}");
    fs::remove_dir_all(&out).unwrap();
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    client_ok(&["verify", "--read-data", "--repo", &url], &pki);
    let page = http_get(&metrics, "/metrics");
    let counter = |name: &str| -> u64 {
        let line = page.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{page}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(counter("cbcr_receiver_commits_total"), 2);
    assert!(counter("cbcr_receiver_bytes_received_total") >= first["bytes_stored"].as_u64().unwrap());
    assert!(counter("cbcr_receiver_sessions_total") >= 7);
    assert!(counter("cbcr_receiver_blobs_sent_total") > 0);
    let packs_timed = page.lines().find(|l| l.starts_with("cbcr_receiver_request_seconds_count{stage=\"pack\"}"));
    assert!(packs_timed.is_some_and(|l| !l.ends_with(" 0")), "{page}");
    // The receiver's repository is an ordinary one.
    drop(receiver);
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
}

#[test]
fn block_deltas_written_locally_restore_over_quic() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo, out) = (tmp.path().join("data"), tmp.path().join("repo"), tmp.path().join("out"));
    let pki = pki(tmp.path());
    init_small(&repo);
    let rel = src.join("base/1/1259");
    fs::create_dir_all(rel.parent().unwrap()).unwrap();
    let mut pages = datagen::db_pages(3, 384); // 3 MiB of 8 KiB pages
    for generation in 0..3u8 {
        for p in (0..384).step_by(13) {
            pages[p * datagen::PAGE + 100] = generation;
        }
        fs::write(&rel, &pages).unwrap();
        ok(&["backup", "--repo", s(&repo), s(&src)]);
    }
    // Chains of two deltas; the receiver sends each blob as stored and the client rebuilds.
    let receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    client_ok(&["verify", "--read-data", "--repo", &url], &pki);
    // A remote backup makes a delta too, on top of the local chains (its base and the base's
    // chain read ahead through the receiver); the receiver rebuilds and checks it.
    pages[5 * datagen::PAGE + 100] ^= 0xff;
    fs::write(&rel, &pages).unwrap();
    let remote = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json"], &pki));
    assert!(remote["bytes_new"].as_u64().unwrap() < 16 << 10, "one changed page of a 64 KiB block: {remote}");
    fs::remove_dir_all(&out).unwrap();
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
}

/// The incrementals of a page file to a local repository, through a receiver and to a bucket
/// make the same block deltas: each grows the repository within 10% of the local one.
#[test]
fn incrementals_through_a_receiver_and_to_a_bucket_grow_as_a_local_one_does() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let src = tmp.path().join("data");
    let rel = src.join("base/1/1259");
    fs::create_dir_all(rel.parent().unwrap()).unwrap();
    let local = Target::local(&tmp.path().join("local"));
    let served = Target::local(&tmp.path().join("served"));
    let bucket = Target::s3(&server, "deltas", "repo");
    for target in [&local, &served, &bucket] {
        target.init_small();
    }
    let receiver = Receiver::start(served.files(), &pki);
    let url = receiver.url();
    let backup = |target: &Target| {
        let before = target.pack_bytes();
        if std::ptr::eq(target, &served) {
            client_ok(&["backup", "--repo", &url, s(&src)], &pki);
        } else {
            target.ok(&["backup", s(&src)]);
        }
        target.pack_bytes() - before
    };
    let mut pages = datagen::db_pages(8, 1024); // 8 MiB of 8 KiB pages
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for generation in 0..4u8 {
        // Scattered updates: a few bytes of a tuple and the page header change.
        for _ in 0..if generation == 0 { 0 } else { 60 } {
            let p = (rng.next_u32() % 1024) as usize * datagen::PAGE;
            pages[p..p + 8].fill(generation);
            pages[p + 3000..p + 3040].fill(generation.wrapping_mul(37));
        }
        fs::write(&rel, &pages).unwrap();
        let grew: Vec<u64> = [&local, &served, &bucket].into_iter().map(backup).collect();
        eprintln!(
            "generation {generation}: local {} B, through the receiver {} B, bucket {} B",
            grew[0], grew[1], grew[2]
        );
        if generation > 0 {
            for (what, g) in [("through the receiver", grew[1]), ("to the bucket", grew[2])] {
                assert!(
                    g.abs_diff(grew[0]) * 10 <= grew[0],
                    "generation {generation}: {what} the incremental grew the repository {g} bytes, locally {}",
                    grew[0]
                );
            }
        }
    }
    for (i, target) in [&local, &served, &bucket].into_iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        if std::ptr::eq(target, &served) {
            client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
        } else {
            target.ok(&["restore", "latest", "--target", s(&out)]);
        }
        assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    }
    client_ok(&["verify", "--read-data", "--repo", &url], &pki);
}

#[test]
fn thirty_two_clients_back_up_at_once_then_all_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let pki = pki(tmp.path());
    init_small(&repo);
    let receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();
    let sources: Vec<PathBuf> = (0..32)
        .map(|i| {
            let src = tmp.path().join(format!("src{i}"));
            // Seeds repeat, so clients also meet each other's chunks.
            make_tree(&src, i % 8, 300_000);
            src
        })
        .collect();
    let children: Vec<Child> = sources
        .iter()
        .map(|src| {
            client_child(&["backup", "--repo", &url, s(src), "--cores", "1", "--no-progress"], &pki, Stdio::null())
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a client failed: {}", text(&out.stderr));
    }
    let snapshots = text(&client_ok(&["snapshots", "--repo", &url, "--json"], &pki).stdout);
    assert_eq!(snapshots.lines().count(), 32);
    for src in &sources {
        let snap: serde_json::Value = snapshots
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["paths"][0] == s(src))
            .unwrap_or_else(|| panic!("no snapshot of {}", src.display()));
        let out = tmp.path().join("out").join(src.file_name().unwrap());
        client_ok(&["restore", snap["id"].as_str().unwrap(), "--repo", &url, "--target", s(&out)], &pki);
        assert_same_tree(src, &out.join(src.strip_prefix("/").unwrap()));
    }
    client_ok(&["verify", "--read-data", "--repo", &url], &pki);
}

/// A scratch directory with a source of one random file of `len` bytes, an initialised
/// repository and a development PKI.
fn random_source(len: usize, seed: u64) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let pki = pki(tmp.path());
    init_small(&repo);
    fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data.bin"), len, seed);
    (tmp, src, repo, pki)
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(path, &data).unwrap();
}

fn pack_bytes(repo: &Path) -> u64 {
    packs(repo).iter().map(|p| fs::metadata(p).unwrap().len()).sum()
}

/// Waits until the receiver holds at least `bytes` of packs.
fn wait_for_packs(repo: &Path, bytes: u64, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pack_bytes(repo) < bytes {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before it could be interrupted");
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill_9_of_the_client_mid_backup_then_the_rerun_resends_little() {
    let len = 96 << 20;
    let (_tmp, src, repo, pki) = random_source(len, 5);
    let receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();
    let mut child = client_child(&["backup", "--repo", &url, s(&src), "--pack-size", "2MiB"], &pki, Stdio::null());
    wait_for_packs(&repo, 24 << 20, &mut child);
    let killed_scratch = format!("cbcr-session-{}-", child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let durable = pack_bytes(&repo);
    assert_eq!(snapshot_count(&repo), 0, "a killed backup commits nothing");
    let rerun = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json", "--pack-size", "2MiB"], &pki));
    let left = fs::read_dir(std::env::temp_dir()).unwrap().flatten();
    let left: Vec<_> = left.filter(|e| e.file_name().to_string_lossy().starts_with(&killed_scratch)).collect();
    assert!(left.is_empty(), "the next client removes the killed one's scratch directory: {left:?}");
    // Random data does not compress: what was durable is not sent again, beyond the chunk
    // lists (never sent by the killed run) and the packs in flight at the kill.
    let sent = rerun["bytes_stored"].as_u64().unwrap();
    let resent = (durable + sent).saturating_sub(len as u64);
    eprintln!("kill -9 client: {durable} bytes durable at the kill, rerun sent {sent}, re-sent {resent}");
    let window = 2 * (1 << 20) + 6 * (2 << 20); // a segment per core + the packs in flight
    assert!(resent <= window, "re-sent {resent} bytes, more than the {window}-byte in-flight window");
    drop(receiver);
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
}

#[test]
fn kill_9_of_the_receiver_mid_backup_then_a_restarted_one_completes_it() {
    let len = 96 << 20;
    let (tmp, src, repo, pki) = random_source(len, 6);
    let out = tmp.path().join("out");
    let mut receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();
    let mut child = client_child(&["backup", "--repo", &url, s(&src), "--pack-size", "2MiB"], &pki, Stdio::null());
    wait_for_packs(&repo, 24 << 20, &mut child);
    receiver.kill();
    let failed = child.wait_with_output().unwrap();
    assert_eq!(failed.status.code(), Some(15), "the client names the lost receiver: {}", text(&failed.stderr));
    assert!(text(&failed.stderr).contains("network"), "{}", text(&failed.stderr));
    let durable = pack_bytes(&repo);
    assert_eq!(snapshot_count(&repo), 0);

    let receiver = Receiver::start(&repo, &pki);
    assert_eq!(partial_packs(&repo), 0, "a restarted receiver clears what was half-received");
    let url = receiver.url();
    let rerun = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json", "--pack-size", "2MiB"], &pki));
    let sent = rerun["bytes_stored"].as_u64().unwrap();
    eprintln!("kill -9 receiver: {durable} bytes durable at the kill, rerun sent {sent}");
    assert!(durable + sent <= len as u64 + 2 * (1 << 20) + 6 * (2 << 20), "durable {durable} + sent {sent}");
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
}

#[test]
fn clients_without_a_valid_certificate_are_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let pki = pki(tmp.path());
    make_tree(&src, 3, 100_000);
    let receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();

    // A client certificate from another CA (the client trusts the receiver's CA).
    let other = tmp.path().join("other");
    ok(&["cert", "dev", "--out", s(&other)]);
    let (cert, key, ca) = (other.join("client.crt"), other.join("client.key"), pki.join("ca.crt"));
    let env = [("CBCR_CERT", s(&cert)), ("CBCR_KEY", s(&key)), ("CBCR_CA", s(&ca))];
    let refused = cbcr_env(&["backup", "--repo", &url, s(&src)], &env);
    assert_eq!(refused.status.code(), Some(15), "{}", text(&refused.stderr));

    // An expired client certificate signed by the right CA.
    let expired = tmp.path().join("expired");
    dataplane::net::pki::write_dev_pki(&expired, true).unwrap();
    let expired_receiver = Receiver::start(&tmp.path().join("repo2"), &expired);
    let refused = client(&["snapshots", "--repo", &expired_receiver.url()], &expired);
    assert_eq!(refused.status.code(), Some(15), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("handshake"), "{}", text(&refused.stderr));

    // No client certificate at all.
    let (stream_err, _) = raw_session(&receiver.addr, &pki, false, ALL_VERSIONS, |_, _| async {});
    assert!(stream_err.is_some(), "a client without a certificate got a session");

    // The receiver still serves a proper client, and nothing was written by the others.
    assert_eq!(snapshot_count(&repo), 0);
    client_ok(&["backup", "--repo", &url, s(&src)], &pki);
    assert_eq!(snapshot_count(&repo), 1);
}

type Conn = quinn::Connection;

/// The protocol versions this cbcr speaks, as a `Hello` range.
const ALL_VERSIONS: (u8, u8) = (wire::frame::MIN_VERSION, wire::frame::VERSION);

/// Connects with (or without) the client certificate of `pki`, says `Hello` for the protocol
/// versions `min..=max`, and runs `talk` on the connection with the reply; returns the
/// handshake error, if any.
fn raw_session<F, Fut>(addr: &str, pki: &Path, with_cert: bool, (min, max): (u8, u8), talk: F) -> (Option<String>, ())
where
    F: FnOnce(Conn, Option<Frame>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let files = dataplane::net::quic::TlsFiles {
            cert: pki.join("client.crt"),
            key: pki.join("client.key"),
            ca: pki.join("ca.crt"),
        };
        let config = if with_cert {
            dataplane::net::quic::client_config(&files).unwrap()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            let pem = fs::read(&files.ca).unwrap();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.unwrap()).unwrap();
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![wire::frame::ALPN.to_vec()];
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
            quinn::ClientConfig::new(Arc::new(crypto))
        };
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let conn = match endpoint.connect(addr.parse().unwrap(), "localhost").unwrap().await {
            Ok(c) => c,
            Err(e) => return (Some(e.to_string()), ()),
        };
        // TLS 1.3 clients learn of a refused certificate only on their first use of the connection.
        let probe = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let hello = Frame::Hello { min, max, client: "probe".into(), repository: String::new() };
            send.write_all(&hello.encode_in(min.clamp(wire::frame::MIN_VERSION, wire::frame::VERSION)))
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
        };
        let reply = match probe.await {
            Ok(reply) => reply,
            Err(e) => return (Some(e), ()),
        };
        talk(conn.clone(), decode_reply(&reply)).await;
        conn.close(0u32.into(), b"");
        (None, ())
    })
}

/// Sends `bytes` on a new stream and returns the reply frame, if one came.
async fn send_raw(conn: &Conn, bytes: &[u8], finish: bool) -> Option<Frame> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    } else {
        let _ = send.reset(1u32.into());
    }
    decode_reply(&recv.read_to_end(1 << 20).await.ok()?)
}

/// The first frame of a reply.
fn decode_reply(reply: &[u8]) -> Option<Frame> {
    let header: [u8; HEADER_LEN] = reply.get(..HEADER_LEN)?.try_into().ok()?;
    let (kind, version, len) = FrameHeader::decode(&header).ok()?;
    Frame::decode(kind, version, reply.get(HEADER_LEN..HEADER_LEN + len as usize)?).ok()
}

#[test]
fn garbage_frames_and_dropped_packs_end_only_their_own_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let pki = pki(tmp.path());
    make_tree(&src, 4, 100_000);
    // Plaintext, so that a hand-made snapshot record opens and reaches the receiver's checks
    // (an encrypted repository refuses it as not authentic: the test below).
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    let receiver = Receiver::start(&repo, &pki);
    let (err, _) = raw_session(&receiver.addr, &pki, true, ALL_VERSIONS, |conn, _| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..50 {
            let mut junk = vec![0u8; 1 + (rng.next_u32() % 300) as usize];
            rng.fill_bytes(&mut junk);
            if let Some(reply) = send_raw(&conn, &junk, true).await {
                assert!(matches!(reply, Frame::Error { .. }), "garbage got {reply:?}");
            }
        }
        // A length field of 2^32-1 ("negative") is refused before anything is allocated.
        let mut huge = Frame::ListSnapshots { session: 1 }.encode();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let reply = send_raw(&conn, &huge, true).await;
        assert!(matches!(reply, Some(Frame::Error { code: ErrorCode::BadFrame, .. })), "{reply:?}");
        // A reply kind (a blob, up to 64 MiB) is no request: refused from its header alone,
        // the payload never sent, nothing allocated for it.
        let mut blob = Frame::ListSnapshots { session: 1 }.encode();
        blob[..4].copy_from_slice(&(60u32 << 20).to_le_bytes());
        blob[4] = wire::frame::FrameKind::Blob as u8;
        let reply = send_raw(&conn, &blob[..HEADER_LEN], true).await;
        assert!(
            matches!(&reply, Some(Frame::Error { code: ErrorCode::BadFrame, message }) if message.contains("not a request")),
            "{reply:?}"
        );
        // A pack that lists one blob twice (it once panicked the receiver under its publish
        // lock, failing every later pack): refused for this stream, the receiver fine after.
        let pack_with = |blobs: &[(wire::ChunkId, wire::BlobKind, &[u8])]| {
            let mut pack = wire::pack::PackHeader::encode().to_vec();
            let mut entries = vec![];
            for &(id, kind, bytes) in blobs {
                let (at, len) = (pack.len() as u64, bytes.len() as u32);
                entries.push(wire::pack::PackEntry::new(id, at, len, len, kind, wire::Compression::None));
                pack.extend_from_slice(bytes);
            }
            let off = pack.len() as u64;
            pack.extend(wire::pack::encode_trailer(&entries, off));
            let mut put = Frame::PutPack { session: 1 }.encode();
            put.extend(pack);
            put
        };
        let pack_of = |ids: &[wire::ChunkId]| {
            let blobs: Vec<_> = ids.iter().map(|id| (*id, wire::BlobKind::Data, &b"abc"[..])).collect();
            pack_with(&blobs)
        };
        let (five, six) = (wire::ChunkId([5; 32]), wire::ChunkId([6; 32]));
        let reply = send_raw(&conn, &pack_of(&[five, five]), true).await;
        assert!(
            matches!(&reply, Some(Frame::Error { code: ErrorCode::BadPack, message }) if message.contains("listed twice")),
            "{reply:?}"
        );
        // Garbage under the id of data another client has not backed up yet: a receiver that
        // holds the key (here: a plaintext repository) hashes every blob it is sent.
        let reply = send_raw(&conn, &pack_of(&[six]), true).await;
        assert!(
            matches!(&reply, Some(Frame::Error { code: ErrorCode::BadPack, message }) if message.contains("does not match its id")),
            "{reply:?}"
        );
        // A block delta on a base the repository does not have, under the id of data another
        // client has not backed up yet: the receiver rebuilds every delta on its base before
        // it publishes the pack, so the forgery is refused (before deltas went through
        // receivers, a delta was not checked at all).
        let (base, block) = (vec![0u8; 8192], vec![1u8; 8192]);
        let mut delta = vec![];
        wire::delta::encode(wire::ChunkId([7; 32]), 1, 8192, &base, &block, &mut delta);
        let reply = send_raw(&conn, &pack_with(&[(wire::ChunkId([8; 32]), wire::BlobKind::Delta, &delta)]), true).await;
        assert!(
            matches!(&reply, Some(Frame::Error { code: ErrorCode::BadPack, message }) if message.contains("its base")),
            "{reply:?}"
        );
        // A request for a session this connection never opened.
        let reply = send_raw(&conn, &Frame::Have { session: 4242, ids: vec![] }.encode(), true).await;
        assert!(matches!(reply, Some(Frame::Error { code: ErrorCode::UnknownSession, .. })), "{reply:?}");
        // A pack whose sender goes away halfway, and bytes that are not a pack.
        let put = Frame::PutPack { session: 1 }.encode();
        let mut half = put.clone();
        half.extend(vec![7u8; 300_000]);
        let _ = send_raw(&conn, &half, false).await;
        let mut wrong = put;
        wrong.extend(vec![7u8; 1 << 20]);
        let reply = send_raw(&conn, &wrong, true).await;
        assert!(matches!(reply, Some(Frame::Error { .. })), "{reply:?}");
        // A commit of a snapshot whose tree the receiver does not have.
        let snap = wire::repo::Snapshot {
            version: wire::repo::VERSION,
            time: "2026-01-01T00:00:00Z".into(),
            host: "h".into(),
            paths: vec!["/x".into()],
            tree: wire::ChunkId([9; 32]).to_hex(),
            parent: None,
            stats: Default::default(),
            repaired: None,
            db: None,
            job: None,
        };
        let commit = Frame::Commit { session: 1, record: snap.encode(), fence: None, root: None };
        let reply = send_raw(&conn, &commit.encode(), true).await;
        assert!(matches!(reply, Some(Frame::Error { code: ErrorCode::Incomplete, .. })), "{reply:?}");
    });
    assert!(err.is_none(), "{err:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(partial_packs(&repo), 0, "half-sent and bad packs are removed");
    assert_eq!(packs(&repo).len(), 0, "nothing half-sent became visible");
    assert_eq!(snapshot_count(&repo), 0);
    client_ok(&["backup", "--repo", &receiver.url(), s(&src)], &pki);
    client_ok(&["verify", "--read-data", "--repo", &receiver.url()], &pki);
}

#[test]
fn sigterm_lets_the_open_session_finish_and_the_receiver_speaks_sd_notify() {
    let (tmp, src, repo, pki) = random_source(64 << 20, 8);
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // As systemd does: WATCHDOG_PID names the service's own process (`exec` keeps the pid).
    let mut receiver = Command::new("sh")
        .env("CBCR_PASSWORD", PASSWORD)
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", s(cbcr_bin())])
        .args(["receiver", "--listen", "127.0.0.1:0", "--repo", s(&repo), "--grace", "20s"])
        .args(["--cert", s(&pki.join("receiver.crt")), "--key", s(&pki.join("receiver.key"))])
        .args(["--ca", s(&pki.join("ca.crt"))])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "20000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(receiver.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = format!("quic://{}", line.trim().strip_prefix("listening on ").unwrap());
    let mut messages = String::new();
    let mut buf = [0u8; 256];
    // READY once listening, then watchdog pings every 10 ms.
    while !(messages.contains("READY=1") && messages.matches("WATCHDOG=1").count() >= 2) {
        let n = notify.recv(&mut buf).expect("the receiver notifies");
        messages += &String::from_utf8_lossy(&buf[..n]);
        messages.push('\n');
    }
    // Nobody reads the notify socket now until the backup is done: it is full within 100 ms,
    // as under a service manager that stalls, and the receiver must go on serving.
    let mut backup =
        client_child(&["backup", "--repo", &url, s(&src), "--cores", "1", "--pack-size", "1MiB"], &pki, Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(30);
    while packs(&repo).is_empty() {
        assert!(Instant::now() < deadline, "no pack arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(receiver.id() as i32, libc::SIGTERM) };
    let finished = exit_within(&mut backup, Duration::from_secs(60), "the backup (a stalled receiver?)");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut backup.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(finished.success(), "the open session finished: {stderr}");
    // Read again, as the manager does: STOPPING goes out and the receiver stops cleanly.
    while let Ok(n) = notify.recv(&mut buf) {
        messages += &String::from_utf8_lossy(&buf[..n]);
        if messages.contains("STOPPING=1") {
            break;
        }
    }
    let status = exit_within(&mut receiver, Duration::from_secs(30), "the receiver after SIGTERM");
    assert!(status.success(), "the receiver stops cleanly on SIGTERM: {status}");
    assert!(messages.contains("STOPPING=1"), "{messages}");
    assert_eq!(snapshot_count(&repo), 1);
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
}

/// Waits for `child` to exit; kills it and fails the test after `within`.
fn exit_within(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_full_disk_on_the_receiver_is_a_clear_error_and_other_backups_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let mounted = small_tmpfs(&repo, "6m");
    if !prerequisite("a small tmpfs (mounting needs root and mount permission)", mounted.is_some()) {
        return;
    }
    let pki = pki(tmp.path());
    init_small(&repo);
    let receiver = Receiver::start(&repo, &pki);
    let url = receiver.url();
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small.txt"), b"fits").unwrap();
    client_ok(&["backup", "--repo", &url, s(&src)], &pki);
    random_file(&src.join("big.bin"), 12 << 20, 10);
    let full = client(&["backup", "--repo", &url, s(&src), "--pack-size", "1MiB"], &pki);
    assert_eq!(full.status.code(), Some(14), "{}", text(&full.stderr));
    assert!(text(&full.stderr).contains("no space left"), "{}", text(&full.stderr));
    assert_eq!(snapshot_count(&repo), 1, "no partial snapshot");
    assert_eq!(partial_packs(&repo), 0, "the refused pack's partial file is gone");
    fs::remove_file(src.join("big.bin")).unwrap();
    client_ok(&["backup", "--repo", &url, s(&src)], &pki);
    assert_eq!(snapshot_count(&repo), 2);
    client_ok(&["verify", "--read-data", "--repo", &url], &pki);
}

#[test]
fn two_receivers_in_front_of_one_bucket_serve_four_clients_at_once() {
    let Some(server) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let bucket = Target::s3(&server, "gateway", "repo");
    bucket.init_small();
    let receivers: Vec<_> = (0..2).map(|_| Receiver::start_cmd(server.command(&[]), &bucket.url, &pki, &[])).collect();
    let sources = sources_sharing_a_file(tmp.path(), 4, 50, 1 << 20);
    // Two clients per receiver, all at once.
    let children: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| {
            let url = receivers[i % 2].url();
            client_child(&["backup", "--repo", &url, s(src), "--json", "--pack-size", "256KiB"], &pki, Stdio::piped())
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(snapshot_count(bucket.files()), 4);
    // Each snapshot restores bit-exact through the receiver that did not store it, which
    // learns the other's index runs from the bucket.
    let listing = text(&client_ok(&["snapshots", "--json", "--repo", &receivers[0].url()], &pki).stdout);
    assert_eq!(listing.lines().count(), 4, "{listing}");
    for (i, src) in sources.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let url = receivers[(i + 1) % 2].url();
        let id = listing
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|snap| snap["paths"][0] == s(src))
            .map(|snap| snap["id"].as_str().unwrap().to_owned())
            .unwrap();
        client_ok(&["restore", &id[..16], "--repo", &url, "--target", s(&out)], &pki);
        assert_same_tree(src, &out.join(src.strip_prefix("/").unwrap()));
    }
    drop(receivers);
    bucket.ok(&["verify", "--read-data"]);
}

#[test]
fn protocol_versions_are_negotiated_and_fenced_commits_refused() {
    use wire::frame::{Fence, MIN_VERSION, VERSION};
    let tmp = tempfile::tempdir().unwrap();
    let (src, repo) = (tmp.path().join("src"), tmp.path().join("repo"));
    let pki = pki(tmp.path());
    make_tree(&src, 12, 100_000);
    // Plaintext: a client of version 1 or 2 is served only a plaintext repository (it would
    // need the key itself); an encrypted one refuses it (the test below).
    ok(&["init", "--insecure-no-encryption", "--repo", s(&repo)]);
    let receiver = Receiver::start(&repo, &pki);
    client_ok(&["backup", "--repo", &receiver.url(), s(&src)], &pki);
    const { assert!(VERSION > MIN_VERSION, "the receiver speaks N and N+1") };

    // A client that speaks only the oldest version gets it, and is answered in it.
    let (err, _) = raw_session(&receiver.addr, &pki, true, (MIN_VERSION, MIN_VERSION), |conn, welcome| async move {
        let Some(Frame::Welcome { version, session, .. }) = welcome else { panic!("{welcome:?}") };
        assert_eq!(version, MIN_VERSION);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&Frame::ListSnapshots { session }.encode_in(MIN_VERSION)).await.unwrap();
        send.finish().unwrap();
        let reply = recv.read_to_end(1 << 20).await.unwrap();
        let (_, version, _) = FrameHeader::decode(reply[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(version, MIN_VERSION, "replies come in the agreed version");
        assert!(matches!(decode_reply(&reply), Some(Frame::SnapshotRecord { .. })));
    });
    assert!(err.is_none(), "{err:?}");

    // One that speaks only newer versions is told which this receiver speaks.
    let (err, _) = raw_session(&receiver.addr, &pki, true, (VERSION + 1, VERSION + 3), |conn, welcome| async move {
        let Some(Frame::Error { code, message }) = welcome else { panic!("{welcome:?}") };
        assert_eq!(code, ErrorCode::Version);
        assert!(message.contains(&format!("speaks {MIN_VERSION} to {VERSION}")), "{message}");
        // A frame whose header is of a newer version, and one of an unknown kind.
        let mut newer = Frame::ListSnapshots { session: 1 }.encode();
        newer[5] = VERSION + 1;
        let reply = send_raw(&conn, &newer, true).await;
        assert!(matches!(&reply, Some(Frame::Error { code: ErrorCode::Version, .. })), "{reply:?}");
        let mut unknown = Frame::ListSnapshots { session: 1 }.encode();
        unknown[4] = 200;
        let reply = send_raw(&conn, &unknown, true).await;
        let Some(Frame::Error { code: ErrorCode::BadFrame, message }) = reply else { panic!("{reply:?}") };
        assert!(message.contains("unknown frame kind 200"), "{message}");
    });
    assert!(err.is_none(), "{err:?}");

    // Fencing: a commit whose token is lower than one accepted for the same job is refused.
    let record = {
        let out = client_ok(&["snapshots", "--json", "--repo", &receiver.url()], &pki);
        let id = last_json(&out)["id"].as_str().unwrap().to_owned();
        fs::read(repo.join("snapshots").join(id)).unwrap()
    };
    let (err, _) = raw_session(&receiver.addr, &pki, true, ALL_VERSIONS, |conn, welcome| async move {
        let Some(Frame::Welcome { version: VERSION, session, .. }) = welcome else { panic!("{welcome:?}") };
        let commit = |job: &str, token| {
            let fence = Some(Fence { job: job.into(), token });
            Frame::Commit { session, record: record.clone(), fence, root: None }.encode()
        };
        for (job, token, accepted) in [
            ("db1", 5, true),
            ("db1", 3, false),
            ("db1", 5, true),
            ("db2", 1, true),
            ("db1", 6, true),
            ("db1", 5, false),
        ] {
            let reply = send_raw(&conn, &commit(job, token), true).await;
            match reply {
                Some(Frame::Committed { .. }) if accepted => {}
                Some(Frame::Error { code: ErrorCode::Fenced, ref message }) if !accepted => {
                    assert!(message.contains("lost its claim"), "{message}");
                }
                other => panic!("{job} token {token}: {other:?}"),
            }
        }
    });
    assert!(err.is_none(), "{err:?}");
}

#[test]
fn an_encrypted_repository_through_a_receiver_holds_no_plaintext_and_no_key_is_sent() {
    use wire::frame::{WelcomeKeys, MIN_VERSION};
    let tmp = tempfile::tempdir().unwrap();
    let (repo, out) = (tmp.path().join("repo"), tmp.path().join("out"));
    let pki = pki(tmp.path());
    let src = marked_source(tmp.path());
    let receiver = Receiver::start(&repo, &pki);
    client_ok(&["backup", "--repo", &receiver.url(), s(&src)], &pki);
    assert_eq!(markers_in(&repo), Vec::<String>::new());
    client_ok(&["restore", "latest", "--repo", &receiver.url(), "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // The Welcome carries the key slots as stored: wrapped, nothing a client could use
    // without the password.
    let (err, _) = raw_session(&receiver.addr, &pki, true, ALL_VERSIONS, |_, welcome| async move {
        let Some(Frame::Welcome { keys: WelcomeKeys::Objects(objects), .. }) = welcome else { panic!("{welcome:?}") };
        assert!(!objects.is_empty());
        for (name, bytes) in objects {
            let slot = wire::crypto::KeySlot::decode(&bytes).unwrap_or_else(|e| panic!("slot {name}: {e}"));
            assert_eq!(slot.kdf.algorithm, "argon2id");
        }
    });
    assert!(err.is_none(), "{err:?}");
    // A client too old to open slots is refused, not handed a key.
    let (err, _) = raw_session(&receiver.addr, &pki, true, (MIN_VERSION, MIN_VERSION), |_, welcome| async move {
        assert!(matches!(welcome, Some(Frame::Error { code: ErrorCode::Version, .. })), "{welcome:?}");
    });
    assert!(err.is_none(), "{err:?}");
    // The client opens the slots itself: a wrong password fails on the client (exit 16).
    let (cert, key, ca) = (pki.join("client.crt"), pki.join("client.key"), pki.join("ca.crt"));
    let env = [("CBCR_CERT", s(&cert)), ("CBCR_KEY", s(&key)), ("CBCR_CA", s(&ca)), ("CBCR_PASSWORD", "not it")];
    let bad = cbcr_env(&["snapshots", "--repo", &receiver.url()], &env);
    assert_eq!(bad.status.code(), Some(16), "{}", text(&bad.stderr));
}

#[test]
fn the_receiver_writes_an_audit_trail_as_json_lines() {
    let (tmp, src, repo, pki) = random_source(4 << 20, 21);
    let log_path = tmp.path().join("receiver.log");
    let mut receiver = cbcr_command()
        .args(["receiver", "--listen", "127.0.0.1:0", "--repo", s(&repo), "--log-format", "json"])
        .args(["--cert", s(&pki.join("receiver.crt")), "--key", s(&pki.join("receiver.key"))])
        .args(["--ca", s(&pki.join("ca.crt"))])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(receiver.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let url = format!("quic://{addr}");
    let backup = last_json(&client_ok(&["backup", "--repo", &url, s(&src), "--json"], &pki));
    client_ok(&["restore", "latest", "--repo", &url, "--target", s(&tmp.path().join("out"))], &pki);
    client_ok(&["verify", "--repo", &url], &pki);
    let (err, _) = raw_session(&addr, &pki, true, ALL_VERSIONS, |conn, _| async move {
        send_raw(&conn, b"not a frame at all", true).await;
    });
    assert!(err.is_none(), "{err:?}");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: no preconditions; the receiver is our child.
    unsafe { libc::kill(receiver.id() as i32, libc::SIGTERM) };
    assert!(receiver.wait().unwrap().success());

    let log = fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let audit: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "audit").collect();
    let events = |name: &str| audit.iter().filter(|l| l["fields"]["event"] == name).collect::<Vec<_>>();
    let sessions = events("session");
    assert!(sessions.len() >= 4, "a session for each client and the raw one: {log}");
    let cert = sessions[0]["fields"]["cert"].as_str().unwrap().to_owned();
    assert_eq!(cert.len(), 16, "a certificate fingerprint: {cert}");
    for event in ["commit", "read", "list", "verify", "refused"] {
        let found = events(event);
        assert!(!found.is_empty(), "no {event} event in {log}");
        assert!(found.iter().all(|e| e["fields"]["cert"] == cert.as_str()), "{event} names the certificate: {found:?}");
    }
    assert_eq!(events("commit")[0]["fields"]["snapshot"], backup["snapshot_id"]);
}

#[test]
fn a_receiver_without_the_password_serves_sealed_objects_and_never_opens_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, empty, out) = (tmp.path().join("repo"), tmp.path().join("empty"), tmp.path().join("out"));
    let pki = pki(tmp.path());
    let src = marked_source(tmp.path());
    // Created on the store by someone who has the password; the receiver never gets it.
    ok(&["init", "--repo", s(&repo)]);
    let keyless = || {
        let mut cmd = cbcr_command();
        cmd.env_remove("CBCR_PASSWORD");
        cmd
    };
    let receiver = Receiver::start_cmd(keyless(), s(&repo), &pki, &[]);
    let first = last_json(&client_ok(&["backup", "--repo", &receiver.url(), s(&src), "--json"], &pki));
    let second = last_json(&client_ok(&["backup", "--repo", &receiver.url(), s(&src), "--json"], &pki));
    assert_eq!(second["parent"], first["snapshot_id"], "the parent is found through the keyless receiver");
    assert_eq!(second["bytes_new"], 0);
    client_ok(&["restore", "latest", "--repo", &receiver.url(), "--target", s(&out)], &pki);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));
    assert_eq!(markers_in(&repo), Vec::<String>::new());
    // Verify needs the keys: refused with the way to do it, which works on the store.
    let verify = client(&["verify", "--repo", &receiver.url()], &pki);
    assert!(!verify.status.success());
    assert!(text(&verify.stderr).contains("holds no key"), "{}", text(&verify.stderr));
    ok(&["verify", "--read-data", "--repo", s(&repo)]);
    // Nothing to encrypt under: a keyless receiver does not create a repository.
    let refused = keyless()
        .args(["receiver", "--listen", "127.0.0.1:0", "--repo", s(&empty)])
        .args(["--cert", s(&pki.join("receiver.crt")), "--key", s(&pki.join("receiver.key"))])
        .args(["--ca", s(&pki.join("ca.crt"))])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("cbcr init"), "{}", text(&refused.stderr));
}

#[test]
fn one_certificate_cannot_take_every_session() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let pki = pki(tmp.path());
    ok(&["init", "--repo", s(&repo)]);
    ok(&["cert", "issue", "other-host", "--pki", s(&pki)]);
    let receiver = Receiver::start(&repo, &pki);
    let per_identity = dataplane::limits::RECEIVER_SESSIONS_PER_IDENTITY;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let files = |name: &str| dataplane::net::quic::TlsFiles {
            cert: pki.join(format!("{name}.crt")),
            key: pki.join(format!("{name}.key")),
            ca: pki.join("ca.crt"),
        };
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(dataplane::net::quic::client_config(&files("client")).unwrap());
        let hello = Frame::Hello { min: 1, max: wire::frame::VERSION, client: "hog".into(), repository: String::new() };
        let say_hello = |conn: quinn::Connection| {
            let hello = hello.encode();
            async move {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&hello).await.map_err(|e| e.to_string())?;
                send.finish().map_err(|e| e.to_string())?;
                recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
            }
        };
        let addr: std::net::SocketAddr = receiver.addr.parse().unwrap();
        let mut held = vec![];
        for _ in 0..per_identity {
            let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
            let reply = say_hello(conn.clone()).await.unwrap();
            assert!(matches!(decode_reply(&reply), Some(Frame::Welcome { .. })));
            held.push(conn);
        }
        let extra = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        assert!(say_hello(extra.clone()).await.is_err(), "a session past the share of one certificate");
        let reason = extra.close_reason().map(|r| r.to_string()).unwrap_or_default();
        assert!(reason.contains("too many sessions open for this client certificate"), "{reason}");
        // Another identity still gets in while the first holds its share.
        let other = endpoint
            .connect_with(dataplane::net::quic::client_config(&files("other-host")).unwrap(), addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(decode_reply(&say_hello(other).await.unwrap()), Some(Frame::Welcome { .. })));
        // A closed session gives its slot back.
        held.pop().unwrap().close(0u32.into(), b"");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        assert!(matches!(decode_reply(&say_hello(again).await.unwrap()), Some(Frame::Welcome { .. })));
    });
}

/// A session that opens no request for `--idle-timeout` is closed by the receiver (QUIC
/// keep-alives do not keep it), so idle sessions cannot hold the session limit (a closed
/// session's slot comes back: `one_certificate_cannot_take_every_session`); a session with
/// requests stays open.
#[test]
fn idle_sessions_are_closed_and_busy_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let pki = pki(tmp.path());
    ok(&["init", "--repo", s(&repo)]);
    let receiver = Receiver::start_with(&repo, &pki, &["--idle-timeout", "2s"]);
    let (err, ()) = raw_session(&receiver.addr, &pki, true, (1, wire::frame::VERSION), |conn, welcome| async move {
        assert!(matches!(welcome, Some(Frame::Welcome { .. })), "{welcome:?}");
        // Busy: a request every second keeps the session open past the timeout.
        let hello =
            Frame::Hello { min: 1, max: wire::frame::VERSION, client: "busy".into(), repository: String::new() };
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(conn.close_reason().is_none(), "closed while requests came: {:?}", conn.close_reason());
            let _ = send_raw(&conn, &hello.encode(), true).await;
        }
        // Idle: closed within the timeout and a little.
        let closed = tokio::time::timeout(Duration::from_secs(6), conn.closed()).await;
        let reason = closed.expect("an idle session is closed").to_string();
        assert!(reason.contains("idle session closed by the receiver"), "{reason}");
    });
    assert!(err.is_none(), "{err:?}");
    let refused = cbcr(&["receiver", "--repo", s(&repo), "--idle-timeout", "10ms"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("at least 1s"), "{}", text(&refused.stderr));
}

#[test]
fn a_receiver_that_does_not_answer_is_reported_as_unreachable() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    // A UDP port nobody serves: bound here and kept silent.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!("quic://{}", silent.local_addr().unwrap());
    let out = client(&["snapshots", "--repo", &url], &pki);
    assert_eq!(out.status.code(), Some(15), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("no answer") && !err.contains("handshake"), "{err}");
}
