//! Limits on client connections: how many are open at once (in all, and per client
//! address), and how long a response may wait for a client that does not read.
//!
//! Without them, a client that opens connections and never reads holds a socket, a worker
//! slot and often an open blob file each, without end: a file held open after eviction
//! keeps its disk space, and once file descriptors run out sled and the temporary files
//! fail too.
//!
//! - [`ConnLimiter`] counts open connections. A connection past a cap is answered at once
//!   with a 503 and `Retry-After` (plain HTTP; a TLS connection is just closed) and
//!   closed: cheaper than queueing it, and a Docker daemon or containerd then falls back to
//!   its next endpoint or retries.
//! - [`Guarded`] wraps each connection's I/O: it gives the slot back when the connection
//!   ends, and fails a write that has made no progress for `send_timeout` (the client
//!   stopped reading), which ends the response and closes the connection.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The open connections of one listener.
pub struct ConnLimiter {
    max_total: usize,
    max_per_client: usize,
    total: AtomicUsize,
    /// Open connections per client address. Only addresses with one open are kept.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// `pullcache_connections_refused_total{reason}`: [total, per_client].
    refused: [prometheus::IntCounter; 2],
    /// `pullcache_connections_open`.
    open: prometheus::IntGauge,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerClient,
}

impl ConnLimiter {
    /// Registers its metrics in `registry` (one limiter per registry).
    pub fn new(
        max_total: usize,
        max_per_client: usize,
        registry: &prometheus::Registry,
    ) -> Arc<ConnLimiter> {
        let refused = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "pullcache_connections_refused_total",
                "Client connections refused at once because a cap was reached, by cap (server.max_connections: total, server.max_connections_per_client: per_client).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let open = prometheus::IntGauge::new(
            "pullcache_connections_open",
            "Client connections open on the registry port.",
        )
        .expect("valid metric");
        // A second limiter on the same registry (tests) keeps its own, unregistered series.
        let _ = registry.register(Box::new(refused.clone()));
        let _ = registry.register(Box::new(open.clone()));
        Arc::new(ConnLimiter {
            max_total,
            max_per_client,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            refused: [
                refused.with_label_values(&["total"]),
                refused.with_label_values(&["per_client"]),
            ],
            open,
        })
    }

    /// A slot for a new connection from `peer`, or why there is none.
    pub fn acquire(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<ConnSlot, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            self.refused[0].inc();
            return Err(Refused::Total);
        }
        if let Some(ip) = peer {
            let mut m = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= self.max_per_client {
                drop(m);
                self.total.fetch_sub(1, Ordering::AcqRel);
                self.refused[1].inc();
                return Err(Refused::PerClient);
            }
            *n += 1;
        }
        self.open.inc();
        Ok(ConnSlot {
            limiter: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One open connection's place in the count, given back when dropped.
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    peer: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            let mut m = self
                .limiter
                .per_client
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        self.limiter.open.dec();
    }
}

/// What a refused plain-HTTP connection is told before it is closed.
pub fn refusal(why: Refused) -> Vec<u8> {
    let msg = match why {
        Refused::Total => "too many connections: try again shortly",
        Refused::PerClient => "too many connections from this address: try again shortly",
    };
    let body =
        format!(r#"{{"errors":[{{"code":"TOOMANYREQUESTS","message":"{msg}","detail":{{}}}}]}}"#);
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nDocker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Bytes an I/O type sent by itself while its `poll_write` said `Pending` (sendfile).
pub trait Progress {
    fn sent_bytes(&self) -> u64 {
        0
    }
}

impl<T> Progress for tokio_rustls::server::TlsStream<T> {}

/// A connection's I/O with its slot and the send timeout.
pub struct Guarded<T> {
    io: T,
    _slot: ConnSlot,
    send_timeout: Duration,
    /// `Progress::sent_bytes` when the stall timer was (re)started.
    sent_at_stall: u64,
    /// Set while writes are blocked: when it fires, the client has read nothing for
    /// `send_timeout`.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T: Progress> Guarded<T> {
    pub fn new(io: T, slot: ConnSlot, send_timeout: Duration) -> Self {
        Guarded {
            io,
            _slot: slot,
            send_timeout,
            sent_at_stall: 0,
            stalled: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// A write's or flush's result: progress stops the stall timer, `Pending` starts it (or
    /// fails once it fired).
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => match self.check_stall(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            r => {
                self.stalled = None;
                r
            }
        }
    }

    /// After the inner write returned `Pending`: an error once the stall has lasted
    /// `send_timeout` (the timer also wakes the task then).
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let sent = self.io.sent_bytes();
        if sent != self.sent_at_stall {
            // Bytes went out since the timer started: a slow reader, not a stalled one.
            self.sent_at_stall = sent;
            self.stalled = None;
        }
        let t = self.send_timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {t:?} (server.send_timeout)"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future as _;

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Progress + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_client_and_gives_slots_back() {
        let l = ConnLimiter::new(3, 2, &prometheus::Registry::new());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = l.acquire(Some(a)).unwrap();
        let _a2 = l.acquire(Some(a)).unwrap();
        assert_eq!(l.acquire(Some(a)).err(), Some(Refused::PerClient));
        let _b1 = l.acquire(Some(b)).unwrap();
        assert_eq!(l.acquire(Some(b)).err(), Some(Refused::Total));
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.acquire(Some(a)).unwrap();
        assert_eq!(l.refused[0].get() + l.refused[1].get(), 2);
        assert_eq!(l.open.get(), 3);
        assert!(String::from_utf8(refusal(Refused::Total))
            .unwrap()
            .starts_with("HTTP/1.1 503"));
    }
}
