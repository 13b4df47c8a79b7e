//! Leases: what running builds and containers use is never collected.
//!
//! A [`Lease`] is a file under `<root>/leases/` that its owner keeps
//! `flock`ed for as long as it works; the kernel drops the lock when the
//! owner exits or is SIGKILLed, so a dead process's lease dies with it.
//! A lease records when it started, and it holds **everything used since
//! then**: every snapshot, blob or cache-mount directory whose mtime is at
//! or after the start of the oldest live lease ([`held_since`]). Owners
//! make that true for what they reuse by [`mark_used`]-ing it (which also
//! gives garbage collection its least-recently-used order); what they
//! create is new anyway.
//!
//! The race between "a build finds snapshot X in the cache" and "GC
//! deletes X" is closed by the GC lock (`locks/build-cache.lock`): GC holds
//! it exclusively while it decides and deletes, and users hold it shared
//! ([`gc_guard`]) while they check that X exists and mark it used.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::Store;
use crate::fsutil::unique_name;
use crate::lock::FileLock;

/// Name of the GC lock under `<root>/locks/`: exclusive while garbage is
/// collected, shared while leases mark what they use.
pub const GC_LOCK_FILE: &str = "build-cache.lock";

/// Timestamps of files come from a coarser clock than `SystemTime::now`;
/// a lease counts as started this much earlier so nothing slips between.
const CLOCK_SLACK: Duration = Duration::from_secs(2);

/// How old an unrenamed lease file must be before it counts as abandoned.
const HIDDEN_GRACE: Duration = Duration::from_secs(60);

/// What a lease file says about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Process id of the owner (for people reading the file).
    pub pid: u32,
    /// What the owner does, e.g. `build` or `run`.
    pub purpose: String,
    /// When the lease started, Unix nanoseconds.
    pub started_ns: u128,
}

/// A held lease; released (file removed) on drop or by the owner's death.
#[derive(Debug)]
pub struct Lease {
    lock: Option<FileLock>,
    info: LeaseInfo,
}

impl Lease {
    /// Start a lease on `store` for `purpose`.
    pub fn new(store: &Store, purpose: &str) -> anyhow::Result<Lease> {
        let dir = leases_dir(store.root());
        std::fs::create_dir_all(&dir)?;
        let info = LeaseInfo { pid: std::process::id(), purpose: purpose.to_string(), started_ns: unix_ns(SystemTime::now()) };
        // Written and locked under a hidden name, then renamed into place:
        // GC only ever sees lease files that are already locked.
        let name = unique_name("lease-");
        let hidden = dir.join(format!(".{name}"));
        let lock = FileLock::exclusive(&hidden)?;
        std::fs::write(&hidden, serde_json::to_vec(&info)?)?;
        let path = dir.join(format!("{name}.json"));
        std::fs::rename(&hidden, &path)?;
        let lock = FileLock::relabel(lock, &path);
        Ok(Lease { lock: Some(lock), info })
    }

    /// What this lease says about itself.
    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock.path());
        }
    }
}

/// The start of the oldest live lease (minus clock slack): everything with
/// an mtime at or after it may be in use. `None` when no lease is live.
/// Lease files of dead owners are removed on the way.
pub fn held_since(store: &Store) -> anyhow::Result<Option<SystemTime>> {
    Ok(live_leases(store)?.iter().map(|l| l.started_ns).min().map(|ns| {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64) - CLOCK_SLACK
    }))
}

/// Every live lease; removes the files of dead ones.
pub fn live_leases(store: &Store) -> anyhow::Result<Vec<LeaseInfo>> {
    let dir = leases_dir(store.root());
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut live = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            // Being created, or left by an owner that died before the
            // rename: only old unlocked ones go (a new one may not be
            // locked yet).
            let old = last_used(&path).and_then(|t| t.elapsed().ok()).is_some_and(|age| age > HIDDEN_GRACE);
            if old && let Some(_dead) = FileLock::try_exclusive(&path)? {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        match FileLock::try_exclusive(&path)? {
            Some(_dead) => {
                let _ = std::fs::remove_file(&path);
            }
            None => {
                let info = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<LeaseInfo>(&b).ok());
                // Unreadable but locked: treat as started now, the safe side.
                live.push(info.unwrap_or(LeaseInfo {
                    pid: 0,
                    purpose: "unknown".into(),
                    started_ns: unix_ns(SystemTime::now()),
                }));
            }
        }
    }
    Ok(live)
}

/// Hold the GC lock shared: no collection runs until the guard drops.
/// Take it around "does X exist? then mark it used".
pub fn gc_guard(store: &Store) -> std::io::Result<FileLock> {
    FileLock::shared(&gc_lock_path(store.root()))
}

/// Hold the GC lock exclusively (what a collection does).
pub fn gc_exclusive(store: &Store) -> std::io::Result<FileLock> {
    FileLock::exclusive(&gc_lock_path(store.root()))
}

/// Path of the GC lock file.
pub fn gc_lock_path(root: &Path) -> PathBuf {
    root.join("locks").join(GC_LOCK_FILE)
}

/// Mark `path` (a snapshot's directory, a cache-mount directory) used now,
/// by setting its mtime: live leases then hold it, and GC evicts least
/// recently used things first. Call it under [`gc_guard`].
pub fn mark_used(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.set_modified(SystemTime::now())
}

/// When `path` was last used (its mtime).
pub fn last_used(path: &Path) -> Option<SystemTime> {
    std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok()
}

/// Snapshot ids: check under the GC lock that all exist and mark them used.
/// `false` if one is gone (the caller recomputes or re-unpacks).
pub fn use_snapshots(store: &Store, ids: &[String]) -> anyhow::Result<bool> {
    let _guard = gc_guard(store)?;
    for id in ids {
        if !store.snapshots.exists(id) {
            return Ok(false);
        }
        let dir = store.snapshots.path(id);
        // `snapshots/<id>/`, the directory GC looks at.
        mark_used(dir.parent().unwrap_or(&dir))?;
    }
    Ok(true)
}

fn leases_dir(root: &Path) -> PathBuf {
    root.join("leases")
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_what_is_used_after_it_started_until_dropped() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        assert_eq!(held_since(&store).unwrap(), None);
        let lease = Lease::new(&store, "build").unwrap();
        let since = held_since(&store).unwrap().expect("one live lease");
        assert!(since <= SystemTime::now());
        assert_eq!(live_leases(&store).unwrap(), vec![lease.info().clone()]);
        drop(lease);
        assert_eq!(held_since(&store).unwrap(), None);
        assert_eq!(std::fs::read_dir(root.path().join("leases")).unwrap().count(), 0);
    }

    #[test]
    fn a_dead_owners_lease_file_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        // What a SIGKILLed owner leaves: the file, no lock.
        let info = LeaseInfo { pid: 1, purpose: "build".into(), started_ns: 0 };
        std::fs::create_dir_all(root.path().join("leases")).unwrap();
        std::fs::write(root.path().join("leases/lease-dead.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        let half = root.path().join("leases/.lease-half");
        std::fs::write(&half, b"").unwrap();
        assert_eq!(held_since(&store).unwrap(), None);
        assert!(half.exists(), "a fresh unrenamed lease may be in the making");
        std::fs::File::open(&half).unwrap().set_modified(SystemTime::now() - 2 * HIDDEN_GRACE).unwrap();
        held_since(&store).unwrap();
        assert_eq!(std::fs::read_dir(root.path().join("leases")).unwrap().count(), 0);
    }

    #[test]
    fn use_snapshots_marks_them_and_sees_missing_ones() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let active = store.snapshots.prepare().unwrap();
        store.snapshots.commit(active, "s1", &Default::default()).unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        std::fs::File::open(root.path().join("snapshots/s1")).unwrap().set_modified(old).unwrap();
        assert!(use_snapshots(&store, &["s1".into()]).unwrap());
        assert!(last_used(&root.path().join("snapshots/s1")).unwrap() > old);
        assert!(!use_snapshots(&store, &["s1".into(), "gone".into()]).unwrap());
    }
}
