//! Registry authentication as a client: parsing `WWW-Authenticate` challenges, token
//! responses, and the per-(upstream, scope) token cache. Pure code with inline tests; the
//! upstream actor (`upstream/`) does the HTTP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

/// One authentication challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
        error: Option<String>,
    },
    Basic,
}

/// Parses the values of all `WWW-Authenticate` headers and picks the challenge to answer:
/// Bearer if offered, else Basic. Parameter values may be quoted and contain commas.
pub fn parse_challenges<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
    let mut basic = false;
    for h in headers {
        let mut rest = h.trim();
        while !rest.is_empty() {
            // scheme
            let end = rest
                .find(|c: char| c.is_whitespace() || c == ',')
                .unwrap_or(rest.len());
            let scheme = rest[..end].to_ascii_lowercase();
            rest = rest[end..].trim_start_matches(|c: char| c.is_whitespace() || c == ',');
            let (params, after) = parse_params(rest);
            rest = after;
            match scheme.as_str() {
                "bearer" => {
                    let get = |k: &str| {
                        params
                            .iter()
                            .find(|(pk, _)| pk == k)
                            .map(|(_, v)| v.clone())
                    };
                    if let Some(realm) = get("realm") {
                        return Some(Challenge::Bearer {
                            realm,
                            service: get("service"),
                            scope: get("scope"),
                            error: get("error"),
                        });
                    }
                }
                "basic" => basic = true,
                _ => {}
            }
        }
    }
    basic.then_some(Challenge::Basic)
}

/// Parses `k=v, k="quoted, v"` pairs until a token that is not followed by `=` (the next
/// challenge's scheme). Returns the pairs (keys lowercased) and the unparsed rest.
fn parse_params(mut s: &str) -> (Vec<(String, String)>, &str) {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
        let Some(eq) = s.find('=') else {
            return (out, s);
        };
        let k = &s[..eq];
        if k.is_empty() || k.contains(|c: char| c.is_whitespace() || c == ',') {
            return (out, s);
        }
        let key = k.to_ascii_lowercase();
        s = &s[eq + 1..];
        let value;
        if let Some(q) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n)
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &q[end.min(q.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        out.push((key, value));
    }
}

/// A token endpoint's answer.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn bearer(&self) -> Option<&str> {
        self.access_token
            .as_deref()
            .or(self.token.as_deref())
            .filter(|t| !t.is_empty())
    }

    /// Lifetime, 60 s when absent (the spec's default).
    pub fn lifetime(&self) -> Duration {
        // Capped: a hostile or broken token server must not overflow our clock arithmetic.
        Duration::from_secs(self.expires_in.unwrap_or(60).clamp(1, 86_400))
    }
}

/// `Authorization: Basic ...` value for credentials.
pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Cached bearer tokens keyed by scope, expiring a margin before the server says.
#[derive(Default)]
pub struct TokenCache {
    /// scope -> (token, expiry, last use): the last use orders eviction.
    tokens: HashMap<String, (String, Instant, u64)>,
    /// A use counter (monotonic; cheaper and more exact than reading the clock).
    uses: u64,
}

impl TokenCache {
    /// Tokens kept per upstream, at most: one per repository pulled recently. Past this,
    /// expired entries go first, then the least recently used.
    pub const MAX: usize = 1024;

    pub fn get(&mut self, scope: &str, now: Instant) -> Option<String> {
        self.uses += 1;
        let uses = self.uses;
        let e = self
            .tokens
            .get_mut(scope)
            .filter(|(_, exp, _)| *exp > now)?;
        e.2 = uses;
        Some(e.0.clone())
    }

    pub fn insert(&mut self, scope: &str, token: String, lifetime: Duration, now: Instant) {
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        self.uses += 1;
        self.tokens.insert(
            scope.to_string(),
            (token, now + lifetime - margin, self.uses),
        );
        if self.tokens.len() > Self::MAX {
            self.tokens.retain(|_, (_, exp, _)| *exp > now);
        }
        // Still full of live tokens (a flood of distinct repository names): drop the least
        // recently used quarter, so this costs one sort per MAX/4 inserts, not one per insert.
        if self.tokens.len() > Self::MAX {
            let mut by_use: Vec<u64> = self.tokens.values().map(|e| e.2).collect();
            by_use.sort_unstable();
            let cut = by_use[self.tokens.len() - Self::MAX * 3 / 4];
            self.tokens.retain(|_, e| e.2 >= cut);
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn remove(&mut self, scope: &str) {
        self.tokens.remove(scope);
    }
}

/// Whether a token realm may receive our credentials: the registry's own host, or a host
/// of the same registrable domain (`auth.docker.io` for `registry-1.docker.io`), by the
/// public suffix list (the `psl` crate, which embeds it). Comparing the last two labels
/// instead would let `evil.co.uk` or `evil.azurecr.io` (public suffixes, where anyone can
/// hold a name) receive the credentials of `registry.example.co.uk` or `x.azurecr.io`.
/// The list does not name every multi-tenant registry service: under the domains in
/// [`TENANT_DOMAINS`] each name is another customer's registry, so there the realm must be
/// on the registry's own name. IP literals and single-label hosts (`localhost`) must match
/// exactly.
pub fn realm_allowed(registry_host: &str, realm_host: &str) -> bool {
    if registry_host.eq_ignore_ascii_case(realm_host) {
        return true;
    }
    let is_ip = |h: &str| h.parse::<std::net::IpAddr>().is_ok() || h.starts_with('[');
    if is_ip(registry_host) || is_ip(realm_host) || !registry_host.contains('.') {
        return false;
    }
    let registrable = |h: &str| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        if let Some(tenant) = TENANT_DOMAINS.iter().find_map(|d| tenant_of(&h, d)) {
            return Some(tenant);
        }
        psl::domain_str(&h).map(str::to_string)
    };
    match (registrable(registry_host), registrable(realm_host)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Registry services that give each customer a name under one domain, and are not (yet)
/// public suffixes in the public suffix list: Azure Container Registry (`<name>.azurecr.io`
/// and its sovereign clouds), JFrog Artifactory cloud (`<name>.jfrog.io`), Amazon ECR
/// (`<account>.dkr.ecr.<region>.amazonaws.com`, `*` = one label).
pub const TENANT_DOMAINS: &[&str] = &[
    "azurecr.io",
    "azurecr.cn",
    "azurecr.us",
    "jfrog.io",
    "dkr.ecr.*.amazonaws.com",
    "dkr.ecr.*.amazonaws.com.cn",
];

/// `<tenant>.<domain>` if `host` is a name under `domain` (whose `*` matches one label).
fn tenant_of(host: &str, domain: &str) -> Option<String> {
    let mut labels: Vec<&str> = host.split('.').collect();
    let pattern: Vec<&str> = domain.split('.').collect();
    if labels.len() <= pattern.len() {
        return None;
    }
    let tail = labels.split_off(labels.len() - pattern.len());
    let matches = tail.iter().zip(&pattern).all(|(l, p)| *p == "*" || l == p);
    matches.then(|| format!("{}.{}", labels.last().expect("a label"), tail.join(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        ]);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
                error: None
            })
        );
    }

    #[test]
    fn commas_inside_quotes_and_several_challenges() {
        let c = parse_challenges([
            r#"Basic realm="x", Bearer realm="https://r/t",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        ]);
        match c {
            Some(Challenge::Bearer { scope, error, .. }) => {
                assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push"));
                assert_eq!(error.as_deref(), Some("insufficient_scope"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_challenges([r#"Basic realm="registry""#]),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenges(["Negotiate"]), None);
        assert_eq!(parse_challenges(["Bearer"]), None);
    }

    #[test]
    fn token_response_and_cache() {
        let t: TokenResponse =
            serde_json::from_str(r#"{"token":"a","access_token":"b","expires_in":300}"#).unwrap();
        assert_eq!(t.bearer(), Some("b"));
        assert_eq!(t.lifetime(), Duration::from_secs(300));
        let t: TokenResponse = serde_json::from_str(r#"{"token":"a"}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(60));
        let t: TokenResponse =
            serde_json::from_str(r#"{"token":"a","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(86_400));
        let mut c = TokenCache::default();
        let now = Instant::now();
        c.insert("s", "tok".into(), Duration::from_secs(60), now);
        assert_eq!(c.get("s", now), Some("tok".into()));
        assert_eq!(c.get("s", now + Duration::from_secs(55)), None);
    }

    /// A flood of distinct repositories (live tokens, none expired) keeps the cache bounded,
    /// and the tokens in use survive it.
    #[test]
    fn token_cache_is_bounded_least_recently_used_first() {
        let mut c = TokenCache::default();
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        c.insert("hot", "h".into(), hour, now);
        for i in 0..10 * TokenCache::MAX {
            c.insert(&format!("repo{i}"), "t".into(), hour, now);
            if i % 100 == 0 {
                assert_eq!(c.get("hot", now), Some("h".into()), "in use, kept");
            }
            assert!(c.len() <= TokenCache::MAX, "{} entries", c.len());
        }
        assert_eq!(c.get("hot", now), Some("h".into()));
        assert_eq!(c.get("repo0", now), None, "least recently used, dropped");
    }

    #[test]
    fn realms() {
        assert!(realm_allowed("registry-1.docker.io", "auth.docker.io"));
        assert!(realm_allowed("127.0.0.1", "127.0.0.1"));
        assert!(!realm_allowed("127.0.0.1", "127.0.0.2"));
        assert!(!realm_allowed("ghcr.io", "evil.example"));
        assert!(!realm_allowed("registry.example.com", "169.254.169.254"));
        assert!(realm_allowed("REGISTRY.example.com", "auth.example.com"));
        // Public suffixes: a name under one belongs to whoever registered it.
        assert!(!realm_allowed("x.azurecr.io", "evil.azurecr.io"));
        assert!(realm_allowed("x.azurecr.io", "x.azurecr.io"));
        assert!(!realm_allowed("registry.example.co.uk", "evil.co.uk"));
        assert!(!realm_allowed("registry.example.co.uk", "auth.other.co.uk"));
        assert!(realm_allowed(
            "registry.example.co.uk",
            "auth.example.co.uk"
        ));
        assert!(!realm_allowed("localhost", "evil.localhost"));
        assert!(!realm_allowed(
            "123.dkr.ecr.us-east-1.amazonaws.com",
            "456.dkr.ecr.us-east-1.amazonaws.com"
        ));
        assert!(!realm_allowed("acme.jfrog.io", "evil.jfrog.io"));
        // Docker Hub, GitLab: the token service is another host of the same domain.
        assert!(realm_allowed("registry.gitlab.com", "gitlab.com"));
        assert_eq!(basic_header("u", "p"), "Basic dTpw");
    }
}
