//! Reloading files that change while pullcache runs (TLS certificates, the htpasswd file).
//!
//! A thread per watched set looks at the files' metadata every [`POLL`] and calls `reload`
//! when any of them changed. Polling the metadata of a few files costs nothing, and unlike
//! inotify it follows the symlink swaps of cert-manager, certbot and Kubernetes secrets
//! (`metadata` follows the link: a new target is a new inode). Loading is file I/O and
//! parsing, kept off the HTTP workers. The thread ends when its target is dropped.

use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(2);

/// What identifies a file's content without reading it: modification time, length, inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// Calls `reload(&target)` on its own thread after any of `files` changed, until `target`
/// is gone. `reload` logs its own outcome: a file that does not load must keep what was
/// loaded before, and the next change is tried again.
pub fn spawn<T: Send + Sync + 'static>(
    name: &str,
    files: Vec<PathBuf>,
    target: Weak<T>,
    reload: impl Fn(&T) + Send + 'static,
) -> std::io::Result<()> {
    let mut seen = stamps(&files);
    std::thread::Builder::new()
        .name(format!("pullcache-watch-{name}"))
        .spawn(move || loop {
            std::thread::sleep(POLL);
            let Some(target) = target.upgrade() else {
                return;
            };
            let now = stamps(&files);
            if now != seen {
                seen = now;
                reload(&target);
            }
        })
        .map(|_| ())
}
