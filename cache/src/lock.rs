//! Advisory file locks (`flock`) so concurrent kiln processes on one store
//! root never step on each other.
//!
//! A [`FileLock`] is held until dropped; the kernel also drops it when the
//! process dies, so a `kill -9` never leaves a stale lock behind. Locks are
//! per open file description: two `FileLock`s on one path in one process
//! exclude each other just like two processes do.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A held `flock` on a file. Released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Block until an exclusive lock on `path` (created if missing) is held.
    pub fn exclusive(path: &Path) -> std::io::Result<FileLock> {
        Self::acquire(path, libc::LOCK_EX)
    }

    /// Block until a shared lock on `path` (created if missing) is held.
    pub fn shared(path: &Path) -> std::io::Result<FileLock> {
        Self::acquire(path, libc::LOCK_SH)
    }

    /// Take an exclusive lock on `path` if nobody holds one; `None` if busy.
    pub fn try_exclusive(path: &Path) -> std::io::Result<Option<FileLock>> {
        match Self::acquire(path, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(lock) => Ok(Some(lock)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lock an already open file exclusively without blocking; `None` if
    /// someone else holds it.
    pub fn try_exclusive_file(file: File, path: &Path) -> std::io::Result<Option<FileLock>> {
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file, path: path.to_path_buf() })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The same lock under the file's new name, after a rename.
    pub fn relabel(mut lock: FileLock, path: &Path) -> FileLock {
        lock.path = path.to_path_buf();
        lock
    }

    /// The locked file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn acquire(path: &Path, op: libc::c_int) -> std::io::Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        flock(&file, op)?;
        Ok(FileLock { file, path: path.to_path_buf() })
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the
        // release immediate even if the fd was duplicated somewhere.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a valid, owned fd has no memory-safety effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = FileLock::exclusive(&path).unwrap();
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist_but_block_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.lock");
        let a = FileLock::shared(&path).unwrap();
        let b = FileLock::shared(&path).unwrap();
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(a);
        drop(b);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }
}
