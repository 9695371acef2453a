//! One access event and the request metrics per response, written when the response ends:
//! its last byte handed to the connection, or the client gone (then `complete=false`).
//!
//! The [`Access`] middleware puts an [`AccessRecord`] in each request's extensions; the
//! route handlers fill in what only they know (the upstream, how the cache answered, a
//! body sent with `sendfile`), and the response body is wrapped in a [`LoggedBody`] that
//! counts the bytes and, at its end, logs the event and counts
//! `registry_http_requests_total`, `registry_http_request_duration_seconds` (to the last
//! byte), the cache outcome and the bytes served.
//!
//! Fields are plain values: absent ones are empty strings. Health, readiness and metrics
//! requests are logged at debug; 5xx at warn; the rest at info. Nothing from a request's
//! headers is logged (no `Authorization`, no token), and paths are cut at
//! [`MAX_LOGGED_PATH`] characters.

use std::cell::{Cell, RefCell};
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpMessage, HttpRequest};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use prometheus::{Histogram, IntCounterVec, Opts};
use pullcache_actors::metrics::{code_str, histogram_vec};
use pullcache_actors::{CacheOutcome, Kind, Metrics, UpstreamId, UpstreamNames};

use crate::routes::Endpoint;
use crate::zerocopy::SlotRef;

/// Longer paths are cut in the log (a 2 KiB garbage path is one line, not a screenful).
pub const MAX_LOGGED_PATH: usize = 256;

/// The `handler` label: what the request asked for (a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Base,
    Manifest,
    Blob,
    Tags,
    Catalog,
    Referrers,
    Readyz,
    Healthz,
    Metrics,
    Other,
}

impl Handler {
    const ALL: [Handler; 10] = [
        Handler::Base,
        Handler::Manifest,
        Handler::Blob,
        Handler::Tags,
        Handler::Catalog,
        Handler::Referrers,
        Handler::Readyz,
        Handler::Healthz,
        Handler::Metrics,
        Handler::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Handler::Base => "base",
            Handler::Manifest => "manifest",
            Handler::Blob => "blob",
            Handler::Tags => "tags",
            Handler::Catalog => "catalog",
            Handler::Referrers => "referrers",
            Handler::Readyz => "readyz",
            Handler::Healthz => "healthz",
            Handler::Metrics => "metrics",
            Handler::Other => "other",
        }
    }

    /// The handler of a fixed path (probes, metrics); `Other` for the rest, which the
    /// `/v2` dispatcher names when it has parsed the path ([`Handler::of_endpoint`]), so
    /// a request's path is parsed once.
    pub fn of_fixed_path(path: &str) -> Handler {
        match path {
            "/readyz" | "/v2/_health" => Handler::Readyz,
            "/healthz" => Handler::Healthz,
            "/metrics" => Handler::Metrics,
            _ => Handler::Other,
        }
    }

    /// The handler of a parsed `/v2` endpoint.
    pub fn of_endpoint(e: &Endpoint<'_>) -> Handler {
        match e {
            Endpoint::Base => Handler::Base,
            Endpoint::Catalog => Handler::Catalog,
            Endpoint::Manifest { .. } => Handler::Manifest,
            Endpoint::Blob { .. } => Handler::Blob,
            Endpoint::Tags { .. } => Handler::Tags,
            Endpoint::Referrers { .. } => Handler::Referrers,
        }
    }

    /// Probes, logged at debug.
    fn is_probe(self) -> bool {
        matches!(self, Handler::Readyz | Handler::Healthz | Handler::Metrics)
    }
}

/// What the route handlers add to a request's access event.
pub struct AccessRecord {
    handler: Cell<Handler>,
    upstream: Cell<Option<UpstreamId>>,
    answer: Cell<Option<(Kind, CacheOutcome)>>,
    /// Who the request authenticated as (`[auth]`).
    user: RefCell<Option<String>>,
    /// A body sent with `sendfile`: the connection's slot and its byte count at the start.
    zero_copy: RefCell<Option<(SlotRef, u64)>>,
}

impl AccessRecord {
    fn new(handler: Handler) -> AccessRecord {
        AccessRecord {
            handler: Cell::new(handler),
            upstream: Cell::new(None),
            answer: Cell::new(None),
            user: RefCell::new(None),
            zero_copy: RefCell::new(None),
        }
    }

    /// The `/v2` dispatcher parsed the path: this is what it asked for.
    pub fn handled_by(&self, handler: Handler) {
        self.handler.set(handler);
    }

    /// The request authenticated as `user` (or `anonymous`).
    pub fn user(&self, user: &str) {
        *self.user.borrow_mut() = Some(user.to_string());
    }

    /// The record of `req` (every request through [`Access`] has one).
    pub fn of(req: &HttpRequest) -> Option<Rc<AccessRecord>> {
        req.extensions().get::<Rc<AccessRecord>>().cloned()
    }

    /// The request was routed to `upstream`.
    pub fn routed(&self, upstream: UpstreamId) {
        self.upstream.set(Some(upstream));
    }

    /// The cache answered a blob or manifest request with `outcome`.
    pub fn answered(&self, kind: Kind, outcome: CacheOutcome) {
        self.answer.set(Some((kind, outcome)));
    }

    /// The body goes out with `sendfile` on `slot` (its bytes never pass the body stream).
    pub fn zero_copy(&self, slot: &SlotRef) {
        *self.zero_copy.borrow_mut() = Some((slot.clone(), slot.total()));
    }
}

/// `registry_http_requests_total` and `registry_http_request_duration_seconds`, with the
/// histograms resolved per (handler, method) once.
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: Vec<[Histogram; 3]>,
}

const METHODS: [&str; 3] = ["GET", "HEAD", "other"];

fn method_index(m: &Method) -> usize {
    if m == Method::GET {
        0
    } else if m == Method::HEAD {
        1
    } else {
        2
    }
}

impl HttpMetrics {
    /// Registers the request metrics in the engine's registry.
    pub fn new(m: &Metrics) -> HttpMetrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "registry_http_requests_total",
                "HTTP requests answered, by method, status code and handler.",
            ),
            &["method", "code", "handler"],
        )
        .expect("valid metric");
        m.registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        let hist = histogram_vec(
            &m.registry,
            "registry_http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte, by handler and method.",
            &["handler", "method"],
        );
        let duration = Handler::ALL
            .iter()
            .map(|h| METHODS.map(|meth| hist.with_label_values(&[h.as_str(), meth])))
            .collect();
        for h in [Handler::Base, Handler::Manifest, Handler::Blob] {
            for meth in ["GET", "HEAD"] {
                requests.with_label_values(&[meth, "200", h.as_str()]);
            }
        }
        HttpMetrics { requests, duration }
    }
}

/// What [`Access`] needs, shared by every request of a worker.
pub struct AccessShared {
    pub http: HttpMetrics,
    pub engine: Arc<Metrics>,
    pub names: UpstreamNames,
}

/// The access-log and request-metrics middleware (see the module docs).
#[derive(Clone)]
pub struct Access(pub Arc<AccessShared>);

impl<S, B> Transform<S, ServiceRequest> for Access
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + Unpin + 'static,
{
    type Response = ServiceResponse<LoggedBody<B>>;
    type Error = actix_web::Error;
    type Transform = AccessMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(AccessMiddleware {
            service: Rc::new(service),
            shared: self.0.clone(),
        }))
    }
}

pub struct AccessMiddleware<S> {
    service: Rc<S>,
    shared: Arc<AccessShared>,
}

impl<S, B> Service<ServiceRequest> for AccessMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + Unpin + 'static,
{
    type Response = ServiceResponse<LoggedBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let start = Instant::now();
        let record = Rc::new(AccessRecord::new(Handler::of_fixed_path(req.path())));
        req.extensions_mut().insert(record.clone());
        let mut info = Box::new(Finish {
            shared: self.shared.clone(),
            record,
            start,
            method: method_index(req.method()),
            req: None,
            status: StatusCode::INTERNAL_SERVER_ERROR,
            trace_id: String::new(),
        });
        let fut = self.service.call(req);
        Box::pin(async move {
            info.trace_id = crate::telemetry::traces::current_trace_id();
            match fut.await {
                Ok(res) => {
                    info.status = res.status();
                    // The request itself (a reference count; routing is over, so it may be
                    // shared now) is kept for the log line: its path, query and peer are
                    // formatted only if the event is enabled.
                    info.req = Some(res.request().clone());
                    Ok(res.map_body(move |_, body| LoggedBody {
                        body,
                        bytes: 0,
                        info: Some(info),
                    }))
                }
                Err(e) => {
                    info.status = e.as_response_error().status_code();
                    info.finish(0, false);
                    Err(e)
                }
            }
        })
    }
}

/// `ns=` of a query string, if any.
fn ns_of(query: &str) -> String {
    if !query.contains("ns=") {
        return String::new();
    }
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| Cut(&v).to_string())
        .unwrap_or_default()
}

/// Everything the access event needs once the body ends.
struct Finish {
    shared: Arc<AccessShared>,
    record: Rc<AccessRecord>,
    start: Instant,
    /// Index into [`METHODS`].
    method: usize,
    /// The request, once routed (none if the service failed before a response).
    req: Option<HttpRequest>,
    status: StatusCode,
    trace_id: String,
}

/// A path cut at [`MAX_LOGGED_PATH`] characters.
struct Cut<'a>(&'a str);

impl std::fmt::Display for Cut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(MAX_LOGGED_PATH) {
            Some((i, _)) => f.write_str(&self.0[..i]),
            None => f.write_str(self.0),
        }
    }
}

/// A client address, or nothing.
struct Peer(Option<SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

impl Finish {
    /// `bytes`: counted from the body stream (a `sendfile` body's come from its slot).
    fn finish(&self, bytes: u64, complete: bool) {
        let elapsed = self.start.elapsed();
        let handler = self.record.handler.get();
        let bytes = match &*self.record.zero_copy.borrow() {
            Some((slot, at_start)) => slot.total() - at_start,
            None => bytes,
        };
        let s = &self.shared;
        let m = self.method;
        let mut buf = [0u8; 3];
        s.http
            .requests
            .with_label_values(&[
                METHODS[m],
                code_str(self.status.as_u16(), &mut buf),
                handler.as_str(),
            ])
            .inc();
        s.http.duration[handler as usize][m].observe(elapsed.as_secs_f64());
        let upstream = self.record.upstream.get();
        let answer = self.record.answer.get();
        if let (Some(u), Some((kind, outcome))) = (upstream, answer) {
            // Answered: with the content, or a 304 that says the client has it.
            if self.status.is_success() || self.status == StatusCode::NOT_MODIFIED {
                s.engine.answered(u, kind, outcome);
                s.engine.served(outcome, bytes);
            }
        }
        let upstream = upstream.map(|u| s.names.name(u)).unwrap_or("");
        let (kind, outcome) = answer
            .map(|(k, o)| (k.as_str(), o.as_str()))
            .unwrap_or(("", ""));
        let ms = elapsed.as_secs_f64() * 1000.0;
        let req = self.req.as_ref();
        let user = self.record.user.borrow();
        let user = user.as_deref().unwrap_or("");
        macro_rules! event {
            ($level:ident) => {
                tracing::$level!(
                    target: "pullcache::access",
                    client = %Peer(req.and_then(HttpRequest::peer_addr)),
                    method = req.map_or(METHODS[m], |r| r.method().as_str()),
                    path = %Cut(req.map_or("", HttpRequest::path)),
                    ns = %ns_of(req.map_or("", HttpRequest::query_string)),
                    status = self.status.as_u16(),
                    bytes,
                    ms,
                    complete,
                    upstream,
                    user,
                    r#type = kind,
                    outcome,
                    trace_id = %self.trace_id,
                    "request"
                )
            };
        }
        if handler.is_probe() {
            event!(debug);
        } else if self.status.is_server_error() {
            event!(warn);
        } else {
            event!(info);
        }
    }
}

/// A response body that counts its bytes and writes the access event when it ends or is
/// dropped (the client went away).
pub struct LoggedBody<B: MessageBody> {
    body: B,
    bytes: u64,
    info: Option<Box<Finish>>,
}

impl<B: MessageBody + Unpin> MessageBody for LoggedBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_next(cx);
        match &r {
            Poll::Ready(Some(Ok(b))) => this.bytes += b.len() as u64,
            Poll::Ready(None) => {
                if let Some(i) = this.info.take() {
                    i.finish(this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(i) = this.info.take() {
                    i.finish(this.bytes, false);
                }
            }
            Poll::Pending => {}
        }
        r
    }
}

impl<B: MessageBody> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        if let Some(i) = self.info.take() {
            // Never polled to its end: complete only if there was nothing to send (HEAD,
            // 304, an empty body).
            let empty = METHODS[i.method] == "HEAD"
                || matches!(self.body.size(), BodySize::None | BodySize::Sized(0));
            i.finish(self.bytes, empty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::parse_endpoint;

    #[test]
    fn handlers_from_paths() {
        let of = |p: &str| {
            p.strip_prefix("/v2")
                .and_then(parse_endpoint)
                .map_or(Handler::of_fixed_path(p), |e| Handler::of_endpoint(&e))
        };
        assert_eq!(of("/v2/"), Handler::Base);
        assert_eq!(of("/v2/a/b/manifests/x"), Handler::Manifest);
        assert_eq!(of("/v2/a/blobs/sha256:x"), Handler::Blob);
        assert_eq!(Handler::of_fixed_path("/v2/_health"), Handler::Readyz);
        assert_eq!(Handler::of_fixed_path("/metrics"), Handler::Metrics);
        assert_eq!(of("/nope"), Handler::Other);
        assert_eq!(of("/v2/a/nope/x"), Handler::Other);
    }

    #[test]
    fn long_paths_are_cut() {
        let long = "é".repeat(300);
        assert_eq!(Cut(&long).to_string().chars().count(), MAX_LOGGED_PATH);
        assert_eq!(Cut("/v2/").to_string(), "/v2/");
        assert_eq!(Peer(None).to_string(), "");
    }

    #[test]
    fn ns_is_read_from_the_query() {
        assert_eq!(ns_of("ns=docker.io"), "docker.io");
        assert_eq!(ns_of("a=1&ns=ghcr.io"), "ghcr.io");
        assert_eq!(ns_of(""), "");
    }
}
