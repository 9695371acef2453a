//! Data survives a restart of the real binary; leftovers of an interrupted download are
//! removed at start.

use std::process::{Command, Stdio};
use std::time::Duration;

use actix_web::http::StatusCode;

use crate::common::*;

async fn start_daemon(config: &std::path::Path, port: u16) -> Daemon {
    Daemon::start(config, port, &[], None).await
}

#[actix_rt::test]
async fn cached_images_survive_a_restart_with_the_upstream_stopped() {
    let up = FakeUpstream::start();
    let (md, layers) = up.add_image(
        "library/app",
        "latest",
        &[data(70, 300_000), data(71, 1000)],
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("pullcache.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
            dir.path().join("data").display(),
            up.url()
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let d1 = start_daemon(&cfg, port).await;
    let (st, _, _) = get(&format!("{base}/v2/library/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    for l in &layers {
        let (st, _, body) = get(&format!("{base}/v2/library/app/blobs/{l}"), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&sha256(&body.unwrap()), l);
    }
    // Graceful stop (SIGTERM) flushes metadata.
    sigterm_and_wait(&d1);
    drop(d1);
    // A leftover of an interrupted download, to be cleaned up at start.
    std::fs::write(dir.path().join("data/tmp/fill-deadbeef"), b"partial").unwrap();
    up.stop().await;
    let _d2 = start_daemon(&cfg, port).await;
    assert!(!dir.path().join("data/tmp/fill-deadbeef").exists());
    let (st, h, _) = get(&format!("{base}/v2/library/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
    let (st, _, _) = get(&format!("{base}/v2/library/app/manifests/{md}"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    for l in &layers {
        let (st, _, body) = get(&format!("{base}/v2/library/app/blobs/{l}"), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&sha256(&body.unwrap()), l);
    }
}

/// Sends SIGTERM via the `kill` command (no unsafe code) and waits for the exit.
fn sigterm_and_wait(d: &Daemon) {
    let _ = Command::new("kill")
        .args(["-TERM", &d.0.id().to_string()])
        .status();
    for _ in 0..100 {
        if Command::new("kill")
            .args(["-0", &d.0.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(dir: &std::path::Path, port: u16, upstream_url: &str) -> std::path::PathBuf {
    let cfg = dir.join("pullcache.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"20s\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\nmax_size = \"1GiB\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{upstream_url}\"\ndefault = true\n",
            dir.join("data").display(),
        ),
    )
    .unwrap();
    cfg
}

/// kill -9 in the middle of a download, then a restart: the partial download is gone,
/// nothing partial is ever served, a blob file whose record was not yet durable is
/// re-hashed and kept, usage is exact again, and everything cached is served with the
/// upstream stopped.
#[actix_rt::test]
async fn kill_9_mid_download_loses_nothing_cached() {
    use futures_util::StreamExt;
    use std::sync::atomic::Ordering;
    let up = FakeUpstream::start();
    let (md, layers) = up.add_image("library/app", "latest", &[data(80, 200_000)]);
    let partial = data(81, 3_000_000);
    let pd = up.add_blob(&partial);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, &up.url());
    let base = format!("http://127.0.0.1:{port}");
    let mut d1 = start_daemon(&cfg, port).await;
    assert_eq!(
        get(&format!("{base}/v2/library/app/manifests/latest"), &[])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{base}/v2/library/app/blobs/{}", layers[0]), &[])
            .await
            .0,
        StatusCode::OK
    );
    // A download held mid-way by the upstream, with a client reading it.
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let mut resp = client()
        .get(format!("{base}/v2/library/app/blobs/{pd}"))
        .send()
        .await
        .unwrap();
    let _ = resp.next().await;
    assert!(
        std::fs::read_dir(dir.path().join("data/tmp"))
            .unwrap()
            .count()
            > 0,
        "a download in progress"
    );
    d1.0.kill().unwrap(); // SIGKILL
    d1.0.wait().unwrap();
    drop(resp);
    // A verified blob file whose metadata record never became durable (a crash between
    // rename and record): put one in place by hand.
    let orphan = data(82, 5000);
    let od = sha256(&orphan);
    let op = dir
        .path()
        .join("data/blobs/sha256")
        .join(&od[7..9])
        .join(&od[7..]);
    std::fs::create_dir_all(op.parent().unwrap()).unwrap();
    std::fs::write(&op, &orphan).unwrap();
    // And a corrupt one.
    let fake = sha256(b"expected content");
    let fp = dir
        .path()
        .join("data/blobs/sha256")
        .join(&fake[7..9])
        .join(&fake[7..]);
    std::fs::create_dir_all(fp.parent().unwrap()).unwrap();
    std::fs::write(&fp, b"corrupt").unwrap();
    up.stop().await;
    let _d2 = start_daemon(&cfg, port).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("data/tmp"))
            .unwrap()
            .count(),
        0,
        "leftovers removed"
    );
    let dir_path = dir.path().to_path_buf();
    crate::blobs::wait_for(|| {
        !dir_path
            .join("data/blobs/sha256")
            .join(&fake[7..9])
            .join(&fake[7..])
            .exists()
    })
    .await;
    // The partial blob is not served (and with the upstream down it cannot be fetched).
    let (st, _, _) = get(&format!("{base}/v2/library/app/blobs/{pd}"), &[]).await;
    assert_ne!(st, StatusCode::OK);
    // Everything cached is served; the orphan was recovered.
    let (st, h, _) = get(&format!("{base}/v2/library/app/manifests/latest"), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(header(&h, "docker-content-digest"), Some(md.as_str()));
    let (st, _, body) = get(&format!("{base}/v2/library/app/blobs/{}", layers[0]), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), layers[0]);
    // Usage is exact: /readyz reports the bytes of the verified blobs on disk.
    let expected: u64 = 200_000 + orphan.len() as u64;
    let mut usage = 0;
    for _ in 0..100 {
        let (_, _, body) = get(&format!("{base}/readyz"), &[]).await;
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        usage = v["storage"]["usage_bytes"].as_u64().unwrap_or(0);
        if usage >= expected {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    // The config blob of the image was never fetched; the layer and the orphan are stored.
    assert_eq!(usage, expected);
}

/// SIGTERM: pullcache stops accepting but lets an in-flight download finish.
#[actix_rt::test]
async fn sigterm_lets_in_flight_responses_finish() {
    use futures_util::StreamExt;
    use std::sync::atomic::Ordering;
    let up = FakeUpstream::start();
    let blob = data(90, 1_000_000);
    let bd = up.add_blob(&blob);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), port, &up.url());
    let d = start_daemon(&cfg, port).await;
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let mut resp = client()
        .get(format!("http://127.0.0.1:{port}/v2/library/x/blobs/{bd}"))
        .send()
        .await
        .unwrap();
    let mut got = resp.next().await.unwrap().unwrap().to_vec();
    let _ = Command::new("kill")
        .args(["-TERM", &d.0.id().to_string()])
        .status();
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    up.open_gate();
    while let Some(c) = resp.next().await {
        got.extend_from_slice(&c.expect("the in-flight response completes"));
    }
    assert_eq!(sha256(&got), bd);
    sigterm_and_wait(&d);
}
