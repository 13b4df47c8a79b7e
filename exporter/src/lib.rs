//! kiln's exporter: a chain of snapshots + an image config → image outputs.
//!
//! - [`output::Output::parse`] reads `-o type=...,dest=...` (buildx syntax)
//!   once; [`export::export`] writes a build result to it.
//! - [`layer::LayerWriter`] turns overlay-format snapshots into layer blobs
//!   (sorted, PAX, `.wh.` whiteouts, hardlinks, xattrs), compressed with
//!   gzip or zstd in parallel and hashed while they stream; a snapshot
//!   whose blob exists is never re-tarred.
//! - [`image::build_image`] writes config and manifest (OCI or Docker media
//!   types) to the content store; `SOURCE_DATE_EPOCH` makes them
//!   reproducible.
//! - [`cache_export`] parses `--cache-to` / `--cache-from` and writes a
//!   build cache (records + layer blobs) as an OCI layout or inline in an
//!   image config (`exporter/CACHE.md`).
//! - [`layout`] writes images already in the store as an OCI layout or a
//!   docker-archive (`kiln save` uses it too); [`rootfs`] writes the final
//!   filesystem (`type=local`, `type=tar`).
#![deny(missing_docs)]

mod blobs;
pub mod cache_export;
pub mod compression;
pub mod dest;
pub mod export;
pub mod image;
pub mod layer;
pub mod layout;
pub mod output;
pub mod rootfs;
pub mod tarfs;
pub mod time;

pub use blobs::read_blob;
pub use compression::{Compression, CompressionKind};
pub use export::{export, tag_image};
pub use image::{BuiltImage, ImageOptions, ImageSpec, build_image};
pub use layer::{LayerBlob, LayerOptions, LayerWriter};
pub use layout::{NamedImage, save_docker, save_oci};
pub use output::{ImageOutputOptions, OciDest, Output};
