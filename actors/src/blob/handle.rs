//! [`BlobsHandle`]: what the HTTP layer holds to read blobs. It asks the fetcher for a
//! body, then waits (on the HTTP worker, without blocking it) until the body can start:
//! a response's headers go out only once the upstream has answered, so a missing blob is
//! a clean 404, never a broken 200.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::fetcher::{BlobFetcher, FillStats, OpenBlob, StatBlob};
use super::fill::{wait_fill, DiskState, FillState};
use super::reader::{BlobBody, Source};
use crate::digest::Digest;
use crate::error::{EngineError, Object};
use crate::metrics::Mailbox;
use crate::settings::UpstreamId;
use crate::trace::Context as TraceCx;
use crate::upstream::DownloadEvent;

#[derive(Clone)]
pub struct BlobsHandle {
    pub(crate) addr: Addr<BlobFetcher>,
    pub(crate) disk: Arc<DiskState>,
    pub(crate) read_in: Arc<AtomicU64>,
    pub(crate) mailbox: Mailbox,
}

impl BlobsHandle {
    /// Opens a blob for GET. For a download, waits until its first bytes are on disk (or
    /// the upstream's answer, when streaming without storing), and asks once more if the
    /// download was abandoned or refused for another repository.
    pub async fn open(
        &self,
        upstream: UpstreamId,
        repo: &str,
        digest: &Digest,
        cx: &TraceCx,
    ) -> Result<BlobBody, EngineError> {
        for attempt in 0..2 {
            let body = {
                let _queued = self.mailbox.sent();
                self.addr
                    .send(OpenBlob {
                        upstream,
                        repo: repo.into(),
                        digest: digest.clone(),
                        cx: cx.clone(),
                    })
                    .await??
            };
            let BlobBody {
                src,
                read_in,
                outcome,
                _waiting,
            } = body;
            let ready = match src {
                Source::Cached { .. } => {
                    return Ok(BlobBody {
                        src,
                        read_in,
                        outcome,
                        _waiting,
                    })
                }
                Source::Direct {
                    mut events,
                    digest,
                    wait,
                    ..
                } => {
                    // The upstream's answer before the client's headers go out.
                    return match tokio::time::timeout(wait, events.recv()).await {
                        Ok(Some(DownloadEvent::Headers { total })) => Ok(BlobBody {
                            src: Source::Direct {
                                events,
                                total,
                                digest,
                                wait,
                            },
                            read_in,
                            outcome,
                            _waiting,
                        }),
                        Ok(Some(DownloadEvent::Failed(e))) => {
                            Err(EngineError::from_upstream(e, Object::Blob(digest)))
                        }
                        Ok(_) => Err(EngineError::Abandoned),
                        Err(_) => Err(EngineError::WaitTimedOut {
                            stage: "waiting for a blob download to start",
                            after: wait,
                        }),
                    };
                }
                Source::Filling {
                    mut state,
                    wait,
                    started_for,
                    ..
                } => {
                    // Headers go out with the first bytes on disk: a download that fails
                    // before (a full disk at the first write) is retried cleanly.
                    let r = wait_fill(
                        &mut state,
                        wait,
                        "waiting for a blob download to start",
                        |s| match s {
                            FillState::Streaming { written: 0, .. } => None,
                            FillState::Streaming { total, .. } => Some(*total),
                            FillState::Verified { size, .. } => Some(Some(*size)),
                            _ => None,
                        },
                    )
                    .await;
                    match r {
                        Ok(total) => {
                            return Ok(BlobBody {
                                src: Source::Filling {
                                    state,
                                    total,
                                    wait,
                                    started_for,
                                },
                                read_in,
                                outcome,
                                _waiting,
                            })
                        }
                        Err(e) => (e, started_for),
                    }
                }
            };
            match ready {
                // Abandoned, or the disk filled up before any byte reached us: once more
                // (a full disk now streams without storing).
                (EngineError::Abandoned | EngineError::DiskFull(_), _) if attempt == 0 => {}
                // We joined a download started for another repository, and the upstream
                // refused it there: ask again for ours.
                (
                    EngineError::BlobUnknown(_)
                    | EngineError::NameUnknown(_)
                    | EngineError::Denied(_),
                    started_for,
                ) if attempt == 0 && started_for != repo => {}
                (e, _) => return Err(e),
            }
        }
        Err(EngineError::Abandoned)
    }

    /// The size of a blob (HEAD): never starts a download.
    pub async fn stat(
        &self,
        upstream: UpstreamId,
        repo: &str,
        digest: &Digest,
        cx: &TraceCx,
    ) -> Result<u64, EngineError> {
        let _queued = self.mailbox.sent();
        self.addr
            .send(StatBlob {
                upstream,
                repo: repo.into(),
                digest: digest.clone(),
                cx: cx.clone(),
            })
            .await?
    }

    /// Whether the disk recently refused a write (misses are then streamed unstored).
    pub fn disk_full(&self, now_ms: u64) -> bool {
        self.disk.is_full(now_ms)
    }

    /// Finished fills by outcome: `done`, `failed`, `timed_out`, `abandoned`.
    pub async fn fill_stats(&self) -> Result<HashMap<&'static str, u64>, EngineError> {
        Ok(self.addr.send(FillStats).await?)
    }

    /// Stored regions that had left the page cache and were read back in before being
    /// sent with `sendfile`.
    pub fn regions_read_in(&self) -> u64 {
        self.read_in.load(Ordering::Relaxed)
    }

    /// Test hook: make every disk write fail as if the disk were full (or stop doing so).
    #[cfg(feature = "test-hooks")]
    pub fn inject_disk_full(&self, on: bool) {
        self.disk.inject_full(on);
    }
}
