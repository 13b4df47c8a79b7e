//! `--cache-to` / `--cache-from` (buildx syntax) and the export side of a
//! shared build cache: the records of a solve plus their layer blobs as the
//! OCI index of `exporter/CACHE.md`, written as an OCI layout
//! ([`write_local`]) or embedded in an image config ([`embed_inline`]).
//! Pushing to a registry and importing are the engine's part; the format
//! itself is [`kiln_cache::remote`].
//!
//! Layer blobs come from the same [`LayerWriter`] as image layers: a
//! snapshot whose blob exists is never re-tarred or re-compressed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_cache::Store;
use kiln_cache::remote::{CACHE_CONFIG_MEDIA_TYPE, CacheConfig, CacheConfigBuilder, INLINE_CACHE_KEY, LayerRef};
use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageIndexBuilder, ImageManifest, MediaType};

use crate::blobs::{put_blob, read_blob};
use crate::compression::{Compression, CompressionKind};
use crate::dest::StagedDest;
use crate::image::{BuiltImage, MEDIA_TYPE_OCI_INDEX, annotations, canonical_json, descriptor};
use crate::layer::{EMPTY_TAR_DIFF_ID, LayerBlob, LayerOptions, LayerWriter};
use crate::output::{Options, parse_bool, split_options};

/// Which steps a cache export holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `mode=min` (default): the steps whose results are in the final image.
    #[default]
    Min,
    /// `mode=max`: every step of every stage the build needed.
    Max,
}

/// One `--cache-to` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheTo {
    /// `type=registry,ref=REF`: push the cache index as `REF`.
    Registry {
        /// `ref=`.
        reference: String,
        /// `mode=`.
        mode: CacheMode,
        /// `compression=` of layers that have no blob yet.
        compression: Compression,
        /// `ignore-error=true`: a failed export only warns.
        ignore_error: bool,
    },
    /// `type=local,dest=DIR`: an OCI layout in `DIR` (tag `latest`).
    Local {
        /// `dest=`.
        dest: PathBuf,
        /// `mode=`.
        mode: CacheMode,
        /// `compression=` of layers that have no blob yet.
        compression: Compression,
        /// `ignore-error=true`: a failed export only warns.
        ignore_error: bool,
    },
    /// `type=inline`: the cache config inside the image config.
    Inline,
}

/// One `--cache-from` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheFrom {
    /// `type=registry,ref=REF`, or a bare `REF`: a cache index pushed by
    /// `--cache-to type=registry`, or an image built with `type=inline`.
    Registry {
        /// `ref=`.
        reference: String,
    },
    /// `type=local,src=DIR[,tag=T]`: an OCI layout from `type=local`.
    Local {
        /// `src=`.
        src: PathBuf,
        /// `tag=` (default `latest`).
        tag: String,
    },
}

/// A bad `--cache-to` / `--cache-from` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag} {spec:?}: {message}")]
pub struct CacheSpecError {
    /// `--cache-to` or `--cache-from`.
    pub flag: &'static str,
    /// The whole value given.
    pub spec: String,
    /// What is wrong with it.
    pub message: String,
}

/// `type=...` and the other options of one value; a bare value (no `=`)
/// is `type=registry,ref=VALUE`, as in buildx.
fn fields(spec: &str) -> Result<(String, Options), String> {
    if !spec.contains('=') {
        if spec.trim().is_empty() {
            return Err("expected type=registry|local|inline,...".into());
        }
        return Ok(("registry".into(), vec![("ref".into(), spec.trim().to_string())]));
    }
    let (kind, opts) = split_options(spec)?;
    let kind = kind.ok_or("missing type= (one of registry, local, inline)")?;
    Ok((kind, opts))
}

fn check_known(kind: &str, opts: &[(String, String)], allowed: &[&str]) -> Result<(), String> {
    match opts.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((k, _)) if allowed.is_empty() => Err(format!("type={kind} takes no options (got {k:?})")),
        Some((k, _)) => Err(format!("unknown option {k:?} for type={kind} (known: {})", allowed.join(", "))),
        None => Ok(()),
    }
}

fn required(kind: &str, opts: &[(String, String)], key: &str) -> Result<String, String> {
    match opts.iter().find(|(k, _)| k == key) {
        Some((_, v)) if !v.is_empty() => Ok(v.clone()),
        _ => Err(format!("type={kind} needs {key}=")),
    }
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl CacheTo {
    /// Parse one `--cache-to` value.
    pub fn parse(spec: &str) -> Result<CacheTo, CacheSpecError> {
        Self::parse_inner(spec).map_err(|message| CacheSpecError { flag: "--cache-to", spec: spec.into(), message })
    }

    fn parse_inner(spec: &str) -> Result<CacheTo, String> {
        let (kind, opts) = fields(spec)?;
        let mode = match get(&opts, "mode") {
            None | Some("min") => CacheMode::Min,
            Some("max") => CacheMode::Max,
            Some(other) => return Err(format!("mode={other:?}: expected min or max")),
        };
        let compression = match get(&opts, "compression") {
            None => Compression::default(),
            Some(v) => Compression {
                kind: CompressionKind::parse(v).ok_or_else(|| format!("compression={v:?}: expected gzip, zstd or uncompressed"))?,
                level: None,
            },
        };
        let ignore_error = get(&opts, "ignore-error").map(|v| parse_bool("ignore-error", v)).transpose()?.unwrap_or(false);
        match kind.as_str() {
            "registry" => {
                check_known(&kind, &opts, &["ref", "mode", "compression", "ignore-error"])?;
                Ok(CacheTo::Registry { reference: required(&kind, &opts, "ref")?, mode, compression, ignore_error })
            }
            "local" => {
                check_known(&kind, &opts, &["dest", "mode", "compression", "ignore-error"])?;
                let dest = PathBuf::from(required(&kind, &opts, "dest")?);
                Ok(CacheTo::Local { dest, mode, compression, ignore_error })
            }
            "inline" => {
                check_known(&kind, &opts, &["mode"])?;
                if mode == CacheMode::Max {
                    return Err("type=inline supports mode=min only (use type=registry or type=local for mode=max)".into());
                }
                Ok(CacheTo::Inline)
            }
            other => Err(format!("unknown cache type {other:?} (known: registry, local, inline)")),
        }
    }
}

impl CacheFrom {
    /// Parse one `--cache-from` value.
    pub fn parse(spec: &str) -> Result<CacheFrom, CacheSpecError> {
        Self::parse_inner(spec).map_err(|message| CacheSpecError { flag: "--cache-from", spec: spec.into(), message })
    }

    fn parse_inner(spec: &str) -> Result<CacheFrom, String> {
        let (kind, opts) = fields(spec)?;
        match kind.as_str() {
            "registry" => {
                check_known(&kind, &opts, &["ref"])?;
                Ok(CacheFrom::Registry { reference: required(&kind, &opts, "ref")? })
            }
            "local" => {
                check_known(&kind, &opts, &["src", "tag"])?;
                let src = PathBuf::from(required(&kind, &opts, "src")?);
                Ok(CacheFrom::Local { src, tag: get(&opts, "tag").unwrap_or("latest").to_string() })
            }
            "inline" => Err("type=inline is for --cache-to; import an inline cache with --cache-from IMAGE".into()),
            other => Err(format!("unknown cache type {other:?} (known: registry, local)")),
        }
    }
}

/// One step of a solve: its cache key and result (snapshot ids, bottom
/// first), as the solver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStep {
    /// The step's cache key.
    pub key: String,
    /// Its result's snapshots, bottom first.
    pub layers: Vec<String>,
}

/// A cache ready to be written: config and index are in the content
/// store, and so is every blob they name.
#[derive(Debug, Clone)]
pub struct PreparedCache {
    /// The cache config.
    pub config: CacheConfig,
    /// Descriptor of the config blob.
    pub config_descriptor: Descriptor,
    /// Descriptors of the layer blobs, in config order, unique.
    pub layers: Vec<Descriptor>,
    /// Descriptor of the OCI index (what a tag points at).
    pub index: Descriptor,
}

/// The steps `mode` keeps: with `Min` only those whose whole result is
/// part of the final image's layers.
pub fn select_steps<'a>(steps: &'a [CacheStep], final_layers: &[String], mode: CacheMode) -> Vec<&'a CacheStep> {
    steps
        .iter()
        .filter(|s| mode == CacheMode::Max || s.layers.iter().all(|l| final_layers.contains(l)))
        .collect()
}

/// Make (or reuse) the blobs of `steps` and write the cache config and
/// index into the content store.
pub fn prepare(store: &Store, steps: &[&CacheStep], compression: Compression) -> anyhow::Result<PreparedCache> {
    let writer = LayerWriter::new(store, LayerOptions { compression, ..Default::default() });
    let mut builder = CacheConfigBuilder::default();
    for step in steps {
        let blobs = writer.write_chain(&step.layers).with_context(|| format!("layers of cache key {}", step.key))?;
        builder.add(&step.key, &blobs.iter().map(|b| layer_ref(store, b)).collect::<Vec<_>>());
    }
    write_index(store, builder.finish())
}

fn layer_ref(store: &Store, blob: &LayerBlob) -> LayerRef {
    LayerRef {
        blob: blob.digest.clone(),
        media_type: blob.compression.oci_media_type().to_string(),
        size: blob.size,
        diff_id: blob.diff_id.clone(),
        created: store.snapshots.meta(&blob.snapshot).ok().and_then(|m| m.created),
    }
}

/// Config blob + OCI index over the layer blobs and the config.
fn write_index(store: &Store, config: CacheConfig) -> anyhow::Result<PreparedCache> {
    let config_bytes = canonical_json(&config)?;
    let config_digest = put_blob(&store.content, &config_bytes)?;
    let config_descriptor = descriptor(CACHE_CONFIG_MEDIA_TYPE, &config_digest, config_bytes.len() as u64)?;
    let mut layers: Vec<Descriptor> = Vec::new();
    for layer in &config.layers {
        if layers.iter().any(|d| d.digest().to_string() == layer.blob) {
            continue;
        }
        let mut d = descriptor(&layer.media_type, &layer.blob, layer.size)?;
        // containerd's annotation: an importer can key the snapshot
        // without downloading the blob.
        d.set_annotations(Some(annotations(&[("containerd.io/uncompressed", &layer.diff_id)])));
        layers.push(d);
    }
    let manifests: Vec<Descriptor> = layers.iter().cloned().chain(std::iter::once(config_descriptor.clone())).collect();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(MEDIA_TYPE_OCI_INDEX))
        .manifests(manifests)
        .build()?;
    let index_bytes = canonical_json(&index)?;
    let index_digest = put_blob(&store.content, &index_bytes)?;
    let index = descriptor(MEDIA_TYPE_OCI_INDEX, &index_digest, index_bytes.len() as u64)?;
    Ok(PreparedCache { config, config_descriptor, layers, index })
}

/// The descriptors of a cache index: layer blobs and the config (the one
/// with [`CACHE_CONFIG_MEDIA_TYPE`]). Errors name what is wrong.
pub fn parse_index(bytes: &[u8]) -> anyhow::Result<(Vec<Descriptor>, Descriptor)> {
    let index = oci_spec::image::ImageIndex::from_reader(bytes).context("cache index is not an OCI image index")?;
    let mut config = None;
    let mut layers = Vec::new();
    for d in index.manifests() {
        if d.media_type().to_string() == CACHE_CONFIG_MEDIA_TYPE {
            anyhow::ensure!(config.replace(d.clone()).is_none(), "cache index lists two cache configs");
        } else {
            layers.push(d.clone());
        }
    }
    let config = config.with_context(|| format!("not a kiln cache: the index has no {CACHE_CONFIG_MEDIA_TYPE} entry"))?;
    Ok((layers, config))
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Write `cache` as an OCI layout at `dest` (tag `latest`). The layout is
/// made beside `dest` and swapped in at the end: an error leaves `dest` as
/// it was. An existing `dest` must be an OCI layout (an older cache) or an
/// empty directory.
pub fn write_local(store: &Store, cache: &PreparedCache, dest: &Path) -> anyhow::Result<()> {
    let replacing = match dest.symlink_metadata() {
        Err(_) => false,
        Ok(meta) => {
            anyhow::ensure!(meta.is_dir(), "cannot write the cache to {}: it exists and is not a directory", dest.display());
            let empty = std::fs::read_dir(dest)?.next().is_none();
            anyhow::ensure!(
                empty || dest.join("oci-layout").is_file(),
                "cannot write the cache to {}: it is neither empty nor an OCI layout",
                dest.display()
            );
            !empty
        }
    };
    // A cache already there is swapped out at the end, so the new one is
    // staged under a name of its own.
    let staged = if replacing {
        let name = dest.file_name().context("cache dest has no file name")?.to_string_lossy().into_owned();
        StagedDest::dir(&dest.with_file_name(format!("{name}.kiln-old-{}", std::process::id())))?
    } else {
        StagedDest::dir(dest)?
    };
    let dir = staged.path();
    std::fs::write(dir.join("oci-layout"), OCI_LAYOUT)?;
    let blobs_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs_dir)?;
    let digests = cache.layers.iter().chain([&cache.config_descriptor, &cache.index]).map(|d| d.digest().to_string());
    for digest in digests {
        let hex = kiln_cache::content::digest_hex(&digest)?.to_string();
        std::fs::copy(store.content.blob_path(&digest), blobs_dir.join(&hex)).with_context(|| format!("copying blob {digest}"))?;
    }
    let mut top = cache.index.clone();
    top.set_annotations(Some(annotations(&[(ANNOTATION_REF_NAME, "latest")])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(MEDIA_TYPE_OCI_INDEX))
        .manifests(vec![top])
        .build()?;
    std::fs::write(dir.join("index.json"), canonical_json(&index)?)?;
    if replacing {
        exchange(staged.path(), dest).with_context(|| format!("replacing the cache at {}", dest.display()))?;
        // `staged` now holds the old cache; dropping it removes it.
        return Ok(());
    }
    staged.commit(None)
}

/// Swap two directories atomically (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; no memory is shared.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // A filesystem without RENAME_EXCHANGE: two renames, with a short
    // moment in which `b` does not exist (never a half-written one).
    let aside = b.with_file_name(format!(".{}.kiln-swap", b.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::rename(b, &aside)?;
    if let Err(e) = std::fs::rename(a, b) {
        let _ = std::fs::rename(&aside, b);
        return Err(e);
    }
    std::fs::rename(&aside, a)
}

/// `type=inline`: the cache config of `steps` (those within the image)
/// added to `image`'s config under [`INLINE_CACHE_KEY`], using the image's
/// own layer blobs. Returns the new image (new config and manifest in the
/// content store); the config keeps its field order.
pub fn embed_inline(store: &Store, image: &BuiltImage, steps: &[&CacheStep]) -> anyhow::Result<BuiltImage> {
    let mut builder = CacheConfigBuilder::default();
    'steps: for step in steps {
        let mut chain = Vec::new();
        for id in &step.layers {
            match image.layers.iter().find(|l| &l.snapshot == id) {
                Some(blob) => chain.push(layer_ref(store, blob)),
                // An empty layer is not in the image; an importer makes it
                // without a blob (see CACHE.md).
                None if is_empty_snapshot(store, id) => chain.push(LayerRef {
                    blob: EMPTY_GZIP_LAYER.into(),
                    media_type: CompressionKind::Gzip.oci_media_type().into(),
                    size: 32,
                    diff_id: EMPTY_TAR_DIFF_ID.into(),
                    created: store.snapshots.meta(id).ok().and_then(|m| m.created),
                }),
                None => continue 'steps,
            }
        }
        builder.add(&step.key, &chain);
    }
    let config = builder.finish();
    let old = read_blob(&store.content, image.config.digest().as_ref())?;
    let trimmed = old.trim_ascii_end();
    anyhow::ensure!(trimmed.ends_with(b"}") && trimmed.len() > 2, "image config is not a JSON object");
    // Append one member to the object: every other byte stays as it was.
    let mut bytes = trimmed[..trimmed.len() - 1].to_vec();
    bytes.extend_from_slice(format!(",{:?}:", INLINE_CACHE_KEY).as_bytes());
    bytes.extend_from_slice(&canonical_json(&config)?);
    bytes.push(b'}');
    let config_digest = put_blob(&store.content, &bytes)?;
    let config_desc = descriptor(image.config.media_type().as_ref(), &config_digest, bytes.len() as u64)?;
    let manifest_bytes = read_blob(&store.content, image.manifest.digest().as_ref())?;
    let mut manifest = ImageManifest::from_reader(&manifest_bytes[..]).context("reading the image manifest")?;
    manifest.set_config(config_desc.clone());
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put_blob(&store.content, &manifest_bytes)?;
    Ok(BuiltImage {
        manifest: descriptor(image.manifest.media_type().as_ref(), &manifest_digest, manifest_bytes.len() as u64)?,
        config: config_desc,
        layers: image.layers.clone(),
    })
}

/// The inline cache config of an image config, if it has one.
pub fn inline_config(image_config: &[u8]) -> anyhow::Result<Option<CacheConfig>> {
    let json: serde_json::Value = serde_json::from_slice(image_config).context("image config is not JSON")?;
    match json.get(INLINE_CACHE_KEY) {
        None => Ok(None),
        Some(v) => {
            let config: CacheConfig =
                serde_json::from_value(v.clone()).with_context(|| format!("image config {INLINE_CACHE_KEY} is not valid"))?;
            config.validate()?;
            Ok(Some(config))
        }
    }
}

/// Digest of the gzip stream of an empty tar as BuildKit writes it; only a
/// name for the empty layer here (importers never fetch it).
pub const EMPTY_GZIP_LAYER: &str = "sha256:4f4fb700ef54461cfa02571ae0db9a0dc1e0cdb5577484a6d75e68dc38e8acc1";

fn is_empty_snapshot(store: &Store, id: &str) -> bool {
    store.snapshots.meta(id).ok().and_then(|m| m.diff_id).as_deref() == Some(EMPTY_TAR_DIFF_ID)
        || std::fs::read_dir(store.snapshots.path(id)).map(|mut d| d.next().is_none()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cache_specs() {
        assert_eq!(
            CacheTo::parse("type=registry,ref=127.0.0.1:5000/cache:1,mode=max").unwrap(),
            CacheTo::Registry {
                reference: "127.0.0.1:5000/cache:1".into(),
                mode: CacheMode::Max,
                compression: Compression::default(),
                ignore_error: false
            }
        );
        let CacheTo::Local { dest, mode, compression, ignore_error } =
            CacheTo::parse("type=local,dest=/tmp/c,compression=zstd,ignore-error=true").unwrap()
        else {
            panic!()
        };
        assert_eq!((dest, mode, compression.kind, ignore_error), ("/tmp/c".into(), CacheMode::Min, CompressionKind::Zstd, true));
        assert_eq!(CacheTo::parse("type=inline").unwrap(), CacheTo::Inline);
        assert_eq!(CacheFrom::parse("reg:5000/app:1").unwrap(), CacheFrom::Registry { reference: "reg:5000/app:1".into() });
        assert_eq!(
            CacheFrom::parse("type=local,src=dir").unwrap(),
            CacheFrom::Local { src: "dir".into(), tag: "latest".into() }
        );
    }

    #[test]
    fn rejects_bad_cache_specs_clearly() {
        let to = |s: &str| CacheTo::parse(s).unwrap_err().to_string();
        let from = |s: &str| CacheFrom::parse(s).unwrap_err().to_string();
        assert!(to("type=gha").contains("unknown cache type \"gha\""), "{}", to("type=gha"));
        assert!(to("type=registry").contains("needs ref="));
        assert!(to("type=local,mode=max").contains("needs dest="));
        assert!(to("type=local,dest=x,mode=huge").contains("expected min or max"));
        assert!(to("type=inline,mode=max").contains("mode=min only"));
        assert!(to("type=registry,ref=x,color=red").contains("unknown option \"color\""));
        assert!(to("mode=max").contains("missing type="));
        assert!(to("type=local,dest=x,compression=lz4").contains("expected gzip"));
        assert!(to("").starts_with("--cache-to \"\""));
        assert!(from("type=local").contains("needs src="));
        assert!(from("type=inline").contains("--cache-from IMAGE"));
        assert!(from("type=s3,bucket=b").contains("unknown cache type \"s3\""));
    }
}
