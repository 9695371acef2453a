//! Part 2 behaviour: the disk budget (LRU eviction, watermarks, pins, in-flight
//! downloads), a full disk, per-upstream TTLs, immutable tags, max_stale, quota awareness
//! and health probing. Time-dependent policy runs on the manual clock.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::StatusCode;
use futures_util::StreamExt;

use crate::blobs::wait_for;
use crate::common::*;
use pullcache_actors::settings::ByteSize;

fn budget(cfg: &mut pullcache::config::Config, max: u64) {
    cfg.storage.max_size = Some(ByteSize(max));
    cfg.storage.high_watermark = 0.9;
    cfg.storage.low_watermark = 0.6;
    cfg.storage.sweep_interval = Duration::from_millis(200);
}

async fn usage(pc: &Pullcache) -> u64 {
    pc.engine.eviction.status().await.unwrap().usage_bytes
}

/// Blobs past the high watermark are evicted least-recently-used first until usage is under
/// the low watermark; a pinned image survives; an evicted blob is fetched again on demand.
#[actix_rt::test]
async fn eviction_is_lru_between_watermarks_and_keeps_pins() {
    let up = FakeUpstream::start();
    // A pinned image with one 100 kB layer, and eight 100 kB loose blobs.
    let (_, pinned_layers) = up.add_image("library/keep", "1", &[data(100, 100_000)]);
    let loose: Vec<String> = (0..8)
        .map(|i| up.add_blob(&data(200 + i, 100_000)))
        .collect();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        budget(c, 950_000);
        c.storage.pin = vec!["docker.io/library/keep:*".parse().unwrap()];
    });
    assert_eq!(
        get(&pc.url("/v2/library/keep/manifests/1"), &[]).await.0,
        StatusCode::OK
    );
    let fetch = |d: &String| pc.url(&format!("/v2/library/x/blobs/{d}"));
    assert_eq!(get(&fetch(&pinned_layers[0]), &[]).await.0, StatusCode::OK);
    // Access order: the pinned layer oldest, then loose[0..8] one second apart.
    for d in &loose {
        pc.clock.advance(Duration::from_secs(2));
        assert_eq!(get(&fetch(d), &[]).await.0, StatusCode::OK);
        pc.wait_stored(d).await;
    }
    // 9 x 100 kB > 855 kB: over the high watermark. The sweep brings it to <= 570 kB.
    for _ in 0..100 {
        if usage(&pc).await <= 570_000 {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let u = usage(&pc).await;
    assert!(u <= 570_000, "usage {u} not under the low watermark");
    assert!(
        pc.blob_path(&pinned_layers[0]).exists(),
        "pinned blob evicted"
    );
    // The oldest loose blobs went first; the newest stayed.
    assert!(!pc.blob_path(&loose[0]).exists());
    assert!(!pc.blob_path(&loose[1]).exists());
    assert!(pc.blob_path(&loose[7]).exists());
    assert!(pc.blob_path(&loose[6]).exists());
    // Exact accounting: the counter equals the bytes on disk.
    let on_disk: u64 = walk(&pc.root.path().join("blobs"));
    assert_eq!(u, on_disk);
    // An evicted blob is fetched again, transparently.
    let before = Counts::get(&up.counts.blob_get);
    let (st, _, body) = get(&fetch(&loose[0]), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&sha256(&body.unwrap()), &loose[0]);
    assert_eq!(Counts::get(&up.counts.blob_get), before + 1);
    let status = pc.engine.eviction.status().await.unwrap();
    assert!(status.evicted_blobs_total >= 3);
}

fn walk(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    n
}

/// A download in progress is never evicted, and a blob being read while it is evicted is
/// still delivered whole.
#[actix_rt::test]
async fn in_flight_downloads_and_open_readers_survive_eviction() {
    let up = FakeUpstream::start();
    let big = data(300, 400_000);
    let bd = up.add_blob(&big);
    let fillers: Vec<String> = (0..5)
        .map(|i| up.add_blob(&data(310 + i, 200_000)))
        .collect();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        budget(c, 1_000_000)
    });
    let url = |d: &String| pc.url(&format!("/v2/library/x/blobs/{d}"));
    // Cache filler 0, then open a reader on it and keep it half-read.
    assert_eq!(get(&url(&fillers[0]), &[]).await.0, StatusCode::OK);
    pc.wait_stored(&fillers[0]).await;
    let mut reader = client().get(url(&fillers[0])).send().await.unwrap();
    let mut got = reader.next().await.unwrap().unwrap().to_vec();
    // Start the big download and hold it mid-way.
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let mut big_resp = client().get(url(&bd)).send().await.unwrap();
    let mut big_got = big_resp.next().await.unwrap().unwrap().to_vec();
    // Fill the cache past the watermark with newer blobs: filler 0 is the LRU victim.
    up.knobs.use_gate.store(false, Ordering::SeqCst);
    for d in &fillers[1..] {
        pc.clock.advance(Duration::from_secs(2));
        assert_eq!(get(&url(d), &[]).await.0, StatusCode::OK);
    }
    wait_for(|| !pc.blob_path(&fillers[0]).exists()).await;
    // The half-read client still gets the whole, correct blob.
    while let Some(c) = reader.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(sha256(&got), fillers[0]);
    // The held download finishes and is stored.
    up.open_gate();
    while let Some(c) = big_resp.next().await {
        big_got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(sha256(&big_got), bd);
    pc.wait_stored(&bd).await;
}

/// With the disk full, pulls still succeed (streamed from the upstream, verified, not
/// stored), and caching resumes once space is back.
#[actix_rt::test]
async fn a_full_disk_streams_without_storing_and_recovers() {
    let up = FakeUpstream::start();
    let blob = data(400, 300_000);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    pc.engine.blobs.inject_disk_full(true);
    for _ in 0..2 {
        let (st, _, body) = get(&url, &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256(&body.unwrap()), d);
        assert!(!pc.blob_path(&d).exists());
        wait_for(|| pc.temp_files() == 0).await;
    }
    // Ranges work while streaming without storing.
    let (st, h, body) = get(&url, &[("Range", "bytes=100-199")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&h, "content-range"), Some("bytes 100-199/300000"));
    assert_eq!(body.unwrap(), blob[100..200]);
    // A tampered blob is not delivered whole on this path either.
    let bad = data(401, 100_000);
    let bd = up.add_blob(&bad);
    up.knobs.tamper.lock().unwrap().push(bd.clone());
    let (_, _, body) = get(&pc.url(&format!("/v2/library/x/blobs/{bd}")), &[]).await;
    if let Ok(b) = body {
        assert!(b.len() < bad.len());
    }
    // Space is back: the next pull is cached.
    pc.engine.blobs.inject_disk_full(false);
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    pc.wait_stored(&d).await;
}

/// Per-upstream TTL, immutable tags and max_stale, on the manual clock.
#[actix_rt::test]
async fn ttl_per_upstream_immutable_tags_and_max_stale() {
    let up = FakeUpstream::start();
    up.add_image("library/app", "latest", &[data(500, 10)]);
    up.add_image("library/app", "1.2.3", &[data(501, 10)]);
    let mut u = upstream("docker.io", &up.url(), true, None);
    u.tag_ttl = Some(Duration::from_secs(60));
    let pc = Pullcache::start_cfg(vec![u], |c| {
        c.cache.tag_ttl = Duration::from_secs(3600);
        c.cache.immutable_tags = vec![r"^v?[0-9]+\.[0-9]+\.[0-9]+$".parse().unwrap()];
        c.cache.max_stale = Duration::from_secs(600);
    });
    let latest = pc.url("/v2/library/app/manifests/latest");
    let pinned = pc.url("/v2/library/app/manifests/1.2.3");
    assert_eq!(get(&latest, &[]).await.0, StatusCode::OK);
    assert_eq!(get(&pinned, &[]).await.0, StatusCode::OK);
    // The upstream's own TTL (60 s) applies, not the global hour.
    pc.clock.advance(Duration::from_secs(61));
    assert_eq!(get(&latest, &[]).await.0, StatusCode::OK);
    assert_eq!(Counts::get(&up.counts.manifest_head), 1);
    // An immutable tag is never revalidated.
    pc.clock.advance(Duration::from_secs(86400));
    assert_eq!(get(&pinned, &[]).await.0, StatusCode::OK);
    assert_eq!(Counts::get(&up.counts.manifest_head), 1);
    // Upstream failing: stale within max_stale, 503 past it.
    up.knobs.fail_status.store(503, Ordering::SeqCst);
    // Refresh `latest` first: a day has passed, it is 1 day stale.
    let (st, _, body) = get(&latest, &[]).await;
    assert_eq!(
        st,
        StatusCode::SERVICE_UNAVAILABLE,
        "a day past TTL with max_stale 10m"
    );
    let msg = String::from_utf8_lossy(body.as_ref().unwrap()).to_string();
    assert!(msg.contains("too old"), "{msg}");
    up.knobs.fail_status.store(0, Ordering::SeqCst);
    assert_eq!(get(&latest, &[]).await.0, StatusCode::OK); // revalidated: fresh again
    up.knobs.fail_status.store(503, Ordering::SeqCst);
    pc.clock.advance(Duration::from_secs(60 + 300));
    let (st, h, _) = get(&latest, &[]).await;
    assert_eq!(st, StatusCode::OK, "5 minutes stale, within max_stale");
    assert!(header(&h, "warning").unwrap().starts_with("110"));
    // Immutable tags and digests need no upstream at all.
    assert_eq!(get(&pinned, &[]).await.0, StatusCode::OK);
    let stats = &pc.engine.manifests.stats;
    assert!(stats.stale_served.load(Ordering::Relaxed) >= 1);
    assert!(stats.stale_refused.load(Ordering::Relaxed) >= 1);
}

/// When Docker Hub's remaining quota is below min_quota, cached tags are not revalidated
/// (no HEAD), so the last pulls go to images not cached yet.
#[actix_rt::test]
async fn low_quota_skips_revalidation() {
    let up = FakeUpstream::start();
    up.add_image("library/app", "latest", &[data(600, 10)]);
    up.knobs.ratelimit_remaining.store(3, Ordering::SeqCst);
    let pc = Pullcache::start(&up.url());
    let url = pc.url("/v2/library/app/manifests/latest");
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    pc.clock.advance(Duration::from_secs(301));
    let (st, h, _) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(header(&h, "warning").is_none());
    assert_eq!(
        Counts::get(&up.counts.manifest_head),
        0,
        "revalidated despite a low quota"
    );
    assert_eq!(
        pc.engine
            .manifests
            .stats
            .quota_skips
            .load(Ordering::Relaxed),
        1
    );
    // The window passes: revalidation resumes (and the quota is healthy again).
    up.knobs.ratelimit_remaining.store(50, Ordering::SeqCst);
    pc.clock.advance(Duration::from_secs(21600));
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(Counts::get(&up.counts.manifest_head), 1);
    // /readyz shows the quota.
    let (_, _, body) = get(&pc.url("/readyz"), &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert!(v["upstreams"][0].get("quota").is_some());
}

/// Probes take an upstream down after `threshold` failures and back up after as many
/// successes; while down, cached content is served at once and misses fail fast with 503
/// naming the upstream; /readyz stays 200 and shows the state.
#[actix_rt::test]
async fn health_probes_drive_fail_fast_and_readyz() {
    let up = FakeUpstream::start();
    let (md, layers) = up.add_image("library/app", "latest", &[data(700, 1000)]);
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.health.interval = Duration::from_millis(100);
        c.health.threshold = 2;
        c.health.timeout = Duration::from_secs(1);
    });
    assert_eq!(
        get(&pc.url("/v2/library/app/manifests/latest"), &[])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get(
            &pc.url(&format!("/v2/library/app/blobs/{}", layers[0])),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    let state = |pc: &Pullcache| format!("{:?}", pc.engine.health.snapshot()[0].state);
    wait_for(|| state(&pc) == "Up").await;
    up.knobs.fail_status.store(503, Ordering::SeqCst);
    wait_for(|| state(&pc) == "Down").await;
    let (st, _, body) = get(&pc.url("/readyz"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["upstreams"][0]["state"], "down");
    assert_eq!(v["ready"], true);
    let (st, _, _) = get(&pc.url("/v2/_health"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    // Cached: answered from cache at once (the tag past its TTL is served stale).
    pc.clock.advance(Duration::from_secs(301));
    let heads = Counts::get(&up.counts.manifest_head);
    let (st, h, _) = get(&pc.url("/v2/library/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
    assert_eq!(
        Counts::get(&up.counts.manifest_head),
        heads,
        "a down upstream was asked"
    );
    assert_eq!(
        get(
            &pc.url(&format!("/v2/library/app/blobs/{}", layers[0])),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    // Uncached: 503 naming the upstream, without contacting it.
    let gets = Counts::get(&up.counts.manifest_get);
    let (st, _, body) = get(&pc.url("/v2/library/other/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(body.as_ref().unwrap()).contains("docker.io"));
    let (st, _, _) = get(
        &pc.url(&format!("/v2/library/app/blobs/{}", sha256(b"nope"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Counts::get(&up.counts.manifest_get), gets);
    // Back up.
    up.knobs.fail_status.store(0, Ordering::SeqCst);
    wait_for(|| state(&pc) == "Up").await;
    let (st, _, _) = get(&pc.url("/v2/library/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::OK);
}
