//! The content-addressed blob store on disk: `<root>/blobs/<alg>/<2 hex>/<hex>` for verified
//! blobs, `<root>/tmp/` for downloads in progress. Paths are derived from a validated
//! [`Digest`] only. Every function here blocks (file system calls, page-cache reads): call
//! them from a fill writer thread or `spawn_blocking`, never from an async worker.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Hasher};

/// What [`BlobStore::scan`] found: blob files `(digest, size)`, and stray paths.
pub type Scan = (Vec<(Digest, u64)>, Vec<PathBuf>);

#[derive(Clone, Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> io::Result<BlobStore> {
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blobs)?;
        fs::create_dir_all(&tmp)?;
        Ok(BlobStore { blobs, tmp })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.rel_path())
    }

    /// Opens a stored blob for reading; `None` if it is not stored.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a new, uniquely named temporary file for a download, readable and writable.
    pub fn create_temp(&self) -> io::Result<(PathBuf, File)> {
        for _ in 0..8 {
            let name = format!("fill-{:016x}", rand::random::<u64>());
            let path = self.tmp.join(name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => return Ok((path, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("could not create a unique temporary file"))
    }

    /// Moves a fully written, verified temporary file to its place in the store. The
    /// name is final at once (a process killed after this keeps the blob: the kernel has
    /// the bytes); [`BlobStore::make_durable`] then makes it survive a power loss. Until a
    /// blob is recorded, which happens only after both, start-up recovery re-hashes it.
    pub fn place(&self, tmp: &Path, digest: &Digest) -> io::Result<PathBuf> {
        let dest = self.blob_path(digest);
        fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
        fs::rename(tmp, &dest)?;
        Ok(dest)
    }

    /// fsyncs a placed blob's data and then its directory (which makes the rename itself
    /// durable).
    pub fn make_durable(&self, file: &File, dest: &Path) -> io::Result<()> {
        file.sync_data()?;
        let dir = dest.parent().expect("blob path has a parent");
        File::open(dir)?.sync_all()
    }

    /// Whether a file can be created, written and removed in the store (readiness).
    pub fn write_test(&self) -> io::Result<()> {
        use std::io::Write;
        let (p, mut f) = self.create_temp()?;
        let r = f.write_all(b"ok");
        fs::remove_file(p)?;
        r
    }

    /// Free bytes on the store's filesystem.
    pub fn free_space(&self) -> io::Result<u64> {
        free_space(&self.tmp)
    }

    /// Removes leftovers of interrupted downloads. Returns how many were removed.
    pub fn clean_temp(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            if fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.blob_path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every file in the store that is named like a blob: `(digest, size)`. Files with
    /// other names are reported in the second list so the caller can remove them.
    pub fn scan(&self) -> io::Result<Scan> {
        let mut found = Vec::new();
        let mut strays = Vec::new();
        for alg in fs::read_dir(&self.blobs)? {
            let alg = alg?;
            if !alg.file_type()?.is_dir() {
                strays.push(alg.path());
                continue;
            }
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for shard in fs::read_dir(alg.path())? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    strays.push(shard.path());
                    continue;
                }
                for f in fs::read_dir(shard.path())? {
                    let f = f?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    match Digest::parse(&format!("{alg_name}:{name}")) {
                        Ok(d)
                            if f.file_type()?.is_file() && d.rel_path().starts_with(&alg_name) =>
                        {
                            found.push((d, f.metadata()?.len()))
                        }
                        _ => strays.push(f.path()),
                    }
                }
            }
        }
        Ok((found, strays))
    }

    /// Re-hashes a stored blob; true if its content matches its name.
    pub fn verify(&self, digest: &Digest) -> io::Result<bool> {
        use std::io::Read;
        let mut f = File::open(self.blob_path(digest))?;
        let mut h = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(&h.finish() == digest)
    }
}

/// Appends all of `pieces` with as few `writev` calls as possible.
pub fn write_all_vectored(mut file: &File, pieces: &[bytes::Bytes]) -> io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut idx = 0;
    let mut off = 0;
    loop {
        // Skip what is written (and empty pieces: a writev of nothing returns 0).
        while idx < pieces.len() && pieces[idx].len() == off {
            idx += 1;
            off = 0;
        }
        if idx == pieces.len() {
            return Ok(());
        }
        let slices: Vec<IoSlice<'_>> = std::iter::once(&pieces[idx][off..])
            .chain(pieces[idx + 1..].iter().map(|b| &b[..]))
            .take(1024)
            .map(IoSlice::new)
            .collect();
        let mut n = match file.write_vectored(&slices) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Advance past what was written.
        while n > 0 && idx < pieces.len() {
            let left = pieces[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
}

/// Reads up to `len` bytes at `offset` (positioned read; the file's cursor is not shared state).
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(bytes::Bytes::from(buf))
}

/// Brings `len` bytes at `offset` of `file` into the page cache if probes find some of
/// them missing (1-byte `preadv2(RWF_NOWAIT)` probes every MiB, and the last byte). `true`
/// if it read them in. The read goes through the page cache into `/dev/null` with
/// `sendfile`: nothing is copied to user space. Blocks on the disk: run it on a blocking
/// thread, so that a `sendfile` of the region on an HTTP worker does not.
pub fn make_resident(file: &File, offset: u64, len: usize) -> bool {
    const STEP: u64 = 1024 * 1024;
    let end = offset + len as u64;
    let mut probe = [0u8; 1];
    let missing = (0..)
        .map(|i| offset + i * STEP)
        .take_while(|&at| at < end)
        .chain(std::iter::once(end.saturating_sub(1)))
        .any(|at| {
            !matches!(
                rustix::io::preadv2(
                    file,
                    &mut [io::IoSliceMut::new(&mut probe)],
                    at,
                    rustix::io::ReadWriteFlags::NOWAIT,
                ),
                Ok(1)
            )
        });
    if !missing {
        return false;
    }
    static DEV_NULL: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
    let Some(null) = DEV_NULL
        .get_or_init(|| File::options().write(true).open("/dev/null").ok())
        .as_ref()
    else {
        return false;
    };
    let mut off = offset;
    while off < end {
        let left = (end - off) as usize;
        match rustix::fs::sendfile(null, file, Some(&mut off), left) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    true
}

/// Free space on the filesystem holding `path`, in bytes (for unprivileged users).
pub fn free_space(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether an I/O error means the disk (or the quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_append_every_piece_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let mut expect = Vec::new();
        let mut pieces = Vec::new();
        // Empty pieces, odd sizes and more pieces than one writev takes.
        for i in 0..2500usize {
            let b: Vec<u8> = (0..(i * 7) % 300).map(|j| (i + j) as u8).collect();
            expect.extend_from_slice(&b);
            pieces.push(bytes::Bytes::from(b));
        }
        write_all_vectored(&file, &pieces).unwrap();
        write_all_vectored(&file, &[bytes::Bytes::new()]).unwrap();
        let empties = vec![bytes::Bytes::new(); 1500];
        write_all_vectored(&file, &empties).unwrap();
        let mut tail = empties;
        tail.push(bytes::Bytes::from_static(b"end"));
        write_all_vectored(&file, &tail).unwrap();
        expect.extend_from_slice(b"end");
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }
}
