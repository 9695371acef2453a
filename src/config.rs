//! The one configuration struct, its defaults (in code: every field has a serde default, so
//! pullcache runs with no file at all), and the layers it is read from:
//!
//! 1. the file: `--config FILE`, or the embedded `config/pullcache.toml`;
//! 2. environment variables `PULLCACHE_<SECTION>__<KEY>` (e.g. `PULLCACHE_SERVER__LISTEN`,
//!    `PULLCACHE_STORAGE__ROOT`, `PULLCACHE_CACHE__TAG_TTL`), which override the file.
//!
//! `${ENV_VAR}` inside an upstream's `username`/`password` is replaced by that variable.
//! Validation names the key at fault.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pullcache_actors::{
    CacheSettings, EngineSettings, HealthSettings, LimitSettings, StorageSettings, UpstreamSettings,
};
use serde::{Deserialize, Serialize};

use crate::auth::AuthSettings;
use crate::tls::TlsSettings;

/// The embedded default configuration (a Docker Hub mirror on 127.0.0.1:5000, data in ./data).
pub const EMBEDDED: &str = include_str!("../config/pullcache.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub cache: CacheSettings,
    pub health: HealthSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub telemetry: TelemetrySettings,
    pub limits: LimitSettings,
    /// `[auth]`: client authentication and access rules (off without `htpasswd`).
    pub auth: AuthSettings,
    /// The registries mirrored. Default: Docker Hub, as the default upstream.
    pub upstreams: Vec<UpstreamSettings>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerSettings::default(),
            storage: StorageSettings::default(),
            cache: CacheSettings::default(),
            health: HealthSettings::default(),
            log: LogSettings::default(),
            metrics: MetricsSettings::default(),
            telemetry: TelemetrySettings::default(),
            limits: LimitSettings::default(),
            auth: AuthSettings::default(),
            upstreams: vec![UpstreamSettings::docker_hub()],
        }
    }
}

/// `[server]`: the HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port to listen on.
    pub listen: String,
    /// HTTP worker threads; 0 = one per CPU core.
    pub workers: usize,
    /// On SIGTERM/SIGINT: stop accepting, then give in-flight responses this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Send cached blob bytes with `sendfile(2)` (page cache to socket, no copy through
    /// pullcache). `false` reads and writes them like any other body. Not through TLS.
    pub zero_copy: bool,
    /// Client connections open at once; past it a new one is answered 503 with
    /// `Retry-After` and closed (see [`crate::conn`]).
    pub max_connections: usize,
    /// The same, per client address.
    pub max_connections_per_client: usize,
    /// A response whose client has read nothing for this long is ended and its connection
    /// closed (what holds a blob file open for a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// `[server.tls]`: HTTPS on `listen` (see [`crate::tls`]).
    pub tls: TlsSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:5000".into(),
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
            zero_copy: true,
            max_connections: 4096,
            max_connections_per_client: 512,
            send_timeout: Duration::from_secs(60),
            tls: TlsSettings::default(),
        }
    }
}

/// `[log]`: what is logged, and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter: `info`, `debug`, `pullcache_actors=debug,info`. `RUST_LOG` overrides.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// `[metrics]`: the second listener, for Prometheus and probes (kept off the registry port,
/// as Distribution keeps its metrics on its debug port).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address and port of `/metrics` and `/healthz`; `""` turns the listener off.
    pub listen: String,
    /// `[metrics.tls]`: HTTPS, and with `client_ca` client certificates (mutual TLS).
    pub tls: TlsSettings,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: "127.0.0.1:5001".into(),
            tls: TlsSettings::default(),
        }
    }
}

/// `[telemetry]`: OpenTelemetry traces, exported with OTLP over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP endpoint (`http://127.0.0.1:4318`; traces go to `/v1/traces`). Empty:
    /// no export, unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    pub otlp_endpoint: String,
    /// The `service.name` of every span (`OTEL_SERVICE_NAME` overrides).
    pub service_name: String,
    /// The fraction of new traces recorded, 0.0 to 1.0; a request carrying a `traceparent`
    /// follows its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: String::new(),
            service_name: "pullcache".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads the file (or the embedded default), applies the environment, expands
    /// `${VAR}` in credentials and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        use config::{File, FileFormat};
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            // Only PULLCACHE_<SECTION>__<KEY>: other PULLCACHE_* variables (PULLCACHE_BIN in
            // scripts, say) are not configuration.
            .filter(|(k, _)| {
                k.strip_prefix("PULLCACHE_")
                    .is_some_and(|r| r.contains("__"))
            })
            .collect();
        let builder = config::Config::builder();
        let builder = match path {
            Some(p) => builder.add_source(File::from(p).format(FileFormat::Toml).required(true)),
            None => builder.add_source(File::from_str(EMBEDDED, FileFormat::Toml)),
        };
        Self::build(builder, env)
    }

    /// A configuration from TOML text (no file, no environment): what the config fuzz
    /// target feeds, through the same layers, expansion and validation as a file.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        use config::{File, FileFormat};
        let builder = config::Config::builder().add_source(File::from_str(text, FileFormat::Toml));
        Self::build(builder, Default::default())
    }

    fn build(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
        env: std::collections::HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        use config::Environment;
        let built = builder
            .add_source(
                Environment::with_prefix("PULLCACHE")
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| ConfigError(e.to_string()))?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError(key_path_dots(&e.to_string())))?;
        cfg.expand_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn expand_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            u.username = expand(&u.username, &lookup).map_err(|v| {
                ConfigError(format!(
                    "upstreams[{i}].username: environment variable {v} is not set"
                ))
            })?;
            u.password.0 = expand(&u.password.0, &lookup).map_err(|v| {
                ConfigError(format!(
                    "upstreams[{i}].password: environment variable {v} is not set"
                ))
            })?;
            if let Some(f) = &u.password_file {
                if !u.password.0.is_empty() {
                    return Err(ConfigError(format!(
                        "upstreams[{i}]: password and password_file exclude each other"
                    )));
                }
                let p = std::fs::read_to_string(f).map_err(|e| {
                    ConfigError(format!(
                        "upstreams[{i}].password_file: cannot read {}: {e}",
                        f.display()
                    ))
                })?;
                u.password.0 = p.trim_end_matches(['\n', '\r']).to_string();
                if u.password.0.is_empty() {
                    return Err(ConfigError(format!(
                        "upstreams[{i}].password_file: {} is empty",
                        f.display()
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return err(format!(
                "server.listen: {:?} is not an address:port (e.g. \"127.0.0.1:5000\")",
                self.server.listen
            ));
        }
        if self.server.max_connections == 0
            || self.server.max_connections_per_client == 0
            || self.server.send_timeout.is_zero()
        {
            return err("server.max_connections, server.max_connections_per_client and server.send_timeout must be greater than zero".into());
        }
        if self.storage.root.as_os_str().is_empty() {
            return err("storage.root: must not be empty".into());
        }
        let s = &self.storage;
        if !(0.0 < s.low_watermark && s.low_watermark < s.high_watermark && s.high_watermark <= 1.0)
        {
            return err(format!(
                "storage.low_watermark ({}) and storage.high_watermark ({}) must satisfy 0 < low < high <= 1",
                s.low_watermark, s.high_watermark
            ));
        }
        if s.max_size.is_some_and(|m| m.as_u64() == 0) {
            return err("storage.max_size: must be greater than zero".into());
        }
        if self.health.threshold == 0
            || self.health.interval.is_zero()
            || self.health.timeout.is_zero()
        {
            return err("health: interval, timeout and threshold must be greater than zero".into());
        }
        if self.limits.max_fills == 0 || self.limits.max_fills_per_upstream == 0 {
            return err(
                "limits.max_fills and limits.max_fills_per_upstream must be greater than zero"
                    .into(),
            );
        }
        self.server
            .tls
            .validate("server.tls")
            .map_err(ConfigError)?;
        self.metrics
            .tls
            .validate("metrics.tls")
            .map_err(ConfigError)?;
        self.validate_observability()?;
        self.validate_upstreams()?;
        let names: Vec<String> = self.upstreams.iter().map(|u| u.name.clone()).collect();
        self.auth.validate(&names).map_err(ConfigError)
    }

    /// `[metrics]`, `[telemetry]`, `[log]`.
    fn validate_observability(&self) -> Result<(), ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return err(format!(
                "metrics.listen: {:?} is not an address:port (e.g. \"127.0.0.1:5001\"), or \"\" for no metrics listener",
                self.metrics.listen
            ));
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen == self.server.listen {
            return err(format!(
                "metrics.listen: {:?} is also server.listen",
                self.metrics.listen
            ));
        }
        let t = &self.telemetry;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return err(format!(
                "telemetry.sample_ratio: {} must be between 0.0 and 1.0",
                t.sample_ratio
            ));
        }
        if !t.otlp_endpoint.is_empty()
            && !url::Url::parse(&t.otlp_endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        {
            return err(format!(
                "telemetry.otlp_endpoint: {:?} is not an http(s) URL such as \"http://127.0.0.1:4318\"",
                t.otlp_endpoint
            ));
        }
        if t.service_name.is_empty() {
            return err("telemetry.service_name: must not be empty".into());
        }
        if let Err(e) = crate::telemetry::check_level(&self.log.level) {
            return err(format!("log.level: {e}"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return err(format!(
                "log.format: {:?} must be \"text\" or \"json\"",
                self.log.format
            ));
        }
        Ok(())
    }

    /// Every `[[upstreams]]` entry, and how they relate (names, prefixes, one default).
    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        if self.upstreams.is_empty() {
            return err("upstreams: at least one upstream is needed".into());
        }
        let mut defaults = 0;
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            if u.name.is_empty() {
                return err(format!(
                    "{key}.name: missing (a registry host name such as \"ghcr.io\")"
                ));
            }
            if !u
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
            {
                return err(format!("{key}.name: {:?} must be a registry host name such as \"docker.io\" or \"myregistry:5000\"", u.name));
            }
            if let Some(p) = &u.prefix {
                if p.is_empty()
                    || p.contains('/')
                    || pullcache_actors::reference::validate_name(p).is_err()
                {
                    return err(format!(
                        "{key}.prefix: {p:?} must be one lowercase name component such as \"ghcr\""
                    ));
                }
            }
            for (field, d) in [
                ("connect_timeout", u.connect_timeout),
                ("response_timeout", u.response_timeout),
                ("idle_timeout", u.idle_timeout),
            ] {
                if d.is_zero() {
                    return err(format!("{key}.{field}: must be greater than zero"));
                }
            }
            if u.ca.is_some() || u.client_cert.is_some() || u.client_key.is_some() {
                pullcache_actors::upstream::client_tls(u)
                    .map_err(|e| ConfigError(format!("{key}.{e}")))?;
            }
            if u.username.is_empty() != u.password.is_empty() {
                return err(format!(
                    "{key}: username and password must be given together"
                ));
            }
            for (j, v) in self.upstreams.iter().enumerate().take(i) {
                if v.name.eq_ignore_ascii_case(&u.name) {
                    return err(format!(
                        "{key}.name: {:?} is also the name of upstreams[{j}]",
                        u.name
                    ));
                }
                if u.prefix.is_some() && v.prefix == u.prefix {
                    return err(format!(
                        "{key}.prefix: {:?} is also the prefix of upstreams[{j}]",
                        u.prefix.as_deref().unwrap_or("")
                    ));
                }
            }
            defaults += u.default as usize;
        }
        if defaults > 1 {
            return err("upstreams: at most one upstream may have default = true".into());
        }
        Ok(())
    }

    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            storage: self.storage.clone(),
            cache: self.cache.clone(),
            health: self.health.clone(),
            limits: self.limits.clone(),
            upstreams: self.upstreams.clone(),
        }
    }

    /// The effective configuration as TOML, secrets replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }
}

/// The `config` crate names a key inside a list without the dot after the index
/// (`upstreams[0]url`): put it back (`upstreams[0].url`), so errors name keys as the
/// README and the other messages do.
fn key_path_dots(msg: &str) -> String {
    let Some(at) = msg.find("for key `") else {
        return msg.to_string();
    };
    let (head, tail) = msg.split_at(at);
    let mut out = String::with_capacity(msg.len() + 4);
    out.push_str(head);
    let mut chars = tail.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_alphanumeric() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

/// Replaces every `${NAME}` with the variable's value; `Err(NAME)` if one is unset.
fn expand(s: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
