//! Blobs by digest, written atomically and verified while they stream in.
//! (Skeleton: the store issue fills this in.)

use std::path::{Path, PathBuf};

/// `blobs/sha256/<hex>` under the store root.
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir)?;
        Ok(ContentStore { root: root.to_path_buf() })
    }

    /// Path of a blob (which may not exist), for a digest `sha256:<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs").join("sha256").join(hex)
    }
}
