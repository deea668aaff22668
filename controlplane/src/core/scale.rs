//! How many nodes the fleet needs: enough to keep up with what the RPOs ask for in the long
//! run (every database read once per half RPO), and to clear the backlog of open jobs within a
//! horizon, whichever is more, at the throughput nodes have shown and a target utilisation.
//! Scaling up follows the need at once (a missed RPO costs more than an idle node); scaling
//! down waits until the need has stayed a margin under the current count for a hold time, so a
//! need that wobbles does not make nodes join and drain in turn.

use super::model::Millis;

/// Scaling down waits for the need to stay under (100 - this)% of the nodes there are...
pub const DOWN_MARGIN_PERCENT: u64 = 20;
/// ...for this long.
pub const DOWN_HOLD: Millis = Millis::from_secs(15 * 60);

/// Why the desired count is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleReason {
    /// The backlog needs more nodes than there are.
    Backlog,
    /// The need has stayed low for the hold time.
    Idle,
    /// Within the margins, or not low for long enough.
    Steady,
}

/// What the fleet must move and what its nodes can, kept as databases, jobs and nodes change,
/// so that a scale decision costs nothing per database.
#[derive(Clone, Debug, Default)]
pub struct Demand {
    /// Bytes per second the RPOs ask for: the sum over databases of [`steady_bps`].
    steady_bps: u128,
    /// Bytes of open jobs not finished yet.
    backlog_bytes: u128,
    /// Bytes per second the nodes have shown, summed, and how many nodes there are.
    fleet_bps: u128,
    nodes: u32,
}

/// What one database asks for in the long run: its size once per half RPO (it is due at half
/// its RPO, so that a failover still meets the deadline).
pub fn steady_bps(size: u64, rpo: Millis) -> u64 {
    (u128::from(size) * 2000 / u128::from(rpo.0.max(1))).min(u128::from(u64::MAX)) as u64
}

impl Demand {
    pub fn add_steady(&mut self, bps: u64) {
        self.steady_bps += u128::from(bps);
    }

    pub fn remove_steady(&mut self, bps: u64) {
        self.steady_bps = self.steady_bps.saturating_sub(u128::from(bps));
    }

    pub fn add_backlog(&mut self, bytes: u64) {
        self.backlog_bytes += u128::from(bytes);
    }

    pub fn remove_backlog(&mut self, bytes: u64) {
        self.backlog_bytes = self.backlog_bytes.saturating_sub(u128::from(bytes));
    }

    pub fn add_node(&mut self, bps: u64) {
        self.fleet_bps += u128::from(bps);
        self.nodes += 1;
    }

    pub fn remove_node(&mut self, bps: u64) {
        self.fleet_bps = self.fleet_bps.saturating_sub(u128::from(bps));
        self.nodes = self.nodes.saturating_sub(1);
    }

    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    pub fn steady(&self) -> u64 {
        self.steady_bps.min(u128::from(u64::MAX)) as u64
    }

    pub fn backlog(&self) -> u64 {
        self.backlog_bytes.min(u128::from(u64::MAX)) as u64
    }

    /// Nodes needed to move the larger of the steady rate and the backlog within `horizon`,
    /// at `utilisation_percent` of the mean node's rate (`default_node_bps` with no nodes).
    pub fn needed(&self, horizon: Millis, utilisation_percent: u64, default_node_bps: u64) -> u32 {
        let backlog_bps = self.backlog_bytes * 1000 / u128::from(horizon.0.max(1));
        let want_bps = self.steady_bps.max(backlog_bps) * 100 / u128::from(utilisation_percent.clamp(1, 100));
        let node_bps =
            if self.nodes == 0 { u128::from(default_node_bps) } else { self.fleet_bps / u128::from(self.nodes) };
        want_bps.div_ceil(node_bps.max(1)).clamp(1, u128::from(u32::MAX)) as u32
    }
}

/// The scale decision with its memory: since when the need has been low.
#[derive(Default)]
pub struct Scaler {
    low_since: Option<Millis>,
}

impl Scaler {
    /// The desired node count at `now`, given the need and the nodes there are.
    pub fn decide(&mut self, now: Millis, needed: u32, current: u32) -> (u32, ScaleReason) {
        if needed > current {
            self.low_since = None;
            return (needed, ScaleReason::Backlog);
        }
        let low = u64::from(needed) * 100 < u64::from(current) * (100 - DOWN_MARGIN_PERCENT);
        if !low {
            self.low_since = None;
            return (current, ScaleReason::Steady);
        }
        // Low for the whole hold: the need is the count from now on, for as long as it stays
        // low (the hold is not served again while the fleet drains to it).
        let since = *self.low_since.get_or_insert(now);
        if now.since(since) >= DOWN_HOLD {
            return (needed, ScaleReason::Idle);
        }
        (current, ScaleReason::Steady)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_need_is_the_larger_of_the_steady_rate_and_the_backlog_over_the_horizon() {
        let hour = Millis::from_secs(3600);
        let mut d = Demand::default();
        assert_eq!(d.needed(hour, 80, GIB), 1, "an empty fleet needs one node");
        // 100 databases of 1.8 TiB with a 4 h RPO: each read every 2 h, 256 MiB/s each.
        for _ in 0..100 {
            d.add_steady(steady_bps(1843 * GIB, Millis::from_secs(4 * 3600)));
        }
        assert_eq!(d.steady() >> 20, 26_211);
        for _ in 0..10 {
            d.add_node(2 * GIB);
        }
        // 100 × 262 MiB/s at 80% of 2 GiB/s per node: 16 nodes.
        assert_eq!(d.needed(hour, 80, GIB), 16);
        // A burst: 72 TiB of open jobs to clear within the hour is 20.5 GiB/s, at 80%: 13 nodes,
        // fewer than the steady need; 144 TiB is 26.
        d.add_backlog(72 * 1024 * GIB);
        assert_eq!(d.needed(hour, 80, GIB), 16);
        d.add_backlog(72 * 1024 * GIB);
        assert_eq!(d.needed(hour, 80, GIB), 26);
        d.remove_backlog(u64::MAX);
        d.remove_node(2 * GIB);
        assert_eq!((d.backlog(), d.nodes()), (0, 9));
    }

    #[test]
    fn up_at_once_down_only_after_the_hold_and_a_wobble_moves_nothing() {
        let mut s = Scaler::default();
        assert_eq!(s.decide(Millis(0), 12, 10), (12, ScaleReason::Backlog));
        // A need wobbling within the margin: nothing moves.
        for (i, need) in [11, 10, 12, 10, 11].iter().enumerate() {
            let (want, _) = s.decide(Millis::from_secs(60 * i as u64), *need, 12);
            assert!(want >= 12, "need {need} took the count to {want}");
        }
        // Low, but not for long enough; then low again for the whole hold.
        let start = Millis::from_secs(1000);
        assert_eq!(s.decide(start, 5, 12), (12, ScaleReason::Steady));
        assert_eq!(
            s.decide(start.after(Millis::from_secs(60)), 11, 12),
            (12, ScaleReason::Steady),
            "back up: the hold restarts"
        );
        let again = start.after(Millis::from_secs(120));
        assert_eq!(s.decide(again, 5, 12), (12, ScaleReason::Steady));
        assert_eq!(s.decide(again.after(Millis(DOWN_HOLD.0 - 1)), 5, 12), (12, ScaleReason::Steady));
        assert_eq!(s.decide(again.after(DOWN_HOLD), 5, 12), (5, ScaleReason::Idle));
        // Still low while the nodes drain: the count stays at the need, without a new hold.
        let draining = again.after(DOWN_HOLD).after(Millis::from_secs(60));
        assert_eq!(s.decide(draining, 6, 12), (6, ScaleReason::Idle));
        assert_eq!(s.decide(draining.after(Millis::from_secs(60)), 6, 7), (7, ScaleReason::Steady));
    }
}
