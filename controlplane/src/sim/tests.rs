use super::*;

fn small(seed: u64, kill_rate: f64) -> SimConfig {
    SimConfig {
        dbs: 200,
        nodes: 20,
        hours: 6,
        seed,
        kill_rate,
        slow_rate: 0.1,
        partition_rate: 0.0,
        bursts: vec![],
        growth_per_day: 0.0,
        autoscale: false,
        series: false,
    }
}

/// What a run decided, without the wall-time figures.
fn decided(s: &Summary) -> (u64, u64, u64, u64, String) {
    (s.backups_done, s.rpo_misses, s.failovers, s.events, s.digest.clone())
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let a = run(&small(1, 0.05)).unwrap().summary;
    let b = run(&small(1, 0.05)).unwrap().summary;
    assert_eq!(decided(&a), decided(&b));
    let c = run(&small(2, 0.05)).unwrap().summary;
    assert_ne!(a.digest, c.digest);
    assert!(a.backups_done > 0, "{a:?}");
    assert!(a.desired_nodes_max >= 1 && a.sched_pass_p99_ms > 0.0, "{a:?}");
}

#[test]
fn with_nodes_dying_no_shard_is_lost_none_committed_twice_and_failover_stays_under_two_ttls() {
    for seed in [3, 4, 5] {
        let s = run(&small(seed, 0.2)).unwrap().summary;
        assert!(s.node_deaths > 0, "{s:?}");
        assert!(s.failovers > 0, "{s:?}");
        assert_eq!((s.lost_shards, s.double_commits), (0, 0), "{s:?}");
        assert!(s.max_failover_s <= 2.0 * s.lease_ttl_s, "{s:?}");
        assert!(s.stale_reports_refused > 0, "{s:?}");
    }
}

#[test]
fn a_node_cut_off_keeps_working_and_is_fenced_when_it_comes_back() {
    let cfg = SimConfig { partition_rate: 0.5, ..small(7, 0.0) };
    let s = run(&cfg).unwrap().summary;
    assert!(s.partitions > 0 && s.failovers > 0, "{s:?}");
    assert!(s.stale_reports_refused > 0, "a cut-off node's reports were refused: {s:?}");
    assert_eq!((s.lost_shards, s.double_commits), (0, 0), "{s:?}");
    assert!(s.max_failover_s <= 2.0 * s.lease_ttl_s, "{s:?}");
}

#[test]
fn a_burst_of_critical_databases_raises_the_desired_node_count() {
    let quiet = run(&small(8, 0.0)).unwrap().summary;
    let burst = Burst { class: Priority::Critical, count: 400, at: Millis::from_secs(3 * 3600) };
    let cfg = SimConfig { bursts: vec![burst], series: true, ..small(8, 0.0) };
    let r = run(&cfg).unwrap();
    assert_eq!(r.summary.dbs, 600);
    assert!(r.summary.desired_nodes_max > quiet.desired_nodes_max, "{:?} vs {quiet:?}", r.summary);
    let s = r.series.unwrap();
    assert_eq!(s.hours.len(), 6 * 12 + 1);
    let at_burst = s.hours.iter().position(|h| *h > 3.0).unwrap();
    assert!(s.waiting[0][at_burst] > 0.0 || s.desired_nodes[at_burst] > s.desired_nodes[at_burst - 2], "{s:?}");
}

#[test]
fn databases_that_grow_take_longer_to_back_up_and_stay_consistent() {
    let steady = run(&small(10, 0.0)).unwrap().summary;
    let growing = run(&SimConfig { growth_per_day: 2.0, ..small(10, 0.0) }).unwrap().summary;
    assert_eq!((growing.lost_shards, growing.double_commits), (0, 0), "{growing:?}");
    assert!(growing.backups_done < steady.backups_done, "{growing:?} vs {steady:?}");
}

#[test]
fn an_autoscaled_fleet_follows_the_desired_count_down_and_up_without_losing_work() {
    let fixed = run(&small(11, 0.05)).unwrap().summary;
    let shrinking = run(&SimConfig { autoscale: true, nodes: 60, ..small(11, 0.05) }).unwrap().summary;
    assert!(shrinking.nodes_drained > 0 && shrinking.drain_handbacks > 0, "{shrinking:?}");
    assert!(shrinking.node_hours < 60.0 * 6.0 * 0.8, "{shrinking:?}");
    assert_eq!((shrinking.lost_shards, shrinking.double_commits), (0, 0), "{shrinking:?}");
    let growing = run(&SimConfig { autoscale: true, nodes: 1, ..small(11, 0.05) }).unwrap().summary;
    assert!(growing.nodes_max > 1, "{growing:?}");
    assert_eq!((growing.lost_shards, growing.double_commits), (0, 0), "{growing:?}");
    assert!(fixed.nodes_drained == 0 && fixed.node_hours == 20.0 * 6.0, "{fixed:?}");
}

#[test]
fn busy_source_hosts_get_their_read_caps_cut() {
    let s = run(&small(9, 0.0)).unwrap().summary;
    assert!(s.host_cap_cuts > 0, "{s:?}");
}

#[test]
fn bursts_parse_and_bad_ones_say_what_a_burst_is() {
    let b: Burst = "critical:500@06:30".parse().unwrap();
    assert_eq!(b, Burst { class: Priority::Critical, count: 500, at: Millis::from_secs(6 * 3600 + 30 * 60) });
    for bad in ["critical:500", "urgent:5@01:00", "high:x@01:00", "low:5@01:75", "low:0@01:00"] {
        assert!(bad.parse::<Burst>().is_err(), "{bad}");
    }
}
