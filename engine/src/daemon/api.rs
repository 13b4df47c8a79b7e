//! kiln's own API, `/v1/...` (reference: `docs/API.md`). Every route calls
//! the same engine functions as the embedded command of the same name, so
//! both modes print the same thing.

use std::sync::Arc;

use base64::Engine as _;
use http::{Method, StatusCode};
use hyper::Request;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::State;
use super::containers::{ContainerIo, RunRequest, leased_spec, run_streamed};
use crate::runtime::tty::WindowSize;
use super::build::{BuildLine, BuildOptions};
use super::context;
use super::web::{ApiError, ApiResult, MAX_ARCHIVE_UPLOAD, MAX_UPLOAD_BODY, Query, file_chunks, json_response, ok_json, read_body, read_json, receive_to_file, streaming};
use crate::commands;
use crate::registry::manifest::parse_platform;
use crate::runtime::LogStream;

/// The API version this daemon speaks (the `/v1` prefix).
pub const API_VERSION: &str = "1";

/// `POST /v1/images/pull` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// Image reference.
    pub reference: String,
    /// `os/arch[/variant]` (default `linux/amd64`).
    #[serde(default)]
    pub platform: Option<String>,
}

/// `POST /v1/images/pull` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullResult {
    /// Normalized name stored.
    pub name: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Blobs downloaded (the rest were already in the store).
    pub blobs_fetched: usize,
}

/// `POST /v1/images/{name}/push` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PushResult {
    /// Where it went.
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Blobs uploaded.
    pub blobs_uploaded: usize,
    /// Blobs mounted from another repository of the registry.
    #[serde(default)]
    pub blobs_mounted: usize,
    /// Blobs the registry already had.
    pub blobs_skipped: usize,
}

/// `GET /v1/system/df` answer (see `kiln du`).
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Cache records.
    pub records: usize,
    /// Snapshots.
    pub snapshots: usize,
    /// Bytes of snapshots.
    pub snapshot_bytes: u64,
    /// Snapshots no record refers to.
    pub unreferenced_snapshots: usize,
    /// Bytes of cache mounts.
    pub cache_mount_bytes: u64,
    /// Every byte under the store root by top-level entry, and in total
    /// (as `du -sb`).
    #[serde(default)]
    pub root_parts: Vec<(String, u64)>,
    /// See `root_parts`.
    #[serde(default)]
    pub root_total: u64,
}

/// `POST /v1/system/check` answer (the body is `{"repair": bool, "deep":
/// bool}`, as `kiln check`'s flags).
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckResult {
    /// The report, as `kiln check` prints it.
    pub output: String,
    /// 0: consistent; 1: problems left.
    pub code: i32,
}

/// `POST /v1/system/prune` body (see `kiln prune`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneRequest {
    /// Remove the whole build cache.
    pub all: bool,
    /// Keep this much (e.g. `10GB`), removing the oldest first.
    pub keep_storage: Option<String>,
}

/// `POST /v1/system/prune` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PruneResult {
    /// Records removed.
    pub records: usize,
    /// Snapshots removed.
    pub snapshots: usize,
    /// Bytes freed.
    pub bytes: u64,
}

/// `POST /v1/build/context/missing` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingRequest {
    /// `sha256:` digests of the context's files.
    pub digests: Vec<String>,
}

/// `POST /v1/images/{name}/tag` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    /// The new name.
    pub target: String,
}

/// One line of the `POST /v1/containers/run` stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEvent {
    /// Bytes the container wrote to stdout (base64).
    Stdout(String),
    /// Bytes the container wrote to stderr (base64).
    Stderr(String),
    /// The container exited with this code (last line).
    Exit(i32),
    /// Running failed (last line).
    Error(String),
}

/// The largest `/v1/build` request (the context's file list is in it).
pub const MAX_BUILD_REQUEST: usize = 64 << 20;

/// Dispatch `/v1/<rest>`.
pub async fn route(state: Arc<State>, req: Request<Incoming>, rest: String) -> ApiResult {
    let method = req.method().clone();
    let query = Query::parse(req.uri().query())?;
    match (&method, rest.as_str()) {
        (&Method::GET | &Method::HEAD, "_ping") => Ok(hyper::Response::builder()
            .header("Kiln-Api-Version", API_VERSION)
            .header("Content-Type", "text/plain")
            .body(super::web::full("OK"))
            .expect("static response")),
        (&Method::GET, "version") => ok_json(&json!({
            "version": env!("CARGO_PKG_VERSION"),
            "api_version": API_VERSION,
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        })),
        (&Method::GET, "images") => {
            let store = state.store.clone();
            ok_json(&blocking(move || store.images.list()).await?)
        }
        (&Method::GET, "system/df") => {
            let store = state.store.clone();
            let (u, root) = blocking(move || {
                anyhow::Ok((kiln_solver::gc::usage(&store)?, kiln_cache::usage::root_usage(store.root())?))
            })
            .await?;
            ok_json(&DiskUsage {
                root_parts: root.parts,
                root_total: root.total,
                records: u.records,
                snapshots: u.snapshots,
                snapshot_bytes: u.snapshot_bytes,
                unreferenced_snapshots: u.unreferenced_snapshots,
                cache_mount_bytes: u.cache_mount_bytes,
            })
        }
        (&Method::POST, "system/check") => {
            let args: crate::commands::check::Args = read_json(req.into_body()).await?;
            let store = state.store.clone();
            let (output, code) = blocking(move || crate::commands::check::check_store(&store, &args)).await?;
            ok_json(&CheckResult { output, code })
        }
        (&Method::POST, "system/prune") => {
            let body: PruneRequest = read_json(req.into_body()).await?;
            let keep_bytes = body
                .keep_storage
                .as_deref()
                .map(kiln_solver::gc::parse_size)
                .transpose()
                .map_err(|e| ApiError::bad_request(format!("keep_storage: {e:#}")))?;
            let store = state.store.clone();
            let options = kiln_solver::gc::PruneOptions { all: body.all, keep_bytes };
            let r = blocking(move || kiln_solver::gc::prune(&store, &options)).await?;
            ok_json(&PruneResult { records: r.records, snapshots: r.snapshots, bytes: r.bytes })
        }
        (&Method::POST, "images/pull") => pull(state, read_json(req.into_body()).await?).await,
        (&Method::POST, "build/context/missing") => {
            let body: MissingRequest = read_json(req.into_body()).await?;
            let store = state.store.clone();
            let missing = blocking(move || Ok(context::missing(&store, &body.digests))).await??;
            ok_json(&json!({ "missing": missing }))
        }
        (&Method::POST, "build/context/blobs") => {
            let bytes = read_body(req.into_body(), MAX_UPLOAD_BODY).await?;
            let store = state.store.clone();
            let stored = blocking(move || Ok(context::store_blobs(&store, &bytes[..]))).await??;
            ok_json(&json!({ "stored": stored }))
        }
        (&Method::POST, "build") => {
            let bytes = read_body(req.into_body(), MAX_BUILD_REQUEST).await?;
            build(state, super::web::parse_json(&bytes)?).await
        }
        (&Method::POST, "containers/run") if is_upgrade(&req, ATTACH_PROTOCOL_FRAMES) => run_attached(state, req, InputFormat::Frames).await,
        (&Method::POST, "containers/run") if is_upgrade(&req, ATTACH_PROTOCOL) => run_attached(state, req, InputFormat::JsonLines).await,
        (&Method::POST, "containers/run") => run(state, read_json(req.into_body()).await?).await,
        (&Method::POST, "images/import") => import(state, &query, req.into_body()).await,
        (&Method::POST, "images/load") => load(state, &query, req.into_body()).await,
        (&Method::POST, "images/save") => save(state, read_json(req.into_body()).await?).await,
        (&Method::POST, "auth") => login(state, read_json(req.into_body()).await?).await,
        (_, path) if path.starts_with("images/") => {
            let name = &path["images/".len()..];
            if let (&Method::GET, Some(name)) = (&method, name.strip_suffix("/json")) {
                let (store, name) = (state.store.clone(), name.to_string());
                return ok_json(
                    &blocking(move || {
                        let record = store.images.resolve(&name)?;
                        commands::inspect::describe(&store, &store.images.list()?, &record)
                    })
                    .await?,
                );
            }
            if let (&Method::POST, Some(name)) = (&method, name.strip_suffix("/tag")) {
                let body: TagRequest = read_json(req.into_body()).await?;
                let (store, name) = (state.store.clone(), name.to_string());
                let record = blocking(move || store.images.tag(&name, &body.target)).await?;
                return Ok(json_response(StatusCode::CREATED, &json!({ "name": record.name })));
            }
            if let (&Method::POST, Some(name)) = (&method, name.strip_suffix("/push")) {
                return push(state, name).await;
            }
            if method == Method::DELETE && !name.is_empty() {
                let (store, name) = (state.store.clone(), name.to_string());
                let untagged = blocking(move || {
                    let record = store.images.resolve(&name)?;
                    commands::rmi::untag(&store, &name, &record)
                })
                .await?;
                return ok_json(&json!({ "untagged": untagged }));
            }
            Err(not_found(&method, &rest))
        }
        _ => Err(not_found(&method, &rest)),
    }
}

fn not_found(method: &Method, rest: &str) -> ApiError {
    ApiError::not_found(format!("no route {method} /v1/{rest} (see docs/API.md)"))
}

/// Whether `req` asks to switch to `protocol` (`Connection: Upgrade`).
fn is_upgrade(req: &Request<Incoming>, protocol: &str) -> bool {
    let has = |name: http::header::HeaderName, value: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(value)))
        })
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, protocol)
}

/// Run blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}"))),
    }
}

/// Pull through the same registry code `kiln pull` uses.
pub async fn pull_image(state: &State, reference: &str, platform: Option<&str>) -> Result<PullResult, ApiError> {
    let platform = parse_platform(platform.unwrap_or("linux/amd64")).map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let pulled = state.registry.pull(&state.store, reference, &platform).await?;
    Ok(PullResult {
        name: pulled.name,
        manifest_digest: pulled.manifest_digest,
        layers: pulled.layers.len(),
        blobs_fetched: pulled.blobs_fetched,
    })
}

async fn pull(state: Arc<State>, body: PullRequest) -> ApiResult {
    ok_json(&pull_image(&state, &body.reference, body.platform.as_deref()).await?)
}

async fn push(state: Arc<State>, name: &str) -> ApiResult {
    let pushed = commands::push::push_local(&state.registry, &state.store, name).await?;
    ok_json(&PushResult {
        reference: pushed.reference,
        manifest_digest: pushed.manifest_digest,
        blobs_uploaded: pushed.blobs_uploaded,
        blobs_mounted: pushed.blobs_mounted,
        blobs_skipped: pushed.blobs_skipped,
    })
}

/// Run a container and stream its output as JSON lines; the last line is
/// the exit code. A client that goes away kills its container.
async fn run(state: Arc<State>, body: RunRequest) -> ApiResult {
    if body.interactive || body.tty {
        return Err(ApiError::bad_request(format!(
            "run: interactive and tty runs need an upgraded connection (send Connection: Upgrade and Upgrade: {ATTACH_PROTOCOL_FRAMES})"
        )));
    }
    let store = state.store.clone();
    let (spec, lease) = blocking(move || leased_spec(&store, &body)).await?;
    let (response, mut lines) = streaming("application/x-ndjson");
    let gone = lines.clone();
    let mut events = run_events(state, spec, lease, ContainerIo::default(), async move {
        gone.closed().await;
        tracing::info!("run: client went away");
    });
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            lines.send(&event).await;
        }
    });
    Ok(response)
}

/// The `Upgrade` protocol of interactive runs.
pub const ATTACH_PROTOCOL: &str = "kiln-attach";

/// The upgrade protocol whose input is binary frames ([`input_frame`])
/// rather than [`AttachInput`] lines: stdin's bytes as they are, no base64.
pub const ATTACH_PROTOCOL_FRAMES: &str = "kiln-attach-2";

/// Input frames of [`ATTACH_PROTOCOL_FRAMES`]: a kind byte, the payload's
/// length as a big-endian `u32` (at most [`MAX_ATTACH_LINE`]), the payload.
pub mod input_frame {
    /// Bytes for the container's stdin.
    pub const STDIN: u8 = 0;
    /// The client's stdin ended (empty payload).
    pub const STDIN_EOF: u8 = 1;
    /// A new terminal size: rows and columns, big-endian `u16`s.
    pub const RESIZE: u8 = 2;

    /// One frame of `kind` carrying `payload`.
    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// A [`RESIZE`] frame.
    pub fn resize(rows: u16, cols: u16) -> Vec<u8> {
        let mut size = rows.to_be_bytes().to_vec();
        size.extend_from_slice(&cols.to_be_bytes());
        encode(RESIZE, &size)
    }
}

/// How the client's input arrives on an upgraded run connection.
#[derive(Clone, Copy)]
enum InputFormat {
    /// [`AttachInput`] JSON lines (`kiln-attach`).
    JsonLines,
    /// Binary frames (`kiln-attach-2`, see [`input_frame`]).
    Frames,
}

/// What the client sent, whatever the format.
enum Input {
    Stdin(bytes::Bytes),
    StdinEof,
    Resize(WindowSize),
}

/// The next input of `reader`; `None` at the end of the connection or on
/// malformed input (logged).
async fn next_input(reader: &mut (impl tokio::io::AsyncBufRead + Unpin), format: InputFormat) -> Option<Input> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    match format {
        InputFormat::Frames => {
            let mut header = [0u8; 5];
            reader.read_exact(&mut header).await.ok()?;
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            if len > MAX_ATTACH_LINE {
                tracing::warn!("run: an input frame of {len} bytes (limit {MAX_ATTACH_LINE}): closing");
                return None;
            }
            let mut payload = vec![0u8; len];
            reader.read_exact(&mut payload).await.ok()?;
            match (header[0], payload.as_slice()) {
                (input_frame::STDIN, _) => Some(Input::Stdin(payload.into())),
                (input_frame::STDIN_EOF, []) => Some(Input::StdinEof),
                (input_frame::RESIZE, &[r0, r1, c0, c1]) => {
                    Some(Input::Resize(WindowSize { rows: u16::from_be_bytes([r0, r1]), cols: u16::from_be_bytes([c0, c1]) }))
                }
                (kind, _) => {
                    tracing::warn!("run: malformed input frame (kind {kind}, {len} bytes): closing");
                    None
                }
            }
        }
        InputFormat::JsonLines => {
            let mut line = Vec::new();
            match reader.take(MAX_ATTACH_LINE as u64 + 1).read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            if line.len() > MAX_ATTACH_LINE {
                tracing::warn!("run: an input line longer than {MAX_ATTACH_LINE} bytes: closing");
                return None;
            }
            match serde_json::from_slice::<AttachInput>(&line) {
                Ok(AttachInput::Stdin(data)) => base64::engine::general_purpose::STANDARD.decode(data).ok().map(|b| Input::Stdin(b.into())),
                Ok(AttachInput::StdinEof) => Some(Input::StdinEof),
                Ok(AttachInput::Resize([rows, cols])) => Some(Input::Resize(WindowSize { rows, cols })),
                Err(e) => {
                    tracing::warn!("run: malformed input line: {e}");
                    None
                }
            }
        }
    }
}

/// A line the client sends on a `kiln-attach` connection (older clients;
/// kiln's own now sends [`input_frame`]s).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachInput {
    /// Bytes for the container's stdin (base64).
    Stdin(String),
    /// The client's stdin ended: close the container's.
    StdinEof,
    /// The client's terminal has a new size, `[rows, cols]`.
    Resize([u16; 2]),
}

/// `POST /v1/containers/run` with `Upgrade: kiln-attach-2` (or the older
/// `kiln-attach`): after `101`, the daemon sends [`RunEvent`] lines and
/// reads input frames (or [`AttachInput`] lines). The client closing the
/// connection stops the container.
async fn run_attached(state: Arc<State>, mut req: Request<Incoming>, format: InputFormat) -> ApiResult {
    use tokio::io::AsyncWriteExt;
    let upgrade = hyper::upgrade::on(&mut req);
    let body: RunRequest = read_json(req.into_body()).await?;
    let request = body.clone();
    let store = state.store.clone();
    let (spec, lease) = blocking(move || leased_spec(&store, &request)).await?;
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => return tracing::warn!("run: the connection was not upgraded: {e}"),
        };
        let (read, mut write) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let (stdin_tx, stdin_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let (resize_tx, resize_rx) = tokio::sync::mpsc::unbounded_channel();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let tty = body.tty.then(|| {
            let [rows, cols] = body.console_size.unwrap_or_default();
            WindowSize { rows, cols }
        });
        let io = ContainerIo { stdin: body.interactive.then_some(stdin_rx), tty, resize: Some(resize_rx) };
        let input = tokio::spawn(async move {
            let mut stdin = Some(stdin_tx);
            let mut reader = tokio::io::BufReader::with_capacity(64 << 10, read);
            while let Some(input) = next_input(&mut reader, format).await {
                match input {
                    Input::Stdin(bytes) => {
                        if let Some(tx) = &stdin {
                            let _ = tx.send(bytes).await;
                        }
                    }
                    Input::StdinEof => stdin = None,
                    Input::Resize(size) => {
                        let _ = resize_tx.send(size);
                    }
                }
            }
            let _ = gone_tx.send(());
        });
        let gone = async move {
            let _ = gone_rx.await;
            tracing::info!("run: client went away");
        };
        let mut events = run_events(state, spec, lease, io, gone);
        while let Some(event) = events.recv().await {
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
        input.abort();
    });
    Ok(hyper::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, match format {
            InputFormat::JsonLines => ATTACH_PROTOCOL,
            InputFormat::Frames => ATTACH_PROTOCOL_FRAMES,
        })
        .body(super::web::full(""))
        .expect("static response"))
}

/// The longest [`AttachInput`] line or input frame payload accepted (bytes).
pub const MAX_ATTACH_LINE: usize = 1 << 20;

/// Run `spec` and turn what happens into [`RunEvent`]s: output, then
/// `Exit` or `Error` last. The container is stopped when `gone` resolves or
/// the daemon cancels running work; `lease` is held until it exited.
fn run_events(
    state: Arc<State>,
    spec: crate::runtime::ContainerSpec,
    lease: kiln_cache::lease::Lease,
    io: ContainerIo,
    gone: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<RunEvent> {
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _lease = lease;
        let cancel = {
            let state = state.clone();
            async move {
                tokio::select! {
                    _ = gone => {}
                    _ = state.cancelled() => {}
                }
            }
        };
        let event = |(stream, bytes): super::containers::OutputChunk| {
            let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
            match stream {
                LogStream::Stdout => RunEvent::Stdout(data),
                LogStream::Stderr => RunEvent::Stderr(data),
            }
        };
        let runner = run_streamed(state.shim.clone(), spec, io, out_tx, cancel);
        tokio::pin!(runner);
        let result = loop {
            tokio::select! {
                Some(chunk) = out_rx.recv() => { let _ = events.send(event(chunk)); }
                result = &mut runner => break result,
            }
        };
        // Output sent before the exit must reach the client first.
        while let Ok(chunk) = out_rx.try_recv() {
            let _ = events.send(event(chunk));
        }
        let _ = events.send(match result {
            Ok(code) => RunEvent::Exit(code),
            Err(e) => RunEvent::Error(format!("{e:#}")),
        });
    });
    rx
}

/// Lay out the context, then build, streaming [`BuildLine`]s. A client that
/// goes away cancels its own build only.
async fn build(state: Arc<State>, mut opts: BuildOptions) -> ApiResult {
    let (store, cache) = (state.store.clone(), state.contexts.clone());
    let dir = match opts.context_key.clone() {
        // An unchanged context named by its key: no list to parse or check.
        Some(key) if opts.context.is_empty() => match blocking(move || Ok(cache.lease_known(&key))).await? {
            Some(lease) => lease,
            None => return Err(ApiError::context_unknown()),
        },
        _ => {
            let entries = std::mem::take(&mut opts.context);
            blocking(move || Ok(cache.lease(&store, &entries))).await??
        }
    };
    let (response, mut lines) = streaming("application/x-ndjson");
    tokio::spawn(async move {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let gone = lines.clone();
        let (path, content) = (dir.path.clone(), dir.content.clone());
        let work = super::build::run_build(&state, opts, path, Some(content), tx);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                Some(event) = events.recv() => { lines.send(&BuildLine::Event(event)).await; }
                r = &mut work => break Some(r),
                _ = gone.closed() => { tracing::info!("build: client went away, cancelling its build"); break None; }
                _ = state.cancelled() => break Some(Err(anyhow::anyhow!("the daemon is shutting down: build cancelled"))),
            }
        };
        let Some(result) = result else { return };
        while let Ok(event) = events.try_recv() {
            lines.send(&BuildLine::Event(event)).await;
        }
        let last = match result {
            Ok(done) => match done.artifact {
                Some(artifact) => match send_artifact(&mut lines, artifact).await {
                    Ok(()) => BuildLine::Result { image_id: done.image_id, pushed: done.pushed },
                    Err(e) => BuildLine::Error(format!("sending the output: {e:#}")),
                },
                None => BuildLine::Result { image_id: done.image_id, pushed: done.pushed },
            },
            Err(e) => BuildLine::Error(format!("{e:#}")),
        };
        lines.send(&last).await;
        drop(dir);
    });
    Ok(response)
}

/// Stream a staged output to the client as [`BuildLine::Output`] lines.
async fn send_artifact(lines: &mut super::web::LineSender, artifact: super::build::Artifact) -> anyhow::Result<()> {
    let mut chunks = file_chunks(artifact.file.clone(), OUTPUT_CHUNK, artifact);
    while let Some(chunk) = chunks.recv().await {
        let data = base64::engine::general_purpose::STANDARD.encode(chunk?);
        anyhow::ensure!(lines.send(&BuildLine::Output(data)).await, "the client went away");
    }
    Ok(())
}

/// Bytes of output per [`BuildLine::Output`] line (before base64).
const OUTPUT_CHUNK: usize = 512 << 10;

/// An archive upload written to a file in a new scratch directory
/// (removed when the returned directory is dropped).
async fn receive_upload(state: &State, body: Incoming) -> Result<(tempfile::TempDir, std::path::PathBuf), ApiError> {
    let scratch = super::build::context_dir(state).map_err(ApiError::from)?;
    let file = scratch.path().join("upload");
    receive_to_file(body, &file, MAX_ARCHIVE_UPLOAD).await?;
    Ok((scratch, file))
}

/// `POST /v1/images/import?reference=NAME&source=FILE`: the body is the
/// rootfs tarball; `source` is the client's file name (for the history).
async fn import(state: Arc<State>, query: &Query, body: Incoming) -> ApiResult {
    let reference = query.get("reference").filter(|r| !r.is_empty()).ok_or_else(|| ApiError::bad_request("import: reference is required"))?.to_string();
    let source = std::path::PathBuf::from(query.get("source").unwrap_or("-"));
    let epoch = match query.get("source_date_epoch").filter(|e| !e.is_empty()) {
        Some(e) => Some(e.parse::<i64>().map_err(|_| ApiError::bad_request(format!("import: source_date_epoch {e:?}: expected seconds")))?),
        None => None,
    };
    let (scratch, file) = receive_upload(&state, body).await?;
    let store = state.store.clone();
    let record = blocking(move || {
        let _scratch = scratch;
        commands::import::import_rootfs_as(&store, &file, &reference, &source, epoch)
    })
    .await?;
    ok_json(&record)
}

/// `POST /v1/images/load?tag=NAME&source=FILE`: the body is an OCI layout
/// or docker-archive tar (a directory input is tarred by the client).
async fn load(state: Arc<State>, query: &Query, body: Incoming) -> ApiResult {
    let tag = query.get("tag").filter(|t| !t.is_empty()).map(str::to_string);
    let source = std::path::PathBuf::from(query.get("source").unwrap_or("-"));
    let (scratch, file) = receive_upload(&state, body).await?;
    let store = state.store.clone();
    let records = blocking(move || {
        let _scratch = scratch;
        commands::load::load_as(&store, &file, tag.as_deref(), &source)
    })
    .await?;
    ok_json(&records)
}

/// `POST /v1/images/save` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// Names, IDs or digests.
    pub images: Vec<String>,
    /// Archive format.
    pub format: commands::save::Format,
    /// Write an OCI layout directory (sent back as a tar) instead of a tar.
    #[serde(default)]
    pub dir: bool,
}

/// Save into a scratch place, then stream it: the archive itself, or a tar
/// of the OCI layout directory.
async fn save(state: Arc<State>, body: SaveRequest) -> ApiResult {
    if body.images.is_empty() {
        return Err(ApiError::bad_request("save: images is empty"));
    }
    let scratch = super::build::context_dir(&state).map_err(ApiError::from)?;
    let store = state.store.clone();
    let (file, scratch) = blocking(move || {
        let out = scratch.path().join(if body.dir { "layout" } else { "archive.tar" });
        commands::save::save(&store, &body.images, body.format, &out)?;
        let file = if body.dir {
            let tarred = scratch.path().join("layout.tar");
            super::build::tar_dir(&out, &tarred)?;
            tarred
        } else {
            out
        };
        Ok((file, scratch))
    })
    .await?;
    let (response, mut sink) = streaming("application/x-tar");
    let mut chunks = file_chunks(file, OUTPUT_CHUNK, scratch);
    tokio::spawn(async move {
        while let Some(chunk) = chunks.recv().await {
            match chunk {
                Ok(bytes) => {
                    if !sink.send_raw(bytes).await {
                        return tracing::info!("save: client went away");
                    }
                }
                // The client sees a short archive and fails.
                Err(e) => return tracing::warn!("save: reading the archive: {e}"),
            }
        }
    });
    Ok(response)
}

/// `POST /v1/auth` body (`kiln login`). The password is never logged.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Registry host.
    pub server: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

/// `POST /v1/auth` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginResult {
    /// The daemon's credentials file, where the login was stored.
    pub auth_file: String,
}

async fn login(state: Arc<State>, body: LoginRequest) -> ApiResult {
    state.registry.login(&body.server, &body.username, &body.password).await?;
    ok_json(&LoginResult { auth_file: state.registry.config().auth_file.display().to_string() })
}
