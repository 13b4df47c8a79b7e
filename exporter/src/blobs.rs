//! The exporter's only contact with the content store's write side.
//!
//! Until the store's hashing `Writer` + `commit(expected)` is on main, a
//! blob streams into a temp file beside its final place and is renamed to
//! `blob_path(digest)` once its digest is known. Switch here, nowhere else.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use kiln_cache::content::ContentStore;
use kiln_cache::fsutil::{sync_dir, unique_name, write_atomic};

use crate::compression::sha256_digest;

/// A blob being written; becomes visible only through [`BlobWriter::commit`].
pub struct BlobWriter {
    tmp: PathBuf,
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    final_path: Box<dyn Fn(&str) -> PathBuf + Send>,
}

impl BlobWriter {
    /// Start a blob in `content`.
    pub fn new(content: &ContentStore) -> anyhow::Result<BlobWriter> {
        // The blob directory, from the path of any digest.
        let dir = content.blob_path("sha256:0").parent().expect("blob dir").to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(unique_name(".ingest-"));
        let file = File::options().write(true).create_new(true).open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let blob_dir = dir.clone();
        Ok(BlobWriter {
            tmp,
            dir,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            final_path: Box::new(move |digest| blob_dir.join(digest.strip_prefix("sha256:").unwrap_or(digest))),
        })
    }

    /// Make the written bytes the blob `digest` (which the caller hashed
    /// while writing). An existing blob of that digest is kept.
    pub fn commit(mut self, digest: &str) -> anyhow::Result<()> {
        let file = self.file.take().expect("not committed twice");
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let dest = (self.final_path)(digest);
        if dest.exists() {
            // Same digest, same bytes: keep the old file (and its inode).
            std::fs::remove_file(&self.tmp)?;
        } else {
            std::fs::rename(&self.tmp, &dest)?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("open until commit").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("open until commit").flush()
    }
}

/// Store small `bytes` (a config or manifest) as a blob; returns its digest.
pub fn put_blob(content: &ContentStore, bytes: &[u8]) -> anyhow::Result<String> {
    let digest = sha256_digest(bytes);
    let path = content.blob_path(&digest);
    if !path.is_file() {
        write_atomic(&path, bytes).with_context(|| format!("writing blob {digest}"))?;
    }
    Ok(digest)
}

/// Read a whole blob, checking it against its digest.
pub fn read_blob(content: &ContentStore, digest: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(content.blob_path(digest)).with_context(|| format!("blob {digest} is not in the store"))?;
    anyhow::ensure!(sha256_digest(&bytes) == digest, "blob {digest} in the store is corrupt (digest mismatch)");
    Ok(bytes)
}
