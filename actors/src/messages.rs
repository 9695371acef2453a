//! Types shared by several actors.

use bytes::Bytes;

use crate::error::UpstreamError;

/// What an upstream download reports to the fill writer, in order: `Headers` once, then
/// `Chunk`s, then `End` — or `Failed` at any point. The channel carrying these is bounded, so
/// a slow disk slows the upstream read instead of filling memory.
#[derive(Debug)]
pub enum FillEvent {
    Headers {
        total: Option<u64>,
    },
    /// Consecutive pieces of the body (what was buffered at once: sent together so the
    /// receiver wakes per batch, without copying the pieces into one buffer).
    Chunk(Vec<Bytes>),
    End,
    Failed(UpstreamError),
}

/// The manifest media types pullcache fetches and serves (schema 1 is refused).
pub mod media_types {
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const ALL: [&str; 4] = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX];

    pub fn is_index(mt: &str) -> bool {
        mt == DOCKER_LIST || mt == OCI_INDEX
    }
}
