//! `cbcr-control serve`: the HTTPS/JSON API (axum over rustls, mutual TLS with the fleet's PKI)
//! around [`Fleet`]. A thin driver: it authenticates the caller, checks its [`Role`], reads the
//! clock, and hands the request to the fleet; every mutating call is logged (target `audit`)
//! with the caller's identity. The embedded store keeps the registry; a registration through
//! the API is written there before the fleet sees it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};
use wire::control::{ApiError, Heartbeat, NodeStatus, Orders, Register, Registered, ShardReport, Status};

use super::fleet::{Fleet, FleetError};
use super::registry_file::{DbEntry, WrittenEntry};
use super::roles::{Role, Roles};
use super::store::{FleetStore, StoreError};
use crate::core::machine::CoreError;
use crate::core::registry::RegistryError;
use crate::core::Millis;

/// How often the fleet's time moves on without a request (leases expire, backups are placed).
pub const TICK: Duration = Duration::from_millis(500);
/// A TLS handshake that takes longer is dropped: a client cannot hold a connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight, and accepted connections waiting for the server loop, at most.
const ACCEPT_QUEUE: usize = 256;

/// Who called: where from, and the names its certificate (signed by the fleet's CA) carries.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub names: Vec<String>,
    pub fingerprint: String,
}

/// TCP accept, then the TLS handshake off the accept loop; what axum serves are the
/// connections whose client certificate verified.
pub struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
}

impl TlsListener {
    pub fn start(tcp: TcpListener, tls: rustls::ServerConfig) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tx, ready) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
        let slots = Arc::new(tokio::sync::Semaphore::new(ACCEPT_QUEUE));
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                            let cert = cert.unwrap_or_default();
                            let peer = Peer {
                                addr,
                                names: wire::tls::certificate_names(&cert),
                                fingerprint: wire::tls::fingerprint(&cert),
                            };
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            warn!(target: "audit", event = "handshake_refused", peer = %addr, "TLS handshake with {addr} refused: {e}")
                        }
                        Err(_) => warn!("TLS handshake with {addr}: no answer within {HANDSHAKE_TIMEOUT:?}"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, names: vec![], fingerprint: String::new() })
    }
}

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// An API error: the status and what was wrong.
pub struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<FleetError> for Refusal {
    fn from(e: FleetError) -> Self {
        let status = match &e {
            FleetError::UnknownNode(_) | FleetError::Core(CoreError::UnknownShard(_)) => StatusCode::NOT_FOUND,
            // A stale token, or a lease the node does not hold.
            FleetError::Core(CoreError::Lease(_)) => StatusCode::CONFLICT,
            FleetError::Core(CoreError::Registry(RegistryError::UnknownDb(_) | RegistryError::UnknownNode(_))) => {
                StatusCode::NOT_FOUND
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Refusal(status, e.to_string())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::UnknownDb(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal(status, e.to_string())
    }
}

struct Shared {
    fleet: Fleet,
    store: FleetStore,
    /// The last time handed to the fleet: wall-clock time, never going back.
    last: Millis,
}

impl Shared {
    /// Milliseconds since the Unix epoch (the core's windows are UTC times of day), held from
    /// going back when the system clock is stepped.
    fn now(&mut self) -> Millis {
        self.last = self.last.max(wall_clock());
        self.last
    }
}

fn wall_clock() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

pub struct Api {
    shared: Mutex<Shared>,
    roles: Roles,
    heartbeat: Duration,
}

type ApiResult<T> = Result<Json<T>, Refusal>;

impl Api {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic under the lock is a bug; the state is still the core's last consistent one.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The caller's role, or a refusal naming who it is; `allowed` lists the roles that may.
    fn allow<'p>(&self, peer: &'p Peer, allowed: &[Role]) -> Result<(Role, &'p str), Refusal> {
        let Some((role, name)) = self.roles.role(&peer.names) else {
            warn!(target: "audit", event = "denied", peer = %peer.addr, cert = %peer.fingerprint, names = ?peer.names, "{}: no role for {:?}", peer.addr, peer.names);
            return Err(Refusal(StatusCode::FORBIDDEN, format!("no role for the certificate names {:?}", peer.names)));
        };
        if !allowed.contains(&role) {
            warn!(target: "audit", event = "denied", peer = %peer.addr, identity = name, ?role, "{name} ({role:?}) may not do this");
            return Err(Refusal(StatusCode::FORBIDDEN, format!("{name} is {role:?}: not allowed")));
        }
        Ok((role, name))
    }

    /// An agent acts only as the node its certificate names; an operator as any.
    fn as_node(&self, peer: &Peer, node: &str) -> Result<(), Refusal> {
        let (role, name) = self.allow(peer, &[Role::Agent, Role::Operator])?;
        if role == Role::Agent && !peer.names.iter().any(|n| n == node) {
            warn!(target: "audit", event = "denied", peer = %peer.addr, identity = name, node, "{name} tried to act as node {node}");
            return Err(Refusal(StatusCode::FORBIDDEN, format!("{name} may only act as itself, not as node {node:?}")));
        }
        Ok(())
    }
}

async fn status(State(api): State<Arc<Api>>, ConnectInfo(peer): ConnectInfo<Peer>) -> ApiResult<Status> {
    api.allow(&peer, &[Role::Operator, Role::Reader, Role::Agent])?;
    Ok(Json(api.lock().fleet.status()))
}

async fn nodes(State(api): State<Arc<Api>>, ConnectInfo(peer): ConnectInfo<Peer>) -> ApiResult<Vec<NodeStatus>> {
    api.allow(&peer, &[Role::Operator, Role::Reader])?;
    let mut s = api.lock();
    let now = s.now();
    Ok(Json(s.fleet.nodes(now)))
}

async fn dbs(State(api): State<Arc<Api>>, ConnectInfo(peer): ConnectInfo<Peer>) -> ApiResult<Vec<WrittenEntry>> {
    api.allow(&peer, &[Role::Operator, Role::Reader])?;
    Ok(Json(api.lock().fleet.dbs().map(DbEntry::written).collect()))
}

#[derive(serde::Deserialize)]
struct Replace {
    #[serde(default)]
    replace: bool,
}

async fn add_db(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Query(q): Query<Replace>,
    Json(written): Json<WrittenEntry>,
) -> ApiResult<serde_json::Value> {
    let (_, who) = api.allow(&peer, &[Role::Operator])?;
    let entry = written.check().map_err(|e| Refusal(StatusCode::BAD_REQUEST, e))?;
    let mut s = api.lock();
    let now = s.now();
    s.fleet.accepts(&entry)?;
    let put = s.store.put_dbs(std::slice::from_ref(&entry), q.replace)?[0];
    info!(target: "audit", event = "db_add", identity = who, db = entry.name.as_str(), ?put, "{who}: db add {} ({put:?})", entry.name);
    if put != super::store::Put::Unchanged {
        s.fleet.add_db(now, entry)?;
    }
    Ok(Json(serde_json::json!({ "put": put })))
}

async fn remove_db(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let (_, who) = api.allow(&peer, &[Role::Operator])?;
    let mut s = api.lock();
    let now = s.now();
    s.store.remove_db(&name)?;
    s.fleet.remove_db(now, &name)?;
    info!(target: "audit", event = "db_rm", identity = who, db = name.as_str(), "{who}: db rm {name}");
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn drain(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(node): Path<String>,
) -> ApiResult<serde_json::Value> {
    let (_, who) = api.allow(&peer, &[Role::Operator])?;
    let mut s = api.lock();
    let now = s.now();
    s.fleet.drain(now, &node)?;
    info!(target: "audit", event = "node_drain", identity = who, node = node.as_str(), "{who}: node drain {node}");
    Ok(Json(serde_json::json!({ "draining": node })))
}

async fn register(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(r): Json<Register>,
) -> ApiResult<Registered> {
    api.as_node(&peer, &r.node)?;
    let mut s = api.lock();
    let now = s.now();
    s.fleet.register(now, &r)?;
    info!(target: "audit", event = "node_register", node = r.node.as_str(), peer = %peer.addr, cores = r.capacity.cores, "node {} registered from {}", r.node, peer.addr);
    let lease_ttl_ms = s.fleet.lease_ttl().0;
    Ok(Json(Registered { heartbeat_ms: api.heartbeat.as_millis() as u64, lease_ttl_ms }))
}

async fn heartbeat(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(h): Json<Heartbeat>,
) -> ApiResult<Orders> {
    api.as_node(&peer, &h.node)?;
    let mut s = api.lock();
    let now = s.now();
    Ok(Json(Orders { orders: s.fleet.heartbeat(now, &h)? }))
}

async fn shard(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(r): Json<ShardReport>,
) -> ApiResult<Orders> {
    api.as_node(&peer, &r.node)?;
    let mut s = api.lock();
    let now = s.now();
    let orders = s.fleet.shard_report(now, &r).inspect_err(|e| {
        warn!(target: "audit", event = "shard_report_refused", node = r.node.as_str(), job = r.lease.job, shard = r.lease.shard, token = r.lease.token, "node {}: report refused: {e}", r.node);
    })?;
    info!(target: "audit", event = "shard_report", node = r.node.as_str(), job = r.lease.job, shard = r.lease.shard, token = r.lease.token, outcome = ?r.outcome, "node {}: shard {}/{} {:?}", r.node, r.lease.job, r.lease.shard, r.outcome);
    Ok(Json(Orders { orders }))
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/dbs", get(dbs).post(add_db))
        .route("/v1/dbs/{name}", axum::routing::delete(remove_db))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/shard", post(shard))
        .with_state(api)
}

/// Everything `serve` runs with.
pub struct ServeConfig {
    pub listener: TlsListener,
    pub store: FleetStore,
    pub roles: Roles,
    pub core: crate::core::machine::Config,
    pub default_repo: Option<String>,
    pub heartbeat: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the registry does not load into the fleet: {0}")]
    Fleet(#[from] FleetError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves until the process ends: loads the registry from the store into a fleet, ticks its
/// time, answers the API.
pub async fn serve(c: ServeConfig) -> Result<(), ServeError> {
    let entries = c.store.dbs()?;
    let now = wall_clock();
    // Each run numbers its jobs from 0: its start time keeps their data-plane ids apart.
    let fleet = Fleet::new(c.core, entries, c.default_repo, now.0, now)?;
    let shared = Shared { fleet, store: c.store, last: now };
    let api = Arc::new(Api { shared: Mutex::new(shared), roles: c.roles, heartbeat: c.heartbeat });
    let ticking = Arc::clone(&api);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        loop {
            every.tick().await;
            let mut s = ticking.lock();
            let now = s.now();
            if let Err(e) = s.fleet.tick(now) {
                warn!("tick: {e}");
            }
        }
    });
    let watched = Arc::clone(&api);
    super::notify::start(move || drop(watched.lock()));
    let app = router(api).into_make_service_with_connect_info::<Peer>();
    axum::serve(c.listener, app).await?;
    Ok(())
}
