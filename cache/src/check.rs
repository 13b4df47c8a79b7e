//! Store hygiene: removing what dead processes left under `tmp/`, and
//! scratch directories that are cleaned up even after a crash.
//!
//! Everything under `tmp/` that is in use is guarded by a `flock` held by
//! its owner (ingest files, prepared snapshots, scratch dirs). A lock that
//! can be taken means its owner is gone, so the leftover can go too — which
//! makes [`clean_tmp`] safe to run while other kiln processes work on the
//! same root. [`crate::Store::open`] runs it every time.

use std::path::{Path, PathBuf};

use crate::Store;
use crate::fsutil::unique_name;
use crate::lock::FileLock;

/// What a cleanup removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Half-written blobs.
    pub ingests: usize,
    /// Uncommitted or half-deleted snapshots.
    pub snapshots: usize,
    /// Scratch directories.
    pub scratch: usize,
}

/// Remove the leftovers of dead processes under `tmp/` of `store`.
pub fn clean_tmp(store: &Store) -> anyhow::Result<CleanReport> {
    Ok(CleanReport {
        ingests: store.content.remove_stale_ingests()?,
        snapshots: store.snapshots.remove_stale()?,
        scratch: remove_stale_scratch(&scratch_root(store.root()))?,
    })
}

/// A private directory under `tmp/scratch/` (same filesystem as the
/// store), removed on drop — or by the next [`clean_tmp`] if the process
/// dies first.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    lock: Option<FileLock>,
}

impl ScratchDir {
    /// Create one under the store `root`.
    pub fn new(root: &Path) -> anyhow::Result<ScratchDir> {
        let base = scratch_root(root);
        std::fs::create_dir_all(&base)?;
        let path = base.join(unique_name("d-"));
        let lock = FileLock::exclusive(&base.join(format!("{}.lock", file_name(&path))))?;
        std::fs::create_dir(&path)?;
        Ok(ScratchDir { path, lock: Some(lock) })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock.path());
        }
    }
}

fn scratch_root(root: &Path) -> PathBuf {
    root.join("tmp").join("scratch")
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn remove_stale_scratch(base: &Path) -> anyhow::Result<usize> {
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        let name = file_name(&path);
        let (dir, lock_file) = match name.strip_suffix(".lock") {
            Some(dir) => (base.join(dir), path.clone()),
            None => (path.clone(), base.join(format!("{name}.lock"))),
        };
        if let Some(_lock) = FileLock::try_exclusive(&lock_file)? {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
                removed += 1;
            }
            let _ = std::fs::remove_file(&lock_file);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_owners_go_live_ones_stay() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();

        // Live: a prepared snapshot, a scratch dir, a blob writer.
        let live_snap = store.snapshots.prepare().unwrap();
        std::fs::write(live_snap.fs().join("f"), b"x").unwrap();
        let live_scratch = ScratchDir::new(root.path()).unwrap();
        let live_writer = store.content.writer().unwrap();

        // Dead: the same kinds of things with nobody holding their locks.
        std::fs::create_dir_all(root.path().join("tmp/snapshots/s-dead/fs")).unwrap();
        std::fs::create_dir_all(root.path().join("tmp/scratch/d-dead")).unwrap();
        std::fs::write(root.path().join("tmp/scratch/d-gone.lock"), b"").unwrap();
        std::fs::write(root.path().join("tmp/ingest/w-dead"), b"partial").unwrap();

        let report = clean_tmp(&store).unwrap();
        assert_eq!(report, CleanReport { ingests: 1, snapshots: 1, scratch: 1 });
        assert!(live_snap.fs().join("f").exists());
        assert!(live_scratch.path().is_dir());
        assert!(!root.path().join("tmp/snapshots/s-dead").exists());
        assert!(!root.path().join("tmp/scratch/d-gone.lock").exists());

        // Committing and dropping leave nothing behind.
        store.snapshots.commit(live_snap, "sha256-live", &Default::default()).unwrap();
        drop(live_scratch);
        drop(live_writer);
        for sub in ["tmp/snapshots", "tmp/scratch", "tmp/ingest"] {
            let left: Vec<_> = std::fs::read_dir(root.path().join(sub)).unwrap().collect();
            assert!(left.is_empty(), "{sub}: {left:?}");
        }
        assert!(store.snapshots.path("sha256-live").join("f").exists());
        // Reopening cleans too and keeps committed data.
        Store::open(root.path()).unwrap();
        assert!(store.snapshots.exists("sha256-live"));
    }
}
