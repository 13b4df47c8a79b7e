//! Snapshot directory → layer blob in the content store.
//!
//! A snapshot is in overlay format; a layer tar is in OCI format. The walk
//! goes depth-first with names sorted bytewise (a stable order), a 0/0
//! character device becomes `.wh.<name>`, an opaque directory gets a
//! `.wh..wh..opq` entry right after its own, and everything else is
//! written by [`TarFsWriter`]. The tar streams through a [`LayerStream`]
//! into the content store, so diff ID and digest come out of the one pass.
//!
//! A snapshot whose [`SnapshotMeta`] already records a blob is not
//! re-tarred; a new blob is recorded there.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;
use kiln_cache::Store;
use kiln_cache::snapshots::BlobRecord;
use rayon::prelude::*;

use crate::blobs::{blob_writer, commit_blob};
use crate::compression::{Compression, CompressionKind, LayerStream};
use crate::tarfs::{TarFsWriter, is_opaque_dir, is_whiteout, os_name};

/// Diff ID of a tar with no entries (1024 zero bytes).
pub const EMPTY_TAR_DIFF_ID: &str = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";

/// Prefix of a whiteout entry's base name.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Base name of the entry that marks its directory opaque.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How layers are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerOptions {
    /// The compression new blobs get.
    pub compression: Compression,
    /// Re-compress layers whose existing blob has another compression
    /// (otherwise any existing blob is reused, as in BuildKit).
    pub force_compression: bool,
    /// Clamp file mtimes to this time (`SOURCE_DATE_EPOCH` with
    /// rewrite-timestamp).
    pub clamp_mtime: Option<i64>,
}

/// A layer blob made from (or found for) a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Snapshot it came from.
    pub snapshot: String,
    /// The blob's compression.
    pub compression: CompressionKind,
    /// `sha256:` of the blob.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// The tar has no entries (BuildKit drops such layers from images).
    pub empty: bool,
    /// An existing blob was used; nothing was tarred.
    pub reused: bool,
}

/// Write the layer tar of the overlay-format directory `dir` into `out`.
/// Returns the stream and the number of entries.
pub fn write_layer_tar<W: Write>(dir: &Path, out: W, clamp_mtime: Option<i64>) -> io::Result<(W, u64)> {
    let mut tar = TarFsWriter::new(out, clamp_mtime);
    let mut entries = 0;
    walk_layer(&mut tar, dir, "", &mut entries)?;
    Ok((tar.finish()?, entries))
}

fn walk_layer<W: Write>(tar: &mut TarFsWriter<W>, dir: &Path, prefix: &str, entries: &mut u64) -> io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = format!("{prefix}{}", os_name(&name)?);
        let meta = std::fs::symlink_metadata(&path)?;
        if is_whiteout(&meta) {
            tar.append_marker(&format!("{prefix}{WHITEOUT_PREFIX}{}", os_name(&name)?), meta.mtime())?;
            *entries += 1;
            continue;
        }
        if tar.append_path(&rel, &path)? {
            *entries += 1;
        }
        if meta.is_dir() {
            let child_prefix = format!("{rel}/");
            if is_opaque_dir(&path)? {
                tar.append_marker(&format!("{child_prefix}{OPAQUE_MARKER}"), meta.mtime())?;
                *entries += 1;
            }
            walk_layer(tar, &path, &child_prefix, entries)?;
        }
    }
    Ok(())
}

/// Latest mtime of anything under `dir` (not following links).
fn max_mtime(dir: &Path) -> io::Result<i64> {
    let mut max = i64::MIN;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        max = max.max(meta.mtime());
        if meta.is_dir() {
            max = max.max(max_mtime(&entry.path())?);
        }
    }
    Ok(max)
}

/// Makes layer blobs from snapshots of one store.
pub struct LayerWriter<'a> {
    store: &'a Store,
    options: LayerOptions,
}

/// The pool layers are written on: more threads than cores. A layer's own
/// CPU work (deflate) runs on the compression pool; what a layer thread
/// mostly does is wait, for its blocks and for the fsyncs of its blob and
/// snapshot record, and a chain of many small layers is a chain of fsyncs
/// that only overlap with enough threads.
fn layer_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads((crate::compression::compression_threads() * 4).clamp(4, 16))
            .thread_name(|i| format!("kiln-layer-{i}"))
            .build()
            .expect("layer thread pool")
    })
}

impl<'a> LayerWriter<'a> {
    /// Layers from `store`'s snapshots, into its content store.
    pub fn new(store: &'a Store, options: LayerOptions) -> Self {
        LayerWriter { store, options }
    }

    /// The blobs of a chain of snapshots, in order, made in parallel.
    pub fn write_chain(&self, snapshots: &[String]) -> anyhow::Result<Vec<LayerBlob>> {
        // The same snapshot twice is made once (its meta is written once).
        let mut unique: Vec<&String> = snapshots.iter().collect();
        unique.sort();
        unique.dedup();
        let made: Vec<LayerBlob> =
            layer_pool().install(|| unique.par_iter().map(|id| self.write(id)).collect::<anyhow::Result<_>>())?;
        Ok(snapshots
            .iter()
            .map(|id| made.iter().find(|b| &b.snapshot == id).expect("made above").clone())
            .collect())
    }

    /// The blob of snapshot `id`: an existing one if recorded and present,
    /// else tarred, compressed and recorded now.
    pub fn write(&self, id: &str) -> anyhow::Result<LayerBlob> {
        let snapshots = &self.store.snapshots;
        anyhow::ensure!(snapshots.exists(id), "snapshot {id:?} does not exist in the store");
        let mut meta = snapshots.meta(id).with_context(|| format!("reading metadata of snapshot {id:?}"))?;
        let dir = snapshots.path(id);
        // A clamped tar equals the plain one unless something is newer
        // than the epoch; only then do recorded blobs not apply.
        let clamp = match self.options.clamp_mtime {
            Some(epoch) if max_mtime(&dir).with_context(|| format!("reading snapshot {id:?}"))? > epoch => Some(epoch),
            _ => None,
        };
        let wanted = self.options.compression.kind;
        if let (None, Some(diff_id)) = (clamp, &meta.diff_id) {
            let usable = |r: &&BlobRecord| {
                let kind = CompressionKind::from_media_type(&r.media_type);
                kind.is_some() && self.store.content.exists(&r.digest)
            };
            let exact = meta.blobs.iter().filter(usable).find(|r| {
                CompressionKind::from_media_type(&r.media_type) == Some(wanted)
            });
            let any = meta.blobs.iter().find(usable);
            let found = if self.options.force_compression { exact } else { exact.or(any) };
            if let Some(r) = found {
                return Ok(LayerBlob {
                    snapshot: id.to_string(),
                    compression: CompressionKind::from_media_type(&r.media_type).expect("checked"),
                    digest: r.digest.clone(),
                    size: r.size,
                    diff_id: diff_id.clone(),
                    empty: diff_id == EMPTY_TAR_DIFF_ID,
                    reused: true,
                });
            }
        }
        let sink = blob_writer(&self.store.content)?;
        let stream = LayerStream::new(sink, self.options.compression)?;
        let (stream, entries) =
            write_layer_tar(&dir, stream, clamp).with_context(|| format!("writing the layer of snapshot {id:?}"))?;
        let (sink, d) = stream.finish()?;
        commit_blob(sink, &d.digest, d.size)?;
        if clamp.is_none() {
            // Record it so the next export reuses it.
            meta.diff_id = Some(d.diff_id.clone());
            meta.blobs.retain(|r| r.media_type != wanted.oci_media_type());
            meta.blobs.push(BlobRecord {
                media_type: wanted.oci_media_type().to_string(),
                digest: d.digest.clone(),
                size: d.size,
            });
            snapshots.set_meta(id, &meta).with_context(|| format!("recording the blob of snapshot {id:?}"))?;
        }
        Ok(LayerBlob {
            snapshot: id.to_string(),
            compression: wanted,
            digest: d.digest,
            size: d.size,
            diff_id: d.diff_id,
            empty: entries == 0,
            reused: false,
        })
    }
}
