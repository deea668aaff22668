//! Tenants and roles on one receiver: a policy file names the repositories it serves and what
//! each client certificate may do on them; revoked certificates are refused at the handshake.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cbcr_tests::*;

const PASSWORD_B: &str = "tenant b's own password";

/// cbcr as the client certificate `name` of `pki`, with `password`.
fn as_client(name: &str, pki: &Path, password: &str, args: &[&str]) -> Output {
    let (cert, key, ca) = (pki.join(format!("{name}.crt")), pki.join(format!("{name}.key")), pki.join("ca.crt"));
    cbcr_env(args, &[("CBCR_CERT", s(&cert)), ("CBCR_KEY", s(&key)), ("CBCR_CA", s(&ca)), ("CBCR_PASSWORD", password)])
}

fn ok_as(name: &str, pki: &Path, password: &str, args: &[&str]) -> serde_json::Value {
    let out = as_client(name, pki, password, args);
    assert!(out.status.success(), "{name}: cbcr {args:?}: {}\n{}", out.status, text(&out.stderr));
    last_json(&out)
}

/// Asserts that `out` was denied by the policy (exit 17) with a message holding `says`.
fn denied(out: &Output, says: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(17), "{err}");
    assert!(err.contains(says), "expected {says:?} in: {err}");
}

fn policy_text(a: &Path, b: &Path, extra: &str) -> String {
    format!(
        r#"
[repositories.a]
store = "{}"
[repositories.b]
store = "{}"

[[grants]]
identity = "db1.tenant-a"
repository = "a"
allow = ["backup", "restore", "list"]

[[grants]]
identity = "db2.tenant-a"
repository = "a"
allow = ["backup", "restore", "list"]

[[grants]]
identity = "ops.tenant-a"
repository = "a"
allow = ["list", "forget"]
writes_as = []

[[grants]]
identity = "db1.tenant-b"
repository = "b"
allow = ["backup", "restore", "list", "forget"]

[[grants]]
identity = "gone.tenant-a"
repository = "a"
allow = ["backup", "restore", "list"]
{extra}"#,
        a.display(),
        b.display()
    )
}

/// Waits until the receiver's log holds `needle` (it acts on SIGHUP in its own time).
fn wait_for_log(log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fs::read_to_string(log).unwrap_or_default().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in the receiver's log: {}", fs::read_to_string(log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_tenants_on_one_receiver_are_kept_apart_by_its_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let pki: PathBuf = tmp.path().join("pki");
    ok(&["cert", "dev", "--out", s(&pki)]);
    for name in ["db1.tenant-a", "db2.tenant-a", "ops.tenant-a", "db1.tenant-b", "gone.tenant-a", "stranger"] {
        ok(&["cert", "issue", name, "--pki", s(&pki)]);
    }
    // A revocation list exists before anyone is revoked: the receiver is started with it.
    ok(&["cert", "issue", "never-used", "--pki", s(&pki)]);
    ok(&["cert", "revoke", "never-used", "--pki", s(&pki)]);
    // Each tenant's repository is made by the tenant, under its own password.
    ok(&["init", "--repo", s(&a)]);
    let init_b = cbcr_env(&["init", "--repo", s(&b)], &[("CBCR_PASSWORD", PASSWORD_B)]);
    assert!(init_b.status.success(), "{}", text(&init_b.stderr));
    let policy = tmp.path().join("policy.toml");
    fs::write(&policy, policy_text(&a, &b, "")).unwrap();

    // A policy that does not parse keeps a receiver from starting, naming the file.
    let broken = tmp.path().join("broken.toml");
    fs::write(&broken, "[[grants]]\nidentity = \"x\"\nrepository = \"nowhere\"\nallow = [\"list\"]\n").unwrap();
    let refused = cbcr_command()
        .args(["receiver", "--listen", "127.0.0.1:0", "--policy", s(&broken)])
        .args(["--cert", s(&pki.join("receiver.crt")), "--key", s(&pki.join("receiver.key")), "--ca"])
        .arg(pki.join("ca.crt"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("broken.toml") && text(&refused.stderr).contains("nowhere"));

    // The storage host holds no password: it stores what tenants seal.
    let log = tmp.path().join("receiver.log");
    let mut cmd = cbcr_command();
    cmd.env_remove("CBCR_PASSWORD").stderr(fs::File::create(&log).unwrap());
    let crl = pki.join("crl.pem");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let args = ["--policy", s(&policy), "--crl", s(&crl), "--log-format", "json", "--metrics", &metrics];
    let receiver = ReceiverProcess::start(cmd, &pki, &args);
    let (url_a, url_b) = (receiver.url("a"), receiver.url("b"));
    let src = marked_source(tmp.path());

    let a1 = ok_as("db1.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, s(&src), "--json"]);
    let b1 = ok_as("db1.tenant-b", &pki, PASSWORD_B, &["backup", "--repo", &url_b, s(&src), "--json"]);
    assert!(a1["parent"].is_null() && b1["parent"].is_null());

    // Tenant a's certificate reaches nothing of tenant b's, whatever it tries.
    let a_on_b = |args: &[&str]| as_client("db1.tenant-a", &pki, PASSWORD, args);
    denied(&a_on_b(&["snapshots", "--repo", &url_b]), "\"db1.tenant-a\" has no grant on repository \"b\"");
    let target = tmp.path().join("stolen");
    denied(&a_on_b(&["restore", "latest", "--repo", &url_b, "--target", s(&target)]), "no grant");
    denied(&a_on_b(&["backup", "--repo", &url_b, s(&src)]), "no grant");
    denied(&a_on_b(&["forget", "ffff", "--repo", &url_b]), "no grant");
    assert!(!target.exists());
    denied(
        &a_on_b(&["snapshots", "--repo", &receiver.url("")]),
        "name one, quic://HOST:PORT/NAME (this certificate has grants on: a)",
    );
    denied(&a_on_b(&["snapshots", "--repo", &receiver.url("c")]), "no repository \"c\"");
    denied(&as_client("stranger", &pki, PASSWORD, &["snapshots", "--repo", &url_a]), "\"stranger\" has no grant");

    // Append-only: a backup role cannot forget, and nothing is lost trying.
    let a1_id = a1["snapshot_id"].as_str().unwrap().to_owned();
    denied(&a_on_b(&["forget", &a1_id, "--repo", &url_a]), "may not Forget on repository \"a\"");
    assert_eq!(snapshot_count(&a), 1);

    // Another host of tenant a backs up the same paths into the same repository: db1's
    // snapshot is never its parent, and db2's never db1's.
    let a2 = ok_as("db2.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, s(&src), "--json"]);
    assert!(a2["parent"].is_null(), "db2 took db1's snapshot as its parent: {a2}");
    let a3 = ok_as("db2.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, s(&src), "--json"]);
    assert_eq!(a3["parent"], a2["snapshot_id"]);
    let a4 = ok_as("db1.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, s(&src), "--json"]);
    assert_eq!(a4["parent"], a1["snapshot_id"], "db2's later snapshot did not become db1's latest");
    let explicit =
        as_client("db2.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, "--parent", &a1_id, s(&src)]);
    denied(&explicit, "may not write as");
    // Reading is by repository: db2 restores what db1 wrote (both hold tenant a's password).
    let out = tmp.path().join("out");
    ok_as("db2.tenant-a", &pki, PASSWORD, &["restore", &a1_id, "--repo", &url_a, "--target", s(&out), "--json"]);
    assert_same_tree(&src, &out.join(src.strip_prefix("/").unwrap()));

    // The operations role forgets; the snapshot is gone for everyone.
    ok_as("ops.tenant-a", &pki, PASSWORD, &["forget", &a1_id, "--repo", &url_a, "--json"]);
    let listed = as_client("db1.tenant-a", &pki, PASSWORD, &["snapshots", "--repo", &url_a, "--json"]);
    let ids = snapshot_ids(&listed);
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains(&a1_id));
    denied(&as_client("ops.tenant-a", &pki, PASSWORD, &["backup", "--repo", &url_a, s(&src)]), "may not Backup");

    // A revoked certificate is refused at the handshake once the receiver rereads the list.
    ok_as("gone.tenant-a", &pki, PASSWORD, &["snapshots", "--repo", &url_a, "--json"]);
    ok(&["cert", "revoke", "gone.tenant-a", "--pki", s(&pki)]);
    receiver.signal(libc::SIGHUP);
    wait_for_log(&log, "\"event\":\"crl\"");
    let gone = as_client("gone.tenant-a", &pki, PASSWORD, &["snapshots", "--repo", &url_a]);
    assert_eq!(gone.status.code(), Some(15), "{}", text(&gone.stderr));
    assert!(text(&gone.stderr).contains("handshake refused"), "{}", text(&gone.stderr));

    // A policy that does not parse on SIGHUP leaves the last good one in force.
    fs::write(&policy, "[[grants]\nnot toml").unwrap();
    receiver.signal(libc::SIGHUP);
    wait_for_log(&log, "policy_refused");
    ok_as("db1.tenant-a", &pki, PASSWORD, &["snapshots", "--repo", &url_a, "--json"]);
    // A good one takes effect for the next request.
    let grant = "[[grants]]\nidentity = \"stranger\"\nrepository = \"a\"\nallow = [\"list\"]\n";
    fs::write(&policy, policy_text(&a, &b, grant)).unwrap();
    receiver.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = as_client("stranger", &pki, PASSWORD, &["snapshots", "--repo", &url_a, "--json"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the new grant never took effect: {}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }

    // The metrics name who was refused.
    let page = http_get(&metrics, "/metrics");
    let refused = page.lines().find(|l| {
        l.starts_with("cbcr_receiver_refused_total{") && l.contains("identity=\"stranger\"") && l.contains("Denied")
    });
    assert!(refused.is_some_and(|l| !l.ends_with(" 0")), "{page}");

    // Storage sees ciphertext only; the audit trail names who did what.
    assert_eq!(markers_in(&a), Vec::<String>::new());
    assert_eq!(markers_in(&b), Vec::<String>::new());
    receiver.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let trail = fs::read_to_string(&log).unwrap();
    let events: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .collect();
    let find = |event: &str, identity: &str| {
        events.iter().any(|e| e["fields"]["event"] == event && e["fields"]["identity"] == identity)
    };
    assert!(find("commit", "db1.tenant-a") && find("commit", "db1.tenant-b"), "{trail}");
    assert!(find("refused", "db1.tenant-a") && find("refused", "stranger"), "{trail}");
    assert!(find("forget", "ops.tenant-a"), "{trail}");
    assert!(events.iter().any(|e| e["fields"]["event"] == "handshake_refused"), "{trail}");
    assert!(events.iter().filter(|e| e["fields"]["event"] == "policy").count() >= 2, "{trail}");
}

#[test]
fn a_sharded_job_through_a_policy_is_reached_only_by_writers_its_planner_may_write_as() {
    const SYNTH: &str = "synth://pg?size=8MiB&seed=3";
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let pki: PathBuf = tmp.path().join("pki");
    ok(&["cert", "dev", "--out", s(&pki)]);
    for name in ["db1.tenant-a", "db2.tenant-a", "ops.tenant-a"] {
        ok(&["cert", "issue", name, "--pki", s(&pki)]);
    }
    init_small(&a);
    init_small(&b);
    let policy = tmp.path().join("policy.toml");
    fs::write(&policy, policy_text(&a, &b, "")).unwrap();
    let log = tmp.path().join("receiver.log");
    let mut cmd = cbcr_command();
    cmd.env_remove("CBCR_PASSWORD").stderr(fs::File::create(&log).unwrap());
    let receiver = ReceiverProcess::start(cmd, &pki, &["--policy", s(&policy), "--log-format", "json"]);
    let url = receiver.url("a");
    let planned = ok_as("db1.tenant-a", &pki, PASSWORD, &["--json", "plan", "--repo", &url, "--shards", "2", SYNTH]);
    let job = planned["job"].as_str().unwrap().to_owned();
    // The owner is recorded beside the plan, on the storage host.
    assert_eq!(fs::read_to_string(a.join(format!("writers/job-{job}"))).unwrap(), "db1.tenant-a");

    // Another writer of the same repository neither sees the job nor runs, commits or
    // abandons it: its start records would fence the owner's runs.
    let listed = as_client("db2.tenant-a", &pki, PASSWORD, &["--json", "jobs", "--repo", &url]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(!text(&listed.stdout).contains(&job), "{}", text(&listed.stdout));
    let run = ["backup", "--repo", &url, "--job", &job, "--shard", "0"];
    denied(&as_client("db2.tenant-a", &pki, PASSWORD, &run), "not a job of a writer this certificate may write as");
    denied(&as_client("db2.tenant-a", &pki, PASSWORD, &["commit", "--repo", &url, "--job", &job]), "not a job of");
    let abandon = as_client("db2.tenant-a", &pki, PASSWORD, &["jobs", "--repo", &url, "--abandon", &job]);
    assert_eq!(abandon.status.code(), Some(21), "{}", text(&abandon.stderr));
    // A role without backup plans nothing.
    let ops = as_client("ops.tenant-a", &pki, PASSWORD, &["plan", "--repo", &url, "--shards", "2", SYNTH]);
    denied(&ops, "may not Backup");
    assert!(!fs::read_dir(a.join("jobs")).unwrap().any(|e| e.unwrap().file_name() != format!("{job}.plan").as_str()));

    // The owner runs both shards and commits one snapshot, recorded as its own.
    for shard in ["0", "1"] {
        ok_as("db1.tenant-a", &pki, PASSWORD, &["--json", "backup", "--repo", &url, "--job", &job, "--shard", shard]);
    }
    let committed = ok_as("db1.tenant-a", &pki, PASSWORD, &["--json", "commit", "--repo", &url, "--job", &job]);
    let id = committed["snapshot_id"].as_str().unwrap();
    assert!(a.join(format!("writers/{id}_db1.tenant-a")).exists());
    // Everything of the job is gone, its owner record last.
    assert_eq!(fs::read_dir(a.join("jobs")).unwrap().count(), 0);
    assert!(!a.join(format!("writers/job-{job}")).exists());
    let audit = fs::read_to_string(&log).unwrap();
    let puts = audit.lines().filter(|l| l.contains("\"job_put\"") && l.contains("db1.tenant-a")).count();
    assert!(puts >= 3, "a plan and two shard starts, audited: {audit}");
    assert!(audit.lines().any(|l| l.contains("\"job_delete\"") && l.contains(&format!("{job}.plan"))), "{audit}");
}
