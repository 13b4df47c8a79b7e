//! The manifest formats kiln reads: OCI image manifests and indexes, and
//! Docker schema 2 manifests and manifest lists.

use serde::Deserialize;

use kiln_frontend::Platform;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest media type kiln accepts, for `Accept` headers.
pub const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// A descriptor as it appears in manifests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform, in index entries.
    #[serde(default)]
    pub platform: Option<PlatformJson>,
}

/// `platform` of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct PlatformJson {
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// e.g. `v8`.
    #[serde(default)]
    pub variant: Option<String>,
}

/// A parsed manifest: an image or an index of images.
#[derive(Debug, Clone)]
pub enum Manifest {
    /// One image: config and layers.
    Image {
        /// Media type of the manifest itself.
        media_type: String,
        /// The config blob.
        config: Descriptor,
        /// Layer blobs, bottom first.
        layers: Vec<Descriptor>,
    },
    /// Several images for different platforms.
    Index {
        /// Media type of the index itself.
        media_type: String,
        /// The entries.
        manifests: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parse manifest `bytes`; `header_type` is the Content-Type the
    /// registry sent (or the descriptor's media type), used when the body
    /// has no `mediaType`. Errors say what is wrong.
    pub fn parse(bytes: &[u8], header_type: Option<&str>) -> Result<Manifest, String> {
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
        if raw.schema_version != Some(2) {
            return Err(format!(
                "schemaVersion {:?} is not supported (only schema 2 manifests are)",
                raw.schema_version
            ));
        }
        let media_type = raw
            .media_type
            .clone()
            .or_else(|| header_type.map(str::to_string))
            .unwrap_or_else(|| if raw.manifests.is_some() { OCI_INDEX } else { OCI_MANIFEST }.to_string());
        match media_type.as_str() {
            OCI_INDEX | DOCKER_MANIFEST_LIST => {
                let manifests = raw.manifests.ok_or("an index without `manifests`")?;
                Ok(Manifest::Index { media_type, manifests })
            }
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let config = raw.config.ok_or("an image manifest without `config`")?;
                let layers = raw.layers.unwrap_or_default();
                for layer in &layers {
                    check_layer_type(&layer.media_type)?;
                }
                Ok(Manifest::Image { media_type, config, layers })
            }
            other => Err(format!("unsupported manifest media type {other:?}")),
        }
    }
}

fn check_layer_type(media_type: &str) -> Result<(), String> {
    const OK: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ];
    if OK.contains(&media_type) { Ok(()) } else { Err(format!("unsupported layer media type {media_type:?}")) }
}

/// The entry of an index matching `platform` (an empty variant matches any).
pub fn select_platform<'a>(manifests: &'a [Descriptor], platform: &Platform) -> Option<&'a Descriptor> {
    let matches = |d: &&Descriptor, want_variant: bool| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == platform.os
                && p.architecture == platform.architecture
                && (!want_variant || p.variant.as_deref().unwrap_or("") == platform.variant)
        })
    };
    manifests
        .iter()
        .find(|d| matches(d, true))
        .or_else(|| if platform.variant.is_empty() { manifests.iter().find(|d| matches(d, false)) } else { None })
}

/// `os/arch[/variant]` of each index entry, for error messages.
pub fn platforms(manifests: &[Descriptor]) -> Vec<String> {
    manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match p.variant.as_deref() {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
            _ => format!("{}/{}", p.os, p.architecture),
        })
        .collect()
}

/// Parse `os/arch[/variant]` (e.g. `linux/arm64/v8`).
pub fn parse_platform(s: &str) -> anyhow::Result<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => {
            Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: String::new() })
        }
        [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
            Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: variant.to_string() })
        }
        _ => anyhow::bail!("invalid platform {s:?}: expected os/arch[/variant], e.g. linux/amd64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_images_and_indexes() {
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let img = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":1}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{d}","size":2}}]}}"#
        );
        assert!(
            matches!(Manifest::parse(img.as_bytes(), None), Ok(Manifest::Image { layers, .. }) if layers.len() == 1)
        );
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":3,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Ok(Manifest::Index { manifests, .. }) = Manifest::parse(idx.as_bytes(), None) else { panic!() };
        assert_eq!(select_platform(&manifests, &Platform::default()).unwrap().size, 3);
        assert_eq!(select_platform(&manifests, &parse_platform("linux/arm64").unwrap()).unwrap().size, 1);
        assert!(select_platform(&manifests, &parse_platform("linux/arm64/v7").unwrap()).is_none());
        assert_eq!(platforms(&manifests), ["linux/arm64/v8", "linux/amd64"]);
        assert!(Manifest::parse(b"{\"schemaVersion\":1}", None).unwrap_err().contains("schemaVersion"));
        assert!(Manifest::parse(b"nope", None).is_err());
        let bad_layer = img.replace("rootfs.diff.tar.gzip", "foreign.diff.tar.gzip");
        assert!(Manifest::parse(bad_layer.as_bytes(), None).unwrap_err().contains("layer media type"));
        assert!(parse_platform("linux").is_err());
    }
}
