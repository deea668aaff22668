//! `cbcr receiver`: the storage-host daemon. It serves many sessions at once over QUIC with
//! mutual TLS and stores what they send in ordinary repositories: one, or the several of a
//! policy file, each client limited to what its certificate's grants allow.
//!
//! No global lock on the data path: each session's packs arrive on their own streams and are
//! written and fsynced concurrently; only the last step (rename into `packs/`, write the index
//! run, add it to the in-memory index) is serialised per repository, as is the snapshot commit.
//! A session that misbehaves (garbage frames, a pack that does not match its id, a disconnect
//! mid-pack) loses its stream or its connection; the others go on, and nothing it half-sent
//! becomes visible.

mod jobs;
mod metrics;
mod notify;
mod policy;

use metrics::Metrics;
use notify::Notifier;
use policy::{Access, Denied, Op, Policy};

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use tracing::{info, warn};
use wire::frame::{ErrorCode, Fence, Frame, WelcomeKeys, KEY_OBJECTS_VERSION, MIN_VERSION, TENANT_VERSION, VERSION};
use wire::index::IndexEntry;
use wire::job::JobObject;
use wire::pack::{parse_entries, parse_footer, PackEntry, PackHeader, FOOTER_LEN, HEADER_LEN};
use wire::repo::Encryption;
use wire::ChunkId;

use crate::error::{Error, IoContext, Result};
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::net::quic::{self, StreamError, TlsFiles};
use crate::repo::{first_line, publish_pack, PackFiles, RepoLock, Repository, Secret};

/// What a receiver serves.
pub enum Serves {
    /// One repository (a directory or `s3://BUCKET/PREFIX`, created when there is none and a
    /// password is given); every client the CA signed may do everything.
    One { repo: String, password: Option<Secret> },
    /// The repositories a policy file names (`quic://HOST:PORT/NAME`), each client only what
    /// its certificate's grants allow; the file is re-read on SIGHUP.
    Policy(PathBuf),
}

/// How the receiver was asked to run.
pub struct ReceiverOptions {
    pub listen: SocketAddr,
    pub serves: Serves,
    pub tls: TlsFiles,
    /// A revocation list (PEM): a client certificate it names is refused at the handshake.
    /// Re-read on SIGHUP.
    pub crl: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Cores a `verify` request may use.
    pub cores: usize,
    /// How long in-flight sessions may take to finish after SIGTERM.
    pub grace: Duration,
    /// A session with no request open for this long is closed.
    pub idle_timeout: Duration,
}

// A request that panics (a bug) fails alone: the state these guard stays consistent at every
// step, so a lock it held is taken again rather than failing every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// One repository the receiver serves and what its sessions share.
struct Served {
    repo: Repository,
    known: KnownBlobs,
    /// Serialises the steps that change what is indexed or committed.
    publish: Mutex<()>,
    /// The highest fencing token accepted per job (kept in memory: a restart forgets them).
    fences: Mutex<HashMap<String, u64>>,
    /// When the index last looked for runs other receivers of a shared store wrote.
    refreshed: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
    cores: usize,
    _lock: RepoLock,
}

impl Served {
    /// Opens the repository in `spec` to serve it, holding its writer's claim.
    fn open(spec: &str, password: Option<&[u8]>, metrics: &Arc<Metrics>, cores: usize) -> Result<Self> {
        let repo = Repository::open_to_serve(crate::store::open(spec)?, password)?;
        if !repo.holds_keys() {
            info!("serving {spec} without its key: objects are stored and served sealed; verify runs on the store");
        }
        // One receiver per repository; local backups wait for it like for any other writer.
        let lock = repo.lock()?;
        lock.clean_tmp()?;
        let index = ChunkIndex::load(&*repo.store)?;
        Ok(Served {
            repo,
            known: KnownBlobs::new(index),
            publish: Mutex::new(()),
            refreshed: Mutex::new(None),
            fences: Mutex::default(),
            metrics: Arc::clone(metrics),
            cores,
            _lock: lock,
        })
    }

    fn index(&self) -> &ChunkIndex {
        self.known.index()
    }

    /// Where blob `id` is. A miss asks the store for index runs that other receivers wrote
    /// (several may serve one bucket), at most once per [`limits::INDEX_REFRESH_INTERVAL`].
    fn find(&self, id: &ChunkId) -> Result<Option<IndexEntry>> {
        if let Some(found) = self.index().get(id)? {
            return Ok(Some(found));
        }
        {
            let mut refreshed = lock(&self.refreshed);
            if refreshed.is_some_and(|at| at.elapsed() < limits::INDEX_REFRESH_INTERVAL) {
                return Ok(None);
            }
            *refreshed = Some(Instant::now());
        }
        let added = {
            let _g = lock(&self.publish);
            self.index().refresh(&*self.repo.store)?
        };
        if added > 0 {
            info!("index: {added} runs written by other writers of this repository");
        }
        self.index().get(id)
    }
}

/// What every connection shares: the repositories by name, and who may do what on them.
struct Host {
    /// By the name clients give (`""` for [`Serves::One`]'s).
    served: RwLock<HashMap<String, Arc<Served>>>,
    /// `None`: one repository, every certified client may do everything.
    policy: RwLock<Option<Arc<Policy>>>,
    next_session: AtomicU64,
    /// Open sessions per client certificate (its fingerprint).
    sessions_per_cert: Mutex<HashMap<String, usize>>,
    metrics: Arc<Metrics>,
    cores: usize,
    idle_timeout: Duration,
}

impl Host {
    fn start(serves: &Serves, cores: usize, idle_timeout: Duration) -> Result<Self> {
        let host = Host {
            served: RwLock::default(),
            policy: RwLock::default(),
            next_session: AtomicU64::new(1),
            sessions_per_cert: Mutex::default(),
            metrics: Arc::default(),
            cores,
            idle_timeout,
        };
        match serves {
            Serves::One { repo, password } => {
                let served = Served::open(repo, password.as_deref(), &host.metrics, cores)?;
                write(&host.served).insert(String::new(), Arc::new(served));
            }
            Serves::Policy(path) => host.load_policy(path)?,
        }
        Ok(host)
    }

    /// Reads the policy file, opens every repository it names that is not open yet, and
    /// only then puts it in force: a policy that fails leaves the last good one in force.
    fn load_policy(&self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).at(path)?;
        let policy = Policy::parse(&text).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        let mut opened = vec![];
        for (name, entry) in policy.repositories() {
            if read(&self.served).contains_key(name) {
                continue;
            }
            let password = match &entry.password_file {
                Some(file) => Some(first_line(std::fs::read(file).at(file)?)),
                None => None,
            };
            let served = Served::open(&entry.store, password.as_deref(), &self.metrics, self.cores)
                .map_err(|e| Error::Usage(format!("{}: repository {name:?}: {e}", path.display())))?;
            opened.push((name.clone(), Arc::new(served)));
        }
        let mut served = write(&self.served);
        served.extend(opened);
        let grants = policy.repositories().len();
        *write(&self.policy) = Some(Arc::new(policy));
        info!(target: "audit", event = "policy", file = %path.display(), repositories = grants, "policy {} in force: {grants} repositories", path.display());
        Ok(())
    }

    fn policy(&self) -> Option<Arc<Policy>> {
        read(&self.policy).clone()
    }

    /// The repository a session asks for, if this certificate may use it at all.
    fn choose(&self, names: &[String], repository: &str) -> Result<Arc<Served>, Refusal> {
        match (self.policy(), repository) {
            (None, "") => {}
            (None, name) => {
                return Err(Refusal(
                    ErrorCode::NotFound,
                    format!("no repository {name:?}: this receiver serves one repository, at quic://HOST:PORT"),
                ))
            }
            (Some(policy), "") => {
                let granted = policy.granted(names).join(", ");
                return Err(Refusal(
                    ErrorCode::Denied,
                    format!(
                        "this receiver serves several repositories: name one, quic://HOST:PORT/NAME (this certificate has grants on: {})",
                        if granted.is_empty() { "none" } else { &granted }
                    ),
                ));
            }
            (Some(policy), name) => {
                policy.access(names, name).map_err(Refusal::from)?;
            }
        }
        let served = read(&self.served);
        served
            .get(repository)
            .cloned()
            .ok_or_else(|| Refusal(ErrorCode::Storage, format!("repository {repository:?} is not open")))
    }

    /// What the session may do now (the policy in force, re-read on SIGHUP, decides each
    /// request), if it may do one of `ops`.
    fn allow(&self, names: &[String], repository: &str, ops: &[Op]) -> Result<Access, Refusal> {
        let Some(policy) = self.policy() else { return Ok(Access::unrestricted()) };
        let access = policy.access(names, repository)?;
        if ops.iter().any(|op| access.allow.contains(op)) {
            Ok(access)
        } else {
            Err(policy::not_allowed(&access, ops[0], names, repository).into())
        }
    }
}

/// A request that failed: what the client is told.
struct Refusal(ErrorCode, String);

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::NoSpace(_) => ErrorCode::NoSpace,
            Error::Integrity(_) => ErrorCode::BadPack,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Denied(_) => ErrorCode::Denied,
            // The receiver's own trouble (storage, a bug) is never the client's bad frame.
            _ => ErrorCode::Storage,
        };
        Refusal(code, e.to_string())
    }
}

impl From<Denied> for Refusal {
    fn from(e: Denied) -> Self {
        Refusal(ErrorCode::Denied, e.to_string())
    }
}

impl From<StreamError> for Refusal {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Frame(wire::Error::UnsupportedVersion { found, .. }) => Refusal(
                ErrorCode::Version,
                format!("a frame of protocol version {found}; this receiver speaks {MIN_VERSION} to {VERSION}"),
            ),
            other => Refusal(ErrorCode::BadFrame, other.to_string()),
        }
    }
}

/// Runs the receiver until SIGTERM or SIGINT; returns once in-flight sessions are done.
pub fn run(opts: ReceiverOptions) -> Result<()> {
    let host = Arc::new(Host::start(&opts.serves, opts.cores, opts.idle_timeout)?);
    let server = quic::server_config(&opts.tls, opts.crl.as_deref())?;
    let runtime = quic::runtime(2)?;
    runtime.block_on(serve(host, server, &opts))
}

/// SIGHUP: the policy file and the revocation list again. Whatever fails to load leaves what
/// was in force, and says so.
fn reload(host: &Host, endpoint: &quinn::Endpoint, opts: &ReceiverOptions) {
    if let Serves::Policy(path) = &opts.serves {
        if let Err(e) = host.load_policy(path) {
            warn!(target: "audit", event = "policy_refused", file = %path.display(), "policy not reloaded, the last good one stays in force: {e}");
        }
    }
    if let Some(crl) = &opts.crl {
        match quic::server_config(&opts.tls, Some(crl)) {
            Ok(config) => {
                endpoint.set_server_config(Some(config));
                info!(target: "audit", event = "crl", file = %crl.display(), "revocation list {} in force", crl.display());
            }
            Err(e) => {
                warn!(target: "audit", event = "crl_refused", file = %crl.display(), "revocation list not reloaded, the last good one stays in force: {e}")
            }
        }
    }
}

async fn serve(host: Arc<Host>, server: quinn::ServerConfig, opts: &ReceiverOptions) -> Result<()> {
    let endpoint = quinn::Endpoint::server(server, opts.listen)
        .map_err(|e| Error::Network(format!("cannot listen on {}: {e}", opts.listen)))?;
    let local = endpoint.local_addr().map_err(|e| Error::Network(e.to_string()))?;
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Network(format!("cannot serve metrics on {addr}: {e}")))?;
        info!("metrics on http://{}/metrics", listener.local_addr().map_err(|e| Error::Network(e.to_string()))?);
        tokio::spawn(metrics::serve(listener, Arc::clone(&host.metrics)));
    }
    let names: Vec<String> = {
        let served = read(&host.served);
        let mut names: Vec<String> = served
            .iter()
            .map(|(n, s)| if n.is_empty() { s.repo.location() } else { format!("{n}={}", s.repo.location()) })
            .collect();
        names.sort();
        names
    };
    info!("receiver listening on {local}, serving {}", names.join(", "));
    // Printed for scripts that start the receiver on port 0.
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    let mut notifier = Notifier::start();
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(|e| Error::Network(e.to_string()));
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = signal(tokio::signal::unix::SignalKind::hangup())?;
    // Connections being served; the shutdown waits for them.
    let sessions = Arc::new(AtomicU64::new(0));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hangup.recv() => {
                let h = Arc::clone(&host);
                let e = endpoint.clone();
                // Opening a new repository reads its index: off the accept loop.
                tokio::task::block_in_place(|| reload(&h, &e, opts));
                continue;
            }
        };
        if host.metrics.sessions_active.get() >= limits::RECEIVER_SESSIONS as i64 {
            host.metrics.sessions_refused.inc();
            warn!("refusing {}: {} sessions open", incoming.remote_address(), limits::RECEIVER_SESSIONS);
            incoming.refuse();
            continue;
        }
        let host = Arc::clone(&host);
        sessions.fetch_add(1, Ordering::AcqRel);
        let done = Arc::clone(&sessions);
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            match incoming.await {
                Ok(conn) => connection(host, conn).await,
                Err(e) => {
                    host.metrics.sessions_refused.inc();
                    warn!(target: "audit", event = "handshake_refused", %peer, "{peer}: handshake failed: {e}");
                }
            }
            done.fetch_sub(1, Ordering::AcqRel);
        });
    }
    notifier.stopping();
    let open = sessions.load(Ordering::Acquire);
    info!("shutting down: no new sessions; waiting up to {:?} for {open} open", opts.grace);
    let deadline = tokio::time::Instant::now() + opts.grace;
    while sessions.load(Ordering::Acquire) > 0 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                warn!("{} sessions still open after {:?}: closing them", sessions.load(Ordering::Acquire), opts.grace);
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            // New clients are told at once rather than left to time out.
            Some(incoming) = endpoint.accept() => incoming.refuse(),
        }
    }
    endpoint.close((ErrorCode::ShuttingDown as u32).into(), b"receiver shutting down");
    endpoint.wait_idle().await;
    // Commits merged nothing on the way: one merge now leaves one run for the next start.
    let all: Vec<Arc<Served>> = read(&host.served).values().cloned().collect();
    for s in all {
        let merged = tokio::task::spawn_blocking(move || {
            let _g = lock(&s.publish);
            s.index().compact_all(&*s.repo.store).map_err(|e| (s.repo.location(), e))
        })
        .await
        .expect("the merge does not panic");
        if let Err((location, e)) = merged {
            warn!("{location}: index runs not merged at shutdown: {e}");
        }
    }
    notifier.finish();
    info!("receiver stopped");
    Ok(())
}

/// Who the client is: its certificate's fingerprint (the CA vouched for it) and the names its
/// policy grants go to.
fn identity(conn: &Connection) -> (String, Vec<String>) {
    let Some(cert) = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned())
    else {
        return ("unknown".into(), vec![]);
    };
    (wire::tls::fingerprint(cert.as_ref()), wire::tls::certificate_names(cert.as_ref()))
}

/// A connection's session, once its `Hello` was answered.
struct Session {
    id: u64,
    /// The protocol version agreed on: every reply is in it.
    version: u8,
    /// The repository's name, as the policy knows it.
    name: String,
    served: Arc<Served>,
}

type SessionCell = std::sync::OnceLock<Session>;

/// The version a reply on this connection is in: the session's, or before it the oldest.
fn reply_version(session: &SessionCell) -> u8 {
    session.get().map_or(MIN_VERSION, |s| s.version)
}

/// Who is on the other end of a connection, as the audit names it.
struct Peer {
    addr: SocketAddr,
    /// The certificate's fingerprint.
    cert: String,
    /// The certificate's names (what grants go to), joined, for logs.
    identity: String,
    names: Vec<String>,
}

/// Counts a certificate's open sessions while it lives.
struct IdentitySlot<'a> {
    host: &'a Host,
    cert: String,
}

impl Drop for IdentitySlot<'_> {
    fn drop(&mut self) {
        let mut open = lock(&self.host.sessions_per_cert);
        if let Some(n) = open.get_mut(&self.cert) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.cert);
            }
        }
    }
}

/// A request being served on a connection: the connection is not idle while one lives.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(host: Arc<Host>, conn: Connection) {
    let (cert, names) = identity(&conn);
    let peer = Arc::new(Peer { addr: conn.remote_address(), cert, identity: names.join(","), names });
    let p = &peer;
    let _slot = {
        let mut open = lock(&host.sessions_per_cert);
        let n = open.entry(p.cert.clone()).or_default();
        if *n >= limits::RECEIVER_SESSIONS_PER_IDENTITY {
            drop(open);
            host.metrics.sessions_refused.inc();
            host.metrics.refused(&p.identity, ErrorCode::Denied);
            warn!(target: "audit", event = "refused", session = 0, peer = %p.addr, cert = %p.cert, identity = %p.identity, stage = "session", "{} ({}): {} sessions of this certificate are open already", p.addr, p.identity, limits::RECEIVER_SESSIONS_PER_IDENTITY);
            conn.close((ErrorCode::Denied as u32).into(), b"too many sessions open for this client certificate");
            return;
        }
        *n += 1;
        IdentitySlot { host: &host, cert: p.cert.clone() }
    };
    let session = Arc::new(SessionCell::new());
    // Bytes of requests this connection holds in memory (see `limits::RECEIVER_CONNECTION_BUFFER`).
    let budget = Arc::new(tokio::sync::Semaphore::new(limits::RECEIVER_CONNECTION_BUFFER));
    let in_flight = Arc::new(AtomicU64::new(0));
    host.metrics.sessions_active.inc();
    loop {
        let accepted = tokio::time::timeout(host.idle_timeout, conn.accept_bi()).await;
        let (send, recv) = match accepted {
            Ok(Ok(s)) => s,
            Err(_) if in_flight.load(Ordering::Acquire) > 0 => continue,
            Err(_) => {
                let id = session.get().map_or(0, |s| s.id);
                info!(target: "audit", event = "session_end", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, "session {id} from {}: idle for {:?}, closed", p.addr, host.idle_timeout);
                conn.close((ErrorCode::Other as u32).into(), b"idle session closed by the receiver");
                break;
            }
            Ok(Err(e)) => {
                if let Some(s) = session.get() {
                    info!(target: "audit", event = "session_end", session = s.id, peer = %p.addr, cert = %p.cert, identity = %p.identity, "session {} from {} ended: {e}", s.id, p.addr);
                }
                break;
            }
        };
        in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(Arc::clone(&in_flight));
        let (host, session, peer, budget) =
            (Arc::clone(&host), Arc::clone(&session), Arc::clone(&peer), Arc::clone(&budget));
        tokio::spawn(async move {
            stream(host, session, peer, &budget, send, recv).await;
            drop(guard);
        });
    }
    host.metrics.sessions_active.dec();
}

/// Reads a stream's request: a request kind (checked from the header, before anything is
/// allocated) whose payload, and for a pack the piece it is received through, fits in the
/// connection's budget (waited for).
async fn read_request<'b>(
    recv: &mut RecvStream,
    budget: &'b tokio::sync::Semaphore,
) -> Result<Option<(Frame, tokio::sync::SemaphorePermit<'b>)>, Refusal> {
    let Some((kind, version, len)) = quic::read_header(recv).await? else { return Ok(None) };
    if !kind.is_request() {
        return Err(Refusal(ErrorCode::BadFrame, format!("a {kind:?} frame is not a request")));
    }
    let need = len as usize + if kind == wire::frame::FrameKind::PutPack { limits::PACK_SEND_PIECE } else { 0 };
    let permit = budget
        .acquire_many(need as u32)
        .await
        .map_err(|_| Refusal(ErrorCode::Other, "the connection is closing".into()))?;
    let frame = quic::read_payload(recv, (kind, version, len)).await?;
    Ok(Some((frame, permit)))
}

/// One request on one stream.
async fn stream(
    host: Arc<Host>,
    session: Arc<SessionCell>,
    peer: Arc<Peer>,
    budget: &tokio::sync::Semaphore,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let started = Instant::now();
    let (stage, result) = match read_request(&mut recv, budget).await {
        Ok(Some((frame, _permit))) => {
            let stage = stage_name(&frame);
            (stage, request(&host, &session, &peer, frame, &mut send, &mut recv).await)
        }
        Ok(None) => return,
        Err(e) => ("frame", Err(e)),
    };
    host.metrics.observe(stage, started.elapsed());
    match result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(Refusal(code, message)) => {
            host.metrics.errors.inc();
            host.metrics.refused(&peer.identity, code);
            // Session 0: the request came before any session.
            let id = session.get().map_or(0, |s| s.id);
            let repository = session.get().map_or("", |s| s.name.as_str());
            let p = &peer;
            warn!(target: "audit", event = "refused", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository, stage, code = ?code, "{} (session {id}, {}): {stage}: {message}", p.addr, p.identity);
            let _ = quic::write_frame(&mut send, &Frame::Error { code, message }, reply_version(&session)).await;
            let _ = send.finish();
            let _ = recv.stop(0u32.into());
        }
    }
}

fn stage_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "hello",
        Frame::Have { .. } => "have",
        Frame::PutPack { .. } => "pack",
        Frame::GetBlobs { .. } => "blobs",
        Frame::ListSnapshots { .. } => "snapshots",
        Frame::Commit { .. } => "commit",
        Frame::Verify { .. } => "verify",
        Frame::Forget { .. } => "forget",
        Frame::PutJobObject { .. }
        | Frame::GetJobObject { .. }
        | Frame::DeleteJobObject { .. }
        | Frame::ListJobObjects { .. } => "job",
        _ => "unexpected",
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Refusal::from),
        Err(e) => Err(Refusal(ErrorCode::Other, format!("request failed: {e}"))),
    }
}

/// What a client's `Hello` says.
struct Hello<'f> {
    min: u8,
    max: u8,
    client: &'f str,
    repository: &'f str,
}

/// The session's answer to a `Hello`.
async fn hello(
    host: &Host,
    session: &SessionCell,
    peer: &Peer,
    Hello { min, max, client, repository }: Hello<'_>,
    send: &mut SendStream,
) -> Result<(), Refusal> {
    let version = wire::frame::agree(min, max).ok_or_else(|| {
        Refusal(
            ErrorCode::Version,
            format!(
                "the client speaks protocol versions {min} to {max}; this receiver speaks {MIN_VERSION} to {VERSION}"
            ),
        )
    })?;
    let served = host.choose(&peer.names, repository)?;
    if host.policy().is_some() && version < TENANT_VERSION {
        return Err(Refusal(
            ErrorCode::Version,
            format!("this receiver serves repositories under a policy: the client must speak protocol version {TENANT_VERSION} (upgrade cbcr)"),
        ));
    }
    let keys = if version >= KEY_OBJECTS_VERSION {
        let s = Arc::clone(&served);
        WelcomeKeys::Objects(blocking(move || s.repo.key_objects()).await?)
    } else if served.repo.config.encryption == Encryption::None {
        WelcomeKeys::Raw(*served.repo.key.as_bytes())
    } else {
        return Err(Refusal(
            ErrorCode::Version,
            format!("this repository is encrypted: the client must speak protocol version {KEY_OBJECTS_VERSION} (upgrade cbcr)"),
        ));
    };
    let config = served.repo.config.encode();
    let id = host.next_session.fetch_add(1, Ordering::Relaxed);
    if session.set(Session { id, version, name: repository.to_owned(), served }).is_err() {
        return Err(Refusal(ErrorCode::BadFrame, "this connection already has a session".into()));
    }
    host.metrics.sessions_total.inc();
    let p = peer;
    info!(target: "audit", event = "session", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository, client, version, "session {id} from {}: client {client:?}, certificate {} ({}), repository {repository:?}, protocol version {version}", p.addr, p.cert, p.identity);
    reply(send, &Frame::Welcome { version, session: id, config, keys }, version).await
}

async fn request(
    host: &Host,
    session: &SessionCell,
    peer: &Peer,
    frame: Frame,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), Refusal> {
    if let Frame::Hello { min, max, client, repository } = &frame {
        return hello(host, session, peer, Hello { min: *min, max: *max, client, repository }, send).await;
    }
    let s = match (frame.session(), session.get()) {
        (Some(asked), Some(ours)) if asked == ours.id => ours,
        (Some(asked), _) => {
            return Err(Refusal(ErrorCode::UnknownSession, format!("no session {asked} on this connection")))
        }
        (None, _) => return Err(Refusal(ErrorCode::BadFrame, format!("a {:?} frame is not a request", frame.kind()))),
    };
    let (version, store, id) = (s.version, &s.served, s.id);
    let allow = |ops: &[Op]| host.allow(&peer.names, &s.name, ops);
    let p = peer;
    match frame {
        Frame::Have { ids, .. } => {
            allow(&[Op::Backup])?;
            store.metrics.have_ids.inc_by(ids.len() as u64);
            let s = Arc::clone(store);
            let present =
                blocking(move || ids.iter().map(|id| s.index().contains(id)).collect::<Result<Vec<_>>>()).await?;
            reply(send, &Frame::HaveReply { present }, version).await
        }
        Frame::PutPack { .. } => {
            allow(&[Op::Backup])?;
            let id = receive_pack(store, recv).await?;
            reply(send, &Frame::PackStored { id }, version).await
        }
        Frame::GetBlobs { ids, .. } => {
            // A backup reads its parent's trees and chunk lists.
            allow(&[Op::Restore, Op::Backup])?;
            info!(target: "audit", event = "read", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), blobs = ids.len(), "session {id} ({}): reads {} blobs", p.identity, ids.len());
            send_blobs(store, ids, send, version).await
        }
        Frame::ListSnapshots { .. } => {
            let access = allow(&[Op::List, Op::Backup, Op::Restore])?;
            info!(target: "audit", event = "list", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), "session {id} ({}): lists snapshots", p.identity);
            let (st, restricted) = (Arc::clone(store), access.restricted());
            let (listed, writers) = blocking(move || {
                let writers = if restricted { st.repo.snapshot_writers()? } else { HashMap::new() };
                Ok((st.repo.stored_snapshots()?, writers))
            })
            .await?;
            for (snapshot, record) in listed {
                let ours = access.may_parent(writers.get(&snapshot).map(String::as_str));
                reply(send, &Frame::SnapshotRecord { id: snapshot, record, ours }, version).await?;
            }
            Ok(())
        }
        Frame::Commit { record, fence, root, .. } => {
            let access = allow(&[Op::Backup])?;
            let bad = |m: String| Refusal(ErrorCode::BadFrame, format!("snapshot record: {m}"));
            // A receiver with the key checks the record itself; one without trusts the root
            // named beside it (the record is the client's own, sealed).
            let root = if store.repo.holds_keys() {
                let tree = store.repo.open_snapshot(&record).map_err(|e| bad(e.to_string()))?.tree_id();
                if root.is_some_and(|r| r != tree) {
                    return Err(bad(format!("names root {} beside a record of root {tree}", root.unwrap_or_default())));
                }
                tree
            } else {
                root.ok_or_else(|| bad("sealed, and the commit names no root tree (protocol 3 does)".into()))?
            };
            let st = Arc::clone(store);
            let writer = access.writer().map(str::to_owned);
            let snapshot = match tokio::task::spawn_blocking(move || {
                commit(&st, &record, root, fence.as_ref(), writer.as_deref())
            })
            .await
            {
                Ok(r) => r?,
                Err(e) => return Err(Refusal(ErrorCode::Other, format!("commit failed: {e}"))),
            };
            store.metrics.commits.inc();
            info!(target: "audit", event = "commit", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), writer = access.writer().unwrap_or(""), snapshot = %snapshot, "session {id} ({}): committed snapshot {snapshot}", p.identity);
            reply(send, &Frame::Committed { id: snapshot }, version).await
        }
        Frame::Forget { ids, .. } => {
            allow(&[Op::Forget])?;
            let st = Arc::clone(store);
            let gone = blocking(move || {
                let _g = lock(&st.publish);
                st.repo.forget(&ids)
            })
            .await?;
            for snapshot in &gone {
                info!(target: "audit", event = "forget", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), snapshot = %snapshot, "session {id} ({}): forgot snapshot {snapshot}", p.identity);
            }
            reply(send, &Frame::Forgotten { ids: gone }, version).await
        }
        Frame::Verify { read_data, .. } => {
            allow(&[Op::Verify])?;
            info!(target: "audit", event = "verify", session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), read_data, "session {id} ({}): verify", p.identity);
            if !store.repo.holds_keys() {
                return Err(Refusal(
                    ErrorCode::Other,
                    "this receiver holds no key for the repository: run `cbcr verify` on its store (the directory or s3:// it serves) with the password, or give the receiver the password".into(),
                ));
            }
            let st = Arc::clone(store);
            let (damaged, report) = blocking(move || {
                let r =
                    crate::command::verify::verify(st.repo.clone(), read_data, st.cores, &crate::events::Run::quiet())?;
                // What it recorded as damaged is passed over from now on, as after a restart.
                st.index().reload_damaged(&*st.repo.store)?;
                Ok((!r.damage.is_empty(), serde_json::to_vec(&r).expect("a report serialises")))
            })
            .await?;
            reply(send, &Frame::VerifyReport { damaged, report }, version).await
        }
        Frame::PutJobObject { ref name, .. } | Frame::DeleteJobObject { ref name, .. } => {
            let access = allow(&[Op::Backup])?;
            let object = name.name();
            let event = if matches!(frame, Frame::PutJobObject { .. }) { "job_put" } else { "job_delete" };
            // Every checkpoint is a put: the audit names plans and shard starts, and deletes.
            let audited = !matches!(frame, Frame::PutJobObject { name: JobObject::Checkpoint { .. }, .. });
            let st = Arc::clone(store);
            let replies = blocking(move || jobs::serve(&st, &access, frame)).await?;
            if audited {
                info!(target: "audit", event, session = id, peer = %p.addr, cert = %p.cert, identity = %p.identity, repository = s.name.as_str(), object = object.as_str(), "session {id} ({}): {event} {object}", p.identity);
            }
            for frame in &replies {
                reply(send, frame, version).await?;
            }
            Ok(())
        }
        Frame::GetJobObject { .. } | Frame::ListJobObjects { .. } => {
            let access = allow(&[Op::Backup, Op::List])?;
            let st = Arc::clone(store);
            for frame in &blocking(move || jobs::serve(&st, &access, frame)).await? {
                reply(send, frame, version).await?;
            }
            Ok(())
        }
        other => Err(Refusal(ErrorCode::BadFrame, format!("a {:?} frame is not a request", other.kind()))),
    }
}

async fn reply(send: &mut SendStream, frame: &Frame, version: u8) -> Result<(), Refusal> {
    quic::write_frame(send, frame, version)
        .await
        .map_err(|e| Refusal(ErrorCode::Other, format!("client went away: {e}")))
}

/// A snapshot is committed only when its root tree is indexed here: every pack the client sent
/// was durable before it was acknowledged, and the client commits after its last
/// acknowledgement, so everything below the root is durable too. A fenced commit is refused
/// when a higher token was accepted for its job (a writer that lost its claim). Under a
/// policy, `writer` is who the snapshot is recorded as committed by.
fn commit(
    store: &Served,
    record: &[u8],
    root: ChunkId,
    fence: Option<&Fence>,
    writer: Option<&str>,
) -> Result<ChunkId, Refusal> {
    if store.find(&root)?.is_none() {
        return Err(Refusal(ErrorCode::Incomplete, format!("snapshot's root tree {root} is not stored here")));
    }
    let _g = lock(&store.publish);
    let mut fences = lock(&store.fences);
    if let Some(Fence { job, token }) = fence {
        if let Some(highest) = fences.get(job).filter(|h| *h > token) {
            return Err(Refusal(
                ErrorCode::Fenced,
                format!(
                    "job {job:?}: token {token} is lower than {highest}, accepted before; this writer lost its claim"
                ),
            ));
        }
    }
    let id = store.repo.commit_record(record, writer)?;
    if let Some(Fence { job, token }) = fence {
        let highest = fences.entry(job.clone()).or_default();
        *highest = (*highest).max(*token);
    }
    Ok(id)
}

/// Receives a pack into `tmp/`, checks it, and makes it durable and indexed; returns its id.
/// On any failure the partial file is removed: nothing half-sent becomes visible.
async fn receive_pack(store: &Arc<Served>, recv: &mut RecvStream) -> Result<ChunkId, Refusal> {
    let tmp = store.repo.store.tmp_path("pack");
    let file = std::fs::OpenOptions::new().create_new(true).write(true).read(true).open(&tmp).at(&tmp)?;
    let received = async {
        let mut hasher = blake3::Hasher::new();
        // QUIC hands over a datagram's worth at a time: gather a piece, then one write.
        let mut piece = vec![0u8; limits::PACK_SEND_PIECE];
        let (mut len, mut filled) = (0u64, 0usize);
        loop {
            let n = match recv.read(&mut piece[filled..]).await {
                Ok(Some(n)) => n,
                Ok(None) => 0,
                Err(e) => return Err(Refusal(ErrorCode::BadPack, format!("client went away mid-pack: {e}"))),
            };
            filled += n;
            if filled == piece.len() || (n == 0 && filled > 0) {
                if len + filled as u64 > wire::limits::MAX_PACK_LEN {
                    return Err(Refusal(ErrorCode::BadPack, format!("pack over {} bytes", wire::limits::MAX_PACK_LEN)));
                }
                file.write_all_at(&piece[..filled], len).at(&tmp)?;
                hasher.update(&piece[..filled]);
                len += filled as u64;
                store.metrics.bytes_received.inc_by(filled as u64);
                filled = 0;
            }
            if n == 0 {
                break;
            }
        }
        Ok((ChunkId(*hasher.finalize().as_bytes()), len))
    }
    .await;
    let (id, len) = match received {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let s = Arc::clone(store);
    blocking(move || store_pack(&s, id, file, len, &tmp).map_err(PackRejected::into_error)).await?;
    store.metrics.packs_stored.inc();
    Ok(id)
}

/// Why a received pack was not stored.
enum PackRejected {
    Bad(String),
    Io(Error),
}

impl PackRejected {
    fn into_error(self) -> Error {
        match self {
            PackRejected::Bad(m) => Error::Integrity(m),
            PackRejected::Io(e) => e,
        }
    }
}

impl From<Error> for PackRejected {
    fn from(e: Error) -> Self {
        PackRejected::Io(e)
    }
}

fn store_pack(store: &Served, id: ChunkId, file: std::fs::File, len: u64, tmp: &Path) -> Result<(), PackRejected> {
    let result = check_and_publish(store, id, &file, len, tmp);
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn check_and_publish(
    store: &Served,
    id: ChunkId,
    file: &std::fs::File,
    len: u64,
    tmp: &Path,
) -> Result<(), PackRejected> {
    let bad = |e: wire::Error| PackRejected::Bad(format!("pack {id}: {e}"));
    if len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(PackRejected::Bad(format!("pack {id}: {len} bytes is shorter than a pack")));
    }
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, 0).at(tmp)?;
    PackHeader::check(&head).map_err(bad)?;
    let mut foot = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut foot, len - FOOTER_LEN as u64).at(tmp)?;
    let loc = parse_footer(&foot, len).map_err(bad)?;
    let mut entries = vec![0u8; loc.entries_len()];
    file.read_exact_at(&mut entries, loc.entries_offset).at(tmp)?;
    let entries: Vec<PackEntry> = parse_entries(&loc, &entries).map_err(bad)?;
    if store.repo.holds_keys() {
        check_blobs(store, id, file, &entries, tmp)?;
    }
    crate::store::sync_file(file, tmp)?;
    let _g = lock(&store.publish);
    publish_pack(&*store.repo.store, &store.known, tmp, &id, &entries)?;
    Ok(())
}

/// A receiver that holds the repository's key (plaintext, or given the password) checks every
/// blob a client sends: it opens, decompresses, and its content hashes to its id. Without
/// this a client could store garbage under the id of data another client has not backed up
/// yet, and that client's backup would deduplicate against it. A block delta is rebuilt on its
/// base (read from the repository, its own chain rebuilt and checked) and the block hashed.
fn check_blobs(
    store: &Served,
    id: ChunkId,
    file: &std::fs::File,
    entries: &[PackEntry],
    tmp: &Path,
) -> Result<(), PackRejected> {
    let mut decoder = crate::pipeline::pack::BlobDecoder::new(&store.repo)?;
    let mut bases = None;
    let (mut stored, mut raw, mut base, mut block) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        let bad = |why: String| PackRejected::Bad(format!("pack {id}: blob {}: {why}", e.id));
        stored.resize(e.stored_len() as usize, 0);
        file.read_exact_at(&mut stored, e.offset()).at(tmp)?;
        raw.clear();
        decoder.decode(&stored, e, &mut raw).map_err(&bad)?;
        let content = if e.kind() == wire::BlobKind::Delta {
            let delta = wire::delta::BlockDelta::decode(&raw).map_err(|why| bad(why.to_string()))?;
            let reader = match &mut bases {
                Some(reader) => reader,
                None => bases.insert(crate::pipeline::pack::BlobReader::new(&store.repo, store.known.index())?),
            };
            base.clear();
            let depth = reader.read_block(&delta.base, &mut base).map_err(|why| bad(format!("its base: {why}")))?;
            if depth >= delta.depth {
                return Err(bad(format!("a delta of depth {} on a base of depth {depth}", delta.depth)));
            }
            block.clear();
            delta.apply(&base, &mut block).map_err(|why| bad(why.to_string()))?;
            &block
        } else {
            &raw
        };
        if store.repo.key.blob_id(content) != e.id {
            return Err(bad("its content does not match its id".into()));
        }
    }
    Ok(())
}

/// Streams blobs back in the order asked; a reader thread stays at most a few blobs ahead, so
/// the stream's flow control bounds memory on both sides.
async fn send_blobs(store: &Arc<Served>, ids: Vec<ChunkId>, send: &mut SendStream, version: u8) -> Result<(), Refusal> {
    // The reader thread hands over runs of frames (~PACK_SEND_PIECE each), not single blobs:
    // one thread switch per run instead of per (often few-KiB) blob.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Refusal>>(4);
    let s = Arc::clone(store);
    let reader = tokio::task::spawn_blocking(move || {
        let mut packs = PackFiles::default();
        let mut run = Vec::new();
        for id in ids {
            match blob_frame(&s, &id, &mut packs, &mut run, version) {
                Ok(()) if run.len() < limits::PACK_SEND_PIECE => continue,
                Ok(()) => {
                    if tx.blocking_send(Ok(std::mem::take(&mut run))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // What was read goes first, so the client sees every blob before the error.
                    let _ = tx.blocking_send(Ok(std::mem::take(&mut run)));
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        if !run.is_empty() {
            let _ = tx.blocking_send(Ok(run));
        }
    });
    while let Some(frames) = rx.recv().await {
        // Handed to quinn as is: the pack bytes are copied once, from the page cache.
        send.write_chunk(frames?.into())
            .await
            .map_err(|e| Refusal(ErrorCode::Other, format!("client went away: {e}")))?;
    }
    drop(rx);
    let _ = reader.await;
    Ok(())
}

/// Appends a whole `Blob` frame to `out`, the stored bytes read from the pack straight into it.
fn blob_frame(
    store: &Served,
    id: &ChunkId,
    packs: &mut PackFiles,
    out: &mut Vec<u8>,
    version: u8,
) -> Result<(), Refusal> {
    let found = store.find(id)?;
    let IndexEntry { pack, entry } =
        found.ok_or_else(|| Refusal(ErrorCode::NotFound, format!("blob {id} is not in this repository")))?;
    let frame_start = out.len();
    out.extend_from_slice(&Frame::blob_prefix(&entry, version));
    let start = out.len();
    out.resize(start + entry.stored_len() as usize, 0);
    if let Err(e) = packs.read_at(&*store.repo.store, &pack, entry.offset(), &mut out[start..]) {
        out.truncate(frame_start);
        return Err(e.into());
    }
    store.metrics.blobs_sent.inc();
    Ok(())
}
