//! Logging set-up: `tracing` events to stderr, as text or JSON, filtered by `log.level`
//! (or `RUST_LOG`, which wins).

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = if log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = res {
        eprintln!("pullcache: logging already initialised: {e}");
    }
}
