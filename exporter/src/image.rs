//! Image assembly: layer chain + config + history → config blob and
//! manifest in the content store.
//!
//! As BuildKit's image writer (`exporter/containerimage/writer.go`,
//! `normalizeLayersAndHistory`): every history entry without
//! `empty_layer` takes the next layer; surplus entries are marked empty,
//! missing ones appended; a layer whose diff is empty is dropped from the
//! image and its history entry marked `empty_layer` (BuildKit's writer did
//! this with the empty gzip layer; later versions avoid making it).
//! Missing `created` times are the image's; with `SOURCE_DATE_EPOCH` the
//! image time is the epoch and later history times are clamped to it, so
//! the config and manifest are byte-for-byte reproducible.

use std::collections::HashMap;

use anyhow::Context;
use kiln_cache::Store;
use oci_spec::image::{Descriptor, Digest, History, HistoryBuilder, ImageManifest, ImageManifestBuilder, MediaType};
use serde::Serialize;

use crate::blobs::put_blob;
use crate::compression::layer_media_type;
use crate::layer::{LayerBlob, LayerOptions, LayerWriter};
use crate::time::{parse_rfc3339, rfc3339};

/// OCI manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI config media type.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker config media type.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What an image is made of.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Snapshot ids of the layer chain, base first.
    pub layers: Vec<String>,
    /// Docker's `config` object (`Env`, `Cmd`, `Healthcheck`, ...), as the
    /// frontend's `ImageConfig` serializes.
    pub config: serde_json::Value,
    /// One entry per Dockerfile step (base image's first); entries without
    /// `empty_layer` take the layers in order.
    pub history: Vec<History>,
    /// `os`, e.g. `linux`.
    pub os: String,
    /// `architecture`, e.g. `amd64`.
    pub architecture: String,
    /// `variant`, e.g. `v8`.
    pub variant: Option<String>,
    /// The image's `created` time (Unix seconds) when no
    /// `SOURCE_DATE_EPOCH` is given; `None` means now. The build passes its
    /// newest layer's commit time so that a fully cached rebuild yields the
    /// same image ID.
    pub created: Option<i64>,
}

/// How an image is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    /// Layer compression and timestamp clamping.
    pub layers: LayerOptions,
    /// OCI media types (true) or Docker's (false).
    pub oci_mediatypes: bool,
    /// `SOURCE_DATE_EPOCH`: the image's `created` time.
    pub source_date_epoch: Option<i64>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions { layers: LayerOptions::default(), oci_mediatypes: true, source_date_epoch: None }
    }
}

/// An image written to the content store.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The manifest's descriptor (what a name or index points at).
    pub manifest: Descriptor,
    /// The config blob's descriptor.
    pub config: Descriptor,
    /// The layers in the manifest (empty ones dropped).
    pub layers: Vec<LayerBlob>,
}

/// The config blob, fields in the order Go's `ocispec.Image` writes them.
#[derive(Serialize)]
struct ConfigFile<'a> {
    created: &'a str,
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: &'a serde_json::Value,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

/// A descriptor for a blob.
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> anyhow::Result<Descriptor> {
    let digest: Digest = digest.parse().with_context(|| format!("invalid digest {digest:?}"))?;
    Ok(Descriptor::new(MediaType::from(media_type), size, digest))
}

/// Make (or reuse) the layers, then write config and manifest.
pub fn build_image(store: &Store, spec: &ImageSpec, options: &ImageOptions) -> anyhow::Result<BuiltImage> {
    anyhow::ensure!(!spec.os.is_empty() && !spec.architecture.is_empty(), "image platform: os and architecture are required");
    let layers = LayerWriter::new(store, options.layers).write_chain(&spec.layers)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let created_secs = options.source_date_epoch.or(spec.created).unwrap_or(now);
    let created = rfc3339(created_secs);
    let (history, kept) = normalize_history(&spec.history, &layers, &created, options.source_date_epoch)?;
    let oci = options.oci_mediatypes;
    let empty_object = serde_json::json!({});

    let config = ConfigFile {
        created: &created,
        architecture: &spec.architecture,
        os: &spec.os,
        variant: spec.variant.as_deref(),
        config: if spec.config.is_null() { &empty_object } else { &spec.config },
        rootfs: RootFs { kind: "layers", diff_ids: kept.iter().map(|l| l.diff_id.clone()).collect() },
        history,
    };
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = put_blob(&store.content, &config_bytes)?;
    let config_desc = descriptor(
        if oci { MEDIA_TYPE_OCI_CONFIG } else { MEDIA_TYPE_DOCKER_CONFIG },
        &config_digest,
        config_bytes.len() as u64,
    )?;
    let layer_descs = kept
        .iter()
        .map(|l| descriptor(layer_media_type(l.compression, oci), &l.digest, l.size))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let manifest_type = if oci { MEDIA_TYPE_OCI_MANIFEST } else { MEDIA_TYPE_DOCKER_MANIFEST };
    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(manifest_type))
        .config(config_desc.clone())
        .layers(layer_descs)
        .build()?;
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put_blob(&store.content, &manifest_bytes)?;
    Ok(BuiltImage {
        manifest: descriptor(manifest_type, &manifest_digest, manifest_bytes.len() as u64)?,
        config: config_desc,
        layers: kept,
    })
}

/// Pair history entries with layers (BuildKit's rules, see the module
/// docs); returns the history to write and the layers to keep.
fn normalize_history(
    history: &[History],
    layers: &[LayerBlob],
    created: &str,
    epoch: Option<i64>,
) -> anyhow::Result<(Vec<History>, Vec<LayerBlob>)> {
    let mut history = history.to_vec();
    let with_layer = history.iter().filter(|h| h.empty_layer() != Some(true)).count();
    if with_layer > layers.len() {
        // More layer-making steps than layers: the last ones made none.
        let mut seen = 0;
        for h in history.iter_mut() {
            if seen >= layers.len() {
                h.set_empty_layer(Some(true));
            }
            if h.empty_layer() != Some(true) {
                seen += 1;
            }
        }
    }
    if layers.len() > with_layer {
        // Layers nobody described get entries at the end.
        for _ in 0..layers.len() - with_layer {
            let h = HistoryBuilder::default().created_by("created by kiln").comment("kiln.exporter.image.v0").build();
            history.push(h.expect("all fields optional"));
        }
    }
    let mut kept = Vec::new();
    let mut next = 0;
    for h in history.iter_mut() {
        let created_at = match h.created() {
            None => created.to_string(),
            Some(t) => match (epoch, parse_rfc3339(t)) {
                (Some(e), Some(secs)) if secs > e => rfc3339(e),
                (Some(_), None) => anyhow::bail!("history entry has an invalid created time {t:?}"),
                _ => t.clone(),
            },
        };
        h.set_created(Some(created_at));
        if h.empty_layer() == Some(true) {
            continue;
        }
        let layer = &layers[next];
        next += 1;
        if layer.empty {
            h.set_empty_layer(Some(true));
        } else {
            kept.push(layer.clone());
        }
    }
    Ok((history, kept))
}

/// JSON with object keys sorted at every level: stable bytes for
/// documents with maps (oci-spec keeps annotations in a `HashMap`).
pub fn canonical_json<T: Serialize>(value: &T) -> anyhow::Result<Vec<u8>> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(value)?))?)
}

/// Annotations map with the given entries.
pub(crate) fn annotations(entries: &[(&str, &str)]) -> HashMap<String, String> {
    entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::CompressionKind;

    fn layer(empty: bool) -> LayerBlob {
        LayerBlob {
            snapshot: "s".into(),
            compression: CompressionKind::Gzip,
            digest: "sha256:00".into(),
            size: 1,
            diff_id: "sha256:00".into(),
            empty,
            reused: false,
        }
    }

    fn entry(created: Option<&str>, empty: bool) -> History {
        let mut h = HistoryBuilder::default().created_by("step").build().unwrap();
        h.set_created(created.map(str::to_string));
        if empty {
            h.set_empty_layer(Some(true));
        }
        h
    }

    fn empties(h: &[History]) -> Vec<bool> {
        h.iter().map(|h| h.empty_layer() == Some(true)).collect()
    }

    #[test]
    fn history_pairs_with_layers_as_buildkit_does() {
        let now = "2026-01-01T00:00:00Z";
        // An empty diff is dropped and its entry marked.
        let (h, kept) = normalize_history(&[entry(None, false), entry(None, true), entry(None, false)], &[layer(false), layer(true)], now, None).unwrap();
        assert_eq!(empties(&h), [false, true, true]);
        assert_eq!(kept.len(), 1);
        assert!(h.iter().all(|h| h.created().as_deref() == Some(now)));
        // Surplus entries (the last ones) become empty.
        let (h, kept) = normalize_history(&[entry(None, false), entry(None, false)], &[layer(false)], now, None).unwrap();
        assert_eq!((empties(&h), kept.len()), (vec![false, true], 1));
        // Missing entries are appended.
        let (h, kept) = normalize_history(&[entry(None, false)], &[layer(false), layer(false)], now, None).unwrap();
        assert_eq!((h.len(), kept.len()), (2, 2));
        assert_eq!(h[1].comment().as_deref(), Some("kiln.exporter.image.v0"));
        // With an epoch, later times are clamped and earlier ones kept.
        let (h, _) = normalize_history(
            &[entry(Some("2001-01-01T00:00:00Z"), false), entry(Some("2030-01-01T00:00:00Z"), true)],
            &[layer(false)],
            "2023-11-14T22:13:20Z",
            Some(1_700_000_000),
        )
        .unwrap();
        assert_eq!(h[0].created().as_deref(), Some("2001-01-01T00:00:00Z"));
        assert_eq!(h[1].created().as_deref(), Some("2023-11-14T22:13:20Z"));
        assert!(normalize_history(&[entry(Some("soon"), false)], &[layer(false)], now, Some(1)).is_err());
    }
}
