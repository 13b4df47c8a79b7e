//! Build-cache usage and garbage collection (`kiln du`, `kiln prune`).
//!
//! The build cache is the solver's records in the cache index (key →
//! snapshot chain), the snapshots they refer to, and the cache-mount
//! directories. Images are not part of it: an exported image lives in the
//! content store as blobs, so pruning snapshots never breaks an image.
//! Solves hold [`BUILD_LOCK`] shared and pruning holds it exclusively, so
//! a snapshot a running build just made is never collected under it.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_cache::Store;
use kiln_cache::lock::FileLock;
use serde::Deserialize;

/// Name of the lock file under `<root>/locks/` that solves share and
/// pruning takes exclusively.
pub const BUILD_LOCK: &str = "build-cache.lock";

/// Take the build lock shared (held by a solve while it runs).
pub fn lock_shared(store: &Store) -> std::io::Result<FileLock> {
    FileLock::shared(&store.root().join("locks").join(BUILD_LOCK))
}

/// How much the build cache holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Cache records.
    pub records: usize,
    /// Committed snapshots, and their bytes on disk.
    pub snapshots: usize,
    /// See `snapshots`.
    pub snapshot_bytes: u64,
    /// Snapshots no record refers to (pulled base layers, leftovers).
    pub unreferenced_snapshots: usize,
    /// Bytes of `RUN --mount=type=cache` directories.
    pub cache_mount_bytes: u64,
}

/// What [`prune`] should remove.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Everything: all records, snapshots and cache mounts.
    pub all: bool,
    /// Drop the oldest records until referenced snapshots fit in this many
    /// bytes.
    pub keep_bytes: Option<u64>,
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneReport {
    /// Records removed.
    pub records: usize,
    /// Snapshots removed.
    pub snapshots: usize,
    /// Bytes freed.
    pub bytes: u64,
}

#[derive(Deserialize)]
struct Record {
    layers: Vec<String>,
}

/// Bytes on disk under `path` (allocated blocks; hard links counted once).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
        let mut total = if seen.insert((meta.dev(), meta.ino())) { meta.blocks() * 512 } else { 0 };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    total += walk(&e.path(), seen);
                }
            }
        }
        total
    }
    walk(path, &mut HashSet::new())
}

/// Records with their chains and their files' age, oldest first.
fn records(store: &Store) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for key in store.index.keys()? {
        let Some(bytes) = store.index.get(&key)? else { continue };
        // Records of other shapes are not the solver's: leave them alone.
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else { continue };
        let hex = key.trim_start_matches("sha256:");
        let age = std::fs::metadata(store.root().join("cache").join(format!("{hex}.json")))
            .and_then(|m| m.modified())
            .ok();
        out.push((age, key, record.layers));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, k, l)| (k, l)).collect())
}

/// Measure the build cache.
pub fn usage(store: &Store) -> anyhow::Result<Usage> {
    let records = records(store)?;
    let referenced: HashSet<&String> = records.iter().flat_map(|(_, l)| l).collect();
    let snapshots = store.snapshots.list()?;
    let mut usage = Usage { records: records.len(), snapshots: snapshots.len(), ..Default::default() };
    for id in &snapshots {
        usage.snapshot_bytes += disk_usage(&store.snapshots.path(id));
        usage.unreferenced_snapshots += !referenced.contains(id) as usize;
    }
    usage.cache_mount_bytes = disk_usage(&store.root().join("cache-mounts"));
    Ok(usage)
}

/// Remove what `options` says, plus always: records whose snapshots are
/// gone and snapshots no record refers to.
pub fn prune(store: &Store, options: &PruneOptions) -> anyhow::Result<PruneReport> {
    let _lock = FileLock::exclusive(&store.root().join("locks").join(BUILD_LOCK))?;
    let mut report = PruneReport::default();
    let mut records = records(store)?;
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for id in store.snapshots.list()? {
        sizes.insert(id.clone(), disk_usage(&store.snapshots.path(&id)));
    }
    let drop_record = |key: &str, report: &mut PruneReport| -> anyhow::Result<()> {
        store.index.remove(key)?;
        report.records += 1;
        Ok(())
    };
    // Broken records, then everything (--all), then the oldest (--keep-storage).
    let mut kept = Vec::new();
    for (key, layers) in records.drain(..) {
        if options.all || !layers.iter().all(|id| sizes.contains_key(id)) {
            drop_record(&key, &mut report)?;
        } else {
            kept.push((key, layers));
        }
    }
    if let Some(limit) = options.keep_bytes {
        let total = |kept: &[(String, Vec<String>)]| -> u64 {
            let ids: HashSet<&String> = kept.iter().flat_map(|(_, l)| l).collect();
            ids.iter().map(|id| sizes.get(*id).copied().unwrap_or(0)).sum()
        };
        while !kept.is_empty() && total(&kept) > limit {
            let (key, _) = kept.remove(0);
            drop_record(&key, &mut report)?;
        }
    }
    let referenced: HashSet<String> = kept.into_iter().flat_map(|(_, l)| l).collect();
    for (id, bytes) in &sizes {
        if !referenced.contains(id) {
            store.snapshots.remove(id)?;
            report.snapshots += 1;
            report.bytes += bytes;
        }
    }
    if options.all {
        let mounts = store.root().join("cache-mounts");
        report.bytes += disk_usage(&mounts);
        if mounts.exists() {
            std::fs::remove_dir_all(&mounts)?;
        }
    }
    Ok(report)
}

/// Parse a size like `10GB`, `512mb`, `1.5g`, `1048576`.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| anyhow::anyhow!("invalid size {text:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => anyhow::bail!("invalid size {text:?}: unknown unit {unit:?}"),
    };
    Ok((num * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("ten").is_err() && parse_size("3 parsecs").is_err());
    }
}
