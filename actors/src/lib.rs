//! pullcache's cache engine. Every piece of cache state is owned by an actor:
//!
//! - [`manifest_resolver`]: tag and digest resolution, TTL revalidation, stale serving;
//! - [`blob_fetcher`]: per-digest downloads with request coalescing and digest verification;
//! - [`metadata`]: the sled database (blobs, manifests, tags, repositories);
//! - [`upstream`]: the HTTP client (awc + rustls) on its own thread, with token auth.
//!
//! [`Engine::start`] starts them once per process (before the HTTP server), and the HTTP
//! layer talks to them through the small handle types collected in [`Engine`].

#![forbid(unsafe_code)]

pub mod auth;
pub mod blob_fetcher;
pub mod clock;
pub mod digest;
pub mod error;
pub mod eviction;
pub mod health;
pub mod manifest_resolver;
pub mod messages;
pub mod metadata;
pub mod reference;
pub mod settings;
pub mod store;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

pub use blob_fetcher::{BlobRegions, BlobSource, BlobsHandle, Region};
pub use clock::Clock;
pub use digest::Digest;
pub use error::{EngineError, UpstreamError};
pub use manifest_resolver::{ManifestAnswer, ManifestsHandle};
pub use reference::Reference;
pub use settings::{
    CacheSettings, EngineSettings, HealthSettings, StorageSettings, UpstreamSettings,
};

use metadata::{ListRepositories, Metadata, MetadataStore};
use serde::Serialize;

pub use eviction::{EvictionHandle, EvictionStatus};
pub use health::{HealthHandle, UpstreamHealth};
use store::BlobStore;
use upstream::Upstreams;

/// Handles to the running engine. Cheap to clone, `Send`, shared by all HTTP workers.
#[derive(Clone)]
pub struct Engine {
    pub manifests: ManifestsHandle,
    pub blobs: BlobsHandle,
    pub health: HealthHandle,
    pub eviction: EvictionHandle,
    meta: Addr<Metadata>,
    store: BlobStore,
    pub settings: Arc<EngineSettings>,
    /// The disk budget in force (configured, or computed at the first start).
    pub max_size: u64,
    clock: Clock,
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

impl Engine {
    /// Opens the store and metadata, reconciles them after an interrupted run (before
    /// serving: leftovers of downloads removed, records without files dropped, usage
    /// counted), then starts the actors. Files without a record are re-hashed in the
    /// background. Must run inside an actix `System`, once per process.
    pub fn start(settings: EngineSettings, clock: Clock) -> Result<Engine, String> {
        let root = &settings.storage.root;
        let at = |e: &dyn std::fmt::Display| format!("storage.root {}: {e}", root.display());
        let store = BlobStore::open(root).map_err(|e| at(&e))?;
        let meta_store = MetadataStore::open(root).map_err(|e| at(&format!("metadata: {e}")))?;
        let (report, orphans) = meta_store.reconcile(&store).map_err(|e| at(&e))?;
        tracing::info!(
            blobs = report.blobs,
            bytes = report.bytes,
            temp_removed = report.temp_removed,
            files_removed = report.files_removed,
            records_dropped = report.records_without_file,
            unrecorded_files = orphans.len(),
            "store reconciled with metadata"
        );
        if !orphans.is_empty() {
            let (m, s, c) = (meta_store.clone(), store.clone(), clock.clone());
            std::thread::Builder::new()
                .name("recover".into())
                .spawn(move || match m.recover_orphans(&s, orphans, c.now_ms()) {
                    Ok(r) => tracing::info!(
                        recovered = r.files_recovered,
                        removed = r.files_removed,
                        bytes = r.bytes,
                        "unrecorded blob files re-checked"
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "re-checking unrecorded blob files failed")
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        let max_size = Self::disk_budget(&settings, &meta_store, &store)?;
        let policy = manifest_resolver::Policy::new(&settings)?;
        let pins = settings
            .storage
            .pin
            .iter()
            .map(|p| eviction::PinPattern::parse(p).map_err(|e| format!("storage.pin: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let names: Arc<Vec<String>> =
            Arc::new(settings.upstreams.iter().map(|u| u.name.clone()).collect());
        let meta = Metadata::start(meta_store.clone(), 2);
        let upstreams = Upstreams::start(settings.upstreams.clone(), clock.clone())?;
        let health = health::Health::start(
            upstreams.clone(),
            &names,
            settings.health.clone(),
            clock.clone(),
        );
        let eviction = EvictionHandle {
            addr: eviction::Eviction::start(
                meta_store.clone(),
                store.clone(),
                eviction::Budget {
                    max_size,
                    high: settings.storage.high_watermark,
                    low: settings.storage.low_watermark,
                    pins,
                    manifest_max_idle: settings.storage.manifest_max_idle,
                    interval: settings.storage.sweep_interval,
                },
                clock.clone(),
            ),
        };
        // Readers give up on a fill that shows no progress for longer than any upstream's
        // timeouts would allow.
        let wait = settings
            .upstreams
            .iter()
            .map(|u| u.idle_timeout.max(u.response_timeout) + u.connect_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60))
            * 2;
        let blobs = blob_fetcher::BlobFetcher::start(blob_fetcher::FetcherDeps {
            meta: meta.clone(),
            meta_store,
            upstreams: upstreams.clone(),
            health: health.clone(),
            eviction: eviction.clone(),
            names,
            store: store.clone(),
            clock: clock.clone(),
            wait,
            disk: Arc::new(blob_fetcher::DiskState::default()),
        });
        let manifests = manifest_resolver::ManifestResolver::start(
            meta.clone(),
            upstreams,
            health.clone(),
            policy,
            clock.clone(),
        );
        Ok(Engine {
            clock,
            manifests,
            blobs,
            health,
            eviction,
            meta,
            store,
            settings: Arc::new(settings),
            max_size,
        })
    }

    /// `storage.max_size`, or 80% of the free space at the first start (remembered).
    fn disk_budget(
        settings: &EngineSettings,
        meta: &MetadataStore,
        store: &BlobStore,
    ) -> Result<u64, String> {
        if let Some(m) = settings.storage.max_size {
            tracing::info!(max_size = m, human = %bytesize::ByteSize(m).display().iec(), "disk budget (storage.max_size)");
            return Ok(m);
        }
        const KEY: &str = "default_max_size";
        if let Some(m) = meta.setting(KEY).map_err(|e| e.to_string())? {
            tracing::info!(max_size = m, human = %bytesize::ByteSize(m).display().iec(), "disk budget (80% of the free space at the first start)");
            return Ok(m);
        }
        let free = store
            .free_space()
            .map_err(|e| format!("storage.root: cannot read free space: {e}"))?;
        let m = (free as f64 * 0.8) as u64 + meta.usage();
        meta.set_setting(KEY, m).map_err(|e| e.to_string())?;
        tracing::info!(max_size = m, human = %bytesize::ByteSize(m).display().iec(), free, "disk budget set to 80% of the free space (first start); set storage.max_size to change it");
        Ok(m)
    }

    /// Whether `digest` is stored and recorded (a download is recorded just after its file
    /// is renamed into the store, so the file alone does not say it).
    pub async fn is_stored(&self, digest: &Digest) -> bool {
        self.meta
            .send(metadata::LookupBlob {
                upstream: String::new(),
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
        let storage_writable = tokio::task::spawn_blocking(move || {
            store.create_temp().and_then(|(p, mut f)| {
                use std::io::Write;
                let r = f.write_all(b"ok");
                std::fs::remove_file(p)?;
                r
            })
        })
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        let metadata_ok = matches!(self.meta.send(metadata::Ping).await, Ok(Ok(())));
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

    /// Every cached repository as (upstream index, repository name).
    pub async fn repositories(&self) -> Result<Vec<(usize, String)>, EngineError> {
        let all = self.meta.send(ListRepositories).await??;
        Ok(all
            .into_iter()
            .filter_map(|(u, r)| {
                self.settings
                    .upstreams
                    .iter()
                    .position(|s| s.name == u)
                    .map(|i| (i, r))
            })
            .collect())
    }

    /// Writes metadata to disk (at shutdown).
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.meta.send(metadata::Flush).await??;
        Ok(())
    }
}
