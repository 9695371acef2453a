//! The blob fetcher actor owns the table of blob downloads in flight, keyed by
//! (upstream, digest). The first request for an uncached blob starts exactly one upstream
//! download; every later request for that digest joins it and reads the bytes already on
//! disk, then the rest as they arrive. The download continues when the requester goes away.
//!
//! A download ("fill") is written by a dedicated writer thread: it receives chunks from the
//! upstream actor through a bounded channel, hashes them, appends them to a temporary file and
//! publishes progress on a `watch` channel. Readers follow the temporary file up to the
//! published length minus one byte: the last byte is released only once the digest has been
//! verified, so no client ever receives a complete wrong blob. On a mismatch the fill fails,
//! readers' streams end in an error (their connections are aborted), the temporary file is
//! deleted and nothing is recorded; the next request fetches afresh. A verified fill is
//! fsynced, renamed into the store and recorded in the metadata before it leaves the table.
//!
//! Every fill ends in an explicit [`FillOutcome`]; a drop guard on the writer publishes
//! `Abandoned` if it dies, so waiters never hang, and waiters have timeouts of their own.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::digest::{Digest, Hasher};
use crate::error::{EngineError, UpstreamError};
use crate::eviction::EvictionHandle;
use crate::health::HealthHandle;
use crate::messages::FillEvent;
use crate::metadata::{ForgetBlob, LinkBlobs, LookupBlob, Metadata, MetadataStore, TouchBlob};
use crate::store::{self, BlobStore};
use crate::upstream::UpstreamHandle;

/// Bytes read from disk per chunk sent to a client.
/// (Larger chunks raise single-stream throughput but also the memory each response holds:
/// this chunk, one read ahead, and actix's write buffer.)
const READ_CHUNK: usize = 512 * 1024;
/// A fill publishes its progress at least this often while chunks are queued.
const PUBLISH_EVERY: u64 = 1024 * 1024;
/// Readers streaming blob bytes right now, process-wide. Many concurrent responses read
/// smaller chunks, so memory stays bounded (each holds a chunk, one read ahead and actix's
/// write buffer): 100 concurrent pulls at 512 KiB reached ~260 MiB RSS.
static ACTIVE_READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const BUSY_READERS: usize = 8;
const BUSY_READ_CHUNK: usize = 128 * 1024;

fn read_chunk() -> usize {
    if ACTIVE_READERS.load(Ordering::Relaxed) > BUSY_READERS {
        BUSY_READ_CHUNK
    } else {
        READ_CHUNK
    }
}

/// Chunks buffered between the upstream reader and the fill writer.
const FILL_CHANNEL: usize = 8;

/// Progress of one fill, published by its writer.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving; `written` of them are in `file`.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
    },
    /// All bytes are in `file` and match the digest.
    Verified {
        file: Arc<File>,
        size: u64,
    },
    Failed(EngineError),
    /// The writer went away without finishing (its thread died or the upstream actor stopped).
    Abandoned,
}

impl FillState {
    /// How many bytes readers may take now (the last byte waits for verification), and
    /// whether that is everything.
    fn readable(&self) -> (u64, bool) {
        match self {
            FillState::Streaming { written, total, .. } => {
                let cap = match total {
                    Some(t) => (*written).min(t.saturating_sub(1)),
                    None => written.saturating_sub(1),
                };
                (cap, false)
            }
            FillState::Verified { size, .. } => (*size, true),
            _ => (0, false),
        }
    }
}

/// How a fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    Done,
    Failed,
    TimedOut,
    Abandoned,
}

/// Bytes of a blob, ready to stream.
#[derive(Debug)]
pub enum BlobSource {
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
        events: mpsc::Receiver<FillEvent>,
        total: Option<u64>,
        digest: Digest,
        wait: Duration,
    },
}

impl BlobSource {
    pub fn size(&self) -> Option<u64> {
        match self {
            BlobSource::Cached { size, .. } => Some(*size),
            BlobSource::Filling { total, .. } | BlobSource::Direct { total, .. } => *total,
        }
    }

    /// Waits until a download has been verified and returns the blob's size (for a `Range`
    /// on a blob whose upstream sent no length: the range can be placed only then).
    pub async fn complete_size(&mut self) -> Result<u64, EngineError> {
        let BlobSource::Filling { state, wait, .. } = self else {
            return self.size().ok_or_else(|| {
                EngineError::DiskFull(
                    "a range on a blob of unknown size cannot be served while the disk is full"
                        .into(),
                )
            });
        };
        loop {
            match &*state.borrow_and_update() {
                FillState::Verified { size, .. } => return Ok(*size),
                FillState::Failed(e) => return Err(e.clone()),
                FillState::Abandoned => return Err(EngineError::Abandoned),
                _ => {}
            }
            match tokio::time::timeout(*wait, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    if let FillState::Verified { size, .. } = &*state.borrow() {
                        return Ok(*size);
                    }
                    return Err(EngineError::Abandoned);
                }
                Err(_) => {
                    return Err(EngineError::Upstream(UpstreamError::Timeout {
                        upstream: "-".into(),
                        stage: "waiting for a blob download to finish",
                    }))
                }
            }
        }
    }

    /// The bytes `start..end` (end exclusive; `None` = to the end). An error item means the
    /// body must not be completed: the HTTP layer aborts the connection.
    pub fn stream(
        self,
        start: u64,
        end: Option<u64>,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + 'static>> {
        if let BlobSource::Direct {
            events,
            total,
            digest,
            wait,
        } = self
        {
            let r = DirectReader {
                events,
                hasher: Some(Hasher::new(digest.algorithm())),
                digest,
                total,
                wait,
                held: None,
                ready: Default::default(),
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

    /// The bytes `start..end` as regions of the blob's file, for a zero-copy sender
    /// (`sendfile`). `Err(self)` for a [`BlobSource::Direct`] stream, which has no file.
    pub fn regions(self, start: u64, end: Option<u64>) -> Result<BlobRegions, BlobSource> {
        if matches!(self, BlobSource::Direct { .. }) {
            return Err(self);
        }
        Ok(BlobRegions::new(self, start, end))
    }
}

/// What a reader can do right now.
enum View {
    Read {
        file: Arc<File>,
        avail: u64,
        complete: bool,
    },
    Wait,
    Fail(io::Error),
}

/// A readable, verified-or-releasable part of a blob's file.
#[derive(Debug, Clone)]
pub struct Region {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
    /// The whole blob is on disk (stored, or its download verified): the region can be
    /// read ahead of time, and `more` bytes after it are readable at once.
    pub complete: bool,
    /// Bytes readable right after this region without waiting.
    pub more: u64,
}

/// Walks `start..end` of a blob as regions of its file: everything at once for a stored
/// blob; for a download, what the writer has published (minus the byte held back until the
/// digest is verified), waiting for more with the download's timeout. An error means the
/// body must not be completed (the download failed, was abandoned or stalled).
pub struct BlobRegions {
    src: BlobSource,
    pos: u64,
    end: Option<u64>,
    done: bool,
    writer_gone: bool,
}

impl BlobRegions {
    fn new(src: BlobSource, start: u64, end: Option<u64>) -> Self {
        BlobRegions {
            src,
            pos: start,
            end,
            done: false,
            writer_gone: false,
        }
    }

    fn view(&mut self) -> View {
        match &mut self.src {
            BlobSource::Cached { file, size } => View::Read {
                file: file.clone(),
                avail: *size,
                complete: true,
            },
            BlobSource::Direct { .. } => {
                View::Fail(io::Error::other("direct streams are read by DirectReader"))
            }
            BlobSource::Filling { state, .. } => {
                let s = state.borrow_and_update();
                match &*s {
                    FillState::Connecting => View::Wait,
                    FillState::Streaming { file, .. } | FillState::Verified { file, .. } => {
                        let (avail, complete) = s.readable();
                        View::Read {
                            file: file.clone(),
                            avail,
                            complete,
                        }
                    }
                    FillState::Failed(e) => View::Fail(io::Error::other(e.to_string())),
                    FillState::Abandoned => View::Fail(io::Error::other("download abandoned")),
                }
            }
        }
    }

    /// The next region of at most `max` bytes; `None` at the end.
    pub async fn next(&mut self, max: usize) -> Option<io::Result<Region>> {
        if self.done {
            return None;
        }
        loop {
            match self.view() {
                View::Fail(e) => return self.fail(e),
                View::Read {
                    file,
                    avail,
                    complete,
                } => {
                    let limit = self.end.map_or(avail, |e| e.min(avail));
                    if self.pos < limit {
                        let len = ((limit - self.pos) as usize).min(max.max(1));
                        let offset = self.pos;
                        self.pos += len as u64;
                        return Some(Ok(Region {
                            file,
                            offset,
                            len,
                            complete,
                            more: limit - self.pos,
                        }));
                    }
                    if complete || self.end.is_some_and(|e| self.pos >= e) {
                        self.done = true;
                        return None;
                    }
                }
                View::Wait => {}
            }
            // Nothing new to read yet: wait for the writer, but not forever.
            let BlobSource::Filling { state, wait, .. } = &mut self.src else {
                return self.fail(io::Error::other("cached blob ended early"));
            };
            match tokio::time::timeout(*wait, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) if !self.writer_gone => {
                    // The writer has finished or died; its last state is final. Look once more.
                    self.writer_gone = true;
                }
                Ok(Err(_)) => return self.fail(io::Error::other("download abandoned")),
                Err(_) => {
                    return self.fail(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no progress from upstream",
                    ))
                }
            }
        }
    }

    /// Ends the walk with `e` (a reader that finds the file short calls this too).
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
    pub fn into_stream(
        self,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + 'static>> {
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
        let r = match self.regions.next(read_chunk()).await? {
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

/// Reads a [`BlobSource::Direct`] stream: hashes every byte, releases each chunk only when
/// the next one has arrived, and the last one only after the digest matched.
struct DirectReader {
    events: mpsc::Receiver<FillEvent>,
    hasher: Option<Hasher>,
    digest: Digest,
    total: Option<u64>,
    wait: Duration,
    /// The newest chunk, not yet given to the client.
    held: Option<Bytes>,
    /// Released chunks waiting to be returned.
    ready: std::collections::VecDeque<Bytes>,
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
                FillEvent::Chunk(pieces) => {
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
                    if let Some(out) = self.ready.pop_front() {
                        return Some(Ok(out));
                    }
                }
                FillEvent::End => {
                    let size = self.released + self.held.as_ref().map_or(0, |b| b.len() as u64);
                    let actual = self.hasher.take().map(|h| h.finish());
                    if actual.as_ref() != Some(&self.digest)
                        || self.total.is_some_and(|t| t != size)
                    {
                        tracing::error!(expected = %self.digest, actual = ?actual, "upstream blob does not match its digest; connection aborted");
                        return self.fail(io::Error::other("blob does not match its digest"));
                    }
                    self.done = true;
                    return self.held.take().and_then(|b| self.clip(b)).map(Ok);
                }
                FillEvent::Failed(e) => return self.fail(io::Error::other(e.to_string())),
                FillEvent::Headers { .. } => {}
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Option<Result<Bytes, io::Error>> {
        self.done = true;
        Some(Err(e))
    }
}

// ---------------------------------------------------------------------------------------
// The actor.

type FillKey = (usize, Digest);

struct InFlight {
    id: u64,
    state: watch::Receiver<FillState>,
    /// The repository the download was started for (its upstream request's path).
    repo: String,
}

pub struct BlobFetcher {
    inflight: HashMap<FillKey, InFlight>,
    next_id: u64,
    d: FetcherDeps,
    outcomes: HashMap<&'static str, u64>,
}

/// What the blob fetcher works with.
#[derive(Clone)]
pub struct FetcherDeps {
    pub meta: Addr<Metadata>,
    /// For the fill writers' threads, which record blobs directly (sled is thread-safe).
    pub meta_store: MetadataStore,
    pub upstreams: UpstreamHandle,
    pub health: HealthHandle,
    pub eviction: EvictionHandle,
    /// Upstream names by index (the metadata keys).
    pub names: Arc<Vec<String>>,
    pub store: BlobStore,
    pub clock: Clock,
    /// How long a reader waits for progress before giving up.
    pub wait: Duration,
    pub disk: Arc<DiskState>,
}

/// Whether the disk recently refused a write. While it is full, misses are streamed from
/// the upstream to the client without storing; caching is tried again after
/// [`DiskState::RETRY_MS`].
#[derive(Debug, Default)]
pub struct DiskState {
    full_since_ms: AtomicU64,
    last_logged_ms: AtomicU64,
    /// Test hook: every write fails as if the disk were full.
    inject_full: AtomicBool,
}

impl DiskState {
    pub const RETRY_MS: u64 = 30_000;

    pub fn is_full(&self, now_ms: u64) -> bool {
        let since = self.full_since_ms.load(Ordering::SeqCst);
        since != 0 && now_ms < since + Self::RETRY_MS
    }

    /// Records a full disk and logs it, at most once a minute.
    pub fn mark_full(&self, now_ms: u64, detail: &str) {
        self.full_since_ms.store(now_ms.max(1), Ordering::SeqCst);
        let last = self.last_logged_ms.load(Ordering::SeqCst);
        if last == 0 || now_ms >= last + 60_000 {
            self.last_logged_ms.store(now_ms.max(1), Ordering::SeqCst);
            tracing::error!(detail, "disk full: blobs are streamed from the upstream without being stored until space is back");
        }
    }

    #[doc(hidden)]
    pub fn inject_full(&self, on: bool) {
        self.inject_full.store(on, Ordering::SeqCst);
        if !on {
            self.full_since_ms.store(0, Ordering::SeqCst);
        }
    }

    fn injected(&self) -> bool {
        self.inject_full.load(Ordering::SeqCst)
    }
}

impl Actor for BlobFetcher {
    type Context = Context<Self>;
}

impl BlobFetcher {
    pub fn start(deps: FetcherDeps) -> BlobsHandle {
        let disk = deps.disk.clone();
        let addr = BlobFetcher {
            inflight: HashMap::new(),
            next_id: 0,
            d: deps,
            outcomes: HashMap::new(),
        }
        .start();
        BlobsHandle { addr, disk }
    }

    /// The fill for `key` if it can still deliver. A failed or abandoned fill whose writer
    /// has not yet reported back is dropped here, so a new request starts afresh instead of
    /// inheriting the failure.
    fn live_fill(&mut self, key: &FillKey) -> Option<(watch::Receiver<FillState>, String)> {
        let f = self.inflight.get(key)?;
        if matches!(
            &*f.state.borrow(),
            FillState::Failed(_) | FillState::Abandoned
        ) {
            self.inflight.remove(key);
            return None;
        }
        Some((f.state.clone(), f.repo.clone()))
    }

    /// Joins the fill for `key`, starting it if there is none.
    fn start_or_join(
        &mut self,
        ctx: &mut Context<Self>,
        key: FillKey,
        repo: String,
    ) -> Result<(watch::Receiver<FillState>, String), EngineError> {
        if let Some(live) = self.live_fill(&key) {
            return Ok(live);
        }
        let (state_tx, state_rx) = watch::channel(FillState::Connecting);
        let (events_tx, events_rx) = mpsc::channel(FILL_CHANNEL);
        self.next_id += 1;
        let id = self.next_id;
        let writer = FillWriter {
            key: key.clone(),
            id,
            upstream_name: self.d.names[key.0].clone(),
            store: self.d.store.clone(),
            meta: self.d.meta_store.clone(),
            clock: self.d.clock.clone(),
            fetcher: ctx.address(),
            disk: self.d.disk.clone(),
            eviction: self.d.eviction.clone(),
        };
        std::thread::Builder::new()
            .name(format!("fill-{}", &key.1.hex()[..12]))
            .spawn(move || writer.run(events_rx, state_tx))
            .map_err(|e| EngineError::Storage(format!("cannot start a download thread: {e}")))?;
        self.d
            .upstreams
            .start_download(key.0, &repo, &key.1, events_tx);
        tracing::info!(upstream = %self.d.names[key.0], repo = %repo, digest = %key.1, "blob fill started");
        self.inflight.insert(
            key,
            InFlight {
                id,
                state: state_rx.clone(),
                repo: repo.clone(),
            },
        );
        Ok((state_rx, repo))
    }
}

/// Open a blob for reading: from the store, by joining a fill, or by starting one.
#[derive(Message)]
#[rtype(result = "Result<BlobSource, EngineError>")]
pub struct OpenBlob {
    pub upstream: usize,
    pub repo: String,
    pub digest: Digest,
}

/// The size of a blob, without downloading it.
#[derive(Message)]
#[rtype(result = "Result<u64, EngineError>")]
pub struct StatBlob {
    pub upstream: usize,
    pub repo: String,
    pub digest: Digest,
}

/// Sent by a fill writer when it is done, whatever the outcome.
#[derive(Message)]
#[rtype(result = "()")]
struct FillFinished {
    key: FillKey,
    id: u64,
    outcome: FillOutcome,
}

/// Counts of finished fills by outcome.
#[derive(Message)]
#[rtype(result = "HashMap<&'static str, u64>")]
pub struct FillStats;

/// A blob stored for another upstream is served through this one only once this upstream
/// confirms it has it (a HEAD), so private content never leaks across upstreams; the
/// confirmation is then remembered.
async fn confirm_and_link(
    meta: &Addr<Metadata>,
    upstreams: &UpstreamHandle,
    upstream_name: String,
    upstream: usize,
    repo: &str,
    digest: &Digest,
) -> Result<(), EngineError> {
    upstreams
        .head_blob(upstream, repo, digest)
        .await
        .map_err(|e| EngineError::from_upstream(e, &format!("blob {digest}")))?;
    meta.send(LinkBlobs {
        upstream: upstream_name,
        digests: vec![digest.clone()],
    })
    .await??;
    Ok(())
}

/// What the store holds for a blob: an open, verified file of the recorded size, or nothing.
enum Lookup {
    Cached(Arc<File>, u64),
    Missing,
}

impl Handler<OpenBlob> for BlobFetcher {
    type Result = ResponseActFuture<Self, Result<BlobSource, EngineError>>;

    fn handle(&mut self, m: OpenBlob, _: &mut Self::Context) -> Self::Result {
        let key = (m.upstream, m.digest.clone());
        let wait = self.d.wait;
        if let Some((state, started_for)) = self.live_fill(&key) {
            return Box::pin(fut::ready(Ok(filling(state, wait, started_for))));
        }
        let lookup = lookup_cached(
            self.d.meta.clone(),
            self.d.upstreams.clone(),
            self.d.store.clone(),
            self.d.names[m.upstream].clone(),
            m.upstream,
            m.repo.clone(),
            m.digest.clone(),
            self.d.clock.now_ms(),
        );
        let repo = m.repo;
        Box::pin(lookup.into_actor(self).map(move |res, act, ctx| {
            match res? {
                Lookup::Cached(file, size) => Ok(BlobSource::Cached { file, size }),
                Lookup::Missing => {
                    // State may have changed while we looked.
                    if let Some((s, started_for)) = act.live_fill(&key) {
                        return Ok(filling(s, wait, started_for));
                    }
                    if act.d.health.is_down(key.0) {
                        return Err(EngineError::UpstreamDown(act.d.names[key.0].clone()));
                    }
                    if act.d.disk.is_full(act.d.clock.now_ms()) {
                        let (tx, rx) = mpsc::channel(FILL_CHANNEL);
                        act.d.upstreams.start_download(key.0, &repo, &key.1, tx);
                        return Ok(BlobSource::Direct {
                            events: rx,
                            total: None,
                            digest: key.1,
                            wait,
                        });
                    }
                    act.start_or_join(ctx, key, repo)
                        .map(|(s, started_for)| filling(s, wait, started_for))
                }
            }
        }))
    }
}

fn filling(state: watch::Receiver<FillState>, wait: Duration, started_for: String) -> BlobSource {
    BlobSource::Filling {
        state,
        total: None,
        wait,
        started_for,
    }
}

#[allow(clippy::too_many_arguments)]
async fn lookup_cached(
    meta: Addr<Metadata>,
    upstreams: UpstreamHandle,
    store: BlobStore,
    upstream_name: String,
    upstream: usize,
    repo: String,
    digest: Digest,
    now_ms: u64,
) -> Result<Lookup, EngineError> {
    let l = meta
        .send(LookupBlob {
            upstream: upstream_name.clone(),
            digest: digest.clone(),
        })
        .await??;
    if l.record.is_none() {
        return Ok(Lookup::Missing);
    }
    let d = digest.clone();
    let store_for_removal = store.clone();
    let opened = tokio::task::spawn_blocking(move || store.open_blob(&d))
        .await
        .map_err(|e| EngineError::Storage(e.to_string()))?
        .map_err(|e| EngineError::Storage(format!("opening blob {digest}: {e}")))?;
    let recorded = l.record.as_ref().map(|r| r.size);
    let (file, size) = match opened {
        Some((f, size)) if Some(size) == recorded => (f, size),
        other => {
            // Missing, or its length disagrees with the record (damaged): never serve it.
            tracing::warn!(digest = %digest, on_disk = ?other.as_ref().map(|o| o.1), recorded = ?recorded, "stored blob missing or damaged; fetching again");
            if other.is_some() {
                let (s, d) = (store_for_removal, digest.clone());
                let _ = tokio::task::spawn_blocking(move || s.remove_blob(&d)).await;
            }
            meta.send(ForgetBlob { digest }).await??;
            return Ok(Lookup::Missing);
        }
    };
    if !l.linked {
        confirm_and_link(&meta, &upstreams, upstream_name, upstream, &repo, &digest).await?;
    }
    meta.do_send(TouchBlob { digest, now_ms });
    Ok(Lookup::Cached(Arc::new(file), size))
}

impl Handler<StatBlob> for BlobFetcher {
    type Result = ResponseFuture<Result<u64, EngineError>>;

    fn handle(&mut self, m: StatBlob, _: &mut Self::Context) -> Self::Result {
        let key = (m.upstream, m.digest.clone());
        if let Some(f) = self.inflight.get(&key) {
            if let FillState::Streaming { total: Some(t), .. }
            | FillState::Verified { size: t, .. } = &*f.state.borrow()
            {
                let t = *t;
                return Box::pin(async move { Ok(t) });
            }
        }
        let down = self.d.health.is_down(m.upstream);
        let meta = self.d.meta.clone();
        let upstreams = self.d.upstreams.clone();
        let name = self.d.names[m.upstream].clone();
        Box::pin(async move {
            let l = meta
                .send(LookupBlob {
                    upstream: name.clone(),
                    digest: m.digest.clone(),
                })
                .await??;
            match l.record {
                Some(rec) if l.linked => Ok(rec.size),
                Some(rec) => {
                    confirm_and_link(&meta, &upstreams, name, m.upstream, &m.repo, &m.digest)
                        .await?;
                    Ok(rec.size)
                }
                None if down => Err(EngineError::UpstreamDown(name)),
                None => upstreams
                    .head_blob(m.upstream, &m.repo, &m.digest)
                    .await
                    .map_err(|e| EngineError::from_upstream(e, &format!("blob {}", m.digest))),
            }
        })
    }
}

impl Handler<FillFinished> for BlobFetcher {
    type Result = ();
    fn handle(&mut self, m: FillFinished, _: &mut Self::Context) {
        if self.inflight.get(&m.key).is_some_and(|f| f.id == m.id) {
            self.inflight.remove(&m.key);
        }
        let name = match m.outcome {
            FillOutcome::Done => "done",
            FillOutcome::Failed => "failed",
            FillOutcome::TimedOut => "timed_out",
            FillOutcome::Abandoned => "abandoned",
        };
        *self.outcomes.entry(name).or_default() += 1;
    }
}

impl Handler<FillStats> for BlobFetcher {
    type Result = MessageResult<FillStats>;
    fn handle(&mut self, _: FillStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.outcomes.clone())
    }
}

// ---------------------------------------------------------------------------------------
// The fill writer (runs on its own thread: file writes, hashing and fsync block).

struct FillWriter {
    key: FillKey,
    id: u64,
    upstream_name: String,
    store: BlobStore,
    meta: MetadataStore,
    clock: Clock,
    fetcher: Addr<BlobFetcher>,
    disk: Arc<DiskState>,
    eviction: EvictionHandle,
}

/// Bytes kept free beyond a download's size before it is written to disk.
const FREE_SPACE_MARGIN: u64 = 64 * 1024 * 1024;

/// Publishes `Abandoned`, removes the temporary file and tells the fetcher, unless the
/// writer finished normally. Runs on every exit path, panics included.
struct FillGuard {
    state: watch::Sender<FillState>,
    tmp: Option<std::path::PathBuf>,
    outcome: FillOutcome,
    finished: bool,
    key: FillKey,
    id: u64,
    fetcher: Addr<BlobFetcher>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.send_replace(FillState::Abandoned);
            self.outcome = FillOutcome::Abandoned;
            tracing::warn!(digest = %self.key.1, "blob fill abandoned");
        }
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
        self.fetcher.do_send(FillFinished {
            key: self.key.clone(),
            id: self.id,
            outcome: self.outcome,
        });
    }
}

impl FillGuard {
    fn fail(&mut self, e: EngineError) {
        let outcome = match &e {
            EngineError::Upstream(UpstreamError::Timeout { .. }) => FillOutcome::TimedOut,
            _ => FillOutcome::Failed,
        };
        self.state.send_replace(FillState::Failed(e));
        self.outcome = outcome;
        self.finished = true;
    }
}

/// The digest of a fill, computed on a thread of its own from the batches the writer has
/// written (shared `Bytes`, not copies). Bounded: a slow hasher slows the writer down.
struct HashThread {
    tx: Option<std::sync::mpsc::SyncSender<Vec<Bytes>>>,
    thread: Option<std::thread::JoinHandle<Digest>>,
}

impl HashThread {
    fn start(digest: &Digest) -> HashThread {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(FILL_CHANNEL);
        let mut h = Hasher::new(digest.algorithm());
        let thread = std::thread::Builder::new()
            .name(format!("hash-{}", &digest.hex()[..10]))
            .spawn(move || {
                for batch in rx {
                    for b in &batch {
                        h.update(b);
                    }
                }
                h.finish()
            })
            .ok();
        HashThread {
            tx: Some(tx),
            thread,
        }
    }

    /// `false` if the thread is gone.
    fn feed(&self, batch: Vec<Bytes>) -> bool {
        self.thread.is_some() && self.tx.as_ref().is_some_and(|tx| tx.send(batch).is_ok())
    }

    /// The digest of everything fed; `None` if the thread died.
    fn finish(mut self) -> Option<Digest> {
        self.tx.take();
        self.thread.take()?.join().ok()
    }
}

impl Drop for HashThread {
    fn drop(&mut self) {
        // A failed fill: close the channel so the thread ends (it is not waited for).
        self.tx.take();
    }
}

impl FillWriter {
    fn run(self, mut events: mpsc::Receiver<FillEvent>, state: watch::Sender<FillState>) {
        let digest = self.key.1.clone();
        let mut g = FillGuard {
            state,
            tmp: None,
            outcome: FillOutcome::Done,
            finished: false,
            key: self.key.clone(),
            id: self.id,
            fetcher: self.fetcher.clone(),
        };
        let what = format!("blob {digest}");
        let total = match events.blocking_recv() {
            Some(FillEvent::Headers { total }) => total,
            Some(FillEvent::Failed(e)) => return g.fail(EngineError::from_upstream(e, &what)),
            Some(_) => return g.fail(EngineError::Storage("fill protocol error".into())),
            None => return, // abandoned (guard)
        };
        // Free-space check before writing anything: a download that cannot fit is not
        // started on disk (the clients are served without storing instead).
        if let Some(t) = total {
            if let Ok(free) = self.store.free_space() {
                if free < t.saturating_add(FREE_SPACE_MARGIN) {
                    return self.disk_full(&mut g, &format!("{free} bytes free, blob is {t}"));
                }
            }
        }
        let (tmp, file) = match self.store.create_temp() {
            Ok(x) => x,
            Err(e) if store::is_disk_full(&e) => return self.disk_full(&mut g, &e.to_string()),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a temporary file for a download");
                return g.fail(EngineError::Storage(format!(
                    "cannot create a temporary file: {e}"
                )));
            }
        };
        g.tmp = Some(tmp.clone());
        let file = Arc::new(file);
        g.state.send_replace(FillState::Streaming {
            file: file.clone(),
            total,
            written: 0,
        });
        // Hashing runs on its own thread, beside the disk writes: the fill keeps pace with
        // whichever of the two is slower instead of their sum.
        let hasher = HashThread::start(&digest);
        let mut written: u64 = 0;
        let mut published: u64 = 0;
        let publish = |g: &FillGuard, written: u64| {
            g.state.send_modify(|s| {
                if let FillState::Streaming { written: w, .. } = s {
                    *w = written;
                }
            })
        };
        'fill: loop {
            let mut event = events.blocking_recv();
            // Handle this event and whatever else is already queued, then publish once:
            // readers wake per batch, not per chunk.
            loop {
                match event {
                    Some(FillEvent::Chunk(pieces)) => {
                        // Written and published, then handed to the hasher: readers stream
                        // this batch while it is hashed (the last byte waits for the digest).
                        let len: u64 = pieces.iter().map(|b| b.len() as u64).sum();
                        if total.is_some_and(|t| written + len > t) {
                            let e = UpstreamError::Protocol {
                                upstream: self.upstream_name.clone(),
                                detail: "more bytes than Content-Length".into(),
                            };
                            return g.fail(EngineError::Upstream(e));
                        }
                        let res = if self.disk.injected() {
                            Err(io::Error::from(io::ErrorKind::StorageFull))
                        } else {
                            store::write_all_vectored(&file, &pieces)
                        };
                        if let Err(e) = res {
                            if store::is_disk_full(&e) {
                                return self.disk_full(&mut g, &e.to_string());
                            }
                            tracing::error!(error = %e, digest = %digest, "writing a download to disk failed");
                            return g.fail(EngineError::Storage(format!("writing to disk: {e}")));
                        }
                        written += len;
                        if written - published >= PUBLISH_EVERY {
                            publish(&g, written);
                            published = written;
                        }
                        if !hasher.feed(pieces) {
                            return g.fail(EngineError::Storage("the hashing thread died".into()));
                        }
                    }
                    Some(FillEvent::End) => break 'fill,
                    Some(FillEvent::Failed(e)) => {
                        tracing::warn!(error = %e, digest = %digest, written, "upstream failed mid-blob");
                        return g.fail(EngineError::Upstream(e));
                    }
                    Some(FillEvent::Headers { .. }) => {
                        return g.fail(EngineError::Storage("fill protocol error".into()))
                    }
                    None => return,
                }
                match events.try_recv() {
                    Ok(e) => event = Some(e),
                    Err(_) => break,
                }
            }
            if written > published {
                publish(&g, written);
                published = written;
            }
        }
        if let Some(t) = total.filter(|t| *t != written) {
            let e = UpstreamError::Protocol {
                upstream: self.upstream_name.clone(),
                detail: format!("body ended after {written} of {t} bytes"),
            };
            return g.fail(EngineError::Upstream(e));
        }
        let Some(actual) = hasher.finish() else {
            return g.fail(EngineError::Storage("the hashing thread died".into()));
        };
        if actual != digest {
            tracing::error!(expected = %digest, actual = %actual, upstream = %self.upstream_name, "upstream blob does not match its digest; discarded");
            return g.fail(EngineError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        // Verified: release the last byte to readers, then make it durable.
        g.state.send_replace(FillState::Verified {
            file: file.clone(),
            size: written,
        });
        g.finished = true;
        match self.store.commit(&tmp, &file, &digest) {
            Ok(_) => {
                g.tmp = None;
                // Durable at once (this thread may block): a crash now loses no record, so
                // the blob needs no re-hash at the next start.
                let rec = self
                    .meta
                    .record_blob(&digest, written, self.clock.now_ms())
                    .and_then(|_| self.meta.link(&self.upstream_name, &digest))
                    .and_then(|_| self.meta.flush().map(|_| ()));
                if let Err(e) = rec {
                    tracing::error!(error = %e, digest = %digest, "could not record a stored blob");
                }
                tracing::info!(digest = %digest, size = written, "blob stored");
                self.eviction.nudge(false);
            }
            Err(e) if store::is_disk_full(&e) => {
                self.disk.mark_full(self.clock.now_ms(), &e.to_string());
                self.eviction.nudge(true);
            }
            Err(e) => {
                tracing::error!(error = %e, digest = %digest, "could not store a verified blob; served without caching")
            }
        }
    }

    /// The disk is full: nothing is kept; clients that have not received bytes yet are
    /// served straight from the upstream, the sweeper is asked to make room.
    fn disk_full(&self, g: &mut FillGuard, detail: &str) {
        self.disk.mark_full(self.clock.now_ms(), detail);
        self.eviction.nudge(true);
        g.fail(EngineError::DiskFull(detail.to_string()));
    }
}

// ---------------------------------------------------------------------------------------

/// What the HTTP layer holds to read blobs.
#[derive(Clone)]
pub struct BlobsHandle {
    addr: Addr<BlobFetcher>,
    disk: Arc<DiskState>,
}

impl BlobsHandle {
    /// Opens a blob for GET. For a fill, waits until the upstream's headers arrived (so a
    /// missing blob is a clean 404, not a broken 200) and retries once if it was abandoned.
    pub async fn open(
        &self,
        upstream: usize,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobSource, EngineError> {
        for attempt in 0..2 {
            let src = self
                .addr
                .send(OpenBlob {
                    upstream,
                    repo: repo.into(),
                    digest: digest.clone(),
                })
                .await??;
            let src = match src {
                BlobSource::Direct {
                    mut events,
                    digest,
                    wait,
                    ..
                } => {
                    // Wait for the upstream's answer before the client's headers go out.
                    return match tokio::time::timeout(wait, events.recv()).await {
                        Ok(Some(FillEvent::Headers { total })) => Ok(BlobSource::Direct {
                            events,
                            total,
                            digest,
                            wait,
                        }),
                        Ok(Some(FillEvent::Failed(e))) => {
                            Err(EngineError::from_upstream(e, &format!("blob {digest}")))
                        }
                        Ok(_) => Err(EngineError::Abandoned),
                        Err(_) => Err(EngineError::Upstream(UpstreamError::Timeout {
                            upstream: "-".into(),
                            stage: "waiting for a blob download to start",
                        })),
                    };
                }
                other => other,
            };
            let BlobSource::Filling {
                mut state,
                wait,
                started_for,
                ..
            } = src
            else {
                return Ok(src);
            };
            let ready = loop {
                let r = match &*state.borrow_and_update() {
                    FillState::Connecting => None,
                    // Headers go out with the first bytes on disk: a download that fails
                    // before (a full disk at the first write) is retried cleanly.
                    FillState::Streaming { written: 0, .. } => None,
                    FillState::Streaming { total, .. } => Some(Ok(*total)),
                    FillState::Verified { size, .. } => Some(Ok(Some(*size))),
                    FillState::Failed(e) => Some(Err(e.clone())),
                    FillState::Abandoned => Some(Err(EngineError::Abandoned)),
                };
                if let Some(r) = r {
                    break r;
                }
                match tokio::time::timeout(wait, state.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        if matches!(&*state.borrow(), FillState::Connecting) {
                            break Err(EngineError::Abandoned);
                        }
                    }
                    Err(_) => {
                        break Err(EngineError::Upstream(UpstreamError::Timeout {
                            upstream: "-".into(),
                            stage: "waiting for a blob download to start",
                        }))
                    }
                }
            };
            match ready {
                Ok(total) => {
                    return Ok(BlobSource::Filling {
                        state,
                        total,
                        wait,
                        started_for,
                    })
                }
                // Abandoned, or the disk filled up before any byte reached us: once more
                // (a full disk now streams without storing).
                Err(EngineError::Abandoned | EngineError::DiskFull(_)) if attempt == 0 => continue,
                // We joined a download started for another repository, and the upstream
                // refused it there: ask again for ours.
                Err(
                    EngineError::BlobUnknown(_)
                    | EngineError::NameUnknown(_)
                    | EngineError::Denied(_),
                ) if attempt == 0 && started_for != repo => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Abandoned)
    }

    /// The size of a blob (HEAD): never starts a download.
    pub async fn stat(
        &self,
        upstream: usize,
        repo: &str,
        digest: &Digest,
    ) -> Result<u64, EngineError> {
        self.addr
            .send(StatBlob {
                upstream,
                repo: repo.into(),
                digest: digest.clone(),
            })
            .await?
    }

    /// Test hook: make every disk write fail as if the disk were full (or stop doing so).
    #[doc(hidden)]
    pub fn inject_disk_full(&self, on: bool) {
        self.disk.inject_full(on);
    }

    pub fn disk_full(&self, now_ms: u64) -> bool {
        self.disk.is_full(now_ms)
    }

    pub async fn fill_stats(&self) -> Result<HashMap<&'static str, u64>, EngineError> {
        Ok(self.addr.send(FillStats).await?)
    }
}
