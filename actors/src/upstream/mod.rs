//! The upstream client actor owns every connection to upstream registries: one awc client per
//! upstream (awc is `!Send`, so the actor lives on its own arbiter thread and its clients never
//! leave it), the remembered auth challenge per upstream and the bearer tokens per
//! (upstream, scope). Other actors ask it for manifests, blob sizes and tag lists, or tell it
//! to start a blob download whose bytes it pushes into a bounded channel (never through a
//! mailbox).
//!
//! Behaviour: Docker-style token auth (anonymous or with the upstream's credentials) and Basic
//! auth; redirects followed by hand so that `Authorization` never goes to another host;
//! connect and response-header timeouts plus an idle timeout on bodies (no total timeout);
//! idempotent requests that failed to connect are retried twice.
//!
//! This module holds the actor, its messages and [`UpstreamHandle`]; `client` holds the
//! HTTP logic of one upstream (`Conn`).

mod client;
mod redirect;
mod tls;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::digest::Digest;
use crate::error::UpstreamError;
use crate::metrics::{ActorName, Mailbox, Metrics};
use crate::settings::{UpstreamId, UpstreamNames, UpstreamSettings};
use crate::trace::Context as TraceCx;
use client::Conn;

pub use client::MAX_MANIFEST_BYTES;
pub use tls::{client_config as client_tls, read_certs, read_key};

/// What a blob download reports, in order: `Headers` once, then `Chunk`s, then `End` — or
/// `Failed` at any point. The channel carrying these is bounded, so a slow reader (the
/// fill writer, or a client streamed to directly) slows the upstream read instead of
/// filling memory.
#[derive(Debug)]
pub enum DownloadEvent {
    Headers {
        total: Option<u64>,
    },
    /// Consecutive pieces of the body (what was buffered at once: sent together so the
    /// receiver wakes per batch, without copying the pieces into one buffer).
    Chunk(Vec<Bytes>),
    End,
    Failed(UpstreamError),
}

/// An upstream's pull quota, from its `ratelimit-limit` / `ratelimit-remaining` headers
/// (`100;w=21600`: 100 pulls per 21600-second window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Quota {
    pub limit: Option<u64>,
    pub remaining: u64,
    pub window_seconds: Option<u64>,
    /// Unix ms when these headers were seen.
    pub observed_ms: u64,
}

impl Quota {
    /// Below `min` and the window in which it was seen has not passed yet.
    pub fn is_low(&self, min: u64, now_ms: u64) -> bool {
        // Saturating: the window comes from the upstream's header, any u64
        // (`w=18446744073709551615` would overflow: a panic in debug, a wrap in release).
        let window_ms = self.window_seconds.unwrap_or(6 * 3600).saturating_mul(1000);
        self.remaining < min && now_ms < self.observed_ms.saturating_add(window_ms)
    }
}

/// Parses `20;w=21600` into (20, Some(21600)).
pub fn parse_ratelimit(v: &str) -> Option<(u64, Option<u64>)> {
    let mut parts = v.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let w = parts.find_map(|p| {
        p.trim()
            .strip_prefix("w=")
            .and_then(|w| w.trim().parse().ok())
    });
    Some((n, w))
}

pub struct Upstreams {
    conns: Vec<Rc<Conn>>,
}

impl Actor for Upstreams {
    type Context = Context<Self>;
}

impl Upstreams {
    /// Starts the actor on a new arbiter (thread). The returned handle is `Send + Clone`.
    /// `names` are the names of `settings`, and `tls` their TLS client configurations
    /// ([`client_tls`]), in the same order.
    pub fn start(
        settings: Vec<UpstreamSettings>,
        tls: Vec<Arc<rustls::ClientConfig>>,
        names: UpstreamNames,
        clock: Clock,
        metrics: Arc<Metrics>,
        blob_connections: usize,
    ) -> UpstreamHandle {
        let arbiter = Arbiter::new();
        let mailbox = metrics.mailbox(ActorName::Upstream);
        let addr = Upstreams::start_in_arbiter(&arbiter.handle(), move |_| {
            let conns = settings
                .into_iter()
                .zip(tls)
                .enumerate()
                .map(|(i, (s, tls))| {
                    Rc::new(Conn::new(
                        s,
                        tls,
                        clock.clone(),
                        metrics.clone(),
                        UpstreamId::new(i),
                        blob_connections,
                    ))
                })
                .collect();
            Upstreams { conns }
        });
        UpstreamHandle {
            addr,
            names,
            mailbox,
            _arbiter: Arc::new(ArbiterGuard(arbiter)),
        }
    }

    fn conn(&self, id: UpstreamId) -> Rc<Conn> {
        self.conns[id.index()].clone()
    }
}

/// Stops the upstream thread when the last handle goes.
struct ArbiterGuard(Arbiter);
impl Drop for ArbiterGuard {
    fn drop(&mut self) {
        self.0.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Messages.

/// GET or HEAD a manifest by tag or digest.
#[derive(Message)]
#[rtype(result = "Result<UpstreamManifest, UpstreamError>")]
pub struct FetchManifest {
    pub upstream: UpstreamId,
    pub repo: String,
    pub reference: String,
    pub head: bool,
    pub cx: TraceCx,
}

#[derive(Debug, Clone)]
pub struct UpstreamManifest {
    /// `Content-Type` without parameters.
    pub media_type: String,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest: Option<Digest>,
    /// The body (GET only).
    pub bytes: Option<Bytes>,
}

/// Size of a blob, without downloading it.
#[derive(Message)]
#[rtype(result = "Result<u64, UpstreamError>")]
pub struct HeadBlob {
    pub upstream: UpstreamId,
    pub repo: String,
    pub digest: Digest,
    pub cx: TraceCx,
}

/// Start downloading a blob; events go to `sink` until `End` or `Failed`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartDownload {
    pub upstream: UpstreamId,
    pub repo: String,
    pub digest: Digest,
    pub sink: mpsc::Sender<DownloadEvent>,
    pub cx: TraceCx,
}

/// One page of an upstream tag list.
#[derive(Message)]
#[rtype(result = "Result<TagsPage, UpstreamError>")]
pub struct FetchTags {
    pub upstream: UpstreamId,
    pub repo: String,
    pub n: Option<u32>,
    pub last: Option<String>,
    pub cx: TraceCx,
}

#[derive(Debug, Clone)]
pub struct TagsPage {
    pub tags: Vec<String>,
    /// The upstream announced another page (`Link: ...; rel="next"`).
    pub more: bool,
}

impl Handler<FetchManifest> for Upstreams {
    type Result = ResponseFuture<Result<UpstreamManifest, UpstreamError>>;
    fn handle(&mut self, m: FetchManifest, _: &mut Self::Context) -> Self::Result {
        let conn = self.conn(m.upstream);
        Box::pin(async move {
            conn.fetch_manifest(&m.repo, &m.reference, m.head, &m.cx)
                .await
        })
    }
}

impl Handler<HeadBlob> for Upstreams {
    type Result = ResponseFuture<Result<u64, UpstreamError>>;
    fn handle(&mut self, m: HeadBlob, _: &mut Self::Context) -> Self::Result {
        let conn = self.conn(m.upstream);
        Box::pin(async move { conn.head_blob(&m.repo, &m.digest, &m.cx).await })
    }
}

impl Handler<StartDownload> for Upstreams {
    type Result = ();
    fn handle(&mut self, m: StartDownload, _: &mut Self::Context) {
        let conn = self.conn(m.upstream);
        // Runs on this arbiter independently of whoever asked: a client that goes away does
        // not stop the download.
        actix_rt::spawn(async move { conn.download(&m.repo, &m.digest, m.sink, &m.cx).await });
    }
}

/// Health probe: `GET /v2/` answered 200 or 401 within `timeout`.
#[derive(Message)]
#[rtype(result = "Result<Duration, String>")]
pub struct Probe {
    pub upstream: UpstreamId,
    pub timeout: Duration,
}

impl Handler<Probe> for Upstreams {
    type Result = ResponseFuture<Result<Duration, String>>;
    fn handle(&mut self, m: Probe, _: &mut Self::Context) -> Self::Result {
        let conn = self.conn(m.upstream);
        Box::pin(async move { conn.probe(m.timeout).await })
    }
}

/// The last quota headers seen for an upstream.
#[derive(Message)]
#[rtype(result = "Option<Quota>")]
pub struct GetQuota {
    pub upstream: UpstreamId,
}

impl Handler<GetQuota> for Upstreams {
    type Result = Option<Quota>;
    fn handle(&mut self, m: GetQuota, _: &mut Self::Context) -> Self::Result {
        self.conn(m.upstream).quota()
    }
}

impl Handler<FetchTags> for Upstreams {
    type Result = ResponseFuture<Result<TagsPage, UpstreamError>>;
    fn handle(&mut self, m: FetchTags, _: &mut Self::Context) -> Self::Result {
        let conn = self.conn(m.upstream);
        Box::pin(async move {
            conn.fetch_tags(&m.repo, m.n, m.last.as_deref(), &m.cx)
                .await
        })
    }
}

// ---------------------------------------------------------------------------------------

/// What other actors hold to talk to the upstream client.
#[derive(Clone)]
pub struct UpstreamHandle {
    addr: Addr<Upstreams>,
    names: UpstreamNames,
    mailbox: Mailbox,
    _arbiter: Arc<ArbiterGuard>,
}

impl UpstreamHandle {
    /// Sends `m` and waits for the answer, counted in the actor's mailbox depth until it
    /// comes (or this future is dropped).
    async fn ask<M>(&self, m: M) -> Result<M::Result, MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Upstreams: Handler<M>,
    {
        let _queued = self.mailbox.sent();
        self.addr.send(m).await
    }

    /// The upstream actor did not answer (it stopped): an error naming the upstream.
    fn gone(&self, upstream: UpstreamId) -> impl FnOnce(MailboxError) -> UpstreamError + '_ {
        move |e| UpstreamError::Connect {
            upstream: self.names.name(upstream).to_string(),
            detail: format!("upstream client unavailable: {e}"),
        }
    }

    pub async fn manifest(
        &self,
        upstream: UpstreamId,
        repo: &str,
        reference: &str,
        head: bool,
        cx: &TraceCx,
    ) -> Result<UpstreamManifest, UpstreamError> {
        self.ask(FetchManifest {
            upstream,
            repo: repo.into(),
            reference: reference.into(),
            head,
            cx: cx.clone(),
        })
        .await
        .map_err(self.gone(upstream))?
    }

    pub async fn head_blob(
        &self,
        upstream: UpstreamId,
        repo: &str,
        digest: &Digest,
        cx: &TraceCx,
    ) -> Result<u64, UpstreamError> {
        self.ask(HeadBlob {
            upstream,
            repo: repo.into(),
            digest: digest.clone(),
            cx: cx.clone(),
        })
        .await
        .map_err(self.gone(upstream))?
    }

    pub fn start_download(
        &self,
        upstream: UpstreamId,
        repo: &str,
        digest: &Digest,
        sink: mpsc::Sender<DownloadEvent>,
        cx: &TraceCx,
    ) {
        self.addr.do_send(StartDownload {
            upstream,
            repo: repo.into(),
            digest: digest.clone(),
            sink,
            cx: cx.clone(),
        });
    }

    pub async fn probe(&self, upstream: UpstreamId, timeout: Duration) -> Result<Duration, String> {
        self.ask(Probe { upstream, timeout })
            .await
            .map_err(|e| format!("upstream client unavailable: {e}"))?
    }

    pub async fn quota(&self, upstream: UpstreamId) -> Option<Quota> {
        self.ask(GetQuota { upstream }).await.ok().flatten()
    }

    pub async fn tags(
        &self,
        upstream: UpstreamId,
        repo: &str,
        n: Option<u32>,
        last: Option<String>,
        cx: &TraceCx,
    ) -> Result<TagsPage, UpstreamError> {
        self.ask(FetchTags {
            upstream,
            repo: repo.into(),
            n,
            last,
            cx: cx.clone(),
        })
        .await
        .map_err(self.gone(upstream))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_headers() {
        assert_eq!(parse_ratelimit("100;w=21600"), Some((100, Some(21600))));
        assert_eq!(parse_ratelimit("20"), Some((20, None)));
        assert_eq!(parse_ratelimit("x;w=1"), None);
        let q = Quota {
            limit: Some(100),
            remaining: 3,
            window_seconds: Some(60),
            observed_ms: 1000,
        };
        assert!(q.is_low(5, 2000));
        assert!(!q.is_low(5, 61_001));
        assert!(!q.is_low(3, 2000));
        // A hostile window saturates instead of overflowing.
        let (n, w) = parse_ratelimit("0;w=18446744073709551615").unwrap();
        let q = Quota {
            limit: None,
            remaining: n,
            window_seconds: w,
            observed_ms: u64::MAX - 5,
        };
        assert!(q.is_low(1, u64::MAX - 1));
    }
}
