//! The engine's part of the configuration: storage, cache policy and upstreams.
//!
//! Every field has a default in code (`#[serde(default)]`), so an empty file, or none at all,
//! is a working configuration: a Docker Hub mirror with its data under `./data`. The daemon
//! (`src/config.rs`) adds the server and logging sections and the file/environment layers.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// `[storage]`: where blobs and metadata live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory holding `blobs/` (content-addressed files), `tmp/` (downloads in progress)
    /// and `meta/` (the sled metadata database). Created if missing.
    pub root: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            root: PathBuf::from("./data"),
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
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            tag_ttl: Duration::from_secs(300),
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
    pub upstreams: Vec<UpstreamSettings>,
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
}
