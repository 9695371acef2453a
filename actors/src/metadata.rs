//! The metadata actor owns the sled database: which blobs are stored (size, times), which
//! upstream each blob is known to belong to, cached manifests, tag -> digest entries and the
//! repositories seen per upstream. It runs as a `SyncArbiter` actor, so sled's blocking calls
//! never run on an async thread; [`MetadataStore`] holds the logic and is usable directly in
//! blocking contexts (start-up reconciliation, tests).
//!
//! Trees (one per entity, never one per repository):
//! - `blobs`:      digest -> [`BlobRecord`]
//! - `blob_links`: upstream \0 digest -> ()  (the upstream serves this blob)
//! - `manifests`:  upstream \0 repo \0 digest -> [`ManifestRecord`] (media type + exact bytes)
//! - `tags`:       upstream \0 repo \0 tag -> [`TagRecord`]
//! - `repos`:      upstream \0 repo -> last access (u64 BE ms)

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::MetaError;
use crate::store::BlobStore;

/// Resolves when the writes before it are durable: see [`MetadataStore::durable`].
pub type Durable =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), MetaError>> + Send>>;

/// Bumped when the on-disk format changes; part of the database directory name.
const FORMAT: &str = "v1";

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

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct MetadataStore {
    db: sled::Db,
    blobs: sled::Tree,
    blob_links: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    repos: sled::Tree,
    /// LRU index: last access (u64 BE ms) ++ digest -> (). Kept in step with `blobs` by
    /// transactions, so "least recently used" is an ordered range scan.
    access: sled::Tree,
    /// Remembered settings (the default disk budget computed at the first start).
    settings: sled::Tree,
    /// Bytes of the blobs recorded; changed with every record and removal.
    usage: Arc<AtomicU64>,
}

/// Access times are recorded at this granularity: a blob read many times a second costs
/// one index update, not one per read.
const ACCESS_GRANULARITY_MS: u64 = 1000;

fn access_key(ms: u64, digest: &str) -> Vec<u8> {
    let mut k = ms.to_be_bytes().to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

type TxResult<T> = Result<T, sled::transaction::ConflictableTransactionError<MetaError>>;

fn tx_err(e: sled::transaction::TransactionError<MetaError>) -> MetaError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => e.into(),
    }
}

/// What start-up reconciliation found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub temp_removed: usize,
    pub records_without_file: usize,
    pub files_recovered: usize,
    pub files_removed: usize,
    pub blobs: usize,
    pub bytes: u64,
}

impl MetadataStore {
    pub fn open(root: &Path) -> Result<MetadataStore, MetaError> {
        // sled's page cache defaults to 1 GiB; the metadata's hot set is far smaller, and a
        // cache's RSS should stay small.
        let db = sled::Config::new()
            .cache_capacity(32 * 1024 * 1024)
            .path(root.join("meta").join(FORMAT))
            .open()?;
        Ok(MetadataStore {
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
        let rec = BlobRecord {
            size,
            created_ms: now_ms,
            last_access_ms: now_ms,
        };
        let value = encode_json(&rec);
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

    /// Blobs from least to most recently used.
    pub fn lru(&self) -> impl Iterator<Item = Digest> + '_ {
        self.access.iter().filter_map(|kv| {
            let (k, _) = kv.ok()?;
            Digest::parse(std::str::from_utf8(k.get(8..)?).ok()?).ok()
        })
    }

    /// Total size of the recorded blobs.
    pub fn recorded_bytes(&self) -> Result<u64, MetaError> {
        let mut total = 0;
        for kv in self.blobs.iter() {
            let (_, v) = kv?;
            if let Ok(r) = serde_json::from_slice::<BlobRecord>(&v) {
                total += r.size;
            }
        }
        Ok(total)
    }

    pub fn setting(&self, key: &str) -> Result<Option<u64>, MetaError> {
        Ok(self
            .settings
            .get(key)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    pub fn set_setting(&self, key: &str, value: u64) -> Result<(), MetaError> {
        self.settings.insert(key, &value.to_be_bytes())?;
        Ok(())
    }

    /// Notes that a repository was used (coarsely: at most one write a minute).
    pub fn touch_repo(&self, upstream: &str, repo: &str, now_ms: u64) -> Result<(), MetaError> {
        let k = key(&[upstream, repo]);
        let last = self
            .repos
            .get(&k)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        if now_ms >= last + 60_000 {
            self.repos.insert(k, &now_ms.to_be_bytes())?;
        }
        Ok(())
    }

    /// Drops manifests and tags of repositories unused since `before_ms`, except those
    /// `keep` says to keep. Returns how many repositories were dropped.
    pub fn drop_idle_repositories(
        &self,
        before_ms: u64,
        keep: impl Fn(&str, &str) -> bool,
    ) -> Result<usize, MetaError> {
        let mut idle = Vec::new();
        for kv in self.repos.iter() {
            let (k, v) = kv?;
            let last = v
                .as_ref()
                .try_into()
                .ok()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if last < before_ms {
                idle.push(k);
            }
        }
        let mut dropped = 0;
        for k in idle {
            let s = String::from_utf8_lossy(&k).into_owned();
            let Some((u, r)) = s.split_once('\0') else {
                continue;
            };
            if keep(u, r) {
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

    /// Every tag entry: (upstream, repository, tag, digest).
    pub fn all_tags(&self) -> Result<Vec<(String, String, String, String)>, MetaError> {
        let mut out = Vec::new();
        for kv in self.tags.iter() {
            let (k, v) = kv?;
            let s = String::from_utf8_lossy(&k).into_owned();
            let mut parts = s.splitn(3, '\0');
            let (Some(u), Some(r), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<TagRecord>(&v) {
                out.push((u.to_string(), r.to_string(), t.to_string(), rec.digest));
            }
        }
        Ok(out)
    }

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
        if v.len() < 4 {
            return Err(MetaError::Corrupt("short manifest record".into()));
        }
        let hlen = u32::from_be_bytes(v[..4].try_into().unwrap()) as usize;
        if v.len() < 4 + hlen {
            return Err(MetaError::Corrupt("truncated manifest record".into()));
        }
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
        let header = serde_json::to_vec(&ManifestHeader {
            media_type: record.media_type.clone(),
            fetched_ms: record.fetched_ms,
        })
        .expect("serialisable");
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

    pub fn flush(&self) -> Result<usize, MetaError> {
        Ok(self.db.flush()?)
    }

    /// A future that resolves once everything written so far is on disk. sled makes writes
    /// durable only at a flush (on its own timer, every 500 ms, otherwise); this one runs
    /// on sled's own threads (`flush_async`), so no metadata thread waits for the fsync.
    /// Nothing happens unless it is awaited.
    pub fn durable(&self) -> Durable {
        let db = self.db.clone();
        Box::pin(async move {
            db.flush_async().await?;
            Ok(())
        })
    }

    /// Brings the store and the metadata into agreement after a restart or a crash. Runs
    /// before serving: removes temp files and stray files, drops records whose file is gone
    /// or has another size, and sets the usage counter to the bytes of the blobs kept.
    /// Returns the files that have no record (a crash between rename and record): they are
    /// re-hashed by [`MetadataStore::recover_orphans`], in the background.
    pub fn reconcile(
        &self,
        store: &BlobStore,
    ) -> Result<(ReconcileReport, Vec<(Digest, u64)>), MetaError> {
        let mut report = ReconcileReport {
            temp_removed: store.clean_temp().unwrap_or(0),
            ..Default::default()
        };
        let (files, strays) = store
            .scan()
            .map_err(|e| MetaError::Corrupt(format!("scanning the blob store: {e}")))?;
        for s in strays {
            if std::fs::remove_file(&s).is_ok() {
                report.files_removed += 1;
            }
        }
        let mut on_disk = std::collections::HashMap::with_capacity(files.len());
        for (d, size) in files {
            on_disk.insert(d.to_string(), (d, size));
        }
        let mut drop = Vec::new();
        for kv in self.blobs.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let rec: Option<BlobRecord> = serde_json::from_slice(&v).ok();
            match (on_disk.remove(&name), rec) {
                (Some((_, size)), Some(rec)) if rec.size == size => {
                    report.blobs += 1;
                    report.bytes += size;
                }
                (Some((d, _)), _) => {
                    // Size disagrees or record unreadable: the file cannot be trusted.
                    let _ = store.remove_blob(&d);
                    report.files_removed += 1;
                    drop.push(k);
                }
                (None, _) => {
                    report.records_without_file += 1;
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
        self.usage.store(report.bytes, Ordering::SeqCst);
        self.flush()?;
        Ok((report, on_disk.into_values().collect()))
    }

    /// Re-hashes files that have no record: a file whose content matches its name is
    /// recorded (and counted), anything else is deleted.
    pub fn recover_orphans(
        &self,
        store: &BlobStore,
        orphans: Vec<(Digest, u64)>,
        now_ms: u64,
    ) -> Result<ReconcileReport, MetaError> {
        let mut report = ReconcileReport::default();
        // Verified files are recorded a thousand per transaction: one transaction per
        // blob left sled holding ~150 MiB after 100,000 of them.
        let mut good = Vec::new();
        for (d, size) in orphans {
            if self.blob(&d)?.is_some() {
                continue; // fetched again meanwhile
            }
            if store.verify(&d).unwrap_or(false) {
                good.push((d, size));
                if good.len() == 1000 {
                    self.record_new_blobs(&good, now_ms, &mut report)?;
                    good.clear();
                }
            } else {
                let _ = store.remove_blob(&d);
                report.files_removed += 1;
            }
        }
        self.record_new_blobs(&good, now_ms, &mut report)?;
        self.flush()?;
        Ok(report)
    }

    /// Records verified blobs that had no record, in one transaction.
    fn record_new_blobs(
        &self,
        blobs: &[(Digest, u64)],
        now_ms: u64,
        report: &mut ReconcileReport,
    ) -> Result<(), MetaError> {
        use sled::Transactional;
        if blobs.is_empty() {
            return Ok(());
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
                        continue; // recorded meanwhile (fetched again): keep that record
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
        report.files_recovered += count;
        report.blobs += count;
        report.bytes += bytes;
        Ok(())
    }

    /// Bytes of blobs stored, exactly: kept as a counter by every record change.
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::SeqCst)
    }
}

fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records are serialisable")
}

fn decode_json<T: for<'de> Deserialize<'de>>(v: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(v).map_err(|e| MetaError::Corrupt(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// The actor and its messages.

/// Runs [`MetadataStore`] calls on a sync arbiter's threads.
pub struct Metadata {
    store: MetadataStore,
}

impl Metadata {
    /// Starts `threads` sync actors sharing one database.
    pub fn start(store: MetadataStore, threads: usize) -> Addr<Metadata> {
        SyncArbiter::start(threads, move || Metadata {
            store: store.clone(),
        })
    }
}

impl Actor for Metadata {
    type Context = SyncContext<Self>;
}

/// Is the blob stored, and does `upstream` serve it?
#[derive(Message)]
#[rtype(result = "Result<BlobLookup, MetaError>")]
pub struct LookupBlob {
    pub upstream: String,
    pub digest: Digest,
}

#[derive(Debug, Clone)]
pub struct BlobLookup {
    pub record: Option<BlobRecord>,
    pub linked: bool,
}

/// A verified blob was moved into the store: record it and link it to its upstream.
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct CommitBlob {
    pub upstream: String,
    pub digest: Digest,
    pub size: u64,
    pub now_ms: u64,
}

/// Mark blobs as served by `upstream` (the digests a cached manifest references, or a
/// blob the upstream confirmed).
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct LinkBlobs {
    pub upstream: String,
    pub digests: Vec<Digest>,
}

/// A client was served this blob (feeds LRU eviction).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TouchBlob {
    pub digest: Digest,
    pub now_ms: u64,
}

/// The blob's file is gone or unreadable: forget it.
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct ForgetBlob {
    pub digest: Digest,
}

#[derive(Message)]
#[rtype(result = "Result<Option<ManifestRecord>, MetaError>")]
pub struct GetManifest {
    pub upstream: String,
    pub repo: String,
    pub digest: Digest,
}

/// Stores a manifest (and its tag); the answer is a [`Durable`] to await before the
/// manifest is served, so that what a client was given survives a crash.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct PutManifest {
    pub upstream: String,
    pub repo: String,
    pub digest: Digest,
    pub record: ManifestRecord,
    pub tag: Option<(String, TagRecord)>,
    /// Blobs the manifest references, linked to the upstream in the same step.
    pub links: Vec<Digest>,
}

#[derive(Message)]
#[rtype(result = "Result<Option<TagRecord>, MetaError>")]
pub struct GetTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
}

/// Points a tag at a digest (or refreshes when it was checked); await the [`Durable`] when
/// the digest changed.
#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct PutTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub record: TagRecord,
}

#[derive(Message)]
#[rtype(result = "Result<Durable, MetaError>")]
pub struct DeleteTag {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
}

#[derive(Message)]
#[rtype(result = "Result<Option<Vec<String>>, MetaError>")]
pub struct ListTags {
    pub upstream: String,
    pub repo: String,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<(String, String)>, MetaError>")]
pub struct ListRepositories;

#[derive(Message)]
#[rtype(result = "Result<usize, MetaError>")]
pub struct Flush;

/// Is the database answering?
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct Ping;

impl Handler<Ping> for Metadata {
    type Result = Result<(), MetaError>;
    fn handle(&mut self, _: Ping, _: &mut Self::Context) -> Self::Result {
        self.store.setting("ping").map(|_| ())
    }
}

/// A repository was used (feeds `manifest_max_idle`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TouchRepo {
    pub upstream: String,
    pub repo: String,
    pub now_ms: u64,
}

impl Handler<TouchRepo> for Metadata {
    type Result = ();
    fn handle(&mut self, m: TouchRepo, _: &mut Self::Context) {
        if let Err(e) = self.store.touch_repo(&m.upstream, &m.repo, m.now_ms) {
            tracing::warn!(error = %e, "could not record repository access");
        }
    }
}

impl Handler<LookupBlob> for Metadata {
    type Result = Result<BlobLookup, MetaError>;
    fn handle(&mut self, m: LookupBlob, _: &mut Self::Context) -> Self::Result {
        let record = self.store.blob(&m.digest)?;
        let linked = record.is_some() && self.store.is_linked(&m.upstream, &m.digest)?;
        Ok(BlobLookup { record, linked })
    }
}

impl Handler<CommitBlob> for Metadata {
    type Result = Result<(), MetaError>;
    fn handle(&mut self, m: CommitBlob, _: &mut Self::Context) -> Self::Result {
        self.store.record_blob(&m.digest, m.size, m.now_ms)?;
        self.store.link(&m.upstream, &m.digest)
    }
}

impl Handler<LinkBlobs> for Metadata {
    type Result = Result<(), MetaError>;
    fn handle(&mut self, m: LinkBlobs, _: &mut Self::Context) -> Self::Result {
        for d in &m.digests {
            self.store.link(&m.upstream, d)?;
        }
        Ok(())
    }
}

impl Handler<TouchBlob> for Metadata {
    type Result = ();
    fn handle(&mut self, m: TouchBlob, _: &mut Self::Context) {
        if let Err(e) = self.store.touch_blob(&m.digest, m.now_ms) {
            tracing::warn!(digest = %m.digest, error = %e, "could not record blob access");
        }
    }
}

impl Handler<ForgetBlob> for Metadata {
    type Result = Result<(), MetaError>;
    fn handle(&mut self, m: ForgetBlob, _: &mut Self::Context) -> Self::Result {
        self.store.remove_blob(&m.digest).map(|_| ())
    }
}

impl Handler<GetManifest> for Metadata {
    type Result = Result<Option<ManifestRecord>, MetaError>;
    fn handle(&mut self, m: GetManifest, _: &mut Self::Context) -> Self::Result {
        self.store.manifest(&m.upstream, &m.repo, &m.digest)
    }
}

impl Handler<PutManifest> for Metadata {
    type Result = Result<Durable, MetaError>;
    fn handle(&mut self, m: PutManifest, _: &mut Self::Context) -> Self::Result {
        for d in &m.links {
            self.store.link(&m.upstream, d)?;
        }
        let tag = m.tag.as_ref().map(|(t, r)| (t.as_str(), r));
        self.store
            .put_manifest(&m.upstream, &m.repo, &m.digest, &m.record, tag)?;
        Ok(self.store.durable())
    }
}

impl Handler<GetTag> for Metadata {
    type Result = Result<Option<TagRecord>, MetaError>;
    fn handle(&mut self, m: GetTag, _: &mut Self::Context) -> Self::Result {
        self.store.tag(&m.upstream, &m.repo, &m.tag)
    }
}

impl Handler<PutTag> for Metadata {
    type Result = Result<Durable, MetaError>;
    fn handle(&mut self, m: PutTag, _: &mut Self::Context) -> Self::Result {
        self.store
            .put_tag(&m.upstream, &m.repo, &m.tag, &m.record)?;
        Ok(self.store.durable())
    }
}

impl Handler<DeleteTag> for Metadata {
    type Result = Result<Durable, MetaError>;
    fn handle(&mut self, m: DeleteTag, _: &mut Self::Context) -> Self::Result {
        self.store.delete_tag(&m.upstream, &m.repo, &m.tag)?;
        Ok(self.store.durable())
    }
}

impl Handler<ListTags> for Metadata {
    type Result = Result<Option<Vec<String>>, MetaError>;
    fn handle(&mut self, m: ListTags, _: &mut Self::Context) -> Self::Result {
        if !self.store.has_repository(&m.upstream, &m.repo)? {
            return Ok(None);
        }
        Ok(Some(self.store.tags_of(&m.upstream, &m.repo)?))
    }
}

impl Handler<ListRepositories> for Metadata {
    type Result = Result<Vec<(String, String)>, MetaError>;
    fn handle(&mut self, _: ListRepositories, _: &mut Self::Context) -> Self::Result {
        self.store.repositories()
    }
}

impl Handler<Flush> for Metadata {
    type Result = Result<usize, MetaError>;
    fn handle(&mut self, _: Flush, _: &mut Self::Context) -> Self::Result {
        self.store.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Digest {
        Digest::of_bytes(crate::digest::Algorithm::Sha256, b)
    }

    #[test]
    fn manifests_tags_and_repos_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetadataStore::open(dir.path()).unwrap();
        let rec = ManifestRecord {
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            bytes: Bytes::from_static(b"{\"a\":1}"),
            fetched_ms: 7,
        };
        let tag = TagRecord {
            digest: d(b"{\"a\":1}").to_string(),
            checked_ms: 7,
        };
        m.put_manifest(
            "docker.io",
            "library/a",
            &d(b"{\"a\":1}"),
            &rec,
            Some(("latest", &tag)),
        )
        .unwrap();
        assert_eq!(
            m.manifest("docker.io", "library/a", &d(b"{\"a\":1}"))
                .unwrap(),
            Some(rec)
        );
        assert_eq!(
            m.manifest("ghcr.io", "library/a", &d(b"{\"a\":1}"))
                .unwrap(),
            None
        );
        assert_eq!(
            m.tag("docker.io", "library/a", "latest").unwrap(),
            Some(tag)
        );
        assert_eq!(
            m.tags_of("docker.io", "library/a").unwrap(),
            vec!["latest".to_string()]
        );
        // A repository that is a prefix of another does not see its tags.
        assert!(m.tags_of("docker.io", "library").unwrap().is_empty());
        assert_eq!(
            m.repositories().unwrap(),
            vec![("docker.io".into(), "library/a".into())]
        );
    }

    #[test]
    fn usage_counter_and_lru_order_follow_records() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetadataStore::open(dir.path()).unwrap();
        let (a, b, c) = (d(b"a"), d(b"b"), d(b"c"));
        m.record_blob(&a, 10, 1_000).unwrap();
        m.record_blob(&b, 20, 2_000).unwrap();
        m.record_blob(&c, 30, 3_000).unwrap();
        assert_eq!(m.usage(), 60);
        // Re-recording replaces, not adds.
        m.record_blob(&c, 30, 3_500).unwrap();
        assert_eq!(m.usage(), 60);
        assert_eq!(
            m.lru().collect::<Vec<_>>(),
            vec![a.clone(), b.clone(), c.clone()]
        );
        m.touch_blob(&a, 10_000).unwrap();
        assert_eq!(
            m.lru().collect::<Vec<_>>(),
            vec![b.clone(), c.clone(), a.clone()]
        );
        // Within the granularity a touch changes nothing.
        m.touch_blob(&b, 2_500).unwrap();
        assert_eq!(m.lru().next(), Some(b.clone()));
        assert_eq!(m.remove_blob(&b).unwrap(), Some(20));
        assert_eq!(m.remove_blob(&b).unwrap(), None);
        assert_eq!(m.usage(), 40);
        assert_eq!(m.lru().collect::<Vec<_>>(), vec![c, a]);
        assert_eq!(m.recorded_bytes().unwrap(), 40);
    }

    #[test]
    fn reconcile_recovers_verified_files_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let m = MetadataStore::open(dir.path()).unwrap();
        let good = d(b"good");
        let bad = d(b"expected");
        let gone = d(b"gone");
        for (dg, content) in [(&good, &b"good"[..]), (&bad, &b"tampered"[..])] {
            let p = store.blob_path(dg);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        m.record_blob(&gone, 4, 1).unwrap();
        let (_p, _f) = store.create_temp().unwrap();
        let (r, orphans) = m.reconcile(&store).unwrap();
        assert_eq!(r.temp_removed, 1);
        assert_eq!(r.records_without_file, 1);
        assert_eq!(m.usage(), 0);
        assert_eq!(orphans.len(), 2);
        let r2 = m.recover_orphans(&store, orphans, 5).unwrap();
        assert_eq!(r2.files_recovered, 1);
        assert_eq!(r2.files_removed, 1);
        assert_eq!(m.usage(), 4);
        assert!(m.blob(&good).unwrap().is_some());
        assert!(m.blob(&gone).unwrap().is_none());
        assert!(!store.blob_path(&bad).exists());
    }
}
