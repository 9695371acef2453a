//! One upstream's HTTP client: requests with token or Basic authentication, redirects
//! followed by hand, timeouts, retries, and the answers turned into values or
//! [`UpstreamError`]s. Runs on the upstream actor's thread only (see [`super`]).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::http::{header, Method, StatusCode};
use awc::ClientResponse;
use opentelemetry_instrumentation_actix_web::ClientExt;
use url::Url;

use super::redirect::RedirectPolicy;
use super::{parse_ratelimit, Quota};
use crate::auth::{self, Challenge, TokenCache, TokenResponse};
use crate::clock::Clock;
use crate::error::UpstreamError;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::settings::{UpstreamId, UpstreamSettings};
use crate::trace::{kv, Context, Step};

/// Manifests larger than this are refused (what Distribution and containers/image accept).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
const MAX_ERROR_BODY: usize = 64 * 1024;
const MAX_TOKEN_BODY: usize = 1024 * 1024;
const MAX_REDIRECTS: usize = 10;
const CONNECT_RETRIES: usize = 2;

mod requests;

/// One upstream's connection state. Lives on the actor's thread only (`Rc`/`RefCell`);
/// borrows are never held across an `.await`.
pub(super) struct Conn {
    settings: UpstreamSettings,
    /// Manifests, tag lists, tokens, blob sizes.
    client: awc::Client,
    /// Blob downloads only (`limits.max_fills_per_upstream` connections).
    blob_client: awc::Client,
    challenge: RefCell<Option<Challenge>>,
    tokens: RefCell<TokenCache>,
    /// The last rate-limit headers seen (Docker Hub's `ratelimit-*`).
    quota: RefCell<Option<Quota>>,
    clock: Clock,
    metrics: Arc<Metrics>,
    id: UpstreamId,
    /// Where its redirects may lead.
    redirects: RedirectPolicy,
}

impl Conn {
    pub(super) fn new(
        settings: UpstreamSettings,
        tls: Arc<rustls::ClientConfig>,
        clock: Clock,
        metrics: Arc<Metrics>,
        id: UpstreamId,
        blob_connections: usize,
    ) -> Conn {
        let client = Self::client(&settings, tls.clone(), 64);
        // Blob downloads have a pool of their own: however many run, manifests, tag lists
        // and tokens still get a connection.
        let blob_client = Self::client(&settings, tls, blob_connections);
        let redirects = RedirectPolicy::new(&settings);
        Conn {
            settings,
            client,
            blob_client,
            challenge: RefCell::new(None),
            tokens: RefCell::new(TokenCache::default()),
            quota: RefCell::new(None),
            clock,
            metrics,
            id,
            redirects,
        }
    }

    /// An awc client with a pool of at most `connections`.
    fn client(
        settings: &UpstreamSettings,
        tls: Arc<rustls::ClientConfig>,
        connections: usize,
    ) -> awc::Client {
        let connector = awc::Connector::new()
            .rustls_0_23(tls)
            .timeout(settings.connect_timeout)
            .handshake_timeout(settings.connect_timeout)
            .limit(connections);
        awc::Client::builder()
            .connector(connector)
            .disable_timeout()
            .disable_redirects()
            .add_default_header((
                header::USER_AGENT,
                concat!("pullcache/", env!("CARGO_PKG_VERSION")),
            ))
            // The bytes as the upstream stores them: awc is built with decompression (the
            // tracing instrumentation turns it on), and blobs are verified as sent.
            .add_default_header((header::ACCEPT_ENCODING, "identity"))
            .finish()
    }

    /// This upstream's metrics.
    pub(super) fn metrics(&self) -> &UpstreamMetrics {
        self.metrics.upstream(self.id)
    }

    pub(super) fn id(&self) -> UpstreamId {
        self.id
    }

    /// The engine's metrics.
    pub(super) fn engine_metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The last rate-limit headers seen.
    pub(super) fn quota(&self) -> Option<Quota> {
        *self.quota.borrow()
    }

    /// Health probe: `GET /v2/` answered 200 or 401 within `timeout`.
    pub(super) async fn probe(&self, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let req = self.client.get(self.url("/v2/")).send();
        let res = tokio::time::timeout(timeout, req).await;
        let code = match &res {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            _ => None,
        };
        self.metrics().request("GET", code, start.elapsed());
        match res {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(e)) => Err(self.send_error(e).to_string()),
            Ok(Ok(resp)) => match resp.status().as_u16() {
                200 | 401 => Ok(start.elapsed()),
                s => Err(format!("GET /v2/ answered {s}")),
            },
        }
    }
}

struct Req<'a> {
    /// The trace the request belongs to (its client span is a child of this).
    cx: &'a Context,
    method: Method,
    url: String,
    scope: Option<String>,
    accept: Option<&'a str>,
    range: Option<String>,
    follow_redirects: bool,
    /// A blob download: sent on the blob connection pool.
    blob: bool,
}

impl<'a> Req<'a> {
    /// A request about `repo` (its pull scope for tokens), following redirects.
    fn pull(
        method: Method,
        url: String,
        repo: &str,
        accept: Option<&'a str>,
        cx: &'a Context,
    ) -> Req<'a> {
        Req {
            cx,
            method,
            url,
            scope: Some(pull_scope(repo)),
            accept,
            range: None,
            follow_redirects: true,
            blob: false,
        }
    }
}

impl Conn {
    fn record_quota(&self, resp: &ClientResponse) {
        let get = |h: &str| {
            resp.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ratelimit)
        };
        if let Some((remaining, w)) = get("ratelimit-remaining") {
            let limit = get("ratelimit-limit");
            self.metrics().quota(remaining);
            *self.quota.borrow_mut() = Some(Quota {
                limit: limit.map(|l| l.0),
                remaining,
                window_seconds: w.or(limit.and_then(|l| l.1)),
                observed_ms: self.clock.now_ms(),
            });
        }
    }

    fn name(&self) -> String {
        self.settings.name.clone()
    }

    fn has_credentials(&self) -> bool {
        !self.settings.username.is_empty() || !self.settings.password.is_empty()
    }

    /// The registry's base URL (from the configuration, parsed once).
    fn base(&self) -> &Url {
        self.settings.url.as_url()
    }

    fn url(&self, path: &str) -> String {
        self.settings.url.join(path)
    }

    fn same_origin(&self, url: &Url) -> bool {
        let base = self.base();
        url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default()
    }

    /// Sends `req` (see [`Conn::send`]); any answer but 200 is an error, with the
    /// upstream's message unless it was a HEAD.
    async fn send_ok(&self, req: Req<'_>) -> Result<ClientResponse, UpstreamError> {
        let head = req.method == Method::HEAD;
        let mut resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&mut resp, head).await);
        }
        Ok(resp)
    }

    /// A response body of at most `limit` bytes, within the response timeout; `what` names
    /// it in errors.
    async fn body(
        &self,
        resp: &mut ClientResponse,
        limit: usize,
        what: &'static str,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let read = resp.body().limit(limit);
        match tokio::time::timeout(self.settings.response_timeout, read).await {
            Err(_) => Err(self.timeout(what)),
            Ok(Err(awc::error::PayloadError::Overflow)) => {
                Err(self.protocol(format!("{what}: more than {} bytes", limit)))
            }
            Ok(Err(e)) => Err(self.protocol(format!("{what}: {e}"))),
            Ok(Ok(b)) => Ok(b),
        }
    }

    /// Sends a request with authentication: answers one 401 challenge (fetching a token or
    /// using Basic credentials) and follows redirects when asked.
    async fn send(&self, req: Req<'_>) -> Result<ClientResponse, UpstreamError> {
        let scope = req.scope.clone().unwrap_or_default();
        let mut authz = self.known_authorization(&scope, req.cx).await?;
        let mut answered_challenge = false;
        let mut retried_redirect = false;
        loop {
            let (resp, foreign) = self.send_following(&req, authz.as_deref()).await?;
            // A redirect target's 403 is usually an expired signed URL: ask the registry
            // for a fresh redirect, once.
            if foreign && resp.status() == StatusCode::FORBIDDEN && !retried_redirect {
                retried_redirect = true;
                continue;
            }
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            // Only the registry's own challenges concern its credentials.
            if foreign {
                return Err(UpstreamError::Status {
                    upstream: self.name(),
                    status: 401,
                    message: Some("redirect target refused the request".into()),
                    retry_after: None,
                });
            }
            let challenge = auth::parse_challenges(
                resp.headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .filter_map(|v| v.to_str().ok()),
            );
            if answered_challenge || challenge.is_none() {
                return Err(UpstreamError::Unauthorized {
                    upstream: self.name(),
                    anonymous: !self.has_credentials(),
                });
            }
            answered_challenge = true;
            *self.challenge.borrow_mut() = challenge;
            self.tokens.borrow_mut().remove(&scope);
            authz = self.known_authorization(&scope, req.cx).await?;
            if authz.is_none() {
                return Err(UpstreamError::Unauthorized {
                    upstream: self.name(),
                    anonymous: true,
                });
            }
        }
    }

    /// The `Authorization` value for `scope` given the challenge seen so far, fetching a
    /// token if needed.
    async fn known_authorization(
        &self,
        scope: &str,
        cx: &Context,
    ) -> Result<Option<String>, UpstreamError> {
        let challenge = self.challenge.borrow().clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.has_credentials().then(|| {
                auth::basic_header(&self.settings.username, self.settings.password.expose())
            })),
            Some(Challenge::Bearer { realm, service, .. }) => {
                if let Some(t) = self.tokens.borrow_mut().get(scope, Instant::now()) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let step = Step::child(cx, "upstream.token", || {
                    vec![
                        kv("pullcache.upstream", self.settings.name.clone()),
                        kv("pullcache.token.scope", scope.to_string()),
                    ]
                });
                let fetched = self
                    .fetch_token(&realm, service.as_deref(), scope, step.cx())
                    .await;
                if let Err(e) = &fetched {
                    step.fail(e);
                }
                let (token, lifetime) = fetched?;
                self.tokens
                    .borrow_mut()
                    .insert(scope, token.clone(), lifetime, Instant::now());
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cx: &Context,
    ) -> Result<(String, Duration), UpstreamError> {
        let mut url =
            Url::parse(realm).map_err(|_| self.protocol("token realm is not a URL".into()))?;
        let realm_host = url.host_str().unwrap_or("").to_string();
        if self.base().scheme() == "https" && url.scheme() != "https" {
            return Err(self.protocol("token realm is not https for an https registry; refusing to send credentials in clear text".into()));
        }
        if !auth::realm_allowed(self.base().host_str().unwrap_or(""), &realm_host) {
            return Err(self.protocol(format!("token realm host {realm_host:?} is not the registry's domain; refusing to send credentials there")));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
            if self.has_credentials() {
                q.append_pair("account", &self.settings.username);
            }
        }
        let mut attempt = 0;
        let mut resp = loop {
            let mut r = self.client.get(url.as_str());
            if self.has_credentials() {
                r = r.insert_header((
                    header::AUTHORIZATION,
                    auth::basic_header(&self.settings.username, self.settings.password.expose()),
                ));
            }
            self.metrics().token_fetches.inc();
            let sent = Instant::now();
            let send = traced(r, cx, true);
            let res = tokio::time::timeout(self.settings.response_timeout, send).await;
            let code = match &res {
                Ok(Ok(r)) => Some(r.status().as_u16()),
                _ => None,
            };
            self.metrics().request("GET", code, sent.elapsed());
            match res {
                Err(_) => return Err(self.timeout("waiting for a token")),
                Ok(Ok(resp)) => break resp,
                Ok(Err(e)) if attempt < CONNECT_RETRIES && retryable(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Ok(Err(e)) => return Err(self.send_error(e)),
            }
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(UpstreamError::Unauthorized {
                    upstream: self.name(),
                    anonymous: !self.has_credentials(),
                })
            }
            _ => return Err(self.status_error(&mut resp, false).await),
        }
        let body = self
            .body(&mut resp, MAX_TOKEN_BODY, "reading a token response")
            .await?;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| self.protocol("token response is not JSON".into()))?;
        let token = t
            .bearer()
            .ok_or_else(|| self.protocol("token response without a token".into()))?
            .to_string();
        Ok((token, t.lifetime()))
    }

    /// One request, following redirects by hand. `Authorization` goes only to the
    /// upstream's own origin; a redirect target (a CDN with a signed URL) gets none.
    async fn send_following(
        &self,
        req: &Req<'_>,
        authz: Option<&str>,
    ) -> Result<(ClientResponse, bool), UpstreamError> {
        let mut url = Url::parse(&req.url).map_err(|e| self.protocol(format!("bad URL: {e}")))?;
        for _ in 0..=MAX_REDIRECTS {
            let own = self.same_origin(&url);
            let resp = self
                .send_once(req, &url, own, authz.filter(|_| own))
                .await?;
            let redirect = req.follow_redirects
                && matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308)
                && (req.method == Method::GET || req.method == Method::HEAD);
            if !redirect {
                return Ok((resp, !own));
            }
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.protocol("redirect without Location".into()))?;
            let next = url
                .join(loc)
                .map_err(|_| self.protocol("redirect to an invalid Location".into()))?;
            self.redirects
                .check(&url, &next)
                .await
                .map_err(|why| self.protocol(why))?;
            url = next;
        }
        Err(self.protocol(format!("more than {MAX_REDIRECTS} redirects")))
    }

    async fn send_once(
        &self,
        req: &Req<'_>,
        url: &Url,
        own: bool,
        authz: Option<&str>,
    ) -> Result<ClientResponse, UpstreamError> {
        let mut attempt = 0;
        loop {
            let pool = if req.blob {
                &self.blob_client
            } else {
                &self.client
            };
            let mut r = pool.request(req.method.clone(), url.as_str());
            if let Some(a) = req.accept {
                r = r.insert_header((header::ACCEPT, a));
            }
            if let Some(a) = authz {
                r = r.insert_header((header::AUTHORIZATION, a));
            }
            if let Some(range) = &req.range {
                r = r.insert_header((header::RANGE, range.as_str()));
            }
            let sent = Instant::now();
            let send = traced(r, req.cx, own);
            let res = tokio::time::timeout(self.settings.response_timeout, send).await;
            let code = match &res {
                Ok(Ok(r)) => Some(r.status().as_u16()),
                _ => None,
            };
            self.metrics()
                .request(req.method.as_str(), code, sent.elapsed());
            match res {
                Err(_) => return Err(self.timeout("waiting for response headers")),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) if attempt < CONNECT_RETRIES && retryable(&e) => {
                    attempt += 1;
                    tracing::debug!(upstream = %self.settings.name, attempt, error = %e, "retrying upstream request");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Ok(Err(e)) => return Err(self.send_error(e)),
            }
        }
    }

    /// Turns a non-success response into an error, reading the OCI error message if any.
    async fn status_error(&self, resp: &mut ClientResponse, head: bool) -> UpstreamError {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let mut message = None;
        if !head {
            if let Ok(Ok(body)) =
                tokio::time::timeout(Duration::from_secs(5), resp.body().limit(MAX_ERROR_BODY))
                    .await
            {
                message = oci_error_message(&body);
            }
        }
        UpstreamError::Status {
            upstream: self.name(),
            status,
            message,
            retry_after,
        }
    }

    fn protocol(&self, detail: String) -> UpstreamError {
        UpstreamError::Protocol {
            upstream: self.name(),
            detail,
        }
    }

    fn timeout(&self, stage: &'static str) -> UpstreamError {
        UpstreamError::Timeout {
            upstream: self.name(),
            stage,
        }
    }

    fn send_error(&self, e: awc::error::SendRequestError) -> UpstreamError {
        use awc::error::{ConnectError, SendRequestError as E};
        match e {
            E::Timeout | E::Connect(ConnectError::Timeout) => self.timeout("connecting"),
            E::Connect(c) => UpstreamError::Connect {
                upstream: self.name(),
                detail: c.to_string(),
            },
            other => UpstreamError::Connect {
                upstream: self.name(),
                detail: other.to_string(),
            },
        }
    }
}

/// Sends `r`, as an ordinary [`ClientResponse`]. To the upstream's own origin (`own`):
/// with a client span under `cx` and the `traceparent` header (the awc instrumentation).
/// To a redirect target (a CDN), whose URL carries a signature in its query
/// (`X-Amz-Signature`, `verify=`, `sig=`), the instrumentation would put that URL in the
/// span's `url.full` and so in the trace backend: there the span is our own and names the
/// host only.
///
/// The body is taken as sent: the instrumentation builds awc with decompression, which
/// pullcache never wants (blob bytes are verified and stored as the upstream stores them;
/// `Accept-Encoding: identity` asks for that, and a server that compresses anyway is not
/// decoded behind our back).
async fn traced(
    r: awc::ClientRequest,
    cx: &Context,
    own: bool,
) -> Result<ClientResponse, awc::error::SendRequestError> {
    let r = r.no_decompress();
    let resp = if own {
        r.trace_request_with_context(cx.clone()).send().await?
    } else {
        let step = Step::child(cx, "upstream.redirect", || {
            vec![
                kv("http.request.method", r.get_method().to_string()),
                kv(
                    "server.address",
                    r.get_uri().host().unwrap_or("").to_string(),
                ),
            ]
        });
        let resp = r.send().await;
        match &resp {
            Ok(res) => step.set(|| {
                vec![kv(
                    "http.response.status_code",
                    res.status().as_u16() as i64,
                )]
            }),
            Err(e) => step.fail(e),
        }
        resp?
    };
    Ok(resp.map_body(|_, body| actix_http::Payload::Stream {
        payload: Box::pin(body) as actix_http::BoxedPayloadStream,
    }))
}

fn retryable(e: &awc::error::SendRequestError) -> bool {
    use awc::error::{ConnectError, SendRequestError as E};
    match e {
        E::Connect(ConnectError::Timeout) | E::Timeout => false,
        E::Connect(_) | E::Send(_) | E::Response(_) | E::H2(_) => true,
        _ => false,
    }
}

fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn content_length(resp: &ClientResponse) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The first message of an OCI error body, if the body is one.
fn oci_error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("errors")?.get(0)?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
    let s = format!("{code} {msg}").trim().to_string();
    (!s.is_empty()).then(|| s.chars().take(300).collect())
}
