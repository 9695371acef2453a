//! Manifest formats: the media types pullcache fetches and serves, and what a manifest
//! points to (the blobs of an image manifest, the manifests of an index). Pure code.

use crate::digest::Digest;

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

/// The media type to store: the upstream's `Content-Type` if it is a supported manifest
/// type; else the document's own `mediaType` field (OCI manifests may omit Content-Type
/// precision on some registries). `None` = refuse.
pub fn effective_media_type(content_type: &str, bytes: &[u8]) -> Option<String> {
    if media_types::ALL.contains(&content_type) {
        return Some(content_type.to_string());
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if p.schema_version != Some(2) {
        return None;
    }
    match p.media_type.as_deref() {
        Some(mt) if media_types::ALL.contains(&mt) => Some(mt.to_string()),
        Some(_) => None,
        None if p.manifests.is_some() => Some(media_types::OCI_INDEX.to_string()),
        None if p.layers.is_some() => Some(media_types::OCI_MANIFEST.to_string()),
        None => None,
    }
}

/// The blobs an image manifest references (config and layers), which become readable from
/// this upstream through the cache.
pub fn referenced_blobs(media_type: &str, bytes: &[u8]) -> Vec<Digest> {
    if media_types::is_index(media_type) {
        return Vec::new();
    }
    match oci_spec::image::ImageManifest::from_reader(bytes) {
        Ok(m) => std::iter::once(m.config().digest().to_string())
            .chain(m.layers().iter().map(|l| l.digest().to_string()))
            .filter_map(|d| Digest::parse(&d).ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The manifests an index or Docker list points to.
pub fn child_manifests(media_type: &str, bytes: &[u8]) -> Vec<Digest> {
    if !media_types::is_index(media_type) {
        return Vec::new();
    }
    match oci_spec::image::ImageIndex::from_reader(bytes) {
        Ok(i) => i
            .manifests()
            .iter()
            .filter_map(|m| Digest::parse(m.digest().as_ref()).ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_inference() {
        assert_eq!(
            effective_media_type(media_types::OCI_INDEX, b"{}").as_deref(),
            Some(media_types::OCI_INDEX)
        );
        assert_eq!(
            effective_media_type(
                "application/json",
                br#"{"schemaVersion":2,"layers":[],"config":{}}"#
            )
            .as_deref(),
            Some(media_types::OCI_MANIFEST)
        );
        assert_eq!(
            effective_media_type(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                br#"{"schemaVersion":1}"#
            ),
            None
        );
        assert_eq!(effective_media_type("text/html", b"<html>"), None);
    }

    #[test]
    fn links_config_and_layers() {
        let cfg = "sha256:".to_string() + &"a".repeat(64);
        let layer = "sha256:".to_string() + &"b".repeat(64);
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":3}}]}}"#,
            media_types::OCI_MANIFEST
        );
        let links = referenced_blobs(media_types::OCI_MANIFEST, m.as_bytes());
        assert_eq!(
            links.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            vec![cfg, layer]
        );
    }
}
