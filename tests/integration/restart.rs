//! Data survives a restart of the real binary; leftovers of an interrupted download are
//! removed at start.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use actix_web::http::StatusCode;

use crate::common::*;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_daemon(config: &std::path::Path, port: u16) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_pullcache"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pullcache");
    let d = Daemon(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return d;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pullcache did not start listening");
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
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nroot = \"{}\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
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
    unsafe_free_sigterm(&d1);
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
fn unsafe_free_sigterm(d: &Daemon) {
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
