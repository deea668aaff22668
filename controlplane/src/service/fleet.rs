//! The service's state around the core: the registered databases as agents need them (source
//! and repository), each node's view and its outbox of orders, and the translation between the
//! API's records ([`wire::control`]) and the core's events and decisions. Pure: time is an
//! argument, nothing here touches a socket or a file, so it is unit-tested as it is.

use std::collections::{BTreeMap, BTreeSet};

use wire::control::{
    Assignment, Capacity, Heartbeat, LeaseRef, NodeStatus, Order, Register, ResourceReport, ShardOutcome, ShardReport,
    Status,
};

use super::registry_file::DbEntry;
use crate::core::leases::ShardKey;
use crate::core::machine::{Config, Core, CoreError, Decision, Event, NodeReport};
use crate::core::placement::Resources;
use crate::core::registry::NodeCapacity;
use crate::core::{DbName, Millis, NodeName};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("database {0:?} has no repository and the service has no --repo default")]
    NoRepo(String),
    #[error("node {0:?} is not registered: register first")]
    UnknownNode(String),
}

struct NodeView {
    capacity: Capacity,
    report: ResourceReport,
    last_seen: Millis,
    draining: bool,
    leases: BTreeSet<LeaseRef>,
    outbox: Vec<Order>,
}

/// What the service keeps besides the core.
pub struct Fleet {
    core: Core,
    lease_ttl: Millis,
    entries: BTreeMap<String, DbEntry>,
    default_repo: Option<String>,
    /// Distinguishes this run's jobs from an earlier run's in the data-plane job ids (the
    /// core numbers jobs from 0 each start).
    epoch: u64,
    nodes: BTreeMap<String, NodeView>,
    /// Commits ordered and not yet reported, by the lease whose report finished the job: the
    /// node each is with, and the order. Re-sent with every heartbeat of that node (an answer
    /// lost on the way must not lose the snapshot: the core closed the job when it decided the
    /// commit), and handed to another node once that one is silent for a lease TTL.
    pending_commits: BTreeMap<LeaseRef, (String, Order)>,
    committed: u64,
    failovers: u64,
    desired_nodes: Option<u32>,
}

fn key(lease: &LeaseRef) -> ShardKey {
    ShardKey { job: lease.job, shard: lease.shard }
}

fn node_name(name: &str) -> NodeName {
    NodeName(name.into())
}

impl Fleet {
    /// A fleet of `entries` (each needs a repository, its own or `default_repo`), its time
    /// starting at `now`.
    pub fn new(
        config: Config,
        entries: Vec<DbEntry>,
        default_repo: Option<String>,
        epoch: u64,
        now: Millis,
    ) -> Result<Self, FleetError> {
        let lease_ttl = config.lease_ttl;
        let mut fleet = Self {
            core: Core::new(config),
            lease_ttl,
            entries: BTreeMap::new(),
            default_repo,
            epoch,
            nodes: BTreeMap::new(),
            pending_commits: BTreeMap::new(),
            committed: 0,
            failovers: 0,
            desired_nodes: None,
        };
        for entry in entries {
            fleet.add_db(now, entry)?;
        }
        Ok(fleet)
    }

    pub fn lease_ttl(&self) -> Millis {
        self.lease_ttl
    }

    /// Whether `entry` can be registered: checked before the store keeps it, so that what the
    /// store holds always loads.
    pub fn accepts(&self, entry: &DbEntry) -> Result<(), FleetError> {
        if entry.repo.is_none() && self.default_repo.is_none() {
            return Err(FleetError::NoRepo(entry.name.clone()));
        }
        Ok(())
    }

    /// Registers `entry` (or changes it when registered with other settings).
    pub fn add_db(&mut self, now: Millis, entry: DbEntry) -> Result<(), FleetError> {
        self.accepts(&entry)?;
        let event = if self.entries.contains_key(&entry.name) {
            Event::DbChanged(entry.spec())
        } else {
            Event::DbRegistered(entry.spec())
        };
        self.apply(now, event)?;
        self.entries.insert(entry.name.clone(), entry);
        Ok(())
    }

    pub fn remove_db(&mut self, now: Millis, name: &str) -> Result<(), FleetError> {
        self.apply(now, Event::DbRemoved(DbName(name.into())))?;
        self.entries.remove(name);
        Ok(())
    }

    /// A node joins (or, registered already, is heard from again).
    pub fn register(&mut self, now: Millis, r: &Register) -> Result<(), FleetError> {
        if let Some(view) = self.nodes.get_mut(&r.node) {
            view.last_seen = now;
            return Ok(());
        }
        let c = r.capacity;
        let capacity = NodeCapacity {
            cores: c.cores,
            memory_bytes: c.memory_bytes,
            network_bps: c.network_bps,
            disk_bps: c.disk_bps,
        };
        // Its view exists before the event: the decisions of joining are its first orders.
        self.nodes.insert(
            r.node.clone(),
            NodeView {
                capacity: c,
                report: ResourceReport::default(),
                last_seen: now,
                draining: false,
                leases: BTreeSet::new(),
                outbox: vec![],
            },
        );
        if let Err(e) = self.apply(now, Event::NodeJoined { node: node_name(&r.node), capacity }) {
            self.nodes.remove(&r.node);
            return Err(e);
        }
        Ok(())
    }

    /// A heartbeat: the report, each lease renewed; returns the node's orders. A lease the core
    /// refuses to renew (stale, or ended) is answered with a stop.
    pub fn heartbeat(&mut self, now: Millis, h: &Heartbeat) -> Result<Vec<Order>, FleetError> {
        let view = self.nodes.get_mut(&h.node).ok_or_else(|| FleetError::UnknownNode(h.node.clone()))?;
        view.report = h.report;
        view.last_seen = now;
        let r = h.report;
        let report = NodeReport {
            used: Resources {
                cores: r.running.saturating_mul(2),
                memory_bytes: r.memory_used_bytes,
                network_bps: r.network_bps,
                disk_bps: r.disk_bps,
            },
            throughput_bps: r.throughput_bps,
            cpu_percent: r.cpu_percent,
            stage_p99_us: r.stage_p99_us,
        };
        self.apply(now, Event::Heartbeat { node: node_name(&h.node), report })?;
        let mut stops = vec![];
        for lease in &h.leases {
            let renewed = Event::LeaseRenewed { key: key(lease), node: node_name(&h.node), token: lease.token };
            if self.apply(now, renewed).is_err() {
                stops.push(Order::Stop { lease: *lease });
            }
        }
        let view = self.nodes.get_mut(&h.node).expect("checked above");
        for order in &stops {
            if let Order::Stop { lease } = order {
                view.leases.remove(lease);
            }
        }
        let mut orders = std::mem::take(&mut view.outbox);
        orders.extend(stops);
        let silent = |node: &str| self.nodes.get(node).is_none_or(|v| now.since(v.last_seen) > self.lease_ttl);
        for (with, order) in self.pending_commits.values_mut() {
            if *with == h.node || silent(with) {
                with.clone_from(&h.node);
                orders.push(order.clone());
            }
        }
        Ok(orders)
    }

    /// How a shard ended; returns what the reporting node must do now (a commit, when its
    /// shard was the job's last).
    pub fn shard_report(&mut self, now: Millis, r: &ShardReport) -> Result<Vec<Order>, FleetError> {
        if !self.nodes.contains_key(&r.node) {
            return Err(FleetError::UnknownNode(r.node.clone()));
        }
        let (key, node, token) = (key(&r.lease), node_name(&r.node), r.lease.token);
        let event = match &r.outcome {
            ShardOutcome::Finished { bytes } => Event::ShardFinished { key, node, token, bytes: *bytes },
            ShardOutcome::Failed { .. } => Event::ShardFailed { key, node, token },
            ShardOutcome::Yielded { segments_done } => {
                Event::ShardYielded { key, node, token, segments_done: *segments_done }
            }
            // Counted once, however often a re-sent commit order was run.
            ShardOutcome::Committed { .. } => {
                if self.pending_commits.remove(&r.lease).is_some() {
                    self.committed += 1;
                }
                return Ok(vec![]);
            }
            // The core closed the job when it decided the commit: the database is due again
            // by its RPO and the next job makes the snapshot.
            ShardOutcome::CommitFailed { .. } => {
                self.pending_commits.remove(&r.lease);
                return Ok(vec![]);
            }
        };
        let decisions = self.core.handle(now, event)?;
        if let Some(view) = self.nodes.get_mut(&r.node) {
            view.leases.remove(&r.lease);
        }
        let mut now_orders = vec![];
        for d in decisions {
            if let Decision::Commit { job, db, .. } = &d {
                let repo = self.repo_of(&db.0);
                let order = Order::Commit { lease: r.lease, data_job: self.data_job(*job), repo };
                self.pending_commits.insert(r.lease, (r.node.clone(), order.clone()));
                now_orders.push(order);
            } else {
                self.route(d);
            }
        }
        Ok(now_orders)
    }

    /// The passage of time: leases expire, waiting backups are placed.
    pub fn tick(&mut self, now: Millis) -> Result<(), FleetError> {
        self.apply(now, Event::Tick)
    }

    pub fn drain(&mut self, now: Millis, node: &str) -> Result<(), FleetError> {
        self.apply(now, Event::NodeDrain(node_name(node)))?;
        if let Some(view) = self.nodes.get_mut(node) {
            view.draining = true;
        }
        Ok(())
    }

    /// The data-plane job id of core job `job`: this run's epoch, then the job, as 32 hex digits.
    pub fn data_job(&self, job: u64) -> String {
        format!("{:016x}{:016x}", self.epoch, job)
    }

    fn repo_of(&self, db: &str) -> String {
        self.entries.get(db).and_then(|e| e.repo.clone()).or_else(|| self.default_repo.clone()).unwrap_or_default()
    }

    fn apply(&mut self, now: Millis, event: Event) -> Result<(), FleetError> {
        for d in self.core.handle(now, event)? {
            self.route(d);
        }
        Ok(())
    }

    /// A decision into the outbox of the node it is for.
    fn route(&mut self, d: Decision) {
        let (node, order) = match d {
            Decision::Assign { key, db, shards, node, token, resume_from, read_cap_bps, .. } => {
                let lease = LeaseRef { job: key.job, shard: key.shard, token };
                let Some(entry) = self.entries.get(&*db.0) else { return };
                let assignment = Assignment {
                    lease,
                    shards,
                    lease_ttl_ms: self.lease_ttl.0,
                    resume_from,
                    read_cap_bps,
                    db: entry.name.clone(),
                    source: entry.source.clone(),
                    repo: self.repo_of(&db.0),
                    data_job: self.data_job(key.job),
                };
                if let Some(view) = self.nodes.get_mut(&*node.0) {
                    view.leases.insert(lease);
                }
                (node, Order::Run(assignment))
            }
            Decision::Revoke { key, node, token } => {
                self.failovers += 1;
                let lease = LeaseRef { job: key.job, shard: key.shard, token };
                if let Some(view) = self.nodes.get_mut(&*node.0) {
                    view.leases.remove(&lease);
                }
                (node, Order::Stop { lease })
            }
            Decision::Preempt { key, node, token } => {
                (node, Order::HandBack { lease: LeaseRef { job: key.job, shard: key.shard, token } })
            }
            Decision::NodeRateCap { node, bps } => (node, Order::RateCap { bps }),
            Decision::Drained { node } => (node, Order::Drained),
            Decision::DesiredNodes { count, .. } => {
                self.desired_nodes = Some(count);
                return;
            }
            // Commits go to the node whose report finished the job (`shard_report`); a host's
            // read cap is enforced by the agents reading from it, which is not built yet.
            Decision::Commit { .. } | Decision::HostReadCap { .. } => return,
        };
        if let Some(view) = self.nodes.get_mut(&*node.0) {
            view.outbox.push(order);
        }
    }

    pub fn status(&self) -> Status {
        let waiting = self.core.waiting_by_class().map(|n| n as u64);
        Status {
            dbs: self.entries.len() as u64,
            nodes: self.nodes.len() as u64,
            waiting,
            running_shards: self.core.leases().held_count() as u64,
            committed: self.committed,
            failovers: self.failovers,
            stale_refused: self.core.leases().stale_refused(),
            desired_nodes: self.desired_nodes,
        }
    }

    pub fn nodes(&self, now: Millis) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|(name, v)| NodeStatus {
                name: name.clone(),
                capacity: v.capacity,
                report: v.report,
                silent_ms: now.since(v.last_seen).0,
                draining: v.draining,
                leases: v.leases.iter().copied().collect(),
            })
            .collect()
    }

    pub fn dbs(&self) -> impl Iterator<Item = &DbEntry> {
        self.entries.values()
    }
}

#[cfg(test)]
mod tests;
