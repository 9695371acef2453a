//! What the engine's unit tests share: digests of test bytes, and a store with its
//! metadata database in a temporary directory.

use crate::digest::{Algorithm, Digest};
use crate::metadata::Db;
use crate::store::BlobStore;

pub fn sha256(b: &[u8]) -> Digest {
    Digest::of_bytes(Algorithm::Sha256, b)
}

/// A blob store and its metadata database in a new temporary directory.
pub struct Fixture {
    /// Holds the directory: it is deleted when the fixture goes.
    _dir: tempfile::TempDir,
    pub store: BlobStore,
    pub db: Db,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let db = Db::open(dir.path()).unwrap();
        Fixture {
            _dir: dir,
            store,
            db,
        }
    }

    /// Writes `content` as the blob file of `digest` (whether or not it matches).
    pub fn put_file(&self, digest: &Digest, content: &[u8]) {
        let p = self.store.blob_path(digest);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}
