//! How a database's next backup is cut: one job below a size threshold, else shards that run on
//! several nodes at once and combine into one snapshot. The count comes from the size, the time
//! left before the RPO deadline and the throughput one node has shown; the data plane then cuts
//! the source into that many shards of about equal bytes (segment ranges and groups of small
//! files) and records what combining them needs.

use super::model::Millis;

/// Below this many bytes a backup is one job, unless its deadline needs more nodes.
pub const SINGLE_JOB_BYTES: u64 = 256 << 30;
/// A shard covers at least this many bytes (a few segments): smaller ones cost more in
/// checkpoints and leases than they save.
pub const MIN_SHARD_BYTES: u64 = 16 << 30;
/// Most shards one backup is cut into.
pub const MAX_SHARDS: u32 = 1024;
/// The share of the time left a plan aims to use, so a slow node or a failover still meets the
/// deadline.
pub const DEADLINE_SHARE_PERCENT: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Job,
    Shards(u32),
}

impl Plan {
    pub fn shards(self) -> u32 {
        match self {
            Plan::Job => 1,
            Plan::Shards(n) => n,
        }
    }
}

/// The plan for `size` bytes due within `time_left`, with nodes that have read and stored about
/// `node_bps` bytes per second each (the fleet's median for a new database). A deadline that no
/// count of shards meets gets the most shards (the scheduler reports the RPO miss).
pub fn plan(size: u64, time_left: Millis, node_bps: u64) -> Plan {
    let budget_ms = (time_left.0.saturating_mul(DEADLINE_SHARE_PERCENT) / 100).max(1);
    // Bytes one node moves within the budget; at least one byte so the division stands.
    let per_node = (u128::from(node_bps.max(1)) * u128::from(budget_ms) / 1000).max(1);
    let for_deadline = u128::from(size).div_ceil(per_node);
    let most_by_size = size.div_ceil(MIN_SHARD_BYTES).max(1);
    let by_size = if size < SINGLE_JOB_BYTES { 1 } else { most_by_size };
    let want = for_deadline.max(u128::from(by_size)).min(u128::from(most_by_size)).min(u128::from(MAX_SHARDS));
    match want as u32 {
        0 | 1 => Plan::Job,
        n => Plan::Shards(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const HOUR: Millis = Millis::from_secs(3600);

    #[test]
    fn a_small_database_is_one_job() {
        assert_eq!(plan(10 * GIB, HOUR, 500 << 20), Plan::Job);
    }

    #[test]
    fn a_large_one_gets_shards_of_at_least_the_minimum_size() {
        // 1 TiB with a day to go: cut by size alone, 64 shards of 16 GiB.
        assert_eq!(plan(1024 * GIB, Millis(HOUR.0 * 24), 500 << 20), Plan::Shards(64));
        let tiny_shards = plan(300 * GIB, Millis(HOUR.0 * 24), 500 << 20);
        assert_eq!(tiny_shards, Plan::Shards(19), "300 GiB / 16 GiB, rounded up");
    }

    #[test]
    fn a_tight_deadline_cuts_a_smaller_database_too() {
        // 100 GiB at 500 MiB/s is ~205 s on one node; with 60 s left, half of it budgeted:
        // ceil(100 GiB / (500 MiB/s x 30 s)) = 7 shards, within the 7 of 16 GiB the size allows.
        assert_eq!(plan(100 * GIB, Millis::from_secs(60), 500 << 20), Plan::Shards(7));
    }

    #[test]
    fn no_deadline_or_throughput_makes_more_shards_than_the_bounds_allow() {
        assert_eq!(plan(100 * GIB, Millis(0), 0), Plan::Shards(7));
        assert_eq!(plan(1 << 60, Millis(0), 0), Plan::Shards(MAX_SHARDS));
        assert_eq!(plan(1, Millis(0), 0), Plan::Job);
        assert_eq!(plan(0, HOUR, 1), Plan::Job);
    }
}
