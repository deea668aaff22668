//! `cbcr-control serve`: the real service on 127.0.0.1 with the development PKI, called over
//! mutual TLS as operators, readers and agents would, and by a client of another CA.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cbcr_tests::{cbcr, control_bin, https_client as client, ControlProcess};
use wire::control::{
    Capacity, Heartbeat, LeaseRef, Order, Orders, Register, Registered, ResourceReport, ShardOutcome, ShardReport,
    Status,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn status_of(r: Result<ureq::Response, ureq::Error>) -> u16 {
    match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn the_service_answers_by_role_hands_out_assignments_critical_first_and_refuses_strangers_and_stale_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
    for out in [&pki, &other] {
        assert!(cbcr(&["cert", "dev", "--out", s(out)]).status.success());
    }
    for name in ["agent-a", "dash"] {
        assert!(cbcr(&["cert", "issue", "--pki", s(&pki), name]).status.success());
    }
    let roles = dir.path().join("roles.toml");
    std::fs::write(&roles, "operators = [\"cbcr-client\"]\nreaders = [\"dash\"]\nagents = [\"agent-*\"]\n").unwrap();
    let registry = dir.path().join("dbs.toml");
    let mut text = String::new();
    for (name, priority) in [("orders", "low"), ("payments", "critical"), ("users", "normal")] {
        text += &format!(
            "[[db]]\nname = \"{name}\"\nsource = \"synth://pg?size=4MiB&seed=1\"\nhost = \"pg-{name}\"\n\
             priority = \"{priority}\"\nrpo = \"1h\"\nsize_hint = \"4MiB\"\n\n"
        );
    }
    std::fs::write(&registry, text).unwrap();
    let store = dir.path().join("state.redb");
    let import =
        Command::new(control_bin()).args(["db", "--store", s(&store), "import", s(&registry)]).output().unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));

    let repo = dir.path().join("repo");
    let control = ControlProcess::start(&pki, &store, &roles, &["--repo", s(&repo)]);
    let url = |path: &str| format!("https://{}/v1/{path}", control.addr);

    // The store is the service's while it runs.
    let busy = Command::new(control_bin()).args(["db", "--store", s(&store), "ls"]).output().unwrap();
    assert_eq!(busy.status.code(), Some(6), "{}", String::from_utf8_lossy(&busy.stderr));

    let operator = client(&pki, "client", &pki);
    let status: Status = operator.get(&url("status")).call().unwrap().into_json().unwrap();
    assert_eq!((status.dbs, status.nodes), (3, 0));

    // A reader reads and may not write; a stranger's certificate fails the handshake.
    let reader = client(&pki, "dash", &pki);
    assert_eq!(status_of(reader.get(&url("dbs")).call()), 200);
    let new_db = serde_json::json!({"name": "x", "source": "/srv/x", "host": "h", "rpo": "1h"});
    assert_eq!(status_of(reader.post(&url("dbs")).send_json(&new_db)), 403);
    let stranger = client(&other, "client", &pki);
    assert!(matches!(stranger.get(&url("status")).call(), Err(ureq::Error::Transport(_))));

    // An agent acts only as itself.
    let agent = client(&pki, "agent-a", &pki);
    let gib = 1u64 << 30;
    let capacity = Capacity { cores: 2, memory_bytes: 4 * gib, network_bps: gib, disk_bps: gib };
    let as_b = Register { node: "agent-b".into(), capacity };
    assert_eq!(status_of(agent.post(&url("agent/register")).send_json(&as_b)), 403);
    let reg = Register { node: "agent-a".into(), capacity };
    let registered: Registered = agent.post(&url("agent/register")).send_json(&reg).unwrap().into_json().unwrap();
    assert_eq!(registered.lease_ttl_ms, 3000);

    // Its first assignment is the critical database, to the service's repository.
    let deadline = Instant::now() + Duration::from_secs(10);
    let beat = |leases: Vec<LeaseRef>| -> Orders {
        let h = Heartbeat { node: "agent-a".into(), report: ResourceReport::default(), leases };
        agent.post(&url("agent/heartbeat")).send_json(&h).unwrap().into_json().unwrap()
    };
    let run = loop {
        let orders = beat(vec![]);
        if let Some(Order::Run(a)) = orders.orders.into_iter().find(|o| matches!(o, Order::Run(_))) {
            break a;
        }
        assert!(Instant::now() < deadline, "no assignment within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!((run.db.as_str(), run.repo.as_str(), run.shards), ("payments", s(&repo), 1));
    assert_eq!(run.data_job.len(), 32);
    assert!(beat(vec![run.lease]).orders.iter().all(|o| !matches!(o, Order::Stop { .. })), "renewed");

    // A report with an older token is refused; the right one is told to commit.
    let stale = LeaseRef { token: run.lease.token - 1, ..run.lease };
    let report = |lease, outcome| ShardReport { node: "agent-a".into(), lease, outcome };
    let refused = agent.post(&url("agent/shard")).send_json(report(stale, ShardOutcome::Finished { bytes: 1 }));
    assert_eq!(status_of(refused), 409);
    let done: Orders = agent
        .post(&url("agent/shard"))
        .send_json(report(run.lease, ShardOutcome::Finished { bytes: 4 << 20 }))
        .unwrap()
        .into_json()
        .unwrap();
    assert!(
        matches!(&done.orders[..], [Order::Commit { data_job, .. }] if *data_job == run.data_job),
        "{:?}",
        done.orders
    );
    let status: Status = reader.get(&url("status")).call().unwrap().into_json().unwrap();
    assert_eq!(status.nodes, 1);
    assert!(status.stale_refused >= 1);

    // An operator registers a database through the API, idempotently.
    assert_eq!(status_of(operator.post(&url("dbs")).send_json(&new_db)), 200);
    assert_eq!(status_of(operator.post(&url("dbs")).send_json(&new_db)), 200);
    let changed = serde_json::json!({"name": "x", "source": "/srv/x", "host": "h", "rpo": "2h"});
    assert_eq!(status_of(operator.post(&url("dbs")).send_json(&changed)), 409);
    let status: Status = operator.get(&url("status")).call().unwrap().into_json().unwrap();
    assert_eq!(status.dbs, 4);
    let cli = |name: &str, ca: &Path| {
        Command::new(control_bin())
            .args(["status", "--json", "--control", &format!("https://{}", control.addr)])
            .args(["--cert", s(&pki.join(format!("{name}.crt"))), "--key", s(&pki.join(format!("{name}.key")))])
            .args(["--ca", s(&ca.join("ca.crt"))])
            .output()
            .unwrap()
    };
    let out = cli("dash", &pki);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Status>(&out.stdout).unwrap().dbs, 4);
    // Trusting another CA, the service's certificate does not verify: unreachable, exit 7.
    assert_eq!(cli("dash", &other).status.code(), Some(7));
    assert_eq!(status_of(operator.delete(&url("dbs/nope")).call()), 404);
}
