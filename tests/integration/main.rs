//! pullcache's integration tests: pullcache runs in process against a counting fake
//! upstream (or as its real binary, for restarts). No network beyond 127.0.0.1, no
//! external programs; the real-client suite is tests/e2e/run.sh.

mod common;

mod auth_and_routing;
mod bad_input;
mod blobs;
mod cache_policy;
mod client_auth;
mod connections;
mod manifests;
mod observability;
mod restart;
mod tls;
mod traces;
mod zero_copy;
