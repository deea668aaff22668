//! The whole core under random event sequences: any mix of registrations (good and bad),
//! nodes joining, leaving and going quiet, reports from holders, from nodes that lost their
//! lease and from strangers, and a clock that sometimes goes back. The core must never panic,
//! and its decisions must keep the fencing rules: a shard is never assigned while another node
//! holds it, every grant of a shard carries a higher token than the last, a job is committed
//! once and only after every one of its shards finished under a lease the core took.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::leases::ShardKey;
use super::machine::{Config, Core, CoreError, Decision, Event, NodeReport, SourceLoad};
use super::registry::{DbSpec, NodeCapacity};
use super::{DbName, HostName, Millis, NodeName, Priority};

#[derive(Clone, Debug)]
enum Op {
    Register {
        db: u8,
        host: u8,
        class: u8,
        size: u64,
        rpo_s: u64,
    },
    Change {
        db: u8,
        class: u8,
        size: u64,
    },
    Remove {
        db: u8,
    },
    Join {
        node: u8,
        cores: u32,
    },
    Leave {
        node: u8,
    },
    Drain {
        node: u8,
    },
    Beat {
        node: u8,
        cpu: u8,
    },
    /// About the `pick`-th lease the decisions granted and did not end: from its holder with
    /// its token, or (`stale`) with the token before it, or from another node.
    Renew {
        pick: usize,
        stale: bool,
        stranger: bool,
    },
    Progress {
        pick: usize,
        stale: bool,
        segments: u64,
        p99_us: u64,
    },
    Finish {
        pick: usize,
        stale: bool,
        stranger: bool,
    },
    Fail {
        pick: usize,
    },
    Yield {
        pick: usize,
        segments: u64,
    },
    Tick {
        advance_ms: u64,
    },
    Backwards,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![1 => Just(0u64), 8 => 1u64..(1 << 34), 2 => (1u64 << 34)..(1 << 42), 1 => Just(u64::MAX)];
    let rpo_s = prop_oneof![1 => Just(0u64), 8 => 60u64..100_000];
    prop_oneof![
        3 => (0..6u8, 0..3u8, 0..4u8, size, rpo_s)
            .prop_map(|(db, host, class, size, rpo_s)| Op::Register { db, host, class, size, rpo_s }),
        1 => (0..6u8, 0..4u8, 1u64..(1 << 42)).prop_map(|(db, class, size)| Op::Change { db, class, size }),
        1 => (0..6u8).prop_map(|db| Op::Remove { db }),
        2 => (0..4u8, 0..17u32).prop_map(|(node, cores)| Op::Join { node, cores }),
        1 => (0..4u8).prop_map(|node| Op::Leave { node }),
        1 => (0..5u8).prop_map(|node| Op::Drain { node }),
        2 => (0..5u8, 0..101u8).prop_map(|(node, cpu)| Op::Beat { node, cpu }),
        2 => (0..8usize, any::<bool>(), any::<bool>())
            .prop_map(|(pick, stale, stranger)| Op::Renew { pick, stale, stranger }),
        2 => (0..8usize, any::<bool>(), 0..50u64, 0..100_000u64)
            .prop_map(|(pick, stale, segments, p99_us)| Op::Progress { pick, stale, segments, p99_us }),
        6 => (0..8usize, any::<bool>(), any::<bool>())
            .prop_map(|(pick, stale, stranger)| Op::Finish { pick, stale, stranger }),
        1 => (0..8usize).prop_map(|pick| Op::Fail { pick }),
        1 => (0..8usize, 0..50u64).prop_map(|(pick, segments)| Op::Yield { pick, segments }),
        3 => (0..40_000u64).prop_map(|advance_ms| Op::Tick { advance_ms }),
        1 => Just(Op::Backwards),
    ]
}

fn class(c: u8) -> Priority {
    [Priority::Critical, Priority::High, Priority::Normal, Priority::Low][usize::from(c % 4)]
}

/// What the decisions so far say: who holds what, under which token.
#[derive(Default)]
struct Model {
    held: HashMap<ShardKey, (NodeName, u64)>,
    newest: HashMap<ShardKey, u64>,
    shards: HashMap<u64, u32>,
    finished: HashMap<u64, HashSet<u32>>,
    committed: HashSet<u64>,
}

impl Model {
    fn take(&mut self, decisions: &[Decision]) -> Result<(), TestCaseError> {
        for d in decisions {
            match d {
                Decision::Assign { key, node, token, shards, .. } => {
                    prop_assert!(!self.held.contains_key(key), "{key:?} assigned while held: {:?}", self.held[key]);
                    let newest = self.newest.get(key).copied().unwrap_or(0);
                    prop_assert!(*token > newest, "{key:?}: token {token} after {newest}");
                    self.newest.insert(key.clone(), *token);
                    self.held.insert(key.clone(), (node.clone(), *token));
                    self.shards.insert(key.job, *shards);
                }
                Decision::Revoke { key, node, token } => {
                    prop_assert_eq!(self.held.remove(key), Some((node.clone(), *token)), "revoked {:?}", key);
                }
                Decision::Commit { job, .. } => {
                    prop_assert!(self.committed.insert(*job), "job {} committed twice", job);
                    let finished = self.finished.get(job).map_or(0, HashSet::len);
                    prop_assert_eq!(finished as u32, self.shards[job], "job {} committed early", job);
                }
                Decision::Preempt { key, node, token } => {
                    prop_assert_eq!(self.held.get(key), Some(&(node.clone(), *token)), "preempted {:?}", key);
                }
                Decision::HostReadCap { .. }
                | Decision::NodeRateCap { .. }
                | Decision::DesiredNodes { .. }
                | Decision::Drained { .. } => {}
            }
        }
        Ok(())
    }

    fn pick(&self, i: usize) -> Option<(ShardKey, NodeName, u64)> {
        let mut held: Vec<_> = self.held.iter().collect();
        held.sort_by(|a, b| a.0.cmp(b.0));
        let (key, (node, token)) = held.get(i % held.len().max(1))?;
        Some(((*key).clone(), node.clone(), *token))
    }
}

fn node(n: u8) -> NodeName {
    NodeName(format!("n{n}").into())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_never_panic_and_keep_the_fencing_rules(ops in proptest::collection::vec(op(), 1..120)) {
        let mut core = Core::new(Config::default());
        let mut model = Model::default();
        let mut now = Millis(0);
        for op in ops {
            let mut at = now;
            let (event, ends): (Event, Option<(ShardKey, bool)>) = match op {
                Op::Register { db, host, class: c, size, rpo_s } => (Event::DbRegistered(DbSpec {
                    name: DbName(format!("db{db}").into()),
                    source_host: HostName(format!("h{host}").into()),
                    size_estimate: size,
                    priority: class(c),
                    rpo: Millis::from_secs(rpo_s),
                    window: None,
                }), None),
                Op::Change { db, class: c, size } => (Event::DbChanged(DbSpec {
                    name: DbName(format!("db{db}").into()),
                    source_host: HostName("h0".into()),
                    size_estimate: size,
                    priority: class(c),
                    rpo: Millis::from_secs(3600),
                    window: None,
                }), None),
                Op::Remove { db } => (Event::DbRemoved(DbName(format!("db{db}").into())), None),
                Op::Join { node: n, cores } => (Event::NodeJoined {
                    node: node(n),
                    capacity: NodeCapacity { cores, memory_bytes: 16 << 30, network_bps: 1 << 30, disk_bps: 1 << 30 },
                }, None),
                Op::Leave { node: n } => (Event::NodeLeft(node(n)), None),
                Op::Drain { node: n } => (Event::NodeDrain(node(n)), None),
                Op::Beat { node: n, cpu } => {
                    (Event::Heartbeat { node: node(n), report: NodeReport { cpu_percent: cpu, ..NodeReport::default() } }, None)
                }
                Op::Renew { pick, stale, stranger } => {
                    let Some((key, holder, token)) = model.pick(pick) else { continue };
                    let from = if stranger { NodeName("stranger".into()) } else { holder };
                    (Event::LeaseRenewed { key, node: from, token: token - u64::from(stale) }, None)
                }
                Op::Progress { pick, stale, segments, p99_us } => {
                    let Some((key, holder, token)) = model.pick(pick) else { continue };
                    let source = Some(SourceLoad { read_p99_us: p99_us, cpu_percent: 50 });
                    (Event::Progress { key, node: holder, token: token - u64::from(stale), segments_done: segments, source }, None)
                }
                Op::Finish { pick, stale, stranger } => {
                    let Some((key, holder, token)) = model.pick(pick) else { continue };
                    let from = if stranger { NodeName("stranger".into()) } else { holder };
                    (Event::ShardFinished { key: key.clone(), node: from, token: token - u64::from(stale), bytes: 1 }, Some((key, true)))
                }
                Op::Fail { pick } => {
                    let Some((key, holder, token)) = model.pick(pick) else { continue };
                    (Event::ShardFailed { key: key.clone(), node: holder, token }, Some((key, false)))
                }
                Op::Yield { pick, segments } => {
                    let Some((key, holder, token)) = model.pick(pick) else { continue };
                    (Event::ShardYielded { key: key.clone(), node: holder, token, segments_done: segments }, Some((key, false)))
                }
                Op::Tick { advance_ms } => {
                    at = now.after(Millis(advance_ms));
                    (Event::Tick, None)
                }
                Op::Backwards => {
                    at = Millis(now.0.saturating_sub(1));
                    (Event::Tick, None)
                }
            };
            // A node leaving revokes its leases in its decisions; a removed database's too.
            let backwards = at < now;
            match core.handle(at, event) {
                Ok(decisions) => {
                    prop_assert!(!backwards, "an event from the past was taken");
                    now = at;
                    if let Some((key, finished)) = ends {
                        model.held.remove(&key);
                        if finished {
                            model.finished.entry(key.job).or_default().insert(key.shard);
                        }
                    }
                    model.take(&decisions)?;
                }
                // An error is a value naming what was wrong; a clock going back is always one.
                Err(e) => prop_assert!(at >= now || matches!(e, CoreError::ClockBackwards { .. }), "{}", e),
            }
        }
    }
}
