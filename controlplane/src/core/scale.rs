//! How many nodes the fleet needs: enough that the bytes waiting and running finish before the
//! deadlines ahead, at the throughput nodes have shown. Scaling up follows the need at once (a
//! missed RPO costs more than an idle node); scaling down waits until the need has stayed a
//! margin under the current count for a hold time, so a need that wobbles does not make nodes
//! join and drain in turn.

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

/// Nodes that would move `backlog_bytes` within `horizon` at `node_bps` each (at least one).
pub fn nodes_needed(backlog_bytes: u64, horizon: Millis, node_bps: u64) -> u32 {
    let per_node = u128::from(node_bps.max(1)) * u128::from(horizon.0.max(1)) / 1000;
    u128::from(backlog_bytes).div_ceil(per_node.max(1)).clamp(1, u128::from(u32::MAX)) as u32
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
        let since = *self.low_since.get_or_insert(now);
        if now.since(since) >= DOWN_HOLD {
            self.low_since = None;
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
    fn nodes_needed_from_backlog_horizon_and_throughput() {
        // 3.6 TiB within an hour at 1 GiB/s per node: 1.02 nodes' worth, so 2.
        assert_eq!(nodes_needed(3686 * GIB, Millis::from_secs(3600), GIB), 2);
        assert_eq!(nodes_needed(0, Millis(0), 0), 1);
        assert_eq!(nodes_needed(u64::MAX, Millis(0), 0), u32::MAX);
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
    }
}
