//! `cbcr`: the command-line edge. Parses arguments, runs one command, maps its error to the
//! documented exit code. Everything else lives in the library.

mod output;
mod secret;

use std::path::{Path, PathBuf};
use std::process::ExitCode as ProcessExit;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use dataplane::command::agent::throttle::SteerParams;
use dataplane::command::agent::AgentExit;
use dataplane::command::backup::{
    backup, run_shard, BackupOptions, BackupSource, Chunking, ChunkingRules, PlanOptions, ShardCount, ShardOptions,
};
use dataplane::command::jobs::{abandon_job, commit_job, list_jobs, parse_job};
use dataplane::command::receiver::{ReceiverOptions, Serves};
use dataplane::command::restore::{restore, Destination, RestoreOptions};
use dataplane::command::verify::{describe, verify};
use dataplane::error::{Error, ExitCode};
use dataplane::events::{Cancel, Run};
use dataplane::net::quic::TlsFiles;
use dataplane::repo::Repository;
use dataplane::source::exclude::Excludes;
use dataplane::source::synth::SynthSpec;
use dataplane::source::throttle::ReadThrottle;
use dataplane::{limits, runtime};
use output::Reporter;
use serde_json::json;
use wire::repo::ChunkerParams;
use wire::tree::NodeKind;

#[derive(Parser)]
#[command(name = "cbcr", version, about = "Fast, thread-per-core backup for database fleets")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Repository: a directory, `s3://BUCKET/PREFIX` (credentials and endpoint from AWS_*), or
    /// `quic://HOST:PORT` for a receiver (then --cert/--key/--ca).
    #[arg(long, global = true, env = "CBCR_REPO")]
    repo: Option<String>,
    /// This side's certificate (PEM) for QUIC: the client's, or the receiver's.
    #[arg(long, global = true, env = "CBCR_CERT")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, global = true, env = "CBCR_KEY")]
    key: Option<PathBuf>,
    /// The CA that must have signed the other side's certificate (PEM).
    #[arg(long, global = true, env = "CBCR_CA")]
    ca: Option<PathBuf>,
    /// JSON Lines on stdout instead of human output.
    #[arg(long, global = true)]
    json: bool,
    /// Only errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// No progress bar even on a terminal.
    #[arg(long, global = true)]
    no_progress: bool,
    /// Cores to run on (default: every core this process may use).
    #[arg(long, global = true, env = "CBCR_CORES")]
    cores: Option<usize>,
    /// The repository's password: the first line of this file (else CBCR_PASSWORD, else the
    /// terminal is asked).
    #[arg(long, global = true, env = "CBCR_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// A command (run with sh -c) that prints the password, e.g. a KMS or vault client;
    /// before --password-file.
    #[arg(long, global = true, env = "CBCR_KEY_COMMAND")]
    key_command: Option<String>,
}

impl Global {
    fn password(&self) -> secret::Sources {
        secret::Sources {
            command: self.key_command.clone(),
            file: self.password_file.clone(),
            env: "CBCR_PASSWORD",
            what: "password",
            options: "--password-file F, CBCR_PASSWORD_FILE, CBCR_PASSWORD or --key-command CMD",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository (or give `backup --init` to create one with the defaults).
    Init(InitArgs),
    /// Back up files and directories into a new snapshot.
    Backup {
        /// Files and directories to back up, or one generated source `synth://pg?size=..&seed=..&gen=..`.
        #[arg(required_unless_present_any = ["stdin", "job"])]
        paths: Vec<PathBuf>,
        /// Back up standard input as one file called NAME (a tar stream's page files get page
        /// chunks: `pg_basebackup -Ft -D - | cbcr backup --db pg1 --stdin base.tar`).
        #[arg(long, value_name = "NAME", conflicts_with = "paths")]
        stdin: Option<String>,
        /// Run one shard of a planned job (`cbcr plan`) instead: its segments are read from the
        /// paths the plan names (or its synth:// source), checkpointed as their packs become
        /// durable; a re-run skips what was checkpointed. Chunking and exclusions are the plan's.
        #[arg(long, value_name = "JOB", conflicts_with_all = ["paths", "stdin", "parent", "db", "init"], requires = "shard")]
        job: Option<String>,
        /// The shard of --job to run (0 to shards - 1).
        #[arg(long, value_name = "K", requires = "job")]
        shard: Option<u32>,
        /// The run's fencing token (from the control plane's lease): refused unless higher than
        /// every token the shard has seen; a run with a higher one fences this one off. Default:
        /// one above the highest seen.
        #[arg(long, value_name = "T", requires = "job")]
        token: Option<u64>,
        /// Create the repository with the defaults when --repo names none yet (an empty or
        /// missing directory, or an empty prefix); without it a missing repository is an error.
        #[arg(long)]
        init: bool,
        /// Snapshot to compare against (id, prefix or `latest`); default: the latest of --db, or
        /// without --db the latest with the same host and paths.
        #[arg(long)]
        parent: Option<String>,
        /// The database this is a backup of: recorded in the snapshot, and the parent is then
        /// the latest snapshot of it from any host or paths, its files matched by their path
        /// below the source root (a new directory per backup still makes deltas).
        #[arg(long, env = "CBCR_DB")]
        db: Option<String>,
        /// zstd level, -7 to 22 (negative is faster).
        #[arg(long, default_value_t = limits::DEFAULT_COMPRESSION_LEVEL, allow_negative_numbers = true,
              value_parser = clap::value_parser!(i32).range(-7..=22))]
        compression_level: i32,
        /// Seal pack files at this size.
        #[arg(long, default_value = "64MiB", value_parser = dataplane::parse_size)]
        pack_size: u64,
        /// A changed page chunk is stored as a delta (its changed pages XOR the parent's) on
        /// top of at most this many deltas, else whole again; 0: always whole.
        #[arg(long, default_value_t = limits::DEFAULT_DELTA_CHAIN, value_parser = clap::value_parser!(u32).range(0..=wire::limits::MAX_DELTA_CHAIN as i64))]
        delta_chain: u32,
        /// Read the source at most this fast (bytes per second: 200MiB); 0: no cap.
        #[arg(long, env = "CBCR_READ_CAP", default_value = "0", value_parser = dataplane::parse_size, value_name = "RATE")]
        read_cap: u64,
        /// Take new read caps from standard input while running, one per line (a rate, or 0),
        /// and report the source's read rate and latency each second (`reading` events with
        /// --json): how `cbcr agent` steers the shards it runs.
        #[arg(long, conflicts_with = "stdin")]
        read_cap_stdin: bool,
        #[command(flatten)]
        cut: CutArgs,
    },
    /// Plan a sharded backup: walk the source once, split its files' segments into shards of
    /// about equal bytes, and store the plan as a job; run each shard anywhere the source is
    /// seen (`backup --job JOB --shard K`), then `commit --job JOB`.
    Plan {
        /// Files and directories, or one generated source `synth://pg?...`.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The database this is a backup of (recorded in the snapshot the job makes).
        #[arg(long, env = "CBCR_DB")]
        db: Option<String>,
        /// How many shards (fewer when there are fewer segments).
        #[arg(long, conflicts_with = "shard_bytes", required_unless_present = "shard_bytes",
              value_parser = clap::value_parser!(u32).range(1..=wire::job::MAX_SHARDS as i64))]
        shards: Option<u32>,
        /// Shards of about this many bytes instead.
        #[arg(long, value_parser = dataplane::parse_size)]
        shard_bytes: Option<u64>,
        /// The job's id (32 hex digits; default: random), as a control plane chooses it: a plan
        /// of this id already there is reused (with the same --shards), exactly --shards shards
        /// are made (some may be empty), and a job a snapshot records is not planned again
        /// (exit 22).
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
        #[command(flatten)]
        cut: CutArgs,
    },
    /// Combine a job's shards into one snapshot, once every segment of its plan is
    /// checkpointed (else exit 19 naming the shards that are not).
    Commit {
        #[arg(long, value_name = "JOB")]
        job: String,
    },
    /// List open jobs with each shard's progress.
    Jobs {
        /// Remove the job's plan, start records and checkpoints (its packs stay until a gc).
        #[arg(long, value_name = "JOB")]
        abandon: Option<String>,
    },
    /// List snapshots.
    Snapshots {
        /// Only the snapshots of this database (`backup --db`).
        #[arg(long)]
        db: Option<String>,
    },
    /// Remove snapshots by id or unique id prefix (their data stays until a gc). Through a
    /// receiver, its policy must allow `forget`.
    Forget {
        /// Snapshot ids or unique id prefixes.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// List the files of a snapshot.
    Ls {
        /// Snapshot id, id prefix, or `latest`.
        snapshot: String,
        /// Pick among the snapshots of this database (`latest --db NAME`).
        #[arg(long)]
        db: Option<String>,
    },
    /// Restore a snapshot under a target directory (paths keep their full original path).
    Restore {
        /// Snapshot id, id prefix, or `latest`.
        snapshot: String,
        /// Pick among the snapshots of this database (`latest --db NAME`).
        #[arg(long)]
        db: Option<String>,
        /// Directory to restore into.
        #[arg(long)]
        target: PathBuf,
        /// Restore only this snapshot path and what is below it (repeatable).
        #[arg(long)]
        include: Vec<PathBuf>,
        /// fsync every restored file and directory before exiting 0, so the restore survives a
        /// power loss (slower; a restore without it is durable once the kernel writes it back).
        #[arg(long)]
        fsync: bool,
    },
    /// Check the repository; exit 13 when anything is damaged.
    Verify {
        /// Also read every pack, decompress and re-hash every blob.
        #[arg(long)]
        read_data: bool,
        /// Instead, compare a snapshot's content with the generated source it was made from.
        #[arg(long, value_name = "synth://...")]
        against: Option<String>,
        /// The snapshot to compare with --against.
        #[arg(long, default_value = "latest", requires = "against")]
        snapshot: String,
    },
    /// Serve repositories to clients over QUIC (the storage-host daemon): --repo (a directory or
    /// s3://), or the repositories and grants of --policy.
    Receiver {
        /// A policy file (TOML): the repositories served by name (quic://HOST:PORT/NAME) and
        /// what each client certificate may do on them; re-read on SIGHUP.
        #[arg(long, env = "CBCR_POLICY", conflicts_with = "repo")]
        policy: Option<PathBuf>,
        /// A certificate revocation list (PEM, as `cert revoke` writes it): clients it names are
        /// refused at the handshake; re-read on SIGHUP.
        #[arg(long, env = "CBCR_CRL")]
        crl: Option<PathBuf>,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// After SIGTERM, how long open sessions may take to finish.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Close a session that has had no request open for this long (its client reconnects
        /// when it needs the receiver again), so idle sessions cannot hold the session limit.
        #[arg(long, default_value = limits::RECEIVER_IDLE_SESSION, value_parser = parse_idle_timeout)]
        idle_timeout: std::time::Duration,
        /// `json`: the log (and its audit events: sessions, commits, reads, lists, verifies,
        /// forgets, refusals, policy reloads, each with the client's certificate and identity)
        /// as JSON lines on stderr.
        #[arg(long, default_value = "text", env = "CBCR_LOG_FORMAT", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Run as a node of a fleet: register with `cbcr-control`, heartbeat, and run the shards and
    /// commits it assigns (as `cbcr` child processes) into each database's repository. The
    /// certificate (--cert/--key/--ca) serves both the control plane and the receivers; the
    /// repository password comes from --password-file, CBCR_PASSWORD_FILE or --key-command.
    /// Exits 0 once drained (`cbcr-control node drain`), 130 after SIGTERM or SIGINT, having
    /// handed its shards back.
    Agent {
        /// The control plane, `https://HOST:PORT`.
        #[arg(long, env = "CBCR_CONTROL")]
        control: String,
        /// This node's name: its certificate must carry it (the control plane checks).
        #[arg(long, env = "CBCR_NODE")]
        name: String,
        /// The network bandwidth this node offers, bytes per second.
        #[arg(long, default_value = "1GiB", value_parser = dataplane::parse_size)]
        network: u64,
        /// The disk bandwidth this node offers, bytes per second (also the most its read cap
        /// rises to).
        #[arg(long, default_value = "1GiB", value_parser = dataplane::parse_size)]
        disk: u64,
        /// The p99 of the time one window (up to 8 MiB) of a source may take to arrive: slower
        /// reads cut the node's read cap, faster ones raise it again.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        read_latency_target: std::time::Duration,
        /// CPU (percent of the host) everything but this agent's shards may use before the read
        /// cap is cut.
        #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
        cpu_target: u8,
        /// A Unix socket (mode 0600) for `cbcr admin SOCKET status|pause|resume|drain|throttle
        /// RATE|perf|help`.
        #[arg(long, env = "CBCR_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
    },
    /// Ask a running agent (or cbcr-control) through its admin socket: status, pause, resume,
    /// drain, throttle RATE, perf, help. Prints the JSON answer.
    Admin {
        /// The daemon's --admin-socket.
        socket: PathBuf,
        /// What to ask.
        command: String,
        /// The command's argument (throttle's rate).
        arg: Option<String>,
    },
    /// Certificates for QUIC.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The password slots of an encrypted repository (on its store: a directory or s3://).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Rebuild what can be rebuilt (on the repository's store: a directory or s3://).
    #[command(subcommand)]
    Repair(RepairCommand),
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Rebuild the index from the packs' trailers (after index runs were lost or damaged).
    Index,
    /// Read every blob, and rebuild the index without the damaged ones (the next backup of the
    /// files that use them stores them again).
    Packs,
    /// Write new snapshots in place of those that reference lost data: lost chunks restore as
    /// zeros at their offsets, lost directories as empty ones (run `repair packs` first).
    Snapshots {
        /// The snapshots to look at (ids, prefixes or `latest`); default: all.
        snapshots: Vec<String>,
        /// Report what would change; store and commit nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Remove each original once the snapshot that replaces it is committed.
        #[arg(long)]
        forget: bool,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List the password slots.
    List,
    /// Add a slot for a new password (any slot's password then opens the repository).
    Add(NewPassword),
    /// Remove a slot (not the one whose password is given now).
    Remove {
        /// The slot's name, as `key list` shows it.
        name: String,
    },
    /// Replace the slot of the password given with one for a new password.
    Passwd(NewPassword),
}

#[derive(Args)]
struct NewPassword {
    /// The new password: the first line of this file (else CBCR_NEW_PASSWORD, else the
    /// terminal is asked twice).
    #[arg(long, env = "CBCR_NEW_PASSWORD_FILE")]
    new_password_file: Option<PathBuf>,
    /// A command that prints the new password.
    #[arg(long)]
    new_key_command: Option<String>,
}

impl NewPassword {
    fn read(&self) -> Result<Vec<u8>, Error> {
        let sources = secret::Sources {
            command: self.new_key_command.clone(),
            file: self.new_password_file.clone(),
            env: "CBCR_NEW_PASSWORD",
            what: "new password",
            options: "--new-password-file F, CBCR_NEW_PASSWORD_FILE, CBCR_NEW_PASSWORD or --new-key-command CMD",
        };
        sources.read(true)
    }
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a development CA, a receiver certificate for localhost and a client certificate.
    Dev {
        /// Directory to write ca.crt, receiver.crt/.key, control.crt/.key and client.crt/.key into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a client certificate NAME (its CN and DNS name: the identity a receiver's policy
    /// grants to), signed by the CA of --pki: writes NAME.crt and NAME.key there.
    Issue {
        name: String,
        /// The PKI directory (ca.crt and ca.key, as `cert dev` writes them).
        #[arg(long)]
        pki: PathBuf,
    },
    /// Revoke the certificate NAME.crt of --pki: rewrites crl.pem there (give it to receivers
    /// with --crl, then SIGHUP them).
    Revoke {
        name: String,
        /// The PKI directory (ca.crt and ca.key, as `cert dev` writes them).
        #[arg(long)]
        pki: PathBuf,
    },
}

impl CutArgs {
    fn rules(&self) -> Result<ChunkingRules, Error> {
        let page_chunk = self.page_chunk;
        let chunk =
            u32::try_from(page_chunk).map_err(|_| Error::Usage(format!("--page-chunk {page_chunk} is too large")))?;
        let policy = |arg: &ChunkingArg| match *arg {
            ChunkingArg::Auto => Chunking::Auto { chunk },
            ChunkingArg::Cdc => Chunking::Cdc,
            ChunkingArg::Pages(page) => Chunking::Pages { page, chunk },
        };
        let mut rules = ChunkingRules { default: Chunking::Auto { chunk }, paths: vec![] };
        for (path, arg) in &self.chunking {
            match path {
                // Source paths are walked canonical: so must the rules' be.
                Some(p) => rules.paths.push((std::fs::canonicalize(p).unwrap_or(p.clone()), policy(arg))),
                None => rules.default = policy(arg),
            }
        }
        Ok(rules)
    }

    fn excludes(&self) -> Result<Excludes, Error> {
        excludes(&self.exclude, &self.exclude_file, !self.no_default_excludes)
    }
}

/// Paths to back up or plan, or the one synth:// source among them.
fn path_source(paths: Vec<PathBuf>) -> Result<BackupSource, Error> {
    let synth = paths.iter().filter_map(|p| p.to_str()).find(|p| p.starts_with("synth://"));
    match synth {
        Some(_) if paths.len() > 1 => {
            Err(Error::Usage("a synth:// source is backed up on its own, not with other paths".into()))
        }
        Some(url) => Ok(BackupSource::Synth(SynthSpec::parse(url)?)),
        None => Ok(BackupSource::Paths(paths)),
    }
}

/// How a backup or a plan cuts files and what it leaves out.
#[derive(Args)]
struct CutArgs {
    /// `auto` (page chunks for the page files of PostgreSQL, InnoDB and SQLite, each at its
    /// own page size, found by name and content; content-defined for the rest), `cdc`
    /// (content-defined everywhere) or `pages:SIZE` (page chunks for every file whose
    /// length is a multiple of the page SIZE). Repeat as `PATH=POLICY` to set the policy of
    /// the files under PATH (the longest PATH wins).
    #[arg(long, value_parser = parse_chunking)]
    chunking: Vec<(Option<PathBuf>, ChunkingArg)>,
    /// Length of a page chunk: a multiple of the page size.
    #[arg(long, default_value_t = limits::DEFAULT_PAGE_CHUNK, value_parser = dataplane::parse_size)]
    page_chunk: u64,
    /// Leave out what matches GLOB (repeatable): `/...` from the root, else the path's last
    /// components (`*.log`, `pg_wal/*`); `*` within a component, `**` across them.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Leave out the patterns of FILE, one per line (`#` comments, blank lines ignored).
    #[arg(long, value_name = "FILE")]
    exclude_file: Vec<PathBuf>,
    /// Keep what PostgreSQL's own base backup leaves out of a data directory
    /// (`postmaster.pid`, `pg_stat_tmp/*`, `pgsql_tmp*`, ...).
    #[arg(long)]
    no_default_excludes: bool,
}

#[derive(Args)]
struct InitArgs {
    /// Files are cut at multiples of this size and each segment is chunked on its own core.
    #[arg(long, default_value = "1GiB", value_parser = dataplane::parse_size)]
    segment_size: u64,
    /// Smallest chunk.
    #[arg(long, default_value = "16KiB", value_parser = dataplane::parse_size)]
    chunk_min: u64,
    /// Average chunk.
    #[arg(long, default_value = "64KiB", value_parser = dataplane::parse_size)]
    chunk_avg: u64,
    /// Largest chunk.
    #[arg(long, default_value = "256KiB", value_parser = dataplane::parse_size)]
    chunk_max: u64,
    /// Store everything in plaintext: for benchmarks only. Anyone who can read the store can
    /// read every backup.
    #[arg(long)]
    insecure_no_encryption: bool,
}

/// A session idle timeout: at least a second (shorter would close sessions between requests).
fn parse_idle_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s}: at least 1s"));
    }
    Ok(d)
}

fn main() -> ProcessExit {
    let cli = Cli::parse();
    // A daemon says who connected and what was committed; a command only what went wrong.
    let level = if matches!(cli.command, Command::Receiver { .. } | Command::Agent { .. }) { "info" } else { "warn" };
    let log = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr);
    match &cli.command {
        Command::Receiver { log_format, .. } if log_format == "json" => log.json().init(),
        _ => log.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let reporter = Arc::new(Reporter::new(cli.global.json, cli.global.quiet, !cli.global.no_progress));
    let code = match on_sigint(&cli.command).and_then(|cancel| run(cli, &reporter, cancel)) {
        Ok(code) => code,
        Err(e) => {
            reporter.finish();
            let code = e.exit_code();
            reporter.json(json!({"type": "error", "message": e.to_string(), "exit_code": code as i32}));
            eprintln!("cbcr: error: {e}");
            code
        }
    };
    ProcessExit::from(code as u8)
}

/// What SIGINT does: a backup stops at its next consistent point (a second SIGINT exits at
/// once); any other command exits at once. Both exit 130. A receiver handles its own signals.
fn on_sigint(command: &Command) -> Result<Cancel, Error> {
    use signal_hook::consts::SIGINT;
    let cancel = Cancel::default();
    let failed = |e: std::io::Error| Error::Internal(format!("cannot handle SIGINT: {e}"));
    match command {
        Command::Receiver { .. } => {}
        Command::Agent { .. } => {
            // SIGTERM (systemd's stop) or SIGINT: hand the shards back and leave; a second
            // one exits at once.
            for signal in [SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_shutdown(signal, ExitCode::Interrupted as i32, cancel.flag())
                    .map_err(failed)?;
                signal_hook::flag::register(signal, cancel.flag()).map_err(failed)?;
            }
        }
        Command::Backup { .. } => {
            // The first SIGINT raises the flag; the second finds it raised and exits.
            signal_hook::flag::register_conditional_shutdown(SIGINT, ExitCode::Interrupted as i32, cancel.flag())
                .map_err(failed)?;
            signal_hook::flag::register(SIGINT, cancel.flag()).map_err(failed)?;
        }
        _ => {
            let raised = Arc::new(std::sync::atomic::AtomicBool::new(true));
            signal_hook::flag::register_conditional_shutdown(SIGINT, ExitCode::Interrupted as i32, raised)
                .map_err(failed)?;
        }
    }
    Ok(cancel)
}

fn run(cli: Cli, reporter: &Arc<Reporter>, cancel: Cancel) -> Result<ExitCode, Error> {
    let g = cli.global;
    let events = Arc::clone(reporter) as Arc<dyn dataplane::events::EventSink>;
    let run = Run { events, every: reporter.every(), cancel, reads: ReadThrottle::off() };
    let repo_path =
        || g.repo.clone().ok_or_else(|| Error::Usage("no repository: give --repo DIR or set CBCR_REPO".into()));
    let cores = g.cores.unwrap_or_else(runtime::default_cores);
    let tls = match (&g.cert, &g.key, &g.ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() }),
        (None, None, None) => None,
        _ => return Err(Error::Usage("give all three of --cert, --key and --ca".into())),
    };
    let password = g.password();
    let ask = || password.read(false);
    let open = |init: bool| Repository::open_spec(&repo_path()?, tls.as_ref(), init, &ask);
    match cli.command {
        Command::Init(a) => {
            let chunker =
                ChunkerParams { min: to_u32(a.chunk_min)?, avg: to_u32(a.chunk_avg)?, max: to_u32(a.chunk_max)? };
            let secret = if a.insecure_no_encryption {
                eprintln!(
                    "cbcr: WARNING: --insecure-no-encryption: this repository is stored in plaintext; anyone who can read its store can read every backup"
                );
                None
            } else {
                Some(password.read(true)?)
            };
            if !a.segment_size.is_multiple_of(limits::DEFAULT_PAGE_CHUNK) {
                return Err(Error::Usage(format!(
                    "--segment-size {}: must be a multiple of {} (backup's default --page-chunk), or every default backup of a database file fails",
                    a.segment_size,
                    dataplane::human_size(limits::DEFAULT_PAGE_CHUNK)
                )));
            }
            let store = dataplane::store::open(&repo_path()?)?;
            let repo = Repository::init(store, a.segment_size, chunker, secret.as_deref())?;
            reporter.json(json!({"type": "init", "repo": repo.location(), "config": repo.config}));
            if !g.quiet && !g.json {
                println!("created repository {}", repo.location());
            }
            Ok(ExitCode::Ok)
        }
        Command::Backup {
            paths,
            stdin,
            job,
            shard,
            token,
            init,
            parent,
            db,
            compression_level,
            pack_size,
            delta_chain,
            read_cap,
            read_cap_stdin,
            cut,
        } => {
            let reads = ReadThrottle::start(read_cap, read_cap_stdin, &run);
            let run = Run { reads, ..run };
            if let (Some(job), Some(shard)) = (job, shard) {
                let opts = ShardOptions { job: parse_job(&job)?, shard, token, cores, compression_level, pack_size };
                let out = run_shard(open(false)?, &opts, &run)?;
                reporter.json(json!({"type": "shard", "summary": out}));
                if !g.quiet && !g.json {
                    println!(
                        "job {} shard {} (token {}): {} of {} segments read, {} skipped (checkpointed), {} read, {} new, {} checkpoints, {:.2}s",
                        out.job,
                        out.shard,
                        out.token,
                        out.segments - out.segments_skipped,
                        out.segments,
                        out.segments_skipped,
                        dataplane::human_size(out.bytes_read),
                        dataplane::human_size(out.bytes_new),
                        out.checkpoints,
                        out.duration_s
                    );
                }
                return Ok(ExitCode::Ok);
            }
            let source = match stdin {
                // SAFETY: isatty has no preconditions.
                Some(_) if unsafe { libc::isatty(0) } == 1 => {
                    return Err(Error::Usage("--stdin reads a stream from standard input, which is a terminal".into()))
                }
                Some(name) => BackupSource::Stdin(name),
                None => path_source(paths)?,
            };
            let repo = open(init)?;
            let opts = BackupOptions {
                source,
                parent,
                db,
                cores,
                compression_level,
                pack_size,
                chunking: cut.rules()?,
                delta_chain,
                excludes: cut.excludes()?,
            };
            let out = backup(repo, &opts, &run)?;
            let s = &out.snapshot.stats;
            reporter.json(json!({
                "type": "summary",
                "snapshot_id": out.snapshot_id.to_hex(),
                "parent": out.snapshot.parent,
                "bytes_read": s.bytes_read,
                "bytes_total": s.bytes_total,
                "bytes_new": s.bytes_new,
                "bytes_stored": s.bytes_stored,
                "chunks_total": s.chunks_total,
                "chunks_new": s.chunks_new,
                "files": s.files,
                "dirs": s.dirs,
                "files_skipped": s.files_skipped,
                "files_changed": out.files_changed,
                "excluded": out.excluded,
                "page_files": out.page_files.iter().map(|(e, n)| (e.name(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
                "duration_s": s.duration_s,
                "stage_latency_us": out.stage_latency,
            }));
            if !g.quiet && !g.json {
                println!(
                    "snapshot {} saved: {} files, {} read, {} new, {} stored, {:.2}s ({:.0} MB/s)",
                    out.snapshot_id.short(),
                    s.files,
                    dataplane::human_size(s.bytes_read),
                    dataplane::human_size(s.bytes_new),
                    dataplane::human_size(s.bytes_stored),
                    s.duration_s,
                    s.bytes_read as f64 / s.duration_s.max(1e-9) / 1e6
                );
            }
            Ok(if s.files_skipped > 0 || out.files_changed > 0 { ExitCode::Partial } else { ExitCode::Ok })
        }
        Command::Plan { paths, db, shards, shard_bytes, job, cut } => {
            let repo = open(false)?;
            let count = match (shards, shard_bytes) {
                (Some(n), _) => ShardCount::Shards(n),
                (None, Some(b)) => ShardCount::Bytes(b),
                (None, None) => return Err(Error::Usage("give --shards N or --shard-bytes SIZE".into())),
            };
            let opts = PlanOptions {
                job: job.as_deref().map(parse_job).transpose()?,
                source: path_source(paths)?,
                db,
                shards: count,
                chunking: cut.rules()?,
                excludes: cut.excludes()?,
            };
            let dataplane::command::backup::Planned { plan, skipped, reused } =
                dataplane::command::backup::plan(&repo, &opts, &run)?;
            let shards: Vec<_> = (0..plan.shards.len())
                .map(|k| json!({"shard": k, "segments": plan.shard_segments(k).count(), "bytes": plan.shard_bytes(k)}))
                .collect();
            let files = plan.entries.iter().filter(|e| matches!(e.kind, wire::job::PlanKind::File { .. })).count();
            reporter.json(json!({
                "type": "plan",
                "job": plan.id.to_hex(),
                "db": plan.db,
                "paths": plan.paths,
                "entries": plan.entries.len(),
                "files": files,
                "skipped": skipped,
                "plan_bytes": plan.encode().len(),
                "reused": reused,
                "shards": shards,
            }));
            if !g.quiet && !g.json {
                println!(
                    "job {}{}: {} entries ({files} files), {} shards",
                    plan.id.to_hex(),
                    if reused { " (planned already)" } else { "" },
                    plan.entries.len(),
                    plan.shards.len()
                );
                for k in 0..plan.shards.len() {
                    println!(
                        "  shard {k}: {} segments, {}",
                        plan.shard_segments(k).count(),
                        dataplane::human_size(plan.shard_bytes(k))
                    );
                }
            }
            Ok(if skipped > 0 { ExitCode::Partial } else { ExitCode::Ok })
        }
        Command::Commit { job } => {
            let out = commit_job(open(false)?, parse_job(&job)?)?;
            let s = &out.snapshot.stats;
            reporter.json(json!({
                "type": "summary",
                "snapshot_id": out.snapshot_id.to_hex(),
                "job": job,
                "shards": out.snapshot.job.as_ref().map(|j| j.shards),
                "checkpoints": out.checkpoints,
                "combine_s": out.combine_s,
                "bytes_read": s.bytes_read,
                "bytes_total": s.bytes_total,
                "bytes_new": s.bytes_new,
                "bytes_stored": s.bytes_stored,
                "files": s.files,
                "dirs": s.dirs,
            }));
            if !g.quiet && !g.json {
                println!(
                    "snapshot {} saved from job {job}: {} files, {} total, {} new, {} checkpoints combined in {:.2}s",
                    out.snapshot_id.short(),
                    s.files,
                    dataplane::human_size(s.bytes_total),
                    dataplane::human_size(s.bytes_new),
                    out.checkpoints,
                    out.combine_s
                );
            }
            Ok(ExitCode::Ok)
        }
        Command::Jobs { abandon: Some(job) } => {
            let removed = abandon_job(&open(false)?, parse_job(&job)?)?;
            reporter.json(json!({"type": "abandoned", "job": job, "objects": removed}));
            if !g.quiet && !g.json {
                println!("job {job} abandoned: {removed} objects removed (its packs stay until a gc)");
            }
            Ok(ExitCode::Ok)
        }
        Command::Jobs { abandon: None } => {
            for j in list_jobs(&open(false)?)? {
                if g.json {
                    reporter.json(json!({"type": "job", "job": j}));
                    continue;
                }
                let (done, all): (usize, usize) =
                    j.shards.iter().fold((0, 0), |(d, a), s| (d + s.checkpointed, a + s.segments));
                let db = j.db.as_ref().map_or(String::new(), |db| format!("db={db}  "));
                println!(
                    "{}  {}  {db}{}  {}  {done}/{all} segments checkpointed",
                    j.job,
                    j.created.get(..19).unwrap_or(&j.created),
                    dataplane::human_size(j.bytes),
                    j.paths.join(" ")
                );
                for s in &j.shards {
                    let token = s.token.map_or("not started".into(), |t| format!("token {t}"));
                    println!("  shard {}: {}/{} segments, {token}", s.shard, s.checkpointed, s.segments);
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Snapshots { db } => {
            let repo = open(false)?;
            for (id, s) in repo.snapshots()?.into_iter().filter(|(_, s)| db.is_none() || s.db == db) {
                if g.json {
                    reporter.json(json!({"type": "snapshot", "id": id.to_hex(), "time": s.time, "host": s.host, "db": s.db, "paths": s.paths, "parent": s.parent, "tree": s.tree, "stats": s.stats, "repaired": s.repaired}));
                } else {
                    let repaired = s.repaired.as_ref().map_or(String::new(), |r| {
                        format!(
                            "  (repaired from {}: {} files with holes)",
                            r.original.get(..8).unwrap_or_default(),
                            r.files
                        )
                    });
                    let db = s.db.as_ref().map_or(String::new(), |db| format!("db={db}  "));
                    println!(
                        "{}  {}  {}  {db}{}  {}{repaired}",
                        id.short(),
                        s.time.get(..19).unwrap_or(&s.time),
                        s.host,
                        dataplane::human_size(s.stats.bytes_total),
                        s.paths.join(" ")
                    );
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Forget { snapshots } => {
            let repo = open(false)?;
            let mut ids = vec![];
            for spec in &snapshots {
                if spec == "latest" {
                    return Err(Error::Usage("forget takes snapshot ids, not latest".into()));
                }
                ids.push(repo.find_snapshot(spec)?.0);
            }
            let gone = repo.forget(&ids)?;
            for id in &gone {
                reporter.json(json!({"type": "forgotten", "id": id.to_hex()}));
                if !g.quiet && !g.json {
                    println!("removed snapshot {}", id.short());
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Ls { snapshot, db } => {
            let repo = open(false)?;
            let (_, snap) = repo.find_snapshot_of(&snapshot, db.as_deref())?;
            let index = dataplane::index::ChunkIndex::load(&*repo.store)?;
            let mut reader = dataplane::pipeline::pack::BlobReader::new(&repo, &index)?;
            list_tree(&mut reader, &snap.tree_id(), Path::new("/"), reporter, g.json)?;
            Ok(ExitCode::Ok)
        }
        Command::Restore { snapshot, target, include, fsync, db } => {
            let repo = open(false)?;
            // With --db, `latest` and prefixes pick among that database's snapshots.
            let snapshot = match db {
                Some(db) => repo.find_snapshot_of(&snapshot, Some(&db))?.0.to_hex(),
                None => snapshot,
            };
            let opts = RestoreOptions { dest: Destination::Dir(target.clone()), include, cores, fsync };
            let stats = restore(repo, &snapshot, &opts, &run)?;
            reporter.json(json!({"type": "restore_summary", "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes, "target": target}));
            if !g.quiet && !g.json {
                println!(
                    "restored {} files, {} dirs, {} to {}",
                    stats.files,
                    stats.dirs,
                    dataplane::human_size(stats.bytes),
                    target.display()
                );
            }
            Ok(ExitCode::Ok)
        }
        Command::Verify { against: Some(url), snapshot, .. } => {
            let repo = open(false)?;
            let opts = RestoreOptions {
                dest: Destination::Compare(SynthSpec::parse(&url)?),
                include: vec![],
                cores,
                fsync: false,
            };
            let stats = restore(repo, &snapshot, &opts, &run)?;
            reporter
                .json(json!({"type": "compare_summary", "files": stats.files, "bytes": stats.bytes, "source": url}));
            if !g.quiet && !g.json {
                println!(
                    "snapshot {snapshot} equals {url}: {} files, {}",
                    stats.files,
                    dataplane::human_size(stats.bytes)
                );
            }
            Ok(ExitCode::Ok)
        }
        Command::Receiver { listen, metrics, grace, idle_timeout, policy, crl, .. } => {
            let serves = match policy {
                Some(file) => Serves::Policy(file),
                None => {
                    let repo = g.repo.ok_or_else(|| {
                        Error::Usage(
                            "give the receiver its repository with --repo, or its repositories with --policy".into(),
                        )
                    })?;
                    if repo.starts_with("quic://") {
                        return Err(Error::Usage("a receiver serves a local directory or s3://, not quic://".into()));
                    }
                    Serves::One { repo, password: password.given()? }
                }
            };
            let tls = tls.ok_or_else(|| {
                Error::Usage("a receiver needs --cert, --key and --ca (mutual TLS is mandatory)".into())
            })?;
            let opts = ReceiverOptions { listen, serves, tls, crl, metrics, cores, grace, idle_timeout };
            dataplane::command::receiver::run(opts)?;
            Ok(ExitCode::Ok)
        }
        Command::Admin { socket, command, arg } => {
            let answer = dataplane::net::admin::call(&socket, &dataplane::net::admin::Request { command, arg })?;
            println!("{}", serde_json::to_string_pretty(&answer).expect("JSON values serialise"));
            Ok(ExitCode::Ok)
        }
        Command::Agent { control, name, network, disk, read_latency_target, cpu_target, admin_socket } => {
            let tls = tls.ok_or_else(|| Error::Usage("an agent needs --cert, --key and --ca".into()))?;
            let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            let mut env = vec![];
            for (var, path) in [("CBCR_CERT", &tls.cert), ("CBCR_KEY", &tls.key), ("CBCR_CA", &tls.ca)] {
                env.push((var.to_owned(), absolute(path).display().to_string()));
            }
            if let Some(file) = &g.password_file {
                env.push(("CBCR_PASSWORD_FILE".into(), absolute(file).display().to_string()));
            }
            if let Some(command) = &g.key_command {
                env.push(("CBCR_KEY_COMMAND".into(), command.clone()));
            }
            if let Some(n) = g.cores {
                env.push(("CBCR_CORES".into(), n.to_string()));
            }
            let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("which program am I: {e}")))?;
            let capacity = wire::control::Capacity {
                cores: u32::try_from(cores).unwrap_or(u32::MAX),
                memory_bytes: dataplane::command::agent::resources::memory_total(),
                network_bps: network,
                disk_bps: disk,
            };
            let opts = dataplane::command::agent::AgentOptions {
                control,
                name,
                tls,
                capacity,
                runner: dataplane::command::agent::task::Runner { exe, env },
                steer: SteerParams::new(read_latency_target.as_micros() as u64, cpu_target, disk),
                admin_socket,
            };
            match dataplane::command::agent::run_agent(opts, &run.cancel.flag())? {
                AgentExit::Drained | AgentExit::LeftDrained => Ok(ExitCode::Ok),
                AgentExit::Left => Ok(ExitCode::Interrupted),
            }
        }
        Command::Key(key) => {
            if repo_path()?.starts_with("quic://") {
                return Err(Error::Usage(
                    "key slots are managed on the repository's store (its directory or s3://), not through a receiver"
                        .into(),
                ));
            }
            let repo = open(false)?;
            match key {
                KeyCommand::List => {
                    let slots = repo.key_slots()?;
                    if slots.is_empty() {
                        return Err(Error::Usage(format!("{}: not encrypted, it has no key slots", repo.location())));
                    }
                    for slot in slots {
                        reporter.json(json!({"type": "key", "name": slot.name, "created": slot.created, "label": slot.label, "current": slot.current}));
                        if !g.json {
                            let mark = if slot.current { "*" } else { " " };
                            println!("{mark} {}  {}  {}", slot.name, slot.created, slot.label);
                        }
                    }
                }
                KeyCommand::Add(new) => {
                    let name = repo.add_key(&new.read()?)?;
                    reporter.json(json!({"type": "key_added", "name": name}));
                    if !g.quiet && !g.json {
                        println!("added key slot {name}");
                    }
                }
                KeyCommand::Remove { name } => {
                    repo.remove_key(&name)?;
                    reporter.json(json!({"type": "key_removed", "name": name}));
                    if !g.quiet && !g.json {
                        println!("removed key slot {name}");
                    }
                }
                KeyCommand::Passwd(new) => {
                    let name = repo.change_password(&new.read()?)?;
                    reporter.json(json!({"type": "key_changed", "name": name}));
                    if !g.quiet && !g.json {
                        println!("changed the password: key slot {name} replaces the one it opened");
                    }
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Repair(RepairCommand::Snapshots { snapshots, dry_run, forget }) => {
            let repo = open(false)?;
            let opts = dataplane::command::repair_snapshots::RepairSnapshotsOptions { snapshots, dry_run, forget };
            let found = dataplane::command::repair_snapshots::repair_snapshots(&repo, &opts, &run)?;
            for r in &found {
                reporter.json(json!({"type": "snapshot_repaired", "original": r.original, "repaired": r.repaired, "files": r.files, "dirs": r.dirs, "root_lost": r.root_lost, "forgotten": r.forgotten}));
                if !g.json {
                    for line in dataplane::command::repair_snapshots::describe(r) {
                        eprintln!("{line}");
                    }
                }
                if !g.quiet && !g.json {
                    let short = r.original.get(..8).unwrap_or_default();
                    match (&r.repaired, r.root_lost) {
                        (_, true) => println!(
                            "snapshot {short}: its root tree is lost, nothing to keep{}",
                            if r.forgotten { "; removed" } else { "" }
                        ),
                        (Some(new), _) => println!(
                            "snapshot {short}: repaired as {} ({} files, {} directories){}",
                            new.get(..8).unwrap_or_default(),
                            r.files.len(),
                            r.dirs.len(),
                            if r.forgotten { "; the original removed" } else { "" }
                        ),
                        (None, _) => println!(
                            "snapshot {short}: would be repaired ({} files, {} directories)",
                            r.files.len(),
                            r.dirs.len()
                        ),
                    }
                }
            }
            if !g.quiet && !g.json && found.is_empty() {
                println!("no snapshot references lost data");
            }
            // Done when every damaged snapshot was replaced (or, root lost, removed).
            let done = found.iter().all(|r| r.repaired.is_some() || (r.root_lost && r.forgotten));
            Ok(if done { ExitCode::Ok } else { ExitCode::Integrity })
        }
        Command::Repair(which @ (RepairCommand::Index | RepairCommand::Packs)) => {
            let repo = open(false)?;
            let report = if matches!(which, RepairCommand::Index) {
                dataplane::command::repair::repair_index(&repo, &run)?
            } else {
                let (found, report) = dataplane::command::repair::repair_packs(&repo, cores, &run)?;
                for d in found.damage.iter().filter(|d| d.kind == "file" || d.kind == "blob") {
                    reporter.json(json!({"type": "damage", "kind": d.kind, "name": d.name, "detail": d.detail}));
                    if !g.json {
                        eprintln!("{}", describe(d));
                    }
                }
                if !g.quiet && !g.json && report.blobs_left_out > 0 {
                    println!(
                            "{} damaged blobs taken out of the index: back up the files named above again to store them anew",
                            report.blobs_left_out
                        );
                }
                report
            };
            for (pack, detail) in &report.damaged {
                reporter.json(json!({"type": "damage", "kind": "pack", "name": pack, "detail": detail}));
                if !g.json {
                    eprintln!(
                        "damaged pack {pack}: {detail}; its blobs are not indexed (the next backup stores them again)"
                    );
                }
            }
            reporter.json(json!({"type": "repair_summary", "packs": report.packs, "blobs": report.blobs, "damaged_packs": report.damaged.len(), "blobs_left_out": report.blobs_left_out, "runs_written": report.runs_written, "runs_removed": report.runs_removed, "damage_records_removed": report.records_removed}));
            if !g.quiet && !g.json {
                println!(
                    "index rebuilt from {} packs: {} blobs indexed, {} damaged packs left out, {} old index runs replaced",
                    report.packs,
                    report.blobs,
                    report.damaged.len(),
                    report.runs_removed
                );
            }
            let clean = report.damaged.is_empty() && report.blobs_left_out == 0;
            Ok(if clean { ExitCode::Ok } else { ExitCode::Integrity })
        }
        Command::Cert(CertCommand::Issue { name, pki }) => {
            let (cert, key) = dataplane::net::pki::issue(&pki, &name)?;
            reporter.json(json!({"type": "cert_issued", "name": name, "cert": cert, "key": key}));
            if !g.quiet && !g.json {
                println!("wrote {} and {}", cert.display(), key.display());
            }
            Ok(ExitCode::Ok)
        }
        Command::Cert(CertCommand::Revoke { name, pki }) => {
            let crl = dataplane::net::pki::revoke(&pki, &name)?;
            reporter.json(json!({"type": "cert_revoked", "name": name, "crl": crl}));
            if !g.quiet && !g.json {
                println!(
                    "revoked {name}: wrote {} (receivers given it with --crl read it again on SIGHUP)",
                    crl.display()
                );
            }
            Ok(ExitCode::Ok)
        }
        Command::Cert(CertCommand::Dev { out }) => {
            dataplane::net::pki::write_dev_pki(&out, false)?;
            reporter.json(json!({"type": "cert", "dir": out}));
            if !g.quiet && !g.json {
                println!(
                    "wrote {0}/ca.crt, {0}/receiver.crt, {0}/receiver.key, {0}/control.crt, {0}/control.key, {0}/client.crt, {0}/client.key",
                    out.display()
                );
            }
            Ok(ExitCode::Ok)
        }
        Command::Verify { read_data, .. } => {
            let repo = open(false)?;
            let report = verify(repo, read_data, cores, &run)?;
            for stray in &report.strays {
                reporter.json(json!({"type": "warning", "path": stray, "message": "not a cbcr object: skipped by every command; move it out of the repository"}));
                if !g.json {
                    eprintln!(
                        "warning: {stray}: not a cbcr object (skipped by every command); move it out of the repository"
                    );
                }
            }
            for d in &report.damage {
                reporter.json(json!({"type": "damage", "kind": d.kind, "name": d.name, "detail": d.detail}));
                if !g.json {
                    eprintln!("{}", describe(d));
                }
            }
            reporter.json(json!({
                "type": "verify_summary", "snapshots": report.snapshots, "packs": report.packs, "blobs_read": report.blobs,
                "bytes_read": report.bytes_read, "unindexed_packs": report.unindexed_packs, "damaged": report.damage.len(),
                "damaged_recorded": report.damaged_recorded,
            }));
            if !g.quiet && !g.json {
                println!(
                    "{} snapshots, {} packs{}: {}",
                    report.snapshots,
                    report.packs,
                    if read_data { format!(", {} blobs read", report.blobs) } else { String::new() },
                    if report.damage.is_empty() {
                        "no damage".to_string()
                    } else {
                        format!("{} damaged objects", report.damage.len())
                    }
                );
                if report.unindexed_packs > 0 {
                    println!(
                        "note: {} packs are not indexed (left by an interrupted backup; harmless)",
                        report.unindexed_packs
                    );
                }
                if let Some(at) = &report.damaged_recorded {
                    println!(
                        "recorded the damaged blobs in {at}: no backup deduplicates against them and the next backup of their files stores them again; \
                         `cbcr repair packs` takes them out of the index, `cbcr repair snapshots` rewrites snapshots that cannot get them back"
                    );
                }
            }
            Ok(if report.damage.is_empty() { ExitCode::Ok } else { ExitCode::Integrity })
        }
    }
}

fn list_tree(
    reader: &mut dataplane::pipeline::pack::BlobReader<'_>,
    id: &wire::ChunkId,
    at: &Path,
    reporter: &Reporter,
    json: bool,
) -> Result<(), Error> {
    let tree = reader.read_tree(id)?;
    for node in tree.nodes {
        let path = at.join(String::from_utf8_lossy(&node.name).as_ref());
        let kind = match node.kind {
            NodeKind::File { .. } => "file",
            NodeKind::Dir { .. } => "dir",
            NodeKind::Symlink { .. } => "symlink",
        };
        if json {
            reporter.json(json!({"type": "node", "path": path, "kind": kind, "size": node.meta.size, "mode": node.meta.mode, "uid": node.meta.uid, "gid": node.meta.gid, "mtime_ns": node.meta.mtime_ns}));
        } else {
            println!("{}", path.display());
        }
        if let NodeKind::Dir { tree } = node.kind {
            list_tree(reader, &tree, &path, reporter, json)?;
        }
    }
    Ok(())
}

/// `--chunking` as given.
#[derive(Clone, Copy, Debug)]
enum ChunkingArg {
    Auto,
    Cdc,
    Pages(u32),
}

/// The exclusions of a backup: `--exclude` patterns, then those of each `--exclude-file`; a
/// file that cannot be read or a pattern that is not one is a usage error naming it.
fn excludes(patterns: &[String], files: &[PathBuf], postgres_defaults: bool) -> Result<Excludes, Error> {
    let mut all: Vec<(String, String)> = patterns.iter().map(|p| ("--exclude".to_owned(), p.clone())).collect();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::Usage(format!("--exclude-file {}: {e}", file.display())))?;
        all.extend(dataplane::source::exclude::file_patterns(&file.display().to_string(), &text));
    }
    Excludes::new(all.iter().map(|(origin, p)| (origin.clone(), p.as_str())), postgres_defaults)
        .map_err(|e| Error::Usage(e.to_string()))
}

fn parse_chunking(arg: &str) -> Result<(Option<PathBuf>, ChunkingArg), String> {
    match arg.rsplit_once('=') {
        Some(("", _)) => Err(format!("{arg:?}: PATH=POLICY needs a path")),
        Some((path, policy)) => Ok((Some(PathBuf::from(path)), parse_policy(policy)?)),
        None => Ok((None, parse_policy(arg)?)),
    }
}

fn parse_policy(s: &str) -> Result<ChunkingArg, String> {
    match s {
        "auto" => Ok(ChunkingArg::Auto),
        "cdc" => Ok(ChunkingArg::Cdc),
        _ => {
            let size = s.strip_prefix("pages:").ok_or_else(|| format!("{s:?}: use auto, cdc or pages:SIZE"))?;
            let page = dataplane::parse_size(size)?;
            match u32::try_from(page) {
                Ok(p) if (512..=1 << 20).contains(&p) => Ok(ChunkingArg::Pages(p)),
                _ => Err(format!("{s:?}: the page size must be 512 B to 1 MiB")),
            }
        }
    }
}

fn to_u32(v: u64) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Usage(format!("chunk size {v} is too large")))
}
