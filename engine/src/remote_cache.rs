//! `--cache-from` / `--cache-to` around one build (format:
//! `exporter/CACHE.md`).
//!
//! Before solving, [`import`] reads every `--cache-from` (a cache index in
//! a registry, an OCI layout, or an image with an inline cache) into an
//! [`ImportedCache`]: cache key → layers (blob, diff ID, where to fetch
//! it). Nothing big is downloaded yet. The solver asks it on a local cache
//! miss ([`kiln_solver::CacheImport`]); a hit fetches only the blobs of
//! that step's layers the store lacks, unpacks them into snapshots keyed by
//! diff ID (shared with pulled images, blob recorded so it is never
//! re-tarred), and the step is reported CACHED.
//!
//! After the build, [`export`] writes the records of the solve's steps and
//! their layer blobs to each `--cache-to` (registry push or OCI layout);
//! `type=inline` is applied to the image by [`crate::build`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use kiln_cache::Store;
use kiln_cache::remote::{CacheConfig, CacheLayer};
use kiln_cache::snapshots::{BlobRecord, SnapshotMeta};
use kiln_exporter::cache_export::{self, CacheFrom, CacheStep, CacheTo};
use kiln_exporter::layer::EMPTY_TAR_DIFF_ID;
use kiln_frontend::Platform;
use kiln_solver::{Event, EventSink};

use crate::registry::cache::FetchedCache;
use crate::registry::manifest::Descriptor;
use crate::registry::{Registry, RegistryError};
use crate::unpack::{snapshot_id_for_diff_id, unpack_layer_snapshot};

/// The cache flags of one build.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// `--cache-to`, in order.
    pub to: Vec<CacheTo>,
    /// `--cache-from`, in order (earlier ones win on the same key).
    pub from: Vec<CacheFrom>,
    /// The client for registry caches (required when one is named).
    pub registry: Option<Arc<Registry>>,
}

impl CacheOptions {
    /// Parse `--cache-to` and `--cache-from` values.
    pub fn parse(to: &[String], from: &[String], registry: Option<Arc<Registry>>) -> anyhow::Result<CacheOptions> {
        Ok(CacheOptions {
            to: to.iter().map(|s| CacheTo::parse(s)).collect::<Result<_, _>>()?,
            from: from.iter().map(|s| CacheFrom::parse(s)).collect::<Result<_, _>>()?,
            registry,
        })
    }

    /// Whether `type=inline` was asked for.
    pub fn inline(&self) -> bool {
        self.to.contains(&CacheTo::Inline)
    }

    fn registry(&self) -> anyhow::Result<&Arc<Registry>> {
        self.registry.as_ref().context("a registry cache needs a registry client")
    }
}

/// Where an imported layer's blob is.
#[derive(Debug)]
enum BlobSource {
    /// A repository (`host/repo[:tag]`) of a registry.
    Registry(String),
    /// An OCI layout directory.
    Layout(PathBuf),
}

#[derive(Debug, Clone)]
struct ImportedLayer {
    layer: CacheLayer,
    source: Arc<BlobSource>,
}

/// Records imported by `--cache-from`, materialized on demand.
pub struct ImportedCache {
    store: Arc<Store>,
    registry: Option<Arc<Registry>>,
    records: HashMap<String, Vec<ImportedLayer>>,
    fetched: AtomicUsize,
}

impl std::fmt::Debug for ImportedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedCache").field("keys", &self.records.len()).finish_non_exhaustive()
    }
}

impl ImportedCache {
    /// How many keys were imported.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no key was imported.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many layer blobs cache hits have downloaded or copied so far.
    pub fn blobs_fetched(&self) -> usize {
        self.fetched.load(Ordering::Relaxed)
    }

    fn add(&mut self, config: &CacheConfig, source: BlobSource) {
        let source = Arc::new(source);
        for (key, chain) in config.chains() {
            let layers = chain.into_iter().map(|layer| ImportedLayer { layer, source: source.clone() }).collect();
            self.records.entry(key).or_insert(layers);
        }
    }

    /// The snapshot of one imported layer, fetching and unpacking its blob
    /// if the store has no snapshot with its diff ID. It takes the layer's
    /// creation time when that is earlier than its own.
    async fn materialize(&self, imported: &ImportedLayer) -> anyhow::Result<String> {
        let mut id = self.snapshot(imported).await?;
        // A reused snapshot is marked used under the GC lock, as the
        // solver does for its own hits; one collected meanwhile is made again.
        let (store, ids) = (self.store.clone(), vec![id.clone()]);
        if !tokio::task::spawn_blocking(move || kiln_cache::lease::use_snapshots(&store, &ids)).await?? {
            id = self.snapshot(imported).await?;
        }
        if let Some(theirs) = imported.layer.created {
            let (store, id, diff_id) = (self.store.clone(), id.clone(), imported.layer.diff_id.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                // The lock unpacking takes: no other writer of this meta.
                let _lock = store.lock(&format!("layer-{}", kiln_cache::content::digest_hex(&diff_id)?))?;
                let mut meta = store.snapshots.meta(&id)?;
                if meta.created.is_none_or(|ours| theirs < ours) {
                    meta.created = Some(theirs);
                    store.snapshots.set_meta(&id, &meta)?;
                }
                Ok(())
            })
            .await??;
        }
        Ok(id)
    }

    /// The snapshot of one imported layer (see [`ImportedCache::materialize`]).
    async fn snapshot(&self, imported: &ImportedLayer) -> anyhow::Result<String> {
        let layer = &imported.layer;
        let id = snapshot_id_for_diff_id(&layer.diff_id)?;
        if self.store.snapshots.exists(&id) {
            return Ok(id);
        }
        if layer.diff_id == EMPTY_TAR_DIFF_ID {
            let store = self.store.clone();
            return tokio::task::spawn_blocking(move || empty_snapshot(&store, &id)).await?;
        }
        if !self.store.content.exists(&layer.blob) {
            match imported.source.as_ref() {
                BlobSource::Registry(reference) => {
                    let desc = Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.blob.clone(),
                        size: layer.size,
                        platform: None,
                    };
                    let registry = self.registry.as_ref().context("no registry client")?;
                    registry.fetch_cache_blob(&self.store, reference, &desc).await?;
                }
                BlobSource::Layout(dir) => {
                    let (store, dir, layer) = (self.store.clone(), dir.clone(), layer.clone());
                    tokio::task::spawn_blocking(move || copy_layout_blob(&store, &dir, &layer.blob, Some(layer.size))).await??;
                }
            }
            self.fetched.fetch_add(1, Ordering::Relaxed);
        }
        let store = self.store.clone();
        let blob = BlobRecord { media_type: layer.media_type.clone(), digest: layer.blob.clone(), size: layer.size };
        let diff_id = layer.diff_id.clone();
        tokio::task::spawn_blocking(move || unpack_layer_snapshot(&store, &blob, Some(&diff_id))).await?
    }
}

#[async_trait::async_trait]
impl kiln_solver::CacheImport for ImportedCache {
    async fn load(&self, key: &str) -> anyhow::Result<Option<Vec<String>>> {
        let Some(chain) = self.records.get(key) else { return Ok(None) };
        // Chains are short: all layers at once, results in order.
        let ids = futures::future::try_join_all(chain.iter().map(|layer| self.materialize(layer))).await?;
        Ok(Some(ids))
    }
}

/// The empty layer, made locally (it is never fetched: inline caches do
/// not carry its blob, since images drop empty layers).
fn empty_snapshot(store: &Store, id: &str) -> anyhow::Result<String> {
    let _lock = store.lock(&format!("layer-{}", id.trim_start_matches("sha256-")))?;
    if !store.snapshots.exists(id) {
        let active = store.snapshots.prepare()?;
        let meta = SnapshotMeta { diff_id: Some(EMPTY_TAR_DIFF_ID.into()), ..Default::default() };
        store.snapshots.commit(active, id, &meta)?;
    }
    Ok(id.to_string())
}

/// `blobs/sha256/<hex>` of an OCI layout into the store, verified.
fn copy_layout_blob(store: &Store, dir: &Path, digest: &str, size: Option<u64>) -> anyhow::Result<()> {
    let hex = kiln_cache::content::digest_hex(digest)?;
    let path = dir.join("blobs").join("sha256").join(hex);
    let mut file = std::fs::File::open(&path).with_context(|| format!("cache {}: blob {digest} is missing", dir.display()))?;
    let mut writer = store.content.writer()?;
    std::io::copy(&mut file, &mut writer).with_context(|| format!("reading {}", path.display()))?;
    writer.commit(Some(digest), size).with_context(|| format!("cache {}: blob {digest}", dir.display()))?;
    Ok(())
}

/// A blob of an OCI layout, read whole and checked against its digest.
fn read_layout_blob(dir: &Path, digest: &str) -> anyhow::Result<Vec<u8>> {
    let hex = kiln_cache::content::digest_hex(digest)?;
    let bytes = std::fs::read(dir.join("blobs").join("sha256").join(hex))
        .with_context(|| format!("cache {}: blob {digest} is missing", dir.display()))?;
    let actual = kiln_cache::content::sha256_digest(&bytes);
    anyhow::ensure!(actual == digest, "cache {}: blob {digest} is corrupt (its content hashes to {actual})", dir.display());
    Ok(bytes)
}

/// The cache config of the OCI layout `dir`, tag `tag`.
fn read_layout_cache(dir: &Path, tag: &str) -> anyhow::Result<CacheConfig> {
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).with_context(|| format!("--cache-from: {} is not an OCI layout", dir.display()))?;
    let index = oci_spec::image::ImageIndex::from_reader(&bytes[..]).with_context(|| format!("reading {}", index_path.display()))?;
    let tagged = |d: &&oci_spec::image::Descriptor| {
        d.annotations().as_ref().and_then(|a| a.get(oci_spec::image::ANNOTATION_REF_NAME)).map(String::as_str) == Some(tag)
    };
    let top = index
        .manifests()
        .iter()
        .find(tagged)
        .with_context(|| format!("{}: no cache tagged {tag:?}", index_path.display()))?;
    let cache_index = read_layout_blob(dir, top.digest().as_ref())?;
    let (_, config) = cache_export::parse_index(&cache_index).with_context(|| format!("cache {}", dir.display()))?;
    let config_bytes = read_layout_blob(dir, config.digest().as_ref())?;
    CacheConfig::parse(&config_bytes).with_context(|| format!("cache {}", dir.display()))
}

/// A progress vertex for cache work outside the solve.
struct Step<'a> {
    events: &'a EventSink,
    vertex: String,
    name: String,
    start: std::time::Instant,
}

impl<'a> Step<'a> {
    fn start(events: &'a EventSink, name: String) -> Step<'a> {
        let vertex = kiln_cache::content::sha256_digest(name.as_bytes());
        events.send(Event::Started { vertex: vertex.clone(), name: name.clone() });
        Step { events, vertex, name, start: std::time::Instant::now() }
    }
    fn log(&self, line: String) {
        self.events.send(Event::Log { vertex: self.vertex.clone(), stream: "stderr".into(), line });
    }
    fn done(self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.events.send(Event::Done { vertex: self.vertex, name: self.name, seconds });
    }
    fn fail(self, e: &anyhow::Error) {
        self.events.send(Event::Error { vertex: self.vertex, name: self.name, message: format!("{e:#}") });
    }
}

/// Read every `--cache-from`. A registry reference that does not exist
/// yet (the first build) or holds no kiln cache only warns; an unreachable
/// registry or a corrupt cache is an error.
pub async fn import(
    store: &Arc<Store>,
    options: &CacheOptions,
    platform: &Platform,
    events: &EventSink,
) -> anyhow::Result<Option<Arc<ImportedCache>>> {
    if options.from.is_empty() {
        return Ok(None);
    }
    let mut cache = ImportedCache {
        store: store.clone(),
        registry: options.registry.clone(),
        records: HashMap::new(),
        fetched: AtomicUsize::new(0),
    };
    for from in &options.from {
        let (label, result) = match from {
            CacheFrom::Local { src, tag } => {
                let (src2, tag2) = (src.clone(), tag.clone());
                let read = tokio::task::spawn_blocking(move || read_layout_cache(&src2, &tag2)).await?;
                (src.display().to_string(), read.map(|c| Some((c, BlobSource::Layout(src.clone())))))
            }
            CacheFrom::Registry { reference } => {
                (reference.clone(), import_registry(store, options.registry()?, reference, platform).await)
            }
        };
        let step = Step::start(events, format!("importing cache manifest from {label}"));
        match result {
            Ok(Some((config, source))) => {
                step.log(format!("{} cached steps, {} layers", config.records.len(), config.layers.len()));
                cache.add(&config, source);
                step.done();
            }
            Ok(None) => {
                step.log(format!("warning: {label} holds no kiln cache; building without it"));
                step.done();
            }
            Err(e) if matches!(e.downcast_ref::<RegistryError>(), Some(RegistryError::NotFound { .. })) => {
                step.log(format!("warning: no cache at {label} yet; building without it"));
                step.done();
            }
            Err(e) => {
                let e = e.context(format!("--cache-from {label}"));
                step.fail(&e);
                return Err(e);
            }
        }
    }
    Ok(Some(Arc::new(cache)))
}

/// After the solve: how many layer blobs the cache hits fetched, as a
/// progress line (a step whose layers were all local fetched nothing).
pub fn report_import(cache: &ImportedCache, events: &EventSink) {
    let step = Step::start(events, "cache import".into());
    step.log(format!("{} layer blobs fetched from the imported cache", cache.blobs_fetched()));
    step.done();
}

async fn import_registry(
    store: &Store,
    registry: &Registry,
    reference: &str,
    platform: &Platform,
) -> anyhow::Result<Option<(CacheConfig, BlobSource)>> {
    let source = BlobSource::Registry(reference.to_string());
    match registry.fetch_cache(store, reference, platform).await? {
        FetchedCache::Index { config, .. } => Ok(Some((CacheConfig::parse(&config)?, source))),
        FetchedCache::Image { config } => Ok(cache_export::inline_config(&config)?.map(|c| (c, source))),
    }
}

/// Write the steps of a solve to one `--cache-to` (not `type=inline`,
/// which goes into the image). `final_layers` is the image's chain, for
/// `mode=min`. With `ignore-error=true` a failure only warns.
pub async fn export(
    store: &Arc<Store>,
    options: &CacheOptions,
    to: &CacheTo,
    steps: &[CacheStep],
    final_layers: &[String],
    events: &EventSink,
) -> anyhow::Result<()> {
    let (label, mode, compression, ignore_error) = match to {
        CacheTo::Registry { reference, mode, compression, ignore_error } => (reference.clone(), *mode, *compression, *ignore_error),
        CacheTo::Local { dest, mode, compression, ignore_error } => (dest.display().to_string(), *mode, *compression, *ignore_error),
        CacheTo::Inline => return Ok(()),
    };
    let step = Step::start(events, format!("exporting cache to {label}"));
    let result = async {
        let selected: Vec<CacheStep> =
            cache_export::select_steps(steps, final_layers, mode).into_iter().cloned().collect();
        let (store2, count) = (store.clone(), selected.len());
        let prepared = tokio::task::spawn_blocking(move || {
            let refs: Vec<&CacheStep> = selected.iter().collect();
            cache_export::prepare(&store2, &refs, compression)
        })
        .await??;
        match to {
            CacheTo::Registry { reference, .. } => {
                let blobs = prepared
                    .layers
                    .iter()
                    .chain(std::iter::once(&prepared.config_descriptor))
                    .map(|d| Descriptor {
                        media_type: d.media_type().to_string(),
                        digest: d.digest().to_string(),
                        size: d.size(),
                        platform: None,
                    })
                    .collect();
                let index = Descriptor {
                    media_type: prepared.index.media_type().to_string(),
                    digest: prepared.index.digest().to_string(),
                    size: prepared.index.size(),
                    platform: None,
                };
                let pushed = options.registry()?.push_cache(store, &index, blobs, reference).await?;
                step.log(format!(
                    "{count} steps, {} layers: {} blobs uploaded, {} already there, {} mounted; index {}",
                    prepared.layers.len(),
                    pushed.blobs_uploaded,
                    pushed.blobs_skipped,
                    pushed.blobs_mounted,
                    pushed.manifest_digest
                ));
            }
            CacheTo::Local { dest, .. } => {
                let (store2, dest2, prepared2) = (store.clone(), dest.clone(), prepared.clone());
                tokio::task::spawn_blocking(move || cache_export::write_local(&store2, &prepared2, &dest2)).await??;
                step.log(format!("{count} steps, {} layers; index {}", prepared.layers.len(), prepared.index.digest()));
            }
            CacheTo::Inline => {}
        }
        anyhow::Ok(())
    }
    .await
    .with_context(|| format!("--cache-to {label}"));
    match result {
        Err(e) if ignore_error => {
            step.log(format!("warning: {e:#} (ignored: ignore-error=true)"));
            step.done();
            Ok(())
        }
        Err(e) => {
            step.fail(&e);
            Err(e)
        }
        Ok(()) => {
            step.done();
            Ok(())
        }
    }
}
