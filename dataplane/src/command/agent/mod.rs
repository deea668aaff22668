//! `cbcr agent`: a node of the fleet. It registers with `cbcr-control`, heartbeats with a
//! resource report and every lease it holds, runs the shards and commits it is told to as
//! child processes ([`task`]), reports how each ended, and gives up a lease on its own clock
//! when it cannot renew it ([`state`]). A thin driver: [`state::AgentState`] decides.

pub mod client;
pub mod resources;
pub mod state;
pub mod task;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use wire::control::{Capacity, Heartbeat, Register, Registered, ResourceReport, ShardReport};

use self::client::{CallError, ControlClient};
use self::state::{Action, AgentState, TaskKey, TaskResult, Work};
use self::task::{Runner, TaskHandle};
use crate::error::{Error, Result};
use crate::limits;
use crate::net::quic::TlsFiles;

/// Between registration attempts while the service cannot be reached.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// The most an idle loop waits before it looks at its leases' deadlines again.
const LOOP_WAIT: Duration = Duration::from_millis(100);
/// Between attempts to deliver reports while the service cannot be reached.
const REPORT_RETRY_MS: u64 = 1_000;
/// Leaving (SIGTERM), the agent waits at most this long to deliver its last reports.
const LEAVE_REPORTS: Duration = Duration::from_secs(10);

pub struct AgentOptions {
    /// `https://HOST:PORT` of `cbcr-control`.
    pub control: String,
    pub name: String,
    pub tls: TlsFiles,
    pub capacity: Capacity,
    /// The children's program and environment.
    pub runner: Runner,
}

/// Why the agent stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// The control plane drained it and it held nothing more.
    Drained,
    /// Asked to stop (SIGTERM or SIGINT): its shards were handed back.
    Left,
}

/// A call may take half a lease at most (2 to 10 s): a service that does not answer must not
/// keep the loop long from stopping a shard whose lease ran out. (An answer lost to this is
/// not work lost: runs are renewed or expire, commits are ordered again until reported.)
fn call_timeout(lease_ttl_ms: u64) -> Duration {
    Duration::from_millis(lease_ttl_ms / 2).clamp(Duration::from_secs(2), Duration::from_secs(10))
}

struct Driver {
    client: ControlClient,
    name: String,
    capacity: Capacity,
    runner: Arc<Runner>,
    clock: Instant,
    state: AgentState,
    handles: BTreeMap<TaskKey, (TaskHandle, Instant)>,
    outbox: VecDeque<ShardReport>,
    done: crossbeam_channel::Sender<(TaskKey, TaskResult)>,
    /// Bytes per second of the last shard that read anything.
    throughput_bps: u64,
}

/// Runs the agent until it is drained, or `stop` is raised.
pub fn run_agent(opts: AgentOptions, stop: &AtomicBool) -> Result<AgentExit> {
    let client = ControlClient::new(&opts.control, &opts.tls)?;
    let (done, finished) = crossbeam_channel::bounded(limits::AGENT_MAX_TASKS);
    let mut d = Driver {
        client,
        name: opts.name,
        capacity: opts.capacity,
        runner: Arc::new(opts.runner),
        clock: Instant::now(),
        state: AgentState::new(limits::AGENT_MAX_TASKS),
        handles: BTreeMap::new(),
        outbox: VecDeque::new(),
        done,
        throughput_bps: 0,
    };
    let Some(registered) = d.register(stop)? else { return Ok(AgentExit::Left) };
    info!(
        node = d.name.as_str(),
        control = opts.control.as_str(),
        "registered; heartbeat every {} ms, leases of {} ms",
        registered.heartbeat_ms,
        registered.lease_ttl_ms
    );
    let mut meter = resources::Meter::start();
    d.client.set_timeout(call_timeout(registered.lease_ttl_ms));
    let mut next_beat = 0u64;
    let mut next_flush = 0u64;
    let mut left_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && left_at.is_none() {
            info!("leaving: handing every shard back");
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
            d.heartbeat(now, &registered, meter.sample());
        }
        let expired = d.state.tick(d.now());
        d.apply(expired);
        if d.state.may_exit() && (d.outbox.is_empty() || left_at.is_some_and(|t| t.elapsed() > LEAVE_REPORTS)) {
            for r in &d.outbox {
                warn!(job = r.lease.job, shard = r.lease.shard, "report not delivered: {:?}", r.outcome);
            }
            return Ok(if left_at.is_some() { AgentExit::Left } else { AgentExit::Drained });
        }
        let wait = Duration::from_millis(next_beat.saturating_sub(d.now())).min(LOOP_WAIT);
        if let Ok((key, result)) = finished.recv_timeout(wait) {
            d.finished(key, result);
            while let Ok((key, result)) = finished.try_recv() {
                d.finished(key, result);
            }
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
            cpu_percent: usage.cpu_percent,
            memory_used_bytes: usage.memory_used_bytes,
            network_bps: usage.network_bps,
            disk_bps: usage.disk_bps,
            throughput_bps: self.throughput_bps,
            // The shards run in child processes; their stage latencies are not gathered yet.
            stage_p99_us: 0,
            running: self.state.running(),
        };
        let beat = Heartbeat { node: self.name.clone(), report, leases: leases.clone() };
        match self.client.heartbeat(&beat) {
            Ok(orders) => {
                self.state.renewed(now, registered.lease_ttl_ms, &leases);
                let actions = self.state.orders(now, orders.orders);
                self.apply(actions);
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
                    let handle = task::spawn(Arc::clone(&self.runner), key, work, self.done.clone());
                    self.handles.insert(key, (handle, Instant::now()));
                }
                Action::Stop(key, how) => {
                    info!(job = key.lease().job, shard = key.lease().shard, "stopping {key:?} ({how:?})");
                    if let Some((handle, _)) = self.handles.get(&key) {
                        handle.stop(how);
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
        let started = self.handles.remove(&key).map(|(_, at)| at);
        if let (TaskResult::ShardDone { bytes, .. }, Some(at)) = (&result, started) {
            if *bytes > 0 {
                self.throughput_bps = (*bytes as f64 / at.elapsed().as_secs_f64().max(1e-3)) as u64;
            }
        }
        info!(job = key.lease().job, shard = key.lease().shard, "{key:?} ended: {result:?}");
        if let Some(outcome) = self.state.finished(key, result) {
            self.queue(key, outcome);
        }
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
