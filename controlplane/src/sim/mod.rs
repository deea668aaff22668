//! A seeded fleet that drives the very core the service will run ([`crate::core::machine::Core`])
//! with a simulated clock: databases of many sizes and classes on shared source hosts, nodes
//! that run the shards they are assigned at their throughput, renew their leases and report
//! progress, and faults drawn from the seed (nodes that die and come back, slow nodes). The same
//! seed gives the same run: every decision goes into a digest.
//!
//! Checked on every step, a violation stops the run with its seed and step: a commit of a job
//! not every shard of which finished under its newest token, a job committed twice, a late
//! report from a node that died being taken. Checked at the end: no shard lost (every shard
//! ever assigned is committed or its job still open in the core).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::{FxHashMap, FxHashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::core::leases::ShardKey;
use crate::core::machine::{Config, Core, Decision, Event};
use crate::core::registry::{DbSpec, NodeCapacity};
use crate::core::{DbName, HostName, Millis, NodeName, Priority};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub dbs: usize,
    pub nodes: usize,
    pub hours: u64,
    pub seed: u64,
    /// Deaths per node per hour (a dead node comes back after [`DOWNTIME`]).
    pub kill_rate: f64,
    /// The share of nodes that run at a third of the others' speed.
    pub slow_rate: f64,
}

/// How long a node that died stays away.
pub const DOWNTIME: Millis = Millis::from_secs(10 * 60);
/// How often a running node renews its leases and reports progress (half the lease TTL).
pub const REPORT_EVERY: Millis = Millis::from_secs(5);
/// How often the clock ticks for the core.
pub const TICK_EVERY: Millis = Millis::from_secs(1);
/// Bytes per second a node of normal speed moves.
pub const NODE_BPS: u64 = 300 << 20;
/// A segment, as the simulated data plane checkpoints them.
pub const SEGMENT: u64 = 1 << 30;
/// Databases per source host.
pub const DBS_PER_HOST: usize = 4;

/// What a run found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub dbs: usize,
    pub nodes: usize,
    pub simulated_hours: u64,
    pub backups_done: u64,
    pub rpo_misses: u64,
    pub lost_shards: u64,
    pub double_commits: u64,
    pub stale_reports_refused: u64,
    pub node_deaths: u64,
    pub failovers: u64,
    pub max_failover_s: f64,
    pub lease_ttl_s: f64,
    pub events: u64,
    pub digest: String,
}

/// An invariant that broke: the run stops there.
#[derive(Debug, thiserror::Error)]
#[error("seed {seed}, step {step} (at {at}): {what}")]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub at: Millis,
    pub what: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SimEvent {
    Tick,
    /// A node's report about one shard it runs (renew and progress), or its finish.
    Report {
        node: usize,
        key: ShardKey,
        token: u64,
    },
    Die(usize),
    Return(usize),
}

struct RunningShard {
    token: u64,
    bytes: u64,
    done: u64,
    read_cap_bps: u64,
}

struct SimNode {
    name: NodeName,
    bps: u64,
    alive: bool,
    shards: FxHashMap<ShardKey, RunningShard>,
    /// Shards it ran when it died: reported, stale, when it returns.
    lost_on_death: Vec<(ShardKey, u64)>,
}

/// Runs the simulation; the summary, or the first invariant that broke.
pub fn run(cfg: &SimConfig) -> Result<Summary, Violation> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let config = Config::default();
    let lease_ttl = config.lease_ttl;
    let mut core = Core::new(config);
    let mut sim = Sim {
        queue: BinaryHeap::new(),
        seq: 0,
        step: 0,
        now: Millis(0),
        digest: Fnv::default(),
        seed: cfg.seed,
        sizes: FxHashMap::default(),
    };
    let capacity = NodeCapacity { cores: 16, memory_bytes: 64 << 30, network_bps: 2500 << 20, disk_bps: 2000 << 20 };
    let mut nodes: Vec<SimNode> = (0..cfg.nodes)
        .map(|i| SimNode {
            name: NodeName(format!("node{i:05}").into()),
            bps: if rng.gen_bool(cfg.slow_rate.clamp(0.0, 1.0)) { NODE_BPS / 3 } else { NODE_BPS },
            alive: true,
            shards: FxHashMap::default(),
            lost_on_death: vec![],
        })
        .collect();
    let by_name: FxHashMap<NodeName, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
    let mut stats = Stats::default();
    let mut last_snapshot: FxHashMap<DbName, Millis> = FxHashMap::default();
    let mut rpos: FxHashMap<DbName, Millis> = FxHashMap::default();
    let end = Millis::from_secs(cfg.hours * 3600);

    for node in &nodes {
        let decisions = core
            .handle(Millis(0), Event::NodeJoined { node: node.name.clone(), capacity })
            .map_err(|e| sim.violation(format!("joining {}: {e}", node.name)))?;
        sim.record(&decisions);
    }
    for i in 0..cfg.dbs {
        let (priority, rpo_h) = match rng.gen_range(0..100) {
            0..5 => (Priority::Critical, 1),
            5..20 => (Priority::High, 4),
            20..70 => (Priority::Normal, 12),
            _ => (Priority::Low, 24),
        };
        // Sizes spread evenly on a log scale from 1 GiB to 2 TiB.
        let size = (f64::from(1u32 << 30) * 2f64.powf(rng.gen_range(0.0..11.0))) as u64;
        let spec = DbSpec {
            name: DbName(format!("db{i:06}").into()),
            source_host: HostName(format!("host{:05}", i / DBS_PER_HOST).into()),
            size_estimate: size,
            priority,
            rpo: Millis::from_secs(rpo_h * 3600),
            window: None,
        };
        rpos.insert(spec.name.clone(), spec.rpo);
        sim.sizes.insert(spec.name.clone(), size);
        last_snapshot.insert(spec.name.clone(), Millis(0));
        let decisions = core
            .handle(Millis(0), Event::DbRegistered(spec))
            .map_err(|e| sim.violation(format!("registering: {e}")))?;
        sim.apply(&decisions, &mut nodes, &by_name, &mut stats);
    }
    sim.push(TICK_EVERY, SimEvent::Tick);
    for (i, _) in nodes.iter().enumerate() {
        if let Some(at) = next_death(&mut rng, cfg.kill_rate, Millis(0)) {
            sim.push(at, SimEvent::Die(i));
        }
    }

    while let Some(Reverse((at, _, event))) = sim.queue.pop() {
        if at > end {
            break;
        }
        sim.now = at;
        sim.step += 1;
        let decisions = match event {
            SimEvent::Tick => {
                sim.push(at.after(TICK_EVERY), SimEvent::Tick);
                core.handle(at, Event::Tick).map_err(|e| sim.violation(format!("tick: {e}")))?
            }
            SimEvent::Die(i) => {
                let node = &mut nodes[i];
                node.alive = false;
                stats.node_deaths += 1;
                for (key, shard) in node.shards.drain() {
                    stats.died_at.insert(key.clone(), at);
                    node.lost_on_death.push((key, shard.token));
                }
                sim.push(at.after(DOWNTIME), SimEvent::Return(i));
                vec![]
            }
            SimEvent::Return(i) => {
                let node = &mut nodes[i];
                node.alive = true;
                if let Some(next) = next_death(&mut rng, cfg.kill_rate, at) {
                    sim.push(next, SimEvent::Die(i));
                }
                // What it ran before it died, reported late: every such report must be refused.
                for (key, token) in std::mem::take(&mut node.lost_on_death) {
                    let late = Event::ShardFinished { key: key.clone(), node: node.name.clone(), token, bytes: 1 };
                    if let Ok(d) = core.handle(at, late) {
                        return Err(
                            sim.violation(format!("a late finish of {key:?} with token {token} was taken: {d:?}"))
                        );
                    }
                    stats.stale_refused += 1;
                }
                vec![]
            }
            SimEvent::Report { node: i, key, token } => {
                let node = &mut nodes[i];
                let Some(shard) = node.shards.get_mut(&key).filter(|s| s.token == token) else { continue };
                let rate = node.bps.min(shard.read_cap_bps).max(1);
                shard.done = (shard.done + rate * REPORT_EVERY.0 / 1000).min(shard.bytes);
                let name = node.name.clone();
                let result = if shard.done >= shard.bytes {
                    let bytes = shard.bytes;
                    node.shards.remove(&key);
                    let finished = core.handle(at, Event::ShardFinished { key: key.clone(), node: name, token, bytes });
                    if finished.is_ok() {
                        stats.finished.entry(key.job).or_default().insert(key.shard);
                    }
                    finished
                } else {
                    sim.push(at.after(REPORT_EVERY), SimEvent::Report { node: i, key: key.clone(), token });
                    let renew = Event::LeaseRenewed { key: key.clone(), node: name.clone(), token };
                    core.handle(at, renew).and_then(|mut d| {
                        let segments_done = shard.done / SEGMENT;
                        d.extend(
                            core.handle(at, Event::Progress { key: key.clone(), node: name, token, segments_done })?,
                        );
                        Ok(d)
                    })
                };
                result.map_err(|e| sim.violation(format!("{key:?} from {}: {e}", nodes[i].name)))?
            }
        };
        for d in &decisions {
            if let Decision::Commit { db, job, .. } = d {
                if !stats.committed.insert(*job) {
                    stats.double_commits += 1;
                    return Err(sim.violation(format!("job {job} committed twice")));
                }
                let finished = stats.finished.remove(job).map_or(0, |f| f.len());
                if finished as u32 != stats.shard_count[job] {
                    return Err(sim.violation(format!(
                        "job {job} committed with {finished} of {} shards finished under their newest token",
                        stats.shard_count[job]
                    )));
                }
                stats.backups_done += 1;
                let last = last_snapshot.insert(db.clone(), at).unwrap_or(Millis(0));
                if at.since(last) > rpos[db] {
                    stats.rpo_misses += 1;
                }
            }
        }
        sim.apply(&decisions, &mut nodes, &by_name, &mut stats);
    }
    // RPOs missed by databases still waiting at the end.
    stats.rpo_misses += last_snapshot.iter().filter(|(db, at)| end.since(**at) > rpos[*db]).count() as u64;
    let lost = stats.assigned.iter().filter(|k| !stats.committed.contains(&k.job) && !core.is_open(k.job)).count();
    if lost > 0 {
        return Err(sim.violation(format!("{lost} shards were assigned, never committed, and are no longer open")));
    }
    Ok(Summary {
        dbs: cfg.dbs,
        nodes: cfg.nodes,
        simulated_hours: cfg.hours,
        backups_done: stats.backups_done,
        rpo_misses: stats.rpo_misses,
        lost_shards: lost as u64,
        double_commits: stats.double_commits,
        stale_reports_refused: stats.stale_refused,
        node_deaths: stats.node_deaths,
        failovers: stats.failovers,
        max_failover_s: stats.max_failover.0 as f64 / 1000.0,
        lease_ttl_s: lease_ttl.0 as f64 / 1000.0,
        events: sim.step,
        digest: format!("{:016x}", sim.digest.0),
    })
}

#[derive(Default)]
struct Stats {
    backups_done: u64,
    rpo_misses: u64,
    double_commits: u64,
    stale_refused: u64,
    node_deaths: u64,
    failovers: u64,
    max_failover: Millis,
    committed: FxHashSet<u64>,
    assigned: FxHashSet<ShardKey>,
    /// Each job's shard count, and the shards whose finish the core took.
    shard_count: FxHashMap<u64, u32>,
    finished: FxHashMap<u64, FxHashSet<u32>>,
    /// Shards whose node died, and when: their next assignment is a failover.
    died_at: FxHashMap<ShardKey, Millis>,
}

struct Sim {
    queue: BinaryHeap<Reverse<(Millis, u64, SimEvent)>>,
    seq: u64,
    step: u64,
    now: Millis,
    digest: Fnv,
    seed: u64,
    /// Each database's size: a shard is an equal part of it.
    sizes: FxHashMap<DbName, u64>,
}

impl Sim {
    fn push(&mut self, at: Millis, event: SimEvent) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, event)));
    }

    fn violation(&self, what: String) -> Violation {
        Violation { seed: self.seed, step: self.step, at: self.now, what }
    }

    fn record(&mut self, decisions: &[Decision]) {
        for d in decisions {
            self.digest.add(format!("{}:{d:?}", self.now.0).as_bytes());
        }
    }

    /// Carries decisions to the simulated nodes.
    fn apply(
        &mut self,
        decisions: &[Decision],
        nodes: &mut [SimNode],
        by_name: &FxHashMap<NodeName, usize>,
        stats: &mut Stats,
    ) {
        self.record(decisions);
        for d in decisions {
            match d {
                Decision::Assign { key, db, shards, node, token, resume_from, read_cap_bps, .. } => {
                    let i = by_name[node];
                    stats.assigned.insert(key.clone());
                    stats.shard_count.insert(key.job, *shards);
                    let n = &mut nodes[i];
                    if !n.alive {
                        // The core cannot know yet: the lease will end and the shard move on.
                        stats.died_at.entry(key.clone()).or_insert(self.now);
                        continue;
                    }
                    let bytes = self.sizes[db].div_ceil(u64::from(*shards)).max(1);
                    let done = (resume_from * SEGMENT).min(bytes);
                    n.shards
                        .insert(key.clone(), RunningShard { token: *token, bytes, done, read_cap_bps: *read_cap_bps });
                    self.push(
                        self.now.after(REPORT_EVERY),
                        SimEvent::Report { node: i, key: key.clone(), token: *token },
                    );
                }
                Decision::Revoke { key, node, token } => {
                    // A dead node's shard is free again: that is its failover.
                    if let Some(died) = stats.died_at.remove(key) {
                        stats.failovers += 1;
                        stats.max_failover = stats.max_failover.max(self.now.since(died));
                    }
                    let n = &mut nodes[by_name[node]];
                    if n.shards.get(key).is_some_and(|s| s.token == *token) {
                        n.shards.remove(key);
                    }
                }
                Decision::Commit { .. } => {}
            }
        }
    }
}

fn next_death(rng: &mut StdRng, rate_per_hour: f64, after: Millis) -> Option<Millis> {
    if rate_per_hour <= 0.0 {
        return None;
    }
    let hours = -rng.gen_range(f64::MIN_POSITIVE..1.0f64).ln() / rate_per_hour;
    Some(after.after(Millis((hours * 3_600_000.0) as u64)))
}

/// FNV-1a, 64 bits: the run's digest (stable across platforms and versions, unlike std's hasher).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64, kill_rate: f64) -> SimConfig {
        SimConfig { dbs: 200, nodes: 20, hours: 6, seed, kill_rate, slow_rate: 0.1 }
    }

    #[test]
    fn the_same_seed_gives_the_same_run_and_another_seed_another() {
        let a = run(&small(1, 0.05)).unwrap();
        let b = run(&small(1, 0.05)).unwrap();
        assert_eq!(a, b);
        let c = run(&small(2, 0.05)).unwrap();
        assert_ne!(a.digest, c.digest);
        assert!(a.backups_done > 0, "{a:?}");
    }

    #[test]
    fn with_nodes_dying_no_shard_is_lost_none_committed_twice_and_failover_stays_under_two_ttls() {
        for seed in [3, 4, 5] {
            let s = run(&small(seed, 0.2)).unwrap();
            assert!(s.node_deaths > 0, "{s:?}");
            assert!(s.failovers > 0, "{s:?}");
            assert_eq!((s.lost_shards, s.double_commits), (0, 0), "{s:?}");
            assert!(s.max_failover_s <= 2.0 * s.lease_ttl_s, "{s:?}");
            assert!(s.stale_reports_refused > 0, "{s:?}");
        }
    }
}
