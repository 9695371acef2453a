//! Limits on client connections: the caps in all and per client address (a 503 with
//! `Retry-After` past them, others served), and the send timeout that ends a response
//! whose client stopped reading.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;

/// A connection to `to` from the loopback address `from` (127.0.0.x: a different client).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends a GET of `path` and reads the answer's first bytes (the status line at least).
/// A refused connection may be closed before the request is written: empty then.
fn ask(s: &mut TcpStream, path: &str) -> String {
    if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return String::new();
    }
    first_bytes(s)
}

/// What the server sends first (a refused connection is told at once, unasked).
fn first_bytes(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn open_connections(pc: &Pullcache) -> u64 {
    let (_, _, metrics) = get(&format!("{}/metrics", pc.metrics_base), &[]).await;
    let metrics = String::from_utf8(metrics.unwrap().to_vec()).unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pullcache_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pullcache_connections_open")
}

fn addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

#[actix_rt::test]
async fn connections_past_the_caps_get_503_and_other_clients_are_served() {
    let up = FakeUpstream::start();
    let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
        c.server.max_connections = 5;
        c.server.max_connections_per_client = 3;
    });
    let to = addr(&pc.base);
    // The server's workers start on this thread's runtime: let them, before the blocking
    // socket calls below (the workers then run on their own threads).
    assert_eq!(get(&pc.url("/v2/"), &[]).await.0, 200);
    // ...and let that request's connection (from 127.0.0.1 too) be closed and counted out.
    for _ in 0..50 {
        if open_connections(&pc).await == 0 {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open_connections(&pc).await, 0);
    // Three connections from one client, each having made a request (kept alive).
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect_from("127.0.0.1", to)).collect();
    for s in &mut held {
        assert!(ask(s, "/v2/").starts_with("HTTP/1.1 200"));
    }
    // Its fourth is refused, with the reason and when to come back.
    let answer = first_bytes(&mut connect_from("127.0.0.1", to));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(answer.contains("TOOMANYREQUESTS"), "{answer}");
    // Another client is served meanwhile...
    let mut other = connect_from("127.0.0.2", to);
    assert!(ask(&mut other, "/v2/").starts_with("HTTP/1.1 200"));
    let mut third = connect_from("127.0.0.3", to);
    assert!(ask(&mut third, "/v2/").starts_with("HTTP/1.1 200"));
    // ...until the total is reached: then a new client is refused too.
    let answer = first_bytes(&mut connect_from("127.0.0.4", to));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");

    // The held connections close: their slots come back.
    held.clear();
    let mut served = false;
    for _ in 0..50 {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        if ask(&mut connect_from("127.0.0.1", to), "/v2/").starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
    }
    assert!(served, "no slot came back within 5 s");
    let (_, _, metrics) = get(&format!("{}/metrics", pc.metrics_base), &[]).await;
    let metrics = String::from_utf8(metrics.unwrap().to_vec()).unwrap();
    assert!(
        metrics.contains("pullcache_connections_refused_total{reason=\"per_client\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pullcache_connections_refused_total{reason=\"total\"} 1"));
}

/// A client asks for a large cached blob and reads nothing: after `send_timeout` without
/// progress pullcache ends the response and closes, which lets go of the blob file.
/// Checked with `sendfile` and with copied bodies.
#[actix_rt::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let up = FakeUpstream::start();
    let big = data(77, 32 << 20);
    let (_, layers) = up.add_image("library/big", "1", std::slice::from_ref(&big));
    for zero_copy in [true, false] {
        let pc = Pullcache::start_cfg(vec![upstream("docker.io", &up.url(), true, None)], |c| {
            c.server.send_timeout = Duration::from_secs(1);
            c.server.zero_copy = zero_copy;
        });
        let path = format!("/v2/library/big/blobs/{}", layers[0]);
        // Cached first, by a client that reads everything.
        let (s, _, body) = get(&pc.url(&path), &[]).await;
        assert_eq!((s.as_u16(), body.unwrap().len()), (200, big.len()));
        pc.wait_stored(&layers[0]).await;

        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr(&pc.base).into()).unwrap();
        let mut stalled: TcpStream = sock.into();
        write!(stalled, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // Reads nothing for four times the timeout; others are served meanwhile.
        for _ in 0..4 {
            actix_rt::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(get(&pc.url("/v2/"), &[]).await.0, 200);
        }
        // What it can read now ends well short of the blob: the response was cut.
        stalled
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stalled.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert!(
            got < big.len(),
            "zero_copy={zero_copy}: read {got} bytes of a {} byte blob after the timeout",
            big.len()
        );
        // The stalled connection is gone (the metrics listener's are not counted).
        let mut open = u64::MAX;
        for _ in 0..50 {
            open = open_connections(&pc).await;
            if open == 0 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(open, 0, "zero_copy={zero_copy}");
    }
}
