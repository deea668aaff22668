//! Where a backup (one job, or one shard of a plan) runs: on a node with room for it in every
//! resource, preferring the one that has moved data fastest, and only while its source host
//! stays under its caps (how many backups read from it at once, and how many bytes per second
//! they read together), so a production database host is never overloaded by its backups.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::model::NodeName;

/// Resources, as capacities, uses or needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Resources {
    pub cores: u32,
    pub memory_bytes: u64,
    pub network_bps: u64,
    pub disk_bps: u64,
}

impl Resources {
    /// Whether `need` fits in `self` in every resource.
    pub fn fits(&self, need: &Resources) -> bool {
        need.cores <= self.cores
            && need.memory_bytes <= self.memory_bytes
            && need.network_bps <= self.network_bps
            && need.disk_bps <= self.disk_bps
    }
}

/// A node as placement sees it: what is free on it now (its capacity, less what it reports in
/// use and what its assignments reserve) and the throughput it has shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom {
    pub node: NodeName,
    pub free: Resources,
    pub throughput_bps: u64,
}

/// A source host's caps and what its running backups take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBudget {
    pub max_running: u32,
    pub max_read_bps: u64,
    pub running: u32,
    pub read_bps: u64,
}

/// The least read rate worth starting a backup at: below it, the host's budget is spent.
pub const MIN_READ_BPS: u64 = 8 << 20;

/// A placement: the node, and the read rate the backup is capped at on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub node: NodeName,
    pub read_cap_bps: u64,
}

/// Why a backup waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Its source host runs as many backups as it may, or reads as fast as it may.
    HostAtCap,
    /// No node has room for it now.
    NoRoom,
}

impl HostBudget {
    /// What is left of the host's read budget, or `None` when it may start no more backups:
    /// a backup starts only with at least a fair share of the budget (the budget over the
    /// backups the host may run), so that the last of a host's budget does not start a backup
    /// that would crawl for hours at a trickle while a full share frees up in minutes.
    pub fn left(&self) -> Option<u64> {
        let left = self.max_read_bps.saturating_sub(self.read_bps);
        (self.running < self.max_running && left >= self.fair_share()).then_some(left)
    }

    /// The budget over the backups the host may run (at least [`MIN_READ_BPS`]).
    pub fn fair_share(&self) -> u64 {
        (self.max_read_bps / u64::from(self.max_running.max(1))).max(MIN_READ_BPS)
    }
}

/// Where a node stands in placement's preference: fastest first; then the most cores free;
/// then by name, so every run decides alike.
type Preference = (Reverse<u64>, Reverse<u32>, NodeName);

/// The nodes placement may choose from, kept in the order it prefers them, so that a placement
/// costs a lookup, not a walk over the fleet.
#[derive(Default)]
pub struct RoomIndex {
    by_preference: BTreeSet<Preference>,
    rooms: FxHashMap<NodeName, NodeRoom>,
}

impl RoomIndex {
    /// Adds `room`'s node, or updates what is free on it.
    pub fn set(&mut self, room: NodeRoom) {
        self.remove(&room.node);
        self.by_preference.insert(preference(&room));
        self.rooms.insert(room.node.clone(), room);
    }

    pub fn remove(&mut self, node: &NodeName) {
        if let Some(old) = self.rooms.remove(node) {
            self.by_preference.remove(&preference(&old));
        }
    }

    /// The most preferred node with room for `need` in every resource.
    pub fn best(&self, need: &Resources) -> Option<&NodeRoom> {
        self.by_preference.iter().map(|(_, _, node)| &self.rooms[node]).find(|room| room.free.fits(need))
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

fn preference(room: &NodeRoom) -> Preference {
    (Reverse(room.throughput_bps), Reverse(room.free.cores), room.node.clone())
}

/// Places one backup that needs `need`, reading from a host with `host`'s budget.
pub fn place(need: &Resources, nodes: &RoomIndex, host: &HostBudget) -> Result<Placed, Wait> {
    let host_left = host.left().ok_or(Wait::HostAtCap)?;
    let best = nodes.best(need).ok_or(Wait::NoRoom)?;
    // At least a fair share whatever the node has shown: agents enforce the cap, and a node's
    // throughput is measured under it, so a cap of the throughput alone could only shrink (a
    // node that once ran a tiny backup slowly would read at that rate from then on).
    let read_cap_bps = host_left.min(best.throughput_bps.max(host.fair_share()));
    Ok(Placed { node: best.node.clone(), read_cap_bps })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEED: Resources = Resources { cores: 2, memory_bytes: 1 << 30, network_bps: 100 << 20, disk_bps: 100 << 20 };
    const ROOM: Resources = Resources { cores: 8, memory_bytes: 16 << 30, network_bps: 1 << 30, disk_bps: 1 << 30 };
    const HOST: HostBudget = HostBudget { max_running: 2, max_read_bps: 400 << 20, running: 0, read_bps: 0 };

    fn node(name: &str, free: Resources, throughput_bps: u64) -> NodeRoom {
        NodeRoom { node: NodeName(name.into()), free, throughput_bps }
    }

    fn index(nodes: &[NodeRoom]) -> RoomIndex {
        let mut index = RoomIndex::default();
        for n in nodes {
            index.set(n.clone());
        }
        index
    }

    #[test]
    fn the_fastest_node_with_room_in_every_resource_wins() {
        let nodes = [
            node("slow", ROOM, 100 << 20),
            node("fast-but-full", Resources { memory_bytes: 1 << 20, ..ROOM }, 900 << 20),
            node("fast", ROOM, 600 << 20),
        ];
        let placed = place(&NEED, &index(&nodes), &HOST).unwrap();
        assert_eq!(placed.node, NodeName("fast".into()));
        // Capped by the host's budget (400 MiB/s), not the node's 600.
        assert_eq!(placed.read_cap_bps, 400 << 20);
        // A node that has shown a trickle still gets a fair share (200 of 400 MiB/s over two
        // backups): its throughput was measured under an earlier cap.
        let trickle = place(&NEED, &index(&[node("trickle", ROOM, 1 << 20)]), &HOST).unwrap();
        assert_eq!(trickle.read_cap_bps, 200 << 20);
        assert_eq!(place(&NEED, &index(&nodes[1..2]), &HOST), Err(Wait::NoRoom));
    }

    #[test]
    fn a_host_at_its_caps_gets_no_more_backups() {
        let nodes = index(&[node("n", ROOM, 600 << 20)]);
        let busy = HostBudget { running: 2, ..HOST };
        assert_eq!(place(&NEED, &nodes, &busy), Err(Wait::HostAtCap));
        let reading = HostBudget { running: 1, read_bps: (400 << 20) - (1 << 20), ..HOST };
        assert_eq!(place(&NEED, &nodes, &reading), Err(Wait::HostAtCap));
        let fair_share_left = HostBudget { running: 1, read_bps: 200 << 20, ..HOST };
        assert_eq!(place(&NEED, &nodes, &fair_share_left).unwrap().read_cap_bps, 200 << 20);
        let a_trickle_left = HostBudget { running: 1, read_bps: 300 << 20, ..HOST };
        assert_eq!(place(&NEED, &nodes, &a_trickle_left), Err(Wait::HostAtCap), "less than a fair share left");
    }

    #[test]
    fn ties_are_broken_the_same_way_every_time() {
        let nodes = [node("b", ROOM, 500), node("a", ROOM, 500), node("c", ROOM, 500)];
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(place(&NEED, &index(&nodes), &HOST).unwrap().node, NodeName("a".into()));
        assert_eq!(place(&NEED, &index(&reversed), &HOST).unwrap().node, NodeName("a".into()));
    }

    #[test]
    fn an_updated_node_moves_in_the_preference_and_a_removed_one_is_never_chosen() {
        let mut nodes = index(&[node("a", ROOM, 500), node("b", ROOM, 400)]);
        assert_eq!(nodes.best(&NEED).unwrap().node, NodeName("a".into()));
        nodes.set(node("a", ROOM, 300));
        assert_eq!(nodes.best(&NEED).unwrap().node, NodeName("b".into()));
        nodes.set(node("b", Resources { cores: 1, ..ROOM }, 400));
        assert_eq!(nodes.best(&NEED).unwrap().node, NodeName("a".into()), "b has no core left for it");
        nodes.remove(&NodeName("a".into()));
        assert_eq!(nodes.best(&NEED), None);
        assert_eq!(nodes.len(), 1);
    }
}
