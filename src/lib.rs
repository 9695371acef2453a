//! pullcache, the daemon: configuration, the HTTP layer of the registry pull API, and
//! start-up. The cache engine is the `pullcache-actors` crate.

#![forbid(unsafe_code)]

pub mod auth;
pub mod certs;
pub mod config;
pub mod conn;
pub mod error;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod watch;
pub mod zerocopy;
