//! Manifests: exact bytes and headers, Accept, tag TTL with HEAD revalidation (manual
//! clock), stale serving when the upstream is down, tag lists and the catalog.

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::{Method, StatusCode};

use crate::common::*;

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[actix_rt::test]
async fn manifest_bytes_and_headers_are_the_upstreams_on_get_and_head() {
    let up = FakeUpstream::start();
    let (md, _) = up.add_image("library/alpine", "3.20", &[data(1, 1000)]);
    let pc = Pullcache::start(&up.url());
    // The Docker daemon sends library/alpine; containerd and skopeo may send alpine.
    for path in [
        "/v2/library/alpine/manifests/3.20",
        "/v2/alpine/manifests/3.20",
    ] {
        let (hs, hh, _) = send(Method::HEAD, &pc.url(path), &[("Accept", ACCEPT_ALL)]).await;
        let (gs, gh, gb) = get(&pc.url(path), &[("Accept", ACCEPT_ALL)]).await;
        assert_eq!((hs, gs), (StatusCode::OK, StatusCode::OK));
        let body = gb.unwrap();
        let upstream_bytes = up.content.lock().unwrap().manifests
            [&("library/alpine".to_string(), md.clone())]
            .1
            .clone();
        assert_eq!(body, upstream_bytes, "bytes served unchanged");
        assert_eq!(header(&gh, "docker-content-digest"), Some(md.as_str()));
        assert_eq!(header(&gh, "content-type"), Some(OCI_MANIFEST));
        assert_eq!(header(&gh, "etag").unwrap(), format!("\"{md}\""));
        for h in [
            "content-length",
            "content-type",
            "docker-content-digest",
            "etag",
            "docker-distribution-api-version",
        ] {
            assert_eq!(header(&hh, h), header(&gh, h), "{path}: header {h}");
        }
        assert_eq!(
            header(&hh, "content-length").unwrap(),
            body.len().to_string()
        );
    }
    // One upstream GET; the rest were answered from cache (tag fresh).
    assert_eq!(Counts::get(&up.counts.manifest_get), 1);
    assert_eq!(Counts::get(&up.counts.manifest_head), 0);
    // By digest: from cache, no upstream contact.
    let (st, _, _) = get(&pc.url(&format!("/v2/library/alpine/manifests/{md}")), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(Counts::get(&up.counts.manifest_get), 1);
    // If-None-Match
    let (st, _, _) = get(
        &pc.url(&format!("/v2/library/alpine/manifests/{md}")),
        &[("If-None-Match", &format!("\"{md}\""))],
    )
    .await;
    assert_eq!(st, StatusCode::NOT_MODIFIED);
}

#[actix_rt::test]
async fn accept_is_honoured() {
    let up = FakeUpstream::start();
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
    let list = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[]}}"#);
    up.add_manifest("library/multi", Some("oci"), OCI_INDEX, index.as_bytes());
    up.add_manifest(
        "library/multi",
        Some("docker"),
        DOCKER_LIST,
        list.as_bytes(),
    );
    let pc = Pullcache::start(&up.url());
    let (st, h, _) = get(
        &pc.url("/v2/library/multi/manifests/oci"),
        &[("Accept", ACCEPT_ALL)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "content-type"), Some(OCI_INDEX));
    let (st, h, _) = get(
        &pc.url("/v2/library/multi/manifests/docker"),
        &[("Accept", DOCKER_LIST)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "content-type"), Some(DOCKER_LIST));
    // A client that cannot take an index gets 404 MANIFEST_UNKNOWN, never the wrong type.
    let (st, _, body) = get(
        &pc.url("/v2/library/multi/manifests/oci"),
        &[("Accept", DOCKER_MANIFEST)],
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
    let (st, _, _) = get(
        &pc.url("/v2/library/multi/manifests/oci"),
        &[("Accept", "*/*")],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
}

/// Within the TTL a tag is answered from cache; after it, a HEAD revalidates it (no GET
/// while unchanged); a moved tag costs exactly one GET.
#[actix_rt::test]
async fn tags_revalidate_with_head_after_ttl() {
    let up = FakeUpstream::start();
    let (d1, _) = up.add_image("library/app", "latest", &[data(10, 100)]);
    let pc = Pullcache::start(&up.url());
    let url = pc.url("/v2/library/app/manifests/latest");
    let (_, h, _) = get(&url, &[]).await;
    assert_eq!(header(&h, "docker-content-digest"), Some(d1.as_str()));
    pc.clock.advance(Duration::from_secs(299));
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(
        (
            Counts::get(&up.counts.manifest_get),
            Counts::get(&up.counts.manifest_head)
        ),
        (1, 0),
        "fresh tag: no upstream request"
    );
    pc.clock.advance(Duration::from_secs(2));
    let (st, h, _) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(d1.as_str()));
    assert_eq!(
        (
            Counts::get(&up.counts.manifest_get),
            Counts::get(&up.counts.manifest_head)
        ),
        (1, 1),
        "unchanged: one HEAD, no GET"
    );
    // Fresh again for another TTL.
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    assert_eq!(Counts::get(&up.counts.manifest_head), 1);
    // Move the tag upstream: followed after the TTL, with one GET.
    let (d2, _) = up.add_image("library/app", "latest", &[data(11, 100)]);
    pc.clock.advance(Duration::from_secs(301));
    let (_, h, _) = get(&url, &[]).await;
    assert_eq!(header(&h, "docker-content-digest"), Some(d2.as_str()));
    assert_eq!(
        (
            Counts::get(&up.counts.manifest_get),
            Counts::get(&up.counts.manifest_head)
        ),
        (2, 2)
    );
    // A tag deleted upstream is dropped: 404 as the upstream says.
    up.content
        .lock()
        .unwrap()
        .tags
        .get_mut("library/app")
        .unwrap()
        .remove("latest");
    pc.clock.advance(Duration::from_secs(301));
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
}

/// A HEAD without a digest falls back to a GET.
#[actix_rt::test]
async fn head_without_digest_falls_back_to_get() {
    let up = FakeUpstream::start();
    let (d1, _) = up.add_image("library/app", "v1", &[data(12, 100)]);
    up.knobs.head_without_digest.store(true, Ordering::SeqCst);
    let pc = Pullcache::start(&up.url());
    let url = pc.url("/v2/library/app/manifests/v1");
    assert_eq!(get(&url, &[]).await.0, StatusCode::OK);
    pc.clock.advance(Duration::from_secs(301));
    let (st, h, _) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(d1.as_str()));
    assert_eq!(Counts::get(&up.counts.manifest_get), 2);
}

/// With the upstream down, 5xx or rate-limiting, cached tags are served stale (marked with
/// Warning: 110), digests and blobs are served as always, and uncached requests fail
/// cleanly.
#[actix_rt::test]
async fn stale_tags_and_cached_content_are_served_when_the_upstream_fails() {
    let up = FakeUpstream::start();
    let (md, layers) = up.add_image("library/app", "latest", &[data(20, 50_000)]);
    let pc = Pullcache::start(&up.url());
    let tag_url = pc.url("/v2/library/app/manifests/latest");
    let blob_url = pc.url(&format!("/v2/library/app/blobs/{}", layers[0]));
    assert_eq!(get(&tag_url, &[]).await.0, StatusCode::OK);
    assert_eq!(get(&blob_url, &[]).await.0, StatusCode::OK);
    pc.wait_stored(&layers[0]).await;

    for (status, label) in [(503u64, "5xx"), (429, "rate limit")] {
        up.knobs.fail_status.store(status, Ordering::SeqCst);
        pc.clock.advance(Duration::from_secs(301));
        let (st, h, _) = get(&tag_url, &[]).await;
        assert_eq!(st, StatusCode::OK, "{label}");
        assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
        assert!(
            header(&h, "warning").unwrap().starts_with("110 "),
            "{label}: stale answer marked"
        );
        // Uncached: a clean error, relayed by cause.
        let (st, h, body) = get(&pc.url("/v2/library/other/manifests/latest"), &[]).await;
        if status == 429 {
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(error_code(&body), "TOOMANYREQUESTS");
            assert_eq!(header(&h, "retry-after"), Some("17"));
        } else {
            assert_eq!(st, StatusCode::BAD_GATEWAY);
            assert_eq!(error_code(&body), "UNAVAILABLE");
        }
    }
    up.knobs.fail_status.store(0, Ordering::SeqCst);
    up.stop().await;
    pc.clock.advance(Duration::from_secs(301));
    let (st, h, _) = get(&tag_url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(header(&h, "warning").is_some());
    let (st, _, _) = get(&pc.url(&format!("/v2/library/app/manifests/{md}")), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, body) = get(&blob_url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), layers[0]);
    let (st, _, body) = get(&pc.url("/v2/library/other/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&body), "UNAVAILABLE");
}

#[actix_rt::test]
async fn tag_list_is_paginated_with_links_to_the_cache_and_catalog_lists_cached_repos() {
    let up = FakeUpstream::start();
    for t in ["a", "b", "c", "d"] {
        up.add_image("library/app", t, &[data(30, 10)]);
    }
    up.add_image("org/tool", "1", &[data(31, 10)]);
    let pc = Pullcache::start(&up.url());
    let (st, h, body) = get(&pc.url("/v2/library/app/tags/list?n=2&ns=docker.io"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        header(&h, "link"),
        Some("</v2/library/app/tags/list?last=b&n=2&ns=docker.io>; rel=\"next\"")
    );
    let (_, h, body) = get(&pc.url("/v2/library/app/tags/list?n=2&last=b"), &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c", "d"]));
    assert!(header(&h, "link").is_none());
    let (st, _, body) = get(&pc.url("/v2/library/app/tags/list?n=x"), &[]).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "PAGINATION_NUMBER_INVALID");
    let (st, _, body) = get(&pc.url("/v2/library/nothing/tags/list"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "NAME_UNKNOWN");

    // Catalog: only what is cached.
    let (_, _, body) = get(&pc.url("/v2/_catalog"), &[]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.unwrap()).unwrap()["repositories"],
        serde_json::json!([])
    );
    assert_eq!(
        get(&pc.url("/v2/library/app/manifests/a"), &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&pc.url("/v2/org/tool/manifests/1"), &[]).await.0,
        StatusCode::OK
    );
    let (_, h, body) = get(&pc.url("/v2/_catalog?n=1"), &[]).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.unwrap()).unwrap()["repositories"],
        serde_json::json!(["library/app"])
    );
    assert_eq!(
        header(&h, "link"),
        Some("</v2/_catalog?last=library%2Fapp&n=1>; rel=\"next\"")
    );

    // With the upstream down, the cached tags are listed.
    up.stop().await;
    let (st, _, body) = get(&pc.url("/v2/library/app/tags/list"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body.unwrap()).unwrap()["tags"],
        serde_json::json!(["a"])
    );
}
