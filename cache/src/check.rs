//! Store hygiene: removing what dead processes left under `tmp/`,
//! scratch directories that are cleaned up even after a crash, and
//! [`check`], the whole-store consistency check behind `kiln check`.
//!
//! Everything under `tmp/` that is in use is guarded by a `flock` held by
//! its owner (ingest files, prepared snapshots, scratch dirs). A lock that
//! can be taken means its owner is gone, so the leftover can go too — which
//! makes [`clean_tmp`] safe to run while other kiln processes work on the
//! same root. [`crate::Store::open`] runs it every time.
//!
//! Secrets for `RUN --mount=type=secret` live outside the store (on tmpfs,
//! `/dev/shm`, so they never touch a disk): [`ScratchDir::for_secret`]
//! names them `kiln-secret-<owner pid>-...` with a lock beside them, and
//! [`clean_tmp`] removes those whose owner is dead — a SIGKILL mid-RUN
//! leaves no secret behind past the next kiln start.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

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
    /// Secret directories of dead processes (in `/dev/shm` or tmp).
    pub secrets: usize,
}

/// Remove the leftovers of dead processes under `tmp/` of `store`.
pub fn clean_tmp(store: &Store) -> anyhow::Result<CleanReport> {
    Ok(CleanReport {
        ingests: store.content.remove_stale_ingests()?,
        snapshots: store.snapshots.remove_stale()?,
        scratch: remove_stale_scratch(&scratch_root(store.root()), "")?,
        secrets: secret_bases().iter().map(|b| remove_stale_scratch(b, SECRET_PREFIX)).sum::<anyhow::Result<usize>>()?,
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
        Self::create_in(&base, "d-", 0o755)
    }

    /// A private (0700) directory for secrets, on tmpfs when `/dev/shm` is
    /// there, else in the system temp dir; never under a store root. Its
    /// name carries the owner's pid (`kiln-secret-<pid>-...`).
    pub fn for_secret() -> anyhow::Result<ScratchDir> {
        let base = secret_bases().into_iter().next().expect("the temp dir is always a base");
        Self::create_in(&base, SECRET_PREFIX, 0o700)
    }

    fn create_in(base: &Path, prefix: &str, mode: u32) -> anyhow::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = base.join(unique_name(prefix));
        // Locked before it exists, so a sweep never sees it unlocked. A
        // sweep may take and remove the fresh lock file between our open
        // and our flock: then lock the file that is there now.
        let lock_path = base.join(format!("{}.lock", file_name(&path)));
        let lock = loop {
            let lock = FileLock::exclusive(&lock_path)?;
            if crate::lock::still_named(&lock)? {
                break lock;
            }
        };
        std::fs::DirBuilder::new().mode(mode).create(&path)?;
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

/// Name prefix of secret directories (followed by the owner's pid).
pub const SECRET_PREFIX: &str = "kiln-secret-";

/// Where secret directories may be: `/dev/shm` first (tmpfs), then the
/// system temp dir.
fn secret_bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    if Path::new("/dev/shm").is_dir() {
        bases.push(PathBuf::from("/dev/shm"));
    }
    bases.push(std::env::temp_dir());
    bases
}

/// Whether the process whose pid starts `name` (after `prefix`) may still
/// run. Names without a pid count as dead.
fn owner_alive(name: &str, prefix: &str) -> bool {
    let pid = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<i32>().ok());
    match pid {
        // SAFETY: kill with signal 0 only checks that the process exists.
        Some(pid) if pid > 0 => unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM },
        _ => false,
    }
}

/// Remove the entries of `base` starting with `prefix` whose lock
/// (`<name>.lock`) nobody holds — and, with a prefix (a shared directory
/// like `/dev/shm`, where older kiln versions left unlocked dirs), whose
/// owner pid is gone too.
fn remove_stale_scratch(base: &Path, prefix: &str) -> anyhow::Result<usize> {
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        let name = file_name(&path);
        if !name.starts_with(prefix) || (!prefix.is_empty() && owner_alive(&name, prefix)) {
            continue;
        }
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

/// The store-wide lock (under `locks/`) that solves hold shared and
/// garbage collection holds exclusively; `kiln check --repair` only removes
/// cache records and snapshots while it can hold it exclusively.
pub const BUILD_LOCK_FILE: &str = "build-cache.lock";

/// One inconsistency [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A blob's bytes do not hash to its name.
    CorruptBlob {
        /// The blob's name (`sha256:...`).
        digest: String,
        /// What its bytes hash to, or why they could not be read.
        actual: String,
    },
    /// An image name whose manifest, config or layer blob is missing,
    /// corrupt or unusable.
    BrokenImage {
        /// The image name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A cache record naming a snapshot that is missing or broken, or a
    /// record that is not JSON.
    BrokenRecord {
        /// The cache key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot whose files no longer tar to the diff ID recorded when
    /// its layer was made (found by a deep check).
    CorruptSnapshot {
        /// The snapshot id.
        id: String,
        /// The recorded diff ID.
        expected: String,
        /// What the files hash to now, or why they could not be read.
        actual: String,
    },
    /// A committed snapshot without `fs/` or with unparseable `meta.json`.
    BrokenSnapshot {
        /// The snapshot id.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::CorruptBlob { digest, actual } => write!(f, "blob {digest}: content hashes to {actual}"),
            Problem::BrokenImage { name, reason } => write!(f, "image {name}: {reason}"),
            Problem::BrokenRecord { key, reason } => write!(f, "cache record {key}: {reason}"),
            Problem::BrokenSnapshot { id, reason } => write!(f, "snapshot {id}: {reason}"),
            Problem::CorruptSnapshot { id, expected, actual } => {
                write!(f, "snapshot {id}: its files hash to {actual}, not to its diff ID {expected}")
            }
        }
    }
}

/// What [`check`] looked at, found and (with `repair`) fixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Leftovers of dead processes removed first (always, repair or not).
    pub cleaned: CleanReport,
    /// Blobs hashed.
    pub blobs: usize,
    /// Image names checked.
    pub images: usize,
    /// Cache records checked.
    pub records: usize,
    /// Committed snapshots checked.
    pub snapshots: usize,
    /// Snapshots whose contents a deep check re-hashed.
    pub snapshots_hashed: usize,
    /// Snapshots a deep check could not re-hash: no diff ID recorded yet
    /// (never exported), or unpacked from a pulled layer (whose diff ID is
    /// of the registry's tar, not of kiln's).
    pub snapshots_unverifiable: usize,
    /// Every inconsistency found.
    pub problems: Vec<Problem>,
    /// The problems that repair removed (a subset of `problems`).
    pub repaired: Vec<Problem>,
    /// Set when repair skipped records/snapshots because a build or a
    /// prune held the build lock, or a live lease may use them.
    pub busy: bool,
}

impl CheckReport {
    /// No problem is left: none was found, or repair removed them all.
    pub fn consistent(&self) -> bool {
        self.problems.len() == self.repaired.len()
    }
}

/// Verify the whole store: every blob against its digest, every image name
/// against the manifest, config and layer blobs it needs, every snapshot's
/// `fs/` and `meta.json`, every cache record against the snapshots it
/// names. Leftovers of dead processes under `tmp/` are removed first.
///
/// With `repair`, broken image names and cache records, broken snapshots and
/// corrupt blobs are removed. Records and snapshots are only touched while
/// the build lock can be held exclusively (no build or prune running);
/// image names are removed under the image index lock; what a live writer
/// holds lives under `tmp/` and is never touched.
pub fn check(store: &Store, repair: bool) -> anyhow::Result<CheckReport> {
    check_with(store, &CheckOptions { repair, diff_id: None })
}

/// Computes the diff ID of a snapshot's `fs/` directory: the sha256 of the
/// layer tar the exporter writes for it.
pub type DiffIdFn<'a> = &'a (dyn Fn(&Path) -> anyhow::Result<String> + Sync);

/// How [`check_with`] checks.
#[derive(Clone, Copy, Default)]
pub struct CheckOptions<'a> {
    /// Remove what is broken (see [`check`]).
    pub repair: bool,
    /// Deep check: re-hash every snapshot that has a diff ID recorded by
    /// the exporter with this function (the exporter's own layer writer,
    /// so the hash is the same tar stream) and report those that differ.
    pub diff_id: Option<DiffIdFn<'a>>,
}

/// [`check`], optionally deep (see [`CheckOptions`]). A corrupt snapshot
/// is repaired by removing it and every cache record naming it, so the
/// next build computes it again; one a live lease may be using is left
/// alone (and `busy` set).
pub fn check_with(store: &Store, options: &CheckOptions) -> anyhow::Result<CheckReport> {
    let repair = options.repair;
    let mut report = CheckReport { cleaned: clean_tmp(store)?, ..Default::default() };
    let build_lock = if repair {
        let lock = FileLock::try_exclusive(&store.root().join("locks").join(BUILD_LOCK_FILE))?;
        report.busy = lock.is_none();
        lock
    } else {
        None
    };
    // Snapshots used since this moment may be in a running build's hands.
    let held_since = crate::lease::held_since(store)?;

    // Blobs.
    let mut bad_blobs = HashSet::new();
    for blob in store.content.list()? {
        report.blobs += 1;
        let actual = match hash_file(&store.content.blob_path(&blob.digest)) {
            Ok(actual) if actual == blob.digest => continue,
            Ok(actual) => actual,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
            Err(e) => format!("(unreadable: {e})"),
        };
        let problem = Problem::CorruptBlob { digest: blob.digest.clone(), actual };
        if repair && store.content.delete(&blob.digest).is_ok() {
            report.repaired.push(problem.clone());
        }
        report.problems.push(problem);
        bad_blobs.insert(blob.digest);
    }

    // Images.
    for image in store.images.list()? {
        report.images += 1;
        let Err(reason) = check_image(store, &image.target.digest, &bad_blobs) else { continue };
        let problem = Problem::BrokenImage { name: image.name.clone(), reason };
        if repair && store.images.remove(&image.name).is_ok() {
            report.repaired.push(problem.clone());
        }
        report.problems.push(problem);
    }

    // Snapshots.
    let mut bad_snapshots = HashSet::new();
    for id in store.snapshots.list()? {
        report.snapshots += 1;
        let problem = if !store.snapshots.exists(&id) {
            Problem::BrokenSnapshot { id: id.clone(), reason: "no fs/ directory (or an invalid id)".to_string() }
        } else {
            match store.snapshots.meta(&id) {
                Err(e) => Problem::BrokenSnapshot { id: id.clone(), reason: format!("metadata unreadable: {e:#}") },
                Ok(meta) => match (options.diff_id, meta.diff_id) {
                    (Some(hash), Some(expected)) if !unpacked_from_pull(&id, &expected) => {
                        report.snapshots_hashed += 1;
                        let actual = match hash(&store.snapshots.path(&id)) {
                            Ok(actual) if actual == expected => continue,
                            Ok(actual) => actual,
                            Err(e) => format!("(unreadable: {e:#})"),
                        };
                        Problem::CorruptSnapshot { id: id.clone(), expected, actual }
                    }
                    (Some(_), _) => {
                        report.snapshots_unverifiable += 1;
                        continue;
                    }
                    (None, _) => continue,
                },
            }
        };
        let in_use = held_since.is_some_and(|since| {
            crate::lease::last_used(&store.root().join("snapshots").join(&id)).is_none_or(|t| t >= since)
        });
        report.busy |= repair && in_use;
        if build_lock.is_some() && !in_use && store.snapshots.remove(&id).is_ok() {
            report.repaired.push(problem.clone());
        }
        report.problems.push(problem);
        bad_snapshots.insert(id);
    }

    // Cache records: opaque JSON; those naming `layers` must have them all.
    for key in store.index.keys()? {
        report.records += 1;
        let Some(bytes) = store.index.get(&key)? else { continue };
        let reason = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Err(e) => format!("not JSON: {e}"),
            Ok(record) => match record_layers(&record) {
                Err(reason) => reason,
                Ok(layers) => match layers
                    .iter()
                    .find(|id| bad_snapshots.contains(*id) || !store.snapshots.exists(id))
                {
                    None => continue,
                    Some(id) => format!("snapshot {id} is missing or broken"),
                },
            },
        };
        let problem = Problem::BrokenRecord { key: key.clone(), reason };
        if build_lock.is_some() && store.index.remove(&key).is_ok() {
            report.repaired.push(problem.clone());
        }
        report.problems.push(problem);
    }
    Ok(report)
}

/// Whether snapshot `id` was unpacked from a pulled layer: such ids are
/// `sha256-<hex of the diff ID>` (see the engine's unpacking).
fn unpacked_from_pull(id: &str, diff_id: &str) -> bool {
    diff_id.strip_prefix("sha256:").is_some_and(|hex| id.strip_prefix("sha256-") == Some(hex))
}

/// The snapshot ids a record's `layers` names (none if it has no `layers`).
fn record_layers(record: &serde_json::Value) -> Result<Vec<String>, String> {
    let Some(layers) = record.get("layers") else { return Ok(Vec::new()) };
    let layers = layers.as_array().ok_or("`layers` is not a list")?;
    layers.iter().map(|l| l.as_str().map(str::to_string).ok_or_else(|| "a layer id is not a string".to_string())).collect()
}

/// Why the image whose manifest is `manifest_digest` is unusable, if it is.
fn check_image(store: &Store, manifest_digest: &str, bad_blobs: &HashSet<String>) -> Result<(), String> {
    let need = |digest: &str, role: &str| -> Result<(), String> {
        if bad_blobs.contains(digest) {
            return Err(format!("{role} blob {digest} is corrupt"));
        }
        if !store.content.exists(digest) {
            return Err(format!("{role} blob {digest} is missing"));
        }
        Ok(())
    };
    need(manifest_digest, "manifest")?;
    let bytes = store.content.read(manifest_digest).map_err(|e| format!("manifest: {e}"))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("manifest {manifest_digest} is not JSON: {e}"))?;
    let digest_of = |d: &serde_json::Value| d.get("digest").and_then(|d| d.as_str()).map(str::to_string);
    let config = manifest.get("config").and_then(digest_of).ok_or("manifest names no config")?;
    need(&config, "config")?;
    for layer in manifest.get("layers").and_then(|l| l.as_array()).into_iter().flatten() {
        let digest = digest_of(layer).ok_or("a layer descriptor has no digest")?;
        need(&digest, "layer")?;
    }
    Ok(())
}

/// `sha256:<hex>` of a file's bytes, streamed.
fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep running while scratch dirs are created never removes one
    /// that is held, even when it takes a fresh lock file between the
    /// creator's open and flock.
    #[test]
    fn sweeps_racing_with_creation_spare_held_scratch_dirs() {
        let root = tempfile::tempdir().unwrap();
        let base = scratch_root(root.path());
        std::fs::create_dir_all(&base).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (base, stop) = (base.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    remove_stale_scratch(&base, "").unwrap();
                }
            })
        };
        let mut lost = 0;
        for _ in 0..3000 {
            let dir = ScratchDir::new(root.path()).unwrap();
            // Give the sweeper a chance at it while it is held.
            std::thread::yield_now();
            remove_stale_scratch(&base, "").unwrap();
            if !dir.path().is_dir() {
                lost += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sweeper.join().unwrap();
        assert_eq!(lost, 0, "held scratch dirs removed by a sweep");
    }

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
        assert_eq!(report, CleanReport { ingests: 1, snapshots: 1, scratch: 1, secrets: report.secrets });
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

#[cfg(test)]
mod check_tests {
    use super::*;
    use crate::images::Descriptor;

    /// A store with one image (manifest, config, one layer blob), one
    /// snapshot and one cache record naming it.
    fn healthy() -> (tempfile::TempDir, Store, String) {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let layer = store.content.put_bytes(b"layer bytes", None).unwrap();
        let config = store.content.put_bytes(br#"{"created":"2024-01-01T00:00:00Z"}"#, None).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{config}","size":1}},"layers":[{{"digest":"{layer}","size":11}}]}}"#
        );
        let manifest_digest = store.content.put_bytes(manifest.as_bytes(), None).unwrap();
        let target = Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: manifest_digest,
            size: manifest.len() as u64,
        };
        store.images.put("example/app:1", &target).unwrap();
        let snap = store.snapshots.prepare().unwrap();
        std::fs::write(snap.fs().join("f"), b"x").unwrap();
        store.snapshots.commit(snap, "sha256-s1", &Default::default()).unwrap();
        let key = format!("sha256:{}", "ab".repeat(32));
        store.index.put(&key, br#"{"layers":["sha256-s1"]}"#).unwrap();
        (root, store, layer)
    }

    #[test]
    fn healthy_store_is_consistent() {
        let (_root, store, _) = healthy();
        let report = check(&store, false).unwrap();
        assert!(report.consistent(), "{:?}", report.problems);
        assert_eq!((report.blobs, report.images, report.snapshots, report.records), (3, 1, 1, 1));
    }

    #[test]
    fn flipped_byte_in_a_blob_breaks_it_and_its_image() {
        let (_root, store, layer) = healthy();
        let path = store.content.blob_path(&layer);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();

        let report = check(&store, false).unwrap();
        assert!(!report.consistent());
        assert!(matches!(&report.problems[0], Problem::CorruptBlob { digest, .. } if *digest == layer));
        assert!(report.problems.iter().any(|p| matches!(p, Problem::BrokenImage { reason, .. } if reason.contains("corrupt"))));
        assert!(path.exists(), "a check without repair changes nothing");

        let repaired = check(&store, true).unwrap();
        assert!(repaired.consistent() && repaired.repaired.len() == 2, "{repaired:?}");
        assert!(!path.exists());
        assert!(store.images.list().unwrap().is_empty());
        assert!(check(&store, false).unwrap().problems.is_empty());
    }

    #[test]
    fn record_naming_a_missing_snapshot_is_broken() {
        let (_root, store, _) = healthy();
        std::fs::remove_dir_all(store.root().join("snapshots/sha256-s1")).unwrap();
        let report = check(&store, false).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(matches!(&report.problems[0], Problem::BrokenRecord { reason, .. } if reason.contains("sha256-s1")));
        check(&store, true).unwrap();
        assert!(store.index.keys().unwrap().is_empty());
        assert!(check(&store, false).unwrap().consistent());
    }

    #[test]
    fn dangling_image_name_is_broken() {
        let (_root, store, _) = healthy();
        let manifest = store.images.get("example/app:1").unwrap().unwrap().target.digest;
        store.content.delete(&manifest).unwrap();
        let report = check(&store, false).unwrap();
        assert!(
            matches!(&report.problems[..], [Problem::BrokenImage { name, reason }] if name.contains("example/app") && reason.contains("missing")),
            "{:?}",
            report.problems
        );
        assert!(check(&store, true).unwrap().consistent());
        assert!(store.images.list().unwrap().is_empty());
    }

    #[test]
    fn unparseable_snapshot_meta_and_record() {
        let (_root, store, _) = healthy();
        std::fs::write(store.root().join("snapshots/sha256-s1/meta.json"), b"{not json").unwrap();
        std::fs::write(store.root().join("cache").join(format!("{}.json", "cd".repeat(32))), b"garbage").unwrap();
        let report = check(&store, false).unwrap();
        assert_eq!(report.problems.len(), 3, "{:?}", report.problems);
        assert!(report.problems.iter().any(|p| matches!(p, Problem::BrokenSnapshot { .. })));
        assert!(report.problems.iter().any(|p| matches!(p, Problem::BrokenRecord { reason, .. } if reason.contains("not JSON"))));
        assert!(check(&store, true).unwrap().consistent());
        assert!(check(&store, false).unwrap().problems.is_empty());
    }

    #[test]
    fn repair_leaves_records_alone_while_a_build_holds_the_lock() {
        let (_root, store, _) = healthy();
        std::fs::remove_dir_all(store.root().join("snapshots/sha256-s1")).unwrap();
        let build = FileLock::shared(&store.root().join("locks").join(BUILD_LOCK_FILE)).unwrap();
        let report = check(&store, true).unwrap();
        assert!(report.busy && !report.consistent());
        assert_eq!(store.index.keys().unwrap().len(), 1);
        drop(build);
        assert!(check(&store, true).unwrap().consistent());
    }

    #[test]
    fn dead_leftovers_are_cleaned_first() {
        let (_root, store, _) = healthy();
        std::fs::write(store.root().join("tmp/ingest/w-dead"), b"partial").unwrap();
        let report = check(&store, false).unwrap();
        assert_eq!(report.cleaned.ingests, 1);
        assert!(report.consistent());
    }
}

#[cfg(test)]
mod deep_and_secret_tests {
    use super::*;

    /// A stand-in for the exporter's tar hash: sha256 over sorted names
    /// and contents (the engine's tests use the real one).
    fn toy_diff_id(dir: &Path) -> anyhow::Result<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        names.sort();
        let mut hasher = Sha256::new();
        for path in names {
            hasher.update(path.file_name().unwrap().as_encoded_bytes());
            hasher.update(std::fs::read(&path)?);
        }
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    #[test]
    fn deep_check_finds_and_repairs_a_changed_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let snap = store.snapshots.prepare().unwrap();
        std::fs::write(snap.fs().join("f"), b"built").unwrap();
        let diff_id = toy_diff_id(&snap.fs()).unwrap();
        let meta = crate::snapshots::SnapshotMeta { diff_id: Some(diff_id.clone()), ..Default::default() };
        store.snapshots.commit(snap, "built1", &meta).unwrap();
        // A pulled layer's snapshot: its diff ID is of another tar.
        let pulled = store.snapshots.prepare().unwrap();
        let hex = "ef".repeat(32);
        let meta = crate::snapshots::SnapshotMeta { diff_id: Some(format!("sha256:{hex}")), ..Default::default() };
        store.snapshots.commit(pulled, &format!("sha256-{hex}"), &meta).unwrap();
        let key = format!("sha256:{}", "ab".repeat(32));
        store.index.put(&key, br#"{"layers":["built1"]}"#).unwrap();

        let deep = CheckOptions { repair: false, diff_id: Some(&toy_diff_id) };
        let report = check_with(&store, &deep).unwrap();
        assert!(report.consistent(), "{:?}", report.problems);
        assert_eq!((report.snapshots_hashed, report.snapshots_unverifiable), (1, 1));

        std::fs::write(store.snapshots.path("built1").join("f"), b"tampered").unwrap();
        assert!(check(&store, false).unwrap().consistent(), "a shallow check does not hash");
        let report = check_with(&store, &deep).unwrap();
        assert!(
            matches!(&report.problems[..], [Problem::CorruptSnapshot { id, expected, .. }, Problem::BrokenRecord { .. }]
                if id == "built1" && *expected == diff_id),
            "{:?}",
            report.problems
        );
        let repaired = check_with(&store, &CheckOptions { repair: true, ..deep }).unwrap();
        assert!(repaired.consistent() && repaired.repaired.len() == 2, "{repaired:?}");
        assert!(!store.snapshots.exists("built1") && store.index.keys().unwrap().is_empty());
    }

    #[test]
    fn repair_keeps_a_corrupt_snapshot_a_live_lease_may_use() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let lease = crate::lease::Lease::new(&store, "build").unwrap();
        let snap = store.snapshots.prepare().unwrap();
        let meta = crate::snapshots::SnapshotMeta { diff_id: Some(format!("sha256:{}", "00".repeat(32))), ..Default::default() };
        store.snapshots.commit(snap, "busy1", &meta).unwrap();
        let deep = CheckOptions { repair: true, diff_id: Some(&toy_diff_id) };
        let report = check_with(&store, &deep).unwrap();
        assert!(report.busy && !report.consistent(), "{report:?}");
        assert!(store.snapshots.exists("busy1"));
        drop(lease);
        assert!(check_with(&store, &deep).unwrap().consistent());
        assert!(!store.snapshots.exists("busy1"));
    }

    #[test]
    fn secret_dirs_of_dead_owners_are_swept_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let live = ScratchDir::for_secret().unwrap();
        std::fs::write(live.path().join("secret"), b"s3cret").unwrap();
        let base = live.path().parent().unwrap().to_path_buf();
        // Left by a SIGKILLed owner: a dead pid (beyond pid_max), no lock
        // held; and an old-style dir without a lock file at all.
        let dead = base.join(format!("{SECRET_PREFIX}999999999-1-1"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("secret"), b"s3cret").unwrap();
        std::fs::write(base.join(format!("{SECRET_PREFIX}999999999-1-1.lock")), b"").unwrap();
        let old_style = base.join(format!("{SECRET_PREFIX}999999998-1-1"));
        std::fs::create_dir(&old_style).unwrap();

        // (Another test's store open may sweep them first.)
        let report = clean_tmp(&store).unwrap();
        assert!(report.secrets <= 2, "{report:?}");
        assert!(!dead.exists() && !old_style.exists());
        assert!(!base.join(format!("{SECRET_PREFIX}999999999-1-1.lock")).exists());
        assert!(live.path().join("secret").exists(), "a live owner's secret stays");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(live.path()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
    }
}
