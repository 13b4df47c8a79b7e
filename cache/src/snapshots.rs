//! Layer directories usable as overlayfs lowerdirs.
//!
//! Lifecycle, as containerd's snapshotter: [`Snapshotter::prepare`] gives an
//! [`ActiveSnapshot`] — an empty `fs/` to write into (an overlay upperdir or
//! an unpack target); an upperdir asks for a work dir on the same
//! filesystem ([`ActiveSnapshot::make_work_dir`]: `<dir>.work`, beside the
//! snapshot dir, so a commit leaves it behind). [`Snapshotter::commit`]
//! records the bytes of `fs/` in `meta.json`, renames the snapshot dir to
//! `snapshots/<id>/` and from then on it is immutable. If another process
//! committed the same id first, ours is discarded and theirs kept (same id
//! means same content). Prepared but uncommitted snapshots live under
//! `tmp/` and are removed at the next open that holds no lock on them (see
//! the store's `check`).
//!
//! Durability is a separate step, so a build step need not wait for it:
//! [`Snapshotter::commit_deferred`] makes the snapshot usable at once (by
//! this and other processes) and [`Snapshotter::make_durable`] later
//! fsyncs its `meta.json`, its directory and `snapshots/`, then removes the
//! work dir and the lock file (removing a directory frees a block, which on
//! a filesystem mounted with `discard` waits for the disk). Whoever writes
//! a record naming a snapshot makes it durable first, so after a power loss
//! a record never names a snapshot that is not there. A snapshot dir left
//! with a missing or torn `meta.json` (a power loss before `make_durable`)
//! is no snapshot: a commit of its id replaces it. As before, the layer's
//! own files are never fsynced: a process crash cannot tear them (the
//! rename into `snapshots/` is atomic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::fsutil::{sync_dir, unique_name, write_atomic};
use crate::lock::{FileLock, TransientLock};

/// Snapshots under `snapshots/` of the store root.
pub struct Snapshotter {
    dir: PathBuf,
    tmp: PathBuf,
    /// Ids committed (or adopted) by [`Snapshotter::commit_deferred`] whose
    /// fsyncs (and cleanup) [`Snapshotter::make_durable`] still owes.
    unsynced: Mutex<HashMap<String, Vec<Leftover>>>,
    ahead: Arc<Ahead>,
}

/// How many snapshots [`Snapshotter::prepare_ahead`] keeps ready: one is
/// made while a step runs, in time for the next; parallel steps beyond it
/// prepare their own.
const PREPARED_AHEAD: usize = 1;

/// Snapshots prepared ahead by a worker thread while someone holds a
/// [`PrepareAhead`].
#[derive(Default)]
struct Ahead {
    state: Mutex<AheadState>,
    changed: Condvar,
}

#[derive(Default)]
struct AheadState {
    /// Live [`PrepareAhead`] guards.
    users: usize,
    ready: Vec<ActiveSnapshot>,
    /// Whether a worker thread runs.
    worker: bool,
}

/// While held, [`Snapshotter::prepare`] takes snapshots made ahead of time
/// (dirs, lock, `meta.json` and work dir already created) instead of
/// creating them on the caller's critical path. Dropping the last one
/// removes the unused ones (on the worker thread; if the process exits
/// first, the next open does, as for any snapshot left by a dead process).
pub struct PrepareAhead {
    ahead: Arc<Ahead>,
}

impl Drop for PrepareAhead {
    fn drop(&mut self) {
        self.ahead.state.lock().unwrap().users -= 1;
        self.ahead.changed.notify_all();
    }
}

/// What a deferred commit leaves under `tmp/snapshots/` to remove later:
/// the overlay work dir, if one was made, and the lock guarding it.
struct Leftover {
    work: PathBuf,
    lock: FileLock,
}

impl Leftover {
    fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.work);
        let _ = std::fs::remove_file(self.lock.path());
    }
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
    /// filesystem as `fs()` (beside the snapshot dir, under the same lock).
    /// Only an overlay upperdir needs one, so [`Snapshotter::prepare`] does
    /// not make it: a COPY or an unpack creates (and deletes) one directory
    /// less.
    pub fn make_work_dir(&self) -> std::io::Result<PathBuf> {
        let work = work_path(&self.dir);
        match std::fs::create_dir(&work) {
            // Prepared ahead (see [`PrepareAhead`]): made empty, still empty.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(work),
            other => other.map(|()| work),
        }
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
        Ok(Snapshotter { dir, tmp, unsynced: Mutex::new(HashMap::new()), ahead: Arc::default() })
    }

    /// Start a new snapshot with an empty `fs/` directory: one made ahead
    /// if a [`PrepareAhead`] is held and one is ready, else a new one.
    pub fn prepare(&self) -> anyhow::Result<ActiveSnapshot> {
        if let Some(ready) = self.ahead.state.lock().unwrap().ready.pop() {
            self.ahead.changed.notify_all();
            return Ok(ready);
        }
        make_active(&self.tmp, false)
    }

    /// Keep a snapshot prepared ahead while the guard lives (a solve holds
    /// one): a worker thread makes the next one while a step runs.
    pub fn prepare_ahead(&self) -> PrepareAhead {
        let mut state = self.ahead.state.lock().unwrap();
        state.users += 1;
        if !state.worker {
            let (ahead, tmp) = (self.ahead.clone(), self.tmp.clone());
            let spawned = std::thread::Builder::new().name("kiln-prepare".into()).spawn(move || prepare_worker(&ahead, &tmp));
            // Without a worker, every prepare is made on the spot.
            state.worker = spawned.is_ok();
        }
        drop(state);
        self.ahead.changed.notify_all();
        PrepareAhead { ahead: self.ahead.clone() }
    }

    /// Remove uncommitted snapshots (and half-deleted ones) left under
    /// `tmp/snapshots/` by processes that died; live ones are locked and
    /// skipped. Returns how many were removed.
    pub fn remove_stale(&self) -> anyhow::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.tmp)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "lock") {
                // A lock whose directories are gone (its owner died in between).
                if !path.with_extension("").exists()
                    && !path.with_extension("work").exists()
                    && let Some(_lock) = FileLock::try_exclusive(&path)?
                {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            // `s-X` and its work dir `s-X.work` are guarded by `s-X.lock`.
            let lock_file = if is_work_dir(&path) { path.with_extension("lock") } else { lock_path(&path) };
            if let Some(_lock) = FileLock::try_exclusive(&lock_file)? {
                if path.exists() {
                    std::fs::remove_dir_all(&path)?;
                    // A snapshot counts once, with or without a work dir.
                    removed += !is_work_dir(&path) as usize;
                }
                let _ = std::fs::remove_file(&lock_file);
            }
        }
        Ok(removed)
    }

    /// Make `active` the immutable snapshot `id`, durably: when this
    /// returns, it survives a power loss. The overlay work dir is dropped.
    /// If a valid snapshot `id` already exists, `active` is discarded; a
    /// broken one (no `fs/`, or `meta.json` missing or unparseable) is
    /// replaced.
    pub fn commit(&self, active: ActiveSnapshot, id: &str, meta: &SnapshotMeta) -> anyhow::Result<()> {
        self.commit_deferred(active, id, meta)?;
        self.make_durable(&[id])?;
        Ok(())
    }

    /// [`Snapshotter::commit`] without its fsyncs: the snapshot is usable
    /// at once, and durable only after [`Snapshotter::make_durable`] for
    /// `id`, which anything recording `id` must call first. The work dir
    /// and the lock are removed then too.
    pub fn commit_deferred(&self, active: ActiveSnapshot, id: &str, meta: &SnapshotMeta) -> anyhow::Result<()> {
        check_id(id)?;
        let mut meta = meta.clone();
        meta.created.get_or_insert_with(unix_now);
        // Measured here, where the files were just written (cache-hot) and
        // can no longer change.
        meta.fs_bytes = Some(crate::usage::apparent_size(&active.fs()));
        // The directory is ours alone until renamed: written in place (no
        // temp file; an empty one if prepared ahead), complete before anyone
        // can see it.
        std::fs::write(active.dir.join(META_FILE), serde_json::to_vec(&meta)?)?;
        let leftover = self.install(active, id)?;
        self.unsynced.lock().unwrap().entry(id.to_string()).or_default().extend(leftover);
        Ok(())
    }

    /// Move the written `active` to `snapshots/<id>`, or adopt a valid
    /// snapshot already there. Returns what is left to remove.
    fn install(&self, active: ActiveSnapshot, id: &str) -> anyhow::Result<Option<Leftover>> {
        let final_dir = self.dir.join(id);
        match std::fs::rename(&active.dir, &final_dir) {
            Ok(()) => Ok(leftover(active)),
            // A non-empty `final_dir` (an empty one is simply replaced).
            Err(_) if final_dir.exists() => {
                if self.is_valid(id) {
                    self.abort(active);
                    return Ok(None);
                }
                self.replace_broken(active, id)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Swap `active` in for the broken `snapshots/<id>` in one step
    /// (`RENAME_EXCHANGE`), so a reader sees the old dir or the new one and
    /// never no dir at all, then delete the broken one. Under a lock on the
    /// id: two processes replacing it at once would otherwise each swap,
    /// and the second delete the first one's valid snapshot, maybe in use.
    fn replace_broken(&self, active: ActiveSnapshot, id: &str) -> anyhow::Result<Option<Leftover>> {
        use nix::fcntl::{RenameFlags, renameat2};
        let final_dir = self.dir.join(id);
        let _lock = TransientLock::acquire(&self.tmp.join(format!("replace-{id}.lock")))?;
        if self.is_valid(id) {
            // Replaced by someone else while we waited.
            self.abort(active);
            return Ok(None);
        }
        tracing::warn!("snapshot {id}: replacing a broken copy (left by a crash before it was durable)");
        match renameat2(None, &active.dir, None, &final_dir, RenameFlags::RENAME_EXCHANGE) {
            // `active.dir` now holds the broken snapshot: still ours, locked.
            Ok(()) => {
                self.abort(active);
                Ok(None)
            }
            // Gone meanwhile (removed): a plain rename will do.
            Err(nix::errno::Errno::ENOENT) => {
                std::fs::rename(&active.dir, &final_dir)?;
                Ok(leftover(active))
            }
            Err(e) => {
                self.abort(active);
                anyhow::bail!("replacing broken snapshot {id}: {e}");
            }
        }
    }

    /// Whether `snapshots/<id>` is a whole snapshot: `fs/` and a parseable
    /// `meta.json`.
    fn is_valid(&self, id: &str) -> bool {
        self.exists(id) && self.meta(id).is_ok()
    }

    /// fsync what [`Snapshotter::commit_deferred`] left unsynced of the
    /// snapshots `ids` (`meta.json`, the snapshot dir, `snapshots/`), then
    /// remove their work dirs and locks; ids already durable are skipped.
    /// Returns how many were synced. An error leaves them unsynced, so the
    /// caller must not record them.
    pub fn make_durable<S: AsRef<str>>(&self, ids: &[S]) -> anyhow::Result<usize> {
        let due: Vec<String> = {
            let unsynced = self.unsynced.lock().unwrap();
            ids.iter().map(AsRef::as_ref).filter(|id| unsynced.contains_key(*id)).map(str::to_string).collect()
        };
        if due.is_empty() {
            return Ok(0);
        }
        for id in &due {
            let dir = self.dir.join(id);
            let synced = std::fs::File::open(dir.join(META_FILE)).and_then(|f| f.sync_all()).and_then(|()| sync_dir(&dir));
            synced.map_err(|e| anyhow::anyhow!("making snapshot {id} durable: {e}"))?;
        }
        // One fsync of `snapshots/` covers every rename into it.
        sync_dir(&self.dir).map_err(|e| anyhow::anyhow!("making snapshots durable: {e}"))?;
        let leftovers: Vec<Leftover> = {
            let mut unsynced = self.unsynced.lock().unwrap();
            due.iter().filter_map(|id| unsynced.remove(id)).flatten().collect()
        };
        leftovers.into_iter().for_each(Leftover::remove);
        Ok(due.len())
    }

    /// Ids committed by [`Snapshotter::commit_deferred`] and not yet made
    /// durable, sorted.
    pub fn unsynced(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.unsynced.lock().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Throw away an uncommitted snapshot.
    pub fn abort(&self, active: ActiveSnapshot) {
        let _ = std::fs::remove_dir_all(&active.dir);
        if let Some(leftover) = leftover(active) {
            leftover.remove();
        }
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
        let bytes = std::fs::read(self.dir.join(id).join(META_FILE))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Replace the metadata of snapshot `id` (e.g. to record a new blob).
    pub fn set_meta(&self, id: &str, meta: &SnapshotMeta) -> anyhow::Result<()> {
        check_id(id)?;
        write_atomic(&self.dir.join(id).join(META_FILE), &serde_json::to_vec(meta)?)?;
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
        let leftovers = self.unsynced.lock().unwrap().remove(id);
        leftovers.into_iter().flatten().for_each(Leftover::remove);
        std::fs::remove_dir_all(&doomed)?;
        let _ = std::fs::remove_file(lock.path());
        Ok(())
    }
}

/// A snapshot's metadata file, beside its `fs/`.
const META_FILE: &str = "meta.json";

/// `<dir>.lock`, the lock guarding a directory under `tmp/snapshots/`.
fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// A new snapshot under `tmp` with an empty `fs/`; `ahead` also makes
/// what a commit and an overlay need (empty `meta.json`, work dir), so
/// that nothing is created later on a step's critical path.
fn make_active(tmp: &Path, ahead: bool) -> anyhow::Result<ActiveSnapshot> {
    let dir = tmp.join(unique_name("s-"));
    // Locked before the directory exists, so cleanup never sees it
    // unlocked. A cleanup may take and remove the fresh lock file between
    // our open and our flock: then lock the file that is there now.
    let lock = loop {
        let lock = FileLock::exclusive(&lock_path(&dir))?;
        if crate::lock::still_named(&lock)? {
            break lock;
        }
    };
    // `tmp/snapshots/` is made by open; made again only if it went away.
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(&dir)?,
        other => other?,
    }
    let active = ActiveSnapshot { dir, lock: Some(lock) };
    std::fs::create_dir(active.fs())?;
    if ahead {
        std::fs::write(active.dir.join(META_FILE), b"")?;
        active.make_work_dir()?;
    }
    Ok(active)
}

/// Keep [`PREPARED_AHEAD`] snapshots ready while [`PrepareAhead`] guards
/// live; then remove the unused ones and exit.
fn prepare_worker(ahead: &Ahead, tmp: &Path) {
    let mut state = ahead.state.lock().unwrap();
    loop {
        if state.users == 0 {
            let unused = std::mem::take(&mut state.ready);
            state.worker = false;
            drop(state);
            for active in unused {
                let _ = std::fs::remove_dir_all(&active.dir);
                if let Some(leftover) = leftover(active) {
                    leftover.remove();
                }
            }
            return;
        }
        if state.ready.len() >= PREPARED_AHEAD {
            state = ahead.changed.wait(state).unwrap();
            continue;
        }
        drop(state);
        let made = make_active(tmp, true);
        state = ahead.state.lock().unwrap();
        match made {
            Ok(active) => state.ready.push(active),
            Err(e) => {
                // Callers prepare their own from now on.
                tracing::warn!("preparing snapshots ahead: {e:#}");
                state.worker = false;
                return;
            }
        }
    }
}

/// `<dir>.work`, the overlay work dir of the snapshot being written in `dir`.
fn work_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".work");
    PathBuf::from(name)
}

fn is_work_dir(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "work")
}

/// What is left of `active` once its dir is committed or gone: its work dir
/// (maybe never made) and its lock, to be removed while the lock is held.
fn leftover(mut active: ActiveSnapshot) -> Option<Leftover> {
    let lock = active.lock.take()?;
    Some(Leftover { work: work_path(&active.dir), lock })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A prepared snapshot holding one file `name` with `content`.
    fn prepared(snapshots: &Snapshotter, name: &str, content: &str) -> ActiveSnapshot {
        let active = snapshots.prepare().unwrap();
        std::fs::write(active.fs().join(name), content).unwrap();
        active
    }

    #[test]
    fn deferred_commit_is_usable_at_once_and_durable_when_asked() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        let active = prepared(&snapshots, "f", "one");
        active.make_work_dir().unwrap();
        snapshots.commit_deferred(active, "a", &SnapshotMeta::default()).unwrap();
        assert_eq!(std::fs::read_to_string(snapshots.path("a").join("f")).unwrap(), "one");
        assert!(snapshots.meta("a").unwrap().fs_bytes.is_some_and(|b| b >= 3), "the size is measured");
        assert_eq!(snapshots.unsynced(), ["a"]);
        // The work dir and the lock wait for the sync.
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 2);
        // Unknown and already durable ids cost nothing.
        assert_eq!(snapshots.make_durable(&["a", "b"]).unwrap(), 1);
        assert!(snapshots.unsynced().is_empty());
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0);
        assert_eq!(snapshots.make_durable(&["a"]).unwrap(), 0);
        // `commit` leaves nothing to sync; the tmp dir holds no leftovers.
        snapshots.commit(prepared(&snapshots, "f", "two"), "c", &SnapshotMeta::default()).unwrap();
        assert!(snapshots.unsynced().is_empty());
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn stale_snapshots_and_their_work_dirs_are_removed_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        let live = prepared(&snapshots, "f", "live");
        live.make_work_dir().unwrap();
        // A process that died mid-step: its lock is gone with it.
        let dead = prepared(&snapshots, "f", "dead");
        dead.make_work_dir().unwrap();
        drop(dead);
        // A deferred commit whose work dir and lock wait for the sync.
        let committed = prepared(&snapshots, "f", "c");
        committed.make_work_dir().unwrap();
        snapshots.commit_deferred(committed, "c", &SnapshotMeta::default()).unwrap();
        assert_eq!(snapshots.remove_stale().unwrap(), 1, "the dead one, with its work dir");
        let mut left: Vec<String> = std::fs::read_dir(root.path().join("tmp/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path().extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        left.sort();
        assert_eq!(left, ["", "lock", "lock", "work", "work"], "live: dir, lock, work dir; committed: lock, work dir");
        snapshots.make_durable(&["c"]).unwrap();
        snapshots.abort(live);
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0);
    }

    /// Entries of `tmp/snapshots/`, waiting up to 5 s for `want` of them.
    fn tmp_entries(root: &Path, want: usize) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let n = std::fs::read_dir(root.join("tmp/snapshots")).unwrap().count();
            if n == want || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn snapshots_prepared_ahead_are_used_then_removed() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        let guard = snapshots.prepare_ahead();
        // One ready: dir (fs/, empty meta.json), work dir, lock.
        assert_eq!(tmp_entries(root.path(), 3), 3);
        let ready: Vec<PathBuf> = std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().map(|e| e.unwrap().path()).collect();
        let active = snapshots.prepare().unwrap();
        assert!(ready.contains(&active.dir), "the prepared one is taken: {ready:?} {:?}", active.dir);
        assert!(active.fs().is_dir() && active.dir.join(META_FILE).is_file());
        let work = active.make_work_dir().unwrap();
        assert!(ready.contains(&work) && std::fs::read_dir(&work).unwrap().count() == 0);
        std::fs::write(active.fs().join("f"), "x").unwrap();
        snapshots.commit(active, "a", &SnapshotMeta::default()).unwrap();
        assert!(snapshots.meta("a").unwrap().created.is_some(), "the empty meta.json was written over");
        // The next one is made meanwhile; two guards share the worker.
        assert_eq!(tmp_entries(root.path(), 3), 3);
        let second = snapshots.prepare_ahead();
        drop(guard);
        assert_eq!(tmp_entries(root.path(), 3), 3, "still wanted");
        drop(second);
        assert_eq!(tmp_entries(root.path(), 0), 0, "the unused one goes with the last guard");
        // Without a guard, prepare makes its own (no work dir, no meta.json).
        let own = snapshots.prepare().unwrap();
        assert!(!own.dir.join(META_FILE).exists() && !work_path(&own.dir).exists());
        // And the worker starts again for a new guard.
        let _again = snapshots.prepare_ahead();
        assert_eq!(tmp_entries(root.path(), 5), 5);
    }

    #[test]
    fn a_failed_sync_leaves_the_snapshot_unsynced() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        snapshots.commit_deferred(prepared(&snapshots, "f", "x"), "a", &SnapshotMeta::default()).unwrap();
        std::fs::remove_file(root.path().join("snapshots/a/meta.json")).unwrap();
        let err = snapshots.make_durable(&["a"]).unwrap_err();
        assert!(format!("{err:#}").contains("snapshot a"), "{err:#}");
        assert_eq!(snapshots.unsynced(), ["a"]);
    }

    #[test]
    fn a_valid_existing_snapshot_is_adopted() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        let theirs = SnapshotMeta { diff_id: Some("sha256:theirs".into()), ..Default::default() };
        snapshots.commit(prepared(&snapshots, "f", "theirs"), "a", &theirs).unwrap();
        snapshots.commit_deferred(prepared(&snapshots, "f", "ours"), "a", &SnapshotMeta::default()).unwrap();
        assert_eq!(std::fs::read_to_string(snapshots.path("a").join("f")).unwrap(), "theirs");
        assert_eq!(snapshots.meta("a").unwrap().diff_id.as_deref(), Some("sha256:theirs"));
        // Adopted: maybe not durable yet (its committer may have died
        // before syncing it), so this process syncs it before recording it.
        assert_eq!(snapshots.unsynced(), ["a"]);
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0, "ours is discarded");
    }

    #[test]
    fn a_broken_existing_snapshot_is_replaced() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = Snapshotter::open(root.path()).unwrap();
        // What a power loss before `make_durable` may leave: meta.json
        // torn (empty), missing, or an empty snapshot dir.
        type Damage = fn(&Path);
        let broken: [(&str, Damage); 3] = [
            ("torn", |dir| std::fs::write(dir.join("meta.json"), b"").unwrap()),
            ("missing", |dir| std::fs::remove_file(dir.join("meta.json")).unwrap()),
            ("empty", |dir| {
                std::fs::remove_dir_all(dir).unwrap();
                std::fs::create_dir(dir).unwrap();
            }),
        ];
        for (id, damage) in broken {
            snapshots.commit(prepared(&snapshots, "f", "old"), id, &SnapshotMeta::default()).unwrap();
            damage(&root.path().join("snapshots").join(id));
            assert!(snapshots.meta(id).is_err());
            snapshots.commit_deferred(prepared(&snapshots, "f", "new"), id, &SnapshotMeta::default()).unwrap();
            assert_eq!(std::fs::read_to_string(snapshots.path(id).join("f")).unwrap(), "new", "{id}");
            assert!(snapshots.meta(id).unwrap().fs_bytes.is_some(), "{id}");
            assert_eq!(snapshots.make_durable(&[id]).unwrap(), 1);
        }
        // The broken copies and the replace locks are gone.
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_commits_over_a_broken_snapshot_leave_one_valid_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = std::sync::Arc::new(Snapshotter::open(root.path()).unwrap());
        for round in 0..20 {
            let id = format!("s{round}");
            snapshots.commit(prepared(&snapshots, "f", "old"), &id, &SnapshotMeta::default()).unwrap();
            std::fs::write(root.path().join("snapshots").join(&id).join("meta.json"), b"{").unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let (snapshots, barrier, id) = (snapshots.clone(), barrier.clone(), id.clone());
                    std::thread::spawn(move || {
                        let active = prepared(&snapshots, "f", &format!("new{t}"));
                        barrier.wait();
                        snapshots.commit_deferred(active, &id, &SnapshotMeta::default()).unwrap();
                        // Whoever won, every committer sees a whole snapshot.
                        assert!(snapshots.meta(&id).is_ok());
                        std::fs::read_to_string(snapshots.path(&id).join("f")).unwrap()
                    })
                })
                .collect();
            let seen: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let kept = std::fs::read_to_string(snapshots.path(&id).join("f")).unwrap();
            assert!(kept.starts_with("new"), "{kept}");
            assert!(seen.iter().all(|s| *s == kept), "one replacement, seen by all: {seen:?} vs {kept}");
        }
        assert_eq!(std::fs::read_dir(root.path().join("tmp/snapshots")).unwrap().count(), 0);
    }
}
