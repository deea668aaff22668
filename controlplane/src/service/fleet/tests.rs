use super::*;
use crate::core::Priority;

fn entry(name: &str, priority: Priority) -> DbEntry {
    DbEntry {
        name: name.into(),
        source: format!("synth://pg?size=1MiB&seed={}", name.len()),
        host: format!("host-{name}"),
        priority,
        rpo: Millis::from_secs(3600),
        window: None,
        size_hint: Some(1 << 20),
        repo: None,
    }
}

fn node(name: &str) -> Register {
    let gib = 1u64 << 30;
    Register {
        node: name.into(),
        capacity: Capacity { cores: 2, memory_bytes: 4 * gib, network_bps: gib, disk_bps: gib },
    }
}

fn beat(fleet: &mut Fleet, now: u64, name: &str, leases: Vec<LeaseRef>) -> Vec<Order> {
    let h = Heartbeat { node: name.into(), report: ResourceReport::default(), leases };
    fleet.heartbeat(Millis(now), &h).unwrap()
}

fn runs(orders: &[Order]) -> Vec<Assignment> {
    orders.iter().filter_map(|o| if let Order::Run(a) = o { Some(a.clone()) } else { None }).collect()
}

fn commits(orders: &[Order]) -> Vec<Order> {
    orders.iter().filter(|o| matches!(o, Order::Commit { .. })).cloned().collect()
}

#[test]
fn an_assignment_carries_source_repo_and_job_and_the_last_finish_is_told_to_commit() {
    let dbs = vec![entry("low", Priority::Low), entry("critical", Priority::Critical)];
    let mut fleet = Fleet::new(Config::default(), dbs, Some("/repo".into()), 7, Millis(0)).unwrap();
    fleet.register(Millis(1), &node("a")).unwrap();
    fleet.tick(Millis(2)).unwrap();
    let run = runs(&beat(&mut fleet, 3, "a", vec![]));
    assert_eq!(run.len(), 1, "one slot on a 2-core node: {run:?}");
    let a = &run[0];
    assert_eq!((a.db.as_str(), a.repo.as_str(), a.shards), ("critical", "/repo", 1), "critical first");
    assert_eq!(a.data_job, format!("{:016x}{:016x}", 7, a.lease.job));
    assert!(a.source.starts_with("synth://"));
    assert_eq!(fleet.status().running_shards, 1);

    let done = ShardReport { node: "a".into(), lease: a.lease, outcome: ShardOutcome::Finished { bytes: 1 << 20 } };
    let orders = fleet.shard_report(Millis(4), &done).unwrap();
    assert_eq!(orders, vec![Order::Commit { lease: a.lease, data_job: a.data_job.clone(), repo: "/repo".into() }]);
    // The answer may be lost: the commit is ordered again with every heartbeat until reported,
    // to another node once this one is silent for a lease TTL; counted once. The slot is free
    // again meanwhile: the low-priority database comes next.
    let first = beat(&mut fleet, 5, "a", vec![]);
    assert_eq!(commits(&first), orders);
    assert_eq!(runs(&first).iter().map(|a| a.db.as_str()).collect::<Vec<_>>(), vec!["low"]);
    fleet.register(Millis(5), &node("b")).unwrap();
    assert!(commits(&beat(&mut fleet, 6, "b", vec![])).is_empty(), "a is not silent");
    let ttl = fleet.lease_ttl().0;
    assert_eq!(commits(&beat(&mut fleet, 7 + ttl, "b", vec![])), orders, "a is silent: b commits");
    assert!(commits(&beat(&mut fleet, 8 + ttl, "a", vec![])).is_empty(), "b has it now");
    let committed = ShardReport { outcome: ShardOutcome::Committed { snapshot: "ab".into() }, ..done.clone() };
    assert!(fleet.shard_report(Millis(9 + ttl), &committed).unwrap().is_empty());
    let twice = ShardReport { node: "b".into(), ..committed.clone() };
    assert!(fleet.shard_report(Millis(9 + ttl), &twice).unwrap().is_empty());
    assert_eq!(fleet.status().committed, 1);
    assert!(commits(&beat(&mut fleet, 10 + ttl, "b", vec![])).is_empty(), "reported: not ordered again");
}

#[test]
fn a_node_that_stops_renewing_loses_its_shard_and_its_late_finish_is_refused() {
    let mut fleet =
        Fleet::new(Config::default(), vec![entry("db", Priority::Normal)], Some("/r".into()), 1, Millis(0)).unwrap();
    fleet.register(Millis(0), &node("a")).unwrap();
    fleet.tick(Millis(1)).unwrap();
    let a = runs(&beat(&mut fleet, 2, "a", vec![])).remove(0);
    fleet.register(Millis(3), &node("b")).unwrap();
    // Past the TTL with no renewal, and silent long enough that placement skips it: the lease
    // ends, and `b` (heard from) takes the shard.
    let late = Config::default().node_silent_after.0 + 10;
    beat(&mut fleet, late - 5, "b", vec![]);
    fleet.tick(Millis(late)).unwrap();
    let b = runs(&beat(&mut fleet, late + 1, "b", vec![])).remove(0);
    assert_eq!((b.lease.job, b.lease.shard), (a.lease.job, a.lease.shard));
    assert!(b.lease.token > a.lease.token, "a new grant gets a higher token");
    let orders = beat(&mut fleet, late + 2, "a", vec![a.lease]);
    assert!(orders.contains(&Order::Stop { lease: a.lease }), "{orders:?}");
    let stale = ShardReport { node: "a".into(), lease: a.lease, outcome: ShardOutcome::Finished { bytes: 1 } };
    assert!(matches!(fleet.shard_report(Millis(late + 3), &stale), Err(FleetError::Core(CoreError::Lease(_)))));
    assert!(fleet.status().stale_refused >= 1);
    assert!(fleet.status().failovers >= 1);
}

#[test]
fn a_database_without_a_repository_and_an_unknown_node_are_refused() {
    let e = Fleet::new(Config::default(), vec![entry("x", Priority::Low)], None, 1, Millis(0)).err().unwrap();
    assert!(e.to_string().contains("\"x\" has no repository"), "{e}");
    let mut fleet = Fleet::new(Config::default(), vec![], None, 1, Millis(0)).unwrap();
    let h = Heartbeat { node: "ghost".into(), report: ResourceReport::default(), leases: vec![] };
    assert!(matches!(fleet.heartbeat(Millis(1), &h), Err(FleetError::UnknownNode(_))));
}
