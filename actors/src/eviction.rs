//! The eviction sweeper actor owns the disk budget. The metadata keeps the bytes stored as
//! an exact counter; when they pass `high_watermark * max_size`, the sweeper deletes
//! least-recently-used blobs (an ordered scan of the access index) until usage is under
//! `low_watermark * max_size`. It runs on a timer, right after stored downloads, and when
//! a write hits ENOSPC. Pinned images (`storage.pin`) are never evicted, and repositories
//! nobody pulled for `manifest_max_idle` lose their manifests and tags.
//!
//! A sweep is a task of this actor: it asks the metadata actor for what the pins keep,
//! then removes records a step at a time ([`EvictLru`]: at most [`STEP`] per message, so
//! the metadata threads keep answering requests in between), and deletes the files of
//! each step on the blocking pool. The actor decides when, keeps one sweep at a time, and
//! reports its state: `Idle`, `Busy`, or `Throttled` after consecutive failures, with
//! back-off.
//!
//! Safety of concurrent reads: a blob's record is removed before its file. A client that
//! already opened the file keeps reading it whole (the inode lives while it is open); a
//! client that looks it up afterwards fetches it again. A crash between the two steps
//! leaves a file without a record, which start-up recovery re-hashes and keeps.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use crate::clock::Clock;
use crate::error::MetaError;
use crate::metadata::{DropIdleRepositories, EvictLru, MetaHandle, PinnedContent, Unrecorded};
use crate::metrics::{EvictReason, Metrics};
use crate::settings::PinPattern;
use crate::store::BlobStore;
use crate::trace::{kv, Step};

/// Records removed per step of a sweep.
const STEP: usize = 256;

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
    pub pins: Arc<[PinPattern]>,
    pub manifest_max_idle: Duration,
    pub interval: Duration,
}

pub struct Eviction {
    meta: MetaHandle,
    store: BlobStore,
    budget: Budget,
    clock: Clock,
    state: SweepState,
    /// A sweep was asked for while one ran: run again when it ends.
    again: bool,
    failures: u32,
    totals: (u64, u64, u64),
    last_error: Option<String>,
    /// A write hit ENOSPC since the last sweep started (its evictions count as `disk_full`).
    urgent: bool,
    metrics: Arc<Metrics>,
}

impl Eviction {
    pub fn start(
        meta: MetaHandle,
        store: BlobStore,
        budget: Budget,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> EvictionHandle {
        let addr = Eviction {
            meta,
            store,
            budget,
            clock,
            state: SweepState::Idle,
            again: false,
            failures: 0,
            totals: (0, 0, 0),
            last_error: None,
            urgent: false,
            metrics,
        }
        .start();
        EvictionHandle { addr }
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
        let reason = if std::mem::take(&mut self.urgent) {
            EvictReason::DiskFull
        } else {
            EvictReason::HighWatermark
        };
        let (meta, store, budget, now) = (
            self.meta.clone(),
            self.store.clone(),
            self.budget.clone(),
            self.clock.now_ms(),
        );
        // A trace of its own: a sweep belongs to no request.
        let step = Step::root("eviction.sweep", || {
            vec![
                kv("pullcache.evict.reason", reason.as_str()),
                kv("pullcache.evict.idle_repositories", full),
                kv("pullcache.storage.bytes", meta.usage() as i64),
            ]
        });
        let task = async move { sweep(&meta, &store, &budget, now, full).await };
        ctx.spawn(task.into_actor(self).map(move |res, act, ctx| {
            act.state = SweepState::Idle;
            match &res {
                Ok(r) => step.set(|| {
                    vec![
                        kv("pullcache.evicted.blobs", r.evicted_blobs as i64),
                        kv("pullcache.evicted.bytes", r.evicted_bytes as i64),
                        kv(
                            "pullcache.repositories_dropped",
                            r.repositories_dropped as i64,
                        ),
                        kv("pullcache.storage.bytes", r.usage_after as i64),
                    ]
                }),
                Err(e) => step.fail(e),
            }
            drop(step);
            match res {
                Ok(r) => {
                    act.failures = 0;
                    act.last_error = None;
                    act.totals.0 += r.evicted_blobs;
                    act.totals.1 += r.evicted_bytes;
                    act.totals.2 += 1;
                    act.metrics
                        .evicted(reason, r.evicted_blobs, r.evicted_bytes);
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
                Err(e) => return act.fail(ctx, e.to_string()),
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
        if m.urgent {
            self.urgent = true;
            if self.state == SweepState::Throttled {
                self.state = SweepState::Idle;
            }
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

/// One sweep. `full`: also drop idle repositories.
pub async fn sweep(
    meta: &MetaHandle,
    store: &BlobStore,
    b: &Budget,
    now_ms: u64,
    full: bool,
) -> Result<SweepReport, MetaError> {
    let mut report = SweepReport::default();
    let pinned = meta
        .ask(PinnedContent {
            pins: b.pins.clone(),
        })
        .await??;
    if full {
        let before_ms = now_ms.saturating_sub(b.manifest_max_idle.as_millis() as u64);
        report.repositories_dropped = meta
            .ask(DropIdleRepositories {
                before_ms,
                keep: pinned.repos,
            })
            .await?? as u64;
    }
    let high = (b.high * b.max_size as f64) as u64;
    let low = (b.low * b.max_size as f64) as u64;
    if meta.usage() > high {
        let pinned = Arc::new(pinned.blobs);
        let mut after = None;
        loop {
            let step = meta
                .ask(EvictLru {
                    target: low,
                    pinned: pinned.clone(),
                    after,
                    max: STEP,
                })
                .await??;
            report.skipped_pinned += step.skipped_pinned;
            report.evicted_blobs += step.removed.len() as u64;
            report.evicted_bytes += step.removed.iter().map(|(_, s)| s).sum::<u64>();
            // The records are gone: now the files (blocking file system calls). A blob
            // fetched and recorded again since its record went keeps its new file.
            let removed = meta.ask(Unrecorded(step.removed)).await??;
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for (d, _) in removed {
                    if let Err(e) = s.remove_blob(&d) {
                        tracing::warn!(digest = %d, error = %e, "could not delete an evicted blob's file");
                    }
                }
            })
            .await;
            match step.next {
                Some(next) => after = Some(next),
                None => break,
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
    meta.flush().await?;
    Ok(report)
}

/// What other actors hold.
#[derive(Clone)]
pub struct EvictionHandle {
    addr: Addr<Eviction>,
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
    use crate::digest::Digest;
    use crate::metadata::{LookupBlob, ManifestRecord, Metadata, PutManifest, TagRecord};
    use crate::testing::{sha256 as d, Fixture};

    #[actix_rt::test]
    async fn sweep_evicts_lru_until_low_watermark_and_keeps_pins() {
        let fx = Fixture::new();
        let blobs: Vec<(Digest, Vec<u8>)> = (0..10u8)
            .map(|i| {
                let b = vec![i; 100];
                (d(&b), b)
            })
            .collect();
        for (i, (dg, b)) in blobs.iter().enumerate() {
            fx.put_file(dg, b);
            fx.db.record_blob(dg, 100, 1000 * (i as u64 + 1)).unwrap();
        }
        let store = fx.store.clone();
        let meta = Metadata::start(fx.db, crate::metrics::Mailbox::detached());
        // Pin blob 0 (the oldest) through a pinned tag's manifest.
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":100}},"layers":[]}}"#,
            blobs[0].0
        );
        let md = d(m.as_bytes());
        let put = |repo: &str| PutManifest {
            upstream: "docker.io".into(),
            repo: repo.into(),
            digest: md.clone(),
            record: ManifestRecord {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: bytes::Bytes::from(m.clone()),
                fetched_ms: 1,
            },
            tag: Some((
                "1".into(),
                TagRecord {
                    digest: md.to_string(),
                    checked_ms: 1,
                },
            )),
            links: vec![],
        };
        meta.ask(put("library/keep"))
            .await
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        assert_eq!(meta.usage(), 1000);
        let budget = Budget {
            max_size: 1000,
            high: 0.9,
            low: 0.5,
            pins: vec![PinPattern::parse("docker.io/library/keep:*").unwrap()].into(),
            manifest_max_idle: Duration::from_secs(3600),
            interval: Duration::from_secs(30),
        };
        let r = sweep(&meta, &store, &budget, 20_000, false).await.unwrap();
        // From 1000 to <= 500: five blobs go, the oldest unpinned first; blob 0 stays.
        assert_eq!(r.evicted_blobs, 5);
        assert_eq!(meta.usage(), 500);
        assert_eq!(r.skipped_pinned, 1);
        assert!(store.blob_path(&blobs[0].0).exists());
        let recorded = |dg: Digest| {
            let meta = meta.clone();
            async move {
                let l = meta
                    .ask(LookupBlob {
                        upstream: None,
                        digest: dg,
                    })
                    .await;
                l.unwrap().unwrap().record.is_some()
            }
        };
        for (dg, _) in &blobs[1..6] {
            assert!(!store.blob_path(dg).exists());
            assert!(!recorded(dg.clone()).await);
        }
        for (dg, _) in &blobs[6..] {
            assert!(store.blob_path(dg).exists());
        }
        // Under the high watermark: nothing to do.
        let r = sweep(&meta, &store, &budget, 20_000, false).await.unwrap();
        assert_eq!(r.evicted_blobs, 0);
        // Idle repositories lose their manifests, unless pinned.
        meta.ask(put("library/old"))
            .await
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        let later = 1 + 3600 * 1000 + 1;
        let r = sweep(&meta, &store, &budget, later, true).await.unwrap();
        assert_eq!(r.repositories_dropped, 1);
        let tag = |repo: &str| crate::metadata::GetTag {
            upstream: "docker.io".into(),
            repo: repo.into(),
            tag: "1".into(),
        };
        assert!(meta
            .ask(tag("library/old"))
            .await
            .unwrap()
            .unwrap()
            .is_none());
        assert!(meta
            .ask(tag("library/keep"))
            .await
            .unwrap()
            .unwrap()
            .is_some());
    }
}
