//! The client side of a `quic://HOST:PORT[/NAME]` repository: one QUIC connection (one session) to a
//! receiver, used by every thread of a command through blocking calls.
//!
//! Each request is one bidirectional stream: a frame out, the reply frames back. A pack streams
//! from the core that writes it ([`PackUpload`]), and its acknowledgement is awaited by the
//! sealer thread ([`PackAck`]) so cores never wait for the receiver's fsync. QUIC's flow
//! control (the stream and connection windows in `limits`) makes a slow receiver stop the
//! sender, so in-flight bytes are bounded on both sides.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};

use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};
use wire::frame::{
    ErrorCode, Frame, FrameHeader, WelcomeKeys, HEADER_LEN, JOB_VERSION, KEY_OBJECTS_VERSION, MIN_VERSION,
    TENANT_VERSION, VERSION,
};
use wire::job::{JobId, JobObject};
use wire::pack::PackEntry;
use wire::repo::RepoConfig;
use wire::ChunkId;

use crate::error::{Error, Result};
use crate::limits;
use crate::net::quic::{self, StreamError, TlsFiles};

/// A connected session with a receiver.
pub(crate) struct Remote {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    conn: Connection,
    session: u64,
    /// The protocol version agreed with the receiver (the oldest until its `Welcome`).
    version: u8,
    /// `HOST:PORT` as given, for messages.
    pub(crate) addr: String,
    /// The repository asked for by name (empty: the receiver's only one).
    pub(crate) repository: String,
    /// A private directory standing in for the repository's root on this side (the commands'
    /// lock and an empty local index; packs go straight to the receiver); removed at the end.
    pub(crate) scratch: std::path::PathBuf,
}

/// What the receiver sent back when it said hello.
pub(crate) struct Welcome {
    pub(crate) remote: Remote,
    pub(crate) config: RepoConfig,
    /// The key objects to open (or, from a receiver of protocol 1 or 2, the plaintext key).
    pub(crate) keys: WelcomeKeys,
}

const SCRATCH_PREFIX: &str = "cbcr-session-";

fn net(addr: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Network(format!("{addr}: {what}: {e}"))
}

/// QUIC carries TLS alerts as the transport error codes 0x100-0x1ff (RFC 9001, 4.8).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// The receiver's refusal as our error: the same exit codes as the local failure would have.
fn refused(addr: &str, code: ErrorCode, message: String) -> Error {
    match code {
        ErrorCode::NotFound => Error::NotFound(format!("receiver {addr}: {message}")),
        ErrorCode::Version => Error::Protocol(format!("receiver {addr}: {message}")),
        ErrorCode::Incomplete => Error::Integrity(format!("receiver {addr}: {message}")),
        // The receiver's message repeats the advice NoSpace gives; its path is of no use here.
        ErrorCode::NoSpace => Error::NoSpace(format!("receiver {addr}").into()),
        ErrorCode::Denied => Error::Denied(format!("receiver {addr}: {message}")),
        _ => Error::Network(format!("receiver {addr} refused: {message}")),
    }
}

impl Remote {
    /// Connects to `quic://HOST:PORT[/NAME]`, authenticates both ways and opens a session with
    /// the receiver's repository NAME (or its only one).
    pub(crate) fn connect(url: &str, tls: &TlsFiles) -> Result<Welcome> {
        let rest = url
            .strip_prefix("quic://")
            .ok_or_else(|| Error::Usage(format!("{url}: a remote repository is quic://HOST:PORT[/NAME]")))?
            .trim_end_matches('/');
        let (addr, repository) = match rest.split_once('/') {
            Some((addr, name)) => (addr.to_owned(), name.to_owned()),
            None => (rest.to_owned(), String::new()),
        };
        if repository.contains('/') {
            return Err(Error::Usage(format!("{url}: a repository name has no '/' (quic://HOST:PORT/NAME)")));
        }
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
            let conn = connecting.await.map_err(|e| match e {
                quinn::ConnectionError::TimedOut => net(
                    &addr,
                    "no answer",
                    "the receiver is not running there, or UDP to that port is blocked (nothing came back within the idle timeout)",
                ),
                e => net(&addr, "handshake failed", e),
            })?;
            Ok::<_, Error>((endpoint, conn))
        })?;
        // A killed client's scratch directory is removed by the next one.
        let scratch = crate::store::scratch_dir(SCRATCH_PREFIX, conn.stable_id() as u64);
        let mut remote =
            Remote { runtime, endpoint, conn, session: 0, version: MIN_VERSION, addr, repository, scratch };
        let client = crate::source::hostname();
        let hello = Frame::Hello { min: MIN_VERSION, max: VERSION, client, repository: remote.repository.clone() };
        match remote.request(&hello)? {
            Frame::Welcome { version, session, config, keys } => {
                let config = RepoConfig::decode(&config).map_err(|e| net(&remote.addr, "repository config", e))?;
                remote.session = session;
                remote.version = version;
                Ok(Welcome { remote, config, keys })
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

    /// The error for a failed stream: the connection's close reason when it is closed.
    /// With TLS 1.3 the client's side of the handshake completes before the receiver has
    /// checked the client certificate, so a refused certificate shows up here, as a close
    /// carrying a TLS alert, on the first request.
    fn lost(&self, what: &str, e: impl std::fmt::Display) -> Error {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ConnectionClosed(close)) if is_tls_alert(close.error_code) => {
                net(&self.addr, "handshake refused by the receiver (check --cert, --key and --ca)", close)
            }
            Some(reason) => net(&self.addr, "connection lost", reason),
            None => net(&self.addr, what, e),
        }
    }

    fn stream_error(&self, e: StreamError) -> Error {
        self.lost("reply", e)
    }

    /// Opens a stream and sends `frame`; returns the stream to read replies from.
    async fn open(&self, frame: &Frame, finish: bool) -> Result<(SendStream, RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| self.lost("open stream", e))?;
        quic::write_frame(&mut send, frame, self.version).await.map_err(|e| self.lost("send", e))?;
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
    pub(crate) fn have(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::limits::MAX_BATCH_IDS as usize) {
            match self.request(&Frame::Have { session: self.session, ids: batch.to_vec() })? {
                Frame::HaveReply { present } if present.len() == batch.len() => out.extend(present),
                other => return Err(self.unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// Sends a `Have` for `ids` (at most [`wire::limits::MAX_BATCH_IDS`]) without waiting for
    /// the answer, so a core can go on chunking meanwhile.
    pub(crate) fn have_start(&self, ids: Vec<ChunkId>) -> Result<HaveQuery<'_>> {
        assert!(ids.len() <= wire::limits::MAX_BATCH_IDS as usize);
        let n = ids.len();
        let (send, recv) = self.runtime.block_on(self.open(&Frame::Have { session: self.session, ids }, true))?;
        Ok(HaveQuery { remote: self, recv, n, _send: send })
    }

    /// Every snapshot record, as stored (sealed in an encrypted repository), and whether this
    /// session may take it as a parent.
    pub(crate) fn snapshots(&self) -> Result<Vec<(ChunkId, Vec<u8>, bool)>> {
        let mut out = vec![];
        self.runtime.block_on(async {
            let (_send, mut recv) = self.open(&Frame::ListSnapshots { session: self.session }, true).await?;
            while let Some(frame) = quic::read_frame(&mut recv).await.map_err(|e| self.stream_error(e))? {
                match frame {
                    Frame::SnapshotRecord { id, record, ours } => out.push((id, record, ours)),
                    other => return Err(self.unexpected(&other)),
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Removes snapshots; returns those the receiver had.
    pub(crate) fn forget(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        if self.version < TENANT_VERSION {
            return Err(Error::Protocol(format!(
                "receiver {}: forgetting through a receiver needs protocol version {TENANT_VERSION}, it speaks {}",
                self.addr, self.version
            )));
        }
        let mut gone = vec![];
        for batch in ids.chunks(wire::limits::MAX_BATCH_IDS as usize) {
            match self.request(&Frame::Forget { session: self.session, ids: batch.to_vec() })? {
                Frame::Forgotten { ids } => gone.extend(ids),
                other => return Err(self.unexpected(&other)),
            }
        }
        Ok(gone)
    }

    /// Commits a snapshot record (sealed as stored); the receiver acknowledges once it and all
    /// it references are durable.
    pub(crate) fn commit(&self, record: &[u8], root: ChunkId) -> Result<ChunkId> {
        // Named in the clear for a receiver that cannot open the record (protocol 3 on).
        let root = (self.version >= KEY_OBJECTS_VERSION).then_some(root);
        match self.request(&Frame::Commit { session: self.session, record: record.to_vec(), fence: None, root })? {
            Frame::Committed { id } => Ok(id),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Job objects need protocol [`JOB_VERSION`]: an older receiver is named.
    fn jobs_spoken(&self) -> Result<()> {
        if self.version < JOB_VERSION {
            return Err(Error::Protocol(format!(
                "receiver {}: sharded jobs through a receiver need protocol version {JOB_VERSION}, it speaks {} (upgrade the receiver, or give --repo its store itself)",
                self.addr, self.version
            )));
        }
        Ok(())
    }

    /// Stores a job object as sealed; returns once the receiver has it durably.
    pub(crate) fn job_put(&self, name: &JobObject, object: &[u8]) -> Result<()> {
        self.jobs_spoken()?;
        if object.len() > wire::limits::MAX_JOB_OBJECT_LEN as usize {
            return Err(Error::Usage(format!(
                "receiver {}: job object {} is {} bytes; through a receiver one is at most {} (a plan of that many files and segments is made on the repository's store itself)",
                self.addr,
                name.name(),
                object.len(),
                wire::limits::MAX_JOB_OBJECT_LEN
            )));
        }
        let put = Frame::PutJobObject { session: self.session, name: name.clone(), object: object.to_vec() };
        match self.request(&put)? {
            Frame::JobObjectDone => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    pub(crate) fn job_get(&self, name: &JobObject) -> Result<Option<Vec<u8>>> {
        self.jobs_spoken()?;
        match self.request(&Frame::GetJobObject { session: self.session, name: name.clone() })? {
            Frame::JobObjectData { object } => Ok(object),
            other => Err(self.unexpected(&other)),
        }
    }

    pub(crate) fn job_delete(&self, name: &JobObject) -> Result<()> {
        self.jobs_spoken()?;
        match self.request(&Frame::DeleteJobObject { session: self.session, name: name.clone() })? {
            Frame::JobObjectDone => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The names of `job`'s objects (every job's with `None`) this session may see.
    pub(crate) fn job_list(&self, job: Option<JobId>) -> Result<Vec<JobObject>> {
        self.jobs_spoken()?;
        let mut out = vec![];
        self.runtime.block_on(async {
            let (_send, mut recv) = self.open(&Frame::ListJobObjects { session: self.session, job }, true).await?;
            while let Some(frame) = quic::read_frame(&mut recv).await.map_err(|e| self.stream_error(e))? {
                match frame {
                    Frame::JobObjectNames { names } => out.extend(names),
                    other => return Err(self.unexpected(&other)),
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs verify on the receiver, next to the data; returns whether it found damage and the
    /// report (JSON).
    pub(crate) fn verify(&self, read_data: bool) -> Result<(bool, Vec<u8>)> {
        match self.request(&Frame::Verify { session: self.session, read_data })? {
            Frame::VerifyReport { damaged, report } => Ok((damaged, report)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Starts fetching `ids` in order, [`wire::limits::MAX_BATCH_IDS`] per request.
    pub(crate) fn fetch(&self, ids: Vec<ChunkId>) -> BlobStream<'_> {
        BlobStream { remote: self, queued: ids.into(), asked: VecDeque::new(), recv: None, buf: Vec::new(), pos: 0 }
    }
}

/// A `Have` on its way; [`HaveQuery::answer`] waits for it.
pub(crate) struct HaveQuery<'a> {
    remote: &'a Remote,
    recv: RecvStream,
    n: usize,
    _send: SendStream,
}

impl HaveQuery<'_> {
    /// One flag per id asked, in order.
    pub(crate) fn answer(mut self) -> Result<Vec<bool>> {
        let remote = self.remote;
        match remote.runtime.block_on(quic::expect_frame(&mut self.recv)).map_err(|e| remote.stream_error(e))? {
            Frame::HaveReply { present } if present.len() == self.n => Ok(present),
            other => Err(remote.unexpected(&other)),
        }
    }
}

/// A pack streaming to the receiver while a core writes it, [`limits::PACK_SEND_PIECE`] at a
/// time: a slow receiver blocks the core once the stream's window is full.
pub(crate) struct PackUpload {
    remote: Arc<Remote>,
    send: SendStream,
    recv: RecvStream,
    buf: Vec<u8>,
}

impl PackUpload {
    pub(crate) fn start(remote: Arc<Remote>) -> Result<Self> {
        let (send, recv) = remote.runtime.block_on(remote.open(&Frame::PutPack { session: remote.session }, false))?;
        Ok(Self { remote, send, recv, buf: Vec::with_capacity(limits::PACK_SEND_PIECE) })
    }

    pub(crate) fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(limits::PACK_SEND_PIECE - self.buf.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == limits::PACK_SEND_PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let remote = &self.remote;
        remote.runtime.block_on(async {
            if let Err(e) = self.send.write_all(&self.buf).await {
                // The receiver may have refused the pack and said why before it stopped reading.
                return match quic::read_frame(&mut self.recv).await {
                    Ok(Some(reply)) => Err(remote.unexpected(&reply)),
                    _ => Err(remote.lost("sending a pack", e)),
                };
            }
            Ok(())
        })?;
        self.buf.clear();
        Ok(())
    }

    /// Sends the rest and ends the stream; the acknowledgement comes later.
    pub(crate) fn finish(mut self) -> Result<PackAck> {
        self.flush()?;
        let _ = self.send.finish();
        Ok(PackAck { remote: self.remote, recv: self.recv, _send: self.send })
    }
}

/// The receiver's answer to a sent pack, awaited off the cores (by the sealer).
pub(crate) struct PackAck {
    remote: Arc<Remote>,
    recv: RecvStream,
    _send: SendStream,
}

impl PackAck {
    /// Returns once the receiver has the pack durably and indexed, under the id we computed.
    pub(crate) fn wait(mut self, id: &ChunkId) -> Result<()> {
        let remote = &self.remote;
        remote.runtime.block_on(async {
            match quic::expect_frame(&mut self.recv).await.map_err(|e| remote.stream_error(e))? {
                Frame::PackStored { id: stored } if stored == *id => Ok(()),
                Frame::PackStored { id: stored } => {
                    Err(Error::Integrity(format!("receiver {} stored pack {id} as {stored}", remote.addr)))
                }
                other => Err(remote.unexpected(&other)),
            }
        })
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
        // The close is sent by the endpoint's driver: let it go out, or the receiver only
        // notices at its idle timeout (and keeps this session's half-sent packs until then).
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        });
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Blobs coming back from a receiver in the order they were asked for; the stream's window
/// bounds how many are in flight.
pub(crate) struct BlobStream<'a> {
    remote: &'a Remote,
    queued: VecDeque<ChunkId>,
    asked: VecDeque<ChunkId>,
    recv: Option<RecvStream>,
    /// Bytes received and not yet taken as frames, from `pos`: each wake-up of the reading
    /// thread takes whatever the stream has, so many small blobs cost one (measured: one
    /// `block_on` per blob held restore at ~150 MB/s of stored bytes).
    buf: Vec<u8>,
    pos: usize,
}

impl BlobStream<'_> {
    /// Whether `id` is the next blob this stream will give.
    pub(crate) fn next_is(&self, id: &ChunkId) -> bool {
        self.asked.front().or(self.queued.front()) == Some(id)
    }

    /// The next blob, which must be `id` (the caller reads in the order it asked), as its pack
    /// entry and stored bytes.
    pub(crate) fn next(&mut self, id: &ChunkId) -> Result<(PackEntry, Vec<u8>)> {
        let remote = self.remote;
        if self.asked.is_empty() {
            let n = self.queued.len().min(wire::limits::MAX_BATCH_IDS as usize);
            if n == 0 {
                return Err(Error::Internal(format!("blob {id} was read without being fetched")));
            }
            self.asked.extend(self.queued.drain(..n));
            let frame = Frame::GetBlobs { session: remote.session, ids: self.asked.iter().copied().collect() };
            self.recv = Some(remote.runtime.block_on(remote.open(&frame, true))?.1);
            (self.buf, self.pos) = (Vec::new(), 0);
        }
        let expected = self.asked.pop_front().expect("asked above");
        if expected != *id {
            return Err(Error::Internal(format!("blob {id} was read out of order (expected {expected})")));
        }
        match self.next_frame()? {
            Frame::Blob { entry, stored } if entry.id == *id => Ok((entry, stored)),
            Frame::Blob { entry, .. } => Err(net(&remote.addr, "protocol", format!("sent blob {} for {id}", entry.id))),
            other => Err(remote.unexpected(&other)),
        }
    }

    fn next_frame(&mut self) -> Result<Frame> {
        let remote = self.remote;
        loop {
            let have = &self.buf[self.pos..];
            if let Some(header) = have.get(..HEADER_LEN) {
                let bad = |e: wire::Error| net(&remote.addr, "protocol", e);
                let (kind, version, len) =
                    FrameHeader::decode(header.try_into().expect("HEADER_LEN bytes")).map_err(bad)?;
                let end = HEADER_LEN + len as usize;
                if have.len() >= end {
                    let frame = Frame::decode(kind, version, &have[HEADER_LEN..end]).map_err(bad)?;
                    self.pos += end;
                    return Ok(frame);
                }
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let recv = self.recv.as_mut().expect("opened with the batch");
            match remote.runtime.block_on(recv.read_chunk(limits::PACK_SEND_PIECE, true)) {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(remote.stream_error(StreamError::End)),
                Err(e) => return Err(remote.lost("reading blobs", e)),
            }
        }
    }
}
