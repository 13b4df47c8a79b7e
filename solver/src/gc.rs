//! Build-cache usage and garbage collection (`kiln du`, `kiln prune`, and
//! the cap applied after every build).
//!
//! The build cache is the solver's records in the cache index (key →
//! snapshot chain), the snapshots they refer to, the cache-mount
//! directories, and blobs no image names. Images are not part of it: an
//! image's manifest, config and layer blobs are never collected (its
//! layers' snapshots are, and are unpacked again from the blobs on use).
//!
//! The cap ([`enforce_cap`]) counts every byte under the root, as `du -sb`
//! does ([`kiln_cache::usage`]), and evicts least recently used things
//! first. Nothing a running build or container may use is removed: they
//! hold leases ([`kiln_cache::lease`]), and everything used since the oldest
//! live lease started is kept. Collection holds the GC lock exclusively;
//! users take it shared while they check that a thing exists and mark it
//! used, so nothing is removed between the two.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_cache::Store;
use kiln_cache::lease::{self, last_used};
use kiln_cache::lock::FileLock;
use kiln_cache::usage::{apparent_size, root_usage_recorded, snapshot_size_recorded};
use serde::Deserialize;

/// Blobs younger than this are never collected: `kiln pull`, `load` and
/// `import` take no lease, and a blob they just wrote looks unreferenced
/// until they name the image.
pub const BLOB_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Name of the GC lock file under `<root>/locks/`.
pub const BUILD_LOCK: &str = lease::GC_LOCK_FILE;

/// Take the GC lock shared: no collection runs while it is held.
pub fn lock_shared(store: &Store) -> std::io::Result<FileLock> {
    lease::gc_guard(store)
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
    /// Everything not in use: all records, snapshots, cache mounts and
    /// blobs no image names.
    pub all: bool,
    /// Evict least recently used things until the whole root (every byte,
    /// as `du -sb`) fits in this many bytes.
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

/// What [`enforce_cap`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CapReport {
    /// Bytes under the root before and after.
    pub before: u64,
    /// See `before`.
    pub after: u64,
    /// What was removed.
    pub removed: PruneReport,
    /// Blobs and cache-mount directories removed.
    pub blobs: usize,
    /// See `blobs`.
    pub cache_mounts: usize,
    /// Whether the root is still over the cap: what is left is named by
    /// images or used by running builds and containers.
    pub still_over: bool,
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

/// Records with their chains, oldest file first.
fn records(store: &Store) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for key in store.index.keys()? {
        let Some(bytes) = store.index.get(&key)? else { continue };
        // Records of other shapes are not the solver's: leave them alone.
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else { continue };
        let hex = key.trim_start_matches("sha256:");
        let age = last_used(&store.root().join("cache").join(format!("{hex}.json")));
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

/// Everything collection needs to know, read under the GC lock.
struct Census {
    /// Used at or after this by a live lease: keep (`None`: no lease).
    held_since: Option<SystemTime>,
    records: Vec<(String, Vec<String>)>,
    /// Snapshot id → (bytes of `snapshots/<id>`, last used).
    snapshots: HashMap<String, (u64, Option<SystemTime>)>,
    /// Blobs images name: never collected here.
    pinned: HashSet<String>,
}

impl Census {
    fn take(store: &Store) -> anyhow::Result<Census> {
        let mut snapshots = HashMap::new();
        for id in store.snapshots.list()? {
            let dir = store.root().join("snapshots").join(&id);
            snapshots.insert(id, (snapshot_size_recorded(&dir), last_used(&dir)));
        }
        Ok(Census {
            held_since: lease::held_since(store)?,
            records: records(store)?,
            snapshots,
            pinned: pinned_blobs(store)?,
        })
    }

    /// Whether a thing last used at `t` may be in use by a live lease.
    fn held(&self, t: Option<SystemTime>) -> bool {
        match (self.held_since, t) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(since), Some(t)) => t >= since,
        }
    }
}

/// Manifest, config and layer blobs of every named image (following
/// indexes to their manifests).
fn pinned_blobs(store: &Store) -> anyhow::Result<HashSet<String>> {
    let mut pinned = HashSet::new();
    let mut todo: Vec<String> = store.images.list()?.into_iter().map(|i| i.target.digest).collect();
    while let Some(digest) = todo.pop() {
        if !pinned.insert(digest.clone()) {
            continue;
        }
        let Ok(bytes) = store.content.read(&digest) else { continue };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let digest_of = |d: &serde_json::Value| d.get("digest").and_then(|d| d.as_str()).map(str::to_string);
        pinned.extend(doc.get("config").and_then(digest_of));
        pinned.extend(doc.get("layers").and_then(|l| l.as_array()).into_iter().flatten().filter_map(digest_of));
        todo.extend(doc.get("manifests").and_then(|l| l.as_array()).into_iter().flatten().filter_map(digest_of));
    }
    Ok(pinned)
}

/// Removes things and keeps count; shared by [`prune`] and [`enforce_cap`].
struct Collector<'a> {
    store: &'a Store,
    census: Census,
    report: PruneReport,
    blobs: usize,
    cache_mounts: usize,
}

impl Collector<'_> {
    fn drop_record(&mut self, key: &str) -> anyhow::Result<()> {
        self.store.index.remove(key)?;
        self.report.records += 1;
        Ok(())
    }

    /// Remove snapshot `id`, the records naming it, and the blobs made
    /// from it that no image names. Returns the bytes freed.
    fn drop_snapshot(&mut self, id: &str) -> anyhow::Result<u64> {
        let (bytes, _) = self.census.snapshots.remove(id).unwrap_or_default();
        let blobs = self.store.snapshots.meta(id).map(|m| m.blobs).unwrap_or_default();
        self.store.snapshots.remove(id)?;
        self.report.snapshots += 1;
        let mut freed = bytes;
        let naming: Vec<String> =
            self.census.records.iter().filter(|(_, l)| l.iter().any(|x| x == id)).map(|(k, _)| k.clone()).collect();
        self.census.records.retain(|(_, l)| !l.iter().any(|x| x == id));
        for key in naming {
            self.drop_record(&key)?;
        }
        for blob in blobs {
            freed += self.drop_blob_if_free(&blob.digest)?;
        }
        self.report.bytes += freed;
        Ok(freed)
    }

    /// Remove blob `digest` unless an image names it, a lease may use it,
    /// or it is younger than [`BLOB_GRACE`].
    fn drop_blob_if_free(&mut self, digest: &str) -> anyhow::Result<u64> {
        let path = self.store.content.blob_path(digest);
        let used = last_used(&path);
        let fresh = used.and_then(|t| t.elapsed().ok()).is_none_or(|age| age < BLOB_GRACE);
        if self.census.pinned.contains(digest) || self.census.held(used) || fresh || !path.exists() {
            return Ok(0);
        }
        let bytes = apparent_size(&path);
        self.store.content.delete(digest)?;
        self.blobs += 1;
        Ok(bytes)
    }

    /// Blobs neither an image nor a snapshot's metadata names.
    fn drop_orphan_blobs(&mut self) -> anyhow::Result<u64> {
        let mut made_from_snapshots = HashSet::new();
        for id in self.census.snapshots.keys() {
            if let Ok(meta) = self.store.snapshots.meta(id) {
                made_from_snapshots.extend(meta.blobs.into_iter().map(|b| b.digest));
            }
        }
        let mut freed = 0;
        for blob in self.store.content.list()? {
            if !made_from_snapshots.contains(&blob.digest) {
                freed += self.drop_blob_if_free(&blob.digest)?;
            }
        }
        self.report.bytes += freed;
        Ok(freed)
    }

    /// Records naming a snapshot that is gone.
    fn drop_broken_records(&mut self) -> anyhow::Result<()> {
        let broken: Vec<String> = self
            .census
            .records
            .iter()
            .filter(|(_, l)| !l.iter().all(|id| self.census.snapshots.contains_key(id)))
            .map(|(k, _)| k.clone())
            .collect();
        self.census.records.retain(|(k, _)| !broken.contains(k));
        for key in broken {
            self.drop_record(&key)?;
        }
        Ok(())
    }

    /// Cache-mount directories with their bytes and last use.
    fn cache_mount_dirs(&self) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
        let dir = self.store.root().join("cache-mounts");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries.flatten().map(|e| e.path()).map(|p| (p.clone(), apparent_size(&p), last_used(&p))).collect()
    }

    fn drop_cache_mount(&mut self, path: &Path, bytes: u64) -> anyhow::Result<u64> {
        std::fs::remove_dir_all(path)?;
        self.cache_mounts += 1;
        self.report.bytes += bytes;
        Ok(bytes)
    }

    /// Evict unheld snapshots and cache mounts, least recently used first,
    /// while `over()` says the root is too big. `over` gets the bytes
    /// freed so far.
    fn evict_lru(&mut self, mut over: impl FnMut(u64) -> bool) -> anyhow::Result<u64> {
        enum Unit {
            Snapshot(String),
            CacheMount(PathBuf, u64),
        }
        let mut units: Vec<(Option<SystemTime>, Unit)> = Vec::new();
        for (id, (_, used)) in &self.census.snapshots {
            if !self.census.held(*used) {
                units.push((*used, Unit::Snapshot(id.clone())));
            }
        }
        for (path, bytes, used) in self.cache_mount_dirs() {
            if !self.census.held(used) {
                units.push((used, Unit::CacheMount(path, bytes)));
            }
        }
        units.sort_by_key(|u| u.0);
        let mut freed = 0;
        for (_, unit) in units {
            if !over(freed) {
                break;
            }
            freed += match unit {
                Unit::Snapshot(id) => self.drop_snapshot(&id)?,
                Unit::CacheMount(path, bytes) => self.drop_cache_mount(&path, bytes)?,
            };
        }
        Ok(freed)
    }
}

/// Remove what `options` says, plus always: records whose snapshots are
/// gone and snapshots no record refers to. Nothing a live lease may use is
/// removed.
pub fn prune(store: &Store, options: &PruneOptions) -> anyhow::Result<PruneReport> {
    let _lock = lease::gc_exclusive(store)?;
    let census = Census::take(store)?;
    let mut c = Collector { store, census, report: PruneReport::default(), blobs: 0, cache_mounts: 0 };
    c.drop_broken_records()?;
    if options.all {
        c.evict_lru(|_| true)?;
        c.drop_orphan_blobs()?;
    } else if let Some(limit) = options.keep_bytes {
        let total = root_usage_recorded(store.root())?.total;
        let freed = c.drop_orphan_blobs()?;
        c.evict_lru(|more| total.saturating_sub(freed + more) > limit)?;
    }
    // Snapshots no record refers to (pulled layers are unpacked again
    // from their blobs when needed).
    let referenced: HashSet<String> = c.census.records.iter().flat_map(|(_, l)| l.clone()).collect();
    let unreferenced: Vec<String> = c
        .census
        .snapshots
        .iter()
        .filter(|(id, (_, used))| !referenced.contains(*id) && !c.census.held(*used))
        .map(|(id, _)| id.clone())
        .collect();
    for id in unreferenced {
        c.drop_snapshot(&id)?;
    }
    Ok(c.report)
}

/// Keep the whole root (every byte under it, as `du -sb` counts) within
/// `cap` bytes: when over, remove blobs nothing names, then snapshots
/// (with the records naming them) and cache mounts, least recently used
/// first, skipping whatever a live lease may use. Image blobs are never
/// removed; if they alone exceed the cap, `still_over` says so.
pub fn enforce_cap(store: &Store, cap: u64) -> anyhow::Result<CapReport> {
    let before = root_usage_recorded(store.root())?.total;
    if before <= cap {
        return Ok(CapReport { before, after: before, ..Default::default() });
    }
    let _lock = lease::gc_exclusive(store)?;
    let census = Census::take(store)?;
    let mut c = Collector { store, census, report: PruneReport::default(), blobs: 0, cache_mounts: 0 };
    // Re-measured under the lock: another collection may have run.
    let total = root_usage_recorded(store.root())?.total;
    c.drop_broken_records()?;
    let freed = c.drop_orphan_blobs()?;
    c.evict_lru(|more| total.saturating_sub(freed + more) > cap)?;
    let after = root_usage_recorded(store.root())?.total;
    Ok(CapReport {
        before,
        after,
        removed: c.report,
        blobs: c.blobs,
        cache_mounts: c.cache_mounts,
        still_over: after > cap,
    })
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

    use kiln_cache::lease::Lease;
    use std::time::{Duration, SystemTime};

    /// A committed snapshot `id` holding `bytes` bytes, last used `age` ago,
    /// with a record naming it.
    fn snapshot(store: &Store, id: &str, bytes: usize, age: Duration) {
        let active = store.snapshots.prepare().unwrap();
        std::fs::write(active.fs().join("data"), vec![b'x'; bytes]).unwrap();
        store.snapshots.commit(active, id, &Default::default()).unwrap();
        let dir = store.root().join("snapshots").join(id);
        std::fs::File::open(&dir).unwrap().set_modified(SystemTime::now() - age).unwrap();
        let key = format!("sha256:{:0>64}", hex::encode(id));
        store.index.put(&key, format!(r#"{{"layers":["{id}"]}}"#).as_bytes()).unwrap();
    }

    #[test]
    fn cap_evicts_least_recently_used_first_and_spares_leased_and_image_blobs() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let hour = Duration::from_secs(3600);
        snapshot(&store, "old", 100_000, 3 * hour);
        snapshot(&store, "mid", 100_000, 2 * hour);
        snapshot(&store, "new", 100_000, hour);
        let orphan = store.content.put_bytes(&vec![b'o'; 50_000], None).unwrap();
        let fresh = store.content.put_bytes(b"just pulled, not named yet", None).unwrap();
        let old = SystemTime::now() - 2 * BLOB_GRACE;
        std::fs::File::open(store.content.blob_path(&orphan)).unwrap().set_modified(old).unwrap();
        let config = format!(r#"{{"architecture":"amd64","os":"linux","pad":"{}"}}"#, "c".repeat(50_000));
        let config = store.content.put_bytes(config.as_bytes(), None).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":50046}},"layers":[]}}"#
        );
        let manifest = store.content.put_bytes(manifest.as_bytes(), None).unwrap();
        let target = kiln_cache::images::Descriptor { media_type: "application/vnd.oci.image.manifest.v1+json".into(), digest: manifest, size: 1 };
        store.images.put("keep/me:1", &target).unwrap();
        let total = kiln_cache::usage::root_usage(root.path()).unwrap().total;

        // 170kB must go: the orphan blob, then "old", then "mid" go.
        let report = enforce_cap(&store, total - 170_000).unwrap();
        assert!(!report.still_over && report.after <= total - 170_000, "{report:?}");
        assert_eq!(report.after, kiln_cache::usage::root_usage(root.path()).unwrap().total);
        assert_eq!((report.removed.snapshots, report.removed.records, report.blobs), (2, 2, 1), "{report:?}");
        assert!(store.snapshots.exists("new") && !store.snapshots.exists("mid") && !store.snapshots.exists("old"));
        assert!(!store.content.exists(&orphan) && store.content.exists(&config));
        assert!(store.content.exists(&fresh), "a blob younger than the grace period stays");

        // Under the cap: nothing to do.
        assert_eq!(enforce_cap(&store, report.after).unwrap().removed, PruneReport::default());

        // A live lease keeps what is used after it started, whatever the cap.
        let lease = Lease::new(&store, "build").unwrap();
        assert!(kiln_cache::lease::use_snapshots(&store, &["new".into()]).unwrap());
        let report = enforce_cap(&store, 0).unwrap();
        assert!(report.still_over && store.snapshots.exists("new"), "{report:?}");
        drop(lease);
        let report = enforce_cap(&store, 0).unwrap();
        assert!(report.still_over, "image blobs are never collected");
        assert!(!store.snapshots.exists("new") && store.content.exists(&config));
        assert!(store.index.keys().unwrap().is_empty());
    }

    #[test]
    fn prune_takes_a_snapshot_a_power_loss_left_without_metadata() {
        // `commit_deferred` fsyncs nothing: a power loss before
        // `make_durable` may leave a snapshot dir with a torn meta.json,
        // which no record names (records are written after the sync).
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        snapshot(&store, "kept", 10, Duration::ZERO);
        let active = store.snapshots.prepare().unwrap();
        std::fs::write(active.fs().join("data"), b"x").unwrap();
        store.snapshots.commit_deferred(active, "torn", &Default::default()).unwrap();
        std::fs::write(root.path().join("snapshots/torn/meta.json"), b"").unwrap();
        assert_eq!(usage(&store).unwrap().unreferenced_snapshots, 1);
        let report = prune(&store, &PruneOptions::default()).unwrap();
        assert_eq!((report.snapshots, report.records), (1, 0), "{report:?}");
        assert!(!store.snapshots.exists("torn") && store.snapshots.exists("kept"));
        assert!(store.snapshots.unsynced().is_empty(), "a removed snapshot is owed no sync");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("ten").is_err() && parse_size("3 parsecs").is_err());
    }
}
