//! A repository in S3-compatible object storage: `s3://BUCKET/PREFIX`, through `object_store`.
//!
//! Credentials, region and endpoint come from the usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true` for a server
//! without TLS). The objects have the local layout's keys under PREFIX. Files are written locally
//! first (a private work directory, removed at exit) and uploaded whole or in parts; index runs
//! are fetched into the work directory to be searched in place. There is no writer lock: every
//! object is immutable and named by its content, and a snapshot commit is one PUT.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

use super::{ObjectInfo, ObjectKind, ObjectReader, Store, WriterClaim};
use crate::error::{Error, IoContext, Result};
use crate::{fault, limits};

struct Inner {
    /// Read-ahead windows of objects, most recently used first, at most
    /// [`limits::S3_READ_CACHE`] bytes in all.
    windows: std::sync::Mutex<Windows>,
    runtime: tokio::runtime::Runtime,
    bucket: AmazonS3,
    /// `s3://BUCKET/PREFIX`, for messages.
    url: String,
    bucket_name: String,
    /// PREFIX without slashes at either end; empty for the bucket's root.
    prefix: String,
}

pub struct S3Store {
    inner: Arc<Inner>,
    work: PathBuf,
}

const SCRATCH_PREFIX: &str = "cbcr-s3-";

impl Inner {
    fn key(&self, kind: ObjectKind, name: &str) -> Key {
        self.join(&kind.key(name))
    }

    fn join(&self, rel: &str) -> Key {
        match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => Key::from(rel),
            (false, true) => Key::from(self.prefix.as_str()),
            (false, false) => Key::from(format!("{}/{rel}", self.prefix)),
        }
    }

    /// Our error for a failed request on `key`: a missing object is an `Io` error of kind
    /// NotFound (callers that list and then read retry on it), anything else names the store.
    fn error(&self, key: &Key, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::Io {
                path: format!("s3://{}", self.bucket_key(key)).into(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such object"),
            },
            other => {
                Error::ObjectStore { location: format!("s3://{}", self.bucket_key(key)), detail: other.to_string() }
            }
        }
    }

    fn bucket_key(&self, key: &Key) -> String {
        format!("{}/{key}", self.bucket_name)
    }

    /// Bytes `offset..offset + len` of an object, exactly.
    fn get_bytes(&self, key: &Key, offset: u64, len: u64) -> Result<bytes::Bytes> {
        let bytes =
            self.runtime.block_on(self.bucket.get_range(key, offset..offset + len)).map_err(|e| self.error(key, e))?;
        if bytes.len() as u64 != len {
            return Err(Error::ObjectStore {
                location: format!("s3://{}", self.bucket_key(key)),
                detail: format!("asked for {len} bytes at {offset}, got {}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Uploads a local file: one PUT when it is small, else in parts of
    /// [`limits::S3_PART_SIZE`], so memory stays bounded whatever the file's size.
    fn upload(&self, key: &Key, file: &Path) -> Result<()> {
        let len = fs::metadata(file).at(file)?.len();
        if len <= limits::S3_PART_SIZE as u64 {
            let bytes = fs::read(file).at(file)?;
            return self
                .runtime
                .block_on(self.bucket.put(key, PutPayload::from(bytes)))
                .map(|_| ())
                .map_err(|e| self.error(key, e));
        }
        let mut src = fs::File::open(file).at(file)?;
        self.runtime.block_on(async {
            let upload = self.bucket.put_multipart(key).await.map_err(|e| self.error(key, e))?;
            let mut parts = WriteMultipart::new_with_chunk_size(upload, limits::S3_PART_SIZE);
            let mut piece = vec![0u8; limits::S3_PART_SIZE];
            loop {
                let n = read_full(&mut src, &mut piece).at(file)?;
                if n == 0 {
                    break;
                }
                parts.wait_for_capacity(limits::S3_PARTS_IN_FLIGHT).await.map_err(|e| self.error(key, e))?;
                parts.write(&piece[..n]);
            }
            parts.finish().await.map(|_| ()).map_err(|e| self.error(key, e))
        })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(src: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl S3Store {
    /// Opens `BUCKET/PREFIX` (the part of the URL after `s3://`). Nothing is asked of the
    /// server yet: a wrong endpoint or credentials show on the first request.
    pub fn open(spec: &str) -> Result<Self> {
        let (bucket, prefix) = spec.split_once('/').unwrap_or((spec, ""));
        if bucket.is_empty() {
            return Err(Error::Usage(format!("s3://{spec}: give a bucket, as s3://BUCKET/PREFIX")));
        }
        let prefix = prefix.trim_matches('/').to_owned();
        let url = format!("s3://{bucket}{}{prefix}", if prefix.is_empty() { "" } else { "/" });
        // A request that fails for a passing reason is retried for a while, not forever.
        let retry = object_store::RetryConfig {
            max_retries: limits::S3_MAX_RETRIES,
            retry_timeout: limits::S3_RETRY_TIMEOUT,
            ..Default::default()
        };
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            .build()
            .map_err(|e| Error::ObjectStore { location: url.clone(), detail: e.to_string() })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cbcr-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::ObjectStore {
                location: url.clone(),
                detail: format!("cannot start a runtime: {e}"),
            })?;
        static OPENED: AtomicU64 = AtomicU64::new(0);
        let work = super::scratch_dir(SCRATCH_PREFIX, OPENED.fetch_add(1, Ordering::Relaxed));
        for dir in ["tmp", "index"] {
            fs::create_dir_all(work.join(dir)).at(&work.join(dir))?;
        }
        let bucket_name = bucket.to_owned();
        Ok(Self {
            inner: Arc::new(Inner { windows: Default::default(), runtime, bucket: store, url, bucket_name, prefix }),
            work,
        })
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.work);
    }
}

/// Read-ahead windows: `(object, start, bytes)`, most recently used first.
#[derive(Default)]
struct Windows {
    list: std::collections::VecDeque<(Key, u64, bytes::Bytes)>,
    bytes: usize,
}

impl Windows {
    /// Copies `buf.len()` bytes at `offset` of `key` into `buf` if a window holds them.
    fn read(&mut self, key: &Key, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        let hit = self
            .list
            .iter()
            .position(|(k, start, bytes)| k == key && offset >= *start && end <= start + bytes.len() as u64);
        let Some(i) = hit else { return false };
        let window = self.list.remove(i).expect("found above");
        let from = (offset - window.1) as usize;
        buf.copy_from_slice(&window.2[from..from + buf.len()]);
        self.list.push_front(window);
        true
    }

    fn insert(&mut self, key: Key, start: u64, bytes: bytes::Bytes) {
        self.bytes += bytes.len();
        self.list.push_front((key, start, bytes));
        while self.bytes > limits::S3_READ_CACHE {
            let (_, _, old) = self.list.pop_back().expect("over budget means not empty");
            self.bytes -= old.len();
        }
    }
}

/// An object open for reads. Readers mostly go through a pack in order (a file's chunks were
/// packed in order), so a read that no window holds fetches [`limits::S3_READ_AHEAD`] bytes
/// from its offset into a window the next reads (of any thread) are served from: one request
/// per window instead of one per blob (measured: a restore through per-blob GETs ran at
/// 4 MB/s against a local S3 server).
struct S3Object {
    inner: Arc<Inner>,
    key: Key,
    len: u64,
}

impl ObjectReader for S3Object {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(Error::Io {
                path: format!("s3://{}", self.inner.bucket_key(&self.key)).into(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, format!("the object is {} bytes", self.len)),
            });
        }
        let windows = || self.inner.windows.lock().expect("no reader panics holding it");
        if windows().read(&self.key, offset, buf) {
            return Ok(());
        }
        let ahead = (limits::S3_READ_AHEAD as u64).min(self.len - offset).max(buf.len() as u64);
        let bytes = self.inner.get_bytes(&self.key, offset, ahead)?;
        buf.copy_from_slice(&bytes[..buf.len()]);
        if bytes.len() > buf.len() {
            windows().insert(self.key.clone(), offset, bytes);
        }
        Ok(())
    }
}

impl Store for S3Store {
    fn location(&self) -> String {
        self.inner.url.clone()
    }

    fn work_dir(&self) -> &Path {
        &self.work
    }

    fn is_empty(&self) -> Result<bool> {
        let s = &self.inner;
        let prefix = s.join("");
        let first = s.runtime.block_on(async {
            let mut listing = s.bucket.list(Some(&prefix));
            listing.try_next().await
        });
        Ok(first.map_err(|e| s.error(&prefix, e))?.is_none())
    }

    fn create(&self) -> Result<()> {
        Ok(())
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>> {
        let s = &self.inner;
        let key = s.key(kind, name);
        let got = s.runtime.block_on(async { s.bucket.get(&key).await?.bytes().await });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s.error(&key, e)),
        }
    }

    fn open(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectReader>> {
        let s = &self.inner;
        let key = s.key(kind, name);
        let meta = s.runtime.block_on(s.bucket.head(&key)).map_err(|e| s.error(&key, e))?;
        Ok(Box::new(S3Object { inner: Arc::clone(s), key, len: meta.size }))
    }

    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let s = &self.inner;
        let key = s.key(kind, name);
        // A snapshot commit is this one PUT: the crash points on either side of it stand where
        // a local directory has its write and its rename.
        let snapshot = kind == ObjectKind::Snapshot;
        if snapshot {
            fault::point("snapshot-write");
        }
        s.runtime.block_on(s.bucket.put(&key, PutPayload::from(bytes.to_vec()))).map_err(|e| s.error(&key, e))?;
        if snapshot {
            fault::point("snapshot-rename");
        }
        Ok(())
    }

    fn put_file(&self, kind: ObjectKind, name: &str, tmp: &Path) -> Result<()> {
        let uploaded = self.inner.upload(&self.inner.key(kind, name), tmp);
        if uploaded.is_ok() && kind == ObjectKind::Index {
            let kept = self.work.join("index").join(name);
            return fs::rename(tmp, &kept).at(&kept);
        }
        let _ = fs::remove_file(tmp);
        uploaded
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let s = &self.inner;
        let prefix = s.join(kind.dir());
        let metas: Vec<object_store::ObjectMeta> =
            s.runtime.block_on(s.bucket.list(Some(&prefix)).try_collect()).map_err(|e| s.error(&prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| Some(ObjectInfo { name: m.location.filename()?.to_owned(), len: m.size }))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let s = &self.inner;
        let key = s.key(kind, name);
        match s.runtime.block_on(s.bucket.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s.error(&key, e)),
        }
    }

    fn index_run(&self, name: &str) -> Result<PathBuf> {
        let kept = self.work.join("index").join(name);
        if kept.exists() {
            return Ok(kept);
        }
        let bytes = self.get(ObjectKind::Index, name)?.ok_or_else(|| Error::Io {
            path: format!("{}/index/{name}", self.inner.url).into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such object"),
        })?;
        let tmp = super::tmp_path(&self.work, "fetch");
        // Synced before the rename: after a power loss the kept copy is whole or absent (an
        // absent one is fetched again), never a name with lost data under it.
        super::write_synced(&tmp, &bytes)?;
        fs::rename(&tmp, &kept).at(&kept)?;
        Ok(kept)
    }

    fn claim_writer(&self) -> Result<Box<dyn WriterClaim>> {
        // Several writers may share a bucket: the claim guards only our own work directory.
        Ok(Box::new(super::TmpClaim { tmp: Some(self.work.join("tmp")), _lock: None }))
    }

    fn claim_shared_writer(&self) -> Result<Box<dyn WriterClaim>> {
        // The work directory is this process's own: it may be cleaned.
        self.claim_writer()
    }
}
