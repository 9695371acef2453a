//! The engine's part of the configuration: storage, cache policy and upstreams, as typed
//! values. Each value is parsed once, when the configuration is read: durations
//! (`humantime-serde`), sizes (`bytesize`), tag regexes ([`TagPattern`]), pin patterns
//! ([`PinPattern`]) and upstream URLs ([`UpstreamUrl`]) fail there, naming their key, and
//! the engine receives them ready to use.
//!
//! Every field has a default in code, so an empty file, or none at all, is a working
//! configuration: a Docker Hub mirror with its data under `./data`. The daemon
//! (`src/config.rs`) adds the server and logging sections and the file/environment layers.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use bytesize::ByteSize;
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// `[storage]`: where blobs and metadata live, and how much disk they may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory holding `blobs/` (content-addressed files), `tmp/` (downloads in progress)
    /// and `meta/` (the sled metadata database). Created if missing.
    pub root: PathBuf,
    /// Disk budget for blobs ("50GiB", "500MB", or bytes). Unset (or blank): 80% of the
    /// filesystem's free space at the first start, remembered in the metadata and printed
    /// at start-up.
    #[serde(deserialize_with = "optional_size")]
    pub max_size: Option<ByteSize>,
    /// Eviction starts when the blobs stored pass this fraction of `max_size`...
    pub high_watermark: f64,
    /// ...and evicts least-recently-used blobs until usage is under this fraction.
    pub low_watermark: f64,
    /// Never evicted: images matching these `upstream/repository:tag` patterns (`*` matches
    /// anything), e.g. `"docker.io/library/alpine:*"`. Their manifests and blobs stay.
    pub pin: Vec<PinPattern>,
    /// Manifests and tags of a repository nobody pulled for this long are dropped.
    #[serde(with = "humantime_serde")]
    pub manifest_max_idle: Duration,
    /// How often the eviction sweeper checks usage (it also runs after large downloads).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            root: PathBuf::from("./data"),
            max_size: None,
            high_watermark: 0.90,
            low_watermark: 0.80,
            pin: Vec::new(),
            manifest_max_idle: Duration::from_secs(30 * 86400),
            sweep_interval: Duration::from_secs(30),
        }
    }
}

/// `[health]`: probing upstreams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// Each upstream's `GET /v2/` is probed this often (200 or 401 = up).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Consecutive results needed to change an upstream's state between up and down.
    pub threshold: u32,
    /// Timeout of one probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(15),
            threshold: 3,
            timeout: Duration::from_secs(5),
        }
    }
}

/// `[cache]`: freshness policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// How long a tag -> digest answer is trusted before it is revalidated upstream with a
    /// HEAD (which does not count against Docker Hub's pull quota). Humantime: "5m", "1h".
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Tags matching any of these regexes (e.g. `^v?[0-9]+\\.[0-9]+\\.[0-9]+$`) are never
    /// revalidated once cached.
    pub immutable_tags: Vec<TagPattern>,
    /// How long past its TTL a cached tag may still be served while the upstream is down,
    /// erroring, rate-limiting or timing out. Past that: 503.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            tag_ttl: Duration::from_secs(300),
            immutable_tags: Vec::new(),
            max_stale: Duration::from_secs(7 * 86400),
        }
    }
}

/// A secret string (password, token): readable by the engine, printed as `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// One `[[upstreams]]` entry: a registry pullcache mirrors. `name` and `url` are required;
/// every other key has the default of [`UpstreamSettings::new`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Registry host name as clients name it (`docker.io`, `ghcr.io`, `myregistry:5000`).
    /// containerd's `?ns=` query parameter is matched against it. Also the key under which
    /// this upstream's repositories are cached: renaming an upstream starts a new cache.
    pub name: String,
    /// Base URL of the registry API, without `/v2` (`https://registry-1.docker.io`).
    pub url: UpstreamUrl,
    /// Serves repository names that carry neither `ns=` nor a known prefix (the Docker
    /// daemon's `registry-mirrors` sends neither). At most one upstream may be default.
    #[serde(default)]
    pub default: bool,
    /// Optional path prefix: `/v2/<prefix>/<repo>/...` routes here (skopeo, podman, crane).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Upstream user name; `${ENV_VAR}` is expanded. Empty = anonymous.
    #[serde(default)]
    pub username: String,
    /// Upstream password or token; `${ENV_VAR}` is expanded. Never logged.
    #[serde(default)]
    pub password: Secret,
    /// A file holding the password (a mounted secret), read at start; its trailing newline
    /// is not part of it. Excludes `password`.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Prepend `library/` to one-component names (Docker Hub's official images). Unset =
    /// on for an upstream named `docker.io` or pointing at Docker Hub.
    #[serde(default)]
    pub library_prefix: Option<bool>,
    /// TCP + TLS connect timeout.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the response headers.
    #[serde(default = "defaults::response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest silence allowed while a response body is streaming. There is deliberately no
    /// total timeout: a multi-GiB layer may take long, but it must keep moving.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Overrides `cache.tag_ttl` for this upstream.
    #[serde(default, with = "humantime_serde")]
    pub tag_ttl: Option<Duration>,
    /// When the upstream's `ratelimit-remaining` (Docker Hub) falls below this, cached tags
    /// are not revalidated until the rate-limit window resets, saving the last pulls for
    /// images not cached yet.
    #[serde(default = "defaults::min_quota")]
    pub min_quota: u64,
    /// A PEM file of CA certificates trusted for this upstream, in addition to the built-in
    /// web roots and the system's (a private registry behind a private CA).
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// A PEM certificate chain presented to an upstream that asks for a client certificate
    /// (with `client_key`).
    #[serde(default)]
    pub client_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key: Option<std::path::PathBuf>,
    /// Accept any certificate from this upstream: no chain, name or expiry check. For a
    /// test registry only; pullcache warns at start-up while it is on.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Hosts a redirect from this upstream may lead to, besides its own: exact names or
    /// `*.example.com`. Empty (the default): any host with public addresses only (no
    /// loopback, private, link-local or metadata address), unless the upstream is itself
    /// on such an address.
    #[serde(default)]
    pub redirect_hosts: Vec<String>,
}

/// The defaults of an `[[upstreams]]` entry's optional keys (serde and
/// [`UpstreamSettings::new`] both take them from here).
mod defaults {
    use std::time::Duration;

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn min_quota() -> u64 {
        5
    }
}

impl UpstreamSettings {
    /// An upstream with every optional key at its default.
    pub fn new(name: impl Into<String>, url: UpstreamUrl) -> Self {
        UpstreamSettings {
            name: name.into(),
            url,
            default: false,
            prefix: None,
            username: String::new(),
            password: Secret::default(),
            password_file: None,
            library_prefix: None,
            connect_timeout: defaults::connect_timeout(),
            response_timeout: defaults::response_timeout(),
            idle_timeout: defaults::idle_timeout(),
            tag_ttl: None,
            min_quota: defaults::min_quota(),
            ca: None,
            client_cert: None,
            client_key: None,
            insecure_skip_verify: false,
            redirect_hosts: Vec::new(),
        }
    }

    /// Docker Hub as the default upstream: what pullcache mirrors with no configuration.
    pub fn docker_hub() -> Self {
        UpstreamSettings {
            default: true,
            prefix: Some("docker".into()),
            ..Self::new(
                "docker.io",
                "https://registry-1.docker.io".parse().expect("a valid URL"),
            )
        }
    }

    /// Whether one-component names get `library/` prepended.
    pub fn uses_library_prefix(&self) -> bool {
        self.library_prefix.unwrap_or_else(|| {
            let host = self.url.0.host_str().unwrap_or("");
            self.name == "docker.io" || host == "registry-1.docker.io" || host == "index.docker.io"
        })
    }
}

/// An upstream registry's base URL: `http://` or `https://` with a host, no query, no
/// credentials (they belong in `username`/`password`), no trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl(Url);

impl UpstreamUrl {
    pub fn as_url(&self) -> &Url {
        &self.0
    }

    /// The URL of `path` (which starts with `/`) on this registry.
    pub fn join(&self, path: &str) -> String {
        format!("{}{}", self.0.as_str().trim_end_matches('/'), path)
    }
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let url =
            Url::parse(s.trim_end_matches('/')).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("URL {s:?} must be http:// or https:// with a host"));
        }
        if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "URL {s:?} must not carry a query or credentials (use username/password)"
            ));
        }
        Ok(UpstreamUrl(url))
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

/// A tag regex of `cache.immutable_tags`.
#[derive(Clone)]
pub struct TagPattern(Regex);

impl TagPattern {
    pub fn is_match(&self, tag: &str) -> bool {
        self.0.is_match(tag)
    }
}

impl std::str::FromStr for TagPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Regex::new(s)
            .map(TagPattern)
            .map_err(|e| format!("invalid regex {s:?}: {e}"))
    }
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Debug for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

/// An `upstream/repository:tag` pattern of `storage.pin`, where `*` matches any run of
/// characters.
#[derive(Clone)]
pub struct PinPattern {
    source: String,
    re: Regex,
}

impl PinPattern {
    pub fn parse(p: &str) -> Result<PinPattern, String> {
        let (image, tag) = p
            .rsplit_once(':')
            .filter(|(i, t)| i.contains('/') && !t.contains('/') && !t.is_empty())
            .ok_or_else(|| {
                format!(
                    "{p:?} must look like \"docker.io/library/alpine:*\" (upstream/repository:tag)"
                )
            })?;
        let glob = |s: &str| regex::escape(s).replace("\\*", ".*");
        let re =
            Regex::new(&format!("^{}:{}$", glob(image), glob(tag))).map_err(|e| e.to_string())?;
        Ok(PinPattern {
            source: p.to_string(),
            re,
        })
    }

    pub fn matches(&self, upstream: &str, repo: &str, tag: &str) -> bool {
        self.re.is_match(&format!("{upstream}/{repo}:{tag}"))
    }
}

impl std::str::FromStr for PinPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PinPattern::parse(s)
    }
}

impl fmt::Display for PinPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for PinPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// An optional size in `bytesize`'s grammar ("50GiB", "1.5GiB", a number of bytes); a
/// blank string is unset, so `PULLCACHE_STORAGE__MAX_SIZE=` clears a size the file sets.
/// (bytesize's own `Deserialize` takes no blank; its `Serialize` prints the value.)
fn optional_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};
    struct Size;
    impl<'de> Visitor<'de> for Size {
        type Value = Option<ByteSize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"50GiB\", or a number of bytes")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(ByteSize(v)))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(|v| Some(ByteSize(v)))
                .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
            match v.trim() {
                "" => Ok(None),
                t => t
                    .parse::<ByteSize>()
                    .map(Some)
                    .map_err(|e| E::custom(format!("invalid size {v:?}: {e} (e.g. \"50GiB\")"))),
            }
        }
    }
    d.deserialize_option(Size)
}

/// Serde for the typed values above: a string in the file, parsed by `FromStr` (the error
/// names the value; the configuration loader adds the key), printed by `Display`.
macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_via_str!(UpstreamUrl, TagPattern, PinPattern);

/// An upstream's position in the configured `upstreams` list: how the engine and the
/// router refer to an upstream. Its name (the metadata key) is in [`UpstreamNames`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(u16);

impl UpstreamId {
    /// The upstream at `index` in the configured list (at most 65,536 upstreams).
    pub fn new(index: usize) -> UpstreamId {
        UpstreamId(u16::try_from(index).expect("at most 65536 upstreams"))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The configured upstreams' names, by [`UpstreamId`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct UpstreamNames(Arc<[String]>);

impl UpstreamNames {
    pub fn new(upstreams: &[UpstreamSettings]) -> UpstreamNames {
        UpstreamNames(upstreams.iter().map(|u| u.name.clone()).collect())
    }

    pub fn name(&self, id: UpstreamId) -> &str {
        &self.0[id.index()]
    }

    /// The upstream with this name.
    pub fn find(&self, name: &str) -> Option<UpstreamId> {
        self.0.iter().position(|n| n == name).map(UpstreamId::new)
    }

    /// Every upstream, in configuration order.
    pub fn ids(&self) -> impl Iterator<Item = UpstreamId> {
        (0..self.0.len()).map(UpstreamId::new)
    }
}

/// `[limits]`: how much work one pullcache takes on at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Blob downloads in flight at once, over all upstreams. Past it, a request that would
    /// start one is answered 503 with `Retry-After`; a request for a blob already being
    /// downloaded joins that download and is never refused. Each download holds two
    /// threads, a temporary file and an upstream connection.
    pub max_fills: usize,
    /// The same, per upstream. Also the size of the upstream's connection pool for blob
    /// downloads, kept apart from the pool for manifests and tokens, so that downloads
    /// never starve them.
    pub max_fills_per_upstream: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_fills: 64,
            max_fills_per_upstream: 32,
        }
    }
}

/// Everything the engine needs to start.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    pub storage: StorageSettings,
    pub cache: CacheSettings,
    pub health: HealthSettings,
    pub limits: LimitSettings,
    pub upstreams: Vec<UpstreamSettings>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_patterns() {
        let p = PinPattern::parse("docker.io/library/alpine:*").unwrap();
        assert!(p.matches("docker.io", "library/alpine", "3.20"));
        assert!(!p.matches("docker.io", "library/alpine2", "3.20"));
        assert!(!p.matches("ghcr.io", "library/alpine", "3.20"));
        let p = PinPattern::parse("*/org/*:v1.*").unwrap();
        assert!(p.matches("ghcr.io", "org/app", "v1.2"));
        assert!(!p.matches("ghcr.io", "org/app", "v2.0"));
        assert_eq!(p.to_string(), "*/org/*:v1.*");
        assert!(PinPattern::parse("alpine").is_err());
        assert!(PinPattern::parse("docker.io/alpine:").is_err());
    }

    #[test]
    fn upstream_urls() {
        let u: UpstreamUrl = "https://registry.example.com:5000/".parse().unwrap();
        assert_eq!(u.to_string(), "https://registry.example.com:5000");
        assert_eq!(u.join("/v2/"), "https://registry.example.com:5000/v2/");
        for bad in [
            "ftp://x",
            "https://u:p@x",
            "https://x?a=1",
            "not a url",
            "http://",
        ] {
            assert!(bad.parse::<UpstreamUrl>().is_err(), "{bad}");
        }
    }
}
