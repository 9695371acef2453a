//! The image side of the database: repositories, manifests, tags, and what pinned tags
//! keep. A part of [`Db`]'s methods, in a file of their own.

use std::collections::HashSet;

use bytes::Bytes;

use super::{
    be_u64, decode_json, encode_json, key, Db, ManifestHeader, ManifestRecord, Pinned, TagRecord,
};
use crate::digest::Digest;
use crate::error::MetaError;
use crate::oci;
use crate::settings::PinPattern;

impl Db {
    // -- repositories

    /// Notes that a repository was used (coarsely: at most one write a minute).
    pub fn touch_repo(&self, upstream: &str, repo: &str, now_ms: u64) -> Result<(), MetaError> {
        let k = key(&[upstream, repo]);
        let last = self.repos.get(&k)?.and_then(|v| be_u64(&v)).unwrap_or(0);
        if now_ms >= last + 60_000 {
            self.repos.insert(k, &now_ms.to_be_bytes())?;
        }
        Ok(())
    }

    /// Drops manifests and tags of repositories unused since `before_ms`, except those in
    /// `keep`. Returns how many repositories were dropped.
    pub fn drop_idle_repositories(
        &self,
        before_ms: u64,
        keep: &HashSet<(String, String)>,
    ) -> Result<usize, MetaError> {
        let mut idle = Vec::new();
        for kv in self.repos.iter() {
            let (k, v) = kv?;
            if be_u64(&v).unwrap_or(0) < before_ms {
                idle.push(k);
            }
        }
        let mut dropped = 0;
        for k in idle {
            let s = String::from_utf8_lossy(&k).into_owned();
            let Some((u, r)) = s.split_once('\0') else {
                continue;
            };
            if keep.contains(&(u.to_string(), r.to_string())) {
                continue;
            }
            let mut prefix = k.to_vec();
            prefix.push(0);
            for tree in [&self.manifests, &self.tags] {
                for kv in tree.scan_prefix(&prefix) {
                    let (mk, _) = kv?;
                    tree.remove(mk)?;
                }
            }
            self.repos.remove(&k)?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Every cached repository as (upstream name, repository), in byte order.
    pub fn repositories(&self) -> Result<Vec<(String, String)>, MetaError> {
        let mut out = Vec::new();
        for kv in self.repos.iter() {
            let (k, _) = kv?;
            let s = String::from_utf8_lossy(&k);
            if let Some((u, r)) = s.split_once('\0') {
                out.push((u.to_string(), r.to_string()));
            }
        }
        Ok(out)
    }

    pub fn has_repository(&self, upstream: &str, repo: &str) -> Result<bool, MetaError> {
        Ok(self.repos.contains_key(key(&[upstream, repo]))?)
    }

    // -- manifests and tags

    pub fn manifest(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>, MetaError> {
        let Some(v) = self
            .manifests
            .get(key(&[upstream, repo, &digest.to_string()]))?
        else {
            return Ok(None);
        };
        let hlen = v
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .map(u32::from_be_bytes);
        let Some(hlen) = hlen.map(|h| h as usize).filter(|h| v.len() >= 4 + h) else {
            return Err(MetaError::Corrupt("truncated manifest record".into()));
        };
        let header: ManifestHeader = decode_json(&v[4..4 + hlen])?;
        Ok(Some(ManifestRecord {
            media_type: header.media_type,
            bytes: Bytes::copy_from_slice(&v[4 + hlen..]),
            fetched_ms: header.fetched_ms,
        }))
    }

    pub fn put_manifest(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
        record: &ManifestRecord,
        tag: Option<(&str, &TagRecord)>,
    ) -> Result<(), MetaError> {
        let header = encode_json(&ManifestHeader {
            media_type: record.media_type.clone(),
            fetched_ms: record.fetched_ms,
        });
        let mut v = Vec::with_capacity(4 + header.len() + record.bytes.len());
        v.extend_from_slice(&(header.len() as u32).to_be_bytes());
        v.extend_from_slice(&header);
        v.extend_from_slice(&record.bytes);
        // Manifest first, then the tag pointing at it: a crash in between leaves a manifest
        // without a tag (harmless), never a tag without its manifest.
        self.manifests
            .insert(key(&[upstream, repo, &digest.to_string()]), v)?;
        if let Some((t, rec)) = tag {
            self.tags
                .insert(key(&[upstream, repo, t]), encode_json(rec))?;
        }
        self.repos
            .insert(key(&[upstream, repo]), &record.fetched_ms.to_be_bytes())?;
        Ok(())
    }

    pub fn tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>, MetaError> {
        match self.tags.get(key(&[upstream, repo, tag]))? {
            Some(v) => Ok(Some(decode_json(&v)?)),
            None => Ok(None),
        }
    }

    pub fn put_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        rec: &TagRecord,
    ) -> Result<(), MetaError> {
        self.tags
            .insert(key(&[upstream, repo, tag]), encode_json(rec))?;
        Ok(())
    }

    pub fn delete_tag(&self, upstream: &str, repo: &str, tag: &str) -> Result<(), MetaError> {
        self.tags.remove(key(&[upstream, repo, tag]))?;
        Ok(())
    }

    /// Tags cached for a repository, in byte order.
    pub fn tags_of(&self, upstream: &str, repo: &str) -> Result<Vec<String>, MetaError> {
        let mut prefix = key(&[upstream, repo]);
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.tags.scan_prefix(&prefix) {
            let (k, _) = kv?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// What the tags matching `pins` keep: every blob their manifests (and the manifests
    /// their indexes list) reference, and their repositories.
    pub fn pinned(&self, pins: &[PinPattern]) -> Result<Pinned, MetaError> {
        let mut out = Pinned::default();
        if pins.is_empty() {
            return Ok(out);
        }
        for kv in self.tags.iter() {
            let (k, v) = kv?;
            let s = String::from_utf8_lossy(&k).into_owned();
            let mut parts = s.splitn(3, '\0');
            let (Some(u), Some(r), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if !pins.iter().any(|p| p.matches(u, r, t)) {
                continue;
            }
            let Ok(rec) = serde_json::from_slice::<TagRecord>(&v) else {
                continue;
            };
            out.repos.insert((u.to_string(), r.to_string()));
            let mut todo: Vec<Digest> = Digest::parse(&rec.digest).into_iter().collect();
            let mut seen = HashSet::new();
            while let Some(d) = todo.pop() {
                if !seen.insert(d.clone()) || seen.len() > 10_000 {
                    continue;
                }
                let Some(m) = self.manifest(u, r, &d)? else {
                    continue;
                };
                todo.extend(oci::child_manifests(&m.media_type, &m.bytes));
                out.blobs
                    .extend(oci::referenced_blobs(&m.media_type, &m.bytes));
            }
        }
        Ok(out)
    }
}
