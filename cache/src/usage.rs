//! Bytes under the store root, counted as `du -sb` counts them.
//!
//! The cap on disk counts every byte under the root — blobs, snapshots,
//! cache mounts, metadata, temporary work — so this is the one measure
//! both `kiln du` and garbage collection use: apparent sizes (`st_size`)
//! of every file, directory and symlink, each inode once (hard links),
//! not descending into other filesystems mounted below (a running
//! container's rootfs; `du -sbx`, which equals `du -sb` when nothing is
//! mounted there). Files vanishing during the walk are skipped.
//!
//! A committed snapshot's `fs/` never changes, so its bytes are recorded
//! once, when it is committed ([`crate::snapshots::SnapshotMeta::fs_bytes`]).
//! [`root_usage_recorded`] (what the cap after every build uses) counts
//! that record instead of walking the layer again — a 20,000-file COPY
//! layer costs one small read instead of 20,000 `lstat`s. [`root_usage`]
//! (`kiln du`) still walks everything; the two agree (tested). A snapshot
//! without the record (committed by an older kiln) is walked.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Usage of a store root, in total and per top-level entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootUsage {
    /// Everything, as `du -sb <root>` prints it.
    pub total: u64,
    /// Each top-level entry (`blobs`, `snapshots`, `cache-mounts`, ...)
    /// with its bytes, by name. The root directory itself is only in
    /// `total`.
    pub parts: Vec<(String, u64)>,
}

impl RootUsage {
    /// Bytes of the top-level entry `name` (0 if absent).
    pub fn part(&self, name: &str) -> u64 {
        self.parts.iter().find(|(n, _)| n == name).map(|(_, b)| *b).unwrap_or(0)
    }
}

/// Measure the store root `root`, walking every file.
pub fn root_usage(root: &Path) -> std::io::Result<RootUsage> {
    measure_root(root, &|_| None)
}

/// Measure the store root `root` as [`root_usage`] does, but count each
/// committed snapshot's `fs/` as the bytes recorded at its commit.
pub fn root_usage_recorded(root: &Path) -> std::io::Result<RootUsage> {
    let snapshots = root.join("snapshots");
    measure_root(root, &|path| recorded_fs_bytes(&snapshots, path))
}

/// Apparent bytes of `path` and everything below it on device `dev`
/// (as `du -sbx`); 0 if it does not exist.
pub fn apparent_size(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => walk(path, meta.dev(), &mut HashSet::new(), &|_| None),
        Err(_) => 0,
    }
}

/// Apparent bytes of committed snapshot directory `snapshot_dir`
/// (`<root>/snapshots/<id>`), its `fs/` counted as recorded at commit.
pub fn snapshot_size_recorded(snapshot_dir: &Path) -> u64 {
    let Some(snapshots) = snapshot_dir.parent() else { return apparent_size(snapshot_dir) };
    match std::fs::symlink_metadata(snapshot_dir) {
        Ok(meta) => walk(snapshot_dir, meta.dev(), &mut HashSet::new(), &|p| recorded_fs_bytes(snapshots, p)),
        Err(_) => 0,
    }
}

/// Bytes of a subtree known without walking it, if any.
type Known<'a> = &'a dyn Fn(&Path) -> Option<u64>;

/// The recorded bytes of `path` when it is `<snapshots>/<id>/fs` of a
/// committed snapshot whose metadata has them.
fn recorded_fs_bytes(snapshots: &Path, path: &Path) -> Option<u64> {
    if path.file_name()? != "fs" {
        return None;
    }
    let snapshot = path.parent()?;
    if snapshot.parent()? != snapshots {
        return None;
    }
    let bytes = std::fs::read(snapshot.join("meta.json")).ok()?;
    serde_json::from_slice::<crate::snapshots::SnapshotMeta>(&bytes).ok()?.fs_bytes
}

fn measure_root(root: &Path, known: Known) -> std::io::Result<RootUsage> {
    let meta = std::fs::symlink_metadata(root)?;
    let mut seen = HashSet::new();
    seen.insert((meta.dev(), meta.ino()));
    let mut usage = RootUsage { total: meta.size(), parts: Vec::new() };
    let mut entries: Vec<_> = std::fs::read_dir(root)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let bytes = walk(&entry.path(), meta.dev(), &mut seen, known);
        usage.total += bytes;
        usage.parts.push((entry.file_name().to_string_lossy().into_owned(), bytes));
    }
    Ok(usage)
}

fn walk(path: &Path, dev: u64, seen: &mut HashSet<(u64, u64)>, known: Known) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.dev() != dev {
        // A mount point: du -x counts neither it nor what is below.
        return 0;
    }
    if !seen.insert((meta.dev(), meta.ino())) {
        return 0;
    }
    if meta.is_dir()
        && let Some(bytes) = known(path)
    {
        return bytes;
    }
    let mut total = meta.size();
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            total += walk(&entry.path(), dev, seen, known);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_du_apparent_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        std::fs::write(root.join("blobs/sha256/a"), vec![7u8; 10_000]).unwrap();
        std::fs::hard_link(root.join("blobs/sha256/a"), root.join("blobs/link")).unwrap();
        std::os::unix::fs::symlink("sha256/a", root.join("blobs/sym")).unwrap();
        std::fs::write(root.join("meta.json"), b"{}").unwrap();
        let usage = root_usage(root).unwrap();
        let dir_size = |p: &Path| std::fs::metadata(p).unwrap().size();
        let blobs = dir_size(&root.join("blobs")) + dir_size(&root.join("blobs/sha256")) + 10_000 + "sha256/a".len() as u64;
        assert_eq!(usage.part("blobs"), blobs);
        assert_eq!(usage.part("meta.json"), 2);
        assert_eq!(usage.total, dir_size(root) + blobs + 2);
        assert_eq!(apparent_size(&root.join("blobs")), blobs);
        assert_eq!(apparent_size(&root.join("nothing")), 0);
        // The same number du itself prints, when du is there.
        if let Ok(out) = std::process::Command::new("du").arg("-sb").arg(root).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            let du: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(du, usage.total);
        }
    }

    /// A committed snapshot `id` with `files` small files in nested dirs
    /// and a hard link.
    fn snapshot(store: &crate::Store, id: &str, files: usize) {
        let active = store.snapshots.prepare().unwrap();
        for i in 0..files {
            let dir = active.fs().join(format!("d{}", i % 7));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}")), vec![b'x'; i * 13]).unwrap();
        }
        std::fs::write(active.fs().join("big"), vec![1u8; 100_000]).unwrap();
        std::fs::hard_link(active.fs().join("big"), active.fs().join("big-link")).unwrap();
        std::os::unix::fs::symlink("big", active.fs().join("sym")).unwrap();
        store.snapshots.commit(active, id, &Default::default()).unwrap();
    }

    #[test]
    fn recorded_usage_equals_a_full_walk_after_commits_removals_and_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path()).unwrap();
        let agree = |when: &str| {
            let walked = root_usage(dir.path()).unwrap();
            assert_eq!(root_usage_recorded(dir.path()).unwrap(), walked, "{when}");
            for id in store.snapshots.list().unwrap() {
                let snap = dir.path().join("snapshots").join(&id);
                assert_eq!(snapshot_size_recorded(&snap), apparent_size(&snap), "{when}: snapshot {id}");
            }
        };
        agree("empty store");
        snapshot(&store, "a", 300);
        snapshot(&store, "b", 20);
        store.content.put_bytes(b"some blob", None).unwrap();
        let meta = store.snapshots.meta("a").unwrap();
        assert_eq!(meta.fs_bytes, Some(apparent_size(&store.snapshots.path("a"))));
        agree("after commits");
        // The exporter rewrites metadata (a blob record): the size stays.
        let mut more = meta.clone();
        more.blobs.push(crate::snapshots::BlobRecord { media_type: "m".into(), digest: "sha256:00".into(), size: 1 });
        store.snapshots.set_meta("a", &more).unwrap();
        agree("after a metadata rewrite");
        store.snapshots.remove("b").unwrap();
        agree("after a removal");
        // A crash mid-build leaves a prepared, uncommitted snapshot.
        let active = store.snapshots.prepare().unwrap();
        std::fs::write(active.fs().join("half"), vec![0u8; 5000]).unwrap();
        std::mem::forget(active);
        agree("with a crashed build's leftovers");
        // A snapshot committed by an older kiln has no record: walked.
        snapshot(&store, "old", 50);
        let mut old = store.snapshots.meta("old").unwrap();
        old.fs_bytes = None;
        store.snapshots.set_meta("old", &old).unwrap();
        agree("with a snapshot without a record");
    }

    #[test]
    fn recorded_usage_reads_the_record_instead_of_walking() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path()).unwrap();
        snapshot(&store, "a", 100);
        let mut meta = store.snapshots.meta("a").unwrap();
        let real = meta.fs_bytes.unwrap();
        // A wrong record shows whether it is read: the walk never sees it.
        meta.fs_bytes = Some(real + 1_000_000);
        store.snapshots.set_meta("a", &meta).unwrap();
        let walked = root_usage(dir.path()).unwrap().total;
        let recorded = root_usage_recorded(dir.path()).unwrap().total;
        assert_eq!(recorded, walked + 1_000_000);
    }
}
