//! A fill: one blob downloaded to disk, verified, and moved into the store.
//!
//! The writer runs on a thread of its own (file writes and fsync block). It receives the
//! upstream's response as [`DownloadEvent`]s through a bounded channel, appends each batch
//! to a temporary file with one `writev`, and publishes progress as a [`FillState`] on a
//! `watch` channel that readers follow. Hashing runs on a second thread ([`HashThread`]),
//! beside the writes, fed the same batches (shared `Bytes`, not copies), so the fill keeps
//! pace with the slower of the two instead of their sum.
//!
//! Readers may take the published length minus one byte: the last byte is released only
//! when the digest has been verified ([`FillState::Verified`]), so no client ever receives
//! a complete wrong blob. A verified file is renamed into the store just before that last
//! byte goes out, then fsynced with its directory, and the fill reports [`FillFinished`]
//! to whoever started it,
//! through a `Recipient`: this module never names the fetcher, and knows nothing of the
//! metadata (recording the blob is the fetcher's job).
//!
//! Every fill ends in an explicit [`FillOutcome`]. [`FillGuard`] publishes `Abandoned`,
//! removes the temporary file and reports, on every exit path, panics included, so waiters
//! never hang; and waiters have a timeout of their own ([`wait_fill`]).

use std::fs::File;
use std::io;
use std::path::PathBuf;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::digest::{Digest, Hasher};
use crate::error::{EngineError, Object, UpstreamError};
use crate::settings::UpstreamId;
use crate::store::{self, BlobStore};
use crate::trace::{kv, Step};
use crate::upstream::DownloadEvent;

/// Batches buffered between the upstream reader and the fill writer (and between the
/// writer and its hash thread): a slow disk slows the upstream read instead of filling
/// memory. 8, not 64: at ~1 MiB per batch, 64 took RSS from 35 to 91 MiB under load.
pub const FILL_CHANNEL: usize = 8;
/// A fill publishes its progress at least this often while batches are queued.
const PUBLISH_EVERY: u64 = 1024 * 1024;
/// Bytes kept free beyond a download's size before it is written to disk.
const FREE_SPACE_MARGIN: u64 = 64 * 1024 * 1024;

/// Which fill: one per (upstream, digest) at a time.
pub type FillKey = (UpstreamId, Digest);

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
    pub fn readable(&self) -> (u64, bool) {
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

/// Waits until `ready` says what it was waiting for, the fill fails, or it shows no
/// progress for `wait` ([`EngineError::WaitTimedOut`], naming `stage`). `ready` sees every
/// state but `Failed` and `Abandoned`, which end the wait with their error. When the writer
/// is gone, its last state is final: `ready` gets one more look at it.
///
/// The one wait loop of the blob module: readers, `open` and `complete_size` all use it.
pub async fn wait_fill<T>(
    state: &mut watch::Receiver<FillState>,
    wait: Duration,
    stage: &'static str,
    mut ready: impl FnMut(&FillState) -> Option<T>,
) -> Result<T, EngineError> {
    let mut check = |s: &FillState| match s {
        FillState::Failed(e) => Some(Err(e.clone())),
        FillState::Abandoned => Some(Err(EngineError::Abandoned)),
        s => ready(s).map(Ok),
    };
    loop {
        if let Some(r) = check(&state.borrow_and_update()) {
            return r;
        }
        match tokio::time::timeout(wait, state.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return check(&state.borrow()).unwrap_or(Err(EngineError::Abandoned)),
            Err(_) => return Err(EngineError::WaitTimedOut { stage, after: wait }),
        }
    }
}

/// How a fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// Verified and moved into the store: `size` bytes, to be recorded.
    Stored {
        size: u64,
    },
    /// Verified and served, but it could not be stored (logged); `disk_full`: because the
    /// disk was full (the sweeper should make room now).
    NotStored {
        disk_full: bool,
    },
    /// The disk was full before the blob was written: clients are served without storing;
    /// the sweeper should make room now.
    DiskFull,
    Failed,
    TimedOut,
    Abandoned,
}

impl FillOutcome {
    /// The name it is counted under.
    pub fn name(self) -> &'static str {
        match self {
            FillOutcome::Stored { .. } | FillOutcome::NotStored { .. } => "done",
            FillOutcome::DiskFull | FillOutcome::Failed => "failed",
            FillOutcome::TimedOut => "timed_out",
            FillOutcome::Abandoned => "abandoned",
        }
    }
}

/// Sent by a fill when it is done, whatever the outcome, to the `Recipient` it was
/// started with.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FillFinished {
    pub key: FillKey,
    pub id: u64,
    pub outcome: FillOutcome,
}

/// Whether the disk recently refused a write. While it is full, misses are streamed from
/// the upstream to the client without storing; caching is tried again after
/// [`DiskState::RETRY_MS`].
#[derive(Debug, Default)]
pub struct DiskState {
    full_since_ms: AtomicU64,
    last_logged_ms: AtomicU64,
    /// Test hook: every write fails as if the disk were full.
    #[cfg(feature = "test-hooks")]
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

    /// Test hook: make every disk write fail as if the disk were full (or stop doing so).
    #[cfg(feature = "test-hooks")]
    pub fn inject_full(&self, on: bool) {
        self.inject_full.store(on, Ordering::SeqCst);
        if !on {
            self.full_since_ms.store(0, Ordering::SeqCst);
        }
    }

    /// Appends `pieces` to `file` (or fails as a full disk would, under the test hook).
    fn write(&self, file: &File, pieces: &[Bytes]) -> io::Result<()> {
        #[cfg(feature = "test-hooks")]
        if self.inject_full.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        store::write_all_vectored(file, pieces)
    }
}

/// Everything a fill needs; [`FillWriter::spawn`] starts it.
pub struct FillWriter {
    pub key: FillKey,
    pub id: u64,
    /// For messages: the upstream's name.
    pub upstream_name: String,
    pub store: BlobStore,
    pub clock: Clock,
    pub disk: Arc<DiskState>,
    pub report: Recipient<FillFinished>,
    /// `pullcache_digest_mismatch_total` of the upstream.
    pub mismatches: prometheus::IntCounter,
    /// The fill's span: verification and the commit are its children.
    pub trace: crate::trace::Context,
}

/// What a fill has on disk so far.
struct Temp {
    path: PathBuf,
    file: Arc<File>,
    total: Option<u64>,
}

impl FillWriter {
    /// Starts the writer thread; it reads `events` and publishes on `state`.
    pub fn spawn(
        self,
        events: mpsc::Receiver<DownloadEvent>,
        state: watch::Sender<FillState>,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name(format!("fill-{}", &self.key.1.hex()[..12]))
            .spawn(move || self.run(events, state))
            .map(|_| ())
    }

    fn run(self, mut events: mpsc::Receiver<DownloadEvent>, state: watch::Sender<FillState>) {
        let mut g = FillGuard {
            state,
            tmp: None,
            outcome: FillOutcome::Abandoned,
            finished: false,
            key: self.key.clone(),
            id: self.id,
            report: self.report.clone(),
        };
        let Some(temp) = self.begin(&mut events, &mut g) else {
            return;
        };
        // Hashing runs on its own thread, beside the disk writes.
        let hasher = HashThread::start(&self.key.1);
        let Some(written) = self.copy(&mut events, &mut g, &temp, &hasher) else {
            return;
        };
        self.verify_and_commit(&mut g, temp, written, hasher);
    }

    /// The upstream's headers, a free-space check, and the temporary file. `None` when the
    /// fill has ended (the guard holds the outcome).
    fn begin(&self, events: &mut mpsc::Receiver<DownloadEvent>, g: &mut FillGuard) -> Option<Temp> {
        let total = match events.blocking_recv() {
            Some(DownloadEvent::Headers { total }) => total,
            Some(DownloadEvent::Failed(e)) => {
                g.fail(EngineError::from_upstream(
                    e,
                    Object::Blob(self.key.1.clone()),
                ));
                return None;
            }
            Some(_) => {
                g.fail(self.protocol("the download sent bytes before its headers".into()));
                return None;
            }
            None => return None, // abandoned (guard)
        };
        // Free-space check before writing anything: a download that cannot fit is not
        // started on disk (the clients are served without storing instead).
        if let Some(t) = total {
            if let Ok(free) = self.store.free_space() {
                if free < t.saturating_add(FREE_SPACE_MARGIN) {
                    self.disk_full(g, &format!("{free} bytes free, blob is {t}"));
                    return None;
                }
            }
        }
        let (path, file) = match self.store.create_temp() {
            Ok(x) => x,
            Err(e) if store::is_disk_full(&e) => {
                self.disk_full(g, &e.to_string());
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create a temporary file for a download");
                g.fail(EngineError::storage("creating a temporary file", e));
                return None;
            }
        };
        g.tmp = Some(path.clone());
        let file = Arc::new(file);
        g.state.send_replace(FillState::Streaming {
            file: file.clone(),
            total,
            written: 0,
        });
        Some(Temp { path, file, total })
    }

    /// Writes the body's batches, publishing progress, until the upstream says the body
    /// ended. Returns the bytes written; `None` when the fill has ended.
    fn copy(
        &self,
        events: &mut mpsc::Receiver<DownloadEvent>,
        g: &mut FillGuard,
        temp: &Temp,
        hasher: &HashThread,
    ) -> Option<u64> {
        let digest = &self.key.1;
        let mut written: u64 = 0;
        let mut published: u64 = 0;
        let publish = |g: &FillGuard, written: u64| {
            g.state.send_modify(|s| {
                if let FillState::Streaming { written: w, .. } = s {
                    *w = written;
                }
            })
        };
        loop {
            let mut event = events.blocking_recv();
            // Handle this event and whatever else is already queued, then publish once:
            // readers wake per batch, not per piece.
            loop {
                match event {
                    Some(DownloadEvent::Chunk(pieces)) => {
                        // Written and published, then handed to the hasher: readers stream
                        // this batch while it is hashed (the last byte waits for the digest).
                        let len: u64 = pieces.iter().map(|b| b.len() as u64).sum();
                        if temp.total.is_some_and(|t| written + len > t) {
                            g.fail(self.protocol("more bytes than Content-Length".into()));
                            return None;
                        }
                        if let Err(e) = self.disk.write(&temp.file, &pieces) {
                            if store::is_disk_full(&e) {
                                self.disk_full(g, &e.to_string());
                            } else {
                                tracing::error!(error = %e, digest = %digest, "writing a download to disk failed");
                                g.fail(EngineError::storage("writing a download", e));
                            }
                            return None;
                        }
                        written += len;
                        if written - published >= PUBLISH_EVERY {
                            publish(g, written);
                            published = written;
                        }
                        if !hasher.feed(pieces) {
                            g.fail(EngineError::Internal("the hashing thread died"));
                            return None;
                        }
                    }
                    Some(DownloadEvent::End) => return Some(written),
                    Some(DownloadEvent::Failed(e)) => {
                        tracing::warn!(error = %e, digest = %digest, written, "upstream failed mid-blob");
                        g.fail(EngineError::Upstream(e));
                        return None;
                    }
                    Some(DownloadEvent::Headers { .. }) => {
                        g.fail(self.protocol("the download sent its headers twice".into()));
                        return None;
                    }
                    None => return None, // abandoned (guard)
                }
                match events.try_recv() {
                    Ok(e) => event = Some(e),
                    Err(_) => break,
                }
            }
            if written > published {
                publish(g, written);
                published = written;
            }
        }
    }

    /// Checks length and digest, releases the last byte, then makes the blob durable in
    /// the store.
    fn verify_and_commit(&self, g: &mut FillGuard, temp: Temp, written: u64, hasher: HashThread) {
        let digest = &self.key.1;
        if let Some(t) = temp.total.filter(|t| *t != written) {
            return g.fail(self.protocol(format!("body ended after {written} of {t} bytes")));
        }
        let verify = Step::child(&self.trace, "blob.verify", || {
            vec![
                kv("oci.digest", digest.to_string()),
                kv("pullcache.bytes", written as i64),
            ]
        });
        let Some(actual) = hasher.finish() else {
            return g.fail(EngineError::Internal("the hashing thread died"));
        };
        verify.set(|| vec![kv("pullcache.digest.match", &actual == digest)]);
        if &actual != digest {
            verify.fail(&format!("digest mismatch: the bytes hash to {actual}"));
            self.mismatches.inc();
            tracing::error!(expected = %digest, actual = %actual, upstream = %self.upstream_name, "upstream blob does not match its digest; discarded");
            return g.fail(EngineError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        // Verified. Under its final name before the last byte goes out, so that a client
        // that has the whole blob finds it again after a crash of this process; then the
        // last byte; then the fsyncs (a power loss before them leaves an unrecorded file,
        // which the next start re-hashes).
        verify.end();
        let commit = Step::child(&self.trace, "blob.commit", || {
            vec![kv("oci.digest", digest.to_string())]
        });
        let placed = self.store.place(&temp.path, digest);
        if placed.is_ok() {
            g.tmp = None;
        }
        g.state.send_replace(FillState::Verified {
            file: temp.file.clone(),
            size: written,
        });
        g.finished = true;
        // Not durable: not recorded. The file (verified bytes) stays where it is: another
        // upstream's fill of the same digest may have placed and recorded it meanwhile. If
        // not, the next request downloads it again and the next start re-hashes it.
        let stored = placed.and_then(|dest| self.store.make_durable(&temp.file, &dest));
        g.outcome = match stored {
            Ok(()) => FillOutcome::Stored { size: written },
            Err(e) => {
                let disk_full = store::is_disk_full(&e);
                commit.fail(&e);
                if disk_full {
                    self.disk.mark_full(self.clock.now_ms(), &e.to_string());
                } else {
                    tracing::error!(error = %e, digest = %digest, "could not store a verified blob; served without caching");
                }
                FillOutcome::NotStored { disk_full }
            }
        };
    }

    fn protocol(&self, detail: String) -> EngineError {
        EngineError::Upstream(UpstreamError::Protocol {
            upstream: self.upstream_name.clone(),
            detail,
        })
    }

    /// The disk is full: nothing is kept; clients that have not received bytes yet are
    /// served straight from the upstream, the sweeper is asked to make room.
    fn disk_full(&self, g: &mut FillGuard, detail: &str) {
        self.disk.mark_full(self.clock.now_ms(), detail);
        g.fail(EngineError::DiskFull(detail.to_string()));
        g.outcome = FillOutcome::DiskFull;
    }
}

/// Publishes `Abandoned`, removes the temporary file and reports, unless the writer
/// finished normally. Runs on every exit path, panics included.
struct FillGuard {
    state: watch::Sender<FillState>,
    tmp: Option<PathBuf>,
    outcome: FillOutcome,
    finished: bool,
    key: FillKey,
    id: u64,
    report: Recipient<FillFinished>,
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
        self.report.do_send(FillFinished {
            key: self.key.clone(),
            id: self.id,
            outcome: self.outcome,
        });
    }
}

impl FillGuard {
    fn fail(&mut self, e: EngineError) {
        self.outcome = match &e {
            EngineError::Upstream(UpstreamError::Timeout { .. }) => FillOutcome::TimedOut,
            _ => FillOutcome::Failed,
        };
        self.state.send_replace(FillState::Failed(e));
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

#[cfg(test)]
mod tests;
