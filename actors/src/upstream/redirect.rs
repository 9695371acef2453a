//! Where an upstream's redirects may lead. Registries redirect blob downloads to CDNs and
//! object stores with signed URLs; a compromised or malicious upstream could instead send
//! pullcache to the cloud metadata address or a loopback admin port. So a redirect is
//! followed only:
//! - to http(s), and never from https down to http;
//! - to the upstream's own host, or a host of `redirect_hosts` when the upstream lists any,
//!   or else to a host whose addresses are all public (unless the upstream is itself on a
//!   private address: a private registry redirecting to private storage).
//!
//! The count (10) and keeping `Authorization` to the own origin are the client's
//! (`client.rs`). The name is resolved here and again when connecting, so a name whose
//! answer changes in between could still slip through: this is a guard, not a network
//! policy.

use std::cell::Cell;
use std::net::IpAddr;

use url::Url;

use crate::settings::UpstreamSettings;

/// One upstream's redirect rules (lives on the upstream actor's thread, with its `Conn`).
pub(super) struct RedirectPolicy {
    /// The upstream's own URL.
    base: Url,
    /// `redirect_hosts`.
    patterns: Vec<String>,
    /// Whether the upstream's own host has a non-public address. Looked up once.
    own_private: Cell<Option<bool>>,
}

impl RedirectPolicy {
    pub(super) fn new(settings: &UpstreamSettings) -> RedirectPolicy {
        RedirectPolicy {
            base: settings.url.as_url().clone(),
            patterns: settings.redirect_hosts.clone(),
            own_private: Cell::new(None),
        }
    }

    /// Whether a redirect from `from` may be followed to `to`.
    pub(super) async fn check(&self, from: &Url, to: &Url) -> Result<(), String> {
        redirect_allowed(from, to).map_err(String::from)?;
        let host = to.host_str().unwrap_or("");
        let own = self.base.host_str().unwrap_or("");
        if host.eq_ignore_ascii_case(own) || !self.patterns.is_empty() {
            return redirect_target(own, host, &self.patterns, &[]);
        }
        let own_private = match self.own_private.get() {
            Some(p) => p,
            None => {
                let p = resolve(&self.base)
                    .await
                    .map(|a| a.iter().any(|ip| !is_public(*ip)))
                    .unwrap_or(false);
                self.own_private.set(Some(p));
                p
            }
        };
        if own_private {
            return Ok(());
        }
        let addrs = resolve(to)
            .await
            .map_err(|e| format!("redirect to {host}: cannot resolve it: {e}"))?;
        redirect_target(own, host, &self.patterns, &addrs)
    }
}

/// Whether a redirect from `from` may be followed to `to`: http(s) only, and never from
/// https down to http (the request, a signed URL with it, would cross the network in
/// clear text; the bytes are verified anyway, but not who sees them).
fn redirect_allowed(from: &Url, to: &Url) -> Result<(), &'static str> {
    if !matches!(to.scheme(), "http" | "https") {
        return Err("redirect to a non-HTTP URL");
    }
    if from.scheme() == "https" && to.scheme() == "http" {
        return Err("redirect from https to http refused");
    }
    Ok(())
}

/// The decision of [`RedirectPolicy::check`] once `to_host`'s addresses are known
/// (none needed for the upstream's own host or with `patterns`).
fn redirect_target(
    own_host: &str,
    to_host: &str,
    patterns: &[String],
    addrs: &[IpAddr],
) -> Result<(), String> {
    if to_host.eq_ignore_ascii_case(own_host) {
        return Ok(());
    }
    if !patterns.is_empty() {
        return if patterns.iter().any(|p| host_matches(p, to_host)) {
            Ok(())
        } else {
            Err(format!(
                "redirect to {to_host} refused: not in this upstream's redirect_hosts"
            ))
        };
    }
    match addrs.iter().find(|ip| !is_public(**ip)) {
        Some(ip) => Err(format!(
            "redirect to {to_host} ({ip}) refused: not a public address (list the host in this upstream's redirect_hosts to allow it)"
        )),
        None => Ok(()),
    }
}

/// `pattern` is a host name, or `*.example.com` for any name under example.com.
fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|h| h.ends_with('.') && h.len() > 1),
        None => host == pattern,
    }
}

/// An address anyone on the internet could reach: not loopback, private, link-local
/// (169.254.169.254, the cloud metadata service), carrier-grade NAT, unspecified,
/// documentation, multicast or broadcast, nor an IPv6 unique-local or link-local one.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (s[0] & 0xfe00) == 0xfc00
                    || (s[0] & 0xffc0) == 0xfe80)
            }
        },
    }
}

/// The addresses of `url`'s host (an address literal is its own answer).
async fn resolve(url: &Url) -> std::io::Result<Vec<IpAddr>> {
    match url.host() {
        Some(url::Host::Ipv4(a)) => Ok(vec![IpAddr::V4(a)]),
        Some(url::Host::Ipv6(a)) => Ok(vec![IpAddr::V6(a)]),
        Some(url::Host::Domain(d)) => {
            let port = url.port_or_known_default().unwrap_or(443);
            Ok(tokio::net::lookup_host((d, port))
                .await?
                .map(|a| a.ip())
                .collect())
        }
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_stay_on_http_and_never_downgrade() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(
            redirect_allowed(&u("https://r.io/v2/"), &u("https://cdn.example/x?sig=1")).is_ok()
        );
        assert!(
            redirect_allowed(&u("http://127.0.0.1:5000/v2/"), &u("http://127.0.0.1:9/x")).is_ok()
        );
        assert!(redirect_allowed(&u("http://r.io/"), &u("https://cdn.example/x")).is_ok());
        assert!(redirect_allowed(&u("https://r.io/"), &u("http://cdn.example/x")).is_err());
        assert!(redirect_allowed(&u("https://r.io/"), &u("file:///etc/passwd")).is_err());
        assert!(redirect_allowed(&u("http://r.io/"), &u("ftp://cdn.example/x")).is_err());
    }

    #[test]
    fn redirect_targets_are_public_or_listed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
        for public in ["8.8.8.8", "104.16.0.1", "2606:4700::1", "::ffff:8.8.8.8"] {
            assert!(is_public(ip(public)), "{public}");
        }
        let none: &[String] = &[];
        // Default: public addresses only, the upstream's own host always.
        assert!(redirect_target("r.io", "cdn.io", none, &[ip("104.16.0.1")]).is_ok());
        assert!(
            redirect_target("r.io", "cdn.io", none, &[ip("104.16.0.1"), ip("10.0.0.1")])
                .unwrap_err()
                .contains("10.0.0.1")
        );
        assert!(redirect_target("r.io", "R.io", none, &[ip("127.0.0.1")]).is_ok());
        // Listed hosts: exactly those (whatever their addresses).
        let listed = vec![
            "*.r2.cloudflarestorage.com".to_string(),
            "blobs.local".to_string(),
        ];
        assert!(redirect_target("r.io", "x.r2.cloudflarestorage.com", &listed, &[]).is_ok());
        assert!(redirect_target("r.io", "r2.cloudflarestorage.com", &listed, &[]).is_err());
        assert!(redirect_target("r.io", "blobs.local", &listed, &[]).is_ok());
        assert!(redirect_target("r.io", "evilcloudflarestorage.com", &listed, &[]).is_err());
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
    }
}
