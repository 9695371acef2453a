//! The engine's part of the configuration: storage, cache policy and upstreams.
//!
//! Every field has a default in code (`#[serde(default)]`), so an empty file, or none at all,
//! is a working configuration: a Docker Hub mirror with its data under `./data`. The daemon
//! (`src/config.rs`) adds the server and logging sections and the file/environment layers.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// `[storage]`: where blobs and metadata live, and how much disk they may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory holding `blobs/` (content-addressed files), `tmp/` (downloads in progress)
    /// and `meta/` (the sled metadata database). Created if missing.
    pub root: PathBuf,
    /// Disk budget for blobs ("50GiB", "500MB"). Unset: 80% of the filesystem's free space
    /// at the first start, remembered in the metadata and printed at start-up.
    #[serde(with = "bytesize_opt")]
    pub max_size: Option<u64>,
    /// Eviction starts when the blobs stored pass this fraction of `max_size`...
    pub high_watermark: f64,
    /// ...and evicts least-recently-used blobs until usage is under this fraction.
    pub low_watermark: f64,
    /// Never evicted: images matching these `upstream/repository:tag` patterns (`*` matches
    /// anything), e.g. `"docker.io/library/alpine:*"`. Their manifests and blobs stay.
    pub pin: Vec<String>,
    /// Manifests and tags of a repository nobody pulled for this long are dropped.
    #[serde(with = "humantime_serde_compat")]
    pub manifest_max_idle: Duration,
    /// How often the eviction sweeper checks usage (it also runs after large downloads).
    #[serde(with = "humantime_serde_compat")]
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
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Consecutive results needed to change an upstream's state between up and down.
    pub threshold: u32,
    /// Timeout of one probe.
    #[serde(with = "humantime_serde_compat")]
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
    #[serde(with = "humantime_serde_compat")]
    pub tag_ttl: Duration,
    /// Tags matching any of these regexes (e.g. `^v?[0-9]+\\.[0-9]+\\.[0-9]+$`) are never
    /// revalidated once cached.
    pub immutable_tags: Vec<String>,
    /// How long past its TTL a cached tag may still be served while the upstream is down,
    /// erroring, rate-limiting or timing out. Past that: 503.
    #[serde(with = "humantime_serde_compat")]
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

/// One `[[upstreams]]` entry: a registry pullcache mirrors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Registry host name as clients name it (`docker.io`, `ghcr.io`, `myregistry:5000`).
    /// containerd's `?ns=` query parameter is matched against it. Also the key under which
    /// this upstream's repositories are cached: renaming an upstream starts a new cache.
    pub name: String,
    /// Base URL of the registry API, without `/v2` (`https://registry-1.docker.io`).
    pub url: String,
    /// Serves repository names that carry neither `ns=` nor a known prefix (the Docker
    /// daemon's `registry-mirrors` sends neither). At most one upstream may be default.
    pub default: bool,
    /// Optional path prefix: `/v2/<prefix>/<repo>/...` routes here (skopeo, podman, crane).
    pub prefix: Option<String>,
    /// Upstream user name; `${ENV_VAR}` is expanded. Empty = anonymous.
    pub username: String,
    /// Upstream password or token; `${ENV_VAR}` is expanded. Never logged.
    pub password: Secret,
    /// Prepend `library/` to one-component names (Docker Hub's official images). Unset =
    /// on for an upstream named `docker.io` or pointing at Docker Hub.
    pub library_prefix: Option<bool>,
    /// TCP + TLS connect timeout.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the response headers.
    #[serde(with = "humantime_serde_compat")]
    pub response_timeout: Duration,
    /// Longest silence allowed while a response body is streaming. There is deliberately no
    /// total timeout: a multi-GiB layer may take long, but it must keep moving.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Overrides `cache.tag_ttl` for this upstream.
    #[serde(with = "humantime_serde_compat::option")]
    pub tag_ttl: Option<Duration>,
    /// When the upstream's `ratelimit-remaining` (Docker Hub) falls below this, cached tags
    /// are not revalidated until the rate-limit window resets, saving the last pulls for
    /// images not cached yet.
    pub min_quota: u64,
}

impl Default for UpstreamSettings {
    /// Defaults for keys an `[[upstreams]]` entry leaves out; `name` and `url` are required.
    fn default() -> Self {
        UpstreamSettings {
            name: String::new(),
            url: String::new(),
            default: false,
            prefix: None,
            username: String::new(),
            password: Secret::default(),
            library_prefix: None,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            tag_ttl: None,
            min_quota: 5,
        }
    }
}

impl UpstreamSettings {
    /// Docker Hub as the default upstream: what pullcache mirrors with no configuration.
    pub fn docker_hub() -> Self {
        UpstreamSettings {
            name: "docker.io".into(),
            url: "https://registry-1.docker.io".into(),
            default: true,
            prefix: Some("docker".into()),
            ..Default::default()
        }
    }

    /// Whether one-component names get `library/` prepended.
    pub fn uses_library_prefix(&self) -> bool {
        self.library_prefix.unwrap_or_else(|| {
            self.name == "docker.io"
                || self.url.contains("registry-1.docker.io")
                || self.url.contains("index.docker.io")
        })
    }
}

/// Everything the engine needs to start.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    pub storage: StorageSettings,
    pub cache: CacheSettings,
    pub health: HealthSettings,
    pub upstreams: Vec<UpstreamSettings>,
}

/// Sizes as "50GiB", "500MB", "1073741824" (the `bytesize` crate's grammar), for serde.
pub mod bytesize_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&bytesize::ByteSize(*b).display().iec().to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::N(n)) => Ok(Some(n)),
            Some(Raw::S(s)) if s.trim().is_empty() => Ok(None),
            Some(Raw::S(s)) => s
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Some(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!("invalid size {s:?}: {e} (e.g. \"50GiB\")"))
                }),
        }
    }
}

/// Durations as humantime strings ("5m", "30s", "1h 30m"), for serde, using the `humantime`
/// crate's grammar.
pub mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }

    /// The same for an optional duration.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => humantime::parse_duration(&s)
                    .map(Some)
                    .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}"))),
            }
        }
    }
}
