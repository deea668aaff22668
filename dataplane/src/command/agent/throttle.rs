//! The agent's fast loop over its own reads, and the caps it hands its shards.
//!
//! Every second the agent looks at what its shards read (the p99 of the time a window of the
//! source took to arrive, and the bytes) and at the CPU the rest of the host used (its own
//! shards' share left out: a backup must back off when the database is busy, not because the
//! backup itself is). Either over its target cuts the node's cap, both under raise it: the
//! same AIMD loop the control plane runs per host ([`wire::throttle`]), here once a second
//! instead of once a heartbeat. The cap a shard gets is the least of that loop's, the control
//! plane's (`rate_cap` orders), the operator's (`cbcr admin SOCKET throttle RATE`), each split
//! over the shards running, and the read cap of its assignment (its source host's share).
//! Pure: readings in, caps out.

use serde::Serialize;
use wire::throttle::{Aimd, AimdParams};

/// The loop's targets and steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteerParams {
    pub aimd: AimdParams,
}

impl SteerParams {
    /// Targets: a window's read p99 and the CPU others use; the cap moves between 1 MiB/s and
    /// `ceiling_bps` (the node's disk bandwidth), cut by a quarter, raised by 16 MiB/s.
    pub fn new(read_p99_target_us: u64, cpu_target_percent: u8, ceiling_bps: u64) -> Self {
        let aimd = AimdParams {
            target_p99_us: read_p99_target_us,
            target_cpu_percent: cpu_target_percent,
            min_bps: 1 << 20,
            max_bps: ceiling_bps.max(1 << 20),
            ..AimdParams::default()
        };
        Self { aimd }
    }
}

/// What the agent's shards read over one look.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reading {
    /// The worst shard's p99 window read time, microseconds; `None` when nothing was read.
    pub read_p99_us: Option<u64>,
    /// All shards together, bytes per second.
    pub read_bps: u64,
    /// CPU used by everything on the host but the agent's shards, percent.
    pub cpu_others_percent: u8,
}

/// Why the node's cap is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The loop found nothing to cut.
    Uncapped,
    /// Cut: source reads slower than the target.
    SlowReads,
    /// Cut: the rest of the host over its CPU target.
    BusyCpu,
    /// Under both targets again: rising one step a second.
    Recovering,
}

/// The caps in force and why, as `cbcr admin SOCKET status` shows them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SteerStatus {
    /// What the node's shards may read together, bytes per second (0: no cap).
    pub cap_bps: u64,
    pub reason: Reason,
    /// Each source of a cap (0: none from it).
    pub loop_bps: u64,
    pub control_plane_bps: u64,
    pub operator_bps: u64,
    pub paused: bool,
    /// The last look.
    pub read_p99_ms: f64,
    pub read_bps: u64,
    pub cpu_others_percent: u8,
}

/// The node's caps.
pub struct Steer {
    params: SteerParams,
    aimd: Aimd,
    reason: Reason,
    control_plane: Option<u64>,
    operator: Option<u64>,
    paused: bool,
    last: Reading,
}

impl Steer {
    pub fn new(params: SteerParams) -> Self {
        let aimd = Aimd::new(params.aimd, params.aimd.max_bps);
        Self {
            params,
            aimd,
            reason: Reason::Uncapped,
            control_plane: None,
            operator: None,
            paused: false,
            last: Reading::default(),
        }
    }

    /// Takes one look's reading. A look at which nothing was read moves the cap only for the
    /// CPU: there is no read time to judge by.
    pub fn observe(&mut self, r: Reading) {
        self.last = r;
        let p99 = r.read_p99_us.unwrap_or(0);
        if r.read_p99_us.is_none() && !self.aimd.over(0, r.cpu_others_percent) {
            return;
        }
        let over = self.aimd.over(p99, r.cpu_others_percent);
        let slow = p99 > self.params.aimd.target_p99_us;
        // Nothing read: a cut starts from the cap itself.
        let read = if r.read_p99_us.is_some() { r.read_bps } else { u64::MAX };
        let cap = self.aimd.report_reading(p99, r.cpu_others_percent, read);
        self.reason = match (over, slow) {
            (true, true) => Reason::SlowReads,
            (true, false) => Reason::BusyCpu,
            (false, _) if cap >= self.params.aimd.max_bps => Reason::Uncapped,
            (false, _) => Reason::Recovering,
        };
    }

    /// The control plane's cap for the node (`rate_cap` order).
    pub fn set_control_plane(&mut self, bps: Option<u64>) {
        self.control_plane = bps;
    }

    /// The operator's cap (`throttle RATE`; `None`: lifted).
    pub fn set_operator(&mut self, bps: Option<u64>) {
        self.operator = bps.filter(|&b| b > 0);
    }

    /// Paused: every shard reads nothing until resumed (its lease is still renewed).
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    fn loop_cap(&self) -> Option<u64> {
        (self.reason != Reason::Uncapped).then(|| self.aimd.cap_bps())
    }

    /// What the node's shards may read together; `None`: no cap.
    pub fn node_cap(&self) -> Option<u64> {
        [self.loop_cap(), self.control_plane, self.operator].into_iter().flatten().min()
    }

    /// The cap of one of `running` shards whose assignment caps it at `assigned` (0: none),
    /// as a `backup --read-cap-stdin` line's value: 0 means no cap, 1 (a byte a second) is
    /// how a pause reads.
    pub fn shard_cap(&self, assigned: u64, running: u32) -> u64 {
        if self.paused {
            return 1;
        }
        let share = self.node_cap().map(|c| (c / u64::from(running.max(1))).max(1));
        share.into_iter().chain((assigned > 0).then_some(assigned)).min().unwrap_or(0)
    }

    pub fn status(&self) -> SteerStatus {
        SteerStatus {
            cap_bps: self.node_cap().unwrap_or(0),
            reason: self.reason,
            loop_bps: self.loop_cap().unwrap_or(0),
            control_plane_bps: self.control_plane.unwrap_or(0),
            operator_bps: self.operator.unwrap_or(0),
            paused: self.paused,
            read_p99_ms: self.last.read_p99_us.unwrap_or(0) as f64 / 1000.0,
            read_bps: self.last.read_bps,
            cpu_others_percent: self.last.cpu_others_percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn steer() -> Steer {
        Steer::new(SteerParams::new(50_000, 80, 1 << 30))
    }

    fn reading(p99_ms: u64, mib_s: u64, cpu: u8) -> Reading {
        Reading { read_p99_us: Some(p99_ms * 1000), read_bps: mib_s * MIB, cpu_others_percent: cpu }
    }

    #[test]
    fn slow_reads_cut_the_cap_from_the_rate_read_and_fast_ones_bring_it_back() {
        let mut s = steer();
        s.observe(reading(10, 400, 10));
        assert_eq!((s.node_cap(), s.status().reason), (None, Reason::Uncapped));
        s.observe(reading(200, 400, 10));
        assert_eq!((s.node_cap(), s.status().reason), (Some(300 * MIB), Reason::SlowReads));
        for _ in 0..30 {
            let cap = s.node_cap().unwrap() / MIB;
            s.observe(reading(200, cap, 10));
        }
        assert_eq!(s.node_cap(), Some(MIB), "held at the floor while reads stay slow");
        s.observe(reading(5, 1, 10));
        assert_eq!((s.node_cap(), s.status().reason), (Some(17 * MIB), Reason::Recovering));
        for _ in 0..100 {
            s.observe(reading(5, 1, 10));
        }
        assert_eq!((s.node_cap(), s.status().reason), (None, Reason::Uncapped), "back to the ceiling: no cap");
    }

    #[test]
    fn a_busy_host_cuts_even_with_fast_reads_and_an_idle_look_changes_nothing() {
        let mut s = steer();
        s.observe(reading(1, 100, 95));
        assert_eq!((s.node_cap(), s.status().reason), (Some(75 * MIB), Reason::BusyCpu));
        s.observe(Reading { read_p99_us: None, read_bps: 0, cpu_others_percent: 10 });
        assert_eq!(s.node_cap(), Some(75 * MIB), "nothing read: nothing learned");
        s.observe(Reading { read_p99_us: None, read_bps: 0, cpu_others_percent: 99 });
        assert_eq!(s.node_cap(), Some(75 * MIB * 3 / 4), "nothing read, host busy: cut from the cap");
    }

    #[test]
    fn a_shard_gets_the_least_cap_split_over_the_running_shards() {
        let mut s = steer();
        assert_eq!(s.shard_cap(0, 2), 0, "no cap from anyone");
        assert_eq!(s.shard_cap(300 * MIB, 2), 300 * MIB, "its host's share");
        s.set_control_plane(Some(400 * MIB));
        assert_eq!(s.shard_cap(300 * MIB, 2), 200 * MIB);
        s.set_operator(Some(100 * MIB));
        assert_eq!(s.shard_cap(300 * MIB, 4), 25 * MIB);
        s.set_paused(true);
        assert_eq!(s.shard_cap(300 * MIB, 4), 1);
        s.set_paused(false);
        s.set_operator(Some(0));
        assert_eq!(s.status().operator_bps, 0, "throttle 0 lifts the operator's cap");
        assert_eq!(s.status().cap_bps, 400 * MIB);
    }
}
