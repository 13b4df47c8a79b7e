//! Exec ops: turn a RUN into one [`ExecRequest`] and commit its upper dir.
//!
//! The rootfs chain becomes the overlay lowerdirs and a freshly prepared
//! snapshot the upperdir. Extra mounts are prepared here: binds from the
//! context or another op's layers (read-only unless `rw`, whose writes go
//! to a throw-away upper), persistent cache directories under
//! `<store>/cache-mounts/` (`sharing=locked`: one user at a time, across
//! kiln processes too, through a `flock` per id; `private`: the persistent
//! dir when it is free, else a throw-away one), tmpfs, and secrets — written to a private 0600
//! file outside the store and bind-mounted read-only, or put into the
//! environment of that one process only. Whatever is prepared is removed
//! again when the op ends, whichever way it ends.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_cache::snapshots::SnapshotMeta;
use kiln_frontend::graph::{CacheSharing, CopyAction, ExecOp, FileAction, MountKind, OpNode};

use crate::error::SolveError;
use crate::events::{Event, EventSink};
use crate::solver::{Computed, Inner, Output, input_layers, node_error, tree_of};
use crate::tree::SourceTree;
use crate::worker::{ExecRequest, HostMount, HostMountSource, LogSink, LogStream};

/// How many output lines an error carries.
const LOG_TAIL_LINES: usize = 20;

/// Temporary host directories removed when the op ends (also on cancel):
/// store scratch dirs and secret dirs, which the next store open also
/// removes if the process dies (see `kiln_cache::check`).
#[derive(Default)]
struct Scratch(Vec<kiln_cache::check::ScratchDir>);

/// Collects output: forwards each line as an event and keeps the last few.
struct LogCollector {
    vertex: String,
    events: EventSink,
    partial: Mutex<[Vec<u8>; 2]>,
    tail: Mutex<VecDeque<String>>,
}

impl LogCollector {
    fn push(&self, stream: LogStream, chunk: &[u8]) {
        let idx = matches!(stream, LogStream::Stderr) as usize;
        let mut partial = self.partial.lock().unwrap();
        partial[idx].extend_from_slice(chunk);
        while let Some(pos) = partial[idx].iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial[idx].drain(..=pos).collect();
            self.line(stream, &line[..line.len() - 1]);
        }
    }

    fn line(&self, stream: LogStream, bytes: &[u8]) {
        let line = String::from_utf8_lossy(bytes).trim_end_matches('\r').to_string();
        {
            let mut tail = self.tail.lock().unwrap();
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        let stream = match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        };
        self.events.send(Event::Log { vertex: self.vertex.clone(), stream: stream.into(), line });
    }

    fn finish(&self) -> Vec<String> {
        let rest = std::mem::take(&mut *self.partial.lock().unwrap());
        for (i, bytes) in rest.iter().enumerate() {
            if !bytes.is_empty() {
                self.line(if i == 0 { LogStream::Stdout } else { LogStream::Stderr }, bytes);
            }
        }
        self.tail.lock().unwrap().iter().cloned().collect()
    }
}

/// Run one exec op; returns the rootfs chain plus the committed upper.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    inner: &Arc<Inner>,
    events: &EventSink,
    secrets: &HashMap<String, Vec<u8>>,
    node: &OpNode,
    exec: &ExecOp,
    vertex: &str,
    inputs: &[Arc<Computed>],
    snapshot_id: &str,
) -> Result<Vec<String>, SolveError> {
    let fail = |m: String| node_error(node, m, vec![]);
    let rootfs = input_layers(node, inputs, 0)?;
    let mut scratch = Scratch::default();
    let mut env = exec.env.clone();
    let mut mounts = Vec::new();
    // Held until the process exits. `sharing=locked` ids are taken first,
    // in sorted order, so two ops (or processes) that lock the same ids
    // cannot each hold one and wait for the other.
    let mut held_locks = Vec::new();
    let mut locked_ids: Vec<String> = exec
        .mounts
        .iter()
        .filter_map(|m| match &m.kind {
            MountKind::Cache { id, sharing: CacheSharing::Locked, .. } => Some(cache_mount_id(id, &m.target).to_string()),
            _ => None,
        })
        .collect();
    locked_ids.sort();
    locked_ids.dedup();
    for id in &locked_ids {
        held_locks.push(CacheMountLock::acquire(inner, id).await.map_err(|e| fail(format!("cache mount {id:?}: {e:#}")))?);
    }
    for mount in &exec.mounts {
        let target = mount.target.clone();
        match &mount.kind {
            MountKind::Bind { input, source, readwrite } => {
                let computed = inputs.get(*input).ok_or_else(|| fail(format!("bind mount reads missing input {input}")))?;
                let source = bind_source(inner, computed, source, &mut scratch).map_err(|e| fail(format!("bind mount at {target}: {e:#}")))?;
                let source = match (source, *readwrite) {
                    // A rw bind must not write through to the store or the
                    // context: writes go to a throw-away upper.
                    (HostMountSource::Bind(p), true) if p.is_dir() => HostMountSource::Layers(vec![p]),
                    // A single file cannot be an overlay: bind a private copy.
                    (HostMountSource::Bind(p), true) => {
                        let copy = private_copy(inner, &p, &mut scratch)
                            .map_err(|e| fail(format!("bind mount at {target}: {e:#}")))?;
                        HostMountSource::Bind(copy)
                    }
                    (s, _) => s,
                };
                mounts.push(HostMount { target, source, readonly: !readwrite });
            }
            MountKind::Cache { id, sharing, from, uid, gid, mode, readonly } => {
                if from.is_some() {
                    return Err(fail(format!("cache mount {id:?}: from= is not supported yet")));
                }
                let id = cache_mount_id(id, &target);
                let dir = cache_mount_dir(inner, id, *uid, *gid, *mode).map_err(|e| fail(format!("cache mount {id:?}: {e:#}")))?;
                let source = match sharing {
                    // Locked ids are held already (above).
                    CacheSharing::Shared | CacheSharing::Locked => dir,
                    // Private, as BuildKit: the shared dir when nobody else
                    // (in any process) uses it privately or locked, else a
                    // fresh empty one that is thrown away.
                    CacheSharing::Private => {
                        let free = if locked_ids.iter().any(|l| l == id) {
                            None
                        } else {
                            CacheMountLock::try_acquire(inner, id).map_err(|e| fail(format!("cache mount {id:?}: {e:#}")))?
                        };
                        match free {
                            Some(lock) => {
                                held_locks.push(lock);
                                dir
                            }
                            None => temp_dir(inner, &mut scratch).map_err(|e| fail(format!("{e:#}")))?,
                        }
                    }
                };
                mounts.push(HostMount { target, source: HostMountSource::Bind(source), readonly: *readonly });
            }
            MountKind::Tmpfs { size } => {
                mounts.push(HostMount { target, source: HostMountSource::Tmpfs(*size), readonly: false });
            }
            MountKind::Secret { id, env: env_name, required, uid, gid, mode } => {
                let Some(value) = secrets.get(id) else {
                    if *required {
                        return Err(fail(format!("secret {id:?} is required but was not provided")));
                    }
                    continue;
                };
                if let Some(name) = env_name {
                    env.push(format!("{name}={}", String::from_utf8_lossy(value)));
                    continue;
                }
                let file = write_secret(value, *uid, *gid, *mode, &mut scratch).map_err(|e| fail(format!("secret {id:?}: {e:#}")))?;
                mounts.push(HostMount { target, source: HostMountSource::Bind(file), readonly: true });
            }
            MountKind::Ssh { id, required } => {
                if *required {
                    return Err(fail(format!("ssh mount {id:?}: ssh forwarding is not supported")));
                }
            }
        }
    }

    let active = inner.store.snapshots.prepare().map_err(|e| fail(format!("preparing a layer: {e:#}")))?;
    let work = match active.make_work_dir() {
        Ok(work) => work,
        Err(e) => {
            inner.store.snapshots.abort(active);
            return Err(fail(format!("preparing a layer: {e}")));
        }
    };
    let req = ExecRequest {
        lower: rootfs.iter().map(|id| inner.store.snapshots.path(id)).collect(),
        upper: active.fs(),
        work,
        args: exec.args.clone(),
        env,
        cwd: if exec.cwd.is_empty() { "/".into() } else { exec.cwd.clone() },
        user: exec.user.clone(),
        network: exec.network,
        mounts,
        hostname: "kiln".into(),
    };
    let collector = Arc::new(LogCollector {
        vertex: vertex.to_string(),
        events: events.clone(),
        partial: Mutex::new([Vec::new(), Vec::new()]),
        tail: Mutex::new(VecDeque::new()),
    });
    let sink: LogSink = {
        let c = collector.clone();
        Arc::new(move |stream, chunk| c.push(stream, chunk))
    };
    let outcome = inner.executor.exec(req, sink).await;
    drop(held_locks);
    drop(scratch);
    let tail = collector.finish();
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            inner.store.snapshots.abort(active);
            return Err(node_error(node, format!("running the process: {e:#}"), tail));
        }
    };
    if code != 0 {
        inner.store.snapshots.abort(active);
        let cmd = exec.args.join(" ");
        return Err(node_error(node, format!("process \"{cmd}\" did not complete successfully: exit code: {code}"), tail));
    }
    // Made durable with the step's record, off this step's critical path
    // (see the solver's `compute`).
    inner
        .store
        .snapshots
        .commit_deferred(active, snapshot_id, &SnapshotMeta::default())
        .map_err(|e| fail(format!("committing layer: {e:#}")))?;
    let mut layers = rootfs;
    layers.push(snapshot_id.to_string());
    Ok(layers)
}

/// What a bind mount of `source` inside `computed` mounts.
/// A throw-away copy of the file `path` (removed with `scratch`), for a
/// read-write bind that must not write through to the context or store.
fn private_copy(inner: &Inner, path: &Path, scratch: &mut Scratch) -> anyhow::Result<PathBuf> {
    let dir = temp_dir(inner, scratch)?;
    let copy = dir.join("file");
    std::fs::copy(path, &copy)?;
    Ok(copy)
}

fn bind_source(inner: &Inner, computed: &Computed, source: &str, scratch: &mut Scratch) -> anyhow::Result<HostMountSource> {
    let tree = tree_of(inner, computed);
    let rel = tree.resolve(Path::new(source), true)?;
    match (&computed.output, &tree) {
        (Output::Context(ctx), _) => {
            if ctx.matcher.is_empty() {
                let path = ctx.dir.join(&rel);
                anyhow::ensure!(path.exists(), "{source} not found in the build context");
                return Ok(HostMountSource::Bind(path));
            }
            // Ignored files must stay invisible: mount a filtered copy.
            let copy_root = temp_dir(inner, scratch)?;
            let upper = copy_root.join("fs");
            std::fs::create_dir(&upper)?;
            let copy = CopyAction::new(0, vec![source.to_string()], "/");
            crate::fileop::apply(&[], &upper, std::slice::from_ref(&tree), &[FileAction::Copy(copy)])?;
            Ok(HostMountSource::Bind(upper))
        }
        (Output::Layers(_), SourceTree::Layers(view)) => {
            let entry = view.lookup(&rel)?.ok_or_else(|| anyhow::anyhow!("{source} not found"))?;
            if !entry.metadata.is_dir() {
                return Ok(HostMountSource::Bind(entry.host_path));
            }
            // The directory as each layer has it, bottom first.
            let dirs: Vec<PathBuf> = view.layers().iter().map(|l| l.join(&rel)).filter(|p| p.is_dir()).collect();
            Ok(HostMountSource::Layers(dirs))
        }
        _ => unreachable!("tree_of matches the output kind"),
    }
}

/// A cache mount's id: its `id=`, else its target.
fn cache_mount_id<'a>(id: &'a str, target: &'a str) -> &'a str {
    if id.is_empty() { target } else { id }
}

/// The file-system-safe name of cache mount `id` (its directory under
/// `<store>/cache-mounts/` and its lock under `<store>/locks/cache-mounts/`).
fn cache_mount_name(id: &str) -> String {
    use sha2::Digest;
    let safe: String = id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let short = hex::encode(&sha2::Sha256::digest(id.as_bytes())[..6]);
    format!("{}-{short}", safe.trim_start_matches('.'))
}

/// Exclusive use of one cache mount id, in this process (an async mutex,
/// so waiting ops hold no thread) and across processes on the store (a
/// `flock`, released if the process dies). Released on drop.
struct CacheMountLock {
    _flock: kiln_cache::lock::FileLock,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

impl CacheMountLock {
    fn lock_path(inner: &Inner, id: &str) -> PathBuf {
        inner.store.root().join("locks").join("cache-mounts").join(format!("{}.lock", cache_mount_name(id)))
    }

    /// Wait until nobody else holds `id`.
    async fn acquire(inner: &Inner, id: &str) -> anyhow::Result<CacheMountLock> {
        let local = inner.cache_mount_locks.entry(id.to_string()).or_default().clone().lock_owned().await;
        let path = Self::lock_path(inner, id);
        let flock = tokio::task::spawn_blocking(move || kiln_cache::lock::FileLock::exclusive(&path))
            .await
            .map_err(|e| anyhow::anyhow!("cache mount lock task: {e}"))??;
        Ok(CacheMountLock { _flock: flock, _local: local })
    }

    /// `id` if nobody else holds it, else `None`.
    fn try_acquire(inner: &Inner, id: &str) -> anyhow::Result<Option<CacheMountLock>> {
        let Ok(local) = inner.cache_mount_locks.entry(id.to_string()).or_default().clone().try_lock_owned() else {
            return Ok(None);
        };
        Ok(kiln_cache::lock::FileLock::try_exclusive(&Self::lock_path(inner, id))?
            .map(|flock| CacheMountLock { _flock: flock, _local: local }))
    }
}

/// `<store>/cache-mounts/<sanitized id>`, created with uid/gid/mode and
/// marked used (under the GC lock, so a collection cannot remove it in
/// between; the solve's lease then keeps it).
fn cache_mount_dir(inner: &Inner, id: &str, uid: u32, gid: u32, mode: u32) -> anyhow::Result<PathBuf> {
    let _gc = kiln_cache::lease::gc_guard(&inner.store)?;
    let dir = inner.store.root().join("cache-mounts").join(cache_mount_name(id));
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(if mode == 0 { 0o755 } else { mode }))?;
    }
    kiln_cache::lease::mark_used(&dir)?;
    Ok(dir)
}

/// A store scratch dir kept until `scratch` drops.
fn temp_dir(inner: &Inner, scratch: &mut Scratch) -> anyhow::Result<PathBuf> {
    let dir = inner.store.scratch_dir()?;
    let path = dir.path().to_path_buf();
    scratch.0.push(dir);
    Ok(path)
}

/// Write a secret into a private directory outside the store (on tmpfs
/// when `/dev/shm` is there), readable only as `mode` by `uid:gid`. The
/// directory is named after this process and locked, so if kiln is killed
/// the next kiln start removes it.
fn write_secret(value: &[u8], uid: u32, gid: u32, mode: u32, scratch: &mut Scratch) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let dir = kiln_cache::check::ScratchDir::for_secret()?;
    let file = dir.path().join("secret");
    scratch.0.push(dir);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file)?;
    f.write_all(value)?;
    drop(f);
    std::os::unix::fs::chown(&file, Some(uid), Some(gid))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(if mode == 0 { 0o400 } else { mode }))?;
    Ok(file)
}
