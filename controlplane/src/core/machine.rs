//! The event loop of the core: events in, decisions out, the time an argument. It joins the
//! registry, the wait order, the planner, placement and the leases: a database becomes due at
//! half its RPO after its last snapshot (half, so a failover still meets the deadline), waits in
//! the order, is planned into a job of one or more shards, and each shard is placed on a node
//! under a lease. A node that stops renewing loses its shards at the lease's end; they wait
//! again and resume from their last checkpointed segment on whichever node takes them. When
//! every shard of a job has finished, the job is committed: one snapshot.

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap, FxHashSet};

use super::leases::{LeaseError, Leases, ShardKey};
use super::model::{DbName, HostName, Millis, NodeName, Priority};
use super::order::WaitOrder;
use super::placement::{place, HostBudget, NodeRoom, Resources, RoomIndex, Wait};
use super::planner::plan;
use super::registry::{in_window, next_open, DbSpec, NodeCapacity, Registry, RegistryError};
use super::scale::{steady_bps, Demand, ScaleReason, Scaler};
use wire::throttle::{AimdParams, Throttle};

/// The core's settings, in one place.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a lease lasts past its grant or renewal.
    pub lease_ttl: Millis,
    /// A node heard nothing from for this long gets no new work until it is heard from again.
    pub node_silent_after: Millis,
    /// What one running shard reserves on its node.
    pub shard_need: Resources,
    /// Backups one source host serves at once, and the bytes per second they read together.
    pub host_max_running: u32,
    pub host_max_read_bps: u64,
    /// The throughput assumed for a node that has reported none yet.
    pub default_node_bps: u64,
    /// The read-cap loops, per source host (its ceiling is `host_max_read_bps`) and per node.
    pub throttle: AimdParams,
    /// How often the desired node count is worked out, the time within which the backlog of
    /// open jobs should clear, and the share of the nodes' shown throughput to plan for.
    pub scale_every: Millis,
    pub backlog_horizon: Millis,
    pub target_utilisation_percent: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl: Millis::from_secs(10),
            node_silent_after: Millis::from_secs(30),
            shard_need: Resources { cores: 2, memory_bytes: 2 << 30, network_bps: 200 << 20, disk_bps: 200 << 20 },
            host_max_running: 4,
            host_max_read_bps: 800 << 20,
            default_node_bps: 200 << 20,
            throttle: AimdParams::default(),
            scale_every: Millis::from_secs(60),
            backlog_horizon: Millis::from_secs(3600),
            target_utilisation_percent: 80,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    DbRegistered(DbSpec),
    DbChanged(DbSpec),
    DbRemoved(DbName),
    NodeJoined {
        node: NodeName,
        capacity: NodeCapacity,
    },
    NodeLeft(NodeName),
    /// Take `node` out of service gently (scaling down, maintenance): it gets no new work, and
    /// its shards hand back at their next segment boundary.
    NodeDrain(NodeName),
    /// What a node uses now and how it has done lately.
    Heartbeat {
        node: NodeName,
        report: NodeReport,
    },
    LeaseRenewed {
        key: ShardKey,
        node: NodeName,
        token: u64,
    },
    /// A shard's segments done so far (each durable, its checkpoint written), and how its
    /// source host has been answering reads since the last report.
    Progress {
        key: ShardKey,
        node: NodeName,
        token: u64,
        segments_done: u64,
        source: Option<SourceLoad>,
    },
    ShardFinished {
        key: ShardKey,
        node: NodeName,
        token: u64,
        bytes: u64,
    },
    ShardFailed {
        key: ShardKey,
        node: NodeName,
        token: u64,
    },
    /// A shard handed back when preempted, at a segment boundary: `segments_done` are durable.
    ShardYielded {
        key: ShardKey,
        node: NodeName,
        token: u64,
        segments_done: u64,
    },
    Tick,
}

/// A node's resource report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeReport {
    pub used: Resources,
    /// Bytes per second one shard has moved on it lately (0: nothing measured yet).
    pub throughput_bps: u64,
    pub cpu_percent: u8,
    /// The slowest pipeline stage's latency p99 (read, chunk, compress, store), microseconds.
    pub stage_p99_us: u64,
}

/// How a source host answers a backup's reads: read latency p99 and its CPU use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLoad {
    pub read_p99_us: u64,
    pub cpu_percent: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run shard `key` of `db` (one of `shards`) on `node` from segment `resume_from`, under the
    /// lease `token` until `expires`, reading at most `read_cap_bps` from the source host.
    Assign {
        key: ShardKey,
        db: DbName,
        shards: u32,
        node: NodeName,
        token: u64,
        expires: Millis,
        resume_from: u64,
        read_cap_bps: u64,
    },
    /// `node` no longer holds shard `key` (its lease ended): it must stop and write nothing more.
    Revoke { key: ShardKey, node: NodeName, token: u64 },
    /// `node` should hand shard `key` back at its next segment boundary (a critical backup
    /// needs the room), reporting [`Event::ShardYielded`].
    Preempt { key: ShardKey, node: NodeName, token: u64 },
    /// Every shard of `job` finished: commit its snapshot of `db`.
    Commit { job: u64, db: DbName, bytes: u64 },
    /// The backups reading from `host` may read `bps` together from now: its loop moved.
    HostReadCap { host: HostName, bps: u64 },
    /// `node` may move `bps` in all from now.
    NodeRateCap { node: NodeName, bps: u64 },
    /// `node`, draining, holds no shard any more: it may leave.
    Drained { node: NodeName },
    /// The fleet should have `count` nodes: the steady rate its RPOs ask for and the open
    /// backlog, at the nodes' shown throughput.
    DesiredNodes { count: u32, reason: ScaleReason, steady_bps: u64, backlog_bytes: u64 },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the clock went back from {last} to {now}; the event is refused")]
    ClockBackwards { last: Millis, now: Millis },
    #[error("shard {}/{} belongs to no open job", .0.job, .0.shard)]
    UnknownShard(ShardKey),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShardState {
    Waiting,
    Running,
    Done,
}

struct Job {
    db: DbName,
    shards: Vec<(ShardState, u64)>,
    bytes: u64,
    /// Shards waiting for a node.
    waiting: usize,
    /// Planned bytes per shard, and planned bytes not finished yet (the backlog's share).
    shard_bytes: u64,
    unfinished: u64,
}

#[derive(Default)]
struct DbState {
    last_snapshot: Option<Millis>,
    /// Bytes of its last snapshot, replacing the registered estimate.
    last_bytes: Option<u64>,
    job: Option<u64>,
    /// What it adds to the fleet's steady demand.
    steady_bps: u64,
    /// When it was registered: its RPO runs from then until its first snapshot.
    registered: Millis,
}

impl DbState {
    /// What its RPO deadline counts from: its last snapshot, or its registration.
    fn rpo_base(&self) -> Millis {
        self.last_snapshot.unwrap_or(self.registered)
    }
}

struct NodeState {
    capacity: NodeCapacity,
    /// What it last reported in use.
    used: Resources,
    throughput_bps: u64,
    running: BTreeSet<ShardKey>,
    /// What it adds to the fleet's rate: its throughput times the shards it fits.
    rate_bps: u64,
    throttle: Throttle,
    /// When it last sent anything, and whether placement skips it for that.
    last_seen: Millis,
    silent: bool,
    /// Being drained: no new work.
    draining: bool,
}

/// What a running shard took when it was placed, to give back when it stops.
struct Running {
    read_cap_bps: u64,
    class: Priority,
    host: HostName,
}

struct HostState {
    running: u32,
    read_bps: u64,
    throttle: Throttle,
    /// Its running shards by class rank: where a critical backup of this host finds victims.
    shards: BTreeSet<(u8, ShardKey)>,
}

/// A parked database's place in the order: class, due time, deadline.
type Parked = (Priority, Millis, Millis);

#[derive(Default)]
pub struct Core {
    config: Config,
    registry: Registry,
    order: WaitOrder,
    leases: Leases,
    dbs: FxHashMap<DbName, DbState>,
    nodes: FxHashMap<NodeName, NodeState>,
    /// Databases waiting on a source host at its caps, by host: back in the order when it
    /// runs one backup fewer.
    parked: FxHashMap<HostName, Vec<(DbName, Parked)>>,
    /// Nodes with room for one more shard, in placement's preference: a placement is a lookup,
    /// and a pass with the fleet full costs nothing per node.
    roomy: RoomIndex,
    hosts: FxHashMap<HostName, HostState>,
    jobs: FxHashMap<u64, Job>,
    /// Running shards: their read caps, to give back to their host, and their class.
    running: FxHashMap<ShardKey, Running>,
    /// Running shards by class, newest last: where a critical backup finds its victims.
    running_by_class: [BTreeSet<ShardKey>; 4],
    /// Shards told to hand back at their next segment boundary, not yet handed back.
    preempting: FxHashSet<ShardKey>,
    /// Draining nodes not yet announced drained.
    draining: BTreeSet<NodeName>,
    /// Databases not due yet, by when they will be.
    not_due: BTreeSet<(Millis, DbName)>,
    next_job: u64,
    /// Shards all nodes fit together.
    slots: u64,
    demand: Demand,
    scaler: Scaler,
    next_scale: Millis,
    desired: Option<(u32, ScaleReason)>,
    now: Millis,
}

impl Core {
    pub fn new(config: Config) -> Self {
        Self { config, ..Self::default() }
    }

    /// Applies `event` at `now`; returns the decisions it leads to. An error changes nothing
    /// (not even the clock), beyond counting a stale token.
    pub fn handle(&mut self, now: Millis, event: Event) -> Result<Vec<Decision>, CoreError> {
        if now < self.now {
            return Err(CoreError::ClockBackwards { last: self.now, now });
        }
        let before = self.now;
        self.now = now;
        let result = self.apply(now, event);
        if result.is_err() {
            self.now = before;
        }
        result
    }

    fn apply(&mut self, now: Millis, event: Event) -> Result<Vec<Decision>, CoreError> {
        let mut out = vec![];
        match event {
            Event::DbRegistered(spec) => {
                let name = spec.name.clone();
                let steady = steady_bps(spec.size_estimate, spec.rpo);
                self.registry.register(spec)?;
                self.demand.add_steady(steady);
                self.dbs.insert(name.clone(), DbState { steady_bps: steady, registered: now, ..DbState::default() });
                self.make_due(&name);
            }
            Event::DbChanged(spec) => {
                let name = spec.name.clone();
                let old = self.registry.change(spec)?;
                self.refresh_steady(&name);
                // Its place follows its new class, RPO and host.
                let waited = self.unwait(&name, &old.source_host);
                if waited && self.dbs[&name].job.is_some() {
                    self.requeue(&name);
                } else if self.dbs[&name].job.is_none() {
                    self.make_due(&name);
                }
            }
            Event::DbRemoved(name) => {
                let spec = self.registry.remove(&name)?;
                self.unwait(&name, &spec.source_host);
                let state = self.dbs.remove(&name).expect("registered databases have a state");
                self.demand.remove_steady(state.steady_bps);
                if let Some(job) = state.job {
                    self.close_job(job, &mut out);
                }
            }
            Event::NodeJoined { node, capacity } => {
                self.registry.join(node.clone(), capacity)?;
                let throughput_bps = self.config.default_node_bps;
                let fits = slots(&capacity, &self.config.shard_need);
                self.slots = self.slots.saturating_add(fits);
                let rate_bps = throughput_bps.saturating_mul(fits);
                self.demand.add_node(rate_bps);
                let throttle = Throttle::new(self.config.throttle, self.config.throttle.max_bps);
                let state = NodeState {
                    capacity,
                    used: Resources::default(),
                    throughput_bps,
                    running: BTreeSet::new(),
                    rate_bps,
                    throttle,
                    last_seen: now,
                    silent: false,
                    draining: false,
                };
                self.nodes.insert(node.clone(), state);
                self.refresh_room(&node);
            }
            Event::NodeLeft(node) => {
                self.registry.leave(&node)?;
                let state = self.nodes.remove(&node).expect("registered nodes have a state");
                self.demand.remove_node(state.rate_bps);
                self.slots = self.slots.saturating_sub(slots(&state.capacity, &self.config.shard_need));
                self.roomy.remove(&node);
                for key in state.running {
                    if let Some(lease) = self.leases.revoke(&key) {
                        out.push(Decision::Revoke { key: key.clone(), node: node.clone(), token: lease.token });
                    }
                    self.unreserve(&key, &node);
                    self.shard_back(&key);
                }
            }
            Event::NodeDrain(node) => {
                self.registry.node(&node)?;
                let state = self.nodes.get_mut(&node).expect("registered nodes have a state");
                state.draining = true;
                let running: Vec<ShardKey> = state.running.iter().cloned().collect();
                self.roomy.remove(&node);
                for key in running {
                    if !self.preempting.contains(&key) {
                        self.preempt(key, &mut out);
                    }
                }
                self.draining.insert(node);
            }
            Event::Heartbeat { node, report } => {
                self.registry.node(&node)?;
                let state = self.nodes.get_mut(&node).expect("registered nodes have a state");
                state.used = report.used;
                if report.throughput_bps > 0 {
                    state.throughput_bps = report.throughput_bps;
                    self.demand.remove_node(state.rate_bps);
                    state.rate_bps =
                        report.throughput_bps.saturating_mul(slots(&state.capacity, &self.config.shard_need));
                    self.demand.add_node(state.rate_bps);
                }
                if let Some(bps) = state.throttle.report(report.stage_p99_us, report.cpu_percent) {
                    out.push(Decision::NodeRateCap { node: node.clone(), bps });
                }
                self.seen(&node, now);
            }
            Event::LeaseRenewed { key, node, token } => {
                self.leases.renew(&key, &node, token, now, self.config.lease_ttl)?;
                self.seen(&node, now);
            }
            Event::Progress { key, node, token, segments_done, source } => {
                self.leases.check(&key, &node, token)?;
                self.seen(&node, now);
                let shard = self.shard_mut(&key)?;
                shard.1 = shard.1.max(segments_done);
                if let Some(load) = source {
                    let db = &self.jobs[&key.job].db;
                    let host = &self.registry.db(db).expect("an open job's database is registered").source_host;
                    if let Some(h) = self.hosts.get_mut(host) {
                        if let Some(bps) = h.throttle.report(load.read_p99_us, load.cpu_percent) {
                            out.push(Decision::HostReadCap { host: host.clone(), bps });
                        }
                    }
                }
            }
            Event::ShardFinished { key, node, token, bytes } => {
                self.leases.release(&key, &node, token)?;
                self.seen(&node, now);
                self.unreserve(&key, &node);
                let job = self.jobs.get_mut(&key.job).ok_or_else(|| CoreError::UnknownShard(key.clone()))?;
                job.shards[key.shard as usize].0 = ShardState::Done;
                job.bytes += bytes;
                let finished = job.shard_bytes.min(job.unfinished);
                job.unfinished -= finished;
                self.demand.remove_backlog(finished);
                if job.shards.iter().all(|s| s.0 == ShardState::Done) {
                    let job = self.jobs.remove(&key.job).expect("found above");
                    self.demand.remove_backlog(job.unfinished);
                    for shard in 0..job.shards.len() as u32 {
                        self.leases.forget(&ShardKey { job: key.job, shard });
                    }
                    let db = self.dbs.get_mut(&job.db).expect("a job's database is registered");
                    db.job = None;
                    db.last_snapshot = Some(now);
                    db.last_bytes = Some(job.bytes);
                    out.push(Decision::Commit { job: key.job, db: job.db.clone(), bytes: job.bytes });
                    self.refresh_steady(&job.db);
                    self.make_due(&job.db);
                }
            }
            Event::ShardFailed { key, node, token } => {
                self.leases.release(&key, &node, token)?;
                self.seen(&node, now);
                self.unreserve(&key, &node);
                self.shard_back(&key);
            }
            Event::ShardYielded { key, node, token, segments_done } => {
                self.leases.check(&key, &node, token)?;
                let shard = self.shard_mut(&key)?;
                shard.1 = shard.1.max(segments_done);
                self.leases.release(&key, &node, token)?;
                self.seen(&node, now);
                self.unreserve(&key, &node);
                self.shard_back(&key);
            }
            Event::Tick => {
                for (key, lease) in self.leases.expire(now) {
                    out.push(Decision::Revoke { key: key.clone(), node: lease.node.clone(), token: lease.token });
                    self.unreserve(&key, &lease.node);
                    self.shard_back(&key);
                }
                if now >= self.next_scale {
                    self.next_scale = now.after(self.config.scale_every);
                    self.decide_scale(now, &mut out);
                }
            }
        }
        self.wake(now);
        self.order.age(now);
        self.schedule(now, &mut out);
        self.announce_drained(&mut out);
        Ok(out)
    }

    /// Puts `db` where its next backup waits: in the order when due, else among the not due.
    fn make_due(&mut self, db: &DbName) {
        let spec = self.registry.db(db).expect("made due while registered");
        let state = &self.dbs[db];
        let (due, deadline) = match state.last_snapshot {
            None => (state.registered, state.registered.after(spec.rpo)),
            Some(at) => (at.after(Millis(spec.rpo.0 / 2)), at.after(spec.rpo)),
        };
        // A backup starts only within its database's window.
        let due = next_open(spec.window, due);
        if due <= self.now {
            let class = spec.priority;
            self.enqueue(db, class, due, deadline);
        } else {
            self.not_due.insert((due, db.clone()));
        }
    }

    /// Moves the databases due by `now` into the order.
    fn wake(&mut self, now: Millis) {
        while let Some((due, _)) = self.not_due.first() {
            if *due > now {
                break;
            }
            let (due, db) = self.not_due.pop_first().expect("first exists");
            let spec = self.registry.db(&db).expect("not-due databases are registered");
            let deadline = self.dbs[&db].rpo_base().after(spec.rpo);
            let class = spec.priority;
            self.enqueue(&db, class, due, deadline);
        }
    }

    /// Puts a due database in the order with its job planned, so that the backlog counts it
    /// from when it is due, not from when a node takes it.
    fn enqueue(&mut self, db: &DbName, class: Priority, due: Millis, deadline: Millis) {
        if self.dbs[db].job.is_none() {
            self.open_job(db, deadline);
        }
        self.order.push(db.clone(), class, due, deadline);
    }

    /// Plans `db`'s next backup into a job of one or more shards.
    fn open_job(&mut self, db: &DbName, deadline: Millis) -> u64 {
        let spec = self.registry.db(db).expect("planned while registered");
        let size = self.dbs[db].last_bytes.unwrap_or(spec.size_estimate);
        let shards = plan(size, deadline.since(self.now), self.config.default_node_bps).shards();
        let id = self.next_job;
        self.next_job += 1;
        let shard_bytes = size.div_ceil(u64::from(shards));
        let job = Job {
            db: db.clone(),
            shards: vec![(ShardState::Waiting, 0); shards as usize],
            waiting: shards as usize,
            bytes: 0,
            shard_bytes,
            unfinished: size,
        };
        self.jobs.insert(id, job);
        self.demand.add_backlog(size);
        self.dbs.get_mut(db).expect("registered").job = Some(id);
        id
    }

    /// Keeps `db`'s share of the steady demand true to its size and RPO.
    fn refresh_steady(&mut self, db: &DbName) {
        let spec = self.registry.db(db).expect("registered");
        let state = self.dbs.get_mut(db).expect("registered databases have a state");
        let steady = steady_bps(state.last_bytes.unwrap_or(spec.size_estimate), spec.rpo);
        self.demand.remove_steady(state.steady_bps);
        self.demand.add_steady(steady);
        state.steady_bps = steady;
    }

    /// Works out the desired node count; a decision when it, or why, changed.
    fn decide_scale(&mut self, now: Millis, out: &mut Vec<Decision>) {
        let c = &self.config;
        let mut needed = self.demand.needed(c.backlog_horizon, c.target_utilisation_percent, c.default_node_bps);
        // Saturated: no node has room and backups wait for one. The rates above assume a shard
        // moves at its node's throughput, and read caps on busy source hosts make it move less;
        // while work waits for room, the need is at least the shards running at the target
        // utilisation.
        let nodes = u64::from(self.demand.nodes());
        if !self.order.is_empty() && self.roomy.is_empty() && nodes > 0 && self.slots > 0 {
            let running = self.running.len() as u64 * 100 * nodes;
            let busy = running.div_ceil(c.target_utilisation_percent.clamp(1, 100) * self.slots);
            needed = needed.max(busy.min(u64::from(u32::MAX)) as u32);
        }
        let desired = self.scaler.decide(now, needed, self.demand.nodes());
        if self.desired != Some(desired) {
            self.desired = Some(desired);
            out.push(Decision::DesiredNodes {
                count: desired.0,
                reason: desired.1,
                steady_bps: self.demand.steady(),
                backlog_bytes: self.demand.backlog(),
            });
        }
    }

    /// Places waiting work in the order's order, until no node has room: a pass stops at the
    /// first backup no node can take, so with the fleet busy it costs one placement attempt.
    fn schedule(&mut self, now: Millis, out: &mut Vec<Decision>) {
        let mut cursor = None;
        while let Some(place) = self.order.first_after(cursor.as_ref()) {
            let (_, deadline, db) = &place;
            let window = self.registry.db(db).expect("waiting databases are registered").window;
            if !in_window(window, now.0) {
                // Its window closed while it waited: it waits for the next one, out of the
                // order (what already runs finishes; a backup is not cut at the window's end).
                self.order.take(db);
                self.not_due.insert((next_open(window, now), db.clone()));
                cursor = Some(place);
                continue;
            }
            match self.place_db(db, *deadline, now, out) {
                Ok(()) => {
                    self.order.remove(db);
                }
                Err(Wait::HostAtCap) => {
                    // Parked until its host runs one backup fewer: later passes walk past it
                    // at no cost.
                    let host = self.registry.db(db).expect("waiting databases are registered").source_host.clone();
                    self.preempt_on_host(db, &host, out);
                    let waiting = self.order.take(db).expect("walked from the order");
                    self.parked.entry(host).or_default().push((db.clone(), waiting));
                }
                Err(Wait::NoRoom) => {
                    self.preempt_for(db, out);
                    return;
                }
            }
            cursor = Some(place);
        }
    }

    /// A critical backup that finds no room takes it from lower classes: for each of its shards
    /// still waiting, one running shard of the lowest class running (the newest of them) is
    /// told to hand back at its next segment boundary, where its checkpoint keeps all it did.
    /// Only critical backups preempt, and only lower classes: a class never preempts itself, so
    /// preemption cannot cascade.
    fn preempt_for(&mut self, db: &DbName, out: &mut Vec<Decision>) {
        let waiting = self.critical_waiting_shards(db);
        while self.preempting.len() < waiting {
            let victim = self.running_by_class[1..]
                .iter()
                .rev()
                .find_map(|running| running.iter().rev().find(|k| !self.preempting.contains(*k)))
                .cloned();
            let Some(key) = victim else { return };
            self.preempt(key, out);
        }
    }

    /// A critical backup whose source host is at its caps takes the host's slots from the
    /// lower classes reading from it, the same way: their shards hand back at a segment
    /// boundary, and the host's next free slot goes to the critical backup, first in the order.
    fn preempt_on_host(&mut self, db: &DbName, host: &HostName, out: &mut Vec<Decision>) {
        let waiting = self.critical_waiting_shards(db);
        let Some(h) = self.hosts.get(host) else { return };
        let pending = h.shards.iter().filter(|(_, k)| self.preempting.contains(k)).count();
        let victims: Vec<ShardKey> = h
            .shards
            .iter()
            .rev()
            .take_while(|(rank, _)| *rank > Priority::Critical.rank())
            .filter(|(_, k)| !self.preempting.contains(k))
            .map(|(_, k)| k.clone())
            .take(waiting.saturating_sub(pending))
            .collect();
        for key in victims {
            self.preempt(key, out);
        }
    }

    /// How many shards `db` has waiting, if it is critical (only critical backups preempt).
    fn critical_waiting_shards(&self, db: &DbName) -> usize {
        let critical = self.registry.db(db).is_ok_and(|spec| spec.priority == Priority::Critical);
        match self.dbs[db].job.and_then(|j| self.jobs.get(&j)) {
            Some(job) if critical => job.waiting,
            _ => 0,
        }
    }

    fn preempt(&mut self, key: ShardKey, out: &mut Vec<Decision>) {
        let lease = self.leases.holder(&key).expect("running shards hold a lease").clone();
        self.preempting.insert(key.clone());
        out.push(Decision::Preempt { key, node: lease.node, token: lease.token });
    }

    /// Places what `db` has waiting, planning its job first if it has none; an error leaves what
    /// could not be placed waiting.
    fn place_db(&mut self, db: &DbName, deadline: Millis, now: Millis, out: &mut Vec<Decision>) -> Result<(), Wait> {
        let spec = self.registry.db(db).expect("waiting databases are registered");
        let (host_name, spec_class) = (spec.source_host.clone(), spec.priority);
        let job_id = match self.dbs[db].job {
            Some(job) => job,
            None => self.open_job(db, deadline),
        };
        let shards = self.jobs[&job_id].shards.len() as u32;
        for shard in 0..shards {
            let (state, resume_from) = self.jobs[&job_id].shards[shard as usize];
            if state != ShardState::Waiting {
                continue;
            }
            let config = &self.config;
            let host = self.hosts.entry(host_name.clone()).or_insert_with(|| HostState {
                running: 0,
                read_bps: 0,
                shards: BTreeSet::new(),
                throttle: Throttle::new(
                    AimdParams { max_bps: config.host_max_read_bps, ..config.throttle },
                    config.host_max_read_bps,
                ),
            });
            let budget = HostBudget {
                max_running: config.host_max_running,
                max_read_bps: host.throttle.cap_bps(),
                running: host.running,
                read_bps: host.read_bps,
            };
            // Before the nodes are looked at: a host at its caps waits whatever room there is.
            budget.left().ok_or(Wait::HostAtCap)?;
            self.skip_silent(now);
            let placed = place(&self.config.shard_need, &self.roomy, &budget)?;
            let key = ShardKey { job: job_id, shard };
            let lease = self
                .leases
                .grant(key.clone(), placed.node.clone(), now, self.config.lease_ttl)
                .expect("a waiting shard holds no lease");
            let host = self.hosts.get_mut(&host_name).expect("made above");
            host.running += 1;
            host.shards.insert((spec_class.rank(), key.clone()));
            host.read_bps += placed.read_cap_bps;
            let running = Running { read_cap_bps: placed.read_cap_bps, class: spec_class, host: host_name.clone() };
            self.running.insert(key.clone(), running);
            self.running_by_class[usize::from(spec_class.rank())].insert(key.clone());
            self.nodes.get_mut(&placed.node).expect("placed on a known node").running.insert(key.clone());
            self.refresh_room(&placed.node);
            let job = self.jobs.get_mut(&job_id).expect("open");
            job.shards[shard as usize].0 = ShardState::Running;
            job.waiting -= 1;
            out.push(Decision::Assign {
                key,
                db: db.clone(),
                shards,
                node: placed.node,
                token: lease.token,
                expires: lease.expires,
                resume_from,
                read_cap_bps: placed.read_cap_bps,
            });
        }
        Ok(())
    }

    fn shard_mut(&mut self, key: &ShardKey) -> Result<&mut (ShardState, u64), CoreError> {
        self.jobs
            .get_mut(&key.job)
            .and_then(|j| j.shards.get_mut(key.shard as usize))
            .ok_or_else(|| CoreError::UnknownShard(key.clone()))
    }

    /// Gives back what a running shard reserved on its node and on the source host and in the
    /// class it was placed with (a database changed since, to another host or class, gives
    /// back to where it took from).
    fn unreserve(&mut self, key: &ShardKey, node: &NodeName) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.running.remove(key);
            self.refresh_room(node);
        }
        self.preempting.remove(key);
        let Some(r) = self.running.remove(key) else { return };
        self.running_by_class[usize::from(r.class.rank())].remove(key);
        if let Some(h) = self.hosts.get_mut(&r.host) {
            h.shards.remove(&(r.class.rank(), key.clone()));
            h.running = h.running.saturating_sub(1);
            h.read_bps = h.read_bps.saturating_sub(r.read_cap_bps);
        }
        for (db, (class, due, deadline)) in self.parked.remove(&r.host).unwrap_or_default() {
            self.order.push(db, class, due, deadline);
        }
    }

    /// Notes that `node` was heard from at `now`: a silent node is placeable again (its expired
    /// leases stay expired, and its reports under their tokens are refused).
    fn seen(&mut self, node: &NodeName, now: Millis) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.last_seen = now;
            n.silent = false;
            self.refresh_room(node);
        }
    }

    /// Takes nodes not heard from for `node_silent_after` out of placement, from the most
    /// preferred down to the first one heard from lately: a dead node whose leases ran out
    /// looks roomy, and would otherwise draw backup after backup into leases that can only
    /// expire. Lazy, so a pass pays only for the silent nodes it would have chosen.
    fn skip_silent(&mut self, now: Millis) {
        while let Some(best) = self.roomy.best(&self.config.shard_need) {
            let name = best.node.clone();
            let n = self.nodes.get_mut(&name).expect("roomy nodes are registered");
            if now.since(n.last_seen) < self.config.node_silent_after {
                return;
            }
            n.silent = true;
            self.roomy.remove(&name);
        }
    }

    /// Says which draining nodes hold nothing any more (once each).
    fn announce_drained(&mut self, out: &mut Vec<Decision>) {
        let nodes = &self.nodes;
        let empty: Vec<NodeName> =
            self.draining.iter().filter(|n| nodes.get(*n).is_none_or(|s| s.running.is_empty())).cloned().collect();
        for node in empty {
            self.draining.remove(&node);
            if self.nodes.contains_key(&node) {
                out.push(Decision::Drained { node });
            }
        }
    }

    /// Keeps [`Core::roomy`] true for `node`: in it exactly when one more shard fits there and
    /// it is not silent.
    fn refresh_room(&mut self, node: &NodeName) {
        match self.nodes.get(node).filter(|n| !n.silent && !n.draining).map(|n| room(node, n, &self.config.shard_need))
        {
            Some(r) if r.free.fits(&self.config.shard_need) => self.roomy.set(r),
            _ => self.roomy.remove(node),
        }
    }

    /// A shard that lost its node waits again, keeping its checkpoint; its database waits too.
    fn shard_back(&mut self, key: &ShardKey) {
        let Some(job) = self.jobs.get_mut(&key.job) else { return };
        if let Some(shard) = job.shards.get_mut(key.shard as usize) {
            if shard.0 == ShardState::Running {
                shard.0 = ShardState::Waiting;
                job.waiting += 1;
            }
        }
        let db = job.db.clone();
        self.requeue(&db);
    }

    /// Puts a database with an open job back in the order: it was due already, so it takes its
    /// place again from now.
    fn requeue(&mut self, db: &DbName) {
        let Ok(spec) = self.registry.db(db) else { return };
        let deadline = self.dbs[db].rpo_base().after(spec.rpo);
        self.order.push(db.clone(), spec.priority, self.now, deadline);
    }

    /// Takes `db` out of wherever it waits (the order, or parked on `host`); whether it waited.
    fn unwait(&mut self, db: &DbName, host: &HostName) -> bool {
        let mut waited = self.order.remove(db);
        if let Some(parked) = self.parked.get_mut(host) {
            let before = parked.len();
            parked.retain(|(d, _)| d != db);
            waited |= parked.len() != before;
        }
        self.not_due.retain(|(_, d)| d != db);
        waited
    }

    /// Ends a removed database's job: its running shards are revoked.
    fn close_job(&mut self, job: u64, out: &mut Vec<Decision>) {
        let Some(j) = self.jobs.remove(&job) else { return };
        self.demand.remove_backlog(j.unfinished);
        for shard in 0..j.shards.len() as u32 {
            let key = ShardKey { job, shard };
            if let Some(lease) = self.leases.holder(&key).cloned() {
                out.push(Decision::Revoke { key: key.clone(), node: lease.node.clone(), token: lease.token });
                self.unreserve(&key, &lease.node);
            }
            self.leases.forget(&key);
        }
    }

    /// Databases waiting for placement.
    pub fn waiting(&self) -> usize {
        self.order.len()
    }

    /// Databases waiting for placement, by class (critical first).
    pub fn waiting_by_class(&self) -> [usize; 4] {
        self.order.count_by_class()
    }

    /// The first backup waiting for placement and its class (a host at its caps is not
    /// waiting: its databases are parked).
    pub fn first_waiting(&self) -> Option<(&DbName, Priority)> {
        self.order.first()
    }

    /// Shards told to hand back for a critical backup that have not yet.
    pub fn preempting(&self) -> usize {
        self.preempting.len()
    }

    /// Whether some node has room for one more shard.
    pub fn has_room(&self) -> bool {
        !self.roomy.is_empty()
    }

    /// The desired node count last decided, and why.
    pub fn desired_nodes(&self) -> Option<(u32, ScaleReason)> {
        self.desired
    }

    /// Whether job `job` is open: planned, and not every shard of it finished. A shard whose job
    /// is neither committed nor open is lost: the simulator checks that none is.
    pub fn is_open(&self, job: u64) -> bool {
        self.jobs.contains_key(&job)
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }
}

/// How many shards of `need` fit in `capacity`.
fn slots(capacity: &NodeCapacity, need: &Resources) -> u64 {
    let fit = |have: u64, want: u64| have.checked_div(want).unwrap_or(u64::MAX);
    fit(capacity.cores.into(), need.cores.into())
        .min(fit(capacity.memory_bytes, need.memory_bytes))
        .min(fit(capacity.network_bps, need.network_bps))
        .min(fit(capacity.disk_bps, need.disk_bps))
}

/// What is free on a node for one more shard: its capacity less the larger of what it reports
/// in use and what its shards reserve.
fn room(name: &NodeName, n: &NodeState, need: &Resources) -> NodeRoom {
    let k = n.running.len() as u64;
    let reserved = Resources {
        cores: need.cores * k as u32,
        memory_bytes: need.memory_bytes * k,
        network_bps: need.network_bps * k,
        disk_bps: need.disk_bps * k,
    };
    let c = &n.capacity;
    let free = Resources {
        cores: c.cores.saturating_sub(reserved.cores.max(n.used.cores)),
        memory_bytes: c.memory_bytes.saturating_sub(reserved.memory_bytes.max(n.used.memory_bytes)),
        network_bps: c.network_bps.saturating_sub(reserved.network_bps.max(n.used.network_bps)),
        disk_bps: c.disk_bps.saturating_sub(reserved.disk_bps.max(n.used.disk_bps)),
    };
    NodeRoom { node: name.clone(), free, throughput_bps: n.throughput_bps }
}

#[cfg(test)]
mod tests;
