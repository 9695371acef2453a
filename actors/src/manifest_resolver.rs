//! The manifest resolver actor owns the answer to "which manifest is `<repo>:<reference>`?"
//! and the table of identical upstream lookups in flight (coalesced: one upstream request,
//! many waiters).
//!
//! Policy:
//! - By digest: immutable. Served from the metadata store once cached, never revalidated.
//! - By tag: trusted for `cache.tag_ttl` after the upstream last confirmed it; then
//!   revalidated with a HEAD (free on Docker Hub), and only a changed digest costs a GET.
//!   If the upstream is unreachable, times out, or answers 5xx/429, the cached mapping is
//!   served stale (logged, and marked for a `Warning: 110` header). If the upstream says the
//!   tag is gone (404), the mapping is dropped and the client gets 404, as the upstream says.
//! - Upstream bytes are stored and served unchanged; their digest is computed here and
//!   checked against the requested digest or the upstream's `Docker-Content-Digest`.
//! - Schema-1 and unknown manifest types are refused (404 MANIFEST_UNKNOWN).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::future::{FutureExt, LocalBoxFuture, Shared};

use crate::clock::Clock;
use crate::digest::{Algorithm, Digest};
use crate::error::{EngineError, Object};
use crate::health::HealthHandle;
use crate::metadata::{
    DeleteTag, GetManifest, GetTag, ListTags, ManifestRecord, MetaHandle, PutManifest, PutTag,
    TagRecord, TouchRepo,
};
use crate::metrics::{ActorName, CacheOutcome, Mailbox, Metrics};
use crate::oci::{effective_media_type, referenced_blobs};
use crate::reference::Reference;
use crate::settings::{EngineSettings, TagPattern, UpstreamId, UpstreamNames};
use crate::trace::{self, kv, Context as TraceCx, Step};
use crate::upstream::{UpstreamHandle, UpstreamManifest};

/// A manifest as served to clients.
#[derive(Debug, Clone)]
pub struct ManifestAnswer {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
    /// How the cache answered; `Stale`: served from the cache because the upstream could
    /// not confirm it (a `Warning: 110` goes with it).
    pub outcome: CacheOutcome,
}

type Key = (UpstreamId, String, String);
type SharedAnswer = Shared<LocalBoxFuture<'static, Result<ManifestAnswer, EngineError>>>;

/// A resolution in flight, and the trace of the request that started it.
struct InFlight {
    answer: SharedAnswer,
    leader: String,
}

pub struct ManifestResolver {
    ctx: Ctx,
    inflight: HashMap<Key, InFlight>,
    /// When each repository's use was last written to the metadata (feeds
    /// `manifest_max_idle`); kept here so a busy repository costs one write a minute.
    touched: HashMap<(UpstreamId, String), u64>,
}

/// What a resolution needs; cloned into each lookup's future.
#[derive(Clone)]
struct Ctx {
    meta: MetaHandle,
    upstreams: UpstreamHandle,
    health: HealthHandle,
    policy: Arc<Policy>,
    clock: Clock,
    stats: Arc<ResolverStats>,
    metrics: Arc<Metrics>,
}

/// Freshness policy, per upstream where the configuration allows it (indexed by
/// [`UpstreamId`]).
pub struct Policy {
    pub names: UpstreamNames,
    pub tag_ttl: Vec<Duration>,
    pub min_quota: Vec<u64>,
    pub immutable_tags: Vec<TagPattern>,
    pub max_stale: Duration,
}

impl Policy {
    /// `names`: the names of `settings.upstreams`, in order.
    pub fn new(settings: &EngineSettings, names: UpstreamNames) -> Policy {
        Policy {
            names,
            tag_ttl: settings
                .upstreams
                .iter()
                .map(|u| u.tag_ttl.unwrap_or(settings.cache.tag_ttl))
                .collect(),
            min_quota: settings.upstreams.iter().map(|u| u.min_quota).collect(),
            immutable_tags: settings.cache.immutable_tags.clone(),
            max_stale: settings.cache.max_stale,
        }
    }
}

/// Counters of how tags were answered (only go up).
#[derive(Debug, Default)]
pub struct ResolverStats {
    /// Served past their TTL because the upstream could not confirm them.
    pub stale_served: AtomicU64,
    /// Refused: past `max_stale`.
    pub stale_refused: AtomicU64,
    /// Revalidations skipped to save the upstream's pull quota.
    pub quota_skips: AtomicU64,
}

impl Actor for ManifestResolver {
    type Context = Context<Self>;
}

impl ManifestResolver {
    pub fn start(
        meta: MetaHandle,
        upstreams: UpstreamHandle,
        health: HealthHandle,
        policy: Policy,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> ManifestsHandle {
        let stats = Arc::new(ResolverStats::default());
        let mailbox = metrics.mailbox(ActorName::Resolver);
        let addr = ManifestResolver {
            ctx: Ctx {
                meta,
                upstreams,
                health,
                policy: Arc::new(policy),
                clock,
                stats: stats.clone(),
                metrics,
            },
            inflight: HashMap::new(),
            touched: HashMap::new(),
        }
        .start();
        ManifestsHandle {
            addr,
            stats,
            mailbox,
        }
    }
}

/// Resolve `<repo>:<reference>` on an upstream.
#[derive(Message)]
#[rtype(result = "Result<ManifestAnswer, EngineError>")]
pub struct Resolve {
    pub upstream: UpstreamId,
    pub repo: String,
    pub reference: Reference,
    /// The request's trace.
    pub cx: TraceCx,
}

/// List tags: the upstream's list (it is mutable), the cached tags when it is unavailable.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, EngineError>")]
pub struct TagList {
    pub upstream: UpstreamId,
    pub repo: String,
    pub cx: TraceCx,
}

impl Handler<Resolve> for ManifestResolver {
    type Result = ResponseFuture<Result<ManifestAnswer, EngineError>>;

    fn handle(&mut self, m: Resolve, ctx: &mut Self::Context) -> Self::Result {
        let now = self.ctx.clock.now_ms();
        let last = self
            .touched
            .entry((m.upstream, m.repo.clone()))
            .or_insert(0);
        if now >= *last + 60_000 {
            *last = now;
            self.ctx.meta.tell(TouchRepo {
                upstream: self.ctx.name(m.upstream),
                repo: m.repo.clone(),
                now_ms: now,
            });
            if self.touched.len() > 100_000 {
                self.touched.retain(|_, t| now < *t + 60_000);
            }
        }
        let key = (m.upstream, m.repo.clone(), m.reference.to_string());
        if let Some(f) = self.inflight.get(&key) {
            // Joined: one upstream transfer for both requests, if there was one.
            let joined = f.answer.clone();
            let step = Step::child(&m.cx, "manifest.coalesce", || {
                vec![
                    kv("oci.reference", m.reference.to_string()),
                    kv("pullcache.coalesce.leader_trace_id", f.leader.clone()),
                ]
            });
            return Box::pin(async move {
                let _step = step;
                let mut a = joined.await?;
                if matches!(a.outcome, CacheOutcome::Miss | CacheOutcome::Revalidated) {
                    a.outcome = CacheOutcome::Coalesced;
                }
                Ok(a)
            });
        }
        let c = self.ctx.clone();
        let leader = trace::trace_id(&m.cx);
        let step = Step::child(&m.cx, "manifest.resolve", || {
            vec![
                kv("pullcache.upstream", c.name(m.upstream)),
                kv("oci.repository", m.repo.clone()),
                kv("oci.reference", m.reference.to_string()),
            ]
        });
        let fut: LocalBoxFuture<'static, _> = Box::pin(async move {
            let r = c
                .resolve(m.upstream, &m.repo, &m.reference, step.cx())
                .await;
            match &r {
                Ok(a) => step.set(|| {
                    vec![
                        kv("cache.outcome", a.outcome.as_str()),
                        kv("oci.digest", a.digest.to_string()),
                        kv("pullcache.bytes", a.bytes.len() as i64),
                    ]
                }),
                Err(e) => step.fail(e),
            }
            r
        });
        let shared = fut.shared();
        self.inflight.insert(
            key.clone(),
            InFlight {
                answer: shared.clone(),
                leader,
            },
        );
        // Runs to completion even if every requester goes away, then leaves the table.
        ctx.spawn(shared.clone().into_actor(self).map(move |_, act, _| {
            act.inflight.remove(&key);
        }));
        Box::pin(shared)
    }
}

impl Handler<TagList> for ManifestResolver {
    type Result = ResponseFuture<Result<Vec<String>, EngineError>>;

    fn handle(&mut self, m: TagList, _: &mut Self::Context) -> Self::Result {
        let c = self.ctx.clone();
        Box::pin(async move { c.tag_list(m.upstream, &m.repo, &m.cx).await })
    }
}

impl Ctx {
    fn name(&self, upstream: UpstreamId) -> String {
        self.policy.names.name(upstream).to_string()
    }

    fn down(&self, upstream: UpstreamId) -> Result<(), EngineError> {
        if self.health.is_down(upstream) {
            return Err(EngineError::UpstreamDown(self.name(upstream)));
        }
        Ok(())
    }

    /// A cached tag the upstream could not confirm: served while within `max_stale`.
    #[allow(clippy::too_many_arguments)]
    fn stale(
        &self,
        upstream: UpstreamId,
        repo: &str,
        tag: &str,
        rec: ManifestRecord,
        digest: Digest,
        stale_ms: u64,
        why: &str,
    ) -> Result<ManifestAnswer, EngineError> {
        let name = self.name(upstream);
        if stale_ms > self.policy.max_stale.as_millis() as u64 {
            self.stats.stale_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %name, repo, tag, why, "upstream unavailable and the cached tag is older than max_stale; refusing it");
            return Err(EngineError::StaleTooOld {
                upstream: name,
                what: format!("{repo}:{tag}"),
                stale_for: humantime::format_duration(Duration::from_secs(stale_ms / 1000))
                    .to_string(),
                max_stale: humantime::format_duration(self.policy.max_stale).to_string(),
            });
        }
        self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(upstream = %name, repo, tag, digest = %digest, why, "serving a stale tag from cache");
        Ok(answer(rec, digest, CacheOutcome::Stale))
    }

    async fn cached(
        &self,
        upstream: UpstreamId,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>, EngineError> {
        Ok(self
            .meta
            .ask(GetManifest {
                upstream: self.name(upstream),
                repo: repo.into(),
                digest: digest.clone(),
            })
            .await??)
    }

    async fn resolve(
        &self,
        upstream: UpstreamId,
        repo: &str,
        reference: &Reference,
        cx: &TraceCx,
    ) -> Result<ManifestAnswer, EngineError> {
        match reference {
            Reference::Digest(d) => {
                if let Some(rec) = self.cached(upstream, repo, d).await? {
                    return Ok(answer(rec, d.clone(), CacheOutcome::Hit));
                }
                self.fetch(upstream, repo, &d.to_string(), Some(d), None, cx)
                    .await
            }
            Reference::Tag(tag) => self.resolve_tag(upstream, repo, tag, cx).await,
        }
    }

    async fn resolve_tag(
        &self,
        upstream: UpstreamId,
        repo: &str,
        tag: &str,
        cx: &TraceCx,
    ) -> Result<ManifestAnswer, EngineError> {
        let name = self.name(upstream);
        let entry = self
            .meta
            .ask(GetTag {
                upstream: name.clone(),
                repo: repo.into(),
                tag: tag.into(),
            })
            .await??;
        let cached = match entry.as_ref().and_then(|t| Digest::parse(&t.digest).ok()) {
            Some(d) => self.cached(upstream, repo, &d).await?.map(|rec| (d, rec)),
            None => None,
        };
        let Some((digest, rec)) = cached else {
            return self.fetch(upstream, repo, tag, None, Some(tag), cx).await;
        };
        let checked_ms = entry.map(|e| e.checked_ms).unwrap_or(0);
        let now = self.clock.now_ms();
        let ttl = self.policy.tag_ttl[upstream.index()].as_millis() as u64;
        let age = now.saturating_sub(checked_ms);
        if age < ttl || self.policy.immutable_tags.iter().any(|r| r.is_match(tag)) {
            return Ok(answer(rec, digest, CacheOutcome::Hit));
        }
        let stale_ms = age - ttl;
        // Past its TTL. Known down: answer from cache at once, without waiting for timeouts.
        if self.health.is_down(upstream) {
            return self.stale(upstream, repo, tag, rec, digest, stale_ms, "upstream down");
        }
        // Docker Hub quota nearly spent: keep the last pulls for images not cached yet.
        if let Some(q) = self.upstreams.quota(upstream).await {
            if q.is_low(self.policy.min_quota[upstream.index()], now) {
                self.stats.quota_skips.fetch_add(1, Ordering::Relaxed);
                tracing::info!(upstream = %name, repo, tag, remaining = q.remaining, "pull quota low; not revalidating a cached tag");
                return Ok(answer(rec, digest, CacheOutcome::Hit));
            }
        }
        // Ask the upstream with a HEAD.
        match self.upstreams.manifest(upstream, repo, tag, true, cx).await {
            Ok(UpstreamManifest {
                digest: Some(d), ..
            }) if d == digest => {
                // Only the time it was checked changes: a crash may lose that (the tag is
                // then revalidated once more), so no flush on this path.
                self.put_tag(upstream, repo, tag, &digest, now, false)
                    .await?;
                tracing::debug!(upstream = %name, repo, tag, "tag revalidated, unchanged");
                Ok(answer(rec, digest, CacheOutcome::Revalidated))
            }
            Ok(UpstreamManifest {
                digest: Some(d), ..
            }) => {
                tracing::info!(upstream = %name, repo, tag, old = %digest, new = %d, "tag moved upstream");
                if let Some(newrec) = self.cached(upstream, repo, &d).await? {
                    self.put_tag(upstream, repo, tag, &d, now, true).await?;
                    return Ok(answer(newrec, d, CacheOutcome::Revalidated));
                }
                self.fetch(upstream, repo, &d.to_string(), Some(&d), Some(tag), cx)
                    .await
            }
            // A HEAD without a digest: only a GET can tell.
            Ok(_) => self.fetch(upstream, repo, tag, None, Some(tag), cx).await,
            Err(e) if e.is_unavailable() => {
                self.stale(upstream, repo, tag, rec, digest, stale_ms, &e.to_string())
            }
            Err(e) => {
                if e.is_not_found() {
                    tracing::info!(upstream = %name, repo, tag, "tag deleted upstream; dropping it from the cache");
                    self.meta
                        .ask(DeleteTag {
                            upstream: name,
                            repo: repo.into(),
                            tag: tag.into(),
                        })
                        .await??
                        .await?;
                }
                Err(EngineError::from_upstream(
                    e,
                    Object::Manifest {
                        repo: repo.into(),
                        reference: tag.into(),
                    },
                ))
            }
        }
    }

    /// Records that `tag` is `digest`, checked at `now`; `durable`: on disk before this
    /// returns (when the digest changed: the client is about to be given the new one).
    async fn put_tag(
        &self,
        upstream: UpstreamId,
        repo: &str,
        tag: &str,
        digest: &Digest,
        now: u64,
        durable: bool,
    ) -> Result<(), EngineError> {
        let record = TagRecord {
            digest: digest.to_string(),
            checked_ms: now,
        };
        let flushed = self
            .meta
            .ask(PutTag {
                upstream: self.name(upstream),
                repo: repo.into(),
                tag: tag.into(),
                record,
            })
            .await??;
        if durable {
            flushed.await?;
        }
        Ok(())
    }

    /// GETs a manifest by `reference`, verifies it, stores it (and the tag), returns it.
    async fn fetch(
        &self,
        upstream: UpstreamId,
        repo: &str,
        reference: &str,
        expected: Option<&Digest>,
        tag: Option<&str>,
        cx: &TraceCx,
    ) -> Result<ManifestAnswer, EngineError> {
        let object = Object::Manifest {
            repo: repo.into(),
            reference: reference.into(),
        };
        self.down(upstream)?;
        let um = self
            .upstreams
            .manifest(upstream, repo, reference, false, cx)
            .await
            .map_err(|e| EngineError::from_upstream(e, object.clone()))?;
        let bytes = um.bytes.clone().unwrap_or_default();
        let media_type = effective_media_type(&um.media_type, &bytes)
            .ok_or_else(|| EngineError::ManifestRefused(format!("{object}: unsupported manifest type {:?} (schema 1 and non-image types are not served)", um.media_type)))?;
        // The digest that must hold: the one asked for, else the upstream's header.
        let algorithm = expected
            .or(um.digest.as_ref())
            .map_or(Algorithm::Sha256, |d| d.algorithm());
        // Hashing and parsing up to 4 MiB: off the actor's thread.
        let (actual, links) = {
            let (b, mt) = (bytes.clone(), media_type.clone());
            tokio::task::spawn_blocking(move || {
                (Digest::of_bytes(algorithm, &b), referenced_blobs(&mt, &b))
            })
            .await
            .map_err(|_| EngineError::Internal("a blocking task failed"))?
        };
        if let Some(want) = expected.or(um.digest.as_ref()) {
            if *want != actual {
                self.metrics.upstream(upstream).digest_mismatch.inc();
                tracing::error!(%object, expected = %want, actual = %actual, "upstream manifest does not match its digest");
                return Err(EngineError::DigestMismatch {
                    expected: want.clone(),
                    actual,
                });
            }
        }
        let now = self.clock.now_ms();
        let record = ManifestRecord {
            media_type: media_type.clone(),
            bytes: bytes.clone(),
            fetched_ms: now,
        };
        self.meta
            .ask(PutManifest {
                upstream: self.name(upstream),
                repo: repo.into(),
                digest: actual.clone(),
                record,
                tag: tag.map(|t| {
                    (
                        t.to_string(),
                        TagRecord {
                            digest: actual.to_string(),
                            checked_ms: now,
                        },
                    )
                }),
                links,
            })
            .await??
            // Durable before the client has it: a manifest served before a crash can be
            // served after it with the upstream down, like the blobs it references.
            .await?;
        Ok(ManifestAnswer {
            media_type,
            digest: actual,
            bytes,
            outcome: CacheOutcome::Miss,
        })
    }

    async fn tag_list(
        &self,
        upstream: UpstreamId,
        repo: &str,
        cx: &TraceCx,
    ) -> Result<Vec<String>, EngineError> {
        let mut all = Vec::new();
        let mut last: Option<String> = None;
        if self.health.is_down(upstream) {
            let name = self.name(upstream);
            return match self
                .meta
                .ask(ListTags {
                    upstream: name.clone(),
                    repo: repo.into(),
                })
                .await??
            {
                Some(tags) => Ok(tags),
                None => Err(EngineError::UpstreamDown(name)),
            };
        }
        // Follow the upstream's pages (bounded), so the cache can paginate for its clients.
        for _ in 0..100 {
            match self
                .upstreams
                .tags(upstream, repo, Some(1000), last.clone(), cx)
                .await
            {
                Ok(page) => {
                    let more = page.more && !page.tags.is_empty();
                    last = page.tags.last().cloned();
                    all.extend(page.tags);
                    if !more {
                        all.sort();
                        all.dedup();
                        return Ok(all);
                    }
                }
                Err(e) if e.is_unavailable() => {
                    let name = self.name(upstream);
                    tracing::warn!(upstream = %name, repo, error = %e, "upstream unavailable; listing cached tags");
                    return match self
                        .meta
                        .ask(ListTags {
                            upstream: name,
                            repo: repo.into(),
                        })
                        .await??
                    {
                        Some(tags) => Ok(tags),
                        None => Err(EngineError::Upstream(e)),
                    };
                }
                Err(e) => {
                    return Err(EngineError::from_upstream(
                        e,
                        Object::Repository(repo.into()),
                    ));
                }
            }
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

fn answer(rec: ManifestRecord, digest: Digest, outcome: CacheOutcome) -> ManifestAnswer {
    ManifestAnswer {
        media_type: rec.media_type,
        digest,
        bytes: rec.bytes,
        outcome,
    }
}

/// What the HTTP layer holds to resolve manifests.
#[derive(Clone)]
pub struct ManifestsHandle {
    addr: Addr<ManifestResolver>,
    pub stats: Arc<ResolverStats>,
    mailbox: Mailbox,
}

impl ManifestsHandle {
    pub async fn resolve(
        &self,
        upstream: UpstreamId,
        repo: &str,
        reference: Reference,
        cx: &TraceCx,
    ) -> Result<ManifestAnswer, EngineError> {
        let _queued = self.mailbox.sent();
        self.addr
            .send(Resolve {
                upstream,
                repo: repo.into(),
                reference,
                cx: cx.clone(),
            })
            .await?
    }

    pub async fn tags(
        &self,
        upstream: UpstreamId,
        repo: &str,
        cx: &TraceCx,
    ) -> Result<Vec<String>, EngineError> {
        let _queued = self.mailbox.sent();
        self.addr
            .send(TagList {
                upstream,
                repo: repo.into(),
                cx: cx.clone(),
            })
            .await?
    }
}
