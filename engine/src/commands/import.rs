//! `kiln import ROOTFS.tar NAME[:TAG]`: a filesystem tarball (plain, gzip
//! or zstd) becomes a one-layer image.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use kiln_cache::Store;
use kiln_cache::images::{Descriptor, ImageRecord, familiar_name};
use kiln_cache::snapshots::BlobRecord;
use serde_json::json;

use crate::config::Global;
use crate::registry::manifest::OCI_MANIFEST;
use crate::unpack::{Compression, detect_compression, unpack_layer_snapshot};

/// `kiln import` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The root filesystem tarball.
    pub file: PathBuf,
    /// Name for the image, e.g. `myroot:1`.
    pub reference: String,
}

/// Import; prints the image ID.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let store = Store::open(&global.root)?;
    let record = import_rootfs_as(&store, &args.file, &args.reference, &args.file, source_date_epoch())?;
    println!("{}: imported {}", familiar_name(&record.name), record.config_digest);
    Ok(0)
}

/// Store `file` as the single layer of a new image named `name` (the
/// layer is unpacked too, which also checks it is safe), created now or at
/// `SOURCE_DATE_EPOCH`.
pub fn import_rootfs(store: &Store, file: &Path, name: &str) -> anyhow::Result<ImageRecord> {
    import_rootfs_as(store, file, name, file, source_date_epoch())
}

/// [`import_rootfs`] of `file`, which the image's history and errors call
/// `shown` (the daemon imports an upload under the client's file name),
/// created at `epoch` (seconds; `None`: now). The daemon passes the
/// client's `SOURCE_DATE_EPOCH`.
pub fn import_rootfs_as(store: &Store, file: &Path, name: &str, shown: &Path, epoch: Option<i64>) -> anyhow::Result<ImageRecord> {
    let name = kiln_cache::images::normalize_reference(name)?;
    let open = || std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()));
    let mut reader = BufReader::new(open()?);
    let media_type = layer_media_type(detect_compression(&mut reader)?);
    let _ = reader.fill_buf()?;
    let (digest, size) = store.content.put_reader(&mut reader, None, None)?;
    let blob = BlobRecord { media_type: media_type.to_string(), digest, size };
    let snapshot =
        unpack_layer_snapshot(store, &blob, None).map_err(|e| e.context(format!("importing {}", shown.display())))?;
    let diff_id = format!("sha256:{}", snapshot.trim_start_matches("sha256-"));
    let created = created_rfc3339(epoch);
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": format!("kiln import {}", shown.display()) }],
    });
    name_image(store, &name, &serde_json::to_vec(&config)?, &[blob])
}

/// OCI media type of a layer blob with this compression.
pub(crate) fn layer_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Store `config` and an OCI manifest over it and `layers` (blobs already
/// in the content store), and name the image `name`.
pub(crate) fn name_image(
    store: &Store,
    name: &str,
    config: &[u8],
    layers: &[BlobRecord],
) -> anyhow::Result<ImageRecord> {
    let config_digest = store.content.put_bytes(config, None)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&manifest)?;
    let digest = store.content.put_bytes(&bytes, None)?;
    store.images.put(name, &Descriptor { media_type: OCI_MANIFEST.into(), digest, size: bytes.len() as u64 })
}

/// `SOURCE_DATE_EPOCH` of this process, if set to a number.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<i64>().ok())
}

/// `epoch` (else now) as RFC 3339 UTC.
fn created_rfc3339(epoch: Option<i64>) -> String {
    let secs = epoch.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    });
    kiln_exporter::time::rfc3339(secs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(super::created_rfc3339(Some(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(super::created_rfc3339(Some(0)), "1970-01-01T00:00:00Z");
        assert!(super::created_rfc3339(None).starts_with("20"));
    }
}
