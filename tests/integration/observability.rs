//! What operators see: the metrics listener and its counters after real pulls through the
//! counting fake upstream.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::StatusCode;

use crate::common::*;

/// The value of the series `series` (name with its labels, exactly as exposed), or `None`.
async fn metric(pc: &Pullcache, series: &str) -> Option<f64> {
    let (st, _, body) = get(&format!("{}/metrics", pc.metrics_base), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (bounded) until `series` has the value `want`: the counts of a response are made
/// when its body ends, a moment after the client has the last byte.
async fn expect_metric(pc: &Pullcache, series: &str, want: f64) {
    let mut last = None;
    for _ in 0..100 {
        last = metric(pc, series).await;
        if last == Some(want) {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series}: want {want}, have {last:?}");
}

#[actix_rt::test]
async fn a_cold_then_a_warm_pull_are_counted() {
    let up = FakeUpstream::start();
    let layers = [data(900, 300_000), data(901, 1_000)];
    let (md, digests) = up.add_image("library/app", "v1", &layers);
    let layer_bytes: usize = layers.iter().map(Vec::len).sum();
    let pc = Pullcache::start(&up.url());
    let u = r#"upstream="docker.io""#;

    // Not on the registry port.
    let (st, _, _) = get(&pc.url("/metrics"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = get(&format!("{}/healthz", pc.metrics_base), &[]).await;
    assert_eq!(st, StatusCode::OK);
    // Every series of the upstream exists before the first pull.
    expect_metric(
        &pc,
        &format!(r#"pullcache_cache_outcomes_total{{outcome="miss",type="blob",{u}}}"#),
        0.0,
    )
    .await;

    let accept = [("accept", OCI_MANIFEST)];
    for round in ["cold", "warm"] {
        let (st, _, m) = get(&pc.url("/v2/app/manifests/v1"), &accept).await;
        assert_eq!(st, StatusCode::OK, "{round}");
        assert_eq!(sha256(&m.unwrap()), md);
        for d in &digests {
            let (st, _, b) = get(&pc.url(&format!("/v2/app/blobs/{d}")), &[]).await;
            assert_eq!(st, StatusCode::OK, "{round}");
            assert_eq!(&sha256(&b.unwrap()), d);
            pc.wait_stored(d).await;
        }
    }
    let manifest_len = up
        .content
        .lock()
        .unwrap()
        .manifests
        .values()
        .next()
        .map(|(_, b)| b.len())
        .unwrap();
    for (series, want) in [
        (
            format!(r#"pullcache_cache_outcomes_total{{outcome="miss",type="blob",{u}}}"#),
            2.0,
        ),
        (
            format!(r#"pullcache_cache_outcomes_total{{outcome="hit",type="blob",{u}}}"#),
            2.0,
        ),
        (
            format!(r#"pullcache_cache_outcomes_total{{outcome="miss",type="manifest",{u}}}"#),
            1.0,
        ),
        (
            format!(r#"pullcache_cache_outcomes_total{{outcome="hit",type="manifest",{u}}}"#),
            1.0,
        ),
        (r#"registry_proxy_requests_total{type="blob"}"#.into(), 4.0),
        (r#"registry_proxy_hits_total{type="blob"}"#.into(), 2.0),
        (
            r#"registry_proxy_misses_total{type="manifest"}"#.into(),
            1.0,
        ),
        ("registry_storage_cache_requests_total".into(), 6.0),
        ("registry_storage_cache_hits_total".into(), 3.0),
        (
            r#"registry_proxy_pulled_bytes_total{type="blob"}"#.into(),
            layer_bytes as f64,
        ),
        (
            r#"registry_proxy_pulled_bytes_total{type="manifest"}"#.into(),
            manifest_len as f64,
        ),
        (
            format!(r#"pullcache_upstream_bytes_total{{{u}}}"#),
            (layer_bytes + manifest_len) as f64,
        ),
        (
            r#"pullcache_served_bytes_total{source="upstream"}"#.into(),
            (layer_bytes + manifest_len) as f64,
        ),
        (
            r#"pullcache_served_bytes_total{source="cache"}"#.into(),
            (layer_bytes + manifest_len) as f64,
        ),
        (
            "pullcache_bytes_saved_total".into(),
            (layer_bytes + manifest_len) as f64,
        ),
        (
            r#"registry_http_requests_total{code="200",handler="blob",method="GET"}"#.into(),
            4.0,
        ),
        (
            r#"registry_http_requests_total{code="200",handler="manifest",method="GET"}"#.into(),
            2.0,
        ),
        (
            r#"registry_http_request_duration_seconds_count{handler="blob",method="GET"}"#.into(),
            4.0,
        ),
        ("pullcache_storage_bytes".into(), layer_bytes as f64),
        ("pullcache_inflight_fills".into(), 0.0),
        ("pullcache_fill_waiters".into(), 0.0),
        (format!(r#"pullcache_digest_mismatch_total{{{u}}}"#), 0.0),
        (format!(r#"pullcache_upstream_up{{{u}}}"#), 1.0),
        (
            r#"pullcache_actor_mailbox_depth{actor="metadata"}"#.into(),
            0.0,
        ),
    ] {
        expect_metric(&pc, &series, want).await;
    }
    // The 300 kB layer went out with sendfile, warm (and cold: from the fill's file).
    let zc = metric(&pc, "pullcache_zero_copy_bytes_total")
        .await
        .unwrap();
    assert!(zc >= 300_000.0, "zero-copy bytes {zc}");
    // The upstream answered GETs (manifest, two blobs) with 200, and probes may add more.
    let gets = metric(
        &pc,
        &format!(r#"pullcache_upstream_requests_total{{code="200",method="GET",{u}}}"#),
    )
    .await
    .unwrap();
    assert!(gets >= 3.0, "upstream GETs {gets}");
    assert!(metric(&pc, "process_resident_memory_bytes").await.unwrap() > 0.0);
    assert!(metric(&pc, "pullcache_storage_limit_bytes").await.unwrap() > 0.0);
}

#[actix_rt::test]
async fn joined_downloads_count_as_coalesced_and_a_bad_digest_as_a_mismatch() {
    let up = FakeUpstream::start();
    let blob = data(910, 200_000);
    let d = up.add_blob(&blob);
    let bad = up.add_blob(&data(911, 5_000));
    up.knobs.tamper.lock().unwrap().push(bad.clone());
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    let mut responses = Vec::new();
    for _ in 0..5 {
        responses.push(client().get(&url).send().await.expect("headers"));
    }
    expect_metric(&pc, "pullcache_inflight_fills", 1.0).await;
    expect_metric(&pc, "pullcache_fill_waiters", 5.0).await;
    up.open_gate();
    for mut r in responses {
        assert_eq!(sha256(&r.body().limit(1 << 20).await.unwrap()), d);
    }
    let u = r#"upstream="docker.io""#;
    expect_metric(
        &pc,
        &format!(r#"pullcache_cache_outcomes_total{{outcome="miss",type="blob",{u}}}"#),
        1.0,
    )
    .await;
    expect_metric(
        &pc,
        &format!(r#"pullcache_cache_outcomes_total{{outcome="coalesced",type="blob",{u}}}"#),
        4.0,
    )
    .await;
    // One transfer, five deliveries: four of them saved.
    expect_metric(&pc, "pullcache_bytes_saved_total", 4.0 * 200_000.0).await;
    expect_metric(&pc, "pullcache_fill_waiters", 0.0).await;

    let (_, _, body) = get(&pc.url(&format!("/v2/library/x/blobs/{bad}")), &[]).await;
    assert!(body.is_err() || body.unwrap().len() < 5_000, "never whole");
    expect_metric(
        &pc,
        &format!(r#"pullcache_digest_mismatch_total{{{u}}}"#),
        1.0,
    )
    .await;
}

#[actix_rt::test]
async fn tokens_and_quota_are_reported_per_upstream() {
    let up = FakeUpstream::start();
    up.knobs.require_token.store(true, Ordering::SeqCst);
    up.knobs.ratelimit_remaining.store(42, Ordering::SeqCst);
    let (_, _) = up.add_image("library/q", "1", &[data(920, 100)]);
    let pc = Pullcache::start(&up.url());
    let (st, _, _) = get(&pc.url("/v2/q/manifests/1"), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(st, StatusCode::OK);
    let u = r#"upstream="docker.io""#;
    expect_metric(
        &pc,
        &format!(r#"pullcache_token_fetches_total{{{u}}}"#),
        1.0,
    )
    .await;
    expect_metric(
        &pc,
        &format!(r#"pullcache_upstream_quota_remaining{{{u}}}"#),
        42.0,
    )
    .await;
    // The 401 that asked for the token is counted too (and the health probe's own).
    let challenged = metric(
        &pc,
        &format!(r#"pullcache_upstream_requests_total{{code="401",method="GET",{u}}}"#),
    )
    .await
    .unwrap();
    assert!(challenged >= 1.0, "401s counted: {challenged}");
}

#[actix_rt::test]
async fn an_empty_metrics_listen_turns_the_listener_off() {
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.metrics.listen = String::new()
    });
    assert!(pc.metrics_base.is_empty());
    let (st, _, _) = get(&pc.url("/v2/"), &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// podman, buildah and skopeo try https first against an insecure mirror: the handshake
/// is closed at once (no HTTP 400 for a ClientHello), and http on the same port works.
#[actix_rt::test]
async fn a_tls_handshake_on_the_plain_port_is_closed_and_http_goes_on() {
    use std::io::{Read, Write};
    let up = FakeUpstream::start();
    let pc = Pullcache::start(&up.url());
    let addr = pc.base.trim_start_matches("http://").to_string();
    let hello = [0x16u8, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03];
    let got = actix_rt::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&hello).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
    .await
    .unwrap();
    assert!(got.is_empty(), "closed without an answer, got {got:?}");
    let (st, _, _) = get(&pc.url("/v2/"), &[]).await;
    assert_eq!(st, StatusCode::OK);
}

/// A 304 (the client has the manifest) is an answer from the cache, counted like a 200.
#[actix_rt::test]
async fn a_not_modified_manifest_counts_as_a_hit() {
    let up = FakeUpstream::start();
    let (md, _) = up.add_image("library/nm", "1", &[data(930, 100)]);
    let pc = Pullcache::start(&up.url());
    let url = pc.url("/v2/nm/manifests/1");
    let (st, _, _) = get(&url, &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(st, StatusCode::OK);
    let etag = format!("\"{md}\"");
    let (st, _, _) = get(&url, &[("accept", OCI_MANIFEST), ("if-none-match", &etag)]).await;
    assert_eq!(st, StatusCode::NOT_MODIFIED);
    let u = r#"upstream="docker.io""#;
    expect_metric(
        &pc,
        &format!(r#"pullcache_cache_outcomes_total{{outcome="hit",type="manifest",{u}}}"#),
        1.0,
    )
    .await;
    expect_metric(
        &pc,
        r#"registry_proxy_requests_total{type="manifest"}"#,
        2.0,
    )
    .await;
    expect_metric(
        &pc,
        r#"registry_http_requests_total{code="304",handler="manifest",method="GET"}"#,
        1.0,
    )
    .await;
}
