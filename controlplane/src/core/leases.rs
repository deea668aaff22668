//! Leases on shards, with fencing tokens. A node runs a shard only while it holds the shard's
//! lease; the lease lasts `ttl` past its grant or last renewal, and a node that stops renewing
//! loses it then. Every grant of a shard gets a token higher than any the shard had before, so a
//! late report (progress, finish, commit) from a node that lost its lease carries an older token
//! than the one seen last and is refused, and counted. Expiry is incremental: leases are indexed
//! by when they end, so a tick costs what expires, not what is held.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::model::{Millis, NodeName};

/// A shard of a planned backup: the job (one backup of one database) and its index in the plan.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    pub job: u64,
    pub shard: u32,
}

/// A held lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub node: NodeName,
    pub token: u64,
    pub expires: Millis,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("shard {}/{} is leased to {holder} until {until}", key.job, key.shard)]
    Held { key: ShardKey, holder: NodeName, until: Millis },
    #[error("shard {}/{}: token {got} is stale (the newest is {newest}); the report is refused", key.job, key.shard)]
    Stale { key: ShardKey, got: u64, newest: u64 },
    #[error("shard {}/{}: {node} holds no lease on it (expired or never granted)", key.job, key.shard)]
    NotHeld { key: ShardKey, node: NodeName },
}

#[derive(Default)]
pub struct Leases {
    held: FxHashMap<ShardKey, Lease>,
    /// The highest token each shard was ever granted; kept after its lease ends, so that a
    /// report with an older token is refused for as long as the shard exists.
    newest: FxHashMap<ShardKey, u64>,
    /// Held leases by when they end.
    by_expiry: BTreeSet<(Millis, ShardKey)>,
    /// Reports refused for a stale token.
    stale_refused: u64,
}

impl Leases {
    /// Grants `key` to `node` until `now + ttl`, with a new token; refused while another lease on
    /// it is held (an expired one is released first by [`Self::expire`]).
    pub fn grant(&mut self, key: ShardKey, node: NodeName, now: Millis, ttl: Millis) -> Result<Lease, LeaseError> {
        if let Some(lease) = self.held.get(&key) {
            return Err(LeaseError::Held { key, holder: lease.node.clone(), until: lease.expires });
        }
        let token = self.newest.get(&key).map_or(1, |t| t + 1);
        self.newest.insert(key.clone(), token);
        let lease = Lease { node, token, expires: now.after(ttl) };
        self.by_expiry.insert((lease.expires, key.clone()));
        self.held.insert(key, lease.clone());
        Ok(lease)
    }

    /// Checks a report about `key` carrying `token` from `node`: accepted only from the holder of
    /// the newest grant. A stale token is counted.
    pub fn check(&mut self, key: &ShardKey, node: &NodeName, token: u64) -> Result<(), LeaseError> {
        let newest = self.newest.get(key).copied().unwrap_or(0);
        if token < newest {
            self.stale_refused += 1;
            return Err(LeaseError::Stale { key: key.clone(), got: token, newest });
        }
        match self.held.get(key) {
            Some(lease) if lease.node == *node && lease.token == token => Ok(()),
            _ => Err(LeaseError::NotHeld { key: key.clone(), node: node.clone() }),
        }
    }

    /// Extends the holder's lease to `now + ttl`.
    pub fn renew(
        &mut self,
        key: &ShardKey,
        node: &NodeName,
        token: u64,
        now: Millis,
        ttl: Millis,
    ) -> Result<Millis, LeaseError> {
        self.check(key, node, token)?;
        let lease = self.held.get_mut(key).expect("checked above");
        self.by_expiry.remove(&(lease.expires, key.clone()));
        lease.expires = now.after(ttl);
        self.by_expiry.insert((lease.expires, key.clone()));
        Ok(lease.expires)
    }

    /// Ends the holder's lease (its shard finished, or it handed the shard back).
    pub fn release(&mut self, key: &ShardKey, node: &NodeName, token: u64) -> Result<(), LeaseError> {
        self.check(key, node, token)?;
        let lease = self.held.remove(key).expect("checked above");
        self.by_expiry.remove(&(lease.expires, key.clone()));
        Ok(())
    }

    /// Ends every lease whose time is up at `now`; returns them, for reassignment.
    pub fn expire(&mut self, now: Millis) -> Vec<(ShardKey, Lease)> {
        let mut out = vec![];
        while let Some((until, _)) = self.by_expiry.first() {
            if *until > now {
                break;
            }
            let (_, key) = self.by_expiry.pop_first().expect("first exists");
            let lease = self.held.remove(&key).expect("indexed leases are held");
            out.push((key, lease));
        }
        out
    }

    /// Ends `key`'s lease whoever holds it (its node left); its token stays the newest, so the
    /// node's late reports are refused.
    pub fn revoke(&mut self, key: &ShardKey) -> Option<Lease> {
        let lease = self.held.remove(key)?;
        self.by_expiry.remove(&(lease.expires, key.clone()));
        Some(lease)
    }

    /// Forgets a shard whose snapshot is committed or abandoned: no report about it is
    /// accepted after.
    pub fn forget(&mut self, key: &ShardKey) {
        if let Some(lease) = self.held.remove(key) {
            self.by_expiry.remove(&(lease.expires, key.clone()));
        }
        self.newest.remove(key);
    }

    pub fn holder(&self, key: &ShardKey) -> Option<&Lease> {
        self.held.get(key)
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn stale_refused(&self) -> u64 {
        self.stale_refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: Millis = Millis::from_secs(10);

    fn key(shard: u32) -> ShardKey {
        ShardKey { job: 7, shard }
    }

    fn node(n: &str) -> NodeName {
        NodeName(n.into())
    }

    #[test]
    fn a_node_that_stops_renewing_loses_its_lease_and_its_late_reports_are_refused() {
        let mut l = Leases::default();
        let first = l.grant(key(0), node("a"), Millis(0), TTL).unwrap();
        assert!(matches!(l.grant(key(0), node("b"), Millis(1), TTL), Err(LeaseError::Held { .. })));
        l.renew(&key(0), &node("a"), first.token, Millis(5_000), TTL).unwrap();
        assert!(l.expire(Millis(14_999)).is_empty(), "renewed to 15 s");
        let gone = l.expire(Millis(15_000));
        assert_eq!(gone.len(), 1);
        let second = l.grant(key(0), node("b"), Millis(15_000), TTL).unwrap();
        assert!(second.token > first.token);
        // a, back from a partition, reports with its old token.
        assert_eq!(
            l.check(&key(0), &node("a"), first.token),
            Err(LeaseError::Stale { key: key(0), got: first.token, newest: second.token })
        );
        assert!(l.renew(&key(0), &node("a"), first.token, Millis(15_001), TTL).is_err());
        assert_eq!(l.stale_refused(), 2);
        l.check(&key(0), &node("b"), second.token).unwrap();
        // A node with the newest token but no lease (released) is refused too.
        l.release(&key(0), &node("b"), second.token).unwrap();
        assert!(matches!(l.check(&key(0), &node("b"), second.token), Err(LeaseError::NotHeld { .. })));
    }

    #[test]
    fn a_token_from_another_node_is_not_the_holders() {
        let mut l = Leases::default();
        let lease = l.grant(key(1), node("a"), Millis(0), TTL).unwrap();
        assert!(matches!(l.check(&key(1), &node("b"), lease.token), Err(LeaseError::NotHeld { .. })));
        assert!(matches!(l.check(&key(1), &node("a"), lease.token + 1), Err(LeaseError::NotHeld { .. })));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant(u32, u8),
        Renew(u32, u8),
        Release(u32, u8),
        Tick(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4u32, 0..3u8).prop_map(|(s, n)| Op::Grant(s, n)),
            (0..4u32, 0..3u8).prop_map(|(s, n)| Op::Renew(s, n)),
            (0..4u32, 0..3u8).prop_map(|(s, n)| Op::Release(s, n)),
            (0..20_000u16).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever happens: at most one holder per shard, tokens of a shard only grow, no lease
        /// outlives its expiry past a tick, and the expiry index matches what is held.
        #[test]
        fn leases_never_overlap_and_tokens_only_grow(ops in proptest::collection::vec(op(), 1..200)) {
            let mut l = Leases::default();
            let mut now = Millis(0);
            let mut tokens: FxHashMap<ShardKey, u64> = FxHashMap::default();
            let mut last_token: FxHashMap<ShardKey, u64> = FxHashMap::default();
            for op in ops {
                match op {
                    Op::Grant(s, n) => {
                        if let Ok(lease) = l.grant(key(s), node(&n.to_string()), now, TTL) {
                            prop_assert!(lease.token > last_token.get(&key(s)).copied().unwrap_or(0));
                            last_token.insert(key(s), lease.token);
                            tokens.insert(key(s), lease.token);
                        }
                    }
                    Op::Renew(s, n) => {
                        let t = tokens.get(&key(s)).copied().unwrap_or(0);
                        let _ = l.renew(&key(s), &node(&n.to_string()), t, now, TTL);
                    }
                    Op::Release(s, n) => {
                        let t = tokens.get(&key(s)).copied().unwrap_or(0);
                        let _ = l.release(&key(s), &node(&n.to_string()), t);
                    }
                    Op::Tick(d) => {
                        now = now.after(Millis(u64::from(d)));
                        l.expire(now);
                    }
                }
                prop_assert_eq!(l.by_expiry.len(), l.held.len());
                for (k, lease) in &l.held {
                    prop_assert!(l.by_expiry.contains(&(lease.expires, k.clone())));
                    prop_assert_eq!(Some(&lease.token), l.newest.get(k));
                }
            }
            l.expire(now);
            for lease in l.held.values() {
                prop_assert!(lease.expires > now, "a lease due at {} outlived {now}", lease.expires);
            }
        }
    }
}
