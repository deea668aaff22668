//! Sharded backups with the real binary: `plan`, shards run by several processes at once,
//! a shard killed with SIGKILL and resumed by another process, `commit --job`, and the refusals
//! (stale token, changed source, missing shard, a job committed twice); into a local
//! directory, `s3://` and a receiver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use cbcr_tests::*;
use serde_json::Value;

const SYNTH: &str = "synth://pg?size=24MiB&seed=5";
/// Enough segments (of 1 MiB) per shard for several checkpoints on one core.
const SYNTH_BIG: &str = "synth://pg?size=128MiB&seed=6";

/// The job id `plan --json` printed.
fn plan(target: &Target, args: &[&str]) -> (String, Value) {
    let mut full = vec!["--json", "plan"];
    full.extend_from_slice(args);
    let out = target.ok(&full);
    let v = last_json(&out);
    assert_eq!(v["type"], "plan", "{v}");
    (v["job"].as_str().unwrap().to_owned(), v)
}

/// A shard process, started (not waited for).
fn spawn_shard(target: &Target, job: &str, shard: usize) -> Child {
    let shard = shard.to_string();
    let repo = &target.url;
    let args = ["--json", "--no-progress", "--cores", "1", "--repo", repo, "backup", "--job", job, "--shard", &shard];
    let mut command: Command = target.command(&args);
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// A shard run's summary, asserting it succeeded.
fn summary(out: Output) -> Value {
    assert!(out.status.success(), "shard failed: {}\n{}", out.status, text(&out.stderr));
    let v = last_json(&out);
    assert_eq!(v["type"], "shard", "{v}");
    v["summary"].clone()
}

/// The root tree of each snapshot, by id.
fn trees(target: &Target) -> Vec<(String, String)> {
    let out = target.ok(&["--json", "snapshots"]);
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["tree"].as_str().unwrap().to_owned()))
        .collect()
}

/// A receiver serving `dir` (a repository made with [`init_small`], its password given), and
/// the target that reaches it as the certificate `client` of its development PKI.
fn served(dir: &Path) -> (ReceiverProcess, Target, PathBuf) {
    init_small(&dir.join("repo"));
    let pki = dir.join("pki");
    ok(&["cert", "dev", "--out", s(&pki)]);
    let mut cmd = cbcr_command();
    cmd.stderr(std::process::Stdio::null());
    let receiver = ReceiverProcess::start(cmd, &pki, &["--repo", s(&dir.join("repo"))]);
    let target = Target::quic(receiver.url(""), &dir.join("repo"), &pki, "client");
    (receiver, target, pki)
}

/// The job of `target` (a repository made with [`init_small`]), run by 4 processes at once,
/// combines into one snapshot whose root tree is the one a single backup of the same source
/// makes (trees are named by their content, so equal ids mean equal snapshots, bit for bit),
/// and which restores as the source.
fn four_shards_at_once(target: &Target) {
    let (job, planned) = plan(target, &["--db", "pg1", "--shards", "4", SYNTH]);
    assert_eq!(planned["shards"].as_array().unwrap().len(), 4, "{planned}");
    // The plan is small: entries and segments, not data.
    assert!(planned["plan_bytes"].as_u64().unwrap() < 4096, "{planned}");
    let children: Vec<Child> = (0..4).map(|k| spawn_shard(target, &job, k)).collect();
    let mut read = 0;
    for child in children {
        let s = summary(child.wait_with_output().unwrap());
        assert_eq!(s["segments_skipped"], 0, "{s}");
        read += s["bytes_read"].as_u64().unwrap();
    }
    let committed = last_json(&target.ok(&["--json", "commit", "--job", &job]));
    assert_eq!(committed["shards"], 4, "{committed}");
    assert_eq!(committed["bytes_read"].as_u64().unwrap(), read, "{committed}");
    target.ok(&["verify", "--against", SYNTH]);
    // A second database name: no parent, so every file is read and cut again.
    target.ok(&["--no-progress", "backup", "--db", "single", SYNTH]);
    let trees = trees(target);
    assert_eq!(trees.len(), 2);
    assert_eq!(trees[0].1, trees[1].1, "the sharded snapshot differs from a single backup of the same source");
    // The job is gone; committing it again names the snapshot it made.
    let again = target.cbcr(&["commit", "--job", &job]);
    assert_eq!(again.status.code(), Some(22), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("committed already"), "{}", text(&again.stderr));
    assert!(text(&target.ok(&["jobs"]).stdout).trim().is_empty());
}

#[test]
fn four_shard_processes_into_a_local_repository_make_the_snapshot_one_backup_makes() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    four_shards_at_once(&target);
}

#[test]
fn four_shard_processes_into_s3_make_the_snapshot_one_backup_makes() {
    let Some(server) = S3Server::start() else { return };
    let target = Target::s3(&server, "jobs", "repo");
    target.init_small();
    four_shards_at_once(&target);
}

#[test]
fn four_shard_processes_through_a_receiver_make_the_snapshot_one_backup_makes() {
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, target, _) = served(dir.path());
    four_shards_at_once(&target);
    // The receiver kept the job's objects in its repository, and removed them at the commit.
    let jobs = std::fs::read_dir(dir.path().join("repo/jobs")).unwrap().count();
    assert_eq!(jobs, 0);
}

#[test]
fn a_sharded_directory_restores_as_the_source() {
    let (dir, restored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Restored elsewhere: a new entry in the source's parent would change its metadata.
    let (src, repo, out) = (dir.path().join("src"), dir.path().join("repo"), restored.path().join("out"));
    make_tree(&src, 11, 5 << 20);
    let target = Target::local(&repo);
    target.init_small();
    let (job, planned) = plan(&target, &["--shards", "3", s(&src)]);
    for k in 0..planned["shards"].as_array().unwrap().len() {
        summary(target.cbcr(&["--json", "backup", "--job", &job, "--shard", &k.to_string()]));
    }
    target.ok(&["commit", "--job", &job]);
    target.ok(&["restore", "latest", "--target", s(&out)]);
    let canonical = std::fs::canonicalize(&src).unwrap();
    assert_same_tree(&canonical, &out.join(canonical.strip_prefix("/").unwrap()));
    target.ok(&["--no-progress", "backup", "--db", "single", s(&src)]);
    // The source's ancestors (the system's temporary directory among them) change as other
    // tests run, so the listings are compared below the source, not the root trees.
    let below = |id: &str| -> Vec<String> {
        let listing = text(&target.ok(&["--json", "ls", id]).stdout);
        listing.lines().filter(|l| l.contains(&format!("\"{}/", canonical.display()))).map(str::to_owned).collect()
    };
    let trees = trees(&target);
    let (sharded, single) = (below(&trees[0].0), below(&trees[1].0));
    assert!(sharded.len() > 10, "{sharded:?}");
    assert_eq!(sharded, single, "the sharded snapshot differs from a single backup of the same directory");
}

/// Kills a shard with SIGKILL right after its `n`-th checkpoint into `target` (a repository
/// made with [`init_small`]); another process resumes it.
fn killed_after_checkpoint(target: &Target, n: u32) {
    let (job, _) = plan(target, &["--shards", "2", SYNTH_BIG]);
    let fault = format!("checkpoint:{n}");
    let killed = target.cbcr_env(&["--cores", "1", "backup", "--job", &job, "--shard", "0"], &[("CBCR_FAULT", &fault)]);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "{}", text(&killed.stderr));
    let jobs = last_json(&target.ok(&["--json", "jobs"]));
    let shard = &jobs["job"]["shards"][0];
    let (checkpointed, segments) = (shard["checkpointed"].as_u64().unwrap(), shard["segments"].as_u64().unwrap());
    assert!(checkpointed > 0 && checkpointed < segments, "{shard}");
    let resumed = summary(target.cbcr(&["--json", "--cores", "2", "backup", "--job", &job, "--shard", "0"]));
    assert_eq!(resumed["segments_skipped"].as_u64().unwrap(), checkpointed, "{resumed}");
    assert_eq!(resumed["token"], 2, "{resumed}");
    // Only what was not checkpointed is read again.
    let bytes = shard["bytes"].as_u64().unwrap();
    assert_eq!(resumed["bytes_skipped"], shard["bytes_checkpointed"], "{resumed}");
    assert_eq!(resumed["bytes_read"].as_u64().unwrap(), bytes - shard["bytes_checkpointed"].as_u64().unwrap());
    summary(target.cbcr(&["--json", "backup", "--job", &job, "--shard", "1"]));
    target.ok(&["commit", "--job", &job]);
    target.ok(&["verify", "--read-data"]);
    target.ok(&["verify", "--against", SYNTH_BIG]);
}

#[test]
fn a_shard_killed_after_its_first_checkpoint_resumes_elsewhere_and_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    killed_after_checkpoint(&target, 1);
}

#[test]
fn a_shard_killed_after_its_third_checkpoint_resumes_elsewhere_and_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    killed_after_checkpoint(&target, 3);
}

#[test]
fn a_shard_killed_through_a_receiver_resumes_and_skips_what_it_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, target, _) = served(dir.path());
    killed_after_checkpoint(&target, 2);
}

#[test]
fn stale_tokens_changed_files_missing_shards_and_unknown_jobs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_tree(&src, 12, 3 << 20);
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    let (job, planned) = plan(&target, &["--shards", "2", s(&src)]);
    assert_eq!(planned["shards"].as_array().unwrap().len(), 2);
    summary(target.cbcr(&["--json", "backup", "--job", &job, "--shard", "0", "--token", "5"]));
    // A stale agent: its lease's token is older than one the shard has seen.
    let stale = target.cbcr(&["backup", "--job", &job, "--shard", "0", "--token", "3"]);
    assert_eq!(stale.status.code(), Some(18), "{}", text(&stale.stderr));
    assert!(text(&stale.stderr).contains("has seen token 5"), "{}", text(&stale.stderr));
    let same = target.cbcr(&["backup", "--job", &job, "--shard", "0", "--token", "5"]);
    assert_eq!(same.status.code(), Some(18), "{}", text(&same.stderr));
    // Shard 1 never ran: commit names it and commits nothing.
    let incomplete = target.cbcr(&["commit", "--job", &job]);
    assert_eq!(incomplete.status.code(), Some(19), "{}", text(&incomplete.stderr));
    assert!(text(&incomplete.stderr).contains("shard 1:"), "{}", text(&incomplete.stderr));
    assert_eq!(snapshot_count(&dir.path().join("repo")), 0);
    // A source file of shard 1 (the last in path order) changed after the plan.
    let sparse = std::fs::OpenOptions::new().write(true).open(src.join("sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"new", 100).unwrap();
    let old = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    filetime::set_file_mtime(src.join("sparse"), old).unwrap();
    let changed = target.cbcr(&["backup", "--job", &job, "--shard", "1"]);
    assert_eq!(changed.status.code(), Some(20), "{}", text(&changed.stderr));
    assert!(text(&changed.stderr).contains("sparse: changed since the plan"), "{}", text(&changed.stderr));
    // Unknown shard, malformed and unknown job ids.
    let out = target.cbcr(&["backup", "--job", &job, "--shard", "7"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = target.cbcr(&["backup", "--job", "nonsense", "--shard", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let unknown = "0123456789abcdef0123456789abcdef";
    let out = target.cbcr(&["commit", "--job", unknown]);
    assert_eq!(out.status.code(), Some(21), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no job"), "{}", text(&out.stderr));
    // Abandoned: the job and its checkpoints are gone, the repository is whole.
    target.ok(&["jobs", "--abandon", &job]);
    assert!(std::fs::read_dir(dir.path().join("repo/jobs")).unwrap().next().is_none());
    let out = target.cbcr(&["commit", "--job", &job]);
    assert_eq!(out.status.code(), Some(21), "{}", text(&out.stderr));
    target.ok(&["verify"]);
}

#[test]
fn a_checkpoint_moved_to_another_shards_name_does_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let target = Target::local(&repo);
    target.init_small();
    let (job, _) = plan(&target, &["--shards", "2", SYNTH]);
    summary(target.cbcr(&["--json", "backup", "--job", &job, "--shard", "0"]));
    // Forge shard 1's progress from shard 0's objects: the names no longer match what is
    // sealed inside, so they do not open.
    for entry in std::fs::read_dir(repo.join("jobs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(rest) = name.strip_prefix(&format!("{job}.0.")) {
            std::fs::copy(repo.join("jobs").join(&name), repo.join("jobs").join(format!("{job}.1.{rest}"))).unwrap();
        }
    }
    let out = target.cbcr(&["commit", "--job", &job]);
    assert_eq!(out.status.code(), Some(13), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("does not authenticate"), "{}", text(&out.stderr));
    assert_eq!(snapshot_count(Path::new(&repo)), 0);
    // verify names each forged object.
    let verified = target.cbcr(&["verify"]);
    assert_eq!(verified.status.code(), Some(13), "{}", text(&verified.stderr));
    let said = format!("{}{}", text(&verified.stdout), text(&verified.stderr));
    assert!(said.contains(&format!("jobs/{job}.1.")), "{said}");
}

#[test]
fn one_shard_run_twice_at_once_leaves_one_run_whose_checkpoints_count() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    let (job, _) = plan(&target, &["--shards", "2", SYNTH_BIG]);
    let twins: Vec<Child> = (0..2).map(|_| spawn_shard(&target, &job, 0)).collect();
    let outs: Vec<Output> = twins.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    // Whichever started second took the shard over or met the first at the same token: one
    // of them may stop fenced, and nothing else.
    for out in &outs {
        assert!(out.status.success() || out.status.code() == Some(18), "{}: {}", out.status, text(&out.stderr));
    }
    assert!(outs.iter().any(|o| o.status.success()), "neither run finished");
    summary(target.cbcr(&["--json", "backup", "--job", &job, "--shard", "1"]));
    target.ok(&["commit", "--job", &job]);
    target.ok(&["verify", "--against", SYNTH_BIG]);
}

#[test]
fn a_plan_of_a_chosen_job_id_is_idempotent_exact_in_shards_and_never_made_twice() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::local(&dir.path().join("repo"));
    target.init_small();
    let id = "00000000000000010000000000000002";
    // 40 shards of a source of fewer segments: exactly 40, the empty ones done at once.
    const SMALL: &str = "synth://pg?size=1MiB&seed=3";
    let (job, first) = plan(&target, &["--job", id, "--db", "pg", "--shards", "40", SMALL]);
    assert_eq!(
        (job.as_str(), first["reused"].as_bool(), first["shards"].as_array().unwrap().len()),
        (id, Some(false), 40)
    );
    let empty = first["shards"].as_array().unwrap().iter().filter(|s| s["segments"] == 0).count();
    assert!(empty > 0, "{first}");
    let (_, again) = plan(&target, &["--job", id, "--db", "pg", "--shards", "40", SMALL]);
    assert_eq!(again["reused"].as_bool(), Some(true), "{again}");
    let other = target.cbcr(&["plan", "--job", id, "--shards", "3", SMALL]);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other.stderr));
    assert!(text(&other.stderr).contains("planned already with 40 shards"), "{}", text(&other.stderr));
    for k in 0..40 {
        let shard = k.to_string();
        target.ok(&["--cores", "1", "backup", "--job", id, "--shard", &shard]);
    }
    target.ok(&["commit", "--job", id]);
    let replanned = target.cbcr(&["plan", "--job", id, "--shards", "40", SMALL]);
    assert_eq!(replanned.status.code(), Some(22), "{}", text(&replanned.stderr));
    let shard = target.cbcr(&["backup", "--job", id, "--shard", "0"]);
    assert_eq!(shard.status.code(), Some(22), "{}", text(&shard.stderr));
    let unknown = target.cbcr(&["backup", "--job", "0000000000000000000000000000000f", "--shard", "0"]);
    assert_eq!(unknown.status.code(), Some(21), "{}", text(&unknown.stderr));
    target.ok(&["verify", "--read-data"]);
}
