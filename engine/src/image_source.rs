//! The engine's [`kiln_solver::ImageSource`]: base images for `FROM`.
//!
//! Local images come first — anything pulled, built, imported or loaded
//! before is used without asking a registry — and only a name the image
//! store does not know is pulled. Either way every layer ends up unpacked
//! in its snapshot (keyed by diff ID), which is what the solver gets.

use std::sync::Arc;

use kiln_cache::Store;
use kiln_cache::images::ImageRecord;
use kiln_cache::snapshots::BlobRecord;
use kiln_frontend::Platform;
use kiln_solver::{ImageSource, ResolvedImage};

use crate::registry::Registry;
use crate::registry::manifest::Manifest;
use crate::unpack::{snapshot_id_for_diff_id, unpack_layer_snapshot};

/// Images from the local store, else from registries.
pub struct StoreImageSource {
    store: Arc<Store>,
    registry: Arc<Registry>,
}

impl StoreImageSource {
    /// An image source over `store` that pulls through `registry`.
    pub fn new(store: Arc<Store>, registry: Arc<Registry>) -> StoreImageSource {
        StoreImageSource { store, registry }
    }
}

#[async_trait::async_trait]
impl ImageSource for StoreImageSource {
    async fn resolve(&self, reference: &str, platform: &Platform) -> anyhow::Result<ResolvedImage> {
        let store = self.store.clone();
        let (reference_owned, platform_owned) = (reference.to_string(), platform.clone());
        let local = tokio::task::spawn_blocking(move || resolve_local(&store, &reference_owned, Some(&platform_owned)))
            .await??;
        if let Some(image) = local {
            return Ok(image);
        }
        let pulled = self.registry.pull(&self.store, reference, platform).await?;
        Ok(ResolvedImage { manifest_digest: pulled.manifest_digest, config: pulled.config, layers: pulled.layers })
    }
}

/// The image the local store knows as `reference` (name, ID or digest
/// prefix), with every layer unpacked; `None` if there is no such image or
/// (with `platform`) it is for another platform. Blocking: call it from
/// `spawn_blocking` in async code.
pub fn resolve_local(
    store: &Store,
    reference: &str,
    platform: Option<&Platform>,
) -> anyhow::Result<Option<ResolvedImage>> {
    let record = match store.images.resolve(reference) {
        Ok(r) => r,
        Err(e) if matches!(e.downcast_ref(), Some(kiln_cache::images::ImageError::NotFound(_))) => return Ok(None),
        Err(e) => return Err(e),
    };
    let image = open_image(store, &record)?;
    if let Some(p) = platform
        && !image.matches(p)
    {
        return Ok(None);
    }
    let layers = image.unpack_layers(store)?;
    Ok(Some(ResolvedImage { manifest_digest: record.target.digest.clone(), config: image.config, layers }))
}

/// An image's manifest and config, read from the content store.
#[derive(Debug, Clone)]
pub struct LocalImage {
    /// The raw config blob.
    pub config: Vec<u8>,
    /// The config, parsed.
    pub config_json: serde_json::Value,
    /// Layer blobs, bottom first.
    pub layers: Vec<BlobRecord>,
    /// Diff IDs from the config, bottom first.
    pub diff_ids: Vec<String>,
}

impl LocalImage {
    /// Whether the config's os/architecture(/variant) are `platform`'s; an
    /// image whose config names no architecture matches anything.
    pub fn matches(&self, platform: &Platform) -> bool {
        let field = |k: &str| self.config_json.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
        arch.is_empty()
            || (os == platform.os
                && arch == platform.architecture
                && (platform.variant.is_empty() || variant.is_empty() || variant == platform.variant))
    }

    /// Unpack every layer (once; existing snapshots are reused) and return
    /// the snapshot ids, bottom first.
    pub fn unpack_layers(&self, store: &Store) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(self.layers.len());
        for (blob, diff_id) in self.layers.iter().zip(&self.diff_ids) {
            let id = snapshot_id_for_diff_id(diff_id)?;
            if store.snapshots.exists(&id) {
                ids.push(id);
                continue;
            }
            anyhow::ensure!(
                store.content.exists(&blob.digest),
                "layer {} of the image is neither unpacked nor in the content store",
                blob.digest
            );
            ids.push(unpack_layer_snapshot(store, blob, Some(diff_id))?);
        }
        Ok(ids)
    }
}

/// Read the manifest and config of `record` from the content store.
pub fn open_image(store: &Store, record: &ImageRecord) -> anyhow::Result<LocalImage> {
    let bytes = store.content.read(&record.target.digest)?;
    let Manifest::Image { config, layers, .. } = Manifest::parse(&bytes, Some(&record.target.media_type))
        .map_err(|e| anyhow::anyhow!("image {}: manifest {}: {e}", record.name, record.target.digest))?
    else {
        anyhow::bail!("image {}: {} is an index, not an image manifest", record.name, record.target.digest);
    };
    let config_bytes = store.content.read(&config.digest)?;
    let config_json: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| anyhow::anyhow!("image {}: config {} is not JSON: {e}", record.name, config.digest))?;
    let diff_ids: Vec<String> = config_json
        .pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    anyhow::ensure!(
        diff_ids.len() == layers.len(),
        "image {}: the manifest has {} layers but the config lists {} diff IDs",
        record.name,
        layers.len(),
        diff_ids.len()
    );
    let layers =
        layers.into_iter().map(|l| BlobRecord { media_type: l.media_type, digest: l.digest, size: l.size }).collect();
    Ok(LocalImage { config: config_bytes, config_json, layers, diff_ids })
}
