//! The control plane's API records: what an agent sends `cbcr-control` and what it is told,
//! and the operators' calls. JSON over HTTPS (mutual TLS, [`crate::tls`]); every path is under
//! [`API_PREFIX`]. Both planes share these types, so an agent and the service cannot disagree
//! about a field.

use serde::{Deserialize, Serialize};

/// Every API path starts with this.
pub const API_PREFIX: &str = "/v1";
/// The ALPN protocol the API speaks.
pub const ALPN: &[u8] = b"http/1.1";

/// What a node offers, reported when it registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cores: u32,
    pub memory_bytes: u64,
    /// Bytes per second.
    pub network_bps: u64,
    pub disk_bps: u64,
}

/// `POST /v1/agent/register`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub node: String,
    pub capacity: Capacity,
}

/// The answer to [`Register`]: how often to heartbeat, and how long a lease lasts unrenewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub heartbeat_ms: u64,
    pub lease_ttl_ms: u64,
}

/// What a node uses now and how it has done lately.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceReport {
    pub cpu_percent: u8,
    pub memory_used_bytes: u64,
    pub network_bps: u64,
    pub disk_bps: u64,
    /// Bytes per second one shard moved lately (0: nothing measured yet).
    pub throughput_bps: u64,
    /// The slowest pipeline stage's latency p99, microseconds (0: none measured).
    pub stage_p99_us: u64,
    /// Shards running.
    pub running: u32,
}

/// A shard of a control-plane job, and the token of the lease it runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job: u64,
    pub shard: u32,
    pub token: u64,
}

/// `POST /v1/agent/heartbeat`: the report, and every lease the node holds (each renewed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub report: ResourceReport,
    pub leases: Vec<LeaseRef>,
}

/// The answer to a heartbeat: what the node must do, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    pub orders: Vec<Order>,
}

/// One thing a node is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "snake_case")]
pub enum Order {
    /// Run a shard.
    Run(Assignment),
    /// The lease ended: stop now and write nothing more.
    Stop { lease: LeaseRef },
    /// Hand the shard back at its next segment boundary.
    HandBack { lease: LeaseRef },
    /// Every shard of the job finished: commit its data-plane job.
    Commit { lease: LeaseRef, data_job: String, repo: String },
    /// Move at most this many bytes per second in all.
    RateCap { bps: u64 },
    /// Draining, and holding nothing: the node may leave.
    Drained,
}

/// A shard to run: which, under which lease, from what into where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub lease: LeaseRef,
    pub shards: u32,
    /// The lease ends this long after the heartbeat that brought it, unless renewed.
    pub lease_ttl_ms: u64,
    /// Segments already checkpointed (the data plane skips them by itself).
    pub resume_from: u64,
    /// The most the shard may read per second from its source host.
    pub read_cap_bps: u64,
    pub db: String,
    /// An absolute path on the node, or a `synth://` source.
    pub source: String,
    pub repo: String,
    /// The data-plane job id (32 hex digits) every shard of this job runs under.
    pub data_job: String,
}

/// `POST /v1/agent/shard`: how a shard ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReport {
    pub node: String,
    pub lease: LeaseRef,
    pub outcome: ShardOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ShardOutcome {
    Finished {
        bytes: u64,
    },
    Failed {
        error: String,
    },
    /// Handed back as told, with this many segments durable.
    Yielded {
        segments_done: u64,
    },
    /// Committed as told: the snapshot, or why not.
    Committed {
        snapshot: String,
    },
    CommitFailed {
        error: String,
    },
}

/// `GET /v1/nodes`: one node as the service sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub capacity: Capacity,
    pub report: ResourceReport,
    /// Milliseconds since it was last heard from.
    pub silent_ms: u64,
    pub draining: bool,
    pub leases: Vec<LeaseRef>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub dbs: u64,
    pub nodes: u64,
    /// Backups waiting, by class (critical, high, normal, low).
    pub waiting: [u64; 4],
    pub running_shards: u64,
    pub committed: u64,
    pub failovers: u64,
    pub stale_refused: u64,
    pub desired_nodes: Option<u32>,
}

/// Every error answer: what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_tagged_and_round_trip() {
        let lease = LeaseRef { job: 3, shard: 1, token: 7 };
        let orders = Orders { orders: vec![Order::Stop { lease }, Order::RateCap { bps: 5 }, Order::Drained] };
        let text = serde_json::to_string(&orders).unwrap();
        assert!(text.contains(r#""order":"stop""#), "{text}");
        assert_eq!(serde_json::from_str::<Orders>(&text).unwrap(), orders);
        assert!(serde_json::from_str::<Orders>(r#"{"orders":[{"order":"launch"}]}"#).is_err());
    }
}
