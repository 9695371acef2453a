//! Client authentication and access rules (`[auth]`): who may pull what through pullcache.
//!
//! With `auth.htpasswd` set, every `/v2/` request needs HTTP Basic credentials that match a
//! bcrypt entry of that file (`anonymous_read` lets requests without credentials through as
//! the user `anonymous`). Wrong credentials are answered 401 with `WWW-Authenticate: Basic`
//! after `fail_delay`, slept on the request's own task: the worker goes on serving others.
//! `[[auth.rules]]` then say which users and groups may pull from which upstreams and
//! repositories; without any rule, every authenticated user may pull everything.
//!
//! Costs. A bcrypt check at cost 10 takes ~70 ms of CPU, and a `docker pull` sends the
//! same credentials with each of its dozens of requests. So the check runs on the blocking
//! pool, at most [`MAX_VERIFYING`] at once (a flood of wrong passwords cannot take every
//! core), and a credential that passed is remembered as a salted SHA-256 until the file
//! changes: later requests cost one hash, ~1 µs.
//!
//! The htpasswd file is reloaded when it changes ([`crate::watch`]); a file that no longer
//! loads keeps the users loaded before, and logs an error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix_web::http::header;
use actix_web::HttpRequest;
use base64::Engine as _;
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::ApiError;

/// bcrypt checks running at once; more wait their turn (asynchronously).
const MAX_VERIFYING: usize = 4;
/// Remembered good credentials; past this many, all are forgotten (they are re-checked).
const MAX_REMEMBERED: usize = 4096;
/// The user name of a request without credentials when `anonymous_read` is on.
pub const ANONYMOUS: &str = "anonymous";

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// An htpasswd file of bcrypt entries (`user:$2y$...`). Unset: no authentication.
    pub htpasswd: Option<PathBuf>,
    /// The realm of the `WWW-Authenticate: Basic` challenge.
    pub realm: String,
    /// How long a request with wrong credentials waits for its 401.
    #[serde(with = "humantime_serde")]
    pub fail_delay: Duration,
    /// Requests without credentials may pull (as user `anonymous`, subject to the rules).
    pub anonymous_read: bool,
    /// Named groups of users, for the rules: `ci = ["jenkins", "gitlab"]`.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Who may pull what. None: every user may pull everything configured.
    pub rules: Vec<AuthRule>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            htpasswd: None,
            realm: "pullcache".into(),
            fail_delay: Duration::from_secs(1),
            anonymous_read: false,
            groups: BTreeMap::new(),
            rules: Vec::new(),
        }
    }
}

/// One `[[auth.rules]]` entry: these users and groups may pull these repositories of these
/// upstreams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// User names (`"*"`: every authenticated user; `"anonymous"`: requests without
    /// credentials, with `anonymous_read`).
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names of `[auth.groups]`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Upstream names (`"*"`: all).
    #[serde(default = "all")]
    pub upstreams: Vec<String>,
    /// Repository patterns on the upstream (`library/*`, `myorg/**`): `*` is one path
    /// component, `**` any number of them.
    #[serde(default = "all_repositories")]
    pub repositories: Vec<String>,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}
fn all_repositories() -> Vec<String> {
    vec!["**".into()]
}

impl AuthSettings {
    pub fn enabled(&self) -> bool {
        self.htpasswd.is_some()
    }

    /// Checks the keys (and reads the file once); errors name the key.
    pub fn validate(&self, upstreams: &[String]) -> Result<(), String> {
        let Some(path) = &self.htpasswd else {
            if !self.rules.is_empty() || self.anonymous_read || !self.groups.is_empty() {
                return Err(
                    "auth: rules, groups and anonymous_read need auth.htpasswd (without it nothing is authenticated)"
                        .into(),
                );
            }
            return Ok(());
        };
        Htpasswd::read(path).map_err(|e| format!("auth.htpasswd: {e}"))?;
        if self.realm.is_empty() || self.realm.contains(['"', '\\']) {
            return Err("auth.realm: must be non-empty, without quotes or backslashes".into());
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.users.is_empty() && r.groups.is_empty() {
                return Err(format!("auth.rules[{i}]: names no users and no groups"));
            }
            for g in &r.groups {
                if !self.groups.contains_key(g) {
                    return Err(format!(
                        "auth.rules[{i}].groups: {g:?} is not in [auth.groups]"
                    ));
                }
            }
            for u in &r.upstreams {
                if u != "*" && !upstreams.iter().any(|n| n.eq_ignore_ascii_case(u)) {
                    return Err(format!(
                        "auth.rules[{i}].upstreams: {u:?} is not a configured upstream name"
                    ));
                }
            }
        }
        self.compiled_rules().map(|_| ())
    }

    /// The rules as checked per request: who (users, and the members of the groups named),
    /// which upstreams, which repository patterns.
    fn compiled_rules(&self) -> Result<Vec<Rule>, String> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut who = r.users.clone();
                for g in &r.groups {
                    who.extend(self.groups.get(g).cloned().unwrap_or_default());
                }
                let patterns = r
                    .repositories
                    .iter()
                    .map(|p| RepoPattern::new(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("auth.rules[{i}].repositories: {e}"))?;
                Ok(Rule {
                    who,
                    upstreams: r.upstreams.clone(),
                    patterns,
                })
            })
            .collect()
    }
}

/// One compiled `[[auth.rules]]` entry.
struct Rule {
    who: Vec<String>,
    upstreams: Vec<String>,
    patterns: Vec<RepoPattern>,
}

/// A repository glob: `*` one path component, `**` any number (also none).
#[derive(Debug, Clone)]
struct RepoPattern(Regex);

impl RepoPattern {
    fn new(p: &str) -> Result<RepoPattern, String> {
        if p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/*".contains(&b))
        {
            return Err(format!(
                "{p:?}: a pattern is a repository name with * and ** (\"library/*\", \"myorg/**\")"
            ));
        }
        let mut re = String::from("^");
        let mut rest = p;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("**/") {
                re.push_str("(?:.*/)?");
                rest = r;
            } else if let Some(r) = rest.strip_prefix("**") {
                re.push_str(".*");
                rest = r;
            } else if let Some(r) = rest.strip_prefix('*') {
                re.push_str("[^/]*");
                rest = r;
            } else {
                let c = rest.chars().next().unwrap_or('.');
                re.push_str(&regex::escape(&c.to_string()));
                rest = &rest[c.len_utf8()..];
            }
        }
        re.push('$');
        Regex::new(&re)
            .map(RepoPattern)
            .map_err(|e| format!("{p:?}: {e}"))
    }

    fn matches(&self, repo: &str) -> bool {
        self.0.is_match(repo)
    }
}

/// The users of an htpasswd file: name → bcrypt hash.
#[derive(Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Htpasswd {
    // The hashes are secrets too (they can be attacked offline): names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

impl Htpasswd {
    pub fn read(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses `user:hash` lines; blank lines and `#` comments are skipped. Only bcrypt
    /// hashes are accepted: the others htpasswd can write (MD5 `$apr1$`, `{SHA}`, crypt,
    /// plain) are weak, and Distribution refuses them too.
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n}: not user:hash"))?;
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            let kind = if hash.starts_with("$apr1$") {
                Some("MD5 ($apr1$)")
            } else if hash.starts_with("{SHA}") {
                Some("SHA-1 ({SHA})")
            } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
                Some("SHA-crypt")
            } else if !hash.starts_with("$2") {
                Some("crypt or plain text")
            } else {
                None
            };
            if let Some(kind) = kind {
                return Err(format!(
                    "line {n}: user {user:?} has a {kind} entry; only bcrypt is accepted (write it with `pullcache htpasswd add` or `htpasswd -B`)"
                ));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!("line {n}: user {user:?}: not a valid bcrypt hash"));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {n}: user {user:?} appears twice"));
            }
        }
        Ok(Htpasswd { users })
    }

    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No authentication is configured.
    Open,
    /// No credentials, and `anonymous_read` is on.
    Anonymous,
    User(String),
}

impl Caller {
    /// The name the rules and the access log know.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Anonymous => Some(ANONYMOUS),
            Caller::User(u) => Some(u),
        }
    }
}

/// The running authenticator: the users (reloaded), remembered good credentials, rules.
pub struct Auth {
    settings: AuthSettings,
    users: RwLock<Arc<Htpasswd>>,
    /// user → salted SHA-256 of a password that passed the bcrypt check.
    remembered: Mutex<HashMap<String, [u8; 32]>>,
    salt: [u8; 32],
    verifying: tokio::sync::Semaphore,
    rules: Vec<Rule>,
}

/// What went wrong with the credentials of a request (kept inside; the client sees 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("malformed Authorization header")]
    Malformed,
    #[error("unknown user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
}

impl Auth {
    /// Loads the htpasswd file and starts watching it. `None` when `[auth]` is off.
    pub fn start(settings: &AuthSettings) -> Result<Option<Arc<Auth>>, String> {
        let Some(path) = settings.htpasswd.clone() else {
            return Ok(None);
        };
        let users = Htpasswd::read(&path).map_err(|e| format!("auth.htpasswd: {e}"))?;
        let rules = settings.compiled_rules()?;
        let auth = Arc::new(Auth {
            settings: settings.clone(),
            users: RwLock::new(Arc::new(users)),
            remembered: Mutex::new(HashMap::new()),
            salt: rand::random(),
            verifying: tokio::sync::Semaphore::new(MAX_VERIFYING),
            rules,
        });
        crate::watch::spawn(
            "htpasswd",
            vec![path.clone()],
            Arc::downgrade(&auth),
            move |auth: &Auth| match Htpasswd::read(&path) {
                Ok(u) => {
                    let n = u.users.len();
                    *auth.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(u);
                    // A removed user or a changed password must not pass on memory.
                    auth.remembered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    tracing::info!(users = n, "auth.htpasswd reloaded");
                }
                Err(e) => tracing::error!("auth.htpasswd: {e}: keeping the users loaded before"),
            },
        )
        .map_err(|e| format!("auth.htpasswd: cannot start the reload thread: {e}"))?;
        Ok(Some(auth))
    }

    pub fn realm(&self) -> &str {
        &self.settings.realm
    }

    /// Who sent `req`. Wrong credentials wait `fail_delay`, then are a 401.
    pub async fn identify(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
        let Some(h) = req.headers().get(header::AUTHORIZATION) else {
            return if self.settings.anonymous_read {
                Ok(Caller::Anonymous)
            } else {
                Err(ApiError::unauthorized(
                    self.realm(),
                    "authentication required",
                ))
            };
        };
        match self.check(h.as_bytes()).await {
            Ok(user) => Ok(Caller::User(user)),
            Err(e) => {
                tracing::debug!(client = ?req.peer_addr(), error = %e, "authentication failed");
                actix_rt::time::sleep(self.settings.fail_delay).await;
                Err(ApiError::unauthorized(self.realm(), "invalid credentials"))
            }
        }
    }

    /// Checks a Basic `Authorization` value; the user name if it is right.
    async fn check(&self, value: &[u8]) -> Result<String, AuthError> {
        let encoded = value
            .strip_prefix(b"Basic ")
            .or_else(|| value.strip_prefix(b"basic "))
            .ok_or(AuthError::Malformed)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim_ascii())
            .map_err(|_| AuthError::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
        let (user, password) = text.split_once(':').ok_or(AuthError::Malformed)?;
        let fingerprint = self.fingerprint(user, password);
        if self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            == Some(&fingerprint)
        {
            return Ok(user.to_string());
        }
        let users = self.users.read().unwrap_or_else(|p| p.into_inner()).clone();
        // An unknown user costs the same bcrypt check as a known one: the answer's timing
        // does not tell which user names exist.
        let (hash, known) = match users.users.get(user) {
            Some(h) => (Some(h.clone()), true),
            None => (None, false),
        };
        let _permit = self
            .verifying
            .acquire()
            .await
            .map_err(|_| AuthError::WrongPassword)?;
        let password = password.to_string();
        let ok = actix_web::web::block(move || {
            let hash = hash.as_deref().unwrap_or_else(|| dummy_hash());
            bcrypt::verify(password, hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        match (known, ok) {
            (false, _) => Err(AuthError::UnknownUser),
            (true, false) => Err(AuthError::WrongPassword),
            (true, true) => {
                let mut m = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() >= MAX_REMEMBERED {
                    m.clear();
                }
                m.insert(user.to_string(), fingerprint);
                Ok(user.to_string())
            }
        }
    }

    fn fingerprint(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether `caller` may pull `repo` (the name on the upstream) of upstream `upstream`.
    pub fn allows(&self, caller: &Caller, upstream: &str, repo: &str) -> bool {
        let Some(name) = caller.name() else {
            return true;
        };
        if self.rules.is_empty() {
            return true;
        }
        self.rules.iter().any(|r| {
            r.who
                .iter()
                .any(|w| w == name || (w == "*" && *caller != Caller::Anonymous))
                && r.upstreams
                    .iter()
                    .any(|u| u == "*" || u.eq_ignore_ascii_case(upstream))
                && r.patterns.iter().any(|p| p.matches(repo))
        })
    }

    /// The error for a caller the rules refuse: anonymous callers are asked for
    /// credentials (401: a client with some then sends them), users are denied (403).
    pub fn refusal(&self, caller: &Caller, repo: &str) -> ApiError {
        match caller {
            Caller::Anonymous => ApiError::unauthorized(self.realm(), "authentication required"),
            _ => ApiError::denied(format!("access to {repo} is not allowed for this user")),
        }
    }
}

/// A bcrypt hash of a random password (cost 10, as `pullcache htpasswd add` writes),
/// checked against for unknown users. Made once, on the blocking pool, at the first one.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let random: [u8; 16] = rand::random();
        bcrypt::hash(hex_encode(&random), file::COST).unwrap_or_default()
    })
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `pullcache htpasswd`: the file's users, edited in place.
pub mod file {
    use super::*;

    /// The bcrypt cost written: 10 (~70 ms per check here; remembered after the first).
    pub const COST: u32 = 10;

    /// Adds `user` or changes their password.
    pub fn add(path: &Path, user: &str, password: &str) -> Result<bool, String> {
        if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
            return Err(format!("{user:?}: a user name has no ':' or spaces"));
        }
        let hash = bcrypt::hash_with_result(password, COST)
            .map_err(|e| e.to_string())?
            .format_for_version(bcrypt::Version::TwoY);
        let mut lines = read_lines(path)?;
        let mut replaced = false;
        for l in lines.iter_mut() {
            if l.split_once(':').is_some_and(|(u, _)| u == user) {
                *l = format!("{user}:{hash}");
                replaced = true;
            }
        }
        if !replaced {
            lines.push(format!("{user}:{hash}"));
        }
        write_lines(path, &lines)?;
        Ok(replaced)
    }

    /// Removes `user`; false if they were not there.
    pub fn remove(path: &Path, user: &str) -> Result<bool, String> {
        let mut lines = read_lines(path)?;
        let before = lines.len();
        lines.retain(|l| l.split_once(':').is_none_or(|(u, _)| u != user));
        if lines.len() == before {
            return Ok(false);
        }
        write_lines(path, &lines)?;
        Ok(true)
    }

    /// The user names, in file order.
    pub fn list(path: &Path) -> Result<Vec<String>, String> {
        Htpasswd::read(path)?;
        Ok(read_lines(path)?
            .iter()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':').map(|(u, _)| u.to_string()))
            .collect())
    }

    fn read_lines(path: &Path) -> Result<Vec<String>, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(t
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Through a temporary file and a rename (mode 0600): a running pullcache never reads
    /// a half-written file.
    fn write_lines(path: &Path, lines: &[String]) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("tmp");
        let e = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(e)?;
        let mut text = lines.join("\n");
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(e)?;
        f.sync_all().map_err(e)?;
        std::fs::rename(&tmp, path).map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bcrypt_entries_are_accepted() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let ok = Htpasswd::parse(&format!("# users\n\nalice:{h}\n")).unwrap();
        assert_eq!(ok.users().collect::<Vec<_>>(), ["alice"]);
        assert!(!format!("{ok:?}").contains(&h), "hashes are not printed");
        for (line, want) in [
            ("bob:$apr1$abc$def", "MD5"),
            ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("bob:plaintext", "crypt or plain"),
            ("bob:$2y$10$short", "not a valid bcrypt"),
            ("no-colon", "not user:hash"),
        ] {
            let e = Htpasswd::parse(line).unwrap_err();
            assert!(e.contains(want) && e.contains("line 1"), "{line}: {e}");
        }
        assert!(Htpasswd::parse(&format!("a:{h}\na:{h}\n"))
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn repository_patterns() {
        let p = |s: &str| RepoPattern::new(s).unwrap();
        assert!(p("library/*").matches("library/alpine"));
        assert!(!p("library/*").matches("library/a/b"));
        assert!(p("myorg/**").matches("myorg/a/b/c"));
        assert!(p("myorg/**").matches("myorg/a"));
        assert!(!p("myorg/**").matches("myorg2/a"));
        assert!(p("**").matches("anything/at/all"));
        assert!(p("**/app").matches("app") && p("**/app").matches("a/b/app"));
        assert!(!p("library/alp*").matches("library/busybox"));
        assert!(p("a.b").matches("a.b") && !p("a.b").matches("axb"));
        assert!(RepoPattern::new("Library/*").is_err());
        assert!(RepoPattern::new("").is_err());
    }

    #[test]
    fn the_file_commands_edit_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        assert!(!file::add(&f, "alice", "one").unwrap());
        assert!(!file::add(&f, "bob", "two").unwrap());
        assert!(file::add(&f, "alice", "three").unwrap(), "replaced");
        assert_eq!(file::list(&f).unwrap(), ["alice", "bob"]);
        let h = Htpasswd::read(&f).unwrap();
        assert!(h.users["alice"].starts_with("$2y$10$"));
        assert!(bcrypt::verify("three", &h.users["alice"]).unwrap());
        assert!(file::remove(&f, "bob").unwrap());
        assert!(!file::remove(&f, "bob").unwrap());
        assert_eq!(file::list(&f).unwrap(), ["alice"]);
        assert!(file::add(&f, "a:b", "x").is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn the_dummy_hash_is_a_valid_bcrypt_hash() {
        assert!(dummy_hash().parse::<bcrypt::HashParts>().is_ok());
        assert!(!bcrypt::verify("", dummy_hash()).unwrap());
    }
}
