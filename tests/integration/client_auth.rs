//! Client authentication (`[auth]`): htpasswd users, the failure delay that does not hold
//! up anyone else, reloading the file, anonymous reads, the access rules, a redacted
//! `/readyz`, and no secret in any log line.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::FutureExt;
use pullcache::auth::{file, AuthRule, AuthSettings};

use crate::common::*;

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn users(path: &Path, entries: &[(&str, &str)]) {
    for (u, p) in entries {
        file::add(path, u, p).unwrap();
    }
}

async fn status(url: &str, auth: Option<&str>) -> u16 {
    let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    get(url, &h).await.0.as_u16()
}

#[actix_rt::test]
async fn htpasswd_users_pull_and_wrong_credentials_wait_without_holding_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    users(&ht, &[("alice", "wonderland")]);
    let up = FakeUpstream::start();
    let (md, layers) = up.add_image("library/app", "1", &[data(5, 1000)]);
    let delay = Duration::from_secs(3);
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.auth = AuthSettings {
            htpasswd: Some(ht.clone()),
            fail_delay: delay,
            ..AuthSettings::default()
        }
    });
    let alice = basic("alice", "wonderland");
    let manifest = pc.url("/v2/library/app/manifests/1");
    let blob = pc.url(&format!("/v2/library/app/blobs/{}", layers[0]));

    // No credentials: the challenge, at once (the first step of every client).
    for url in [pc.url("/v2/"), manifest.clone(), blob.clone()] {
        let (s, h, body) = get(&url, &[]).await;
        assert_eq!(s, 401, "{url}");
        assert_eq!(
            header(&h, "www-authenticate"),
            Some("Basic realm=\"pullcache\", charset=\"UTF-8\"")
        );
        assert_eq!(error_code(&body), "UNAUTHORIZED");
    }
    assert_eq!(status(&pc.url("/v2/"), Some(&alice)).await, 200);
    let (s, h, _) = get(&manifest, &[("Authorization", &alice)]).await;
    assert_eq!(s, 200);
    assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
    let (s, _, body) = get(&blob, &[("Authorization", &alice)]).await;
    assert_eq!(
        (s.as_u16(), sha256(&body.unwrap())),
        (200, layers[0].clone())
    );
    // Nothing was fetched for the refused requests.
    assert_eq!(Counts::get(&up.counts.blob_get), 1);

    // A wrong password, an unknown user, garbage: 401 after the delay. Meanwhile a
    // right one is answered: the delay holds that request only.
    for bad in [
        basic("alice", "looking-glass"),
        basic("mallory", "wonderland"),
        "Basic !!!not-base64".to_string(),
        "Bearer abc".to_string(),
    ] {
        let started = Instant::now();
        let mut failing = Box::pin(status(&manifest, Some(&bad)));
        // Give the bad request time to reach its delay, then ask with good credentials.
        let good = async {
            actix_rt::time::sleep(Duration::from_millis(200)).await;
            status(&manifest, Some(&alice)).await
        };
        let mut good = Box::pin(good);
        let first = futures_util::future::select(&mut failing, &mut good).await;
        match first {
            futures_util::future::Either::Right((s, _)) => assert_eq!(s, 200),
            futures_util::future::Either::Left((s, _)) => {
                panic!("{bad}: the failure ({s}) came before a good request was served")
            }
        }
        assert!(failing.as_mut().now_or_never().is_none(), "{bad}");
        assert_eq!(failing.await, 401, "{bad}");
        assert!(
            started.elapsed() >= delay,
            "{bad}: answered before fail_delay"
        );
    }
}

#[actix_rt::test]
async fn the_htpasswd_file_is_reloaded_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    users(&ht, &[("alice", "one")]);
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.auth = AuthSettings {
            htpasswd: Some(ht.clone()),
            fail_delay: Duration::from_millis(10),
            ..AuthSettings::default()
        }
    });
    let url = pc.url("/v2/");
    assert_eq!(status(&url, Some(&basic("alice", "one"))).await, 200);
    assert_eq!(status(&url, Some(&basic("bob", "two"))).await, 401);

    // bob is added and alice's password changes: both take effect, the old password
    // (remembered after its first check) is forgotten.
    users(&ht, &[("bob", "two"), ("alice", "new")]);
    let mut ok = false;
    for _ in 0..50 {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        if status(&url, Some(&basic("bob", "two"))).await == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "bob was not accepted within 10 s");
    assert_eq!(status(&url, Some(&basic("alice", "one"))).await, 401);
    assert_eq!(status(&url, Some(&basic("alice", "new"))).await, 200);

    // A file that does not load (an MD5 entry) keeps the users loaded before.
    std::fs::write(&ht, "carol:$apr1$xyz$abcdefghijklmnopqrstuv\n").unwrap();
    actix_rt::time::sleep(pullcache::watch::POLL * 3).await;
    assert_eq!(status(&url, Some(&basic("bob", "two"))).await, 200);
}

#[actix_rt::test]
async fn rules_anonymous_reads_catalog_and_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    users(&ht, &[("alice", "a"), ("bob", "b")]);
    let up = FakeUpstream::start();
    for repo in ["library/alpine", "library/busybox", "myorg/app"] {
        up.add_image(repo, "1", &[data(repo.len() as u64, 100)]);
    }
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.auth = AuthSettings {
            htpasswd: Some(ht.clone()),
            fail_delay: Duration::from_millis(10),
            anonymous_read: true,
            groups: [("ci".to_string(), vec!["bob".to_string()])].into(),
            rules: vec![
                AuthRule {
                    users: vec!["*".into()],
                    groups: vec![],
                    upstreams: vec!["*".into()],
                    repositories: vec!["library/*".into()],
                },
                AuthRule {
                    users: vec![],
                    groups: vec!["ci".into()],
                    upstreams: vec!["docker.io".into()],
                    repositories: vec!["myorg/**".into()],
                },
                AuthRule {
                    users: vec!["anonymous".into()],
                    groups: vec![],
                    upstreams: vec!["*".into()],
                    repositories: vec!["library/alpine".into()],
                },
            ],
            ..AuthSettings::default()
        }
    });
    let m = |repo: &str| pc.url(&format!("/v2/{repo}/manifests/1"));
    let (alice, bob) = (basic("alice", "a"), basic("bob", "b"));
    // Anonymous: /v2/ and alpine yes; busybox asks for credentials.
    assert_eq!(status(&pc.url("/v2/"), None).await, 200);
    assert_eq!(status(&m("alpine"), None).await, 200);
    let (s, h, _) = get(&m("busybox"), &[]).await;
    assert_eq!(s, 401);
    assert!(header(&h, "www-authenticate").is_some());
    // Users: library/* for everyone signed in; myorg/** for the ci group only.
    assert_eq!(status(&m("busybox"), Some(&alice)).await, 200);
    let (s, _, body) = get(&m("myorg/app"), &[("Authorization", &alice)]).await;
    assert_eq!((s.as_u16(), error_code(&body)), (403, "DENIED".to_string()));
    assert_eq!(status(&m("myorg/app"), Some(&bob)).await, 200);
    assert_eq!(
        Counts::get(&up.counts.manifest_get),
        3,
        "nothing fetched for refusals"
    );

    // The catalog lists what the caller may pull.
    let catalog = |auth: Option<String>| {
        let url = pc.url("/v2/_catalog");
        async move {
            let h: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| ("Authorization", a))
                .into_iter()
                .collect();
            let (s, _, body) = get(&url, &h).await;
            assert_eq!(s, 200);
            let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
            v["repositories"].clone()
        }
    };
    assert_eq!(catalog(None).await, serde_json::json!(["library/alpine"]));
    assert_eq!(
        catalog(Some(alice.clone())).await,
        serde_json::json!(["library/alpine", "library/busybox"])
    );
    assert_eq!(
        catalog(Some(bob.clone())).await,
        serde_json::json!(["library/alpine", "library/busybox", "myorg/app"])
    );

    // /readyz: the state for anyone, the details for users.
    let (s, _, body) = get(&pc.url("/readyz"), &[]).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"ready": true, "status": "ready"}));
    let (_, _, body) = get(&pc.url("/readyz"), &[("Authorization", &alice)]).await;
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["upstreams"][0]["name"], "docker.io", "{v}");
    assert_eq!(status(&pc.url("/healthz"), None).await, 200);
}

#[test]
fn auth_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    std::fs::write(&ht, "alice:$apr1$xyz$abcdefghijklmnopqrstuv\n").unwrap();
    let md5 = AuthSettings {
        htpasswd: Some(ht.clone()),
        ..AuthSettings::default()
    };
    let e = md5.validate(&["docker.io".into()]).unwrap_err();
    assert!(
        e.starts_with("auth.htpasswd") && e.contains("only bcrypt"),
        "{e}"
    );
    users(&ht, &[]);
    std::fs::write(&ht, "").unwrap();
    users(&ht, &[("alice", "x")]);
    let rule = |upstreams: Vec<String>, groups: Vec<String>| AuthSettings {
        htpasswd: Some(ht.clone()),
        rules: vec![AuthRule {
            users: vec!["alice".into()],
            groups,
            upstreams,
            repositories: vec!["**".into()],
        }],
        ..AuthSettings::default()
    };
    let e = rule(vec!["quay.io".into()], vec![])
        .validate(&["docker.io".into()])
        .unwrap_err();
    assert!(e.contains("auth.rules[0].upstreams"), "{e}");
    let e = rule(vec!["*".into()], vec!["nobody".into()])
        .validate(&["docker.io".into()])
        .unwrap_err();
    assert!(e.contains("auth.rules[0].groups"), "{e}");
    let no_file = AuthSettings {
        anonymous_read: true,
        ..AuthSettings::default()
    };
    assert!(no_file.validate(&[]).unwrap_err().contains("auth.htpasswd"));
}

/// The real binary at debug level, with an upstream password, an htpasswd user and
/// clients sending right and wrong passwords: none of those secrets (nor the Basic value
/// carrying them, nor the bcrypt hash) is in any line it writes, nor in `check-config`.
#[actix_rt::test]
async fn no_secret_appears_in_any_log_line() {
    let up = FakeUpstream::start();
    up.add_image("library/app", "1", &[data(9, 100)]);
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    users(&ht, &[("alice", "client-secret-3141")]);
    let hash = std::fs::read_to_string(&ht).unwrap();
    let hash = hash.trim().split_once(':').unwrap().1.to_string();
    let port = free_port();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"
[storage]
root = "{root}"
max_size = "1GiB"
[metrics]
listen = ""
[log]
level = "trace"
[auth]
htpasswd = "{ht}"
fail_delay = "10ms"
[[upstreams]]
name = "docker.io"
url = "{url}"
default = true
username = "puller"
password = "upstream-secret-2718"
"#,
            root = dir.path().join("data").display(),
            ht = ht.display(),
            url = up.url(),
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr");
    let daemon = Daemon::start(&cfg, port, &[], Some(&log)).await;
    let base = format!("http://127.0.0.1:{port}");
    let good = basic("alice", "client-secret-3141");
    let bad = basic("alice", "wrong-secret-1618");
    for a in [&good, &bad] {
        for path in ["/v2/", "/v2/library/app/manifests/1", "/readyz"] {
            let _ = get(&format!("{base}{path}"), &[("Authorization", a)]).await;
        }
    }
    drop(daemon);
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_pullcache"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&log).unwrap(),
        String::from_utf8_lossy(&printed.stdout)
    );
    assert!(text.contains("library/app"), "the log has the requests");
    assert!(
        text.contains("user=\"alice\""),
        "the access log names the user: {text}"
    );
    for secret in [
        "client-secret-3141",
        "wrong-secret-1618",
        "upstream-secret-2718",
        good.trim_start_matches("Basic "),
        bad.trim_start_matches("Basic "),
        &hash,
        // The upstream credentials as Basic, as they are sent to the token endpoint.
        &base64::engine::general_purpose::STANDARD.encode("puller:upstream-secret-2718"),
    ] {
        assert!(!text.contains(secret), "{secret} is in the output");
    }
}
