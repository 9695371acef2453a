//! What pullcache tells its operators: logs ([`init`], [`check_level`]), one access event
//! and the request metrics per response ([`access`]), and OpenTelemetry traces
//! ([`traces`]).

pub mod access;
pub mod traces;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// The levels `log.level` accepts, alone or after `target=`.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks `log.level`: a level, or a filter of `target=level` directives (with at most one
/// bare level, the default). A word that is not a level (`warning`) is an error: the
/// filter syntax would take it for a target and silently turn off all other logging.
pub fn check_level(level: &str) -> Result<(), String> {
    let levels = LEVELS.join(", ");
    if level.trim().is_empty() {
        return Err(format!("must not be empty: give a level (one of {levels})"));
    }
    // Empty directives (`info,`) are skipped, as the filter itself skips them.
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let lvl = match d.rsplit_once('=') {
            Some((target, lvl)) if !target.is_empty() => lvl,
            Some(_) => return Err(format!("{d:?} has no target before '='")),
            None => d,
        };
        if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{lvl:?} in {level:?} is not a level (one of {levels})"
            ));
        }
    }
    EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{level:?}: {e}"))
}

/// Logging: `tracing` events to stderr, as text or JSON lines, filtered by `log.level` (or
/// `RUST_LOG`, which wins).
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = if log.format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = res {
        eprintln!("pullcache: logging already initialised: {e}");
    }
}

/// Whether the first bytes of a connection are a TLS handshake record (a ClientHello).
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, 0..=0x04, ..])
}

/// A TLS handshake arrived on the plain-HTTP port: podman, buildah and skopeo try https
/// first against a mirror they are told is insecure, then fall back to http. One debug
/// line at most every 10 seconds, with how many were not logged.
pub fn tls_on_plain_port(peer: Option<std::net::SocketAddr>) {
    // Seconds since the first one, on the monotonic clock (a wall-clock step back must not
    // mute the line); `LAST` holds that + 1, so 0 means never.
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
    let last = LAST.load(Ordering::Relaxed);
    if (last != 0 && now < last + 10)
        || LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let more = SUPPRESSED.swap(0, Ordering::Relaxed);
    let client = peer.map(|p| p.to_string()).unwrap_or_default();
    tracing::debug!(
        client = %client,
        more_since_last = more,
        "TLS handshake on the plain-HTTP port (a client trying https first); connection closed so it falls back to http"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters() {
        for ok in [
            "info",
            "WARN",
            "off",
            "pullcache_actors=debug,info",
            "a::b=trace",
        ] {
            assert!(check_level(ok).is_ok(), "{ok}");
        }
        for bad in [
            "warning",
            "",
            "verbose",
            "pullcache=loud",
            "=info",
            "info,chatty",
        ] {
            let e = check_level(bad).unwrap_err();
            assert!(e.contains("level") || e.contains("target"), "{bad}: {e}");
        }
    }

    #[test]
    fn tls_client_hello_is_recognised() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!looks_like_tls(b"GET /v2/ HTTP/1.1\r\n"));
        assert!(!looks_like_tls(&[0x16]));
    }
}
