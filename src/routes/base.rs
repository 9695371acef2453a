//! `/v2/` (the version check every client makes first) and `/healthz` (liveness).

use actix_web::{web, HttpRequest, HttpResponse};

use super::AppState;
use crate::auth::Caller;

use super::manifest::head_response;

/// 200 `{}`. With `[auth]`, the caller has passed it already (a client without
/// credentials got the 401 challenge that makes it send them).
pub fn version_check(head: bool) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    r.content_type("application/json");
    if head {
        head_response(&mut r, 2)
    } else {
        r.body("{}")
    }
}

/// The metrics listener's routes: `/metrics` (Prometheus text format) and `/healthz`.
pub fn configure_metrics(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/metrics").route(web::get().to(metrics)))
        .service(
            web::resource("/healthz")
                .route(web::get().to(healthz))
                .route(web::head().to(healthz)),
        );
}

/// Every metric, in the Prometheus text format (the gauges read from elsewhere are
/// brought up to date first).
async fn metrics(engine: web::Data<pullcache_actors::Engine>) -> HttpResponse {
    engine.refresh_metrics();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(engine.metrics().render())
}

/// Liveness: the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Readiness (`/readyz`, and `/v2/_health` for existing monitoring): 200 while pullcache
/// can serve (storage writable, metadata answering), 503 when it cannot. Upstreams being
/// down does not make it unready; their state, last probe, latency and quota are in the
/// JSON body, with the disk budget and the sweeper's state.
///
/// With `[auth]`, a caller without valid credentials sees only the state: upstream names,
/// errors and quota are for authenticated users.
pub async fn readiness(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let r = state.engine.readiness().await;
    let mut resp = if r.ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    let full = match &state.auth {
        None => true,
        Some(auth) => matches!(auth.identify(&req).await, Ok(Caller::User(_))),
    };
    if full {
        resp.json(r)
    } else {
        resp.json(serde_json::json!({
            "ready": r.ready,
            "status": if r.ready { "ready" } else { "unavailable" },
        }))
    }
}
