//! Starting pullcache: the engine's actors first (once per process), then the HTTP server
//! whose workers share their handles.

use std::net::SocketAddr;
use std::time::Instant;

use actix_web::dev::{Server, Service};
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, App, HttpServer};
use futures_util::FutureExt;
use pullcache_actors::{Clock, Engine};

use crate::config::Config;
use crate::routes::{self, AppState, Router};

/// A started pullcache: the HTTP server (await it to run until a signal) and its engine.
pub struct Running {
    pub server: Server,
    pub addrs: Vec<SocketAddr>,
    pub engine: Engine,
}

/// Starts the engine and binds the HTTP server. Must be called inside an actix `System`.
/// `handle_signals`: stop gracefully on SIGTERM/SIGINT (the daemon); tests stop by handle.
pub fn start(config: &Config, clock: Clock, handle_signals: bool) -> Result<Running, String> {
    let engine = Engine::start(config.engine_settings(), clock)?;
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        router: Router::new(&config.upstreams),
    });
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(DefaultHeaders::new().add(("Docker-Distribution-API-Version", "registry/2.0")))
            .wrap_fn(|req, srv| {
                let start = Instant::now();
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                srv.call(req).map(move |res| {
                    if let Ok(r) = &res {
                        let status = r.status().as_u16();
                        let ms = start.elapsed().as_secs_f64() * 1000.0;
                        if status >= 500 {
                            tracing::warn!(%method, %path, status, ms, "request");
                        } else {
                            tracing::info!(%method, %path, status, ms, "request");
                        }
                    }
                    res
                })
            })
            .configure(routes::configure)
    })
    .workers(workers)
    .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1));
    if !handle_signals {
        server = server.disable_signals();
    }
    let server = server.bind(&config.server.listen).map_err(|e| {
        format!(
            "server.listen: cannot listen on {}: {e}",
            config.server.listen
        )
    })?;
    let addrs = server.addrs();
    Ok(Running {
        server: server.run(),
        addrs,
        engine,
    })
}
