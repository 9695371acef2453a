//! TLS on pullcache's listeners: the versions accepted and refused, mutual TLS on the
//! metrics listener, and certificates replaced on disk while it runs. Certificates come
//! from `pullcache certs` itself.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pullcache::certs::{generate, CertsArgs};
use pullcache::tls::{MinVersion, TlsSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::common::*;

fn certs(dir: &Path) {
    generate(&CertsArgs {
        out: dir.to_path_buf(),
        hosts: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        client_name: "prometheus".into(),
        days: 30,
        renew: false,
        force: false,
    })
    .unwrap();
}

fn server_tls(dir: &Path) -> TlsSettings {
    TlsSettings {
        cert: Some(dir.join("server.crt")),
        key: Some(dir.join("server.key")),
        ..TlsSettings::default()
    }
}

/// A client trusting `ca_dir`'s CA only, speaking only `versions`, with the client
/// certificate of `client_dir` if given.
fn tls_client(
    ca_dir: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_dir: Option<&Path>,
) -> awc::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client_dir {
        None => b.with_no_client_auth(),
        Some(d) => {
            let chain = CertificateDer::pem_file_iter(d.join("client.crt"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(d.join("client.key")).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(Arc::new(cfg)))
        .timeout(Duration::from_secs(10))
        .finish()
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// GET `url` with `client`: the status and body, or the error (a refused handshake).
async fn fetch(client: &awc::Client, url: &str) -> Result<(u16, bytes::Bytes), String> {
    let mut r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let body = r.body().limit(64 << 20).await.map_err(|e| e.to_string())?;
    Ok((r.status().as_u16(), body))
}

/// What a TLS 1.0 or 1.1 client sends first: a ClientHello with legacy version `minor`
/// (1 = TLS 1.0, 2 = TLS 1.1), CBC suites and no `supported_versions` extension.
fn old_client_hello(minor: u8) -> Vec<u8> {
    let mut body = vec![0x03, minor];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two CBC suites
    body.extend([0x01, 0x00]); // no compression
    let mut hs = vec![0x01, 0, 0, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01, 0, hs.len() as u8];
    rec.extend(hs);
    rec
}

/// The first bytes the server answers `hello` with (empty if it just closes).
fn answer_to(addr: &str, hello: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hello).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    buf[..n].to_vec()
}

#[actix_rt::test]
async fn tls_1_2_and_1_3_are_served_and_older_versions_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let up = FakeUpstream::start();
    let layer = data(71, 300_000);
    let (_, digests) = up.add_image("library/tls", "1", std::slice::from_ref(&layer));
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.server.tls = server_tls(dir.path())
    });
    assert!(pc.base.starts_with("https://"), "{}", pc.base);
    let blob = pc.url(&format!("/v2/library/tls/blobs/{}", digests[0]));
    for versions in [TLS12, TLS13] {
        let c = tls_client(dir.path(), versions, None);
        let (status, body) = fetch(&c, &blob).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), digests[0], "blob bytes through TLS");
        // Cached now: the second one comes from disk, through TLS (no sendfile).
        let (status, body) = fetch(&c, &blob).await.unwrap();
        assert_eq!((status, sha256(&body)), (200, digests[0].clone()));
    }
    let addr = pc.base.trim_start_matches("https://").to_string();
    for minor in [1, 2] {
        let a = answer_to(&addr, &old_client_hello(minor));
        // A fatal alert (content type 21), never a ServerHello (22).
        assert!(
            a.is_empty() || a[0] == 0x15,
            "TLS 1.{} hello answered {a:?}",
            minor - 1
        );
        assert!(
            a.first() != Some(&0x16),
            "TLS 1.{} got a handshake",
            minor - 1
        );
    }
    // Plain HTTP on the TLS port gets no HTTP answer.
    let a = answer_to(&addr, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!a.starts_with(b"HTTP/"), "{a:?}");
    // Still serving after all that.
    let c = tls_client(dir.path(), BOTH, None);
    assert_eq!(fetch(&c, &pc.url("/v2/")).await.unwrap().0, 200);
    // A client that does not trust the CA refuses pullcache's certificate.
    let other = tempfile::tempdir().unwrap();
    certs(other.path());
    assert!(
        fetch(&tls_client(other.path(), BOTH, None), &pc.url("/v2/"))
            .await
            .is_err()
    );
}

#[actix_rt::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.server.tls = TlsSettings {
            min_version: MinVersion::Tls13,
            ..server_tls(dir.path())
        }
    });
    assert!(fetch(&tls_client(dir.path(), TLS12, None), &pc.url("/v2/"))
        .await
        .is_err());
    let (status, _) = fetch(&tls_client(dir.path(), TLS13, None), &pc.url("/v2/"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[actix_rt::test]
async fn the_mtls_metrics_listener_wants_a_client_certificate_from_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let stranger = tempfile::tempdir().unwrap();
    certs(stranger.path());
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.metrics.tls = TlsSettings {
            client_ca: Some(dir.path().join("ca.crt")),
            ..server_tls(dir.path())
        }
    });
    assert!(pc.metrics_base.starts_with("https://"));
    let url = format!("{}/metrics", pc.metrics_base);
    // No client certificate: refused (in TLS 1.3 the alert may come after the client
    // thinks the handshake is done: then the request fails instead).
    for versions in [TLS12, TLS13] {
        let r = fetch(&tls_client(dir.path(), versions, None), &url).await;
        assert!(r.is_err(), "no client certificate: {r:?}");
    }
    // A client certificate from another CA: refused too.
    let mut roots_from_dir = tls_client(dir.path(), BOTH, Some(stranger.path()));
    let r = fetch(&roots_from_dir, &url).await;
    assert!(r.is_err(), "a stranger's certificate: {r:?}");
    // Signed by client_ca: served.
    roots_from_dir = tls_client(dir.path(), BOTH, Some(dir.path()));
    let (status, body) = fetch(&roots_from_dir, &url).await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("registry_http_requests_total"));
    // The registry port is still plain HTTP, and served.
    assert_eq!(get(&pc.url("/v2/"), &[]).await.0, 200);
}

/// Replaces `dst` by `src`'s content the way a renewal tool does: a new file renamed over.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[actix_rt::test]
async fn certificates_are_reloaded_when_their_files_change() {
    let live = tempfile::tempdir().unwrap();
    certs(live.path());
    let renewed = tempfile::tempdir().unwrap();
    certs(renewed.path());
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.server.tls = server_tls(live.path())
    });
    let url = pc.url("/v2/");
    let old_ca = tls_client(live.path(), BOTH, None);
    let new_ca = tls_client(renewed.path(), BOTH, None);
    assert_eq!(fetch(&old_ca, &url).await.unwrap().0, 200);
    assert!(fetch(&new_ca, &url).await.is_err());

    // A certificate from another CA replaces the files: new connections get it.
    replace(
        &renewed.path().join("server.key"),
        &live.path().join("server.key"),
    );
    replace(
        &renewed.path().join("server.crt"),
        &live.path().join("server.crt"),
    );
    let mut reloaded = false;
    for _ in 0..50 {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        // A fresh client each time: a pooled connection keeps the old session.
        if fetch(&tls_client(renewed.path(), BOTH, None), &url)
            .await
            .is_ok()
        {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the new certificate was not served within 10 s");
    assert!(fetch(&tls_client(live.path(), BOTH, None), &url)
        .await
        .is_err());

    // A broken file (half written, not PEM) keeps the certificate that works.
    std::fs::write(live.path().join("server.crt"), "-----BEGIN CERTIF").unwrap();
    actix_rt::time::sleep(pullcache::tls::POLL * 3).await;
    let (status, _) = fetch(&tls_client(renewed.path(), BOTH, None), &url)
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[test]
fn tls_settings_errors_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let other = tempfile::tempdir().unwrap();
    certs(other.path());
    let d = dir.path();
    let cases = [
        (
            TlsSettings {
                cert: Some(d.join("server.crt")),
                ..Default::default()
            },
            "server.tls.key",
        ),
        (
            TlsSettings {
                cert: Some(d.join("nope.crt")),
                key: Some(d.join("server.key")),
                ..Default::default()
            },
            "server.tls.cert",
        ),
        (
            TlsSettings {
                cert: Some(d.join("server.crt")),
                key: Some(other.path().join("server.key")),
                ..Default::default()
            },
            "server.tls.key",
        ),
        (
            TlsSettings {
                cert: Some(d.join("server.crt")),
                key: Some(d.join("server.crt")),
                ..Default::default()
            },
            "server.tls.key",
        ),
        (
            TlsSettings {
                client_ca: Some(d.join("ca.crt")),
                ..Default::default()
            },
            "server.tls.client_ca",
        ),
    ];
    for (s, key) in cases {
        let e = s.validate("server.tls").unwrap_err();
        assert!(e.starts_with(key), "{key}: {e}");
    }
    assert!(server_tls(d).validate("server.tls").is_ok());
}

/// Upstream TLS, against pullcache itself serving HTTPS in front of the fake upstream:
/// a private CA through `ca`, a client certificate for an upstream that wants one, and
/// `insecure_skip_verify`; without them the upstream is not trusted.
#[actix_rt::test]
async fn upstreams_behind_a_private_ca_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let up = FakeUpstream::start();
    let (_, layers) = up.add_image("library/private", "1", &[data(88, 4000)]);
    // The "private registry": HTTPS, wanting client certificates from our CA.
    let private = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.server.tls = TlsSettings {
            client_ca: Some(dir.path().join("ca.crt")),
            ..server_tls(dir.path())
        }
    });
    let url = private.base.replace("127.0.0.1", "localhost");
    let path = format!("/v2/library/private/blobs/{}", layers[0]);
    let mirror = |f: &dyn Fn(&mut pullcache_actors::UpstreamSettings)| {
        let mut u = upstream("docker.io", &url, true, None);
        f(&mut u);
        Pullcache::start_with(vec![u])
    };
    let ca = Some(dir.path().join("ca.crt"));
    let cert = Some(dir.path().join("client.crt"));
    let key = Some(dir.path().join("client.key"));
    for (what, pc, ok) in [
        ("no ca", mirror(&|_| {}), false),
        (
            "ca, no client certificate",
            mirror(&|u| u.ca = ca.clone()),
            false,
        ),
        (
            "ca and client certificate",
            mirror(&|u| {
                u.ca = ca.clone();
                u.client_cert = cert.clone();
                u.client_key = key.clone();
            }),
            true,
        ),
        (
            "insecure_skip_verify and client certificate",
            mirror(&|u| {
                u.insecure_skip_verify = true;
                u.client_cert = cert.clone();
                u.client_key = key.clone();
            }),
            true,
        ),
    ] {
        let (st, _, body) = get(&pc.url(&path), &[]).await;
        if ok {
            assert_eq!(st, 200, "{what}");
            assert_eq!(sha256(&body.unwrap()), layers[0], "{what}");
        } else {
            assert!(st.is_server_error(), "{what}: {st}");
        }
    }
}
