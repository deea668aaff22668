//! The QUIC transport shared by the client ([`crate::net::remote`]) and the receiver
//! ([`crate::command::receiver`]): mutual TLS from PEM files (and a revocation list), and frames on
//! streams.
//!
//! quinn needs `Send` futures and glommio tasks are not `Send`, so the endpoint lives on its own
//! tokio runtime; data-plane threads enter it with `block_on` (the design's "own runtime thread").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream};
use wire::frame::{Frame, FrameHeader, FrameKind, HEADER_LEN};

use crate::error::{Error, IoContext, Result};
use crate::limits;

/// The three PEM files of one side of a connection.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The three files' bytes, to pass to [`wire::tls`].
    pub fn read(&self) -> Result<[Vec<u8>; 3]> {
        let read = |p: &Path| std::fs::read(p).at(p);
        Ok([read(&self.cert)?, read(&self.key)?, read(&self.ca)?])
    }

    /// The error `e` names one of the files (or the revocation list `crl`).
    pub fn error(&self, e: wire::tls::TlsError, crl: Option<&Path>) -> Error {
        let path = match e.part {
            "key" => &self.key,
            "ca" => &self.ca,
            "crl" => crl.unwrap_or(&self.ca),
            _ => &self.cert,
        };
        Error::Usage(format!("{}: {}", path.display(), e.message))
    }
}

pub(crate) fn pem(bytes: &[Vec<u8>; 3]) -> wire::tls::Pem<'_> {
    wire::tls::Pem { cert: &bytes[0], key: &bytes[1], ca: &bytes[2] }
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One stream per request; a client runs a few per core at once.
    t.max_concurrent_bidi_streams(limits::QUIC_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(limits::QUIC_STREAM_WINDOW.into());
    t.receive_window(limits::QUIC_CONNECTION_WINDOW.into());
    t.send_window(limits::QUIC_CONNECTION_WINDOW.into());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(limits::QUIC_IDLE_TIMEOUT_S).try_into().expect("small")));
    t
}

/// Receiver side: our certificate, and a client certificate signed by the CA is mandatory;
/// with `crl`, one whose serial that revocation list names is refused at the handshake.
pub fn server_config(files: &TlsFiles, crl: Option<&Path>) -> Result<quinn::ServerConfig> {
    let bytes = files.read()?;
    let crl_bytes = crl.map(|p| std::fs::read(p).at(p)).transpose()?;
    let tls = wire::tls::server_config(pem(&bytes), crl_bytes.as_deref(), wire::frame::ALPN)
        .map_err(|e| files.error(e, crl))?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| Error::Usage(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// Client side: the receiver must present a certificate signed by the CA; we present ours.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig> {
    let bytes = files.read()?;
    let tls = wire::tls::client_config(pem(&bytes), wire::frame::ALPN).map_err(|e| files.error(e, None))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Error::Usage(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// The tokio runtime the endpoint runs on.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("cbcr-quic")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the QUIC runtime: {e}")))
}

/// What went wrong on a stream: the peer's fault (bad bytes) or the connection's.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("bad frame: {0}")]
    Frame(#[from] wire::Error),
    #[error("connection: {0}")]
    Read(String),
    #[error("unexpected end of stream")]
    End,
}

/// Reads one frame; `None` when the stream ended cleanly before it.
pub async fn read_frame(recv: &mut RecvStream) -> std::result::Result<Option<Frame>, StreamError> {
    match read_header(recv).await? {
        None => Ok(None),
        Some(header) => read_payload(recv, header).await.map(Some),
    }
}

/// A frame's kind, protocol version and payload length, checked against the kind's bound
/// (nothing is allocated yet); `None` when the stream ended cleanly before it.
pub async fn read_header(recv: &mut RecvStream) -> std::result::Result<Option<(FrameKind, u8, u32)>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read(&mut header[..1]).await.map_err(|e| StreamError::Read(e.to_string()))? {
        None => return Ok(None),
        Some(0) => return Err(StreamError::End),
        Some(_) => {}
    }
    read_exact(recv, &mut header[1..]).await?;
    Ok(Some(FrameHeader::decode(&header)?))
}

/// The payload of the frame `header` announced, decoded.
pub async fn read_payload(
    recv: &mut RecvStream,
    (kind, version, len): (FrameKind, u8, u32),
) -> std::result::Result<Frame, StreamError> {
    let mut payload = vec![0u8; len as usize];
    read_exact(recv, &mut payload).await?;
    Ok(Frame::decode(kind, version, &payload)?)
}

/// Reads one frame that must be there.
pub async fn expect_frame(recv: &mut RecvStream) -> std::result::Result<Frame, StreamError> {
    read_frame(recv).await?.ok_or(StreamError::End)
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> std::result::Result<(), StreamError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => StreamError::End,
        quinn::ReadExactError::ReadError(e) => StreamError::Read(e.to_string()),
    })
}

/// Writes one frame in protocol `version`.
pub async fn write_frame(
    send: &mut SendStream,
    frame: &Frame,
    version: u8,
) -> std::result::Result<(), quinn::WriteError> {
    send.write_all(&frame.encode_in(version)).await
}
