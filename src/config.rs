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
    /// pullcache). `false` reads and writes them like any other body.
    pub zero_copy: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:5000".into(),
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
            zero_copy: true,
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
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: "127.0.0.1:5001".into(),
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
        use config::{Environment, File, FileFormat};
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
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        Config::load_with_env(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn embedded_default_is_a_docker_hub_mirror() {
        let c = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000");
        assert_eq!(c.storage.root, std::path::PathBuf::from("./data"));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].name, "docker.io");
        assert_eq!(
            c.upstreams[0].url.to_string(),
            "https://registry-1.docker.io"
        );
        assert!(c.upstreams[0].default);
        assert!(c.upstreams[0].uses_library_prefix());
    }

    #[test]
    fn empty_file_means_defaults_and_env_overrides() {
        let c = load_str(
            "",
            &[
                ("PULLCACHE_SERVER__LISTEN", "127.0.0.1:6000"),
                ("PULLCACHE_CACHE__TAG_TTL", "1h"),
                ("PULLCACHE_BIN", "/not/config"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:6000");
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(3600));
        assert_eq!(c.upstreams[0].name, "docker.io");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_str("[server]\nlisten = \"nonsense\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = load_str("[cache]\ntag_ttl = \"5 parsecs\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("tag_ttl"), "{e}");
        let e = load_str("[server]\nlisten_addr = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = load_str("[[upstreams]]\nname = \"a\"\nurl = \"ftp://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstreams[0].url"), "{e}");
        let two = "[[upstreams]]\nname = \"a\"\nurl = \"http://a\"\ndefault = true\n[[upstreams]]\nname = \"b\"\nurl = \"http://b\"\ndefault = true\n";
        assert!(load_str(two, &[])
            .unwrap_err()
            .to_string()
            .contains("at most one"));
    }

    #[test]
    fn credentials_expand_and_are_redacted() {
        std::env::set_var("PULLCACHE_TEST_SECRET_X", "hunter2");
        let c = load_str(
            "[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword = \"${PULLCACHE_TEST_SECRET_X}\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].password.expose(), "hunter2");
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("***"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = load_str("[[upstreams]]\nname = \"g\"\nurl = \"https://g\"\nusername = \"me\"\npassword = \"${PULLCACHE_TEST_UNSET_Y}\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstreams[0].password") && e.contains("PULLCACHE_TEST_UNSET_Y"),
            "{e}"
        );
    }

    #[test]
    fn a_password_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret-from-file\n").unwrap();
        let up = |extra: &str| {
            format!(
                "[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"me\"\n{extra}\n"
            )
        };
        let c = load_str(
            &up(&format!("password_file = {:?}", f.display().to_string())),
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].password.expose(), "s3cret-from-file");
        assert!(!c.to_redacted_toml().contains("s3cret-from-file"));
        let both = format!(
            "password = \"x\"\npassword_file = {:?}",
            f.display().to_string()
        );
        let e = load_str(&up(&both), &[]).unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0]") && e.contains("password_file"),
            "{e}"
        );
        let e = load_str(&up("password_file = \"/nonexistent/pw\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstreams[0].password_file") && e.contains("/nonexistent/pw"),
            "{e}"
        );
    }

    #[test]
    fn expand_handles_text_around_variables() {
        let look = |k: &str| (k == "A").then(|| "1".to_string());
        assert_eq!(expand("x${A}y", &look).unwrap(), "x1y");
        assert_eq!(expand("plain", &look).unwrap(), "plain");
        assert_eq!(expand("${B}", &look).unwrap_err(), "B");
    }

    /// The value of `key` (`section.name`, or `upstreams[].name` for the first upstream)
    /// in `c`, as JSON (`null` for an unset option).
    fn value_of(c: &Config, key: &str) -> serde_json::Value {
        let json = serde_json::to_value(c).unwrap();
        match key.strip_prefix("upstreams[].") {
            Some(k) => json["upstreams"][0][k].clone(),
            None => {
                let (section, k) = key.split_once('.').unwrap();
                json[section][k].clone()
            }
        }
    }

    /// Every key the code has, with its default: the sections of `Config::default()`, and
    /// an `[[upstreams]]` entry with nothing but its required keys.
    fn code_defaults() -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut out = std::collections::BTreeMap::new();
        let one = load_str(
            "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n",
            &[],
        )
        .unwrap();
        let json = serde_json::to_value(Config::default()).unwrap();
        for (section, v) in json.as_object().unwrap() {
            if section != "upstreams" {
                for (k, value) in v.as_object().unwrap() {
                    out.insert(format!("{section}.{k}"), value.clone());
                }
            }
        }
        let up = serde_json::to_value(&one.upstreams[0]).unwrap();
        for (k, value) in up.as_object().unwrap() {
            out.insert(format!("upstreams[].{k}"), value.clone());
        }
        out
    }

    #[test]
    fn the_embedded_file_states_exactly_the_defaults_in_code() {
        let embedded = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(
            serde_json::to_value(&embedded).unwrap(),
            serde_json::to_value(Config::default()).unwrap(),
            "config/pullcache.toml and Config::default() disagree"
        );
    }

    /// The README's configuration table: every row's key exists in the code with the
    /// default the row states, and every key of the code has a row.
    #[test]
    fn the_readme_table_states_every_key_with_its_default() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("a Configuration section")
            .split("\n## ")
            .next()
            .unwrap();
        // key -> the default cell, as written
        let mut stated = std::collections::BTreeMap::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let keys: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect::<Vec<_>>();
            let first = keys[0];
            let prefix = &first[..first.rfind('.').map_or(0, |i| i + 1)];
            for k in &keys {
                let key = if k.contains('.') {
                    k.to_string()
                } else {
                    format!("{prefix}{k}")
                };
                stated.insert(key, cells[1].trim().to_string());
            }
        }
        let code = code_defaults();
        let stated_keys: Vec<&String> = stated.keys().collect();
        let code_keys: Vec<&String> = code.keys().collect();
        assert_eq!(
            stated_keys, code_keys,
            "README table keys vs keys in the code"
        );
        for (key, cell) in &stated {
            let literal = cell
                .strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .filter(|c| !c.contains('`') && !code.contains_key(*c));
            let want = &code[key];
            match literal {
                // The README states a value: it must be what the code uses when the key
                // is left out (read through the code's own parser: "30d" is 30 days).
                Some(lit) => {
                    let doc = match key.strip_prefix("upstreams[].") {
                        Some(k) => format!(
                            "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n{k} = {lit}\n"
                        ),
                        None => {
                            let (section, k) = key.split_once('.').unwrap();
                            format!("[{section}]\n{k} = {lit}\n")
                        }
                    };
                    let c = load_str(&doc, &[])
                        .unwrap_or_else(|e| panic!("README default of {key} ({lit}): {e}"));
                    assert_eq!(&value_of(&c, key), want, "README default of {key}: {cell}");
                }
                // "required": leaving it out is an error.
                None if cell == "required" => {
                    let k = key.strip_prefix("upstreams[].").unwrap();
                    let doc = "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n"
                        .lines()
                        .filter(|l| !l.starts_with(&format!("{k} =")))
                        .collect::<Vec<_>>()
                        .join("\n");
                    let e = load_str(&doc, &[]).unwrap_err().to_string();
                    assert!(e.contains(k), "leaving out {key}: {e}");
                }
                // Words ("none", "auto", "80% of ...", another key): the code has no value.
                None => assert!(want.is_null(), "{key}: README says {cell}, code has {want}"),
            }
        }
    }

    #[test]
    fn sizes_patterns_and_urls_fail_naming_their_key() {
        for (doc, key) in [
            ("[storage]\nmax_size = -1\n", "storage.max_size"),
            ("[storage]\nmax_size = 1.5\n", "storage.max_size"),
            ("[storage]\nmax_size = \"12 parsecs\"\n", "storage.max_size"),
            ("[storage]\npin = [\"alpine\"]\n", "storage.pin"),
            (
                "[cache]\nimmutable_tags = [\"(\"]\n",
                "cache.immutable_tags",
            ),
            (
                "[[upstreams]]\nname = \"a\"\nurl = \"https://u:p@a\"\n",
                "upstreams[0].url",
            ),
        ] {
            let e = load_str(doc, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{doc}: {e}");
            assert!(!e.contains("untagged"), "{doc}: {e}");
        }
        let c = load_str("[storage]\nmax_size = \"1.5GiB\"\n", &[]).unwrap();
        assert_eq!(c.storage.max_size.unwrap().as_u64(), 3 << 29);
        let c = load_str("", &[("PULLCACHE_STORAGE__MAX_SIZE", "1048576")]).unwrap();
        assert_eq!(c.storage.max_size.unwrap().as_u64(), 1 << 20);
        // Blank is unset: the environment can clear a size the file sets.
        let c = load_str(
            "[storage]\nmax_size = \" 2GiB \"\n",
            &[("PULLCACHE_STORAGE__MAX_SIZE", "")],
        )
        .unwrap();
        assert_eq!(c.storage.max_size, None);
        let c = load_str("[storage]\nmax_size = \" 2GiB \"\n", &[]).unwrap();
        assert_eq!(c.storage.max_size.unwrap().as_u64(), 2 << 30);
    }
}
