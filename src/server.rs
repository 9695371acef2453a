//! Starting pullcache: the engine's actors first (once per process), then the HTTP server
//! whose workers share their handles.
//!
//! The server is actix-web's `App` on actix-http's HTTP/1 service, as `HttpServer` would
//! build it, except that each accepted socket is wrapped in a [`ConnIo`] so that blob bodies
//! can be sent with `sendfile` (see [`crate::zerocopy`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_server::Server;
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::middleware::{Condition, DefaultHeaders};
use actix_web::rt::net::TcpStream;
use actix_web::{web, App};
use opentelemetry_instrumentation_actix_web::RequestTracing;
use pullcache_actors::{Clock, Engine, UpstreamNames};
use tokio_rustls::server::TlsStream;

use crate::config::Config;
use crate::conn::{ConnLimiter, Guarded};
use crate::routes::{self, AppState, Router};
use crate::telemetry::access::{Access, AccessShared, HttpMetrics};
use crate::tls::Acceptor;
use crate::zerocopy::{ConnIo, ZeroCopy};

/// Pending connections the kernel queues for us (actix-web's default).
const BACKLOG: i32 = 1024;
/// Connections the metrics listener takes at once (scrapers and probes).
const METRICS_CONNECTIONS: usize = 64;

/// A started pullcache: the HTTP server (await it to run until a signal) and its engine.
pub struct Running {
    pub server: Server,
    pub addrs: Vec<SocketAddr>,
    /// Where `/metrics` is served (none when `metrics.listen` is empty).
    pub metrics_addrs: Vec<SocketAddr>,
    pub engine: Engine,
    /// Blob bodies sent with `sendfile`: bytes sent, whether it still works.
    pub zero_copy: Arc<ZeroCopy>,
}

/// Starts the engine and binds the HTTP server. Must be called inside an actix `System`.
/// `handle_signals`: stop gracefully on SIGTERM/SIGINT (the daemon); tests stop by handle.
pub fn start(config: &Config, clock: Clock, handle_signals: bool) -> Result<Running, String> {
    let auth = crate::auth::Auth::start(&config.auth)?;
    let engine = Engine::start(config.engine_settings(), clock).map_err(|e| e.to_string())?;
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        router: Router::new(&config.upstreams),
        auth,
    });
    let access = Arc::new(AccessShared {
        http: HttpMetrics::new(engine.metrics()),
        engine: engine.metrics().clone(),
        names: UpstreamNames::new(&config.upstreams),
    });
    let access_app = access.clone();
    // Server spans only while traces are exported: otherwise the middleware's per-request
    // work (span name, attributes, header extraction) would be spent for nothing.
    let tracing_on = pullcache_actors::trace::exporting();
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let app = move || {
        App::new()
            .app_data(state.clone())
            .wrap(DefaultHeaders::new().add(("Docker-Distribution-API-Version", "registry/2.0")))
            .wrap(Access(access_app.clone()))
            .wrap(Condition::new(tracing_on, RequestTracing::new()))
            .configure(routes::configure)
    };
    let listen = &config.server.listen;
    let listeners =
        bind(listen).map_err(|e| format!("server.listen: cannot listen on {listen}: {e}"))?;
    let mut builder = Server::build()
        .workers(workers)
        .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1));
    if !handle_signals {
        builder = builder.disable_signals();
    }
    let shutdown = builder.graceful_shutdown_signal();
    let zero_copy = config.server.zero_copy && cfg!(target_os = "linux");
    let shared = Arc::new(ZeroCopy::new(engine.metrics().zero_copy_bytes.clone()));
    let tls = match config.server.tls.enabled() {
        true => Some(Acceptor::new(&config.server.tls, "server.tls")?),
        false => None,
    };
    let limiter = ConnLimiter::new(
        config.server.max_connections,
        config.server.max_connections_per_client,
        &engine.metrics().registry,
    );
    let send_timeout = config.server.send_timeout;
    let mut addrs = Vec::new();
    for lst in listeners {
        let addr = lst
            .local_addr()
            .map_err(|e| format!("server.listen: {e}"))?;
        addrs.push(addr);
        let (shutdown, counter, app) = (shutdown.clone(), shared.clone(), app.clone());
        let limiter = limiter.clone();
        let name = format!("pullcache-{addr}");
        builder = match tls.clone() {
            Some(tls) => builder.listen(name, lst, move || {
                let shutdown = shutdown.clone();
                // No sendfile through TLS (the bytes are encrypted in user space): blob
                // bodies are streamed like any other body.
                let http = HttpService::<Guarded<TlsStream<TcpStream>>, _, _, _, _>::build()
                    .graceful_shutdown_signal(move || {
                        let s = shutdown.clone();
                        async move { s.notified().await }
                    })
                    .client_request_timeout(Duration::from_secs(5))
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .local_addr(addr)
                    .finish(map_config(
                        app().into_factory().map_err(|e| e.error_response()),
                        |_| AppConfig::default(),
                    ));
                tls_service(tls.clone(), Some((limiter.clone(), send_timeout))).and_then(http)
            }),
            None => builder.listen(name, lst, move || {
                let shutdown = shutdown.clone();
                let counter = counter.clone();
                let http = HttpService::<Guarded<ConnIo>, _, _, _, _>::build()
                    .graceful_shutdown_signal(move || {
                        let s = shutdown.clone();
                        async move { s.notified().await }
                    })
                    .client_request_timeout(Duration::from_secs(5))
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .local_addr(addr)
                    .on_connect_ext(move |io: &Guarded<ConnIo>, ext| {
                        if zero_copy {
                            ext.insert(io.get_ref().slot());
                        }
                    })
                    .finish(map_config(
                        app().into_factory().map_err(|e| e.error_response()),
                        // The app does not build URLs from its host or address.
                        |_| AppConfig::default(),
                    ));
                let limiter = limiter.clone();
                fn_service(move |io: TcpStream| {
                    let counter = counter.clone();
                    let limiter = limiter.clone();
                    async move {
                        let peer = io.peer_addr().ok();
                        let slot = match limiter.acquire(peer.map(|p| p.ip())) {
                            Ok(s) => s,
                            Err(why) => {
                                // Told in one write (a new socket always has room for it;
                                // bounded anyway), then closed.
                                let mut io = io;
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    tokio::io::AsyncWriteExt::write_all(
                                        &mut io,
                                        &crate::conn::refusal(why),
                                    ),
                                )
                                .await;
                                return Err(actix_http::error::DispatchError::Io(
                                    std::io::ErrorKind::ConnectionRefused.into(),
                                ));
                            }
                        };
                        // The response head and a small body are separate writes on the
                        // sendfile path: do not let Nagle hold the second one back.
                        let _ = io.set_nodelay(true);
                        if tls_handshake(&io).await {
                            crate::telemetry::tls_on_plain_port(peer);
                            return Err(actix_http::error::DispatchError::Io(
                                std::io::ErrorKind::InvalidData.into(),
                            ));
                        }
                        Ok::<_, actix_http::error::DispatchError>((
                            Guarded::new(ConnIo::new(io, counter), slot, send_timeout),
                            Protocol::Http1,
                            peer,
                        ))
                    }
                })
                .and_then(http)
            }),
        }
        .map_err(|e| format!("server.listen: cannot listen on {listen}: {e}"))?;
    }
    let metrics_addrs = if config.metrics.listen.is_empty() {
        Vec::new()
    } else {
        let (b, addrs) = metrics_listener(builder, config, &engine, access)?;
        builder = b;
        addrs
    };
    Ok(Running {
        server: builder.run(),
        addrs,
        metrics_addrs,
        engine,
        zero_copy: shared,
    })
}

/// Whether a new connection starts with a TLS handshake (a client trying https on this
/// plain-HTTP port). Waits a second at most for the first bytes (a ClientHello follows the
/// TCP handshake at once): a client that sends nothing by then is left to the HTTP
/// service and its own timeout, so an idle connection is not kept longer than before.
async fn tls_handshake(io: &TcpStream) -> bool {
    let mut first = [0u8; 3];
    match tokio::time::timeout(Duration::from_secs(1), io.peek(&mut first)).await {
        Ok(Ok(n)) => crate::telemetry::looks_like_tls(&first[..n]),
        _ => false,
    }
}

/// The first step of a TLS listener's connections: the handshake (bounded in time), then
/// HTTP/1.1 on the decrypted stream. A failed handshake (a plain-HTTP client, an old TLS
/// version, no or a wrong client certificate) closes the connection with one debug line.
fn tls_service(
    tls: Acceptor,
    limits: Option<(Arc<ConnLimiter>, Duration)>,
) -> impl actix_service::ServiceFactory<
    TcpStream,
    Config = (),
    Response = (Guarded<TlsStream<TcpStream>>, Protocol, Option<SocketAddr>),
    Error = actix_http::error::DispatchError,
    InitError = (),
> {
    // The metrics listener (no limits given): one connection per scraper, and loopback by
    // default; its own counter, so a flood of the registry port cannot lock scrapes out.
    let (limiter, send_timeout) = limits.unwrap_or_else(|| {
        (
            ConnLimiter::new(
                METRICS_CONNECTIONS,
                METRICS_CONNECTIONS,
                &Default::default(),
            ),
            Duration::from_secs(60),
        )
    });
    fn_service(move |io: TcpStream| {
        let (tls, limiter) = (tls.clone(), limiter.clone());
        async move {
            let peer = io.peer_addr().ok();
            // Refused before the handshake, which is the expensive part: no 503 (it would
            // have to be encrypted), the connection is just closed.
            let slot = limiter.acquire(peer.map(|p| p.ip())).map_err(|_| {
                actix_http::error::DispatchError::Io(std::io::ErrorKind::ConnectionRefused.into())
            })?;
            let _ = io.set_nodelay(true);
            match tls.accept(io).await {
                Ok(stream) => Ok((
                    Guarded::new(stream, slot, send_timeout),
                    Protocol::Http1,
                    peer,
                )),
                Err(e) => {
                    tracing::debug!(client = ?peer, error = %e, "TLS handshake failed");
                    Err(actix_http::error::DispatchError::Io(e))
                }
            }
        }
    })
}

/// Adds the metrics listener (`metrics.listen`): `/metrics` and `/healthz`, on actix-http's
/// own service; with `[metrics.tls]`, behind TLS, and with `client_ca` only for clients
/// that show a certificate signed by it.
fn metrics_listener(
    mut builder: actix_server::ServerBuilder,
    config: &Config,
    engine: &Engine,
    access: Arc<AccessShared>,
) -> Result<(actix_server::ServerBuilder, Vec<SocketAddr>), String> {
    let listen = &config.metrics.listen;
    let listeners =
        bind(listen).map_err(|e| format!("metrics.listen: cannot listen on {listen}: {e}"))?;
    let tls = match config.metrics.tls.enabled() {
        true => Some(Acceptor::new(&config.metrics.tls, "metrics.tls")?),
        false => None,
    };
    let mut addrs = Vec::new();
    for lst in listeners {
        let addr = lst
            .local_addr()
            .map_err(|e| format!("metrics.listen: {e}"))?;
        addrs.push(addr);
        let (engine, access, tls) = (engine.clone(), access.clone(), tls.clone());
        let name = format!("pullcache-metrics-{addr}");
        let app = move || {
            App::new()
                .app_data(web::Data::new(engine.clone()))
                .wrap(Access(access.clone()))
                .configure(routes::base::configure_metrics)
        };
        builder = match tls {
            Some(tls) => builder.listen(name, lst, move || {
                let http = HttpService::<Guarded<TlsStream<TcpStream>>, _, _, _, _>::build()
                    .client_request_timeout(Duration::from_secs(5))
                    .local_addr(addr)
                    .finish(map_config(
                        app().into_factory().map_err(|e| e.error_response()),
                        |_| AppConfig::default(),
                    ));
                tls_service(tls.clone(), None).and_then(http)
            }),
            None => builder.listen(name, lst, move || {
                HttpService::build()
                    .client_request_timeout(Duration::from_secs(5))
                    .local_addr(addr)
                    .h1(map_config(app(), |_| AppConfig::default()))
                    .tcp()
            }),
        }
        .map_err(|e| format!("metrics.listen: cannot listen on {listen}: {e}"))?;
    }
    Ok((builder, addrs))
}

/// Listening sockets on every address `listen` resolves to that can be bound (like
/// actix-web's `HttpServer::bind`: `localhost:5000` gives 127.0.0.1 and ::1); an error
/// only if none can.
fn bind(listen: &str) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut last = None;
    let mut out = Vec::new();
    for addr in listen.to_socket_addrs()? {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        let _ = sock.set_reuse_address(true);
        match sock.bind(&addr.into()).and_then(|()| sock.listen(BACKLOG)) {
            Ok(()) => out.push(sock.into()),
            Err(e) => last = Some(e),
        }
    }
    if out.is_empty() {
        return Err(last.unwrap_or_else(|| std::io::Error::other("no address to listen on")));
    }
    Ok(out)
}
