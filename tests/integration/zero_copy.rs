//! Blob bodies sent with sendfile: the bytes, ranges, keep-alive and pipelined requests on
//! one connection, and the copying path when zero-copy is off.

use actix_web::http::StatusCode;
use std::io::{Read, Write};

use crate::common::*;

fn sent(pc: &Pullcache) -> u64 {
    pc.zero_copy.sent()
}

/// A pullcache with one blob of `len` seeded bytes, pulled once and recorded.
struct Cached {
    _up: FakeUpstream,
    pc: Pullcache,
    blob: Vec<u8>,
    digest: String,
    url: String,
}

async fn cached_blob(seed: u64, len: usize) -> Cached {
    let up = FakeUpstream::start();
    let blob = data(seed, len);
    let digest = up.add_blob(&blob);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{digest}"));
    let (st, _, _) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    pc.wait_stored(&digest).await;
    Cached {
        _up: up,
        pc,
        blob,
        digest,
        url,
    }
}

/// host:port of the server, for raw-socket clients.
fn addr(pc: &Pullcache) -> String {
    pc.base.trim_start_matches("http://").to_string()
}

/// A cached blob, whole and in ranges, goes out with sendfile byte for byte; a small one is
/// copied (one write with the head).
#[actix_rt::test]
async fn cached_blobs_and_ranges_are_sent_with_sendfile() {
    let up = FakeUpstream::start();
    let blob = data(71, 3 * 1024 * 1024 + 5);
    let small = data(72, 1000);
    let d = up.add_blob(&blob);
    let ds = up.add_blob(&small);
    let pc = Pullcache::start(&up.url());
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));

    // Cold: streamed from the growing file with sendfile too.
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(sent(&pc), blob.len() as u64);
    pc.wait_stored(&d).await;

    // Warm, whole.
    let before = sent(&pc);
    let (st, h, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        header(&h, "content-length"),
        Some(blob.len().to_string().as_str())
    );
    assert!(header(&h, "transfer-encoding").is_none());
    assert_eq!(sha256(&body.unwrap()), d);
    assert_eq!(sent(&pc) - before, blob.len() as u64);

    // Warm, a range in the middle and a suffix.
    for (range, lo, hi) in [
        ("bytes=1048576-2097151", 1_048_576, 2_097_152),
        ("bytes=-100000", blob.len() - 100_000, blob.len()),
    ] {
        let before = sent(&pc);
        let (st, _, body) = get(&url, &[("Range", range)]).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT);
        assert_eq!(body.unwrap(), blob[lo..hi], "{range}");
        assert_eq!(sent(&pc) - before, (hi - lo) as u64, "{range}");
    }

    // Small: copied.
    let before = sent(&pc);
    let (st, _, body) = get(&pc.url(&format!("/v2/library/x/blobs/{ds}")), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.unwrap(), small);
    assert_eq!(sent(&pc), before);
}

/// Several requests pipelined on one keep-alive connection (HEAD, sendfile GETs, a copied
/// small GET, a 404, a range) get their answers in order with exact bodies.
#[actix_rt::test]
async fn pipelined_requests_on_one_connection_stay_in_order() {
    let up = FakeUpstream::start();
    let a = data(73, 1024 * 1024 + 3);
    let b = data(74, 200_000);
    let small = data(75, 500);
    let (da, db, ds) = (up.add_blob(&a), up.add_blob(&b), up.add_blob(&small));
    let pc = Pullcache::start(&up.url());
    for d in [&da, &db, &ds] {
        let (st, _, _) = get(&pc.url(&format!("/v2/library/x/blobs/{d}")), &[]).await;
        assert_eq!(st, StatusCode::OK);
        pc.wait_stored(d).await;
    }
    let missing = format!("sha256:{}", "0".repeat(64));
    let addr = addr(&pc);
    let reqs: Vec<(&str, String, Option<&str>)> = vec![
        ("HEAD", da.clone(), None),
        ("GET", da.clone(), None),
        ("GET", ds.clone(), None),
        ("GET", db.clone(), Some("bytes=100-199")),
        ("GET", missing.clone(), None),
        ("GET", db.clone(), None),
        ("GET", da.clone(), Some("bytes=-20000")),
    ];
    let mut wire = String::new();
    for (m, d, range) in &reqs {
        wire.push_str(&format!(
            "{m} /v2/library/x/blobs/{d} HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
            range.map_or(String::new(), |r| format!("Range: {r}\r\n"))
        ));
    }
    let n = reqs.len();
    let responses = actix_web::rt::task::spawn_blocking(move || read_responses(&addr, &wire, n))
        .await
        .unwrap();
    let expect: Vec<(u16, Vec<u8>)> = vec![
        (200, vec![]),
        (200, a.clone()),
        (200, small.clone()),
        (206, b[100..200].to_vec()),
        (404, vec![]),
        (200, b.clone()),
        (206, a[a.len() - 20000..].to_vec()),
    ];
    for (i, ((st, body), (est, ebody))) in responses.iter().zip(&expect).enumerate() {
        assert_eq!(st, est, "response {i}");
        if *est != 404 {
            assert_eq!(body.len(), ebody.len(), "response {i}");
            assert!(body == ebody, "response {i} bytes");
        }
    }
}

/// Writes `wire` (pipelined requests) and parses `n` responses with Content-Length bodies
/// (HEAD's first response has none).
fn read_responses(addr: &str, wire: &str, n: usize) -> Vec<(u16, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(wire.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut first = true;
    while out.len() < n {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let k = s.read(&mut chunk).unwrap();
            assert!(k > 0, "connection closed after {} responses", out.len());
            buf.extend_from_slice(&chunk[..k]);
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let status: u16 = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let body_len = if first { 0 } else { len };
        first = false;
        while buf.len() < end + 4 + body_len {
            let k = s.read(&mut chunk).unwrap();
            assert!(k > 0, "connection closed inside response {}", out.len());
            buf.extend_from_slice(&chunk[..k]);
        }
        out.push((status, buf[end + 4..end + 4 + body_len].to_vec()));
        buf.drain(..end + 4 + body_len);
    }
    out
}

/// With `server.zero_copy = false` the same bytes are copied, and nothing is sent with
/// sendfile.
#[actix_rt::test]
async fn zero_copy_off_copies_the_same_bytes() {
    let up = FakeUpstream::start();
    let blob = data(76, 2 * 1024 * 1024 + 1);
    let d = up.add_blob(&blob);
    let pc = Pullcache::start_cfg(
        vec![upstream("docker.io", &up.url(), true, Some("docker"))],
        |c| c.server.zero_copy = false,
    );
    let url = pc.url(&format!("/v2/library/x/blobs/{d}"));
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), d);
    pc.wait_stored(&d).await;
    let (st, _, body) = get(&url, &[("Range", "bytes=5-")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.unwrap(), blob[5..]);
    assert_eq!(sent(&pc), 0);
}

/// actix-http frames a response with the HEAD/GET flag of the newest request it parsed, so
/// a GET followed by a pipelined HEAD loses its body. The sendfile body notices (its marker
/// never reaches the socket) and the connection closes instead of hanging; the server
/// goes on serving.
#[actix_rt::test]
async fn a_get_followed_by_a_pipelined_head_closes_instead_of_hanging() {
    let Cached {
        _up,
        pc,
        blob: a,
        digest: da,
        url,
        ..
    } = cached_blob(77, 512 * 1024).await;
    let addr = addr(&pc);
    let wire: String = ["GET", "HEAD"]
        .iter()
        .map(|m| format!("{m} /v2/library/x/blobs/{da} HTTP/1.1\r\nHost: {addr}\r\n\r\n"))
        .collect();
    let closed = actix_web::rt::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(wire.as_bytes()).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..10_000 {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(closed, "the connection must close, not hang");
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body.unwrap(), a);
}

/// Clients that go away in the middle of a sendfile body (a reset, a close after a few
/// bytes) cost nothing but their connection: the next requests are served whole.
#[actix_rt::test]
async fn clients_leaving_mid_body_do_not_disturb_the_server() {
    let Cached {
        _up,
        pc,
        digest: da,
        url,
        ..
    } = cached_blob(78, 8 * 1024 * 1024).await;
    let addr = addr(&pc);
    let wire = format!("GET /v2/library/x/blobs/{da} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    actix_web::rt::task::spawn_blocking(move || {
        for i in 0..20 {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(wire.as_bytes()).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            // Read a little (or nothing), then go away; every other one with a reset.
            for _ in 0..(i % 4) {
                let _ = s.read(&mut buf);
            }
            if i % 2 == 0 {
                let _ = socket_linger_zero(&s);
            }
            drop(s);
        }
    })
    .await
    .unwrap();
    for _ in 0..3 {
        let (st, _, body) = get(&url, &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256(&body.unwrap()), da);
    }
}

/// SO_LINGER 0: closing sends a reset instead of a FIN.
fn socket_linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    rustix::net::sockopt::set_socket_linger(s, Some(std::time::Duration::ZERO))
        .map_err(std::io::Error::from)
}

/// A filesystem that refuses sendfile: the body under way goes on with copied bytes (the
/// client gets the whole blob on the same connection), and later bodies are copied.
#[actix_rt::test]
async fn a_refused_sendfile_falls_back_to_copying() {
    let Cached {
        _up,
        pc,
        blob: a,
        digest: da,
        url,
        ..
    } = cached_blob(79, 3 * 1024 * 1024 + 11).await;
    let before = sent(&pc);
    pc.zero_copy.inject_refusal(true);
    assert!(pc.zero_copy.available());
    // Refused at the first region: the response goes on copied.
    let (st, h, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        header(&h, "content-length"),
        Some(a.len().to_string().as_str())
    );
    assert_eq!(sha256(&body.unwrap()), da);
    assert!(!pc.zero_copy.available(), "switched to copying");
    // Later bodies, whole and ranges, are copied from the start.
    let (st, _, body) = get(&url, &[("Range", "bytes=1000-1999999")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.unwrap(), a[1000..2_000_000]);
    assert_eq!(sent(&pc), before);
}

/// A stored blob that has left the page cache is read back in on a blocking thread before
/// sendfile sends it (not on the worker), and arrives whole.
#[actix_rt::test]
async fn a_blob_out_of_the_page_cache_is_read_in_first() {
    let Cached {
        _up,
        pc,
        digest: da,
        url,
        ..
    } = cached_blob(80, 4 * 1024 * 1024 + 3).await;
    // Warm: nothing to read in.
    let (_, _, body) = get(&url, &[]).await;
    assert_eq!(sha256(&body.unwrap()), da);
    let before = pc.engine.blobs.regions_read_in();
    // Drop the file's pages (it is fsynced, so they are clean and can go).
    let f = std::fs::File::open(pc.blob_path(&da)).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&body.unwrap()), da);
    assert_eq!(pc.engine.blobs.regions_read_in(), before + 1);
}
