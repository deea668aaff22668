//! `cbcr-control`: the control plane's binary. So far it runs the fleet simulator over the pure
//! core (`simulate`); the service (API, store, agents) comes with the next issues.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controlplane::sim::{self, SimConfig};

#[derive(Parser)]
#[command(name = "cbcr-control", version, about = "cbcr's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drives the scheduling core with a seeded, simulated fleet and prints what happened.
    Simulate {
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
        /// The summary as one JSON line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate { dbs, nodes, hours, seed, kill_rate, slow_rate, json } => {
            if dbs == 0 || nodes == 0 || hours == 0 {
                eprintln!("cbcr-control: --dbs, --nodes and --hours must be at least 1");
                return ExitCode::from(2);
            }
            if !(0.0..=1.0).contains(&slow_rate) || kill_rate < 0.0 || !kill_rate.is_finite() {
                eprintln!("cbcr-control: --slow-rate is a share from 0 to 1 and --kill-rate a rate of 0 or more");
                return ExitCode::from(2);
            }
            let started = std::time::Instant::now();
            let cfg = SimConfig { dbs, nodes, hours, seed, kill_rate, slow_rate };
            match sim::run(&cfg) {
                Ok(summary) => {
                    let wall_s = started.elapsed().as_secs_f64();
                    if json {
                        let mut line = serde_json::to_value(&summary).expect("a summary serializes");
                        line["type"] = "summary".into();
                        line["wall_s"] = wall_s.into();
                        println!("{line}");
                    } else {
                        println!(
                            "{} databases, {} nodes, {} simulated hours in {wall_s:.1} s: {} backups, {} RPO misses, \
                             {} lost shards, {} double commits, {} node deaths, {} failovers (longest {:.1} s, \
                             lease TTL {:.0} s), {} stale reports refused; digest {}",
                            summary.dbs,
                            summary.nodes,
                            summary.simulated_hours,
                            summary.backups_done,
                            summary.rpo_misses,
                            summary.lost_shards,
                            summary.double_commits,
                            summary.node_deaths,
                            summary.failovers,
                            summary.max_failover_s,
                            summary.lease_ttl_s,
                            summary.stale_reports_refused,
                            summary.digest
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(violation) => {
                    eprintln!("cbcr-control: invariant broken: {violation}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
