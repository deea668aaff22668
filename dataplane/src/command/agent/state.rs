//! The agent's pure core: which tasks run, under which leases until when, what to tell the
//! control plane when a task ends. Time is an argument (milliseconds on the agent's own
//! monotonic clock), so it is unit-tested without a service, a child process or a clock.
//!
//! A lease is renewed by a heartbeat that carries it; the agent counts its deadline from when
//! that heartbeat was *sent*, which is never later than when the service renewed it. So the
//! agent gives a lease up no later than the service expires it, whatever the two hosts' clocks
//! say: only durations on one clock are compared.

use std::collections::BTreeMap;

use wire::control::{Assignment, LeaseRef, Order, ShardOutcome};

/// A task, by the lease it runs under and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskKey {
    Shard(LeaseRef),
    Commit(LeaseRef),
}

impl TaskKey {
    pub fn lease(&self) -> LeaseRef {
        match self {
            TaskKey::Shard(l) | TaskKey::Commit(l) => *l,
        }
    }
}

/// What a task does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    Shard(Assignment),
    Commit { data_job: String, repo: String },
}

/// How a task should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopHow {
    /// At its next consistent point (SIGINT: the segment in flight is not checkpointed, every
    /// one before it is).
    Gently,
    /// At once (SIGKILL): its lease ended and nothing more may be written under it.
    Now,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Start(TaskKey, Work),
    Stop(TaskKey, StopHow),
    /// Not taken (the agent runs its most tasks already): report it failed.
    Refuse(TaskKey, String),
}

/// How a task ended, as its child processes said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskResult {
    /// A shard read `bytes` (0: nothing left to read), skipping `skipped` segments that
    /// earlier runs had checkpointed.
    ShardDone {
        bytes: u64,
        skipped: u64,
    },
    Committed {
        snapshot: String,
    },
    Failed {
        error: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Running as assigned.
    Running,
    /// Told to hand back: its end is reported as yielded.
    HandingBack,
    /// Its lease is gone (stopped, or expired here): its end is not reported.
    Abandoned,
}

struct Task {
    /// When its lease ends unless renewed (shards only; a commit has none).
    deadline: Option<u64>,
    ending: Ending,
}

pub struct AgentState {
    tasks: BTreeMap<TaskKey, Task>,
    max_tasks: usize,
    rate_cap: Option<u64>,
    drained: bool,
    leaving: bool,
}

impl AgentState {
    /// An agent that runs at most `max_tasks` at once.
    pub fn new(max_tasks: usize) -> Self {
        Self { tasks: BTreeMap::new(), max_tasks, rate_cap: None, drained: false, leaving: false }
    }

    /// The leases a heartbeat renews: every shard still running or handing back.
    pub fn held(&self) -> Vec<LeaseRef> {
        let shards = self.tasks.iter().filter(|(_, t)| t.ending != Ending::Abandoned);
        shards.filter_map(|(k, _)| if let TaskKey::Shard(l) = k { Some(*l) } else { None }).collect()
    }

    /// Shards running (a commit is not one: it reads no source).
    pub fn running(&self) -> u32 {
        self.tasks.keys().filter(|k| matches!(k, TaskKey::Shard(_))).count() as u32
    }

    /// The last rate cap the control plane set, bytes per second.
    pub fn rate_cap(&self) -> Option<u64> {
        self.rate_cap
    }

    /// A heartbeat sent at `sent_at` carrying `held` was answered: those leases last `ttl`
    /// from then (a stop among the answer's orders ends one anyway).
    pub fn renewed(&mut self, sent_at: u64, ttl: u64, held: &[LeaseRef]) {
        for lease in held {
            if let Some(task) = self.tasks.get_mut(&TaskKey::Shard(*lease)) {
                task.deadline = Some(task.deadline.unwrap_or(0).max(sent_at + ttl));
            }
        }
    }

    /// The orders of an answer to a request sent at `sent_at`.
    pub fn orders(&mut self, sent_at: u64, orders: Vec<Order>) -> Vec<Action> {
        let mut actions = vec![];
        for order in orders {
            match order {
                Order::Run(a) => {
                    let key = TaskKey::Shard(a.lease);
                    if self.leaving || self.tasks.contains_key(&key) {
                        continue;
                    }
                    if self.tasks.len() >= self.max_tasks {
                        actions.push(Action::Refuse(key, format!("runs {} tasks already", self.tasks.len())));
                        continue;
                    }
                    let task = Task { deadline: Some(sent_at + a.lease_ttl_ms), ending: Ending::Running };
                    self.tasks.insert(key, task);
                    actions.push(Action::Start(key, Work::Shard(a)));
                }
                Order::Stop { lease } => actions.extend(self.end(TaskKey::Shard(lease), Ending::Abandoned)),
                Order::HandBack { lease } => actions.extend(self.end(TaskKey::Shard(lease), Ending::HandingBack)),
                Order::Commit { lease, data_job, repo } => {
                    let key = TaskKey::Commit(lease);
                    if self.tasks.contains_key(&key) {
                        continue;
                    }
                    if self.tasks.len() >= self.max_tasks {
                        actions.push(Action::Refuse(key, format!("runs {} tasks already", self.tasks.len())));
                        continue;
                    }
                    self.tasks.insert(key, Task { deadline: None, ending: Ending::Running });
                    actions.push(Action::Start(key, Work::Commit { data_job, repo }));
                }
                Order::RateCap { bps } => self.rate_cap = Some(bps),
                Order::Drained => self.drained = true,
            }
        }
        actions
    }

    fn end(&mut self, key: TaskKey, ending: Ending) -> Option<Action> {
        let task = self.tasks.get_mut(&key)?;
        if task.ending == Ending::Abandoned || task.ending == ending {
            return None;
        }
        task.ending = ending;
        let how = if ending == Ending::Abandoned { StopHow::Now } else { StopHow::Gently };
        Some(Action::Stop(key, how))
    }

    /// The time is `now`: a shard whose lease ended here is stopped at once (partitioned from
    /// the control plane, it must not write past its lease).
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let expired: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.ending != Ending::Abandoned && t.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        expired.into_iter().filter_map(|k| self.end(k, Ending::Abandoned)).collect()
    }

    /// The agent is asked to leave (SIGTERM): every shard is handed back gently, commits run
    /// to their end, and no new work is taken.
    pub fn leave(&mut self) -> Vec<Action> {
        self.leaving = true;
        let shards: Vec<TaskKey> = self.tasks.keys().filter(|k| matches!(k, TaskKey::Shard(_))).copied().collect();
        shards.into_iter().filter_map(|k| self.end(k, Ending::HandingBack)).collect()
    }

    /// What to report for a task refused by [`Action::Refuse`].
    pub fn refused(key: TaskKey, why: String) -> ShardOutcome {
        match key {
            TaskKey::Shard(_) => ShardOutcome::Failed { error: why },
            TaskKey::Commit(_) => ShardOutcome::CommitFailed { error: why },
        }
    }

    /// Task `key` ended with `result`: what to report, if anything.
    pub fn finished(&mut self, key: TaskKey, result: TaskResult) -> Option<ShardOutcome> {
        let task = self.tasks.remove(&key)?;
        match (task.ending, key, result) {
            (Ending::Abandoned, ..) => None,
            (Ending::HandingBack, TaskKey::Shard(_), TaskResult::Failed { .. }) => {
                // Stopped at a consistent point, which is not a failure: what was checkpointed
                // is skipped by whoever runs it next.
                Some(ShardOutcome::Yielded { segments_done: 0 })
            }
            (_, TaskKey::Shard(_), TaskResult::ShardDone { bytes, .. }) => Some(ShardOutcome::Finished { bytes }),
            (_, TaskKey::Shard(_), TaskResult::Failed { error }) => Some(ShardOutcome::Failed { error }),
            (_, TaskKey::Commit(_), TaskResult::Committed { snapshot }) => Some(ShardOutcome::Committed { snapshot }),
            (_, TaskKey::Commit(_), TaskResult::Failed { error }) => Some(ShardOutcome::CommitFailed { error }),
            (_, key, result) => Some(ShardOutcome::Failed { error: format!("{key:?} ended as {result:?}") }),
        }
    }

    /// Drained (or leaving) with nothing left running: the agent may exit.
    pub fn may_exit(&self) -> bool {
        (self.drained || self.leaving) && self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 3_000;

    fn lease(job: u64) -> LeaseRef {
        LeaseRef { job, shard: 0, token: 1 }
    }

    fn run(job: u64) -> Order {
        Order::Run(Assignment {
            lease: lease(job),
            shards: 1,
            lease_ttl_ms: TTL,
            resume_from: 0,
            read_cap_bps: 0,
            db: format!("db{job}"),
            source: "synth://pg?size=1MiB".into(),
            repo: "quic://127.0.0.1:1".into(),
            data_job: format!("{job:032x}"),
        })
    }

    #[test]
    fn a_lease_not_renewed_in_time_stops_its_shard_at_once_and_its_end_is_not_reported() {
        let mut s = AgentState::new(8);
        let started = s.orders(100, vec![run(1), run(1)]);
        assert_eq!(started.len(), 1, "the same assignment twice starts one task");
        assert_eq!(s.held(), vec![lease(1)]);
        // Renewed by a heartbeat sent at 2,000: it lasts to 5,000 on this clock.
        s.renewed(2_000, TTL, &s.held());
        assert!(s.tick(4_999).is_empty());
        assert_eq!(s.tick(5_000), vec![Action::Stop(TaskKey::Shard(lease(1)), StopHow::Now)]);
        assert!(s.tick(6_000).is_empty(), "stopped once");
        assert!(s.held().is_empty(), "an expired lease is not renewed");
        assert_eq!(s.finished(TaskKey::Shard(lease(1)), TaskResult::ShardDone { bytes: 5, skipped: 0 }), None);
        assert_eq!(s.running(), 0);
    }

    #[test]
    fn a_renewal_never_moves_a_deadline_back() {
        let mut s = AgentState::new(8);
        s.orders(1_000, vec![run(1)]);
        s.renewed(500, TTL, &[lease(1)]);
        assert!(s.tick(3_999).is_empty(), "the grant's deadline (4,000) stands");
        assert_eq!(s.tick(4_000).len(), 1);
    }

    #[test]
    fn ends_are_reported_as_what_they_were() {
        let mut s = AgentState::new(8);
        s.orders(0, vec![run(1), run(2), run(3)]);
        let shard = |j| TaskKey::Shard(lease(j));
        assert_eq!(
            s.finished(shard(1), TaskResult::ShardDone { bytes: 9, skipped: 1 }),
            Some(ShardOutcome::Finished { bytes: 9 })
        );
        assert_eq!(
            s.finished(shard(2), TaskResult::Failed { error: "x".into() }),
            Some(ShardOutcome::Failed { error: "x".into() })
        );
        // Handed back: stopped gently, and its interrupted end is a yield.
        let back = s.orders(10, vec![Order::HandBack { lease: lease(3) }]);
        assert_eq!(back, vec![Action::Stop(shard(3), StopHow::Gently)]);
        assert_eq!(s.held(), vec![lease(3)], "renewed until it has stopped");
        let interrupted = TaskResult::Failed { error: "interrupted".into() };
        assert_eq!(s.finished(shard(3), interrupted), Some(ShardOutcome::Yielded { segments_done: 0 }));
        // A commit: reported as committed or not, and never expired.
        let commit = Order::Commit { lease: lease(1), data_job: "j".into(), repo: "r".into() };
        let started = s.orders(20, vec![commit]);
        assert!(matches!(&started[..], [Action::Start(TaskKey::Commit(_), Work::Commit { .. })]));
        assert_eq!(s.running(), 0, "a commit is not a running shard");
        assert!(s.tick(1_000_000).is_empty());
        assert_eq!(
            s.finished(TaskKey::Commit(lease(1)), TaskResult::Committed { snapshot: "ab".into() }),
            Some(ShardOutcome::Committed { snapshot: "ab".into() })
        );
        assert_eq!(s.finished(shard(9), TaskResult::ShardDone { bytes: 0, skipped: 0 }), None, "no such task");
    }

    #[test]
    fn a_stop_ends_a_shard_at_once_and_draining_or_leaving_exits_once_idle() {
        let mut s = AgentState::new(8);
        s.orders(0, vec![run(1), run(2)]);
        let stopped = s.orders(5, vec![Order::Stop { lease: lease(1) }, Order::RateCap { bps: 77 }, Order::Drained]);
        assert_eq!(stopped, vec![Action::Stop(TaskKey::Shard(lease(1)), StopHow::Now)]);
        assert_eq!(s.rate_cap(), Some(77));
        assert!(!s.may_exit(), "drained, but two tasks still run");
        s.finished(TaskKey::Shard(lease(1)), TaskResult::Failed { error: "killed".into() });
        let left = s.leave();
        assert_eq!(left, vec![Action::Stop(TaskKey::Shard(lease(2)), StopHow::Gently)]);
        assert!(s.orders(6, vec![run(3)]).is_empty(), "leaving: no new work");
        s.finished(TaskKey::Shard(lease(2)), TaskResult::ShardDone { bytes: 1, skipped: 0 });
        assert!(s.may_exit());
    }

    #[test]
    fn orders_beyond_the_most_tasks_are_refused() {
        let mut s = AgentState::new(1);
        s.orders(0, vec![run(1)]);
        assert!(matches!(&s.orders(0, vec![run(2)])[..], [Action::Refuse(k, _)] if *k == TaskKey::Shard(lease(2))));
        let commit = Order::Commit { lease: lease(3), data_job: "j".into(), repo: "r".into() };
        assert!(matches!(&s.orders(0, vec![commit])[..], [Action::Refuse(..)]));
        assert_eq!(s.running(), 1);
    }
}
