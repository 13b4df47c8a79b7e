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

/// An exclusive lock whose file exists only while the lock is held: the
/// holder removes it before unlocking. For locks over an open-ended set of
/// names (one per cache key), so they leave no files behind.
///
/// A waiter may wake up holding a file that was removed (or replaced) in
/// the meantime; it then tries again on the current file, so two holders
/// can never each hold a different file under one name.
#[derive(Debug)]
pub struct TransientLock {
    lock: FileLock,
}

impl TransientLock {
    /// Block until `path` (created if missing) is locked exclusively.
    pub fn acquire(path: &Path) -> std::io::Result<TransientLock> {
        loop {
            let lock = FileLock::exclusive(path)?;
            if still_named(&lock)? {
                return Ok(TransientLock { lock });
            }
        }
    }

    /// Lock `path` exclusively if nobody holds it; `None` if busy.
    pub fn try_acquire(path: &Path) -> std::io::Result<Option<TransientLock>> {
        loop {
            let Some(lock) = FileLock::try_exclusive(path)? else { return Ok(None) };
            if still_named(&lock)? {
                return Ok(Some(TransientLock { lock }));
            }
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        self.lock.path()
    }
}

impl Drop for TransientLock {
    fn drop(&mut self) {
        // Removed while still locked: a waiter that then gets this file's
        // lock sees it is gone and retries on a fresh one.
        let _ = std::fs::remove_file(self.lock.path());
    }
}

/// Whether `lock`'s path still names the file it locked.
/// Whether the file `lock` holds is still the one named by its path (a
/// sweeper may have removed it between our open and our flock).
pub(crate) fn still_named(lock: &FileLock) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = lock.file.metadata()?;
    match std::fs::metadata(&lock.path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
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
    fn transient_lock_removes_its_file_and_excludes_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = TransientLock::acquire(&path).unwrap();
        assert!(TransientLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(!path.exists(), "the lock file goes with the lock");
        let again = TransientLock::try_acquire(&path).unwrap().expect("free after release");
        assert!(path.exists());
        drop(again);
    }

    #[test]
    fn transient_lock_waiters_never_overlap() {
        // Many threads take and release one name; a counter inside the
        // critical section must never see a second holder, which it would if
        // a waiter woke up on a removed file and went ahead.
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("busy.lock"));
        let inside = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (path, inside, overlaps) = (path.clone(), inside.clone(), overlaps.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _lock = TransientLock::acquire(&path).unwrap();
                        if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
        assert!(!path.exists());
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
