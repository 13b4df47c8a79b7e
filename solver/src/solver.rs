//! The scheduler: runs a [`Definition`] to a chain of snapshots.
//!
//! Every op becomes a shared future that waits for its inputs, computes its
//! key (see [`crate::cachekey`]), and then either loads its result from the
//! cache index, or (on a miss) from an imported cache
//! ([`SolveRequest::cache_import`], `--cache-from`), or computes it.
//! Independent ops therefore run concurrently; a semaphore bounds how many
//! compute at once (the cores by default).
//! Futures for the same key are shared through an in-flight map — also
//! across concurrent solves on one [`Solver`] — so identical work runs once.
//! The map holds weak handles: when every solve waiting on a computation
//! is gone (e.g. cancelled after another op failed), the computation is
//! dropped with them.
//!
//! Across processes on one store, an op about to compute takes a lock
//! named by its key (`<root>/locks/keys/`, a `flock`, so a dead process
//! never leaves it held) and looks in the cache index again once it has
//! it: a second `kiln build` asking for the same step waits for the first
//! and then reports it cached.
//!
//! Results: an op's result is a chain of committed snapshot ids, bottom
//! first — except a build context, which stays a handle on the host dir.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use kiln_cache::Store;
use kiln_cache::layered::LayeredView;
use kiln_cache::lock::TransientLock;
use kiln_cache::snapshots::SnapshotMeta;
use kiln_frontend::graph::{FileAction, MountKind, Op, OpNode, SourceOp};
use kiln_frontend::Definition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::cachekey;
use crate::error::SolveError;
use crate::events::{Event, EventSink};
use crate::tree::{LocalContext, SourceTree, VerifiedContent};
use crate::worker::{CacheImport, Executor, ImageSource, ResolvedImage};

/// What one build asks for.
#[derive(Debug, Clone, Default)]
pub struct SolveRequest {
    /// The graph to run.
    pub definition: Definition,
    /// Host directories of `Source::Local` names (`context` → the build
    /// context).
    pub locals: HashMap<String, PathBuf>,
    /// The known content of some of `locals` (by the same name): those are
    /// opened with [`LocalContext::from_verified`], so their files are not
    /// checked or hashed again. Only for directories the caller wrote from
    /// contents it verified and that nothing changes.
    pub verified: HashMap<String, Arc<VerifiedContent>>,
    /// Secret values by id, for `RUN --mount=type=secret`. They reach only
    /// the process that asks for them: never a key, a layer or a log.
    pub secrets: HashMap<String, Vec<u8>>,
    /// `--no-cache`: execute every op again.
    pub no_cache: bool,
    /// Where progress events go.
    pub events: EventSink,
    /// `--cache-from`: asked on a local cache miss before executing.
    pub cache_import: Option<Arc<dyn CacheImport>>,
}

/// What a successful solve produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveOutput {
    /// Snapshot ids of the target's layers, bottom first.
    pub layers: Vec<String>,
    /// The target op's cache key.
    pub key: String,
    /// Every RUN/COPY-like step the solve needed (executed or cached), in
    /// graph order: what `--cache-to` exports.
    pub steps: Vec<SolvedStep>,
}

/// One step's cache key and result, for exporting the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SolvedStep {
    /// The step's cache key.
    pub key: String,
    /// Snapshot ids of its result, bottom first.
    pub layers: Vec<String>,
}

/// The result of one op.
#[derive(Debug, Clone)]
pub(crate) enum Output {
    /// Committed snapshot ids, bottom first.
    Layers(Vec<String>),
    /// A build context on the host.
    Context(Arc<LocalContext>),
}

/// An op's key and result.
#[derive(Debug)]
pub(crate) struct Computed {
    pub key: String,
    pub output: Output,
}

type NodeResult = Result<Arc<Computed>, SolveError>;
type NodeFuture = Shared<BoxFuture<'static, NodeResult>>;

/// Directory under `<root>/locks/` of the per-key locks that make an op
/// run once across kiln processes sharing a store.
pub const KEY_LOCK_DIR: &str = "keys";

/// What the cache index stores per key.
#[derive(Debug, Serialize, Deserialize)]
struct CacheRecord {
    /// The result's snapshot chain, bottom first.
    layers: Vec<String>,
}

/// Runs definitions; share one per store so concurrent builds share work.
#[derive(Clone)]
pub struct Solver {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub store: Arc<Store>,
    pub executor: Arc<dyn Executor>,
    pub images: Arc<dyn ImageSource>,
    limit: Arc<Semaphore>,
    inflight: InflightMap<Output>,
    resolving: InflightMap<Arc<ResolvedImage>>,
    /// One lock per cache-mount id (`sharing=locked`, and `private`'s
    /// "is anyone using it" test).
    pub cache_mount_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// Per-solve state shared by its op futures.
struct SolveCtx {
    def: Definition,
    locals: HashMap<String, PathBuf>,
    verified: HashMap<String, Arc<VerifiedContent>>,
    secrets: Arc<HashMap<String, Vec<u8>>>,
    no_cache: bool,
    events: EventSink,
    contexts: Mutex<Vec<Arc<LocalContext>>>,
    cache_import: Option<Arc<dyn CacheImport>>,
    /// Cache records still being written (see `compute`); the solve waits
    /// for them before it ends.
    records: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Taken at the first step this solve runs (a cached build needs none):
    /// from then on the next step's snapshot is prepared while one runs.
    prepare_ahead: std::sync::OnceLock<kiln_cache::snapshots::PrepareAhead>,
}

impl Solver {
    /// A solver over `store`, running processes with `executor` and
    /// fetching base images with `images`; computes at most as many ops at
    /// once as there are cores.
    pub fn new(store: Arc<Store>, executor: Arc<dyn Executor>, images: Arc<dyn ImageSource>) -> Solver {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Solver::with_parallelism(store, executor, images, cores)
    }

    /// Like [`Solver::new`] with an explicit bound on concurrent ops.
    pub fn with_parallelism(
        store: Arc<Store>,
        executor: Arc<dyn Executor>,
        images: Arc<dyn ImageSource>,
        parallelism: usize,
    ) -> Solver {
        Solver {
            inner: Arc::new(Inner {
                store,
                executor,
                images,
                limit: Arc::new(Semaphore::new(parallelism.max(1))),
                inflight: DashMap::new(),
                resolving: DashMap::new(),
                cache_mount_locks: DashMap::new(),
            }),
        }
    }

    /// The store this solver writes to.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Run `req.definition` and return the target's snapshot chain. The
    /// first failing op cancels the others; its error names it.
    pub async fn solve(&self, req: SolveRequest) -> Result<SolveOutput, SolveError> {
        // Garbage collection keeps what this solve uses until it ends.
        let store = self.inner.store.clone();
        let _lease = tokio::task::spawn_blocking(move || kiln_cache::lease::Lease::new(&store, "solve"))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("{e:#}")))
            .map_err(|e| SolveError { op: "build cache".into(), line: None, message: format!("taking a lease: {e}"), log_tail: vec![] })?;
        let ctx = Arc::new(SolveCtx {
            def: req.definition,
            locals: req.locals,
            verified: req.verified,
            secrets: Arc::new(req.secrets),
            no_cache: req.no_cache,
            events: req.events,
            contexts: Mutex::new(Vec::new()),
            cache_import: req.cache_import,
            records: Mutex::new(Vec::new()),
            prepare_ahead: std::sync::OnceLock::new(),
        });
        let n = ctx.def.ops.len();
        let graph_error = |message: String| SolveError { op: "build graph".into(), line: None, message, log_tail: vec![] };
        if ctx.def.target >= n {
            return Err(graph_error(format!("target op {} does not exist ({n} ops)", ctx.def.target)));
        }
        // Only ops the target needs are run.
        let mut needed = vec![false; n];
        needed[ctx.def.target] = true;
        for i in (0..n).rev() {
            if needed[i] {
                for &j in &ctx.def.ops[i].inputs {
                    if j >= i {
                        return Err(graph_error(format!("op {i} reads op {j}, which does not come before it")));
                    }
                    needed[j] = true;
                }
            }
        }
        let mut futures: Vec<Option<NodeFuture>> = Vec::with_capacity(n);
        for i in 0..n {
            if !needed[i] {
                futures.push(None);
                continue;
            }
            let inputs: Vec<NodeFuture> =
                ctx.def.ops[i].inputs.iter().map(|&j| futures[j].clone().expect("inputs are needed")).collect();
            let fut = run_node(self.inner.clone(), ctx.clone(), i, inputs).boxed().shared();
            futures.push(Some(fut));
        }
        let all: Vec<NodeFuture> = futures.iter().flatten().cloned().collect();
        // try_join_all returns at the first error and drops the rest, which
        // cancels whatever only this solve was waiting for.
        let result = futures::future::try_join_all(all).await;
        let records = std::mem::take(&mut *ctx.records.lock().unwrap());
        for r in records {
            let _ = r.await;
        }
        for c in ctx.contexts.lock().unwrap().iter() {
            if let Err(e) = c.save_checksums() {
                tracing::warn!("saving context checksums: {e:#}");
            }
        }
        result?;
        let mut steps: Vec<SolvedStep> = Vec::new();
        for (i, fut) in futures.iter().enumerate() {
            let Some(fut) = fut else { continue };
            if !matches!(ctx.def.ops[i].op, Op::Exec(_) | Op::File(_)) {
                continue;
            }
            // Already finished: this only reads the shared result.
            let computed = fut.clone().await?;
            if let Output::Layers(layers) = &computed.output
                && !steps.iter().any(|s| s.key == computed.key)
            {
                steps.push(SolvedStep { key: computed.key.clone(), layers: layers.clone() });
            }
        }
        let target = futures[ctx.def.target].clone().expect("target is needed").await?;
        match &target.output {
            Output::Layers(layers) => Ok(SolveOutput { layers: layers.clone(), key: target.key.clone(), steps }),
            Output::Context(_) => Err(graph_error("the target is a build context, not a filesystem".into())),
        }
    }
}

/// Computations in flight, by key, as weak handles.
type InflightMap<T> = DashMap<String, WeakShared<BoxFuture<'static, Result<T, SolveError>>>>;

/// Run `work` once per `key`: a computation already in flight (in this
/// solve or another on the same solver) is joined instead of started again.
/// The flag says whether this call started it (false: joined), so only the
/// starter's events say the op ran.
fn dedup<T: Clone + Send + Sync + 'static>(
    inner: &Arc<Inner>,
    map: fn(&Inner) -> &InflightMap<T>,
    key: &str,
    work: impl FnOnce() -> BoxFuture<'static, Result<T, SolveError>>,
) -> (Shared<BoxFuture<'static, Result<T, SolveError>>>, bool) {
    let mut entry = map(inner).entry(key.to_string()).or_insert_with(|| {
        // A placeholder that can never be upgraded: replaced just below.
        futures::future::pending().boxed().shared().downgrade().expect("fresh future")
    });
    if let Some(running) = entry.value().upgrade() {
        return (running, false);
    }
    let this = inner.clone();
    let key_owned = key.to_string();
    let fut = work();
    let shared = async move {
        let out = fut.await;
        map(&this).remove(&key_owned);
        out
    }
    .boxed()
    .shared();
    *entry.value_mut() = shared.downgrade().expect("not yet polled");
    (shared, true)
}

impl Inner {
    /// The cached chain for `key`, if every snapshot of it still exists;
    /// they are marked used, so garbage collection keeps them while the
    /// solve's lease lives.
    fn cached(&self, key: &str) -> Option<Vec<String>> {
        let bytes = self.store.index.get(key).ok()??;
        let record: CacheRecord = serde_json::from_slice(&bytes).ok()?;
        kiln_cache::lease::use_snapshots(&self.store, &record.layers).ok()?.then_some(record.layers)
    }

    /// Record `layers` as the result of `key`. The snapshots are made
    /// durable first (those committed with `commit_deferred`, this step's
    /// and maybe earlier steps' still in flight), so after a power loss a
    /// record never names a snapshot that did not survive.
    fn remember(&self, key: &str, layers: &[String]) -> anyhow::Result<()> {
        self.store.snapshots.make_durable(layers)?;
        let record = serde_json::to_vec(&CacheRecord { layers: layers.to_vec() })?;
        self.store.index.put(key, &record)
    }

    /// Wait until no other process computes `key` on this store, then
    /// hold that right until the returned lock drops (or the process dies).
    /// Taken only for one op's own computation, never while waiting for
    /// other ops, so it cannot deadlock; the in-flight map already makes
    /// this process ask at most once per key.
    async fn lock_key(&self, key: &str) -> anyhow::Result<TransientLock> {
        let hex: String = key.trim_start_matches("sha256:").chars().filter(char::is_ascii_hexdigit).collect();
        anyhow::ensure!(!hex.is_empty(), "cache key {key:?} has no digest");
        let path = self.store.root().join("locks").join(KEY_LOCK_DIR).join(format!("{hex}.lock"));
        // Usually free: taken right here (an open and a non-blocking flock),
        // without a hop to a blocking thread.
        match TransientLock::try_acquire(&path) {
            Ok(Some(lock)) => return Ok(lock),
            Ok(None) => {}
            Err(e) => anyhow::bail!("locking cache key {key}: {e}"),
        }
        // Held by another process: flock blocks, so wait on a blocking
        // thread. If this solve is cancelled meanwhile, the lock is released
        // as soon as it is taken.
        tokio::task::spawn_blocking(move || TransientLock::acquire(&path))
            .await
            .map_err(|e| anyhow::anyhow!("cache key lock task: {e}"))?
            .map_err(|e| anyhow::anyhow!("locking cache key {key}: {e}"))
    }

    fn snapshot_paths(&self, layers: &[String]) -> Vec<PathBuf> {
        layers.iter().map(|id| self.store.snapshots.path(id)).collect()
    }
}

/// A readable name for an op without a description.
fn display_name(node: &OpNode) -> String {
    if !node.meta.description.is_empty() {
        return node.meta.description.clone();
    }
    match &node.op {
        Op::Source(SourceOp::Image { reference, .. }) => format!("FROM {reference}"),
        Op::Source(SourceOp::Local { name, .. }) => format!("[internal] load {name}"),
        Op::Source(_) => "source".into(),
        Op::Exec(e) => format!("RUN {}", e.args.join(" ")),
        Op::File(_) => "file".into(),
        Op::Merge(_) => "merge".into(),
    }
}

fn op_error(node: &OpNode, message: String, log_tail: Vec<String>) -> SolveError {
    SolveError {
        op: display_name(node),
        line: node.meta.span.map(|s| s.start_line),
        message,
        log_tail,
    }
}

/// One op: wait for the inputs, key it, then load or compute its result.
async fn run_node(inner: Arc<Inner>, ctx: Arc<SolveCtx>, idx: usize, inputs: Vec<NodeFuture>) -> NodeResult {
    let inputs: Vec<Arc<Computed>> = futures::future::try_join_all(inputs).await?;
    let node = ctx.def.ops[idx].clone();
    let name = display_name(&node);
    let input_keys: Vec<String> = inputs.iter().map(|c| c.key.clone()).collect();
    let vertex = cachekey::definition_key(&node.op.definition_digest(), &input_keys);
    let fail = |message: String| op_error(&node, message, vec![]);

    match &node.op {
        Op::Source(SourceOp::Scratch) => Ok(Arc::new(Computed { key: vertex, output: Output::Layers(vec![]) })),
        Op::Source(SourceOp::Local { name: local, exclude, .. }) => {
            let dir = ctx.locals.get(local).ok_or_else(|| fail(format!("no local directory given for {local:?}")))?;
            let context = match ctx.verified.get(local) {
                Some(content) => LocalContext::from_verified(local, dir, exclude, content.clone()),
                None => {
                    let checksum_file = inner.store.root().join("context-checksums").join(format!(
                        "{}.json",
                        hex::encode(Sha256::digest(dir.to_string_lossy().as_bytes()))
                    ));
                    LocalContext::open(local, dir, exclude, checksum_file)
                }
            }
            .map_err(|e| fail(format!("{e:#}")))?;
            let context = Arc::new(context);
            ctx.contexts.lock().unwrap().push(context.clone());
            Ok(Arc::new(Computed { key: vertex, output: Output::Context(context) }))
        }
        Op::Source(SourceOp::Image { reference, platform }) => {
            let (again_ref, again_platform) = (reference.clone(), platform.clone());
            let (reference, platform) = (reference.clone(), platform.clone());
            let images = inner.images.clone();
            let events = ctx.events.clone();
            let (v, n) = (vertex.clone(), name.clone());
            let node2 = node.clone();
            // Resolving is shared by vertex: two stages FROM the same image
            // pull it once.
            let (work, _) = dedup(&inner, |i| &i.resolving, &vertex, move || {
                async move {
                    events.send(Event::Started { vertex: v.clone(), name: n.clone() });
                    let start = Instant::now();
                    match images.resolve(&reference, &platform).await {
                        Ok(img) => {
                            events.send(Event::Done { vertex: v, name: n, seconds: start.elapsed().as_secs_f64() });
                            Ok(Arc::new(img))
                        }
                        Err(e) => {
                            let err = op_error(&node2, format!("resolving image {reference}: {e:#}"), vec![]);
                            events.send(Event::Error { vertex: v, name: n, message: err.message.clone() });
                            Err(err)
                        }
                    }
                }
                .boxed()
            });
            let mut image = work.await?;
            // Mark the layers used (so GC keeps them); if a collection took
            // one since it was resolved, resolve (unpack) again.
            if !kiln_cache::lease::use_snapshots(&inner.store, &image.layers).unwrap_or(false) {
                let again = inner.images.resolve(&again_ref, &again_platform).await;
                image = Arc::new(again.map_err(|e| fail(format!("resolving image {again_ref}: {e:#}")))?);
                if !kiln_cache::lease::use_snapshots(&inner.store, &image.layers).map_err(|e| fail(format!("{e:#}")))? {
                    return Err(fail(format!("image {again_ref}: its layers were removed while in use")));
                }
            }
            let key = cachekey::image_key(&node.op.definition_digest(), &image.manifest_digest);
            Ok(Arc::new(Computed { key, output: Output::Layers(image.layers.clone()) }))
        }
        Op::Source(SourceOp::Http { url, checksum, filename, mode }) => {
            // Fetched every time (no ETag check yet); the key follows the
            // content, so an unchanged download keeps everything cached.
            ctx.events.send(Event::Started { vertex: vertex.clone(), name: name.clone() });
            let start = Instant::now();
            let fetch_url = url.clone();
            let body = tokio::task::spawn_blocking(move || crate::http::fetch(&fetch_url))
                .await
                .map_err(|e| fail(format!("download task: {e}")))?
                .map_err(|e| fail(format!("{e:#}")))?;
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
            if let Some(want) = checksum {
                if *want != digest {
                    return Err(fail(format!("{url}: checksum mismatch: expected {want}, got {digest}")));
                }
            }
            let key = cachekey::content_key(&vertex, &[digest]);
            let layers = match inner.cached(&key) {
                Some(layers) => layers,
                None => {
                    let id = key.trim_start_matches("sha256:").to_string();
                    let active = inner.store.snapshots.prepare().map_err(|e| fail(format!("{e:#}")))?;
                    let file = active.fs().join(filename.trim_start_matches('/'));
                    let written = std::fs::write(&file, &body).and_then(|()| {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode.unwrap_or(0o600)))
                    });
                    if let Err(e) = written {
                        inner.store.snapshots.abort(active);
                        return Err(fail(format!("writing {filename}: {e}")));
                    }
                    inner.store.snapshots.commit(active, &id, &SnapshotMeta::default()).map_err(|e| fail(format!("{e:#}")))?;
                    let layers = vec![id];
                    let _ = inner.remember(&key, &layers);
                    layers
                }
            };
            ctx.events.send(Event::Done { vertex, name, seconds: start.elapsed().as_secs_f64() });
            Ok(Arc::new(Computed { key, output: Output::Layers(layers) }))
        }
        Op::Source(SourceOp::Git { remote, .. }) => Err(fail(format!("git sources ({remote}) are not supported yet"))),
        Op::Merge(_) => {
            let mut layers = Vec::new();
            for (i, input) in inputs.iter().enumerate() {
                match &input.output {
                    Output::Layers(l) => layers.extend(l.iter().cloned()),
                    Output::Context(_) => return Err(fail(format!("merge input {i} is a build context"))),
                }
            }
            Ok(Arc::new(Computed { key: vertex, output: Output::Layers(layers) }))
        }
        Op::File(_) | Op::Exec(_) => {
            // Phase 2: content checksums of what the op reads from contexts.
            let checksums = {
                let node = node.clone();
                let inputs = inputs.clone();
                tokio::task::spawn_blocking(move || content_checksums(&node, &inputs))
                    .await
                    .map_err(|e| fail(format!("checksum task: {e}")))?
                    .map_err(|e| fail(format!("{e:#}")))?
            };
            let key = cachekey::content_key(&vertex, &checksums);
            let no_cache = ctx.no_cache || node.meta.ignore_cache;
            let dedup_key = if no_cache { format!("{key}-nocache-{}", kiln_cache::fsutil::unique_name("")) } else { key.clone() };
            let (inner2, ctx2, key2, vertex2) = (inner.clone(), ctx.clone(), key.clone(), vertex.clone());
            let (work, started_here) = dedup(&inner, |i| &i.inflight, &dedup_key, move || {
                compute(inner2, ctx2, node, vertex2, key2, inputs, no_cache).boxed()
            });
            let output = work.await?;
            if !started_here {
                // Another build on this solver computed it: for this build
                // the step is cached, as it is when another process did.
                ctx.events.send(Event::Cached { vertex, name });
            }
            Ok(Arc::new(Computed { key, output }))
        }
    }
}

/// Load from the cache or execute an Exec/File op.
async fn compute(
    inner: Arc<Inner>,
    ctx: Arc<SolveCtx>,
    node: OpNode,
    vertex: String,
    key: String,
    inputs: Vec<Arc<Computed>>,
    no_cache: bool,
) -> Result<Output, SolveError> {
    let name = display_name(&node);
    // Held until the result is recorded, so another kiln process on this
    // store that wants the same key waits and then finds it cached. Taken
    // before a compute slot: waiting for another process while holding a
    // slot could deadlock two processes whose slots all wait on each other.
    let mut _key_lock = None;
    if !no_cache {
        if let Some(layers) = inner.cached(&key) {
            ctx.events.send(Event::Cached { vertex, name });
            return Ok(Output::Layers(layers));
        }
        _key_lock = Some(inner.lock_key(&key).await.map_err(|e| op_error(&node, format!("{e:#}"), vec![]))?);
        if let Some(layers) = inner.cached(&key) {
            ctx.events.send(Event::Cached { vertex, name });
            return Ok(Output::Layers(layers));
        }
        // Still under the key lock: concurrent imports fetch a layer once.
        if let Some(import) = &ctx.cache_import {
            match import.load(&key).await {
                Ok(Some(layers)) => {
                    if let Err(e) = inner.remember(&key, &layers) {
                        tracing::warn!("recording imported cache key {key}: {e:#}");
                    }
                    ctx.events.send(Event::Cached { vertex, name });
                    return Ok(Output::Layers(layers));
                }
                Ok(None) => {}
                // A broken import costs time, not the build: the step runs.
                Err(e) => ctx.events.send(Event::Log {
                    vertex: vertex.clone(),
                    stream: "stderr".into(),
                    line: format!("warning: cannot use the imported cache for this step, running it: {e:#}"),
                }),
            }
        }
    }
    let _permit = inner.limit.clone().acquire_owned().await.expect("semaphore never closed");
    ctx.prepare_ahead.get_or_init(|| inner.store.snapshots.prepare_ahead());
    ctx.events.send(Event::Started { vertex: vertex.clone(), name: name.clone() });
    let start = Instant::now();
    // Snapshot ids follow the key, so a crash-and-retry converges; a
    // no-cache run gets its own id so it never collides with the old one.
    let hex = key.trim_start_matches("sha256:");
    let snapshot_id = if no_cache { format!("{hex}-{}", kiln_cache::fsutil::unique_name("")) } else { hex.to_string() };
    let result = match &node.op {
        Op::Exec(exec) => {
            crate::exec::run(&inner, &ctx.events, &ctx.secrets, &node, exec, &vertex, &inputs, &snapshot_id).await
        }
        Op::File(file) => run_file(&inner, &node, file, &inputs, &snapshot_id).await,
        _ => unreachable!("only exec and file ops are computed"),
    };
    match result {
        Ok(layers) => {
            // The layer's fsyncs and then the record's (five in all) are
            // done while the next step starts: nothing here needs them, the
            // key lock goes with them (so another process on this store
            // waits for the record), and the solve waits for them before it
            // ends.
            let (recorder, key, recorded) = (inner.clone(), key.clone(), layers.clone());
            let key_lock = _key_lock.take();
            let write = tokio::task::spawn_blocking(move || {
                if let Err(e) = recorder.remember(&key, &recorded) {
                    tracing::warn!("recording cache key {key}: {e:#}");
                }
                drop(key_lock);
            });
            ctx.records.lock().unwrap().push(write);
            ctx.events.send(Event::Done { vertex, name, seconds: start.elapsed().as_secs_f64() });
            Ok(Output::Layers(layers))
        }
        Err(err) => {
            ctx.events.send(Event::Error { vertex, name, message: err.message.clone() });
            Err(err)
        }
    }
}

/// Checksums of the context files an op reads (COPY sources, bind mounts).
fn content_checksums(node: &OpNode, inputs: &[Arc<Computed>]) -> anyhow::Result<Vec<String>> {
    let context_of = |i: usize| -> Option<SourceTree> {
        match &inputs.get(i)?.output {
            Output::Context(c) => Some(SourceTree::Context(c.clone())),
            Output::Layers(_) => None,
        }
    };
    let mut sums = Vec::new();
    match &node.op {
        Op::File(file) => {
            for action in &file.actions {
                if let FileAction::Copy(copy) = action
                    && let Some(tree) = context_of(copy.src_input) {
                        sums.push(cachekey::copy_checksum(&tree, copy)?);
                    }
            }
        }
        Op::Exec(exec) => {
            for mount in &exec.mounts {
                if let MountKind::Bind { input, source, .. } = &mount.kind
                    && let Some(tree) = context_of(*input) {
                        sums.push(cachekey::subtree_checksum(&tree, source)?);
                    }
            }
        }
        _ => {}
    }
    Ok(sums)
}

/// The layers of input `i`, or an error naming the op.
pub(crate) fn input_layers(node: &OpNode, inputs: &[Arc<Computed>], i: usize) -> Result<Vec<String>, SolveError> {
    match inputs.get(i).map(|c| &c.output) {
        Some(Output::Layers(l)) => Ok(l.clone()),
        Some(Output::Context(_)) => Err(op_error(node, format!("input {i} is a build context, not a filesystem"), vec![])),
        None => Err(op_error(node, format!("input {i} does not exist"), vec![])),
    }
}

pub(crate) fn tree_of(inner: &Inner, computed: &Computed) -> SourceTree {
    match &computed.output {
        Output::Context(c) => SourceTree::Context(c.clone()),
        Output::Layers(l) => SourceTree::Layers(LayeredView::new(inner.snapshot_paths(l))),
    }
}

pub(crate) fn node_error(node: &OpNode, message: String, log_tail: Vec<String>) -> SolveError {
    op_error(node, message, log_tail)
}

async fn run_file(
    inner: &Arc<Inner>,
    node: &OpNode,
    file: &kiln_frontend::graph::FileOp,
    inputs: &[Arc<Computed>],
    snapshot_id: &str,
) -> Result<Vec<String>, SolveError> {
    let base = match file.base {
        Some(i) => input_layers(node, inputs, i)?,
        None => Vec::new(),
    };
    let lower = inner.snapshot_paths(&base);
    let trees: Vec<SourceTree> = inputs.iter().map(|c| tree_of(inner, c)).collect();
    let active = inner.store.snapshots.prepare().map_err(|e| op_error(node, format!("preparing a layer: {e:#}"), vec![]))?;
    let upper = active.fs();
    let actions = file.actions.clone();
    let applied = tokio::task::spawn_blocking(move || crate::fileop::apply(&lower, &upper, &trees, &actions))
        .await
        .map_err(|e| op_error(node, format!("file op task: {e}"), vec![]))?;
    if let Err(e) = applied {
        inner.store.snapshots.abort(active);
        return Err(op_error(node, format!("{e:#}"), vec![]));
    }
    // Made durable with the step's record (see `compute`).
    inner
        .store
        .snapshots
        .commit_deferred(active, snapshot_id, &SnapshotMeta::default())
        .map_err(|e| op_error(node, format!("committing layer: {e:#}"), vec![]))?;
    let mut layers = base;
    layers.push(snapshot_id.to_string());
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test runs no op: a solver's seams it never calls.
    struct Unused;

    #[async_trait::async_trait]
    impl Executor for Unused {
        async fn exec(&self, _: crate::worker::ExecRequest, _: crate::worker::LogSink) -> anyhow::Result<i32> {
            anyhow::bail!("no process runs in this test")
        }
    }

    #[async_trait::async_trait]
    impl ImageSource for Unused {
        async fn resolve(&self, reference: &str, _: &kiln_frontend::graph::Platform) -> anyhow::Result<ResolvedImage> {
            anyhow::bail!("no image {reference} in this test")
        }
    }

    #[test]
    fn a_record_is_written_only_after_its_snapshots_are_durable() {
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(root.path()).unwrap());
        let solver = Solver::new(store.clone(), Arc::new(Unused), Arc::new(Unused));
        let commit = |id: &str| {
            let active = store.snapshots.prepare().unwrap();
            std::fs::write(active.fs().join("f"), id).unwrap();
            store.snapshots.commit_deferred(active, id, &SnapshotMeta::default()).unwrap();
        };
        let (key_a, key_b) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));

        // A step and the next one, whose record names both layers: the
        // first's sync may still be due when the second's record is made.
        commit("base");
        commit("top");
        let chain = vec!["base".to_string(), "top".to_string()];
        solver.inner.remember(&key_b, &chain).unwrap();
        assert!(store.snapshots.unsynced().is_empty(), "every layer the record names is synced first");
        assert!(store.index.get(&key_b).unwrap().is_some());

        // A snapshot that cannot be synced is never recorded.
        commit("lost");
        std::fs::remove_file(root.path().join("snapshots/lost/meta.json")).unwrap();
        assert!(solver.inner.remember(&key_a, &["lost".to_string()]).is_err());
        assert_eq!(store.index.get(&key_a).unwrap(), None, "no record before its snapshot is durable");
    }
}
