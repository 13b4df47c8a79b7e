//! Blobs by digest, written atomically and verified while they stream in.
//!
//! Layout (as an OCI image layout): `blobs/sha256/<hex>` under the store
//! root. A blob is written through a [`Writer`] into a temp file under
//! `tmp/ingest/`, hashed on the way, and only [`Writer::commit`] makes it
//! visible: it checks the expected digest and size, fsyncs, and renames it
//! into place. A mismatch is a typed [`ContentError`] and leaves nothing
//! behind. Committing a blob that already exists keeps the existing file.
//!
//! Each in-flight writer holds a `flock` on its temp file, so
//! [`ContentStore::remove_stale_ingests`] can tell the leftovers of a dead
//! process from the work of a live one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::fsutil::{sync_dir, unique_name};
use crate::lock::FileLock;

/// What can go wrong with blobs.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The digest is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    /// No blob with this digest in the store.
    #[error("blob {0} not found in the content store")]
    NotFound(String),
    /// The bytes did not hash to the digest they were announced with.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the caller expected.
        expected: String,
        /// The digest of the bytes actually received.
        actual: String,
    },
    /// The bytes did not have the announced length.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob's (expected) digest.
        digest: String,
        /// The size the caller expected.
        expected: u64,
        /// The number of bytes actually received.
        actual: u64,
    },
    /// A filesystem error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Check that `digest` is `sha256:<64 lowercase hex>`; returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ContentError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| ContentError::InvalidDigest(digest.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ContentError::InvalidDigest(digest.to_string()));
    }
    Ok(hex)
}

/// One blob in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// `blobs/sha256/<hex>` under the store root.
#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("tmp").join("ingest");
        std::fs::create_dir_all(&blobs)?;
        std::fs::create_dir_all(&ingest)?;
        Ok(ContentStore { blobs, ingest })
    }

    /// Path of a blob (which may not exist), for a digest `sha256:<hex>`.
    /// Use [`ContentStore::open_blob`] to read: this does not validate.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.blobs.join(hex)
    }

    /// Start writing a new blob.
    pub fn writer(&self) -> Result<Writer, ContentError> {
        let path = self.ingest.join(unique_name("w-"));
        let file = OpenOptions::new().write(true).read(true).create_new(true).open(&path)?;
        let lock_handle = file.try_clone()?;
        // Nobody else can know this fresh name yet, so the lock is free.
        let lock = FileLock::try_exclusive_file(lock_handle, &path)?;
        Ok(Writer {
            store: self.clone(),
            temp: Some(path),
            file: Some(std::io::BufWriter::with_capacity(256 * 1024, file)),
            _lock: lock,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Store `bytes` as a blob and return its digest. With `expected`, the
    /// bytes must hash to it.
    pub fn put_bytes(&self, bytes: &[u8], expected: Option<&str>) -> Result<String, ContentError> {
        let actual = sha256_digest(bytes);
        if let Some(expected) = expected {
            digest_hex(expected)?;
            if actual != expected {
                return Err(ContentError::DigestMismatch { expected: expected.to_string(), actual });
            }
        }
        // A blob already stored (an unchanged rebuild's config and
        // manifest) costs no temp file.
        if self.exists(&actual) {
            return Ok(actual);
        }
        let mut writer = self.writer()?;
        writer.write_all(bytes)?;
        writer.commit(expected, Some(bytes.len() as u64))
    }

    /// Copy everything `reader` yields into a blob; returns `(digest, size)`.
    /// With `expected_digest`, a mismatch is an error and nothing is kept.
    pub fn put_reader(
        &self,
        reader: &mut dyn Read,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<(String, u64), ContentError> {
        let mut writer = self.writer()?;
        let size = std::io::copy(reader, &mut writer)?;
        let digest = writer.commit(expected_digest, expected_size)?;
        Ok((digest, size))
    }

    /// Whether blob `digest` is in the store.
    pub fn exists(&self, digest: &str) -> bool {
        digest_hex(digest).is_ok() && self.blob_path(digest).is_file()
    }

    /// Size in bytes of blob `digest`.
    pub fn size(&self, digest: &str) -> Result<u64, ContentError> {
        digest_hex(digest)?;
        match std::fs::metadata(self.blob_path(digest)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ContentError::NotFound(digest.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Open blob `digest` for reading (not re-verified: blobs are verified
    /// when they enter the store and never change afterwards).
    pub fn open_blob(&self, digest: &str) -> Result<File, ContentError> {
        digest_hex(digest)?;
        match File::open(self.blob_path(digest)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ContentError::NotFound(digest.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole of blob `digest`, checked against its digest (meant for
    /// small blobs: manifests, configs).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, ContentError> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?.read_to_end(&mut bytes)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(ContentError::DigestMismatch { expected: digest.to_string(), actual });
        }
        Ok(bytes)
    }

    /// Delete blob `digest`; `false` if it was not there.
    pub fn delete(&self, digest: &str) -> Result<bool, ContentError> {
        digest_hex(digest)?;
        match std::fs::remove_file(self.blob_path(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// All blobs, sorted by digest.
    pub fn list(&self) -> Result<Vec<BlobInfo>, ContentError> {
        let mut blobs = Vec::new();
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
            if digest_hex(&digest).is_err() {
                continue;
            }
            blobs.push(BlobInfo { digest, size: entry.metadata()?.len() });
        }
        blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(blobs)
    }

    /// Remove temp files of writers whose process is gone (their lock is
    /// free). Returns how many were removed. Safe while other processes
    /// write: a live writer's temp file is locked and skipped.
    pub fn remove_stale_ingests(&self) -> Result<usize, ContentError> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.ingest)? {
            let path = entry?.path();
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue; // committed or removed meanwhile
            };
            if let Some(_lock) = FileLock::try_exclusive_file(file, &path)?
                && std::fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A blob being written: hashes every byte; nothing is visible in the store
/// until [`Writer::commit`]. Dropping it uncommitted removes the temp file.
pub struct Writer {
    store: ContentStore,
    temp: Option<PathBuf>,
    file: Option<std::io::BufWriter<File>>,
    _lock: Option<FileLock>,
    hasher: Sha256,
    written: u64,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("temp", &self.temp).field("written", &self.written).finish()
    }
}

impl Writer {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Digest of the bytes written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Finish the blob: check `expected_digest` / `expected_size` (when
    /// given), fsync and rename it to `blobs/sha256/<hex>`. Returns the
    /// digest. On a mismatch the temp file is removed and nothing is stored.
    /// If the blob already exists it is kept as is (same digest, same bytes).
    pub fn commit(mut self, expected_digest: Option<&str>, expected_size: Option<u64>) -> Result<String, ContentError> {
        let actual = self.digest();
        if let Some(expected) = expected_digest {
            digest_hex(expected)?;
            if expected != actual {
                return Err(ContentError::DigestMismatch { expected: expected.to_string(), actual });
            }
        }
        if let Some(expected) = expected_size
            && expected != self.written
        {
            return Err(ContentError::SizeMismatch { digest: actual, expected, actual: self.written });
        }
        let file = self.file.take().expect("writer used after commit");
        let file = file.into_inner().map_err(|e| e.into_error())?;
        let target = self.store.blob_path(&actual);
        let temp = self.temp.clone().expect("writer used after commit");
        if target.exists() {
            return Ok(actual); // Drop removes the temp file.
        }
        file.sync_all()?;
        std::fs::rename(&temp, &target)?;
        self.temp = None;
        sync_dir(&self.store.blobs)?;
        Ok(actual)
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("writer already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        (dir, cs)
    }

    fn ingest_is_empty(dir: &Path) -> bool {
        std::fs::read_dir(dir.join("tmp/ingest")).unwrap().next().is_none()
    }

    #[test]
    fn write_commit_read_roundtrip() {
        let (dir, cs) = store();
        let mut w = cs.writer().unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let digest = w.commit(Some(&sha256_digest(b"hello world")), Some(11)).unwrap();
        assert_eq!(digest, sha256_digest(b"hello world"));
        assert!(cs.exists(&digest));
        assert_eq!(cs.size(&digest).unwrap(), 11);
        assert_eq!(cs.read(&digest).unwrap(), b"hello world");
        assert_eq!(cs.list().unwrap(), vec![BlobInfo { digest: digest.clone(), size: 11 }]);
        assert!(ingest_is_empty(dir.path()));
        assert!(cs.delete(&digest).unwrap());
        assert!(!cs.exists(&digest));
        assert!(!cs.delete(&digest).unwrap());
    }

    #[test]
    fn digest_mismatch_leaves_nothing() {
        let (dir, cs) = store();
        let wrong = sha256_digest(b"something else");
        let mut w = cs.writer().unwrap();
        w.write_all(b"payload").unwrap();
        match w.commit(Some(&wrong), None) {
            Err(ContentError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, sha256_digest(b"payload"));
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert!(cs.list().unwrap().is_empty());
        assert!(ingest_is_empty(dir.path()));
        assert!(matches!(cs.put_bytes(b"payload", Some(&wrong)), Err(ContentError::DigestMismatch { .. })));
        assert!(cs.list().unwrap().is_empty());
    }

    #[test]
    fn size_mismatch_leaves_nothing() {
        let (dir, cs) = store();
        let mut w = cs.writer().unwrap();
        w.write_all(b"12345").unwrap();
        assert!(matches!(w.commit(None, Some(4)), Err(ContentError::SizeMismatch { expected: 4, actual: 5, .. })));
        assert!(cs.list().unwrap().is_empty());
        assert!(ingest_is_empty(dir.path()));
    }

    #[test]
    fn existing_blob_is_not_rewritten() {
        let (_dir, cs) = store();
        let d = cs.put_bytes(b"same", None).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cs.blob_path(&d)).unwrap());
        let d2 = cs.put_bytes(b"same", None).unwrap();
        let d3 = cs.put_bytes(b"same", Some(&d)).unwrap();
        assert_eq!((d2.as_str(), d3.as_str()), (d.as_str(), d.as_str()));
        let ino2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cs.blob_path(&d)).unwrap());
        assert_eq!(ino, ino2);
    }

    #[test]
    fn invalid_and_missing_digests_are_typed_errors() {
        let (_dir, cs) = store();
        assert!(matches!(cs.read("sha256:../../etc/passwd"), Err(ContentError::InvalidDigest(_))));
        assert!(matches!(cs.read("md5:abc"), Err(ContentError::InvalidDigest(_))));
        let missing = sha256_digest(b"nope");
        assert!(matches!(cs.read(&missing), Err(ContentError::NotFound(_))));
        assert!(matches!(cs.size(&missing), Err(ContentError::NotFound(_))));
    }

    #[test]
    fn dropped_writer_and_stale_ingests_are_cleaned() {
        let (dir, cs) = store();
        let mut w = cs.writer().unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert!(ingest_is_empty(dir.path()));
        // A live writer is skipped; an unlocked leftover (dead process) goes.
        let live = cs.writer().unwrap();
        std::fs::write(dir.path().join("tmp/ingest/w-dead"), b"junk").unwrap();
        assert_eq!(cs.remove_stale_ingests().unwrap(), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp/ingest")).unwrap().count(), 1);
        drop(live);
        assert!(ingest_is_empty(dir.path()));
    }
}
