//! A fleet on 127.0.0.1: one `cbcr-control` (embedded store), `cbcr agent` processes and one
//! receiver, all real processes with the development PKI. The agents run the shards and
//! commits the control plane assigns; the snapshots land in the receiver's repository.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbcr_tests::{
    cbcr_command, control_bin, https_client, init_small, ok, s, text, ControlProcess, ReceiverProcess, Target,
};
use serde_json::Value;
use wire::control::{NodeStatus, Status};

/// An agent process, killed when dropped; its log is a file.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, pki: &Path, control: &ControlProcess, name: &str) -> Self {
        Self::start_with(dir, pki, control, name, |_| {})
    }

    /// An agent whose command line `more` adds to.
    fn start_with(
        dir: &Path,
        pki: &Path,
        control: &ControlProcess,
        name: &str,
        more: impl FnOnce(&mut Command),
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = |ext: &str| s(&pki.join(format!("{name}.{ext}"))).to_owned();
        let mut cmd = cbcr_command();
        cmd.env_remove("CBCR_REPO").env_remove("CBCR_CORES");
        cmd.args(["--cert", &file("crt"), "--key", &file("key"), "--ca", s(&pki.join("ca.crt"))]);
        cmd.args(["--cores", "2", "agent", "--control", &format!("https://{}", control.addr), "--name", name]);
        // The agents share this host's /proc: its disk and network rates, measured while every
        // agent (and test) writes, must not use up what each of them offers.
        cmd.args(["--disk", "1TiB", "--network", "1TiB"]);
        more(&mut cmd);
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        Self { child: cmd.spawn().unwrap(), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: no preconditions; the agent is our child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the agent to exit by itself; its exit code.
    fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the agent did not exit within {within:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fleet's parts: a PKI with `agents`' certificates, a receiver serving a small-segment
/// repository, and the registry `dbs` (TOML) imported into a store the service is started on.
struct Fleet {
    dir: tempfile::TempDir,
    pki: PathBuf,
    receiver: ReceiverProcess,
    control: ControlProcess,
}

impl Fleet {
    fn start(agents: &[&str], dbs: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        ok(&["cert", "dev", "--out", s(&pki)]);
        for name in agents {
            ok(&["cert", "issue", "--pki", s(&pki), name]);
        }
        let repo = dir.path().join("repo");
        init_small(&repo);
        let mut cmd = cbcr_command();
        cmd.stderr(Stdio::null());
        let receiver = ReceiverProcess::start(cmd, &pki, &["--repo", s(&repo)]);
        let roles = dir.path().join("roles.toml");
        std::fs::write(&roles, "operators = [\"cbcr-client\"]\nagents = [\"agent-*\"]\n").unwrap();
        let (registry, store) = (dir.path().join("dbs.toml"), dir.path().join("state.redb"));
        std::fs::write(&registry, dbs).unwrap();
        let import =
            Command::new(control_bin()).args(["db", "--store", s(&store), "import", s(&registry)]).output().unwrap();
        assert!(import.status.success(), "{}", text(&import.stderr));
        let control = ControlProcess::start(&pki, &store, &roles, &["--repo", &receiver.url("")]);
        Self { dir, pki, receiver, control }
    }

    fn agent(&self, name: &str) -> Agent {
        Agent::start(self.dir.path(), &self.pki, &self.control, name)
    }

    fn operator(&self) -> ureq::Agent {
        https_client(&self.pki, "client", &self.pki)
    }

    fn status(&self) -> Status {
        self.operator().get(&self.control.url("status")).call().unwrap().into_json().unwrap()
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        self.operator().get(&self.control.url("nodes")).call().unwrap().into_json().unwrap()
    }

    /// Waits until `committed` snapshots are reported.
    fn wait_committed(&self, committed: u64, within: Duration, agents: &[&Agent]) {
        let deadline = Instant::now() + within;
        while self.status().committed < committed {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            assert!(
                Instant::now() < deadline,
                "{:?} after {within:?}; agents said:\n{}",
                self.status(),
                logs.join("\n")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The receiver's repository, reached as the operator's certificate.
    fn target(&self) -> Target {
        Target::quic(self.receiver.url(""), &self.dir.path().join("repo"), &self.pki, "client")
    }

    fn snapshots(&self) -> Vec<Value> {
        let out = self.target().ok(&["--json", "snapshots"]);
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn db(name: &str, source: &str, priority: &str, rpo: &str, size_hint: &str) -> String {
    format!(
        "[[db]]\nname = \"{name}\"\nsource = \"{source}\"\nhost = \"pg-{name}\"\npriority = \"{priority}\"\n\
         rpo = \"{rpo}\"\nsize_hint = \"{size_hint}\"\n\n"
    )
}

#[test]
fn two_agents_back_up_twenty_databases_through_a_receiver_critical_first() {
    let classes = ["critical", "high", "normal", "low"];
    let rpos = ["30m", "1h", "2h", "6h", "24h"];
    let mut dbs = String::new();
    for i in 0..20 {
        let source = format!("synth://pg?size=2MiB&seed={i}");
        dbs += &db(&format!("db{i:02}"), &source, classes[i % 4], rpos[i % 5], "2MiB");
    }
    let fleet = Fleet::start(&["agent-a", "agent-b"], &dbs);
    // 2 cores each: one shard at a time (a shard needs 2), so the order is the scheduler's.
    let (mut a, mut b) = (fleet.agent("agent-a"), fleet.agent("agent-b"));
    fleet.wait_committed(20, Duration::from_secs(240), &[&a, &b]);
    let status = fleet.status();
    assert_eq!((status.dbs, status.nodes, status.waiting, status.failovers), (20, 2, [0; 4], 0), "{status:?}");
    assert!(a.log().contains("committing job") && b.log().contains("committing job"), "both agents worked");

    // One snapshot per database, each of its own source; every critical one planned before
    // any low one (snapshot times are the plans' times).
    let snapshots = fleet.snapshots();
    assert_eq!(snapshots.len(), 20, "{snapshots:?}");
    let mut names: Vec<&str> = snapshots.iter().map(|v| v["db"].as_str().unwrap()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 20, "one snapshot per database: {names:?}");
    let times = |class: usize| -> Vec<String> {
        let of_class = snapshots.iter().filter(|v| {
            let n: usize = v["db"].as_str().unwrap()[2..].parse().unwrap();
            n % 4 == class
        });
        of_class.map(|v| v["time"].as_str().unwrap().to_owned()).collect()
    };
    let (critical, low) = (times(0), times(3));
    assert!(critical.iter().max() < low.iter().min(), "critical {critical:?} not all before low {low:?}");
    for v in &snapshots {
        let n: usize = v["db"].as_str().unwrap()[2..].parse().unwrap();
        assert!(v["paths"][0].as_str().unwrap().contains(&format!("seed={n}&")), "{v}");
    }
    fleet.target().ok(&["verify", "--read-data"]);

    // SIGTERM: each agent leaves (130), holding nothing.
    for agent in [&mut a, &mut b] {
        agent.signal(libc::SIGTERM);
        assert_eq!(agent.wait(Duration::from_secs(20)), Some(130), "{}", agent.log());
    }
}

/// Checkpointed segments of `shard` of the one open job, and all its segments.
/// One admin request to the agent at `socket`: its answer, or the exit code and error.
fn admin(socket: &Path, args: &[&str]) -> Result<Value, (i32, String)> {
    let mut full = vec!["admin", s(socket)];
    full.extend(args);
    let out = cbcr_command().args(&full).output().unwrap();
    match out.status.code() {
        Some(0) => Ok(serde_json::from_slice(&out.stdout).unwrap()),
        code => Err((code.unwrap_or(-1), text(&out.stderr))),
    }
}

/// Asks `socket` until `ready` holds for the answer to `args`; that answer.
fn admin_until(socket: &Path, args: &[&str], within: Duration, agent: &Agent, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(answer) = admin(socket, args) {
            if ready(&answer) {
                return answer;
            }
            last = answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{args:?} never answered as awaited within {within:?}; last: {last}\nthe agent said:\n{}", agent.log());
}

#[test]
fn a_slowed_source_lowers_the_read_cap_it_recovers_and_the_admin_socket_steers_the_agent() {
    // One shard, long enough to outlast the test at any rate it is given.
    let dbs = db("slow", "synth://pg?size=16GiB&seed=9", "critical", "1h", "1GiB");
    let fleet = Fleet::start(&["agent-a"], &dbs);
    let (slow, socket) = (fleet.dir.path().join("slow"), fleet.dir.path().join("agent-a.sock"));
    std::fs::write(&slow, "").unwrap();
    // While `slow` exists each window (a 1 MiB segment here) takes 150 ms more to arrive.
    let mut a = Agent::start_with(fleet.dir.path(), &fleet.pki, &fleet.control, "agent-a", |cmd| {
        cmd.env("CBCR_FAULT_SLOW_READ", format!("{}:150", s(&slow)));
        // The CPU target out of reach: the other tests load this machine, and only the source's
        // read times should move the cap here.
        cmd.args(["--read-latency-target", "50ms", "--cpu-target", "100", "--admin-socket", s(&socket)]);
    });
    let mib = 1u64 << 20;
    let cap = |v: &Value| v["throttle"]["cap_bps"].as_u64().unwrap();
    let reason = |v: &Value| v["throttle"]["reason"].as_str().unwrap().to_owned();

    // The reads are slow: the cap is cut, and keeps falling while they stay slow.
    let running = |v: &Value| v["tasks"].as_array().is_some_and(|t| !t.is_empty());
    admin_until(&socket, &["status"], Duration::from_secs(60), &a, running);
    let first = admin_until(&socket, &["status"], Duration::from_secs(30), &a, |v| reason(v) == "slow_reads");
    let low = admin_until(&socket, &["status"], Duration::from_secs(30), &a, |v| {
        reason(v) == "slow_reads" && cap(v) > 0 && cap(v) * 2 <= cap(&first)
    });
    assert!(low["throttle"]["read_p99_ms"].as_f64().unwrap() > 50.0, "{low}");
    // Fast again: the cap rises.
    std::fs::remove_file(&slow).unwrap();
    let rising = admin_until(&socket, &["status"], Duration::from_secs(30), &a, |v| {
        reason(v) == "recovering" && cap(v) > cap(&low)
    });
    assert!(
        a.log().contains("read cap of this node now"),
        "the cuts are logged:
{}",
        a.log()
    );

    // The operator's cap wins when lower, and is what the shard runs under.
    let throttled = admin(&socket, &["throttle", "4MiB"]).unwrap();
    assert_eq!(throttled["throttle"]["operator_bps"], 4 * mib, "{throttled}");
    let status = admin(&socket, &["status"]).unwrap();
    assert_eq!(status["tasks"][0]["read_cap_bps"], 4 * mib, "{status} (was {rising})");
    // Paused: the shard reads nothing, its lease still held.
    assert_eq!(admin(&socket, &["pause"]).unwrap()["paused"], true);
    admin_until(&socket, &["perf"], Duration::from_secs(15), &a, |v| {
        v["shards"][0]["read_cap_bps"] == 1 && v["shards"][0]["read_bps"] == 0
    });
    let nodes = fleet.nodes();
    assert_eq!(nodes[0].leases.len(), 1, "a paused shard keeps its lease: {nodes:?}");
    assert_eq!(admin(&socket, &["resume"]).unwrap()["paused"], false);
    admin_until(&socket, &["perf"], Duration::from_secs(15), &a, |v| v["shards"][0]["read_cap_bps"] == 4 * mib);
    let lifted = admin(&socket, &["throttle", "none"]).unwrap();
    assert_eq!(lifted["throttle"]["operator_bps"], 0, "{lifted}");

    // Bad requests are answered with what was wrong (exit 2); no daemon there is exit 15.
    let (code, err) = admin(&socket, &["throttle", "fast"]).unwrap_err();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a rate"), "{err}");
    let (code, err) = admin(&socket, &["reboot"]).unwrap_err();
    assert!(code == 2 && err.contains("unknown command"), "{code} {err}");
    let help = admin(&socket, &["help"]).unwrap();
    assert!(help["commands"]["throttle RATE"].is_string(), "{help}");
    let (code, _) = admin(&fleet.dir.path().join("nobody.sock"), &["status"]).unwrap_err();
    assert_eq!(code, 15);

    // Drained through its socket: the shard is handed back and the agent exits 0.
    assert_eq!(admin(&socket, &["drain"]).unwrap()["draining"], true);
    assert_eq!(a.wait(Duration::from_secs(60)), Some(0), "{}", a.log());
    assert!(a.log().contains("HandingBack") || a.log().contains("Gently"), "{}", a.log());
    assert!(!socket.exists(), "the socket is removed when the agent exits");
}

fn progress(target: &Target, shard: u32) -> Option<(u64, u64)> {
    let out = target.cbcr(&["--json", "jobs"]);
    let job: Value = text(&out.stdout).lines().next().and_then(|l| serde_json::from_str(l).ok())?;
    let s = &job["job"]["shards"][shard as usize];
    Some((s["checkpointed"].as_u64()?, s["segments"].as_u64()?))
}

#[test]
fn a_killed_agents_shard_resumes_on_another_from_its_checkpoints_and_a_drained_agent_leaves() {
    // A large size hint: three shards, whose size comes from the source itself.
    // Shards of about 640 MiB: long enough to be caught part way.
    let dbs = db("big", "synth://pg?size=640MiB&seed=5", "critical", "1h", "48GiB");
    let fleet = Fleet::start(&["agent-a", "agent-b", "agent-c"], &dbs);
    // agent-a alone first, so that it surely runs a shard (the core may hold a second shard
    // back from the source host while its CPU, this whole machine's, is above target).
    let mut a = fleet.agent("agent-a");
    let target = fleet.target();

    // Kill agent-a -9 once its shard has checkpointed some segments but not all.
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed_shard = loop {
        assert!(Instant::now() < deadline, "agent-a never ran a shard part way:\n{}", a.log());
        assert_eq!(fleet.status().committed, 0, "committed before agent-a was caught part way:\n{}", a.log());
        let held = fleet.nodes().into_iter().find(|n| n.name == "agent-a").and_then(|n| n.leases.first().copied());
        if let Some(lease) = held {
            if let Some((done, all)) = progress(&target, lease.shard) {
                if done > 0 && done < all {
                    a.child.kill().unwrap();
                    a.child.wait().unwrap();
                    break lease;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Two agents join and take work; the killed agent's lease expires (3 s) and its shard is
    // run again, skipping what agent-a had checkpointed.
    let (b, c) = (fleet.agent("agent-b"), fleet.agent("agent-c"));
    fleet.wait_committed(1, Duration::from_secs(180), &[&a, &b, &c]);
    let status = fleet.status();
    assert!(status.failovers >= 1, "{status:?}");
    let resumed = format!("job: {}, shard: {}", killed_shard.job, killed_shard.shard);
    let logs = [b.log(), c.log()];
    let resumed_by = logs.iter().find(|l| {
        l.lines().any(|line| line.contains(&resumed) && line.contains("ShardDone") && !line.contains("skipped: 0 "))
    });
    assert!(resumed_by.is_some(), "no agent resumed {resumed} skipping segments:\n{}", logs.join("\n"));
    let snapshots = fleet.snapshots();
    assert_eq!(snapshots.len(), 1, "committed exactly once: {snapshots:?}");
    assert!(text(&target.ok(&["jobs"]).stdout).trim().is_empty(), "the job's objects are gone");
    target.ok(&["verify", "--read-data"]);

    // Drained, agent-b holds nothing and leaves by itself (exit 0).
    let mut b = b;
    let drain = fleet.operator().post(&fleet.control.url("nodes/agent-b/drain")).call();
    assert!(drain.is_ok(), "{drain:?}");
    assert_eq!(b.wait(Duration::from_secs(30)), Some(0), "{}", b.log());
}
