//! The sled database behind the metadata actor: its trees, record formats and key
//! encodings, and every read and write of them. Only the [`super`] module uses this type:
//! at start-up directly (before serving, on the starting thread), then only from the
//! metadata actor's threads.
//!
//! Trees (one per entity or index, never one per repository):
//! - `blobs`:      digest -> [`BlobRecord`]
//! - `access`:     last access (u64 BE ms) ++ digest -> ()  (the LRU index, kept in step
//!   with `blobs` by two-tree transactions, so "least recently used" is a range scan)
//! - `blob_links`: upstream \0 digest -> ()  (the upstream serves this blob)
//! - `manifests`:  upstream \0 repo \0 digest -> [`ManifestRecord`] (media type + exact bytes)
//! - `tags`:       upstream \0 repo \0 tag -> [`TagRecord`]
//! - `repos`:      upstream \0 repo -> last access (u64 BE ms)
//! - `settings`:   name -> u64 BE (values remembered across restarts)

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::MetaError;

/// Bumped when the on-disk format changes; part of the database directory name.
const FORMAT: &str = "v1";

/// Access times are recorded at this granularity: a blob read many times a second costs
/// one index update, not one per read.
const ACCESS_GRANULARITY_MS: u64 = 1000;

/// Resolves when the writes before it are durable: see [`Db::durable`].
pub type Durable =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), MetaError>> + Send>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRecord {
    pub size: u64,
    /// Unix ms when the blob was stored.
    pub created_ms: u64,
    /// Unix ms of the last time a client was served this blob.
    pub last_access_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    pub media_type: String,
    pub bytes: Bytes,
    pub fetched_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: String,
    /// Unix ms when the upstream last confirmed this mapping.
    pub checked_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ManifestHeader {
    media_type: String,
    fetched_ms: u64,
}

/// Blobs and repositories (upstream, repository) that pinned tags keep.
#[derive(Debug, Default, Clone)]
pub struct Pinned {
    pub blobs: HashSet<Digest>,
    pub repos: HashSet<(String, String)>,
}

/// One step of an eviction: the records removed (their files are the caller's to delete)
/// and where the next step goes on.
#[derive(Debug, Default)]
pub struct Evicted {
    pub removed: Vec<(Digest, u64)>,
    pub skipped_pinned: u64,
    /// The access-index key to continue after; `None` when the scan is done (usage under
    /// the target, or nothing left to look at).
    pub next: Option<Vec<u8>>,
}

/// What reconciling the records with the files on disk found.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub blobs: usize,
    pub bytes: u64,
    pub records_without_file: usize,
    /// Files whose record disagrees (size) or is unreadable: the records are gone, the
    /// files must go too.
    pub untrusted_files: Vec<Digest>,
    /// Files without a record: to be re-hashed.
    pub orphans: Vec<(Digest, u64)>,
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

fn access_key(ms: u64, digest: &str) -> Vec<u8> {
    let mut k = ms.to_be_bytes().to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

fn be_u64(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

type TxResult<T> = Result<T, sled::transaction::ConflictableTransactionError<MetaError>>;

fn tx_err(e: sled::transaction::TransactionError<MetaError>) -> MetaError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => e.into(),
    }
}

/// The sled database and its trees. Not `Clone` outside this module: one owner.
pub struct Db {
    db: sled::Db,
    blobs: sled::Tree,
    blob_links: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    repos: sled::Tree,
    access: sled::Tree,
    settings: sled::Tree,
    /// Bytes of the blobs recorded: changed with every record and removal, read by anyone
    /// through [`super::MetaHandle::usage`] (an atomic, so reading it needs no message).
    usage: Arc<AtomicU64>,
}

impl Db {
    pub fn open(root: &Path) -> Result<Db, MetaError> {
        // sled's page cache defaults to 1 GiB; the metadata's hot set is far smaller, and a
        // cache's RSS should stay small.
        let db = sled::Config::new()
            .cache_capacity(32 * 1024 * 1024)
            .path(root.join("meta").join(FORMAT))
            .open()?;
        Ok(Db {
            blobs: db.open_tree("blobs")?,
            blob_links: db.open_tree("blob_links")?,
            manifests: db.open_tree("manifests")?,
            tags: db.open_tree("tags")?,
            repos: db.open_tree("repos")?,
            access: db.open_tree("access")?,
            settings: db.open_tree("settings")?,
            usage: Arc::new(AtomicU64::new(0)),
            db,
        })
    }

    /// Another handle on the same database, for one more of the actor's threads.
    pub(super) fn share(&self) -> Db {
        Db {
            db: self.db.clone(),
            blobs: self.blobs.clone(),
            blob_links: self.blob_links.clone(),
            manifests: self.manifests.clone(),
            tags: self.tags.clone(),
            repos: self.repos.clone(),
            access: self.access.clone(),
            settings: self.settings.clone(),
            usage: self.usage.clone(),
        }
    }

    pub(super) fn usage_counter(&self) -> Arc<AtomicU64> {
        self.usage.clone()
    }

    /// Bytes of blobs stored, exactly.
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::SeqCst)
    }

    /// A future that resolves once everything written so far is on disk. sled makes writes
    /// durable only at a flush (otherwise on its own timer, every 500 ms); this one runs on
    /// sled's own threads (`flush_async`), so no metadata thread waits for the fsync.
    /// Nothing happens unless it is awaited.
    pub fn durable(&self) -> Durable {
        let db = self.db.clone();
        Box::pin(async move {
            db.flush_async().await?;
            Ok(())
        })
    }

    pub fn flush(&self) -> Result<usize, MetaError> {
        Ok(self.db.flush()?)
    }

    // -- blobs

    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobRecord>, MetaError> {
        match self.blobs.get(digest.to_string())? {
            Some(v) => Ok(Some(decode_json(&v)?)),
            None => Ok(None),
        }
    }

    pub fn is_linked(&self, upstream: &str, digest: &Digest) -> Result<bool, MetaError> {
        Ok(self
            .blob_links
            .contains_key(key(&[upstream, &digest.to_string()]))?)
    }

    pub fn link(&self, upstream: &str, digest: &Digest) -> Result<(), MetaError> {
        self.blob_links
            .insert(key(&[upstream, &digest.to_string()]), &[])?;
        Ok(())
    }

    /// Records a stored blob; returns the size of the record it replaced, if any (for exact
    /// usage accounting).
    pub fn record_blob(
        &self,
        digest: &Digest,
        size: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, MetaError> {
        use sled::Transactional;
        let name = digest.to_string();
        let value = encode_json(&BlobRecord {
            size,
            created_ms: now_ms,
            last_access_ms: now_ms,
        });
        (&self.blobs, &self.access)
            .transaction(|(b, a)| -> TxResult<Option<u64>> {
                let prev = b.insert(name.as_bytes(), value.clone())?;
                let prev = prev.and_then(|p| serde_json::from_slice::<BlobRecord>(&p).ok());
                if let Some(p) = &prev {
                    a.remove(access_key(p.last_access_ms, &name))?;
                }
                a.insert(access_key(now_ms, &name), &[])?;
                Ok(prev.map(|p| p.size))
            })
            .map_err(tx_err)
            .inspect(|prev| {
                self.usage.fetch_add(size, Ordering::SeqCst);
                if let Some(p) = prev {
                    self.usage.fetch_sub(*p, Ordering::SeqCst);
                }
            })
    }

    /// Records verified blobs that had no record, in one transaction; blobs recorded
    /// meanwhile (fetched again) keep that record. Returns (count, bytes) recorded.
    pub fn record_new_blobs(
        &self,
        blobs: &[(Digest, u64)],
        now_ms: u64,
    ) -> Result<(usize, u64), MetaError> {
        use sled::Transactional;
        if blobs.is_empty() {
            return Ok((0, 0));
        }
        let rows: Vec<(String, Vec<u8>, u64)> = blobs
            .iter()
            .map(|(d, size)| {
                let rec = BlobRecord {
                    size: *size,
                    created_ms: now_ms,
                    last_access_ms: now_ms,
                };
                (d.to_string(), encode_json(&rec), *size)
            })
            .collect();
        let (count, bytes) = (&self.blobs, &self.access)
            .transaction(|(b, a)| -> TxResult<(usize, u64)> {
                let (mut count, mut bytes) = (0, 0);
                for (name, value, size) in &rows {
                    if b.get(name.as_bytes())?.is_some() {
                        continue;
                    }
                    b.insert(name.as_bytes(), value.clone())?;
                    a.insert(access_key(now_ms, name), &[])?;
                    count += 1;
                    bytes += size;
                }
                Ok((count, bytes))
            })
            .map_err(tx_err)?;
        self.usage.fetch_add(bytes, Ordering::SeqCst);
        Ok((count, bytes))
    }

    pub fn touch_blob(&self, digest: &Digest, now_ms: u64) -> Result<(), MetaError> {
        use sled::Transactional;
        let name = digest.to_string();
        (&self.blobs, &self.access)
            .transaction(|(b, a)| -> TxResult<()> {
                let Some(old) = b.get(name.as_bytes())? else {
                    return Ok(());
                };
                let Ok(mut rec) = serde_json::from_slice::<BlobRecord>(&old) else {
                    return Ok(());
                };
                if now_ms < rec.last_access_ms + ACCESS_GRANULARITY_MS {
                    return Ok(());
                }
                a.remove(access_key(rec.last_access_ms, &name))?;
                rec.last_access_ms = now_ms;
                a.insert(access_key(now_ms, &name), &[])?;
                b.insert(name.as_bytes(), encode_json(&rec))?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Forgets a blob; returns the size it had, if it was recorded.
    pub fn remove_blob(&self, digest: &Digest) -> Result<Option<u64>, MetaError> {
        use sled::Transactional;
        let name = digest.to_string();
        (&self.blobs, &self.access)
            .transaction(|(b, a)| -> TxResult<Option<u64>> {
                let Some(old) = b.remove(name.as_bytes())? else {
                    return Ok(None);
                };
                let rec = serde_json::from_slice::<BlobRecord>(&old).ok();
                if let Some(r) = &rec {
                    a.remove(access_key(r.last_access_ms, &name))?;
                }
                Ok(rec.map(|r| r.size))
            })
            .map_err(tx_err)
            .inspect(|removed| {
                if let Some(n) = removed {
                    self.usage.fetch_sub(*n, Ordering::SeqCst);
                }
            })
    }

    /// Removes the records of least-recently-used blobs, starting after `after` in the
    /// access index, until usage is at most `target`, `max` records are gone, or the
    /// index ends. Pinned blobs are skipped. The record goes before the file: a reader that
    /// already opened the file keeps reading it whole; a crash before the file is deleted
    /// leaves a file without a record, which start-up recovery re-hashes and keeps.
    pub fn evict_lru(
        &self,
        target: u64,
        pinned: &HashSet<Digest>,
        after: Option<&[u8]>,
        max: usize,
    ) -> Result<Evicted, MetaError> {
        let mut out = Evicted::default();
        let range = match after {
            Some(k) => self
                .access
                .range::<&[u8], _>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
            None => self.access.iter(),
        };
        for kv in range {
            if self.usage() <= target {
                return Ok(out);
            }
            let (k, _) = kv?;
            let Some(d) = std::str::from_utf8(&k[8.min(k.len())..])
                .ok()
                .and_then(|s| Digest::parse(s).ok())
            else {
                self.access.remove(&k)?;
                continue;
            };
            if pinned.contains(&d) {
                out.skipped_pinned += 1;
            } else if let Some(size) = self.remove_blob(&d)? {
                out.removed.push((d, size));
            }
            if out.removed.len() >= max {
                out.next = Some(k.to_vec());
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// Blobs from least to most recently used.
    #[cfg(test)]
    pub fn lru(&self) -> impl Iterator<Item = Digest> + '_ {
        self.access.iter().filter_map(|kv| {
            let (k, _) = kv.ok()?;
            Digest::parse(std::str::from_utf8(k.get(8..)?).ok()?).ok()
        })
    }

    /// Brings the records into agreement with the blob files found on disk (`on_disk`,
    /// digest -> size): keeps the records whose file has the recorded size, drops the
    /// others, and sets the usage counter. Touches only the database.
    pub fn reconcile(&self, files: Vec<(Digest, u64)>) -> Result<Reconciled, MetaError> {
        let mut on_disk: HashMap<String, (Digest, u64)> = files
            .into_iter()
            .map(|(d, size)| (d.to_string(), (d, size)))
            .collect();
        let mut out = Reconciled::default();
        let mut drop = Vec::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let rec: Option<BlobRecord> = serde_json::from_slice(&v).ok();
            match (on_disk.remove(&name), rec) {
                (Some((_, size)), Some(rec)) if rec.size == size => {
                    out.blobs += 1;
                    out.bytes += size;
                }
                (Some((d, _)), _) => {
                    out.untrusted_files.push(d);
                    drop.push(k);
                }
                (None, _) => {
                    out.records_without_file += 1;
                    drop.push(k);
                }
            }
        }
        for k in drop {
            if let Ok(d) = Digest::parse(&String::from_utf8_lossy(&k)) {
                self.remove_blob(&d)?;
            } else {
                self.blobs.remove(k)?;
            }
        }
        self.usage.store(out.bytes, Ordering::SeqCst);
        self.flush()?;
        out.orphans = on_disk.into_values().collect();
        Ok(out)
    }

    // -- settings

    pub fn setting(&self, key: &str) -> Result<Option<u64>, MetaError> {
        Ok(self.settings.get(key)?.and_then(|v| be_u64(&v)))
    }

    pub fn set_setting(&self, key: &str, value: u64) -> Result<(), MetaError> {
        self.settings.insert(key, &value.to_be_bytes())?;
        Ok(())
    }
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records are serialisable")
}

fn decode_json<T: for<'de> Deserialize<'de>>(v: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(v).map_err(|e| MetaError::Corrupt(e.to_string()))
}

mod images;
#[cfg(test)]
mod tests;
