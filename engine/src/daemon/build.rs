//! Builds in the daemon: a context directory laid out by [`super::context`]
//! plus options goes through the same lowering and [`crate::build::build`]
//! facade as `kiln build`, with the solver's progress events streamed to
//! the client. The daemon keeps one [`Solver`] for all builds, so concurrent
//! builds share the cache and identical steps run once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use base64::Engine as _;
use kiln_frontend::Platform;
use kiln_frontend::graph::{NetworkMode, Op};
use kiln_frontend::lower::{LowerOptions, lower, parse_platform};
use kiln_exporter::{OciDest, Output};
use kiln_solver::tree::VerifiedContent;
use kiln_solver::{Event, EventSink, ImageSource, Solver};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::State;
use super::context::ContextEntry;
use crate::build::{BuildRequest, build_before_gc};
use crate::commands::build::{MetaResolver, PullAlways};

/// `POST /v1/build` body: the context's file list plus `kiln build`'s flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildOptions {
    /// The context (files uploaded before through `/v1/build/context/...`).
    pub context: Vec<ContextEntry>,
    /// Instead of `context`: the [`super::context::list_key`] of a list
    /// sent before. The daemon uses the context it laid out for that list,
    /// or answers 412 with no missing contents (send the list itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_key: Option<String>,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name, for error messages (default `Dockerfile`).
    pub dockerfile_name: Option<String>,
    /// The ignore file's text, if any.
    pub dockerignore: Option<String>,
    /// `-t` names.
    pub tags: Vec<String>,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--pull`.
    pub pull: bool,
    /// `--label`s.
    pub labels: BTreeMap<String, String>,
    /// `--network` of RUN steps: default, none or host.
    pub network: Option<String>,
    /// `--platform` (only the daemon's own is supported).
    pub platform: Option<String>,
    /// `--secret` values by id, base64.
    pub secrets: BTreeMap<String, String>,
    /// `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    /// `--cache-to` values (a `type=local` path is on the daemon's host).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache_to: Vec<String>,
    /// `--cache-from` values (a `type=local` path is on the daemon's host).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache_from: Vec<String>,
    /// `-o` as given to `kiln build` (buildx syntax). `type=image` and
    /// `type=registry` act on the daemon; the destinations of `local`,
    /// `tar`, `oci` and `docker` are the client's: the daemon writes them
    /// to a scratch place and streams them back ([`BuildLine::Output`]).
    pub output: Option<String>,
    /// `--keep-storage` (e.g. `10GB`): the cache size to collect down to
    /// after the build; default: the daemon's own setting.
    pub keep_storage: Option<String>,
}

/// One line of the `/v1/build` stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildLine {
    /// A solver progress event, as the embedded renderers get it.
    Event(Event),
    /// The next piece (base64) of a client-side output, sent after the
    /// build and before its result: the file itself for `tar`, `docker`
    /// and `oci` tars, a tar of the directory for `local` and OCI
    /// directories.
    Output(String),
    /// The build succeeded (last line): the image ID, if an image was made.
    Result {
        /// `sha256:` of the image config.
        image_id: Option<String>,
        /// For `type=registry`: what was pushed, one `kiln push` line each.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pushed: Vec<String>,
    },
    /// The build failed (last line).
    Error(String),
}

/// The daemon-wide solver (images from the store, else registries).
pub fn shared_solver(store: Arc<kiln_cache::Store>, registry: Arc<crate::registry::Registry>) -> anyhow::Result<Arc<Solver>> {
    let images: Arc<dyn ImageSource> = Arc::new(crate::image_source::StoreImageSource::new(store.clone(), registry));
    Ok(Arc::new(crate::build::new_solver(store, images)?))
}

/// What a build made.
pub struct BuildDone {
    /// The image ID, if an image was made.
    pub image_id: Option<String>,
    /// A client-side output waiting to be sent back.
    pub artifact: Option<Artifact>,
    /// For `type=registry`: the `kiln push` line of each name pushed.
    pub pushed: Vec<String>,
}

/// A client-side output staged on the daemon (removed on drop): one file
/// to stream back as it is (a directory output is tarred first).
pub struct Artifact {
    _dir: tempfile::TempDir,
    /// The file to send.
    pub file: PathBuf,
}

/// An output whose destination is on the client, redirected into
/// `scratch`; returns the redirected output, where it writes, and whether
/// that is a directory. `None` for outputs that stay on the daemon.
fn stage_output(output: &Output, scratch: &Path) -> Option<(Output, PathBuf, bool)> {
    let file = scratch.join("output");
    let staged = match output.clone() {
        Output::Image { .. } => return None,
        Output::Oci { dest, name, image } => {
            let is_dir = matches!(dest, OciDest::Dir(_));
            let dest = if is_dir { OciDest::Dir(file.clone()) } else { OciDest::Tar(file.clone()) };
            return Some((Output::Oci { dest, name, image }, file, is_dir));
        }
        Output::Docker { name, image, .. } => (Output::Docker { dest: file.clone(), name, image }, false),
        Output::Local { .. } => (Output::Local { dest: file.clone() }, true),
        Output::Tar { .. } => (Output::Tar { dest: file.clone() }, false),
    };
    Some((staged.0, file, staged.1))
}

/// Tar `dir` (symlinks kept as links) into `into`.
pub fn tar_dir(dir: &Path, into: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(into).with_context(|| format!("creating {}", into.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    tar.append_dir_all(".", dir).with_context(|| format!("archiving {}", dir.display()))?;
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Lower and build `opts` on the context at `context_dir` (whose content
/// is `verified`, for a directory the daemon laid out itself), sending
/// events to `events`.
pub async fn run_build(
    state: &State,
    opts: BuildOptions,
    context_dir: PathBuf,
    verified: Option<Arc<VerifiedContent>>,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<BuildDone> {
    let output = opts.output.as_deref().map(Output::parse).transpose()?;
    let scratch = match &output {
        Some(o) if !matches!(o, Output::Image { .. }) => Some(context_dir_in(state.store.root())?),
        _ => None,
    };
    let staged = match (&output, &scratch) {
        (Some(o), Some(dir)) => stage_output(o, dir.path()),
        _ => None,
    };
    let host = Platform::default();
    let platform = match &opts.platform {
        Some(p) if !p.is_empty() => parse_platform(p).map_err(|e| anyhow::anyhow!("platform: {e}"))?,
        _ => host.clone(),
    };
    anyhow::ensure!(platform == host, "platform {platform}: kiln can only build for the host platform ({host})");
    let network = match opts.network.as_deref().unwrap_or("default") {
        "default" | "" => NetworkMode::Default,
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        other => anyhow::bail!("network {other:?}: expected default, none or host"),
    };
    let mut secrets = HashMap::new();
    for (id, b64) in &opts.secrets {
        let value = base64::engine::general_purpose::STANDARD.decode(b64).with_context(|| format!("secret {id}: not base64"))?;
        secrets.insert(id.clone(), value);
    }
    // --pull needs an image source that always asks the registry: a solver of its own.
    let (solver, images): (Arc<Solver>, Arc<dyn ImageSource>) = if opts.pull {
        let images: Arc<dyn ImageSource> = Arc::new(PullAlways { store: state.store.clone(), registry: state.registry.clone() });
        (Arc::new(crate::build::new_solver(state.store.clone(), images.clone())?), images)
    } else {
        let images: Arc<dyn ImageSource> =
            Arc::new(crate::image_source::StoreImageSource::new(state.store.clone(), state.registry.clone()));
        (state.solver.clone(), images)
    };
    let lower_opts = LowerOptions {
        target: opts.target.clone().filter(|t| !t.is_empty()),
        build_args: opts.build_args.clone(),
        target_platform: Some(platform),
        build_platform: host,
        dockerignore: opts.dockerignore.clone(),
        no_cache: opts.no_cache,
        filename: Some(opts.dockerfile_name.clone().unwrap_or_else(|| "Dockerfile".to_string())),
    };
    let resolver = MetaResolver { images, handle: tokio::runtime::Handle::current() };
    let text = opts.dockerfile.clone().into_bytes();
    let mut definition = tokio::task::spawn_blocking(move || lower(&text, &lower_opts, &resolver))
        .await
        .context("lowering task")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if network != NetworkMode::Default {
        for node in &mut definition.ops {
            if let Op::Exec(e) = &mut node.op {
                if e.network == NetworkMode::Default {
                    e.network = network;
                }
            }
        }
    }
    let request = BuildRequest {
        definition,
        locals: HashMap::from([("context".to_string(), context_dir)]),
        verified: verified.into_iter().map(|v| ("context".to_string(), v)).collect(),
        secrets,
        no_cache: opts.no_cache,
        labels: opts.labels.clone(),
        tags: opts.tags.clone(),
        output: staged.as_ref().map(|(o, _, _)| o.clone()).or(output),
        iidfile: None,
        source_date_epoch: opts.source_date_epoch,
        cache: crate::remote_cache::CacheOptions::parse(&opts.cache_to, &opts.cache_from, Some(state.registry.clone()))?,
        keep_storage: opts.keep_storage.as_deref().map(kiln_solver::gc::parse_size).transpose()?,
    };
    let push = request.output.clone();
    let (result, cap) = build_before_gc(&solver, request, EventSink(Some(events))).await?;
    // The store's cap is applied beside the rest (push, output, the
    // answer), not before it: measuring the whole root is the slowest
    // part of a cached rebuild, and the client need not wait for it.
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::build::collect_garbage(&store, cap).await {
            tracing::warn!("after a build: {e:#}");
        }
    });
    let result = result?;
    let pushed = crate::commands::build::push_output(&state.registry, &state.store, push.as_ref(), &opts.tags).await?;
    let artifact = match (staged, scratch) {
        (Some((_, written, is_dir)), Some(dir)) => Some(
            tokio::task::spawn_blocking(move || -> anyhow::Result<Artifact> {
                let file = if is_dir {
                    let tarred = dir.path().join("output.tar");
                    tar_dir(&written, &tarred)?;
                    tarred
                } else {
                    written
                };
                Ok(Artifact { _dir: dir, file })
            })
            .await
            .context("output task")??,
        ),
        _ => None,
    };
    Ok(BuildDone { image_id: result.image_id(), artifact, pushed })
}

/// A fresh directory for one build's context (Docker's tar contexts),
/// removed on drop.
pub fn context_dir(state: &State) -> anyhow::Result<tempfile::TempDir> {
    context_dir_in(state.store.root())
}

/// A fresh scratch directory under the daemon's part of the store root
/// `root` (emptied when the daemon starts), removed on drop.
fn context_dir_in(root: &Path) -> anyhow::Result<tempfile::TempDir> {
    let parent = root.join("daemon").join("tmp");
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    Ok(tempfile::tempdir_in(parent)?)
}

/// Materialized kiln contexts, keyed by the digest of their file list, so
/// an unchanged context is laid out once and reused (creating thousands of
/// files per build would dominate an unchanged rebuild). Builds only read
/// their context, so concurrent builds of one context share it. The least
/// recently used contexts beyond [`ContextCache::KEEP`] are removed when no
/// build uses them.
///
/// Each context's content is handed to the solver as verified
/// ([`VerifiedContent`]: no walk to check files, no hashing, checksums
/// remembered across builds). That is sound because only the daemon
/// writes under this directory, from blobs of its content store (each
/// verified against its digest when uploaded), and builds never write to
/// a context: bind mounts of it are read-only, or overlaid when `rw`.
pub struct ContextCache {
    dir: PathBuf,
    uses: std::sync::Mutex<HashMap<String, ContextUse>>,
}

/// One kept context: builds using it, its last use, and its content.
struct ContextUse {
    builds: usize,
    last: std::time::Instant,
    /// `None` until a lease with the list gives it.
    content: Option<Arc<VerifiedContent>>,
}

/// A context in use by one build; releases it on drop.
pub struct ContextLease {
    cache: Arc<ContextCache>,
    key: String,
    /// The context directory.
    pub path: PathBuf,
    /// What the directory holds (see [`ContextCache`]).
    pub content: Arc<VerifiedContent>,
}

impl Drop for ContextLease {
    fn drop(&mut self) {
        if let Some(u) = self.cache.uses.lock().unwrap().get_mut(&self.key) {
            u.builds = u.builds.saturating_sub(1);
        }
    }
}

impl ContextCache {
    /// How many unused contexts are kept.
    pub const KEEP: usize = 8;

    /// A cache under `dir` (emptied: contexts do not outlive the daemon).
    pub fn new(dir: PathBuf) -> anyhow::Result<Arc<ContextCache>> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Arc::new(ContextCache { dir, uses: Default::default() }))
    }

    /// The directory holding `entries`, laid out from `store` if new
    /// (a 412 listing the contents `store` lacks, if any). Blocking.
    pub fn lease(self: &Arc<Self>, store: &kiln_cache::Store, entries: &[ContextEntry]) -> Result<ContextLease, super::web::ApiError> {
        super::context::validate(entries)?;
        let key = super::context::list_key(entries);
        let path = self.dir.join(&key);
        let content = || {
            let files = entries.iter().filter_map(|e| {
                let sha = e.digest.as_deref()?.strip_prefix("sha256:")?;
                Some((e.path.clone(), sha.to_string()))
            });
            Arc::new(VerifiedContent::new(files))
        };
        let lease = self.take(key, Some(&content)).expect("a content is given");
        let internal = |e: std::io::Error| super::web::ApiError::new(http::StatusCode::INTERNAL_SERVER_ERROR, format!("context: {e}"));
        if !path.is_dir() {
            // A context laid out before had every content; a new one may
            // not: the client uploads what is missing and asks again.
            let digests: Vec<String> = entries.iter().filter_map(|e| e.digest.clone()).collect();
            let missing = super::context::missing(store, &digests)?;
            if !missing.is_empty() {
                return Err(super::web::ApiError::contents_missing(missing));
            }
            let tmp = tempfile::Builder::new().prefix(".new-").tempdir_in(&self.dir).map_err(internal)?;
            super::context::materialize(store, entries, tmp.path())?;
            let tmp = tmp.keep();
            // A concurrent build may have laid out the same context first.
            if std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        self.evict();
        Ok(lease)
    }

    /// The context laid out before for the list whose
    /// [`super::context::list_key`] is `key`, if it is still kept (then
    /// nothing needs checking: the daemon wrote it from verified contents
    /// and builds only read it). Blocking.
    pub fn lease_known(self: &Arc<Self>, key: &str) -> Option<ContextLease> {
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        let lease = self.take(key.to_string(), None)?;
        // Taken first, then checked: eviction skips contexts in use.
        lease.path.is_dir().then_some(lease)
    }

    /// Count one more use of context `key` (released with the lease). Its
    /// content is the one kept, else `content()`; `None` if neither is there.
    fn take(self: &Arc<Self>, key: String, content: Option<&dyn Fn() -> Arc<VerifiedContent>>) -> Option<ContextLease> {
        let content = {
            let mut uses = self.uses.lock().unwrap();
            let now = std::time::Instant::now();
            let kept = uses.get(&key).and_then(|u| u.content.clone());
            let content = kept.or_else(|| content.map(|c| c()))?;
            let u = uses.entry(key.clone()).or_insert(ContextUse { builds: 0, last: now, content: None });
            u.builds += 1;
            u.last = now;
            u.content = Some(content.clone());
            content
        };
        let path = self.dir.join(&key);
        Some(ContextLease { cache: self.clone(), key, path, content })
    }

    fn evict(&self) {
        let doomed: Vec<String> = {
            let mut uses = self.uses.lock().unwrap();
            let mut idle: Vec<(String, std::time::Instant)> =
                uses.iter().filter(|(_, u)| u.builds == 0).map(|(k, u)| (k.clone(), u.last)).collect();
            idle.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            let doomed: Vec<String> = idle.into_iter().skip(Self::KEEP).map(|(k, _)| k).collect();
            for k in &doomed {
                uses.remove(k);
            }
            doomed
        };
        for k in doomed {
            let _ = std::fs::remove_dir_all(self.dir.join(k));
        }
    }
}
