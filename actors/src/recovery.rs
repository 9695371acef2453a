//! Bringing the blob store and the metadata into agreement after a restart or a crash.
//!
//! Blobs are written so that a crash at any point leaves something this module can fix:
//! a download goes to `tmp/`, is verified, renamed into `blobs/`, fsynced, and only then
//! recorded; eviction removes the record before the file. So after a crash there may be
//! leftovers in `tmp/`, records whose file is gone, and files without a record.
//!
//! - [`reconcile`] runs before serving, on the starting thread, while the engine still
//!   holds the database directly: it empties `tmp/`, removes stray files, drops records
//!   whose file is missing or has another size (and such files), and sets the usage
//!   counter. It reads directories but hashes nothing, so it is quick (~6 µs per blob).
//! - [`recover_orphans`] runs after serving has started, as a task that hashes on the
//!   blocking pool and records through the metadata actor: a file without a record is kept
//!   (recorded) if its content matches its name, deleted otherwise.
//! - Until that task reaches a file, a request for it does not wait: [`recover_one`]
//!   re-hashes that one file at once (the blob fetcher calls it when a lookup finds no
//!   record for a digest still [`Pending`]). So a blob that a client received before a
//!   crash is served after it, also with the upstream down.
//!
//! The database is reached through the metadata module only; files only through the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::digest::Digest;
use crate::error::{EngineError, MetaError};
use crate::metadata::{Db, MetaHandle, RecordRecovered, Unrecorded};
use crate::store::BlobStore;

/// What reconciliation found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub temp_removed: usize,
    pub records_without_file: usize,
    pub files_recovered: usize,
    pub files_removed: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Why reconciliation could not run (start-up stops: the store cannot be trusted).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("scanning the blob store: {0}")]
    Scan(#[source] std::io::Error),
    #[error(transparent)]
    Metadata(#[from] MetaError),
}

/// Before serving (blocking): see the module docs. Returns the report and the files that
/// have no record, for [`recover_orphans`].
pub fn reconcile(
    db: &Db,
    store: &BlobStore,
) -> Result<(ReconcileReport, Vec<(Digest, u64)>), RecoveryError> {
    let mut report = ReconcileReport {
        temp_removed: store.clean_temp().unwrap_or(0),
        ..Default::default()
    };
    let (files, strays) = store.scan().map_err(RecoveryError::Scan)?;
    for s in strays {
        if std::fs::remove_file(&s).is_ok() {
            report.files_removed += 1;
        }
    }
    let r = db.reconcile(files)?;
    for d in &r.untrusted_files {
        // Size disagrees with the record, or the record is unreadable: the file cannot be
        // trusted (its record is already gone).
        if store.remove_blob(d).is_ok() {
            report.files_removed += 1;
        }
    }
    report.blobs = r.blobs;
    report.bytes = r.bytes;
    report.records_without_file = r.records_without_file;
    Ok((report, r.orphans))
}

/// The files found without a record and not re-checked yet, with their sizes, and the
/// re-checks that requests are running. It is the one list of them: the background pass
/// takes its batches from it (a second copy of 100,000 digests took ~17 MiB). Cheap to
/// clone; empty (and then only ever read) once recovery is done.
#[derive(Clone, Default)]
pub struct Pending(Arc<Mutex<HashMap<Digest, Check>>>);

/// Where one unrecorded file is.
enum Check {
    Waiting {
        size: u64,
    },
    /// A request is re-hashing it; the others wait for its answer (`true` = recorded).
    Running(watch::Receiver<Option<bool>>),
}

/// What a request does about a pending file: nothing, check it, or wait for a check.
enum Turn {
    NotPending,
    Run(watch::Sender<Option<bool>>, u64),
    Wait(watch::Receiver<Option<bool>>),
}

impl Pending {
    pub fn new(orphans: Vec<(Digest, u64)>) -> Pending {
        Pending(Arc::new(Mutex::new(
            orphans
                .into_iter()
                .map(|(d, size)| (d, Check::Waiting { size }))
                .collect(),
        )))
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Up to `n` files no request is re-checking.
    fn batch(&self, n: usize) -> Vec<(Digest, u64)> {
        self.map()
            .iter()
            .filter_map(|(d, c)| match c {
                Check::Waiting { size } => Some((d.clone(), *size)),
                Check::Running(_) => None,
            })
            .take(n)
            .collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Check>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `digest` is still waiting to be re-checked (or being re-checked).
    pub fn contains(&self, digest: &Digest) -> bool {
        let map = self.map();
        !map.is_empty() && map.contains_key(digest)
    }

    fn turn(&self, digest: &Digest) -> Turn {
        let mut map = self.map();
        match map.get_mut(digest) {
            None => Turn::NotPending,
            Some(Check::Running(rx)) => Turn::Wait(rx.clone()),
            Some(check) => {
                let (tx, rx) = watch::channel(None);
                let Check::Waiting { size } = std::mem::replace(check, Check::Running(rx)) else {
                    unreachable!("matched above")
                };
                Turn::Run(tx, size)
            }
        }
    }

    /// Re-checked (kept or deleted): no longer pending.
    fn done<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut map = self.map();
        for d in digests {
            map.remove(d);
        }
        if map.is_empty() {
            // A table sized for 100,000 files is ~6 MiB: give it back.
            map.shrink_to_fit();
        }
    }

    /// A re-check that could not finish: the file waits again.
    fn retry(&self, digest: &Digest, size: u64) {
        if let Some(check) = self.map().get_mut(digest) {
            *check = Check::Waiting { size };
        }
    }
}

/// Re-checks one unrecorded file now, if it is still [`Pending`]: `true` if it matched its
/// name and is recorded. One re-check per file: requests that come while it runs wait for
/// its answer. (The background pass may hash the same file at the same moment; the record
/// is written once, since recording skips a blob recorded meanwhile.)
pub async fn recover_one(
    meta: &MetaHandle,
    store: &BlobStore,
    pending: &Pending,
    digest: &Digest,
    now_ms: u64,
) -> Result<bool, EngineError> {
    let (tx, size) = match pending.turn(digest) {
        Turn::NotPending => return Ok(false),
        Turn::Wait(mut rx) => {
            // The running check's answer; if it failed (its sender gone), not recovered.
            let answer = rx.wait_for(Option::is_some).await.map(|a| *a);
            return Ok(answer.ok().flatten().unwrap_or(false));
        }
        Turn::Run(tx, size) => (tx, size),
    };
    let result = check_and_record(meta, store, digest, size, now_ms).await;
    match &result {
        Ok(recorded) => {
            pending.done([digest]);
            tx.send_replace(Some(*recorded));
            if *recorded {
                tracing::info!(digest = %digest, "unrecorded blob file re-checked on request");
            }
        }
        Err(_) => pending.retry(digest, size),
    }
    result
}

/// Hashes one file (blocking pool) and records it if it matches its name; deletes it if not.
async fn check_and_record(
    meta: &MetaHandle,
    store: &BlobStore,
    digest: &Digest,
    size: u64,
    now_ms: u64,
) -> Result<bool, EngineError> {
    let (s, d) = (store.clone(), digest.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let (good, _) = verify_batch(&s, vec![(d, size)]);
        good.into_iter().next()
    })
    .await
    .map_err(|_| EngineError::Internal("a blocking task failed"))?;
    let Some(blob) = checked else {
        return Ok(false);
    };
    meta.ask(RecordRecovered {
        blobs: vec![blob],
        now_ms,
    })
    .await??;
    Ok(true)
}

/// Files are re-hashed and recorded this many at a time: one record transaction per
/// blob left sled holding ~150 MiB after 100,000 of them.
const BATCH: usize = 1000;

/// Re-hashes files that have no record: a file whose content matches its name is recorded
/// (and counted), anything else is deleted. Hashing runs on the blocking pool, a batch at
/// a time; records go through the metadata actor.
pub async fn recover_orphans(
    meta: MetaHandle,
    store: BlobStore,
    pending: Pending,
    now_ms: u64,
) -> Result<ReconcileReport, EngineError> {
    let mut report = ReconcileReport::default();
    loop {
        // Re-checked on request meanwhile: gone from the list. Fetched again meanwhile:
        // recorded, so not hashed (but done all the same).
        let taken = pending.batch(BATCH);
        if taken.is_empty() {
            break;
        }
        let digests: Vec<Digest> = taken.iter().map(|(d, _)| d.clone()).collect();
        let batch = meta.ask(Unrecorded(taken)).await??;
        let s = store.clone();
        let (good, removed) = tokio::task::spawn_blocking(move || verify_batch(&s, batch))
            .await
            .map_err(|_| EngineError::Internal("a blocking task failed"))?;
        report.files_removed += removed;
        let (count, bytes) = meta
            .ask(RecordRecovered {
                blobs: good,
                now_ms,
            })
            .await??;
        pending.done(&digests);
        report.files_recovered += count;
        report.blobs += count;
        report.bytes += bytes;
    }
    meta.flush().await?;
    Ok(report)
}

/// (files whose content matches their name, how many others were deleted). Blocking.
fn verify_batch(store: &BlobStore, batch: Vec<(Digest, u64)>) -> (Vec<(Digest, u64)>, usize) {
    let mut good = Vec::with_capacity(batch.len());
    let mut removed = 0;
    for (d, size) in batch {
        if store.verify(&d).unwrap_or(false) {
            good.push((d, size));
        } else {
            let _ = store.remove_blob(&d);
            removed += 1;
        }
    }
    (good, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{LookupBlob, Metadata};
    use crate::testing::{sha256 as d, Fixture};

    /// A store with two files and no records: one whose content matches its name (`good`),
    /// one that does not (`bad`).
    fn two_unrecorded() -> (Fixture, Digest, Digest) {
        let fx = Fixture::new();
        let (good, bad) = (d(b"good"), d(b"expected"));
        fx.put_file(&good, b"good");
        fx.put_file(&bad, b"tampered");
        (fx, good, bad)
    }

    #[actix_rt::test]
    async fn reconcile_recovers_verified_files_and_drops_the_rest() {
        let (fx, good, bad) = two_unrecorded();
        let (store, db) = (fx.store.clone(), fx.db);
        let gone = d(b"gone");
        db.record_blob(&gone, 4, 1).unwrap();
        let (_p, _f) = store.create_temp().unwrap();
        let (r, orphans) = reconcile(&db, &store).unwrap();
        assert_eq!(r.temp_removed, 1);
        assert_eq!(r.records_without_file, 1);
        assert_eq!(db.usage(), 0);
        assert_eq!(orphans.len(), 2);
        let meta = Metadata::start(db, crate::metrics::Mailbox::detached());
        let pending = Pending::new(orphans);
        let r2 = recover_orphans(meta.clone(), store.clone(), pending, 5)
            .await
            .unwrap();
        assert_eq!(r2.files_recovered, 1);
        assert_eq!(r2.files_removed, 1);
        assert_eq!(meta.usage(), 4);
        let lookup = |digest: &Digest| {
            meta.ask(LookupBlob {
                upstream: None,
                digest: digest.clone(),
            })
        };
        assert!(lookup(&good).await.unwrap().unwrap().record.is_some());
        assert!(lookup(&gone).await.unwrap().unwrap().record.is_none());
        assert!(!store.blob_path(&bad).exists());
    }

    #[actix_rt::test]
    async fn a_pending_file_is_re_checked_on_request_once() {
        let (fx, good, bad) = two_unrecorded();
        let (store, db) = (fx.store.clone(), fx.db);
        let (_, orphans) = reconcile(&db, &store).unwrap();
        let meta = Metadata::start(db, crate::metrics::Mailbox::detached());
        let pending = Pending::new(orphans);
        // Two requests at once: one hashes, the other waits for its answer.
        let (first, second) = tokio::join!(
            recover_one(&meta, &store, &pending, &good, 5),
            recover_one(&meta, &store, &pending, &good, 5)
        );
        assert!(first.unwrap() && second.unwrap());
        assert_eq!(meta.usage(), 4);
        // Not pending any more: a second request does not hash it again, and the
        // background pass finds it recorded.
        assert!(!recover_one(&meta, &store, &pending, &good, 5)
            .await
            .unwrap());
        assert!(!recover_one(&meta, &store, &pending, &bad, 5).await.unwrap());
        assert!(
            !store.blob_path(&bad).exists(),
            "a file that does not match is deleted"
        );
        let r = recover_orphans(meta.clone(), store.clone(), pending, 5)
            .await
            .unwrap();
        assert_eq!((r.files_recovered, r.files_removed), (0, 0));
        assert_eq!(meta.usage(), 4);
    }
}
