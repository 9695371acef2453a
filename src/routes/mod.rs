//! The HTTP layer of the pull API. It validates what a request names (repository, tag,
//! digest), picks the upstream, hands the request to the engine through its handles and
//! streams the answer. It holds no cache state.
//!
//! Paths are parsed from the right (`/v2/<name>/manifests/<ref>`: the last segments are
//! fixed, the name is everything before them), on the raw, undecoded path: a `%2e%2e` or
//! `..` never becomes anything but an invalid name.

pub mod base;
pub mod blob;
pub mod manifest;
pub mod tags;

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use oci_spec::distribution::ErrorCode;
use pullcache_actors::reference::{validate_name, MAX_NAME_LEN};
use pullcache_actors::trace::{kv, Context as TraceCx, Step};
use pullcache_actors::{Engine, UpstreamId, UpstreamSettings};

use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::telemetry::access::{AccessRecord, Handler};

/// Shared, immutable request-handling state: the engine's handles and the routing table.
pub struct AppState {
    pub engine: Engine,
    pub router: Router,
    /// Client authentication (`[auth]`); none: every request is served.
    pub auth: Option<std::sync::Arc<Auth>>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Registered before the catch-all: `_health` cannot be a repository name.
    cfg.service(web::resource(["/readyz", "/v2/_health"]).route(web::get().to(base::readiness)))
        // A scope (a literal prefix match), not a `{tail:.*}` pattern: actix matches those
        // with a regex over the whole path on every request, which was a quarter of the CPU
        // of a cached manifest request by digest.
        .service(web::scope("/v2").default_service(web::to(dispatch)))
        .service(
            web::resource("/healthz")
                .route(web::get().to(base::healthz))
                .route(web::head().to(base::healthz)),
        );
}

/// The endpoint a `/v2...` path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Base,
    Catalog,
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    Tags { name: &'a str },
    Referrers { name: &'a str, digest: &'a str },
}

/// Parses the part of the path after `/v2`.
pub fn parse_endpoint(rest: &str) -> Option<Endpoint<'_>> {
    match rest {
        "" | "/" => return Some(Endpoint::Base),
        "/_catalog" => return Some(Endpoint::Catalog),
        _ => {}
    }
    let rest = rest.strip_prefix('/')?;
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    if name.is_empty() || last.is_empty() {
        return None;
    }
    match (kind, last) {
        ("tags", "list") => Some(Endpoint::Tags { name }),
        ("manifests", r) => Some(Endpoint::Manifest { name, reference: r }),
        ("blobs", d) => Some(Endpoint::Blob { name, digest: d }),
        ("referrers", d) => Some(Endpoint::Referrers { name, digest: d }),
        _ => None,
    }
}

/// Where a repository name is served from.
#[derive(Debug, Clone)]
pub struct Routed {
    pub upstream: UpstreamId,
    /// The repository name on the upstream (prefix stripped, `library/` added).
    pub repo: String,
    /// How the upstream was chosen: `ns`, `prefix` or `default`.
    pub via: &'static str,
    /// The request's trace (its server span), for the engine's spans.
    pub cx: TraceCx,
}

/// The upstream routing table, built once from the configuration.
pub struct Router {
    upstreams: Vec<UpstreamSettings>,
    default: Option<UpstreamId>,
}

impl Router {
    pub fn new(upstreams: &[UpstreamSettings]) -> Router {
        Router {
            upstreams: upstreams.to_vec(),
            default: upstreams
                .iter()
                .position(|u| u.default)
                .map(UpstreamId::new),
        }
    }

    /// Picks the upstream for a (validated) client-side name: `ns=` first, then a path
    /// prefix, then the default upstream.
    pub fn route(&self, name: &str, ns: Option<&str>) -> Result<Routed, ApiError> {
        let (upstream, repo, via) = if let Some(ns) = ns {
            let i = self
                .upstreams
                .iter()
                .position(|u| u.name.eq_ignore_ascii_case(ns))
                .ok_or_else(|| {
                    ApiError::name_unknown(format!("no upstream is configured for ns={ns}"))
                })?;
            (UpstreamId::new(i), name, "ns")
        } else if let Some((i, rest)) = self.by_prefix(name) {
            (i, rest, "prefix")
        } else if let Some(i) = self.default {
            (i, name, "default")
        } else {
            return Err(ApiError::name_unknown(format!(
                "repository {name} matches no upstream: use a configured path prefix, ?ns=<registry>, or configure a default upstream"
            )));
        };
        let repo = if self.settings(upstream).uses_library_prefix() && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        if repo.len() > MAX_NAME_LEN {
            return Err(ApiError::oci(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                "repository name too long",
            ));
        }
        Ok(Routed {
            upstream,
            repo,
            via,
            cx: TraceCx::current(),
        })
    }

    /// `<prefix>/<rest>` for a configured prefix. For the default upstream's own prefix the
    /// rest must have two components or more: `docker/compose` is Docker Hub's repository
    /// of user `docker`, `docker/library/alpine` is the prefixed form of `library/alpine`.
    fn by_prefix<'a>(&self, name: &'a str) -> Option<(UpstreamId, &'a str)> {
        let (first, rest) = name.split_once('/')?;
        let i = self
            .upstreams
            .iter()
            .position(|u| u.prefix.as_deref() == Some(first))
            .map(UpstreamId::new)?;
        if Some(i) == self.default && !rest.contains('/') {
            return None;
        }
        Some((i, rest))
    }

    /// The configured name of `upstream`.
    pub fn name(&self, upstream: UpstreamId) -> &str {
        &self.settings(upstream).name
    }

    fn settings(&self, upstream: UpstreamId) -> &UpstreamSettings {
        &self.upstreams[upstream.index()]
    }

    /// How clients address a cached repository (for the catalog).
    pub fn client_name(&self, upstream: UpstreamId, repo: &str) -> String {
        if Some(upstream) == self.default {
            repo.to_string()
        } else if let Some(p) = &self.settings(upstream).prefix {
            format!("{p}/{repo}")
        } else {
            repo.to_string()
        }
    }
}

/// Query parameters of interest (`ns`, `n`, `last`); unknown ones are ignored.
#[derive(Debug, Default)]
pub struct Query {
    pub ns: Option<String>,
    pub n: Option<String>,
    pub last: Option<String>,
}

impl Query {
    pub fn parse(q: &str) -> Query {
        let mut out = Query::default();
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "ns" => out.ns = Some(v.into_owned()),
                "n" => out.n = Some(v.into_owned()),
                "last" => out.last = Some(v.into_owned()),
                _ => {}
            }
        }
        out
    }
}

/// Every `/v2` request comes here.
async fn dispatch(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path();
    // actix matches the scope on the percent-decoded path: `/%76%32/...` lands here too.
    // Only the literal `/v2` is the API (as every registry reads it).
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(ApiError::name_unknown(format!(
            "no such endpoint: {}",
            truncate(path)
        )));
    };
    // Parsed once: the access record's `handler` label comes from here too.
    let endpoint = parse_endpoint(rest);
    let record = AccessRecord::of(&req);
    if let (Some(r), Some(e)) = (&record, &endpoint) {
        r.handled_by(Handler::of_endpoint(e));
    }
    let method = req.method();
    if method != Method::GET && method != Method::HEAD {
        // Every write (uploads, manifest PUTs, deletes), on any /v2 path.
        return Err(ApiError::unsupported(format!(
            "{method} is not supported: pullcache is a read-only pull-through cache"
        )));
    }
    let endpoint = endpoint
        .ok_or_else(|| ApiError::name_unknown(format!("no such endpoint: {}", truncate(path))))?;
    let head = method == Method::HEAD;
    // Credentials before anything else is looked at (a wrong password waits here).
    let caller = match &state.auth {
        Some(auth) => auth.identify(&req).await?,
        None => Caller::Open,
    };
    if let (Some(r), Some(user)) = (&record, caller.name()) {
        r.user(user);
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let name = match &endpoint {
        Endpoint::Base => return Ok(base::version_check(head)),
        Endpoint::Catalog => return tags::catalog(&req, &state, &query, &caller).await,
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::Tags { name }
        | Endpoint::Referrers { name, .. } => *name,
    };
    validate_name(name)?;
    let routed = state.router.route(name, query.ns.as_deref())?;
    if let Some(r) = &record {
        r.routed(routed.upstream);
    }
    if let Some(auth) = &state.auth {
        if !auth.allows(&caller, state.router.name(routed.upstream), &routed.repo) {
            return Err(auth.refusal(&caller, name));
        }
    }
    // The choice, as a span of its own (ended at once: it is a decision, not work).
    Step::child(&routed.cx, "route", || {
        vec![
            kv(
                "pullcache.upstream",
                state.router.name(routed.upstream).to_string(),
            ),
            kv("pullcache.route.via", routed.via),
            kv("oci.repository", routed.repo.clone()),
        ]
    })
    .end();
    match endpoint {
        Endpoint::Manifest { reference, .. } => {
            manifest::serve(&req, &state, &routed, reference, head).await
        }
        Endpoint::Blob { digest, .. } => blob::serve(&req, &state, &routed, digest, head).await,
        Endpoint::Tags { .. } => tags::list(&req, &state, &routed, name, &query).await,
        Endpoint::Referrers { digest, .. } => {
            pullcache_actors::Digest::parse(digest)
                .map_err(pullcache_actors::reference::ReferenceError::from)?;
            // No referrers API: 404 makes clients fall back to the `sha256-<hex>` tag schema,
            // which is served as an ordinary tag.
            Err(ApiError::oci(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                "the referrers API is not offered; use the tag schema",
            ))
        }
        Endpoint::Base | Endpoint::Catalog => unreachable!("handled above"),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_the_right() {
        assert_eq!(parse_endpoint(""), Some(Endpoint::Base));
        assert_eq!(parse_endpoint("/"), Some(Endpoint::Base));
        assert_eq!(parse_endpoint("/_catalog"), Some(Endpoint::Catalog));
        assert_eq!(
            parse_endpoint("/library/alpine/manifests/3.20"),
            Some(Endpoint::Manifest {
                name: "library/alpine",
                reference: "3.20"
            })
        );
        assert_eq!(
            parse_endpoint("/a/manifests/blobs/blobs/sha256:x"),
            Some(Endpoint::Blob {
                name: "a/manifests/blobs",
                digest: "sha256:x"
            })
        );
        assert_eq!(
            parse_endpoint("/a/b/tags/list"),
            Some(Endpoint::Tags { name: "a/b" })
        );
        assert_eq!(
            parse_endpoint("/a/referrers/sha256:x"),
            Some(Endpoint::Referrers {
                name: "a",
                digest: "sha256:x"
            })
        );
        assert_eq!(parse_endpoint("/manifests/latest"), None);
        assert_eq!(parse_endpoint("/a/manifests/"), None);
        assert_eq!(parse_endpoint("/a/other/x"), None);
        assert_eq!(parse_endpoint("/a"), None);
    }

    fn up(name: &str, default: bool, prefix: Option<&str>) -> UpstreamSettings {
        UpstreamSettings {
            default,
            prefix: prefix.map(String::from),
            ..UpstreamSettings::new(name, format!("https://{name}").parse().unwrap())
        }
    }

    #[test]
    fn routing_order_ns_prefix_default() {
        let r = Router::new(&[
            up("docker.io", true, Some("docker")),
            up("ghcr.io", false, Some("ghcr")),
            up("quay.io", false, None),
        ]);
        let rt = |n: &str, ns: Option<&str>| r.route(n, ns).map(|x| (x.upstream.index(), x.repo));
        assert_eq!(rt("alpine", None).unwrap(), (0, "library/alpine".into()));
        assert_eq!(
            rt("library/alpine", None).unwrap(),
            (0, "library/alpine".into())
        );
        assert_eq!(
            rt("alpine", Some("docker.io")).unwrap(),
            (0, "library/alpine".into())
        );
        assert_eq!(
            rt("org/app", Some("ghcr.io")).unwrap(),
            (1, "org/app".into())
        );
        assert_eq!(
            rt("org/app", Some("quay.io")).unwrap(),
            (2, "org/app".into())
        );
        assert_eq!(rt("ghcr/org/app", None).unwrap(), (1, "org/app".into()));
        assert_eq!(
            rt("docker/library/alpine", None).unwrap(),
            (0, "library/alpine".into())
        );
        // Docker Hub's own "docker" user stays reachable.
        assert_eq!(
            rt("docker/compose", None).unwrap(),
            (0, "docker/compose".into())
        );
        assert!(rt("x", Some("evil.example")).is_err());
        let r = Router::new(&[up("ghcr.io", false, Some("ghcr"))]);
        assert!(r.route("org/app", None).is_err());
    }

    #[test]
    fn query_parsing_ignores_unknown_parameters() {
        let q = Query::parse("ns=docker.io&x=1&n=10&last=a%2Bb");
        assert_eq!(q.ns.as_deref(), Some("docker.io"));
        assert_eq!(q.n.as_deref(), Some("10"));
        assert_eq!(q.last.as_deref(), Some("a+b"));
    }
}
