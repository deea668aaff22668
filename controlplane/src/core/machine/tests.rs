use super::*;

const GIB: u64 = 1 << 30;
const NODE: NodeCapacity = NodeCapacity { cores: 4, memory_bytes: 16 << 30, network_bps: 1 << 30, disk_bps: 1 << 30 };

fn db(name: &str, host: &str, priority: Priority, size: u64) -> DbSpec {
    DbSpec {
        name: DbName(name.into()),
        source_host: HostName(host.into()),
        size_estimate: size,
        priority,
        rpo: Millis::from_secs(3600),
        window: None,
    }
}

fn node(n: &str) -> NodeName {
    NodeName(n.into())
}

fn assigns(d: &[Decision]) -> Vec<(String, ShardKey, NodeName, u64, u64)> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Assign { db, key, node, token, resume_from, .. } => {
                Some((db.0.to_string(), key.clone(), node.clone(), *token, *resume_from))
            }
            _ => None,
        })
        .collect()
}

fn beat(n: &str) -> Event {
    Event::Heartbeat { node: node(n), report: NodeReport::default() }
}

/// The databases assigned, in the order of the decisions.
fn assigned_dbs(d: &[Decision]) -> Vec<String> {
    assigns(d).into_iter().map(|a| a.0).collect()
}

#[test]
fn a_database_is_backed_up_committed_and_due_again_at_half_its_rpo() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("n1"), capacity: NODE }).unwrap();
    let out = core.handle(Millis(1), Event::DbRegistered(db("a", "h1", Priority::Normal, 10 * GIB))).unwrap();
    let a = assigns(&out);
    assert_eq!(a.len(), 1, "{out:?}");
    let (_, key, n, token, from) = a[0].clone();
    assert_eq!((n.clone(), from), (node("n1"), 0));
    core.handle(
        Millis(2),
        Event::Progress { key: key.clone(), node: n.clone(), token, segments_done: 5, source: None },
    )
    .unwrap();
    let out = core.handle(Millis(3), Event::ShardFinished { key, node: n, token, bytes: 10 * GIB }).unwrap();
    assert_eq!(out, vec![Decision::Commit { job: 0, db: DbName("a".into()), bytes: 10 * GIB }]);
    // Heard from lately, so placeable.
    core.handle(Millis(1_800_000), beat("n1")).unwrap();
    assert!(assigns(&core.handle(Millis(1_800_002), Event::Tick).unwrap()).is_empty(), "not due yet");
    let again = core.handle(Millis(1_800_003), Event::Tick).unwrap();
    assert_eq!(assigns(&again).len(), 1, "due at half the RPO after its snapshot");
}

#[test]
fn a_node_that_stops_renewing_loses_its_shards_which_resume_elsewhere_from_their_checkpoint() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("a"), capacity: NODE }).unwrap();
    let out = core.handle(Millis(0), Event::DbRegistered(db("big", "h", Priority::High, 10 * GIB))).unwrap();
    let (_, key, holder, token, _) = assigns(&out)[0].clone();
    core.handle(
        Millis(1000),
        Event::Progress { key: key.clone(), node: holder.clone(), token, segments_done: 7, source: None },
    )
    .unwrap();
    core.handle(Millis(2000), Event::NodeJoined { node: node("b"), capacity: NODE }).unwrap();
    // a goes silent; its lease ends 10 s after its grant.
    let before_expiry = core.handle(Millis(9_999), Event::Tick).unwrap();
    assert!(before_expiry.iter().all(|d| matches!(d, Decision::DesiredNodes { .. })), "{before_expiry:?}");
    let out = core.handle(Millis(10_000), Event::Tick).unwrap();
    assert!(out.contains(&Decision::Revoke { key: key.clone(), node: node("a"), token }), "{out:?}");
    let again = assigns(&out);
    assert_eq!(again.len(), 1, "{out:?}");
    let (_, key2, holder2, token2, from) = again[0].clone();
    assert_eq!(key2, key);
    assert!(token2 > token);
    assert_eq!(from, 7, "resumes from its last checkpoint");
    // Placed on b or on a again (a still heartbeats nothing): either way, a's old token is dead.
    let late = core.handle(Millis(10_001), Event::ShardFinished { key: key.clone(), node: holder, token, bytes: 1 });
    assert!(matches!(late, Err(CoreError::Lease(LeaseError::Stale { .. }))), "{late:?}");
    assert_eq!(core.leases().stale_refused(), 1);
    let done = core
        .handle(Millis(10_002), Event::ShardFinished { key, node: holder2, token: token2, bytes: 10 * GIB })
        .unwrap();
    assert!(matches!(done.as_slice(), [Decision::Commit { .. }]), "{done:?}");
}

#[test]
fn with_room_for_one_the_critical_database_goes_first() {
    let one_shard = NodeCapacity { cores: 2, ..NODE };
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::DbRegistered(db("low", "h1", Priority::Low, GIB))).unwrap();
    core.handle(Millis(0), Event::DbRegistered(db("crit", "h2", Priority::Critical, GIB))).unwrap();
    let out = core.handle(Millis(1), Event::NodeJoined { node: node("n"), capacity: one_shard }).unwrap();
    assert_eq!(assigned_dbs(&out), ["crit"]);
    assert_eq!(core.waiting(), 1);
}

#[test]
fn a_waiting_database_raised_to_critical_goes_first() {
    let one_shard = NodeCapacity { cores: 2, ..NODE };
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::DbRegistered(db("a", "h1", Priority::Low, GIB))).unwrap();
    core.handle(Millis(0), Event::DbRegistered(db("b", "h2", Priority::Normal, GIB))).unwrap();
    core.handle(Millis(1), Event::DbChanged(db("a", "h1", Priority::Critical, GIB))).unwrap();
    assert_eq!(core.waiting(), 2);
    let out = core.handle(Millis(2), Event::NodeJoined { node: node("n"), capacity: one_shard }).unwrap();
    assert_eq!(assigned_dbs(&out), ["a"]);
}

#[test]
fn a_source_host_never_runs_more_backups_than_its_cap() {
    let config = Config { host_max_running: 2, ..Config::default() };
    let mut core = Core::new(config);
    for i in 0..3 {
        core.handle(Millis(0), Event::NodeJoined { node: node(&format!("n{i}")), capacity: NODE }).unwrap();
    }
    let mut placed = 0;
    for name in ["a", "b", "c"] {
        placed += assigns(
            &core.handle(Millis(0), Event::DbRegistered(db(name, "same-host", Priority::Normal, GIB))).unwrap(),
        )
        .len();
    }
    assert_eq!(placed, 2);
    let other = core.handle(Millis(0), Event::DbRegistered(db("d", "other-host", Priority::Normal, GIB))).unwrap();
    assert_eq!(assigns(&other).len(), 1, "another host's database is not held up");
}

fn preempts(d: &[Decision]) -> Vec<(ShardKey, NodeName, u64)> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Preempt { key, node, token } => Some((key.clone(), node.clone(), *token)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_critical_backup_with_no_room_preempts_the_lowest_class_at_a_segment_boundary() {
    let one_shard = NodeCapacity { cores: 2, ..NODE };
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("n1"), capacity: one_shard }).unwrap();
    core.handle(Millis(0), Event::NodeJoined { node: node("n2"), capacity: one_shard }).unwrap();
    let low = core.handle(Millis(0), Event::DbRegistered(db("low", "h1", Priority::Low, GIB))).unwrap();
    let high = core.handle(Millis(0), Event::DbRegistered(db("high", "h2", Priority::High, GIB))).unwrap();
    let (_, low_key, low_node, low_token, _) = assigns(&low)[0].clone();
    assert_eq!(assigned_dbs(&high), ["high"]);
    let out = core.handle(Millis(1), Event::DbRegistered(db("crit", "h3", Priority::Critical, GIB))).unwrap();
    assert!(assigns(&out).is_empty(), "{out:?}");
    assert_eq!(preempts(&out), [(low_key.clone(), low_node.clone(), low_token)], "the low one, not the high one");
    assert_eq!(core.preempting(), 1);
    // Another pass asks for nothing more: one victim per waiting shard.
    assert!(preempts(&core.handle(Millis(2), Event::Tick).unwrap()).is_empty());
    // It hands back at its boundary with 3 segments durable; the critical one takes its place.
    let yielded =
        Event::ShardYielded { key: low_key.clone(), node: low_node.clone(), token: low_token, segments_done: 3 };
    let out = core.handle(Millis(3), yielded).unwrap();
    assert_eq!(assigned_dbs(&out), ["crit"]);
    assert_eq!(core.preempting(), 0);
    assert_eq!(core.first_waiting(), Some((&DbName("low".into()), Priority::Low)));
    // The low one resumes from its checkpoint when room comes back.
    let (_, crit_key, crit_node, crit_token, _) = assigns(&out)[0].clone();
    core.handle(Millis(4), beat(&low_node.0)).unwrap();
    let done = Event::ShardFinished { key: crit_key, node: crit_node, token: crit_token, bytes: GIB };
    let out = core.handle(Millis(4), done).unwrap();
    let again = assigns(&out);
    assert_eq!((again[0].0.as_str(), again[0].4), ("low", 3), "{out:?}");
}

#[test]
fn a_critical_backup_on_a_host_at_its_caps_preempts_that_hosts_lower_classes_only() {
    let config = Config { host_max_running: 1, ..Config::default() };
    let mut core = Core::new(config);
    core.handle(Millis(0), Event::NodeJoined { node: node("n"), capacity: NODE }).unwrap();
    core.handle(Millis(0), Event::DbRegistered(db("other-low", "h2", Priority::Low, GIB))).unwrap();
    let low = core.handle(Millis(0), Event::DbRegistered(db("low", "h1", Priority::Low, GIB))).unwrap();
    let (_, low_key, ..) = assigns(&low)[0].clone();
    let out = core.handle(Millis(1), Event::DbRegistered(db("crit", "h1", Priority::Critical, GIB))).unwrap();
    assert_eq!(preempts(&out).iter().map(|p| p.0.clone()).collect::<Vec<_>>(), [low_key]);
    let normal = core.handle(Millis(1), Event::DbRegistered(db("normal", "h1", Priority::Normal, GIB))).unwrap();
    assert!(preempts(&normal).is_empty(), "only critical backups preempt");
}

#[test]
fn a_silent_node_gets_no_new_work_until_it_is_heard_from() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("dead"), capacity: NODE }).unwrap();
    core.handle(Millis(0), Event::NodeJoined { node: node("alive"), capacity: NODE }).unwrap();
    core.handle(Millis(25_000), beat("alive")).unwrap();
    let out = core.handle(Millis(31_000), Event::DbRegistered(db("a", "h", Priority::Normal, GIB))).unwrap();
    assert_eq!(assigns(&out)[0].2, node("alive"), "{out:?}");
    // Heard from again (a heartbeat after its leases ended is taken): placeable again.
    core.handle(Millis(32_000), beat("dead")).unwrap();
    let out = core.handle(Millis(32_000), Event::DbRegistered(db("b", "h2", Priority::Normal, GIB))).unwrap();
    assert_eq!(assigns(&out)[0].2, node("dead"), "the one with more cores free: {out:?}");
}

#[test]
fn a_slow_source_host_gets_its_read_cap_cut_and_a_busy_node_its_rate() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("n"), capacity: NODE }).unwrap();
    let out = core.handle(Millis(0), Event::DbRegistered(db("a", "pg-1", Priority::Normal, GIB))).unwrap();
    let (_, key, n, token, _) = assigns(&out)[0].clone();
    let slow = SourceLoad { read_p99_us: 50_000, cpu_percent: 10 };
    let progress = Event::Progress { key, node: n, token, segments_done: 0, source: Some(slow) };
    let out = core.handle(Millis(1), progress).unwrap();
    let cap = Config::default().host_max_read_bps * 3 / 4;
    assert_eq!(out, [Decision::HostReadCap { host: HostName("pg-1".into()), bps: cap }]);
    let hot = NodeReport { cpu_percent: 99, ..NodeReport::default() };
    let out = core.handle(Millis(2), Event::Heartbeat { node: node("n"), report: hot }).unwrap();
    assert!(matches!(out.as_slice(), [Decision::NodeRateCap { .. }]), "{out:?}");
}

#[test]
fn the_desired_node_count_follows_the_backlog_up_at_once() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("n"), capacity: NODE }).unwrap();
    let first = core.handle(Millis(1), Event::Tick).unwrap();
    assert!(matches!(first.as_slice(), [Decision::DesiredNodes { count: 1, .. }]), "{first:?}");
    // 100 TiB due, with a 4 h RPO: the backlog to clear within the hour (more than the
    // steady 100 TiB per 2 h) sets the count, not the one node there is.
    let huge = DbSpec { rpo: Millis::from_secs(4 * 3600), ..db("huge", "h", Priority::High, 100 << 40) };
    core.handle(Millis(2), Event::DbRegistered(huge)).unwrap();
    let out = core.handle(Millis(60_001), Event::Tick).unwrap();
    let Some(Decision::DesiredNodes { count, reason, backlog_bytes, .. }) = out.last() else { panic!("{out:?}") };
    assert_eq!((*reason, *backlog_bytes), (ScaleReason::Backlog, 100 << 40));
    // 100 TiB in an hour at 80% of one node's 2 shards × 200 MiB/s.
    assert_eq!(*count, ((100u64 << 40) / 3600 * 100 / 80).div_ceil(400 << 20) as u32);
}

#[test]
fn a_backup_starts_only_within_its_window_and_one_that_missed_it_waits_for_the_next() {
    const H: u64 = 3_600_000;
    let one_shard = NodeCapacity { cores: 2, ..NODE };
    let mut core = Core::new(Config::default());
    let at_noon = Millis(12 * H);
    core.handle(at_noon, Event::NodeJoined { node: node("n"), capacity: one_shard }).unwrap();
    let night = DbSpec { window: Some((H, 5 * H)), rpo: Millis(24 * H), ..db("night", "h1", Priority::High, GIB) };
    assert!(assigns(&core.handle(at_noon, Event::DbRegistered(night)).unwrap()).is_empty());
    core.handle(Millis(25 * H - 1), beat("n")).unwrap();
    assert!(assigns(&core.handle(Millis(25 * H - 1), Event::Tick).unwrap()).is_empty(), "before 01:00");
    let opened = core.handle(Millis(25 * H), Event::Tick).unwrap();
    assert_eq!(assigned_dbs(&opened), ["night"]);
    // Another one waits for the node past its window's end: it is not started late.
    let (_, key, n, token, _) = assigns(&opened)[0].clone();
    let short = DbSpec { window: Some((H, 2 * H)), rpo: Millis(24 * H), ..db("short", "h2", Priority::High, GIB) };
    core.handle(Millis(25 * H), Event::DbRegistered(short)).unwrap();
    let done = Event::ShardFinished { key, node: n, token, bytes: GIB };
    assert!(assigns(&core.handle(Millis(26 * H + 1), done).unwrap()).is_empty(), "02:00 passed");
    assert_eq!(core.waiting(), 0, "it waits for tomorrow's window, out of the order");
    core.handle(Millis(49 * H - 1), beat("n")).unwrap();
    let out = core.handle(Millis(49 * H), Event::Tick).unwrap();
    assert_eq!(assigned_dbs(&out), ["short"], "{out:?} {}", core.waiting());
}

#[test]
fn a_drained_node_hands_its_shards_back_at_segment_boundaries_and_takes_no_more() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("old"), capacity: NODE }).unwrap();
    let a = core.handle(Millis(0), Event::DbRegistered(db("a", "h1", Priority::Normal, GIB))).unwrap();
    let (_, key, n, token, _) = assigns(&a)[0].clone();
    core.handle(Millis(1), Event::NodeJoined { node: node("new"), capacity: NODE }).unwrap();
    let out = core.handle(Millis(2), Event::NodeDrain(node("old"))).unwrap();
    assert_eq!(preempts(&out), [(key.clone(), n.clone(), token)]);
    assert!(!out.contains(&Decision::Drained { node: node("old") }), "it still holds a shard");
    let b = core.handle(Millis(3), Event::DbRegistered(db("b", "h2", Priority::Normal, GIB))).unwrap();
    assert_eq!(assigns(&b)[0].2, node("new"), "no new work on a draining node");
    let out = core.handle(Millis(4), Event::ShardYielded { key, node: n, token, segments_done: 2 }).unwrap();
    assert!(out.contains(&Decision::Drained { node: node("old") }), "{out:?}");
    let again = assigns(&out);
    assert_eq!((again[0].2.clone(), again[0].4), (node("new"), 2), "resumes on another node from its checkpoint");
    assert!(!core.handle(Millis(5), Event::Tick).unwrap().contains(&Decision::Drained { node: node("old") }), "once");
}

#[test]
fn a_saturated_fleet_with_backups_waiting_asks_for_more_nodes_than_its_rates_say() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(0), Event::NodeJoined { node: node("n"), capacity: NODE }).unwrap();
    for name in ["a", "b", "c"] {
        core.handle(Millis(0), Event::DbRegistered(db(name, name, Priority::Normal, GIB))).unwrap();
    }
    // 3 GiB an hour is far under one node's rate, but both its shards run and one waits.
    assert_eq!(core.waiting(), 1);
    let out = core.handle(Millis(1), Event::Tick).unwrap();
    let Some(Decision::DesiredNodes { count, reason, .. }) = out.last() else { panic!("{out:?}") };
    // 2 shards running at 80% of a node's 2: 1.25 nodes, so 2.
    assert_eq!((*count, *reason), (2, ScaleReason::Backlog));
}

#[test]
fn bad_events_are_refused_and_change_nothing() {
    let mut core = Core::new(Config::default());
    core.handle(Millis(10), Event::Tick).unwrap();
    assert_eq!(
        core.handle(Millis(9), Event::Tick),
        Err(CoreError::ClockBackwards { last: Millis(10), now: Millis(9) })
    );
    let unknown = Event::Heartbeat { node: node("ghost"), report: NodeReport::default() };
    assert!(matches!(core.handle(Millis(10), unknown), Err(CoreError::Registry(RegistryError::UnknownNode(_)))));
    let key = ShardKey { job: 99, shard: 0 };
    let stray = Event::Progress { key, node: node("ghost"), token: 1, segments_done: 1, source: None };
    assert!(core.handle(Millis(10), stray).is_err());
    assert_eq!(core.waiting(), 0);
    // A refused event does not move the clock either.
    let late_ghost = Event::Heartbeat { node: node("ghost"), report: NodeReport::default() };
    assert!(core.handle(Millis(500), late_ghost).is_err());
    assert!(core.handle(Millis(11), Event::Tick).is_ok());
}
