//! What runs on the HTTP workers: a blob's bytes, read from its file (stored, or being
//! filled) or from a direct upstream stream.
//!
//! The HTTP layer gets a [`BlobBody`], opaque: its size, its bytes as a stream
//! ([`BlobBody::stream`], the copying path), or the file regions that hold them
//! ([`BlobBody::regions`], for `sendfile`). Nothing here blocks a worker: file reads and
//! page-cache read-ins run on the blocking pool; waits for a fill's progress have the
//! fill's timeout ([`wait_fill`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};

use super::fill::{wait_fill, FillState};
use crate::digest::{Digest, Hasher};
use crate::error::EngineError;
use crate::metrics::{CacheOutcome, Held};
use crate::store;
use crate::upstream::DownloadEvent;

/// A body's bytes, for the copying path. An error item means the body must not be
/// completed: the HTTP layer aborts the connection.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + 'static>>;

/// Bytes read from disk per chunk sent to a client.
/// (Larger chunks raise single-stream throughput but also the memory each response holds:
/// this chunk, one read ahead, and actix's write buffer.)
const READ_CHUNK: usize = 512 * 1024;
/// Readers streaming blob bytes right now, process-wide. Many concurrent responses read
/// smaller chunks, so memory stays bounded (each holds a chunk, one read ahead and actix's
/// write buffer): 100 concurrent pulls at 512 KiB reached ~260 MiB RSS.
static ACTIVE_READERS: AtomicUsize = AtomicUsize::new(0);
const BUSY_READERS: usize = 8;
const BUSY_READ_CHUNK: usize = 128 * 1024;

fn read_chunk() -> usize {
    if ACTIVE_READERS.load(Ordering::Relaxed) > BUSY_READERS {
        BUSY_READ_CHUNK
    } else {
        READ_CHUNK
    }
}

/// A blob's bytes, ready to be sent. Made by the blob fetcher ([`super::BlobsHandle::open`]).
pub struct BlobBody {
    pub(super) src: Source,
    /// Counts stored regions that had left the page cache and were read back in.
    pub(super) read_in: Arc<AtomicU64>,
    /// How the cache answered: `Hit`, `Miss` (this request started the download) or
    /// `Coalesced` (it joined one).
    pub(super) outcome: CacheOutcome,
    /// Counts this body in `pullcache_fill_waiters` while it reads a download.
    pub(super) _waiting: Option<Held>,
}

/// Where a body's bytes come from.
pub(super) enum Source {
    /// Stored and verified.
    Cached { file: Arc<File>, size: u64 },
    /// Being downloaded; `total` is the upstream's Content-Length if it sent one.
    Filling {
        state: watch::Receiver<FillState>,
        total: Option<u64>,
        wait: Duration,
        /// The repository whose request started the download.
        started_for: String,
    },
    /// Streamed straight from the upstream without storing (the disk is full). Hashed on
    /// the way; the last chunk is released only once the digest is verified.
    Direct {
        events: mpsc::Receiver<DownloadEvent>,
        total: Option<u64>,
        digest: Digest,
        wait: Duration,
    },
}

/// `start..end` of a range (`end` exclusive, `None` = to the end).
fn bounds(range: impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => Some(e + 1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl BlobBody {
    /// How the cache answered this request.
    pub fn outcome(&self) -> CacheOutcome {
        self.outcome
    }

    /// The blob's size, if known yet (an upstream may send no Content-Length).
    pub fn size(&self) -> Option<u64> {
        match &self.src {
            Source::Cached { size, .. } => Some(*size),
            Source::Filling { total, .. } | Source::Direct { total, .. } => *total,
        }
    }

    /// Waits until a download has been verified and returns the blob's size (for a `Range`
    /// on a blob whose upstream sent no length: the range can be placed only then).
    pub async fn complete_size(&mut self) -> Result<u64, EngineError> {
        let Source::Filling { state, wait, .. } = &mut self.src else {
            return self.size().ok_or_else(|| {
                EngineError::DiskFull(
                    "a range on a blob of unknown size cannot be served while the disk is full"
                        .into(),
                )
            });
        };
        wait_fill(
            state,
            *wait,
            "waiting for a blob download to finish",
            |s| match s {
                FillState::Verified { size, .. } => Some(*size),
                _ => None,
            },
        )
        .await
    }

    /// The bytes of `range`, read and copied (see [`ByteStream`]).
    pub fn stream(self, range: impl RangeBounds<u64>) -> ByteStream {
        let (start, end) = bounds(range);
        if let Source::Direct {
            events,
            total,
            digest,
            wait,
        } = self.src
        {
            let r = DirectReader {
                events,
                hasher: Some(Hasher::new(digest.algorithm())),
                digest,
                total,
                wait,
                held: None,
                ready: VecDeque::new(),
                released: 0,
                start,
                end,
                done: false,
            };
            return Box::pin(futures_util::stream::unfold(r, |mut r| async move {
                r.next_chunk().await.map(|c| (c, r))
            }));
        }
        BlobRegions::new(self, start, end).into_stream()
    }

    /// The bytes of `range` as regions of the blob's file, for a zero-copy sender.
    /// `Err(self)` for a body streamed straight from the upstream, which has no file.
    pub fn regions(self, range: impl RangeBounds<u64>) -> Result<BlobRegions, BlobBody> {
        if matches!(self.src, Source::Direct { .. }) {
            return Err(self);
        }
        let (start, end) = bounds(range);
        Ok(BlobRegions::new(self, start, end))
    }
}

/// A readable part of a blob's file: verified, or releasable before verification (never
/// the last byte of a download).
#[derive(Debug, Clone)]
pub struct Region {
    file: Arc<File>,
    pub offset: u64,
    pub len: usize,
    /// The whole blob is on disk (stored, or its download verified).
    complete: bool,
    /// Bytes readable right after this region without waiting.
    more: u64,
}

impl Region {
    /// The file to send `offset..offset + len` of.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

/// Walks `start..end` of a blob as regions of its file: everything at once for a stored
/// blob; for a download, what the writer has published (minus the byte held back until the
/// digest is verified), waiting for more with the download's timeout. An error means the
/// body must not be completed (the download failed, was abandoned or stalled).
pub struct BlobRegions {
    body: BlobBody,
    pos: u64,
    end: Option<u64>,
    done: bool,
}

impl BlobRegions {
    fn new(body: BlobBody, start: u64, end: Option<u64>) -> Self {
        BlobRegions {
            body,
            pos: start,
            end,
            done: false,
        }
    }

    /// The part of the walk readable now, given `avail` readable bytes of `file`:
    /// `Some(Some(region))`, `Some(None)` at the end of the walk, `None` to wait for more.
    fn take(
        &mut self,
        file: &Arc<File>,
        avail: u64,
        complete: bool,
        max: usize,
    ) -> Option<Option<Region>> {
        let limit = self.end.map_or(avail, |e| e.min(avail));
        if self.pos < limit {
            let len = ((limit - self.pos) as usize).min(max.max(1));
            let offset = self.pos;
            self.pos += len as u64;
            return Some(Some(Region {
                file: file.clone(),
                offset,
                len,
                complete,
                more: limit - self.pos,
            }));
        }
        (complete || self.end.is_some_and(|e| self.pos >= e)).then_some(None)
    }

    /// The next region of at most `max` bytes, waiting for a download's progress; `None`
    /// at the end.
    async fn next_region(&mut self, max: usize) -> Option<io::Result<Region>> {
        if self.done {
            return None;
        }
        let next = match &mut self.body.src {
            Source::Cached { file, size } => {
                let (file, size) = (file.clone(), *size);
                Ok(self.take(&file, size, true, max).flatten())
            }
            Source::Direct { .. } => {
                Err(EngineError::Internal("a direct stream has no file regions"))
            }
            Source::Filling { state, wait, .. } => {
                let (mut state, wait) = (state.clone(), *wait);
                wait_fill(&mut state, wait, "waiting for blob bytes", |s| match s {
                    FillState::Streaming { file, .. } | FillState::Verified { file, .. } => {
                        let (avail, complete) = s.readable();
                        self.take(file, avail, complete, max)
                    }
                    _ => None,
                })
                .await
            }
        };
        match next {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => self.fail(e.into_io()),
        }
    }

    /// The next region of at most `max` bytes to send with `sendfile`; `None` at the end.
    /// A complete region that has left the page cache is read back in first, on the
    /// blocking pool, so that sending it does not wait for the disk on an HTTP worker.
    pub async fn next(&mut self, max: usize) -> Option<io::Result<Region>> {
        let region = match self.next_region(max).await? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if region.complete {
            let (file, offset, len) = (region.file.clone(), region.offset, region.len);
            let read_in =
                tokio::task::spawn_blocking(move || store::make_resident(&file, offset, len))
                    .await
                    .unwrap_or(false);
            if read_in {
                self.body.read_in.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(Ok(region))
    }

    /// Ends the walk with `e` (a sender that could not deliver a region calls this too).
    pub fn fail<T>(&mut self, e: io::Error) -> Option<io::Result<T>> {
        self.done = true;
        Some(Err(e))
    }

    /// Walks again from `pos` (at most where it is now): a region handed out was not
    /// delivered after all.
    pub fn rewind(&mut self, pos: u64) {
        self.pos = self.pos.min(pos);
    }

    /// The rest of the walk as bytes read from the file (the copying path).
    pub fn into_stream(self) -> ByteStream {
        let reader = BlobReader {
            regions: self,
            ahead: None,
            _active: ActiveReader::new(),
        };
        Box::pin(futures_util::stream::unfold(reader, |mut r| async move {
            r.next_chunk().await.map(|c| (c, r))
        }))
    }
}

/// Streams a blob's bytes by reading its file (the copying path, for connections that
/// cannot use `sendfile`).
struct BlobReader {
    regions: BlobRegions,
    /// The next chunk of a complete blob, already being read (position, length): the disk
    /// read overlaps the socket write of the previous chunk.
    ahead: Option<(u64, usize, tokio::task::JoinHandle<io::Result<Bytes>>)>,
    _active: ActiveReader,
}

impl BlobReader {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, io::Error>> {
        let r = match self.regions.next_region(read_chunk()).await? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let read = match self.ahead.take() {
            Some((p, l, h)) if p == r.offset && l == r.len => h,
            _ => {
                let (f, pos, len) = (r.file.clone(), r.offset, r.len);
                tokio::task::spawn_blocking(move || store::read_at(&f, pos, len))
            }
        };
        match read.await {
            Ok(Ok(b)) if b.len() == r.len => {
                if r.complete && r.more > 0 {
                    let (p, l) = (r.offset + r.len as u64, (r.more as usize).min(read_chunk()));
                    let f = r.file;
                    self.ahead = Some((
                        p,
                        l,
                        tokio::task::spawn_blocking(move || store::read_at(&f, p, l)),
                    ));
                }
                Some(Ok(b))
            }
            Ok(Ok(_)) => self.regions.fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file shorter than recorded",
            )),
            Ok(Err(e)) => self.regions.fail(e),
            Err(e) => self.regions.fail(io::Error::other(e.to_string())),
        }
    }
}

/// Counts a copying reader as active while it exists (chooses the chunk size).
struct ActiveReader;

impl ActiveReader {
    fn new() -> Self {
        ACTIVE_READERS.fetch_add(1, Ordering::Relaxed);
        ActiveReader
    }
}

impl Drop for ActiveReader {
    fn drop(&mut self) {
        ACTIVE_READERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a direct stream: hashes every byte, releases each chunk only when the next one has
/// arrived, and the last one only after the digest matched.
struct DirectReader {
    events: mpsc::Receiver<DownloadEvent>,
    hasher: Option<Hasher>,
    digest: Digest,
    total: Option<u64>,
    wait: Duration,
    /// The newest chunk, not yet given to the client.
    held: Option<Bytes>,
    /// Released chunks waiting to be returned.
    ready: VecDeque<Bytes>,
    /// Bytes before `held`.
    released: u64,
    start: u64,
    end: Option<u64>,
    done: bool,
}

impl DirectReader {
    /// The part of `chunk` (which starts at `self.released`) inside the requested range.
    fn clip(&mut self, chunk: Bytes) -> Option<Bytes> {
        let lo = self.released;
        let hi = lo + chunk.len() as u64;
        self.released = hi;
        let from = self.start.max(lo);
        let to = self.end.map_or(hi, |e| e.min(hi));
        (from < to).then(|| chunk.slice((from - lo) as usize..(to - lo) as usize))
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, io::Error>> {
        loop {
            if let Some(out) = self.ready.pop_front() {
                return Some(Ok(out));
            }
            if self.done || self.end.is_some_and(|e| self.released >= e) {
                return None;
            }
            let ev = match tokio::time::timeout(self.wait, self.events.recv()).await {
                Err(_) => {
                    return self.fail(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no progress from upstream",
                    ))
                }
                Ok(None) => return self.fail(io::Error::other("upstream stream ended early")),
                Ok(Some(ev)) => ev,
            };
            match ev {
                DownloadEvent::Chunk(pieces) => {
                    for b in pieces {
                        if let Some(h) = self.hasher.as_mut() {
                            h.update(&b);
                        }
                        if let Some(prev) = self.held.replace(b) {
                            if let Some(out) = self.clip(prev) {
                                self.ready.push_back(out);
                            }
                        }
                    }
                }
                DownloadEvent::End => {
                    let size = self.released + self.held.as_ref().map_or(0, |b| b.len() as u64);
                    let actual = self.hasher.take().map(|h| h.finish());
                    if actual.as_ref() != Some(&self.digest)
                        || self.total.is_some_and(|t| t != size)
                    {
                        tracing::error!(expected = %self.digest, actual = %actual.as_ref().map(|a| a.to_string()).unwrap_or_default(), "upstream blob does not match its digest; connection aborted");
                        return self.fail(io::Error::other("blob does not match its digest"));
                    }
                    self.done = true;
                    return self.held.take().and_then(|b| self.clip(b)).map(Ok);
                }
                DownloadEvent::Failed(e) => return self.fail(io::Error::other(e.to_string())),
                DownloadEvent::Headers { .. } => {}
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Option<Result<Bytes, io::Error>> {
        self.done = true;
        Some(Err(e))
    }
}
