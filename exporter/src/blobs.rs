//! The exporter's only contact with the content store's write side: layer
//! blobs stream through the store's hashing `Writer` and become visible
//! only on `commit(expected digest, size)`.

use anyhow::Context;
use kiln_cache::content::{ContentStore, Writer};

/// Start a blob in `content`.
pub(crate) fn blob_writer(content: &ContentStore) -> anyhow::Result<Writer> {
    content.writer().context("starting a blob in the content store")
}

/// Make the bytes written the blob `digest` of `size` bytes (which the
/// caller measured while writing; the store checks them again).
pub(crate) fn commit_blob(writer: Writer, digest: &str, size: u64) -> anyhow::Result<()> {
    writer.commit(Some(digest), Some(size)).with_context(|| format!("storing blob {digest}"))?;
    Ok(())
}

/// Store small `bytes` (a config or manifest) as a blob; returns its digest.
pub(crate) fn put_blob(content: &ContentStore, bytes: &[u8]) -> anyhow::Result<String> {
    content.put_bytes(bytes, None).context("storing a blob")
}

/// Read a whole (small) blob, checked against its digest.
pub fn read_blob(content: &ContentStore, digest: &str) -> anyhow::Result<Vec<u8>> {
    Ok(content.read(digest)?)
}
