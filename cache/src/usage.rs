//! Bytes under the store root, counted as `du -sb` counts them.
//!
//! The cap on disk counts every byte under the root — blobs, snapshots,
//! cache mounts, metadata, temporary work — so this is the one measure
//! both `kiln du` and garbage collection use: apparent sizes (`st_size`)
//! of every file, directory and symlink, each inode once (hard links),
//! not descending into other filesystems mounted below (a running
//! container's rootfs; `du -sbx`, which equals `du -sb` when nothing is
//! mounted there). Files vanishing during the walk are skipped.

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

/// Measure the store root `root`.
pub fn root_usage(root: &Path) -> std::io::Result<RootUsage> {
    let meta = std::fs::symlink_metadata(root)?;
    let mut seen = HashSet::new();
    seen.insert((meta.dev(), meta.ino()));
    let mut usage = RootUsage { total: meta.size(), parts: Vec::new() };
    let mut entries: Vec<_> = std::fs::read_dir(root)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let bytes = walk(&entry.path(), meta.dev(), &mut seen);
        usage.total += bytes;
        usage.parts.push((entry.file_name().to_string_lossy().into_owned(), bytes));
    }
    Ok(usage)
}

/// Apparent bytes of `path` and everything below it on device `dev`
/// (as `du -sbx`); 0 if it does not exist.
pub fn apparent_size(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => walk(path, meta.dev(), &mut HashSet::new()),
        Err(_) => 0,
    }
}

fn walk(path: &Path, dev: u64, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.dev() != dev {
        // A mount point: du -x counts neither it nor what is below.
        return 0;
    }
    if !seen.insert((meta.dev(), meta.ino())) {
        return 0;
    }
    let mut total = meta.size();
    if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            total += walk(&entry.path(), dev, seen);
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
}
