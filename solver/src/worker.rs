//! The host seams: what the solver asks of the engine.
//!
//! A RUN step becomes one [`Executor::exec`] call: the step's parent layers
//! as overlay lowerdirs (bottom first), a fresh `upper` directory that
//! receives every change (it *is* the new layer), plus the process and its
//! mounts. A FROM becomes one [`ImageSource::resolve`] call that returns the
//! image's unpacked layers.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_frontend::Platform;
use kiln_frontend::graph::NetworkMode;

/// Where a step's output goes, line by line or chunk by chunk.
pub type LogSink = Arc<dyn Fn(LogStream, &[u8]) + Send + Sync>;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
}

/// One process to run on an overlay rootfs.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Read-only layer directories, bottom first (overlay format).
    pub lower: Vec<PathBuf>,
    /// Empty directory that receives the changes (becomes the new layer).
    pub upper: PathBuf,
    /// Empty overlayfs work directory on the same filesystem as `upper`.
    pub work: PathBuf,
    /// argv.
    pub args: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    /// Absolute working directory (created if missing).
    pub cwd: String,
    /// `user[:group]` as names or ids, resolved in the rootfs; empty = root.
    pub user: String,
    /// Network namespace choice.
    pub network: NetworkMode,
    /// Extra mounts, in order.
    pub mounts: Vec<HostMount>,
    /// Hostname inside the container.
    pub hostname: String,
}

/// An extra mount for [`ExecRequest`].
#[derive(Debug, Clone)]
pub struct HostMount {
    /// Absolute path inside the container (created if missing, and removed
    /// again afterwards if the runtime created it and it is still empty).
    pub target: String,
    /// What to mount there.
    pub source: HostMountSource,
    /// Mount read-only.
    pub readonly: bool,
}

/// What a [`HostMount`] mounts.
#[derive(Debug, Clone)]
pub enum HostMountSource {
    /// Bind a host directory or file.
    Bind(PathBuf),
    /// An overlay of layer directories (bottom first); writes, if allowed,
    /// go to a throw-away upper dir.
    Layers(Vec<PathBuf>),
    /// A fresh tmpfs of this many bytes (0 = default).
    Tmpfs(u64),
}

/// Runs processes in containers.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// Run `req` to completion, streaming its output to `log`; returns the
    /// exit code. Mounts are always cleaned up, whatever happens.
    async fn exec(&self, req: ExecRequest, log: LogSink) -> anyhow::Result<i32>;
}

/// A base image, pulled and unpacked.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Manifest digest: pins the source in cache keys.
    pub manifest_digest: String,
    /// The raw config blob.
    pub config: Vec<u8>,
    /// Snapshot ids of its layers, bottom first.
    pub layers: Vec<String>,
}

/// Fetches base images.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync {
    /// Pull (or find locally) `reference` for `platform`, unpack its layers
    /// into snapshots, and describe it.
    async fn resolve(&self, reference: &str, platform: &Platform) -> anyhow::Result<ResolvedImage>;
}

/// Results imported from a shared cache (`--cache-from`): consulted on a
/// local cache miss, before a step executes.
#[async_trait::async_trait]
pub trait CacheImport: Send + Sync + std::fmt::Debug {
    /// If the imported cache holds `key`, make its layers local snapshots
    /// (fetching only the blobs the store lacks) and return their ids,
    /// bottom first; `None` when the key is not in the cache.
    async fn load(&self, key: &str) -> anyhow::Result<Option<Vec<String>>>;
}
