//! pullcache's cache engine. Every piece of cache state is owned by an actor:
//!
//! - [`manifest_resolver`]: tag and digest resolution, TTL revalidation, stale serving,
//!   identical lookups coalesced;
//! - [`blob`]: per-digest downloads ("fills") with request coalescing and digest
//!   verification, and reading blob bytes for clients;
//! - [`metadata`]: the sled database (blobs, the LRU index, manifests, tags, repositories),
//!   its one owner;
//! - [`eviction`]: the disk budget and its sweeper;
//! - [`health`]: upstream probes;
//! - [`upstream`]: the HTTP client (awc + rustls) on its own thread, with token auth.
//!
//! Beside them: [`store`] (the blob files), [`recovery`] (after a crash), [`oci`]
//! (manifest formats), [`digest`], [`reference`], [`auth`], [`settings`], [`clock`].
//!
//! [`Engine::start`] starts them once per process (before the HTTP server), and the HTTP
//! layer talks to them only through the small handle types collected in [`Engine`]: it
//! never sees an actor's address.
//!
//! # Execution model
//!
//! Which thread runs what, and where blocking is allowed:
//!
//! | thread | runs | blocks? |
//! |---|---|---|
//! | HTTP workers (`server.workers`, one per core) | route handlers; blob bodies ([`blob::reader`]) waiting on fills and, in the daemon, `sendfile` on non-blocking sockets | never |
//! | the system arbiter (the thread that started the engine) | the manifest resolver, blob fetcher, eviction and health actors; orphan recovery's task | never |
//! | the upstream arbiter (one thread) | the upstream actor: every awc client (they are `!Send`), token fetches, downloads | never |
//! | metadata threads ([`metadata::THREADS`], a `SyncArbiter`) | every sled read and write | yes: that is their job |
//! | sled's own threads | `flush_async` (the fsync of a durable write), sled's periodic flush | yes |
//! | per fill: a writer thread and a hash thread ([`blob::fill`]) | `writev` to the temporary file, fsync and rename; sha256 | yes |
//! | tokio's blocking pool (`spawn_blocking`, per worker/arbiter) | opening and reading stored files, page-cache read-ins, deleting evicted files, hashing a manifest, re-hashing orphans, the readiness write test | yes |
//!
//! Rule: an async thread (the first three rows) never calls sled, the file system or a
//! hash of more than a few bytes; it sends a message to the metadata actor or uses
//! `spawn_blocking`. Only the starting thread touches sled directly, before serving
//! (reconciliation: [`recovery::reconcile`]).
//!
//! # The path of a blob's bytes
//!
//! Bytes never travel through a mailbox: messages carry channels, `watch` receivers and
//! open files.
//!
//! 1. Upstream socket → awc on the upstream arbiter, ~32 KiB per read; what is already
//!    buffered is batched (up to 1 MiB) into one [`upstream::DownloadEvent::Chunk`] on a
//!    bounded channel ([`blob::fill::FILL_CHANNEL`] batches), so a slow disk slows the
//!    upstream read instead of filling memory.
//! 2. Fill writer thread → one `writev` per batch into `tmp/fill-<random>`, progress
//!    published on the fill's `watch`, the same `Bytes` handed to the hash thread.
//! 3. Readers on HTTP workers → the published bytes minus the last one, from the
//!    temporary file: `sendfile` from the page cache to the client socket (or read and
//!    copied when the connection cannot).
//! 4. Digest verified → the file renamed to `blobs/<alg>/<xx>/<hex>`, then the last byte
//!    released, then the file and its directory fsynced; the fetcher records the blob
//!    (durably) and the fill leaves the table.
//! 5. Later requests → the stored file, opened on the blocking pool, read into the page
//!    cache there if it had left it, sent with `sendfile`.
//!
//! # Examples worth copying
//!
//! - The handle facade: [`Engine`], [`ManifestsHandle`], [`BlobsHandle`] — routes call
//!   async methods, never `Addr`s; a stopped actor becomes an error, not a panic.
//! - Shared-future coalescing that finishes even when every requester leaves: the
//!   `Resolve` handler in [`manifest_resolver`].
//! - A `ResponseActFuture` that looks at the actor's state again after its await: the
//!   `OpenBlob` handler in [`blob::fetcher`].
//! - The drop guard with explicit outcomes: `FillGuard` and [`blob::fill::FillOutcome`].
//! - The last byte held back until the digest is verified: [`blob::fill::FillState::readable`].
//! - A [`Digest`] that only parsing can make, and the only way to build a blob's path.
//! - The atomic commit with fsync of the file and of its directory, and a record only
//!   after both: [`store::BlobStore::place`], [`store::BlobStore::make_durable`].
//! - The LRU index kept in step by two-tree transactions: `metadata::db`.
//! - The Idle/Busy/Throttled sweeper: [`eviction`].
//! - The error edge: `src/error.rs` in the daemon, [`EngineError`] here.
//! - The counting fake upstream: `tests/integration/common`.

#![forbid(unsafe_code)]

pub mod auth;
pub mod blob;
pub mod clock;
pub mod digest;
pub mod error;
pub mod eviction;
pub mod health;
pub mod manifest_resolver;
pub mod metadata;
pub mod metrics;
pub mod oci;
pub mod recovery;
pub mod reference;
pub mod settings;
pub mod store;
pub mod trace;
pub mod upstream;

#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use blob::{BlobBody, BlobRegions, BlobsHandle, ByteStream, Region};
pub use clock::Clock;
pub use digest::Digest;
pub use error::{EngineError, MetaError, Object, UpstreamError};
pub use eviction::{EvictionHandle, EvictionStatus};
pub use health::{HealthHandle, UpstreamHealth};
pub use manifest_resolver::{ManifestAnswer, ManifestsHandle};
pub use reference::Reference;
pub use settings::{
    CacheSettings, EngineSettings, HealthSettings, LimitSettings, StorageSettings, UpstreamId,
    UpstreamNames, UpstreamSettings,
};

pub use metrics::{CacheOutcome, Kind, Metrics};

use metadata::{ListRepositories, LookupBlob, MetaHandle, Metadata};
use store::BlobStore;
use upstream::Upstreams;

/// Handles to the running engine. Cheap to clone, `Send`, shared by all HTTP workers.
#[derive(Clone)]
pub struct Engine {
    pub manifests: ManifestsHandle,
    pub blobs: BlobsHandle,
    pub health: HealthHandle,
    pub eviction: EvictionHandle,
    meta: MetaHandle,
    store: BlobStore,
    names: UpstreamNames,
    clock: Clock,
    metrics: Arc<Metrics>,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub storage_writable: bool,
    pub metadata_ok: bool,
    pub disk_full: bool,
    pub storage: Option<EvictionStatus>,
    pub upstreams: Vec<UpstreamHealth>,
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage.root {}: {source}", root.display())]
    Store {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.root {}: metadata: {source}", root.display())]
    Metadata {
        root: PathBuf,
        #[source]
        source: MetaError,
    },
    #[error("storage.root {}: cannot read free space: {source}", root.display())]
    FreeSpace {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage.root {}: {source}", root.display())]
    Recovery {
        root: PathBuf,
        #[source]
        source: recovery::RecoveryError,
    },
    /// An upstream's TLS files (`ca`, `client_cert`, `client_key`).
    #[error("upstreams[{index}].{message}")]
    UpstreamTls { index: usize, message: String },
}

impl Engine {
    /// Opens the store and metadata, reconciles them after an interrupted run (before
    /// serving: leftovers of downloads removed, records without files dropped, usage
    /// counted), then starts the actors. Files without a record are re-hashed in the
    /// background. Must run inside an actix `System`, once per process.
    pub fn start(settings: EngineSettings, clock: Clock) -> Result<Engine, StartError> {
        // First what needs no disk: a bad TLS file stops the start before anything is written.
        let tls = settings
            .upstreams
            .iter()
            .enumerate()
            .map(|(index, u)| {
                if u.insecure_skip_verify {
                    tracing::warn!(
                        upstream = %u.name,
                        "upstreams[{index}].insecure_skip_verify is on: any certificate is accepted from {}, so anyone on the path can impersonate it",
                        u.url
                    );
                }
                upstream::client_tls(u).map_err(|message| StartError::UpstreamTls { index, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let root = settings.storage.root.clone();
        let store = BlobStore::open(&root).map_err(|source| StartError::Store {
            root: root.clone(),
            source,
        })?;
        let meta_err = |source| StartError::Metadata {
            root: root.clone(),
            source,
        };
        let db = metadata::Db::open(&root).map_err(meta_err)?;
        let (report, orphans) =
            recovery::reconcile(&db, &store).map_err(|source| StartError::Recovery {
                root: root.clone(),
                source,
            })?;
        tracing::info!(
            blobs = report.blobs,
            bytes = report.bytes,
            temp_removed = report.temp_removed,
            files_removed = report.files_removed,
            records_dropped = report.records_without_file,
            unrecorded_files = orphans.len(),
            "store reconciled with metadata"
        );
        let max_size = Self::disk_budget(&settings, &db, &store)?;
        let names = UpstreamNames::new(&settings.upstreams);
        let metrics = Metrics::new(&names);
        metrics
            .storage_limit
            .set(max_size.min(i64::MAX as u64) as i64);
        let meta = Metadata::start(db, metrics.mailbox(metrics::ActorName::Metadata));
        let pending = recovery::Pending::new(orphans);
        if !pending.is_empty() {
            let task = recovery::recover_orphans(
                meta.clone(),
                store.clone(),
                pending.clone(),
                clock.now_ms(),
            );
            actix_rt::spawn(async move {
                match task.await {
                    Ok(r) => tracing::info!(
                        recovered = r.files_recovered,
                        removed = r.files_removed,
                        bytes = r.bytes,
                        "unrecorded blob files re-checked"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "re-checking unrecorded blob files failed")
                    }
                }
            });
        }
        let upstreams = Upstreams::start(
            settings.upstreams.clone(),
            tls,
            names.clone(),
            clock.clone(),
            metrics.clone(),
            settings.limits.max_fills_per_upstream,
        );
        let health = health::Health::start(
            upstreams.clone(),
            &names,
            settings.health.clone(),
            clock.clone(),
        );
        let eviction = eviction::Eviction::start(
            meta.clone(),
            store.clone(),
            eviction::Budget {
                max_size,
                high: settings.storage.high_watermark,
                low: settings.storage.low_watermark,
                pins: settings.storage.pin.clone().into(),
                manifest_max_idle: settings.storage.manifest_max_idle,
                interval: settings.storage.sweep_interval,
            },
            clock.clone(),
            metrics.clone(),
        );
        // Readers give up on a fill that shows no progress for longer than any upstream's
        // timeouts would allow.
        let wait = settings
            .upstreams
            .iter()
            .map(|u| u.idle_timeout.max(u.response_timeout) + u.connect_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60))
            * 2;
        let blobs = blob::start(blob::fetcher::FetcherDeps {
            meta: meta.clone(),
            upstreams: upstreams.clone(),
            health: health.clone(),
            eviction: eviction.clone(),
            names: names.clone(),
            store: store.clone(),
            clock: clock.clone(),
            wait,
            disk: Arc::new(blob::DiskState::default()),
            read_in: Arc::new(AtomicU64::new(0)),
            pending,
            metrics: metrics.clone(),
            limits: settings.limits.clone(),
        });
        let manifests = manifest_resolver::ManifestResolver::start(
            meta.clone(),
            upstreams,
            health.clone(),
            manifest_resolver::Policy::new(&settings, names.clone()),
            clock.clone(),
            metrics.clone(),
        );
        Ok(Engine {
            manifests,
            blobs,
            health,
            eviction,
            meta,
            store,
            names,
            clock,
            metrics,
        })
    }

    /// The engine's metrics (the HTTP layer registers its own in the same registry).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Brings the gauges whose values live elsewhere up to date (called when Prometheus
    /// scrapes): bytes stored, each upstream's health.
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.storage_bytes
            .set(self.meta.usage().min(i64::MAX as u64) as i64);
        for (id, h) in self.names.ids().zip(self.health.snapshot()) {
            m.upstream(id)
                .up
                .set(i64::from(h.state != health::HealthState::Down));
        }
    }

    /// `storage.max_size`, or 80% of the free space at the first start (remembered).
    fn disk_budget(
        settings: &EngineSettings,
        db: &metadata::Db,
        store: &BlobStore,
    ) -> Result<u64, StartError> {
        let root = &settings.storage.root;
        let meta_err = |source| StartError::Metadata {
            root: root.clone(),
            source,
        };
        let human = |m: u64| bytesize::ByteSize(m).display().iec().to_string();
        if let Some(m) = settings.storage.max_size {
            let m = m.as_u64();
            tracing::info!(max_size = m, human = %human(m), "disk budget (storage.max_size)");
            return Ok(m);
        }
        const KEY: &str = "default_max_size";
        if let Some(m) = db.setting(KEY).map_err(meta_err)? {
            tracing::info!(max_size = m, human = %human(m), "disk budget (80% of the free space at the first start)");
            return Ok(m);
        }
        let free = store.free_space().map_err(|source| StartError::FreeSpace {
            root: root.clone(),
            source,
        })?;
        let m = (free as f64 * 0.8) as u64 + db.usage();
        db.set_setting(KEY, m).map_err(meta_err)?;
        tracing::info!(max_size = m, human = %human(m), free, "disk budget set to 80% of the free space (first start); set storage.max_size to change it");
        Ok(m)
    }

    /// Whether `digest` is stored and recorded (a download is recorded just after its file
    /// is renamed into the store, so the file alone does not say it).
    pub async fn is_stored(&self, digest: &Digest) -> bool {
        self.meta
            .ask(LookupBlob {
                upstream: None,
                digest: digest.clone(),
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .is_some_and(|l| l.record.is_some())
    }

    /// Whether pullcache can serve: storage writable, metadata answering. Upstreams being
    /// down does not make it unready (the cache still serves).
    pub async fn readiness(&self) -> Readiness {
        let store = self.store.clone();
        let storage_writable = tokio::task::spawn_blocking(move || store.write_test())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        let metadata_ok = matches!(self.meta.ask(metadata::Ping).await, Ok(Ok(())));
        let storage = self.eviction.status().await;
        Readiness {
            ready: storage_writable && metadata_ok,
            storage_writable,
            metadata_ok,
            disk_full: self.blobs.disk_full(self.clock.now_ms()),
            storage,
            upstreams: self.health.snapshot(),
        }
    }

    /// Every cached repository of a configured upstream, as (upstream, repository name).
    pub async fn repositories(&self) -> Result<Vec<(UpstreamId, String)>, EngineError> {
        let all = self.meta.ask(ListRepositories).await??;
        Ok(all
            .into_iter()
            .filter_map(|(u, r)| self.names.find(&u).map(|id| (id, r)))
            .collect())
    }

    /// Writes metadata to disk (at shutdown).
    pub async fn flush(&self) -> Result<(), EngineError> {
        Ok(self.meta.flush().await?)
    }
}
