//! [`Receiver`]: a repository served by a receiver over QUIC. Packs stream to it as they are
//! written and it makes them durable; which blobs it lacks is asked in batches, one answer
//! arriving while the next batch is chunked; blobs and trees come back in streams.

use std::sync::Arc;
use std::time::Instant;

use wire::job::{JobId, JobObject};
use wire::pack::PackEntry;
use wire::repo::Snapshot;
use wire::verify::VerifyReport;
use wire::{BlobKind, ChunkId};

use super::backend::{Backend, BlobSource, NewBlobs, PackSeal, PackSink, Packer};
use super::direct::open_snapshot;
use super::jobs::JobStore;
use super::keys::{Sealing, SNAPSHOT_AAD};
use crate::error::{Error, Result};
use crate::index::{ChunkIndex, KnownBlobs};
use crate::limits;
use crate::net::remote::{BlobStream, HaveQuery, PackAck, PackUpload, Remote};

/// A session with a receiver.
pub(crate) struct Receiver {
    remote: Arc<Remote>,
    sealing: Arc<dyn Sealing>,
}

impl Receiver {
    pub(crate) fn new(remote: Remote, sealing: Arc<dyn Sealing>) -> Self {
        Self { remote: Arc::new(remote), sealing }
    }
}

impl Receiver {
    /// The receiver's snapshots, opened, oldest first; with `ours_only`, those it says this
    /// session may take as a parent.
    fn listed(&self, ours_only: bool) -> Result<Vec<(ChunkId, Snapshot)>> {
        let mut out = vec![];
        for (id, record, ours) in self.remote.snapshots()? {
            if ours_only && !ours {
                continue;
            }
            match open_snapshot(&*self.sealing, &record) {
                Ok(snapshot) => out.push((id, snapshot)),
                // A damaged or forged record hides only itself.
                Err(e) => tracing::warn!(
                    "receiver {}: snapshot {id}: {e}; this snapshot is left out (`cbcr verify` reports it)",
                    self.remote.addr
                ),
            }
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }
}

impl Backend for Receiver {
    fn location(&self) -> String {
        match self.remote.repository.as_str() {
            "" => format!("quic://{}", self.remote.addr),
            name => format!("quic://{}/{name}", self.remote.addr),
        }
    }

    fn snapshots(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        self.listed(false)
    }

    fn parent_candidates(&self) -> Result<Vec<(ChunkId, Snapshot)>> {
        self.listed(true)
    }

    fn forget(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.remote.forget(ids)
    }

    fn commit(&self, snapshot: &Snapshot) -> Result<ChunkId> {
        let (plain, mut scratch) = (snapshot.encode(), Vec::new());
        self.remote.commit(self.sealing.seal(SNAPSHOT_AAD, &plain, &mut scratch)?, snapshot.tree_id())
    }

    fn start_pack(&self) -> Result<Box<dyn PackSink>> {
        Ok(Box::new(PackUpload::start(Arc::clone(&self.remote))?))
    }

    fn new_blobs<'a>(&'a self, known: &'a KnownBlobs) -> Box<dyn NewBlobs + 'a> {
        Box::new(AskReceiver { remote: &self.remote, known, pending: HaveBatch::default(), asked: None })
    }

    fn have(&self, _index: &ChunkIndex, ids: &[ChunkId]) -> Result<Vec<bool>> {
        self.remote.have(ids)
    }

    fn may_have(&self, _index: &ChunkIndex, _id: &ChunkId) -> bool {
        // The index is the receiver's, not in memory here: the parent, committed there,
        // vouches for its chunks.
        true
    }

    fn blob_source<'a>(&'a self, _index: &'a ChunkIndex) -> Box<dyn BlobSource + 'a> {
        Box::new(Fetched { remote: &self.remote, stream: None })
    }

    fn reads_round_trip(&self) -> bool {
        true
    }

    fn verify_in_place(&self, read_data: bool) -> Result<Option<VerifyReport>> {
        let (_, report) = self.remote.verify(read_data)?;
        serde_json::from_slice(&report)
            .map(Some)
            .map_err(|e| Error::Network(format!("receiver {}: verify report: {e}", self.remote.addr)))
    }

    fn job_store(&self) -> Arc<dyn JobStore> {
        Arc::new(RemoteJobs { remote: Arc::clone(&self.remote), location: self.location() })
    }
}

/// Job objects kept on the receiver, one request each (a shard writes one per checkpoint).
struct RemoteJobs {
    remote: Arc<Remote>,
    location: String,
}

impl JobStore for RemoteJobs {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, name: &JobObject, object: &[u8]) -> Result<()> {
        self.remote.job_put(name, object)
    }

    fn get(&self, name: &JobObject) -> Result<Option<Vec<u8>>> {
        self.remote.job_get(name)
    }

    fn delete(&self, name: &JobObject) -> Result<()> {
        self.remote.job_delete(name)
    }

    fn list(&self, job: Option<JobId>) -> Result<Vec<JobObject>> {
        self.remote.job_list(job)
    }
}

impl PackSink for PackUpload {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        PackUpload::write(self, bytes)
    }

    fn finish(self: Box<Self>) -> Result<Box<dyn PackSeal>> {
        Ok(Box::new(PackUpload::finish(*self)?))
    }
}

impl PackSeal for PackAck {
    fn seal(self: Box<Self>, id: &ChunkId, entries: &[PackEntry], known: &KnownBlobs) -> Result<()> {
        // The receiver made it durable and indexed it: nothing is left to do here.
        self.wait(id)?;
        known.release(entries.iter().map(|e| e.id));
        Ok(())
    }

    fn discard(self: Box<Self>) {}
}

/// Blobs waiting for a receiver's answer: (id, kind, their bytes in `data`).
#[derive(Default)]
struct HaveBatch {
    blobs: Vec<(ChunkId, BlobKind, std::ops::Range<usize>)>,
    data: Vec<u8>,
}

/// Claimed blobs are gathered until one `Have` round trip covers [`limits::HAVE_BATCH_BYTES`];
/// the answer to one batch arrives while the next is chunked.
struct AskReceiver<'a> {
    remote: &'a Remote,
    known: &'a KnownBlobs,
    pending: HaveBatch,
    asked: Option<(HaveBatch, HaveQuery<'a>)>,
}

impl AskReceiver<'_> {
    /// Sends the pending batch's `Have` and packs what the receiver lacks of the batch asked
    /// before.
    fn ask(&mut self, packer: &mut dyn Packer) -> Result<()> {
        let spare = self.pack_answered(packer)?;
        if !self.pending.blobs.is_empty() {
            let ids = self.pending.blobs.iter().map(|b| b.0).collect();
            let query = self.remote.have_start(ids)?;
            self.asked = Some((std::mem::replace(&mut self.pending, spare), query));
        }
        Ok(())
    }

    /// Waits for the batch asked about, packs what the receiver lacks; returns the emptied batch.
    fn pack_answered(&mut self, packer: &mut dyn Packer) -> Result<HaveBatch> {
        let Some((mut batch, query)) = self.asked.take() else { return Ok(HaveBatch::default()) };
        let started = Instant::now();
        let present = query.answer()?;
        packer.waited(started.elapsed());
        for ((id, kind, range), have) in batch.blobs.drain(..).zip(present) {
            if have {
                self.known.release([id]);
            } else {
                packer.pack(id, kind, &batch.data[range])?;
            }
        }
        batch.data.clear();
        Ok(batch)
    }
}

impl NewBlobs for AskReceiver<'_> {
    fn offer(&mut self, id: ChunkId, kind: BlobKind, data: &[u8], packer: &mut dyn Packer) -> Result<()> {
        let p = &mut self.pending;
        let start = p.data.len();
        p.data.extend_from_slice(data);
        p.blobs.push((id, kind, start..p.data.len()));
        if p.data.len() >= limits::HAVE_BATCH_BYTES || p.blobs.len() >= wire::limits::MAX_BATCH_IDS as usize {
            self.ask(packer)?;
        }
        Ok(())
    }

    fn finish(&mut self, packer: &mut dyn Packer) -> Result<()> {
        self.ask(packer)?;
        self.pack_answered(packer).map(drop)
    }
}

/// Blobs fetched from the receiver: announced ones come in one stream, others one at a time.
struct Fetched<'a> {
    remote: &'a Remote,
    stream: Option<BlobStream<'a>>,
}

impl BlobSource for Fetched<'_> {
    fn prefetch(&mut self, ids: Vec<ChunkId>) {
        self.stream = Some(self.remote.fetch(ids));
    }

    fn read_stored(&mut self, id: &ChunkId, stored: &mut Vec<u8>) -> Result<(PackEntry, String)> {
        let fetched = match self.stream.as_mut() {
            Some(s) if s.next_is(id) => s.next(id),
            _ => self.remote.fetch(vec![*id]).next(id),
        };
        let (entry, bytes) = fetched.inspect_err(|_| self.stream = None)?;
        *stored = bytes;
        Ok((entry, format!("receiver {}", self.remote.addr)))
    }
}
