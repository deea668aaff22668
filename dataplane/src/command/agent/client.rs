//! The agent's HTTPS client of `cbcr-control`: JSON over mutual TLS with the fleet's PKI, one
//! blocking call at a time (an agent makes a few a second at most).

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use wire::control::{ApiError, Heartbeat, Orders, Register, Registered, ShardReport, API_PREFIX};

use crate::error::{Error, Result};
use crate::net::quic::TlsFiles;

/// A call's deadline until registration tells the lease TTL (then `set_timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The service answered no (the status, and what it said).
    #[error("{url}: refused ({status}): {error}")]
    Refused { url: String, status: u16, error: String },
    /// No answer: the service is down, unreachable, or the connection broke.
    #[error("{url}: {detail}")]
    Unreachable { url: String, detail: String },
}

pub struct ControlClient {
    base: String,
    http: ureq::Agent,
    timeout: Duration,
}

impl ControlClient {
    /// A client of the service at `url` (`https://HOST:PORT`), presenting `tls`'s certificate.
    pub fn new(url: &str, tls: &TlsFiles) -> Result<Self> {
        let base = url.trim_end_matches('/');
        if !base.starts_with("https://") {
            return Err(Error::Usage(format!("--control {url:?}: give the service's https://HOST:PORT")));
        }
        let bytes = tls.read()?;
        let config = wire::tls::client_config(crate::net::quic::pem(&bytes), wire::control::ALPN)
            .map_err(|e| tls.error(e, None))?;
        let http = ureq::AgentBuilder::new().tls_config(Arc::new(config)).timeout(CALL_TIMEOUT).build();
        Ok(Self { base: format!("{base}{API_PREFIX}"), http, timeout: CALL_TIMEOUT })
    }

    /// The longest a call may take from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn post<T: Serialize, R: DeserializeOwned>(&self, path: &str, body: &T) -> Result<R, CallError> {
        let url = format!("{}{path}", self.base);
        match self.http.post(&url).timeout(self.timeout).send_json(body) {
            Ok(r) => r.into_json().map_err(|e| CallError::Unreachable { url, detail: format!("bad answer: {e}") }),
            Err(ureq::Error::Status(status, r)) => {
                let error = r.into_json::<ApiError>().map(|e| e.error).unwrap_or_else(|e| e.to_string());
                Err(CallError::Refused { url, status, error })
            }
            Err(e) => Err(CallError::Unreachable { url, detail: e.to_string() }),
        }
    }

    pub fn register(&self, r: &Register) -> Result<Registered, CallError> {
        self.post("/agent/register", r)
    }

    pub fn heartbeat(&self, h: &Heartbeat) -> Result<Orders, CallError> {
        self.post("/agent/heartbeat", h)
    }

    pub fn report(&self, r: &ShardReport) -> Result<Orders, CallError> {
        self.post("/agent/shard", r)
    }
}
