//! The event loop of the core: events in, decisions out, the time an argument. It joins the
//! registry, the wait order, the planner, placement and the leases: a database becomes due at
//! half its RPO after its last snapshot (half, so a failover still meets the deadline), waits in
//! the order, is planned into a job of one or more shards, and each shard is placed on a node
//! under a lease. A node that stops renewing loses its shards at the lease's end; they wait
//! again and resume from their last checkpointed segment on whichever node takes them. When
//! every shard of a job has finished, the job is committed: one snapshot.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::leases::{LeaseError, Leases, ShardKey};
use super::model::{DbName, HostName, Millis, NodeName, Priority};
use super::order::WaitOrder;
use super::placement::{place, HostBudget, NodeRoom, Resources, RoomIndex, Wait};
use super::planner::plan;
use super::registry::{DbSpec, NodeCapacity, Registry, RegistryError};

/// The core's settings, in one place.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a lease lasts past its grant or renewal.
    pub lease_ttl: Millis,
    /// What one running shard reserves on its node.
    pub shard_need: Resources,
    /// Backups one source host serves at once, and the bytes per second they read together.
    pub host_max_running: u32,
    pub host_max_read_bps: u64,
    /// The throughput assumed for a node that has reported none yet.
    pub default_node_bps: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl: Millis::from_secs(10),
            shard_need: Resources { cores: 2, memory_bytes: 2 << 30, network_bps: 200 << 20, disk_bps: 200 << 20 },
            host_max_running: 4,
            host_max_read_bps: 800 << 20,
            default_node_bps: 200 << 20,
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
    /// What a node uses now and the bytes per second it has moved lately.
    Heartbeat {
        node: NodeName,
        used: Resources,
        throughput_bps: u64,
    },
    LeaseRenewed {
        key: ShardKey,
        node: NodeName,
        token: u64,
    },
    /// A shard's segments done so far (each durable, its checkpoint written).
    Progress {
        key: ShardKey,
        node: NodeName,
        token: u64,
        segments_done: u64,
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
    Tick,
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
    /// Every shard of `job` finished: commit its snapshot of `db`.
    Commit { job: u64, db: DbName, bytes: u64 },
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
}

#[derive(Default)]
struct DbState {
    last_snapshot: Option<Millis>,
    /// Bytes of its last snapshot, replacing the registered estimate.
    last_bytes: Option<u64>,
    job: Option<u64>,
}

struct NodeState {
    capacity: NodeCapacity,
    used: Resources,
    throughput_bps: u64,
    running: BTreeSet<ShardKey>,
}

#[derive(Default)]
struct HostState {
    running: u32,
    read_bps: u64,
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
    /// Read caps of running shards, to give back to their host.
    read_caps: FxHashMap<ShardKey, u64>,
    /// Databases not due yet, by when they will be.
    not_due: BTreeSet<(Millis, DbName)>,
    next_job: u64,
    now: Millis,
}

impl Core {
    pub fn new(config: Config) -> Self {
        Self { config, ..Self::default() }
    }

    /// Applies `event` at `now`; returns the decisions it leads to. An error changes nothing.
    pub fn handle(&mut self, now: Millis, event: Event) -> Result<Vec<Decision>, CoreError> {
        if now < self.now {
            return Err(CoreError::ClockBackwards { last: self.now, now });
        }
        self.now = now;
        let mut out = vec![];
        match event {
            Event::DbRegistered(spec) => {
                let name = spec.name.clone();
                self.registry.register(spec)?;
                self.dbs.insert(name.clone(), DbState::default());
                self.make_due(&name);
            }
            Event::DbChanged(spec) => {
                let name = spec.name.clone();
                let old = self.registry.change(spec)?;
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
                if let Some(job) = self.dbs.remove(&name).and_then(|d| d.job) {
                    self.close_job(job, &spec.source_host, &mut out);
                }
            }
            Event::NodeJoined { node, capacity } => {
                self.registry.join(node.clone(), capacity)?;
                let throughput_bps = self.config.default_node_bps;
                self.nodes.insert(
                    node.clone(),
                    NodeState { capacity, used: Resources::default(), throughput_bps, running: BTreeSet::new() },
                );
                self.refresh_room(&node);
            }
            Event::NodeLeft(node) => {
                self.registry.leave(&node)?;
                let state = self.nodes.remove(&node).expect("registered nodes have a state");
                self.roomy.remove(&node);
                for key in state.running {
                    if let Some(lease) = self.leases.revoke(&key) {
                        out.push(Decision::Revoke { key: key.clone(), node: node.clone(), token: lease.token });
                    }
                    self.unreserve(&key, &node);
                    self.shard_back(&key);
                }
            }
            Event::Heartbeat { node, used, throughput_bps } => {
                self.registry.node(&node)?;
                let state = self.nodes.get_mut(&node).expect("registered nodes have a state");
                state.used = used;
                if throughput_bps > 0 {
                    state.throughput_bps = throughput_bps;
                }
                self.refresh_room(&node);
            }
            Event::LeaseRenewed { key, node, token } => {
                self.leases.renew(&key, &node, token, now, self.config.lease_ttl)?;
            }
            Event::Progress { key, node, token, segments_done } => {
                self.leases.check(&key, &node, token)?;
                let shard = self.shard_mut(&key)?;
                shard.1 = shard.1.max(segments_done);
            }
            Event::ShardFinished { key, node, token, bytes } => {
                self.leases.release(&key, &node, token)?;
                self.unreserve(&key, &node);
                let job = self.jobs.get_mut(&key.job).ok_or_else(|| CoreError::UnknownShard(key.clone()))?;
                job.shards[key.shard as usize].0 = ShardState::Done;
                job.bytes += bytes;
                if job.shards.iter().all(|s| s.0 == ShardState::Done) {
                    let job = self.jobs.remove(&key.job).expect("found above");
                    for shard in 0..job.shards.len() as u32 {
                        self.leases.forget(&ShardKey { job: key.job, shard });
                    }
                    let db = self.dbs.get_mut(&job.db).expect("a job's database is registered");
                    db.job = None;
                    db.last_snapshot = Some(now);
                    db.last_bytes = Some(job.bytes);
                    out.push(Decision::Commit { job: key.job, db: job.db.clone(), bytes: job.bytes });
                    self.make_due(&job.db);
                }
            }
            Event::ShardFailed { key, node, token } => {
                self.leases.release(&key, &node, token)?;
                self.unreserve(&key, &node);
                self.shard_back(&key);
            }
            Event::Tick => {
                for (key, lease) in self.leases.expire(now) {
                    out.push(Decision::Revoke { key: key.clone(), node: lease.node.clone(), token: lease.token });
                    self.unreserve(&key, &lease.node);
                    self.shard_back(&key);
                }
            }
        }
        self.wake(now);
        self.order.age(now);
        self.schedule(now, &mut out);
        Ok(out)
    }

    /// Puts `db` where its next backup waits: in the order when due, else among the not due.
    fn make_due(&mut self, db: &DbName) {
        let spec = self.registry.db(db).expect("made due while registered");
        let state = &self.dbs[db];
        let (due, deadline) = match state.last_snapshot {
            None => (self.now, self.now.after(spec.rpo)),
            Some(at) => (at.after(Millis(spec.rpo.0 / 2)), at.after(spec.rpo)),
        };
        if due <= self.now {
            self.order.push(db.clone(), spec.priority, due, deadline);
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
            let deadline = self.dbs[&db].last_snapshot.unwrap_or(due).after(spec.rpo);
            self.order.push(db, spec.priority, due, deadline);
        }
    }

    /// Places waiting work in the order's order, until no node has room: a pass stops at the
    /// first backup no node can take, so with the fleet busy it costs one placement attempt.
    fn schedule(&mut self, now: Millis, out: &mut Vec<Decision>) {
        let mut cursor = None;
        while let Some(place) = self.order.first_after(cursor.as_ref()) {
            let (_, deadline, db) = &place;
            match self.place_db(db, *deadline, now, out) {
                Ok(()) => {
                    self.order.remove(db);
                }
                Err(Wait::HostAtCap) => {
                    // Parked until its host runs one backup fewer: later passes walk past it
                    // at no cost.
                    let host = self.registry.db(db).expect("waiting databases are registered").source_host.clone();
                    let waiting = self.order.take(db).expect("walked from the order");
                    self.parked.entry(host).or_default().push((db.clone(), waiting));
                }
                Err(Wait::NoRoom) => return,
            }
            cursor = Some(place);
        }
    }

    /// Places what `db` has waiting, planning its job first if it has none; an error leaves what
    /// could not be placed waiting.
    fn place_db(&mut self, db: &DbName, deadline: Millis, now: Millis, out: &mut Vec<Decision>) -> Result<(), Wait> {
        let spec = self.registry.db(db).expect("waiting databases are registered").clone();
        let job_id = match self.dbs[db].job {
            Some(job) => job,
            None => {
                let size = self.dbs[db].last_bytes.unwrap_or(spec.size_estimate);
                let shards = plan(size, deadline.since(now), self.config.default_node_bps).shards();
                let id = self.next_job;
                self.next_job += 1;
                self.jobs.insert(
                    id,
                    Job { db: db.clone(), shards: vec![(ShardState::Waiting, 0); shards as usize], bytes: 0 },
                );
                self.dbs.get_mut(db).expect("registered").job = Some(id);
                id
            }
        };
        let shards = self.jobs[&job_id].shards.len() as u32;
        for shard in 0..shards {
            let (state, resume_from) = self.jobs[&job_id].shards[shard as usize];
            if state != ShardState::Waiting {
                continue;
            }
            let host = self.hosts.entry(spec.source_host.clone()).or_default();
            let budget = HostBudget {
                max_running: self.config.host_max_running,
                max_read_bps: self.config.host_max_read_bps,
                running: host.running,
                read_bps: host.read_bps,
            };
            // Before the nodes are looked at: a host at its caps waits whatever room there is.
            budget.left().ok_or(Wait::HostAtCap)?;
            let placed = place(&self.config.shard_need, &self.roomy, &budget)?;
            let key = ShardKey { job: job_id, shard };
            let lease = self
                .leases
                .grant(key.clone(), placed.node.clone(), now, self.config.lease_ttl)
                .expect("a waiting shard holds no lease");
            let host = self.hosts.get_mut(&spec.source_host).expect("made above");
            host.running += 1;
            host.read_bps += placed.read_cap_bps;
            self.read_caps.insert(key.clone(), placed.read_cap_bps);
            self.nodes.get_mut(&placed.node).expect("placed on a known node").running.insert(key.clone());
            self.refresh_room(&placed.node);
            self.jobs.get_mut(&job_id).expect("open").shards[shard as usize].0 = ShardState::Running;
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

    /// Gives back what a running shard reserved on its node and its source host.
    fn unreserve(&mut self, key: &ShardKey, node: &NodeName) {
        let Some(job) = self.jobs.get(&key.job) else { return };
        let Ok(spec) = self.registry.db(&job.db) else { return };
        let host = spec.source_host.clone();
        self.unreserve_on(key, node, &host);
    }

    fn unreserve_on(&mut self, key: &ShardKey, node: &NodeName, host: &HostName) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.running.remove(key);
            self.refresh_room(node);
        }
        let cap = self.read_caps.remove(key).unwrap_or(0);
        if let Some(h) = self.hosts.get_mut(host) {
            h.running = h.running.saturating_sub(1);
            h.read_bps = h.read_bps.saturating_sub(cap);
        }
        for (db, (class, due, deadline)) in self.parked.remove(host).unwrap_or_default() {
            self.order.push(db, class, due, deadline);
        }
    }

    /// Keeps [`Core::roomy`] true for `node`: in it exactly when one more shard fits there.
    fn refresh_room(&mut self, node: &NodeName) {
        match self.nodes.get(node).map(|n| room(node, n, &self.config.shard_need)) {
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
            }
        }
        let db = job.db.clone();
        self.requeue(&db);
    }

    /// Puts a database with an open job back in the order: it was due already, so it takes its
    /// place again from now.
    fn requeue(&mut self, db: &DbName) {
        let Ok(spec) = self.registry.db(db) else { return };
        let deadline = self.dbs[db].last_snapshot.unwrap_or(self.now).after(spec.rpo);
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
    fn close_job(&mut self, job: u64, host: &HostName, out: &mut Vec<Decision>) {
        let Some(j) = self.jobs.remove(&job) else { return };
        for shard in 0..j.shards.len() as u32 {
            let key = ShardKey { job, shard };
            if let Some(lease) = self.leases.holder(&key).cloned() {
                out.push(Decision::Revoke { key: key.clone(), node: lease.node.clone(), token: lease.token });
                self.unreserve_on(&key, &lease.node, host);
            }
            self.leases.forget(&key);
        }
    }

    /// Databases waiting for placement.
    pub fn waiting(&self) -> usize {
        self.order.len()
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
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const NODE: NodeCapacity =
        NodeCapacity { cores: 4, memory_bytes: 16 << 30, network_bps: 1 << 30, disk_bps: 1 << 30 };

    fn db(name: &str, host: &str, priority: Priority, size: u64) -> DbSpec {
        DbSpec {
            name: DbName(name.into()),
            source_host: HostName(host.into()),
            size_estimate: size,
            priority,
            rpo: Millis::from_secs(3600),
            window: None,
        }
    }

    fn node(n: &str) -> NodeName {
        NodeName(n.into())
    }

    fn assigns(d: &[Decision]) -> Vec<(String, ShardKey, NodeName, u64, u64)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Assign { db, key, node, token, resume_from, .. } => {
                    Some((db.0.to_string(), key.clone(), node.clone(), *token, *resume_from))
                }
                _ => None,
            })
            .collect()
    }

    /// The databases assigned, in the order of the decisions.
    fn assigned_dbs(d: &[Decision]) -> Vec<String> {
        assigns(d).into_iter().map(|a| a.0).collect()
    }

    #[test]
    fn a_database_is_backed_up_committed_and_due_again_at_half_its_rpo() {
        let mut core = Core::new(Config::default());
        core.handle(Millis(0), Event::NodeJoined { node: node("n1"), capacity: NODE }).unwrap();
        let out = core.handle(Millis(1), Event::DbRegistered(db("a", "h1", Priority::Normal, 10 * GIB))).unwrap();
        let a = assigns(&out);
        assert_eq!(a.len(), 1, "{out:?}");
        let (_, key, n, token, from) = a[0].clone();
        assert_eq!((n.clone(), from), (node("n1"), 0));
        core.handle(Millis(2), Event::Progress { key: key.clone(), node: n.clone(), token, segments_done: 5 }).unwrap();
        let out = core.handle(Millis(3), Event::ShardFinished { key, node: n, token, bytes: 10 * GIB }).unwrap();
        assert_eq!(out, vec![Decision::Commit { job: 0, db: DbName("a".into()), bytes: 10 * GIB }]);
        assert!(assigns(&core.handle(Millis(1_800_002), Event::Tick).unwrap()).is_empty(), "not due yet");
        let again = core.handle(Millis(1_800_003), Event::Tick).unwrap();
        assert_eq!(assigns(&again).len(), 1, "due at half the RPO after its snapshot");
    }

    #[test]
    fn a_node_that_stops_renewing_loses_its_shards_which_resume_elsewhere_from_their_checkpoint() {
        let mut core = Core::new(Config::default());
        core.handle(Millis(0), Event::NodeJoined { node: node("a"), capacity: NODE }).unwrap();
        let out = core.handle(Millis(0), Event::DbRegistered(db("big", "h", Priority::High, 10 * GIB))).unwrap();
        let (_, key, holder, token, _) = assigns(&out)[0].clone();
        core.handle(Millis(1000), Event::Progress { key: key.clone(), node: holder.clone(), token, segments_done: 7 })
            .unwrap();
        core.handle(Millis(2000), Event::NodeJoined { node: node("b"), capacity: NODE }).unwrap();
        // a goes silent; its lease ends 10 s after its grant.
        assert!(core.handle(Millis(9_999), Event::Tick).unwrap().is_empty());
        let out = core.handle(Millis(10_000), Event::Tick).unwrap();
        assert!(out.contains(&Decision::Revoke { key: key.clone(), node: node("a"), token }), "{out:?}");
        let again = assigns(&out);
        assert_eq!(again.len(), 1, "{out:?}");
        let (_, key2, holder2, token2, from) = again[0].clone();
        assert_eq!(key2, key);
        assert!(token2 > token);
        assert_eq!(from, 7, "resumes from its last checkpoint");
        // Placed on b or on a again (a still heartbeats nothing): either way, a's old token is dead.
        let late =
            core.handle(Millis(10_001), Event::ShardFinished { key: key.clone(), node: holder, token, bytes: 1 });
        assert!(matches!(late, Err(CoreError::Lease(LeaseError::Stale { .. }))), "{late:?}");
        assert_eq!(core.leases().stale_refused(), 1);
        let done = core
            .handle(Millis(10_002), Event::ShardFinished { key, node: holder2, token: token2, bytes: 10 * GIB })
            .unwrap();
        assert!(matches!(done.as_slice(), [Decision::Commit { .. }]), "{done:?}");
    }

    #[test]
    fn with_room_for_one_the_critical_database_goes_first() {
        let one_shard = NodeCapacity { cores: 2, ..NODE };
        let mut core = Core::new(Config::default());
        core.handle(Millis(0), Event::DbRegistered(db("low", "h1", Priority::Low, GIB))).unwrap();
        core.handle(Millis(0), Event::DbRegistered(db("crit", "h2", Priority::Critical, GIB))).unwrap();
        let out = core.handle(Millis(1), Event::NodeJoined { node: node("n"), capacity: one_shard }).unwrap();
        assert_eq!(assigned_dbs(&out), ["crit"]);
        assert_eq!(core.waiting(), 1);
    }

    #[test]
    fn a_waiting_database_raised_to_critical_goes_first() {
        let one_shard = NodeCapacity { cores: 2, ..NODE };
        let mut core = Core::new(Config::default());
        core.handle(Millis(0), Event::DbRegistered(db("a", "h1", Priority::Low, GIB))).unwrap();
        core.handle(Millis(0), Event::DbRegistered(db("b", "h2", Priority::Normal, GIB))).unwrap();
        core.handle(Millis(1), Event::DbChanged(db("a", "h1", Priority::Critical, GIB))).unwrap();
        assert_eq!(core.waiting(), 2);
        let out = core.handle(Millis(2), Event::NodeJoined { node: node("n"), capacity: one_shard }).unwrap();
        assert_eq!(assigned_dbs(&out), ["a"]);
    }

    #[test]
    fn a_source_host_never_runs_more_backups_than_its_cap() {
        let config = Config { host_max_running: 2, ..Config::default() };
        let mut core = Core::new(config);
        for i in 0..3 {
            core.handle(Millis(0), Event::NodeJoined { node: node(&format!("n{i}")), capacity: NODE }).unwrap();
        }
        let mut placed = 0;
        for name in ["a", "b", "c"] {
            placed += assigns(
                &core.handle(Millis(0), Event::DbRegistered(db(name, "same-host", Priority::Normal, GIB))).unwrap(),
            )
            .len();
        }
        assert_eq!(placed, 2);
        let other = core.handle(Millis(0), Event::DbRegistered(db("d", "other-host", Priority::Normal, GIB))).unwrap();
        assert_eq!(assigns(&other).len(), 1, "another host's database is not held up");
    }

    #[test]
    fn bad_events_are_refused_and_change_nothing() {
        let mut core = Core::new(Config::default());
        core.handle(Millis(10), Event::Tick).unwrap();
        assert_eq!(
            core.handle(Millis(9), Event::Tick),
            Err(CoreError::ClockBackwards { last: Millis(10), now: Millis(9) })
        );
        let unknown = Event::Heartbeat { node: node("ghost"), used: Resources::default(), throughput_bps: 1 };
        assert!(matches!(core.handle(Millis(10), unknown), Err(CoreError::Registry(RegistryError::UnknownNode(_)))));
        let key = ShardKey { job: 99, shard: 0 };
        let stray = Event::Progress { key, node: node("ghost"), token: 1, segments_done: 1 };
        assert!(core.handle(Millis(10), stray).is_err());
        assert_eq!(core.waiting(), 0);
    }
}
