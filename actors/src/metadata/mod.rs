//! The metadata actor owns the sled database ([`db::Db`]): which blobs are stored (size,
//! times, the LRU index), which upstream each blob is known to belong to, cached
//! manifests, tag -> digest entries and the repositories seen per upstream.
//!
//! One owner: the engine opens the database and, before serving, reconciles it with the
//! store on the starting thread ([`crate::recovery`]); then [`Metadata::start`] takes it
//! by value, and from then on every read and write is a message to this actor, sent
//! through [`MetaHandle`] by the blob fetcher, the manifest resolver, the eviction
//! sweeper and orphan recovery alike. The actor is a `SyncArbiter` of
//! [`THREADS`] threads, so sled's blocking calls never run on an async thread. The one
//! thing read without a message is the usage counter ([`MetaHandle::usage`], an atomic).
//!
//! Durability: sled writes reach the disk at a flush. Writes a client is about to rely on
//! (a manifest and its tag before the manifest is served, a blob's record) answer with a
//! [`Durable`] future, awaited before going on; the fsync runs on sled's own threads, not
//! on this actor's. See "Crash safety" in the README for what a crash may lose.

mod db;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use crate::digest::Digest;
use crate::error::MetaError;
use crate::metrics::Mailbox;
use crate::settings::PinPattern;

pub use db::{BlobRecord, Db, Durable, Evicted, ManifestRecord, Pinned, Reconciled, TagRecord};

/// Threads of the metadata actor: one can wait on the disk while the other answers.
pub const THREADS: usize = 2;

/// Runs the database's calls on a sync arbiter's threads.
pub struct Metadata {
    db: Db,
}

impl Actor for Metadata {
    type Context = SyncContext<Self>;
}

impl Metadata {
    /// Hands the database to the actor: from now on it is reached only by messages.
    /// `mailbox` counts the requests waiting for an answer.
    pub fn start(db: Db, mailbox: Mailbox) -> MetaHandle {
        let usage = db.usage_counter();
        let addr = SyncArbiter::start(THREADS, move || Metadata { db: db.share() });
        MetaHandle {
            addr,
            usage,
            mailbox,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Messages, one per operation, each with its typed result.

/// Is the blob stored, and does `upstream` serve it?
#[derive(Message)]
#[rtype(result = "Result<BlobLookup, MetaError>")]
pub struct LookupBlob {
    pub upstream: Option<String>,
    pub digest: Digest,
}

#[derive(Debug, Clone)]
pub struct BlobLookup {
    pub record: Option<BlobRecord>,
    pub linked: bool,
}

/// A verified blob is in the store: record it, served by `upstream`.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct RecordBlob {
    pub upstream: String,
    pub digest: Digest,
    pub size: u64,
    pub now_ms: u64,
}

/// Files found without a record and verified (start-up recovery).
#[derive(Message)]
#[rtype(result = "Result<(usize, u64), MetaError>")]
pub struct RecordRecovered {
    pub blobs: Vec<(Digest, u64)>,
    pub now_ms: u64,
}

/// Of these blob files, the ones without a record.
#[derive(Message)]
#[rtype(result = "Result<Vec<(Digest, u64)>, MetaError>")]
pub struct Unrecorded(pub Vec<(Digest, u64)>);

/// Mark blobs as served by `upstream` (a blob the upstream confirmed).
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct LinkBlobs {
    pub upstream: String,
    pub digests: Vec<Digest>,
}

/// A client was served this blob (feeds LRU eviction).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TouchBlob {
    pub digest: Digest,
    pub now_ms: u64,
}

/// The blob's file is gone or unreadable: forget it.
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct ForgetBlob {
    pub digest: Digest,
}

/// One step of an eviction sweep ([`Db::evict_lru`]).
#[derive(Message)]
#[rtype(result = "Result<Evicted, MetaError>")]
pub struct EvictLru {
    pub target: u64,
    pub pinned: Arc<HashSet<Digest>>,
    pub after: Option<Vec<u8>>,
    pub max: usize,
}

/// What the pinned tags keep ([`Db::pinned`]).
#[derive(Message)]
#[rtype(result = "Result<Pinned, MetaError>")]
pub struct PinnedContent {
    pub pins: Arc<[PinPattern]>,
}

/// Drop manifests and tags of repositories unused since `before_ms`, except `keep`.
#[derive(Message)]
#[rtype(result = "Result<usize, MetaError>")]
pub struct DropIdleRepositories {
    pub before_ms: u64,
    pub keep: HashSet<(String, String)>,
}

#[derive(Message)]
#[rtype(result = "Result<Option<ManifestRecord>, MetaError>")]
pub struct GetManifest {
    pub upstream: String,
    pub repo: String,
    pub digest: Digest,
}

/// Stores a manifest (and its tag, and links the blobs it references to the upstream);
/// the answer is a [`Durable`] to await before the manifest is served.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct PutManifest {
    pub upstream: String,
    pub repo: String,
    pub digest: Digest,
    pub record: ManifestRecord,
    pub tag: Option<(String, TagRecord)>,
    pub links: Vec<Digest>,
}

#[derive(Message)]
#[rtype(result = "Result<Option<TagRecord>, MetaError>")]
pub struct GetTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
}

/// Points a tag at a digest, or refreshes when it was checked; the [`Durable`] is worth
/// awaiting when the digest changed.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct PutTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub record: TagRecord,
}

#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct DeleteTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
}

/// The cached tags of a repository; `None` if the repository is not cached.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<String>>, MetaError>")]
pub struct ListTags {
    pub upstream: String,
    pub repo: String,
}

/// A repository was used (feeds `manifest_max_idle`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TouchRepo {
    pub upstream: String,
    pub repo: String,
    pub now_ms: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<(String, String)>, MetaError>")]
pub struct ListRepositories;

/// Everything written so far, on disk.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct Flush;

/// Is the database answering?
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct Ping;

// ---------------------------------------------------------------------------------------
// Handlers: each is a call or two on the database, answering with the message's own result
// type (`Message::Result`).

macro_rules! handlers {
    ($($msg:ty => |$db:ident, $m:ident| $body:expr;)*) => {$(
        impl Handler<$msg> for Metadata {
            type Result = <$msg as Message>::Result;
            fn handle(&mut self, $m: $msg, _: &mut Self::Context) -> Self::Result {
                let $db = &self.db;
                $body
            }
        }
    )*};
}

handlers! {
    LookupBlob => |db, m| {
        let record = db.blob(&m.digest)?;
        let linked = match (&record, &m.upstream) {
            (Some(_), Some(u)) => db.is_linked(u, &m.digest)?,
            _ => false,
        };
        Ok(BlobLookup { record, linked })
    };
    RecordBlob => |db, m| {
        db.record_blob(&m.digest, m.size, m.now_ms)?;
        db.link(&m.upstream, &m.digest)?;
        Ok(db.durable())
    };
    RecordRecovered => |db, m| db.record_new_blobs(&m.blobs, m.now_ms);
    Unrecorded => |db, m| {
        let mut out = Vec::with_capacity(m.0.len());
        for (d, size) in m.0 {
            if db.blob(&d)?.is_none() {
                out.push((d, size));
            }
        }
        Ok(out)
    };
    LinkBlobs => |db, m| m.digests.iter().try_for_each(|d| db.link(&m.upstream, d));
    TouchBlob => |db, m| {
        if let Err(e) = db.touch_blob(&m.digest, m.now_ms) {
            tracing::warn!(digest = %m.digest, error = %e, "could not record blob access");
        }
    };
    ForgetBlob => |db, m| db.remove_blob(&m.digest).map(|_| ());
    EvictLru => |db, m| db.evict_lru(m.target, &m.pinned, m.after.as_deref(), m.max);
    PinnedContent => |db, m| db.pinned(&m.pins);
    DropIdleRepositories => |db, m| db.drop_idle_repositories(m.before_ms, &m.keep);
    GetManifest => |db, m| db.manifest(&m.upstream, &m.repo, &m.digest);
    PutManifest => |db, m| {
        for d in &m.links {
            db.link(&m.upstream, d)?;
        }
        let tag = m.tag.as_ref().map(|(t, r)| (t.as_str(), r));
        db.put_manifest(&m.upstream, &m.repo, &m.digest, &m.record, tag)?;
        Ok(db.durable())
    };
    GetTag => |db, m| db.tag(&m.upstream, &m.repo, &m.tag);
    PutTag => |db, m| {
        db.put_tag(&m.upstream, &m.repo, &m.tag, &m.record)?;
        Ok(db.durable())
    };
    DeleteTag => |db, m| {
        db.delete_tag(&m.upstream, &m.repo, &m.tag)?;
        Ok(db.durable())
    };
    ListTags => |db, m| {
        if !db.has_repository(&m.upstream, &m.repo)? {
            return Ok(None);
        }
        Ok(Some(db.tags_of(&m.upstream, &m.repo)?))
    };
    TouchRepo => |db, m| {
        if let Err(e) = db.touch_repo(&m.upstream, &m.repo, m.now_ms) {
            tracing::warn!(error = %e, "could not record repository access");
        }
    };
    ListRepositories => |db, _m| db.repositories();
    Flush => |db, _m| Ok(db.durable());
    Ping => |db, _m| db.setting("ping").map(|_| ());
}

// ---------------------------------------------------------------------------------------

/// What the other components hold: the way to the database. Cheap to clone, `Send`.
#[derive(Clone)]
pub struct MetaHandle {
    addr: Addr<Metadata>,
    /// The database's usage counter (see [`MetaHandle::usage`]).
    usage: Arc<AtomicU64>,
    mailbox: Mailbox,
}

impl MetaHandle {
    /// Sends `m` and waits for the answer; a stopped actor is [`MetaError::Gone`].
    pub async fn ask<M>(&self, m: M) -> Result<M::Result, MetaError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Metadata: Handler<M>,
    {
        let _queued = self.mailbox.sent();
        self.addr.send(m).await.map_err(MetaError::Gone)
    }

    /// Sends `m` without waiting (touches: losing one costs nothing).
    pub fn tell<M>(&self, m: M)
    where
        M: Message<Result = ()> + Send + 'static,
        Metadata: Handler<M>,
    {
        self.addr.do_send(m);
    }

    /// Bytes of blobs stored, exactly (no message: an atomic the database keeps).
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::SeqCst)
    }

    /// Everything written so far, on disk.
    pub async fn flush(&self) -> Result<(), MetaError> {
        self.ask(Flush).await??.await
    }
}
