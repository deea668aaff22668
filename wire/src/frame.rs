//! Protocol frames between a client and a receiver (QUIC streams, one request per stream).
//!
//! ```text
//! FrameHeader (8 B: payload length u32, kind u8, version u8, reserved 2) | payload
//! ```
//! A reader takes the 8-byte header first and checks the kind and the length against that kind's
//! own bound before it allocates anything, so a garbage or hostile length costs nothing. Pack
//! bytes follow a [`Frame::PutPack`] unframed, up to the end of the stream; everything else is
//! in frames.
//!
//! A connection is one session: the client says [`Frame::Hello`] with the range of protocol
//! versions it speaks, the receiver answers [`Frame::Welcome`] in the highest version both
//! speak (its header's version is the answer) with the session id, and every later frame of
//! the session is in that version and names that id (a request naming any other is refused
//! with [`ErrorCode::UnknownSession`]). A `Hello` is sent in the sender's lowest version, and its
//! layout only grows at the end: version 1's `Hello` (`max`, client name) still decodes, as a
//! range of one version, so a client of version 1 is served as before. A header of a version
//! this side does not speak, or of an unknown kind, is refused as such.
//!
//! Versions: 1, the first; 2, a `Hello` may carry the lowest version after the client name, and
//! a `Commit` may carry a job name and fencing token; 3, a `Welcome` carries the repository's
//! key objects as stored (password slots: the client opens them), never a key, and a `Commit`
//! may name its root tree in the clear (a receiver that holds no key cannot open the record);
//! 4, a `Hello` may name the repository (one receiver serves several), a `SnapshotRecord` says
//! whether the session may take it as a parent, and a client may `Forget` snapshots; 5, a
//! client keeps a sharded job's objects (plans, start records, checkpoints) on the receiver:
//! put, get, delete and list them by name (sealed by the client; the receiver stores them as
//! they come).

use bytemuck::{Pod, Zeroable};

use crate::codec::Reader;
use crate::job::{JobId, JobObject};
use crate::pack::{PackEntry, ENTRY_LEN};
use crate::{limits, ChunkId, Error, Result};

/// The newest protocol version this cbcr speaks.
pub const VERSION: u8 = 5;
/// The oldest protocol version this cbcr still speaks.
pub const MIN_VERSION: u8 = 1;
/// The first version whose `Commit` carries a [`Fence`].
pub const FENCE_VERSION: u8 = 2;
/// The first version whose `Welcome` carries key objects instead of a key.
pub const KEY_OBJECTS_VERSION: u8 = 3;
/// The first version of named repositories, snapshot ownership and `Forget`.
pub const TENANT_VERSION: u8 = 4;
/// The first version of job objects kept through a receiver.
pub const JOB_VERSION: u8 = 5;
/// Most job object names one [`Frame::JobObjectNames`] carries (a listing takes several).
pub const MAX_JOB_NAMES: u32 = 4096;
/// Longest job object name a frame carries (the longest [`JobObject`] name is 91 bytes).
const MAX_JOB_NAME_LEN: usize = 128;
/// Most key objects one `Welcome` carries.
pub const MAX_KEY_OBJECTS: u32 = 256;
/// ALPN token of the cbcr protocol.
pub const ALPN: &[u8] = b"cbcr/1";

/// Size of [`FrameHeader`].
pub const HEADER_LEN: usize = 8;

/// First bytes of every frame.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct FrameHeader {
    len: [u8; 4],
    kind: u8,
    version: u8,
    reserved: [u8; 2],
}
const _: () = assert!(size_of::<FrameHeader>() == HEADER_LEN);

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Welcome = 2,
    Have = 3,
    HaveReply = 4,
    PutPack = 5,
    PackStored = 6,
    GetBlobs = 7,
    Blob = 8,
    ListSnapshots = 9,
    SnapshotRecord = 10,
    Commit = 11,
    Committed = 12,
    Verify = 13,
    VerifyReport = 14,
    Error = 15,
    Forget = 16,
    Forgotten = 17,
    PutJobObject = 18,
    GetJobObject = 19,
    DeleteJobObject = 20,
    ListJobObjects = 21,
    JobObjectData = 22,
    JobObjectNames = 23,
    JobObjectDone = 24,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self> {
        use FrameKind::*;
        Ok(match v {
            1 => Hello,
            2 => Welcome,
            3 => Have,
            4 => HaveReply,
            5 => PutPack,
            6 => PackStored,
            7 => GetBlobs,
            8 => Blob,
            9 => ListSnapshots,
            10 => SnapshotRecord,
            11 => Commit,
            12 => Committed,
            13 => Verify,
            14 => VerifyReport,
            15 => Error,
            16 => Forget,
            17 => Forgotten,
            18 => PutJobObject,
            19 => GetJobObject,
            20 => DeleteJobObject,
            21 => ListJobObjects,
            22 => JobObjectData,
            23 => JobObjectNames,
            24 => JobObjectDone,
            _ => return Err(corrupt(format!("unknown frame kind {v}"))),
        })
    }

    /// Whether a client sends it to a receiver (the rest are replies).
    pub fn is_request(self) -> bool {
        use FrameKind::*;
        matches!(
            self,
            Hello
                | Have
                | PutPack
                | GetBlobs
                | ListSnapshots
                | Commit
                | Verify
                | Forget
                | PutJobObject
                | GetJobObject
                | DeleteJobObject
                | ListJobObjects
        )
    }

    /// Whether frames of this kind begin with [`JOB_VERSION`].
    fn is_job(self) -> bool {
        use FrameKind::*;
        matches!(
            self,
            PutJobObject
                | GetJobObject
                | DeleteJobObject
                | ListJobObjects
                | JobObjectData
                | JobObjectNames
                | JobObjectDone
        )
    }

    /// Largest payload a frame of this kind may have.
    pub fn max_len(self) -> u32 {
        use FrameKind::*;
        let ids = 12 + limits::MAX_BATCH_IDS * 32;
        match self {
            Hello | PutPack | PackStored | ListSnapshots | Committed | Verify | Error => 64 << 10,
            GetJobObject | DeleteJobObject | ListJobObjects | JobObjectDone => 64 << 10,
            PutJobObject | JobObjectData => (64 << 10) + limits::MAX_JOB_OBJECT_LEN,
            JobObjectNames => 4 + MAX_JOB_NAMES * (4 + MAX_JOB_NAME_LEN as u32),
            Welcome => 1 << 20,
            Have | GetBlobs | Forget | Forgotten => ids,
            HaveReply => 12 + limits::MAX_BATCH_IDS.div_ceil(8),
            Blob => ENTRY_LEN as u32 + limits::MAX_STORED_BLOB_SIZE,
            SnapshotRecord | Commit | VerifyReport => limits::MAX_RECORD_LEN,
        }
    }
}

/// Why a receiver refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded, or was not expected here.
    BadFrame = 1,
    /// The request names a session this connection did not open.
    UnknownSession = 2,
    /// The client speaks another protocol version.
    Version = 3,
    /// A pack's bytes do not match its id or do not parse.
    BadPack = 4,
    /// A blob or snapshot asked for is not in the repository.
    NotFound = 5,
    /// The receiver could not store what was sent (disk full, I/O error).
    Storage = 6,
    /// A snapshot references what the repository does not have.
    Incomplete = 7,
    /// The receiver is shutting down.
    ShuttingDown = 8,
    /// Anything else.
    Other = 9,
    /// The receiver's disk is full.
    NoSpace = 10,
    /// A fenced commit's token is lower than one already accepted for its job.
    Fenced = 11,
    /// The receiver's policy does not let this client's identity do this.
    Denied = 12,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            1 => BadFrame,
            2 => UnknownSession,
            3 => Version,
            4 => BadPack,
            5 => NotFound,
            6 => Storage,
            7 => Incomplete,
            8 => ShuttingDown,
            10 => NoSpace,
            11 => Fenced,
            12 => Denied,
            _ => Other,
        }
    }
}

/// How a `Welcome` hands over a repository's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WelcomeKeys {
    /// Versions 1 and 2: the id key itself (plaintext repositories only).
    Raw([u8; 32]),
    /// Version 3: the key objects as stored, by name (password slots, or a plaintext
    /// repository's key file); the client opens them itself.
    Objects(Vec<(String, Vec<u8>)>),
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client -> receiver, first on a connection: the protocol versions it speaks (`min..=max`)
    /// and who the client says it is (its certificate is what authenticates it; the name is
    /// for logs); from version 4, the repository it asks for by name (empty: the receiver's
    /// only one).
    Hello { min: u8, max: u8, client: String, repository: String },
    /// Receiver -> client: the session, and the repository's config and keys. `version` is the
    /// version agreed on: the frame's own header version.
    Welcome { version: u8, session: u64, config: Vec<u8>, keys: WelcomeKeys },
    /// Which of these blobs does the repository have, durably?
    Have { session: u64, ids: Vec<ChunkId> },
    /// One flag per id asked, in order.
    HaveReply { present: Vec<bool> },
    /// A pack follows on this stream, up to its end (at most [`limits::MAX_PACK_LEN`] bytes).
    PutPack { session: u64 },
    /// The pack is durable and indexed under this id (the BLAKE3 of its bytes).
    PackStored { id: ChunkId },
    /// Send these blobs back (stored form, each checked by the client).
    GetBlobs { session: u64, ids: Vec<ChunkId> },
    /// One blob: its pack entry and its stored bytes.
    Blob { entry: PackEntry, stored: Vec<u8> },
    /// Send every snapshot record.
    ListSnapshots { session: u64 },
    /// One snapshot record (its id and its stored bytes). `ours` (version 4; always true
    /// before): written by an identity this session may write as, so it may be a parent.
    SnapshotRecord { id: ChunkId, record: Vec<u8>, ours: bool },
    /// Commit this snapshot record: acknowledged only once everything it references is durable.
    /// With a fence (version 2 on), refused when a higher token was accepted for the same job.
    /// `root`, from version 3: the snapshot's root tree, for a receiver that cannot open
    /// `record` (sealed) to check that it is stored.
    Commit { session: u64, record: Vec<u8>, fence: Option<Fence>, root: Option<ChunkId> },
    /// The snapshot's id.
    Committed { id: ChunkId },
    /// Check the repository where it lives.
    Verify { session: u64, read_data: bool },
    /// What the check found (JSON) and whether the repository is damaged.
    VerifyReport { damaged: bool, report: Vec<u8> },
    /// The request failed.
    Error { code: ErrorCode, message: String },
    /// Version 4: remove these snapshots (their data stays until a gc).
    Forget { session: u64, ids: Vec<ChunkId> },
    /// The snapshots of a `Forget` that were there and are now gone.
    Forgotten { ids: Vec<ChunkId> },
    /// Version 5: store a job object (as the client sealed it) under its name, replacing one
    /// of that name.
    PutJobObject { session: u64, name: JobObject, object: Vec<u8> },
    /// Send job object `name` back.
    GetJobObject { session: u64, name: JobObject },
    /// Remove job object `name` (nothing to remove is no error).
    DeleteJobObject { session: u64, name: JobObject },
    /// Send the names of the job objects of `job` (every job's when `None`).
    ListJobObjects { session: u64, job: Option<JobId> },
    /// A `GetJobObject`'s answer: the object as stored, or `None` when there is none.
    JobObjectData { object: Option<Vec<u8>> },
    /// Some of a listing's names (a listing is any number of these, up to the stream's end).
    JobObjectNames { names: Vec<JobObject> },
    /// A `PutJobObject` (durable now) or `DeleteJobObject` is done.
    JobObjectDone,
}

/// A commit's claim to be the current writer of a job: a receiver refuses a token lower than
/// the highest it has accepted for that job, so a writer that lost its lease cannot commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub job: String,
    pub token: u64,
}

/// Whether this side speaks protocol `version`.
pub fn speaks(version: u8) -> bool {
    (MIN_VERSION..=VERSION).contains(&version)
}

/// The version two sides agree on: the highest both speak, or `None`.
pub fn agree(min: u8, max: u8) -> Option<u8> {
    let v = max.min(VERSION);
    (min <= max && v >= min && speaks(v)).then_some(v)
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello { .. } => FrameKind::Hello,
            Frame::Welcome { .. } => FrameKind::Welcome,
            Frame::Have { .. } => FrameKind::Have,
            Frame::HaveReply { .. } => FrameKind::HaveReply,
            Frame::PutPack { .. } => FrameKind::PutPack,
            Frame::PackStored { .. } => FrameKind::PackStored,
            Frame::GetBlobs { .. } => FrameKind::GetBlobs,
            Frame::Blob { .. } => FrameKind::Blob,
            Frame::ListSnapshots { .. } => FrameKind::ListSnapshots,
            Frame::SnapshotRecord { .. } => FrameKind::SnapshotRecord,
            Frame::Commit { .. } => FrameKind::Commit,
            Frame::Committed { .. } => FrameKind::Committed,
            Frame::Verify { .. } => FrameKind::Verify,
            Frame::VerifyReport { .. } => FrameKind::VerifyReport,
            Frame::Error { .. } => FrameKind::Error,
            Frame::Forget { .. } => FrameKind::Forget,
            Frame::Forgotten { .. } => FrameKind::Forgotten,
            Frame::PutJobObject { .. } => FrameKind::PutJobObject,
            Frame::GetJobObject { .. } => FrameKind::GetJobObject,
            Frame::DeleteJobObject { .. } => FrameKind::DeleteJobObject,
            Frame::ListJobObjects { .. } => FrameKind::ListJobObjects,
            Frame::JobObjectData { .. } => FrameKind::JobObjectData,
            Frame::JobObjectNames { .. } => FrameKind::JobObjectNames,
            Frame::JobObjectDone => FrameKind::JobObjectDone,
        }
    }

    /// The session a request names (none for replies and `Hello`).
    pub fn session(&self) -> Option<u64> {
        match self {
            Frame::Have { session, .. }
            | Frame::PutPack { session, .. }
            | Frame::GetBlobs { session, .. }
            | Frame::ListSnapshots { session }
            | Frame::Commit { session, .. }
            | Frame::Verify { session, .. }
            | Frame::Forget { session, .. }
            | Frame::PutJobObject { session, .. }
            | Frame::GetJobObject { session, .. }
            | Frame::DeleteJobObject { session, .. }
            | Frame::ListJobObjects { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// The first bytes of a [`Frame::Blob`] frame: header and pack entry. The entry's
    /// `stored_len` bytes complete it, so a sender can read them straight into the frame.
    pub fn blob_prefix(entry: &PackEntry, version: u8) -> [u8; HEADER_LEN + ENTRY_LEN] {
        let len = ENTRY_LEN as u32 + entry.stored_len();
        assert!(len <= FrameKind::Blob.max_len(), "blob of {len} bytes is over the frame bound");
        assert!(speaks(version), "protocol version {version} is not spoken here");
        let header = FrameHeader { len: len.to_le_bytes(), kind: FrameKind::Blob as u8, version, reserved: [0; 2] };
        let mut out = [0u8; HEADER_LEN + ENTRY_LEN];
        out[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&header));
        out[HEADER_LEN..].copy_from_slice(bytemuck::bytes_of(entry));
        out
    }

    /// The pack entry that opens a `Blob` payload of `payload_len` bytes, checked against it.
    fn blob_entry(bytes: &[u8], payload_len: u32) -> Result<PackEntry> {
        let bytes: &[u8; ENTRY_LEN] =
            bytes.try_into().map_err(|_| corrupt(format!("a blob entry is {ENTRY_LEN} bytes")))?;
        let entry: PackEntry = bytemuck::pod_read_unaligned(bytes);
        entry.validate_fields()?;
        if u64::from(payload_len) != ENTRY_LEN as u64 + u64::from(entry.stored_len()) {
            return Err(corrupt(format!(
                "blob frame of {payload_len} bytes holds {} stored bytes",
                entry.stored_len()
            )));
        }
        Ok(entry)
    }

    /// Header and payload in the newest version (a `Hello` in the oldest, a `Welcome` in its
    /// own).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_in(match self {
            Frame::Hello { .. } => MIN_VERSION,
            Frame::Welcome { version, .. } => *version,
            _ => VERSION,
        })
    }

    /// Header and payload in protocol `version`. Panics if the payload exceeds its kind's
    /// bound, or the frame cannot be said in that version: the sender's bug.
    pub fn encode_in(&self, version: u8) -> Vec<u8> {
        assert!(speaks(version), "protocol version {version} is not spoken here");
        if let Frame::Blob { entry, stored } = self {
            let mut out = Self::blob_prefix(entry, version).to_vec();
            out.extend_from_slice(stored);
            return out;
        }
        let mut out = vec![0u8; HEADER_LEN];
        assert!(
            version >= JOB_VERSION || !self.kind().is_job(),
            "{:?} needs protocol version {JOB_VERSION}",
            self.kind()
        );
        match self {
            Frame::Hello { min, max, client, repository } => {
                out.push(*max);
                put_bytes(&mut out, client.as_bytes());
                out.push(*min);
                // Only when named: a receiver before version 4 refuses trailing bytes.
                if !repository.is_empty() {
                    put_bytes(&mut out, repository.as_bytes());
                }
            }
            Frame::Welcome { version: agreed, session, config, keys } => {
                assert_eq!(*agreed, version, "a Welcome is sent in the version it agrees on");
                out.extend_from_slice(&session.to_le_bytes());
                match keys {
                    WelcomeKeys::Raw(key) => {
                        assert!(version < KEY_OBJECTS_VERSION, "version {version} sends key objects");
                        out.extend_from_slice(key);
                        put_bytes(&mut out, config);
                    }
                    WelcomeKeys::Objects(objects) => {
                        assert!(version >= KEY_OBJECTS_VERSION, "version {version} sends a raw key");
                        assert!(objects.len() <= MAX_KEY_OBJECTS as usize);
                        put_bytes(&mut out, config);
                        out.extend_from_slice(&(objects.len() as u32).to_le_bytes());
                        for (name, bytes) in objects {
                            put_bytes(&mut out, name.as_bytes());
                            put_bytes(&mut out, bytes);
                        }
                    }
                }
            }
            Frame::Have { session, ids } | Frame::GetBlobs { session, ids } | Frame::Forget { session, ids } => {
                if matches!(self, Frame::Forget { .. }) {
                    assert!(version >= TENANT_VERSION, "Forget needs protocol version {TENANT_VERSION}");
                }
                out.extend_from_slice(&session.to_le_bytes());
                put_ids(&mut out, ids);
            }
            Frame::Forgotten { ids } => {
                assert!(version >= TENANT_VERSION, "Forgotten needs protocol version {TENANT_VERSION}");
                put_ids(&mut out, ids);
            }
            Frame::HaveReply { present } => {
                out.extend_from_slice(&(present.len() as u32).to_le_bytes());
                let mut bits = vec![0u8; present.len().div_ceil(8)];
                for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
                    bits[i / 8] |= 1 << (i % 8);
                }
                out.extend_from_slice(&bits);
            }
            Frame::PutPack { session } => out.extend_from_slice(&session.to_le_bytes()),
            Frame::PackStored { id } | Frame::Committed { id } => out.extend_from_slice(&id.0),
            Frame::Blob { .. } => unreachable!("encoded above"),
            Frame::ListSnapshots { session } => out.extend_from_slice(&session.to_le_bytes()),
            Frame::SnapshotRecord { id, record, ours } => {
                out.extend_from_slice(&id.0);
                if version >= TENANT_VERSION {
                    out.push(u8::from(*ours));
                } else {
                    assert!(*ours, "a snapshot that is not the session's needs protocol version {TENANT_VERSION}");
                }
                out.extend_from_slice(record);
            }
            Frame::Commit { session, record, fence, root } => {
                out.extend_from_slice(&session.to_le_bytes());
                if version >= FENCE_VERSION {
                    out.push(u8::from(fence.is_some()));
                    if let Some(Fence { job, token }) = fence {
                        put_bytes(&mut out, job.as_bytes());
                        out.extend_from_slice(&token.to_le_bytes());
                    }
                } else {
                    assert!(fence.is_none(), "a fenced commit needs protocol version {FENCE_VERSION}");
                }
                if version >= KEY_OBJECTS_VERSION {
                    out.push(u8::from(root.is_some()));
                    if let Some(root) = root {
                        out.extend_from_slice(&root.0);
                    }
                } else {
                    assert!(root.is_none(), "a commit names its root from protocol version {KEY_OBJECTS_VERSION}");
                }
                out.extend_from_slice(record);
            }
            Frame::Verify { session, read_data } => {
                out.extend_from_slice(&session.to_le_bytes());
                out.push(u8::from(*read_data));
            }
            Frame::VerifyReport { damaged, report } => {
                out.push(u8::from(*damaged));
                out.extend_from_slice(report);
            }
            Frame::PutJobObject { session, name, object } => {
                out.extend_from_slice(&session.to_le_bytes());
                put_bytes(&mut out, name.name().as_bytes());
                out.extend_from_slice(object);
            }
            Frame::GetJobObject { session, name } | Frame::DeleteJobObject { session, name } => {
                out.extend_from_slice(&session.to_le_bytes());
                put_bytes(&mut out, name.name().as_bytes());
            }
            Frame::ListJobObjects { session, job } => {
                out.extend_from_slice(&session.to_le_bytes());
                out.push(u8::from(job.is_some()));
                if let Some(job) = job {
                    out.extend_from_slice(&job.0);
                }
            }
            Frame::JobObjectData { object } => {
                out.push(u8::from(object.is_some()));
                out.extend_from_slice(object.as_deref().unwrap_or_default());
            }
            Frame::JobObjectNames { names } => {
                assert!(names.len() <= MAX_JOB_NAMES as usize);
                out.extend_from_slice(&(names.len() as u32).to_le_bytes());
                for name in names {
                    put_bytes(&mut out, name.name().as_bytes());
                }
            }
            Frame::JobObjectDone => {}
            Frame::Error { code, message } => {
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                // Messages are for people: cut rather than refuse to report an error.
                let mut end = message.len().min(4096);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_bytes(&mut out, &message.as_bytes()[..end]);
            }
        }
        let len = out.len() - HEADER_LEN;
        assert!(len <= self.kind().max_len() as usize, "{:?} frame of {len} bytes is over its bound", self.kind());
        let header =
            FrameHeader { len: (len as u32).to_le_bytes(), kind: self.kind() as u8, version, reserved: [0; 2] };
        out[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&header));
        out
    }

    /// Decodes a payload of `kind` in protocol `version` (both from [`FrameHeader::decode`]).
    pub fn decode(kind: FrameKind, version: u8, payload: &[u8]) -> Result<Frame> {
        if payload.len() > kind.max_len() as usize {
            return Err(corrupt(format!("{kind:?} frame of {} bytes is over its bound", payload.len())));
        }
        let mut r = Reader::new(payload, "frame");
        let frame = match kind {
            FrameKind::Hello => {
                let max = r.u8()?;
                let client = utf8(get_bytes(&mut r)?, "client name")?;
                // Version 1's Hello ends here: it speaks only its own version.
                let min = if r.remaining() > 0 { r.u8()? } else { max };
                let repository =
                    if r.remaining() > 0 { utf8(get_bytes(&mut r)?, "repository name")? } else { String::new() };
                Frame::Hello { min, max, client, repository }
            }
            FrameKind::Welcome if version < KEY_OBJECTS_VERSION => {
                let session = r.u64()?;
                let key = r.array()?;
                Frame::Welcome { version, session, keys: WelcomeKeys::Raw(key), config: get_bytes(&mut r)?.to_vec() }
            }
            FrameKind::Welcome => {
                let session = r.u64()?;
                let config = get_bytes(&mut r)?.to_vec();
                let n = r.count(MAX_KEY_OBJECTS, 8)?;
                let mut objects = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = utf8(get_bytes(&mut r)?, "key object name")?;
                    objects.push((name, get_bytes(&mut r)?.to_vec()));
                }
                Frame::Welcome { version, session, config, keys: WelcomeKeys::Objects(objects) }
            }
            FrameKind::Forget | FrameKind::Forgotten if version < TENANT_VERSION => {
                return Err(corrupt(format!("{kind:?} frames begin with protocol version {TENANT_VERSION}")))
            }
            _ if kind.is_job() && version < JOB_VERSION => {
                return Err(corrupt(format!("{kind:?} frames begin with protocol version {JOB_VERSION}")))
            }
            FrameKind::PutJobObject => {
                let session = r.u64()?;
                let name = job_name(&mut r)?;
                Frame::PutJobObject { session, name, object: r.bytes(r.remaining())?.to_vec() }
            }
            FrameKind::GetJobObject => Frame::GetJobObject { session: r.u64()?, name: job_name(&mut r)? },
            FrameKind::DeleteJobObject => Frame::DeleteJobObject { session: r.u64()?, name: job_name(&mut r)? },
            FrameKind::ListJobObjects => {
                let session = r.u64()?;
                let job = if flag(&mut r)? { Some(JobId(r.array()?)) } else { None };
                Frame::ListJobObjects { session, job }
            }
            FrameKind::JobObjectData => {
                let found = flag(&mut r)?;
                let rest = r.bytes(r.remaining())?;
                if !found && !rest.is_empty() {
                    return Err(corrupt("a job object that is not there has no bytes".into()));
                }
                Frame::JobObjectData { object: found.then(|| rest.to_vec()) }
            }
            FrameKind::JobObjectNames => {
                let n = r.count(MAX_JOB_NAMES, 4)?;
                Frame::JobObjectNames { names: (0..n).map(|_| job_name(&mut r)).collect::<Result<_>>()? }
            }
            FrameKind::JobObjectDone => Frame::JobObjectDone,
            FrameKind::Have | FrameKind::GetBlobs | FrameKind::Forget => {
                let session = r.u64()?;
                let ids = get_ids(&mut r)?;
                match kind {
                    FrameKind::Have => Frame::Have { session, ids },
                    FrameKind::GetBlobs => Frame::GetBlobs { session, ids },
                    _ => Frame::Forget { session, ids },
                }
            }
            FrameKind::Forgotten => Frame::Forgotten { ids: get_ids(&mut r)? },
            FrameKind::HaveReply => {
                let n = r.u32()?;
                if n > limits::MAX_BATCH_IDS {
                    return Err(corrupt(format!("{n} answers, more than the limit {}", limits::MAX_BATCH_IDS)));
                }
                let bits = r.bytes((n as usize).div_ceil(8))?;
                Frame::HaveReply { present: (0..n as usize).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect() }
            }
            FrameKind::PutPack => Frame::PutPack { session: r.u64()? },
            FrameKind::PackStored => Frame::PackStored { id: ChunkId(r.array()?) },
            FrameKind::Committed => Frame::Committed { id: ChunkId(r.array()?) },
            FrameKind::Blob => {
                let entry = Self::blob_entry(r.bytes(ENTRY_LEN)?, payload.len() as u32)?;
                Frame::Blob { entry, stored: r.bytes(entry.stored_len() as usize)?.to_vec() }
            }
            FrameKind::ListSnapshots => Frame::ListSnapshots { session: r.u64()? },
            FrameKind::SnapshotRecord => {
                let id = ChunkId(r.array()?);
                let ours = version < TENANT_VERSION || flag(&mut r)?;
                Frame::SnapshotRecord { id, ours, record: r.bytes(r.remaining())?.to_vec() }
            }
            FrameKind::Commit => {
                let session = r.u64()?;
                let fence = if version >= FENCE_VERSION && flag(&mut r)? {
                    let job = utf8(get_bytes(&mut r)?, "job name")?;
                    Some(Fence { job, token: r.u64()? })
                } else {
                    None
                };
                let root =
                    if version >= KEY_OBJECTS_VERSION && flag(&mut r)? { Some(ChunkId(r.array()?)) } else { None };
                Frame::Commit { session, fence, root, record: r.bytes(r.remaining())?.to_vec() }
            }
            FrameKind::Verify => {
                let session = r.u64()?;
                Frame::Verify { session, read_data: flag(&mut r)? }
            }
            FrameKind::VerifyReport => {
                let damaged = flag(&mut r)?;
                Frame::VerifyReport { damaged, report: r.bytes(r.remaining())?.to_vec() }
            }
            FrameKind::Error => {
                let code = ErrorCode::from_u16(r.u16()?);
                let message = String::from_utf8_lossy(get_bytes(&mut r)?).into_owned();
                Frame::Error { code, message }
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

impl FrameHeader {
    /// The kind, protocol version and payload length of the frame these 8 bytes start; the
    /// version is one this side speaks and the length is within the kind's bound.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<(FrameKind, u8, u32)> {
        let h: FrameHeader = bytemuck::pod_read_unaligned(bytes);
        if !speaks(h.version) {
            return Err(Error::UnsupportedVersion {
                what: "frame",
                found: h.version.into(),
                supported: VERSION.into(),
            });
        }
        if h.reserved != [0; 2] {
            return Err(corrupt("reserved bytes are not zero".into()));
        }
        let kind = FrameKind::from_u8(h.kind)?;
        let len = u32::from_le_bytes(h.len);
        if len > kind.max_len() {
            return Err(corrupt(format!("{kind:?} frame of {len} bytes is over its bound {}", kind.max_len())));
        }
        Ok((kind, h.version, len))
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
}

/// A job object's name, which must be one ([`JobObject::parse`]): a frame names no stray file.
fn job_name(r: &mut Reader<'_>) -> Result<JobObject> {
    let bytes = get_bytes(r)?;
    if bytes.len() > MAX_JOB_NAME_LEN {
        return Err(corrupt(format!("a job object name of {} bytes", bytes.len())));
    }
    let name = utf8(bytes, "job object name")?;
    JobObject::parse(&name).ok_or_else(|| corrupt(format!("{name:?} is not a job object name")))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn get_bytes<'a>(r: &mut Reader<'a>) -> Result<&'a [u8]> {
    let n = r.u32()? as usize;
    r.bytes(n)
}

fn put_ids(out: &mut Vec<u8>, ids: &[ChunkId]) {
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
}

fn get_ids(r: &mut Reader<'_>) -> Result<Vec<ChunkId>> {
    let n = r.count(limits::MAX_BATCH_IDS, 32)?;
    (0..n).map(|_| r.array().map(ChunkId)).collect()
}

fn flag(r: &mut Reader<'_>) -> Result<bool> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(corrupt(format!("flag byte {v} is neither 0 nor 1"))),
    }
}

fn corrupt(detail: String) -> Error {
    Error::Corrupt { what: "frame", detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobKind, Compression};
    use proptest::prelude::*;

    fn round_trip(frame: Frame) {
        for version in MIN_VERSION..=VERSION {
            if version < FENCE_VERSION && matches!(frame, Frame::Commit { fence: Some(_), .. }) {
                continue;
            }
            if version < KEY_OBJECTS_VERSION && matches!(frame, Frame::Commit { root: Some(_), .. }) {
                continue;
            }
            if matches!(frame, Frame::Welcome { version: v, .. } if v != version) {
                continue;
            }
            if version < JOB_VERSION && frame.kind().is_job() {
                continue;
            }
            let tenant_only = matches!(frame, Frame::Forget { .. } | Frame::Forgotten { .. })
                || matches!(frame, Frame::SnapshotRecord { ours: false, .. })
                || matches!(&frame, Frame::Hello { repository, .. } if !repository.is_empty());
            if version < TENANT_VERSION && tenant_only {
                continue;
            }
            let bytes = frame.encode_in(version);
            let (kind, v, len) = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
            assert_eq!((len as usize, v), (bytes.len() - HEADER_LEN, version));
            assert_eq!(Frame::decode(kind, v, &bytes[HEADER_LEN..]).unwrap(), frame);
        }
    }

    #[test]
    fn versions_agree_on_the_highest_both_speak() {
        assert_eq!(agree(1, 1), Some(1));
        assert_eq!(agree(1, VERSION + 5), Some(VERSION));
        assert_eq!(agree(MIN_VERSION, VERSION), Some(VERSION));
        assert_eq!(agree(VERSION + 1, VERSION + 3), None, "a newer client only");
        assert_eq!(agree(0, 0), None, "an older one");
        assert_eq!(agree(2, 1), None, "an empty range");
    }

    #[test]
    fn a_newer_header_version_or_unknown_kind_is_refused_by_name() {
        let mut f = Frame::ListSnapshots { session: 1 }.encode();
        f[5] = VERSION + 1;
        let err = FrameHeader::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap_err();
        assert!(matches!(err, Error::UnsupportedVersion { what: "frame", .. }), "{err}");
        f[5] = VERSION;
        f[4] = 99;
        let err = FrameHeader::decode(f[..HEADER_LEN].try_into().unwrap()).unwrap_err().to_string();
        assert!(err.contains("unknown frame kind 99"), "{err}");
    }

    #[test]
    fn a_version_1_hello_and_welcome_keep_their_layout() {
        // As the first cbcr sent it: version, then the client name; nothing after.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&5u32.to_le_bytes());
        v1.extend_from_slice(b"db-17");
        let hello = Frame::decode(FrameKind::Hello, 1, &v1).unwrap();
        assert_eq!(hello, Frame::Hello { min: 1, max: 1, client: "db-17".into(), repository: String::new() });
        let welcome =
            Frame::Welcome { version: 1, session: 7, config: b"{}".to_vec(), keys: WelcomeKeys::Raw([3; 32]) }.encode();
        assert_eq!(welcome.len(), HEADER_LEN + 8 + 32 + 4 + 2, "session, key, config: no version byte");
        assert_eq!(welcome[5], 1, "the header says the version agreed");
    }

    #[test]
    fn forget_is_refused_before_version_4() {
        let f = Frame::Forget { session: 1, ids: vec![] }.encode();
        let err = Frame::decode(FrameKind::Forget, 3, &f[HEADER_LEN..]).unwrap_err().to_string();
        assert!(err.contains("protocol version 4"), "{err}");
    }

    #[test]
    fn job_objects_are_named_as_such_and_refused_before_version_5() {
        let get = Frame::GetJobObject { session: 1, name: JobObject::Plan(JobId([1; 16])) }.encode();
        let err = Frame::decode(FrameKind::GetJobObject, 4, &get[HEADER_LEN..]).unwrap_err().to_string();
        assert!(err.contains("protocol version 5"), "{err}");
        // A name that is no job object's (a path a hostile client would like to write) is
        // refused by the decoder, before any receiver code sees it.
        let mut stray = 1u64.to_le_bytes().to_vec();
        put_bytes(&mut stray, b"../config");
        stray.extend_from_slice(b"bytes");
        let err = Frame::decode(FrameKind::PutJobObject, VERSION, &stray).unwrap_err().to_string();
        assert!(err.contains("not a job object name"), "{err}");
        let err = Frame::decode(FrameKind::JobObjectData, VERSION, &[0, 1]).unwrap_err().to_string();
        assert!(err.contains("no bytes"), "{err}");
    }

    #[test]
    fn a_version_1_commit_has_no_fence() {
        let commit = Frame::Commit { session: 3, record: b"{}".to_vec(), fence: None, root: None };
        let v1 = commit.encode_in(1);
        assert_eq!(v1.len(), HEADER_LEN + 8 + 2, "session and record only");
        assert_eq!(Frame::decode(FrameKind::Commit, 1, &v1[HEADER_LEN..]).unwrap(), commit);
    }

    #[test]
    fn every_frame_round_trips() {
        let id = ChunkId([7; 32]);
        let entry = PackEntry::new(id, 16, 3, 3, BlobKind::Data, Compression::None);
        for frame in [
            Frame::Hello { min: 1, max: 7, client: "db-17".into(), repository: String::new() },
            Frame::Hello { min: 1, max: 7, client: "db-17".into(), repository: "tenant-a".into() },
            Frame::Welcome { version: 1, session: 9, config: b"{}".to_vec(), keys: WelcomeKeys::Raw([1; 32]) },
            Frame::Welcome {
                version: 3,
                session: 9,
                config: b"{}".to_vec(),
                keys: WelcomeKeys::Objects(vec![("a1".into(), b"{\"slot\":1}".to_vec()), ("b2".into(), vec![])]),
            },
            Frame::Have { session: 9, ids: vec![id, ChunkId([2; 32])] },
            Frame::HaveReply { present: vec![true, false, true, true, false, false, false, false, true] },
            Frame::PutPack { session: 9 },
            Frame::PackStored { id },
            Frame::GetBlobs { session: 9, ids: vec![id] },
            Frame::Blob { entry, stored: b"abc".to_vec() },
            Frame::ListSnapshots { session: 9 },
            Frame::SnapshotRecord { id, record: b"{\"a\":1}".to_vec(), ours: true },
            Frame::SnapshotRecord { id, record: b"sealed".to_vec(), ours: false },
            Frame::Forget { session: 9, ids: vec![id, ChunkId([3; 32])] },
            Frame::Forgotten { ids: vec![id] },
            Frame::Commit { session: 9, record: b"{}".to_vec(), fence: None, root: None },
            Frame::Commit {
                session: 9,
                record: b"{}".to_vec(),
                fence: Some(Fence { job: "db1/7".into(), token: 42 }),
                root: None,
            },
            Frame::Commit { session: 9, record: b"sealed".to_vec(), fence: None, root: Some(id) },
            Frame::Committed { id },
            Frame::Verify { session: 9, read_data: true },
            Frame::VerifyReport { damaged: false, report: b"{}".to_vec() },
            Frame::Error { code: ErrorCode::UnknownSession, message: "no session 3".into() },
            Frame::PutJobObject { session: 9, name: JobObject::Plan(JobId([4; 16])), object: b"sealed plan".to_vec() },
            Frame::GetJobObject {
                session: 9,
                name: JobObject::Start { job: JobId([4; 16]), shard: 3, token: 7, run: 9 },
            },
            Frame::DeleteJobObject {
                session: 9,
                name: JobObject::Checkpoint { job: JobId([4; 16]), shard: 0, token: u64::MAX, run: 1, seq: u32::MAX },
            },
            Frame::ListJobObjects { session: 9, job: None },
            Frame::ListJobObjects { session: 9, job: Some(JobId([5; 16])) },
            Frame::JobObjectData { object: Some(b"sealed".to_vec()) },
            Frame::JobObjectData { object: Some(vec![]) },
            Frame::JobObjectData { object: None },
            Frame::JobObjectNames { names: vec![JobObject::Plan(JobId([4; 16])), JobObject::Plan(JobId([6; 16]))] },
            Frame::JobObjectDone,
        ] {
            round_trip(frame);
        }
    }

    #[test]
    fn oversize_and_negative_lengths_are_refused_from_the_header() {
        let mut h = Frame::Have { session: 1, ids: vec![] }.encode();
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes()); // -1 as an i32
        let err = FrameHeader::decode(h[..HEADER_LEN].try_into().unwrap()).unwrap_err().to_string();
        assert!(err.contains("over its bound"), "{err}");
        h[4] = 200;
        assert!(FrameHeader::decode(h[..HEADER_LEN].try_into().unwrap()).is_err());
    }

    #[test]
    fn a_count_larger_than_the_payload_is_refused() {
        let mut f = Frame::Have { session: 1, ids: vec![ChunkId([1; 32])] }.encode();
        f[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(Frame::decode(FrameKind::Have, VERSION, &f[HEADER_LEN..]), Err(Error::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(header in proptest::array::uniform8(any::<u8>()),
                                payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok((kind, version, _)) = FrameHeader::decode(&header) {
                let _ = Frame::decode(kind, version, &payload);
            }
            for kind in 1..=24u8 {
                for version in MIN_VERSION..=VERSION {
                    let _ = Frame::decode(FrameKind::from_u8(kind).unwrap(), version, &payload);
                }
            }
        }

        #[test]
        fn truncated_frames_are_errors(cut in 0usize..100) {
            let f = Frame::Welcome { version: 1, session: 3, config: vec![b'x'; 40], keys: WelcomeKeys::Raw([5; 32]) }.encode();
            let cut = cut.min(f.len() - HEADER_LEN - 1);
            prop_assert!(Frame::decode(FrameKind::Welcome, 1, &f[HEADER_LEN..HEADER_LEN + cut]).is_err());
        }
    }
}
