//! kiln's content-addressed store: everything a build keeps on disk.
//!
//! One [`Store`] lives under a root directory and holds four parts, each
//! with one concern (after containerd's content store and snapshotter):
//!
//! - [`content::ContentStore`] — blobs by digest (`blobs/sha256/<hex>`, as
//!   in an OCI layout). A blob becomes visible only through
//!   `Writer::commit(expected_digest)`, which hashes while writing, fsyncs
//!   and renames; a mismatch leaves nothing behind.
//! - [`snapshots::Snapshotter`] — layer directories in overlay format
//!   (whiteouts are 0/0 char devices, opaque dirs carry
//!   `trusted.overlay.opaque`), usable as overlayfs lowerdirs. A snapshot is
//!   prepared (mutable, with a work dir beside it), then committed under an id
//!   (immutable); pulled layers are keyed by diff ID and shared.
//! - [`index::CacheIndex`] — cache key → result record (the snapshot chain
//!   and anything the solver needs to reuse a step).
//! - [`images::ImageStore`] — image names → manifest digests.
//! - [`remote`] — the format of a build cache shared through a directory
//!   or a registry (`--cache-to` / `--cache-from`).
//! - [`layered::LayeredView`] — a merged read-only view of a layer chain
//!   (whiteouts, opaque dirs, symlinks resolved inside the root).
//!
//! Every write is atomic (temp file + fsync + rename); a crash at any point
//! leaves the store consistent, with leftovers under `tmp/` that the next
//! open removes. Build steps commit their snapshots without fsyncs and
//! make them durable before the cache record naming them (see
//! [`snapshots`]).
#![deny(missing_docs)]

pub mod check;
pub mod content;
pub mod fsutil;
pub mod images;
pub mod index;
pub mod layered;
pub mod lease;
pub mod lock;
pub mod remote;
pub mod snapshots;
pub mod usage;

use std::path::{Path, PathBuf};

/// The whole store under one root.
pub struct Store {
    root: PathBuf,
    /// Blobs by digest.
    pub content: content::ContentStore,
    /// Layer directories.
    pub snapshots: snapshots::Snapshotter,
    /// Cache key → result.
    pub index: index::CacheIndex,
    /// Names → manifests.
    pub images: images::ImageStore,
}

impl Store {
    /// Open (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(root)?;
        let store = Store {
            root: root.to_path_buf(),
            content: content::ContentStore::open(root)?,
            snapshots: snapshots::Snapshotter::open(root)?,
            index: index::CacheIndex::open(root)?,
            images: images::ImageStore::open(root)?,
        };
        // What dead processes left under tmp/; live work is locked and kept.
        check::clean_tmp(&store)?;
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A private scratch directory on the store's filesystem, removed when
    /// dropped (or by the next open if the process dies).
    pub fn scratch_dir(&self) -> anyhow::Result<check::ScratchDir> {
        check::ScratchDir::new(&self.root)
    }

    /// Hold the store-wide lock `name` (`locks/<name>.lock`) exclusively
    /// until the returned guard drops; blocks while another process holds it.
    /// Used for work that must happen once per store, e.g. unpacking one
    /// layer or garbage collection.
    pub fn lock(&self, name: &str) -> anyhow::Result<lock::FileLock> {
        anyhow::ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "invalid lock name {name:?}"
        );
        Ok(lock::FileLock::exclusive(&self.root.join("locks").join(format!("{name}.lock")))?)
    }
}
