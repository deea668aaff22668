//! `cbcr-control`: the control plane's binary. It runs the fleet simulator over the pure core
//! (`simulate`), keeps the fleet's registry in the embedded store (`db`), and serves the
//! HTTPS API agents and operators call (`serve`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use controlplane::service::registry_file::{self, DbEntry, Format, SizeHint, WrittenEntry};
use controlplane::service::roles::Roles;
use controlplane::service::store::{FleetStore, Put, StoreError};
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
    /// The registry of databases in the control plane's store.
    Db {
        /// The embedded store (one file, created when missing).
        #[arg(long, env = "CBCR_CONTROL_STORE", default_value = "/var/lib/cbcr-control/state.redb")]
        store: PathBuf,
        /// Output as JSON Lines.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Serves the fleet's HTTPS API (mutual TLS) from the registry in the store.
    Serve(ServeArgs),
    /// Asks a running `serve` for the fleet's status.
    Status {
        /// The service: https://HOST:PORT.
        #[arg(long, env = "CBCR_CONTROL")]
        control: String,
        /// This client's certificate and key, and the CA the service's is signed by.
        #[command(flatten)]
        tls: TlsArgs,
        #[arg(long)]
        json: bool,
    },
}

/// One side's PEM files: its certificate and key, and the CA it trusts the other side by.
#[derive(Args)]
struct TlsArgs {
    #[arg(long, env = "CBCR_CERT")]
    cert: PathBuf,
    #[arg(long, env = "CBCR_KEY")]
    key: PathBuf,
    #[arg(long, env = "CBCR_CA")]
    ca: PathBuf,
}

impl TlsArgs {
    /// The three files' bytes, in `wire::tls::Pem` order.
    fn read(&self) -> Result<[Vec<u8>; 3], (u8, String)> {
        Ok([read_file(&self.cert)?, read_file(&self.key)?, read_file(&self.ca)?])
    }

    /// A TLS error as a usage error naming the file it is about (`crl`: the revocation list).
    fn error(&self, e: wire::tls::TlsError, crl: Option<&Path>) -> (u8, String) {
        let path = match e.part {
            "key" => &self.key,
            "ca" => &self.ca,
            "crl" => crl.unwrap_or(&self.ca),
            _ => &self.cert,
        };
        (exit::USAGE, format!("{}: {}", path.display(), e.message))
    }
}

fn read_file(p: &Path) -> Result<Vec<u8>, (u8, String)> {
    std::fs::read(p).map_err(|e| (exit::USAGE, format!("{}: {e}", p.display())))
}

fn pem(bytes: &[Vec<u8>; 3]) -> wire::tls::Pem<'_> {
    wire::tls::Pem { cert: &bytes[0], key: &bytes[1], ca: &bytes[2] }
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (127.0.0.1:0 picks a port; the first line printed names it).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The embedded store (one file, created when missing); while `serve` runs it holds it.
    #[arg(long, env = "CBCR_CONTROL_STORE", default_value = "/var/lib/cbcr-control/state.redb")]
    store: PathBuf,
    /// Who may call what: TOML lists `operators`, `readers` and `agents` of certificate names.
    #[arg(long)]
    roles: PathBuf,
    /// The service's certificate and key (PEM), and the CA that signs clients' certificates.
    #[command(flatten)]
    tls: TlsArgs,
    /// A revocation list (PEM, as `cbcr cert revoke` writes it): those certificates are refused
    /// at the handshake.
    #[arg(long)]
    crl: Option<PathBuf>,
    /// Where databases registered without a repository back up to.
    #[arg(long)]
    repo: Option<String>,
    /// How long a shard's lease lasts unrenewed; agents heartbeat at a third of it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease_ttl: std::time::Duration,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Registers one database (again with the same settings: nothing changes).
    Add {
        name: String,
        /// An absolute path on its host, or a synth:// source.
        #[arg(long)]
        source: String,
        /// The host its source lives on (its backups are capped per host).
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "normal", value_name = "critical|high|normal|low")]
        priority: String,
        /// How old its latest snapshot may become: 1h, 30m, 1d.
        #[arg(long)]
        rpo: String,
        /// HH:MM-HH:MM (UTC): backups start only within it.
        #[arg(long)]
        window: Option<String>,
        /// The size to plan for until a snapshot says (500GiB, 3TiB).
        #[arg(long)]
        size_hint: Option<String>,
        /// Where its snapshots go: quic://HOST:PORT[/NAME], s3://BUCKET[/PREFIX], or a directory.
        #[arg(long)]
        repo: Option<String>,
        /// Changes a database registered with other settings.
        #[arg(long)]
        replace: bool,
    },
    /// Registers every database of a file (.toml: `[[db]]` tables; else JSON Lines, as
    /// `db ls --json` prints), all or none.
    Import {
        file: PathBuf,
        #[arg(long)]
        replace: bool,
    },
    /// Lists the registered databases.
    Ls,
    /// Unregisters a database.
    Rm { name: String },
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

/// Exit codes of `cbcr-control` (the README's table).
mod exit {
    pub(crate) const FATAL: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const CONFLICT: u8 = 4;
    pub(crate) const UNKNOWN: u8 = 5;
    pub(crate) const BUSY: u8 = 6;
    pub(crate) const UNREACHABLE: u8 = 7;
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Simulate(a) => simulate(a),
        Command::Status { control, tls, json } => match status(&control, &tls, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, message)) => {
                eprintln!("cbcr-control: {message}");
                ExitCode::from(code)
            }
        },
        Command::Serve(a) => match serve(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, message)) => {
                eprintln!("cbcr-control: {message}");
                ExitCode::from(code)
            }
        },
        Command::Db { store, json, command } => match db(&store, json, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, message)) => {
                eprintln!("cbcr-control: {message}");
                ExitCode::from(code)
            }
        },
    }
}

fn store_error(e: StoreError) -> (u8, String) {
    let code = match &e {
        StoreError::Busy(_) => exit::BUSY,
        StoreError::Conflict { .. } => exit::CONFLICT,
        StoreError::UnknownDb(_) => exit::UNKNOWN,
        StoreError::Redb { .. } | StoreError::Damaged { .. } => exit::FATAL,
    };
    (code, e.to_string())
}

fn report_puts(entries: &[DbEntry], puts: &[Put], json: bool) {
    if json {
        for (e, p) in entries.iter().zip(puts) {
            println!("{}", serde_json::json!({"type": "db", "name": e.name, "result": p}));
        }
    }
    let count = |want: Put| puts.iter().filter(|p| **p == want).count();
    let (added, replaced, unchanged) = (count(Put::Added), count(Put::Replaced), count(Put::Unchanged));
    if json {
        println!(
            "{}",
            serde_json::json!({"type": "summary", "added": added, "replaced": replaced, "unchanged": unchanged})
        );
    } else {
        println!("{added} added, {replaced} replaced, {unchanged} unchanged");
    }
}

fn db(store: &Path, json: bool, command: DbCommand) -> Result<(), (u8, String)> {
    // The file is read before the store is opened: a bad file leaves no store behind.
    let entries = match &command {
        DbCommand::Add { name, source, host, priority, rpo, window, size_hint, repo, .. } => {
            let written = WrittenEntry {
                name: name.clone(),
                source: source.clone(),
                host: host.clone(),
                priority: Some(priority.clone()),
                rpo: rpo.clone(),
                window: window.clone(),
                size_hint: size_hint.clone().map(SizeHint::Text),
                repo: repo.clone(),
            };
            vec![written.check().map_err(|m| (exit::USAGE, m))?]
        }
        DbCommand::Import { file, .. } => {
            let text = std::fs::read_to_string(file).map_err(|e| (exit::USAGE, format!("{}: {e}", file.display())))?;
            registry_file::parse(&text, Format::of(file))
                .map_err(|e| (exit::USAGE, format!("{}:{}: {}", file.display(), e.line, e.message)))?
        }
        DbCommand::Ls | DbCommand::Rm { .. } => vec![],
    };
    if let Some(dir) = store.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        return Err((exit::USAGE, format!("{}: no such directory for the store", dir.display())));
    }
    let fleet = FleetStore::open(store).map_err(store_error)?;
    match command {
        DbCommand::Add { replace, .. } | DbCommand::Import { replace, .. } => {
            let puts = fleet.put_dbs(&entries, replace).map_err(store_error)?;
            report_puts(&entries, &puts, json);
        }
        DbCommand::Ls => {
            for e in fleet.dbs().map_err(store_error)? {
                if json {
                    println!("{}", e.to_json_line());
                } else {
                    let window = e.written().window.unwrap_or_else(|| "any time".into());
                    let repo = e.repo.as_deref().unwrap_or("(default)");
                    println!(
                        "{}  {}  {}  rpo {}  {window}  {}  -> {repo}",
                        e.name,
                        e.priority.name(),
                        e.host,
                        e.written().rpo,
                        e.source
                    );
                }
            }
        }
        DbCommand::Rm { name } => {
            let gone = fleet.remove_db(&name).map_err(store_error)?;
            if json {
                println!("{}", serde_json::json!({"type": "removed", "name": gone.name}));
            } else {
                println!("removed {}", gone.name);
            }
        }
    }
    Ok(())
}

fn status(control: &str, files: &TlsArgs, json: bool) -> Result<(), (u8, String)> {
    let bytes = files.read()?;
    let tls = wire::tls::client_config(pem(&bytes), wire::control::ALPN).map_err(|e| files.error(e, None))?;
    let agent = ureq::AgentBuilder::new()
        .tls_config(std::sync::Arc::new(tls))
        .timeout(std::time::Duration::from_secs(30))
        .build();
    let url = format!("{}/v1/status", control.trim_end_matches('/'));
    let s: wire::control::Status = match agent.get(&url).call() {
        Ok(r) => r.into_json().map_err(|e| (exit::FATAL, format!("{url}: {e}")))?,
        Err(ureq::Error::Status(code, r)) => {
            let said = r.into_json::<wire::control::ApiError>().map(|e| e.error).unwrap_or_default();
            return Err((exit::FATAL, format!("{url}: {code} {said}")));
        }
        Err(e) => return Err((exit::UNREACHABLE, format!("{url}: {e}"))),
    };
    if json {
        println!("{}", serde_json::to_string(&s).expect("a status serialises"));
    } else {
        let [c, h, n, l] = s.waiting;
        let desired = s.desired_nodes.map_or("not decided yet".into(), |d| d.to_string());
        println!("{} databases, {} nodes (desired: {desired})", s.dbs, s.nodes);
        println!("waiting: {c} critical, {h} high, {n} normal, {l} low; {} shards running", s.running_shards);
        println!("{} committed, {} failovers, {} stale reports refused", s.committed, s.failovers, s.stale_refused);
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<(), (u8, String)> {
    use controlplane::service::api::{self, ServeConfig, TlsListener};
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let roles_text = String::from_utf8_lossy(&read_file(&a.roles)?).into_owned();
    let roles = Roles::parse(&roles_text).map_err(|e| (exit::USAGE, format!("{}: {e}", a.roles.display())))?;
    let bytes = a.tls.read()?;
    let crl = a.crl.as_deref().map(read_file).transpose()?;
    let tls = wire::tls::server_config(pem(&bytes), crl.as_deref(), wire::control::ALPN)
        .map_err(|e| a.tls.error(e, a.crl.as_deref()))?;
    if let Some(dir) = a.store.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        return Err((exit::USAGE, format!("{}: no such directory for the store", dir.display())));
    }
    let store = FleetStore::open(&a.store).map_err(store_error)?;
    let lease_ttl = controlplane::core::Millis(a.lease_ttl.as_millis() as u64);
    let core = controlplane::core::machine::Config { lease_ttl, ..Default::default() };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| (exit::FATAL, format!("tokio runtime: {e}")))?;
    runtime.block_on(async move {
        let tcp = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|e| (exit::USAGE, format!("--listen {}: {e}", a.listen)))?;
        let listener = TlsListener::start(tcp, tls).map_err(|e| (exit::FATAL, e.to_string()))?;
        println!(
            "listening on {}",
            axum::serve::Listener::local_addr(&listener).map_err(|e| (exit::FATAL, e.to_string()))?.addr
        );
        let config = ServeConfig { listener, store, roles, core, default_repo: a.repo, heartbeat: a.lease_ttl / 3 };
        api::serve(config).await.map_err(|e| (exit::USAGE, e.to_string()))
    })
}

fn simulate(a: SimulateArgs) -> ExitCode {
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
