//! The client side of a `quic://HOST:PORT` repository: one QUIC connection (one session) to a
//! receiver, used by every thread of a command through blocking calls.
//!
//! Each request is one bidirectional stream: a frame out, the reply frames back. Pack bytes
//! stream from the file the core wrote, [`limits::PACK_SEND_PIECE`] at a time; QUIC's flow
//! control (the stream and connection windows in `limits`) makes a slow receiver stop the
//! sender, so in-flight bytes are bounded on both sides.

use std::collections::VecDeque;
use std::fs::File;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::Path;

use quinn::{Connection, RecvStream};
use wire::frame::{ErrorCode, Frame, VERSION};
use wire::pack::PackEntry;
use wire::repo::{RepoConfig, Snapshot};
use wire::{ChunkId, RepoKey};

use crate::error::{Error, IoContext, Result};
use crate::limits;
use crate::quic::{self, StreamError, TlsFiles};

/// A connected session with a receiver.
pub struct Remote {
    runtime: tokio::runtime::Runtime,
    _endpoint: quinn::Endpoint,
    conn: Connection,
    session: u64,
    /// `HOST:PORT` as given, for messages.
    pub addr: String,
    /// Where this session's packs are written before they are sent; removed at the end.
    pub scratch: std::path::PathBuf,
}

/// What the receiver sent back when it said hello.
pub struct Welcome {
    pub remote: Remote,
    pub config: RepoConfig,
    pub key: RepoKey,
}

fn net(addr: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Network(format!("{addr}: {what}: {e}"))
}

/// The receiver's refusal as our error: the same exit codes as the local failure would have.
fn refused(addr: &str, code: ErrorCode, message: String) -> Error {
    match code {
        ErrorCode::NotFound | ErrorCode::Version => Error::Usage(format!("receiver {addr}: {message}")),
        ErrorCode::Incomplete => Error::Integrity(format!("receiver {addr}: {message}")),
        ErrorCode::NoSpace => Error::NoSpace(format!("receiver {addr}: {message}").into()),
        _ => Error::Network(format!("receiver {addr} refused: {message}")),
    }
}

impl Remote {
    /// Connects to `quic://HOST:PORT`, authenticates both ways and opens a session.
    pub fn connect(url: &str, tls: &TlsFiles) -> Result<Welcome> {
        let addr = url
            .strip_prefix("quic://")
            .ok_or_else(|| Error::Usage(format!("{url}: a remote repository is quic://HOST:PORT")))?
            .trim_end_matches('/')
            .to_owned();
        let host = addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(&addr).to_owned();
        let socket: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| Error::Usage(format!("{url}: {e}")))?
            .next()
            .ok_or_else(|| Error::Usage(format!("{url}: the host has no address")))?;
        let config = quic::client_config(tls)?;
        let runtime = quic::runtime(1)?;
        let (endpoint, conn) = runtime.block_on(async {
            let bind: SocketAddr = if socket.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid");
            let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| net(&addr, "cannot open a UDP socket", e))?;
            endpoint.set_default_client_config(config);
            let connecting = endpoint.connect(socket, &host).map_err(|e| net(&addr, "cannot connect", e))?;
            let conn = connecting.await.map_err(|e| net(&addr, "handshake failed", e))?;
            Ok::<_, Error>((endpoint, conn))
        })?;
        let scratch = std::env::temp_dir().join(format!("cbcr-session-{}-{}", std::process::id(), conn.stable_id()));
        let mut remote = Remote { runtime, _endpoint: endpoint, conn, session: 0, addr, scratch };
        let client = crate::backup::hostname();
        match remote.request(&Frame::Hello { version: VERSION, client })? {
            Frame::Welcome { session, config, key } => {
                let config = RepoConfig::decode(&config).map_err(|e| net(&remote.addr, "repository config", e))?;
                let key = RepoKey::from_bytes(key);
                if key.key_id() != config.key_id {
                    return Err(Error::Integrity(format!("receiver {}: key does not match its config", remote.addr)));
                }
                remote.session = session;
                Ok(Welcome { remote, config, key })
            }
            other => Err(remote.unexpected(&other)),
        }
    }

    fn unexpected(&self, frame: &Frame) -> Error {
        match frame {
            Frame::Error { code, message } => refused(&self.addr, *code, message.clone()),
            other => net(&self.addr, "protocol", format!("unexpected {:?} reply", other.kind())),
        }
    }

    fn stream_error(&self, e: StreamError) -> Error {
        match self.conn.close_reason() {
            Some(reason) => net(&self.addr, "connection lost", reason),
            None => net(&self.addr, "reply", e),
        }
    }

    /// Opens a stream and sends `frame`; returns the stream to read replies from.
    async fn open(&self, frame: &Frame, finish: bool) -> Result<(quinn::SendStream, RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| net(&self.addr, "connection lost", e))?;
        quic::write_frame(&mut send, frame).await.map_err(|e| net(&self.addr, "send", e))?;
        if finish {
            let _ = send.finish();
        }
        Ok((send, recv))
    }

    /// One request, one reply frame.
    fn request(&self, frame: &Frame) -> Result<Frame> {
        self.runtime.block_on(async {
            let (_send, mut recv) = self.open(frame, true).await?;
            quic::expect_frame(&mut recv).await.map_err(|e| self.stream_error(e))
        })
    }

    /// Which of `ids` the receiver has durably, in order.
    pub fn have(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::limits::MAX_BATCH_IDS as usize) {
            match self.request(&Frame::Have { session: self.session, ids: batch.to_vec() })? {
                Frame::HaveReply { present } if present.len() == batch.len() => out.extend(present),
                other => return Err(self.unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// Sends the sealed pack in `file` (`len` bytes); returns once the receiver has it durably
    /// and indexed.
    pub fn put_pack(&self, id: &ChunkId, file: &File, path: &Path, len: u64) -> Result<()> {
        self.runtime.block_on(async {
            let frame = Frame::PutPack { session: self.session, id: *id, len };
            let (mut send, mut recv) = self.open(&frame, false).await?;
            let mut buf = vec![0u8; limits::PACK_SEND_PIECE];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at).at(path)?;
                if let Err(e) = send.write_all(&buf[..n]).await {
                    // The receiver may have refused the pack and said why before stopping.
                    return match quic::read_frame(&mut recv).await {
                        Ok(Some(reply)) => Err(self.unexpected(&reply)),
                        _ => Err(net(&self.addr, "sending a pack", e)),
                    };
                }
                at += n as u64;
            }
            let _ = send.finish();
            match quic::expect_frame(&mut recv).await.map_err(|e| self.stream_error(e))? {
                Frame::PackStored { id: stored } if stored == *id => Ok(()),
                other => Err(self.unexpected(&other)),
            }
        })
    }

    /// Every snapshot record, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        let mut out = vec![];
        self.runtime.block_on(async {
            let (_send, mut recv) = self.open(&Frame::ListSnapshots { session: self.session }, true).await?;
            while let Some(frame) = quic::read_frame(&mut recv).await.map_err(|e| self.stream_error(e))? {
                match frame {
                    Frame::SnapshotRecord { id, record } => {
                        let snap =
                            Snapshot::decode(&record).map_err(|e| net(&self.addr, &format!("snapshot {id}"), e))?;
                        out.push((id, snap));
                    }
                    other => return Err(self.unexpected(&other)),
                }
            }
            Ok(())
        })?;
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Commits a snapshot; the receiver acknowledges once it and all it references are durable.
    pub fn commit(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        match self.request(&Frame::Commit { session: self.session, record: snapshot.encode() })? {
            Frame::Committed { id } => Ok(id),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Runs verify on the receiver, next to the data; returns whether it found damage and the
    /// report (JSON).
    pub fn verify(&self, read_data: bool) -> Result<(bool, Vec<u8>)> {
        match self.request(&Frame::Verify { session: self.session, read_data })? {
            Frame::VerifyReport { damaged, report } => Ok((damaged, report)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Starts fetching `ids` in order, [`wire::limits::MAX_BATCH_IDS`] per request.
    pub fn fetch(&self, ids: Vec<ChunkId>) -> BlobStream<'_> {
        BlobStream { remote: self, queued: ids.into(), asked: VecDeque::new(), recv: None }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Blobs coming back from a receiver in the order they were asked for; the stream's window
/// bounds how many are in flight.
pub struct BlobStream<'a> {
    remote: &'a Remote,
    queued: VecDeque<ChunkId>,
    asked: VecDeque<ChunkId>,
    recv: Option<RecvStream>,
}

impl BlobStream<'_> {
    /// Whether `id` is the next blob this stream will give.
    pub fn next_is(&self, id: &ChunkId) -> bool {
        self.asked.front().or(self.queued.front()) == Some(id)
    }

    /// The next blob, which must be `id` (the caller reads in the order it asked), as its pack
    /// entry and stored bytes.
    pub fn next(&mut self, id: &ChunkId) -> Result<(PackEntry, Vec<u8>)> {
        let remote = self.remote;
        remote.runtime.block_on(async {
            if self.asked.is_empty() {
                let n = self.queued.len().min(wire::limits::MAX_BATCH_IDS as usize);
                if n == 0 {
                    return Err(Error::Usage(format!("blob {id} was read without being fetched")));
                }
                self.asked.extend(self.queued.drain(..n));
                let frame = Frame::GetBlobs { session: remote.session, ids: self.asked.iter().copied().collect() };
                self.recv = Some(remote.open(&frame, true).await?.1);
            }
            let expected = self.asked.pop_front().expect("asked above");
            if expected != *id {
                return Err(Error::Usage(format!("blob {id} was read out of order (expected {expected})")));
            }
            let recv = self.recv.as_mut().expect("opened with the batch");
            match quic::expect_frame(recv).await.map_err(|e| remote.stream_error(e))? {
                Frame::Blob { entry, stored } if entry.id == *id => Ok((entry, stored)),
                Frame::Blob { entry, .. } => {
                    Err(net(&remote.addr, "protocol", format!("sent blob {} for {id}", entry.id)))
                }
                other => Err(remote.unexpected(&other)),
            }
        })
    }
}
