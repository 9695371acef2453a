//! The engine's Prometheus metrics, one [`Metrics`] per engine (tests run several engines in
//! one process, so nothing here is global). Every series is created at start for every
//! configured upstream, so a dashboard's `rate()` has data before the first pull, and the
//! hot paths hold resolved handles: counting is an atomic add, never a label lookup.
//!
//! Labels come from closed sets: the configured upstream names, [`Kind`], [`CacheOutcome`],
//! HTTP methods and status codes. Never a repository, tag, digest or client.
//!
//! Values that already live elsewhere (bytes stored, the disk budget, upstream health,
//! actor mailbox depths) are read when Prometheus scrapes ([`Metrics::refresh`]), not kept
//! twice.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::settings::{UpstreamId, UpstreamNames};

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Blob, Kind::Manifest];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
}

/// How the cache answered one request for a blob or a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the cache without asking the upstream.
    Hit,
    /// Fetched from the upstream for this request.
    Miss,
    /// Joined a fetch another request had started: one upstream transfer for both.
    Coalesced,
    /// A cached tag past its TTL, served because the upstream could not confirm it.
    Stale,
    /// A cached tag past its TTL, confirmed unchanged by the upstream (a HEAD), then served
    /// from the cache.
    Revalidated,
}

impl CacheOutcome {
    pub const ALL: [CacheOutcome; 5] = [
        CacheOutcome::Hit,
        CacheOutcome::Miss,
        CacheOutcome::Coalesced,
        CacheOutcome::Stale,
        CacheOutcome::Revalidated,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Revalidated => "revalidated",
        }
    }
    /// Whether the bytes served were transferred from the upstream for this request.
    pub fn from_upstream(self) -> bool {
        self == CacheOutcome::Miss
    }
}

/// Why blobs were evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// Usage passed `storage.high_watermark`.
    HighWatermark,
    /// A write failed with ENOSPC.
    DiskFull,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::HighWatermark => "high_watermark",
            EvictReason::DiskFull => "disk_full",
        }
    }
}

/// The actors whose mailboxes are measured.
#[derive(Debug, Clone, Copy)]
pub enum ActorName {
    Metadata,
    Resolver,
    Fetcher,
    Upstream,
}

impl ActorName {
    const ALL: [ActorName; 4] = [
        ActorName::Metadata,
        ActorName::Resolver,
        ActorName::Fetcher,
        ActorName::Upstream,
    ];
    fn as_str(self) -> &'static str {
        match self {
            ActorName::Metadata => "metadata",
            ActorName::Resolver => "manifest_resolver",
            ActorName::Fetcher => "blob_fetcher",
            ActorName::Upstream => "upstream",
        }
    }
}

/// Requests sent to an actor and not answered yet (queued, or being handled): the handle
/// holds the [`Held`] that [`Mailbox::sent`] returns until the answer comes or the asker
/// goes away, so the gauge cannot drift when actix drops a message whose asker left.
/// Fire-and-forget messages (`do_send`) are not counted.
#[derive(Clone)]
pub struct Mailbox(IntGauge);

impl Mailbox {
    #[must_use = "the request counts while this is held"]
    pub fn sent(&self) -> Held {
        Held::new(&self.0)
    }
    /// A mailbox nobody reads (tests that start one actor alone).
    pub fn detached() -> Mailbox {
        Mailbox(IntGauge::new("detached", "detached").expect("valid metric"))
    }
}

/// One unit of a gauge, held while this lives.
pub struct Held(IntGauge);

impl Held {
    pub fn new(g: &IntGauge) -> Held {
        g.inc();
        Held(g.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-upstream handles, resolved once.
pub struct UpstreamMetrics {
    outcomes: [[IntCounter; 5]; 2],
    pub bytes: IntCounter,
    pub digest_mismatch: IntCounter,
    pub token_fetches: IntCounter,
    pub up: IntGauge,
    name: String,
    requests: IntCounterVec,
    duration: [Histogram; 3],
    quota: IntGaugeVec,
}

impl UpstreamMetrics {
    /// One request to the upstream answered `code` (`None`: no answer) after `elapsed`
    /// (time to the response headers).
    pub fn request(&self, method: &str, code: Option<u16>, elapsed: Duration) {
        let m = method_label(method);
        let mut buf = [0u8; 3];
        let code = match code {
            Some(c) => code_str(c, &mut buf),
            None => "error",
        };
        self.requests
            .with_label_values(&[&self.name, m, code])
            .inc();
        self.duration[method_index(m)].observe(elapsed.as_secs_f64());
    }

    /// The upstream's remaining pull quota, as last reported.
    pub fn quota(&self, remaining: u64) {
        self.quota
            .with_label_values(&[&self.name])
            .set(remaining.min(i64::MAX as u64) as i64);
    }

    pub fn outcome(&self, kind: Kind, outcome: CacheOutcome) -> &IntCounter {
        &self.outcomes[kind as usize][outcome as usize]
    }
}

fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        _ => "other",
    }
}

fn method_index(m: &str) -> usize {
    match m {
        "GET" => 0,
        "HEAD" => 1,
        _ => 2,
    }
}

/// A status code's three digits (anything outside 100-599 is "other").
pub fn code_str(code: u16, buf: &mut [u8; 3]) -> &str {
    if !(100..600).contains(&code) {
        return "other";
    }
    buf[0] = b'0' + (code / 100) as u8;
    buf[1] = b'0' + (code / 10 % 10) as u8;
    buf[2] = b'0' + (code % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("other")
}

/// Latency buckets for requests that may wait for an upstream (5 ms to 5 minutes).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// The engine's metrics and the registry that holds them (the HTTP layer registers its own
/// request metrics in the same registry).
pub struct Metrics {
    pub registry: Registry,
    upstreams: Vec<UpstreamMetrics>,
    proxy_requests: [IntCounter; 2],
    proxy_hits: [IntCounter; 2],
    proxy_misses: [IntCounter; 2],
    pulled_bytes: [IntCounter; 2],
    cache_hits: IntCounter,
    cache_requests: IntCounter,
    served_cache: IntCounter,
    served_upstream: IntCounter,
    bytes_saved: IntCounter,
    pub inflight_fills: IntGauge,
    pub fill_waiters: IntGauge,
    pub storage_bytes: IntGauge,
    pub storage_limit: IntGauge,
    evictions: IntCounter,
    evicted_bytes: [IntCounter; 2],
    pub zero_copy_bytes: IntCounter,
    mailboxes: Vec<IntGauge>,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

/// A histogram family with `labels`, registered in `r`.
pub fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Metrics {
    pub fn new(names: &UpstreamNames) -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let by_type = |name: &str, help: &str| {
            let v = counter_vec(&r, name, help, &["type"]);
            Kind::ALL.map(|k| v.with_label_values(&[k.as_str()]))
        };
        let proxy_requests = by_type(
            "registry_proxy_requests_total",
            "Blob and manifest requests answered (Distribution's proxy metric).",
        );
        let proxy_hits = by_type(
            "registry_proxy_hits_total",
            "Requests answered without an upstream transfer of their own: cache hits, stale and revalidated tags, joins of another request's download.",
        );
        let proxy_misses = by_type(
            "registry_proxy_misses_total",
            "Requests that fetched from the upstream.",
        );
        let pulled_bytes = by_type(
            "registry_proxy_pulled_bytes_total",
            "Bytes downloaded from upstreams, by type.",
        );
        let cache_hits = counter(
            &r,
            "registry_storage_cache_hits_total",
            "Blob and manifest requests answered from the cache (hit ratio = hits / requests).",
        );
        let cache_requests = counter(
            &r,
            "registry_storage_cache_requests_total",
            "Blob and manifest requests looked up in the cache.",
        );
        let outcomes = counter_vec(
            &r,
            "pullcache_cache_outcomes_total",
            "Requests by how the cache answered them: hit, miss, coalesced, stale, revalidated.",
            &["upstream", "type", "outcome"],
        );
        let requests = counter_vec(
            &r,
            "pullcache_upstream_requests_total",
            "Requests sent to upstreams, by method and status code (\"error\": no answer).",
            &["upstream", "method", "code"],
        );
        let duration = histogram_vec(
            &r,
            "pullcache_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response headers.",
            &["upstream", "method"],
        );
        let up_bytes = counter_vec(
            &r,
            "pullcache_upstream_bytes_total",
            "Blob and manifest bytes received from each upstream.",
            &["upstream"],
        );
        let mismatch = counter_vec(
            &r,
            "pullcache_digest_mismatch_total",
            "Downloads refused because their bytes did not match their digest.",
            &["upstream"],
        );
        let tokens = counter_vec(
            &r,
            "pullcache_token_fetches_total",
            "Bearer tokens fetched from each upstream's token service.",
            &["upstream"],
        );
        let up = gauge_vec(
            &r,
            "pullcache_upstream_up",
            "1 while the upstream's health probes pass, 0 while it is marked down.",
            &["upstream"],
        );
        let quota = gauge_vec(
            &r,
            "pullcache_upstream_quota_remaining",
            "The pull quota the upstream last reported as remaining (Docker Hub's ratelimit-remaining); absent until one reports it.",
            &["upstream"],
        );
        let upstreams = names
            .ids()
            .map(|id| {
                let name = names.name(id);
                let outcomes = Kind::ALL.map(|k| {
                    CacheOutcome::ALL
                        .map(|o| outcomes.with_label_values(&[name, k.as_str(), o.as_str()]))
                });
                let duration =
                    ["GET", "HEAD", "other"].map(|m| duration.with_label_values(&[name, m]));
                // The usual answers exist from the start.
                for m in ["GET", "HEAD"] {
                    requests.with_label_values(&[name, m, "200"]);
                }
                let u = up.with_label_values(&[name]);
                u.set(1);
                UpstreamMetrics {
                    outcomes,
                    bytes: up_bytes.with_label_values(&[name]),
                    digest_mismatch: mismatch.with_label_values(&[name]),
                    token_fetches: tokens.with_label_values(&[name]),
                    up: u,
                    name: name.to_string(),
                    requests: requests.clone(),
                    duration,
                    quota: quota.clone(),
                }
            })
            .collect();
        let served = counter_vec(
            &r,
            "pullcache_served_bytes_total",
            "Blob and manifest bytes sent to clients: from the cache, or from the upstream (the request that fetched them).",
            &["source"],
        );
        let evicted = counter_vec(
            &r,
            "pullcache_evicted_bytes_total",
            "Bytes of blobs evicted, by reason.",
            &["reason"],
        );
        let mailbox = gauge_vec(
            &r,
            "pullcache_actor_mailbox_depth",
            "Requests sent to an actor and not answered yet (queued or being handled).",
            &["actor"],
        );
        Arc::new(Metrics {
            upstreams,
            proxy_requests,
            proxy_hits,
            proxy_misses,
            pulled_bytes,
            cache_hits,
            cache_requests,
            served_cache: served.with_label_values(&["cache"]),
            served_upstream: served.with_label_values(&["upstream"]),
            bytes_saved: counter(
                &r,
                "pullcache_bytes_saved_total",
                "Bytes sent to clients that were not downloaded for them: the upstream traffic the cache saved.",
            ),
            inflight_fills: gauge(
                &r,
                "pullcache_inflight_fills",
                "Blob downloads in progress.",
            ),
            fill_waiters: gauge(
                &r,
                "pullcache_fill_waiters",
                "Client responses reading a blob download in progress (the one that started it and those that joined it).",
            ),
            storage_bytes: gauge(
                &r,
                "pullcache_storage_bytes",
                "Bytes of blobs stored.",
            ),
            storage_limit: gauge(
                &r,
                "pullcache_storage_limit_bytes",
                "The disk budget (storage.max_size).",
            ),
            evictions: counter(
                &r,
                "pullcache_evictions_total",
                "Blobs evicted to keep the disk budget.",
            ),
            evicted_bytes: [EvictReason::HighWatermark, EvictReason::DiskFull]
                .map(|e| evicted.with_label_values(&[e.as_str()])),
            zero_copy_bytes: counter(
                &r,
                "pullcache_zero_copy_bytes_total",
                "Blob bytes sent to clients with sendfile(2), page cache to socket.",
            ),
            mailboxes: ActorName::ALL
                .iter()
                .map(|a| mailbox.with_label_values(&[a.as_str()]))
                .collect(),
            registry: r,
        })
    }

    pub fn upstream(&self, id: UpstreamId) -> &UpstreamMetrics {
        &self.upstreams[id.index()]
    }

    /// A blob or manifest request answered with `outcome` (counted once its answer starts).
    pub fn answered(&self, upstream: UpstreamId, kind: Kind, outcome: CacheOutcome) {
        let k = kind as usize;
        self.upstream(upstream).outcome(kind, outcome).inc();
        self.proxy_requests[k].inc();
        self.cache_requests.inc();
        if outcome.from_upstream() {
            self.proxy_misses[k].inc();
        } else {
            self.proxy_hits[k].inc();
            self.cache_hits.inc();
        }
    }

    /// `bytes` of a blob or manifest sent to a client whose request was answered with
    /// `outcome`.
    pub fn served(&self, outcome: CacheOutcome, bytes: u64) {
        if outcome.from_upstream() {
            self.served_upstream.inc_by(bytes);
        } else {
            self.served_cache.inc_by(bytes);
            self.bytes_saved.inc_by(bytes);
        }
    }

    /// `bytes` received from an upstream.
    pub fn pulled(&self, upstream: UpstreamId, kind: Kind, bytes: u64) {
        self.pulled_bytes[kind as usize].inc_by(bytes);
        self.upstream(upstream).bytes.inc_by(bytes);
    }

    pub fn evicted(&self, reason: EvictReason, blobs: u64, bytes: u64) {
        self.evictions.inc_by(blobs);
        self.evicted_bytes[reason as usize].inc_by(bytes);
    }

    pub fn mailbox(&self, actor: ActorName) -> Mailbox {
        Mailbox(self.mailboxes[actor as usize].clone())
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::UpstreamSettings;

    #[test]
    fn codes_are_three_digits_or_other() {
        let mut b = [0u8; 3];
        assert_eq!(code_str(200, &mut b), "200");
        let mut b = [0u8; 3];
        assert_eq!(code_str(404, &mut b), "404");
        let mut b = [0u8; 3];
        assert_eq!(code_str(99, &mut b), "other");
        let mut b = [0u8; 3];
        assert_eq!(code_str(600, &mut b), "other");
    }

    #[test]
    fn every_upstream_series_exists_from_the_start() {
        let names = UpstreamNames::new(&[
            UpstreamSettings::new("docker.io", "https://registry-1.docker.io".parse().unwrap()),
            UpstreamSettings::new("ghcr.io", "https://ghcr.io".parse().unwrap()),
        ]);
        let m = Metrics::new(&names);
        let text = m.render();
        for line in [
            r#"pullcache_cache_outcomes_total{outcome="coalesced",type="blob",upstream="ghcr.io"} 0"#,
            r#"pullcache_upstream_up{upstream="docker.io"} 1"#,
            r#"pullcache_digest_mismatch_total{upstream="ghcr.io"} 0"#,
            r#"registry_proxy_requests_total{type="manifest"} 0"#,
            r#"pullcache_evicted_bytes_total{reason="disk_full"} 0"#,
            "registry_storage_cache_hits_total 0",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
        // Quota appears only once reported.
        assert!(!text.contains("pullcache_upstream_quota_remaining{"));
        m.upstream(UpstreamId::new(0)).quota(97);
        m.answered(UpstreamId::new(1), Kind::Blob, CacheOutcome::Coalesced);
        m.served(CacheOutcome::Coalesced, 10);
        let text = m.render();
        assert!(text.contains(r#"pullcache_upstream_quota_remaining{upstream="docker.io"} 97"#));
        assert!(text.contains(
            r#"pullcache_cache_outcomes_total{outcome="coalesced",type="blob",upstream="ghcr.io"} 1"#
        ));
        assert!(text.contains("registry_storage_cache_hits_total 1"));
        assert!(text.contains("pullcache_bytes_saved_total 10"));
    }
}
