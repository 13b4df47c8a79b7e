//! Image names → manifests.
//!
//! One JSON file, `images/index.json`, maps each normalized reference
//! (`docker.io/library/busybox:latest`) to an [`ImageRecord`]: the manifest
//! descriptor plus what `kiln images` shows (image ID = config digest,
//! creation time, size). Manifests and configs live in the content store;
//! [`ImageStore::put`] reads them from there, so an image can only be named
//! once its manifest and config are stored. Updates are read-modify-write
//! under `images/index.lock` (flock) and written atomically, so concurrent
//! kiln processes never lose each other's tags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::content::ContentStore;
use crate::fsutil::write_atomic;
use crate::lock::FileLock;

/// A content descriptor (OCI `descriptor` without the optional fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type, e.g. `application/vnd.oci.image.manifest.v1+json`.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// One named image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Normalized reference, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// The image manifest.
    pub target: Descriptor,
    /// The image ID: digest of the config blob.
    pub config_digest: String,
    /// `created` from the image config (RFC 3339), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Config plus layer blob sizes, in bytes.
    pub size: u64,
}

/// Why an image lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image matches.
    #[error("no such image: {0}")]
    NotFound(String),
    /// An ID or digest prefix matches more than one image.
    #[error("image reference {query:?} is ambiguous: it matches {}", candidates.join(", "))]
    Ambiguous {
        /// What was asked for.
        query: String,
        /// Names of the matching images.
        candidates: Vec<String>,
    },
    /// The stored manifest is not an image manifest kiln understands.
    #[error("manifest {digest} is not a usable image manifest: {reason}")]
    BadManifest {
        /// The manifest digest.
        digest: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct IndexFile {
    #[serde(default)]
    images: BTreeMap<String, ImageRecord>,
}

/// The image store under `images/` of the store root.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    content: ContentStore,
}

impl ImageStore {
    /// Open under the store root.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("images");
        std::fs::create_dir_all(&dir)?;
        Ok(ImageStore { dir, content: ContentStore::open(root)? })
    }

    /// Name `target` (an image manifest already in the content store, with
    /// its config) as `name` (normalized here), replacing any image of that
    /// name. Returns the stored record.
    pub fn put(&self, name: &str, target: &Descriptor) -> anyhow::Result<ImageRecord> {
        let name = normalize_reference(name)?;
        let record = self.describe(&name, target)?;
        self.update(|index| {
            index.images.insert(name.clone(), record.clone());
            Ok(())
        })?;
        Ok(record)
    }

    /// The image called `name` (normalized here), if any.
    pub fn get(&self, name: &str) -> anyhow::Result<Option<ImageRecord>> {
        let name = normalize_reference(name)?;
        Ok(self.load()?.images.remove(&name))
    }

    /// Find an image by name, by image ID (config digest) or by manifest
    /// digest, either whole or as a unique hex prefix (at least 4 digits,
    /// `sha256:` optional), as `docker` does.
    pub fn resolve(&self, query: &str) -> anyhow::Result<ImageRecord> {
        let index = self.load()?;
        if let Ok(name) = normalize_reference(query)
            && let Some(record) = index.images.get(&name)
        {
            return Ok(record.clone());
        }
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        let is_prefix = hex.len() >= 4 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if is_prefix {
            let matches: Vec<&ImageRecord> = index
                .images
                .values()
                .filter(|r| {
                    r.config_digest.trim_start_matches("sha256:").starts_with(hex)
                        || r.target.digest.trim_start_matches("sha256:").starts_with(hex)
                })
                .collect();
            let mut distinct: Vec<&str> = matches.iter().map(|r| r.target.digest.as_str()).collect();
            distinct.sort();
            distinct.dedup();
            match distinct.len() {
                0 => {}
                1 => return Ok(matches[0].clone()),
                _ => {
                    return Err(ImageError::Ambiguous {
                        query: query.to_string(),
                        candidates: matches.iter().map(|r| r.name.clone()).collect(),
                    }
                    .into());
                }
            }
        }
        // `name@sha256:...` of an image we hold under another name.
        if let Some((_, digest)) = query.rsplit_once('@')
            && let Some(record) = index.images.values().find(|r| r.target.digest == digest)
        {
            return Ok(record.clone());
        }
        Err(ImageError::NotFound(query.to_string()).into())
    }

    /// Give the image found by `source` (see [`ImageStore::resolve`]) the
    /// additional name `target`.
    pub fn tag(&self, source: &str, target: &str) -> anyhow::Result<ImageRecord> {
        let found = self.resolve(source)?;
        self.put(target, &found.target)
    }

    /// Remove the name `name` (normalized here); returns what it named.
    /// The blobs stay until garbage collection.
    pub fn remove(&self, name: &str) -> anyhow::Result<ImageRecord> {
        let name = normalize_reference(name)?;
        let mut removed = None;
        self.update(|index| {
            removed = index.images.remove(&name);
            Ok(())
        })?;
        removed.ok_or_else(|| ImageError::NotFound(name).into())
    }

    /// All images, sorted by name.
    pub fn list(&self) -> anyhow::Result<Vec<ImageRecord>> {
        Ok(self.load()?.images.into_values().collect())
    }

    fn describe(&self, name: &str, target: &Descriptor) -> anyhow::Result<ImageRecord> {
        let bad = |reason: String| ImageError::BadManifest { digest: target.digest.clone(), reason };
        let bytes = self.content.read(&target.digest)?;
        let manifest: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let config = manifest.get("config").ok_or_else(|| bad("no `config` (an index?)".into()))?;
        let config_digest = config
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("config has no digest".into()))?
            .to_string();
        let config_bytes = self.content.read(&config_digest)?;
        let config_json: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("config {config_digest} is not JSON: {e}")))?;
        let created = config_json.get("created").and_then(|c| c.as_str()).map(str::to_string);
        let layers = manifest.get("layers").and_then(|l| l.as_array()).cloned().unwrap_or_default();
        let size = config_bytes.len() as u64
            + layers.iter().filter_map(|l| l.get("size").and_then(|s| s.as_u64())).sum::<u64>();
        Ok(ImageRecord { name: name.to_string(), target: target.clone(), config_digest, created, size })
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn load(&self) -> anyhow::Result<IndexFile> {
        match std::fs::read(self.index_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: corrupt image index: {e}", self.index_path().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IndexFile::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn update(&self, change: impl FnOnce(&mut IndexFile) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let _lock = FileLock::exclusive(&self.dir.join("index.lock"))?;
        let mut index = self.load()?;
        let before = index.clone();
        change(&mut index)?;
        // Naming an image again as it already is (every unchanged rebuild
        // with `-t`) writes nothing: no temp file, no fsyncs.
        if index != before {
            write_atomic(&self.index_path(), &serde_json::to_vec_pretty(&index)?)?;
        }
        Ok(())
    }
}

/// Normalize an image reference the way docker does:
/// `busybox` → `docker.io/library/busybox:latest`,
/// `127.0.0.1:5000/x/y` → `127.0.0.1:5000/x/y:latest`; a digest
/// (`name@sha256:...`) is kept and then no default tag is added.
pub fn normalize_reference(reference: &str) -> anyhow::Result<String> {
    let bad = |why: &str| anyhow::anyhow!("invalid image reference {reference:?}: {why}");
    if reference.is_empty() {
        return Err(bad("empty"));
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => {
            crate::content::digest_hex(d).map_err(|_| bad("the digest must be sha256:<64 hex digits>"))?;
            (n, Some(d))
        }
        None => (reference, None),
    };
    let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" { "docker.io".to_string() } else { domain };
    let path = if domain == "docker.io" && !path.contains('/') { format!("library/{path}") } else { path };
    let path_ok = !path.is_empty()
        && path.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        });
    if !path_ok {
        return Err(bad("repository names are lowercase letters, digits and . _ - separated by /"));
    }
    let mut out = format!("{domain}/{path}");
    match (tag, digest) {
        (Some(t), _) => {
            let tag_ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                && !t.starts_with(['.', '-']);
            if !tag_ok {
                return Err(bad("tags are up to 128 letters, digits, . _ -"));
            }
            out.push(':');
            out.push_str(t);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

/// The short form docker prints: `docker.io/library/busybox:latest` →
/// `busybox:latest`, `docker.io/foo/bar:1` → `foo/bar:1`.
pub fn familiar_name(normalized: &str) -> &str {
    normalized
        .strip_prefix("docker.io/library/")
        .or_else(|| normalized.strip_prefix("docker.io/"))
        .unwrap_or(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::sha256_digest;

    #[test]
    fn normalizes_like_docker() {
        let n = |s| normalize_reference(s).unwrap();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(n("foo/bar"), "docker.io/foo/bar:latest");
        assert_eq!(n("index.docker.io/library/alpine:3"), "docker.io/library/alpine:3");
        assert_eq!(n("127.0.0.1:5000/x/y"), "127.0.0.1:5000/x/y:latest");
        assert_eq!(n("localhost/app:v1"), "localhost/app:v1");
        let d = sha256_digest(b"x");
        assert_eq!(n(&format!("busybox@{d}")), format!("docker.io/library/busybox@{d}"));
        assert_eq!(familiar_name("docker.io/library/busybox:latest"), "busybox:latest");
        for bad in ["", "UPPER", "a//b", "x:", "x@sha256:zz", "x:-bad"] {
            assert!(normalize_reference(bad).is_err(), "{bad:?} should be refused");
        }
    }

    /// Store a config and a one-layer manifest; returns the manifest descriptor.
    fn store_image(root: &Path, created: &str) -> Descriptor {
        let cs = ContentStore::open(root).unwrap();
        let config = format!(r#"{{"created":"{created}","architecture":"amd64","os":"linux"}}"#);
        let config_digest = cs.put_bytes(config.as_bytes(), None).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1000}}]}}"#,
            config.len(),
            sha256_digest(b"layer")
        );
        let digest = cs.put_bytes(manifest.as_bytes(), None).unwrap();
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest,
            size: manifest.len() as u64,
        }
    }

    #[test]
    fn naming_an_image_as_it_already_is_writes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path()).unwrap();
        let first = store_image(dir.path(), "2024-01-02T03:04:05Z");
        images.put("app", &first).unwrap();
        let index = dir.path().join("images/index.json");
        let inode = || std::fs::metadata(&index).unwrap().ino();
        let before = inode();
        images.put("app", &first).unwrap();
        assert_eq!(inode(), before, "an unchanged name is not rewritten");
        // A new target (or a new name) is written, by a rename (new inode).
        let second = store_image(dir.path(), "2025-01-02T03:04:05Z");
        images.put("app", &second).unwrap();
        assert_ne!(inode(), before);
        assert_eq!(images.get("app").unwrap().unwrap().target, second);
    }

    #[test]
    fn put_tag_resolve_remove() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path()).unwrap();
        let target = store_image(dir.path(), "2024-01-02T03:04:05Z");
        let rec = images.put("busybox", &target).unwrap();
        assert_eq!(rec.name, "docker.io/library/busybox:latest");
        assert_eq!(rec.created.as_deref(), Some("2024-01-02T03:04:05Z"));
        assert!(rec.size > 1000);

        images.tag("busybox:latest", "127.0.0.1:5000/me/bb:v1").unwrap();
        let names: Vec<String> = images.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["127.0.0.1:5000/me/bb:v1", "docker.io/library/busybox:latest"]);

        // By ID prefix, by manifest digest, by name@digest.
        let id = rec.config_digest.trim_start_matches("sha256:");
        assert_eq!(images.resolve(&id[..12]).unwrap().target, target);
        assert_eq!(images.resolve(&target.digest).unwrap().target, target);
        assert_eq!(images.resolve(&format!("other@{}", target.digest)).unwrap().target, target);

        images.remove("127.0.0.1:5000/me/bb:v1").unwrap();
        assert_eq!(images.list().unwrap().len(), 1);
        assert!(images.remove("127.0.0.1:5000/me/bb:v1").is_err());
        let err = images.resolve("nothere").unwrap_err();
        assert!(matches!(err.downcast_ref::<ImageError>(), Some(ImageError::NotFound(_))));
    }

    #[test]
    fn ambiguous_prefix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path()).unwrap();
        let record = |name: &str, id_hex: String, manifest_hex: String| ImageRecord {
            name: name.into(),
            target: Descriptor { media_type: "m".into(), digest: format!("sha256:{manifest_hex}"), size: 1 },
            config_digest: format!("sha256:{id_hex}"),
            created: None,
            size: 1,
        };
        images
            .update(|index| {
                let a = record("docker.io/library/a:latest", format!("abcd1{}", "0".repeat(59)), "1".repeat(64));
                let b = record("docker.io/library/b:latest", format!("abcd2{}", "0".repeat(59)), "2".repeat(64));
                index.images.insert(a.name.clone(), a);
                index.images.insert(b.name.clone(), b);
                Ok(())
            })
            .unwrap();
        let err = images.resolve("abcd").unwrap_err();
        assert!(matches!(err.downcast_ref::<ImageError>(), Some(ImageError::Ambiguous { .. })), "{err}");
        assert_eq!(images.resolve("abcd1").unwrap().name, "docker.io/library/a:latest");
        assert_eq!(images.resolve("sha256:abcd2").unwrap().name, "docker.io/library/b:latest");
        assert!(images.resolve("abc").is_err(), "prefixes shorter than 4 digits are not IDs");
    }

    #[test]
    fn put_needs_the_manifest_in_the_content_store() {
        let dir = tempfile::tempdir().unwrap();
        let images = ImageStore::open(dir.path()).unwrap();
        let missing = Descriptor { media_type: "x".into(), digest: sha256_digest(b"missing"), size: 1 };
        assert!(images.put("x", &missing).is_err());
        assert!(images.list().unwrap().is_empty());
    }
}
