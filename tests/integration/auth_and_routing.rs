//! Upstream token auth and redirects; routing by ns=, prefix and default; upstreams'
//! repositories never mix.

use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;

use crate::common::*;

/// A token-protected upstream that redirects blobs to another origin: pullcache fetches a
/// token once per repository, and never sends Authorization to the redirect target.
#[actix_rt::test]
async fn token_auth_and_cross_origin_redirects() {
    let up = FakeUpstream::start();
    up.knobs.require_token.store(true, Ordering::SeqCst);
    up.knobs.redirect_blobs.store(true, Ordering::SeqCst);
    let (md, layers) = up.add_image("library/secure", "1", &[data(40, 200_000), data(41, 1000)]);
    let pc = Pullcache::start(&up.url());
    let (st, h, _) = get(&pc.url("/v2/library/secure/manifests/1"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
    for l in &layers {
        let (st, _, body) = get(&pc.url(&format!("/v2/library/secure/blobs/{l}")), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&sha256(&body.unwrap()), l);
    }
    assert_eq!(Counts::get(&up.counts.cdn_get), 2);
    assert_eq!(
        Counts::get(&up.counts.cdn_with_authorization),
        0,
        "Authorization leaked to the redirect target"
    );
    assert_eq!(
        Counts::get(&up.counts.token),
        1,
        "one token for the repository, then cached"
    );
    // Only the first request met a challenge; later ones carried the cached token.
    assert_eq!(Counts::get(&up.counts.unauthorized), 1);
}

/// Docker Hub answers anonymous requests for missing or private repositories with 401; the
/// cache answers 404 NAME_UNKNOWN and never relays a challenge.
#[actix_rt::test]
async fn upstream_401_becomes_404_never_a_challenge() {
    let up = FakeUpstream::start();
    up.knobs.require_token.store(true, Ordering::SeqCst);
    up.add_image("private/app", "latest", &[data(45, 100)]);
    let pc = Pullcache::start(&up.url());
    // The upstream answers 401 even after a fresh token (a private or missing repository):
    // the client gets 404 NAME_UNKNOWN and never a challenge.
    let (st, h, body) = get(&pc.url("/v2/private/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(header(&h, "www-authenticate").is_none());
    assert_eq!(error_code(&body), "NAME_UNKNOWN");
    assert!(
        Counts::get(&up.counts.unauthorized) >= 2,
        "the upstream did refuse, twice"
    );
    assert_eq!(Counts::get(&up.counts.manifest_get), 0);
    // A repository the upstream simply lacks is 404 MANIFEST_UNKNOWN.
    let (st, _, body) = get(&pc.url("/v2/library/ghost/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "MANIFEST_UNKNOWN");
}

/// ns= picks the upstream named so; a prefix routes too; the same repository name on two
/// upstreams is two different repositories in the cache.
#[actix_rt::test]
async fn routing_by_ns_prefix_and_default_keeps_upstreams_apart() {
    let hub = FakeUpstream::start();
    let ghcr = FakeUpstream::start();
    let (hub_md, _) = hub.add_image("org/app", "1", &[data(50, 100)]);
    let (ghcr_md, _) = ghcr.add_image("org/app", "1", &[data(51, 100)]);
    assert_ne!(hub_md, ghcr_md);
    let pc = Pullcache::start_with(vec![
        upstream("docker.io", &hub.url(), true, Some("docker")),
        upstream("ghcr.io", &ghcr.url(), false, Some("ghcr")),
    ]);
    let digest =
        |h: &awc::http::header::HeaderMap| header(h, "docker-content-digest").unwrap().to_string();
    let (_, h, _) = get(&pc.url("/v2/org/app/manifests/1"), &[]).await;
    assert_eq!(digest(&h), hub_md);
    let (_, h, _) = get(&pc.url("/v2/org/app/manifests/1?ns=ghcr.io"), &[]).await;
    assert_eq!(digest(&h), ghcr_md);
    let (_, h, _) = get(&pc.url("/v2/ghcr/org/app/manifests/1"), &[]).await;
    assert_eq!(digest(&h), ghcr_md);
    let (_, h, _) = get(&pc.url("/v2/org/app/manifests/1?ns=docker.io"), &[]).await;
    assert_eq!(digest(&h), hub_md);
    let (_, h, _) = get(&pc.url("/v2/docker/org/app/manifests/1"), &[]).await;
    assert_eq!(digest(&h), hub_md);
    // Each upstream served its manifest once.
    assert_eq!(Counts::get(&hub.counts.manifest_get), 1);
    assert_eq!(Counts::get(&ghcr.counts.manifest_get), 1);
    // An ns= that is not configured is refused (no open proxy).
    let (st, _, body) = get(&pc.url("/v2/org/app/manifests/1?ns=evil.example"), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "NAME_UNKNOWN");
}

/// A blob cached through one upstream is served through another only after that upstream
/// confirms it has it.
#[actix_rt::test]
async fn a_blob_cached_for_one_upstream_needs_the_others_confirmation() {
    let hub = FakeUpstream::start();
    let other = FakeUpstream::start();
    let shared = data(60, 10_000);
    let d = hub.add_blob(&shared);
    let pc = Pullcache::start_with(vec![
        upstream("docker.io", &hub.url(), true, None),
        upstream("private.example", &other.url(), false, Some("priv")),
    ]);
    let (st, _, _) = get(&pc.url(&format!("/v2/library/a/blobs/{d}")), &[]).await;
    assert_eq!(st, StatusCode::OK);
    pc.wait_stored(&d).await;
    // The other upstream does not have it: 404, although the bytes are on disk.
    let (st, _, body) = get(&pc.url(&format!("/v2/priv/a/blobs/{d}")), &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "BLOB_UNKNOWN");
    // Once it has it, the cached bytes are served without a download.
    other.add_blob(&shared);
    let (st, _, body) = get(&pc.url(&format!("/v2/priv/a/blobs/{d}")), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(Counts::get(&other.counts.blob_get), 0);
    assert_eq!(Counts::get(&other.counts.blob_head), 2);
}

/// `server.listen = "localhost:0"` listens on every address localhost resolves to that can
/// be bound here (IPv4 and, where configured, IPv6), and each of them answers. (Where
/// localhost has a single address, only that one is checked.)
#[actix_rt::test]
async fn listens_on_every_address_the_name_resolves_to() {
    use std::net::ToSocketAddrs;
    let up = FakeUpstream::start();
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config(
        root.path(),
        vec![upstream("docker.io", &up.url(), true, Some("docker"))],
    );
    cfg.server.listen = "localhost:0".into();
    let bindable = "localhost:0"
        .to_socket_addrs()
        .unwrap()
        .filter(|a| std::net::TcpListener::bind(a).is_ok())
        .count();
    let running = pullcache::server::start(&cfg, pullcache_actors::Clock::manual(), false).unwrap();
    let handle = running.server.handle();
    actix_rt::spawn(running.server);
    assert_eq!(running.addrs.len(), bindable, "{:?}", running.addrs);
    assert!(
        running.addrs.iter().any(|a| a.is_ipv4()),
        "{:?}",
        running.addrs
    );
    for a in &running.addrs {
        let (st, _, _) = get(&format!("http://{a}/v2/"), &[]).await;
        assert_eq!(st, StatusCode::OK, "{a}");
    }
    handle.stop(false).await;
}

/// `redirect_hosts`: a redirect to a host not listed is refused (nothing is fetched from
/// it, and the client gets an error, not the bytes), a listed one is followed.
#[actix_rt::test]
async fn redirect_targets_follow_redirect_hosts() {
    let up = FakeUpstream::start();
    up.knobs.redirect_blobs.store(true, Ordering::SeqCst);
    let (_, layers) = up.add_image("library/redir", "1", &[data(42, 5000)]);
    // The upstream by name ("localhost"); its redirects go to 127.0.0.1, another host.
    let by_name = up.url().replace("127.0.0.1", "localhost");
    let path = format!("/v2/library/redir/blobs/{}", layers[0]);
    for (hosts, followed) in [
        (vec!["cdn.example.com".to_string()], false),
        (
            vec!["*.example.com".to_string(), "127.0.0.1".to_string()],
            true,
        ),
    ] {
        let mut u = upstream("docker.io", &by_name, true, None);
        u.redirect_hosts = hosts.clone();
        let pc = Pullcache::start_with(vec![u]);
        let before = Counts::get(&up.counts.cdn_get);
        let (st, _, body) = get(&pc.url(&path), &[]).await;
        if followed {
            assert_eq!(st, StatusCode::OK, "{hosts:?}");
            assert_eq!(sha256(&body.unwrap()), layers[0]);
            assert_eq!(Counts::get(&up.counts.cdn_get), before + 1);
        } else {
            assert!(st.is_server_error(), "{hosts:?}: {st}");
            assert_eq!(Counts::get(&up.counts.cdn_get), before, "{hosts:?}");
        }
    }
}
