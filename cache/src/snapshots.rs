//! Layer directories usable as overlayfs lowerdirs.
//!
//! Lifecycle, as containerd's snapshotter: [`Snapshotter::prepare`] gives an
//! [`ActiveSnapshot`] — an empty `fs/` to write into (an overlay upperdir or
//! an unpack target); an upperdir asks for a `work/` dir beside it on the
//! same filesystem ([`ActiveSnapshot::make_work_dir`]).
//! [`Snapshotter::commit`] records the bytes of `fs/` in `meta.json`,
//! renames it to `snapshots/<id>/` and from then on it is immutable. If
//! another process committed the same id first, ours is discarded and
//! theirs kept (same id means same content). Prepared but
//! uncommitted snapshots live under `tmp/` and are removed at the next open
//! that holds no lock on them (see the store's `check`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{sync_dir, unique_name, write_atomic};
use crate::lock::FileLock;

/// Snapshots under `snapshots/` of the store root.
pub struct Snapshotter {
    dir: PathBuf,
    tmp: PathBuf,
}

/// A snapshot being written: mutable until committed. It holds a lock on
/// `<dir>.lock` so [`Snapshotter::remove_stale`] never takes a live one.
#[derive(Debug)]
pub struct ActiveSnapshot {
    dir: PathBuf,
    lock: Option<FileLock>,
}

impl ActiveSnapshot {
    /// The directory to write the layer's files into.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// Create and return an empty overlayfs work directory on the same
    /// filesystem as `fs()`. Only an overlay upperdir needs one, so
    /// [`Snapshotter::prepare`] does not make it: a COPY or an unpack
    /// creates (and commit deletes) one directory less.
    pub fn make_work_dir(&self) -> std::io::Result<PathBuf> {
        let work = self.dir.join("work");
        std::fs::create_dir(&work)?;
        Ok(work)
    }
}

/// What the store knows of a committed layer besides its files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// `sha256:` of the uncompressed layer tar, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
    /// Compressed blobs already made from this layer, so it is never
    /// re-tarred: one per compression.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<BlobRecord>,
    /// When the snapshot was first committed (Unix seconds). A build whose
    /// steps all come from the cache gets the same layers and so the same
    /// creation time, hence the same image ID, as BuildKit's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// Apparent bytes of the snapshot's `fs/` (as `du -sb`), measured at
    /// commit: the layer never changes after, so the disk cap counts this
    /// instead of walking it again ([`crate::usage::root_usage_recorded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_bytes: Option<u64>,
}

/// A blob in the content store made from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Layer media type, e.g. `application/vnd.oci.image.layer.v1.tar+zstd`.
    pub media_type: String,
    /// `sha256:...` of the blob.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl Snapshotter {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("snapshots");
        let tmp = root.join("tmp").join("snapshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&tmp)?;
        Ok(Snapshotter { dir, tmp })
    }

    /// Start a new snapshot with an empty `fs/` directory.
    pub fn prepare(&self) -> anyhow::Result<ActiveSnapshot> {
        let dir = self.tmp.join(unique_name("s-"));
        // Lock before the directory exists, so cleanup never sees it unlocked.
        let lock = FileLock::exclusive(&lock_path(&dir))?;
        // `tmp/snapshots/` is made by open; made again only if it went away.
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(&dir)?,
            other => other?,
        }
        std::fs::create_dir(dir.join("fs"))?;
        Ok(ActiveSnapshot { dir, lock: Some(lock) })
    }

    /// Remove uncommitted snapshots (and half-deleted ones) left under
    /// `tmp/snapshots/` by processes that died; live ones are locked and
    /// skipped. Returns how many were removed.
    pub fn remove_stale(&self) -> anyhow::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.tmp)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "lock") {
                // A lock whose directory is gone (its owner died in between).
                if !path.with_extension("").exists()
                    && let Some(_lock) = FileLock::try_exclusive(&path)?
                {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let lock_file = lock_path(&path);
            if let Some(_lock) = FileLock::try_exclusive(&lock_file)? {
                if path.exists() {
                    std::fs::remove_dir_all(&path)?;
                    removed += 1;
                }
                let _ = std::fs::remove_file(&lock_file);
            }
        }
        Ok(removed)
    }

    /// Make `active` the immutable snapshot `id`. The overlay work dir is
    /// dropped. If `id` already exists, `active` is discarded.
    pub fn commit(&self, active: ActiveSnapshot, id: &str, meta: &SnapshotMeta) -> anyhow::Result<()> {
        check_id(id)?;
        // The overlay work dir, if one was made (only an upperdir has one).
        let _ = std::fs::remove_dir_all(active.dir.join("work"));
        let mut meta = meta.clone();
        meta.created.get_or_insert_with(unix_now);
        // Measured here, where the files were just written (cache-hot) and
        // can no longer change.
        meta.fs_bytes = Some(crate::usage::apparent_size(&active.fs()));
        write_atomic(&active.dir.join("meta.json"), &serde_json::to_vec(&meta)?)?;
        let final_dir = self.dir.join(id);
        if final_dir.exists() {
            self.abort(active);
            return Ok(());
        }
        match std::fs::rename(&active.dir, &final_dir) {
            Ok(()) => {
                release(active);
                sync_dir(&self.dir).map_err(Into::into)
            }
            Err(_) if final_dir.exists() => {
                self.abort(active);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Throw away an uncommitted snapshot.
    pub fn abort(&self, active: ActiveSnapshot) {
        let _ = std::fs::remove_dir_all(&active.dir);
        release(active);
    }

    /// Whether snapshot `id` is committed.
    pub fn exists(&self, id: &str) -> bool {
        check_id(id).is_ok() && self.dir.join(id).join("fs").is_dir()
    }

    /// Directory holding the files of committed snapshot `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join("fs")
    }

    /// Metadata of snapshot `id`.
    pub fn meta(&self, id: &str) -> anyhow::Result<SnapshotMeta> {
        check_id(id)?;
        let bytes = std::fs::read(self.dir.join(id).join("meta.json"))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Replace the metadata of snapshot `id` (e.g. to record a new blob).
    pub fn set_meta(&self, id: &str, meta: &SnapshotMeta) -> anyhow::Result<()> {
        check_id(id)?;
        write_atomic(&self.dir.join(id).join("meta.json"), &serde_json::to_vec(meta)?)?;
        Ok(())
    }

    /// Ids of all committed snapshots.
    pub fn list(&self) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            ids.push(entry?.file_name().to_string_lossy().into_owned());
        }
        ids.sort();
        Ok(ids)
    }

    /// Delete snapshot `id`: renamed into `tmp/` first so a crash never
    /// leaves a half-deleted snapshot under its id.
    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        check_id(id)?;
        let doomed = self.tmp.join(unique_name("rm-"));
        let lock = FileLock::exclusive(&lock_path(&doomed))?;
        std::fs::rename(self.dir.join(id), &doomed)?;
        std::fs::remove_dir_all(&doomed)?;
        let _ = std::fs::remove_file(lock.path());
        Ok(())
    }
}

/// `<dir>.lock`, the lock guarding a directory under `tmp/snapshots/`.
fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Forget the lock of a snapshot that is committed or gone: remove the lock
/// file while still holding it, then unlock.
fn release(mut active: ActiveSnapshot) {
    if let Some(lock) = active.lock.take() {
        let _ = std::fs::remove_file(lock.path());
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Snapshot ids are file names: no separators, no dots-only names.
fn check_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    anyhow::ensure!(ok, "invalid snapshot id {id:?}");
    Ok(())
}
