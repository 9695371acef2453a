//! Blob fetching: coalescing, streaming while filling, verification, HEAD and Range.

use std::sync::atomic::Ordering;

use actix_web::http::{Method, StatusCode};
use futures_util::StreamExt;

use crate::common::*;

/// 20 concurrent GETs of one uncached blob make exactly one upstream GET, and a client that
/// joined receives bytes while the upstream is still holding back the second half.
#[actix_rt::test]
async fn twenty_concurrent_gets_make_one_upstream_get_and_stream_early() {
    let up = FakeUpstream::start();
    let blob = data(1, 4 * 1024 * 1024 + 17);
    let d = up.add_blob(&blob);
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));

    // Open 20 responses; each must get its headers and first bytes while the gate is shut.
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let resp = client().get(&url).send().await.expect("response headers");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header(resp.headers(), "content-length"),
            Some(blob.len().to_string().as_str())
        );
        bodies.push(resp);
    }
    let mut received = vec![Vec::new(); 20];
    for (i, resp) in bodies.iter_mut().enumerate() {
        let first = resp.next().await.expect("a first chunk").expect("no error");
        assert!(!first.is_empty());
        received[i].extend_from_slice(&first);
    }
    // Every client has bytes, and the upstream has not finished sending (gate shut).
    assert!(!*up.knobs.gate.borrow());
    assert_eq!(
        Counts::get(&up.counts.blob_get),
        1,
        "one upstream GET for 20 clients"
    );
    up.open_gate();
    for (i, resp) in bodies.iter_mut().enumerate() {
        while let Some(chunk) = resp.next().await {
            received[i].extend_from_slice(&chunk.expect("body completes"));
        }
        assert_eq!(sha256(&received[i]), d, "client {i} got the exact blob");
    }
    assert_eq!(Counts::get(&up.counts.blob_get), 1);
    // Stored, and served from disk afterwards.
    pc.wait_stored(&d).await;
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(Counts::get(&up.counts.blob_get), 1);
    assert_eq!(pc.temp_files(), 0);
}

/// The download continues when the client that started it disconnects.
#[actix_rt::test]
async fn fill_continues_after_the_first_client_leaves() {
    let up = FakeUpstream::start();
    let blob = data(2, 1024 * 1024);
    let d = up.add_blob(&blob);
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    {
        let mut resp = client().get(&url).send().await.unwrap();
        let _ = resp.next().await;
        // dropped here: the client goes away mid-body
    }
    up.open_gate();
    pc.wait_stored(&d).await;
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(Counts::get(&up.counts.blob_get), 1);
}

/// A blob whose bytes do not match its digest is never delivered whole and never kept;
/// the next request fetches afresh.
#[actix_rt::test]
async fn tampered_blob_is_never_delivered_whole_nor_stored() {
    let up = FakeUpstream::start();
    let blob = data(3, 2 * 1024 * 1024);
    let d = up.add_blob(&blob);
    up.knobs.tamper.lock().unwrap().push(d.clone());
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    for attempt in 1..=2u64 {
        let (_, _, body) = get(&url, &[]).await;
        // The connection must be aborted (an error here); at most a short body.
        if let Ok(b) = body {
            assert!(
                b.len() < blob.len(),
                "a complete body was delivered: {} bytes",
                b.len()
            );
        }
        assert!(!pc.blob_path(&d).exists(), "tampered blob stored");
        wait_for(|| pc.temp_files() == 0).await;
        assert_eq!(
            Counts::get(&up.counts.blob_get),
            attempt,
            "each request after a failure fetches afresh"
        );
    }
    // Once the upstream serves the right bytes, the blob is cached.
    up.knobs.tamper.lock().unwrap().clear();
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    pc.wait_stored(&d).await;
}

/// HEAD answers like GET (same headers, real Content-Length) and never downloads.
#[actix_rt::test]
async fn head_equals_get_and_never_downloads() {
    let up = FakeUpstream::start();
    let blob = data(4, 100_000);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    let (hs, hh, hb) = send(Method::HEAD, &url, &[]).await;
    assert_eq!(hs, StatusCode::OK);
    assert!(hb.unwrap().is_empty());
    assert_eq!(
        Counts::get(&up.counts.blob_get),
        0,
        "HEAD of an uncached blob downloaded it"
    );
    assert_eq!(Counts::get(&up.counts.blob_head), 1);
    let (gs, gh, gb) = get(&url, &[]).await;
    assert_eq!(gs, StatusCode::OK);
    assert_eq!(gb.unwrap().len(), blob.len());
    for h in [
        "content-length",
        "content-type",
        "docker-content-digest",
        "etag",
        "accept-ranges",
        "docker-distribution-api-version",
    ] {
        assert_eq!(header(&hh, h), header(&gh, h), "header {h}");
        assert!(header(&gh, h).is_some(), "header {h} missing");
    }
    assert_eq!(header(&gh, "docker-content-digest"), Some(d.as_str()));
    // HEAD of the cached blob: answered locally.
    pc.wait_stored(&d).await;
    let (hs2, hh2, _) = send(Method::HEAD, &url, &[]).await;
    assert_eq!(hs2, StatusCode::OK);
    assert_eq!(header(&hh2, "content-length"), Some("100000"));
    assert_eq!(Counts::get(&up.counts.blob_head), 1);
}

/// Range requests give 206 with exactly the asked bytes, on a miss and on a hit; an
/// unsatisfiable range gives 416; several ranges give the whole blob.
#[actix_rt::test]
async fn ranges_give_the_right_bytes() {
    let up = FakeUpstream::start();
    let blob = data(5, 300_000);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    // On a miss (the fill starts and the range is served from it).
    let (st, h, body) = get(&url, &[("Range", "bytes=1000-")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&h, "content-range"),
        Some("bytes 1000-299999/300000")
    );
    assert_eq!(body.unwrap(), blob[1000..]);
    pc.wait_stored(&d).await;
    for (range, lo, hi) in [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=-5", 299_995, 300_000),
        ("bytes=299990-400000", 299_990, 300_000),
    ] {
        let (st, h, body) = get(&url, &[("Range", range)]).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&h, "content-range").unwrap(),
            format!("bytes {lo}-{}/300000", hi - 1)
        );
        assert_eq!(body.unwrap(), blob[lo..hi], "{range}");
    }
    let (st, h, _) = get(&url, &[("Range", "bytes=300000-")]).await;
    assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&h, "content-range"), Some("bytes */300000"));
    let (st, _, body) = get(&url, &[("Range", "bytes=0-1,5-6")]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.unwrap().len(), 300_000);
    assert_eq!(Counts::get(&up.counts.blob_get), 1);
}

/// An upstream that sends no Content-Length: the blob streams chunked, and a Range (a
/// dockerd or containerd resume) still gets a 206, never a 200.
#[actix_rt::test]
async fn chunked_upstream_still_gives_206_for_ranges() {
    let up = FakeUpstream::start();
    up.knobs.chunked_blobs.store(true, Ordering::SeqCst);
    let blob = data(6, 200_000);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    let (st, h, body) = get(&url, &[("Range", "bytes=100-")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&h, "content-range"), Some("bytes 100-199999/200000"));
    assert_eq!(body.unwrap(), blob[100..]);
    assert_eq!(Counts::get(&up.counts.blob_get), 1);
    // Without a Range it streams chunked, whole.
    let (st, _, body) = get(
        &pc.url(&format!(
            "/v2/library/y/blobs/{}",
            up.add_blob(&data(8, 70_000))
        )),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.unwrap().len(), 70_000);
}

/// A stored blob whose file no longer matches its record (damage, a truncated copy) is
/// never served; it is fetched again.
#[actix_rt::test]
async fn damaged_stored_blob_is_fetched_again() {
    let up = FakeUpstream::start();
    let blob = data(7, 50_000);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    // Stored, recorded, and the download has left the in-flight table.
    for _ in 0..200 {
        let done = pc
            .engine
            .blobs
            .fill_stats()
            .await
            .unwrap()
            .get("done")
            .copied();
        if done == Some(1) {
            break;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(pc.blob_path(&d).exists());
    // Truncate the stored file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pc.blob_path(&d))
        .unwrap();
    f.set_len(10).unwrap();
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(Counts::get(&up.counts.blob_get), 2);
    wait_for(|| {
        std::fs::metadata(pc.blob_path(&d))
            .map(|m| m.len() == 50_000)
            .unwrap_or(false)
    })
    .await;
}

/// A missing blob is a clean 404 BLOB_UNKNOWN, not a broken 200.
#[actix_rt::test]
async fn unknown_blob_is_404() {
    let up = FakeUpstream::start();
    let pc = Pullcache::start(&up.url());
    let d = sha256(b"nowhere");
    let (st, _, body) = get(&pc.url(&format!("/v2/library/x/blobs/{d}")), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "BLOB_UNKNOWN");
    let (st, _, _) = send(
        Method::HEAD,
        &pc.url(&format!("/v2/library/x/blobs/{d}")),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Polls a condition that becomes true after background work (bounded: 10 s).
pub async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 10 s");
}

/// Past `limits.max_fills`, a request that would start one more download gets 503 with
/// Retry-After; meanwhile a join of a download in flight, a cached blob and an uncached
/// manifest are all served, and once the downloads end the refused blob is fetched.
#[actix_rt::test]
async fn downloads_past_the_cap_get_503_while_everything_else_is_served() {
    let up = FakeUpstream::start();
    let cached = up.add_blob(&data(990, 2_000));
    let (a, b, c) = (
        up.add_blob(&data(991, 300_000)),
        up.add_blob(&data(992, 300_000)),
        up.add_blob(&data(993, 300_000)),
    );
    let (md, _) = up.add_image("library/free", "1", &[data(994, 100)]);
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |cfg| {
        cfg.limits.max_fills = 2;
    });
    let url = |d: &str| pc.url(&format!("/v2/library/x/blobs/{d}"));
    let (st, _, _) = get(&url(&cached), &[]).await;
    assert_eq!(st, StatusCode::OK);
    pc.wait_stored(&cached).await;

    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let mut first = client().get(url(&a)).send().await.expect("headers");
    let mut second = client().get(url(&b)).send().await.expect("headers");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::OK);

    // A third download: refused, with a retry hint.
    let (st, h, body) = get(&url(&c), &[]).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&h, "retry-after"), Some("5"));
    assert_eq!(error_code(&body), "UNAVAILABLE");
    // Everything else goes on.
    let mut join = client().get(url(&a)).send().await.expect("headers");
    assert_eq!(join.status(), StatusCode::OK, "a join is never refused");
    let (st, _, body) = get(&url(&cached), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), cached);
    let (st, _, m) = get(&pc.url("/v2/free/manifests/1"), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(st, StatusCode::OK, "manifests are not starved by downloads");
    assert_eq!(sha256(&m.unwrap()), md);

    up.open_gate();
    for (r, d) in [(&mut first, &a), (&mut second, &b), (&mut join, &a)] {
        assert_eq!(&sha256(&r.body().limit(1 << 20).await.unwrap()), d);
    }
    pc.wait_stored(&a).await;
    pc.wait_stored(&b).await;
    // A stored blob is recorded a moment before its download leaves the table.
    for _ in 0..200 {
        if pc.engine.metrics().inflight_fills.get() == 0 {
            break;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pc.engine.metrics().inflight_fills.get(), 0);
    let (st, _, body) = get(&url(&c), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), c);
}
