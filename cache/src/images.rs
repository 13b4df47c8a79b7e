//! Image names → manifest digests.
//! (Skeleton: the store issue fills this in.)

use std::path::{Path, PathBuf};

/// The image store under `images/` of the store root.
pub struct ImageStore {
    #[allow(dead_code)]
    dir: PathBuf,
}

impl ImageStore {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("images");
        std::fs::create_dir_all(&dir)?;
        Ok(ImageStore { dir })
    }
}
