//! `cbcr agent`: a node of the fleet. It registers with `cbcr-control`, heartbeats with a
//! resource report and every lease it holds, runs the shards and commits it is told to as
//! child processes ([`task`]), reports how each ended, and gives up a lease on its own clock
//! when it cannot renew it ([`state`]), caps its shards' reads by its own fast loop and the
//! control plane's and operator's caps ([`throttle`]), and answers its admin socket. A thin
//! driver: [`state::AgentState`] and [`throttle::Steer`] decide.

pub mod client;
pub mod resources;
pub mod state;
pub mod task;
pub mod throttle;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};
use wire::control::{Capacity, Heartbeat, Register, Registered, ResourceReport, ShardReport};

use self::client::{CallError, ControlClient};
use self::state::{Action, AgentState, TaskKey, TaskResult, Work};
use self::task::{Runner, ShardReading, TaskHandle};
use self::throttle::{Reading, Steer, SteerParams};
use crate::error::{Error, Result};
use crate::limits;
use crate::net::admin::{self, Asked};
use crate::net::quic::TlsFiles;

/// Between registration attempts while the service cannot be reached.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// The most an idle loop waits before it looks at its leases' deadlines again.
const LOOP_WAIT: Duration = Duration::from_millis(100);
/// Between attempts to deliver reports while the service cannot be reached.
const REPORT_RETRY_MS: u64 = 1_000;
/// Leaving (SIGTERM), the agent waits at most this long to deliver its last reports.
const LEAVE_REPORTS: Duration = Duration::from_secs(10);
/// How often the throttle looks at the shards' reads and the host's CPU.
const THROTTLE_LOOK_MS: u64 = 1_000;

pub struct AgentOptions {
    /// `https://HOST:PORT` of `cbcr-control`.
    pub control: String,
    pub name: String,
    pub tls: TlsFiles,
    pub capacity: Capacity,
    /// The children's program and environment.
    pub runner: Runner,
    /// The throttle's targets.
    pub steer: SteerParams,
    pub admin_socket: Option<PathBuf>,
}

/// Why the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// The control plane drained it and it held nothing more.
    Drained,
    /// Asked to stop (SIGTERM or SIGINT): its shards were handed back.
    Left,
    /// Drained through its admin socket: its shards were handed back.
    LeftDrained,
}

/// What systemd is told (`Type=notify`): READY once registered, WATCHDOG from the loop itself
/// (so a loop stuck anywhere stops the pings and systemd restarts the agent), STOPPING when
/// leaving. Without systemd every call is a no-op.
struct Watchdog {
    every: Option<Duration>,
    last: Instant,
}

impl Watchdog {
    fn ready() -> Self {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let mut usec = 0;
        let every = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
        Self { every, last: Instant::now() }
    }

    fn pet(&mut self) {
        if self.every.is_some_and(|every| self.last.elapsed() >= every) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            self.last = Instant::now();
        }
    }

    fn stopping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

/// A call may take half a lease at most (2 to 10 s): a service that does not answer must not
/// keep the loop long from stopping a shard whose lease ran out. (An answer lost to this is
/// not work lost: runs are renewed or expire, commits are ordered again until reported.)
fn call_timeout(lease_ttl_ms: u64) -> Duration {
    Duration::from_millis(lease_ttl_ms / 2).clamp(Duration::from_secs(2), Duration::from_secs(10))
}

/// A task the agent started: how to reach it, since when, and its assignment's read cap.
struct Running {
    handle: TaskHandle,
    started: Instant,
    db: String,
    assigned_cap: u64,
    /// Its last reading, for `perf`.
    last: Option<ShardReading>,
}

struct Driver {
    client: ControlClient,
    control: String,
    name: String,
    capacity: Capacity,
    runner: Arc<Runner>,
    clock: Instant,
    state: AgentState,
    handles: BTreeMap<TaskKey, Running>,
    outbox: VecDeque<ShardReport>,
    done: crossbeam_channel::Sender<(TaskKey, TaskResult)>,
    readings: crossbeam_channel::Sender<(TaskKey, ShardReading)>,
    steer: Steer,
    /// The host's counters and each child's CPU time at the throttle's last look.
    looked: (resources::Counters, HashMap<u32, u64>),
    last_usage: resources::Usage,
    /// Bytes per second of the last shard that read anything.
    throughput_bps: u64,
    /// Drained through the admin socket: leaving, and exit 0 once gone.
    drain_asked: bool,
}

/// Runs the agent until it is drained, or `stop` is raised.
pub fn run_agent(opts: AgentOptions, stop: &AtomicBool) -> Result<AgentExit> {
    let client = ControlClient::new(&opts.control, &opts.tls)?;
    let (done, finished) = crossbeam_channel::bounded(limits::AGENT_MAX_TASKS);
    let (readings, read) = crossbeam_channel::bounded(limits::AGENT_READINGS);
    let (asks, asked) = crossbeam_channel::bounded::<Asked>(limits::ADMIN_CONNECTIONS);
    // Bound before registering: a socket that cannot be served is a usage error at start.
    let socket = opts.admin_socket.as_deref().map(|path| admin::serve(path, asks)).transpose()?;
    // Without a socket nothing ever asks (a disconnected channel would be ready at once, and
    // the loop would spin on it).
    let asked = if socket.is_some() { asked } else { crossbeam_channel::never() };
    let mut d = Driver {
        client,
        control: opts.control.clone(),
        name: opts.name,
        capacity: opts.capacity,
        runner: Arc::new(opts.runner),
        clock: Instant::now(),
        state: AgentState::new(limits::AGENT_MAX_TASKS),
        handles: BTreeMap::new(),
        outbox: VecDeque::new(),
        done,
        readings,
        steer: Steer::new(opts.steer),
        looked: (resources::read(), HashMap::new()),
        last_usage: resources::Usage::default(),
        throughput_bps: 0,
        drain_asked: false,
    };
    let Some(registered) = d.register(stop)? else { return Ok(AgentExit::Left) };
    info!(
        node = d.name.as_str(),
        control = opts.control.as_str(),
        "registered; heartbeat every {} ms, leases of {} ms",
        registered.heartbeat_ms,
        registered.lease_ttl_ms
    );
    let mut watchdog = Watchdog::ready();
    let mut meter = resources::Meter::start();
    d.client.set_timeout(call_timeout(registered.lease_ttl_ms));
    let mut next_beat = 0u64;
    let mut next_flush = 0u64;
    let mut next_look = THROTTLE_LOOK_MS;
    let mut left_at: Option<Instant> = None;
    loop {
        watchdog.pet();
        if (stop.load(Ordering::SeqCst) || d.drain_asked) && left_at.is_none() {
            info!("leaving: handing every shard back");
            watchdog.stopping();
            left_at = Some(Instant::now());
            let actions = d.state.leave();
            d.apply(actions);
        }
        // Reports first: a commit reported is not ordered again by the heartbeat's answer.
        if d.now() >= next_flush {
            next_flush = if d.flush_reports() { 0 } else { d.now() + REPORT_RETRY_MS };
        }
        let now = d.now();
        if now >= next_beat {
            next_beat = now + registered.heartbeat_ms;
            d.last_usage = meter.sample();
            d.heartbeat(now, &registered, d.last_usage);
        }
        let expired = d.state.tick(d.now());
        d.apply(expired);
        if d.now() >= next_look {
            next_look = d.now() + THROTTLE_LOOK_MS;
            d.look(&read);
        }
        if d.state.may_exit() && (d.outbox.is_empty() || left_at.is_some_and(|t| t.elapsed() > LEAVE_REPORTS)) {
            for r in &d.outbox {
                warn!(job = r.lease.job, shard = r.lease.shard, "report not delivered: {:?}", r.outcome);
            }
            return Ok(match left_at {
                Some(_) if d.drain_asked => AgentExit::LeftDrained,
                Some(_) => AgentExit::Left,
                None => AgentExit::Drained,
            });
        }
        let wait = Duration::from_millis(next_beat.saturating_sub(d.now())).min(LOOP_WAIT);
        crossbeam_channel::select! {
            recv(finished) -> f => if let Ok((key, result)) = f {
                d.finished(key, result);
                while let Ok((key, result)) = finished.try_recv() {
                    d.finished(key, result);
                }
            },
            recv(asked) -> a => if let Ok(a) = a {
                let answer = d.admin(&a.request);
                let _ = a.answer.send(answer);
            },
            default(wait) => {}
        }
    }
}

impl Driver {
    /// Milliseconds on the agent's own monotonic clock.
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Registers, retrying while the service is unreachable; `None` when stopped meanwhile.
    fn register(&self, stop: &AtomicBool) -> Result<Option<Registered>> {
        let r = self.registration();
        let mut warned = false;
        loop {
            match self.client.register(&r) {
                Ok(registered) => return Ok(Some(registered)),
                Err(e @ CallError::Refused { status: 403, .. }) => return Err(Error::Denied(e.to_string())),
                Err(e @ CallError::Refused { .. }) => return Err(Error::Usage(format!("registering: {e}"))),
                Err(e) if !warned => {
                    warn!("cannot register yet (retrying): {e}");
                    warned = true;
                }
                Err(_) => {}
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            std::thread::sleep(REGISTER_RETRY);
        }
    }

    fn registration(&self) -> Register {
        Register { node: self.name.clone(), capacity: self.capacity }
    }

    fn heartbeat(&mut self, now: u64, registered: &Registered, usage: resources::Usage) {
        let leases = self.state.held();
        let report = ResourceReport {
            // The rest of the host's CPU, the agent's own shards left out: what the database
            // needs is what the control plane protects (the shards' own need is reserved by
            // their assignments).
            cpu_percent: self.steer.status().cpu_others_percent,
            memory_used_bytes: usage.memory_used_bytes,
            network_bps: usage.network_bps,
            disk_bps: usage.disk_bps,
            throughput_bps: self.throughput_bps,
            // The agent's own loop acts on its shards' read times (once a second); the control
            // plane's acts on the CPU below, which leaves the agent's shards out.
            stage_p99_us: 0,
            running: self.state.running(),
        };
        let beat = Heartbeat { node: self.name.clone(), report, leases: leases.clone() };
        match self.client.heartbeat(&beat) {
            Ok(orders) => {
                self.state.renewed(now, registered.lease_ttl_ms, &leases);
                let actions = self.state.orders(now, orders.orders);
                self.apply(actions);
                self.steer.set_control_plane(self.state.rate_cap());
                self.recap();
            }
            // The service forgot this node (it restarted): join again; its leases are gone
            // with it, and the next heartbeat is answered with stops.
            Err(CallError::Refused { status: 404, .. }) => {
                warn!("the control plane does not know this node: registering again");
                if let Err(e) = self.client.register(&self.registration()) {
                    warn!("registering again (next heartbeat retries): {e}");
                }
            }
            Err(e) => warn!("heartbeat: {e}"),
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start(key, work) => {
                    match &work {
                        Work::Shard(a) => info!(
                            db = a.db.as_str(),
                            job = a.lease.job,
                            shard = a.lease.shard,
                            token = a.lease.token,
                            "running shard {}/{} of {} into {}",
                            a.lease.shard,
                            a.shards,
                            a.db,
                            a.repo
                        ),
                        Work::Commit { data_job, repo } => {
                            info!(job = data_job.as_str(), "committing job {data_job} in {repo}")
                        }
                    }
                    let (db, assigned_cap) = match &work {
                        Work::Shard(a) => (a.db.clone(), a.read_cap_bps),
                        Work::Commit { .. } => (String::new(), 0),
                    };
                    let shards = self.state.running();
                    let cap = self.steer.shard_cap(assigned_cap, shards);
                    let handle =
                        task::spawn(Arc::clone(&self.runner), key, work, cap, self.done.clone(), self.readings.clone());
                    let started = Instant::now();
                    self.handles.insert(key, Running { handle, started, db, assigned_cap, last: None });
                    self.recap();
                }
                Action::Stop(key, how) => {
                    info!(job = key.lease().job, shard = key.lease().shard, "stopping {key:?} ({how:?})");
                    if let Some(r) = self.handles.get(&key) {
                        r.handle.stop(how);
                    }
                }
                Action::Refuse(key, why) => {
                    warn!("refused {key:?}: {why}");
                    self.queue(key, AgentState::refused(key, why));
                }
            }
        }
    }

    fn finished(&mut self, key: TaskKey, result: TaskResult) {
        let started = self.handles.remove(&key).map(|r| r.started);
        if let (TaskResult::ShardDone { bytes, .. }, Some(at)) = (&result, started) {
            if *bytes > 0 {
                self.throughput_bps = (*bytes as f64 / at.elapsed().as_secs_f64().max(1e-3)) as u64;
            }
        }
        info!(job = key.lease().job, shard = key.lease().shard, "{key:?} ended: {result:?}");
        if let Some(outcome) = self.state.finished(key, result) {
            self.queue(key, outcome);
        }
        // The shards left get the share it had.
        self.recap();
    }

    /// Hands every shard the cap it gets now.
    fn recap(&self) {
        let shards = self.state.running();
        for (key, r) in &self.handles {
            if let TaskKey::Shard(_) = key {
                r.handle.set_cap(self.steer.shard_cap(r.assigned_cap, shards));
            }
        }
    }

    /// The throttle's look: the shards' readings since the last one, and the CPU the rest of
    /// the host used meanwhile.
    fn look(&mut self, read: &crossbeam_channel::Receiver<(TaskKey, ShardReading)>) {
        let (mut p99, mut bps) = (None::<u64>, 0f64);
        while let Ok((key, reading)) = read.try_recv() {
            if reading.reads > 0 {
                p99 = Some(p99.unwrap_or(0).max(reading.read_p99_us));
            }
            bps += reading.bytes as f64 / reading.interval_s.max(1e-3);
            if let Some(r) = self.handles.get_mut(&key) {
                r.last = Some(reading);
            }
        }
        let now = resources::read();
        let children: HashMap<u32, u64> = self
            .handles
            .values()
            .filter_map(|r| r.handle.pid())
            .map(|pid| (pid, resources::process_cpu(pid)))
            .collect();
        // A child's CPU since the last look; one started since counts from its start.
        let ours = children.iter().map(|(pid, cpu)| cpu - self.looked.1.get(pid).copied().unwrap_or(0).min(*cpu)).sum();
        let cpu_others_percent = resources::others_percent(&self.looked.0, &now, ours);
        self.looked = (now, children);
        let before = self.steer.node_cap();
        self.steer.observe(Reading { read_p99_us: p99, read_bps: bps as u64, cpu_others_percent });
        let after = self.steer.node_cap();
        if after != before {
            let s = self.steer.status();
            let cap = after.map_or("none".to_owned(), crate::human_size);
            info!(
                reason = ?s.reason,
                read_p99_ms = s.read_p99_ms,
                cpu_others_percent,
                "read cap of this node now {cap}/s ({:?}: reads p99 {} ms, {}/s, others' CPU {cpu_others_percent}%)",
                s.reason,
                s.read_p99_ms,
                crate::human_size(s.read_bps)
            );
        }
        self.recap();
    }

    /// Answers one admin request.
    fn admin(&mut self, request: &admin::Request) -> Value {
        let arg = request.arg.as_deref();
        match (request.command.as_str(), arg) {
            ("help", _) => json!({"ok": true, "commands": {
                "status": "the node, its tasks and leases, and its read caps with their reasons",
                "pause": "every shard stops reading (its lease is still renewed, nothing is handed back)",
                "resume": "the shards read again",
                "drain": "hand every shard back at its next segment boundary, deliver the reports, exit 0",
                "throttle RATE": "cap the node's reads at RATE per second (50MiB); `throttle none` lifts it",
                "perf": "each shard's read rate, read time p99 and cap, and the host's use",
                "help": "this list",
            }}),
            ("status", None) => self.status(),
            ("pause", None) | ("resume", None) => {
                let pause = request.command == "pause";
                info!("admin: {}", request.command);
                self.steer.set_paused(pause);
                self.recap();
                json!({"ok": true, "paused": pause})
            }
            ("drain", None) => {
                info!("admin: drain");
                self.drain_asked = true;
                json!({"ok": true, "draining": true, "tasks": self.handles.len()})
            }
            ("throttle", Some(rate)) => match crate::source::throttle::parse_cap(rate) {
                Some(bps) => {
                    info!("admin: throttle {rate}");
                    self.steer.set_operator(Some(bps));
                    self.recap();
                    json!({"ok": true, "throttle": self.steer.status()})
                }
                None => admin::refusal(format!("throttle {rate:?}: not a rate (50MiB, 1000000, none)")),
            },
            ("throttle", None) => admin::refusal("throttle needs a rate: throttle 50MiB, or throttle none"),
            ("perf", None) => self.perf(),
            (command @ ("status" | "pause" | "resume" | "drain" | "perf"), Some(arg)) => {
                admin::refusal(format!("{command} takes no argument (given {arg:?})"))
            }
            (other, _) => admin::refusal(format!("unknown command {other:?}; `help` lists them")),
        }
    }

    fn tasks(&self) -> Vec<Value> {
        let shards = self.state.running();
        self.handles
            .iter()
            .map(|(key, r)| {
                let l = key.lease();
                let kind = if matches!(key, TaskKey::Shard(_)) { "shard" } else { "commit" };
                let cap = if kind == "shard" { self.steer.shard_cap(r.assigned_cap, shards) } else { 0 };
                json!({"kind": kind, "job": l.job, "shard": l.shard, "token": l.token, "db": r.db,
                       "running_s": r.started.elapsed().as_secs_f64(), "read_cap_bps": cap})
            })
            .collect()
    }

    fn status(&self) -> Value {
        json!({"ok": true, "node": self.name, "control": self.control, "paused": self.steer.paused(),
               "leaving": self.drain_asked, "tasks": self.tasks(), "reports_waiting": self.outbox.len(),
               "throttle": self.steer.status()})
    }

    fn perf(&self) -> Value {
        let shards: Vec<Value> = self
            .handles
            .iter()
            .filter_map(|(key, r)| {
                let reading = r.last?;
                let l = key.lease();
                Some(json!({"job": l.job, "shard": l.shard, "db": r.db, "read_bps": (reading.bytes as f64 / reading.interval_s.max(1e-3)) as u64,
                            "reads": reading.reads, "read_p99_ms": reading.read_p99_us as f64 / 1000.0, "read_cap_bps": r.handle.cap()}))
            })
            .collect();
        let u = self.last_usage;
        json!({"ok": true, "shards": shards, "throttle": self.steer.status(), "throughput_bps": self.throughput_bps,
               "host": {"cpu_percent": u.cpu_percent, "memory_used_bytes": u.memory_used_bytes, "network_bps": u.network_bps, "disk_bps": u.disk_bps}})
    }

    fn queue(&mut self, key: TaskKey, outcome: wire::control::ShardOutcome) {
        if self.outbox.len() >= limits::AGENT_REPORT_QUEUE {
            let dropped = self.outbox.pop_front();
            warn!("too many reports waiting: dropped {dropped:?} (its lease expires on the service instead)");
        }
        self.outbox.push_back(ShardReport { node: self.name.clone(), lease: key.lease(), outcome });
    }

    /// Sends the waiting reports, oldest first, until one cannot be delivered; whether all
    /// were.
    fn flush_reports(&mut self) -> bool {
        while let Some(report) = self.outbox.front() {
            let sent_at = self.now();
            match self.client.report(report) {
                Ok(orders) => {
                    self.outbox.pop_front();
                    let actions = self.state.orders(sent_at, orders.orders);
                    self.apply(actions);
                }
                Err(e @ CallError::Refused { .. }) => {
                    // A stale lease, or a job the service no longer has: nothing to retry.
                    warn!("report {:?} refused: {e}", report.outcome);
                    self.outbox.pop_front();
                }
                Err(e) => {
                    warn!("report waits: {e}");
                    return false;
                }
            }
        }
        true
    }
}
