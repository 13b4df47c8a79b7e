//! Containers the daemon runs: one request type for both APIs, the code
//! that resolves an image and runs it with its output streamed, and the
//! table of created containers the Docker API's create/attach/start/wait/
//! delete calls work on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use kiln_cache::Store;
use kiln_frontend::image::ImageConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use std::os::fd::AsFd;

use crate::executor::{Shim, ShimOptions, ShimStopper};
use crate::runtime::tty::WindowSize;
use crate::runtime::{ContainerSpec, Limits, LogStream, NetworkMode, Rootfs};

/// What to run: the fields `kiln run` and `docker run` share.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunRequest {
    /// Image name, ID or digest (must be in the daemon's store).
    pub image: String,
    /// Arguments after the image (replace the image's CMD when not empty).
    pub cmd: Vec<String>,
    /// Replaces the image's entrypoint (an empty list clears it).
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` added to (and overriding) the image's environment.
    pub env: Vec<String>,
    /// Working directory (default: the image's).
    pub workdir: Option<String>,
    /// User (default: the image's).
    pub user: Option<String>,
    /// `none`, `host` or `default`.
    pub network: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit.
    pub cpus: Option<f64>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Container name.
    pub name: Option<String>,
    /// Bind mounts `HOST:CONTAINER[:ro|rw]`; host paths are the daemon
    /// machine's (as with docker) and must be absolute.
    pub volumes: Vec<String>,
    /// Stream the client's stdin to the container (`-i`; needs an
    /// upgraded connection, see `docs/API.md`).
    pub interactive: bool,
    /// Run on a pseudo-terminal (`-t`; needs an upgraded connection).
    pub tty: bool,
    /// The terminal's initial size, `[rows, cols]`.
    pub console_size: Option<[u16; 2]>,
}

/// A chunk of container output.
pub type OutputChunk = (LogStream, Bytes);

/// The image's layer directories and config, unpacking layers if needed.
/// Blocking. A missing image is an [`kiln_cache::images::ImageError::NotFound`].
pub fn image_rootfs(store: &Store, image: &str) -> anyhow::Result<(Vec<std::path::PathBuf>, ImageConfig)> {
    let record = store.images.resolve(image)?;
    let local = crate::image_source::open_image(store, &record)?;
    // Marked used, so a caller's lease keeps them from garbage collection;
    // unpacked again if a collection took one in between.
    let mut ids = local.unpack_layers(store)?;
    if !kiln_cache::lease::use_snapshots(store, &ids)? {
        ids = local.unpack_layers(store)?;
        anyhow::ensure!(kiln_cache::lease::use_snapshots(store, &ids)?, "image {image}: layers removed while starting");
    }
    let layers = ids.iter().map(|id| store.snapshots.path(id)).collect();
    let config: ImageConfig = match local.config_json.get("config") {
        Some(c) if !c.is_null() => serde_json::from_value(c.clone()).context("image config")?,
        _ => ImageConfig::default(),
    };
    Ok((layers, config))
}

/// [`container_spec`] under a new lease of `store`, to hold until the
/// container exits: garbage collection then keeps its layers (blocking).
pub fn leased_spec(store: &Store, req: &RunRequest) -> anyhow::Result<(ContainerSpec, kiln_cache::lease::Lease)> {
    let lease = kiln_cache::lease::Lease::new(store, "run")?;
    Ok((container_spec(store, req)?, lease))
}

/// Build the container spec for `req` (blocking: may unpack layers).
pub fn container_spec(store: &Store, req: &RunRequest) -> anyhow::Result<ContainerSpec> {
    let (layers, config) = image_rootfs(store, &req.image)?;
    let mut args = match &req.entrypoint {
        Some(e) => e.clone(),
        None => config.entrypoint.clone().unwrap_or_default(),
    };
    if !req.cmd.is_empty() {
        args.extend(req.cmd.iter().cloned());
    } else if req.entrypoint.is_none() {
        args.extend(config.cmd.clone().unwrap_or_default());
    }
    anyhow::ensure!(!args.is_empty(), "run {}: no command given and the image has none", req.image);
    let mut env = config.env.clone();
    for kv in &req.env {
        let key = kv.split('=').next().unwrap_or_default();
        env.retain(|old| old.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    let network = match req.network.as_deref().unwrap_or("default") {
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        "default" | "bridge" => NetworkMode::Default,
        other => anyhow::bail!("network {other:?}: expected none, host or default"),
    };
    if let Some(c) = req.cpus.filter(|c| !(*c > 0.0)) {
        anyhow::bail!("cpus {c}: must be greater than 0");
    }
    let mounts = req
        .volumes
        .iter()
        .map(|v| {
            anyhow::ensure!(v.starts_with('/'), "-v {v:?}: the host path must be absolute (it is a path on the daemon's machine)");
            crate::commands::run::parse_volume(v)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ContainerSpec {
        name: req.name.clone(),
        rootfs: Rootfs::throwaway(layers),
        args,
        env,
        cwd: req.workdir.clone().unwrap_or_else(|| config.working_dir.clone()),
        user: req.user.clone().unwrap_or_else(|| config.user.clone()),
        mounts,
        network,
        hostname: req.hostname.clone().unwrap_or_default(),
        limits: Limits { memory_bytes: req.memory_bytes, cpus: req.cpus },
    })
}

/// How a container's standard streams are attached beyond its output.
#[derive(Default)]
pub struct ContainerIo {
    /// Bytes for the container's stdin; when the sender goes, stdin is
    /// closed. `None`: stdin is `/dev/null`.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Run on a pseudo-terminal of this size; all output then arrives as
    /// stdout.
    pub tty: Option<WindowSize>,
    /// New sizes for the terminal.
    pub resize: Option<mpsc::UnboundedReceiver<WindowSize>>,
}

/// Run `spec` to the end in a container shim (`kiln __container-shim`, a
/// single-threaded process: see [`crate::executor`]), sending its output to
/// `output`; returns the exit code. When `cancel` resolves first (the
/// client went away, the daemon is shutting down) the container is stopped
/// (SIGTERM, SIGKILL after a grace period) and this returns an error.
pub async fn run_streamed(
    shim: Shim,
    spec: ContainerSpec,
    io: ContainerIo,
    output: mpsc::UnboundedSender<OutputChunk>,
    cancel: impl std::future::Future<Output = ()>,
) -> anyhow::Result<i32> {
    let stopper = ShimStopper::default();
    let opts = ShimOptions { stdin: io.stdin.is_some(), tty: io.tty, stopper: stopper.clone(), ..Default::default() };
    let sink: crate::runtime::LogSink = Arc::new(move |stream, bytes: &[u8]| {
        let _ = output.send((stream, Bytes::copy_from_slice(bytes)));
    });
    let task = tokio::task::spawn_blocking(move || -> anyhow::Result<i32> {
        let mut process = shim.start(&spec, opts, sink.clone())?;
        let mut terminal_reader = None;
        if let Some(terminal) = process.take_terminal() {
            if let Some(input) = io.stdin {
                spawn_input(input, std::fs::File::from(terminal.try_clone()?));
            }
            if let Some(mut sizes) = io.resize {
                let terminal = terminal.try_clone()?;
                std::thread::spawn(move || {
                    while let Some(size) = sizes.blocking_recv() {
                        let _ = size.apply(terminal.as_fd());
                    }
                });
            }
            // All of a terminal's output is stdout; it ends with EIO once the container is gone.
            terminal_reader = Some(crate::runtime::spawn_reader(terminal, LogStream::Stdout, sink));
        } else if let (Some(stdin), Some(input)) = (process.take_stdin(), io.stdin) {
            spawn_input(input, stdin);
        }
        let code = process.wait();
        if let Some(reader) = terminal_reader {
            let _ = reader.join();
        }
        code
    });
    tokio::pin!(task);
    tokio::select! {
        done = &mut task => done.context("container task")?,
        _ = cancel => {
            tracing::info!("cancelled: stopping the container");
            stopper.stop();
            let _ = task.await;
            anyhow::bail!("cancelled")
        }
    }
}

/// Copy what arrives on `input` into `to` until the sender goes (then
/// `to` is closed: the container sees the end of its stdin).
fn spawn_input(mut input: mpsc::Receiver<Bytes>, mut to: impl std::io::Write + Send + 'static) {
    std::thread::spawn(move || {
        while let Some(bytes) = input.blocking_recv() {
            if to.write_all(&bytes).and_then(|()| to.flush()).is_err() {
                break;
            }
        }
    });
}

/// One container created through the Docker API.
pub struct Container {
    /// 64 hex digits.
    pub id: String,
    /// `/name`.
    pub name: String,
    /// What to run.
    pub request: RunRequest,
    /// Remove when it exits (`docker run --rm`).
    pub auto_remove: bool,
    /// When it was created (Unix seconds).
    pub created: i64,
    /// Where `attach` wants the output, until `start` takes it.
    pub attach: Mutex<Option<mpsc::UnboundedSender<OutputChunk>>>,
    /// `None` until it exits, then its exit code.
    pub exit: watch::Sender<Option<i32>>,
    /// Set once started.
    pub started: Mutex<bool>,
    /// Becomes true once removed.
    pub removed: watch::Sender<bool>,
    /// Kills the running container (set by start).
    pub kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Its output so far (`docker logs`).
    pub log: ContainerLog,
    /// Its stdin (`docker run -i`): the sending end, taken by an attach
    /// with `stdin=1`, and the receiving end, taken by start.
    pub stdin: Mutex<(Option<mpsc::Sender<Bytes>>, Option<mpsc::Receiver<Bytes>>)>,
    /// Terminal sizes (`POST /containers/{id}/resize`); start takes the receiver.
    pub resize: Mutex<(mpsc::UnboundedSender<WindowSize>, Option<mpsc::UnboundedReceiver<WindowSize>>)>,
}

impl Container {
    /// A container not started yet.
    fn new(id: String, name: String, request: RunRequest, auto_remove: bool, created: i64) -> Container {
        let (stdin, resize) = Self::streams(&request);
        Container {
            id,
            name,
            request,
            auto_remove,
            created,
            attach: Mutex::new(None),
            exit: watch::channel(None).0,
            started: Mutex::new(false),
            removed: watch::channel(false).0,
            kill: Mutex::new(None),
            log: ContainerLog::default(),
            stdin: Mutex::new(stdin),
            resize: Mutex::new(resize),
        }
    }

    /// Fresh stdin (if interactive) and resize channels for one run.
    #[allow(clippy::type_complexity)]
    fn streams(
        request: &RunRequest,
    ) -> (
        (Option<mpsc::Sender<Bytes>>, Option<mpsc::Receiver<Bytes>>),
        (mpsc::UnboundedSender<WindowSize>, Option<mpsc::UnboundedReceiver<WindowSize>>),
    ) {
        let stdin = match request.interactive {
            true => {
                let (tx, rx) = mpsc::channel(16);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let (resize_tx, resize_rx) = mpsc::unbounded_channel();
        (stdin, (resize_tx, Some(resize_rx)))
    }

    /// After an exit: new stdin and resize channels, so that the container
    /// can be attached to and started again (`docker start` of an exited
    /// container runs it anew, on the filesystem it left).
    pub fn rearm(&self) {
        let (stdin, resize) = Self::streams(&self.request);
        *self.stdin.lock().unwrap() = stdin;
        *self.resize.lock().unwrap() = resize;
    }
}

/// What a container wrote, in order, for `docker logs`; beyond
/// [`ContainerLog::LIMIT`] bytes the oldest output is dropped.
#[derive(Default)]
pub struct ContainerLog {
    chunks: Mutex<LogChunks>,
    /// The sequence number the next chunk gets (followers wait on it).
    next: watch::Sender<u64>,
}

#[derive(Default)]
struct LogChunks {
    /// Sequence number of the first chunk kept.
    first: u64,
    chunks: std::collections::VecDeque<OutputChunk>,
    bytes: usize,
}

impl ContainerLog {
    /// Bytes of output kept per container.
    pub const LIMIT: usize = 16 << 20;

    /// Append a chunk.
    pub fn push(&self, chunk: &OutputChunk) {
        let mut log = self.chunks.lock().unwrap();
        log.bytes += chunk.1.len();
        log.chunks.push_back(chunk.clone());
        while log.bytes > Self::LIMIT {
            let Some(old) = log.chunks.pop_front() else { break };
            log.bytes -= old.1.len();
            log.first += 1;
        }
        let next = log.first + log.chunks.len() as u64;
        drop(log);
        self.next.send_replace(next);
    }

    /// The chunks from sequence number `from` on (or the oldest kept), and
    /// the sequence number after them.
    pub fn since(&self, from: u64) -> (Vec<OutputChunk>, u64) {
        let log = self.chunks.lock().unwrap();
        let skip = from.saturating_sub(log.first) as usize;
        let chunks: Vec<OutputChunk> = log.chunks.iter().skip(skip).cloned().collect();
        (chunks, log.first + log.chunks.len() as u64)
    }

    /// Changes whenever a chunk is appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.next.subscribe()
    }
}

/// The daemon's containers, by ID. With a directory ([`ContainerTable::open`])
/// each container also has a record there (`<id>.json`, written atomically
/// when it is created, started and exits), once exited its output
/// (`<id>.log`), and once started its filesystem changes (`<id>.fs/`), so
/// that a restarted daemon still lists, inspects, shows the logs of,
/// starts again and removes it.
#[derive(Default, Clone)]
pub struct ContainerTable {
    table: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    dir: Option<std::path::PathBuf>,
}

/// What `<id>.json` holds.
#[derive(Serialize, Deserialize)]
struct ContainerRecord {
    id: String,
    name: String,
    request: RunRequest,
    auto_remove: bool,
    created: i64,
    started: bool,
    exit_code: Option<i32>,
}

/// The exit code of a container that was running when its daemon stopped
/// (its shim ended with the daemon; docker shows such a container as
/// exited, with 255 when it could not learn a code).
pub const EXIT_CODE_DAEMON_STOPPED: i32 = 255;

impl ContainerTable {
    /// A table persisted under `dir`, with the containers recorded there by
    /// an earlier daemon: running ones are now exited
    /// ([`EXIT_CODE_DAEMON_STOPPED`]). Unreadable records are skipped (and
    /// logged). Returns the table and how many containers it loaded.
    pub fn open(dir: std::path::PathBuf) -> anyhow::Result<(ContainerTable, usize)> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let table = ContainerTable { table: Default::default(), dir: Some(dir.clone()) };
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record: ContainerRecord = match std::fs::read(&path).map_err(anyhow::Error::from).and_then(|b| Ok(serde_json::from_slice(&b)?)) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("container record {}: {e:#}: skipped", path.display());
                    continue;
                }
            };
            let container = Arc::new(Container::new(record.id.clone(), record.name, record.request, record.auto_remove, record.created));
            *container.started.lock().unwrap() = record.started;
            let exit = match (record.started, record.exit_code) {
                (true, None) => Some(EXIT_CODE_DAEMON_STOPPED),
                (_, code) => code,
            };
            container.exit.send_replace(exit);
            if let Ok(bytes) = std::fs::read(dir.join(format!("{}.log", record.id))) {
                for chunk in parse_log(&bytes) {
                    container.log.push(&chunk);
                }
            }
            if record.started && record.exit_code.is_none() {
                table.save(&container);
            }
            table.table.lock().unwrap().insert(record.id, container);
        }
        let loaded = table.len();
        Ok((table, loaded))
    }

    /// Register a new container; returns it.
    pub fn create(&self, name: Option<String>, request: RunRequest, auto_remove: bool) -> Arc<Container> {
        let id = random_hex(32);
        let name = format!("/{}", name.unwrap_or_else(|| format!("kiln_{}", &id[..12])));
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let container = Arc::new(Container::new(id.clone(), name, request, auto_remove, created));
        self.table.lock().unwrap().insert(id, container.clone());
        self.save(&container);
        container
    }

    /// Write the container's record (after it started or exited); once it
    /// exited, its output too. Failures are logged: the container works
    /// on, it only would not survive a restart.
    pub fn save(&self, container: &Container) {
        let Some(dir) = &self.dir else { return };
        let exit_code = *container.exit.borrow();
        let record = ContainerRecord {
            id: container.id.clone(),
            name: container.name.clone(),
            request: container.request.clone(),
            auto_remove: container.auto_remove,
            created: container.created,
            started: *container.started.lock().unwrap(),
            exit_code,
        };
        let write = |file: String, bytes: &[u8]| {
            if let Err(e) = kiln_cache::fsutil::write_atomic(&dir.join(&file), bytes) {
                tracing::warn!(id = %container.id, "writing {file}: {e}");
            }
        };
        if exit_code.is_some() {
            let mut log = Vec::new();
            for (stream, bytes) in container.log.since(0).0 {
                log.extend_from_slice(&super::docker::frame_header(stream_byte(stream), bytes.len()));
                log.extend_from_slice(&bytes);
            }
            write(format!("{}.log", container.id), &log);
        }
        match serde_json::to_vec(&record) {
            Ok(bytes) => write(format!("{}.json", container.id), &bytes),
            Err(e) => tracing::warn!(id = %container.id, "container record: {e}"),
        }
    }

    /// Find by full ID, unique ID prefix or name.
    pub fn get(&self, key: &str) -> Option<Arc<Container>> {
        let table = self.table.lock().unwrap();
        if let Some(c) = table.get(key) {
            return Some(c.clone());
        }
        let by_name = format!("/{key}");
        let matches: Vec<_> = table.values().filter(|c| c.name == by_name || c.id.starts_with(key)).collect();
        match matches.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }

    /// Every container, newest first (`docker ps`).
    pub fn list(&self) -> Vec<Arc<Container>> {
        let mut all: Vec<Arc<Container>> = self.table.lock().unwrap().values().cloned().collect();
        all.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
        all
    }

    /// How many containers exist.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The upper and work directories that keep the filesystem changes of
    /// container `id` from one start to the next (created if new), as
    /// docker keeps a container's; `None` for a table without a directory
    /// (each run then starts from the image).
    pub fn filesystem(&self, id: &str) -> anyhow::Result<Option<(std::path::PathBuf, std::path::PathBuf)>> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let fs = dir.join(format!("{id}.fs"));
        let (upper, work) = (fs.join("upper"), fs.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Some((upper, work)))
    }

    /// Forget the container (its record, output and filesystem) and wake
    /// those waiting for its removal.
    pub fn remove(&self, id: &str) -> Option<Arc<Container>> {
        let removed = self.table.lock().unwrap().remove(id);
        if let Some(c) = &removed {
            if let Some(dir) = &self.dir {
                for file in [format!("{id}.json"), format!("{id}.log")] {
                    match std::fs::remove_file(dir.join(&file)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(id, "removing {file}: {e}"),
                        _ => {}
                    }
                }
                match std::fs::remove_dir_all(dir.join(format!("{id}.fs"))) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(id, "removing its filesystem: {e}"),
                    _ => {}
                }
            }
            c.removed.send_replace(true);
        }
        removed
    }
}

/// The stream byte of docker's multiplexed frames (1 stdout, 2 stderr).
pub fn stream_byte(stream: LogStream) -> u8 {
    match stream {
        LogStream::Stdout => 1,
        LogStream::Stderr => 2,
    }
}

/// The chunks of a saved log (docker frames); a truncated tail is dropped.
fn parse_log(mut bytes: &[u8]) -> Vec<OutputChunk> {
    let mut chunks = Vec::new();
    while bytes.len() >= 8 {
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let Some(data) = bytes.get(8..8 + len) else { break };
        let stream = if bytes[0] == 2 { LogStream::Stderr } else { LogStream::Stdout };
        chunks.push((stream, Bytes::copy_from_slice(data)));
        bytes = &bytes[8 + len..];
    }
    chunks
}

/// `n` (at most 32) random bytes as hex, from getrandom(2); if that fails,
/// a hash of the time and pid (IDs need to be unique, not secret).
pub fn random_hex(n: usize) -> String {
    use sha2::Digest;
    let mut bytes = vec![0u8; n];
    // SAFETY: the buffer is valid for `n` bytes.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), n, 0) };
    if got != n as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let seed = format!("{t}-{}", std::process::id());
        bytes = sha2::Sha256::digest(seed.as_bytes())[..n.min(32)].to_vec();
    }
    hex::encode(bytes)
}
