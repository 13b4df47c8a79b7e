//! `kiln load -i FILE|DIR`: images from an OCI image layout (directory or
//! tar) or a docker-archive tar (`docker save`).

use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use kiln_cache::Store;
use kiln_cache::images::{Descriptor, ImageRecord, familiar_name};
use kiln_cache::snapshots::BlobRecord;
use kiln_frontend::Platform;

use crate::config::Global;
use crate::image_source::open_image;
use crate::registry::manifest::{self, Manifest};
use crate::unpack::{Compression, detect_compression};

/// `kiln load` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// OCI layout directory, OCI layout tar, or docker-archive tar (may be gzip/zstd compressed).
    #[arg(short, long)]
    pub input: PathBuf,
    /// Name for images the archive does not name (an OCI layout tagged only `latest`, say).
    #[arg(short, long)]
    pub tag: Option<String>,
}

/// Load; prints one line per image.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    for record in load(&store, &args.input, args.tag.as_deref())? {
        println!("Loaded image: {} ({})", familiar_name(&record.name), record.config_digest);
    }
    Ok(0)
}

/// Load every image in `input` into `store` (blobs verified, layers
/// unpacked); returns the named images.
pub fn load(store: &Store, input: &Path, tag: Option<&str>) -> anyhow::Result<Vec<ImageRecord>> {
    load_as(store, input, tag, input)
}

/// [`load`] of `input`, which errors call `shown` (the daemon loads an
/// upload under the client's file name).
pub fn load_as(store: &Store, input: &Path, tag: Option<&str>, shown: &Path) -> anyhow::Result<Vec<ImageRecord>> {
    let meta = std::fs::metadata(input).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let records = if meta.is_dir() {
        load_dir(store, input, tag)
    } else {
        let scratch = store.scratch_dir()?;
        extract(input, scratch.path(), shown)?;
        load_dir(store, scratch.path(), tag)
    }
    .map_err(|e| e.context(format!("loading {}", shown.display())))?;
    for record in &records {
        open_image(store, record)?.unpack_layers(store)?;
    }
    Ok(records)
}

fn extract(archive: &Path, into: &Path, shown: &Path) -> anyhow::Result<()> {
    let mut reader = BufReader::new(std::fs::File::open(archive)?);
    let stream: Box<dyn Read> = match detect_compression(&mut reader)? {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    };
    let mut tar = tar::Archive::new(stream);
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    // tar's unpack refuses `..` and writes through symlinks leading out.
    tar.unpack(into).map_err(|e| anyhow::anyhow!("{}: not a readable tar archive: {e}", shown.display()))
}

fn load_dir(store: &Store, dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<ImageRecord>> {
    if dir.join("manifest.json").is_file() {
        load_docker_archive(store, dir, tag)
    } else if dir.join("index.json").is_file() {
        load_oci_layout(store, dir, tag)
    } else {
        anyhow::bail!("neither an OCI layout (index.json) nor a docker archive (manifest.json)")
    }
}

/// `rel` inside `base`, refusing absolute paths, `..` and symlinks out.
fn inside(base: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(rel);
    anyhow::ensure!(
        p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
        "path {rel:?} leaves the archive"
    );
    let full = base.join(p).canonicalize().map_err(|e| anyhow::anyhow!("{rel}: {e}"))?;
    anyhow::ensure!(full.starts_with(base.canonicalize()?), "path {rel:?} leaves the archive");
    Ok(full)
}

/// Copy blob `digest` from an OCI layout into the store, verified.
fn copy_blob(store: &Store, dir: &Path, digest: &str, size: Option<u64>) -> anyhow::Result<()> {
    let hex = kiln_cache::content::digest_hex(digest)?;
    if store.content.exists(digest) {
        return Ok(());
    }
    let path = inside(dir, &format!("blobs/sha256/{hex}"))?;
    let mut file = std::fs::File::open(&path)?;
    store.content.put_reader(&mut file, Some(digest), size).map_err(|e| anyhow::anyhow!("blob {digest}: {e}"))?;
    Ok(())
}

fn load_oci_layout(store: &Store, dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<ImageRecord>> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)
        .map_err(|e| anyhow::anyhow!("index.json: {e}"))?;
    let entries = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or_else(|| anyhow::anyhow!("index.json has no manifests"))?;
    let mut records = Vec::new();
    for entry in entries {
        let desc: manifest::Descriptor =
            serde_json::from_value(entry.clone()).map_err(|e| anyhow::anyhow!("index.json entry: {e}"))?;
        let annotation =
            |k: &str| entry.pointer(&format!("/annotations/{}", k.replace('/', "~1"))).and_then(|v| v.as_str());
        let ref_name = annotation("io.containerd.image.name")
            .or_else(|| annotation("org.opencontainers.image.ref.name").filter(|n| n.contains(['/', ':'])));
        let name = match (ref_name, tag) {
            (Some(n), _) => n.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => anyhow::bail!(
                "image {} has no full name (ref.name {:?}); give one with --tag NAME",
                desc.digest,
                annotation("org.opencontainers.image.ref.name").unwrap_or("")
            ),
        };
        copy_blob(store, dir, &desc.digest, Some(desc.size))?;
        let bytes = store.content.read(&desc.digest)?;
        let mut parsed =
            Manifest::parse(&bytes, Some(&desc.media_type)).map_err(|e| anyhow::anyhow!("{}: {e}", desc.digest))?;
        let mut target =
            Descriptor { media_type: desc.media_type.clone(), digest: desc.digest.clone(), size: desc.size };
        if let Manifest::Index { manifests, .. } = &parsed {
            let chosen = manifest::select_platform(manifests, &Platform::default())
                .ok_or_else(|| anyhow::anyhow!("{}: no linux/amd64 image in the index", desc.digest))?
                .clone();
            copy_blob(store, dir, &chosen.digest, Some(chosen.size))?;
            let child = store.content.read(&chosen.digest)?;
            parsed = Manifest::parse(&child, Some(&chosen.media_type))
                .map_err(|e| anyhow::anyhow!("{}: {e}", chosen.digest))?;
            target =
                Descriptor { media_type: chosen.media_type.clone(), digest: chosen.digest.clone(), size: chosen.size };
        }
        let Manifest::Image { media_type, config, layers } = parsed else {
            anyhow::bail!("{}: nested indexes are not supported", desc.digest);
        };
        if target.media_type.is_empty() {
            target.media_type = media_type;
        }
        copy_blob(store, dir, &config.digest, Some(config.size))?;
        for layer in &layers {
            copy_blob(store, dir, &layer.digest, Some(layer.size))?;
        }
        records.push(store.images.put(&name, &target)?);
    }
    Ok(records)
}

fn load_docker_archive(store: &Store, dir: &Path, tag: Option<&str>) -> anyhow::Result<Vec<ImageRecord>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let entries: Vec<Entry> = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)
        .map_err(|e| anyhow::anyhow!("manifest.json: {e}"))?;
    let mut records = Vec::new();
    for entry in entries {
        let config = std::fs::read(inside(dir, &entry.config)?)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let mut reader = BufReader::new(std::fs::File::open(inside(dir, layer)?)?);
            let media_type = super::import::layer_media_type(detect_compression(&mut reader)?);
            let (digest, size) = store.content.put_reader(&mut reader, None, None)?;
            layers.push(BlobRecord { media_type: media_type.into(), digest, size });
        }
        let mut names = entry.repo_tags.unwrap_or_default();
        if names.is_empty() {
            names.push(tag.map(str::to_string).ok_or_else(|| {
                anyhow::anyhow!("image {} has no RepoTags; give a name with --tag NAME", entry.config)
            })?);
        }
        for name in names {
            records.push(super::import::name_image(store, &name, &config, &layers)?);
        }
    }
    Ok(records)
}
