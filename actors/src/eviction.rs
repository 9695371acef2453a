//! The eviction sweeper actor owns the disk budget. The metadata keeps the bytes stored as
//! an exact counter; when they pass `high_watermark * max_size`, the sweeper deletes
//! least-recently-used blobs (an ordered scan of the access index) until usage is under
//! `low_watermark * max_size`. It runs on a timer, right after large downloads, and when a
//! write hits ENOSPC. Pinned images (`storage.pin`) are never evicted, and repositories
//! nobody pulled for `manifest_max_idle` lose their manifests and tags.
//!
//! A sweep does file and sled work, so it runs on its own thread; the actor only decides
//! when, keeps one sweep at a time, and reports its state (`Idle`, `Busy`, or `Throttled`
//! after consecutive failures, with back-off).
//!
//! Safety of concurrent reads: a blob's record is removed before its file. A client that
//! already opened the file keeps reading it whole (the inode lives while it is open); a
//! client that looks it up afterwards fetches it again. A crash between the two steps
//! leaves a file without a record, which start-up recovery re-hashes and keeps.

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;
use regex::Regex;
use serde::Serialize;

use crate::clock::Clock;
use crate::digest::Digest;
use crate::manifest_resolver::{child_manifests, referenced_blobs};
use crate::metadata::MetadataStore;
use crate::store::BlobStore;

/// An `upstream/repository:tag` pattern where `*` matches any run of characters.
#[derive(Debug, Clone)]
pub struct PinPattern {
    re: Regex,
}

impl PinPattern {
    pub fn parse(p: &str) -> Result<PinPattern, String> {
        let (image, tag) = p
            .rsplit_once(':')
            .filter(|(i, t)| i.contains('/') && !t.contains('/') && !t.is_empty())
            .ok_or_else(|| {
                format!(
                    "{p:?} must look like \"docker.io/library/alpine:*\" (upstream/repository:tag)"
                )
            })?;
        let glob = |s: &str| regex::escape(s).replace("\\*", ".*");
        let re =
            Regex::new(&format!("^{}:{}$", glob(image), glob(tag))).map_err(|e| e.to_string())?;
        Ok(PinPattern { re })
    }

    pub fn matches(&self, upstream: &str, repo: &str, tag: &str) -> bool {
        self.re.is_match(&format!("{upstream}/{repo}:{tag}"))
    }
}

/// What the sweeper is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    Idle,
    Busy,
    /// Recent sweeps failed; waiting before the next.
    Throttled,
}

/// A sweep's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    pub skipped_pinned: u64,
    pub repositories_dropped: u64,
    pub usage_after: u64,
}

/// The budget and what the sweeper has done so far.
#[derive(Debug, Clone, Serialize)]
pub struct EvictionStatus {
    pub state: SweepState,
    pub usage_bytes: u64,
    pub max_size_bytes: u64,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub evicted_blobs_total: u64,
    pub evicted_bytes_total: u64,
    pub sweeps: u64,
    pub last_error: Option<String>,
}

#[derive(Clone)]
pub struct Budget {
    pub max_size: u64,
    pub high: f64,
    pub low: f64,
    pub pins: Vec<PinPattern>,
    pub manifest_max_idle: Duration,
    pub interval: Duration,
}

pub struct Eviction {
    meta: MetadataStore,
    store: BlobStore,
    budget: Budget,
    clock: Clock,
    state: SweepState,
    /// A sweep was asked for while one ran: run again when it ends.
    again: bool,
    failures: u32,
    totals: (u64, u64, u64),
    last_error: Option<String>,
}

impl Eviction {
    pub fn start(
        meta: MetadataStore,
        store: BlobStore,
        budget: Budget,
        clock: Clock,
    ) -> Addr<Eviction> {
        Eviction {
            meta,
            store,
            budget,
            clock,
            state: SweepState::Idle,
            again: false,
            failures: 0,
            totals: (0, 0, 0),
            last_error: None,
        }
        .start()
    }

    fn over_high(&self) -> bool {
        self.meta.usage() as f64 > self.budget.high * self.budget.max_size as f64
    }

    fn run_sweep(&mut self, ctx: &mut Context<Self>, full: bool) {
        if self.state == SweepState::Busy {
            self.again = true;
            return;
        }
        if !full && !self.over_high() {
            return;
        }
        self.state = SweepState::Busy;
        let (meta, store, budget, now) = (
            self.meta.clone(),
            self.store.clone(),
            self.budget.clone(),
            self.clock.now_ms(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                let _ = tx.send(sweep(&meta, &store, &budget, now, full));
            });
        if let Err(e) = spawned {
            self.state = SweepState::Idle;
            tracing::error!(error = %e, "cannot start the eviction sweeper");
            return;
        }
        ctx.spawn(fut::wrap_future::<_, Self>(rx).map(|res, act, ctx| {
            act.state = SweepState::Idle;
            match res {
                Ok(Ok(r)) => {
                    act.failures = 0;
                    act.last_error = None;
                    act.totals.0 += r.evicted_blobs;
                    act.totals.1 += r.evicted_bytes;
                    act.totals.2 += 1;
                    if r.evicted_blobs > 0 || r.repositories_dropped > 0 {
                        tracing::info!(
                            evicted_blobs = r.evicted_blobs,
                            evicted_bytes = r.evicted_bytes,
                            repositories_dropped = r.repositories_dropped,
                            usage = r.usage_after,
                            max_size = act.budget.max_size,
                            "eviction sweep"
                        );
                    }
                }
                Ok(Err(e)) => return act.fail(ctx, e.to_string()),
                Err(_) => return act.fail(ctx, "the sweeper thread died".into()),
            }
            if std::mem::take(&mut act.again) || act.over_high() {
                act.run_sweep(ctx, false);
            }
        }));
    }

    fn fail(&mut self, ctx: &mut Context<Self>, msg: String) {
        self.failures += 1;
        tracing::error!(error = %msg, failures = self.failures, "eviction sweep failed");
        self.last_error = Some(msg);
        self.state = SweepState::Throttled;
        let backoff = Duration::from_secs(1 << self.failures.min(6));
        ctx.run_later(backoff, |act, _| {
            if act.state == SweepState::Throttled {
                act.state = SweepState::Idle;
            }
        });
    }
}

impl Actor for Eviction {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // A full sweep (idle repositories too) at start and on every interval; usage
        // checks also come with every stored blob.
        ctx.run_interval(self.budget.interval, |act, ctx| {
            if act.state != SweepState::Throttled {
                act.run_sweep(ctx, true)
            }
        });
        self.run_sweep(ctx, true);
    }
}

/// Check usage now (sent after a blob was stored, and on ENOSPC with `urgent`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep {
    pub urgent: bool,
}

impl Handler<Sweep> for Eviction {
    type Result = ();
    fn handle(&mut self, m: Sweep, ctx: &mut Self::Context) {
        if m.urgent && self.state == SweepState::Throttled {
            self.state = SweepState::Idle;
        }
        self.run_sweep(ctx, false);
    }
}

#[derive(Message)]
#[rtype(result = "EvictionStatus")]
pub struct Status;

impl Handler<Status> for Eviction {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Self::Context) -> Self::Result {
        MessageResult(EvictionStatus {
            state: self.state,
            usage_bytes: self.meta.usage(),
            max_size_bytes: self.budget.max_size,
            high_watermark: self.budget.high,
            low_watermark: self.budget.low,
            evicted_blobs_total: self.totals.0,
            evicted_bytes_total: self.totals.1,
            sweeps: self.totals.2,
            last_error: self.last_error.clone(),
        })
    }
}

/// Blobs and repositories (upstream, repository) that pinned tags keep.
type Pinned = (HashSet<Digest>, HashSet<(String, String)>);

fn pinned(meta: &MetadataStore, pins: &[PinPattern]) -> Result<Pinned, crate::error::MetaError> {
    let mut blobs = HashSet::new();
    let mut repos = HashSet::new();
    if pins.is_empty() {
        return Ok((blobs, repos));
    }
    for (u, r, t, digest) in meta.all_tags()? {
        if !pins.iter().any(|p| p.matches(&u, &r, &t)) {
            continue;
        }
        repos.insert((u.clone(), r.clone()));
        let mut todo: Vec<Digest> = Digest::parse(&digest).into_iter().collect();
        let mut seen = HashSet::new();
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) || seen.len() > 10_000 {
                continue;
            }
            let Some(m) = meta.manifest(&u, &r, &d)? else {
                continue;
            };
            todo.extend(child_manifests(&m.media_type, &m.bytes));
            blobs.extend(referenced_blobs(&m.media_type, &m.bytes));
        }
    }
    Ok((blobs, repos))
}

/// One sweep (blocking). `full`: also drop idle repositories.
pub fn sweep(
    meta: &MetadataStore,
    store: &BlobStore,
    b: &Budget,
    now_ms: u64,
    full: bool,
) -> Result<SweepReport, crate::error::MetaError> {
    let mut report = SweepReport::default();
    let (pinned_blobs, pinned_repos) = pinned(meta, &b.pins)?;
    if full {
        let before = now_ms.saturating_sub(b.manifest_max_idle.as_millis() as u64);
        report.repositories_dropped = meta.drop_idle_repositories(before, |u, r| {
            pinned_repos.contains(&(u.to_string(), r.to_string()))
        })? as u64;
    }
    let high = (b.high * b.max_size as f64) as u64;
    let low = (b.low * b.max_size as f64) as u64;
    if meta.usage() > high {
        let victims: Vec<Digest> = meta.lru().collect();
        for d in victims {
            if meta.usage() <= low {
                break;
            }
            if pinned_blobs.contains(&d) {
                report.skipped_pinned += 1;
                continue;
            }
            // Record first, then the file (see the module comment).
            if let Some(size) = meta.remove_blob(&d)? {
                if let Err(e) = store.remove_blob(&d) {
                    tracing::warn!(digest = %d, error = %e, "could not delete an evicted blob's file");
                }
                report.evicted_blobs += 1;
                report.evicted_bytes += size;
            }
        }
        if meta.usage() > low {
            tracing::warn!(
                usage = meta.usage(),
                low,
                pinned = report.skipped_pinned,
                "cannot get under the low watermark: the rest is pinned"
            );
        }
    }
    report.usage_after = meta.usage();
    meta.flush()?;
    Ok(report)
}

/// What other actors hold.
#[derive(Clone)]
pub struct EvictionHandle {
    pub(crate) addr: Addr<Eviction>,
}

impl EvictionHandle {
    pub fn nudge(&self, urgent: bool) {
        self.addr.do_send(Sweep { urgent });
    }

    pub async fn status(&self) -> Option<EvictionStatus> {
        self.addr.send(Status).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_patterns() {
        let p = PinPattern::parse("docker.io/library/alpine:*").unwrap();
        assert!(p.matches("docker.io", "library/alpine", "3.20"));
        assert!(!p.matches("docker.io", "library/alpine2", "3.20"));
        assert!(!p.matches("ghcr.io", "library/alpine", "3.20"));
        let p = PinPattern::parse("*/org/*:v1.*").unwrap();
        assert!(p.matches("ghcr.io", "org/app", "v1.2"));
        assert!(!p.matches("ghcr.io", "org/app", "v2.0"));
        assert!(PinPattern::parse("alpine").is_err());
        assert!(PinPattern::parse("docker.io/alpine:").is_err());
    }

    fn d(b: &[u8]) -> Digest {
        Digest::of_bytes(crate::digest::Algorithm::Sha256, b)
    }

    #[test]
    fn sweep_evicts_lru_until_low_watermark_and_keeps_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let meta = MetadataStore::open(dir.path()).unwrap();
        let blobs: Vec<(Digest, Vec<u8>)> = (0..10u8)
            .map(|i| {
                let b = vec![i; 100];
                (d(&b), b)
            })
            .collect();
        for (i, (dg, b)) in blobs.iter().enumerate() {
            let p = store.blob_path(dg);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b).unwrap();
            meta.record_blob(dg, 100, 1000 * (i as u64 + 1)).unwrap();
        }
        // Pin blob 0 (the oldest) through a pinned tag's manifest.
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":100}},"layers":[]}}"#,
            blobs[0].0
        );
        let md = d(m.as_bytes());
        let rec = crate::metadata::ManifestRecord {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes::Bytes::from(m),
            fetched_ms: 1,
        };
        let tag = crate::metadata::TagRecord {
            digest: md.to_string(),
            checked_ms: 1,
        };
        meta.put_manifest("docker.io", "library/keep", &md, &rec, Some(("1", &tag)))
            .unwrap();
        assert_eq!(meta.usage(), 1000);
        let budget = Budget {
            max_size: 1000,
            high: 0.9,
            low: 0.5,
            pins: vec![PinPattern::parse("docker.io/library/keep:*").unwrap()],
            manifest_max_idle: Duration::from_secs(3600),
            interval: Duration::from_secs(30),
        };
        let r = sweep(&meta, &store, &budget, 20_000, false).unwrap();
        // From 1000 to <= 500: five blobs go, the oldest unpinned first; blob 0 stays.
        assert_eq!(r.evicted_blobs, 5);
        assert_eq!(meta.usage(), 500);
        assert_eq!(r.skipped_pinned, 1);
        assert!(store.blob_path(&blobs[0].0).exists());
        for (dg, _) in &blobs[1..6] {
            assert!(!store.blob_path(dg).exists());
            assert!(meta.blob(dg).unwrap().is_none());
        }
        for (dg, _) in &blobs[6..] {
            assert!(store.blob_path(dg).exists());
        }
        // Under the high watermark: nothing to do.
        assert_eq!(
            sweep(&meta, &store, &budget, 20_000, false)
                .unwrap()
                .evicted_blobs,
            0
        );
        // Idle repositories lose their manifests, unless pinned.
        meta.put_manifest("docker.io", "library/old", &md, &rec, Some(("1", &tag)))
            .unwrap();
        let later = 1 + 3600 * 1000 + 1;
        let r = sweep(&meta, &store, &budget, later, true).unwrap();
        assert_eq!(r.repositories_dropped, 1);
        assert!(meta.tag("docker.io", "library/old", "1").unwrap().is_none());
        assert!(meta
            .tag("docker.io", "library/keep", "1")
            .unwrap()
            .is_some());
    }
}
