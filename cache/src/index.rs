//! Cache key → result records.
//!
//! The index stores opaque JSON records (the solver defines their shape)
//! under `cache/<hex of key>.json`, each written atomically. Keys are
//! `sha256:<hex>` strings.

use std::path::{Path, PathBuf};

use crate::fsutil::write_atomic;

/// The cache index under `cache/` of the store root.
pub struct CacheIndex {
    dir: PathBuf,
}

impl CacheIndex {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("cache");
        std::fs::create_dir_all(&dir)?;
        Ok(CacheIndex { dir })
    }

    /// The record stored for `key`, if any.
    pub fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(key)?) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Store `record` for `key`, replacing any older one.
    pub fn put(&self, key: &str, record: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.path(key)?, record)?;
        Ok(())
    }

    /// Forget `key`.
    pub fn remove(&self, key: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.path(key)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// All keys in the index.
    pub fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".json") {
                keys.push(format!("sha256:{hex}"));
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        let hex = key.strip_prefix("sha256:").unwrap_or(key);
        anyhow::ensure!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "invalid cache key {key:?}"
        );
        Ok(self.dir.join(format!("{hex}.json")))
    }
}
