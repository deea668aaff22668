//! The QUIC transport shared by the client ([`crate::net::remote`]) and the receiver
//! ([`crate::command::receiver`]): mutual TLS from PEM files, the development PKI, and frames on streams.
//!
//! quinn needs `Send` futures and glommio tasks are not `Send`, so the endpoint lives on its own
//! tokio runtime; data-plane threads enter it with `block_on` (the design's "own runtime thread").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use wire::frame::{Frame, FrameHeader, HEADER_LEN};

use crate::error::{Error, IoContext, Result};
use crate::limits;

/// The three PEM files of one side of a connection.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{}: {e}", what.display()))
}

fn load(files: &TlsFiles) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, rustls::RootCertStore)> {
    let read = |p: &Path| std::fs::read(p).at(p);
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&files.cert, e))?;
    if certs.is_empty() {
        return Err(tls_error(&files.cert, "no certificate in this file"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| tls_error(&files.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&files.ca)?) {
        roots.add(ca.map_err(|e| tls_error(&files.ca, e))?).map_err(|e| tls_error(&files.ca, e))?;
    }
    if roots.is_empty() {
        return Err(tls_error(&files.ca, "no CA certificate in this file"));
    }
    Ok((certs, key, roots))
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

/// Receiver side: our certificate, and a client certificate signed by the CA is mandatory.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig> {
    let (certs, key, roots) = load(files)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_error(&files.ca, e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Usage(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&files.cert, e))?;
    tls.alpn_protocols = vec![wire::frame::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| Error::Usage(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// Client side: the receiver must present a certificate signed by the CA; we present ours.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig> {
    let (certs, key, roots) = load(files)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Usage(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| tls_error(&files.cert, e))?;
    tls.alpn_protocols = vec![wire::frame::ALPN.to_vec()];
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
    let mut header = [0u8; HEADER_LEN];
    match recv.read(&mut header[..1]).await.map_err(|e| StreamError::Read(e.to_string()))? {
        None => return Ok(None),
        Some(0) => return Err(StreamError::End),
        Some(_) => {}
    }
    read_exact(recv, &mut header[1..]).await?;
    let (kind, version, len) = FrameHeader::decode(&header)?;
    let mut payload = vec![0u8; len as usize];
    read_exact(recv, &mut payload).await?;
    Ok(Some(Frame::decode(kind, version, &payload)?))
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

/// Writes a development PKI into `out`: `ca.crt`/`ca.key`, `receiver.crt`/`.key` (for
/// `localhost` and 127.0.0.1) and `client.crt`/`.key`. With `expired_client`, the client
/// certificate's validity ended yesterday (to check that receivers refuse it).
pub fn write_dev_pki(out: &Path, expired_client: bool) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let gen = |e: rcgen::Error| Error::Internal(format!("certificate generation: {e}"));
    std::fs::create_dir_all(out).at(out)?;
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.distinguished_name.push(DnType::CommonName, "cbcr development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(3650);
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;
    let leaf = |name: &str, sans: Vec<String>, expired: bool| -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::new(sans).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = now - time::Duration::days(if expired { 30 } else { 1 });
        params.not_after = if expired { now - time::Duration::days(1) } else { now + time::Duration::days(825) };
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(gen)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let receiver = leaf("cbcr receiver", vec!["localhost".into(), "127.0.0.1".into()], false)?;
    let client = leaf("cbcr client", vec!["cbcr-client".into()], expired_client)?;
    let write = |name: &str, text: &str, mode: u32| -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = out.join(name);
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(mode).open(&path).at(&path)?;
        f.write_all(text.as_bytes()).at(&path)
    };
    write("ca.crt", &ca.pem(), 0o644)?;
    write("ca.key", &ca_key.serialize_pem(), 0o600)?;
    write("receiver.crt", &receiver.0, 0o644)?;
    write("receiver.key", &receiver.1, 0o600)?;
    write("client.crt", &client.0, 0o644)?;
    write("client.key", &client.1, 0o600)
}
