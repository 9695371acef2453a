//! `/v2/` (the version check every client makes first) and `/healthz` (liveness).

use actix_web::HttpResponse;

use super::manifest::SizedEmpty;

/// 200 `{}`: pullcache does not authenticate its clients, so it never challenges.
pub fn version_check(head: bool) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    r.content_type("application/json");
    if head {
        r.body(SizedEmpty(2))
    } else {
        r.body("{}")
    }
}

/// Liveness: the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}
