//! Images from the content store as files: an OCI image layout (directory
//! or tar) and a docker-archive (`docker load` / `podman load`).
//!
//! The docker-archive is written as containerd and BuildKit write it: an
//! OCI layout plus `manifest.json` (and `repositories`), the layers being
//! the compressed blobs themselves (docker and podman detect the
//! compression). Tars list their entries in a fixed order with fixed
//! owners and times, so the same images give the same bytes.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use kiln_cache::Store;
use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageIndexBuilder, ImageManifest, MediaType};
use serde::Serialize;

use crate::blobs::read_blob;
use crate::dest::StagedDest;
use crate::image::{MEDIA_TYPE_OCI_INDEX, annotations, canonical_json};
use crate::output::OciDest;

/// An image to write: its manifest in the content store and an optional
/// name (`repo:tag`).
#[derive(Debug, Clone)]
pub struct NamedImage {
    /// Descriptor of the image manifest.
    pub manifest: Descriptor,
    /// Name to record, e.g. `example.com/app:1.0`.
    pub name: Option<String>,
}

/// containerd's annotation for the full image name.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// `repo:tag` → (`repo`, `tag`), tag `latest` if none. Digest references
/// cannot name an image in an archive.
pub fn split_name(name: &str) -> anyhow::Result<(&str, &str)> {
    anyhow::ensure!(!name.contains('@'), "image name {name:?}: a digest reference cannot be used as a name here");
    anyhow::ensure!(!name.is_empty() && !name.contains(char::is_whitespace), "invalid image name {name:?}");
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    Ok(match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
        None => (name, "latest"),
    })
}

/// One image's blobs: manifest, config, layers (digest, size).
struct ImageBlobs {
    manifest: Descriptor,
    config: String,
    layers: Vec<String>,
    name: Option<String>,
}

fn image_blobs(store: &Store, image: &NamedImage) -> anyhow::Result<ImageBlobs> {
    let digest = image.manifest.digest().to_string();
    let bytes = read_blob(&store.content, &digest)?;
    let manifest = ImageManifest::from_reader(&bytes[..])
        .with_context(|| format!("manifest {digest} is not an image manifest (image indexes are not supported here)"))?;
    let config = manifest.config().digest().to_string();
    let layers: Vec<String> = manifest.layers().iter().map(|l| l.digest().to_string()).collect();
    for blob in std::iter::once(&config).chain(&layers) {
        anyhow::ensure!(store.content.blob_path(blob).is_file(), "blob {blob} of image {digest} is missing from the store");
    }
    if let Some(name) = &image.name {
        split_name(name)?;
    }
    Ok(ImageBlobs { manifest: image.manifest.clone(), config, layers, name: image.name.clone() })
}

/// All blob digests, sorted and unique.
fn all_blobs(images: &[ImageBlobs]) -> Vec<String> {
    let mut blobs: Vec<String> = images
        .iter()
        .flat_map(|i| std::iter::once(i.manifest.digest().to_string()).chain(std::iter::once(i.config.clone())).chain(i.layers.clone()))
        .collect();
    blobs.sort();
    blobs.dedup();
    blobs
}

fn blob_name(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn index_json(images: &[ImageBlobs]) -> anyhow::Result<Vec<u8>> {
    let mut manifests = Vec::new();
    for image in images {
        let mut desc = image.manifest.clone();
        let notes = match &image.name {
            Some(name) => {
                let (_, tag) = split_name(name)?;
                annotations(&[(ANNOTATION_CONTAINERD_NAME, name), (ANNOTATION_REF_NAME, tag)])
            }
            // Tools address an image in a layout by its ref name.
            None => annotations(&[(ANNOTATION_REF_NAME, "latest")]),
        };
        desc.set_annotations(Some(notes));
        manifests.push(desc);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(MEDIA_TYPE_OCI_INDEX))
        .manifests(manifests)
        .build()?;
    canonical_json(&index)
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes tar entries with fixed owner, modes and time.
struct TarOut<W: Write> {
    tar: tar::Builder<W>,
    mtime: u64,
}

impl<W: Write> TarOut<W> {
    fn header(&self, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(self.mtime);
        h
    }
    fn dir(&mut self, name: &str) -> anyhow::Result<()> {
        let mut h = self.header(tar::EntryType::Directory, 0, 0o755);
        self.tar.append_data(&mut h, name, std::io::empty())?;
        Ok(())
    }
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let mut h = self.header(tar::EntryType::Regular, bytes.len() as u64, 0o644);
        self.tar.append_data(&mut h, name, bytes)?;
        Ok(())
    }
    fn blob(&mut self, store: &Store, digest: &str) -> anyhow::Result<()> {
        let path = store.content.blob_path(digest);
        let file = std::fs::File::open(&path).with_context(|| format!("opening blob {digest}"))?;
        let size = file.metadata()?.len();
        let mut h = self.header(tar::EntryType::Regular, size, 0o644);
        self.tar.append_data(&mut h, blob_name(digest), std::io::Read::take(file, size))?;
        Ok(())
    }
    fn blobs(&mut self, store: &Store, images: &[ImageBlobs]) -> anyhow::Result<()> {
        self.dir("blobs/")?;
        self.dir("blobs/sha256/")?;
        for digest in all_blobs(images) {
            self.blob(store, &digest)?;
        }
        Ok(())
    }
    fn finish(self) -> anyhow::Result<W> {
        Ok(self.tar.into_inner()?)
    }
}

fn resolve(store: &Store, images: &[NamedImage]) -> anyhow::Result<Vec<ImageBlobs>> {
    anyhow::ensure!(!images.is_empty(), "no images to write");
    images.iter().map(|i| image_blobs(store, i)).collect()
}

/// Write an OCI layout tar of `images` into `out`; `mtime` for entries.
pub fn write_oci_tar<W: Write>(store: &Store, images: &[NamedImage], out: W, mtime: i64) -> anyhow::Result<W> {
    let images = resolve(store, images)?;
    let mut tar = TarOut { tar: tar::Builder::new(out), mtime: mtime.max(0) as u64 };
    tar.bytes("oci-layout", OCI_LAYOUT)?;
    tar.bytes("index.json", &index_json(&images)?)?;
    tar.blobs(store, &images)?;
    tar.finish()
}

/// Write an OCI layout of `images` into the existing empty directory `dir`.
pub fn write_oci_dir(store: &Store, images: &[NamedImage], dir: &Path) -> anyhow::Result<()> {
    let images = resolve(store, images)?;
    std::fs::write(dir.join("oci-layout"), OCI_LAYOUT)?;
    std::fs::write(dir.join("index.json"), index_json(&images)?)?;
    std::fs::create_dir_all(dir.join("blobs").join("sha256"))?;
    for digest in all_blobs(&images) {
        std::fs::copy(store.content.blob_path(&digest), dir.join(blob_name(&digest)))
            .with_context(|| format!("copying blob {digest}"))?;
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Write a docker-archive of `images` into `out`; `mtime` for entries.
pub fn write_docker_tar<W: Write>(store: &Store, images: &[NamedImage], out: W, mtime: i64) -> anyhow::Result<W> {
    let images = resolve(store, images)?;
    let mut entries = Vec::new();
    // repo → tag → top layer (the legacy `repositories` file).
    let mut repositories: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> = Default::default();
    for image in &images {
        let mut repo_tags = Vec::new();
        if let Some(name) = &image.name {
            let (repo, tag) = split_name(name)?;
            repo_tags.push(format!("{repo}:{tag}"));
            if let Some(top) = image.layers.last() {
                let hex = top.strip_prefix("sha256:").unwrap_or(top).to_string();
                repositories.entry(repo.to_string()).or_default().insert(tag.to_string(), hex);
            }
        }
        entries.push(DockerManifestEntry {
            config: blob_name(&image.config),
            repo_tags,
            layers: image.layers.iter().map(|l| blob_name(l)).collect(),
        });
    }
    let mut tar = TarOut { tar: tar::Builder::new(out), mtime: mtime.max(0) as u64 };
    tar.bytes("oci-layout", OCI_LAYOUT)?;
    tar.bytes("index.json", &index_json(&images)?)?;
    tar.bytes("manifest.json", &serde_json::to_vec(&entries)?)?;
    if !repositories.is_empty() {
        tar.bytes("repositories", &serde_json::to_vec(&repositories)?)?;
    }
    tar.blobs(store, &images)?;
    tar.finish()
}

/// Write `images` as an OCI layout at `dest` (staged, then renamed).
pub fn save_oci(store: &Store, images: &[NamedImage], dest: &OciDest, mtime: i64) -> anyhow::Result<()> {
    match dest {
        OciDest::Tar(path) => {
            let (staged, file) = StagedDest::file(path)?;
            let file = write_oci_tar(store, images, file, mtime)?;
            staged.commit(Some(file))
        }
        OciDest::Dir(path) => {
            let staged = StagedDest::dir(path)?;
            write_oci_dir(store, images, staged.path())?;
            staged.commit(None)
        }
    }
}

/// Write `images` as a docker-archive at `dest` (staged, then renamed).
pub fn save_docker(store: &Store, images: &[NamedImage], dest: &Path, mtime: i64) -> anyhow::Result<()> {
    let (staged, file) = StagedDest::file(dest)?;
    let file = write_docker_tar(store, images, file, mtime)?;
    staged.commit(Some(file))
}
