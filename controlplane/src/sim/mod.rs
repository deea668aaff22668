//! A seeded fleet that drives the very core the service will run ([`crate::core::machine::Core`])
//! with a simulated clock: databases of many sizes and classes on shared source hosts whose read
//! latency rises with load, nodes that run the shards they are assigned at their throughput,
//! renew their leases, report progress and heartbeat, and faults drawn from the seed: nodes that
//! die and come back, slow nodes, nodes cut off from the control plane for a while (they keep
//! working, and must be fenced when they come back), bursts of critical databases. The same seed
//! gives the same run: every decision goes into a digest.
//!
//! Checked on every step, a violation stops the run with its seed and step: a commit of a job
//! not every shard of which finished under its newest token; a job committed twice; a late
//! report from a node that died or was cut off being taken; a critical backup left waiting while
//! a node had room for it. Checked at the end: no shard lost (every shard ever assigned is
//! committed or its job still open in the core).

mod histogram;
pub mod report;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::str::FromStr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::core::leases::ShardKey;
use crate::core::machine::{Config, Core, CoreError, Decision, Event, NodeReport, SourceLoad};
use crate::core::registry::{DbSpec, NodeCapacity};
use crate::core::scale::steady_bps;
use crate::core::{DbName, HostName, Millis, NodeName, Priority};
use histogram::Histogram;
use report::Series;

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
    /// Partitions per node per hour: for [`PARTITION_TIME`] nothing the node sends reaches the
    /// core and nothing reaches it, while it keeps working.
    pub partition_rate: f64,
    /// Databases registered all at once during the run.
    pub bursts: Vec<Burst>,
    /// How fast databases grow on average, a share of their size per day (each its own rate,
    /// from none to twice this).
    pub growth_per_day: f64,
    /// The fleet follows the core's desired node count: nodes join after [`BOOT_TIME`] when it
    /// asks for more, and when it asks for fewer the idlest are drained and leave once drained.
    pub autoscale: bool,
    /// Keep the series a report plots.
    pub series: bool,
}

/// `CLASS:COUNT@HH:MM`: `COUNT` databases of class `CLASS` registered at `HH:MM` simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Burst {
    pub class: Priority,
    pub count: usize,
    pub at: Millis,
}

impl FromStr for Burst {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: a burst is CLASS:COUNT@HH:MM, for example critical:500@06:30");
        let (class, rest) = s.split_once(':').ok_or_else(bad)?;
        let (count, at) = rest.split_once('@').ok_or_else(bad)?;
        let (h, m) = at.split_once(':').ok_or_else(bad)?;
        let class =
            Priority::parse(class).ok_or_else(|| format!("{s:?}: {class:?} is not critical|high|normal|low"))?;
        let count: usize = count.parse().map_err(|_| bad())?;
        let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || count == 0 {
            return Err(bad());
        }
        Ok(Self { class, count, at: Millis::from_secs(h * 3600 + m * 60) })
    }
}

/// How long a node that died stays away.
pub const DOWNTIME: Millis = Millis::from_secs(10 * 60);
/// How long a partition lasts: longer than a lease, so the node's shards move on.
pub const PARTITION_TIME: Millis = Millis::from_secs(60);
/// How often a running node renews its leases and reports progress (half the lease TTL).
pub const REPORT_EVERY: Millis = Millis::from_secs(5);
/// How often a node heartbeats its resource report (the core skips a node silent for 30 s).
pub const HEARTBEAT_EVERY: Millis = Millis::from_secs(10);
/// How often the clock ticks for the core.
pub const TICK_EVERY: Millis = Millis::from_secs(1);
/// How long a node the autoscaler adds takes to join.
pub const BOOT_TIME: Millis = Millis::from_secs(120);
/// How often the autoscaler looks at the desired count (and the node-hours are counted).
pub const FLEET_EVERY: Millis = Millis::from_secs(60);
/// How often the series of a report are sampled.
pub const SAMPLE_EVERY: Millis = Millis::from_secs(5 * 60);
/// Bytes per second one shard on a node of normal speed moves.
pub const NODE_BPS: u64 = 300 << 20;
/// A segment, as the simulated data plane checkpoints them.
pub const SEGMENT: u64 = 1 << 30;
/// Databases per source host.
pub const DBS_PER_HOST: usize = 4;
/// A source host's disk, and the latency of its reads when idle.
const HOST_DISK_BPS: f64 = 1500.0 * (1 << 20) as f64;
const HOST_BASE_US: f64 = 2_000.0;

/// What a run found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub dbs: usize,
    pub nodes: usize,
    pub simulated_hours: u64,
    pub backups_done: u64,
    pub rpo_misses: u64,
    /// Misses no count of nodes could have prevented: at the read cap its latency allowed and
    /// its concurrency cap, the source host could not read the database in the half RPO it has
    /// once due, or could not keep up with all its databases together. The others mean too few
    /// nodes, or a scheduling fault.
    pub rpo_misses_source_bound: u64,
    /// Critical backups that waited while shards of a lower class ran and none was preempted
    /// for them (distinct backups).
    pub priority_inversions: u64,
    /// Shards of lower classes handed back at a segment boundary for a critical backup.
    pub preemptions: u64,
    pub lost_shards: u64,
    pub double_commits: u64,
    pub stale_reports_refused: u64,
    pub node_deaths: u64,
    pub partitions: u64,
    pub failovers: u64,
    pub max_failover_s: f64,
    pub lease_ttl_s: f64,
    /// Wall time of one event through the core (its scheduling pass included).
    pub sched_pass_p50_ms: f64,
    pub sched_pass_p99_ms: f64,
    pub desired_nodes_max: u32,
    /// Nodes in service, at most and summed over time (what the fleet cost).
    pub nodes_max: usize,
    pub node_hours: f64,
    /// With `--autoscale`: nodes drained and gone, and the shards they handed back to leave.
    pub nodes_drained: u64,
    pub drain_handbacks: u64,
    /// Source-read reports over the latency target, percent, and read-cap cuts decided.
    pub source_reports_over_target_percent: f64,
    pub host_cap_cuts: u64,
    pub events: u64,
    pub digest: String,
}

/// A run: its summary, and the series when asked for.
pub struct Run {
    pub summary: Summary,
    pub series: Option<Series>,
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
    Sample,
    /// A node's report about one shard it runs (renew and progress), or its finish.
    Report {
        node: usize,
        key: ShardKey,
        token: u64,
    },
    Heartbeat(usize),
    Die(usize),
    Return(usize),
    Partition(usize),
    Heal(usize),
    Burst(usize),
    /// The autoscaler's look at the desired count; the node-hours counted.
    Fleet,
    /// A node the autoscaler added comes up.
    Boot,
}

struct RunningShard {
    token: u64,
    bytes: u64,
    done: u64,
    read_cap_bps: u64,
    /// The rate it moves at now, and its source host.
    rate: u64,
    host: usize,
    class: Priority,
    /// Its node was cut off while running it: its reports may be refused.
    cut_off: bool,
    /// Preempted when it had done this many segments: it hands back at the next boundary.
    yield_after: Option<u64>,
}

struct SimNode {
    name: NodeName,
    bps: u64,
    /// What the core lets it move in all.
    cap_bps: u64,
    alive: bool,
    cut_off: bool,
    /// Told to drain, and gone for good once drained.
    draining: bool,
    retired: bool,
    shards: FxHashMap<ShardKey, RunningShard>,
    /// Shards it ran when it died: reported, stale, when it returns.
    lost_on_death: Vec<(ShardKey, u64)>,
}

impl SimNode {
    fn new(i: usize, rng: &mut StdRng, slow_rate: f64) -> Self {
        Self {
            name: NodeName(format!("node{i:05}").into()),
            bps: if rng.gen_bool(slow_rate.clamp(0.0, 1.0)) { NODE_BPS / 3 } else { NODE_BPS },
            cap_bps: u64::MAX,
            alive: true,
            cut_off: false,
            draining: false,
            retired: false,
            shards: FxHashMap::default(),
            lost_on_death: vec![],
        }
    }

    /// Counted in the fleet: neither drained away nor being drained.
    fn in_service(&self) -> bool {
        !self.retired && !self.draining
    }
}

struct SimHost {
    name: HostName,
    /// The database's own load on the disk: a daily wave around a level of its own.
    busy_bps: f64,
    phase: f64,
    cap_bps: u64,
    /// What its backups read now, and how many run.
    reading_bps: u64,
    running: u32,
    /// What its databases ask for together: each read once per half RPO.
    demand_bps: u64,
}

impl SimHost {
    fn busy_at(&self, now: Millis) -> f64 {
        let day = now.0 as f64 / 86_400_000.0 * std::f64::consts::TAU;
        self.busy_bps * (1.0 + 0.5 * (day + self.phase).sin())
    }

    /// Read latency like a queue: idle latency over the disk's free share.
    fn read_p99_us(&self, now: Millis) -> u64 {
        let used = ((self.reading_bps as f64 + self.busy_at(now)) / HOST_DISK_BPS).min(0.995);
        (HOST_BASE_US / (1.0 - used)) as u64
    }
}

struct SimDb {
    host: usize,
    class: Priority,
    rpo: Millis,
    size: u64,
    last_snapshot: Millis,
    backups: u64,
    /// How fast it grows (a share of its size per day), and when its size was last grown.
    growth_per_day: f64,
    grown_at: Millis,
}

/// Shards a node of [`CAPACITY`] fits with the core's default shard need.
const SLOTS: u64 = 8;
const CAPACITY: NodeCapacity =
    NodeCapacity { cores: 16, memory_bytes: 64 << 30, network_bps: 2500 << 20, disk_bps: 2000 << 20 };

/// Runs the simulation; the summary (and series), or the first invariant that broke.
pub fn run(cfg: &SimConfig) -> Result<Run, Violation> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let config = Config::default();
    let lease_ttl = config.lease_ttl;
    let target_p99_us = config.throttle.target_p99_us;
    let host_start_cap = config.host_max_read_bps;
    let mut core = Core::new(config.clone());
    let mut sim = Sim {
        queue: BinaryHeap::new(),
        seq: 0,
        step: 0,
        now: Millis(0),
        digest: Fnv::default(),
        seed: cfg.seed,
        passes: Histogram::default(),
        host_max_running: u64::from(config.host_max_running),
    };
    let mut nodes: Vec<SimNode> = (0..cfg.nodes).map(|i| SimNode::new(i, &mut rng, cfg.slow_rate)).collect();
    let mut by_name: FxHashMap<NodeName, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
    let mut hosts: Vec<SimHost> = (0..cfg.dbs.div_ceil(DBS_PER_HOST))
        .map(|i| SimHost {
            name: HostName(format!("host{i:05}").into()),
            busy_bps: rng.gen_range(0.0..700.0) * (1 << 20) as f64,
            phase: rng.gen_range(0.0..std::f64::consts::TAU),
            cap_bps: host_start_cap,
            reading_bps: 0,
            running: 0,
            demand_bps: 0,
        })
        .collect();
    let host_by_name: FxHashMap<HostName, usize> = hosts.iter().enumerate().map(|(i, h)| (h.name.clone(), i)).collect();
    let mut world = World {
        dbs: FxHashMap::default(),
        stats: Stats::default(),
        running_by_class: [0; 4],
        growth_per_day: cfg.growth_per_day,
        retiring: vec![],
    };
    let end = Millis::from_secs(cfg.hours * 3600);

    for node in &nodes {
        let joined = Event::NodeJoined { node: node.name.clone(), capacity: CAPACITY };
        let decisions = sim.handle(&mut core, Millis(0), joined).map_err(|e| sim.violation(format!("joining: {e}")))?;
        sim.record(&decisions);
    }
    let mut registered = 0;
    for _ in 0..cfg.dbs {
        let class = match rng.gen_range(0..100) {
            0..5 => Priority::Critical,
            5..20 => Priority::High,
            20..70 => Priority::Normal,
            _ => Priority::Low,
        };
        let host = registered / DBS_PER_HOST;
        let decisions = register(&mut sim, &mut core, &mut rng, &mut world, &mut hosts, registered, class, host)?;
        registered += 1;
        sim.apply(&decisions, &mut nodes, &by_name, &mut hosts, &host_by_name, &mut world);
    }
    sim.push(TICK_EVERY, SimEvent::Tick);
    let mut series = cfg.series.then(Series::default);
    if series.is_some() {
        sim.push(Millis(0), SimEvent::Sample);
    }
    for (i, burst) in cfg.bursts.iter().enumerate() {
        sim.push(burst.at, SimEvent::Burst(i));
    }
    for i in 0..nodes.len() {
        sim.start_node(i, &mut rng, cfg, Millis(0));
    }
    sim.push(FLEET_EVERY, SimEvent::Fleet);
    let mut failovers_sampled = 0;
    // Nodes the autoscaler has asked for that have not come up yet.
    let mut booting = 0usize;

    while let Some(Reverse((at, _, event))) = sim.queue.pop() {
        if at > end {
            break;
        }
        sim.now = at;
        sim.step += 1;
        let decisions = match event {
            SimEvent::Tick => {
                sim.push(at.after(TICK_EVERY), SimEvent::Tick);
                sim.handle(&mut core, at, Event::Tick).map_err(|e| sim.violation(format!("tick: {e}")))?
            }
            SimEvent::Sample => {
                sim.push(at.after(SAMPLE_EVERY), SimEvent::Sample);
                if let Some(s) = series.as_mut() {
                    sample(s, at, &core, &nodes, &hosts, &world, &mut failovers_sampled);
                }
                continue;
            }
            SimEvent::Burst(b) => {
                let burst = &cfg.bursts[b];
                let mut out = vec![];
                for _ in 0..burst.count {
                    let host = rng.gen_range(0..hosts.len());
                    out.extend(register(
                        &mut sim,
                        &mut core,
                        &mut rng,
                        &mut world,
                        &mut hosts,
                        registered,
                        burst.class,
                        host,
                    )?);
                    registered += 1;
                }
                out
            }
            SimEvent::Heartbeat(i) => {
                let node = &nodes[i];
                if node.retired {
                    continue;
                }
                sim.push(at.after(HEARTBEAT_EVERY), SimEvent::Heartbeat(i));
                if !node.alive || node.cut_off {
                    continue;
                }
                let moving: u64 = node.shards.values().map(|s| s.rate).sum();
                let cpu = (moving * 100 / (node.bps * SLOTS)).min(100) as u8;
                let report = NodeReport {
                    used: Default::default(),
                    throughput_bps: node.bps,
                    cpu_percent: cpu,
                    // The pipeline queues like the disk does: slower as the CPU fills.
                    stage_p99_us: (1_000.0 / (1.0 - f64::from(cpu.min(99)) / 100.0)) as u64,
                };
                let beat = Event::Heartbeat { node: node.name.clone(), report };
                sim.handle(&mut core, at, beat).map_err(|e| sim.violation(format!("heartbeat: {e}")))?
            }
            SimEvent::Die(i) if nodes[i].retired => continue,
            SimEvent::Return(i) if nodes[i].retired => continue,
            SimEvent::Partition(i) if nodes[i].retired => continue,
            SimEvent::Die(i) => {
                let node = &mut nodes[i];
                node.alive = false;
                node.cut_off = false;
                world.stats.node_deaths += 1;
                for (key, shard) in std::mem::take(&mut node.shards) {
                    world.stats.died_at.insert(key.clone(), at);
                    node.lost_on_death.push((key, shard.token));
                    world.drop_shard(&mut hosts, &shard);
                }
                sim.push(at.after(DOWNTIME), SimEvent::Return(i));
                vec![]
            }
            SimEvent::Return(i) => {
                let node = &mut nodes[i];
                node.alive = true;
                if let Some(next) = next_fault(&mut rng, cfg.kill_rate, at) {
                    sim.push(next, SimEvent::Die(i));
                }
                // What it ran before it died, reported late: every such report must be refused.
                for (key, token) in std::mem::take(&mut node.lost_on_death) {
                    let late = Event::ShardFinished { key: key.clone(), node: node.name.clone(), token, bytes: 1 };
                    if let Ok(d) = sim.handle(&mut core, at, late) {
                        return Err(
                            sim.violation(format!("a late finish of {key:?} with token {token} was taken: {d:?}"))
                        );
                    }
                    world.stats.stale_refused += 1;
                }
                vec![]
            }
            SimEvent::Partition(i) => {
                if let Some(next) = next_fault(&mut rng, cfg.partition_rate, at.after(PARTITION_TIME)) {
                    sim.push(next, SimEvent::Partition(i));
                }
                let node = &mut nodes[i];
                if node.alive && !node.cut_off {
                    node.cut_off = true;
                    world.stats.partitions += 1;
                    for (key, shard) in node.shards.iter_mut() {
                        shard.cut_off = true;
                        world.stats.died_at.entry(key.clone()).or_insert(at);
                    }
                    sim.push(at.after(PARTITION_TIME), SimEvent::Heal(i));
                }
                continue;
            }
            SimEvent::Heal(i) => {
                nodes[i].cut_off = false;
                continue;
            }
            SimEvent::Fleet => {
                sim.push(at.after(FLEET_EVERY), SimEvent::Fleet);
                let in_service = nodes.iter().filter(|n| n.in_service()).count();
                world.stats.node_seconds += (in_service * FLEET_EVERY.0 as usize / 1000) as u64;
                world.stats.nodes_max = world.stats.nodes_max.max(in_service);
                let Some((desired, _)) = core.desired_nodes().filter(|_| cfg.autoscale) else { continue };
                let (desired, provisioned) = (desired as usize, in_service + booting);
                for _ in provisioned..desired {
                    sim.push(at.after(BOOT_TIME), SimEvent::Boot);
                    booting += 1;
                }
                // The idlest nodes in service, and among those the last added, drain first.
                let mut idle: Vec<usize> =
                    (0..nodes.len()).filter(|&i| nodes[i].in_service() && nodes[i].alive).collect();
                idle.sort_by_key(|&i| (nodes[i].shards.len(), Reverse(i)));
                let mut out = vec![];
                for &i in idle.iter().take(provisioned.saturating_sub(desired).min(in_service)) {
                    nodes[i].draining = true;
                    let drain = Event::NodeDrain(nodes[i].name.clone());
                    out.extend(sim.handle(&mut core, at, drain).map_err(|e| sim.violation(format!("drain: {e}")))?);
                }
                out
            }
            SimEvent::Boot => {
                booting -= 1;
                let i = nodes.len();
                nodes.push(SimNode::new(i, &mut rng, cfg.slow_rate));
                by_name.insert(nodes[i].name.clone(), i);
                sim.start_node(i, &mut rng, cfg, at);
                let joined = Event::NodeJoined { node: nodes[i].name.clone(), capacity: CAPACITY };
                sim.handle(&mut core, at, joined).map_err(|e| sim.violation(format!("joining: {e}")))?
            }
            SimEvent::Report { node: i, key, token } => {
                let node = &mut nodes[i];
                let share = node.cap_bps / node.shards.len().max(1) as u64;
                let Some(shard) = node.shards.get_mut(&key).filter(|s| s.token == token) else { continue };
                let host = &mut hosts[shard.host];
                let rate = node
                    .bps
                    .min(shard.read_cap_bps)
                    .min(host.cap_bps / u64::from(host.running.max(1)))
                    .min(share)
                    .max(1);
                host.reading_bps = host.reading_bps + rate - shard.rate;
                shard.rate = rate;
                shard.done = (shard.done + rate * REPORT_EVERY.0 / 1000).min(shard.bytes);
                let read_p99_us = host.read_p99_us(at);
                let (bytes, done, was_cut_off, yield_after) =
                    (shard.bytes, shard.done, shard.cut_off, shard.yield_after);
                if node.cut_off {
                    // Working, but nothing it sends arrives: it holds its finish until it is back.
                    sim.push(at.after(REPORT_EVERY), SimEvent::Report { node: i, key, token });
                    continue;
                }
                world.stats.source_reports += 1;
                world.stats.source_over_target += u64::from(read_p99_us > target_p99_us);
                let name = node.name.clone();
                let result = if done >= bytes {
                    let finished = Event::ShardFinished { key: key.clone(), node: name, token, bytes };
                    let r = sim.handle(&mut core, at, finished);
                    if r.is_ok() {
                        world.stats.finished.entry(key.job).or_default().insert(key.shard);
                    }
                    r.map(|d| (d, true))
                } else if yield_after.is_some_and(|from| done / SEGMENT > from) {
                    // Preempted, and a segment boundary passed: handed back there; what it did
                    // past the boundary is done again by whoever resumes it.
                    let yielded =
                        Event::ShardYielded { key: key.clone(), node: name, token, segments_done: done / SEGMENT };
                    sim.handle(&mut core, at, yielded).map(|d| (d, true))
                } else {
                    let renew = Event::LeaseRenewed { key: key.clone(), node: name.clone(), token };
                    let source = Some(SourceLoad { read_p99_us, cpu_percent: 0 });
                    let progress =
                        Event::Progress { key: key.clone(), node: name, token, segments_done: done / SEGMENT, source };
                    sim.handle(&mut core, at, renew)
                        .and_then(|mut d| {
                            d.extend(sim.handle(&mut core, at, progress)?);
                            Ok(d)
                        })
                        .map(|d| (d, false))
                };
                match result {
                    Ok((d, stopped)) => {
                        if stopped {
                            let shard = nodes[i].shards.remove(&key).expect("found above");
                            world.drop_shard(&mut hosts, &shard);
                        } else {
                            sim.push(at.after(REPORT_EVERY), SimEvent::Report { node: i, key, token });
                        }
                        d
                    }
                    Err(CoreError::Lease(_)) if was_cut_off => {
                        // Fenced: its lease ended while it was cut off and the shard moved on.
                        let shard = nodes[i].shards.remove(&key).expect("found above");
                        world.drop_shard(&mut hosts, &shard);
                        world.stats.stale_refused += 1;
                        vec![]
                    }
                    Err(e) => return Err(sim.violation(format!("{key:?} from {}: {e}", nodes[i].name))),
                }
            }
        };
        let mut decisions = decisions;
        loop {
            sim.check(&decisions, at, &core, &hosts, &mut world)?;
            sim.apply(&decisions, &mut nodes, &by_name, &mut hosts, &host_by_name, &mut world);
            // Drained nodes leave for good.
            let Some(i) = world.retiring.pop() else { break };
            world.stats.drained += 1;
            nodes[i].retired = true;
            nodes[i].alive = false;
            let left = Event::NodeLeft(nodes[i].name.clone());
            decisions = sim.handle(&mut core, at, left).map_err(|e| sim.violation(format!("leaving: {e}")))?;
        }
    }
    let stats = &mut world.stats;
    // RPOs missed by databases still waiting at the end.
    for d in world.dbs.values().filter(|d| end.since(d.last_snapshot) > d.rpo) {
        stats.rpo_misses += 1;
        stats.rpo_misses_source_bound += u64::from(sim.source_bound(d, &hosts));
    }
    let lost = stats.assigned.iter().filter(|k| !stats.committed.contains(&k.job) && !core.is_open(k.job)).count();
    if lost > 0 {
        return Err(sim.violation(format!("{lost} shards were assigned, never committed, and are no longer open")));
    }
    let summary = Summary {
        dbs: registered,
        nodes: cfg.nodes,
        simulated_hours: cfg.hours,
        backups_done: stats.backups_done,
        rpo_misses: stats.rpo_misses,
        rpo_misses_source_bound: stats.rpo_misses_source_bound,
        priority_inversions: stats.inverted.len() as u64,
        preemptions: stats.preemptions,
        lost_shards: lost as u64,
        double_commits: stats.double_commits,
        stale_reports_refused: stats.stale_refused,
        node_deaths: stats.node_deaths,
        partitions: stats.partitions,
        failovers: stats.failovers,
        max_failover_s: stats.max_failover.0 as f64 / 1000.0,
        lease_ttl_s: lease_ttl.0 as f64 / 1000.0,
        sched_pass_p50_ms: sim.passes.quantile_ms(0.5),
        sched_pass_p99_ms: sim.passes.quantile_ms(0.99),
        desired_nodes_max: stats.desired_max,
        nodes_max: stats.nodes_max,
        node_hours: stats.node_seconds as f64 / 3600.0,
        nodes_drained: stats.drained,
        drain_handbacks: stats.drain_handbacks,
        source_reports_over_target_percent: 100.0 * stats.source_over_target as f64
            / stats.source_reports.max(1) as f64,
        host_cap_cuts: stats.host_cap_cuts,
        events: sim.step,
        digest: format!("{:016x}", sim.digest.0),
    };
    Ok(Run { summary, series })
}

/// Registers database number `i` of `class` on source host `host`.
#[allow(clippy::too_many_arguments)]
fn register(
    sim: &mut Sim,
    core: &mut Core,
    rng: &mut StdRng,
    world: &mut World,
    hosts: &mut [SimHost],
    i: usize,
    class: Priority,
    host: usize,
) -> Result<Vec<Decision>, Violation> {
    let rpo_h = match class {
        Priority::Critical => 1,
        Priority::High => 4,
        Priority::Normal => 12,
        Priority::Low => 24,
    };
    // Sizes spread evenly on a log scale from 1 GiB to 2 TiB.
    let size = (f64::from(1u32 << 30) * 2f64.powf(rng.gen_range(0.0..11.0))) as u64;
    let spec = DbSpec {
        name: DbName(format!("db{i:06}").into()),
        source_host: hosts[host].name.clone(),
        size_estimate: size,
        priority: class,
        rpo: Millis::from_secs(rpo_h * 3600),
        window: None,
    };
    // Growth rates spread evenly from none to twice the mean.
    let growth_per_day = rng.gen_range(0.0..=2.0 * world.growth_per_day);
    let (rpo, now) = (spec.rpo, sim.now);
    let db = SimDb { host, class, rpo, size, last_snapshot: now, backups: 0, growth_per_day, grown_at: now };
    hosts[host].demand_bps += steady_bps(size, spec.rpo);
    world.dbs.insert(spec.name.clone(), db);
    let at = sim.now;
    sim.handle(core, at, Event::DbRegistered(spec)).map_err(|e| sim.violation(format!("registering: {e}")))
}

fn sample(
    s: &mut Series,
    at: Millis,
    core: &Core,
    nodes: &[SimNode],
    hosts: &[SimHost],
    world: &World,
    failovers_sampled: &mut u64,
) {
    s.hours.push(at.0 as f64 / 3_600_000.0);
    for (line, n) in s.waiting.iter_mut().zip(core.waiting_by_class()) {
        line.push(n as f64);
    }
    let mut slack: Vec<f64> =
        world.dbs.values().map(|d| (d.rpo.0 as f64 - at.since(d.last_snapshot).0 as f64) / 3_600_000.0).collect();
    slack.sort_by(f64::total_cmp);
    s.slack_min_h.push(slack.first().copied().unwrap_or(0.0));
    s.slack_p10_h.push(slack.get(slack.len() / 10).copied().unwrap_or(0.0));
    let live: Vec<_> = nodes.iter().filter(|n| n.alive).collect();
    let running: usize = live.iter().map(|n| n.shards.len()).sum();
    s.utilisation_percent.push(100.0 * running as f64 / (live.len() as f64 * SLOTS as f64).max(1.0));
    s.desired_nodes.push(core.desired_nodes().map_or(f64::NAN, |d| f64::from(d.0)));
    s.live_nodes.push(live.len() as f64);
    s.failovers.push((world.stats.failovers - *failovers_sampled) as f64);
    *failovers_sampled = world.stats.failovers;
    let caps: u64 = hosts.iter().map(|h| h.cap_bps).sum();
    s.host_cap_mib_s.push(caps as f64 / hosts.len().max(1) as f64 / f64::from(1 << 20));
}

#[derive(Default)]
struct Stats {
    backups_done: u64,
    rpo_misses: u64,
    double_commits: u64,
    stale_refused: u64,
    node_deaths: u64,
    partitions: u64,
    failovers: u64,
    max_failover: Millis,
    desired_max: u32,
    source_reports: u64,
    source_over_target: u64,
    host_cap_cuts: u64,
    preemptions: u64,
    node_seconds: u64,
    nodes_max: usize,
    drain_handbacks: u64,
    drained: u64,
    rpo_misses_source_bound: u64,
    committed: FxHashSet<u64>,
    assigned: FxHashSet<ShardKey>,
    /// Each job's shard count, and the shards whose finish the core took.
    shard_count: FxHashMap<u64, u32>,
    finished: FxHashMap<u64, FxHashSet<u32>>,
    /// Shards whose node died or was cut off, and when: their next assignment is a failover.
    died_at: FxHashMap<ShardKey, Millis>,
    /// Critical backups (database, its backup number) that waited while lower classes ran and
    /// nothing was preempted for them.
    inverted: FxHashSet<(DbName, u64)>,
}

/// What the simulated fleet knows besides the nodes and hosts.
struct World {
    dbs: FxHashMap<DbName, SimDb>,
    stats: Stats,
    /// Running shards by class, on live nodes.
    running_by_class: [u64; 4],
    /// The databases' mean growth, a share of their size per day.
    growth_per_day: f64,
    /// Nodes drained, to leave.
    retiring: Vec<usize>,
}

impl World {
    fn drop_shard(&mut self, hosts: &mut [SimHost], shard: &RunningShard) {
        let host = &mut hosts[shard.host];
        host.reading_bps -= shard.rate;
        host.running -= 1;
        self.running_by_class[usize::from(shard.class.rank())] -= 1;
    }
}

struct Sim {
    queue: BinaryHeap<Reverse<(Millis, u64, SimEvent)>>,
    seq: u64,
    step: u64,
    now: Millis,
    digest: Fnv,
    seed: u64,
    passes: Histogram,
    /// The core's cap on backups per source host, for judging RPO misses.
    host_max_running: u64,
}

impl Sim {
    /// Draws node `i`'s first faults after `at` and starts its heartbeats.
    fn start_node(&mut self, i: usize, rng: &mut StdRng, cfg: &SimConfig, at: Millis) {
        if let Some(t) = next_fault(rng, cfg.kill_rate, at) {
            self.push(t, SimEvent::Die(i));
        }
        if let Some(t) = next_fault(rng, cfg.partition_rate, at) {
            self.push(t, SimEvent::Partition(i));
        }
        self.push(at.after(Millis(rng.gen_range(0..HEARTBEAT_EVERY.0))), SimEvent::Heartbeat(i));
    }

    fn push(&mut self, at: Millis, event: SimEvent) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, event)));
    }

    fn violation(&self, what: String) -> Violation {
        Violation { seed: self.seed, step: self.step, at: self.now, what }
    }

    /// Whether no count of nodes could have kept `d`'s RPO: at the read cap its host's latency
    /// allowed and the backups it may serve at once, the host cannot read `d` within the half
    /// RPO it has once due, or cannot keep up with what all its databases ask for.
    fn source_bound(&self, d: &SimDb, hosts: &[SimHost]) -> bool {
        let host = &hosts[d.host];
        let best_bps = host.cap_bps.min(self.host_max_running * NODE_BPS).max(1);
        d.size / best_bps * 1000 > d.rpo.0 / 2 || host.demand_bps > best_bps
    }

    /// One event through the core, timed.
    fn handle(&mut self, core: &mut Core, at: Millis, event: Event) -> Result<Vec<Decision>, CoreError> {
        let started = Instant::now();
        let out = core.handle(at, event);
        self.passes.record(started.elapsed());
        out
    }

    fn record(&mut self, decisions: &[Decision]) {
        for d in decisions {
            self.digest.add(format!("{}:{d:?}", self.now.0).as_bytes());
        }
    }

    /// The invariants that each step's decisions and the core's state after them must keep.
    fn check(
        &self,
        decisions: &[Decision],
        at: Millis,
        core: &Core,
        hosts: &[SimHost],
        world: &mut World,
    ) -> Result<(), Violation> {
        let stats = &mut world.stats;
        for d in decisions {
            match d {
                Decision::Commit { db, job, .. } => {
                    if !stats.committed.insert(*job) {
                        stats.double_commits += 1;
                        return Err(self.violation(format!("job {job} committed twice")));
                    }
                    let finished = stats.finished.remove(job).map_or(0, |f| f.len());
                    if finished as u32 != stats.shard_count[job] {
                        return Err(self.violation(format!(
                            "job {job} committed with {finished} of {} shards finished under their newest token",
                            stats.shard_count[job]
                        )));
                    }
                    stats.backups_done += 1;
                    let d = world.dbs.get_mut(db).expect("committed databases are registered");
                    if at.since(d.last_snapshot) > d.rpo {
                        stats.rpo_misses += 1;
                        stats.rpo_misses_source_bound += u64::from(self.source_bound(d, hosts));
                    }
                    d.last_snapshot = at;
                    d.backups += 1;
                }
                Decision::DesiredNodes { count, .. } => stats.desired_max = stats.desired_max.max(*count),
                _ => {}
            }
        }
        if let Some((db, class)) = core.first_waiting() {
            if class == Priority::Critical {
                if core.has_room() {
                    return Err(self.violation(format!("critical {db} waits while a node has room for it")));
                }
                // Lower classes run and none was told to make room: that is an inversion (while
                // preempted shards reach their segment boundary, the wait is by design).
                if core.preempting() == 0 && world.running_by_class[1..].iter().any(|&n| n > 0) {
                    stats.inverted.insert((db.clone(), world.dbs[db].backups));
                }
            }
        }
        Ok(())
    }

    /// Carries decisions to the simulated nodes and hosts.
    fn apply(
        &mut self,
        decisions: &[Decision],
        nodes: &mut [SimNode],
        by_name: &FxHashMap<NodeName, usize>,
        hosts: &mut [SimHost],
        host_by_name: &FxHashMap<HostName, usize>,
        world: &mut World,
    ) {
        self.record(decisions);
        for d in decisions {
            match d {
                Decision::Assign { key, db, shards, node, token, resume_from, read_cap_bps, .. } => {
                    let i = by_name[node];
                    world.stats.assigned.insert(key.clone());
                    world.stats.shard_count.insert(key.job, *shards);
                    let n = &mut nodes[i];
                    if !n.alive || n.cut_off {
                        // It never hears of it; the lease will end and the shard move on.
                        world.stats.died_at.entry(key.clone()).or_insert(self.now);
                        continue;
                    }
                    let sdb = &world.dbs[db];
                    let bytes = sdb.size.div_ceil(u64::from(*shards)).max(1);
                    let done = (resume_from * SEGMENT).min(bytes);
                    let shard = RunningShard {
                        token: *token,
                        bytes,
                        done,
                        read_cap_bps: *read_cap_bps,
                        rate: 0,
                        host: sdb.host,
                        class: sdb.class,
                        cut_off: false,
                        yield_after: None,
                    };
                    hosts[sdb.host].running += 1;
                    world.running_by_class[usize::from(sdb.class.rank())] += 1;
                    if let Some(old) = n.shards.insert(key.clone(), shard) {
                        world.drop_shard(hosts, &old);
                    }
                    self.push(
                        self.now.after(REPORT_EVERY),
                        SimEvent::Report { node: i, key: key.clone(), token: *token },
                    );
                }
                Decision::Revoke { key, node, token } => {
                    // A dead or cut-off node's shard is free again: that is its failover.
                    if let Some(died) = world.stats.died_at.remove(key) {
                        world.stats.failovers += 1;
                        world.stats.max_failover = world.stats.max_failover.max(self.now.since(died));
                    }
                    let n = &mut nodes[by_name[node]];
                    if !n.cut_off && n.shards.get(key).is_some_and(|s| s.token == *token) {
                        let shard = n.shards.remove(key).expect("found above");
                        world.drop_shard(hosts, &shard);
                    }
                }
                Decision::Preempt { key, node, token } => {
                    let n = &mut nodes[by_name[node]];
                    if let Some(shard) = n.shards.get_mut(key).filter(|s| s.token == *token && !n.cut_off) {
                        shard.yield_after = Some(shard.done / SEGMENT);
                        if n.draining {
                            world.stats.drain_handbacks += 1;
                        } else {
                            world.stats.preemptions += 1;
                        }
                    }
                }
                Decision::HostReadCap { host, bps } => {
                    let h = &mut hosts[host_by_name[host]];
                    world.stats.host_cap_cuts += u64::from(*bps < h.cap_bps);
                    h.cap_bps = *bps;
                }
                Decision::NodeRateCap { node, bps } => nodes[by_name[node]].cap_bps = *bps,
                Decision::Commit { db, .. } => {
                    // It grew since: its next backup reads more than the snapshot's stats say.
                    let d = world.dbs.get_mut(db).expect("committed databases are registered");
                    let days = self.now.since(d.grown_at).0 as f64 / 86_400_000.0;
                    let grown = (d.size as f64 * (1.0 + d.growth_per_day * days)) as u64;
                    let host = &mut hosts[d.host];
                    host.demand_bps = host.demand_bps - steady_bps(d.size, d.rpo) + steady_bps(grown, d.rpo);
                    d.size = grown;
                    d.grown_at = self.now;
                }
                Decision::Drained { node } => world.retiring.push(by_name[node]),
                Decision::DesiredNodes { .. } => {}
            }
        }
    }
}

fn next_fault(rng: &mut StdRng, rate_per_hour: f64, after: Millis) -> Option<Millis> {
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
mod tests;
