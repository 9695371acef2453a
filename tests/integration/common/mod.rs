//! Test harness: an in-process fake upstream registry (token auth, redirects to a second
//! "CDN" origin, request counting, a gate that holds back the second half of blob bodies,
//! byte tampering, failure modes), a raw-TCP upstream for malformed answers, image builders,
//! and pullcache started in process with a manual clock.

#![allow(dead_code)]

pub mod otlp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use pullcache::config::Config;
use pullcache::routes::manifest::head_response;
use pullcache::routes::{parse_endpoint, Endpoint};
use pullcache_actors::{Clock, UpstreamSettings};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Deterministic incompressible-looking bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Counters of what the fake upstream served.
#[derive(Default)]
pub struct Counts {
    pub manifest_get: AtomicU64,
    pub manifest_head: AtomicU64,
    pub blob_get: AtomicU64,
    pub blob_head: AtomicU64,
    pub token: AtomicU64,
    pub cdn_get: AtomicU64,
    pub cdn_with_authorization: AtomicU64,
    pub unauthorized: AtomicU64,
    pub tags: AtomicU64,
    /// The `traceparent` header of every request that had one.
    pub traceparents: Mutex<Vec<String>>,
}

impl Counts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
pub struct Content {
    /// repo -> tag -> digest
    pub tags: HashMap<String, HashMap<String, String>>,
    /// (repo, digest) -> (media type, bytes)
    pub manifests: HashMap<(String, String), (String, Bytes)>,
    /// digest -> bytes (served in any repository that has a manifest referencing it, or any)
    pub blobs: HashMap<String, Bytes>,
}

/// Behaviour knobs, changed by tests while the server runs.
pub struct Knobs {
    pub require_token: AtomicBool,
    /// Blob GETs answer 307 to the CDN origin.
    pub redirect_blobs: AtomicBool,
    /// Digests whose bytes are served altered (same length).
    pub tamper: Mutex<Vec<String>>,
    /// When set, blob bodies send their first half, then wait for the gate to open.
    pub gate: watch::Sender<bool>,
    pub use_gate: AtomicBool,
    /// Answer every /v2 request with this status (0 = normal).
    pub fail_status: AtomicU64,
    /// Send Docker Hub's rate-limit headers on manifest responses: remaining (u64::MAX = none).
    pub ratelimit_remaining: AtomicU64,
    /// Do not send Docker-Content-Digest on manifest HEADs.
    pub head_without_digest: AtomicBool,
    /// Send blob bodies chunked, without Content-Length.
    pub chunked_blobs: AtomicBool,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub cdn: SocketAddr,
    pub counts: Arc<Counts>,
    pub content: Arc<Mutex<Content>>,
    pub knobs: Arc<Knobs>,
    handle: actix_web::dev::ServerHandle,
    cdn_handle: actix_web::dev::ServerHandle,
}

#[derive(Clone)]
struct Shared {
    counts: Arc<Counts>,
    content: Arc<Mutex<Content>>,
    knobs: Arc<Knobs>,
    cdn: Arc<Mutex<Option<SocketAddr>>>,
}

impl FakeUpstream {
    /// Starts the registry and its CDN origin on their own thread and System.
    pub fn start() -> FakeUpstream {
        let (gate, _) = watch::channel(false);
        let shared = Shared {
            counts: Arc::new(Counts::default()),
            content: Arc::new(Mutex::new(Content::default())),
            knobs: Arc::new(Knobs {
                require_token: AtomicBool::new(false),
                redirect_blobs: AtomicBool::new(false),
                tamper: Mutex::new(Vec::new()),
                gate,
                use_gate: AtomicBool::new(false),
                fail_status: AtomicU64::new(0),
                ratelimit_remaining: AtomicU64::new(u64::MAX),
                head_without_digest: AtomicBool::new(false),
                chunked_blobs: AtomicBool::new(false),
            }),
            cdn: Arc::new(Mutex::new(None)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let s1 = s.clone();
                let reg = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(s1.clone()))
                        .default_service(web::to(registry))
                })
                .workers(2)
                .disable_signals()
                .bind(("127.0.0.1", 0))
                .unwrap();
                let addr = reg.addrs()[0];
                let s2 = s.clone();
                let cdn = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(s2.clone()))
                        .default_service(web::to(cdn))
                })
                .workers(1)
                .disable_signals()
                .bind(("127.0.0.1", 0))
                .unwrap();
                let cdn_addr = cdn.addrs()[0];
                *s.cdn.lock().unwrap() = Some(cdn_addr);
                let reg = reg.run();
                let cdn = cdn.run();
                tx.send((addr, cdn_addr, reg.handle(), cdn.handle()))
                    .unwrap();
                let _ = futures_util::future::join(reg, cdn).await;
            })
        });
        let (addr, cdn, handle, cdn_handle) = rx.recv().unwrap();
        FakeUpstream {
            addr,
            cdn,
            counts: shared.counts,
            content: shared.content,
            knobs: shared.knobs,
            handle,
            cdn_handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops both listeners: afterwards connections are refused.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
        self.cdn_handle.stop(false).await;
    }

    pub fn add_blob(&self, bytes: &[u8]) -> String {
        let d = sha256(bytes);
        self.content
            .lock()
            .unwrap()
            .blobs
            .insert(d.clone(), Bytes::copy_from_slice(bytes));
        d
    }

    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let d = sha256(bytes);
        let mut c = self.content.lock().unwrap();
        c.manifests.insert(
            (repo.into(), d.clone()),
            (media_type.into(), Bytes::copy_from_slice(bytes)),
        );
        if let Some(t) = tag {
            c.tags
                .entry(repo.into())
                .or_default()
                .insert(t.into(), d.clone());
        }
        d
    }

    /// An OCI image: config + layers as blobs, manifest tagged. Returns (manifest digest,
    /// layer digests).
    pub fn add_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>]) -> (String, Vec<String>) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"repo":"{repo}","tag":"{tag}"}}"#
        );
        let cd = self.add_blob(config.as_bytes());
        let ld: Vec<String> = layers.iter().map(|l| self.add_blob(l)).collect();
        let layers_json: Vec<String> = ld
            .iter()
            .zip(layers)
            .map(|(d, l)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{}}}"#, l.len()))
            .collect();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layers_json.join(",")
        );
        let md = self.add_manifest(repo, Some(tag), OCI_MANIFEST, m.as_bytes());
        (md, ld)
    }

    pub fn open_gate(&self) {
        self.knobs.gate.send_replace(true);
    }
}

fn auth_ok(req: &HttpRequest, s: &Shared, repo: &str) -> bool {
    if !s.knobs.require_token.load(Ordering::SeqCst) {
        return true;
    }
    // Docker Hub's answer for a private or missing repository: the token server grants a
    // token, the registry still answers 401.
    if repo.starts_with("private/") {
        return false;
    }
    let want = format!("Bearer tok-repository:{repo}:pull");
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(want.as_str())
}

fn challenge(req: &HttpRequest, s: &Shared, repo: Option<&str>) -> HttpResponse {
    // Challenges to repository requests (the health probe's GET /v2/ is not counted).
    if repo.is_some() {
        s.counts.unauthorized.fetch_add(1, Ordering::SeqCst);
    }
    let host = req.connection_info().host().to_string();
    let scope = repo
        .map(|r| format!(",scope=\"repository:{r}:pull\""))
        .unwrap_or_default();
    HttpResponse::Unauthorized()
        .insert_header((
            "WWW-Authenticate",
            format!("Bearer realm=\"http://{host}/token\",service=\"fake\"{scope}"),
        ))
        .content_type("application/json")
        .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#)
}

fn oci_error(status: StatusCode, code: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(format!(
            r#"{{"errors":[{{"code":"{code}","message":"fake"}}]}}"#
        ))
}

async fn registry(req: HttpRequest, s: web::Data<Shared>) -> HttpResponse {
    let path = req.uri().path().to_string();
    if let Some(tp) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        s.counts.traceparents.lock().unwrap().push(tp.to_string());
    }
    if path == "/token" {
        s.counts.token.fetch_add(1, Ordering::SeqCst);
        let scope = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        return HttpResponse::Ok()
            .json(serde_json::json!({ "token": format!("tok-{scope}"), "expires_in": 300 }));
    }
    let fail = s.knobs.fail_status.load(Ordering::SeqCst);
    if fail != 0 {
        let st = StatusCode::from_u16(fail as u16).unwrap();
        let mut r = HttpResponse::build(st);
        if fail == 429 {
            r.insert_header(("Retry-After", "17"));
        }
        return r
            .content_type("application/json")
            .body(r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#);
    }
    let Some(rest) = path.strip_prefix("/v2") else {
        return HttpResponse::NotFound().finish();
    };
    let head = req.method() == actix_web::http::Method::HEAD;
    match parse_endpoint(rest) {
        Some(Endpoint::Base) => {
            if s.knobs.require_token.load(Ordering::SeqCst)
                && req.headers().get("authorization").is_none()
            {
                return challenge(&req, &s, None);
            }
            HttpResponse::Ok().json(serde_json::json!({}))
        }
        Some(Endpoint::Manifest { name, reference }) => {
            if !auth_ok(&req, &s, name) {
                return challenge(&req, &s, Some(name));
            }
            if head {
                s.counts.manifest_head.fetch_add(1, Ordering::SeqCst);
            } else {
                s.counts.manifest_get.fetch_add(1, Ordering::SeqCst);
            }
            let c = s.content.lock().unwrap();
            let digest = if reference.contains(':') {
                reference.to_string()
            } else {
                match c.tags.get(name).and_then(|t| t.get(reference)) {
                    Some(d) => d.clone(),
                    None => return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
                }
            };
            let Some((mt, bytes)) = c
                .manifests
                .get(&(name.to_string(), digest.clone()))
                .cloned()
            else {
                return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            };
            let mut r = HttpResponse::Ok();
            r.insert_header(("Content-Type", mt));
            let remaining = s.knobs.ratelimit_remaining.load(Ordering::SeqCst);
            if remaining != u64::MAX {
                r.insert_header(("ratelimit-limit", "100;w=21600"));
                r.insert_header(("ratelimit-remaining", format!("{remaining};w=21600")));
            }
            if !(head && s.knobs.head_without_digest.load(Ordering::SeqCst)) {
                r.insert_header(("Docker-Content-Digest", digest));
            }
            if head {
                head_response(&mut r, bytes.len() as u64)
            } else {
                r.body(bytes)
            }
        }
        Some(Endpoint::Blob { name, digest }) => {
            if !auth_ok(&req, &s, name) {
                return challenge(&req, &s, Some(name));
            }
            if head {
                s.counts.blob_head.fetch_add(1, Ordering::SeqCst);
            }
            let bytes = s.content.lock().unwrap().blobs.get(digest).cloned();
            let Some(bytes) = bytes else {
                return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
            };
            if head {
                return head_response(&mut HttpResponse::Ok(), bytes.len() as u64);
            }
            s.counts.blob_get.fetch_add(1, Ordering::SeqCst);
            if s.knobs.redirect_blobs.load(Ordering::SeqCst) {
                let cdn = s.cdn.lock().unwrap().unwrap();
                return HttpResponse::TemporaryRedirect()
                    .insert_header(("Location", format!("http://{cdn}/cdn/{digest}?sig=abc")))
                    .finish();
            }
            blob_body(&s, digest, bytes)
        }
        Some(Endpoint::Tags { name }) => {
            if !auth_ok(&req, &s, name) {
                return challenge(&req, &s, Some(name));
            }
            s.counts.tags.fetch_add(1, Ordering::SeqCst);
            let c = s.content.lock().unwrap();
            match c.tags.get(name) {
                Some(t) => {
                    let mut tags: Vec<&String> = t.keys().collect();
                    tags.sort();
                    HttpResponse::Ok().json(serde_json::json!({ "name": name, "tags": tags }))
                }
                None => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            }
        }
        _ => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
    }
}

/// A blob body: tampered if asked, and held at its midpoint by the gate if enabled.
fn blob_body(s: &Shared, digest: &str, bytes: Bytes) -> HttpResponse {
    let mut bytes = bytes.to_vec();
    if s.knobs.tamper.lock().unwrap().iter().any(|d| d == digest) && !bytes.is_empty() {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    let len = bytes.len() as u64;
    let mid = bytes.len() / 2;
    let second = Bytes::copy_from_slice(&bytes[mid..]);
    let first = Bytes::copy_from_slice(&bytes[..mid]);
    let gate = s
        .knobs
        .use_gate
        .load(Ordering::SeqCst)
        .then(|| s.knobs.gate.subscribe());
    let stream = async_stream_like(first, second, gate);
    let mut r = HttpResponse::Ok();
    r.content_type("application/octet-stream");
    if s.knobs.chunked_blobs.load(Ordering::SeqCst) {
        r.body(actix_web::body::BodyStream::new(stream))
    } else {
        r.body(actix_web::body::SizedStream::new(len, stream))
    }
}

fn async_stream_like(
    first: Bytes,
    second: Bytes,
    gate: Option<watch::Receiver<bool>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    futures_util::stream::unfold(
        (0u8, Some(first), Some(second), gate),
        |(step, first, second, mut gate)| async move {
            match step {
                0 => Some((Ok(first.clone().unwrap()), (1, None, second, gate))),
                1 => {
                    if let Some(g) = gate.as_mut() {
                        // Bounded wait: a test that forgets to open the gate fails, not hangs.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(30), g.wait_for(|open| *open))
                                .await;
                    }
                    Some((Ok(second.clone().unwrap()), (2, None, None, gate)))
                }
                _ => None,
            }
        },
    )
}

async fn cdn(req: HttpRequest, s: web::Data<Shared>) -> HttpResponse {
    s.counts.cdn_get.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key("authorization") {
        s.counts
            .cdn_with_authorization
            .fetch_add(1, Ordering::SeqCst);
    }
    let digest = req.uri().path().trim_start_matches("/cdn/").to_string();
    let bytes = s.content.lock().unwrap().blobs.get(&digest).cloned();
    match bytes {
        Some(b) => blob_body(&s, &digest, b),
        None => HttpResponse::NotFound().finish(),
    }
}

// ---------------------------------------------------------------------------------------

/// pullcache running in this test's actix System, with a manual clock.
pub struct Pullcache {
    pub base: String,
    /// `http(s)://<metrics listener>`.
    pub metrics_base: String,
    pub root: tempfile::TempDir,
    pub clock: Clock,
    pub handle: actix_web::dev::ServerHandle,
    pub engine: pullcache_actors::Engine,
    /// The server's sendfile state (bytes sent, the refusal hook).
    pub zero_copy: std::sync::Arc<pullcache::zerocopy::ZeroCopy>,
}

pub fn upstream(name: &str, url: &str, default: bool, prefix: Option<&str>) -> UpstreamSettings {
    UpstreamSettings {
        default,
        prefix: prefix.map(String::from),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        ..UpstreamSettings::new(name, url.parse().expect("an upstream URL"))
    }
}

pub fn config(root: &std::path::Path, upstreams: Vec<UpstreamSettings>) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.metrics.listen = "127.0.0.1:0".into();
    c.server.workers = 2;
    c.server.shutdown_timeout = Duration::from_secs(1);
    c.storage.root = root.to_path_buf();
    c.upstreams = upstreams;
    c
}

impl Pullcache {
    /// One default upstream named docker.io (so `library/` applies) at `url`.
    pub fn start(url: &str) -> Pullcache {
        Self::start_with(vec![upstream("docker.io", url, true, Some("docker"))])
    }

    pub fn start_with(upstreams: Vec<UpstreamSettings>) -> Pullcache {
        Self::start_cfg(upstreams, |_| {})
    }

    /// Starts with the configuration adjusted by `f`.
    pub fn start_cfg(upstreams: Vec<UpstreamSettings>, f: impl FnOnce(&mut Config)) -> Pullcache {
        let root = tempfile::tempdir().unwrap();
        let mut cfg = config(root.path(), upstreams);
        f(&mut cfg);
        let clock = Clock::manual();
        let running = pullcache::server::start(&cfg, clock.clone(), false).unwrap();
        let scheme = |on: bool| if on { "https" } else { "http" };
        let base = format!(
            "{}://{}",
            scheme(cfg.server.tls.enabled()),
            running.addrs[0]
        );
        let metrics_base = running
            .metrics_addrs
            .first()
            .map(|a| format!("{}://{a}", scheme(cfg.metrics.tls.enabled())))
            .unwrap_or_default();
        let handle = running.server.handle();
        // The server runs (accepts, dispatches to workers) while its future is polled.
        actix_rt::spawn(running.server);
        Pullcache {
            base,
            metrics_base,
            root,
            clock,
            handle,
            engine: running.engine,
            zero_copy: running.zero_copy,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap();
        self.root
            .path()
            .join("blobs")
            .join(alg)
            .join(&hex[..2])
            .join(hex)
    }

    /// Waits until `digest` is stored and recorded (its file appears a moment before its
    /// record: a request in between would start a new download).
    pub async fn wait_stored(&self, digest: &str) {
        let d = pullcache_actors::Digest::parse(digest).unwrap();
        for _ in 0..200 {
            if self.blob_path(digest).exists() && self.engine.is_stored(&d).await {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{digest} not stored within 10 s");
    }

    pub fn temp_files(&self) -> usize {
        std::fs::read_dir(self.root.path().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// The real `pullcache` binary, killed when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Starts `pullcache serve --config <config>` with `env` added and its stderr written
    /// to `stderr` (or discarded), and waits until `port` accepts connections.
    pub async fn start(
        config: &std::path::Path,
        port: u16,
        env: &[(&str, &str)],
        stderr: Option<&std::path::Path>,
    ) -> Daemon {
        use std::process::{Command, Stdio};
        let err = match stderr {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_pullcache"))
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start pullcache");
        let mut d = Daemon(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return d;
            }
            if let Ok(Some(status)) = d.0.try_wait() {
                panic!("pullcache exited at start: {status}");
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pullcache did not start listening within 10 s");
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn client() -> awc::Client {
    awc::Client::builder().disable_timeout().finish()
}

/// GET a URL, returning status, headers and the whole body (or the body error).
pub async fn get(
    url: &str,
    headers: &[(&str, &str)],
) -> (
    StatusCode,
    awc::http::header::HeaderMap,
    Result<Bytes, String>,
) {
    send(actix_web::http::Method::GET, url, headers).await
}

pub async fn send(
    method: actix_web::http::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (
    StatusCode,
    awc::http::header::HeaderMap,
    Result<Bytes, String>,
) {
    let mut req = client().request(method, url);
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.expect("request to pullcache");
    let status = resp.status();
    let h = resp.headers().clone();
    let body = resp
        .body()
        .limit(256 * 1024 * 1024)
        .await
        .map_err(|e| e.to_string());
    (status, h, body)
}

pub fn header<'a>(h: &'a awc::http::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The OCI error code of a JSON error body.
pub fn error_code(body: &Result<Bytes, String>) -> String {
    let b = body.as_ref().expect("error body");
    let v: serde_json::Value = serde_json::from_slice(b)
        .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(b)));
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}
