//! `cbcr-control`: the control plane's binary. So far it runs the fleet simulator over the pure
//! core (`simulate`); the service (API, store, agents) comes with the next issues.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use controlplane::sim::{self, report, Burst, SimConfig};

#[derive(Parser)]
#[command(name = "cbcr-control", version, about = "cbcr's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drives the scheduling core with a seeded, simulated fleet and prints what happened.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct SimulateArgs {
    #[arg(long, default_value_t = 1000)]
    dbs: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 24)]
    hours: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Deaths per node per hour (a dead node comes back after 10 minutes).
    #[arg(long, default_value_t = 0.0)]
    kill_rate: f64,
    /// The share of nodes that run at a third of the speed.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Partitions per node per hour (cut off from the control plane for 60 s, still working).
    #[arg(long, default_value_t = 0.0)]
    partition_rate: f64,
    /// Mean database growth per day, as a share of its size (0.1: 10% a day).
    #[arg(long, default_value_t = 0.0)]
    growth_rate: f64,
    /// CLASS:COUNT@HH:MM: COUNT databases of CLASS registered at HH:MM (repeatable).
    #[arg(long = "burst", value_name = "CLASS:COUNT@HH:MM")]
    bursts: Vec<Burst>,
    /// The fleet follows the core's desired node count (nodes join after 2 minutes; the
    /// idlest drain and leave); --nodes is the count to start with.
    #[arg(long)]
    autoscale: bool,
    /// The summary as one JSON line.
    #[arg(long)]
    json: bool,
    /// Writes DIR/index.html: the summary and plots over simulated time.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Simulate(a) = cli.command;
    if a.dbs == 0 || a.nodes == 0 || a.hours == 0 {
        eprintln!("cbcr-control: --dbs, --nodes and --hours must be at least 1");
        return ExitCode::from(2);
    }
    let rate_ok = |r: f64| r >= 0.0 && r.is_finite();
    if !(0.0..=1.0).contains(&a.slow_rate) || ![a.kill_rate, a.partition_rate, a.growth_rate].into_iter().all(rate_ok) {
        eprintln!(
            "cbcr-control: --slow-rate is a share from 0 to 1; --kill-rate, --partition-rate and --growth-rate are \
             rates of 0 or more"
        );
        return ExitCode::from(2);
    }
    if let Some(late) = a.bursts.iter().find(|b| b.at.0 >= a.hours * 3_600_000) {
        eprintln!("cbcr-control: a burst at {} is past the end of a {} h run", late.at, a.hours);
        return ExitCode::from(2);
    }
    let started = std::time::Instant::now();
    let cfg = SimConfig {
        dbs: a.dbs,
        nodes: a.nodes,
        hours: a.hours,
        seed: a.seed,
        kill_rate: a.kill_rate,
        slow_rate: a.slow_rate,
        partition_rate: a.partition_rate,
        bursts: a.bursts,
        growth_per_day: a.growth_rate,
        autoscale: a.autoscale,
        series: a.report.is_some(),
    };
    let run = match sim::run(&cfg) {
        Ok(run) => run,
        Err(violation) => {
            eprintln!("cbcr-control: invariant broken: {violation}");
            return ExitCode::from(1);
        }
    };
    let s = &run.summary;
    let mut line = serde_json::to_value(s).expect("a summary serializes");
    line["type"] = "summary".into();
    line["wall_s"] = started.elapsed().as_secs_f64().into();
    if let (Some(dir), Some(series)) = (&a.report, &run.series) {
        match report::write(dir, &line, series) {
            Ok(path) => eprintln!("cbcr-control: report written to {}", path.display()),
            Err(e) => {
                eprintln!("cbcr-control: writing the report into {}: {e}", dir.display());
                return ExitCode::from(3);
            }
        }
    }
    if a.json {
        println!("{line}");
    } else {
        println!(
            "{} databases, {} nodes, {} simulated hours in {:.1} s: {} backups, {} RPO misses, {} priority \
             inversions, {} lost shards, {} double commits, {} node deaths, {} partitions, {} failovers (longest \
             {:.1} s, lease TTL {:.0} s), {} stale reports refused; desired nodes at most {}; scheduling pass p50 \
             {:.4} ms, p99 {:.4} ms; digest {}",
            s.dbs,
            s.nodes,
            s.simulated_hours,
            started.elapsed().as_secs_f64(),
            s.backups_done,
            s.rpo_misses,
            s.priority_inversions,
            s.lost_shards,
            s.double_commits,
            s.node_deaths,
            s.partitions,
            s.failovers,
            s.max_failover_s,
            s.lease_ttl_s,
            s.stale_reports_refused,
            s.desired_nodes_max,
            s.sched_pass_p50_ms,
            s.sched_pass_p99_ms,
            s.digest
        );
    }
    ExitCode::SUCCESS
}
