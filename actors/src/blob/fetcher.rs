//! The blob fetcher actor owns the table of blob downloads in flight, keyed by
//! (upstream, digest). The first request for an uncached blob starts exactly one upstream
//! download (a [`FillWriter`]); every later request for that digest joins it and reads the
//! bytes already on disk, then the rest as they arrive. The download continues when the
//! requester goes away.
//!
//! A fill reports [`FillFinished`] here. A stored blob is recorded in the metadata
//! (durably) before its entry leaves the table, so a request that arrives in between joins
//! the finished fill instead of downloading again.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, watch};

use super::fill::{
    DiskState, FillFinished, FillKey, FillOutcome, FillState, FillWriter, FILL_CHANNEL,
};
use super::reader::{BlobBody, Source};
use crate::clock::Clock;
use crate::digest::Digest;
use crate::error::{EngineError, Object};
use crate::eviction::EvictionHandle;
use crate::health::HealthHandle;
use crate::metadata::{
    BlobLookup, ForgetBlob, LinkBlobs, LookupBlob, MetaHandle, RecordBlob, TouchBlob,
};
use crate::metrics::{CacheOutcome, Held, Metrics};
use crate::recovery::{self, Pending};
use crate::settings::{LimitSettings, UpstreamId, UpstreamNames};
use crate::store::BlobStore;
use crate::trace::{self, kv, Context as TraceCx, Step};
use crate::upstream::UpstreamHandle;

/// Open a blob for reading: from the store, by joining a fill, or by starting one.
#[derive(Message)]
#[rtype(result = "Result<BlobBody, EngineError>")]
pub struct OpenBlob {
    pub upstream: UpstreamId,
    pub repo: String,
    pub digest: Digest,
    /// The request's trace.
    pub cx: TraceCx,
}

/// The size of a blob, without downloading it.
#[derive(Message)]
#[rtype(result = "Result<u64, EngineError>")]
pub struct StatBlob {
    pub upstream: UpstreamId,
    pub repo: String,
    pub digest: Digest,
    pub cx: TraceCx,
}

/// Counts of finished fills by outcome name ([`FillOutcome::name`]).
#[derive(Message)]
#[rtype(result = "HashMap<&'static str, u64>")]
pub struct FillStats;

struct InFlight {
    id: u64,
    state: watch::Receiver<FillState>,
    /// The repository the download was started for (its upstream request's path).
    repo: String,
    /// The fill's span, ended when the fill leaves the table.
    step: Step,
    /// The trace of the request that started it (what a joining request's span names).
    leader: String,
}

/// What the blob fetcher works with.
#[derive(Clone)]
pub struct FetcherDeps {
    pub meta: MetaHandle,
    pub upstreams: UpstreamHandle,
    pub health: HealthHandle,
    pub eviction: EvictionHandle,
    pub names: UpstreamNames,
    pub store: BlobStore,
    pub clock: Clock,
    /// How long a reader waits for progress before giving up.
    pub wait: Duration,
    pub disk: Arc<DiskState>,
    /// Stored regions read back into the page cache before being sent.
    pub read_in: Arc<AtomicU64>,
    /// Files found without a record at start and not re-checked yet.
    pub pending: Pending,
    pub metrics: Arc<Metrics>,
    /// Caps on downloads in flight.
    pub limits: LimitSettings,
}

pub struct BlobFetcher {
    inflight: HashMap<FillKey, InFlight>,
    next_id: u64,
    /// Shared with every lookup's future: one reference count per request, not a clone
    /// of each handle.
    d: Arc<FetcherDeps>,
    outcomes: HashMap<&'static str, u64>,
}

impl Actor for BlobFetcher {
    type Context = Context<Self>;
}

impl BlobFetcher {
    pub fn start(deps: FetcherDeps) -> Addr<BlobFetcher> {
        BlobFetcher {
            inflight: HashMap::new(),
            next_id: 0,
            d: Arc::new(deps),
            outcomes: HashMap::new(),
        }
        .start()
    }

    fn body(&self, src: Source, outcome: CacheOutcome) -> BlobBody {
        let waiting =
            matches!(src, Source::Filling { .. }).then(|| Held::new(&self.d.metrics.fill_waiters));
        BlobBody {
            src,
            read_in: self.d.read_in.clone(),
            outcome,
            _waiting: waiting,
        }
    }

    /// A body reading a fill; `outcome`: `Miss` for the request that started it,
    /// `Coalesced` for one that joined it.
    fn filling(
        &self,
        state: watch::Receiver<FillState>,
        started_for: String,
        outcome: CacheOutcome,
    ) -> BlobBody {
        self.body(
            Source::Filling {
                state,
                total: None,
                wait: self.d.wait,
                started_for,
            },
            outcome,
        )
    }

    /// Refuses a new download past `limits` (joining one in flight never comes here).
    /// Direct streams (disk full) are not in the table and are not counted: they hold no
    /// thread or file, only their connection from the upstream's bounded blob pool.
    fn check_limits(&self, upstream: UpstreamId) -> Result<(), EngineError> {
        let l = &self.d.limits;
        if self.inflight.len() >= l.max_fills {
            return Err(EngineError::Busy(format!(
                "{} blob downloads in flight (limits.max_fills)",
                l.max_fills
            )));
        }
        let here = self.inflight.keys().filter(|k| k.0 == upstream).count();
        if here >= l.max_fills_per_upstream {
            return Err(EngineError::Busy(format!(
                "{here} blob downloads in flight from {} (limits.max_fills_per_upstream)",
                self.d.names.name(upstream)
            )));
        }
        Ok(())
    }

    /// The fill table changed size.
    fn table_changed(&self) {
        self.d
            .metrics
            .inflight_fills
            .set(self.inflight.len() as i64);
    }

    /// The fill for `key` if it can still deliver. A failed or abandoned fill whose writer
    /// has not yet reported back is dropped here, so a new request starts afresh instead of
    /// inheriting the failure.
    fn live_fill(&mut self, key: &FillKey, cx: &TraceCx) -> Option<BlobBody> {
        let f = self.inflight.get(key)?;
        if matches!(
            &*f.state.borrow(),
            FillState::Failed(_) | FillState::Abandoned
        ) {
            if let Some(f) = self.inflight.remove(key) {
                f.step
                    .fail(&"failed or abandoned before its writer reported");
            }
            self.table_changed();
            return None;
        }
        let (state, repo) = (f.state.clone(), f.repo.clone());
        let _joined = Step::child(cx, "blob.coalesce", || {
            vec![
                kv("oci.digest", key.1.to_string()),
                kv("pullcache.coalesce.leader_trace_id", f.leader.clone()),
            ]
        });
        Some(self.filling(state, repo, CacheOutcome::Coalesced))
    }

    /// Starts the fill for `key` (there is none: see [`BlobFetcher::live_fill`]).
    fn start_fill(
        &mut self,
        ctx: &mut Context<Self>,
        key: FillKey,
        repo: String,
        cx: &TraceCx,
    ) -> Result<BlobBody, EngineError> {
        let step = Step::child(cx, "blob.fill", || {
            vec![
                kv("pullcache.upstream", self.d.names.name(key.0).to_string()),
                kv("oci.repository", repo.clone()),
                kv("oci.digest", key.1.to_string()),
            ]
        });
        let (state_tx, state_rx) = watch::channel(FillState::Connecting);
        let (events_tx, events_rx) = mpsc::channel(FILL_CHANNEL);
        self.next_id += 1;
        let id = self.next_id;
        let writer = FillWriter {
            key: key.clone(),
            id,
            upstream_name: self.d.names.name(key.0).to_string(),
            store: self.d.store.clone(),
            clock: self.d.clock.clone(),
            disk: self.d.disk.clone(),
            report: ctx.address().recipient(),
            mismatches: self.d.metrics.upstream(key.0).digest_mismatch.clone(),
            trace: step.cx().clone(),
        };
        writer
            .spawn(events_rx, state_tx)
            .map_err(|e| EngineError::storage("starting a download thread", e))?;
        self.d
            .upstreams
            .start_download(key.0, &repo, &key.1, events_tx, step.cx());
        tracing::info!(upstream = %self.d.names.name(key.0), repo = %repo, digest = %key.1, "blob fill started");
        self.inflight.insert(
            key,
            InFlight {
                id,
                state: state_rx.clone(),
                repo: repo.clone(),
                leader: trace::trace_id(cx),
                step,
            },
        );
        self.table_changed();
        Ok(self.filling(state_rx, repo, CacheOutcome::Miss))
    }
}

/// A blob stored for another upstream is served through this one only once this upstream
/// confirms it has it (a HEAD), so private content never leaks across upstreams; the
/// confirmation is then remembered.
async fn confirm_and_link(
    d: &FetcherDeps,
    upstream: UpstreamId,
    repo: &str,
    digest: &Digest,
    cx: &TraceCx,
) -> Result<(), EngineError> {
    d.upstreams
        .head_blob(upstream, repo, digest, cx)
        .await
        .map_err(|e| EngineError::from_upstream(e, Object::Blob(digest.clone())))?;
    d.meta
        .ask(LinkBlobs {
            upstream: d.names.name(upstream).to_string(),
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

/// The blob's record, and whether `upstream` serves it. A file on disk since before a
/// crash whose record was lost is re-checked first (see `recovery::recover_one`); if that
/// fails, the blob is treated as not stored (it is fetched again).
async fn lookup_record(
    d: &FetcherDeps,
    upstream: UpstreamId,
    digest: &Digest,
) -> Result<BlobLookup, EngineError> {
    let lookup = || {
        d.meta.ask(LookupBlob {
            upstream: Some(d.names.name(upstream).to_string()),
            digest: digest.clone(),
        })
    };
    let l = lookup().await??;
    if l.record.is_some() || !d.pending.contains(digest) {
        return Ok(l);
    }
    match recovery::recover_one(&d.meta, &d.store, &d.pending, digest, d.clock.now_ms()).await {
        Ok(true) => Ok(lookup().await??),
        Ok(false) => Ok(l),
        Err(e) => {
            tracing::warn!(digest = %digest, error = %e, "re-checking an unrecorded blob file failed; fetching it again");
            Ok(l)
        }
    }
}

async fn lookup_cached(
    d: Arc<FetcherDeps>,
    upstream: UpstreamId,
    repo: String,
    digest: Digest,
    cx: TraceCx,
) -> Result<Lookup, EngineError> {
    let l = lookup_record(&d, upstream, &digest).await?;
    let Some(recorded) = l.record.as_ref().map(|r| r.size) else {
        return Ok(Lookup::Missing);
    };
    let (dd, dg) = (d.clone(), digest.clone());
    let opened = tokio::task::spawn_blocking(move || dd.store.open_blob(&dg))
        .await
        .map_err(|_| EngineError::Internal("a blocking task failed"))?
        .map_err(|e| EngineError::storage("opening a stored blob", e))?;
    let (file, size) = match opened {
        Some((f, size)) if size == recorded => (f, size),
        other => {
            // Missing, or its length disagrees with the record (damaged): never serve it.
            tracing::warn!(digest = %digest, missing = other.is_none(), on_disk = other.as_ref().map_or(0, |o| o.1), recorded, "stored blob missing or damaged; fetching again");
            if other.is_some() {
                let (dd, dg) = (d.clone(), digest.clone());
                let _ = tokio::task::spawn_blocking(move || dd.store.remove_blob(&dg)).await;
            }
            d.meta.ask(ForgetBlob { digest }).await??;
            return Ok(Lookup::Missing);
        }
    };
    if !l.linked {
        confirm_and_link(&d, upstream, &repo, &digest, &cx).await?;
    }
    d.meta.tell(TouchBlob {
        digest,
        now_ms: d.clock.now_ms(),
    });
    Ok(Lookup::Cached(Arc::new(file), size))
}

impl Handler<OpenBlob> for BlobFetcher {
    type Result = ResponseActFuture<Self, Result<BlobBody, EngineError>>;

    fn handle(&mut self, m: OpenBlob, _: &mut Self::Context) -> Self::Result {
        let key = (m.upstream, m.digest.clone());
        let step = Step::child(&m.cx, "blob.lookup", || {
            vec![
                kv(
                    "pullcache.upstream",
                    self.d.names.name(m.upstream).to_string(),
                ),
                kv("oci.repository", m.repo.clone()),
                kv("oci.digest", m.digest.to_string()),
            ]
        });
        let outcome = |s: &Step, o: CacheOutcome| s.set(|| vec![kv("cache.outcome", o.as_str())]);
        if let Some(body) = self.live_fill(&key, step.cx()) {
            outcome(&step, CacheOutcome::Coalesced);
            return Box::pin(fut::ready(Ok(body)));
        }
        let lookup = lookup_cached(
            self.d.clone(),
            m.upstream,
            m.repo.clone(),
            m.digest,
            step.cx().clone(),
        );
        let repo = m.repo;
        // The lookup awaits: the table may have changed meanwhile, so look again after it.
        Box::pin(lookup.into_actor(self).map(move |res, act, ctx| match res {
            Err(e) => {
                step.fail(&e);
                Err(e)
            }
            Ok(Lookup::Cached(file, size)) => {
                outcome(&step, CacheOutcome::Hit);
                Ok(act.body(Source::Cached { file, size }, CacheOutcome::Hit))
            }
            Ok(Lookup::Missing) => {
                if let Some(body) = act.live_fill(&key, step.cx()) {
                    outcome(&step, CacheOutcome::Coalesced);
                    return Ok(body);
                }
                outcome(&step, CacheOutcome::Miss);
                if act.d.health.is_down(key.0) {
                    return Err(EngineError::UpstreamDown(
                        act.d.names.name(key.0).to_string(),
                    ));
                }
                if let Err(e) = act.check_limits(key.0) {
                    step.fail(&e);
                    return Err(e);
                }
                if act.d.disk.is_full(act.d.clock.now_ms()) {
                    let (tx, rx) = mpsc::channel(FILL_CHANNEL);
                    act.d
                        .upstreams
                        .start_download(key.0, &repo, &key.1, tx, step.cx());
                    return Ok(act.body(
                        Source::Direct {
                            events: rx,
                            total: None,
                            digest: key.1,
                            wait: act.d.wait,
                        },
                        CacheOutcome::Miss,
                    ));
                }
                act.start_fill(ctx, key, repo, step.cx())
            }
        }))
    }
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
        let d = self.d.clone();
        Box::pin(async move {
            let name = d.names.name(m.upstream).to_string();
            let l = lookup_record(&d, m.upstream, &m.digest).await?;
            match l.record {
                Some(rec) if l.linked => Ok(rec.size),
                Some(rec) => {
                    confirm_and_link(&d, m.upstream, &m.repo, &m.digest, &m.cx).await?;
                    Ok(rec.size)
                }
                None if down => Err(EngineError::UpstreamDown(name)),
                None => d
                    .upstreams
                    .head_blob(m.upstream, &m.repo, &m.digest, &m.cx)
                    .await
                    .map_err(|e| EngineError::from_upstream(e, Object::Blob(m.digest))),
            }
        })
    }
}

impl Handler<FillFinished> for BlobFetcher {
    type Result = ();

    fn handle(&mut self, m: FillFinished, ctx: &mut Self::Context) {
        let FillOutcome::Stored { size } = m.outcome else {
            if matches!(
                m.outcome,
                FillOutcome::DiskFull | FillOutcome::NotStored { disk_full: true }
            ) {
                self.d.eviction.nudge(true);
            }
            self.finish(&m);
            return;
        };
        // Record it (durably), then let it leave the table: until then, requests join the
        // finished fill and read its file.
        let record = RecordBlob {
            upstream: self.d.names.name(m.key.0).to_string(),
            digest: m.key.1.clone(),
            size,
            now_ms: self.d.clock.now_ms(),
        };
        let meta = self.d.meta.clone();
        let recorded = async move { meta.ask(record).await??.await };
        ctx.spawn(recorded.into_actor(self).map(move |res, act, _| {
            match res {
                Ok(()) => tracing::info!(digest = %m.key.1, size, "blob stored"),
                Err(e) => {
                    tracing::error!(error = %e, digest = %m.key.1, "could not record a stored blob")
                }
            }
            act.d.eviction.nudge(false);
            act.finish(&m);
        }));
    }
}

impl BlobFetcher {
    /// The fill is over: out of the table (unless a newer one took its place), counted.
    fn finish(&mut self, m: &FillFinished) {
        if self.inflight.get(&m.key).is_some_and(|f| f.id == m.id) {
            if let Some(f) = self.inflight.remove(&m.key) {
                f.step
                    .set(|| vec![kv("pullcache.fill.outcome", m.outcome.name())]);
                if !matches!(m.outcome, FillOutcome::Stored { .. }) {
                    f.step.fail(&m.outcome.name());
                }
            }
            self.table_changed();
        }
        *self.outcomes.entry(m.outcome.name()).or_default() += 1;
    }
}

impl Handler<FillStats> for BlobFetcher {
    type Result = MessageResult<FillStats>;
    fn handle(&mut self, _: FillStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.outcomes.clone())
    }
}
