//! Blobs: per-digest downloads with request coalescing and digest verification, and
//! reading blob bytes for clients. Four parts, none of which imports another in a circle:
//!
//! - [`fill`]: one download to disk, on a writer thread with a hash thread beside it; its
//!   [`fill::FillState`], the drop guard that makes every fill end in an explicit
//!   [`fill::FillOutcome`], the full-disk state, and [`fill::wait_fill`], the one way to
//!   wait for a fill. It reports to a `Recipient<FillFinished>` and names nothing else here.
//! - [`reader`]: what runs on the HTTP workers: the opaque [`BlobBody`], its byte stream
//!   (copying path) and its file regions (`sendfile` path). Uses `fill`.
//! - [`fetcher`]: the actor that owns the table of fills in flight, opens stored blobs,
//!   starts or joins fills, and records stored blobs. Uses `fill` and `reader`.
//! - [`handle`]: [`BlobsHandle`], what the HTTP layer holds. Uses the three others.

pub mod fetcher;
pub mod fill;
pub mod handle;
pub mod reader;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use fill::DiskState;
pub use handle::BlobsHandle;
pub use reader::{BlobBody, BlobRegions, ByteStream, Region};

/// Starts the blob fetcher; `deps` says what it works with.
pub fn start(deps: fetcher::FetcherDeps) -> BlobsHandle {
    let (disk, read_in): (Arc<DiskState>, Arc<AtomicU64>) =
        (deps.disk.clone(), deps.read_in.clone());
    let mailbox = deps.metrics.mailbox(crate::metrics::ActorName::Fetcher);
    BlobsHandle {
        addr: fetcher::BlobFetcher::start(deps),
        disk,
        read_in,
        mailbox,
    }
}
