//! Bad input from clients and upstreams: clear OCI errors, the daemon stays up, nothing
//! half-written is kept.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use actix_web::http::{Method, StatusCode};

use crate::common::*;

#[actix_rt::test]
async fn bad_client_input_gets_oci_errors() {
    let up = FakeUpstream::start();
    let pc = Pullcache::start(&up.url());
    let good = sha256(b"x");
    let long = "a".repeat(256);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        // Percent-encoded `/v2`: actix's router decodes it into the API scope; it is not
        // the API (it used to answer 200 `{}`).
        (
            "/%76%32/a/manifests/latest".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        ("/%76%32/".into(), StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        (
            "/v2/Upper/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/../b/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/%2e%2e/b/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a//b/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            format!("/v2/{long}/manifests/latest"),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/library/a/manifests/-bad".into(),
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            format!("/v2/library/a/manifests/{}", "t".repeat(129)),
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            "/v2/library/a/manifests/sha256:abc".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        // Parsed from the right, this names no endpoint at all.
        (
            "/v2/library/a/blobs/sha256:../../etc/passwd".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/library/a/blobs/sha256:..%2f..%2fetc%2fpasswd".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            format!(
                "/v2/library/a/blobs/{}",
                good.to_uppercase().replace("SHA256", "sha256")
            ),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/a/blobs/md5:abcdef".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/a/blobs/latest".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/a/nothing".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            format!("/v2/{}/manifests/latest", "a/".repeat(2000)),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
    ];
    for (path, status, code) in cases {
        let (st, h, body) = get(&pc.url(&path), &[]).await;
        assert_eq!(st, status, "{path}");
        assert_eq!(error_code(&body), code, "{path}");
        assert_eq!(header(&h, "content-type"), Some("application/json"));
    }
    for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let (st, _, body) = send(m.clone(), &pc.url("/v2/library/a/blobs/uploads/"), &[]).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{m}");
        assert_eq!(error_code(&body), "UNSUPPORTED");
    }
    // Nothing reached the upstream, nothing was written, and the daemon still serves.
    assert_eq!(
        Counts::get(&up.counts.manifest_get) + Counts::get(&up.counts.blob_get),
        0
    );
    let (st, _, _) = get(&pc.url("/v2/"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(pc.temp_files(), 0);
}

/// A raw-TCP upstream whose answer is chosen per request path.
fn raw_upstream(answer: fn(&str) -> Option<Vec<u8>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().take(64) {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                match answer(&path) {
                    Some(bytes) => {
                        let _ = c.write_all(&bytes);
                    }
                    // Hang: hold the connection open without answering (bounded).
                    None => std::thread::sleep(Duration::from_secs(8)),
                }
            });
        }
    });
    format!("http://{addr}")
}

#[actix_rt::test]
async fn upstream_garbage_wrong_length_and_hangs_are_clean_errors() {
    let url = raw_upstream(|path| {
        if path.contains("/manifests/garbage") {
            Some(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>"
                    .to_vec(),
            )
        } else if path.contains("/manifests/notjson") {
            Some(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 5\r\n\r\nhello".to_vec())
        } else if path.contains("/manifests/hang") || path.contains("/blobs/sha256:1111") {
            None
        } else if path.contains("/blobs/") {
            // Promises 100000 bytes, sends 10, closes.
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789".to_vec())
        } else if path.contains("/manifests/babble") {
            Some(b"this is not HTTP at all\r\n\r\n".to_vec())
        } else {
            Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec())
        }
    });
    let pc = Pullcache::start(&url);
    let (st, _, body) = get(&pc.url("/v2/library/a/manifests/garbage"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "an HTML page is not a manifest");
    assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
    // A manifest-typed body that is not JSON is stored as bytes under its digest: the
    // upstream's bytes are served unchanged (clients verify them); what matters is that it
    // is a clean answer. Malformed HTTP is a 502.
    let (st, _, body) = get(&pc.url("/v2/library/a/manifests/babble"), &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    let (st, _, body) = get(&pc.url("/v2/library/a/manifests/hang"), &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    // A short body: the client's connection is aborted (never a clean, truncated 200) and
    // nothing is stored.
    let d = sha256(b"short");
    let (_, _, body) = get(&pc.url(&format!("/v2/library/a/blobs/{d}")), &[]).await;
    if let Ok(b) = body {
        assert!(
            b.len() < 100_000,
            "a truncated body was delivered as complete"
        );
    }
    crate::blobs::wait_for(|| pc.temp_files() == 0).await;
    assert!(!pc.blob_path(&d).exists());
    // A hanging blob upstream: a clean 504 before any byte.
    let d = format!("sha256:{}", "1".repeat(64));
    let (st, _, body) = get(&pc.url(&format!("/v2/library/a/blobs/{d}")), &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    // Still serving.
    let (st, _, _) = get(&pc.url("/v2/"), &[]).await;
    assert_eq!(st, StatusCode::OK);
}

#[actix_rt::test]
async fn unreachable_upstream_fails_fast_with_502() {
    // A port nothing listens on.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let pc = Pullcache::start(&url);
    let (st, _, body) = get(&pc.url("/v2/library/a/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&body), "UNAVAILABLE");
    let (st, _, _) = get(
        &pc.url(&format!("/v2/library/a/blobs/{}", sha256(b"x"))),
        &[],
    )
    .await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
}
