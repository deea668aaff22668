//! A task's child processes: the agent runs each shard and each commit as `cbcr` commands of
//! its own binary (`plan --job`, `backup --job --shard --token`, `commit --job`), one thread
//! per task waiting on them. A child is a clean unit to stop: SIGINT stops a shard at its next
//! consistent point, SIGKILL at once, and every checkpoint it made durable stays.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use wire::control::Assignment;

use super::state::{StopHow, TaskKey, TaskResult, Work};
use crate::error::ExitCode;

/// How often a task looks at its child and its stop signal.
const POLL: Duration = Duration::from_millis(50);
/// A shard other than 0 waits this long for shard 0's agent to store the job's plan (one
/// planner per job: plans made at once by several agents would differ in time and host).
const PLAN_WAIT: Duration = Duration::from_secs(600);
/// How often it looks for the plan meanwhile.
const PLAN_POLL: Duration = Duration::from_secs(1);

const RUNNING: u8 = 0;
const GENTLY: u8 = 1;
const NOW: u8 = 2;

/// How the agent's children are started.
pub struct Runner {
    pub exe: PathBuf,
    /// Set for every child: certificates, the password source, cores.
    pub env: Vec<(String, String)>,
}

/// What a task and the agent share: how to stop it, the read cap its shard runs under (sent to
/// the child as a line on its standard input when it changes), and its child's pid.
#[derive(Default)]
struct Link {
    signal: AtomicU8,
    cap: AtomicU64,
    pid: AtomicU32,
}

/// A running task: how to stop and steer it. Its result arrives on the channel given to
/// [`spawn`], what its shard reads (each second) on the readings channel.
pub struct TaskHandle {
    link: Arc<Link>,
}

impl TaskHandle {
    pub fn stop(&self, how: StopHow) {
        let level = if how == StopHow::Now { NOW } else { GENTLY };
        self.link.signal.fetch_max(level, Ordering::SeqCst);
    }

    /// The shard's read cap from now on, bytes per second (0: none; 1: paused).
    pub fn set_cap(&self, bps: u64) {
        self.link.cap.store(bps, Ordering::SeqCst);
    }

    pub fn cap(&self) -> u64 {
        self.link.cap.load(Ordering::SeqCst)
    }

    /// The child running now, if any.
    pub fn pid(&self) -> Option<u32> {
        Some(self.link.pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }
}

/// What a shard read over one interval, as its `reading` event said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShardReading {
    pub reads: u64,
    pub read_p99_us: u64,
    pub bytes: u64,
    pub interval_s: f64,
}

/// Where readings go: bounded, and a reading that finds it full is dropped (the next comes a
/// second later).
pub type Readings = crossbeam_channel::Sender<(TaskKey, ShardReading)>;

/// What a child said: its exit code, and its last JSON line of the `type` asked for, or of
/// type `error`.
struct ChildEnd {
    code: Option<i32>,
    answer: Option<Value>,
    error: Option<String>,
}

impl ChildEnd {
    fn failure(&self, what: &str) -> TaskResult {
        let error = self.error.clone().unwrap_or_else(|| match self.code {
            Some(c) => format!("{what} exited with {c}"),
            None => format!("{what} was killed"),
        });
        TaskResult::Failed { error }
    }
}

/// Starts `work` on a thread of its own, a shard under read cap `cap`; its result is sent on
/// `done`.
pub fn spawn(
    runner: Arc<Runner>,
    key: TaskKey,
    work: Work,
    cap: u64,
    done: crossbeam_channel::Sender<(TaskKey, TaskResult)>,
    readings: Readings,
) -> TaskHandle {
    let link = Arc::new(Link { cap: AtomicU64::new(cap), ..Link::default() });
    let task = Task { key, link: Arc::clone(&link), readings };
    std::thread::spawn(move || {
        let result = match &work {
            Work::Shard(a) => runner.shard(a, &task),
            Work::Commit { data_job, repo } => runner.commit(data_job, repo, &task),
        };
        let _ = done.send((key, result));
    });
    TaskHandle { link }
}

/// A task's side of its link.
struct Task {
    key: TaskKey,
    link: Arc<Link>,
    readings: Readings,
}

impl Runner {
    /// Plans the job (shard 0's agent) or waits for its plan, then runs the shard.
    fn shard(&self, a: &Assignment, task: &Task) -> TaskResult {
        let job = a.data_job.as_str();
        if a.lease.shard == 0 {
            let shards = a.shards.to_string();
            let args = ["plan", "--job", job, "--db", &a.db, "--shards", &shards, &a.source];
            let end = self.run(&a.repo, &args, "plan", task, false);
            match end.code {
                Some(0 | 3) => {}
                Some(c) if c == ExitCode::JobCommitted as i32 => return TaskResult::ShardDone { bytes: 0, skipped: 0 },
                _ => return end.failure("plan"),
            }
        }
        let started = Instant::now();
        loop {
            let (shard, token) = (a.lease.shard.to_string(), a.lease.token.to_string());
            let args = ["backup", "--job", job, "--shard", &shard, "--token", &token, "--read-cap-stdin"];
            let end = self.run(&a.repo, &args, "shard", task, true);
            let summary = |field: &str| end.answer.as_ref().and_then(|v| v["summary"][field].as_u64()).unwrap_or(0);
            match end.code {
                Some(0) => {
                    return TaskResult::ShardDone { bytes: summary("bytes_read"), skipped: summary("segments_skipped") }
                }
                // Done already: another run of this shard finished and a commit followed.
                Some(c) if c == ExitCode::JobCommitted as i32 => return TaskResult::ShardDone { bytes: 0, skipped: 0 },
                Some(c) if c == ExitCode::NoJob as i32 && started.elapsed() < PLAN_WAIT => {
                    if !pause(PLAN_POLL, &task.link.signal) {
                        return end.failure("shard");
                    }
                }
                _ => return end.failure("shard"),
            }
        }
    }

    fn commit(&self, job: &str, repo: &str, task: &Task) -> TaskResult {
        let end = self.run(repo, &["commit", "--job", job], "summary", task, false);
        match end.code {
            Some(0) => {
                let id = end.answer.as_ref().and_then(|v| v["snapshot_id"].as_str()).unwrap_or_default();
                TaskResult::Committed { snapshot: id.to_owned() }
            }
            // Committed by an earlier order whose answer was lost: the same snapshot.
            Some(c) if c == ExitCode::JobCommitted as i32 => TaskResult::Committed {
                snapshot: end.error.unwrap_or_default().rsplit(' ').next().unwrap_or_default().to_owned(),
            },
            _ => end.failure("commit"),
        }
    }

    /// Runs `cbcr --repo REPO --json ARGS` to its end or until stopped; a `steered` child gets
    /// its read caps on standard input, and its readings go to the agent.
    fn run(&self, repo: &str, args: &[&str], answer_type: &str, task: &Task, steered: bool) -> ChildEnd {
        let signal = &task.link.signal;
        let mut command = Command::new(&self.exe);
        command.args(["--repo", repo, "--json", "--no-progress"]).args(args);
        // The child's repository and database are the task's, never the agent's environment's.
        command.env_remove("CBCR_REPO").env_remove("CBCR_DB");
        // systemd's notify socket is the agent's alone: a child must not speak for the service.
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            command.env_remove(var);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let stdin = if steered { Stdio::piped() } else { Stdio::null() };
        command.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // A child dies with the thread that waits on it: an agent killed (kill -9) leaves no
        // shard writing behind it (a stray one would be fenced off anyway, at its next
        // checkpoint, by the run that takes the shard over).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                let error = Some(format!("cannot start {}: {e}", self.exe.display()));
                return ChildEnd { code: None, answer: None, error };
            }
        };
        task.link.pid.store(child.id(), Ordering::SeqCst);
        // JSON lines are read as they come (a full pipe would stall the child).
        let stdout = child.stdout.take().expect("piped");
        let wanted = answer_type.to_owned();
        let (key, readings) = (task.key, task.readings.clone());
        let reader = std::thread::spawn(move || {
            let (mut answer, mut error) = (None, None);
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                match v["type"].as_str() {
                    Some(t) if t == wanted => answer = Some(v),
                    Some("error") => error = v["message"].as_str().map(str::to_owned),
                    Some("reading") => {
                        let reading = ShardReading {
                            reads: v["reads"].as_u64().unwrap_or(0),
                            read_p99_us: (v["read_p99_ms"].as_f64().unwrap_or(0.0) * 1000.0) as u64,
                            bytes: v["bytes"].as_u64().unwrap_or(0),
                            interval_s: v["interval_s"].as_f64().unwrap_or(1.0),
                        };
                        let _ = readings.try_send((key, reading));
                    }
                    _ => {}
                }
            }
            (answer, error)
        });
        let mut caps = child.stdin.take();
        let mut sent_cap = None;
        let mut interrupted = false;
        let status = loop {
            let cap = task.link.cap.load(Ordering::SeqCst);
            if let Some(pipe) = caps.as_mut().filter(|_| sent_cap != Some(cap)) {
                // A child that stopped reading its input is ending; its exit says how.
                if writeln!(pipe, "{cap}").and_then(|()| pipe.flush()).is_err() {
                    caps = None;
                }
                sent_cap = Some(cap);
            }
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) => {}
                Err(_) => break None,
            }
            match signal.load(Ordering::SeqCst) {
                NOW => {
                    let _ = child.kill();
                }
                GENTLY if !interrupted => {
                    interrupted = true;
                    // SAFETY: kill(2) on our own child's pid, which try_wait has not reaped.
                    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                }
                _ => {}
            }
            std::thread::sleep(POLL);
        };
        task.link.pid.store(0, Ordering::SeqCst);
        let (answer, error) = reader.join().unwrap_or((None, None));
        ChildEnd { code: status.and_then(|s| s.code()), answer, error }
    }
}

/// Sleeps `d`, or less when the task is told to stop; whether it may go on.
fn pause(d: Duration, signal: &AtomicU8) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if signal.load(Ordering::SeqCst) != RUNNING {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}
