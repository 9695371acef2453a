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

pub use blob_fetcher::{BlobSource, BlobsHandle};
pub use clock::Clock;
pub use digest::Digest;
pub use error::{EngineError, UpstreamError};
pub use manifest_resolver::{ManifestAnswer, ManifestsHandle};
pub use reference::Reference;
pub use settings::{CacheSettings, EngineSettings, StorageSettings, UpstreamSettings};

use metadata::{ListRepositories, Metadata, MetadataStore};
use store::BlobStore;
use upstream::Upstreams;

/// Handles to the running engine. Cheap to clone, `Send`, shared by all HTTP workers.
#[derive(Clone)]
pub struct Engine {
    pub manifests: ManifestsHandle,
    pub blobs: BlobsHandle,
    meta: Addr<Metadata>,
    pub settings: Arc<EngineSettings>,
}

impl Engine {
    /// Opens the store and metadata, cleans up after an interrupted run and starts the
    /// actors. Must run inside an actix `System`, once per process. Store reconciliation
    /// (re-checking files against records) continues in the background.
    pub fn start(settings: EngineSettings, clock: Clock) -> Result<Engine, String> {
        let root = &settings.storage.root;
        let store =
            BlobStore::open(root).map_err(|e| format!("storage.root {}: {e}", root.display()))?;
        let meta_store = MetadataStore::open(root)
            .map_err(|e| format!("storage.root {}: metadata: {e}", root.display()))?;
        // Leftovers of interrupted downloads go before any new download starts.
        let removed = store
            .clean_temp()
            .map_err(|e| format!("storage.root {}: {e}", root.display()))?;
        if removed > 0 {
            tracing::info!(removed, "removed leftovers of interrupted downloads");
        }
        {
            let (m, s, c) = (meta_store.clone(), store.clone(), clock.clone());
            std::thread::Builder::new()
                .name("reconcile".into())
                .spawn(move || match m.reconcile(&s, c.now_ms()) {
                    Ok(r) => tracing::info!(
                        blobs = r.blobs,
                        bytes = r.bytes,
                        recovered = r.files_recovered,
                        removed = r.files_removed,
                        records_dropped = r.records_without_file,
                        "store reconciled with metadata"
                    ),
                    Err(e) => tracing::error!(error = %e, "store reconciliation failed"),
                })
                .map_err(|e| e.to_string())?;
        }
        let names: Arc<Vec<String>> =
            Arc::new(settings.upstreams.iter().map(|u| u.name.clone()).collect());
        let meta = Metadata::start(meta_store.clone(), 2);
        let upstreams = Upstreams::start(settings.upstreams.clone())?;
        // Readers give up on a fill that shows no progress for longer than any upstream's
        // timeouts would allow.
        let wait = settings
            .upstreams
            .iter()
            .map(|u| u.idle_timeout.max(u.response_timeout) + u.connect_timeout)
            .max()
            .unwrap_or(Duration::from_secs(60))
            * 2;
        let blobs = blob_fetcher::BlobFetcher::start(
            meta.clone(),
            meta_store,
            upstreams.clone(),
            names.clone(),
            store,
            clock.clone(),
            wait,
        );
        let manifests = manifest_resolver::ManifestResolver::start(
            meta.clone(),
            upstreams,
            names,
            settings.cache.tag_ttl,
            clock,
        );
        Ok(Engine {
            manifests,
            blobs,
            meta,
            settings: Arc::new(settings),
        })
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
