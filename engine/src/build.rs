//! The glue of `kiln build`: a [`Solver`] over the engine's container
//! executor and image source, then the exporter.
//!
//! Lowering (Dockerfile → [`Definition`]) happens before this; this module
//! takes the definition, solves it to a chain of snapshots, turns the chain
//! plus the definition's image config into an image (or another output),
//! names it under every `-t`, and writes `--iidfile`. `--cache-from` is
//! read before solving and `--cache-to` written after ([`remote_cache`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use kiln_cache::Store;
use kiln_cache::images::Descriptor;
use kiln_exporter::cache_export::{CacheMode, CacheStep, select_steps};
use kiln_exporter::{BuiltImage, ImageSpec, Output};
use kiln_frontend::Definition;
use kiln_frontend::graph::{NetworkMode, Op};
use kiln_solver::{EventSink, ImageSource, SolveRequest, Solver};

use crate::executor::ContainerExecutor;
use crate::remote_cache::{self, CacheOptions};

/// Apply a build's `--network` to `definition`: every RUN step that sets
/// no network mode of its own (`RUN --network`) gets `network`.
pub fn set_build_network(definition: &mut Definition, network: NetworkMode) {
    if network == NetworkMode::Default {
        return;
    }
    for node in &mut definition.ops {
        if let Op::Exec(exec) = &mut node.op
            && exec.network == NetworkMode::Default
        {
            exec.network = network;
        }
    }
}

/// A solver for `store` that runs RUN steps in real containers (state as
/// [`crate::runtime::Runtime::for_store`] places it) and pulls base images
/// through `images`.
pub fn new_solver(store: Arc<Store>, images: Arc<dyn ImageSource>) -> anyhow::Result<Solver> {
    let runtime = crate::runtime::Runtime::for_store(store.root()).context("starting the container runtime")?;
    // `for_store` has swept the state root already: no second `Runtime::new`.
    let shim = crate::executor::Shim::find(runtime.state_root()).context("starting the container runtime")?;
    let executor = ContainerExecutor::with_shim(shim);
    Ok(Solver::new(store, Arc::new(executor), images))
}

/// One build, after lowering.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// The lowered Dockerfile.
    pub definition: Definition,
    /// Host directories of the local sources (`context` → the build context).
    pub locals: HashMap<String, PathBuf>,
    /// The known content of some of `locals` (see
    /// [`kiln_solver::SolveRequest::verified`]): the daemon's contexts.
    pub verified: HashMap<String, Arc<kiln_solver::tree::VerifiedContent>>,
    /// `--secret` values by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--label`, added to the image config (over the Dockerfile's).
    pub labels: BTreeMap<String, String>,
    /// `-t`: names for the image in the local store.
    pub tags: Vec<String>,
    /// `-o`; `None` = an image in the local store.
    pub output: Option<Output>,
    /// `--iidfile`: where to write the image ID.
    pub iidfile: Option<PathBuf>,
    /// `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    /// `--cache-to` / `--cache-from`.
    pub cache: CacheOptions,
    /// `--keep-storage`: cap on the store root's bytes, applied after the
    /// build (and before it when already over). `None`: the configured
    /// default ([`crate::config::keep_storage_default`]), else [`crate::config::default_cap`] after the build.
    pub keep_storage: Option<u64>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    /// Snapshot ids of the result, base first.
    pub layers: Vec<String>,
    /// The image, for image outputs.
    pub image: Option<BuiltImage>,
}

impl BuildResult {
    /// The image ID (`sha256:` of the config), for image outputs.
    pub fn image_id(&self) -> Option<String> {
        self.image.as_ref().map(|i| i.config.digest().to_string())
    }
}

/// Solve `req.definition` with `solver` and export the result, holding a
/// lease on what it uses; then keep the store under its cap (see
/// [`BuildRequest::keep_storage`]), whether the build succeeded or not.
pub async fn build(solver: &Solver, req: BuildRequest, events: EventSink) -> anyhow::Result<BuildResult> {
    let (result, cap) = build_before_gc(solver, req, events).await?;
    collect_garbage(solver.store(), cap).await?;
    result
}

/// [`build`] up to its final collection: the build's outcome and the cap
/// still to apply with [`collect_garbage`] (the daemon answers its client
/// first and collects after; a `kiln build` process must wait).
pub async fn build_before_gc(solver: &Solver, req: BuildRequest, events: EventSink) -> anyhow::Result<(anyhow::Result<BuildResult>, u64)> {
    let store = solver.store().clone();
    let configured = match req.keep_storage {
        Some(cap) => Some(cap),
        None => crate::config::keep_storage_default(store.root())?,
    };
    if let Some(cap) = configured {
        collect_garbage(&store, cap).await?;
    }
    let lease_store = store.clone();
    let lease = tokio::task::spawn_blocking(move || kiln_cache::lease::Lease::new(&lease_store, "build"))
        .await
        .context("lease task panicked")?
        .context("taking a build lease")?;
    let result = build_leased(solver, req, events).await;
    drop(lease);
    // Without a configured cap the default one still applies, as in BuildKit.
    let cap = configured.unwrap_or_else(|| crate::config::default_cap(store.root()));
    Ok((result, cap))
}

/// Apply the cap `cap` to `store` (see [`kiln_solver::gc::enforce_cap`]).
pub async fn collect_garbage(store: &Arc<Store>, cap: u64) -> anyhow::Result<()> {
    let store = store.clone();
    let report = tokio::task::spawn_blocking(move || kiln_solver::gc::enforce_cap(&store, cap))
        .await
        .context("GC task panicked")?
        .context("collecting garbage")?;
    if report.before > cap {
        tracing::info!(
            "gc: store root {} bytes > cap {cap}: removed {} snapshots, {} records, {} blobs, {} cache mounts; now {} bytes",
            report.before,
            report.removed.snapshots,
            report.removed.records,
            report.blobs,
            report.cache_mounts,
            report.after
        );
    }
    if report.still_over {
        tracing::warn!("gc: the store root stays over its cap ({} > {cap} bytes): the rest is images or in use", report.after);
    }
    Ok(())
}

async fn build_leased(solver: &Solver, mut req: BuildRequest, events: EventSink) -> anyhow::Result<BuildResult> {
    req.definition.image.config.labels.extend(req.labels.clone());
    if req.cache.inline() && !matches!(req.output, None | Some(Output::Image { .. })) {
        anyhow::bail!("--cache-to type=inline needs an image output (type=image or type=registry)");
    }
    let imported = remote_cache::import(solver.store(), &req.cache, &req.definition.image.platform, &events).await?;
    let solved = solver
        .solve(SolveRequest {
            definition: req.definition.clone(),
            locals: req.locals.clone(),
            verified: req.verified.clone(),
            secrets: std::mem::take(&mut req.secrets),
            no_cache: req.no_cache,
            events: events.clone(),
            cache_import: imported.clone().map(|i| i as Arc<dyn kiln_solver::CacheImport>),
        })
        .await?;
    if let Some(imported) = &imported {
        remote_cache::report_import(imported, &events);
    }
    let steps: Vec<CacheStep> =
        solved.steps.iter().map(|s| CacheStep { key: s.key.clone(), layers: s.layers.clone() }).collect();
    let image = &req.definition.image;
    let spec = ImageSpec {
        layers: solved.layers.clone(),
        config: serde_json::to_value(&image.config)?,
        // Same JSON fields (`created_by`, `empty_layer`, ...) on both sides.
        history: serde_json::from_value(serde_json::to_value(&image.history)?).context("image history")?,
        os: image.platform.os.clone(),
        architecture: image.platform.architecture.clone(),
        variant: (!image.platform.variant.is_empty()).then(|| image.platform.variant.clone()),
        created: newest_layer_time(solver.store(), &solved.layers),
    };
    let output = match req.output.clone() {
        Some(o) => o,
        None => Output::parse("type=image")?,
    };
    let store = solver.store().clone();
    let epoch = req.source_date_epoch;
    // No collection between writing blobs and naming the image (which
    // pins them): the GC lock is held shared until the names are written.
    let (built, _gc) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let guard = kiln_cache::lease::gc_guard(&store)?;
        Ok((kiln_exporter::export(&store, &spec, &output, epoch)?, guard))
    })
    .await
    .context("export task panicked")?
    .context("exporting the image")?;
    let built = match built {
        Some(image) if req.cache.inline() => {
            let (store, steps, layers) = (solver.store().clone(), steps.clone(), solved.layers.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    let within = select_steps(&steps, &layers, CacheMode::Min);
                    kiln_exporter::cache_export::embed_inline(&store, &image, &within)
                })
                .await
                .context("inline cache task panicked")?
                .context("--cache-to type=inline")?,
            )
        }
        other => other,
    };
    if let Some(image) = &built {
        let mut names = req.tags.clone();
        if let Some(Output::Image { names: more, .. }) = &req.output {
            names.extend(more.iter().cloned());
        }
        let manifest = Descriptor {
            media_type: image.manifest.media_type().to_string(),
            digest: image.manifest.digest().to_string(),
            size: image.manifest.size(),
        };
        for name in names {
            solver.store().images.put(&name, &manifest).with_context(|| format!("naming the image {name}"))?;
        }
        if let Some(path) = &req.iidfile {
            std::fs::write(path, image.config.digest().to_string()).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    // Still under the GC guard taken for the image export: the cache's
    // config, index and any new layer blobs are not pinned by a name.
    for to in &req.cache.to {
        remote_cache::export(solver.store(), &req.cache, to, &steps, &solved.layers, &events).await?;
    }
    Ok(BuildResult { layers: solved.layers, image: built })
}

/// The newest commit time among `layers`: the image's creation time, so
/// that an unchanged rebuild reproduces the image ID as BuildKit does.
fn newest_layer_time(store: &Store, layers: &[String]) -> Option<i64> {
    layers.iter().filter_map(|id| store.snapshots.meta(id).ok()?.created).max()
}

#[cfg(test)]
mod tests {
    use kiln_frontend::graph::{ExecOp, OpMeta, OpNode};

    use super::*;

    /// A RUN step with its own network mode `network`.
    fn run(network: NetworkMode) -> OpNode {
        let exec = ExecOp {
            args: vec!["true".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            network,
            insecure: false,
            mounts: vec![],
        };
        OpNode { op: Op::Exec(exec), inputs: vec![], meta: OpMeta::default() }
    }

    fn networks(definition: &Definition) -> Vec<NetworkMode> {
        definition
            .ops
            .iter()
            .filter_map(|n| match &n.op {
                Op::Exec(e) => Some(e.network),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn build_network_fills_only_steps_without_their_own() {
        let mut definition = Definition { ops: vec![run(NetworkMode::Default), run(NetworkMode::Host)], ..Default::default() };
        set_build_network(&mut definition, NetworkMode::Default);
        assert_eq!(networks(&definition), [NetworkMode::Default, NetworkMode::Host]);
        set_build_network(&mut definition, NetworkMode::None);
        assert_eq!(networks(&definition), [NetworkMode::None, NetworkMode::Host]);
    }
}
